//! Operator actions on the fleet: cordon, uncordon, drain.

use super::*;

impl Engine {
    /// The workers left out of plans.
    pub async fn cordoned(&self) -> std::collections::BTreeSet<String> {
        if let Some((_, cluster)) = &self.etcd {
            let prefix = format!("{}cordoned/", shardserve::membership::prefix(cluster));
            let read = async {
                let mut c = self.etcd_client().await.expect("etcd is configured")?;
                c.get(prefix.as_str(), Some(shardserve::membership::etcd_client::GetOptions::new().with_prefix())).await
            };
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(3), read).await {
                let set: std::collections::BTreeSet<String> = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).map(String::from))
                    .collect();
                *self.shared.cordoned.lock().expect("cordon lock") = set.clone();
                return set;
            }
        }
        self.shared.cordoned.lock().expect("cordon lock").clone()
    }

    /// Cordons (`on`) or uncordons a worker of the fleet.
    pub async fn cordon(&self, id: &str, on: bool) -> Result<(), ServeError> {
        if on && !self.membership.workers().iter().any(|w| w.id == id) {
            return Err(ServeError::NotFound(format!("worker {id:?} is not in the fleet")));
        }
        if let Some((_, cluster)) = &self.etcd {
            let key = format!("{}cordoned/{id}", shardserve::membership::prefix(cluster));
            let write = async {
                let mut c = self.etcd_client().await.expect("etcd is configured")?;
                if on {
                    c.put(key.as_str(), "1", None).await.map(|_| ())
                } else {
                    c.delete(key.as_str(), None).await.map(|_| ())
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ServeError::Unavailable(format!("etcd: {e}"))),
                Err(_) => return Err(ServeError::Unavailable("etcd did not answer within 5 s".into())),
            }
        }
        {
            let mut set = self.shared.cordoned.lock().expect("cordon lock");
            if on {
                set.insert(id.to_string());
            } else {
                set.remove(id);
            }
        }
        info!(worker = %id, cordoned = on, "cordon changed");
        self.shared.wake_all();
        Ok(())
    }

    /// Cordons a worker, lets requests in flight finish, and waits (bounded) until the
    /// placement no longer uses it.
    pub async fn drain(&self, id: &str, within: Duration) -> Result<Vec<StageAssignment>, ServeError> {
        self.cordon(id, true).await?;
        self.evicting.lock().expect("evict lock").insert(id.to_string());
        self.broken.notify_one();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let ServingState::Ready(p) = self.model.state() {
                if !p.stages.iter().any(|s| s.uses(id)) {
                    self.evicting.lock().expect("evict lock").remove(id);
                    return Ok(p.stages.clone());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.evicting.lock().expect("evict lock").remove(id);
                return Err(ServeError::DeadlineExceeded(format!(
                    "worker {id} still holds part of the model after {within:?} ({} requests in flight)",
                    self.model.active()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
