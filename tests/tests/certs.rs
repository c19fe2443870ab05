//! `shardctl dev certs`: a CA and the server and client certificates it signs, checked by
//! OpenSSL itself — chains, purposes, names, validity, and private keys readable by their owner
//! only.

use shardserve_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

fn openssl(args: &[&str]) -> (bool, String) {
    let out = bounded(Command::new("openssl").args(args), Duration::from_secs(30));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn dev_certs_makes_a_ca_a_server_and_a_client_certificate_openssl_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let o = out.to_str().unwrap();
    let run = run_shardctl(
        &["dev", "certs", "--out", o, "--hosts", "localhost,127.0.0.1,coordinator.shardserve.svc", "--days", "30"],
        &[],
        Duration::from_secs(60),
    );
    assert!(run.status.success(), "{}", run.stderr);
    let f = |name: &str| out.join(name).to_str().unwrap().to_string();
    let (ca, server, client) = (f("ca.pem"), f("server.pem"), f("client.pem"));
    let (ok, text) = openssl(&["verify", "-CAfile", &ca, "-purpose", "sslserver", &server]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&["verify", "-CAfile", &ca, "-purpose", "sslclient", &client]);
    assert!(ok, "{text}");
    // Each certificate serves its own purpose only.
    assert!(!openssl(&["verify", "-CAfile", &ca, "-purpose", "sslclient", &server]).0);
    assert!(!openssl(&["verify", "-CAfile", &ca, "-purpose", "sslserver", &client]).0);
    // The node certificate (the cluster's own links) serves both, for the same names.
    let node = f("node.pem");
    for purpose in ["sslserver", "sslclient"] {
        let (ok, text) = openssl(&["verify", "-CAfile", &ca, "-purpose", purpose, &node]);
        assert!(ok, "node.pem as {purpose}: {text}");
    }
    let (_, text) = openssl(&["x509", "-in", &node, "-noout", "-ext", "subjectAltName"]);
    assert!(text.contains("DNS:coordinator.shardserve.svc") && text.contains("IP Address:127.0.0.1"), "{text}");
    let mode = std::fs::metadata(f("node.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "node.key must be readable by its owner only");
    let (_, san) = openssl(&["x509", "-in", &server, "-noout", "-ext", "subjectAltName"]);
    for name in ["DNS:localhost", "IP Address:127.0.0.1", "DNS:coordinator.shardserve.svc"] {
        assert!(san.contains(name), "{name} missing: {san}");
    }
    // Valid now, and not past the days asked for.
    assert!(openssl(&["x509", "-in", &server, "-noout", "-checkend", "0"]).0);
    assert!(!openssl(&["x509", "-in", &server, "-noout", "-checkend", &(31 * 86400).to_string()]).0);
    // Another run's CA does not vouch for these.
    let other = dir.path().join("other");
    assert!(run_shardctl(&["dev", "certs", "--out", other.to_str().unwrap()], &[], Duration::from_secs(60)).status.success());
    assert!(!openssl(&["verify", "-CAfile", other.join("ca.pem").to_str().unwrap(), &server]).0);
    for key in ["ca.key", "server.key", "client.key"] {
        let mode = std::fs::metadata(out.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
        let (ok, text) = openssl(&["pkey", "-in", &f(key), "-noout"]);
        assert!(ok, "{key}: {text}");
    }
    let bad = run_shardctl(&["dev", "certs", "--out", o, "--hosts", "a,,b"], &[], Duration::from_secs(60));
    assert!(!bad.status.success() && bad.stderr.contains("--hosts: an empty name"), "{}", bad.stderr);
}
