//! The follower's half of the relay: the leader coordinator's record, the channels to it, and
//! handing a request to it (see `crate::relay` for the leader's half).

use super::{Engine, GenEvent, ModelEntry, RequestHandle, ValidRequest};
use crate::error::ServeError;
use shardserve_proto::v1 as pb;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

/// The metadata key a request's id travels under (from the client, if it sends one; back to it
/// on the response; to the workers with its sequence; to the leader with a relayed request).
pub const REQUEST_ID: &str = "x-request-id";

/// What a coordinator publishes as the value of the leader election: where the others reach
/// it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderRecord {
    /// Its gRPC address (`host:port`), as the other coordinators reach it.
    pub address: String,
    /// Whether that port speaks TLS.
    pub tls: bool,
    pub pid: u32,
}

/// A caller's API key, passed on to the leader with the request it made. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(pub String);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

/// How this coordinator is reached by, and reaches, the other coordinators of its cluster.
pub struct Peers {
    /// What it publishes when it leads.
    pub own: LeaderRecord,
    /// The TLS client configuration for a leader whose port speaks TLS (`--peer-ca`, else the
    /// cluster CA); `None`: such a leader cannot be reached.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The channel to the current leader, made on first use.
    channel: Mutex<Option<(String, Channel)>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("own", &self.own).field("tls", &self.tls.is_some()).finish()
    }
}

impl Peers {
    /// This coordinator at `address` (its port speaks TLS when `tls`), reaching TLS leaders with
    /// `client` when given.
    pub fn new(address: String, tls: bool, client: Option<Arc<rustls::ClientConfig>>) -> Arc<Self> {
        Arc::new(Peers { own: LeaderRecord { address, tls, pid: std::process::id() }, tls: client, channel: Mutex::new(None) })
    }

    /// The election value this coordinator campaigns with.
    pub fn record(&self) -> String {
        serde_json::to_string(&self.own).expect("a leader record serializes")
    }

    /// The channel to `leader` (the same one while the leader stays).
    fn channel(&self, leader: &LeaderRecord) -> Result<Channel, ServeError> {
        let mut cached = self.channel.lock().expect("relay channel lock");
        if let Some((address, channel)) = cached.as_ref() {
            if *address == leader.address {
                return Ok(channel.clone());
            }
        }
        let unreachable =
            |why: String| ServeError::Unavailable(format!("cannot reach the leader coordinator at {}: {why}", leader.address));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", leader.address))
            .map_err(|e| unreachable(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = if leader.tls {
            let cfg = self.tls.clone().ok_or_else(|| {
                unreachable("its port speaks TLS; give this coordinator the CA that signed its certificate (--peer-ca)".into())
            })?;
            endpoint.connect_with_connector_lazy(shardserve::tls::connector(cfg))
        } else {
            endpoint.connect_lazy()
        };
        *cached = Some((leader.address.clone(), channel.clone()));
        Ok(channel)
    }
}

/// The request as the leader takes it.
fn to_relay(model: &str, id: &str, r: &ValidRequest) -> pb::RelayRequest {
    let s = &r.sampling;
    pb::RelayRequest {
        model: model.to_string(),
        request_id: id.to_string(),
        prompt_ids: r.prompt_ids.clone(),
        max_new_tokens: r.max_new_tokens as u32,
        sampling: Some(pb::SamplingParams {
            temperature: Some(s.temperature),
            top_p: Some(s.top_p),
            top_k: Some(s.top_k as i32),
            repetition_penalty: Some(s.repetition_penalty),
            seed: Some(s.seed),
        }),
        stop: r.stop.clone(),
        logprobs: r.logprobs,
        ignore_eos: r.ignore_eos,
        top_logprobs: r.top_logprobs as u32,
        min_tokens: r.min_tokens as u32,
        cache_salt: r.cache_salt.clone(),
        skip_prefix_cache: r.skip_prefix_cache,
        embed_pooling: r.embed.map(|e| e.pooling.name().to_string()).unwrap_or_default(),
        embed_normalize: r.embed.is_some_and(|e| e.normalize),
        grammar: r.grammar.as_deref().unwrap_or_default().to_string(),
    }
}

/// An engine event as the relay carries it.
pub(crate) fn to_event(ev: GenEvent) -> pb::RelayEvent {
    pb::RelayEvent {
        text: ev.text,
        token_ids: ev.token_ids,
        logprobs: ev.logprobs,
        finish_reason: ev.finish_reason.unwrap_or_default().to_string(),
        top_logprobs: ev
            .top_logprobs
            .iter()
            .map(|t| pb::TopLogprobs { token_ids: t.iter().map(|x| x.0).collect(), logprobs: t.iter().map(|x| x.1).collect() })
            .collect(),
        embedding: ev.embedding.into_iter().map(|v| pb::Embedding { rows: 1, dims: v.len() as u32, values: v }).collect(),
        cached_tokens: ev.cached_tokens.map(|c| c as u32),
    }
}

/// A relayed event back as an engine event.
fn from_event(ev: pb::RelayEvent) -> GenEvent {
    GenEvent {
        text: ev.text,
        token_ids: ev.token_ids,
        logprobs: ev.logprobs,
        finish_reason: finish_reason(&ev.finish_reason),
        embedding: ev.embedding.into_iter().map(|e| e.values).collect(),
        top_logprobs: ev.top_logprobs.into_iter().map(|t| t.token_ids.into_iter().zip(t.logprobs).collect()).collect(),
        cached_tokens: ev.cached_tokens.map(|c| c as usize),
    }
}

/// The engine's finish reasons, by name.
fn finish_reason(r: &str) -> Option<&'static str> {
    match r {
        "" => None,
        "length" => Some("length"),
        "eos" => Some("eos"),
        _ => Some("stop"),
    }
}

/// What a status from the leader stands for.
fn from_status(leader: &str, s: &tonic::Status) -> ServeError {
    use tonic::Code;
    let m = s.message().to_string();
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => ServeError::InvalidArgument(m),
        Code::NotFound => ServeError::NotFound(m),
        Code::FailedPrecondition => ServeError::Loading(m),
        Code::ResourceExhausted => ServeError::Exhausted(m),
        Code::DeadlineExceeded => ServeError::DeadlineExceeded(m),
        Code::Cancelled => ServeError::Cancelled(m),
        Code::Unavailable | Code::Unknown | Code::Aborted => ServeError::Unavailable(format!("the leader coordinator at {leader}: {m}")),
        Code::Unauthenticated | Code::PermissionDenied => {
            ServeError::Unavailable(format!("the leader coordinator at {leader} refused the request's credentials: {m}"))
        }
        _ => ServeError::Internal(format!("the leader coordinator at {leader}: {m}")),
    }
}

