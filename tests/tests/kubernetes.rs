//! The Kubernetes manifests of `deploy/kubernetes/`: `deploy/kubernetes/check.py` validates every
//! one against Kubernetes' schemas (1.30 and the newest that kubernetes-validate knows, strictly)
//! and checks them against `deploy/compose.yaml` and the built binaries — images, commands,
//! `shardctl` subcommands, flags and SHARDSERVE_* variables. Its Python tools live in a virtual
//! environment at `target/deploy-venv`, made (with pip, from PyPI) only when it is missing.

use shardserve_tests::{bin, bin_dir, bounded};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Runs `cmd` (bounded by `within`) and panics with its output when it fails.
fn run(cmd: &mut Command, within: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let out = bounded(cmd, within);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The Python of `target/deploy-venv`, with kubernetes-validate and PyYAML installed in it
/// (made first when missing).
fn deploy_python(root: &Path) -> PathBuf {
    let venv = root.join("target/deploy-venv");
    let python = venv.join("bin/python");
    let ready = || {
        python.is_file()
            && bounded(Command::new(&python).args(["-c", "import kubernetes_validate, yaml"]), Duration::from_secs(60)).status.success()
    };
    if !ready() {
        if !python.is_file() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv), Duration::from_secs(120));
        }
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "kubernetes-validate", "pyyaml"]), Duration::from_secs(300));
        assert!(ready(), "{} still cannot import kubernetes_validate and yaml after pip install", python.display());
    }
    python
}

#[test]
fn the_kubernetes_manifests_are_valid_and_agree_with_compose_and_the_binaries() {
    // Panics, saying how to build them, when the binaries are missing.
    for name in ["coordinator", "worker", "shardctl"] {
        bin(name);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = deploy_python(&root);
    let out = run(
        Command::new(&python).arg(root.join("deploy/kubernetes/check.py")).arg("--bin-dir").arg(bin_dir()).current_dir(&root),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // What a reader of the test log should see: both checks ran, and nothing was skipped.
    assert!(stdout.contains("ok: kubernetes-validate --strict passes"), "no validation result in:\n{stdout}");
    assert!(stdout.contains("ok: overlays"), "no consistency result in:\n{stdout}");
    assert!(!stdout.contains("skipped"), "check.py skipped checks:\n{stdout}");
}
