//! Tensor-parallel groups on the worker side.
//!
//! Every worker listens for tensor-parallel peers on a port of its own (its collective
//! address, published with its registration). When a stage is a group of ranks, rank 0 — the
//! leader, the only rank the pipeline talks to — waits there for the other ranks; each of them
//! connects, says which group and rank it is, and is acknowledged once all have arrived.
//!
//! With the cluster's certificates each connection is mutual TLS, and the handshake (which
//! refuses a peer without a certificate of the cluster CA) comes before the hello is read.
//!
//! After that the leader mirrors everything that changes a sequence to its followers as control
//! messages on the compute thread, in the order it happens: a step (sent once the leader has
//! checked it, so a follower never refuses one) and a release. Followers run each step on the
//! same state and join the all-reduces; only the leader answers.

use prost::Message;
use shardserve::collective::tcp::Link;
use shardserve::tls::ClusterTls;
use shardserve_proto::v1 as pb;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How long connections wait for a leader that does not come for them.
const STALE_GROUP: Duration = Duration::from_secs(900);

/// The ranks of one group that have connected: when the first came, and (rank, stream) each.
type Arrivals = (Instant, Vec<(usize, Link)>);

/// Where the followers of a group meet their leader.
pub struct Rendezvous {
    address: String,
    /// Connections past their hello, by group.
    arrived: Mutex<HashMap<String, Arrivals>>,
    changed: Condvar,
}

impl Rendezvous {
    /// Listens on `host`, on a free port, and accepts peers on a thread of its own (over
    /// mutual TLS when `tls` is given).
    pub fn start(host: &str, tls: Option<Arc<ClusterTls>>) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind((host, 0)).or_else(|_| TcpListener::bind(("0.0.0.0", 0)))?;
        let port = listener.local_addr()?.port();
        let r = Arc::new(Rendezvous { address: format!("{host}:{port}"), arrived: Mutex::new(HashMap::new()), changed: Condvar::new() });
        let weak = Arc::downgrade(&r);
        std::thread::Builder::new().name("tp-accept".into()).spawn(move || {
            for conn in listener.incoming() {
                let Some(r) = weak.upgrade() else { return };
                let Ok(s) = conn else { continue };
                let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                // A peer that connects and says nothing must not stall the others.
                let _ = s.set_read_timeout(Some(shardserve::tls::HANDSHAKE));
                let _ = s.set_write_timeout(Some(shardserve::tls::HANDSHAKE));
                let mut s = match Link::accept(s, tls.as_deref()) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(port = "collective", %peer, error = %e, "TLS handshake refused");
                        continue;
                    }
                };
                match shardserve::collective::tcp::read_hello(&mut s) {
                    Ok((group, rank)) => {
                        debug!(group = %group, rank, "tensor-parallel peer arrived");
                        let mut arrived = r.arrived.lock().expect("arrived lock");
                        // Groups whose leader never came for them are dropped after a while.
                        arrived.retain(|_, (since, _)| since.elapsed() < STALE_GROUP);
                        arrived.entry(group).or_insert_with(|| (Instant::now(), Vec::new())).1.push((rank, s));
                        r.changed.notify_all();
                    }
                    Err(e) => debug!(error = %e, "a connection to the collective port said no hello"),
                }
            }
        })?;
        Ok(r)
    }

    /// host:port peers connect to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Waits until ranks 1..size of `group` have all connected; returns their streams in rank
    /// order.
    pub fn wait(&self, group: &str, size: usize, names: &[String], within: Duration) -> Result<Vec<Link>, String> {
        let deadline = Instant::now() + within;
        let mut arrived = self.arrived.lock().expect("arrived lock");
        loop {
            let have: Vec<usize> = arrived.get(group).map(|(_, v)| v.iter().map(|(r, _)| *r).collect()).unwrap_or_default();
            if (1..size).all(|r| have.contains(&r)) {
                let mut conns = arrived.remove(group).map(|(_, v)| v).unwrap_or_default();
                // A rank that connected twice (it retried) keeps its latest connection.
                conns.reverse();
                conns.sort_by_key(|(r, _)| *r);
                conns.dedup_by_key(|(r, _)| *r);
                return Ok(conns.into_iter().filter(|(r, _)| *r < size).map(|(_, s)| s).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = (1..size)
                    .filter(|r| !have.contains(r))
                    .map(|r| format!("rank {r} (worker {})", names.get(r).map_or("?", String::as_str)))
                    .collect();
                return Err(format!("tensor-parallel group {group}: {} did not connect within {within:?}", missing.join(", ")));
            }
            arrived = self.changed.wait_timeout(arrived, deadline - now).expect("arrived lock").0;
        }
    }
}

/// What a leader sends its followers: a tag byte, then the protobuf.
#[derive(Debug)]
pub enum Control {
    /// Run this step (already checked by the leader).
    Step(pb::StepRequest),
    /// Free these sequences.
    Release(Vec<u64>),
}

impl Control {
    /// A step, as sent.
    pub fn step(req: &pb::StepRequest) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + req.encoded_len());
        b.push(1u8);
        req.encode(&mut b).expect("a Vec grows");
        b
    }

    /// A release, as sent.
    pub fn release(ids: &[u64]) -> Vec<u8> {
        let mut b = vec![2u8];
        pb::ReleaseRequest { seq_ids: ids.to_vec() }.encode(&mut b).expect("a Vec grows");
        b
    }

    /// Reads a message; `Err` when it is not one.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        match b.split_first() {
            Some((1, rest)) => pb::StepRequest::decode(rest).map(Control::Step).map_err(|e| e.to_string()),
            Some((2, rest)) => pb::ReleaseRequest::decode(rest).map(|r| Control::Release(r.seq_ids)).map_err(|e| e.to_string()),
            Some((t, _)) => Err(format!("unknown control message {t}")),
            None => Err("an empty control message".into()),
        }
    }
}

/// Logs and returns the reason a follower stops.
pub fn follower_stopped(worker: &str, why: &str) {
    warn!(worker = %worker, reason = %why, "tensor-parallel follower stopped; its shard is dropped");
}
