//! Running steps: the worker's compute thread, and one step through the shard (checks first,
//! then the forward pass of every sequence, then sampling on the last stage).

use super::{Loaded, Sequence, WorkerState};
use crate::group::Control;
use candle_core::Tensor;
use shardserve::model::{self, StageInput, StageOutput};
use shardserve::sampling::{Sampler, SamplingParams};
use shardserve_proto::v1 as pb;
use std::sync::{Arc, Mutex};

/// The one thread that runs this worker's forward passes. Steps run one at a time on a thread
/// that lives as long as the worker, so its allocations and caches stay warm; candle's kernels
/// spread each step over the CPU cores themselves.
pub(super) struct ComputeThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl ComputeThread {
    pub(super) fn start() -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A panicking step fails that step (its caller sees the channel drop), not
                    // every later one.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a step panicked; the worker goes on");
                    }
                }
            })
            .expect("spawning the compute thread");
        ComputeThread { jobs }
    }

    /// Queues `f` on the compute thread without waiting for it.
    pub(super) fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let _ = self.jobs.send(Box::new(f));
    }

    /// Runs `f` on the compute thread; `Err` when the thread is gone (it panicked).
    pub(super) async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, &'static str> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| "the compute thread is gone")?;
        rx.await.map_err(|_| "the compute thread dropped a step")
    }
}

fn sampling_params(p: Option<&pb::SamplingParams>) -> Result<SamplingParams, String> {
    let p = p.cloned().unwrap_or_default();
    let params = SamplingParams {
        temperature: p.temperature.unwrap_or(0.0),
        top_k: usize::try_from(p.top_k.unwrap_or(0)).map_err(|_| "top_k must be >= 0".to_string())?,
        top_p: p.top_p.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        seed: p.seed.unwrap_or(0),
    };
    params.validate().map_err(|e| e.to_string())?;
    Ok(params)
}

/// The outcome of running one step on this stage.
pub(super) enum Computed {
    /// Last stage: one result per sequence.
    Results(Vec<pb::SequenceResult>),
    /// Hidden states to forward, all sequences concatenated along the token axis.
    Forward(Tensor),
}

/// Why a step failed here.
pub(super) struct StepError {
    pub(super) code: tonic::Code,
    pub(super) text: String,
}

impl From<String> for StepError {
    fn from(text: String) -> Self {
        StepError {
            code: tonic::Code::Internal,
            text: shardserve::brief(&text),
        }
    }
}

impl From<&str> for StepError {
    fn from(text: &str) -> Self {
        text.to_string().into()
    }
}

