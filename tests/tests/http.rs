//! The OpenAI-compatible HTTP API through a real cluster: the official `openai` Python package
//! drives completions, chat, streaming, n > 1, stop, seeds, logprobs and errors
//! (`tests/python/openai_check.py`); raw requests check the SSE framing byte by byte, the error
//! shapes for bad bodies, and that a client who goes away frees its sequence.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A cluster serving the reference model (no chat template) with its HTTP API, and the same
/// checkpoint with the template loaded as a second model named "chat".
async fn http_cluster(chat_dir: &Path) -> (Cluster, String) {
    let cluster = Cluster::new(reference_model())
        .workers(2)
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        .arg("--max-n")
        .arg("4")
        .arg("--max-request-bytes")
        .arg("65536")
        .start();
    let out = run_shardctl(
        &["models", "load", chat_dir.to_str().unwrap(), "--name", "chat", "--json", "--coordinator", &cluster.url],
        &[],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "models load: {}", out.stderr);
    let http = cluster_status(&cluster.url).await.http_address;
    assert!(!http.is_empty(), "the coordinator reports no HTTP address");
    (cluster, http)
}

/// One HTTP/1.1 request on a fresh connection, bounded (60 s): the status and the raw body
/// bytes (chunked encoding undone).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
    http_request(addr, method, path, None, body, Duration::from_secs(60))
}

