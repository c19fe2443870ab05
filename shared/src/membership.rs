//! Fleet membership in etcd, laid out as DESIGN.md fixes it under `/shardserve/<cluster>/`:
//! `workers/<id>` (a JSON record bound to the worker's lease), `placements/<model>` (the plan,
//! written with a revision check). A worker keeps its registration alive for as long as it
//! lives; the coordinator lists and watches the fleet, resuming after a dropped watch and
//! re-listing after a compaction, so its view is always what etcd says.

/// The etcd client this module speaks through, for callers that need more of it.
pub use etcd_client;

mod connection;
pub use connection::{Etcd, EtcdArgs};
use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use shardserve_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A view of the fleet: who is in it, and a signal when that changes.
pub trait Membership: Send + Sync {
    /// Live workers, in the order they joined.
    fn workers(&self) -> Vec<pb::WorkerInfo>;
    /// Bumped on every change.
    fn changes(&self) -> watch::Receiver<u64>;
    /// A short name for status output ("embedded", "etcd").
    fn kind(&self) -> &'static str;
}

/// The key prefix of a cluster.
pub fn prefix(cluster: &str) -> String {
    format!("/shardserve/{cluster}/")
}

/// The key a worker registers under.
pub fn worker_key(cluster: &str, id: &str) -> String {
    format!("{}workers/{id}", prefix(cluster))
}

/// The key a model's placement is stored under.
pub fn placement_key(cluster: &str, model: &str) -> String {
    format!("{}placements/{}", prefix(cluster), model.replace('/', "--"))
}

/// A device as stored in a worker record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub name: String,
    pub total_memory: u64,
    pub free_memory: u64,
}

/// What `workers/<id>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub address: String,
    pub devices: Vec<DeviceRecord>,
    pub version: String,
    pub state: String,
    #[serde(default)]
    pub pid: u32,
    /// Where tensor-parallel peers reach the worker (host:port).
    #[serde(default)]
    pub collective_address: String,
    /// Random per worker process (see `WorkerInfo.instance`).
    #[serde(default)]
    pub instance: String,
    /// Where the worker serves Prometheus metrics (host:port), if it does.
    #[serde(default)]
    pub metrics_address: String,
    /// The machine it runs on (see `WorkerInfo.node`).
    #[serde(default)]
    pub node: String,
}

impl From<&pb::WorkerInfo> for WorkerRecord {
    fn from(w: &pb::WorkerInfo) -> Self {
        WorkerRecord {
            id: w.id.clone(),
            address: w.address.clone(),
            devices: w
                .devices
                .iter()
                .map(|d| DeviceRecord { name: d.name.clone(), total_memory: d.total_memory, free_memory: d.free_memory })
                .collect(),
            version: w.version.clone(),
            state: w.state.clone(),
            pid: w.pid,
            collective_address: w.collective_address.clone(),
            instance: w.instance.clone(),
            metrics_address: w.metrics_address.clone(),
            node: w.node.clone(),
        }
    }
}

impl From<WorkerRecord> for pb::WorkerInfo {
    fn from(r: WorkerRecord) -> Self {
        pb::WorkerInfo {
            id: r.id,
            address: r.address,
            devices: r
                .devices
                .into_iter()
                .map(|d| pb::Device { name: d.name, total_memory: d.total_memory, free_memory: d.free_memory })
                .collect(),
            version: r.version,
            state: r.state,
            pid: r.pid,
            stage: None,
            collective_address: r.collective_address,
            instance: r.instance,
            metrics_address: r.metrics_address,
            node: r.node,
            replica: None,
        }
    }
}

/// Connects to plain etcd (no TLS, no user) at `endpoints`, with bounded connect and request
/// times.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    Etcd::plain(endpoints.to_vec()).connect().await
}

