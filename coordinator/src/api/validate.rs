//! Validation at the edge: a `GenerateRequest` from the wire becomes a typed [`GenRequest`], or
//! a [`RequestError`] that names the field and its limit. Nothing past this point sees an
//! unchecked value.

use std::time::Instant;

use yoco_proto::v1 as pb;
use yoco_worker::sampling::SamplingParams;
use yoco_worker::tokenizer::Tokenizer;

pub use crate::scheduler::request::{GenRequest, Limits, RequestError};

pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
pub const MAX_STOP_TOKEN_IDS: usize = 64;
pub const MAX_TOP_LOGPROBS: u32 = 20;
pub const MAX_REQUEST_ID_CHARS: usize = 128;
pub const DEFAULT_MAX_TOKENS: u32 = 16;

fn invalid(field: &str, msg: impl std::fmt::Display) -> RequestError {
    RequestError::invalid(field, msg)
}

/// Checks everything but the prompt's text, which the caller tokenizes (it may be large).
pub fn validate(
    req: &pb::GenerateRequest,
    prompt: Vec<u32>,
    tokenizer: &Tokenizer,
    limits: &Limits,
    arrived: Instant,
    deadline: Option<Instant>,
    fresh_id: impl FnOnce() -> String,
) -> Result<GenRequest, RequestError> {
    let vocab = limits.vocab_size;
    if prompt.is_empty() {
        return Err(invalid("prompt", "is empty: give `text` or `token_ids` with at least one token"));
    }
    if let Some((i, &bad)) = prompt.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(invalid("prompt.token_ids", format!("token {i} is {bad}, outside the vocabulary (size {vocab})")));
    }
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return Err(invalid("max_tokens", "must be at least 1"));
    }
    let total = prompt.len() + max_tokens as usize;
    if total > limits.max_request_tokens {
        return Err(invalid(
            "max_tokens",
            format!(
                "prompt ({} tokens) + max_tokens ({max_tokens}) = {total} exceeds the group's cache capacity of {} tokens",
                prompt.len(),
                limits.max_request_tokens
            ),
        ));
    }
    let s = req.sampling.unwrap_or_default();
    if s.top_k as usize > vocab {
        return Err(invalid("sampling.top_k", format!("{} exceeds the vocabulary size {vocab}", s.top_k)));
    }
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p,
        seed: s.seed.unwrap_or_else(random_seed),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    };
    sampling.validate().map_err(|e| invalid(&format!("sampling.{}", e.field()), e))?;
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid("stop", format!("{} strings; at most {MAX_STOP_STRINGS}", req.stop.len())));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(invalid(&format!("stop[{i}]"), format!("{} bytes; must be 1 to {MAX_STOP_BYTES}", s.len())));
        }
    }
    if req.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid(
            "stop_token_ids",
            format!("{} ids; at most {MAX_STOP_TOKEN_IDS}", req.stop_token_ids.len()),
        ));
    }
    if let Some(&bad) = req.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid("stop_token_ids", format!("{bad} is outside the vocabulary (size {vocab})")));
    }
    if req.logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid("logprobs", format!("{}; at most {MAX_TOP_LOGPROBS}", req.logprobs)));
    }
    if req.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(invalid("request_id", format!("longer than {MAX_REQUEST_ID_CHARS} characters")));
    }
    if req.request_id.chars().any(char::is_control) {
        return Err(invalid("request_id", "contains control characters"));
    }
    let mut stop_token_ids = req.stop_token_ids.clone();
    if !req.ignore_eos {
        stop_token_ids.extend(tokenizer.eos_token().filter(|&t| (t as usize) < vocab));
    }
    Ok(GenRequest {
        id: if req.request_id.is_empty() { fresh_id() } else { req.request_id.clone() },
        prompt,
        max_tokens: max_tokens as usize,
        sampling,
        stop: req.stop.clone(),
        stop_token_ids,
        top_logprobs: req.logprobs as usize,
        prompt_logprobs: req.prompt_logprobs,
        arrived,
        deadline,
        hold: None,
    })
}

/// The prompt's token ids: the given ids, or the text tokenized.
pub fn prompt_tokens(req: &pb::GenerateRequest, tokenizer: &Tokenizer) -> Result<Vec<u32>, RequestError> {
    match &req.prompt {
        Some(pb::generate_request::Prompt::TokenIds(ids)) => Ok(ids.ids.clone()),
        Some(pb::generate_request::Prompt::Text(text)) => tokenizer.encode(text).map_err(|e| invalid("prompt.text", e)),
        None => Err(invalid("prompt", "missing: give `text` or `token_ids`")),
    }
}

pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(req: pb::GenerateRequest) -> Result<GenRequest, RequestError> {
        let tok = Tokenizer::cl100k();
        let limits = Limits { vocab_size: 1000, max_request_tokens: 100 };
        let prompt = prompt_tokens(&req, &tok)?;
        validate(&req, prompt, &tok, &limits, Instant::now(), None, || "gen-1".into())
    }

    fn ids(v: &[u32]) -> Option<pb::generate_request::Prompt> {
        Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: v.to_vec() }))
    }

    fn base() -> pb::GenerateRequest {
        pb::GenerateRequest { prompt: ids(&[1, 2, 3]), ..Default::default() }
    }

    /// The error's text, checked to be a field's error that starts with the field's name.
    fn err_of(req: pb::GenerateRequest) -> String {
        let e = check(req).expect_err("should be rejected");
        let RequestError::Invalid { field, .. } = &e else { panic!("not a field's error: {e:?}") };
        let text = e.to_string();
        assert!(text.starts_with(&format!("{field}: ")), "{text}");
        text
    }

    #[test]
    fn defaults() {
        let r = check(base()).unwrap();
        assert_eq!(r.max_tokens, 16);
        assert_eq!(r.id, "gen-1");
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_p, 1.0);
        assert_eq!(r.sampling.repetition_penalty, 1.0);
        // cl100k's end-of-text (100257) is outside this 1000-token vocabulary: not a stop token.
        assert!(r.stop_token_ids.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let with_sampling = |s: pb::SamplingParams| pb::GenerateRequest { sampling: Some(s), ..base() };
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (pb::GenerateRequest { prompt: None, ..base() }, "prompt: missing"),
            (pb::GenerateRequest { prompt: ids(&[]), ..base() }, "prompt: is empty"),
            (pb::GenerateRequest { prompt: ids(&[1, 1000]), ..base() }, "prompt.token_ids: token 1 is 1000"),
            (pb::GenerateRequest { max_tokens: Some(0), ..base() }, "max_tokens: must be at least 1"),
            (pb::GenerateRequest { max_tokens: Some(98), ..base() }, "exceeds the group's cache capacity of 100"),
            (with_sampling(pb::SamplingParams { temperature: -1.0, ..Default::default() }), "sampling.temperature"),
            (with_sampling(pb::SamplingParams { temperature: f32::NAN, ..Default::default() }), "sampling.temperature"),
            (with_sampling(pb::SamplingParams { temperature: 1e9, ..Default::default() }), "sampling.temperature"),
            (with_sampling(pb::SamplingParams { top_p: Some(0.0), ..Default::default() }), "sampling.top_p"),
            (with_sampling(pb::SamplingParams { top_k: 1001, ..Default::default() }), "sampling.top_k"),
            (with_sampling(pb::SamplingParams { min_p: 2.0, ..Default::default() }), "sampling.min_p"),
            (
                with_sampling(pb::SamplingParams { repetition_penalty: Some(0.0), ..Default::default() }),
                "sampling.repetition_penalty",
            ),
            (with_sampling(pb::SamplingParams { presence_penalty: 3.0, ..Default::default() }), "sampling.presence"),
            (with_sampling(pb::SamplingParams { frequency_penalty: -9.0, ..Default::default() }), "sampling.frequency"),
            (pb::GenerateRequest { stop: vec!["".into()], ..base() }, "stop[0]"),
            (pb::GenerateRequest { stop: vec!["x".repeat(300)], ..base() }, "stop[0]"),
            (pb::GenerateRequest { stop: vec!["x".into(); 17], ..base() }, "stop: 17 strings"),
            (pb::GenerateRequest { stop_token_ids: vec![5000], ..base() }, "stop_token_ids: 5000"),
            (pb::GenerateRequest { logprobs: 21, ..base() }, "logprobs: 21"),
            (pb::GenerateRequest { request_id: "x".repeat(200), ..base() }, "request_id"),
            (pb::GenerateRequest { request_id: "a\nb".into(), ..base() }, "request_id"),
        ];
        for (req, want) in cases {
            let msg = err_of(req);
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        }
    }

    #[test]
    fn text_prompts_are_tokenized_and_eos_stops_unless_ignored() {
        let tok = Tokenizer::cl100k();
        let limits = Limits { vocab_size: 100288, max_request_tokens: 1000 };
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("hello world".into())),
            stop_token_ids: vec![7],
            ..Default::default()
        };
        let prompt = prompt_tokens(&req, &tok).unwrap();
        assert_eq!(prompt, vec![15339, 1917]);
        let r = validate(&req, prompt.clone(), &tok, &limits, Instant::now(), None, String::new).unwrap();
        assert_eq!(r.stop_token_ids, vec![7, 100257]);
        let req = pb::GenerateRequest { ignore_eos: true, ..req };
        let r = validate(&req, prompt, &tok, &limits, Instant::now(), None, String::new).unwrap();
        assert_eq!(r.stop_token_ids, vec![7]);
    }
}
