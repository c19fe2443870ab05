//! Puts a repo's files into the Hub cache as `huggingface_hub` lays them out, safe when many
//! processes (a coordinator and its workers, on one machine or sharing a volume) fill one cache
//! at once: each blob is fetched by whoever holds its lock under `.locks/`, into a file of its
//! own that is renamed into `blobs/` only once whole; snapshot links and refs are replaced
//! atomically. A process killed mid-download leaves an `.incomplete` file, never a wrong blob,
//! and the next holder of the lock resumes from it.

use super::remote::{FileMeta, HttpError, Remote};
use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Files fetched at once by one process (huggingface_hub's snapshot_download uses 8 threads).
const PARALLEL_FILES: usize = 4;
/// How often a download in progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often waiting on another process's download is logged (as huggingface_hub does).
const WAITING_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a process waits before trying a lock again.
const LOCK_POLL: Duration = Duration::from_millis(100);
/// Tries of one download when the connection fails; each resumes where the last stopped.
const DOWNLOAD_TRIES: u32 = 5;

/// One repo's folders in a cache.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    pub repo_id: String,
    /// `models--ORG--NAME`.
    pub folder: PathBuf,
    /// `.locks/models--ORG--NAME`.
    locks: PathBuf,
}

impl RepoCache {
    pub fn new(cache: &Path, repo_id: &str) -> RepoCache {
        let folder = super::repo_folder(cache, repo_id);
        let name = folder.file_name().expect("a repo folder has a name").to_owned();
        RepoCache { repo_id: repo_id.to_string(), locks: cache.join(".locks").join(name), folder }
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.folder.join("blobs").join(etag)
    }

    /// The lock guarding `blobs/<etag>`, where huggingface_hub takes it too.
    pub fn lock_path(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.folder.join("snapshots").join(commit)
    }

    /// `snapshots/<commit>/<file>`: the link to the file's blob.
    pub fn pointer(&self, commit: &str, file: &str) -> PathBuf {
        self.snapshot(commit).join(file)
    }

    /// This process's partial download of `blobs/<etag>`: its own name, so no other process
    /// ever writes into it while it runs.
    fn incomplete(&self, etag: &str) -> PathBuf {
        self.folder.join("blobs").join(format!("{etag}.incomplete.{}-{:08x}", std::process::id(), rand::random::<u32>()))
    }

    /// Points `refs/<revision>` at `commit`, replacing the file atomically (the content is the
    /// bare sha, no newline, as huggingface_hub reads it).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.folder.join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c == commit) {
            return Ok(());
        }
        let dir = path.parent().expect("a ref has a folder").to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = dir.join(format!(".{}.tmp.{}-{:08x}", file_name(&path), std::process::id(), rand::random::<u32>()));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(commit.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&path, e));
        }
        sync_dir(&dir);
        Ok(())
    }

    /// Links `snapshots/<commit>/<file>` to `blobs/<etag>` (a relative symlink, as
    /// huggingface_hub makes it), replacing whatever was there atomically.
    fn link(&self, commit: &str, file: &str, etag: &str) -> Result<()> {
        let pointer = self.pointer(commit, file);
        let target = link_target(file, etag);
        if std::fs::read_link(&pointer).is_ok_and(|t| t == target) {
            return Ok(());
        }
        let dir = pointer.parent().expect("a pointer has a folder").to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = dir.join(format!(".{}.tmp.{}-{:08x}", file_name(&pointer), std::process::id(), rand::random::<u32>()));
        let made = std::os::unix::fs::symlink(&target, &tmp).and_then(|()| std::fs::rename(&tmp, &pointer));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&pointer, e));
        }
        Ok(())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The relative target of `snapshots/<commit>/<file>`: `../../blobs/<etag>`, one `..` more
/// per folder in `file`.
pub(crate) fn link_target(file: &str, etag: &str) -> PathBuf {
    let depth = Path::new(file).components().count().saturating_sub(1);
    let mut p = PathBuf::new();
    for _ in 0..depth + 2 {
        p.push("..");
    }
    p.join("blobs").join(etag)
}

/// Whether a file name from the Hub (or an index it lists) stays inside the snapshot.
pub(crate) fn is_safe_file_name(file: &str) -> bool {
    !file.is_empty() && Path::new(file).components().all(|c| matches!(c, Component::Normal(_)))
}