/// Keeps a lease alive every `period`; returns when it is lost: etcd says it expired, or no
/// renewal got through for longer than the TTL.
async fn keep_lease(client: &mut Client, lease: i64, ttl: Duration, period: Duration) {
    let mut last_ok = tokio::time::Instant::now();
    let mut keeper = client.lease_keep_alive(lease).await.ok();
    loop {
        tokio::time::sleep(period).await;
        let renewed = async {
            let (k, s) = keeper.as_mut().ok_or(etcd_client::Error::InvalidArgs("no keeper".into()))?;
            k.keep_alive().await?;
            s.message().await
        };
        match tokio::time::timeout(period.max(Duration::from_secs(1)), renewed).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = tokio::time::Instant::now(),
            Ok(Ok(Some(_))) => return,
            _ => {
                // Step down before etcd can expire the lease, so two leaders never overlap.
                if last_ok.elapsed() + period * 2 > ttl {
                    return;
                }
                keeper = tokio::time::timeout(Duration::from_secs(2), client.lease_keep_alive(lease)).await.ok().and_then(Result::ok);
            }
        }
    }
}

/// Campaigns for the leadership of `cluster` (etcd election `<prefix>leader`, bound to a lease
/// of `ttl`) until `shutdown`: `on_change(Some(term))` once elected, `on_change(None)` when the
/// lease behind it is lost (then it campaigns again). The term is the creation revision of the
/// leader's key, which grows with every election: a newer leader's term is always higher. On
/// shutdown the lease is revoked, so another coordinator takes over at once.
pub async fn lead(
    etcd: Etcd,
    cluster: String,
    value: String,
    ttl: Duration,
    on_change: impl Fn(Option<u64>) + Send + Sync,
    shutdown: CancellationToken,
) {
    let name = format!("{}leader", prefix(&cluster));
    let ttl_s = ttl.as_secs().max(1) as i64;
    let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
    loop {
        let attempt = async {
            let mut client = etcd.connect_untimed().await?;
            let lease = client.lease_grant(ttl_s, None).await?.id();
            Ok::<_, etcd_client::Error>((client, lease))
        };
        let (client, lease) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "cannot reach etcd to campaign; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            }
        };
        let mut keeper_client = client.clone();
        let mut campaign_client = client.clone();
        let mut revoke_client = client;
        let keep = keep_lease(&mut keeper_client, lease, ttl, period);
        tokio::pin!(keep);
        let elected = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), revoke_client.lease_revoke(lease)).await;
                return;
            }
            _ = &mut keep => None,
            r = campaign_client.campaign(name.clone(), value.clone(), lease) => match r {
                Ok(r) => match r.leader().map(|l| l.rev()) {
                    Some(rev) if rev > 0 => Some(rev as u64),
                    _ => {
                        warn!("campaign won without a leader key; campaigning again");
                        None
                    }
                },
                Err(e) => {
                    warn!(error = %e, "campaign failed; retrying");
                    None
                }
            },
        };
        let Some(term) = elected else { continue };
        info!(cluster = %cluster, term, "elected leader");
        on_change(Some(term));
        tokio::select! {
            _ = shutdown.cancelled() => {
                on_change(None);
                let _ = tokio::time::timeout(Duration::from_secs(2), revoke_client.lease_revoke(lease)).await;
                return;
            }
            _ = &mut keep => {
                warn!(cluster = %cluster, "leadership lost with its lease; campaigning again");
                on_change(None);
            }
        }
    }
}

/// The value the leader of `cluster` campaigned with; `None` while no one leads.
pub async fn leader_value(client: &mut etcd_client::Client, cluster: &str) -> Result<Option<Vec<u8>>, etcd_client::Error> {
    match client.leader(format!("{}leader", prefix(cluster))).await {
        Ok(r) => Ok(r.kv().map(|kv| kv.value().to_vec())),
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
        Err(e) => Err(e),
    }
}

