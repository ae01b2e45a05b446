//! `POST /v1/completions`: OpenAI's legacy completions, as vLLM serves them. A list of prompts
//! gives one choice per prompt (`index` in order); `echo` with `logprobs: k` returns the
//! prompt's tokens with their log-probabilities and, from the second on, a `{token: logprob}`
//! dict of the k most likely tokens plus the actual one, which is how evaluation harnesses
//! (lm-evaluation-harness and others) score a continuation and tell whether it is greedy.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};
use yoco_proto::v1 as pb;
use yoco_worker::plan::{PromptLogprob, Sampled};
use yoco_worker::tokenizer::Tokenizer;

use super::error::{ApiError, Body};
use super::schema::{
    add_usage, check_model, finish_reason, model_name, now_unix, outcome, usage_json, Chunks, Sampling, StreamOptions,
};
use crate::api::auth::KeyId;
use crate::api::{Api, Submitted};
use crate::scheduler::event::{Event, Finished, Usage};

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    Batches(Vec<Vec<u32>>),
}

/// `POST /v1/completions`. Fields OpenAI defines that do not apply (`user`, `suffix`, `best_of`
/// 1, `n` 1) are accepted; vLLM's extensions `top_k`, `min_p`, `repetition_penalty`,
/// `ignore_eos`, `continuous_usage_stats` are too.
#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    best_of: Option<u32>,
    #[serde(flatten)]
    sampling: Sampling,
}

