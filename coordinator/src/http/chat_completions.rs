//! `POST /v1/chat/completions`, for a model whose directory has a chat template: the messages
//! are rendered with it, tokenized (special tokens honoured) and generated from like any prompt.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use yoco_proto::v1 as pb;
use yoco_worker::plan::Sampled;
use yoco_worker::tokenizer::Tokenizer;

use super::error::{ApiError, Body};
use super::schema::{
    check_model, finish_reason, model_name, now_unix, outcome, usage_json, Chunks, Sampling, StreamOptions,
};
use crate::api::auth::KeyId;
use crate::api::{Api, Submitted};
use crate::scheduler::event::{Event, Usage};
use crate::scheduler::request::RequestError;

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    model: Option<String>,
    messages: Vec<crate::api::chat_template::Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn chat_logprobs(tok: &Tokenizer, tokens: &[Sampled]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top_logprobs
                .iter()
                .map(|&(id, logprob)| json!({"token": tok.decode(&[id]), "logprob": logprob, "bytes": null}))
                .collect();
            json!({"token": tok.decode(&[t.token]), "logprob": t.logprob, "bytes": null, "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

pub(super) async fn chat_completions(
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
    let options = StreamOptions::of(req.stream_options, req.stream)?;
    // Rendering and tokenizing a long conversation takes a while: off the async threads, so
    // that other requests are not held up.
    let (api2, messages) = (api.clone(), req.messages.clone());
    let ids = tokio::task::spawn_blocking(move || {
        let template = api2.chat_template().ok_or_else(|| ApiError::invalid("no chat template", Some("messages")))?;
        let text = template.render(&messages).map_err(|e| ApiError::invalid(e, Some("messages")))?;
        api2.tokenizer().encode_with_special(&text).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
    })
    .await
    .map_err(|e| ApiError::from(RequestError::Internal(format!("tokenizing task: {e}"))))??;
    let top = if req.logprobs { req.top_logprobs.unwrap_or(0) } else { 0 };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(16);
    let prompt = pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids });
    let preq = pb::GenerateRequest { logprobs: top, ..req.sampling.request(prompt, max_tokens)? };
    let want_logprobs = req.logprobs;
    let Submitted { id, prompt_tokens, mut events } = api.submit(preq, arrived, None, caller.map(|c| c.0)).await?;
    let id = format!("chatcmpl-{id}");
    let tok = api.tokenizer().clone();
    let mut usage = Usage { prompt_tokens, ..Usage::default() };
    if req.stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
        let out = Chunks { tx, id, object: "chat.completion.chunk", created: now_unix(), model: name, options };
        tokio::spawn(async move {
            let chunk = |delta: Value, logprobs: Value, finish: Option<&str>, usage: &Usage| {
                out.chunk(json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}), usage)
            };
            if !chunk(json!({"role": "assistant", "content": ""}), Value::Null, None, &usage) {
                return;
            }
            while let Some(item) = events.recv().await {
                let ok = match item {
                    Event::Progress(p) => out.progress(&p),
                    Event::Tokens(c) => {
                        usage.completion_tokens += c.tokens.len();
                        let lp = if want_logprobs { chat_logprobs(&tok, &c.tokens) } else { Value::Null };
                        chunk(json!({"content": c.text}), lp, None, &usage)
                    }
                    Event::Finished(f) => match finish_reason(&f.end) {
                        Ok(r) => chunk(json!({}), Value::Null, Some(r), &f.usage) && out.done(&f.usage),
                        Err(e) => out.error(&e.message),
                    },
                    Event::PromptLogprobs(_) => true,
                };
                if !ok {
                    return;
                }
            }
        });
        return Ok(Chunks::response(rx));
    }
    let (mut text, mut tokens, mut finished) = (String::new(), Vec::new(), None);
    while let Some(item) = events.recv().await {
        match item {
            Event::Tokens(c) => {
                text.push_str(&c.text);
                tokens.extend(c.tokens);
            }
            Event::Finished(f) => finished = Some(f),
            Event::Progress(_) | Event::PromptLogprobs(_) => {}
        }
    }
    let (f, reason) = outcome(finished)?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": now_unix(), "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": if want_logprobs { chat_logprobs(&tok, &tokens) } else { Value::Null },
                     "finish_reason": reason}],
        "usage": usage_json(&f.usage),
    }))
    .into_response())
}
