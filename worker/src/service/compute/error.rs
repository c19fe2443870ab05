//! Why a step, or one sequence of it, failed on this stage, and the status its caller gets:
//! the one place a step's failures are mapped to gRPC codes.

use shardserve::guide::GuideError;
use shardserve_proto::v1 as pb;
use tonic::Code;

/// Why one sequence (or a whole step) failed on this stage.
#[derive(Debug, thiserror::Error)]
pub(super) enum StepError {
    /// The step is for another placement than the one loaded here.
    #[error("worker {worker} was re-planned (placement {here} here, the step is for {step})")]
    Replanned { worker: String, here: u64, step: u64 },
    /// The sequence was released before this step arrived (its request ended).
    #[error("sequence {0} was released before this step arrived")]
    Released(u64),
    /// The sequence's state is not here (the worker restarted or reloaded).
    #[error("sequence {seq} is unknown on worker {worker} (its state was lost)")]
    Lost { seq: u64, worker: String },
    /// The step's description of the sequence is wrong.
    #[error("sequence {seq}: {why}")]
    Invalid { seq: u64, why: String },
    /// No KV blocks left for the sequence's new tokens.
    #[error("worker {worker}: sequence {seq}: {source}")]
    KvFull {
        worker: String,
        seq: u64,
        #[source]
        source: shardserve::Error,
    },
    /// The forward pass failed.
    #[error("worker {worker}: {source}")]
    Forward {
        worker: String,
        #[source]
        source: shardserve::Error,
    },
    /// The step comes from a scheduler whose term is older than the one that owns the pool now
    /// (a deposed coordinator leader).
    #[error("worker {worker}: the KV pool {} (term {here}; this step is of term {step})", shardserve::model::kv::FENCED)]
    Fenced { worker: String, here: u64, step: u64 },
    /// The tensor-parallel group broke: the stage is gone as far as the caller can tell.
    #[error("{0}")]
    Group(String),
    /// The step itself is malformed (its hidden states, say).
    #[error("worker {worker}: {why}")]
    Malformed { worker: String, why: String },
    /// A constrained sequence's grammar failed while it was being generated.
    #[error("worker {worker}: sequence {seq}: {source}")]
    Grammar {
        worker: String,
        seq: u64,
        #[source]
        source: GuideError,
    },
}

impl StepError {
    /// The status a caller gets for it.
    pub(super) fn code(&self) -> Code {
        match self {
            // The worker is alive but serves a newer placement: the caller's plan is stale.
            StepError::Replanned { .. } | StepError::Fenced { .. } => Code::Aborted,
            StepError::Lost { .. } | StepError::Group(_) => Code::Unavailable,
            StepError::Released(_) => Code::Cancelled,
            StepError::Invalid { .. } | StepError::Malformed { .. } => Code::InvalidArgument,
            StepError::KvFull { .. } => Code::ResourceExhausted,
            StepError::Forward { .. } | StepError::Grammar { .. } => Code::Internal,
        }
    }

    /// The result a caller gets for sequence `seq_id` failing with it.
    pub(super) fn result(&self, seq_id: u64) -> pb::SequenceResult {
        pb::SequenceResult { seq_id, error: shardserve::brief(self), code: self.code() as i32, ..Default::default() }
    }
}