/// Hands `req` (validated by this coordinator) to `leader`, and its events back through a
/// handle like a local request's: dropping it cancels the request on the leader. Fails as a
/// local submission would when the leader refuses it before it starts.
pub(crate) async fn forward(
    engine: &Arc<Engine>,
    model: &Arc<ModelEntry>,
    req: ValidRequest,
    id: String,
    leader: LeaderRecord,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<RequestHandle, ServeError> {
    let peers = engine.config().peers.clone().ok_or_else(|| ServeError::Internal("this coordinator cannot reach its peers".into()))?;
    let channel = peers.channel(&leader)?;
    let mut client = pb::relay_client::RelayClient::new(channel);
    let mut call = tonic::Request::new(to_relay(&model.name, &id, &req));
    if let Some(c) = &req.credential {
        let value =
            format!("Bearer {}", c.0).parse().map_err(|_| ServeError::InvalidArgument("the API key is not a valid header value".into()))?;
        call.metadata_mut().insert("authorization", value);
    }
    if let Ok(v) = id.parse() {
        call.metadata_mut().insert(REQUEST_ID, v);
    }
    // The leader answers once the request is queued (or refused); it waits for a re-plan at
    // most as long as this coordinator would.
    let within = engine.config().replan_wait + engine.config().migration_wait + Duration::from_secs(10);
    let mut stream = match tokio::time::timeout(within, client.submit(call)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return Err(from_status(&leader.address, &s)),
        Err(_) => {
            return Err(ServeError::Unavailable(format!(
                "the leader coordinator at {} did not take the request within {within:?}",
                leader.address
            )))
        }
    };
    let (out, events) = mpsc::channel(engine.config().max_buffered_tokens.max(1));
    let (done, done_rx) = oneshot::channel();
    let (entry, address) = (model.clone(), leader.address.clone());
    tokio::spawn(async move {
        let _slot = slot;
        let mut first = true;
        let outcome = loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                // The client went away: dropping the stream cancels the request on the leader.
                _ = out.closed() => return,
            };
            match msg {
                Ok(Some(ev)) => {
                    let ev = from_event(ev);
                    if first {
                        first = false;
                        if let Some(hit) = ev.cached_tokens.filter(|_| !req.skip_prefix_cache && req.embed.is_none()) {
                            entry.count_prefix_lookup(req.prompt_ids.len(), hit);
                        }
                    }
                    if out.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break Ok(()),
                Err(s) => break Err(from_status(&address, &s)),
            }
        };
        let _ = done.send(outcome);
    });
    Ok(RequestHandle::new(id, events, done_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cross_the_relay_unchanged() {
        let ev = GenEvent {
            text: "hé".into(),
            token_ids: vec![3, 4],
            logprobs: vec![-0.5, -1.5],
            finish_reason: Some("eos"),
            embedding: vec![vec![0.25, 1.0]],
            top_logprobs: vec![vec![(3, -0.5), (9, -2.0)]],
            cached_tokens: Some(32),
        };
        let back = from_event(to_event(ev.clone()));
        assert_eq!(format!("{back:?}"), format!("{ev:?}"));
        let none = from_event(to_event(GenEvent::default()));
        assert_eq!((none.finish_reason, none.cached_tokens), (None, None));
    }

    #[test]
    fn statuses_from_the_leader_keep_their_meaning() {
        let e = from_status("l:1", &tonic::Status::resource_exhausted("the queue of model m is full"));
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("queue of model m is full"));
        let e = from_status("l:1", &tonic::Status::unavailable("gone"));
        assert_eq!((e.code(), e.to_string().contains("leader coordinator at l:1")), (tonic::Code::Unavailable, true));
        assert_eq!(from_status("l", &tonic::Status::invalid_argument("x")).code(), tonic::Code::InvalidArgument);
        assert_eq!(from_status("l", &tonic::Status::unauthenticated("no key")).code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_leader_record_round_trips_and_a_credential_is_never_printed() {
        let r = LeaderRecord { address: "coordinator-1:50051".into(), tls: true, pid: 7 };
        assert_eq!(serde_json::from_str::<LeaderRecord>(&serde_json::to_string(&r).unwrap()).unwrap(), r);
        assert_eq!(format!("{:?}", Credential("secret".into())), "Credential(..)");
    }
}
