//! How to reach etcd: the endpoints, and the security etcd asks for — TLS with the server's CA
//! (`--etcd-ca`), a client certificate (`--etcd-cert`, `--etcd-key`), and a user of etcd's RBAC
//! (`--etcd-user`, the password read from `--etcd-password-file`). The files are read on every
//! connection, so a rotated certificate or password is used from the next reconnect on.

use etcd_client::{Client, ConnectOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// etcd's flags, declared once for the coordinator, the worker and `shardctl up`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated) holding membership; without it, membership is embedded
    /// in the coordinator.
    #[arg(long, env = "SHARDSERVE_ETCD")]
    pub etcd: Option<String>,
    /// The CA (PEM) etcd's server certificate is checked against: talk to etcd over TLS
    /// (endpoints `https://HOST:PORT` or `HOST:PORT`).
    #[arg(long, env = "SHARDSERVE_ETCD_CA", requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) to present to etcd (its `--client-cert-auth`). Needs
    /// --etcd-key and --etcd-ca.
    #[arg(long, env = "SHARDSERVE_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "SHARDSERVE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// An etcd user (etcd's RBAC, `etcdctl user add`) to authenticate as. Needs
    /// --etcd-password-file.
    #[arg(long, env = "SHARDSERVE_ETCD_USER", requires_all = ["etcd_password_file", "etcd"])]
    pub etcd_user: Option<String>,
    /// A file holding the password of --etcd-user (its first line), so it is never on a
    /// command line.
    #[arg(long, env = "SHARDSERVE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The etcd to use, when `--etcd` is given; checks the endpoints and reads every file
    /// once, so a missing one fails at start.
    pub fn open(&self) -> Result<Option<Etcd>, etcd_client::Error> {
        let Some(spec) = &self.etcd else { return Ok(None) };
        let endpoints = super::endpoints(spec);
        if endpoints.is_empty() {
            return Err(etcd_client::Error::InvalidArgs(format!("--etcd {spec:?}: no endpoint")));
        }
        if self.etcd_ca.is_some() {
            if let Some(e) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(etcd_client::Error::InvalidArgs(format!(
                    "--etcd {e}: with --etcd-ca, etcd is reached over TLS; write https://{} (or leave the scheme out)",
                    &e["http://".len()..]
                )));
            }
        }
        let etcd = Etcd { endpoints, args: self.clone() };
        etcd.options(Duration::from_secs(3))?;
        Ok(Some(etcd))
    }

    /// The same flags as arguments, for processes `shardctl up` and the coordinator start.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(e) = &self.etcd {
            a.extend(["--etcd".to_string(), e.clone()]);
        }
        if let Some(u) = &self.etcd_user {
            a.extend(["--etcd-user".to_string(), u.clone()]);
        }
        for (flag, v) in [
            ("--etcd-ca", &self.etcd_ca),
            ("--etcd-cert", &self.etcd_cert),
            ("--etcd-key", &self.etcd_key),
            ("--etcd-password-file", &self.etcd_password_file),
        ] {
            if let Some(p) = v {
                a.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        a
    }
}

/// An etcd to connect to, with its security.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    args: EtcdArgs,
}

// The password never appears here: it is read from its file when connecting.
impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.args.etcd_ca.is_some())
            .field("user", &self.args.etcd_user)
            .finish()
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, etcd_client::Error> {
    std::fs::read(path).map_err(|e| etcd_client::Error::InvalidArgs(format!("{flag} {}: {e}", path.display())))
}

impl Etcd {
    /// Plain etcd at `endpoints`, with no security (tests, and clusters that trust their
    /// network).
    pub fn plain(endpoints: Vec<String>) -> Self {
        Etcd { args: EtcdArgs { etcd: Some(endpoints.join(",")), ..Default::default() }, endpoints }
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The flags that reach this etcd, for processes started to join the same fleet.
    pub fn to_args(&self) -> Vec<String> {
        self.args.to_args()
    }

    /// Options with the security the flags ask for and a bounded connect time.
    fn options(&self, connect_timeout: Duration) -> Result<ConnectOptions, etcd_client::Error> {
        let mut options =
            ConnectOptions::new().with_connect_timeout(connect_timeout).with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let a = &self.args;
        if let Some(ca) = &a.etcd_ca {
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read("--etcd-ca", ca)?));
            if let (Some(cert), Some(key)) = (&a.etcd_cert, &a.etcd_key) {
                tls = tls.identity(etcd_client::Identity::from_pem(read("--etcd-cert", cert)?, read("--etcd-key", key)?));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&a.etcd_user, &a.etcd_password_file) {
            let text = String::from_utf8(read("--etcd-password-file", file)?)
                .map_err(|_| etcd_client::Error::InvalidArgs(format!("--etcd-password-file {}: not UTF-8", file.display())))?;
            let password = text.lines().next().unwrap_or_default().to_string();
            if password.is_empty() {
                return Err(etcd_client::Error::InvalidArgs(format!("--etcd-password-file {}: empty", file.display())));
            }
            // A user's token expires (etcd's --auth-token-ttl); the client gets a new one.
            options = options.with_user(user.clone(), password).with_auto_token_refresh(true);
        }
        Ok(options)
    }

    /// Connects with bounded connect and request times.
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let options = self.options(Duration::from_secs(3))?.with_timeout(Duration::from_secs(5));
        Client::connect(&self.endpoints, Some(options)).await
    }

    /// Connects without a request timeout, for calls that block until something happens (an
    /// election campaign).
    pub(super) async fn connect_untimed(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(&self.endpoints, Some(self.options(Duration::from_secs(3))?)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    fn parse(args: &[&str]) -> Result<EtcdArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.etcd)
    }

    #[test]
    fn the_flags_come_back_as_they_were_given() {
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, "x\n").unwrap();
            p.display().to_string()
        };
        let (ca, cert, key, pw) = (f("ca"), f("cert"), f("key"), f("pw"));
        let given = [
            "--etcd",
            "https://a:2379,b:2379",
            "--etcd-user",
            "root",
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
            "--etcd-password-file",
            &pw,
        ];
        let a = parse(&given).unwrap();
        assert_eq!(a.to_args(), given.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let etcd = a.open().unwrap().unwrap();
        assert_eq!(etcd.endpoints(), ["https://a:2379", "b:2379"]);
        assert!(!format!("{etcd:?}").contains(&pw), "the password file's path is fine, its content never shows");
    }

    #[test]
    fn incomplete_or_contradictory_flags_are_refused_with_the_reason() {
        assert!(parse(&["--etcd-ca", "ca.pem"]).is_err(), "--etcd-ca without --etcd");
        assert!(parse(&["--etcd", "a:1", "--etcd-user", "u"]).is_err(), "a user without a password file");
        assert!(parse(&["--etcd", "a:1", "--etcd-cert", "c", "--etcd-key", "k"]).is_err(), "a client certificate without --etcd-ca");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let ca = ca.display().to_string();
        let err = parse(&["--etcd", "http://a:2379", "--etcd-ca", &ca]).unwrap().open().unwrap_err().to_string();
        assert!(err.contains("https://a:2379"), "{err}");
        let err = parse(&["--etcd", "a:1", "--etcd-ca", "/nonexistent/ca.pem"]).unwrap().open().unwrap_err().to_string();
        assert!(err.contains("--etcd-ca /nonexistent/ca.pem"), "{err}");
        let empty = dir.path().join("pw");
        std::fs::write(&empty, "\n").unwrap();
        let err = parse(&["--etcd", "a:1", "--etcd-user", "u", "--etcd-password-file", &empty.display().to_string()])
            .unwrap()
            .open()
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
