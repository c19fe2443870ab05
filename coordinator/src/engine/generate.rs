//! The per-request loop: steps into stage 0 (prefill in chunks, then one token a step),
//! detokenization, stop strings, eos and length, and migration to a new placement when a stage
//! dies.

use super::*;

impl Engine {
    /// Runs one request to completion, sending events to `out`. Returns when it finished,
    /// failed, or `out` closed (the client went away).
    pub async fn generate(self: &Arc<Self>, model: &Arc<ModelEntry>, req: ValidRequest, out: mpsc::Sender<GenEvent>) -> Result<(), ServeError> {
        // While the model moves off cordoned workers, wait for the new placement (bounded).
        let deadline = tokio::time::Instant::now() + self.config.migration_wait;
        while self.moving.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                _ = self.placed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // After a stage was lost, new requests wait (bounded) for the re-plan.
        let deadline = tokio::time::Instant::now() + self.config.replan_wait;
        while matches!(model.state(), ServingState::Unavailable(_))
            && model.ever_ready.load(Ordering::SeqCst)
            && tokio::time::Instant::now() < deadline
        {
            tokio::select! {
                _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                _ = self.placed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // Counted before the state is read, so a re-plan that waits for no request in flight
        // cannot start between the two.
        let in_flight = model.active.fetch_add(1, Ordering::SeqCst);
        let _active = ActiveGuard(model.clone());
        let mut placement = match model.state() {
            ServingState::Ready(p) => p,
            ServingState::Loading(why) => {
                return Err(ServeError::Loading(format!("model {} is still loading: {why}", model.name)))
            }
            ServingState::Unavailable(why) => {
                return Err(ServeError::Unavailable(format!("model {} has no healthy placement: {why}", model.name)))
            }
        };
        if in_flight >= self.config.max_concurrent_requests {
            return Err(ServeError::Exhausted(format!(
                "model {} already has {in_flight} requests in flight (max_concurrent_requests = {})",
                model.name, self.config.max_concurrent_requests
            )));
        }
        let sampling = pb::SamplingParams {
            temperature: Some(req.sampling.temperature),
            top_p: Some(req.sampling.top_p),
            top_k: Some(req.sampling.top_k as i32),
            repetition_penalty: Some(req.sampling.repetition_penalty),
            seed: Some(req.sampling.seed),
        };
        let mut decoder = IncrementalDecoder::new(&req.prompt_ids);
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut generated = 0usize;
        let mut migrations = 0usize;
        // Everything the sequence holds so far: the prompt, then each generated token. A
        // migrated request prefills all of it on its new placement and carries on.
        let mut context = req.prompt_ids.clone();
        // Long prefills go in chunks, so no step carries more than `prefill_chunk` tokens of
        // hidden states between stages.
        let chunk = self.config.prefill_chunk.max(1);
        'attempt: loop {
            let seq_id = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let _release = ReleaseGuard {
                client: placement.release.clone(),
                seq_id,
            };
            let prefill_len = context.len();
            let mut pos = 0usize;
            let mut feed = context[..prefill_len.min(chunk)].to_vec();
            debug!(model = %model.name, seq_id, prefill = prefill_len, migrations, "sequence started");
            loop {
                let step = pb::StepRequest {
                    step_id: seq_id,
                    sequences: vec![pb::SequenceStep {
                        seq_id,
                        token_ids: feed.clone(),
                        start_pos: pos as u32,
                        sampling: (pos == 0).then_some(sampling),
                        logprobs: req.logprobs,
                        prefill_only: pos + feed.len() < prefill_len,
                        epoch: placement.epoch,
                    }],
                    hidden: None,
                };
                let resp = tokio::select! {
                    r = placement.first.step(step, self.config.step_timeout) => r,
                    _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                };
                let outcome: Result<pb::SequenceResult, (tonic::Code, String)> = match resp {
                    Err(status) => Err((status.code(), status.message().to_string())),
                    Ok(resp) => match resp.results.into_iter().find(|r| r.seq_id == seq_id) {
                        None => return Err(ServeError::Internal(format!("stage answer lacks sequence {seq_id}"))),
                        Some(r) if !r.error.is_empty() => Err((tonic::Code::from_i32(r.code), r.error)),
                        Some(r) => Ok(r),
                    },
                };
                let result = match outcome {
                    Ok(r) => r,
                    Err((code, message)) => {
                        if code == tonic::Code::Unavailable {
                            self.placement_failed(&placement, &message);
                            if migrations < self.config.migration_limit {
                                migrations += 1;
                                warn!(model = %model.name, seq_id, error = %message, migrations, "a stage failed; migrating the request");
                                placement = self.next_placement(model, placement.id, &out).await.map_err(|e| match e {
                                    ServeError::Unavailable(m) => ServeError::Unavailable(format!("{message}; migration failed: {m}")),
                                    other => other,
                                })?;
                                continue 'attempt;
                            }
                        }
                        return Err(ServeError::from_stage(code, message));
                    }
                };
                pos += feed.len();
                if pos < prefill_len {
                    let end = prefill_len.min(pos + chunk);
                    feed = context[pos..end].to_vec();
                    continue;
                }
                generated += 1;
                let token = result.token_id;
                context.push(token);
                let mut event = GenEvent {
                    token_ids: vec![token],
                    logprobs: if req.logprobs { vec![result.logprob] } else { Vec::new() },
                    ..Default::default()
                };
                let tok_err = |e: shardserve::Error| ServeError::Internal(e.to_string());
                if model.eos.contains(&token) {
                    let outcome = stops.push(&decoder.flush(&model.tokenizer).map_err(tok_err)?);
                    event.text = outcome.text;
                    if outcome.stopped {
                        event.finish_reason = Some("stop");
                    } else {
                        event.text += &stops.finish();
                        event.finish_reason = Some("eos");
                    }
                } else {
                    let piece = decoder.push(&model.tokenizer, token).map_err(tok_err)?;
                    let outcome = stops.push(&piece);
                    event.text = outcome.text;
                    if outcome.stopped {
                        event.finish_reason = Some("stop");
                    } else if generated >= req.max_new_tokens {
                        let rest = decoder.flush(&model.tokenizer).map_err(tok_err)?;
                        let outcome = stops.push(&rest);
                        event.text += &outcome.text;
                        if outcome.stopped {
                            event.finish_reason = Some("stop");
                        } else {
                            event.text += &stops.finish();
                            event.finish_reason = Some("length");
                        }
                    }
                }
                let done = event.finish_reason.is_some();
                if out.send(event).await.is_err() {
                    return Err(ServeError::Cancelled("the client went away".into()));
                }
                if done {
                    debug!(model = %model.name, seq_id, generated, migrations, "request finished");
                    return Ok(());
                }
                feed = vec![token];
            }
        }
    }

    /// Waits (bounded by `migration_wait`) for a placement other than `old` to be ready.
    pub(super) async fn next_placement(&self, model: &ModelEntry, old: u64, out: &mpsc::Sender<GenEvent>) -> Result<Arc<Placement>, ServeError> {
        let deadline = tokio::time::Instant::now() + self.config.migration_wait;
        loop {
            if let ServingState::Ready(p) = model.state() {
                if p.id != old {
                    return Ok(p);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServeError::Unavailable(format!(
                    "no new placement within {:?}",
                    self.config.migration_wait
                )));
            }
            tokio::select! {
                _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

struct ActiveGuard(Arc<ModelEntry>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frees the sequence on every stage when the request ends, however it ends (a dropped
/// future included).
struct ReleaseGuard {
    client: shardserve_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>,
    seq_id: u64,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let seq_id = self.seq_id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let call = client.release(pb::ReleaseRequest { seq_ids: vec![seq_id] });
                match tokio::time::timeout(Duration::from_secs(3), call).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => debug!(seq_id, error = %e, "release failed"),
                    Err(_) => debug!(seq_id, "release timed out"),
                }
            });
        }
    }
}
