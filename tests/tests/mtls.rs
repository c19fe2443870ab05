//! Mutual TLS inside the cluster, end to end through `shardctl up --cluster-ca`, with TLS and
//! API keys on the client port: two pipeline stages of two tensor-parallel ranks give
//! transformers' tokens while every link — coordinator to worker, stage to stage, rank to rank,
//! worker to the embedded membership — is mutual TLS. A peer with no certificate, one of
//! another CA, an expired one or a revoked one is refused in the handshake (the refusing
//! process says why), a worker without the cluster's certificate cannot join, and the cluster
//! goes on serving.

use shardserve::tls::ClusterTls;
use shardserve_proto::v1 as pb;
use shardserve_tests::certs::{crl, dev_certs, node_cert};
use shardserve_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = bounded(Command::new("curl").args(["-sS", "--max-time", "20"]).args(args), Duration::from_secs(30));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A gRPC health check of a worker through curl over TLS, presenting `cert` (if any): the
/// HTTP status when the connection was served.
fn health_over_curl(address: &str, ca: &Path, cert: Option<(&Path, &Path)>) -> (bool, String) {
    let url = format!("https://{address}/grpc.health.v1.Health/Check");
    let mut args = vec![
        "--cacert",
        s(ca),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "--data-binary",
        "",
    ];
    if let Some((c, k)) = cert {
        args.extend(["--cert", s(c), "--key", s(k)]);
    }
    args.push(&url);
    curl(&args)
}

