//! The Hugging Face Hub's HTTP protocol as `huggingface_hub` speaks it: which commit a revision
//! is at and which files it holds (`/api/models/...`), what a file's blob is and where its bytes
//! live (a HEAD of its `resolve` URL), and the bytes themselves from an offset.

use std::io::Read;
use std::time::Duration;

/// A Hub endpoint (`HF_ENDPOINT`, default `https://huggingface.co`) and the caller's token.
pub(crate) struct Remote {
    endpoint: String,
    token: Option<String>,
    /// Follows redirects: the API (a renamed repo) and the bytes (the CDN).
    agent: ureq::Agent,
    /// Follows none by itself: a HEAD must read the Hub's own headers, not the CDN's.
    head_agent: ureq::Agent,
}

/// A revision as the Hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RepoInfo {
    /// The commit the revision is at.
    pub sha: String,
    /// Every file of the commit (`siblings[].rfilename`).
    pub files: Vec<String>,
}

/// What the HEAD of a file's `resolve` URL tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileMeta {
    /// The file's name in the repo.
    pub file: String,
    /// The blob's name: the git blob sha1, or the sha256 of an LFS file.
    pub etag: String,
    /// The commit the file was resolved at.
    pub commit: String,
    /// The size of the bytes, when the Hub says it.
    pub size: Option<u64>,
    /// Where the bytes are: the resolve URL, or the CDN URL an LFS file redirects to.
    pub location: String,
}

/// A response body from an offset on.
pub(crate) struct Body {
    /// The offset its first byte is at: the one asked for, or 0 when the server ignored the
    /// range.
    pub start: u64,
    pub reader: Box<dyn Read + Send + Sync>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpError {
    /// The HTTP status, when a response came.
    pub status: Option<u16>,
    pub message: String,
}

impl HttpError {
    fn new(status: Option<u16>, message: impl Into<String>) -> Self {
        HttpError { status, message: message.into() }
    }