/// Runs `req` through the shard. Any failure fails the whole step; the caller frees the
/// sequences it names.
pub(super) fn compute(state: &WorkerState, loaded: &Loaded, req: &pb::StepRequest, fresh: &mut Vec<u64>) -> Result<Computed, StepError> {
    let shard = &loaded.shard;
    let spec = shard.spec().clone();
    let hidden = match (&req.hidden, spec.first) {
        (Some(t), false) => Some(shardserve::wire::decode(t, &state.device).map_err(|e| e.to_string())?),
        (None, true) => None,
        (None, false) => return Err("this stage needs hidden states and the step carries none".into()),
        (Some(_), true) => return Err("the first stage takes tokens, but the step carries hidden states".into()),
    };
    // First every check, so that a step the followers are sent is one they run as well.
    let mut work = Vec::with_capacity(req.sequences.len());
    for s in &req.sequences {
        if s.epoch != 0 && loaded.epoch != 0 && s.epoch != loaded.epoch {
            return Err(StepError {
                code: tonic::Code::Unavailable,
                text: format!("worker {} was re-planned (placement {} here, the step is for {})", state.id, loaded.epoch, s.epoch),
            });
        }
        let n = s.token_ids.len();
        if n == 0 {
            return Err(format!("sequence {}: a step must carry at least one token", s.seq_id).into());
        }
        let seq = {
            let mut seqs = state.sequences.lock().expect("sequences lock");
            match seqs.get(&s.seq_id) {
                Some(seq) => seq.clone(),
                None if s.start_pos == 0 && state.was_released(s.seq_id) => {
                    return Err(StepError {
                        code: tonic::Code::Cancelled,
                        text: format!("sequence {} was released before this step arrived", s.seq_id),
                    })
                }
                None if s.start_pos == 0 => {
                    let sampler = if spec.last {
                        Some(Sampler::new(sampling_params(s.sampling.as_ref())?))
                    } else {
                        None
                    };
                    let seq = Arc::new(Mutex::new(Sequence {
                        kv: shard.new_cache(),
                        sampler,
                        history: Vec::new(),
                    }));
                    seqs.insert(s.seq_id, seq.clone());
                    fresh.push(s.seq_id);
                    seq
                }
                None => {
                    return Err(StepError {
                        // The worker restarted or reloaded: the stage is not what the caller
                        // planned on.
                        code: tonic::Code::Unavailable,
                        text: format!("sequence {} is unknown on worker {} (its state was lost)", s.seq_id, state.id),
                    })
                }
            }
        };
        let held = seq.lock().expect("sequence lock").kv.len();
        if held != s.start_pos as usize {
            return Err(format!(
                "sequence {}: step at position {} but worker {} holds {held} tokens",
                s.seq_id, s.start_pos, state.id,
            )
            .into());
        }
        work.push((s, seq));
    }
    if let Some(group) = loaded.followers() {
        group.send_control(&Control::step(req)).map_err(|text| StepError { code: tonic::Code::Unavailable, text })?;
    }
    let mut offset = 0usize;
    let mut results = Vec::new();
    let mut outputs = Vec::new();
    for (s, seq) in work {
        let n = s.token_ids.len();
        let mut seq = seq.lock().expect("sequence lock");
        let input = match &hidden {
            Some(h) => StageInput::Hidden(h.narrow(1, offset, n).map_err(|e| format!("splitting hidden states: {e}"))?),
            None => StageInput::Tokens(&s.token_ids),
        };
        offset += n;
        let out = shard.forward(input, &mut seq.kv).map_err(|e| match &loaded.group {
            // A rank failed part-way through a step: the ranks no longer hold the same state,
            // so the group is done, and so is the stage as far as the caller can tell.
            Some(g) => StepError {
                code: tonic::Code::Unavailable,
                text: g.broken().unwrap_or_else(|| g.fail(format!("sequence {}: {e}", s.seq_id))),
            },
            None => format!("sequence {}: {e}", s.seq_id).into(),
        })?;
        match out {
            StageOutput::Hidden(h) => outputs.push(h),
            StageOutput::Logits(logits) => {
                let seq = &mut *seq;
                seq.history.extend_from_slice(&s.token_ids);
                if s.prefill_only {
                    results.push(pb::SequenceResult {
                        seq_id: s.seq_id,
                        ..Default::default()
                    });
                    continue;
                }
                let values: Vec<f32> = logits.to_vec1().map_err(|e| e.to_string())?;
                let sampler = seq.sampler.as_mut().ok_or("no sampler on the last stage")?;
                let token = sampler.sample(&values, &seq.history);
                let logprob = if s.logprobs {
                    model::log_softmax(&logits).map_err(|e| e.to_string())?[token as usize]
                } else {
                    0.0
                };
                results.push(pb::SequenceResult {
                    seq_id: s.seq_id,
                    token_id: token,
                    logprob,
                    ..Default::default()
                });
            }
        }
    }
    if spec.last {
        Ok(Computed::Results(results))
    } else {
        let refs: Vec<&Tensor> = outputs.iter().collect();
        Ok(Computed::Forward(Tensor::cat(&refs, 1).map_err(|e| e.to_string())?))
    }
}
