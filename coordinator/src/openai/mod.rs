//! The HTTP API beside gRPC (axum): OpenAI-compatible `POST /v1/completions` (streaming as
//! server-sent events ending in `data: [DONE]`) and `GET /v1/models`, `POST /v1/chat/completions`
//! (with the model's chat template; a clear 400 for a model without one), `GET /health`
//! (liveness), `GET /ready` (a group is serving) and `GET /metrics` (Prometheus).
//!
//! A request is translated into the gRPC `GenerateRequest` and goes through the same validation
//! and scheduler. While a long prompt prefills, a stream carries its progress as SSE comment
//! lines (`: prefill 40960/1048576`), which clients ignore and people can watch with curl.
//! Streams follow OpenAI's `stream_options` (`include_usage`: a last chunk with the usage and no
//! choices) and vLLM's `continuous_usage_stats` (the usage so far in every chunk).

mod chat_completions;
mod completions;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use tonic::{Code, Status};
use yoco_proto::v1 as pb;

use crate::api::Api;
use crate::auth::ApiKeys;
use crate::request::RequestError;

/// The HTTP API; with `keys`, every route but the health probes needs an API key.
pub fn router(api: Api, keys: Option<Arc<ApiKeys>>) -> Router {
    let guarded = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat_completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache));
    let guarded = match keys {
        Some(keys) => guarded.route_layer(axum::middleware::from_fn_with_state(keys, require_key)),
        None => guarded,
    };
    // Request bodies up to the gRPC API's message size: a million-token prompt is several MB
    // (axum's default would refuse anything over 2 MB).
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .merge(guarded)
        .layer(axum::extract::DefaultBodyLimit::max(crate::api::MAX_MESSAGE_BYTES))
        .with_state(api)
}

/// 401 with OpenAI's body for a missing or wrong key; nothing else is said.
async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match keys.check(header) {
        Some(id) => {
            req.extensions_mut().insert(id);
            next.run(req).await
        }
        None => ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            message: "invalid or missing API key (send `Authorization: Bearer <key>`)".into(),
            param: None,
        }
        .into_response(),
    }
}

/// vLLM's admin call of the same name: drops every cached prompt prefix.
async fn reset_prefix_cache(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let (dropped, in_use) = api.flush_prefix_cache().await?;
    Ok(Json(json!({"dropped": dropped, "in_use": in_use})))
}

/// An OpenAI-style error body with its HTTP status.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
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

/// A status from a call that is not a request's admission (a request that ended in an error,
/// an admin call).
impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let (status, kind) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            Code::DeadlineExceeded | Code::Cancelled => (StatusCode::from_u16(499).expect("valid"), "cancelled"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        ApiError { status, kind, message: s.message().to_string(), param: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

/// A JSON body, with a malformed one answered in OpenAI's error format.
struct Body<T>(T);

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

fn model_name(api: &Api) -> Result<String, ApiError> {
    let ready = api.ready()?;
    let dir = std::path::Path::new(&ready.group.model_dir);
    Ok(dir.file_name().map_or_else(|| ready.group.model_dir.clone(), |n| n.to_string_lossy().into_owned()))
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let name = model_name(&api)?;
    let max = api.ready()?.limits.max_request_tokens;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": name, "object": "model", "created": now_unix(), "owned_by": "yoco", "max_model_len": max}],
    })))
}

async fn ready(State(api): State<Api>) -> Response {
    match api.ready() {
        Ok(r) if r.scheduler.accepting() => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "reason": "draining or failed"})))
            .into_response(),
        Err(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "reason": "starting"}))).into_response()
        }
    }
}

/// Prometheus text; the per-rank cache gauges are read from the workers at scrape time.
async fn metrics(State(api): State<Api>) -> Response {
    use crate::metrics::METRICS;
    let (mut used, mut cap, mut snapshots, mut blocks) = (0u64, 0u64, 0, 0);
    for ready in api.router().all() {
        if let Some(p) = ready.scheduler.prefix_stats() {
            (snapshots, blocks) = (snapshots + p.snapshots, blocks + p.blocks);
        }
        let Ok(infos) = ready.group.info().await else { continue };
        for info in &infos {
            let labels = [ready.name.as_str(), &info.rank.to_string()];
            METRICS.cache_used_bytes.with_label_values(&labels).set(info.cache_used_bytes as i64);
            METRICS.cache_capacity_bytes.with_label_values(&labels).set(info.cache_budget_bytes as i64);
            let frac = info.cache_used_bytes as f64 / info.cache_budget_bytes.max(1) as f64;
            METRICS.cache_usage.with_label_values(&labels).set(frac);
            used += info.cache_used_bytes;
            cap += info.cache_budget_bytes;
        }
    }
    METRICS.group_cache_usage.set(used as f64 / cap.max(1) as f64);
    METRICS.prefix_cache_snapshots.set(snapshots as i64);
    METRICS.prefix_cache_blocks.set(blocks as i64);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], METRICS.render()).into_response()
}

