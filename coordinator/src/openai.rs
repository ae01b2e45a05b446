//! The HTTP API beside gRPC (axum): OpenAI-compatible `POST /v1/completions` (streaming as
//! server-sent events ending in `data: [DONE]`) and `GET /v1/models`, `POST /v1/chat/completions`
//! (with the model's chat template; a clear 400 for a model without one), `GET /health`
//! (liveness), `GET /ready` (a group is serving) and `GET /metrics` (Prometheus).
//!
//! A request is translated into the gRPC `GenerateRequest` and goes through the same validation
//! and scheduler. While a long prompt prefills, a stream carries its progress as SSE comment
//! lines (`: prefill 40960/1048576`), which clients ignore and people can watch with curl.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::{Code, Status};
use yoco_proto::v1 as pb;
use yoco_proto::v1::generate_response::Event;

use crate::api::Api;
use crate::auth::{ApiKeys, KeyId};

/// The HTTP API; with `keys`, every route but the health probes needs an API key.
pub fn router(api: Api, keys: Option<Arc<ApiKeys>>) -> Router {
    let guarded = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
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

/// OpenAI's usage object; `cached_tokens` counts the prompt tokens served by the prefix cache.
fn usage_json(u: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
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

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let (status, kind) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            Code::DeadlineExceeded | Code::Cancelled => (StatusCode::from_u16(499).expect("valid"), "cancelled"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        // Our messages start with the field name: `max_tokens: ...`.
        let param = s.message().split_once(':').map(|(f, _)| f.to_string()).filter(|f| !f.contains(' '));
        ApiError { status, kind, message: s.message().to_string(), param }
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

/// `POST /v1/chat/completions`, for a model whose directory has a chat template.
#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<crate::chat::Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(default)]
    stream: bool,
    n: Option<u32>,
    #[serde(flatten)]
    sampling: Sampling,
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
    fn request(self, prompt: pb::generate_request::Prompt, max_tokens: u32) -> Result<pb::GenerateRequest, ApiError> {
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
            stop: match self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            stop_token_ids: Vec::new(),
            ignore_eos: self.ignore_eos,
            logprobs: 0,
            prompt_logprobs: false,
            request_id: String::new(),
        })
    }
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

fn chat_logprobs(tok: &yoco_worker::tokenizer::Tokenizer, tokens: &[pb::Token]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top_logprobs
                .iter()
                .map(|a| json!({"token": tok.decode(&[a.token_id]), "logprob": a.logprob, "bytes": null}))
                .collect();
            json!({"token": tok.decode(&[t.id]), "logprob": t.logprob, "bytes": null, "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

async fn chat_completions(
    State(api): State<Api>,
    caller: Option<axum::Extension<KeyId>>,
    Body(req): Body<ChatRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let name = model_name(&api)?;
    check_model(&name, &req.model)?;
    if api.chat_template().is_none() {
        return Err(ApiError::invalid(
            format!(
                "model `{name}` has no chat template (tokenizer_config.json with `chat_template`); use /v1/completions"
            ),
            Some("messages"),
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages: at least one message is needed", Some("messages")));
    }
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    // Rendering and tokenizing a long conversation takes a while: off the async threads, so
    // that other requests are not held up.
    let (api2, messages) = (api.clone(), req.messages.clone());
    let ids = tokio::task::spawn_blocking(move || {
        let template = api2.chat_template().ok_or_else(|| ApiError::invalid("no chat template", Some("messages")))?;
        let text = template.render(&messages).map_err(|e| ApiError::invalid(e, Some("messages")))?;
        api2.tokenizer().encode_with_special(&text).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
    })
    .await
    .map_err(|e| ApiError::from(Status::internal(format!("tokenizing task: {e}"))))??;
    let top = if req.logprobs { req.top_logprobs.unwrap_or(0) } else { 0 };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(16);
    let prompt = pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids });
    let preq = pb::GenerateRequest { logprobs: top, ..req.sampling.request(prompt, max_tokens)? };
    let want_logprobs = req.logprobs;
    let (id, mut events) = api.submit(preq, arrived, None, caller.map(|c| c.0)).await?;
    let id = format!("chatcmpl-{id}");
    let created = now_unix();
    let tok = api.tokenizer().clone();
    if req.stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
        let chunk = move |delta: Value, logprobs: Value, finish: Option<&str>| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        };
        tokio::spawn(async move {
            let send = |v: Value| tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok();
            if !send(chunk(json!({"role": "assistant", "content": ""}), Value::Null, None)) {
                return;
            }
            while let Some(item) = events.recv().await {
                let ok = match item {
                    Ok(Event::Progress(p)) => tx
                        .send(Ok(
                            SseEvent::default().comment(format!("prefill {}/{}", p.prefilled_tokens, p.prompt_tokens))
                        ))
                        .is_ok(),
                    Ok(Event::Tokens(c)) => {
                        let lp = if want_logprobs { chat_logprobs(&tok, &c.tokens) } else { Value::Null };
                        send(chunk(json!({"content": c.text}), lp, None))
                    }
                    Ok(Event::Finished(f)) => match finish_reason(&f) {
                        Some(r) => {
                            send(chunk(json!({}), Value::Null, Some(r)))
                                && tx.send(Ok(SseEvent::default().data("[DONE]"))).is_ok()
                        }
                        None => send(json!({"error": {"message": f.error, "type": "server_error"}})),
                    },
                    _ => true,
                };
                if !ok {
                    return;
                }
            }
        });
        let sse = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        return Ok(Sse::new(sse).keep_alive(KeepAlive::default()).into_response());
    }
    let (mut text, mut tokens, mut finished, mut failure) = (String::new(), Vec::new(), None, None);
    while let Some(item) = events.recv().await {
        match item {
            Ok(Event::Tokens(c)) => {
                text.push_str(&c.text);
                tokens.extend(c.tokens);
            }
            Ok(Event::Finished(f)) => finished = Some(f),
            Ok(_) => {}
            Err(s) => failure = Some(s),
        }
    }
    let f = finished.ok_or_else(|| failure.clone().unwrap_or_else(|| Status::internal("no final message")))?;
    let Some(reason) = finish_reason(&f) else {
        return Err(failure.unwrap_or_else(|| Status::cancelled(f.error.clone())).into());
    };
    let usage = f.usage.unwrap_or_default();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": if want_logprobs { chat_logprobs(&tok, &tokens) } else { Value::Null },
                     "finish_reason": reason}],
        "usage": usage_json(&usage),
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    Batches(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`. Fields OpenAI defines that do not apply (`user`, `suffix`, `best_of`
/// 1, `n` 1) are accepted; vLLM's extensions `top_k`, `min_p`, `repetition_penalty`,
/// `ignore_eos` are too.
#[derive(Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    stream: bool,
    n: Option<u32>,
    best_of: Option<u32>,
    #[serde(flatten)]
    sampling: Sampling,
}

impl CompletionRequest {
    fn into_pb(self) -> Result<pb::GenerateRequest, ApiError> {
        if self.n.unwrap_or(1) != 1 || self.best_of.unwrap_or(1) != 1 {
            return Err(ApiError::invalid("only n = 1 and best_of = 1 are supported", Some("n")));
        }
        let prompt = match self.prompt {
            Prompt::Text(t) => pb::generate_request::Prompt::Text(t),
            Prompt::Ids(ids) => pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }),
            Prompt::Texts(mut v) if v.len() == 1 => pb::generate_request::Prompt::Text(v.remove(0)),
            Prompt::Batches(mut v) if v.len() == 1 => {
                pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: v.remove(0) })
            }
            _ => return Err(ApiError::invalid("one prompt per request", Some("prompt"))),
        };
        let (logprobs, prompt_logprobs) = (self.logprobs.unwrap_or(0), self.echo && self.logprobs.is_some());
        let req = self.sampling.request(prompt, self.max_tokens.unwrap_or(16))?;
        Ok(pb::GenerateRequest { logprobs, prompt_logprobs, ..req })
    }
}

fn finish_reason(f: &pb::Finished) -> Option<&'static str> {
    match pb::FinishReason::try_from(f.reason).unwrap_or_default() {
        pb::FinishReason::Length => Some("length"),
        pb::FinishReason::Stop => Some("stop"),
        _ => None,
    }
}

/// OpenAI's `logprobs` object for some tokens: their text, log-probabilities, alternatives and
/// the text offset of each.
#[derive(Default)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Value>>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    fn push(
        &mut self,
        tok: &yoco_worker::tokenizer::Tokenizer,
        id: u32,
        lp: Option<f32>,
        top: Option<Value>,
        at: usize,
    ) {
        self.tokens.push(tok.decode(&[id]));
        self.token_logprobs.push(lp);
        self.top_logprobs.push(top);
        self.text_offset.push(at);
    }

    fn json(&self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}

fn top_json(tok: &yoco_worker::tokenizer::Tokenizer, t: &pb::Token) -> Value {
    let mut m = serde_json::Map::new();
    for a in &t.top_logprobs {
        m.insert(tok.decode(&[a.token_id]), json!(a.logprob));
    }
    Value::Object(m)
}

async fn completions(
    State(api): State<Api>,
    caller: Option<axum::Extension<KeyId>>,
    Body(req): Body<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let name = model_name(&api)?;
    check_model(&name, &req.model)?;
    let (stream, echo, want_logprobs) = (req.stream, req.echo, req.logprobs.is_some());
    let preq = req.into_pb()?;
    let prompt_text = match &preq.prompt {
        Some(pb::generate_request::Prompt::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let prompt_ids = match &preq.prompt {
        Some(pb::generate_request::Prompt::TokenIds(ids)) => ids.ids.clone(),
        _ => Vec::new(),
    };
    let (id, events) = api.submit(preq, arrived, None, caller.map(|c| c.0)).await?;
    let id = format!("cmpl-{id}");
    let created = now_unix();
    let tok = api.tokenizer().clone();
    let echo_text = echo.then(|| prompt_text.clone().unwrap_or_else(|| tok.decode(&prompt_ids)));
    if stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
        let chunk = move |text: String, logprobs: Value, finish: Option<&str>| {
            json!({"id": id, "object": "text_completion", "created": created, "model": name,
                   "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]})
        };
        // Translates the request's events into SSE events; when the client goes away the send
        // fails, `events` is dropped, and the scheduler cancels the request.
        tokio::spawn(async move {
            let mut events = events;
            let mut offset = 0;
            let send = |e: SseEvent| tx.send(Ok(e)).is_ok();
            if let Some(text) = echo_text {
                offset += text.len();
                if !send(SseEvent::default().data(chunk(text, Value::Null, None).to_string())) {
                    return;
                }
            }
            while let Some(item) = events.recv().await {
                let ok = match item {
                    Ok(Event::Progress(p)) => {
                        send(SseEvent::default().comment(format!("prefill {}/{}", p.prefilled_tokens, p.prompt_tokens)))
                    }
                    Ok(Event::PromptLogprobs(_)) => true,
                    Ok(Event::Tokens(c)) => {
                        let logprobs = if want_logprobs {
                            let mut lp = Logprobs::default();
                            for t in &c.tokens {
                                lp.push(&tok, t.id, Some(t.logprob), Some(top_json(&tok, t)), offset);
                            }
                            lp.json()
                        } else {
                            Value::Null
                        };
                        offset += c.text.len();
                        send(SseEvent::default().data(chunk(c.text, logprobs, None).to_string()))
                    }
                    Ok(Event::Finished(f)) => match finish_reason(&f) {
                        Some(reason) => {
                            send(SseEvent::default().data(chunk(String::new(), Value::Null, Some(reason)).to_string()))
                                && send(SseEvent::default().data("[DONE]"))
                        }
                        None => {
                            let err = json!({"error": {"message": f.error, "type": "server_error"}});
                            send(SseEvent::default().data(err.to_string()))
                        }
                    },
                    Err(_) => true,
                };
                if !ok {
                    return;
                }
            }
        });
        let sse = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        return Ok(Sse::new(sse).keep_alive(KeepAlive::default()).into_response());
    }

    // Not streaming: collect everything, then answer once.
    let mut events = events;
    let (mut text, mut lp, mut finished, mut prompt_lps) = (String::new(), Logprobs::default(), None, None);
    let mut failure = None;
    if let Some(t) = &echo_text {
        text = t.clone();
    }
    let mut gen_tokens = Vec::new();
    while let Some(item) = events.recv().await {
        match item {
            Ok(Event::Tokens(c)) => {
                gen_tokens.extend(c.tokens.iter().map(|t| (t.clone(), text.len())));
                text.push_str(&c.text);
            }
            Ok(Event::PromptLogprobs(p)) => prompt_lps = Some(p.logprobs),
            Ok(Event::Finished(f)) => finished = Some(f),
            Ok(Event::Progress(_)) => {}
            Err(s) => failure = Some(s),
        }
    }
    let f = finished.ok_or_else(|| failure.clone().unwrap_or_else(|| Status::internal("no final message")))?;
    let Some(reason) = finish_reason(&f) else {
        return Err(failure.unwrap_or_else(|| Status::cancelled(f.error.clone())).into());
    };
    if want_logprobs {
        if let Some(t) = &echo_text {
            // The prompt's tokens, the first without a log-probability (OpenAI's `echo`).
            let ids = if prompt_ids.is_empty() { tok.encode(t).unwrap_or_default() } else { prompt_ids };
            let plps = prompt_lps.unwrap_or_default();
            let mut at = 0;
            for (i, &pid) in ids.iter().enumerate() {
                let lp_i = i.checked_sub(1).and_then(|j| plps.get(j).copied());
                lp.push(&tok, pid, lp_i, None, at);
                at += tok.decode(&[pid]).len();
            }
        }
        for (t, at) in &gen_tokens {
            lp.push(&tok, t.id, Some(t.logprob), Some(top_json(&tok, t)), *at);
        }
    }
    let usage = f.usage.unwrap_or_default();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": name,
        "choices": [{"text": text, "index": 0, "logprobs": if want_logprobs { lp.json() } else { Value::Null }, "finish_reason": reason}],
        "usage": usage_json(&usage),
    }))
    .into_response())
}
