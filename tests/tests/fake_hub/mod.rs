//! A Hugging Face Hub on loopback for the cache tests: it serves one repo at one commit (the
//! API's file list, `resolve` with ETag and X-Repo-Commit, LFS files redirected to a CDN URL),
//! counts what it serves, and can be slowed down or made to send wrong bytes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const REPO: &str = "shardserve-test/tiny-qwen3";
pub const COMMIT: &str = "5f0c2a9e7d3b1c4a8e6f2d0b9a7c5e3f1d2b4a6c";
pub const TOKEN: &str = "hf_test_token";
/// The bytes a throttled body sends between pauses.
pub const CHUNK: usize = 16 * 1024;

/// A file the fake Hub serves.
pub struct Served {
    pub bytes: Vec<u8>,
    /// The sha256 of an LFS file, as the Hub names it; a git-sha1-like hash of another.
    pub etag: String,
    pub lfs: bool,
}

/// One content GET the fake Hub answered.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub file: String,
    /// The first byte sent (a `Range` request's start).
    pub start: u64,
    pub sent: u64,
    /// Whether the body went out to its last byte.
    pub whole: bool,
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
pub struct FakeHub {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    /// Serves the files of `model` as `REPO` at `COMMIT` (the `.safetensors` as LFS files), and
    /// a README a model does not need.
    pub fn start(model: &Path) -> FakeHub {
        let entries: Vec<(String, PathBuf)> =
            std::fs::read_dir(model).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().into_string().unwrap(), e.path())).collect();
        FakeHub::serving(&entries)
    }

    /// Serves each `(name, file)` as `REPO`'s file `name` (`.safetensors` and `.gguf` files as
    /// LFS files), and a README.
    pub fn serving(entries: &[(String, PathBuf)]) -> FakeHub {
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

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.state.port)
    }

    /// Pauses `per_chunk` after every 16 KiB of an LFS body.
    pub fn throttle(&self, per_chunk: Duration) {
        self.state.pause_us.store(per_chunk.as_micros() as u64, Ordering::SeqCst);
    }

    /// Sends LFS bodies wrong from now on (`true`), or right.
    pub fn corrupt(&self, on: bool) {
        self.state.corrupt.store(on, Ordering::SeqCst);
    }

    pub fn fetches(&self) -> Vec<Fetch> {
        self.state.seen.lock().unwrap().fetches.clone()
    }

    pub fn fetches_of(&self, file: &str) -> Vec<Fetch> {
        self.fetches().into_iter().filter(|f| f.file == file).collect()
    }

    pub fn auth(&self) -> Vec<(String, Option<String>)> {
        self.state.seen.lock().unwrap().auth.clone()
    }

    /// Every file served, by name.
    pub fn served(&self) -> &BTreeMap<String, Served> {
        &self.state.files
    }

    pub fn file(&self, name: &str) -> &Served {
        &self.state.files[name]
    }

    /// The files a model needs: all but the README.
    pub fn model_files(&self) -> Vec<String> {
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
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable hex digest of `hex_len` characters (the test's stand-in for a git blob's sha1).
pub fn digest(bytes: &[u8], hex_len: usize) -> String {
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
