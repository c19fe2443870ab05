//! Processes a test starts itself, beside or instead of a [`Cluster`]'s: workers and
//! coordinators with their membership in etcd, each killed when dropped.

use crate::{bin, reference_model, wait_until, Cluster, ClusterBuilder, Etcd};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A process started by a test, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ClusterBuilder {
    /// Membership in `etcd`, under a cluster name of its own.
    pub fn etcd(self, etcd: &Etcd, cluster: &str) -> Self {
        etcd.args().iter().fold(self, |b, a| b.arg(a)).arg("--cluster").arg(cluster)
    }
}

/// Two workers of the reference model with membership in `etcd` under `name`, 2 s leases, and
/// one migration allowed per request: a stage killed under a request moves it.
pub fn migrating_cluster(etcd: &Etcd, name: &str) -> Cluster {
    Cluster::new(reference_model()).workers(2).etcd(etcd, name).arg("--lease-ttl-s").arg("2").arg("--migration-limit").arg("1").start()
}

/// Starts a `worker` with `args` and waits (bounded) until its log (warnings and up) says
/// `logged`: a worker that is refused somewhere and says why. Killed when dropped.
pub fn worker_until_it_logs(args: &[String], logged: &str, within: Duration) -> Proc {
    let log = tempfile::NamedTempFile::new().unwrap();
    let worker = Proc(
        Command::new(bin("worker"))
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn worker"),
    );
    wait_until(&format!("the worker logging `{logged}`"), within, || {
        std::fs::read_to_string(log.path()).unwrap_or_default().contains(logged)
    });
    worker
}

/// Starts one more worker process joining `cluster` through `etcd`.
pub fn spare_worker(etcd: &Etcd, cluster: &str, id: &str, ttl_s: u64) -> Proc {
    worker_at(etcd, cluster, id, ttl_s, "127.0.0.1:0")
}

/// Like [`spare_worker`], listening on `listen` (host:port).
pub fn worker_at(etcd: &Etcd, cluster: &str, id: &str, ttl_s: u64, listen: &str) -> Proc {
    Proc(
        Command::new(bin("worker"))
            .args(etcd.args())
            .args(["--cluster", cluster, "--id", id, "--lease-ttl-s", &ttl_s.to_string()])
            .args(["--listen", listen])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn worker"),
    )
}

/// Starts a `coordinator` of the reference model with its membership in `etcd` under
/// `cluster`, planning over 2 workers with 2 s leases; returns it with its URL.
pub fn etcd_coordinator(etcd: &Etcd, cluster: &str) -> (Proc, String) {
    let model = reference_model();
    let url = etcd.url();
    spawn_coordinator(&["--model", model.to_str().unwrap(), "--etcd", &url, "--cluster", cluster, "--workers", "2", "--lease-ttl-s", "2"])
}

/// Starts a `coordinator` process with `args` (plus `--listen 127.0.0.1:0`) and returns it with
/// its URL once it listens.
pub fn spawn_coordinator(args: &[&str]) -> (Proc, String) {
    let mut child = Command::new(bin("coordinator"))
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn coordinator");
    let out = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening ") {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the coordinator did not start listening");
    (proc, format!("http://{addr}"))
}
