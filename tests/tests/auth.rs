//! API keys and admin keys through `shardctl up`: what a client gets without a key, with a wrong
//! one, with a key of the wrong role, and with the right one — on gRPC, the HTTP API and
//! `shardctl`; keys rotated in their file without a restart; health open; reflection off on
//! request; no key ever in the logs.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::Duration;
use tonic::Code;

/// A channel to `url` and an interceptor presenting `key` (`None`: nothing).
async fn with_key(url: &str, key: Option<&str>) -> (tonic::transport::Channel, impl tonic::service::Interceptor) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let value: Option<tonic::metadata::MetadataValue<_>> = key.map(|k| format!("Bearer {k}").parse().unwrap());
    let interceptor = move |mut r: tonic::Request<()>| {
        if let Some(v) = &value {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    };
    (channel, interceptor)
}

async fn inference(
    url: &str,
    key: Option<&str>,
) -> pb::inference_client::InferenceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
> {
    let (channel, i) = with_key(url, key).await;
    pb::inference_client::InferenceClient::with_interceptor(channel, i)
}

async fn admin(
    url: &str,
    key: Option<&str>,
) -> pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
> {
    let (channel, i) = with_key(url, key).await;
    pb::admin_client::AdminClient::with_interceptor(channel, i)
}

use shardserve_tests::http_post as post;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_inference_and_admin_and_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (api_file, admin_file) = (dir.path().join("api-keys"), dir.path().join("admin-keys"));
    std::fs::write(&api_file, "# users\nuser-key-1\n").unwrap();
    std::fs::write(&admin_file, "ops-key-1\n").unwrap();
    let cluster = Cluster::new(reference_model())
        .workers(1)
        .arg("--api-keys-file")
        .arg(api_file.to_str().unwrap())
        .arg("--admin-keys-file")
        .arg(admin_file.to_str().unwrap())
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        .arg("--no-reflection")
        .env("RUST_LOG", "debug")
        .start();
    let url = cluster.url.clone();
    let case = &reference_cases()[0];
    let req = || greedy(&case.prompt, 8);

    // Inference: nothing or a wrong key is UNAUTHENTICATED; a user or an admin key works.
    let e = inference(&url, None).await.generate(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("authorization: Bearer"), "{e:?}");
    let e = inference(&url, Some("user-key-2")).await.generate(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    for key in ["user-key-1", "ops-key-1"] {
        let r = inference(&url, Some(key)).await.generate(req()).await.unwrap().into_inner();
        assert_eq!(r.token_ids, case.new_ids[..8], "with {key}");
    }
    // Admin: a user key is PERMISSION_DENIED, the admin key works.
    let e = admin(&url, None).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = admin(&url, Some("user-key-1")).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let status = admin(&url, Some("ops-key-1")).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    let http = status.http_address;

    // Health stays open; reflection is off.
    let channel = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let h = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    // Neither version of reflection.
    let ask = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut alpha = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let e = match alpha.server_reflection_info(tokio_stream::iter(vec![ask])).await {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let e = match reflection.server_reflection_info(tokio_stream::iter(vec![ask])).await {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    // The HTTP API: 401 in OpenAI's shape without a valid key; /health open.
    let body = serde_json::json!({"prompt": case.prompt, "max_tokens": 4, "temperature": 0}).to_string();
    let (status, b) = post(&http, "/v1/completions", None, &body);
    assert_eq!(status, 401, "{b}");
    let e: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(e["error"]["type"], "authentication_error", "{e}");
    assert_eq!(post(&http, "/v1/completions", Some("nope"), &body).0, 401);
    assert_eq!(post(&http, "/v1/completions", Some("user-key-1"), &body).0, 200);
    assert_eq!(http_get(&http, "/health").0, 200);

    // shardctl presents SHARDSERVE_ADMIN_KEY / SHARDSERVE_API_KEY.
    let out = run_shardctl(&["status", "--json", "--coordinator", &url], &[], Duration::from_secs(30));
    assert!(!out.status.success() && out.stderr.contains("Unauthenticated"), "{}", out.stderr);
    let out = run_shardctl(&["status", "--json", "--coordinator", &url], &[("SHARDSERVE_ADMIN_KEY", "ops-key-1")], Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.stderr);
    let out = run_shardctl(
        &["generate", "--coordinator", &url, "--prompt", &case.prompt, "--max-new-tokens", "4", "--temperature", "0"],
        &[("SHARDSERVE_API_KEY", "user-key-1")],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.stderr);

    // Rotation: a new key works and a removed one stops working, with no restart.
    std::fs::write(&api_file, "user-key-2\n").unwrap();
    assert!(inference(&url, Some("user-key-2")).await.generate(req()).await.is_ok());
    let e = inference(&url, Some("user-key-1")).await.generate(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // No key reaches the logs, even at debug level.
    let logs = cluster.stderr();
    for key in ["user-key-1", "user-key-2", "ops-key-1"] {
        assert!(!logs.contains(key), "{key} is in the logs");
    }
}
