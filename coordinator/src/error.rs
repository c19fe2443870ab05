//! What a request can fail with, and the one place each cause becomes a gRPC status.

use tonic::Status;

/// A request's failure, one variant per cause DESIGN.md lists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The model is still loading.
    #[error("{0}")]
    Loading(String),
    /// Queue or KV memory full.
    #[error("{0}")]
    Exhausted(String),
    /// No healthy placement, or a stage died.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client went away.
    #[error("{0}")]
    Cancelled(String),
    /// A bug.
    #[error("{0}")]
    Internal(String),
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        let e = e.map(|m| shardserve::brief(&m));
        match e {
            ServeError::InvalidArgument(m) => Status::invalid_argument(m),
            ServeError::NotFound(m) => Status::not_found(m),
            ServeError::Loading(m) => Status::failed_precondition(m),
            ServeError::Exhausted(m) => Status::resource_exhausted(m),
            ServeError::Unavailable(m) => Status::unavailable(m),
            ServeError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ServeError::Cancelled(m) => Status::cancelled(m),
            ServeError::Internal(m) => Status::internal(m),
        }
    }
}

impl ServeError {
    fn map(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            ServeError::InvalidArgument(m) => ServeError::InvalidArgument(f(m)),
            ServeError::NotFound(m) => ServeError::NotFound(f(m)),
            ServeError::Loading(m) => ServeError::Loading(f(m)),
            ServeError::Exhausted(m) => ServeError::Exhausted(f(m)),
            ServeError::Unavailable(m) => ServeError::Unavailable(f(m)),
            ServeError::DeadlineExceeded(m) => ServeError::DeadlineExceeded(f(m)),
            ServeError::Cancelled(m) => ServeError::Cancelled(f(m)),
            ServeError::Internal(m) => ServeError::Internal(f(m)),
        }
    }

    /// Maps a status from a stage back to the cause it stands for.
    pub fn from_stage(code: tonic::Code, message: String) -> Self {
        match code {
            tonic::Code::Unavailable => ServeError::Unavailable(message),
            tonic::Code::DeadlineExceeded => ServeError::DeadlineExceeded(message),
            tonic::Code::Cancelled => ServeError::Cancelled(message),
            tonic::Code::ResourceExhausted => ServeError::Exhausted(message),
            tonic::Code::FailedPrecondition => ServeError::Unavailable(message),
            _ => ServeError::Internal(message),
        }
    }
}
