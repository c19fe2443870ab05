//! Running steps: the worker's compute thread (`thread.rs`), and one step through the shard —
//! the step's releases first, then a check of every sequence (one that fails is answered with
//! its own error and left out; the others run), then one batched forward pass over the rest,
//! then sampling on the last stage.

mod error;
mod thread;

use super::{Loaded, SeqState, WorkerState};
use crate::group::Control;
use candle_core::Tensor;
use error::StepError;
use shardserve::guide::{GuideError, Mask};
use shardserve::model::{self, BatchInput, BatchOutput, SeqStep};
use shardserve::sampling::{Sampler, SamplingParams};
use shardserve_proto::v1 as pb;
use std::collections::HashMap;
pub(super) use thread::ComputeThread;

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

/// What running a step here produced.
#[derive(Debug, Default)]
pub(super) struct Computed {
    /// Results settled here: every sequence that failed here, and on the last stage every
    /// other one (a sampled token, or an empty result for a non-final prefill chunk).
    pub(super) results: Vec<pb::SequenceResult>,
    /// The step for the next stage: the sequences that ran here with their hidden states, and
    /// what it must release. `None` on the last stage.
    pub(super) forward: Option<pb::StepRequest>,
    /// Sequences first seen here in this step.
    pub(super) fresh: Vec<u64>,
}