/// Registers a made-up worker with the coordinator's embedded membership over TLS, trusting
/// `ca` and presenting `identity`'s certificate (none when `None`).
async fn register(url: &str, ca: &Path, identity: Option<&ClusterTls>) -> Result<(), String> {
    let cfg = match identity {
        Some(t) => t.client_config(&[b"h2"]).unwrap(),
        None => shardserve::tls::client_config(ca).unwrap(),
    };
    let call = async {
        let channel = tonic::transport::Endpoint::from_shared(shardserve::tls::plain_url(url))
            .unwrap()
            .connect_with_connector(shardserve::tls::connector(cfg))
            .await
            .map_err(|e| shardserve::tls::error_chain(&e))?;
        let worker = pb::WorkerInfo { id: "intruder".into(), address: "127.0.0.1:9".into(), ..Default::default() };
        pb::membership_client::MembershipClient::new(channel)
            .register(pb::RegisterRequest { worker: Some(worker) })
            .await
            .map(|_| ())
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
    };
    tokio::time::timeout(Duration::from_secs(20), call).await.unwrap_or_else(|_| Err("no answer within 20 s".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls_serves_its_members_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    dev_certs(&a);
    dev_certs(&b);
    // Of the cluster's own CA: one revoked (in the CRL the cluster is given), one expired.
    let (revoked, revoked_key) = node_cert(&a, "revoked", 4242, -1, 30);
    let (expired, expired_key) = node_cert(&a, "expired", 4343, -30, -1);
    let crl = crl(&a, &[4242]);
    let (api_keys, admin_keys) = (dir.path().join("api-keys"), dir.path().join("admin-keys"));
    std::fs::write(&api_keys, "user-key-1\n").unwrap();
    std::fs::write(&admin_keys, "admin-key-1\n").unwrap();
    let ca = a.join("ca.pem");
    let mut builder = Cluster::new(reference_model()).workers(4).arg("--tp").arg("2");
    for arg in [
        "--tls-cert",
        s(&a.join("server.pem")),
        "--tls-key",
        s(&a.join("server.key")),
        "--tls-ca",
        s(&ca),
        "--cluster-ca",
        s(&ca),
        "--cluster-cert",
        s(&a.join("node.pem")),
        "--cluster-key",
        s(&a.join("node.key")),
        "--cluster-crl",
        s(&crl),
        "--api-keys-file",
        s(&api_keys),
        "--admin-keys-file",
        s(&admin_keys),
    ] {
        builder = builder.arg(arg);
    }
    let cluster = builder.start();
    let url = cluster.url.clone();
    assert!(url.starts_with("https://"), "{url}");
    let case = &reference_cases()[0];
    let generate = |key: Option<&str>| {
        let mut envs = vec![("SHARDSERVE_TLS_CA", s(&ca))];
        if let Some(k) = key {
            envs.push(("SHARDSERVE_API_KEY", k));
        }
        run_shardctl(
            &["generate", "--coordinator", &url, "--prompt", &case.prompt, "--max-new-tokens", "8", "--temperature", "0", "--json"],
            &envs,
            Duration::from_secs(60),
        )
    };
    let tokens = |o: &Output| -> Vec<u32> {
        assert!(o.status.success(), "{}", o.stderr);
        serde_json::from_value(serde_json::from_str::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone()).unwrap()
    };

    // Every hop mutual TLS: transformers' tokens.
    assert_eq!(tokens(&generate(Some("user-key-1"))), case.new_ids[..8]);
    let out = generate(None);
    assert!(!out.status.success() && out.stderr.contains("Unauthenticated"), "{}", out.stderr);

    // The workers' ports: only a certificate of the cluster CA, valid and not revoked, is served.
    let workers = run_shardctl(
        &["workers", "--json", "--coordinator", &url],
        &[("SHARDSERVE_TLS_CA", s(&ca)), ("SHARDSERVE_ADMIN_KEY", "admin-key-1")],
        Duration::from_secs(30),
    );
    assert!(workers.status.success(), "{}", workers.stderr);
    let workers: Vec<serde_json::Value> =
        serde_json::from_value(serde_json::from_str::<serde_json::Value>(&workers.stdout).unwrap()["workers"].clone()).unwrap();
    assert_eq!(workers.len(), 4, "{workers:?}");
    let address = workers[0]["address"].as_str().unwrap().to_string();
    let (ok, text) = health_over_curl(&address, &ca, Some((&a.join("node.pem"), &a.join("node.key"))));
    assert!(ok && text == "200", "a member was not served: {text}");
    let strangers: [(&str, Option<(&Path, &Path)>); 4] = [
        ("no certificate", None),
        ("another CA", Some((&b.join("node.pem"), &b.join("node.key")))),
        ("revoked", Some((&revoked, &revoked_key))),
        ("expired", Some((&expired, &expired_key))),
    ];
    for (who, cert) in strangers {
        let (ok, text) = health_over_curl(&address, &ca, cert);
        assert!(!ok && !text.contains("200"), "{who}: served ({text})");
    }
    let (ok, _) = curl(&["--http2-prior-knowledge", &format!("http://{address}/")]);
    assert!(!ok, "plaintext was served by a worker");
    // Both CAs of `dev certs` bear the same name: a certificate of the other fails on its
    // signature.
    for why in ["peer sent no certificates", "BadSignature", "Revoked", "certificate expired"] {
        wait_until(&format!("a worker logging a refusal for `{why}`"), Duration::from_secs(10), || {
            cluster.stderr().lines().any(|l| l.contains("TLS handshake refused") && l.contains(why))
        });
    }

    // The embedded membership: no certificate gets UNAUTHENTICATED; a stranger's certificate
    // does not get past the handshake.
    let err = register(&url, &ca, None).await.unwrap_err();
    assert!(err.starts_with("Unauthenticated") && err.contains("cluster"), "{err}");
    let identity = |cert: &Path, key: &Path| ClusterTls::open(&ca, cert, key, None).unwrap();
    for (who, id) in [
        ("another CA", identity(&b.join("node.pem"), &b.join("node.key"))),
        ("revoked", identity(&revoked, &revoked_key)),
        ("expired", identity(&expired, &expired_key)),
    ] {
        let err = register(&url, &ca, Some(&id)).await.unwrap_err();
        assert!(!err.starts_with("Unauthenticated"), "{who}: the handshake let it through ({err})");
    }

    // A worker started without the cluster's certificate cannot join.
    let args = ["--coordinator", url.as_str(), "--id", "stranger"].map(String::from);
    let _stranger = worker_until_it_logs(&args, "registration failed", Duration::from_secs(20));
    let listed = run_shardctl(
        &["workers", "--json", "--coordinator", &url],
        &[("SHARDSERVE_TLS_CA", s(&ca)), ("SHARDSERVE_ADMIN_KEY", "admin-key-1")],
        Duration::from_secs(30),
    );
    assert!(!listed.stdout.contains("stranger") && !listed.stdout.contains("intruder"), "{}", listed.stdout);

    // Everyone else is still served.
    assert_eq!(tokens(&generate(Some("user-key-1"))), case.new_ids[..8]);
}

/// A worker's plaintext health port (`--health-listen`, for Kubernetes' probes, which cannot
/// speak mutual TLS) answers SERVING while its Worker port refuses the same plaintext call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_answers_probes_in_plaintext_while_the_worker_port_needs_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    dev_certs(dir.path());
    let f = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let mut child = Command::new(bin("worker"))
        .args(["--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0", "--id", "probed"])
        // Nobody there: the worker keeps trying to join, and serves meanwhile.
        .args(["--coordinator", "https://127.0.0.1:9"])
        .args(["--cluster-ca", &f("ca.pem"), "--cluster-cert", &f("node.pem"), "--cluster-key", &f("node.key")])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let _worker = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut health, mut listening) = (None, None);
    while health.is_none() || listening.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the worker printed `health` and `listening` within 30 s");
        if let Some(a) = line.strip_prefix("health ") {
            health = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("listening ") {
            listening = Some(a.to_string());
        }
    }
    let check = |address: String| async move {
        let call = async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.map_err(|e| e.to_string())?;
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(10), call).await.unwrap_or_else(|_| Err("no answer within 10 s".into()))
    };
    assert_eq!(check(health.unwrap()).await, Ok(tonic_health::pb::health_check_response::ServingStatus::Serving as i32));
    assert!(check(listening.unwrap()).await.is_err(), "the Worker port answered plaintext");
}
