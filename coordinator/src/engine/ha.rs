//! Several coordinators on one etcd: the placement published by the leader, adopted by the
//! followers.

use super::*;

impl Engine {
    /// On a follower: serves whatever placement the leader publishes in etcd.
    pub(super) async fn follow(self: Arc<Self>, cluster: String, shutdown: CancellationToken) {
        let key = shardserve::membership::placement_key(&cluster, &self.pin_key());
        let mut seen = -1i64;
        loop {
            if self.is_leader() {
                // The leader writes the placement; it has nothing to read back.
                seen = -1;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            let poll = async {
                let mut client = self.etcd_client().await.expect("etcd is configured")?;
                // Who leads: where requests go (see crate::relay).
                let leader = shardserve::membership::leader_value(&mut client, &cluster).await?;
                let record = leader.and_then(|v| serde_json::from_slice::<super::LeaderRecord>(&v).ok());
                self.shared.leader.send_if_modified(|l| {
                    let changed = *l != record;
                    *l = record;
                    changed
                });
                client.get(key.as_str(), None).await
            };
            match tokio::time::timeout(Duration::from_secs(5), poll).await {
                Ok(Ok(resp)) if !self.is_leader() => {
                    let rev = resp.kvs().first().map_or(0, |kv| kv.mod_revision());
                    // A placement that failed here is adopted afresh (new streams to its
                    // stages), whether or not the leader has published a new one.
                    let failed_here = !matches!(self.model.state(), ServingState::Ready(_));
                    if rev != seen || (failed_here && rev != 0) {
                        seen = rev;
                        match resp.kvs().first().map(|kv| self.adopt(kv.value())) {
                            Some(Ok(p)) => {
                                info!(model = %self.model.name, stages = p.stages.len(), "serving the leader's placement");
                                self.model.set_state(ServingState::Ready(Arc::new(p)));
                            }
                            Some(Err(e)) => warn!(key = %key, error = %e, "unreadable placement in etcd"),
                            None => self.model.set_state(self.model.not_ready("waiting for the leader to place the model".into())),
                        }
                    }
                }
                Ok(Ok(_)) => seen = -1,
                Ok(Err(e)) => debug!(error = %e, "reading the placement failed"),
                Err(_) => debug!("reading the placement timed out"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// A placement read from etcd, as the leader wrote it.
    pub(super) fn adopt(&self, value: &[u8]) -> Result<Placement, String> {
        let record: PlacementRecord = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        let stages = record
            .stages
            .into_iter()
            .map(|s| StageAssignment {
                worker_id: s.worker,
                address: s.address,
                layers: s.layers[0]..s.layers[1],
                bytes: s.bytes,
                followers: s.followers.into_iter().map(|r| (r.worker, r.address)).collect(),
                kv_blocks: s.kv_blocks,
                kv_block_size: s.kv_block_size,
            })
            .collect();
        self.placement_of(stages, record.epoch)
    }

    /// Writes the placement to etcd (`placements/<model>`) with a revision check, so two
    /// coordinators cannot overwrite each other's plan.
    pub(super) async fn publish(&self, p: &Placement) {
        let Some((_, cluster)) = &self.etcd else { return };
        if !self.is_leader() {
            // Only the leader's plan goes to etcd; a deposed leader keeps quiet.
            return;
        }
        let key = shardserve::membership::placement_key(cluster, &self.pin_key());
        let record = PlacementRecord {
            model: self.model.name.clone(),
            epoch: p.epoch,
            stages: p
                .stages
                .iter()
                .map(|s| StageRecord {
                    worker: s.worker_id.clone(),
                    address: s.address.clone(),
                    layers: [s.layers.start, s.layers.end],
                    bytes: s.bytes,
                    followers: s.followers.iter().map(|(w, a)| RankRecord { worker: w.clone(), address: a.clone() }).collect(),
                    kv_blocks: s.kv_blocks,
                    kv_block_size: s.kv_block_size,
                })
                .collect(),
        };
        let value = serde_json::to_string(&record).expect("a placement serializes");
        let result = async {
            let mut client = self.etcd_client().await.expect("etcd is configured")?;
            let current = client.get(key.as_str(), None).await?;
            let rev = current.kvs().first().map_or(0, |kv| kv.mod_revision());
            let expected = *self.placement_rev.lock().expect("rev lock");
            if expected != rev && expected != 0 {
                warn!(key = %key, "the placement in etcd was changed by someone else; overwriting with the current plan");
            }
            shardserve::membership::put_if_unchanged(&mut client, &key, value, rev).await
        };
        match tokio::time::timeout(Duration::from_secs(5), result).await {
            Ok(Ok(Some(rev))) => {
                *self.placement_rev.lock().expect("rev lock") = rev;
                self.published.store(p.epoch, Ordering::SeqCst);
            }
            Ok(Ok(None)) => warn!(key = %key, "another writer changed the placement first; not overwritten"),
            Ok(Err(e)) => warn!(key = %key, error = %e, "writing the placement to etcd failed"),
            Err(_) => warn!(key = %key, "writing the placement to etcd timed out"),
        }
    }

    /// Whether the placement being served has not reached etcd yet.
    pub(super) fn unpublished(&self) -> bool {
        match (&self.etcd, self.model.state()) {
            (Some(_), ServingState::Ready(p)) => self.published.load(Ordering::SeqCst) != p.epoch,
            _ => false,
        }
    }

    /// One bounded request to etcd on the engine's connection: `call` gets the client. Fails
    /// with UNAVAILABLE when etcd errs or does not answer within 5 s (connecting included).
    pub(crate) async fn etcd_call<T, F, Fut>(&self, call: F) -> Result<T, ServeError>
    where
        F: FnOnce(shardserve::membership::etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, shardserve::membership::etcd_client::Error>>,
    {
        let run = async {
            let client = self.etcd_client().await.ok_or_else(|| ServeError::Internal("this coordinator has no etcd".into()))?;
            let answer = match client {
                Ok(c) => call(c).await,
                Err(e) => Err(e),
            };
            answer.map_err(|e| ServeError::Unavailable(format!("etcd: {e}")))
        };
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap_or_else(|_| Err(ServeError::Unavailable("etcd did not answer within 5 s".into())))
    }

    /// The engine's etcd client (connecting on first use); `None` without etcd.
    pub(super) async fn etcd_client(
        &self,
    ) -> Option<Result<shardserve::membership::etcd_client::Client, shardserve::membership::etcd_client::Error>> {
        let (etcd, _) = self.etcd.as_ref()?;
        let mut cached = self.etcd_client.lock().await;
        if let Some(c) = cached.as_ref() {
            return Some(Ok(c.clone()));
        }
        match etcd.connect().await {
            Ok(c) => {
                *cached = Some(c.clone());
                Some(Ok(c))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// What `placements/<model>` holds: the leader's plan, for the other coordinators to serve.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct PlacementRecord {
    model: String,
    epoch: u64,
    stages: Vec<StageRecord>,
}

/// One stage of a [`PlacementRecord`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StageRecord {
    worker: String,
    address: String,
    /// Start and (exclusive) end.
    layers: [usize; 2],
    bytes: u64,
    #[serde(default)]
    followers: Vec<RankRecord>,
    kv_blocks: usize,
    kv_block_size: usize,
}

/// A tensor-parallel rank above 0 of a stage.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct RankRecord {
    worker: String,
    address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_record_round_trips_and_a_missing_field_is_an_error() {
        let r = PlacementRecord {
            model: "m".into(),
            epoch: 7,
            stages: vec![StageRecord {
                worker: "w0".into(),
                address: "127.0.0.1:1".into(),
                layers: [0, 4],
                bytes: 10,
                followers: vec![RankRecord { worker: "w1".into(), address: "127.0.0.1:2".into() }],
                kv_blocks: 64,
                kv_block_size: 16,
            }],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<PlacementRecord>(&text).unwrap(), r);
        let no_kv = text.replace(",\"kv_blocks\":64", "");
        assert!(serde_json::from_str::<PlacementRecord>(&no_kv).unwrap_err().to_string().contains("kv_blocks"));
    }
}
