//! The shared Hub cache filled from a Hub: a local HTTP server speaks the Hub's protocol (the
//! API's file list, `resolve` with ETag and X-Repo-Commit, LFS files redirected to a CDN URL)
//! and counts what it serves. Four `shardctl cache fill` processes fill one empty cache at once,
//! a fill killed mid-download is finished by the next, and Python's huggingface_hub and a
//! cluster both read the result offline.

use shardserve_tests::{bin, bin_dir, generate, greedy, reference_cases, reference_model, wait_until, Cluster};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

mod fake_hub;
use fake_hub::*;

/// `shardctl cache fill --model REPO` against `hub` into `cache`, started in a process group of
/// its own (not waited for).
fn spawn_fill(hub: &FakeHub, cache: &Path) -> Child {
    spawn_fill_with(hub, cache, &[])
}

/// `spawn_fill` with more arguments.
fn spawn_fill_with(hub: &FakeHub, cache: &Path, args: &[&str]) -> Child {
    let mut cmd = Command::new(bin("shardctl"));
    cmd.args(["cache", "fill", "--model", REPO])
        .args(args)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache)
        .env("HF_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("SHARDSERVE_REVISION")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn().expect("spawn shardctl cache fill")
}

/// Waits (bounded) for every child and returns their outputs in order; kills them all and
/// panics when one has not finished within `within`.
fn wait_all(children: Vec<Child>, within: Duration) -> Vec<Output> {
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    let (tx, rx) = mpsc::channel();
    for (i, c) in children.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((i, c.wait_with_output()));
        });
    }
    let deadline = Instant::now() + within;
    let mut outs: Vec<Option<Output>> = pids.iter().map(|_| None).collect();
    for _ in 0..pids.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, out)) => outs[i] = Some(out.expect("child output")),
            Err(_) => {
                for p in &pids {
                    let pid = nix::unistd::Pid::from_raw(*p);
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                panic!("not every `shardctl cache fill` finished within {within:?}");
            }
        }
    }
    outs.into_iter().map(Option::unwrap).collect()
}

