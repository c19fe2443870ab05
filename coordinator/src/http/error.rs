//! Errors of the HTTP API in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
//! with the HTTP status that matches each cause's gRPC code (the one mapping of both APIs).

use crate::error::ServeError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// An error a client of the HTTP API gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 about the request itself.
    pub fn invalid(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param }
    }

    /// A 400 for a field this server does not support (named, never ignored).
    pub fn unsupported(field: &str, why: &str) -> Self {
        Self::invalid(format!("{field} is not supported{why}"), Some(field.to_string()))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into(), param: None }
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl From<crate::frontend::chat::InvalidChat> for ApiError {
    fn from(e: crate::frontend::chat::InvalidChat) -> Self {
        ApiError::invalid(e.message, Some(e.param.to_string()))
    }
}

/// The HTTP status of a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let status = http_status(e.code());
        let param = match &e {
            ServeError::TooLargeForKv { .. } => Some("max_tokens".to_string()),
            _ => None,
        };
        ApiError { status, message: shardserve::brief(&e), param }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        super::json(self.status, &self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_gets_the_status_of_its_grpc_code() {
        let cases = [
            (ServeError::InvalidArgument("bad".into()), 400),
            (ServeError::TooLargeForKv { tokens: 10, capacity: 5 }, 400),
            (ServeError::NotFound("no model".into()), 404),
            (ServeError::QueueFull { model: "m".into(), limit: 1 }, 429),
            (ServeError::Exhausted("kv".into()), 429),
            (ServeError::Loading("loading".into()), 503),
            (ServeError::Unavailable("gone".into()), 503),
            (ServeError::DeadlineExceeded("slow".into()), 504),
            (ServeError::Internal("bug".into()), 500),
        ];
        for (e, status) in cases {
            let message = shardserve::brief(&e);
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status, "{message}");
            assert_eq!(a.body()["error"]["message"], message);
            assert_eq!(a.body()["error"]["code"], status);
        }
    }

    #[test]
    fn the_body_has_openais_shape() {
        let a = ApiError::unsupported("logit_bias", "");
        assert_eq!(
            a.body(),
            serde_json::json!({"error": {"message": "logit_bias is not supported", "type": "invalid_request_error", "param": "logit_bias", "code": 400}})
        );
        assert_eq!(ApiError::from(ServeError::QueueFull { model: "m".into(), limit: 2 }).body()["error"]["type"], "rate_limit_error");
    }
}
