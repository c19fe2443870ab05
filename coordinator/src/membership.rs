//! Membership embedded in the coordinator, for clusters started without etcd: workers register
//! over gRPC and hold leases, as they would in etcd. [`Membership`] is what the engine needs of
//! either.

use shardserve_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub use shardserve::membership::Membership;

struct Entry {
    info: pb::WorkerInfo,
    lease: u64,
    expires: Instant,
    joined: u64,
}

/// Membership held in the coordinator's memory.
pub struct Embedded {
    ttl: Duration,
    inner: Mutex<EmbeddedInner>,
    version: watch::Sender<u64>,
}

#[derive(Default)]
struct EmbeddedInner {
    by_id: BTreeMap<String, Entry>,
    next_lease: u64,
    joins: u64,
}

impl Embedded {
    /// A fleet whose leases last `ttl` without renewal; expired ones are swept until `shutdown`.
    pub fn new(ttl: Duration, shutdown: CancellationToken) -> Arc<Self> {
        let (version, _) = watch::channel(0);
        let m = Arc::new(Embedded { ttl, inner: Mutex::new(EmbeddedInner { next_lease: 1, ..Default::default() }), version });
        let sweeper = m.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => sweeper.sweep(),
                }
            }
        });
        m
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<String> = {
            let mut inner = self.inner.lock().expect("membership lock");
            let gone: Vec<String> = inner.by_id.iter().filter(|(_, e)| e.expires <= now).map(|(k, _)| k.clone()).collect();
            for id in &gone {
                inner.by_id.remove(id);
            }
            gone
        };
        for id in &expired {
            warn!(worker = %id, "lease expired; worker removed from the fleet");
        }
        if !expired.is_empty() {
            self.bump();
        }
    }

    fn register(&self, mut info: pb::WorkerInfo) -> Result<pb::RegisterResponse, Status> {
        if info.id.is_empty() || info.address.is_empty() {
            return Err(Status::invalid_argument("worker.id and worker.address are required"));
        }
        if info.state.is_empty() {
            info.state = "ready".into();
        }
        let lease = {
            let mut inner = self.inner.lock().expect("membership lock");
            let lease = inner.next_lease;
            inner.next_lease += 1;
            inner.joins += 1;
            let joined = inner.joins;
            inner.by_id.insert(info.id.clone(), Entry { info: info.clone(), lease, expires: Instant::now() + self.ttl, joined });
            lease
        };
        info!(worker = %info.id, address = %info.address, lease, "worker joined");
        self.bump();
        Ok(pb::RegisterResponse { lease_id: lease, ttl_seconds: self.ttl.as_secs().max(1) as u32 })
    }

    fn keep_alive(&self, lease: u64) -> Result<(), Status> {
        let mut inner = self.inner.lock().expect("membership lock");
        match inner.by_id.values_mut().find(|e| e.lease == lease) {
            Some(e) => {
                e.expires = Instant::now() + self.ttl;
                Ok(())
            }
            None => Err(Status::not_found(format!("lease {lease} has expired; register again"))),
        }
    }

    fn leave(&self, lease: u64) {
        let removed = {
            let mut inner = self.inner.lock().expect("membership lock");
            let id = inner.by_id.iter().find(|(_, e)| e.lease == lease).map(|(k, _)| k.clone());
            id.and_then(|id| inner.by_id.remove(&id)).map(|e| e.info.id)
        };
        if let Some(id) = removed {
            info!(worker = %id, "worker left");
            self.bump();
        }
    }
}

impl Membership for Embedded {
    fn workers(&self) -> Vec<pb::WorkerInfo> {
        let inner = self.inner.lock().expect("membership lock");
        let mut v: Vec<&Entry> = inner.by_id.values().collect();
        v.sort_by_key(|e| e.joined);
        v.into_iter().map(|e| e.info.clone()).collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

/// The `Membership` gRPC service over [`Embedded`].
pub struct MembershipService(pub Arc<Embedded>);

#[tonic::async_trait]
impl pb::membership_server::Membership for MembershipService {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let info = request.into_inner().worker.ok_or_else(|| Status::invalid_argument("worker is required"))?;
        self.0.register(info).map(Response::new)
    }

    async fn keep_alive(&self, request: Request<pb::KeepAliveRequest>) -> Result<Response<pb::KeepAliveResponse>, Status> {
        self.0.keep_alive(request.into_inner().lease_id)?;
        Ok(Response::new(pb::KeepAliveResponse { ttl_seconds: self.0.ttl.as_secs().max(1) as u32 }))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        self.0.leave(request.into_inner().lease_id);
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

/// The Membership service's guard. With the cluster's certificates (`--cluster-ca`), only a
/// peer that presented one — checked against the cluster CA in the TLS handshake — may join or
/// renew; anyone else gets UNAUTHENTICATED, so no stranger can register a worker and be sent
/// shards and prompts. Without them the fleet trusts its network, as before.
pub fn members_only(required: bool) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| {
        let member = req.extensions().get::<shardserve::tls::Peer>().is_some_and(|p| p.certified);
        if required && !member {
            warn!("a peer without a cluster certificate tried the Membership service");
            return Err(Status::unauthenticated(
                "Membership takes only members of the cluster: connect over TLS with a certificate of the cluster CA (--cluster-cert)",
            ));
        }
        Ok(req)
    }
}
