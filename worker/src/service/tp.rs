//! Tensor parallelism on a worker: the group's all-reduce (TCP links, or NCCL on GPUs), and a
//! follower rank's life mirroring its leader.

use super::compute::compute;
use super::{Loaded, WorkerState};
use crate::group::Control;
use candle_core::Device;
use shardserve::collective::tcp::TcpGroup;
use shardserve::collective::TpRank;
use std::sync::Arc;
use tonic::Status;
use tracing::trace;

/// The group's all-reduce: over its TCP links on CPUs; over NCCL on GPUs, where rank 0 makes
/// the NCCL id and sends it to the other ranks on those links, and every rank joins the
/// communicator on its own GPU.
pub(super) fn all_reduce(
    state: &WorkerState,
    group: &Arc<TcpGroup>,
    tp: TpRank,
    device: &Device,
) -> Result<Arc<dyn shardserve::collective::Collective>, Status> {
    if device.is_cpu() {
        return Ok(group.clone());
    }
    #[cfg(feature = "cuda")]
    {
        use shardserve::collective::nccl;
        let fail = |e: String| Status::unavailable(format!("worker {}: NCCL for rank {} of {}: {e}", state.id, tp.rank, tp.size));
        let id = if tp.is_leader() {
            let id = nccl::unique_id().map_err(|e| fail(e.to_string()))?;
            group.send_control(&id).map_err(fail)?;
            id
        } else {
            group.recv_control().map_err(fail)?.ok_or_else(|| fail("the leader closed the group".into()))?
        };
        let comm = nccl::NcclCollective::init(device, tp.rank, tp.size, &id, state.collective_timeout).map_err(|e| fail(e.to_string()))?;
        if tp.is_leader() {
            // A follower that dies leaves NCCL waiting until the timeout; its link closing
            // says so at once.
            let stop = comm.stopper();
            group.watch_followers(move |why| stop.stop(why));
        }
        Ok(Arc::new(comm))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (state, tp);
        Err(Status::failed_precondition(shardserve::device::NO_CUDA))
    }
}

/// A follower's life: run every step and release its leader sends, until the group ends; then
/// drop the shard, which is of no use without its leader.
pub(super) fn follow(state: Arc<WorkerState>, loaded: Arc<Loaded>, group: Arc<TcpGroup>) {
    let why = loop {
        let msg = match group.recv_control() {
            Ok(Some(m)) => m,
            Ok(None) => break "the leader closed the group".to_string(),
            Err(why) => break why,
        };
        match Control::decode(&msg) {
            Ok(Control::Step(req)) => {
                let step = req.step_id;
                let out = compute(&state, &loaded, req);
                if let Some(r) = out.results.iter().find(|r| !r.error.is_empty()) {
                    // The leader checked this step before sending it: failing here means this
                    // rank no longer mirrors it, and the group cannot go on.
                    break group.fail(format!("{} failed a step: {}", group.name(loaded.tp.rank), r.error));
                }
                trace!(step, "follower step done");
            }
            Ok(Control::Release(ids)) => {
                let mut kv = loaded.kv.lock().expect("kv lock");
                state.forget(&mut kv, &ids);
                loaded.publish(&kv);
            }
            Err(e) => break group.fail(format!("unreadable control message: {e}")),
        }
    };
    crate::group::follower_stopped(&state.id, &why);
    state.unload_if_current(&loaded);
}
