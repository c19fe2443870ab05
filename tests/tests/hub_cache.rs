//! The shared Hub cache filled from a Hub: a local HTTP server speaks the Hub's protocol (the
//! API's file list, `resolve` with ETag and X-Repo-Commit, LFS files redirected to a CDN URL)
//! and counts what it serves. Four `shardctl cache fill` processes fill one empty cache at once,
//! a fill killed mid-download is finished by the next, and Python's huggingface_hub and a
//! cluster both read the result offline.

use shardserve_tests::{bin, bin_dir, generate, greedy, reference_cases, reference_model, wait_until, Cluster};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const REPO: &str = "shardserve-test/tiny-qwen3";
const COMMIT: &str = "5f0c2a9e7d3b1c4a8e6f2d0b9a7c5e3f1d2b4a6c";
const TOKEN: &str = "hf_test_token";
/// The bytes a throttled body sends between pauses.
const CHUNK: usize = 16 * 1024;

/// A file the fake Hub serves.
struct Served {
    bytes: Vec<u8>,
    /// The sha256 of an LFS file, as the Hub names it; a git-sha1-like hash of another.
    etag: String,
    lfs: bool,
}

/// One content GET the fake Hub answered.
#[derive(Debug, Clone)]
struct Fetch {
    file: String,
    /// The first byte sent (a `Range` request's start).
    start: u64,
    sent: u64,
    /// Whether the body went out to its last byte.
    whole: bool,
}

#[derive(Default)]
struct Seen {
    fetches: Vec<Fetch>,
    /// Every request's path and Authorization header.
    auth: Vec<(String, Option<String>)>,
}

struct State {
    port: u16,
    files: BTreeMap<String, Served>,
    seen: Mutex<Seen>,
    /// Pause after each chunk of an LFS body, in microseconds.
    pause_us: AtomicU64,
    /// Send LFS bodies with their last byte changed (the right length, the wrong bytes).
    corrupt: AtomicBool,
}