/// Whether an ETag can name a blob: a hash, nothing that leaves `blobs/` or hides.
pub(crate) fn is_safe_etag(etag: &str) -> bool {
    !etag.is_empty() && !etag.starts_with('.') && etag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A file to put into the cache, and what its HEAD told once asked.
struct Item {
    file: String,
    meta: Option<FileMeta>,
}

/// Puts `files` of `commit` into the snapshot, each fetched once among every process sharing
/// the cache: up to [`PARALLEL_FILES`] at once here, a file another process is fetching is
/// left for later, and waited for (never given up on) once nothing else is left.
pub(crate) fn fetch_all(remote: &Remote, repo: &RepoCache, commit: &str, files: &[String]) -> Result<()> {
    for f in files {
        if !is_safe_file_name(f) {
            return Err(download_error(repo, f, format!("{f:?} is not a file name inside a snapshot")));
        }
    }
    let queue = Mutex::new(files.iter().map(|f| Item { file: f.clone(), meta: None }).collect::<VecDeque<_>>());
    let failed = AtomicBool::new(false);
    let threads = PARALLEL_FILES.min(files.len()).max(1);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| fetch_queue(remote, repo, commit, &queue, &failed))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    results.into_iter().collect()
}

/// One fetching thread: takes files off the queue until it is empty or a thread failed.
fn fetch_queue(remote: &Remote, repo: &RepoCache, commit: &str, queue: &Mutex<VecDeque<Item>>, failed: &AtomicBool) -> Result<()> {
    let mut last_waiting_log: Option<Instant> = None;
    loop {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(mut item) = queue.lock().expect("queue lock").pop_front() else {
            return Ok(());
        };
        match fetch_one(remote, repo, commit, &mut item) {
            Ok(Fetched::Done) => {}
            Ok(Fetched::Busy(lock)) => {
                if last_waiting_log.is_none_or(|t| t.elapsed() >= WAITING_LOG_EVERY) {
                    info!(repo = %repo.repo_id, file = %item.file, lock = %lock.display(), "waiting for another process downloading it");
                    last_waiting_log = Some(Instant::now());
                }
                queue.lock().expect("queue lock").push_back(item);
                std::thread::sleep(LOCK_POLL);
            }
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

enum Fetched {
    Done,
    /// Another process holds the blob's lock (at this path).
    Busy(PathBuf),
}

/// Puts one file into the snapshot unless another process holds its blob's lock.
fn fetch_one(remote: &Remote, repo: &RepoCache, commit: &str, item: &mut Item) -> Result<Fetched> {
    // A link that resolves points at a whole blob: blobs appear only whole.
    if repo.pointer(commit, &item.file).is_file() {
        return Ok(Fetched::Done);
    }
    let meta = match &item.meta {
        Some(m) => m.clone(),
        None => {
            let m = remote.file_meta(&repo.repo_id, commit, &item.file).map_err(|e| download_error(repo, &item.file, e.to_string()))?;
            // Asked at a commit, the Hub answers for that commit; anything else is not the
            // snapshot being filled.
            if m.commit != commit {
                return Err(download_error(repo, &item.file, format!("the Hub resolved it at commit {}, not {commit}", m.commit)));
            }
            if !is_safe_etag(&m.etag) {
                return Err(download_error(repo, &item.file, format!("the Hub sent an ETag that cannot name a blob: {:?}", m.etag)));
            }
            item.meta = Some(m.clone());
            m
        }
    };
    let blob = repo.blob(&meta.etag);
    if !blob.is_file() {
        let lock_path = repo.lock_path(&meta.etag);
        let Some(_lock) = try_lock(&lock_path)? else {
            return Ok(Fetched::Busy(lock_path));
        };
        // Whoever held the lock before may have finished the blob.
        if !blob.is_file() {
            download_blob(remote, repo, &meta, &blob)?;
        }
    }
    repo.link(commit, &meta.file, &meta.etag)?;
    Ok(Fetched::Done)
}

/// The exclusive lock on a blob, released when dropped.
struct BlobLock(#[allow(dead_code)] Flock<File>);

/// Takes the lock at `path` if no other process holds it (`flock`, as huggingface_hub's
/// filelock takes it, so the two wait for each other).
fn try_lock(path: &Path) -> Result<Option<BlobLock>> {
    let dir = path.parent().expect("a lock has a folder");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    loop {
        // Group-writable, as huggingface_hub makes it, so users sharing a cache can wait on it.
        let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o664).open(path).map_err(|e| Error::io(path, e))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(Error::io(path, std::io::Error::from(e))),
        };
        // huggingface_hub deletes a lock file it fails to release: a lock on a file that is no
        // longer at `path` guards nothing, so take the one that is there now.
        let held = lock.metadata().map_err(|e| Error::io(path, e))?;
        match std::fs::metadata(path) {
            Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => return Ok(Some(BlobLock(lock))),
            _ => continue,
        }
    }
}

/// Downloads `meta`'s bytes into `blob` (holding its lock): into this process's own
/// `.incomplete` file, resumed from the longest one a killed process left, checked against the
/// size the Hub announced, flushed to disk, then renamed into place.
fn download_blob(remote: &Remote, repo: &RepoCache, meta: &FileMeta, blob: &Path) -> Result<()> {
    let tmp = repo.incomplete(&meta.etag);
    claim_leftovers(blob, &tmp)?;
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let mut file = OpenOptions::new().create(true).truncate(false).write(true).open(&tmp).map_err(io)?;
    let mut offset = file.metadata().map_err(io)?.len();
    if meta.size.is_some_and(|size| offset > size) {
        file.set_len(0).map_err(io)?;
        offset = 0;
    }
    let mut progress = Progress::new(repo, meta, offset);
    let mut tries = 0;
    while meta.size != Some(offset) {
        tries += 1;
        let copied = copy_body(remote, meta, &mut file, &mut offset, &mut progress).and_then(|()| match meta.size {
            Some(size) if offset < size => Err(CopyError::Net(HttpError {
                status: None,
                message: format!("the body of {} ended at byte {offset} of {size}", meta.location),
            })),
            _ => Ok(()),
        });
        match copied {
            Ok(()) => break,
            Err(CopyError::Disk(e)) => return Err(io(e)),
            Err(CopyError::Net(e)) if e.transient() && tries < DOWNLOAD_TRIES => {
                let wait = Duration::from_secs(1 << (tries - 1));
                warn!(repo = %repo.repo_id, file = %meta.file, error = %e, done = offset, retry_in_s = wait.as_secs(), "download interrupted; resuming");
                std::thread::sleep(wait);
            }
            Err(CopyError::Net(e)) => {
                // The partial file stays: the next try, here or in another process, resumes it.
                return Err(download_error(repo, &meta.file, e.to_string()));
            }
        }
    }
    if let Some(size) = meta.size {
        if offset != size {
            let _ = std::fs::remove_file(&tmp);
            return Err(download_error(repo, &meta.file, format!("got {offset} bytes, the Hub announced {size}")));
        }
    }
    file.sync_all().map_err(io)?;
    drop(file);
    if let Some(want) = lfs_sha256(&meta.etag) {
        // An LFS file's ETag is its sha256: a body that does not hash to it (a corrupt
        // resume, a proxy's error page of the right size) never becomes the blob.
        let got = sha256_of(&tmp).map_err(io)?;
        if !got.eq_ignore_ascii_case(want) {
            let _ = std::fs::remove_file(&tmp);
            let why = format!("the bytes received hash to sha256 {got}, not {want} as the Hub's ETag says; they were deleted");
            return Err(download_error(repo, &meta.file, why));
        }
    }
    std::fs::rename(&tmp, blob).map_err(|e| Error::io(blob, e))?;
    sync_dir(blob.parent().expect("a blob has a folder"));
    progress.finish(offset);
    Ok(())
}

/// Takes over what killed holders of this blob's lock left: the longest `.incomplete` file
/// becomes `tmp` (to resume), the others go. Holding the lock, none of them is being written.
fn claim_leftovers(blob: &Path, tmp: &Path) -> Result<()> {
    let dir = blob.parent().expect("a blob has a folder");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let prefix = format!("{}.incomplete", file_name(blob));
    let mut leftovers: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| Some((e.metadata().ok()?.len(), e.path())))
        .collect();
    leftovers.sort();
    if let Some((len, longest)) = leftovers.pop() {
        if len > 0 && std::fs::rename(&longest, tmp).is_ok() {
            info!(blob = %blob.display(), bytes = len, "resuming a download another process left");
        } else {
            leftovers.push((len, longest));
        }
    }
    for (_, p) in leftovers {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

enum CopyError {
    Net(HttpError),
    Disk(std::io::Error),
}

/// Appends the body from `*offset` on to `file`, advancing `*offset` as bytes land.
fn copy_body(
    remote: &Remote,
    meta: &FileMeta,
    file: &mut File,
    offset: &mut u64,
    progress: &mut Progress,
) -> std::result::Result<(), CopyError> {
    let body = match remote.open(&meta.location, *offset) {
        Ok(b) => b,
        // The range starts past the end: the partial file is not a prefix of this blob.
        Err(e) if e.status == Some(416) && *offset > 0 => {
            file.set_len(0).map_err(CopyError::Disk)?;
            *offset = 0;
            return Err(CopyError::Net(HttpError { status: None, message: e.message }));
        }
        Err(e) => return Err(CopyError::Net(e)),
    };
    if body.start != *offset {
        if body.start != 0 {
            return Err(CopyError::Net(HttpError {
                status: Some(206),
                message: format!("asked for bytes from {}, got them from {}", *offset, body.start),
            }));
        }
        // The server sent the whole file: start over.
        file.set_len(0).map_err(CopyError::Disk)?;
        *offset = 0;
    }
    file.seek(SeekFrom::Start(*offset)).map_err(CopyError::Disk)?;
    let mut reader = body.reader;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Net(HttpError { status: None, message: format!("reading {}: {e}", meta.location) })),
        };
        // Unbuffered: what a killed process wrote is all on disk for the next one to resume.
        file.write_all(&buf[..n]).map_err(CopyError::Disk)?;
        *offset += n as u64;
        progress.update(*offset);
    }
}

