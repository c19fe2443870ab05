//! Structured output (llguidance) on random-weight models, through real clusters: 20 JSON
//! schemas whose every finished response validates with Python's `jsonschema`, in each layout
//! (one worker, two pipeline stages, tensor parallelism of 2); `tool_choice` "required" and
//! named through the official `openai` client; and the same constraint over gRPC.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs `tests/python/structured_check.py MODE` against `http` for `model`: what it counted.
fn check(mode: &str, http: &str, model: &str, cluster: &Cluster) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/structured_check.py");
    let out =
        bounded(Command::new(python_venv()).arg(script).arg(mode).arg(format!("http://{http}/v1")).arg(model), Duration::from_secs(400));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "structured_check.py {mode} failed:\n{stdout}\n{}\n--- cluster ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.stderr()
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

async fn http_of(cluster: &Cluster) -> String {
    let http = cluster_status(&cluster.url).await.http_address;
    assert!(!http.is_empty(), "the coordinator reports no HTTP address");
    http
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_json_schemas_hold_in_every_layout() {
    let model = reference_model();
    let name = model.to_str().unwrap();
    for (workers, tp) in [(1, 1), (2, 1), (2, 2)] {
        let cluster =
            Cluster::new(&model).workers(workers).arg("--tp").arg(&tp.to_string()).arg("--http-listen").arg("127.0.0.1:0").start();
        let layout = if tp > 1 { "tensor parallel" } else { "pipeline" };
        let stages = placement(&cluster).await.len();
        assert_eq!(stages, workers / tp, "{workers} workers, tp {tp}");
        let counted = check("schemas", &http_of(&cluster).await, name, &cluster);
        // Every finished response validated (the script raises otherwise); most must finish,
        // or nothing was checked.
        eprintln!("{workers} workers, tp {tp}: {counted}");
        let stopped = counted["stopped"].as_u64().unwrap();
        assert!(stopped >= 30, "{workers} workers ({layout}): only {stopped} of 40 responses finished: {counted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_tool_choices_make_valid_calls_for_the_openai_client() {
    let dir = chat_model();
    let name = dir.path().to_str().unwrap().to_string();
    let cluster = Cluster::new(dir.path()).arg("--http-listen").arg("127.0.0.1:0").start();
    let counted = check("tools", &http_of(&cluster).await, &name, &cluster);
    let made = counted["calls_made"].as_u64().unwrap();
    assert!(made >= 6, "only {made} of 8 responses made their calls within max_tokens: {counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_generate_takes_the_same_constraints() {
    let cluster = Cluster::new(reference_model()).start();
    let mut c = cluster.client().await;
    use pb::structured_output::Kind;
    let constrained = |kind: Kind, seed: u64| pb::GenerateRequest {
        structured_output: Some(pb::StructuredOutput { kind: Some(kind) }),
        ..sampled("Pick one:", seed)
    };
    let choices = vec!["alpha".to_string(), "beta".to_string(), "gamma delta".to_string()];
    for seed in 0..4 {
        let r = generate(&mut c, constrained(Kind::Choice(pb::Choices { choices: choices.clone() }), seed)).await.unwrap();
        assert!(choices.contains(&r.text), "seed {seed}: {:?}", r.text);
        assert_eq!(r.finish_reason, "eos", "seed {seed}");
        let r = generate(&mut c, constrained(Kind::Regex("[0-9]{2}:[0-9]{2}".into()), seed)).await.unwrap();
        let ok = r.text.len() == 5 && r.text.chars().enumerate().all(|(i, ch)| if i == 2 { ch == ':' } else { ch.is_ascii_digit() });
        assert!(ok, "seed {seed}: {:?}", r.text);
    }
    // Complete before min_tokens: the grammar allows only the end, which min_tokens forbids.
    // The grammar wins.
    let early = pb::GenerateRequest { min_tokens: 12, ..constrained(Kind::Choice(pb::Choices { choices: choices.clone() }), 5) };
    let r = generate(&mut c, early).await.unwrap();
    assert!(choices.contains(&r.text) && r.token_ids.len() < 12 && r.finish_reason == "eos", "{r:?}");
    let e = generate(&mut c, constrained(Kind::JsonSchema(r#"{"type": "array", "uniqueItems": true}"#.into()), 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("uniqueItems"), "{}", e.message());
    let e = generate(&mut c, pb::GenerateRequest { ignore_eos: true, ..constrained(Kind::JsonObject(true), 1) }).await.unwrap_err();
    assert!(e.message().contains("ignore_eos"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_chat_reads_tool_calls_a_named_choice_demands() {
    let dir = chat_model();
    let cluster = Cluster::new(dir.path()).start();
    let mut c = cluster.client().await;
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"], "additionalProperties": false}}}]);
    for seed in 0..3 {
        let req = pb::ChatRequest {
            messages_json: r#"[{"role": "user", "content": "What time is it?"}]"#.into(),
            tools_json: tools.to_string(),
            chat_template_kwargs_json: r#"{"enable_thinking": false}"#.into(),
            tool_choice_json: r#"{"type": "function", "function": {"name": "get_time"}}"#.into(),
            generation: Some(pb::GenerateRequest { max_new_tokens: Some(100), ..sampled("", seed) }),
            ..Default::default()
        };
        let mut stream = tokio::time::timeout(Duration::from_secs(60), c.chat(req)).await.unwrap().unwrap().into_inner();
        let (mut text, mut content, mut calls, mut finish) =
            (String::new(), String::new(), Vec::<(String, String, String)>::new(), String::new());
        while let Some(m) = tokio::time::timeout(Duration::from_secs(60), stream.message()).await.unwrap().unwrap() {
            text.push_str(&m.text);
            content.push_str(&m.content);
            for p in m.tool_calls {
                if p.index as usize == calls.len() {
                    assert!(p.id.starts_with("call_") && !p.name.is_empty(), "seed {seed}: a call's first piece: {p:?}");
                    calls.push((p.id, p.name, p.arguments));
                } else {
                    assert!(p.id.is_empty() && p.name.is_empty(), "seed {seed}: id and name come once: {p:?}");
                    calls[p.index as usize].2.push_str(&p.arguments);
                }
            }
            if !m.finish_reason.is_empty() {
                finish = m.finish_reason;
            }
        }
        assert_eq!(finish, "eos", "seed {seed}: {text:?}");
        assert!(text.starts_with("<tool_call>") && content.is_empty(), "seed {seed}: text {text:?}, content {content:?}");
        assert_eq!(calls.len(), 1, "seed {seed}: {text:?}");
        assert_eq!(calls[0].1, "get_time");
        let args: serde_json::Value = serde_json::from_str(&calls[0].2).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(args == serde_json::json!({"zone": "utc"}) || args == serde_json::json!({"zone": "local"}), "{args}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constrained_request_moved_to_another_placement_keeps_its_place_in_the_grammar() {
    let etcd = Etcd::start();
    let cluster = migrating_cluster(&etcd, &unique_cluster("structured-migrate"));
    let mut c = cluster.client().await;
    // Only the first token may be "a": a grammar started afresh after the move would force it
    // again, and the tokens would part from the undisturbed ones.
    let req = pb::GenerateRequest {
        structured_output: Some(pb::StructuredOutput { kind: Some(pb::structured_output::Kind::Regex("a[b-z ]*".into())) }),
        ..greedy("a", 1000)
    };
    let undisturbed = generate(&mut c, req.clone()).await.unwrap();
    assert_eq!(undisturbed.token_ids.len(), 1000, "the request must run long enough to be moved: {:?}", undisturbed.text);
    assert!(undisturbed.text.starts_with('a') && !undisturbed.text[1..].contains('a'), "{:?}", undisturbed.text);
    let (_, pid) = cluster.stage_worker(1).await;
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut ids = first.token_ids;
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = s.message().await? {
            ids.extend(m.token_ids);
        }
        Ok::<_, tonic::Status>(())
    })
    .await
    .expect("the moved stream did not finish within 60 s");
    rest.unwrap_or_else(|e| panic!("the stream failed although a move was allowed: {e:?}"));
    let same = ids.iter().zip(&undisturbed.token_ids).take_while(|(a, b)| a == b).count();
    assert!(ids == undisturbed.token_ids, "a moved request must give the undisturbed tokens: the first {same} of {} agree", ids.len());
}
