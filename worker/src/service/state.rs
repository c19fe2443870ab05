//! What a worker holds: the shard it serves (its KV pool, the sequences in it, the pool's
//! counts published for `Stats`), and the state around it (released ids, the compute thread).

use super::compute::ComputeThread;
use crate::group::{Control, Rendezvous};
use candle_core::Device;
use shardserve::collective::tcp::TcpGroup;
use shardserve::collective::TpRank;
use shardserve::guide::{Grammars, Guide, GuideError};
use shardserve::model::{self, KvPool, Shard};
use shardserve::sampling::Sampler;
use shardserve::stage::StageClient;
use shardserve::tls::ClusterTls;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tonic::Status;
use tracing::debug;

/// A sequence's state on this stage beside its KV blocks.
pub(super) struct SeqState {
    /// Last stage only: the sampler and every token of the sequence so far.
    pub(super) sampler: Option<Sampler>,
    /// The rank that samples, for a constrained sequence: its grammar's state.
    pub(super) guide: Option<Guide>,
    pub(super) history: Vec<u32>,
    /// The client request it serves (for log lines).
    pub(super) request_id: String,
}

/// The KV pool of the shard served and the sequences in it.
pub(super) struct StageKv {
    pub(super) pool: KvPool,
    pub(super) seqs: HashMap<u64, SeqState>,
    /// The term of the scheduler that owns the pool (0: none has claimed it).
    pub(super) owner: u64,
}

/// The shard this worker serves.
pub(super) struct Loaded {
    pub(super) epoch: u64,
    pub(super) shard: Arc<Shard>,
    pub(super) model: String,
    pub(super) stage: u32,
    pub(super) next: Option<Arc<StageClient>>,
    pub(super) tp: TpRank,
    /// The tensor-parallel group: on the leader its links to the followers, on a follower its
    /// link to the leader.
    pub(super) group: Option<Arc<TcpGroup>>,
    /// Changed only by the thread that computes steps (the compute thread, or a follower's).
    pub(super) kv: Mutex<StageKv>,
    /// The pool's blocks in use and sequences held, published after every change so `Stats`
    /// never waits for a step.
    pub(super) blocks_used: AtomicUsize,
    pub(super) sequences: AtomicUsize,
    /// Free blocks still holding a cached prefix, and cached blocks overwritten so far.
    pub(super) blocks_cached: AtomicUsize,
    pub(super) blocks_evicted: std::sync::atomic::AtomicU64,
    pub(super) blocks_total: usize,
    pub(super) block_size: usize,
    pub(super) block_bytes: u64,
    /// The checkpoint's files (its tokenizer builds the grammars).
    pub(super) files: shardserve::hub::ModelFiles,
    /// The grammars of the model, built on the first constrained sequence, for its
    /// end-of-sequence tokens.
    pub(super) grammars: Mutex<Option<(Vec<u32>, Arc<Grammars>)>>,
}

impl Loaded {
    /// The model's grammars for sequences that end at `eos`.
    pub(super) fn grammars(&self, eos: &[u32]) -> Result<Arc<Grammars>, GuideError> {
        let mut built = self.grammars.lock().expect("grammars lock");
        if let Some((e, g)) = built.as_ref() {
            if e.as_slice() == eos {
                return Ok(g.clone());
            }
        }
        let tokenizer = self.files.tokenizer().map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        let g = Arc::new(Grammars::new(&tokenizer, self.shard.config().vocab_size, eos)?);
        *built = Some((eos.to_vec(), g.clone()));
        Ok(g)
    }

    /// The group this worker leads, if it leads one.
    pub(super) fn followers(&self) -> Option<&Arc<TcpGroup>> {
        self.group.as_ref().filter(|_| self.tp.is_leader())
    }

    pub(super) fn publish(&self, kv: &StageKv) {
        self.blocks_used.store(kv.pool.blocks_used(), Ordering::SeqCst);
        self.blocks_cached.store(kv.pool.blocks_cached(), Ordering::SeqCst);
        self.blocks_evicted.store(kv.pool.blocks_evicted(), Ordering::SeqCst);
        self.sequences.store(kv.seqs.len(), Ordering::SeqCst);
        let stage = self.stage.to_string();
        metrics::gauge!("shardserve_kv_blocks_used", "stage" => stage.clone()).set(kv.pool.blocks_used() as f64);
        metrics::gauge!("shardserve_kv_blocks_total", "stage" => stage.clone()).set(self.blocks_total as f64);
        metrics::gauge!("shardserve_kv_blocks_cached", "stage" => stage.clone()).set(kv.pool.blocks_cached() as f64);
        metrics::counter!("shardserve_kv_blocks_evicted_total", "stage" => stage.clone()).absolute(kv.pool.blocks_evicted());
        metrics::gauge!("shardserve_worker_sequences", "stage" => stage).set(kv.seqs.len() as f64);
    }
}

/// Longest the ranks of a tensor-parallel group wait for each other while loading.
pub(super) const GROUP_WAIT: Duration = Duration::from_secs(600);

/// Tokens per KV block when the coordinator does not say.
pub(super) const DEFAULT_BLOCK_SIZE: usize = model::kv::DEFAULT_BLOCK_SIZE;

