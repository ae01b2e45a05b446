//! One request, start to finish, on an engine: prefill in chunks (cross-decoder only for the last
//! prompt token unless prompt log-probabilities are wanted), then decode token by token.

use std::time::Instant;

use crate::engine::{Engine, EngineError, Logits, SeqId, StepItem};
use crate::sampling::{log_softmax, top_logprobs, Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Also return this many most likely alternatives per generated token.
    pub top_logprobs: usize,
    pub prompt_logprobs: bool,
    /// Generation stops after producing one of these.
    pub stop_token_ids: Vec<u32>,
    /// Prompt tokens per prefill step (bounds activation memory).
    pub prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            top_logprobs: 0,
            prompt_logprobs: false,
            stop_token_ids: Vec::new(),
            prefill_chunk: 4096,
        }
    }
}

/// Rows of logits per prefill step when every prompt position needs them (`rows × vocab` floats).
const PROMPT_LOGPROBS_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    Stop,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timing {
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_seconds: f64,
    pub decode_tokens_per_second: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token under the model.
    pub logprobs: Vec<f32>,
    /// Per generated token, the `top_logprobs` most likely tokens (empty lists when not asked).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Per prompt token, its log-probability given the tokens before it (`None` for the first).
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    pub finish_reason: FinishReason,
    pub timing: Timing,
    /// Global-cache bytes the sequence held at its end (whole blocks).
    pub cache_bytes: usize,
    /// Self-decoder state bytes of the sequence (constant in its length).
    pub state_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub prefilled: usize,
    pub total: usize,
}

/// Runs one request as sequence `seq` (added here and freed on return, error or not).
pub fn generate(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    params: &GenerateParams,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation, EngineError> {
    engine.add_sequence(seq)?;
    let result = run(engine, seq, prompt, params, progress);
    engine.free_sequence(seq);
    result
}

fn run(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    params: &GenerateParams,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyItem(seq));
    }
    let vocab = engine.model().cfg.vocab_size;
    let started = Instant::now();
    let chunk = if params.prompt_logprobs { PROMPT_LOGPROBS_CHUNK } else { params.prefill_chunk.max(1) };
    let mut prompt_logprobs = params.prompt_logprobs.then(|| vec![None]);
    let mut last = Vec::new();
    let mut done = 0;
    for part in prompt.chunks(chunk) {
        let is_last = done + part.len() == prompt.len();
        let want = match (params.prompt_logprobs, is_last) {
            (true, _) => Logits::All,
            (false, true) => Logits::Last,
            (false, false) => Logits::None,
        };
        let out = engine.step(&[StepItem::prefill(seq, part, want)])?.remove(0);
        if let Some(lps) = prompt_logprobs.as_mut() {
            for (i, row) in out.logits.chunks_exact(vocab).enumerate() {
                if let Some(&next) = prompt.get(done + i + 1) {
                    lps.push(Some(log_softmax(row)[next as usize]));
                }
            }
        }
        done += part.len();
        if is_last {
            last = out.logits[out.logits.len() - vocab..].to_vec();
        }
        progress(Progress { prefilled: done, total: prompt.len() });
    }
    let prefill_seconds = started.elapsed().as_secs_f64();

    let decode_started = Instant::now();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut gen = Generation {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        prompt_logprobs,
        finish_reason: FinishReason::Length,
        timing: Timing::default(),
        cache_bytes: 0,
        state_bytes: 0,
    };
    while gen.tokens.len() < params.max_tokens {
        let token = sampler.sample(&last);
        let lp = log_softmax(&last);
        gen.logprobs.push(lp[token as usize]);
        gen.top_logprobs.push(top_logprobs(&lp, params.top_logprobs));
        gen.tokens.push(token);
        if params.stop_token_ids.contains(&token) {
            gen.finish_reason = FinishReason::Stop;
            break;
        }
        if gen.tokens.len() == params.max_tokens {
            break;
        }
        last = engine.step(&[StepItem::decode(seq, &[token])])?.remove(0).logits;
    }
    let decode_seconds = decode_started.elapsed().as_secs_f64();
    gen.cache_bytes = engine.sequence_cache_bytes(seq).unwrap_or(0);
    gen.state_bytes = engine.sequence_state_bytes(seq).unwrap_or(0);
    gen.timing = Timing {
        prefill_seconds,
        prefill_tokens_per_second: prompt.len() as f64 / prefill_seconds.max(1e-9),
        decode_seconds,
        // The first token comes from the prefill's logits; each later one costs a model step.
        decode_tokens_per_second: gen.tokens.len().saturating_sub(1) as f64 / decode_seconds.max(1e-9),
    };
    Ok(gen)
}
