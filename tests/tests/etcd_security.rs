//! Membership in an etcd that trusts nobody by default: a real etcd over TLS asking for client
//! certificates (`--client-cert-auth`), with auth enabled and a user whose role may read and
//! write only this cluster's prefix. With the right CA, certificate and user the cluster serves
//! transformers' tokens; every part missing or wrong is refused with the reason, by the
//! coordinator at start and by a worker as it tries to register.

use shardserve::membership::etcd_client::Permission;
use shardserve_tests::certs::dev_certs;
use shardserve_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs a coordinator of the reference model with `args` until it exits (it must, within
/// 60 s): its stderr.
fn refused_coordinator(args: &[String]) -> String {
    let model = reference_model();
    let out = bounded(
        Command::new(bin("coordinator"))
            .args(["--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the coordinator started with {args:?}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_rbac_users_serves_members_and_refuses_the_rest_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    dev_certs(&a);
    dev_certs(&b);
    let etcd = Etcd::start_secure(EtcdSecurity { dir: a.clone() });
    let name = unique_cluster("etcdsec");
    let password = |user: &str, pw: &str| {
        let p = dir.path().join(format!("{user}.password"));
        std::fs::write(&p, format!("{pw}\n")).unwrap();
        p
    };
    let (root_pw, member_pw, other_pw, wrong_pw) =
        (password("root", "r00t"), password("shardserve", "s3cret"), password("other", "0ther"), password("wrong", "guess"));

    // etcd's RBAC: root; a user who may read and write this cluster's prefix; one who may
    // only touch another prefix. Then auth is on.
    let mut c = etcd.client(None).await.unwrap();
    c.user_add("root", "r00t", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("shardserve").await.unwrap();
    c.role_grant_permission("shardserve", Permission::read_write(format!("/shardserve/{name}/")).with_prefix()).await.unwrap();
    c.user_add("shardserve", "s3cret", None).await.unwrap();
    c.user_grant_role("shardserve", "shardserve").await.unwrap();
    c.role_add("elsewhere").await.unwrap();
    c.role_grant_permission("elsewhere", Permission::read_write("/elsewhere/").with_prefix()).await.unwrap();
    c.user_add("other", "0ther", None).await.unwrap();
    c.user_grant_role("other", "elsewhere").await.unwrap();
    c.auth_enable().await.unwrap();

    // The member: TLS, its client certificate, its user. Transformers' tokens.
    let cluster = Cluster::new(reference_model())
        .workers(2)
        .etcd(&etcd, &name)
        .arg("--etcd-user")
        .arg("shardserve")
        .arg("--etcd-password-file")
        .arg(&s(&member_pw))
        .start();
    let case = &reference_cases()[0];
    let mut client = cluster.client().await;
    let resp = generate(&mut client, greedy(&case.prompt, 8)).await.unwrap();
    assert_eq!(resp.token_ids, case.new_ids[..8]);
    // Its workers registered under the prefix, as etcd's root sees them.
    let mut root = etcd.client(Some(("root", &root_pw))).await.unwrap();
    let registered = root
        .get(format!("/shardserve/{name}/workers/"), Some(shardserve::membership::etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(registered.kvs().len(), 2);

    // Each part missing or wrong: the coordinator does not start, and says why.
    let url = etcd.url();
    let tls = |cert_dir: &Path| {
        vec![
            "--etcd-ca".to_string(),
            s(&a.join("ca.pem")),
            "--etcd-cert".into(),
            s(&cert_dir.join("client.pem")),
            "--etcd-key".into(),
            s(&cert_dir.join("client.key")),
        ]
    };
    let with = |extra: Vec<String>, user: Option<(&str, &Path)>| {
        let mut args = vec!["--etcd".to_string(), url.clone(), "--cluster".into(), name.clone()];
        args.extend(extra);
        if let Some((u, p)) = user {
            args.extend(["--etcd-user".to_string(), u.to_string(), "--etcd-password-file".into(), s(p)]);
        }
        args
    };
    let err = refused_coordinator(&with(tls(&a), Some(("shardserve", &wrong_pw))));
    assert!(err.contains("authentication failed"), "a wrong password: {err}");
    let err = refused_coordinator(&with(tls(&a), Some(("other", &other_pw))));
    assert!(err.contains("permission denied"), "a user without rights on the prefix: {err}");
    // No user: etcd takes the client certificate's name (shardserve-client), which has no role.
    let err = refused_coordinator(&with(tls(&a), None));
    assert!(err.contains("permission denied"), "no user: {err}");
    let err = refused_coordinator(&with(tls(&b), Some(("shardserve", &member_pw))));
    assert!(err.contains(&format!("etcd at {url}")), "a client certificate of another CA: {err}");
    let err = refused_coordinator(&with(vec!["--etcd-ca".into(), s(&a.join("ca.pem"))], Some(("shardserve", &member_pw))));
    assert!(err.contains(&format!("etcd at {url}")), "no client certificate: {err}");
    let plain = url.replace("https://", "http://");
    let err = refused_coordinator(&["--etcd".to_string(), plain.clone(), "--cluster".into(), name.clone()]);
    assert!(err.contains(&format!("etcd at {plain}")), "plaintext: {err}");
    let err = refused_coordinator(&[vec!["--etcd".to_string(), plain.clone()], tls(&a)].concat());
    assert!(err.contains(&format!("write {url}")), "http:// with --etcd-ca: {err}");

    // A worker with a wrong password keeps trying and says why; it never registers.
    let args = [with(tls(&a), Some(("shardserve", &wrong_pw))), vec!["--id".into(), "wrong-password".into()]].concat();
    let _worker = worker_until_it_logs(&args, "authentication failed", Duration::from_secs(20));
    let registered = root
        .get(format!("/shardserve/{name}/workers/"), Some(shardserve::membership::etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(registered.kvs().len(), 2, "the worker with a wrong password registered");

    // And the members go on being served.
    let resp = generate(&mut client, greedy(&case.prompt, 8)).await.unwrap();
    assert_eq!(resp.token_ids, case.new_ids[..8]);
}
