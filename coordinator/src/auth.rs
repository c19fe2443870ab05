//! Client auth: API keys for `Inference` and the HTTP API, admin keys for `Admin`.
//!
//! Keys live in files, one per line (blank lines and `#` comments ignored), read again whenever
//! the file changes (its modification time or length), so keys rotate without a restart. A key
//! is presented as `authorization: Bearer KEY` (gRPC metadata or HTTP header). Keys are kept
//! only as SHA-256 digests, compared in constant time, and never logged. Without a key file a
//! role is open, as before.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use subtle::ConstantTimeEq;

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Generate, chat, embed, tokenize, list models (and the HTTP API).
    Inference,
    /// Operate the cluster (`Admin`).
    Admin,
}

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `authorization: Bearer KEY`")]
    Missing,
    #[error("the key presented is not valid here")]
    Unknown,
    #[error("this key may not operate the cluster: Admin needs an admin key")]
    NotAdmin,
    /// The key file could not be read (the server refuses rather than opens).
    #[error("the server's key file cannot be read")]
    Unreadable,
}

impl AuthError {
    /// The gRPC code: UNAUTHENTICATED, or PERMISSION_DENIED for a valid key of the wrong role.
    pub fn code(&self) -> tonic::Code {
        match self {
            AuthError::NotAdmin => tonic::Code::PermissionDenied,
            AuthError::Unreadable => tonic::Code::Unavailable,
            _ => tonic::Code::Unauthenticated,
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// A file of keys, re-read when it changes.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    /// The file as last read, and the digests of its keys.
    cache: RwLock<Option<(FileStamp, Vec<[u8; 32]>)>>,
}

/// (modification time, length) of a key file as read.
type FileStamp = (Option<SystemTime>, u64);

impl KeyFile {
    /// Reads `path` once to check it holds at least one key.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let f = KeyFile { path: path.to_path_buf(), cache: RwLock::new(None) };
        let n = f.digests().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?.len();
        anyhow::ensure!(n > 0, "{}: no key in it (one key per line)", path.display());
        Ok(f)
    }

    /// The keys' digests, read again when the file changed.
    fn digests(&self) -> std::io::Result<Vec<[u8; 32]>> {
        let meta = std::fs::metadata(&self.path)?;
        let stamp = (meta.modified().ok(), meta.len());
        if let Some((seen, keys)) = &*self.cache.read().unwrap_or_else(|e| e.into_inner()) {
            if *seen == stamp {
                return Ok(keys.clone());
            }
        }
        let text = std::fs::read_to_string(&self.path)?;
        let keys: Vec<[u8; 32]> = parse_keys(&text).map(digest).collect();
        tracing::info!(file = %self.path.display(), keys = keys.len(), "keys read");
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Some((stamp, keys.clone()));
        Ok(keys)
    }

    /// Whether `key` is one of the file's, in time independent of which one (or none).
    fn holds(&self, key: &[u8; 32]) -> Result<bool, AuthError> {
        let keys = self.digests().map_err(|e| {
            tracing::error!(file = %self.path.display(), error = %e, "cannot read the key file; refusing");
            AuthError::Unreadable
        })?;
        let mut found = subtle::Choice::from(0);
        for k in &keys {
            found |= k.ct_eq(key);
        }
        Ok(found.into())
    }
}

/// The keys of a file's text: one per line, trimmed; blank lines and `#` comments skipped.
fn parse_keys(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The coordinator's key files.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub api: Option<Arc<KeyFile>>,
    pub admin: Option<Arc<KeyFile>>,
}

impl Auth {
    /// Whether a caller presenting `key` (`None`: nothing) may act as `role`.
    pub fn check(&self, role: Role, key: Option<&str>) -> Result<(), AuthError> {
        let required = match role {
            Role::Inference => self.api.is_some(),
            Role::Admin => self.admin.is_some(),
        };
        if !required {
            return Ok(());
        }
        let Some(key) = key.filter(|k| !k.is_empty()) else { return Err(AuthError::Missing) };
        let d = digest(key);
        let admin = match &self.admin {
            Some(f) => f.holds(&d)?,
            None => false,
        };
        match role {
            // An admin key may also use the API.
            Role::Inference if admin || self.api.as_ref().map(|f| f.holds(&d)).transpose()?.unwrap_or(false) => Ok(()),
            Role::Admin if admin => Ok(()),
            Role::Admin if self.api.as_ref().map(|f| f.holds(&d)).transpose()?.unwrap_or(false) => Err(AuthError::NotAdmin),
            _ => Err(AuthError::Unknown),
        }
    }

    /// A tonic interceptor requiring `role` (`authorization: Bearer KEY` metadata).
    pub fn interceptor(&self, role: Role) -> impl tonic::service::Interceptor + Clone {
        let auth = self.clone();
        move |req: tonic::Request<()>| {
            let key = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(bearer);
            auth.check(role, key)?;
            Ok(req)
        }
    }
}

/// The key of an `Authorization: Bearer KEY` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::NamedTempFile, Arc<KeyFile>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let k = Arc::new(KeyFile::open(f.path()).unwrap());
        (f, k)
    }

    #[test]
    fn keys_are_lines_without_blanks_or_comments() {
        assert_eq!(parse_keys("# ops\n  abc \n\nxyz\n").collect::<Vec<_>>(), ["abc", "xyz"]);
        assert_eq!(bearer("Bearer  k1 "), Some("k1"));
        assert_eq!(bearer("bearer k1"), Some("k1"));
        assert_eq!(bearer("Basic k1"), None);
        assert_eq!(bearer("k1"), None);
    }

    #[test]
    fn each_role_takes_its_keys() {
        let (_a, api) = file("user-key\n");
        let (_b, admin) = file("# operators\nops-key\n");
        let auth = Auth { api: Some(api), admin: Some(admin) };
        assert_eq!(auth.check(Role::Inference, Some("user-key")), Ok(()));
        assert_eq!(auth.check(Role::Inference, Some("ops-key")), Ok(()));
        assert_eq!(auth.check(Role::Inference, None), Err(AuthError::Missing));
        assert_eq!(auth.check(Role::Inference, Some("")), Err(AuthError::Missing));
        assert_eq!(auth.check(Role::Inference, Some("guess")), Err(AuthError::Unknown));
        assert_eq!(auth.check(Role::Admin, Some("ops-key")), Ok(()));
        assert_eq!(auth.check(Role::Admin, Some("user-key")), Err(AuthError::NotAdmin));
        assert_eq!(auth.check(Role::Admin, Some("guess")), Err(AuthError::Unknown));
        assert_eq!(AuthError::NotAdmin.code(), tonic::Code::PermissionDenied);
        assert_eq!(AuthError::Unknown.code(), tonic::Code::Unauthenticated);
        // Without key files, everything is open.
        assert_eq!(Auth::default().check(Role::Admin, None), Ok(()));
    }

    #[test]
    fn a_changed_file_is_read_again_and_an_empty_one_refused_at_start() {
        let (f, api) = file("old\n");
        let auth = Auth { api: Some(api), admin: None };
        assert_eq!(auth.check(Role::Inference, Some("old")), Ok(()));
        // A different length is a change even within the clock's resolution.
        std::fs::write(f.path(), "new-key\n").unwrap();
        assert_eq!(auth.check(Role::Inference, Some("new-key")), Ok(()));
        assert_eq!(auth.check(Role::Inference, Some("old")), Err(AuthError::Unknown));
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(KeyFile::open(empty.path()).unwrap_err().to_string().contains("no key in it"));
    }
}