/// The sampling and stopping fields both endpoints share (OpenAI's, and vLLM's `top_k`,
/// `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Deserialize)]
struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
}

impl Sampling {
    /// A generation request for `prompt` with these settings.
    fn request(&self, prompt: pb::generate_request::Prompt, max_tokens: u32) -> Result<pb::GenerateRequest, ApiError> {
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
enum Stop {
    One(String),
    Many(Vec<String>),
}

fn check_model(name: &str, asked: &Option<String>) -> Result<(), ApiError> {
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

fn finish_reason(f: &pb::Finished) -> Option<&'static str> {
    match pb::FinishReason::try_from(f.reason).unwrap_or_default() {
        pb::FinishReason::Length => Some("length"),
        pb::FinishReason::Stop => Some("stop"),
        _ => None,
    }
}

/// OpenAI's `stream_options`, with vLLM's `continuous_usage_stats`.
#[derive(Deserialize, Default, Clone, Copy)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    #[serde(default)]
    continuous_usage_stats: bool,
}

impl StreamOptions {
    /// The options of a request; refused without `stream`, as OpenAI and vLLM do.
    fn of(options: Option<StreamOptions>, stream: bool) -> Result<StreamOptions, ApiError> {
        match options {
            Some(_) if !stream => {
                Err(ApiError::invalid("stream_options is only allowed when stream is true", Some("stream_options")))
            }
            o => Ok(o.unwrap_or_default()),
        }
    }
}

/// Token counts of a stream, each choice's and in all.
#[derive(Default, Clone, Copy)]
struct Counts {
    prompt: u64,
    completion: u64,
    cached: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        (self.prompt, self.completion, self.cached) =
            (self.prompt + o.prompt, self.completion + o.completion, self.cached + o.cached);
    }

    fn of(u: &pb::Usage) -> Counts {
        Counts { prompt: u.prompt_tokens, completion: u.completion_tokens, cached: u.cached_prompt_tokens }
    }

    /// OpenAI's usage object; `cached_tokens` counts the prompt tokens served by the prefix cache.
    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt, "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// The server-sent events of one streamed response: chunks of one object type, progress
/// comments, the usage chunk, `[DONE]`. Every send says whether the client is still there.
struct Chunks {
    tx: UnboundedSender<Result<SseEvent, Infallible>>,
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    options: StreamOptions,
}

impl Chunks {
    /// The channel's other end as the HTTP response.
    fn response(rx: tokio::sync::mpsc::UnboundedReceiver<Result<SseEvent, Infallible>>) -> Response {
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        axum::response::sse::Sse::new(events).keep_alive(KeepAlive::default()).into_response()
    }

    fn data(&self, v: &Value) -> bool {
        self.tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok()
    }

    /// A chunk with one choice; `so_far` is that choice's usage up to now, sent in the chunk
    /// with `continuous_usage_stats` (and `null` in its place with `include_usage` alone).
    fn chunk(&self, choice: Value, so_far: Counts) -> bool {
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                           "choices": [choice]});
        if self.options.include_usage || self.options.continuous_usage_stats {
            v["usage"] = if self.options.continuous_usage_stats { so_far.json() } else { Value::Null };
        }
        self.data(&v)
    }

    fn progress(&self, p: &pb::PrefillProgress) -> bool {
        let comment = format!("prefill {}/{}", p.prefilled_tokens, p.prompt_tokens);
        self.tx.send(Ok(SseEvent::default().comment(comment))).is_ok()
    }

    /// The end of a stream whose choices all finished: the usage chunk (if asked), `[DONE]`.
    fn done(&self, total: Counts) -> bool {
        if self.options.include_usage {
            let v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                           "choices": [], "usage": total.json()});
            if !self.data(&v) {
                return false;
            }
        }
        self.tx.send(Ok(SseEvent::default().data("[DONE]"))).is_ok()
    }

    /// A stream that cannot go on: an error object, and no `[DONE]`.
    fn error(&self, message: &str) -> bool {
        self.data(&json!({"error": {"message": message, "type": "server_error"}}))
    }
}

/// What a request's events end in: its final message, or why there is none.
fn outcome(finished: Option<pb::Finished>, failure: Option<Status>) -> Result<(pb::Finished, &'static str), ApiError> {
    let f = finished.ok_or_else(|| failure.clone().unwrap_or_else(|| Status::internal("no final message")))?;
    match finish_reason(&f) {
        Some(reason) => Ok((f, reason)),
        None => Err(failure.unwrap_or_else(|| Status::cancelled(f.error.clone())).into()),
    }
}
