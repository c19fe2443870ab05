//! The coordinator's modules form layers: no module imports one that imports it back (through
//! any chain of `crate::` paths), the crate root included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The identifiers a file names right after `crate::`, in paths and in `crate::{a, b::c}`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                out.extend(group.split(',').map(|p| ident(p.trim())).filter(|p| !p.is_empty()));
            }
            None => {
                out.insert(ident(rest));
            }
        }
    }
    out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let top = |p: &Path| -> String {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if first == "lib" {
            "crate root".into()
        } else {
            first
        }
    };
    let modules: BTreeSet<String> = files.iter().map(|p| top(p)).filter(|m| m != "bin").collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.iter().filter(|p| top(p) != "bin") {
        let from = top(file);
        for name in crate_paths(&std::fs::read_to_string(file).unwrap()) {
            let to = if modules.contains(&name) { name } else { "crate root".to_string() };
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // The crate root imports the modules it declares (`pub mod`, `pub use m::...`, `m::f()`).
    let root = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    for m in modules.iter().filter(|m| root.contains(&format!("{m}::"))) {
        edges.entry("crate root".into()).or_default().insert(m.clone());
    }
    // A module reaches itself again: walk from each one.
    for start in &modules {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Vec<String>> = vec![vec![start.clone()]];
        while let Some(path) = stack.pop() {
            for next in edges.get(path.last().unwrap()).into_iter().flatten() {
                assert!(next != start, "an import cycle: {} -> {start}", path.join(" -> "));
                if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push(longer);
                }
            }
        }
    }
    assert!(edges.len() > 5 && modules.contains("frontend"), "the modules were read: {edges:?}");
}
