//! Errors as OpenAI's clients read them: `{"error": {"message", "type", "param", "code"}}` with
//! the HTTP status, mapped from the transport-free [`RequestError`] in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::scheduler::request::RequestError;

/// An OpenAI-style error body with its HTTP status.
pub(super) struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    /// 499, nginx's "client closed request", as vLLM answers a request cancelled before its end.
    pub fn cancelled(why: &str) -> Self {
        ApiError {
            status: StatusCode::from_u16(499).expect("a valid status code"),
            kind: "cancelled",
            message: why.to_string(),
            param: None,
        }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
        }
    }
}

/// HTTP's view of a refused request: the one place its status codes and OpenAI error types
/// are chosen, and `param` named as this API's JSON spells the field.
impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let (status, kind, param) = match &e {
            RequestError::Invalid { field, .. } => {
                // `sampling.top_k` is `top_k` here, `prompt.token_ids` is `prompt`, `stop[2]` is `stop`.
                let field = field.strip_prefix("sampling.").unwrap_or(field);
                let param = field.split(['.', '[']).next().unwrap_or(field).to_string();
                (StatusCode::BAD_REQUEST, "invalid_request_error", Some(param))
            }
            RequestError::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None),
            RequestError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None),
            RequestError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None),
        };
        ApiError { status, kind, message: e.to_string(), param }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

/// A JSON body, with a malformed one answered in OpenAI's error format.
pub(super) struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            // 413 for a body over the limit, 400 for one that is not the schema's JSON.
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                kind: "invalid_request_error",
                message: format!("the request body exceeds {} MiB", crate::api::MAX_MESSAGE_BYTES >> 20),
                param: None,
            }),
            Err(e) => Err(ApiError::invalid(e.body_text(), None)),
        }
    }
}
