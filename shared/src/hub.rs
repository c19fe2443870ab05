//! Finds a model's files: a local folder, or a Hub id resolved through the Hugging Face cache
//! exactly as `huggingface_hub` lays it out, downloading what is missing unless offline.
//!
//! Downloads speak the Hub's HTTP protocol (`remote`) and write the cache as huggingface_hub
//! does, safely when a coordinator and its workers fill one cache at once (`store`).

mod remote;
mod store;

pub use store::{downloads, Download};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Where a model's files live once resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The name a user gave (folder or Hub id).
    pub spec: String,
    /// The folder holding config.json and the rest: a local folder or `snapshots/<sha>/`.
    pub dir: PathBuf,
    /// The commit the snapshot is at, for Hub ids.
    pub commit: Option<String>,
    /// The GGUF file holding the whole model, when it is a GGUF checkpoint (its name in `dir`).
    pub gguf: Option<String>,
}

impl ModelFiles {
    /// A file of the model.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where the weights are: the folder, or the GGUF file.
    pub fn weights(&self) -> PathBuf {
        match &self.gguf {
            Some(f) => self.dir.join(f),
            None => self.dir.clone(),
        }
    }

    /// The GGUF file's header, for a GGUF checkpoint.
    pub fn gguf(&self) -> Result<Option<crate::gguf::Gguf>> {
        self.gguf.as_ref().map(|f| crate::gguf::Gguf::open(&self.dir.join(f))).transpose()
    }

    /// The model's `config.json` (for a GGUF checkpoint, as transformers derives it).
    pub fn config_json(&self) -> Result<serde_json::Value> {
        if let Some(g) = self.gguf()? {
            return g.config_json();
        }
        let path = self.file("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::config(path.display().to_string(), format!("malformed: {e}")))
    }

    /// The model's configuration.
    pub fn config(&self) -> Result<crate::config::ModelConfig> {
        match self.gguf()? {
            Some(g) => crate::config::ModelConfig::from_value(&g.config_json()?).map_err(|e| match e {
                Error::Config { message, .. } => Error::config(g.path().display().to_string(), message),
                e => e,
            }),
            None => crate::config::ModelConfig::from_file(&self.file("config.json")),
        }
    }

    /// `generation_config.json` (none for a GGUF checkpoint: its config's ids stand).
    pub fn generation(&self) -> Result<crate::config::GenerationConfig> {
        match self.gguf {
            Some(_) => Ok(crate::config::GenerationConfig::default()),
            None => crate::config::GenerationConfig::from_file(&self.file("generation_config.json")),
        }
    }

    /// The tokenizer (for a GGUF checkpoint, built from its metadata).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        match self.gguf()? {
            Some(g) => g.tokenizer(),
            None => crate::tokenizer::Tokenizer::from_file(&self.file("tokenizer.json")),
        }
    }

    /// The chat templates (for a GGUF checkpoint, `tokenizer.chat_template`).
    pub fn chat_templates(&self, model: impl Into<String>) -> Result<crate::chat::ChatTemplates, crate::chat::ChatError> {
        match self.gguf().map_err(|e| crate::chat::ChatError::Config { path: self.weights(), message: e.to_string() })? {
            Some(g) => {
                let sources = g.chat_template().map(|t| ("default".to_string(), t.to_string()));
                Ok(crate::chat::ChatTemplates::from_sources(model, sources, g.special_tokens()))
            }
            None => crate::chat::ChatTemplates::load(&self.dir, model),
        }
    }
}

/// Which GGUF file of `listed` (a folder's or a repo's files) holds the model: `wanted` (the
/// `--gguf-file` given), else the only one when there is no `config.json`; `None` for a
/// safetensors checkpoint. `Err` says why none can be chosen.
pub fn choose_gguf(listed: &[String], wanted: Option<&str>) -> std::result::Result<Option<String>, String> {
    let ggufs: Vec<&String> = listed.iter().filter(|f| crate::gguf::is_gguf_name(f)).collect();
    let names = || ggufs.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(w) = wanted.filter(|w| !w.is_empty()) {
        if !crate::gguf::is_gguf_name(w) {
            return Err(format!("--gguf-file {w:?} does not name a .gguf file"));
        }
        if listed.iter().any(|f| f == w) {
            return Ok(Some(w.to_string()));
        }
        let has = if ggufs.is_empty() { "it has no GGUF file".to_string() } else { format!("it has {}", names()) };
        return Err(format!("there is no GGUF file {w} ({has})"));
    }
    if listed.iter().any(|f| f == "config.json") {
        return Ok(None);
    }
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(Some(ggufs[0].clone())),
        n => Err(format!("there are {n} GGUF files ({}): name one with --gguf-file", names())),
    }
}

