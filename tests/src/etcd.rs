//! A real etcd server for the tests (Debian's `etcd-server`): plain, or over TLS asking clients
//! for a certificate of its CA (`--client-cert-auth`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// TLS for a test etcd, from a `shardctl dev certs` folder: the server presents `server.pem`
/// and asks every client for a certificate `ca.pem` signed; clients present `client.pem`.
#[derive(Debug, Clone)]
pub struct EtcdSecurity {
    pub dir: PathBuf,
}

impl EtcdSecurity {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// shardserve's flags trusting the server and presenting the client certificate.
    pub fn client_args(&self) -> Vec<String> {
        ["--etcd-ca", &self.file("ca.pem"), "--etcd-cert", &self.file("client.pem"), "--etcd-key", &self.file("client.key")]
            .map(String::from)
            .to_vec()
    }
}

/// A real etcd server on free loopback ports with its own data dir, stopped when dropped.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdSecurity>,
}

/// A port nothing listens on right now. Another process may take it before it is used: what
/// binds it must be ready to try again with another (as [`Etcd::start`] is).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts etcd and waits (bounded) until it accepts connections. Ports are picked free and
    /// may be taken by another process before etcd binds them: then it exits, and is started
    /// again on new ports (three tries).
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Starts etcd over TLS with client-certificate authentication.
    pub fn start_secure(tls: EtcdSecurity) -> Etcd {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdSecurity>) -> Etcd {
        let mut e = Etcd { child: None, dir: tempfile::tempdir().unwrap(), client_port: 0, peer_port: 0, tls };
        for attempt in 1..=3 {
            (e.client_port, e.peer_port) = (free_port(), free_port());
            match e.try_spawn() {
                Ok(()) => return e,
                Err(why) if attempt < 3 => eprintln!("etcd did not start ({why}); trying other ports"),
                Err(why) => panic!("etcd did not start: {why}"),
            }
        }
        unreachable!()
    }

    /// The client URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// shardserve's flags for this etcd: `--etcd URL`, and the TLS ones when it has TLS.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--etcd".to_string(), self.url()];
        if let Some(t) = &self.tls {
            a.extend(t.client_args());
        }
        a
    }

    /// A client of this etcd (as root when `user` is given, for etcd's RBAC).
    pub async fn client(
        &self,
        user: Option<(&str, &Path)>,
    ) -> Result<shardserve::membership::etcd_client::Client, shardserve::membership::etcd_client::Error> {
        let mut a = shardserve::membership::EtcdArgs { etcd: Some(self.url()), ..Default::default() };
        if let Some(t) = &self.tls {
            a.etcd_ca = Some(t.dir.join("ca.pem"));
            a.etcd_cert = Some(t.dir.join("client.pem"));
            a.etcd_key = Some(t.dir.join("client.key"));
        }
        if let Some((name, password_file)) = user {
            a.etcd_user = Some(name.to_string());
            a.etcd_password_file = Some(password_file.to_path_buf());
        }
        a.open()?.expect("--etcd is given").connect().await
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("etcd did not start again on its ports: {why}");
        }
    }

    /// Starts etcd on its ports and waits (20 s at most) until it answers; an error when it
    /// exits first or does not answer.
    fn try_spawn(&mut self) -> Result<(), String> {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("etcd is not installed: run scripts/test.sh, which installs Debian's etcd-server");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd);
        cmd.args(["--name", "test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(t) = &self.tls {
            cmd.args(["--cert-file", &t.file("server.pem"), "--key-file", &t.file("server.key")]).args([
                "--trusted-ca-file",
                &t.file("ca.pem"),
                "--client-cert-auth",
            ]);
        }
        let mut child = cmd.spawn().expect("spawn etcd");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("etcd exited with {status}"));
            }
            // A thread of its own, so this works from inside a test's runtime too.
            let ok = std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async {
                        match self.client(None).await {
                            Ok(mut c) => c.get("/", None).await.is_ok(),
                            Err(_) => false,
                        }
                    })
                })
                .join()
                .unwrap_or(false)
            });
            if ok {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no answer within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops etcd (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
