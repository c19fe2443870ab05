//! Malformed steps sent straight to a worker's `Step` stream, as a hostile or broken peer
//! would: a wrong dtype, a byte length that does not match the shape, a shape that does not
//! match the rows, hidden states where tokens belong, positions past the model's context, an
//! unknown sequence, a huge token list. Each gets INVALID_ARGUMENT (or, for the unknown
//! sequence, UNAVAILABLE) naming the problem, the worker does not fall over, and the same
//! stream goes on serving a well-formed sequence.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::Duration;

const HIDDEN: usize = 64;

/// One step on an open stream and its answer (10 s at most).
async fn step(
    tx: &tokio::sync::mpsc::Sender<pb::StepRequest>,
    rx: &mut tonic::Streaming<pb::StepResponse>,
    req: pb::StepRequest,
) -> pb::StepResponse {
    tx.send(req).await.expect("the step stream closed");
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("no answer within 10 s")
        .expect("the step stream failed")
        .expect("the step stream ended")
}

fn seq(seq_id: u64, token_ids: Vec<u32>, start_pos: u32) -> pb::SequenceStep {
    pb::SequenceStep {
        seq_id,
        token_ids,
        start_pos,
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

fn hidden(dtype: &str, shape: Vec<u64>, bytes: usize) -> Option<pb::Tensor> {
    Some(pb::Tensor { dtype: dtype.into(), shape, data: vec![0u8; bytes] })
}

/// The one result of a refused step: its code and message.
fn refused(r: &pb::StepResponse) -> (tonic::Code, String) {
    assert_eq!(r.results.len(), 1, "{r:?}");
    (tonic::Code::from(r.results[0].code), r.results[0].error.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_steps_are_refused_one_by_one_and_the_stream_serves_on() {
    let cluster = Cluster::new(reference_model()).workers(2).start();
    let addresses = cluster.stage_addresses().await;
    let (first, last) = (&addresses[0], &addresses[1]);

    // The last stage takes hidden states.
    let mut client = shardserve::stage::connect(last, None).await.unwrap();
    let (tx, out) = tokio::sync::mpsc::channel(4);
    let mut rx = client.step(tokio_stream::wrappers::ReceiverStream::new(out)).await.unwrap().into_inner();
    let f32s = |rows: usize| hidden("f32", vec![rows as u64, HIDDEN as u64], rows * HIDDEN * 4);
    let cases: Vec<(&str, pb::StepRequest, &str)> = vec![
        (
            "a dtype no stage sends",
            pb::StepRequest {
                step_id: 1,
                sequences: vec![seq(10, vec![1, 2], 0)],
                hidden: hidden("q4", vec![2, HIDDEN as u64], 2 * HIDDEN),
                release: vec![],
                owner: 0,
            },
            "unknown dtype",
        ),
        (
            "bytes that do not fill the shape",
            pb::StepRequest {
                step_id: 2,
                sequences: vec![seq(11, vec![1, 2], 0)],
                hidden: hidden("f32", vec![2, HIDDEN as u64], 7),
                release: vec![],
                owner: 0,
            },
            "bytes",
        ),
        (
            "a shape of other rows",
            pb::StepRequest { step_id: 3, sequences: vec![seq(12, vec![1, 2], 0)], hidden: f32s(3), release: vec![], owner: 0 },
            "rows",
        ),
        (
            "no hidden states",
            pb::StepRequest { step_id: 4, sequences: vec![seq(13, vec![1], 0)], hidden: None, release: vec![], owner: 0 },
            "needs hidden states",
        ),
        (
            "positions past the context",
            pb::StepRequest { step_id: 5, sequences: vec![seq(14, vec![1], 5000)], hidden: f32s(1), release: vec![], owner: 0 },
            "position",
        ),
        (
            "an empty step",
            pb::StepRequest { step_id: 6, sequences: vec![seq(15, vec![], 0)], hidden: f32s(0), release: vec![], owner: 0 },
            "at least one token",
        ),
    ];
    for (what, req, says) in cases {
        let (code, message) = refused(&step(&tx, &mut rx, req).await);
        assert_eq!(code, tonic::Code::InvalidArgument, "{what}: {message}");
        assert!(message.contains(says), "{what}: {message}");
    }
    // A sequence this worker never saw, mid-way: not served, and said so.
    let r = step(
        &tx,
        &mut rx,
        pb::StepRequest { step_id: 7, sequences: vec![seq(16, vec![1], 9)], hidden: f32s(1), release: vec![], owner: 0 },
    )
    .await;
    assert_eq!(refused(&r).0, tonic::Code::Unavailable, "{r:?}");
    // The same stream serves a well-formed sequence, prefill then decode.
    let r = step(
        &tx,
        &mut rx,
        pb::StepRequest { step_id: 8, sequences: vec![seq(17, vec![1, 2, 3], 0)], hidden: f32s(3), release: vec![], owner: 0 },
    )
    .await;
    assert!(r.results.len() == 1 && r.results[0].code == 0, "{r:?}");
    let r = step(
        &tx,
        &mut rx,
        pb::StepRequest {
            step_id: 9,
            sequences: vec![seq(17, vec![r.results[0].token_id], 3)],
            hidden: f32s(1),
            release: vec![],
            owner: 0,
        },
    )
    .await;
    assert!(r.results.len() == 1 && r.results[0].code == 0, "{r:?}");

    // The first stage takes tokens: ids past the vocabulary, hidden states instead of tokens,
    // and a token list longer than the context.
    let mut client = shardserve::stage::connect(first, None).await.unwrap();
    let (tx, out) = tokio::sync::mpsc::channel(4);
    let mut rx = client.step(tokio_stream::wrappers::ReceiverStream::new(out)).await.unwrap().into_inner();
    let cases: Vec<(&str, pb::StepRequest)> = vec![
        (
            "a token past the vocabulary",
            pb::StepRequest { step_id: 1, sequences: vec![seq(20, vec![1, 100_000], 0)], hidden: None, release: vec![], owner: 0 },
        ),
        (
            "hidden states for the first stage",
            pb::StepRequest { step_id: 2, sequences: vec![seq(21, vec![1], 0)], hidden: f32s(1), release: vec![], owner: 0 },
        ),
        (
            "a huge token list",
            pb::StepRequest { step_id: 3, sequences: vec![seq(22, vec![1; 200_000], 0)], hidden: None, release: vec![], owner: 0 },
        ),
    ];
    for (what, req) in cases {
        let (code, message) = refused(&step(&tx, &mut rx, req).await);
        assert_eq!(code, tonic::Code::InvalidArgument, "{what}: {message}");
    }
    // And the cluster serves clients as before: transformers' tokens.
    let case = &reference_cases()[0];
    let resp = generate(&mut cluster.client().await, greedy(&case.prompt, 8)).await.unwrap();
    assert_eq!(resp.token_ids, case.new_ids[..8]);
}
