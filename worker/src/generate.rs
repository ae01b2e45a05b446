//! One request, start to finish, as a sequence of plans: prefill steps that give every rank of
//! the group one chunk (the cross-decoder only for the last prompt token unless prompt
//! log-probabilities are wanted), then decode token by token. The same driver runs an
//! in-process engine or a group of worker processes, through [`PlanRunner`].

use std::time::Instant;

use crate::backend::Backend;
use crate::executor::Executor;
use crate::plan::{DecodeWork, Plan, PrefillWork, Sampled, SeqId, SeqResult, SeqSpec, PROMPT_LOGPROBS_CHUNK};
use crate::sampling::SamplingParams;

pub type RunError = Box<dyn std::error::Error + Send + Sync>;

/// Something that executes plans on every rank of a group and returns each rank's results.
pub trait PlanRunner {
    /// The ranks that split a prompt's tokens (context-parallel); a tensor-parallel group's
    /// rows count once.
    fn cp_size(&self) -> usize;
    /// Per context-parallel rank (in rank order), the results of the plan.
    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError>;
}

impl<B: Backend> PlanRunner for Executor<B> {
    fn cp_size(&self) -> usize {
        self.engine().cp_size()
    }
    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        Ok(vec![self.execute(plan)?])
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Also return this many most likely alternatives per generated token.
    pub top_logprobs: usize,
    pub prompt_logprobs: bool,
    /// Generation stops after producing one of these.
    pub stop_token_ids: Vec<u32>,
    /// Prompt tokens per rank per prefill step (bounds activation memory).
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
    /// Per rank, the global-cache rows of the sequence it held at the end.
    pub shard_tokens: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub prefilled: usize,
    pub total: usize,
}

/// Runs one request as sequence `seq`, freed on every rank at the end (error or not).
pub fn generate(
    runner: &mut dyn PlanRunner,
    seq: SeqId,
    prompt: &[u32],
    params: &GenerateParams,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation, RunError> {
    let result = run(runner, seq, prompt, params, progress);
    let freed = runner.run(&Plan { free: vec![seq], ..Plan::default() });
    let gen = result?;
    freed?;
    Ok(gen)
}

fn only(results: Vec<Vec<SeqResult>>, seq: SeqId) -> Result<(SeqResult, Vec<usize>), RunError> {
    let shards = results.iter().map(|r| r.iter().find(|x| x.seq == seq).map_or(0, |x| x.shard_tokens)).collect();
    let mine = results.into_iter().next().and_then(|r| r.into_iter().find(|x| x.seq == seq));
    Ok((mine.ok_or("the group returned no result for the sequence")?, shards))
}

fn run(
    runner: &mut dyn PlanRunner,
    seq: SeqId,
    prompt: &[u32],
    params: &GenerateParams,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation, RunError> {
    if prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    let started = Instant::now();
    let per_rank = if params.prompt_logprobs {
        params.prefill_chunk.clamp(1, PROMPT_LOGPROBS_CHUNK)
    } else {
        params.prefill_chunk.max(1)
    };
    let step_tokens = per_rank * runner.cp_size();
    let spec = SeqSpec {
        seq,
        sampling: params.sampling.clone(),
        top_logprobs: params.top_logprobs,
        prompt_logprobs: params.prompt_logprobs,
        ..SeqSpec::default()
    };
    let mut add = vec![spec];
    let mut prompt_logprobs = params.prompt_logprobs.then(|| vec![None]);
    let mut first: Option<Sampled> = None;
    let mut shard_tokens = Vec::new();
    let mut done = 0;
    for part in prompt.chunks(step_tokens) {
        let is_last = done + part.len() == prompt.len();
        let work = PrefillWork {
            seq,
            tokens: part.to_vec(),
            chunk_starts: Vec::new(),
            sample: is_last,
            next_token: prompt.get(done + part.len()).copied(),
            snapshot: None,
        };
        let plan = Plan { add: std::mem::take(&mut add), prefill: vec![work], ..Plan::default() };
        let (result, shards) = only(runner.run(&plan)?, seq)?;
        if let Some(lps) = prompt_logprobs.as_mut() {
            lps.extend(result.prompt_logprobs.iter().map(|l| Some(l.logprob)));
        }
        first = result.sampled;
        shard_tokens = shards;
        done += part.len();
        progress(Progress { prefilled: done, total: prompt.len() });
    }
    let prefill_seconds = started.elapsed().as_secs_f64();

    let decode_started = Instant::now();
    let mut gen = Generation {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        prompt_logprobs,
        finish_reason: FinishReason::Length,
        timing: Timing::default(),
        shard_tokens,
    };
    let mut next = first;
    while gen.tokens.len() < params.max_tokens {
        let sampled = next.take().ok_or("no token was sampled")?;
        gen.tokens.push(sampled.token);
        gen.logprobs.push(sampled.logprob);
        gen.top_logprobs.push(sampled.top_logprobs);
        if params.stop_token_ids.contains(&sampled.token) {
            gen.finish_reason = FinishReason::Stop;
            break;
        }
        if gen.tokens.len() == params.max_tokens {
            break;
        }
        let plan = Plan { decode: vec![DecodeWork { seq, token: sampled.token }], ..Plan::default() };
        let (result, shards) = only(runner.run(&plan)?, seq)?;
        next = result.sampled;
        gen.shard_tokens = shards;
    }
    let decode_seconds = decode_started.elapsed().as_secs_f64();
    gen.timing = Timing {
        prefill_seconds,
        prefill_tokens_per_second: prompt.len() as f64 / prefill_seconds.max(1e-9),
        decode_seconds,
        // The first token comes from the prefill's logits; each later one costs a model step.
        decode_tokens_per_second: gen.tokens.len().saturating_sub(1) as f64 / decode_seconds.max(1e-9),
    };
    Ok(gen)
}