/// Runs `req` through the shard.
pub(super) fn compute(state: &WorkerState, loaded: &Loaded, req: pb::StepRequest) -> Computed {
    let shard = &loaded.shard;
    let spec = shard.spec().clone();
    let mut kv = loaded.kv.lock().expect("kv lock");
    let mut out = Computed::default();
    // One scheduler owns the pool: a newer one takes it over (everything the older one held
    // is dropped), and the older one's steps are refused from then on.
    if req.owner != 0 && req.owner != kv.owner {
        if req.owner < kv.owner {
            let e = StepError::Fenced { worker: state.id.clone(), here: kv.owner, step: req.owner };
            out.results.extend(req.sequences.iter().map(|s| e.result(s.seq_id)));
            return out;
        }
        if kv.owner != 0 || kv.pool.sequences() > 0 {
            tracing::info!(worker = %state.id, term = req.owner, previous = kv.owner, dropped = kv.pool.sequences(), "a new scheduler owns the KV pool");
        }
        kv.pool.reset();
        kv.seqs.clear();
        kv.owner = req.owner;
    }
    // Releases first: their blocks are free for this step's sequences.
    let mut release = req.release.clone();
    state.forget(&mut kv, &req.release);
    let fail_all = |e: StepError, out: &mut Computed| {
        out.results.extend(req.sequences.iter().map(|s| e.result(s.seq_id)));
    };
    if let Some(s) = req.sequences.iter().find(|s| s.epoch != 0 && loaded.epoch != 0 && s.epoch != loaded.epoch) {
        fail_all(StepError::Replanned { worker: state.id.clone(), here: loaded.epoch, step: s.epoch }, &mut out);
        out.forward = forward_release(loaded, release);
        loaded.publish(&kv);
        return out;
    }
    let hidden = match (&req.hidden, spec.first) {
        (_, _) if req.sequences.is_empty() => None,
        (Some(t), false) => match shardserve::wire::decode(t, &state.device) {
            Ok(h) => Some(h),
            Err(e) => {
                fail_all(StepError::Malformed { worker: state.id.clone(), why: e.to_string() }, &mut out);
                None
            }
        },
        (None, true) => None,
        (None, false) => {
            let why = "this stage needs hidden states and the step carries none".to_string();
            fail_all(StepError::Malformed { worker: state.id.clone(), why }, &mut out);
            None
        }
        (Some(_), true) => {
            let why = "the first stage takes tokens, but the step carries hidden states".to_string();
            fail_all(StepError::Malformed { worker: state.id.clone(), why }, &mut out);
            None
        }
    };
    let rows: usize = req.sequences.iter().map(|s| s.token_ids.len()).sum();
    if let (Some(h), true) = (&hidden, out.results.is_empty()) {
        // The whole shape, not only the rows: the forward pass would refuse any other, and its
        // refusal reads as this stage failing (INTERNAL; a broken tensor-parallel group).
        let hidden_size = shard.config().hidden_size;
        if h.dims() != [rows, hidden_size] {
            let why = format!("hidden states of shape {:?} do not fit {rows} rows of hidden_size {hidden_size}", h.dims());
            fail_all(StepError::Malformed { worker: state.id.clone(), why }, &mut out);
        }
    }
    if out.results.is_empty() {
        // A sequence twice in one step has no one place in the KV cache, and its second
        // occurrence failing a check would free the first after it passed.
        let mut seen = std::collections::HashSet::with_capacity(req.sequences.len());
        if let Some(s) = req.sequences.iter().find(|s| !seen.insert(s.seq_id)) {
            let why = format!("sequence {} appears twice in the step", s.seq_id);
            fail_all(StepError::Malformed { worker: state.id.clone(), why }, &mut out);
        }
    }
    if !out.results.is_empty() {
        // The step as a whole is unusable: its sequences are done for here and downstream.
        release.extend(req.sequences.iter().map(|s| s.seq_id));
        state.forget(&mut kv, &release);
        out.forward = forward_release(loaded, release);
        loaded.publish(&kv);
        return out;
    }
    // Every check before anything runs, so that the step the followers are sent is one they
    // run as well; a sequence that fails a check is answered alone.
    let mut ok: Vec<(usize, &pb::SequenceStep, usize)> = Vec::with_capacity(req.sequences.len());
    let mut offset = 0;
    for s in &req.sequences {
        let (first_row, n) = (offset, s.token_ids.len());
        offset += n;
        let checked = check(state, loaded, &mut kv, s, &mut release);
        match checked {
            Ok(fresh) => {
                if fresh {
                    out.fresh.push(s.seq_id);
                }
                ok.push((first_row, s, n));
            }
            Err(e) => {
                if !matches!(e, StepError::Released(_)) {
                    tracing::debug!(worker = %state.id, seq = s.seq_id, error = %e, "sequence refused");
                }
                out.results.push(e.result(s.seq_id));
                release.push(s.seq_id);
            }
        }
    }
    state.forget(&mut kv, &release);
    let step = pb::StepRequest {
        step_id: req.step_id,
        sequences: ok.iter().map(|(_, s, _)| (*s).clone()).collect(),
        hidden: None,
        release: release.clone(),
        owner: req.owner,
    };
    let hidden = match (hidden, ok.len() == req.sequences.len()) {
        (Some(h), false) if !ok.is_empty() => {
            let idx: Vec<u32> = ok.iter().flat_map(|(r, _, n)| (*r as u32)..(*r + *n) as u32).collect();
            match Tensor::new(idx, h.device()).and_then(|i| h.index_select(&i, 0)) {
                Ok(h) => Some(h),
                Err(e) => {
                    let e = StepError::Malformed { worker: state.id.clone(), why: format!("selecting hidden rows: {e}") };
                    return abandon(state, loaded, &mut kv, step, e, out);
                }
            }
        }
        (h, _) => h,
    };
    if let Some(group) = loaded.followers() {
        // The followers run exactly this: the sequences that passed, their rows, the releases.
        let mut mirrored = step.clone();
        mirrored.hidden = match &hidden {
            Some(h) => match shardserve::wire::encode(h) {
                Ok(w) => Some(w),
                Err(e) => {
                    let e = StepError::Malformed { worker: state.id.clone(), why: e.to_string() };
                    return abandon(state, loaded, &mut kv, step, e, out);
                }
            },
            None => None,
        };
        if let Err(why) = group.send_control(&Control::step(&mirrored)) {
            return abandon(state, loaded, &mut kv, step, StepError::Group(why), out);
        }
    }
    if ok.is_empty() {
        out.forward = forward_release(loaded, release);
        loaded.publish(&kv);
        return out;
    }
    let seqs: Vec<SeqStep> = ok
        .iter()
        .map(|(_, s, n)| SeqStep {
            id: s.seq_id,
            tokens: *n,
            logits: spec.last && !s.prefill_only && !s.embed,
            embed: spec.last && s.embed,
        })
        .collect();
    let tokens: Vec<u32>;
    let input = match hidden {
        Some(h) => BatchInput::Hidden(h),
        None => {
            tokens = ok.iter().flat_map(|(_, s, _)| s.token_ids.iter().copied()).collect();
            BatchInput::Tokens(&tokens)
        }
    };
    let kv = &mut *kv;
    // The masks of the constrained sequences that sample in this step are computed beside the
    // forward pass (on a thread of their own), not after it.
    let guided: Vec<u64> = ok
        .iter()
        .filter(|(_, s, _)| spec.last && !s.prefill_only && !s.embed)
        .map(|(_, s, _)| s.seq_id)
        .filter(|id| kv.seqs.get(id).is_some_and(|q| q.guide.is_some()))
        .collect();
    let (pool, states) = (&mut kv.pool, &mut kv.seqs);
    let (computed, mut masks) = std::thread::scope(|scope| {
        let masks = (!guided.is_empty()).then(|| scope.spawn(|| masks_of(states, &guided)));
        let computed = shard.forward_batch(pool, &seqs, input);
        let masks = masks.map(|h| h.join().unwrap_or_else(|_| HashMap::new())).unwrap_or_default();
        (computed, masks)
    });
    let output = match computed {
        Ok(o) => {
            // Written on this stage: the blocks the step filled get their content addresses.
            for (_, s, _) in &ok {
                kv.pool.record(s.seq_id, &s.token_ids);
            }
            o
        }
        Err(e) => {
            let e = match &loaded.group {
                // A rank failed part-way through a step: the ranks no longer hold the same
                // state, so the group is done, and so is the stage as far as the caller can tell.
                Some(g) => StepError::Group(g.broken().unwrap_or_else(|| g.fail(format!("worker {}: {e}", state.id)))),
                None => StepError::Forward { worker: state.id.clone(), source: e },
            };
            return abandon(state, loaded, kv, step, e, out);
        }
    };
    match output {
        // Followers answer nothing: their leader forwards the stage's hidden states.
        BatchOutput::Hidden(_) if !loaded.tp.is_leader() => {}
        BatchOutput::Hidden(h) => match shardserve::wire::encode(&h) {
            Ok(w) => {
                out.forward = Some(pb::StepRequest { hidden: Some(w), ..step });
            }
            Err(e) => {
                let e = StepError::Malformed { worker: state.id.clone(), why: e.to_string() };
                return abandon(state, loaded, kv, step, e, out);
            }
        },
        BatchOutput::Logits(_) | BatchOutput::Embedded { .. } => {
            let (logits, hidden) = match output {
                BatchOutput::Embedded { logits, hidden } => (logits, Some(hidden)),
                BatchOutput::Logits(logits) => (logits, None),
                BatchOutput::Hidden(_) => unreachable!("matched above"),
            };
            let mut row = 0;
            let mut hidden_row = 0;
            for (_, s, n) in &ok {
                let seq = kv.seqs.get_mut(&s.seq_id).expect("checked above");
                seq.history.extend_from_slice(&s.token_ids);
                if spec.last && s.embed {
                    // An embedding: this step's rows of final-norm hidden states, no sample.
                    let rows = hidden.as_ref().map(|h| {
                        h.narrow(0, hidden_row, *n)
                            .and_then(|r| shardserve::wire::encode(&r).map_err(|e| candle_core::Error::Msg(e.to_string())))
                    });
                    hidden_row += n;
                    match rows {
                        Some(Ok(w)) => out.results.push(pb::SequenceResult { seq_id: s.seq_id, hidden: Some(w), ..Default::default() }),
                        Some(Err(e)) => {
                            let e = StepError::Forward { worker: state.id.clone(), source: shardserve::Error::Forward(e) };
                            out.results.push(e.result(s.seq_id));
                        }
                        None => {
                            let e = StepError::Invalid { seq: s.seq_id, why: "no hidden states for an embed sequence".into() };
                            out.results.push(e.result(s.seq_id));
                        }
                    }
                    continue;
                }
                if !spec.last || s.prefill_only {
                    out.results.push(pb::SequenceResult { seq_id: s.seq_id, ..Default::default() });
                    continue;
                }
                let sampled = logits.get(row).and_then(|l| Ok((l.to_vec1::<f32>()?, l)));
                row += 1;
                let (values, l) = match sampled {
                    Ok(v) => v,
                    Err(e) => {
                        let e = StepError::Forward { worker: state.id.clone(), source: shardserve::Error::Forward(e) };
                        out.results.push(e.result(s.seq_id));
                        continue;
                    }
                };
                let Some(sampler) = seq.sampler.as_mut() else {
                    let e = StepError::Invalid { seq: s.seq_id, why: "no sampler on the last stage".into() };
                    out.results.push(e.result(s.seq_id));
                    continue;
                };
                let mut values = values;
                let mask = match (&seq.guide, masks.remove(&s.seq_id)) {
                    (None, _) => None,
                    (Some(_), Some(Ok(mask))) => Some(mask),
                    (Some(_), Some(Err(e))) => {
                        out.results.push(StepError::Grammar { worker: state.id.clone(), seq: s.seq_id, source: e }.result(s.seq_id));
                        continue;
                    }
                    (Some(_), None) => {
                        let e = GuideError::Failed("computing the mask panicked".into());
                        out.results.push(StepError::Grammar { worker: state.id.clone(), seq: s.seq_id, source: e }.result(s.seq_id));
                        continue;
                    }
                };
                let unsuppressed = mask.as_ref().filter(|_| !s.suppress.is_empty()).map(|_| values.clone());
                for t in &s.suppress {
                    if let Some(v) = values.get_mut(*t as usize) {
                        *v = f32::NEG_INFINITY;
                    }
                }
                if let Some(mask) = &mask {
                    mask.apply(&mut values);
                    if let Some(mut unsuppressed) = unsuppressed.filter(|_| values.iter().all(|v| *v == f32::NEG_INFINITY)) {
                        // The grammar is complete before min_tokens: it allows only the end,
                        // which min_tokens forbids. The grammar wins.
                        mask.apply(&mut unsuppressed);
                        values = unsuppressed;
                    }
                }
                let token = sampler.sample(&values, &seq.history);
                if let Some(guide) = seq.guide.as_mut() {
                    if let Err(e) = guide.advance(token) {
                        out.results.push(StepError::Grammar { worker: state.id.clone(), seq: s.seq_id, source: e }.result(s.seq_id));
                        continue;
                    }
                }
                let mut result = pb::SequenceResult { seq_id: s.seq_id, token_id: token, ..Default::default() };
                if s.logprobs || s.top_logprobs > 0 {
                    // The model's own distribution (before any suppression or sampling filter).
                    let lp = model::log_softmax(&l).unwrap_or_default();
                    result.logprob = lp.get(token as usize).copied().unwrap_or(f32::NAN);
                    let (ids, top) = model::top_k(&lp, s.top_logprobs as usize);
                    result.top_ids = ids;
                    result.top_logprobs = top;
                }
                out.results.push(result);
            }
        }
    }
    loaded.publish(kv);
    out
}