/// The names of the files directly in `dir`.
fn list_dir(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect();
    names.sort();
    names
}

/// The Hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = non_empty_env("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = non_empty_env("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = non_empty_env("HOME").unwrap_or_else(|| "/root".to_string());
    PathBuf::from(home).join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` forbids every network access (huggingface_hub's truthy values).
pub fn offline() -> bool {
    matches!(non_empty_env("HF_HUB_OFFLINE").map(|v| v.to_ascii_lowercase()).as_deref(), Some("1" | "true" | "yes" | "on"))
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The folder of a Hub repo in the cache: `models--ORG--NAME`.
pub fn repo_folder(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// Whether `s` is shaped like a Hub model id (`name` or `org/name`).
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && !p.contains("..") && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The files every model needs; the weights come from the index or the single file.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["generation_config.json", "tokenizer_config.json", "chat_template.jinja"];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// What a model spec names.
enum Source<'a> {
    Folder(&'a Path),
    Hub { repo: &'a str, revision: &'a str },
}

/// Tells a folder from a Hub id; a folder must hold config.json.
fn source<'a>(spec: &'a str, revision: Option<&'a str>) -> Result<Source<'a>> {
    let path = Path::new(spec);
    if path.is_dir() {
        if !path.join("config.json").is_file() && !list_dir(path).iter().any(|f| crate::gguf::is_gguf_name(f)) {
            return Err(Error::ModelNotFound(format!(
                "folder {spec} has no config.json and no GGUF file (is it a Hugging Face model folder?)"
            )));
        }
        return Ok(Source::Folder(path));
    }
    if spec.starts_with('/') || spec.starts_with('.') || !is_repo_id(spec) {
        return Err(Error::ModelNotFound(format!("model {spec:?} is neither a folder nor a Hugging Face model id (ORG/NAME)")));
    }
    Ok(Source::Hub { repo: spec, revision: revision.filter(|r| !r.is_empty()).unwrap_or("main") })
}

/// Resolves `spec` (a folder or a Hub id) at `revision` (default `main`) to its files.
pub fn resolve(spec: &str, revision: Option<&str>) -> Result<ModelFiles> {
    resolve_file(spec, revision, None)
}

/// A folder's files: its GGUF file `gguf_file` (or its only one, without a config.json), else
/// its safetensors checkpoint.
fn folder_files(spec: &str, path: &Path, gguf_file: Option<&str>) -> Result<ModelFiles> {
    let gguf = choose_gguf(&list_dir(path), gguf_file).map_err(|e| Error::ModelNotFound(format!("folder {spec}: {e}")))?;
    Ok(ModelFiles { spec: spec.to_string(), dir: path.to_path_buf(), commit: None, gguf })
}

/// [`resolve`], choosing the GGUF file `gguf_file` of a folder or repo holding several (as
/// transformers' `gguf_file=`); one holding a single GGUF file and no config.json needs none.
pub fn resolve_file(spec: &str, revision: Option<&str>, gguf_file: Option<&str>) -> Result<ModelFiles> {
    let (repo, revision) = match source(spec, revision)? {
        Source::Folder(path) => return folder_files(spec, path, gguf_file),
        Source::Hub { repo, revision } => (repo, revision),
    };
    let cache = cache_dir();
    match resolve_cached(&cache, repo, revision, gguf_file) {
        Ok(files) => Ok(files),
        Err(missing) if offline() => Err(Error::ModelNotFound(format!(
            "model {repo} (revision {revision}) is not in the Hugging Face cache at {} and HF_HUB_OFFLINE=1: {missing}",
            cache.display()
        ))),
        Err(_) => {
            let (commit, dir, gguf) = download(&cache, repo, revision, Want::Model, gguf_file)?;
            complete(repo, commit, dir, gguf).map_err(Error::ModelNotFound)
        }
    }
}

/// Makes the cache hold everything a model needs at `revision` (default `main`) and returns its
/// files. Online it asks the Hub which commit `revision` is at now and fetches what the cache
/// lacks of that commit, each file once among all the processes filling the cache (what
/// `shardctl cache fill` runs ahead of the servers); with `HF_HUB_OFFLINE=1` it resolves from the
/// cache alone. A folder is returned as it is.
pub fn fill(spec: &str, revision: Option<&str>, gguf_file: Option<&str>) -> Result<ModelFiles> {
    let (repo, revision) = match source(spec, revision)? {
        Source::Folder(_) => return resolve_file(spec, revision, gguf_file),
        Source::Hub { repo, revision } => (repo, revision),
    };
    if offline() {
        return resolve_file(repo, Some(revision), gguf_file);
    }
    let cache = cache_dir();
    match download(&cache, repo, revision, Want::Model, gguf_file) {
        Ok((commit, dir, gguf)) => complete(repo, commit, dir, gguf).map_err(Error::ModelNotFound),
        // As huggingface_hub's snapshot_download: a Hub that cannot be asked leaves the cache
        // as the answer, when it holds the whole model.
        Err(e @ Error::Download { .. }) => match resolve_cached(&cache, repo, revision, gguf_file) {
            Ok(files) => {
                tracing::warn!(repo, revision, error = %e, "the Hub could not be asked; using the cached snapshot");
                Ok(files)
            }
            Err(_) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Resolves only a model's `config.json` (all that planning needs), downloading just that
/// file when online and missing. A GGUF checkpoint carries its config in the file's header, so
/// for one the whole file is resolved (and fetched when missing).
pub fn resolve_config(spec: &str, revision: Option<&str>, gguf_file: Option<&str>) -> Result<serde_json::Value> {
    let (repo, revision) = match source(spec, revision)? {
        Source::Folder(path) => return folder_files(spec, path, gguf_file)?.config_json(),
        Source::Hub { repo, revision } => (repo, revision),
    };
    let cache = cache_dir();
    if let Ok((commit, dir)) = snapshot(&cache, repo, revision) {
        let files =
            choose_gguf(&list_dir(&dir), gguf_file).ok().map(|gguf| ModelFiles { spec: repo.to_string(), dir, commit: Some(commit), gguf });
        if let Some(files) = files.filter(|f| f.gguf.as_ref().map_or(f.file("config.json"), |g| f.file(g)).is_file()) {
            return files.config_json();
        }
    }
    if offline() {
        return Err(Error::ModelNotFound(format!(
            "model {repo} (revision {revision}) has no config.json in the Hugging Face cache at {} and HF_HUB_OFFLINE=1",
            cache.display()
        )));
    }
    let (commit, dir, gguf) = download(&cache, repo, revision, Want::Config, gguf_file)?;
    ModelFiles { spec: repo.to_string(), dir, commit: Some(commit), gguf }.config_json()
}

/// The commit `revision` points at in the cache and its snapshot folder; `Err` says what is
/// missing.
fn snapshot(cache: &Path, repo_id: &str, revision: &str) -> std::result::Result<(String, PathBuf), String> {
    let folder = repo_folder(cache, repo_id);
    if !folder.is_dir() {
        return Err(format!("{} does not exist", folder.display()));
    }
    let commit = if is_commit_hash(revision) && folder.join("snapshots").join(revision).is_dir() {
        revision.to_string()
    } else {
        let r = folder.join("refs").join(revision);
        std::fs::read_to_string(&r).map_err(|_| format!("no ref {revision} ({} is missing)", r.display()))?.trim().to_string()
    };
    let dir = folder.join("snapshots").join(&commit);
    Ok((commit, dir))
}

/// Resolves from the cache alone; `Err` says what is missing.
fn resolve_cached(cache: &Path, repo_id: &str, revision: &str, gguf_file: Option<&str>) -> std::result::Result<ModelFiles, String> {
    let (commit, dir) = snapshot(cache, repo_id, revision)?;
    let gguf = choose_gguf(&list_dir(&dir), gguf_file)?;
    complete(repo_id, commit, dir, gguf)
}

/// The files of snapshot `dir` of `commit` if it holds all a model needs; `Err` says what is
/// missing.
fn complete(repo_id: &str, commit: String, dir: PathBuf, gguf: Option<String>) -> std::result::Result<ModelFiles, String> {
    if let Some(g) = gguf {
        if !dir.join(&g).is_file() {
            return Err(format!("{g} is missing from snapshot {commit}"));
        }
        return Ok(ModelFiles { spec: repo_id.to_string(), dir, commit: Some(commit), gguf: Some(g) });
    }
    for f in REQUIRED {
        if !dir.join(f).is_file() {
            return Err(format!("{f} is missing from snapshot {commit}"));
        }
    }
    for f in weight_files(&dir).map_err(|e| e.to_string())? {
        if !dir.join(&f).is_file() {
            return Err(format!("{f} is missing from snapshot {commit}"));
        }
    }
    Ok(ModelFiles { spec: repo_id.to_string(), dir, commit: Some(commit), gguf: None })
}

fn download_error(repo: &str, file: &str, e: &dyn std::fmt::Display) -> Error {
    Error::Download { repo: repo.to_string(), file: file.to_string(), message: e.to_string() }
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The safetensors files of a checkpoint folder: the index's files, else `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join(INDEX);
    if index.is_file() {
        let map = crate::weights::read_index(&index)?;
        let mut files: Vec<String> = map.into_values().collect();
        files.sort();
        files.dedup();
        Ok(files)
    } else {
        Ok(vec![SINGLE.to_string()])
    }
}

