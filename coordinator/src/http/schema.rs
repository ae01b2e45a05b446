//! What the OpenAI endpoints share: the sampling and stop fields, the model check, usage
//! counts, and the server-sent events of a streamed answer with OpenAI's `stream_options`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use yoco_proto::v1 as pb;

use super::error::ApiError;
use crate::api::Api;
use crate::scheduler::event::{End, Finished, Progress, Usage};
use crate::scheduler::request::RequestError;

pub(super) fn model_name(api: &Api) -> Result<String, ApiError> {
    let ready = api.ready()?;
    let dir = std::path::Path::new(&ready.group.model_dir);
    Ok(dir.file_name().map_or_else(|| ready.group.model_dir.clone(), |n| n.to_string_lossy().into_owned()))
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The sampling and stopping fields both endpoints share (OpenAI's, and vLLM's `top_k`,
/// `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Deserialize)]
pub(super) struct Sampling {
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<i64>,
    pub(super) stop: Option<Stop>,
    pub(super) presence_penalty: Option<f32>,
    pub(super) frequency_penalty: Option<f32>,
    pub(super) top_k: Option<u32>,
    pub(super) min_p: Option<f32>,
    pub(super) repetition_penalty: Option<f32>,
    #[serde(default)]
    pub(super) ignore_eos: bool,
}

impl Sampling {
    /// A generation request for `prompt` with these settings.
    pub(super) fn request(
        &self,
        prompt: pb::generate_request::Prompt,
        max_tokens: u32,
    ) -> Result<pb::GenerateRequest, ApiError> {
        let seed = match self.seed {
            Some(s) if s < 0 => return Err(ApiError::invalid("seed must be >= 0", Some("seed"))),
            s => s.map(|s| s as u64),
        };
        Ok(pb::GenerateRequest {
            prompt: Some(prompt),
            max_tokens: Some(max_tokens),
            sampling: Some(pb::SamplingParams {
                // OpenAI's default temperature is 1.
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p,
                top_k: self.top_k.unwrap_or(0),
                min_p: self.min_p.unwrap_or(0.0),
                seed,
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            }),
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            stop_token_ids: Vec::new(),
            ignore_eos: self.ignore_eos,
            logprobs: 0,
            prompt_logprobs: false,
            request_id: String::new(),
        })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

pub(super) fn check_model(name: &str, asked: &Option<String>) -> Result<(), ApiError> {
    match asked {
        Some(m) if !m.is_empty() && m != name => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!("the model `{m}` does not exist; this server serves `{name}`"),
            param: Some("model".into()),
        }),
        _ => Ok(()),
    }
}

/// OpenAI's `finish_reason` of a request's end, or the error to answer with for one that failed
/// or was cancelled.
pub(super) fn finish_reason(end: &End) -> Result<&'static str, ApiError> {
    match end {
        End::Length => Ok("length"),
        End::StopString(_) | End::StopToken(_) => Ok("stop"),
        End::Cancelled(why) => Err(ApiError::cancelled(why)),
        End::Failed(e) => Err(e.clone().into()),
    }
}

/// OpenAI's `stream_options`, with vLLM's `continuous_usage_stats`.
#[derive(Deserialize, Default, Clone, Copy)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
    #[serde(default)]
    pub(super) continuous_usage_stats: bool,
}

impl StreamOptions {
    /// The options of a request; refused without `stream`, as OpenAI and vLLM do.
    pub(super) fn of(options: Option<StreamOptions>, stream: bool) -> Result<StreamOptions, ApiError> {
        match options {
            Some(_) if !stream => {
                Err(ApiError::invalid("stream_options is only allowed when stream is true", Some("stream_options")))
            }
            o => Ok(o.unwrap_or_default()),
        }
    }
}

/// OpenAI's usage object; `cached_tokens` counts the prompt tokens served by the prefix cache.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// The usage of a request of several choices: each choice's, summed.
pub(super) fn add_usage(total: &mut Usage, u: &Usage) {
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += u.completion_tokens;
    total.cached_prompt_tokens += u.cached_prompt_tokens;
}

/// The server-sent events of one streamed response: chunks of one object type, progress
/// comments, the usage chunk, `[DONE]`. Every send says whether the client is still there.
pub(super) struct Chunks {
    pub(super) tx: UnboundedSender<Result<SseEvent, Infallible>>,
    pub(super) id: String,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) options: StreamOptions,
}

impl Chunks {
    /// The channel's other end as the HTTP response.
    pub(super) fn response(rx: tokio::sync::mpsc::UnboundedReceiver<Result<SseEvent, Infallible>>) -> Response {
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        axum::response::sse::Sse::new(events).keep_alive(KeepAlive::default()).into_response()
    }

    pub(super) fn data(&self, v: &Value) -> bool {
        self.tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok()
    }

    /// A chunk with one choice; `so_far` is that choice's usage up to now, sent in the chunk
    /// with `continuous_usage_stats` (and `null` in its place with `include_usage` alone).
    pub(super) fn chunk(&self, choice: Value, so_far: &Usage) -> bool {
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                           "choices": [choice]});
        if self.options.include_usage || self.options.continuous_usage_stats {
            v["usage"] = if self.options.continuous_usage_stats { usage_json(so_far) } else { Value::Null };
        }
        self.data(&v)
    }

    pub(super) fn progress(&self, p: &Progress) -> bool {
        let comment = format!("prefill {}/{}", p.prefilled_tokens, p.prompt_tokens);
        self.tx.send(Ok(SseEvent::default().comment(comment))).is_ok()
    }

    /// The end of a stream whose choices all finished: the usage chunk (if asked), `[DONE]`.
    pub(super) fn done(&self, total: &Usage) -> bool {
        if self.options.include_usage {
            let v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                           "choices": [], "usage": usage_json(total)});
            if !self.data(&v) {
                return false;
            }
        }
        self.tx.send(Ok(SseEvent::default().data("[DONE]"))).is_ok()
    }

    /// A stream that cannot go on: an error object, and no `[DONE]`.
    pub(super) fn error(&self, message: &str) -> bool {
        self.data(&json!({"error": {"message": message, "type": "server_error"}}))
    }
}

/// What a request's events end in: its final message with OpenAI's finish reason, or the
/// error to answer with (a request that failed, was cancelled, or ended without a final message).
pub(super) fn outcome(finished: Option<Finished>) -> Result<(Finished, &'static str), ApiError> {
    let f = finished.ok_or_else(|| RequestError::Internal("the request ended without its final message".into()))?;
    let reason = finish_reason(&f.end)?;
    Ok((f, reason))
}