/// A download under way in this process, as `shardctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub repo: String,
    pub file: String,
    /// Bytes in the blob's temporary file so far (a resumed download counts what it found).
    pub done: u64,
    /// The file's size, when the Hub said it.
    pub total: Option<u64>,
}

/// The downloads under way in this process: one entry per file, from its first byte until it
/// is renamed into place or given up.
static DOWNLOADS: Mutex<Vec<(u64, Download)>> = Mutex::new(Vec::new());
static NEXT_DOWNLOAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The downloads under way in this process, oldest first.
pub fn downloads() -> Vec<Download> {
    DOWNLOADS.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(_, d)| d.clone()).collect()
}

/// Progress of one download: in the logs at most every [`PROGRESS_EVERY`], and in
/// [`downloads`] until dropped.
struct Progress<'a> {
    repo: &'a str,
    file: &'a str,
    total: Option<u64>,
    from: u64,
    started: Instant,
    last: Instant,
    /// Its entry in [`DOWNLOADS`].
    id: u64,
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        DOWNLOADS.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _)| *id != self.id);
    }
}

impl<'a> Progress<'a> {
    fn new(repo: &'a RepoCache, meta: &'a FileMeta, from: u64) -> Self {
        info!(repo = %repo.repo_id, file = %meta.file, bytes = meta.size, resume_from = from, "downloading");
        let now = Instant::now();
        let id = NEXT_DOWNLOAD.fetch_add(1, Ordering::Relaxed);
        let entry = Download { repo: repo.repo_id.clone(), file: meta.file.clone(), done: from, total: meta.size };
        DOWNLOADS.lock().unwrap_or_else(|e| e.into_inner()).push((id, entry));
        Progress { repo: &repo.repo_id, file: &meta.file, total: meta.size, from, started: now, last: now, id }
    }