impl CompletionRequest {
    /// One generation request per prompt.
    fn into_pb(self) -> Result<Vec<pb::GenerateRequest>, ApiError> {
        use pb::generate_request::Prompt as P;
        if self.n.unwrap_or(1) != 1 || self.best_of.unwrap_or(1) != 1 {
            return Err(ApiError::invalid("only n = 1 and best_of = 1 are supported", Some("n")));
        }
        let prompts: Vec<P> = match self.prompt {
            Prompt::Text(t) => vec![P::Text(t)],
            Prompt::Ids(ids) => vec![P::TokenIds(pb::TokenIds { ids })],
            Prompt::Texts(v) => v.into_iter().map(P::Text).collect(),
            Prompt::Batches(v) => v.into_iter().map(|ids| P::TokenIds(pb::TokenIds { ids })).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt: the list of prompts is empty", Some("prompt")));
        }
        // OpenAI's `logprobs: k` covers the echoed prompt too.
        let (logprobs, prompt_logprobs) = (self.logprobs.unwrap_or(0), self.echo && self.logprobs.is_some());
        let max_tokens = self.max_tokens.unwrap_or(16);
        prompts
            .into_iter()
            .map(|p| Ok(pb::GenerateRequest { logprobs, prompt_logprobs, ..self.sampling.request(p, max_tokens)? }))
            .collect()
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
    /// Token `id` at text offset `at`, with its log-probability and the alternatives at its
    /// position (none for a prompt's first token, which nothing predicts).
    fn push(&mut self, tok: &Tokenizer, id: u32, lp: Option<f32>, top: Option<&[(u32, f32)]>, at: usize) {
        self.tokens.push(tok.decode(&[id]));
        self.token_logprobs.push(lp);
        self.top_logprobs.push(top.map(|top| top_json(tok, top, id, lp)));
        self.text_offset.push(at);
    }

    fn json(&self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }

    /// The prompt's tokens with their log-probabilities (`echo`), the first at text offset 0.
    fn prompt(tok: &Tokenizer, ids: &[u32], lps: &[PromptLogprob]) -> Logprobs {
        let (mut out, mut offset) = (Logprobs::default(), 0);
        for (i, &id) in ids.iter().enumerate() {
            let p = i.checked_sub(1).map(|j| lps.get(j));
            let lp = p.flatten().map(|p| p.logprob);
            let top = p.map(|p| p.map_or(&[][..], |p| &p.top_logprobs[..]));
            out.push(tok, id, lp, top, offset);
            offset += tok.decode(&[id]).len();
        }
        out
    }

    /// A generated token at text offset `at`.
    fn push_generated(&mut self, tok: &Tokenizer, t: &Sampled, at: usize) {
        self.push(tok, t.token, Some(t.logprob), Some(&t.top_logprobs), at);
    }
}

/// `{token: logprob}` of the alternatives and the actual token (OpenAI: "up to logprobs + 1
/// elements"), as vLLM and OpenAI send them.
fn top_json(tok: &Tokenizer, top: &[(u32, f32)], actual: u32, lp: Option<f32>) -> Value {
    let mut m = serde_json::Map::new();
    for &(id, logprob) in top {
        m.insert(tok.decode(&[id]), json!(logprob));
    }
    if let Some(lp) = lp {
        m.entry(tok.decode(&[actual])).or_insert(json!(lp));
    }
    Value::Object(m)
}

/// One prompt's choice on its way: what it has said so far.
struct Choice {
    /// The prompt's text when echoed (sent at once, or with its log-probabilities).
    echo: Option<String>,
    /// The prompt's tokens, for the echoed log-probabilities.
    prompt_ids: Vec<u32>,
    /// Text offset of the next token.
    offset: usize,
    usage: Usage,
    /// Not streamed: the text, prompt log-probabilities and tokens with their offsets so far.
    text: String,
    prompt_logprobs: Option<Vec<PromptLogprob>>,
    tokens: Vec<(Sampled, usize)>,
    finished: Option<Finished>,
}

pub(super) async fn completions(
    State(api): State<Api>,
    caller: Option<axum::Extension<KeyId>>,
    Body(req): Body<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let name = model_name(&api)?;
    check_model(&name, &req.model)?;
    let options = StreamOptions::of(req.stream_options, req.stream)?;
    let (stream, echo, want_logprobs) = (req.stream, req.echo, req.logprobs.is_some());
    let tok = api.tokenizer().clone();
    // Every prompt is queued before any answer starts; one refused refuses the request, and
    // the ones queued before it are cancelled as their event streams drop.
    let mut choices = Vec::new();
    let mut events = StreamMap::new();
    let mut first_id = None;
    for preq in req.into_pb()? {
        use pb::generate_request::Prompt as P;
        // What `echo` sends back: the prompt's text and, with log-probabilities, its tokens.
        let echo = echo.then(|| match &preq.prompt {
            Some(P::Text(t)) => t.clone(),
            Some(P::TokenIds(ids)) => tok.decode(&ids.ids),
            None => String::new(),
        });
        let prompt_ids = match &preq.prompt {
            _ if echo.is_none() || !want_logprobs => Vec::new(),
            Some(P::TokenIds(ids)) => ids.ids.clone(),
            Some(P::Text(t)) => tok.encode(t).unwrap_or_default(),
            None => Vec::new(),
        };
        let Submitted { id, prompt_tokens, events: rx } = api.submit(preq, arrived, None, caller.map(|c| c.0)).await?;
        first_id.get_or_insert(id);
        events.insert(choices.len(), UnboundedReceiverStream::new(rx));
        choices.push(Choice {
            offset: echo.as_ref().map_or(0, String::len),
            text: echo.clone().unwrap_or_default(),
            echo,
            prompt_ids,
            usage: Usage { prompt_tokens, ..Usage::default() },
            prompt_logprobs: None,
            tokens: Vec::new(),
            finished: None,
        });
    }
    let id = format!("cmpl-{}", first_id.unwrap_or_default());
    if stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
        let out = Chunks { tx, id, object: "text_completion", created: now_unix(), model: name, options };
        // Translates the requests' events into SSE events; when the client goes away a send
        // fails, `events` is dropped, and the scheduler cancels the requests.
        tokio::spawn(stream_choices(out, tok, choices, events, want_logprobs));
        return Ok(Chunks::response(rx));
    }