/// The next-token masks of the sequences `ids`, which all have grammars.
fn masks_of(states: &mut HashMap<u64, SeqState>, ids: &[u64]) -> HashMap<u64, Result<Mask, GuideError>> {
    ids.iter()
        .filter_map(|id| {
            let guide = states.get_mut(id)?.guide.as_mut()?;
            let started = std::time::Instant::now();
            let mask = guide.mask();
            metrics::histogram!("shardserve_grammar_mask_seconds").record(started.elapsed().as_secs_f64());
            Some((*id, mask))
        })
        .collect()
}

/// Checks one sequence of a step and gives it the blocks its tokens need: whether it is new
/// here. A sequence new here starts empty, or from the cached blocks its step names (each
/// checked against the prefix it is said to hold).
/// Sequences dropped to make room go to `gone`.
fn check(
    state: &WorkerState,
    loaded: &Loaded,
    kv: &mut super::StageKv,
    s: &pb::SequenceStep,
    gone: &mut Vec<u64>,
) -> Result<bool, StepError> {
    let shard = &loaded.shard;
    let n = s.token_ids.len();
    let invalid = |why: String| StepError::Invalid { seq: s.seq_id, why };
    if n == 0 {
        return Err(invalid("a step must carry at least one token".into()));
    }
    if shard.spec().first {
        shard.check_tokens(&s.token_ids).map_err(|e| invalid(e.to_string()))?;
    }
    shard.check_positions(s.start_pos as usize, n).map_err(|e| invalid(e.to_string()))?;
    let cached = s.cached_ids.len();
    let fresh = match kv.pool.len_of(s.seq_id) {
        Some(held) if held != s.start_pos as usize => {
            return Err(invalid(format!("step at position {} but worker {} holds {held} tokens", s.start_pos, state.id)));
        }
        Some(_) if !s.cached_blocks.is_empty() => return Err(invalid("cached blocks on a step that is not the sequence's first".into())),
        Some(_) => false,
        None if s.start_pos as usize == cached && state.was_released(s.seq_id) => return Err(StepError::Released(s.seq_id)),
        None if s.start_pos as usize == cached => true,
        None if s.start_pos == 0 => return Err(invalid(format!("{cached} cached tokens, but the step starts at position 0"))),
        None => return Err(StepError::Lost { seq: s.seq_id, worker: state.id.clone() }),
    };
    if fresh {
        let root = match s.prefix_root.as_slice() {
            [] => None,
            b => Some(
                shardserve::prefix::from_bytes(b)
                    .ok_or_else(|| invalid(format!("prefix_root has {} bytes, not {}", b.len(), shardserve::prefix::HASH_LEN)))?,
            ),
        };
        let sampler =
            if shard.spec().has_head() { Some(Sampler::new(sampling_params(s.sampling.as_ref()).map_err(invalid)?)) } else { None };
        kv.pool.insert_cached(s.seq_id, root, &s.cached_blocks, &s.cached_ids).map_err(|e| invalid(format!("worker {}: {e}", state.id)))?;
        // The grammar lives on the rank that samples; the other ranks of its group sample
        // nothing anyone reads.
        let guide = match &s.grammar {
            Some(g) if sampler.is_some() && loaded.tp.is_leader() => {
                let guide = loaded.grammars(&g.eos).and_then(|grammars| grammars.guide_json(&g.llguidance)).and_then(|mut guide| {
                    g.generated.iter().try_for_each(|t| guide.advance(*t))?;
                    Ok(guide)
                });
                Some(guide.map_err(|e| invalid(format!("worker {}: {e}", state.id)))?)
            }
            _ => None,
        };
        let history = if sampler.is_some() { s.cached_ids.clone() } else { Vec::new() };
        kv.seqs.insert(s.seq_id, SeqState { sampler, guide, history, request_id: s.request_id.clone() });
        if !s.request_id.is_empty() {
            tracing::debug!(worker = %state.id, request_id = %s.request_id, seq = s.seq_id, cached, "sequence started");
        }
    }
    let dropped = kv.pool.grow_with(s.seq_id, n, &s.blocks).map_err(|e| match e {
        source @ shardserve::Error::KvFull { .. } => StepError::KvFull { worker: state.id.clone(), seq: s.seq_id, source },
        e => invalid(format!("worker {}: {e}", state.id)),
    })?;
    if !dropped.is_empty() {
        // Sequences that took blocks themselves (their steps name none): the scheduler that
        // owns the pool needs those blocks, and they end here and on the later stages.
        tracing::warn!(worker = %state.id, sequences = ?dropped, "sequences dropped: the scheduler named the blocks they held");
        gone.extend(dropped);
    }
    Ok(fresh)
}

