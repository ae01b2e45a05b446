//! The scheduler's request types: a checked request (made only by validation at the edge,
//! `api::validate`), what a group can take, and why a request is refused or cannot run.

use std::time::Instant;

use yoco_worker::sampling::SamplingParams;

/// What the group can take: checked against every request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub vocab_size: usize,
    /// Prompt + max_tokens of one request (the whole group's cache).
    pub max_request_tokens: usize,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// The request's stop tokens plus, unless `ignore_eos`, the end-of-text token.
    pub stop_token_ids: Vec<u32>,
    pub top_logprobs: usize,
    pub prompt_logprobs: bool,
    pub arrived: Instant,
    pub deadline: Option<Instant>,
    /// What the request holds for as long as it lives (the caller's API-key stream slot):
    /// dropped when the request ends, however it ends.
    pub hold: Option<Hold>,
}

/// Why a request was not taken, in no transport's terms: gRPC maps it to a status
/// (`api.rs`), HTTP to a status code and an OpenAI error body (`openai/`), each in one place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A field breaks a rule. `field` is its path in `GenerateRequest` (`sampling.top_k`,
    /// `stop[2]`, `prompt.token_ids`); the message says the rule and the limit.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Work in flight is at a limit (the queue, an API key's streams): retry later.
    #[error("{0}")]
    Busy(String),
    /// Nothing can serve it now: no group yet, draining, or the group failed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl RequestError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        RequestError::Invalid { field: field.into(), message: message.to_string() }
    }
}

/// Something a request keeps alive until it ends (a stream slot whose drop frees it), of a type
/// the scheduler need not know.
#[derive(Clone)]
pub struct Hold(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}
