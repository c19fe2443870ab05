//! TLS on the coordinator's client ports through `shardctl up --tls-cert --tls-key`: clients
//! that trust the cluster's CA get transformers' tokens over gRPC and HTTPS; plaintext and
//! clients trusting another CA are refused (with a log line) while the others go on being
//! served; a rotated certificate is presented without a restart.

use shardserve_tests::*;
use std::process::Command;
use std::time::Duration;

fn certs(dir: &std::path::Path) {
    let out =
        run_shardctl(&["dev", "certs", "--out", dir.to_str().unwrap(), "--hosts", "localhost,127.0.0.1"], &[], Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.stderr);
}

/// `shardctl generate` against `url` trusting `ca`.
fn generate_with(url: &str, ca: Option<&std::path::Path>, prompt: &str) -> Output {
    let ca = ca.map(|c| c.to_str().unwrap().to_string());
    let mut envs = vec![];
    if let Some(c) = &ca {
        envs.push(("SHARDSERVE_TLS_CA", c.as_str()));
    }
    run_shardctl(
        &["generate", "--coordinator", url, "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0", "--json"],
        &envs,
        Duration::from_secs(60),
    )
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = bounded(Command::new("curl").args(["-sS", "--max-time", "20"]).args(args), Duration::from_secs(30));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_plaintext_and_strangers_and_rotates_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    certs(&a);
    certs(&b);
    let (cert, key) = (dir.path().join("serving.pem"), dir.path().join("serving.key"));
    std::fs::copy(a.join("server.pem"), &cert).unwrap();
    std::fs::copy(a.join("server.key"), &key).unwrap();
    let etcd = Etcd::start();
    let name = unique_cluster("tls");
    let cluster = Cluster::new(reference_model())
        .workers(1)
        .etcd(&etcd, &name)
        .arg("--tls-cert")
        .arg(cert.to_str().unwrap())
        .arg("--tls-key")
        .arg(key.to_str().unwrap())
        .arg("--tls-ca")
        .arg(a.join("ca.pem").to_str().unwrap())
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        .start();
    let url = cluster.url.clone();
    assert!(url.starts_with("https://"), "{url}");
    let case = &reference_cases()[0];
    let tokens = |o: &Output| -> Vec<u32> {
        assert!(o.status.success(), "{}", o.stderr);
        serde_json::from_value(serde_json::from_str::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone()).unwrap()
    };

    // Trusting the cluster's CA: transformers' tokens over TLS.
    assert_eq!(tokens(&generate_with(&url, Some(&a.join("ca.pem")), &case.prompt)), case.new_ids[..8]);
    // No CA given, another CA, or plaintext: refused, and said why.
    let out = generate_with(&url, None, &case.prompt);
    assert!(!out.status.success() && out.stderr.contains("--tls-ca"), "{}", out.stderr);
    let out = generate_with(&url, Some(&b.join("ca.pem")), &case.prompt);
    assert!(!out.status.success() && out.stderr.to_lowercase().contains("certificate"), "{}", out.stderr);
    let plain = url.replace("https://", "http://");
    let out = generate_with(&plain, None, &case.prompt);
    assert!(!out.status.success(), "plaintext was served: {}", out.stdout);
    wait_until("the refused handshake in the coordinator's log", Duration::from_secs(10), || {
        cluster.stderr().contains("TLS handshake refused")
    });
    // ... and the server goes on serving everyone else.
    assert_eq!(tokens(&generate_with(&url, Some(&a.join("ca.pem")), &case.prompt)), case.new_ids[..8]);

    // HTTPS on the HTTP API port too.
    let status = run_shardctl(
        &["status", "--json", "--coordinator", &url],
        &[("SHARDSERVE_TLS_CA", a.join("ca.pem").to_str().unwrap())],
        Duration::from_secs(30),
    );
    assert!(status.status.success(), "{}", status.stderr);
    let http = serde_json::from_str::<serde_json::Value>(&status.stdout).unwrap()["http_address"].as_str().unwrap().to_string();
    let (ok, body) = curl(&["--cacert", a.join("ca.pem").to_str().unwrap(), &format!("https://{http}/health")]);
    assert!(ok && body.contains("\"ok\""), "{body}");
    assert!(!curl(&[&format!("http://{http}/health")]).0, "plaintext HTTP was served");

    // Rotation: the files now hold a certificate of the other CA; new connections get it.
    std::fs::copy(b.join("server.key"), &key).unwrap();
    std::fs::copy(b.join("server.pem"), &cert).unwrap();
    assert_eq!(tokens(&generate_with(&url, Some(&b.join("ca.pem")), &case.prompt)), case.new_ids[..8]);
    let out = generate_with(&url, Some(&a.join("ca.pem")), &case.prompt);
    assert!(!out.status.success(), "the old certificate is still presented");

    // Without etcd, `up --tls-cert` says why it cannot.
    let e = Cluster::new(reference_model())
        .arg("--tls-cert")
        .arg(cert.to_str().unwrap())
        .arg("--tls-key")
        .arg(key.to_str().unwrap())
        .arg("--tls-ca")
        .arg(b.join("ca.pem").to_str().unwrap())
        .try_start();
    let (_, stderr) = e.err().expect("up --tls-cert without --etcd started");
    assert!(stderr.contains("--tls-cert needs --etcd"), "{stderr}");
}
