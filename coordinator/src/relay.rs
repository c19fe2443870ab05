//! One scheduler per model, however many coordinators serve it.
//!
//! With several coordinators on one etcd, the elected leader alone schedules each model: its
//! scheduler owns every KV pool of the model, so admission never promises a block another
//! coordinator has promised too, and one prefix cache serves every coordinator's clients. The
//! others (followers) validate and tokenize their clients' requests as before, then hand each
//! to the leader over `Relay.Submit` and stream its events back; the client's own credentials
//! travel with it, so the leader checks them (and derives the tenant from them) itself.
//!
//! The leader is found through the etcd election it won: its value is a [`LeaderRecord`]
//! naming its gRPC address. The stages fence older leaders off (see the worker's `owner`), so a
//! deposed leader that still runs cannot write into pools the new one schedules.

use crate::engine::to_event;
pub use crate::engine::{Credential, LeaderRecord, Peers};
use shardserve_proto::v1 as pb;
use std::sync::Arc;
use tokio::sync::mpsc;

/// `Relay`, on the leader: runs what the other coordinators hand it.
pub struct RelayService(pub Arc<crate::models::Models>);

type EventStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RelayEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::relay_server::Relay for RelayService {
    type SubmitStream = EventStream;

    async fn submit(&self, request: tonic::Request<pb::RelayRequest>) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let caller = crate::service::Caller::of(request.metadata());
        let r = request.into_inner();
        let (engine, model) = self.0.find(&r.model)?;
        let mut valid = crate::validate::validate_relayed(&model, &r)?;
        caller.apply(&mut valid, engine.config().prefix_cache_scope);
        let id = if r.request_id.is_empty() { format!("{:016x}", crate::util::random_u64()) } else { r.request_id.clone() };
        let span = tracing::info_span!("relayed", request_id = %id, model = %model.name, replica = tracing::field::Empty);
        let mut handle = tracing::Instrument::instrument(engine.submit_here(&model, valid, id), span).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::RelayEvent, tonic::Status>>(16);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = handle.next() => match ev {
                        Some(ev) => ev,
                        None => break,
                    },
                    // The follower went away (its client did): dropping the handle cancels.
                    _ = tx.closed() => return,
                };
                if tx.send(Ok(to_event(ev))).await.is_err() {
                    return;
                }
            }
            if let Err(e) = handle.outcome().await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
