//! A step's answer taken in: each row's token accepted, detokenized and streamed to its
//! request, which ends on eos, a stop string or its length; failed rows failed or moved.

use super::*;

impl Scheduler {
    /// Takes a step's answer: tokens to their requests, failures to theirs.
    pub(super) fn on_step(&mut self, done: StepDone) {
        let StepDone { placement, sent, result } = done;
        let mut results: std::collections::HashMap<u64, pb::SequenceResult> = match result {
            Ok(resp) => resp.results.into_iter().map(|r| (r.seq_id, r)).collect(),
            Err(status) => sent
                .iter()
                .map(|&(seq_id, _)| {
                    let r = pb::SequenceResult {
                        seq_id,
                        error: status.message().to_string(),
                        code: status.code() as i32,
                        ..Default::default()
                    };
                    (seq_id, r)
                })
                .collect(),
        };
        for (seq_id, rows) in sent {
            let Some(i) = self.find(seq_id) else { continue };
            self.running[i].sending = 0;
            let Some(r) = results.remove(&seq_id) else {
                self.fail(i, ServeError::Internal(format!("the stage's answer lacks sequence {seq_id}")));
                continue;
            };
            if !r.error.is_empty() {
                self.step_failed(seq_id, tonic::Code::from_i32(r.code), r.error, &placement);
                continue;
            }
            self.running[i].fed += rows;
            let current = self.placement.as_ref().map(|p| p.id);
            let run = &mut self.running[i];
            if run.placement == current && run.term == self.term {
                // Every stage wrote these rows: the blocks they filled may be shared from now on.
                self.blocks.written(&mut run.kv, &run.context, run.fed);
            }
            if self.running[i].sub.req.embed.is_some() {
                self.embedded(i, r.hidden.as_ref(), rows);
            } else if self.running[i].fed >= self.running[i].context.len() {
                let top = r.top_ids.iter().copied().zip(r.top_logprobs.iter().copied()).collect();
                self.accept(i, r.token_id, r.logprob, top);
            }
            // A sequence whose placement was replaced while its step was out moves now; one
            // whose pools another scheduler owned meanwhile starts over on them.
            if let Some(i) = self.find(seq_id) {
                if self.running[i].placement != current {
                    let why = "the model was placed again".to_string();
                    self.displace(seq_id, Some(&placement), &why, true);
                } else if self.running[i].term != self.term {
                    self.displace(seq_id, None, "this coordinator took over scheduling the model", false);
                }
            }
        }
    }

    /// A sequence's step failed with `code` on some stage.
    pub(super) fn step_failed(&mut self, seq_id: u64, code: tonic::Code, message: String, placement: &Arc<Placement>) {
        let Some(i) = self.find(seq_id) else { return };
        if code == tonic::Code::Aborted && message.contains(shardserve::model::kv::FENCED) {
            // Another coordinator schedules the model now: this one's sequences are done.
            let why = format!("model {} is now scheduled by another coordinator: {message}", self.model().name);
            return self.fail(i, ServeError::Unavailable(why));
        }
        match code {
            // The stage serves a newer placement than this one (the leader re-planned and this
            // coordinator has not read it yet): a request with nothing generated yet simply
            // starts over on the new one.
            tonic::Code::Aborted if self.running[i].generated == 0 => {
                self.displace(seq_id, None, &message, false);
                self.engine.placement_failed(placement, &message);
                self.on_state();
            }
            tonic::Code::Unavailable | tonic::Code::FailedPrecondition | tonic::Code::Aborted => {
                // A stage is gone: the sequence moves or fails, and the placement is re-planned
                // (nothing more is sent to it, and the others on it move too).
                self.displace(seq_id, None, &message, true);
                self.engine.placement_failed(placement, &message);
                self.on_state();
            }
            _ => self.fail(i, ServeError::from_stage(code, message)),
        }
    }

    /// A generated token for `running[i]`: detokenized, checked against stop strings, eos and
    /// length, and sent to its client.
    pub(super) fn accept(&mut self, i: usize, token: u32, logprob: f32, top: Vec<(u32, f32)>) {
        let now = Instant::now();
        let labels = self.engine.metric_labels();
        let model = self.engine.model.clone();
        let r = &mut self.running[i];
        match r.last_token {
            None => metrics::histogram!("shardserve_time_to_first_token_seconds", &labels).record((now - r.sub.arrived).as_secs_f64()),
            Some(t) => metrics::histogram!("shardserve_inter_token_latency_seconds", &labels).record((now - t).as_secs_f64()),
        }
        metrics::counter!("shardserve_generated_tokens_total", &labels).increment(1);
        r.last_token = Some(now);
        r.generated += 1;
        r.context.push(token);
        let event = match next_event(&model, r, token, logprob, top) {
            Ok(e) => e,
            Err(e) => return self.fail(i, e),
        };
        let finished = event.finish_reason.is_some();
        match self.running[i].sub.out.try_send(event) {
            Ok(()) if finished => self.finish(i, Ok(())),
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let buffered = self.config().max_buffered_tokens;
                self.fail(i, ServeError::ClientTooSlow { buffered });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.fail(i, ServeError::Cancelled("the client went away".into())),
        }
    }

