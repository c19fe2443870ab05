//! Hidden states and embeddings (transformers' AutoModel case) through a real 2-stage cluster
//! with chunked prefill: the `Embed` RPC and `/v1/embeddings` give the final-norm hidden states
//! of candle-transformers' own Qwen3 base model on the same checkpoint, pooled, batched with a
//! generation that is not disturbed, and no KV block stays behind.

use candle_core::{DType, Device, Tensor};
use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::Duration;

/// candle-transformers' Qwen3 base model on the reference checkpoint: each position's
/// final-norm hidden state of `ids`, (positions, hidden).
fn reference_states(ids: &[u32]) -> Vec<Vec<f32>> {
    let dir = reference_model();
    let cfg: candle_transformers::models::qwen3::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
    let mut model = candle_transformers::models::qwen3::Model::new(&cfg, vb).unwrap();
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn mean(rows: &[Vec<f32>]) -> Vec<f32> {
    (0..rows[0].len()).map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / rows.len() as f32).collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: differs from candle-transformers by up to {worst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_equal_candle_transformers_base_model_and_leave_no_kv() {
    // Chunks of 4 tokens: every input is prefilled over several steps.
    let cluster =
        Cluster::new(reference_model()).workers(2).arg("--prefill-chunk").arg("4").arg("--http-listen").arg("127.0.0.1:0").start();
    let cases = reference_cases();
    let inputs: Vec<String> = cases[..3].iter().map(|c| c.prompt.clone()).collect();
    let want: Vec<Vec<Vec<f32>>> = cases[..3].iter().map(|c| reference_states(&c.input_ids)).collect();
    let mut c = cluster.client().await;

    // A generation runs all along: batched with the embeddings, undisturbed by them.
    let long = greedy("a", 200);
    let undisturbed = generate(&mut c, long.clone()).await.unwrap().token_ids;
    let mut stream = c.generate_stream(long).await.unwrap().into_inner();

    let embed = |pooling: &str, normalize: bool| pb::EmbedRequest {
        model: String::new(),
        inputs: inputs.clone(),
        pooling: pooling.into(),
        normalize,
    };
    // Every position: transformers' last_hidden_state.
    let all = c.embed(embed("none", false)).await.unwrap().into_inner();
    assert_eq!(all.embeddings.len(), 3);
    for (i, (e, w)) in all.embeddings.iter().zip(&want).enumerate() {
        assert_eq!((e.rows as usize, e.dims as usize), (w.len(), w[0].len()), "input {i}");
        assert_close(&e.values, &w.concat(), &format!("input {i}, every position"));
    }
    assert_eq!(all.usage.unwrap().prompt_tokens as usize, cases[..3].iter().map(|c| c.input_ids.len()).sum::<usize>());
    let last = c.embed(embed("last", false)).await.unwrap().into_inner();
    let avg = c.embed(embed("mean", true)).await.unwrap().into_inner();
    for (i, w) in want.iter().enumerate().take(3) {
        assert_eq!(last.embeddings[i].rows, 1);
        assert_close(&last.embeddings[i].values, w.last().unwrap(), &format!("input {i}, last"));
        assert_close(&avg.embeddings[i].values, &normalized(&mean(w)), &format!("input {i}, mean, normalized"));
    }

    // /v1/embeddings: OpenAI's shape, last position, unit norm by default.
    let http = cluster_status(&cluster.url).await.http_address;
    let body = serde_json::json!({"input": inputs, "encoding_format": "float"}).to_string();
    let (status, v) = post(&http, "/v1/embeddings", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    for i in 0..3 {
        assert_eq!(v["data"][i]["index"], i);
        let got: Vec<f32> = serde_json::from_value(v["data"][i]["embedding"].clone()).unwrap();
        assert_close(&got, &normalized(want[i].last().unwrap()), &format!("/v1/embeddings input {i}"));
    }
    let (status, e) = post(&http, "/v1/embeddings", &serde_json::json!({"input": "x", "encoding_format": "hex"}).to_string());
    assert!(status == 400 && e["error"]["param"] == "encoding_format", "{e}");
    let (status, e) = post(&http, "/v1/embeddings", &serde_json::json!({"input": "x", "dimensions": 8}).to_string());
    assert!(status == 400 && e["error"]["param"] == "dimensions", "{e}");

    let mut got = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(60), stream.message()).await.unwrap().unwrap() {
        got.extend(m.token_ids);
    }
    assert_eq!(got, undisturbed, "the generation beside the embeddings changed");

    // Bad requests name what is wrong; nothing is kept on any stage afterwards.
    let e = c.embed(embed("max", false)).await.unwrap_err();
    assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("pooling"), "{e:?}");
    let e = c.embed(pb::EmbedRequest::default()).await.unwrap_err();
    assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("inputs must not be empty"), "{e:?}");
    wait_no_sequences(&cluster.stage_addresses().await).await;
}

/// POST `body` to `path`; the status and the JSON answer.
fn post(addr: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = http_post(addr, path, None, body);
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}
