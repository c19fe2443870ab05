//! Operator actions on the fleet: cordon, uncordon, drain.

use super::*;

impl Engine {
    /// The workers marked under `sub/` in etcd (the cluster-wide truth, so every coordinator
    /// sees what any of them set), or `local` without etcd; `local` mirrors etcd when read.
    async fn marked(&self, sub: &str, local: &std::sync::Mutex<std::collections::BTreeSet<String>>) -> std::collections::BTreeSet<String> {
        if let Some((_, cluster)) = &self.etcd {
            let prefix = format!("{}{sub}/", shardserve::membership::prefix(cluster));
            let read = async {
                let mut c = self.etcd_client().await.expect("etcd is configured")?;
                c.get(prefix.as_str(), Some(shardserve::membership::etcd_client::GetOptions::new().with_prefix())).await
            };
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(3), read).await {
                let set: std::collections::BTreeSet<String> =
                    resp.kvs().iter().filter_map(|kv| String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).map(String::from)).collect();
                *local.lock().expect("mark lock") = set.clone();
                return set;
            }
        }
        local.lock().expect("mark lock").clone()
    }

    /// Marks (`on`) or unmarks worker `id` under `sub/`: in etcd when membership is there, and
    /// in `local`.
    async fn mark(
        &self,
        sub: &str,
        local: &std::sync::Mutex<std::collections::BTreeSet<String>>,
        id: &str,
        on: bool,
    ) -> Result<(), ServeError> {
        if let Some((_, cluster)) = &self.etcd {
            let key = format!("{}{sub}/{id}", shardserve::membership::prefix(cluster));
            self.etcd_call(|mut c| async move {
                if on {
                    c.put(key, "1", None).await.map(|_| ())
                } else {
                    c.delete(key, None).await.map(|_| ())
                }
            })
            .await?;
        }
        let mut set = local.lock().expect("mark lock");
        if on {
            set.insert(id.to_string());
        } else {
            set.remove(id);
        }
        Ok(())
    }

    /// The workers left out of plans.
    pub async fn cordoned(&self) -> std::collections::BTreeSet<String> {
        self.marked("cordoned", &self.shared.cordoned).await
    }

    /// The workers being drained: the model moves off them once no request is in flight. Kept
    /// in etcd too, so a drain asked of a follower coordinator moves the leader's plan.
    pub(super) async fn draining(&self) -> std::collections::BTreeSet<String> {
        self.marked("draining", &self.evicting).await
    }

    /// Cordons (`on`) or uncordons a worker of the fleet.
    pub async fn cordon(&self, id: &str, on: bool) -> Result<(), ServeError> {
        if on && !self.membership.workers().iter().any(|w| w.id == id) {
            return Err(ServeError::NotFound(format!("worker {id:?} is not in the fleet")));
        }
        self.mark("cordoned", &self.shared.cordoned, id, on).await?;
        info!(worker = %id, cordoned = on, "cordon changed");
        self.shared.wake_all();
        Ok(())
    }

    /// Cordons a worker, lets requests in flight finish, and waits (bounded) until the
    /// placement no longer uses it.
    pub async fn drain(&self, id: &str, within: Duration) -> Result<Vec<StageAssignment>, ServeError> {
        self.cordon(id, true).await?;
        self.mark("draining", &self.evicting, id, true).await?;
        self.shared.wake_all();
        let mut state = self.model.subscribe();
        // Done once a new placement leaves the worker out; for a replica that a scale down
        // dropped, once it has no placement at all (it gets no new one).
        let moved = state.wait_for(|s| match s {
            ServingState::Ready(p) => !p.stages.iter().any(|s| s.uses(id)),
            _ => !self.laid_out(),
        });
        let outcome = match tokio::time::timeout(within, moved).await {
            Ok(Ok(s)) => match &*s {
                ServingState::Ready(p) => Ok(p.stages.clone()),
                _ => Ok(Vec::new()),
            },
            Ok(Err(_)) => Err(ServeError::Unavailable("the coordinator is shutting down".into())),
            Err(_) => Err(ServeError::DeadlineExceeded(format!(
                "worker {id} still holds part of the model after {within:?} ({} requests in flight)",
                self.model.active()
            ))),
        };
        // Cordoned it stays; the move is done (or given up).
        if let Err(e) = self.mark("draining", &self.evicting, id, false).await {
            warn!(worker = %id, error = %e, "clearing the drain mark failed");
        }
        outcome
    }
}