/// A Hugging Face Hub on loopback serving one repo at one commit, stopped when dropped.
struct FakeHub {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    /// Serves the files of `model` as `REPO` at `COMMIT` (the `.safetensors` as LFS files), and
    /// a README a model does not need.
    fn start(model: &Path) -> FakeHub {
        let entries: Vec<(String, PathBuf)> =
            std::fs::read_dir(model).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().into_string().unwrap(), e.path())).collect();
        FakeHub::serving(&entries)
    }

    /// Serves each `(name, file)` as `REPO`'s file `name` (`.safetensors` and `.gguf` files as
    /// LFS files), and a README.
    fn serving(entries: &[(String, PathBuf)]) -> FakeHub {
        let mut files = BTreeMap::new();
        for (name, path) in entries {
            let bytes = std::fs::read(path).unwrap();
            let lfs = name.ends_with(".safetensors") || name.ends_with(".gguf");
            let etag = if lfs { sha256(&bytes) } else { digest(&bytes, 40) };
            files.insert(name.clone(), Served { bytes, etag, lfs });
        }
        let readme = b"# tiny-qwen3\n".to_vec();
        files.insert("README.md".into(), Served { etag: digest(&readme, 40), bytes: readme, lfs: false });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State { port, files, seen: Mutex::default(), pause_us: AtomicU64::new(0), corrupt: AtomicBool::new(false) });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let st = st.clone();
                    std::thread::spawn(move || st.serve(conn));
                }
            }
        });
        FakeHub { state, stop, accept: Some(accept) }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.state.port)
    }

    /// Pauses `per_chunk` after every 16 KiB of an LFS body.
    fn throttle(&self, per_chunk: Duration) {
        self.state.pause_us.store(per_chunk.as_micros() as u64, Ordering::SeqCst);
    }

    /// Sends LFS bodies wrong from now on (`true`), or right.
    fn corrupt(&self, on: bool) {
        self.state.corrupt.store(on, Ordering::SeqCst);
    }

    fn fetches(&self) -> Vec<Fetch> {
        self.state.seen.lock().unwrap().fetches.clone()
    }

    fn fetches_of(&self, file: &str) -> Vec<Fetch> {
        self.fetches().into_iter().filter(|f| f.file == file).collect()
    }

    fn auth(&self) -> Vec<(String, Option<String>)> {
        self.state.seen.lock().unwrap().auth.clone()
    }

    fn file(&self, name: &str) -> &Served {
        &self.state.files[name]
    }

    /// The files a model needs: all but the README.
    fn model_files(&self) -> Vec<String> {
        self.state.files.keys().filter(|f| *f != "README.md").cloned().collect()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.state.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl State {
    /// Answers one request (HTTP/1.1, one request per connection).
    fn serve(&self, conn: TcpStream) {
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().split('?').next().unwrap_or_default().to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        self.seen.lock().unwrap().auth.push((path.clone(), headers.get("authorization").cloned()));
        let mut out = conn;
        let send_body = method == "GET";
        let commit = ("X-Repo-Commit".to_string(), COMMIT.to_string());
        if let Some(rev) = path.strip_prefix(&format!("/api/models/{REPO}/revision/")) {
            if rev != "main" && rev != COMMIT {
                return not_found(&mut out, "RevisionNotFound");
            }
            let siblings: Vec<_> = self.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
            let body = serde_json::json!({ "id": REPO, "sha": COMMIT, "siblings": siblings }).to_string();
            let _ = respond(&mut out, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes(), true);
        } else if let Some(rev) = path.strip_prefix(&format!("/api/models/{REPO}/tree/")) {
            // The listing newer huggingface_hub versions ask for (one page, recursive).
            if rev != "main" && rev != COMMIT {
                return not_found(&mut out, "RevisionNotFound");
            }
            let entries: Vec<_> = self
                .files
                .iter()
                .map(|(name, f)| {
                    let size = f.bytes.len();
                    if f.lfs {
                        let pointer = digest(f.etag.as_bytes(), 40);
                        let lfs = serde_json::json!({ "oid": f.etag, "size": size, "pointerSize": 134 });
                        serde_json::json!({ "type": "file", "path": name, "oid": pointer, "size": size, "lfs": lfs })
                    } else {
                        serde_json::json!({ "type": "file", "path": name, "oid": f.etag, "size": size })
                    }
                })
                .collect();
            let body = serde_json::Value::from(entries).to_string();
            let _ = respond(&mut out, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes(), true);
        } else if let Some(rest) = path.strip_prefix(&format!("/{REPO}/resolve/")) {
            let (rev, name) = rest.split_once('/').unwrap_or((rest, ""));
            if rev != "main" && rev != COMMIT {
                return not_found(&mut out, "RevisionNotFound");
            }
            let Some(f) = self.files.get(name) else {
                return not_found(&mut out, "EntryNotFound");
            };
            if f.lfs {
                // As the Hub: the blob is named by the linked headers, the bytes are on a CDN
                // (another host name for the same server, so the token must not follow).
                let headers = [
                    commit,
                    ("ETag".into(), format!("\"{}\"", digest(f.etag.as_bytes(), 40))),
                    ("X-Linked-Etag".into(), format!("\"{}\"", f.etag)),
                    ("X-Linked-Size".into(), f.bytes.len().to_string()),
                    ("Location".into(), format!("http://localhost:{}/lfs/{}", self.port, f.etag)),
                ];
                let _ = respond(&mut out, "302 Found", &headers, b"", true);
            } else {
                let headers = [commit, ("ETag".into(), format!("W/\"{}\"", f.etag)), ("Content-Length".into(), f.bytes.len().to_string())];
                let _ = write_head(&mut out, "200 OK", &headers);
                if send_body {
                    self.stream(&mut out, name, &f.bytes, 0, false);
                }
            }
        } else if let Some(hash) = path.strip_prefix("/lfs/") {
            let Some((name, f)) = self.files.iter().find(|(_, f)| f.lfs && f.etag == hash) else {
                return not_found(&mut out, "EntryNotFound");
            };
            let len = f.bytes.len() as u64;
            let range =
                headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<u64>().ok());
            let start = range.unwrap_or(0).min(len);
            let mut headers = vec![("Content-Length".to_string(), (len - start).to_string())];
            let status = if range.is_some() {
                headers.push(("Content-Range".into(), format!("bytes {start}-{}/{len}", len - 1)));
                "206 Partial Content"
            } else {
                "200 OK"
            };
            let _ = write_head(&mut out, status, &headers);
            if send_body {
                let mut bytes = f.bytes.clone();
                if self.corrupt.load(Ordering::SeqCst) {
                    if let Some(last) = bytes.last_mut() {
                        *last ^= 0xff;
                    }
                }
                self.stream(&mut out, name, &bytes, start, true);
            }
        } else {
            not_found(&mut out, "RepoNotFound");
        }
    }

    /// Sends `bytes[start..]` (pausing between chunks when `throttled`) and records the fetch.
    fn stream(&self, out: &mut TcpStream, name: &str, bytes: &[u8], start: u64, throttled: bool) {
        let mut sent = 0u64;
        let mut whole = true;
        for chunk in bytes[start as usize..].chunks(CHUNK) {
            if out.write_all(chunk).is_err() {
                whole = false;
                break;
            }
            sent += chunk.len() as u64;
            let pause = self.pause_us.load(Ordering::SeqCst);
            if throttled && pause > 0 {
                std::thread::sleep(Duration::from_micros(pause));
            }
        }
        let _ = out.flush();
        self.seen.lock().unwrap().fetches.push(Fetch { file: name.to_string(), start, sent, whole });
    }
}

fn write_head(out: &mut TcpStream, status: &str, headers: &[(String, String)]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8], with_length: bool) -> std::io::Result<()> {
    let mut all = headers.to_vec();
    if with_length {
        all.push(("Content-Length".into(), body.len().to_string()));
    }
    write_head(out, status, &all)?;
    out.write_all(body)
}

fn not_found(out: &mut TcpStream, code: &str) {
    let headers = [("X-Error-Code".to_string(), code.to_string()), ("X-Error-Message".to_string(), format!("{code} (fake Hub)"))];
    let _ = respond(out, "404 Not Found", &headers, b"{}", true);
}

/// The sha256 of `bytes`, in hex: an LFS file's name on the Hub.
fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable hex digest of `hex_len` characters (the test's stand-in for a git blob's sha1).
fn digest(bytes: &[u8], hex_len: usize) -> String {
    let mut out = String::new();
    let mut seed = 0u64;
    while out.len() < hex_len {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
        seed += 1;
    }
    out.truncate(hex_len);
    out
}

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
    let by_etag: BTreeMap<&str, &Served> = hub.state.files.values().map(|s| (s.etag.as_str(), s)).collect();
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