/// This machine's host name (`localhost` when it has none).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The address peers reach a process at when none is given: the bound one, or this host's name
/// with the bound port when it listens on every interface (no address of its own to give).
pub fn default_advertise(bound: std::net::SocketAddr, host: &str) -> String {
    if bound.ip().is_unspecified() {
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    }
}

/// Splits `http://a:2379,http://b:2379` into endpoints.
pub fn endpoints(spec: &str) -> Vec<String> {
    spec.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Keeps `record` registered under its lease until `shutdown`, then revokes the lease.
/// `on_lost` runs when a lease ran out (the worker must treat what it held as unassigned);
/// the record is then registered again under a new lease.
pub async fn keep_registered(
    etcd: Etcd,
    cluster: String,
    record: WorkerRecord,
    ttl: Duration,
    on_lost: impl Fn() + Send + Sync,
    shutdown: CancellationToken,
) {
    let key = worker_key(&cluster, &record.id);
    let value = serde_json::to_string(&record).expect("worker records serialize");
    let ttl_s = ttl.as_secs().max(1) as i64;
    let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let mut client = etcd.connect().await?;
            let lease = client.lease_grant(ttl_s, None).await?.id();
            client.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease))).await?;
            let (keeper, stream) = client.lease_keep_alive(lease).await?;
            Ok::<_, etcd_client::Error>((client, lease, keeper, stream))
        };
        let (mut client, lease, mut keeper, mut stream) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(worker = %record.id, error = %e, "registering in etcd failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                    continue;
                }
            }
        };
        backoff = Duration::from_millis(200);
        info!(worker = %record.id, lease, ttl_s, "registered in etcd");
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let revoke = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                    if !matches!(revoke, Ok(Ok(_))) {
                        warn!(worker = %record.id, "could not revoke the lease; it will expire");
                    }
                    info!(worker = %record.id, "left the fleet");
                    return;
                }
                _ = tokio::time::sleep(period) => {}
            }
            let renewed = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(period.max(Duration::from_secs(1)), renewed).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                Ok(Ok(Some(_))) => break true,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    // etcd unreachable or the stream broke: open a new keep-alive stream on the
                    // same lease; if the lease expired meanwhile, etcd says so (TTL 0).
                    warn!(worker = %record.id, lease, "lease keep-alive failed; retrying");
                    match tokio::time::timeout(Duration::from_secs(3), client.lease_keep_alive(lease)).await {
                        Ok(Ok((k, s))) => {
                            keeper = k;
                            stream = s;
                        }
                        _ => {
                            if let Ok(c) = etcd.connect().await {
                                client = c;
                            }
                        }
                    }
                }
            }
        };
        if lost {
            warn!(worker = %record.id, lease, "lease expired; registering again");
            on_lost();
        }
    }
}

struct Fleet {
    /// key → (create revision, worker)
    workers: BTreeMap<String, (i64, pb::WorkerInfo)>,
}

/// The fleet as etcd has it, kept current by a watch.
pub struct EtcdFleet {
    fleet: Mutex<Fleet>,
    version: watch::Sender<u64>,
}