    // Not streaming: collect everything, then answer once.
    while let Some((i, item)) = events.next().await {
        let c = &mut choices[i];
        match item {
            Event::Tokens(t) => {
                c.usage.completion_tokens += t.tokens.len();
                c.tokens.extend(t.tokens.into_iter().map(|t| (t, c.text.len())));
                c.text.push_str(&t.text);
            }
            Event::PromptLogprobs(p) => c.prompt_logprobs = Some(p),
            Event::Finished(f) => c.finished = Some(f),
            Event::Progress(_) => {}
        }
    }
    let (mut body, mut total) = (Vec::new(), Usage::default());
    for (index, c) in choices.into_iter().enumerate() {
        let (f, reason) = outcome(c.finished)?;
        add_usage(&mut total, &f.usage);
        let logprobs = if want_logprobs {
            let mut lp = match (&c.echo, &c.prompt_logprobs) {
                (Some(_), Some(p)) => Logprobs::prompt(&tok, &c.prompt_ids, p),
                _ => Logprobs::default(),
            };
            for (t, at) in &c.tokens {
                lp.push_generated(&tok, t, *at);
            }
            lp.json()
        } else {
            Value::Null
        };
        body.push(json!({"text": c.text, "index": index, "logprobs": logprobs, "finish_reason": reason}));
    }
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": now_unix(), "model": name,
        "choices": body, "usage": usage_json(&total),
    }))
    .into_response())
}

/// Streams the choices' events as chunks until every choice has finished (then the usage, if
/// asked, and `[DONE]`), one fails (an error object, and the rest are cancelled), or the client
/// goes away.
async fn stream_choices(
    out: Chunks,
    tok: std::sync::Arc<Tokenizer>,
    mut choices: Vec<Choice>,
    mut events: StreamMap<usize, UnboundedReceiverStream<Event>>,
    want_logprobs: bool,
) {
    let chunk = |index: usize, text: String, logprobs: Value, finish: Option<&str>, usage: &Usage| {
        out.chunk(json!({"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}), usage)
    };
    // The echoed prompt goes first, unless its log-probabilities are to come with it.
    for (i, c) in choices.iter_mut().enumerate() {
        if !want_logprobs {
            if let Some(text) = c.echo.take() {
                if !chunk(i, text, Value::Null, None, &c.usage) {
                    return;
                }
            }
        }
    }
    let mut total = Usage::default();
    while let Some((i, item)) = events.next().await {
        let c = &mut choices[i];
        let ok = match item {
            Event::Progress(p) => out.progress(&p),
            Event::PromptLogprobs(p) => match c.echo.take() {
                Some(text) => {
                    let lp = Logprobs::prompt(&tok, &c.prompt_ids, &p);
                    chunk(i, text, lp.json(), None, &c.usage)
                }
                None => true,
            },
            Event::Tokens(t) => {
                c.usage.completion_tokens += t.tokens.len();
                let logprobs = if want_logprobs {
                    let mut lp = Logprobs::default();
                    for s in &t.tokens {
                        lp.push_generated(&tok, s, c.offset);
                    }
                    lp.json()
                } else {
                    Value::Null
                };
                c.offset += t.text.len();
                chunk(i, t.text, logprobs, None, &c.usage)
            }
            Event::Finished(f) => match finish_reason(&f.end) {
                Ok(reason) => {
                    add_usage(&mut total, &f.usage);
                    let ok = chunk(i, String::new(), Value::Null, Some(reason), &f.usage);
                    c.finished = Some(f);
                    ok
                }
                Err(e) => {
                    out.error(&e.message);
                    return;
                }
            },
        };
        if !ok {
            return;
        }
    }
    if choices.iter().all(|c| c.finished.is_some()) {
        out.done(&total);
    } else {
        out.error("a request ended without its final message");
    }
}
