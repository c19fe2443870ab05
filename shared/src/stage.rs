//! A client of a stage's `Worker.Step` stream: one long-lived bidirectional stream per hop,
//! many steps in flight on it, each answer matched to its step. A broken stream fails every
//! step in flight at once, naming the stage, and the next step reconnects.

use crate::tls::ClusterTls;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::worker_client::WorkerClient;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// The largest message a stage sends or accepts: hidden states of the longest prefill the
/// biggest supported config allows fit well inside it.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<pb::StepResponse, Status>>>>>;

/// Steps (with their hidden states) queued for one stream before senders wait: the channel
/// that carries activations is bounded.
const STEPS_QUEUED: usize = 8;

#[derive(Clone)]
struct Conn {
    tx: mpsc::Sender<pb::StepRequest>,
    pending: Pending,
    broken: Arc<std::sync::atomic::AtomicBool>,
}

/// Steps sent to one stage.
pub struct StageClient {
    name: String,
    address: String,
    tls: Option<Arc<ClusterTls>>,
    /// The open stream, if any. Held only to read or swap it, never across a connect.
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
}

/// A step sent on a stream, waiting for its answer.
pub struct PendingStep {
    rx: oneshot::Receiver<Result<pb::StepResponse, Status>>,
    id: u64,
    caller_id: u64,
    conn: Conn,
    describe: String,
}

impl PendingStep {
    /// Waits (bounded by `timeout`) for the answer.
    pub async fn answer(self, timeout: Duration) -> Result<pb::StepResponse, Status> {
        match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(Ok(mut resp))) => {
                resp.step_id = self.caller_id;
                Ok(resp)
            }
            Ok(Ok(Err(status))) => Err(status),
            Ok(Err(_)) => Err(Status::unavailable(format!("{}: the step stream closed", self.describe))),
            Err(_) => {
                self.conn.pending.lock().expect("pending lock").remove(&self.id);
                Err(Status::deadline_exceeded(format!("{} did not answer a step within {timeout:?}", self.describe)))
            }
        }
    }
}

/// The worker's endpoint with the settings every hop uses: no Nagle delay, HTTP/2 keep-alive
/// so a silent peer is noticed, bounded connect time.
fn endpoint(address: &str) -> Result<Endpoint, Status> {
    let url = crate::tls::plain_url(address);
    Ok(Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("bad worker address {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

fn cluster_client(tls: &ClusterTls) -> Result<Arc<rustls::ClientConfig>, Status> {
    tls.client_config(&[b"h2"]).map_err(|e| Status::internal(e.to_string()))
}

fn client(channel: Channel) -> WorkerClient<Channel> {
    WorkerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Opens a channel to a worker: mutual TLS with the cluster's certificates when `tls` is
/// given, plaintext otherwise.
pub async fn connect(address: &str, tls: Option<&ClusterTls>) -> Result<WorkerClient<Channel>, Status> {
    let endpoint = endpoint(address)?;
    let channel = match tls {
        Some(t) => endpoint.connect_with_connector(crate::tls::connector(cluster_client(t)?)).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| Status::unavailable(format!("cannot reach worker at {address}: {}", crate::tls::error_chain(&e))))?;
    Ok(client(channel))
}

/// A client that connects on first use, for occasional calls such as `Release`.
pub fn lazy_client(address: &str, tls: Option<&ClusterTls>) -> Result<WorkerClient<Channel>, Status> {
    let endpoint = endpoint(address)?;
    let channel = match tls {
        Some(t) => endpoint.connect_with_connector_lazy(crate::tls::connector(cluster_client(t)?)),
        None => endpoint.connect_lazy(),
    };
    Ok(client(channel))
}

impl StageClient {
    /// A client for the stage served at `address`, over mutual TLS when `tls` is given;
    /// `name` (e.g. the worker id) appears in errors.
    pub fn new(name: impl Into<String>, address: impl Into<String>, tls: Option<Arc<ClusterTls>>) -> Self {
        StageClient { name: name.into(), address: address.into(), tls, conn: Mutex::new(None), next_id: AtomicU64::new(1) }
    }

    /// The stage's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The cluster identity its links present, if any.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_deref()
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self) -> Result<Conn, Status> {
        let mut client = connect(&self.address, self.tls.as_deref()).await.map_err(|e| self.unavailable(e.message()))?;
        let (tx, rx) = mpsc::channel::<pb::StepRequest>(STEPS_QUEUED);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut inbound =
            client.step(stream).await.map_err(|e| self.unavailable(&format!("opening the step stream: {}", e.message())))?.into_inner();
        let pending: Pending = Arc::default();
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, b, who) = (pending.clone(), broken.clone(), self.describe());
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        let waiter = p.lock().expect("pending lock").remove(&resp.step_id);
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(resp));
                        }
                    }
                    Ok(None) => break "the stream ended".to_string(),
                    Err(e) => break e.message().to_string(),
                }
            };
            // Marked broken under the pending lock, so a step registering itself either sees the
            // mark or is among the waiters failed here.
            let waiters: Vec<_> = {
                let mut pending = p.lock().expect("pending lock");
                b.store(true, Ordering::SeqCst);
                pending.drain().collect()
            };
            for (_, w) in waiters {
                let _ = w.send(Err(Status::unavailable(format!("{who} failed: {reason}"))));
            }
        });
        Ok(Conn { tx, pending, broken })
    }

    fn describe(&self) -> String {
        format!("stage worker {} ({})", self.name, self.address)
    }

    fn unavailable(&self, what: &str) -> Status {
        Status::unavailable(format!("{}: {what}", self.describe()))
    }

    fn healthy(&self) -> Option<Conn> {
        self.conn.lock().expect("conn lock").as_ref().filter(|c| !c.broken.load(Ordering::SeqCst)).cloned()
    }

    /// The open stream, or a new one when there is none or it broke. No lock is held while
    /// connecting: when two callers reconnect at once, the first stream installed is kept and
    /// the other is dropped unused.
    async fn stream(&self) -> Result<Conn, Status> {
        if let Some(c) = self.healthy() {
            return Ok(c);
        }
        let fresh = self.open().await?;
        let mut slot = self.conn.lock().expect("conn lock");
        match slot.as_ref().filter(|c| !c.broken.load(Ordering::SeqCst)) {
            Some(theirs) => Ok(theirs.clone()),
            None => {
                *slot = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// Queues one step on the stream (in the order callers submit) and returns its pending
    /// answer. Waits while the stream holds [`STEPS_QUEUED`] unsent steps.
    pub async fn submit(&self, mut req: pb::StepRequest) -> Result<PendingStep, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let caller_id = req.step_id;
        req.step_id = id;
        let conn = self.stream().await?;
        let (otx, orx) = oneshot::channel();
        {
            let mut pending = conn.pending.lock().expect("pending lock");
            if conn.broken.load(Ordering::SeqCst) {
                return Err(self.unavailable("the step stream broke"));
            }
            pending.insert(id, otx);
        }
        if conn.tx.send(req).await.is_err() {
            conn.pending.lock().expect("pending lock").remove(&id);
            conn.broken.store(true, Ordering::SeqCst);
            return Err(self.unavailable("the step stream is closed"));
        }
        Ok(PendingStep { rx: orx, id, caller_id, conn, describe: self.describe() })
    }

    /// Sends one step and waits for its answer (bounded by `timeout`).
    pub async fn step(&self, req: pb::StepRequest, timeout: Duration) -> Result<pb::StepResponse, Status> {
        self.submit(req).await?.answer(timeout).await
    }
}