    fn update(&mut self, done: u64) {
        if let Some((_, d)) = DOWNLOADS.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().find(|(id, _)| *id == self.id) {
            d.done = done;
        }
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let tenths = |x: f64| (x * 10.0).round() / 10.0;
        let mib_per_s = tenths(done.saturating_sub(self.from) as f64 / secs / (1u64 << 20) as f64);
        let percent = self.total.filter(|t| *t > 0).map(|t| tenths(done as f64 * 100.0 / t as f64));
        info!(repo = %self.repo, file = %self.file, done, total = self.total, percent, mib_per_s, "download progress");
    }

    fn finish(&self, bytes: u64) {
        let secs = (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        info!(repo = %self.repo, file = %self.file, bytes, secs, "downloaded");
    }
}

/// Flushes a folder's entries (a rename into it) to disk; best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The sha256 an LFS file's ETag names (64 hex digits; a git blob's is a 40-digit sha1).
fn lfs_sha256(etag: &str) -> Option<&str> {
    (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(etag)
}

/// The sha256 of the file at `path`, in lower-case hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn download_error(repo: &RepoCache, file: &str, message: String) -> Error {
    Error::Download { repo: repo.repo_id.clone(), file: file.to_string(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_huggingface_hub() {
        let repo = RepoCache::new(Path::new("/c"), "Org/Name");
        assert_eq!(repo.blob("abc"), Path::new("/c/models--Org--Name/blobs/abc"));
        assert_eq!(repo.lock_path("abc"), Path::new("/c/.locks/models--Org--Name/abc.lock"));
        assert_eq!(repo.pointer("c0ffee", "config.json"), Path::new("/c/models--Org--Name/snapshots/c0ffee/config.json"));
        let tmp = repo.incomplete("abc");
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&format!("abc.incomplete.{}-", std::process::id())), "{name}");
        assert_ne!(repo.incomplete("abc"), tmp, "each download has a name of its own");
    }

    #[test]
    fn an_lfs_etag_is_a_sha256_and_files_hash_to_it() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(lfs_sha256(abc), Some(abc));
        assert_eq!(lfs_sha256("e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"), None, "a git blob's sha1");
        assert_eq!(lfs_sha256(&"g".repeat(64)), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"abc").unwrap();
        assert_eq!(sha256_of(&dir.path().join("f")).unwrap(), abc);
    }