/// Fails every sequence of `step` with `e`, frees them, and forwards the releases.
fn abandon(
    state: &WorkerState,
    loaded: &Loaded,
    kv: &mut super::StageKv,
    step: pb::StepRequest,
    e: StepError,
    mut out: Computed,
) -> Computed {
    tracing::warn!(worker = %state.id, error = %e, sequences = step.sequences.len(), "step failed");
    let mut release = step.release;
    for s in &step.sequences {
        out.results.push(e.result(s.seq_id));
        release.push(s.seq_id);
    }
    state.forget(kv, &release);
    out.forward = forward_release(loaded, release);
    loaded.publish(kv);
    out
}

/// A step that carries only releases to the next stage (none on the last stage).
fn forward_release(loaded: &Loaded, release: Vec<u64>) -> Option<pb::StepRequest> {
    (!loaded.shard.spec().last).then_some(pb::StepRequest { release, ..Default::default() })
}

/// Entry points for the fuzz targets in `fuzz/`: a step through exactly the checks and forward
/// pass a Step stream runs it through, but on the caller's thread, so that a panic reaches the
/// fuzzer instead of being caught (and logged) by the compute thread.
impl WorkerState {
    /// Runs `req` on the shard loaded here as a Step stream would, without sending anything
    /// on: the results settled here, and the step for the next stage (`None` on the last).
    pub fn run_step(&self, req: pb::StepRequest) -> Result<(Vec<pb::SequenceResult>, Option<pb::StepRequest>), tonic::Status> {
        let loaded = self.current()?;
        let out = compute(self, &loaded, req);
        Ok((out.results, out.forward))
    }

    /// Frees every sequence and forgets every release, so that the next step finds the shard
    /// as it was just after loading (each fuzz input starts from the same state).
    pub fn clear_sequences(&self) {
        if let Ok(loaded) = self.current() {
            let mut kv = loaded.kv.lock().expect("kv lock");
            kv.pool.clear();
            kv.seqs.clear();
            loaded.publish(&kv);
        }
        let mut released = self.released.lock().expect("released lock");
        released.0.clear();
        released.1.clear();
    }
}