fn json_of(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_gets_what_it_expects() {
    let dir = chat_model();
    let (cluster, http) = http_cluster(dir.path()).await;
    let python = python_venv();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_check.py");
    let out = bounded(
        Command::new(python)
            .arg(script)
            .arg(format!("http://{http}/v1"))
            .arg("chat")
            .arg(reference_model().to_str().unwrap())
            .arg(fixtures().join("hf-reference/tiny-qwen3.reference.json"))
            .arg(fixtures().join("chat/public.json")),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "the openai client's checks failed:\n{}\n{}\n--- cluster ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_framing_errors_and_disconnects_over_raw_http() {
    let dir = chat_model();
    let (cluster, http) = http_cluster(dir.path()).await;
    let plain = reference_model().to_str().unwrap().to_string();
    let case = &reference_cases()[1];

    // A stream as `curl -N` shows it, byte by byte: `data: {json}\n\n` events, the last one
    // `data: [DONE]\n\n`.
    let body = serde_json::json!({"model": plain, "prompt": case.prompt, "max_tokens": 6, "temperature": 0, "stream": true}).to_string();
    let out = bounded(
        Command::new("curl")
            .args(["-sS", "-N", "--fail-with-body", "-H", "Content-Type: application/json", "-d", &body])
            .arg(format!("http://{http}/v1/completions")),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
    let events: Vec<&str> = text.strip_suffix("\n\n").unwrap().split("\n\n").collect();
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let payload = e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {e:?}"));
        assert!(!payload.contains('\n'), "{e:?}");
        let v = json_of(payload.as_bytes());
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap());
    }
    let (_, once) = request(&http, "POST", "/v1/completions", &body.replace("\"stream\":true", "\"stream\":false"));
    assert_eq!(streamed, json_of(&once)["choices"][0]["text"].as_str().unwrap());

    // Bad bodies: 400 in OpenAI's shape, naming what is wrong.
    let (status, b) = request(&http, "POST", "/v1/completions", "{\"prompt\": \"x\",");
    assert_eq!(status, 400);
    let e = json_of(&b);
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{e}");
    let (status, b) = request(&http, "POST", "/v1/completions", r#"{"prompt": "x", "max_tokens": "five"}"#);
    assert_eq!(status, 400);
    let e = json_of(&b);
    assert_eq!(e["error"]["param"], "max_tokens", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().starts_with("max_tokens: invalid type"), "{e}");
    let (status, b) =
        request(&http, "POST", "/v1/chat/completions", r#"{"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 0}"#);
    assert_eq!((status, json_of(&b)["error"]["param"].clone()), (400, serde_json::json!("n")));
    let (status, _) = request(&http, "GET", "/v1/nothing", "");
    assert_eq!(status, 404);
    let chat_error = |messages: serde_json::Value, extra: serde_json::Value| {
        let mut req = serde_json::json!({"model": "chat", "messages": messages, "max_tokens": 4});
        req.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, b) = request(&http, "POST", "/v1/chat/completions", &req.to_string());
        (status, json_of(&b)["error"].clone())
    };
    let none = serde_json::json!({});
    let (status, e) = chat_error(serde_json::json!([{"role": "wizard", "content": "x"}]), none.clone());
    assert_eq!(status, 400);
    assert!(e["message"].as_str().unwrap().contains("messages[0].role: unknown role \"wizard\""), "{e}");
    let (status, e) = chat_error(serde_json::json!([]), none.clone());
    assert!(status == 400 && e["message"] == "messages must not be empty", "{e}");
    let image = serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]);
    let (status, e) = chat_error(image, none.clone());
    assert_eq!(status, 400);
    assert!(e["message"].as_str().unwrap().contains("messages[0].content[1].type: image_url parts are not supported"), "{e}");
    let (status, e) = chat_error(serde_json::json!([{"role": "user", "content": "x"}]), serde_json::json!({"n": 5}));
    assert!(status == 400 && e["param"] == "n" && e["message"].as_str().unwrap().contains("--max-n"), "{e}");
    let long = "word ".repeat(1500);
    let (status, b) =
        request(&http, "POST", "/v1/completions", &serde_json::json!({"model": plain, "prompt": long, "max_tokens": 4}).to_string());
    assert_eq!(status, 400);
    assert!(
        json_of(&b)["error"]["message"].as_str().unwrap().contains("the model's context is 1024 tokens"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let huge = serde_json::json!({"model": plain, "prompt": "x".repeat(70_000), "max_tokens": 4}).to_string();
    let (status, b) = request(&http, "POST", "/v1/completions", &huge);
    assert_eq!(status, 413);
    assert!(json_of(&b)["error"]["message"].as_str().unwrap().contains("larger than 65536 bytes"));
    // Text parts are one string to the template, joined by newlines.
    let parts = serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "Explain"}, {"type": "text", "text": "copyleft."}]}]});
    let joined = serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "Explain\ncopyleft."}]});
    let (_, a) = request(&http, "POST", "/tokenize", &parts.to_string());
    let (_, b) = request(&http, "POST", "/tokenize", &joined.to_string());
    assert_eq!(json_of(&a)["tokens"], json_of(&b)["tokens"]);

    // /health, /tokenize and /detokenize.
    let (status, b) = request(&http, "GET", "/health", "");
    assert_eq!((status, json_of(&b)["status"].clone()), (200, serde_json::json!("ok")));
    let (status, b) = request(&http, "POST", "/tokenize", &serde_json::json!({"model": plain, "prompt": case.prompt}).to_string());
    assert_eq!(status, 200);
    let t = json_of(&b);
    assert_eq!(t["tokens"], serde_json::json!(case.input_ids));
    assert_eq!(t["count"], case.input_ids.len());
    let (_, b) = request(&http, "POST", "/detokenize", &serde_json::json!({"model": plain, "tokens": case.input_ids}).to_string());
    assert_eq!(json_of(&b)["prompt"], case.prompt);
    let chat_case = &serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(fixtures().join("chat/public.json")).unwrap())
        .unwrap()["cases"][1];
    let req = serde_json::json!({"model": "chat", "messages": chat_case["messages"], "add_generation_prompt": true});
    let (status, b) = request(&http, "POST", "/tokenize", &req.to_string());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json_of(&b)["tokens"], chat_case["input_ids"], "the chat template's tokens differ from transformers'");

    // A client that goes away mid-stream: its sequence is cancelled and its blocks freed.
    let stages = cluster.stage_addresses().await;
    let mut s = std::net::TcpStream::connect(&http).unwrap();
    let body = serde_json::json!({"model": plain, "prompt": "a", "max_tokens": 1000, "temperature": 0, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Until the first token's event: the sequence runs on the stages.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    let busy = Cluster::worker_stats(&stages[0]).await;
    assert!(busy.sequences > 0, "the stream is not running: {busy:?}");
    drop(s);
    wait_no_sequences(&stages).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shardctl_generate_chat_uses_the_chat_rpc_and_transformers_prompt() {
    let dir = chat_model();
    let (cluster, _) = http_cluster(dir.path()).await;
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat/public.json")).unwrap()).unwrap();
    let case = &fixture["cases"][1];
    let (system, user) = (case["messages"][0]["content"].as_str().unwrap(), case["messages"][1]["content"].as_str().unwrap());
    let out = run_shardctl(
        &[
            "generate",
            "--coordinator",
            &cluster.url,
            "--model",
            "chat",
            "--chat",
            "--system",
            system,
            "--user",
            user,
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--json",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let got: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(got["prompt_token_ids"], case["input_ids"], "the Chat RPC's prompt differs from transformers' apply_chat_template");
    // The same tokens as generating from the rendered text.
    let mut c = cluster.client().await;
    let mut req = greedy(case["text"].as_str().unwrap(), 12);
    req.model = "chat".into();
    let want = generate(&mut c, req).await.unwrap();
    assert_eq!(got["token_ids"], serde_json::json!(want.token_ids));
    // Messages from a file, and the errors a bad conversation gets.
    let file = dir.path().join("messages.json");
    std::fs::write(&file, case["messages"].to_string()).unwrap();
    let out = run_shardctl(
        &[
            "generate",
            "--coordinator",
            &cluster.url,
            "--model",
            "chat",
            "--chat",
            "--messages",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--json",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["token_ids"], serde_json::json!(want.token_ids));
    let chat = Some(pb::GenerateRequest { model: "chat".into(), ..Default::default() });
    let bad = pb::ChatRequest { generation: chat, messages_json: r#"[{"role": "wizard", "content": "x"}]"#.into(), ..Default::default() };
    let e = c.chat(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("unknown role \"wizard\""), "{e:?}");
    let plain = pb::ChatRequest { messages_json: r#"[{"role": "user", "content": "x"}]"#.into(), ..Default::default() };
    let e = c.chat(plain).await.unwrap_err();
    assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("has no chat template"), "{e:?}");
}
