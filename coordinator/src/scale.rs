//! Scaling a local fleet: the coordinator starts worker processes on this machine, or drains
//! and stops local ones, until the fleet has the size asked for. The Kubernetes deployment
//! provides the same operation for in-cluster fleets.

use crate::error::ServeError;
use crate::models::Models;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::info;

/// How to start a worker on this machine.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    /// The `worker` binary.
    pub bin: PathBuf,
    /// Arguments every worker gets (membership, cluster, lease TTL).
    pub args: Vec<String>,
}

/// The workers this coordinator started, stopped with it.
#[derive(Default)]
pub struct Spawned {
    children: Mutex<Vec<(String, tokio::process::Child)>>,
}

fn is_local(address: &str) -> bool {
    address.starts_with("127.") || address.starts_with("localhost:") || address.starts_with("[::1]:")
}

/// Changes the fleet to `target` workers: starts new local ones, or drains and stops local ones
/// (the newest first, so the longest-serving stay). Returns (started, stopped) ids.
pub async fn scale(
    models: &Models,
    local: Option<&LocalWorkers>,
    spawned: &Spawned,
    target: usize,
) -> Result<(Vec<String>, Vec<String>), ServeError> {
    let Some(local) = local else {
        return Err(ServeError::Loading(
            "this coordinator cannot start workers: scale works on clusters started with `shardctl up`".into(),
        ));
    };
    if target == 0 {
        return Err(ServeError::InvalidArgument("workers must be at least 1".into()));
    }
    let engine = models.primary();
    let fleet = engine.membership().workers();
    let mut started = Vec::new();
    let mut stopped = Vec::new();
    // With replicas, whole replicas come and go: as many as the new fleet holds.
    if let Some(per) = engine.workers_per_replica() {
        engine.set_replicas((target / per).max(1));
    }
    if target > fleet.len() {
        for k in 0..target - fleet.len() {
            // Never reused, so a new worker cannot inherit an old one's cordon.
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
            let id = format!("scaled-{}-{stamp}-{k}", std::process::id());
            let child = tokio::process::Command::new(&local.bin)
                .args(&local.args)
                .args(["--id", &id, "--listen", "127.0.0.1:0"])
                .stdout(std::process::Stdio::null())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| ServeError::Internal(format!("starting a worker: {e}")))?;
            spawned.children.lock().expect("spawned lock").push((id.clone(), child));
            info!(worker = %id, "worker started by scale");
            started.push(id);
        }
        wait_for(engine, Duration::from_secs(30), |ids| started.iter().all(|s| ids.contains(s))).await?;
    } else {
        let mut candidates: Vec<_> = fleet.iter().filter(|w| is_local(&w.address) && w.pid != 0).cloned().collect();
        candidates.reverse();
        // With replicas: spares first, then the workers of the replicas laid out last (those
        // a smaller count drops), so that whole replicas go and the others keep serving.
        if let Some(layout) = engine.replica_layout() {
            let rank = |id: &str| {
                if layout.spares.iter().any(|s| s == id) {
                    return usize::MAX;
                }
                layout.replicas.iter().position(|r| r.iter().any(|w| w == id)).unwrap_or(usize::MAX)
            };
            candidates.sort_by_key(|w| std::cmp::Reverse(rank(&w.id)));
        }
        let excess = fleet.len() - target;
        if candidates.len() < excess {
            return Err(ServeError::Loading(format!(
                "only {} of the {} workers run on this machine; cannot stop {excess}",
                candidates.len(),
                fleet.len()
            )));
        }
        for w in candidates.into_iter().take(excess) {
            // Drained first, so no request in flight fails.
            models.engine_using(&w.id).drain(&w.id, Duration::from_secs(60)).await?;
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.pid as i32), nix::sys::signal::Signal::SIGTERM);
            stopped.push(w.id.clone());
            info!(worker = %w.id, pid = w.pid, "worker stopped by scale");
        }
        wait_for(engine, Duration::from_secs(30), |ids| !stopped.iter().any(|s| ids.contains(s))).await?;
        for id in &stopped {
            engine.cordon(id, false).await.ok();
        }
        let mut children = spawned.children.lock().expect("spawned lock");
        children.retain(|(id, _)| !stopped.contains(id));
    }
    Ok((started, stopped))
}

/// How long scaling up waits for new pods to register (scheduling, image pull and start).
const POD_WAIT: Duration = Duration::from_secs(600);

/// Changes the worker StatefulSet to `target` replicas: the pods that go are drained first
/// (highest ordinals), the ones that come are waited for until they registered.
pub async fn scale_statefulset(
    models: &std::sync::Arc<Models>,
    set: &crate::kubernetes::StatefulSetScaler,
    target: usize,
) -> Result<(Vec<String>, Vec<String>), ServeError> {
    let target = u32::try_from(target).map_err(|_| ServeError::InvalidArgument(format!("{target} workers is too many")))?;
    // With replicas, as many whole replicas as the new fleet holds.
    if let Some(per) = models.primary().workers_per_replica() {
        models.primary().set_replicas((target as usize / per).max(1));
    }
    let drainer = models.clone();
    let drain = move |id: String| -> futures::future::BoxFuture<'static, Result<(), ServeError>> {
        let models = drainer.clone();
        Box::pin(async move {
            // A pod that never registered (pending, crashed) has nothing to drain.
            if models.primary().membership().workers().iter().any(|w| w.id == id) {
                models.engine_using(&id).drain(&id, Duration::from_secs(60)).await?;
                info!(worker = %id, "drained before scaling down");
            }
            Ok(())
        })
    };
    let settler = models.clone();
    let settle = move |added: Vec<String>, removed: Vec<String>| -> futures::future::BoxFuture<'static, Result<(), ServeError>> {
        Box::pin(async move {
            let engine = settler.primary().clone();
            let within = if added.is_empty() { Duration::from_secs(120) } else { POD_WAIT };
            wait_for(&engine, within, |ids| added.iter().all(|a| ids.contains(a)) && !removed.iter().any(|r| ids.contains(r))).await?;
            // A later scale-up brings pods back under the same names: they must not inherit the
            // drain's cordon.
            for id in &removed {
                engine.cordon(id, false).await.ok();
            }
            Ok(())
        })
    };
    crate::kubernetes::scale(set, target, drain, settle).await
}

async fn wait_for(engine: &crate::engine::Engine, within: Duration, done: impl Fn(&[String]) -> bool) -> Result<(), ServeError> {
    let deadline = Instant::now() + within;
    loop {
        let ids: Vec<String> = engine.membership().workers().into_iter().map(|w| w.id).collect();
        if done(&ids) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ServeError::DeadlineExceeded(format!("the fleet did not reach the new size within {within:?}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
