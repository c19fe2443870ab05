//! What a request can fail with, and the one place each cause becomes a gRPC status.

use tonic::{Code, Status};

/// A request's failure, one variant per cause DESIGN.md lists (and a typed one for each cause
/// the scheduler knows in detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    InvalidArgument(String),
    /// prompt + max_new_tokens could never fit the smallest stage's KV pool.
    #[error("prompt + max_new_tokens = {tokens} tokens can never fit the KV cache: the smallest stage's pool holds {capacity} tokens")]
    TooLargeForKv { tokens: usize, capacity: usize },
    #[error("{0}")]
    NotFound(String),
    /// The model is still loading.
    #[error("{0}")]
    Loading(String),
    /// Too many requests in flight, or KV memory full.
    #[error("{0}")]
    Exhausted(String),
    /// The queue of requests waiting for admission is full.
    #[error("the queue of model {model} is full: {limit} requests are waiting (max_waiting = {limit})")]
    QueueFull { model: String, limit: usize },
    /// The client did not read its stream: it was cancelled rather than hold up the others.
    #[error(
        "the client did not read its stream: {buffered} tokens were waiting for it, so it was cancelled (max_buffered_tokens = {buffered})"
    )]
    ClientTooSlow { buffered: usize },
    /// No healthy placement, or a stage died.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client went away.
    #[error("{0}")]
    Cancelled(String),
    /// The Kubernetes API refused or failed a request (scaling the worker StatefulSet); `code`
    /// is its HTTP status, 0 when none came.
    #[error("Kubernetes API, {what}: {message}")]
    Kubernetes { what: String, code: u16, message: String },
    /// A bug.
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    /// The gRPC code of this cause.
    pub fn code(&self) -> Code {
        match self {
            ServeError::InvalidArgument(_) | ServeError::TooLargeForKv { .. } => Code::InvalidArgument,
            ServeError::NotFound(_) => Code::NotFound,
            ServeError::Loading(_) => Code::FailedPrecondition,
            ServeError::Exhausted(_) | ServeError::QueueFull { .. } | ServeError::ClientTooSlow { .. } => Code::ResourceExhausted,
            ServeError::Unavailable(_) => Code::Unavailable,
            ServeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServeError::Cancelled(_) => Code::Cancelled,
            ServeError::Internal(_) => Code::Internal,
            ServeError::Kubernetes { code, .. } => match code {
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                404 => Code::NotFound,
                409 | 422 => Code::FailedPrecondition,
                429 => Code::ResourceExhausted,
                _ => Code::Unavailable,
            },
        }
    }

    /// Maps a status from a stage back to the cause it stands for.
    pub fn from_stage(code: Code, message: String) -> Self {
        match code {
            Code::Unavailable | Code::Aborted => ServeError::Unavailable(message),
            Code::DeadlineExceeded => ServeError::DeadlineExceeded(message),
            Code::Cancelled => ServeError::Cancelled(message),
            Code::ResourceExhausted => ServeError::Exhausted(message),
            Code::FailedPrecondition => ServeError::Unavailable(message),
            _ => ServeError::Internal(message),
        }
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        Status::new(e.code(), shardserve::brief(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_has_its_status() {
        let cases = [
            (ServeError::TooLargeForKv { tokens: 900, capacity: 512 }, Code::InvalidArgument, "900 tokens can never fit"),
            (ServeError::QueueFull { model: "m".into(), limit: 4 }, Code::ResourceExhausted, "queue of model m is full"),
            (ServeError::ClientTooSlow { buffered: 256 }, Code::ResourceExhausted, "did not read its stream"),
            (ServeError::Loading("still loading".into()), Code::FailedPrecondition, "still loading"),
            (ServeError::from_stage(Code::Unavailable, "stage gone".into()), Code::Unavailable, "stage gone"),
            (ServeError::from_stage(Code::DataLoss, "odd".into()), Code::Internal, "odd"),
            (
                ServeError::Kubernetes { what: "scaling StatefulSet w".into(), code: 404, message: "not found".into() },
                Code::NotFound,
                "Kubernetes API, scaling StatefulSet w: not found",
            ),
            (ServeError::Kubernetes { what: "x".into(), code: 0, message: "connection refused".into() }, Code::Unavailable, "refused"),
        ];
        for (e, code, text) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(s.message().contains(text), "{}", s.message());
        }
    }

    #[test]
    fn a_status_message_is_one_line() {
        let s = Status::from(ServeError::Internal("first\nsecond".into()));
        assert_eq!(s.message(), "first");
    }
}