/// Everything a worker holds.
pub struct WorkerState {
    pub(super) id: String,
    pub(super) loaded: RwLock<Option<Arc<Loaded>>>,
    /// Recently released sequence ids: a step that arrives after its release (they race
    /// across stages) must not bring the sequence back.
    pub(super) released: Mutex<(HashSet<u64>, std::collections::VecDeque<u64>)>,
    pub(super) step_timeout: Duration,
    /// Longest a collective operation waits on a peer.
    pub(super) collective_timeout: Duration,
    pub(super) rendezvous: Arc<Rendezvous>,
    pub(super) device: Device,
    /// The cluster identity every link presents, when the cluster uses mutual TLS.
    pub(super) tls: Option<Arc<ClusterTls>>,
    pub(super) compute: ComputeThread,
    /// Fires on shutdown: step streams stop taking new steps and close.
    pub(super) shutdown: tokio_util::sync::CancellationToken,
}

impl WorkerState {
    /// An empty worker.
    pub fn new(
        id: String,
        step_timeout: Duration,
        collective_timeout: Duration,
        rendezvous: Arc<Rendezvous>,
        device: Device,
        tls: Option<Arc<ClusterTls>>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        WorkerState {
            id,
            loaded: RwLock::new(None),
            released: Mutex::default(),
            step_timeout,
            collective_timeout,
            rendezvous,
            compute: ComputeThread::start(device.is_cpu()),
            device,
            tls,
            shutdown,
        }
    }

    /// Drops the shard and every sequence.
    pub fn unload(&self) {
        if let Some(old) = self.loaded.write().expect("loaded lock").take() {
            if let Some(g) = &old.group {
                g.close();
            }
        }
    }

    /// Drops `loaded` if it is still the shard served (a newer one is left alone).
    pub(super) fn unload_if_current(&self, loaded: &Arc<Loaded>) {
        let mut current = self.loaded.write().expect("loaded lock");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, loaded)) {
            *current = None;
        }
    }

    pub(super) fn current(&self) -> Result<Arc<Loaded>, Status> {
        self.loaded
            .read()
            .expect("loaded lock")
            .clone()
            .ok_or_else(|| Status::failed_precondition(format!("worker {} holds no shard", self.id)))
    }

    /// Frees sequences `ids` in `kv` and remembers them as released; how many were held.
    pub(super) fn forget(&self, kv: &mut StageKv, ids: &[u64]) -> usize {
        const REMEMBERED: usize = 65_536;
        if ids.is_empty() {
            return 0;
        }
        {
            let mut released = self.released.lock().expect("released lock");
            for &id in ids {
                if released.0.insert(id) {
                    released.1.push_back(id);
                }
            }
            while released.1.len() > REMEMBERED {
                if let Some(old) = released.1.pop_front() {
                    released.0.remove(&old);
                }
            }
        }
        let mut freed = 0;
        for id in ids {
            kv.pool.remove(*id);
            if let Some(s) = kv.seqs.remove(id) {
                freed += 1;
                if !s.request_id.is_empty() {
                    debug!(worker = %self.id, request_id = %s.request_id, seq = id, "sequence freed");
                }
            }
        }
        freed
    }

    /// Frees sequences `ids`, in order with the steps (on the compute thread), and mirrors the
    /// release to the followers; how many were held here.
    pub(super) async fn release(self: &Arc<Self>, ids: Vec<u64>) -> usize {
        let Ok(loaded) = self.current() else { return 0 };
        if ids.is_empty() {
            return 0;
        }
        let st = self.clone();
        let freed = self
            .compute
            .run(move || {
                let freed = {
                    let mut kv = loaded.kv.lock().expect("kv lock");
                    let freed = st.forget(&mut kv, &ids);
                    loaded.publish(&kv);
                    freed
                };
                if let Some(group) = loaded.followers() {
                    if let Err(why) = group.send_control(&Control::release(&ids)) {
                        debug!(reason = %why, "release not mirrored: the group is broken");
                    }
                }
                freed
            })
            .await;
        freed.unwrap_or(0)
    }

    pub(super) fn was_released(&self, id: u64) -> bool {
        self.released.lock().expect("released lock").0.contains(&id)
    }
}

/// Blocks of `block_bytes` that `wanted` bytes of KV memory make (0: a quarter of what
/// `device` has free now), limited to what it has free less a margin for activations.
pub(super) fn kv_blocks(wanted: u64, block_bytes: u64, device: &Device, tp: bool) -> Result<usize, String> {
    let (_, free) = shardserve::device::memory_of(device);
    let margin = free / 10;
    let available = free.saturating_sub(margin);
    let bytes = match wanted {
        0 => free / 4,
        // Every rank of a group must hold the same blocks: one that cannot is refused.
        w if w > available && tp => {
            return Err(format!("the KV cache needs {w} bytes but {available} are free after the weights (less a margin)"))
        }
        w => w.min(available),
    };
    let blocks = bytes / block_bytes.max(1);
    if blocks == 0 {
        return Err(format!("{bytes} bytes of KV memory hold no block of {block_bytes} bytes"));
    }
    Ok(blocks.min(u32::MAX as u64) as usize)
}