/// What a download fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// config.json alone (all planning needs).
    Config,
    /// Everything a model needs: config, tokenizer, the optional files the repo has, weights.
    Model,
}

/// The files to fetch before the weights (whose names the index gives): those `want` names that
/// the repo lists; `Err` names a required one it lacks.
fn first_files(want: Want, listed: &[String]) -> std::result::Result<Vec<String>, &'static str> {
    let has = |f: &str| listed.iter().any(|x| x == f);
    let required: &[&'static str] = if want == Want::Config { &["config.json"] } else { REQUIRED };
    let mut files = Vec::new();
    for &f in required {
        if !has(f) {
            return Err(f);
        }
        files.push(f.to_string());
    }
    if want == Want::Model {
        files.extend(OPTIONAL.iter().filter(|f| has(f)).map(|f| f.to_string()));
        if has(INDEX) {
            files.push(INDEX.to_string());
        } else if !has(SINGLE) {
            return Err(SINGLE);
        }
    }
    Ok(files)
}

/// Fetches what `want` names of `repo_id` at `revision` from the Hub into `cache`, asking the Hub
/// which commit `revision` is at now; files the snapshot already holds are not fetched again.
/// `refs/<revision>` moves to the commit once its files are all there. A GGUF checkpoint (the
/// file `gguf_file`, or a repo's only GGUF file when it has no config.json) is that one file.
/// Returns the commit, its snapshot folder and the GGUF file's name.
fn download(cache: &Path, repo_id: &str, revision: &str, want: Want, gguf_file: Option<&str>) -> Result<(String, PathBuf, Option<String>)> {
    let remote = remote::Remote::from_env();
    let info = remote.repo_info(repo_id, revision).map_err(|e| match e.status {
        Some(404) => Error::ModelNotFound(format!("model {repo_id} (revision {revision}) is not on the Hub at {}: {e}", remote.endpoint())),
        _ => download_error(repo_id, "the file list", &e),
    })?;
    let has = |f: &str| info.files.iter().any(|x| x == f);
    let missing = |f: &str| download_error(repo_id, f, &format!("commit {} of the repo has no {f}", info.sha));
    let gguf = choose_gguf(&info.files, gguf_file)
        .map_err(|e| Error::ModelNotFound(format!("model {repo_id} (revision {revision}, commit {}): {e}", info.sha)))?;
    let files = match &gguf {
        Some(g) => vec![g.clone()],
        None => first_files(want, &info.files).map_err(missing)?,
    };
    tracing::info!(repo = repo_id, revision, commit = %info.sha, endpoint = remote.endpoint(), cache = %cache.display(), "fetching from the Hub");
    let repo = store::RepoCache::new(cache, repo_id);
    store::fetch_all(&remote, &repo, &info.sha, &files)?;
    let dir = repo.snapshot(&info.sha);
    if want == Want::Model && gguf.is_none() {
        // The index, now in the snapshot, names the shards.
        let weights = weight_files(&dir)?;
        if let Some(w) = weights.iter().find(|w| !has(w.as_str())) {
            return Err(missing(w.as_str()));
        }
        store::fetch_all(&remote, &repo, &info.sha, &weights)?;
    }
    if revision != info.sha {
        repo.write_ref(revision, &info.sha)?;
    }
    Ok((info.sha, dir, gguf))
}