/// Runs `cmd` to completion (bounded), killing it past `within`.
fn run_bounded(mut cmd: Command, within: Duration) -> Output {
    shardserve_tests::bounded(&mut cmd, within)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn repo_folder(cache: &Path) -> PathBuf {
    cache.join("models--shardserve-test--tiny-qwen3")
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// A Python with huggingface_hub: a venv under target/, made (with pip) when missing.
fn hub_python() -> PathBuf {
    static MAKING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap();
    let venv = bin_dir().parent().expect("target dir").join("hub-venv");
    let python = venv.join("bin/python");
    let ready = || {
        python.is_file() && {
            let mut c = Command::new(&python);
            c.args(["-c", "import huggingface_hub"]);
            run_bounded(c, Duration::from_secs(60)).status.success()
        }
    };
    if !ready() {
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        let out = run_bounded(c, Duration::from_secs(120));
        assert!(out.status.success(), "python3 -m venv {} failed: {}", venv.display(), stderr(&out));
        let mut c = Command::new(venv.join("bin/pip"));
        c.args(["install", "--quiet", "--disable-pip-version-check", "huggingface_hub"]);
        let out = run_bounded(c, Duration::from_secs(600));
        assert!(out.status.success(), "pip install huggingface_hub failed: {}", stderr(&out));
        assert!(ready(), "huggingface_hub does not import from {}", python.display());
    }
    python
}

/// What Python's huggingface_hub makes of the cache, offline: for each revision, the snapshot
/// folder `snapshot_download(..., local_files_only=True)` gives and whether each file of `src`
/// reads there with the same bytes.
const PY_CHECK: &str = r#"
import json, os, sys
from huggingface_hub import snapshot_download
cache, repo, src, revisions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
out = {}
for rev in revisions:
    snap = snapshot_download(repo_id=repo, revision=rev, cache_dir=cache, local_files_only=True)
    same = {}
    for f in sorted(os.listdir(src)):
        with open(os.path.join(snap, f), "rb") as a, open(os.path.join(src, f), "rb") as b:
            same[f] = a.read() == b.read()
    out[rev] = {"snapshot": snap, "same": same}
print(json.dumps(out))
"#;

/// huggingface_hub itself downloading the model's files from the same Hub into another cache:
/// prints the snapshot folder.
const PY_DOWNLOAD: &str = r#"
import sys
from huggingface_hub import snapshot_download
cache, repo, files = sys.argv[1], sys.argv[2], sys.argv[3:]
print(snapshot_download(repo_id=repo, revision="main", cache_dir=cache, allow_patterns=files))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_fill_one_empty_cache_each_file_fetched_once() {
    let hub = FakeHub::start(&reference_model());
    // Slow weights (1.6 MB in about a second) so the processes overlap on them.
    hub.throttle(Duration::from_millis(10));
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let outs = wait_all((0..4).map(|_| spawn_fill(&hub, cache.path())).collect(), Duration::from_secs(120));
    let snapshot = repo_folder(cache.path()).join("snapshots").join(COMMIT);
    for (i, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "fill {i} failed: {}", stderr(o));
        assert_eq!(stdout(o), snapshot.display().to_string(), "fill {i} prints the snapshot folder");
    }
    eprintln!("4 fills took {:?}", started.elapsed());

    // Every file a model needs was fetched exactly once, whole, between the four; the README
    // never. (The server records a fetch once its last byte is out, which may be just after the
    // client has it.)
    let files = hub.model_files();
    wait_until("the server to record every fetch", Duration::from_secs(10), || hub.fetches().len() >= files.len());
    for f in &files {
        let got = hub.fetches_of(f);
        assert_eq!(got.len(), 1, "{f} was fetched {} times: {got:?}", got.len());
        assert!(got[0].whole && got[0].start == 0 && got[0].sent == hub.file(f).bytes.len() as u64, "{f}: {got:?}");
    }
    assert!(hub.fetches_of("README.md").is_empty(), "README.md is not part of a model");
    // Progress in the logs: one `downloaded` line per file among the four processes.
    let downloaded: usize = outs.iter().map(|o| stderr(o).matches(" downloaded ").count()).sum();
    assert_eq!(downloaded, files.len(), "{}", outs.iter().map(stderr).collect::<String>());
    // The token went to the Hub, never to the CDN host.
    for (path, auth) in hub.auth() {
        let expected = (!path.starts_with("/lfs/")).then(|| format!("Bearer {TOKEN}"));
        assert_eq!(auth, expected, "Authorization of {path}");
    }

    // huggingface_hub's layout: refs/main, links into blobs/, a lock per blob, nothing partial.
    let folder = repo_folder(cache.path());
    assert_eq!(std::fs::read_to_string(folder.join("refs/main")).unwrap(), COMMIT);
    let etags: BTreeSet<String> = files.iter().map(|f| hub.file(f).etag.clone()).collect();
    assert_eq!(names(&folder.join("blobs")), etags, "blobs/ holds each blob once and no partial file");
    assert_eq!(names(&snapshot), files.iter().cloned().collect::<BTreeSet<_>>());
    for f in &files {
        let link = snapshot.join(f);
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../../blobs").join(&hub.file(f).etag), "{f}");
        assert!(std::fs::read(&link).unwrap() == hub.file(f).bytes, "{f} differs from the Hub's bytes");
    }
    let locks = cache.path().join(".locks/models--shardserve-test--tiny-qwen3");
    assert_eq!(names(&locks), etags.iter().map(|e| format!("{e}.lock")).collect::<BTreeSet<_>>());

    // A fill of a full cache asks the Hub which commit `main` is at and fetches nothing.
    let again = wait_all(vec![spawn_fill(&hub, cache.path())], Duration::from_secs(60));
    assert!(again[0].status.success(), "{}", stderr(&again[0]));
    assert_eq!(stdout(&again[0]), snapshot.display().to_string());
    assert_eq!(hub.fetches().len(), files.len(), "a full cache is not fetched again");

    // Python's huggingface_hub, offline, finds the same snapshot with the same bytes.
    let mut py = Command::new(hub_python());
    py.args(["-c", PY_CHECK])
        .arg(cache.path())
        .arg(REPO)
        .arg(reference_model())
        .args(["main", COMMIT])
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_CACHE");
    let out = run_bounded(py, Duration::from_secs(120));
    assert!(out.status.success(), "huggingface_hub could not read the cache: {}", stderr(&out));
    let seen: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    for rev in ["main", COMMIT] {
        assert_eq!(seen[rev]["snapshot"], snapshot.display().to_string(), "huggingface_hub's snapshot of {rev}");
        let same = seen[rev]["same"].as_object().unwrap();
        assert_eq!(same.len(), files.len(), "{seen}");
        assert!(same.values().all(|v| v.as_bool() == Some(true)), "huggingface_hub reads other bytes: {seen}");
    }

    // huggingface_hub downloading from the same Hub lays out the same cache: same ref, same
    // blob names, same links.
    let theirs = tempfile::tempdir().unwrap();
    let mut py = Command::new(hub_python());
    py.args(["-c", PY_DOWNLOAD])
        .arg(theirs.path())
        .arg(REPO)
        .args(&files)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", TOKEN)
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE");
    let out = run_bounded(py, Duration::from_secs(120));
    assert!(out.status.success(), "huggingface_hub could not download from the fake Hub: {}", stderr(&out));
    let their_folder = repo_folder(theirs.path());
    assert_eq!(stdout(&out), their_folder.join("snapshots").join(COMMIT).display().to_string());
    assert_eq!(std::fs::read_to_string(their_folder.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(names(&their_folder.join("blobs")), etags, "huggingface_hub names the blobs as we do");
    for f in &files {
        let link = |folder: &Path| std::fs::read_link(folder.join("snapshots").join(COMMIT).join(f)).unwrap();
        assert_eq!(link(&their_folder), link(&folder), "{f}");
    }

    // And the model serves from that cache offline: transformers' greedy tokens.
    let cluster = Cluster::new(REPO).workers(1).env("HF_HUB_CACHE", cache.path()).env("HF_HUB_OFFLINE", "1").start();
    let case = &reference_cases()[0];
    let r = generate(&mut cluster.client().await, greedy(&case.prompt, 32)).await.unwrap();
    assert_eq!(r.token_ids, case.new_ids, "greedy tokens of {:?} from the filled cache", case.prompt);
}

/// Kills its process group when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[test]
fn a_fill_killed_mid_download_leaves_no_partial_blob_and_the_next_finishes_it() {
    let hub = FakeHub::start(&reference_model());
    // The weights take about 10 s: the fill is killed well inside them.
    hub.throttle(Duration::from_millis(100));
    let cache = tempfile::tempdir().unwrap();
    let folder = repo_folder(cache.path());
    let weights = hub.file("model.safetensors");
    let partial = |dir: &Path| -> Option<(PathBuf, u64)> {
        let rd = std::fs::read_dir(dir).ok()?;
        rd.filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(&format!("{}.incomplete", weights.etag)))
            .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
    };
    let mut fill = Killed(spawn_fill(&hub, cache.path()));
    wait_until("the weights to be partly downloaded", Duration::from_secs(60), || {
        partial(&folder.join("blobs")).is_some_and(|(_, len)| len >= 4 * CHUNK as u64)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(fill.0.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = fill.0.wait().unwrap();
    assert!(!status.success(), "the fill was killed");
    drop(fill);
    wait_until("the server to see the killed download end", Duration::from_secs(10), || hub.fetches_of("model.safetensors").len() == 1);

    // Nothing in blobs/ is a partial blob: every blob is whole, the rest is `.incomplete`.
    let (leftover, left_len) = partial(&folder.join("blobs")).expect("the killed fill's partial download");
    assert!(left_len > 0 && left_len < weights.bytes.len() as u64, "{} holds {left_len} bytes", leftover.display());
    let by_etag: BTreeMap<&str, &Served> = hub.served().values().map(|s| (s.etag.as_str(), s)).collect();
    for name in names(&folder.join("blobs")) {
        if name.contains(".incomplete") {
            continue;
        }
        let served = by_etag.get(name.as_str()).unwrap_or_else(|| panic!("blobs/{name} is no blob of the repo"));
        assert!(std::fs::read(folder.join("blobs").join(&name)).unwrap() == served.bytes, "blobs/{name} is not whole");
    }
    assert!(!folder.join("snapshots").join(COMMIT).join("model.safetensors").exists());
    // Offline, the half-filled cache is no model (no ref points at it yet), and says what it
    // lacks.
    assert!(!folder.join("refs/main").exists(), "refs/main moves only once the snapshot is whole");
    let mut offline = Command::new(bin("shardctl"));
    offline.args(["cache", "fill", "--model", REPO, "--revision", COMMIT]).env("HF_HUB_CACHE", cache.path()).env("HF_HUB_OFFLINE", "1");
    let out = run_bounded(offline, Duration::from_secs(30));
    assert!(!out.status.success(), "an incomplete snapshot resolved: {}", stdout(&out));
    assert!(stderr(&out).contains("model.safetensors"), "{}", stderr(&out));

    // The next fill resumes the weights where the killed one stopped, and finishes.
    hub.throttle(Duration::ZERO);
    let before = hub.fetches_of("model.safetensors").len();
    let out = wait_all(vec![spawn_fill(&hub, cache.path())], Duration::from_secs(60)).pop().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let snapshot = folder.join("snapshots").join(COMMIT);
    assert_eq!(stdout(&out), snapshot.display().to_string());
    wait_until("the server to record the resumed download", Duration::from_secs(10), || hub.fetches_of("model.safetensors").len() > before);
    let resumed = &hub.fetches_of("model.safetensors")[before..];
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    let rest = weights.bytes.len() as u64 - left_len;
    assert_eq!((resumed[0].start, resumed[0].sent, resumed[0].whole), (left_len, rest, true), "the weights resume from the partial file");
    for f in hub.model_files() {
        assert!(std::fs::read(snapshot.join(&f)).unwrap() == hub.file(&f).bytes, "{f} differs from the Hub's bytes");
        if f != "model.safetensors" {
            assert_eq!(hub.fetches_of(&f).len(), 1, "{f} was fetched again");
        }
    }
    let left: Vec<String> = names(&folder.join("blobs")).into_iter().filter(|n| n.contains(".incomplete")).collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

#[test]
fn a_body_that_does_not_hash_to_its_lfs_etag_never_becomes_the_blob() {
    let hub = FakeHub::start(&reference_model());
    hub.corrupt(true);
    let cache = tempfile::tempdir().unwrap();
    let folder = repo_folder(cache.path());
    let weights = hub.file("model.safetensors");
    let out = wait_all(vec![spawn_fill(&hub, cache.path())], Duration::from_secs(60)).pop().unwrap();
    assert!(!out.status.success(), "a corrupt download was accepted: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("model.safetensors") && err.contains("sha256") && err.contains(&weights.etag), "{err}");
    let blobs = names(&folder.join("blobs"));
    assert!(!blobs.contains(&weights.etag), "the corrupt bytes became the blob");
    assert!(!blobs.iter().any(|n| n.contains(".incomplete")), "the corrupt bytes were left: {blobs:?}");
    assert!(!folder.join("snapshots").join(COMMIT).join("model.safetensors").exists());
    // Sent right, the same fill completes, and the blob is the Hub's bytes.
    hub.corrupt(false);
    let out = wait_all(vec![spawn_fill(&hub, cache.path())], Duration::from_secs(60)).pop().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(folder.join("blobs").join(&weights.etag)).unwrap() == weights.bytes);
}

#[test]
fn plan_fetches_only_the_config_and_a_later_fill_the_rest() {
    let hub = FakeHub::start(&reference_model());
    let cache = tempfile::tempdir().unwrap();
    let mut plan = Command::new(bin("shardctl"));
    plan.args(["plan", "--model", REPO, "--max-memory", "0=1GiB", "--json"])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE");
    let out = run_bounded(plan, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    let map: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_eq!(map, serde_json::json!({ "": 0 }), "the whole model on device 0");
    let fetched: Vec<String> = hub.fetches().into_iter().map(|f| f.file).collect();
    assert_eq!(fetched, ["config.json"], "planning needs config.json alone");
    let snapshot = repo_folder(cache.path()).join("snapshots").join(COMMIT);
    assert_eq!(names(&snapshot), BTreeSet::from(["config.json".to_string()]));

    let out = wait_all(vec![spawn_fill(&hub, cache.path())], Duration::from_secs(60)).pop().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the server to record every fetch", Duration::from_secs(10), || hub.fetches().len() >= hub.model_files().len());
    for f in hub.model_files() {
        assert_eq!(hub.fetches_of(&f).len(), 1, "{f}: {:?}", hub.fetches_of(&f));
    }
}

/// `shardctl status --json` against `url`, bounded.
fn status_json(url: &str) -> serde_json::Value {
    let mut cmd = Command::new(bin("shardctl"));
    cmd.args(["status", "--json", "--coordinator", url]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "shardctl status: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_download_of_a_model_being_loaded() {
    let hub = FakeHub::start(&reference_model());
    // The weights take about 5 s to come.
    hub.throttle(Duration::from_millis(50));
    let cache = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(reference_model())
        .workers(2)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "0")
        .start();
    let load = {
        let url = cluster.url.clone();
        tokio::spawn(async move {
            let mut a = shardserve_proto::v1::admin_client::AdminClient::connect(url).await.unwrap();
            let req = shardserve_proto::v1::LoadModelRequest { model: REPO.into(), name: "hub".into(), workers: 1, ..Default::default() };
            tokio::time::timeout(Duration::from_secs(120), a.load_model(req)).await
        })
    };
    // While it loads, status names the file, how far it got and its size.
    let weights = hub.file("model.safetensors").bytes.len() as u64;
    let mut seen = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.is_none() {
        assert!(Instant::now() < deadline, "no download of model.safetensors in status within 60 s");
        let s = status_json(&cluster.url);
        seen = s["downloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["file"] == "model.safetensors" && d["done_bytes"].as_u64().unwrap() > 0)
            .cloned();
    }
    let d = seen.unwrap();
    assert_eq!(d["repo"], REPO);
    assert_eq!(d["total_bytes"], weights);
    assert!(d["done_bytes"].as_u64().unwrap() < weights, "{d}");
    // Once loaded, nothing is downloading, and the model serves transformers' tokens.
    load.await.unwrap().expect("LoadModel did not answer within 120 s").expect("LoadModel");
    assert_eq!(status_json(&cluster.url)["downloads"], serde_json::json!([]));
    wait_until("the loaded model to be ready", Duration::from_secs(60), || {
        status_json(&cluster.url)["models"].as_array().unwrap().iter().any(|m| m["name"] == "hub" && m["state"] == "ready")
    });
    let case = &reference_cases()[2];
    let mut req = greedy(&case.prompt, 32);
    req.model = "hub".into();
    let r = generate(&mut cluster.client().await, req).await.unwrap();
    assert_eq!(r.token_ids, case.new_ids);
}

/// A GGUF repo (GGUF files and no config.json, as `Qwen/Qwen3-0.6B-GGUF`) holding two files: a
/// fill that does not say which is refused before it fetches anything, naming both; one that
/// names a file fetches that file alone; and the model serves from the cache offline, dequantized
/// to transformers' tokens for that file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_repo_fills_and_serves_only_the_file_it_is_asked_for() {
    let gguf = shardserve_tests::fixtures().join("gguf");
    let (qwen, llama) = ("tiny-qwen3-Q8_0-Q4_0.gguf", "tiny-llama-Q8_0-Q4_0.gguf");
    let hub = FakeHub::serving(&[
        (qwen.to_string(), gguf.join("tiny-qwen3-gguf").join(qwen)),
        (llama.to_string(), gguf.join("tiny-llama-gguf").join(llama)),
    ]);
    let cache = tempfile::tempdir().unwrap();

    let out = wait_all(vec![spawn_fill(&hub, cache.path())], Duration::from_secs(60)).pop().unwrap();
    assert!(!out.status.success(), "a fill of a repo with two GGUF files chose one: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains(qwen) && err.contains(llama) && err.contains("--gguf-file"), "{err}");
    assert!(hub.fetches().is_empty(), "fetched before refusing: {:?}", hub.fetches());

    let out = wait_all(vec![spawn_fill_with(&hub, cache.path(), &["--gguf-file", qwen])], Duration::from_secs(60)).pop().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let snapshot = repo_folder(cache.path()).join("snapshots").join(COMMIT);
    assert_eq!(stdout(&out), snapshot.display().to_string());
    assert_eq!(names(&snapshot), BTreeSet::from([qwen.to_string()]), "the snapshot holds the one file");
    wait_until("the server to record the fetch", Duration::from_secs(10), || !hub.fetches().is_empty());
    let fetched: Vec<String> = hub.fetches().into_iter().map(|f| f.file).collect();
    assert_eq!(fetched, [qwen], "only the file asked for is fetched");
    assert!(std::fs::read(snapshot.join(qwen)).unwrap() == hub.file(qwen).bytes);

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gguf.join("tiny-qwen3-gguf.reference.json")).unwrap()).unwrap();
    let case = &doc["cases"][0];
    let want: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
    let cluster = Cluster::new(REPO)
        .workers(1)
        .arg("--gguf-file")
        .arg(qwen)
        .arg("--dtype")
        .arg("f32")
        .arg("--dequantize")
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .start();
    let prompt = case["prompt"].as_str().unwrap();
    let r = generate(&mut cluster.client().await, greedy(prompt, 32)).await.unwrap();
    assert_eq!(r.token_ids, want, "greedy tokens of {prompt:?} from the GGUF file in the cache");
}