    /// An embedding request's rows of hidden states from its last step; once the whole prompt
    /// has gone through, its pooled vectors go to its client and it ends (its KV freed).
    pub(super) fn embedded(&mut self, i: usize, hidden: Option<&pb::Tensor>, rows: usize) {
        let dims = self.engine.model.config.hidden_size;
        let got = hidden
            .ok_or_else(|| "no hidden states".to_string())
            .and_then(|t| shardserve::wire::decode(t, &candle_core::Device::Cpu).map_err(|e| e.to_string()))
            .and_then(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string()));
        let values = match got {
            Ok(v) if v.len() == rows * dims => v,
            Ok(v) => {
                return self
                    .fail(i, ServeError::Internal(format!("the last stage gave {} hidden values for {rows} rows of {dims}", v.len())))
            }
            Err(e) => return self.fail(i, ServeError::Internal(format!("the last stage's hidden states: {e}"))),
        };
        let r = &mut self.running[i];
        r.hidden.extend_from_slice(&values);
        if r.fed < r.context.len() {
            return;
        }
        let spec = r.sub.req.embed.expect("an embedding request");
        let event = GenEvent {
            embedding: spec.pool(&r.hidden, dims),
            finish_reason: Some("stop"),
            cached_tokens: r.cached_tokens.take(),
            ..Default::default()
        };
        match r.sub.out.try_send(event) {
            Ok(()) => self.finish(i, Ok(())),
            Err(_) => self.fail(i, ServeError::Cancelled("the client went away".into())),
        }
    }

    pub(super) fn fail(&mut self, i: usize, e: ServeError) {
        self.finish(i, Err(e));
    }

    /// Ends `running[i]`: its blocks are free for others, and it is released on every stage
    /// with the next step.
    pub(super) fn finish(&mut self, i: usize, outcome: Result<(), ServeError>) {
        let mut r = self.running.remove(i);
        let current = self.placement.as_ref().map(|p| p.id);
        if r.placement.is_some() && r.placement == current && r.term == self.term {
            self.blocks.release(std::mem::take(&mut r.kv));
            self.releases.push(r.seq_id);
        }
        let labels = self.engine.metric_labels();
        metrics::histogram!("shardserve_request_duration_seconds", &labels).record(r.sub.arrived.elapsed().as_secs_f64());
        match &outcome {
            Ok(()) => {
                debug!(model = %self.engine.model.name, request_id = %r.sub.id, generated = r.generated, migrations = r.migrations, "request finished")
            }
            Err(e) => debug!(model = %self.engine.model.name, request_id = %r.sub.id, error = %e, "request ended"),
        }
        let _ = r.sub.done.send(outcome);
    }
}

/// The event for a token just generated by `r`: its text, and why it ends the request if it does.
fn next_event(model: &ModelEntry, r: &mut Running, token: u32, logprob: f32, top: Vec<(u32, f32)>) -> Result<GenEvent, ServeError> {
    let tok_err = |e: shardserve::Error| ServeError::Internal(e.to_string());
    let mut event = GenEvent {
        token_ids: vec![token],
        logprobs: if r.sub.req.logprobs { vec![logprob] } else { Vec::new() },
        top_logprobs: if r.sub.req.top_logprobs > 0 { vec![top] } else { Vec::new() },
        cached_tokens: r.cached_tokens.take(),
        ..Default::default()
    };
    if model.eos.contains(&token) && !r.sub.req.ignore_eos {
        let outcome = r.stops.push(&r.decoder.flush(&model.tokenizer).map_err(tok_err)?);
        event.text = outcome.text;
        if outcome.stopped {
            event.finish_reason = Some("stop");
        } else {
            event.text += &r.stops.finish();
            event.finish_reason = Some("eos");
        }
        return Ok(event);
    }
    let piece = r.decoder.push(&model.tokenizer, token).map_err(tok_err)?;
    let outcome = r.stops.push(&piece);
    event.text = outcome.text;
    if outcome.stopped {
        event.finish_reason = Some("stop");
    } else if r.generated >= r.sub.req.max_new_tokens {
        let rest = r.decoder.flush(&model.tokenizer).map_err(tok_err)?;
        let outcome = r.stops.push(&rest);
        event.text += &outcome.text;
        if outcome.stopped {
            event.finish_reason = Some("stop");
        } else {
            event.text += &r.stops.finish();
            event.finish_reason = Some("length");
        }
    }
    Ok(event)
}