    #[test]
    fn links_are_relative_to_the_pointer() {
        assert_eq!(link_target("config.json", "e1"), Path::new("../../blobs/e1"));
        assert_eq!(link_target("sub/dir/x.json", "e1"), Path::new("../../../../blobs/e1"));
    }

    #[test]
    fn names_that_leave_the_snapshot_are_refused() {
        assert!(is_safe_file_name("model-00001-of-00002.safetensors"));
        assert!(is_safe_file_name("sub/x.json"));
        for bad in ["", "../x", "/etc/passwd", "a/../../b", "./x"] {
            assert!(!is_safe_file_name(bad), "{bad}");
        }
        assert!(is_safe_etag("0123abcd"));
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(!is_safe_etag(bad), "{bad}");
        }
    }

    #[test]
    fn refs_and_links_are_replaced_in_place() {
        let cache = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(cache.path(), "org/x");
        repo.write_ref("main", "aaaa").unwrap();
        repo.write_ref("main", "bbbb").unwrap();
        repo.write_ref("refs/pr/1", "cccc").unwrap();
        assert_eq!(std::fs::read_to_string(repo.folder.join("refs/main")).unwrap(), "bbbb");
        assert_eq!(std::fs::read_to_string(repo.folder.join("refs/refs/pr/1")).unwrap(), "cccc");
        std::fs::create_dir_all(repo.folder.join("blobs")).unwrap();
        std::fs::write(repo.blob("e1"), "one").unwrap();
        std::fs::write(repo.blob("e2"), "two").unwrap();
        repo.link("c1", "config.json", "e1").unwrap();
        repo.link("c1", "config.json", "e2").unwrap();
        assert_eq!(std::fs::read_to_string(repo.pointer("c1", "config.json")).unwrap(), "two");
        // Nothing but the ref, the link and the blobs is left behind.
        let names = |d: &Path| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(names(&repo.snapshot("c1")), ["config.json"]);
        assert_eq!(names(&repo.folder.join("refs")).len(), 2);
    }

    #[test]
    fn a_held_lock_is_busy_until_released() {
        let cache = tempfile::tempdir().unwrap();
        let path = cache.path().join(".locks/models--org--x/e1.lock");
        let held = try_lock(&path).unwrap().expect("a free lock is taken");
        // flock conflicts between two opens even within one process, as between processes.
        assert!(try_lock(&path).unwrap().is_none());
        drop(held);
        assert!(try_lock(&path).unwrap().is_some());
        // A lock file removed (as huggingface_hub may do) is made anew, and the lock taken is
        // on the file at the path now.
        std::fs::remove_file(&path).unwrap();
        let lock = try_lock(&path).unwrap().unwrap();
        assert_eq!(lock.0.metadata().unwrap().ino(), std::fs::metadata(&path).unwrap().ino());
    }

    #[test]
    fn leftovers_are_resumed_from_the_longest() {
        let cache = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(cache.path(), "org/x");
        let blob = repo.blob("e1");
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(blob.with_file_name("e1.incomplete.1-00000000"), "ab").unwrap();
        std::fs::write(blob.with_file_name("e1.incomplete"), "abcd").unwrap();
        std::fs::write(blob.with_file_name("e2.incomplete.1-00000000"), "zz").unwrap();
        let tmp = repo.incomplete("e1");
        claim_leftovers(&blob, &tmp).unwrap();
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), "abcd");
        let mut left: Vec<String> =
            std::fs::read_dir(blob.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, [file_name(&tmp), "e2.incomplete.1-00000000".to_string()], "another blob's leftover stays");
    }
}
