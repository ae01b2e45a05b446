//! What a request's stream says, in no transport's terms: the gRPC service (`api/grpc.rs`) and
//! the HTTP API (`http/`) each turn these into their own messages, in one place each.

use yoco_worker::plan::{PromptLogprob, Sampled};

use super::request::RequestError;

/// One event of a request's stream; `Finished` is the last.
#[derive(Debug, Clone)]
pub enum Event {
    /// After each prefill step of a prompt that takes more than one.
    Progress(Progress),
    /// The prompt's tokens after the first, each with its log-probability given those before it
    /// (and the most likely tokens at its position, when asked): sent once, before the first
    /// generated token, when the request asked for them.
    PromptLogprobs(Vec<PromptLogprob>),
    /// Generated tokens and the text they complete.
    Tokens(TokenChunk),
    Finished(Finished),
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub prefilled_tokens: usize,
    pub prompt_tokens: usize,
    /// Seconds since the prefill started.
    pub elapsed_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct TokenChunk {
    pub tokens: Vec<Sampled>,
    /// Whole UTF-8 characters; text that may begin a stop string is held back until it is
    /// clear whether it does.
    pub text: String,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Length,
    StopString(String),
    StopToken(u32),
    /// By the client (it went away), its deadline, or a drain that ran out of time.
    Cancelled(String),
    Failed(RequestError),
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served by the prefix cache instead of prefilled.
    pub cached_prompt_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// From arrival to the start of its prefill.
    pub queue_seconds: f64,
    pub time_to_first_token_seconds: f64,
    /// Prompt tokens per second of prefill (first prefill step to first token).
    pub prefill_tokens_per_second: f64,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_second: f64,
    pub total_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub end: End,
    pub usage: Usage,
    pub timing: Timing,
    /// The seed the request's sampler used.
    pub seed: u64,
}
