//! A `yoco.v1.GenerateRequest` from the wire (protobuf bytes, or one built field by field from
//! the input) through the coordinator's edge checks: `request::prompt_tokens` then
//! `request::validate`, under limits that also come from the input.

use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use prost::Message;
use yoco::api::validate::{self as request, Limits};
use yoco_proto::v1 as pb;
use yoco_worker::sampling::SamplingParams;

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((limits, structured)) = header(&mut u) else { return };
    let req = if structured {
        match build(&mut u) {
            Ok(req) => req,
            Err(_) => return,
        }
    } else {
        match pb::GenerateRequest::decode(u.take_rest()) {
            Ok(req) => req,
            Err(_) => return,
        }
    };
    check(&req, &limits);
}

/// Checks one request, asserting what a request that passes promises to the scheduler.
pub fn check(req: &pb::GenerateRequest, limits: &Limits) {
    let tok = crate::cl100k();
    let prompt = match request::prompt_tokens(req, tok) {
        Ok(p) => p,
        Err(e) => {
            assert!(matches!(e, request::RequestError::Invalid { .. }), "{e:?}");
            return;
        }
    };
    let now = Instant::now();
    let deadline = Some(now + Duration::from_secs(1));
    let g = match request::validate(req, prompt.clone(), tok, limits, now, deadline, || "gen-fuzz".into()) {
        Ok(g) => g,
        Err(e) => {
            let request::RequestError::Invalid { field, message } = &e else { panic!("not a field's error: {e:?}") };
            assert!(!field.is_empty() && !message.is_empty(), "{e:?}");
            return;
        }
    };
    assert_eq!(g.prompt, prompt);
    assert!(!g.prompt.is_empty());
    assert!(g.prompt.iter().all(|&t| (t as usize) < limits.vocab_size));
    assert!(g.max_tokens >= 1);
    assert!(g.prompt.len() + g.max_tokens <= limits.max_request_tokens);
    assert!(g.sampling.top_k <= limits.vocab_size);
    assert_eq!(g.sampling.validate(), Ok(()));
    assert!(g.stop.len() <= request::MAX_STOP_STRINGS);
    assert!(g.stop.iter().all(|s| !s.is_empty() && s.len() <= request::MAX_STOP_BYTES));
    assert!(g.stop_token_ids.len() <= request::MAX_STOP_TOKEN_IDS + 1);
    assert!(g.stop_token_ids.iter().all(|&t| (t as usize) < limits.vocab_size));
    assert!(g.top_logprobs <= request::MAX_TOP_LOGPROBS as usize);
    assert!(!g.id.is_empty() && g.id.chars().count() <= request::MAX_REQUEST_ID_CHARS);
    assert!(!g.id.chars().any(char::is_control));
    assert_eq!(g.deadline, deadline);
}

/// The group's limits (a vocabulary like cl100k's, YOCO's padded one, or a small one), and
/// whether the request is built field by field.
fn header(u: &mut Unstructured) -> Result<(Limits, bool)> {
    let flags: u8 = u.arbitrary()?;
    let vocab_size = match flags & 3 {
        0 => crate::cl100k().vocab_size(),
        1 => 100_288,
        2 => 1 + u.arbitrary::<u16>()? as usize,
        _ => u.arbitrary::<u32>()? as usize,
    };
    let max_request_tokens = match (flags >> 2) & 1 {
        0 => 1 + u.arbitrary::<u16>()? as usize,
        _ => u.arbitrary::<u32>()? as usize,
    };
    Ok((Limits { vocab_size, max_request_tokens }, flags & 0x80 != 0))
}

/// Floats that sit on and around the limits more often than uniform bits would.
fn float(u: &mut Unstructured) -> Result<f32> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => 0.0,
        1 => 1.0,
        2 => -1.0,
        3 => f32::NAN,
        4 => f32::INFINITY,
        5 => u.int_in_range(-300..=300i32)? as f32 / 100.0,
        6 => u.int_in_range(0..=20_000i32)? as f32 / 100.0,
        _ => f32::from_bits(u.arbitrary()?),
    })
}

fn build(u: &mut Unstructured) -> Result<pb::GenerateRequest> {
    let prompt = match u.int_in_range(0..=2u8)? {
        0 => None,
        1 => Some(pb::generate_request::Prompt::Text(u.arbitrary()?)),
        _ => Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: u.arbitrary()? })),
    };
    let sampling = if u.arbitrary()? {
        let d = SamplingParams::default();
        Some(pb::SamplingParams {
            temperature: if u.arbitrary()? { float(u)? } else { d.temperature },
            top_p: if u.arbitrary()? { Some(float(u)?) } else { None },
            top_k: if u.arbitrary()? { u.arbitrary()? } else { u.int_in_range(0..=200_000)? },
            min_p: float(u)?,
            seed: u.arbitrary()?,
            repetition_penalty: if u.arbitrary()? { Some(float(u)?) } else { None },
            presence_penalty: float(u)?,
            frequency_penalty: float(u)?,
        })
    } else {
        None
    };
    Ok(pb::GenerateRequest {
        prompt,
        max_tokens: u.arbitrary()?,
        sampling,
        stop: u.arbitrary()?,
        stop_token_ids: u.arbitrary()?,
        ignore_eos: u.arbitrary()?,
        logprobs: if u.arbitrary()? { u.arbitrary()? } else { u.int_in_range(0..=25)? },
        prompt_logprobs: u.arbitrary()?,
        request_id: u.arbitrary()?,
    })
}