/// Lays a model folder out as a Hub cache entry (`blobs/`, `snapshots/<sha>/` symlinks,
/// `refs/<revision>`), the way huggingface_hub does. Used by tests and demos.
pub fn install_into_cache(src: &Path, cache: &Path, repo_id: &str, revision: &str, commit: &str) -> Result<PathBuf> {
    let folder = repo_folder(cache, repo_id);
    let blobs = folder.join("blobs");
    let snap = folder.join("snapshots").join(commit);
    let refs = folder.join("refs");
    for d in [&blobs, &snap, &refs] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let blob_name = format!("{:016x}{:016x}", fnv1a(&bytes, 0), fnv1a(&bytes, 1));
        let blob = blobs.join(&blob_name);
        if !blob.exists() {
            std::fs::write(&blob, &bytes).map_err(|e| Error::io(&blob, e))?;
        }
        let link = snap.join(entry.file_name());
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob_name), &link).map_err(|e| Error::io(&link, e))?;
    }
    let r = refs.join(revision);
    std::fs::write(&r, commit).map_err(|e| Error::io(&r, e))?;
    Ok(snap)
}

/// A content hash for blob names; huggingface_hub uses the file's sha256 or git hash, which
/// nothing here depends on.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("Qwen/Qwen3-8B"));
        assert!(is_repo_id("gpt2"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id(""));
    }

    #[test]
    fn folder_without_config_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let err = resolve(d.path().to_str().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("no config.json"), "{err}");
    }

    #[test]
    fn cache_layout_resolves_through_refs_and_symlinks() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("config.json"), "{}").unwrap();
        std::fs::write(src.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(src.path().join("model.safetensors"), "x").unwrap();
        let cache = tempfile::tempdir().unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        install_into_cache(src.path(), cache.path(), "org/tiny", "main", sha).unwrap();
        let files = resolve_cached(cache.path(), "org/tiny", "main", None).unwrap();
        assert_eq!(files.commit.as_deref(), Some(sha));
        assert!(std::fs::symlink_metadata(files.file("config.json")).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(files.file("config.json")).unwrap(), "{}");
        // A commit hash resolves without a ref.
        assert!(resolve_cached(cache.path(), "org/tiny", sha, None).is_ok());
        let err = resolve_cached(cache.path(), "org/tiny", "v2", None).unwrap_err();
        assert!(err.contains("no ref v2"), "{err}");
        let err = resolve_cached(cache.path(), "org/other", "main", None).unwrap_err();
        assert!(err.contains("models--org--other"), "{err}");
    }

    #[test]
    fn the_files_fetched_are_the_ones_a_model_needs() {
        let listed = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let repo = listed(&["config.json", "tokenizer.json", "README.md", "model.safetensors", "chat_template.jinja", "pytorch_model.bin"]);
        assert_eq!(first_files(Want::Model, &repo).unwrap(), ["config.json", "tokenizer.json", "chat_template.jinja"]);
        assert_eq!(first_files(Want::Config, &repo).unwrap(), ["config.json"]);
        let sharded = listed(&["config.json", "tokenizer.json", INDEX, "model-00001-of-00002.safetensors"]);
        assert_eq!(first_files(Want::Model, &sharded).unwrap(), ["config.json", "tokenizer.json", INDEX]);
        assert_eq!(first_files(Want::Model, &listed(&["config.json", "tokenizer.json"])), Err(SINGLE));
        assert_eq!(first_files(Want::Model, &listed(&["config.json"])), Err("tokenizer.json"));
        assert_eq!(first_files(Want::Config, &listed(&["tokenizer.json"])), Err("config.json"));
    }
}