    /// Whether trying again may help: no response, a timeout, a server error, rate limiting.
    pub fn transient(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => s == 408 || s == 429 || s >= 500,
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How many relative redirects a HEAD follows (a renamed repo answers with one).
const MAX_RELATIVE_REDIRECTS: usize = 5;
/// Tries of an API call or a HEAD that fails in a way that may pass.
const CALL_TRIES: u32 = 3;

impl Remote {
    /// The endpoint and token of the environment: `HF_ENDPOINT`, and `HF_TOKEN` or the token
    /// file `huggingface-cli login` writes (`HF_TOKEN_PATH`, else `HF_HOME/token`).
    pub fn from_env() -> Remote {
        let endpoint = super::non_empty_env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string());
        Remote::new(endpoint.trim_end_matches('/'), token_from_env())
    }

    pub fn new(endpoint: &str, token: Option<String>) -> Remote {
        let builder = || {
            ureq::AgentBuilder::new()
                .user_agent(concat!("shardserve/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Duration::from_secs(10))
                // Per read, not per body: a stalled transfer fails and resumes, a slow one goes on.
                .timeout_read(Duration::from_secs(60))
                .timeout_write(Duration::from_secs(60))
        };
        Remote { endpoint: endpoint.to_string(), token, agent: builder().build(), head_agent: builder().redirects(0).build() }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `GET /api/models/{repo}/revision/{revision}`: the commit and its files.
    pub fn repo_info(&self, repo_id: &str, revision: &str) -> Result<RepoInfo, HttpError> {
        #[derive(serde::Deserialize)]
        struct Info {
            sha: Option<String>,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        let url = format!("{}/api/models/{repo_id}/revision/{}", self.endpoint, encode(revision, false));
        let resp = self.call_retrying(self.authorized(self.agent.get(&url)))?;
        let text = resp.into_string().map_err(|e| HttpError::new(None, format!("reading {url}: {e}")))?;
        let info: Info =
            serde_json::from_str(&text).map_err(|e| HttpError::new(Some(200), format!("{url} answered with unexpected JSON: {e}")))?;
        let sha = info.sha.filter(|s| !s.is_empty()).ok_or_else(|| HttpError::new(Some(200), format!("{url} names no commit (`sha`)")))?;
        Ok(RepoInfo { sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect() })
    }

    /// `HEAD /{repo}/resolve/{revision}/{file}`, following only relative redirects as
    /// huggingface_hub does: the Hub's headers name the blob, a redirect elsewhere is where
    /// the bytes are.
    pub fn file_meta(&self, repo_id: &str, revision: &str, file: &str) -> Result<FileMeta, HttpError> {
        let mut url = format!("{}/{repo_id}/resolve/{}/{}", self.endpoint, encode(revision, false), encode(file, true));
        let mut hops = 0;
        let resp = loop {
            // Identity: a compressed answer would describe other bytes than the blob's.
            let req = self.authorized(self.head_agent.head(&url)).set("Accept-Encoding", "identity");
            let resp = self.call_retrying(req)?;
            let relative = (300..400)
                .contains(&resp.status())
                .then(|| resp.header("Location").filter(|l| l.starts_with('/')).map(str::to_string))
                .flatten();
            match relative {
                Some(path) if hops < MAX_RELATIVE_REDIRECTS => {
                    hops += 1;
                    url = format!("{}{path}", origin(&url));
                }
                _ => break resp,
            }
        };
        let header = |name: &str| resp.header(name).map(str::trim).filter(|v| !v.is_empty());
        let commit = header("X-Repo-Commit")
            .ok_or_else(|| {
                HttpError::new(Some(resp.status()), format!("{url} sent no X-Repo-Commit (is {} a Hugging Face Hub?)", self.endpoint))
            })?
            .to_string();
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .map(normalize_etag)
            .ok_or_else(|| HttpError::new(Some(resp.status()), format!("{url} sent no ETag")))?;
        let size = header("X-Linked-Size").or_else(|| header("Content-Length")).and_then(|s| s.parse().ok());
        let location = match header("Location") {
            Some(l) if (300..400).contains(&resp.status()) => l.to_string(),
            _ => url,
        };
        Ok(FileMeta { file: file.to_string(), etag, commit, size, location })
    }

    /// `GET location` from byte `offset` on (a `Range` request when above 0).
    pub fn open(&self, location: &str, offset: u64) -> Result<Body, HttpError> {
        let mut req = self.agent.get(location).set("Accept-Encoding", "identity");
        // The token is for the Hub: a CDN on another host gets a signed URL instead.
        if origin(location) == origin(&self.endpoint) {
            req = self.authorized(req);
        }
        if offset > 0 {
            req = req.set("Range", &format!("bytes={offset}-"));
        }
        let resp = self.call(req)?;
        let start = match resp.status() {
            206 => content_range_start(resp.header("Content-Range").unwrap_or_default())
                .ok_or_else(|| HttpError::new(Some(206), format!("{location} answered a range request without a valid Content-Range")))?,
            _ => 0,
        };
        Ok(Body { start, reader: resp.into_reader() })
    }

    fn authorized(&self, req: ureq::Request) -> ureq::Request {
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Sends `req`, again after a pause when it failed in a way that may pass (the downloads
    /// retry at their own level, resuming).
    fn call_retrying(&self, req: ureq::Request) -> Result<ureq::Response, HttpError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.call(req.clone()) {
                Err(e) if e.transient() && tries < CALL_TRIES => {
                    let wait = Duration::from_secs(1 << (tries - 1));
                    tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "the Hub did not answer; trying again");
                    std::thread::sleep(wait);
                }
                r => return r,
            }
        }
    }

    /// Sends `req`; a status of 400 and above is an error naming the request and the Hub's
    /// reason.
    fn call(&self, req: ureq::Request) -> Result<ureq::Response, HttpError> {
        let method = req.method().to_string();
        let what = format!("{method} {}", req.url());
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let mut message = format!("{what}: HTTP {code}");
                if let Some(reason) = r.header("X-Error-Message") {
                    message.push_str(&format!(" ({reason})"));
                }
                if code == 401 || code == 403 {
                    message.push_str(": the repo may be private or gated; set HF_TOKEN to a token that may read it");
                }
                Err(HttpError::new(Some(code), message))
            }
            // The transport error names the URL itself.
            Err(ureq::Error::Transport(t)) => Err(HttpError::new(None, format!("{method} {t}"))),
        }
    }
}

/// `HF_TOKEN`, else the token file huggingface_hub's login writes.
fn token_from_env() -> Option<String> {
    if let Some(t) = super::non_empty_env("HF_TOKEN") {
        return Some(t.trim().to_string());
    }
    let path = match (super::non_empty_env("HF_TOKEN_PATH"), super::non_empty_env("HF_HOME")) {
        (Some(p), _) => std::path::PathBuf::from(p),
        (None, Some(home)) => std::path::Path::new(&home).join("token"),
        (None, None) => {
            std::path::Path::new(&super::non_empty_env("HOME").unwrap_or_else(|| "/root".into())).join(".cache/huggingface/token")
        }
    };
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// An ETag as a blob name: without a weak `W/` prefix and without quotes.
pub(crate) fn normalize_etag(raw: &str) -> String {
    let t = raw.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.trim_matches('"').to_string()
}

/// Percent-encodes `s` for a URL path, keeping `/` when `keep_slash` (a file path) and
/// encoding it otherwise (a revision such as `refs/pr/1` is one segment).
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host[:port]` of an absolute URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// The first byte of `bytes START-END/TOTAL`.
fn content_range_start(header: &str) -> Option<u64> {
    let range = header.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_quotes_and_weak_prefix() {
        assert_eq!(normalize_etag("\"abc123\""), "abc123");
        assert_eq!(normalize_etag("W/\"abc123\""), "abc123");
        assert_eq!(normalize_etag(" abc123 "), "abc123");
    }

    #[test]
    fn urls_encode_revisions_as_one_segment() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("sub dir/a+b.json", true), "sub%20dir/a%2Bb.json");
        assert_eq!(encode("main", false), "main");
    }

    #[test]
    fn origins_and_ranges() {
        assert_eq!(origin("http://127.0.0.1:80/org/x/resolve/main/a"), "http://127.0.0.1:80");
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert_ne!(origin("https://cdn-lfs.hf.co/x"), origin("https://huggingface.co/x"));
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
    }

    #[test]
    fn transient_errors_are_retried_others_are_not() {
        assert!(HttpError::new(None, "reset").transient());
        assert!(HttpError::new(Some(503), "x").transient());
        assert!(HttpError::new(Some(429), "x").transient());
        assert!(!HttpError::new(Some(404), "x").transient());
        assert!(!HttpError::new(Some(401), "x").transient());
    }
}
