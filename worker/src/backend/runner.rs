//! Plans (`crate::executor::Plan`) run by the backend forward pass on one device: what
//! `yoco generate --device cuda` drives. Sampling is the executor's (same seeded sampler, same
//! penalties, same reported log-probabilities), so a request gives the same tokens here as on
//! the CPU engine. Prefix-cache snapshots and prompt log-probabilities are the engine's alone
//! for now: a plan that asks for them is refused with an error that says so.

use std::collections::HashMap;

use super::{Backend, Forward, Sequence};
use crate::engine::SeqId;
use crate::executor::{sample_next, Plan, SeqResult, SeqSpec};
use crate::generate::{PlanRunner, RunError};
use crate::sampling::Sampler;

struct Seq<B: Backend> {
    caches: Sequence<B>,
    spec: SeqSpec,
    sampler: Sampler,
}

pub struct ForwardRunner<B: Backend> {
    fwd: Forward<B>,
    seqs: HashMap<SeqId, Seq<B>>,
}

impl<B: Backend> ForwardRunner<B> {
    pub fn new(fwd: Forward<B>) -> Self {
        ForwardRunner { fwd, seqs: HashMap::new() }
    }

    pub fn forward(&self) -> &Forward<B> {
        &self.fwd
    }

    fn unsupported(&self, what: &str) -> RunError {
        format!("{what} is not supported on the {} backend yet (the CPU engine has it)", self.fwd.backend().name())
            .into()
    }

    fn execute(&mut self, plan: &Plan) -> Result<Vec<SeqResult>, RunError> {
        for id in &plan.free {
            if let Some(s) = self.seqs.remove(id) {
                self.fwd.free(s.caches);
            }
        }
        // No snapshot is ever made here (asking for one is refused), so none is dropped.
        for spec in &plan.add {
            if spec.resume_from.is_some() {
                return Err(self.unsupported("resuming from a prefix-cache snapshot"));
            }
            if spec.prompt_logprobs {
                return Err(self.unsupported("prompt log-probabilities"));
            }
            if self.seqs.contains_key(&spec.seq) {
                return Err(format!("sequence {} already exists", spec.seq).into());
            }
            let caches = self.fwd.new_sequence()?;
            self.seqs
                .insert(spec.seq, Seq { caches, spec: spec.clone(), sampler: Sampler::new(spec.sampling.clone()) });
        }
        let mut results = Vec::with_capacity(plan.prefill.len() + plan.decode.len());
        for p in &plan.prefill {
            if p.snapshot.is_some() {
                return Err(self.unsupported("saving a prefix-cache snapshot"));
            }
            let s = self.seqs.get_mut(&p.seq).ok_or_else(|| format!("unknown sequence {}", p.seq))?;
            let logits = if p.sample {
                Some(self.fwd.forward(&mut s.caches, &p.tokens)?)
            } else {
                self.fwd.extend(&mut s.caches, &p.tokens)?;
                None
            };
            s.sampler.observe_prompt(&p.tokens);
            let sampled = logits.map(|l| sample_next(&mut s.sampler, &l, s.spec.top_logprobs));
            results.push(SeqResult { seq: p.seq, sampled, prompt_logprobs: Vec::new(), shard_tokens: s.caches.len() });
        }
        for d in &plan.decode {
            let s = self.seqs.get_mut(&d.seq).ok_or_else(|| format!("unknown sequence {}", d.seq))?;
            let logits = self.fwd.forward(&mut s.caches, &[d.token])?;
            s.sampler.observe_generated(d.token);
            let sampled = Some(sample_next(&mut s.sampler, &logits, s.spec.top_logprobs));
            results.push(SeqResult { seq: d.seq, sampled, prompt_logprobs: Vec::new(), shard_tokens: s.caches.len() });
        }
        Ok(results)
    }
}

impl<B: Backend> PlanRunner for ForwardRunner<B> {
    fn world(&self) -> usize {
        1
    }

    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        Ok(vec![self.execute(plan)?])
    }
}