impl EtcdFleet {
    /// Lists and watches `cluster`'s workers until `shutdown`; waits (bounded) for the first
    /// listing so the fleet is known from the start.
    pub async fn start(etcd: Etcd, cluster: String, shutdown: CancellationToken) -> Result<Arc<Self>, etcd_client::Error> {
        let (version, _) = watch::channel(0);
        let fleet = Arc::new(EtcdFleet { fleet: Mutex::new(Fleet { workers: BTreeMap::new() }), version });
        let mut client = etcd.connect().await?;
        let prefix = format!("{}workers/", prefix(&cluster));
        let rev = fleet.list(&mut client, &prefix).await?;
        let f = fleet.clone();
        tokio::spawn(async move { f.watch_loop(etcd, client, prefix, rev, shutdown).await });
        Ok(fleet)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Replaces the view with a fresh listing; returns its revision.
    async fn list(&self, client: &mut Client, prefix: &str) -> Result<i64, etcd_client::Error> {
        let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut workers = BTreeMap::new();
        for kv in resp.kvs() {
            if let Some(w) = parse_worker(kv.value()) {
                workers.insert(String::from_utf8_lossy(kv.key()).into_owned(), (kv.create_revision(), w));
            }
        }
        let changed = {
            let mut f = self.fleet.lock().expect("fleet lock");
            let changed = f.workers != workers;
            f.workers = workers;
            changed
        };
        if changed {
            self.bump();
        }
        Ok(rev)
    }

    async fn watch_loop(self: Arc<Self>, etcd: Etcd, mut client: Client, prefix: String, mut rev: i64, shutdown: CancellationToken) {
        loop {
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
            let mut stream = match tokio::select! {
                _ = shutdown.cancelled() => return,
                r = client.watch(prefix.clone(), Some(opts)) => r,
            } {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "etcd watch failed; reconnecting");
                    if !reconnect_after_pause(&etcd, &mut client, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 || resp.canceled() {
                            // Events we missed were compacted away: the listing is the truth.
                            warn!(compacted = resp.compact_revision(), "etcd watch lost history; listing again");
                            match self.list(&mut client, &prefix).await {
                                Ok(r) => rev = r,
                                Err(e) => warn!(error = %e, "listing the fleet failed"),
                            }
                            break;
                        }
                        let mut changed = false;
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            rev = rev.max(kv.mod_revision());
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let mut f = self.fleet.lock().expect("fleet lock");
                            match ev.event_type() {
                                EventType::Put => {
                                    if let Some(w) = parse_worker(kv.value()) {
                                        f.workers.insert(key, (kv.create_revision(), w));
                                        changed = true;
                                    }
                                }
                                EventType::Delete => {
                                    if let Some((_, w)) = f.workers.remove(&key) {
                                        info!(worker = %w.id, "worker left the fleet (etcd)");
                                        changed = true;
                                    }
                                }
                            }
                        }
                        // Only delivered events advance the resume point: a header's revision
                        // may be ahead of events still to come.
                        if changed {
                            self.bump();
                        }
                    }
                    Ok(None) | Err(_) => {
                        debug!(rev, "etcd watch ended; resuming");
                        if !reconnect_after_pause(&etcd, &mut client, &shutdown).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// Waits a moment, then replaces `client` with a fresh connection if one can be made; `false`
/// when shutting down.
async fn reconnect_after_pause(etcd: &Etcd, client: &mut Client, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(Duration::from_millis(400)) => {}
    }
    if let Ok(c) = etcd.connect().await {
        *client = c;
    }
    true
}

fn parse_worker(value: &[u8]) -> Option<pb::WorkerInfo> {
    match serde_json::from_slice::<WorkerRecord>(value) {
        Ok(r) => Some(r.into()),
        Err(e) => {
            warn!(error = %e, "ignoring a malformed worker record in etcd");
            None
        }
    }
}

impl Membership for EtcdFleet {
    fn workers(&self) -> Vec<pb::WorkerInfo> {
        let f = self.fleet.lock().expect("fleet lock");
        let mut v: Vec<&(i64, pb::WorkerInfo)> = f.workers.values().collect();
        v.sort_by_key(|(rev, _)| *rev);
        v.into_iter().map(|(_, w)| w.clone()).collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }
}

/// Writes `value` under `key` only if its mod revision is still `expected` (0: absent), so two
/// writers cannot overwrite each other's plan. Returns the new revision, or `None` when someone
/// else wrote first.
pub async fn put_if_unchanged(client: &mut Client, key: &str, value: String, expected: i64) -> Result<Option<i64>, etcd_client::Error> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, expected)]).and_then([TxnOp::put(key, value, None)]);
    let resp = client.txn(txn).await?;
    Ok(resp.succeeded().then(|| resp.header().map_or(0, |h| h.revision())))
}
