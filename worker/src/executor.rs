//! Executes one engine step's plan on a rank: sequences to add (with their sampling settings),
//! prefill chunks, decode tokens, sequences to free. Sampling happens here, identically on every
//! rank (same logits, same seeded generator, same token history for the penalties); rank 0's
//! tokens are broadcast so that the ranks can never drift apart even if floating point did.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::engine::{Engine, EngineError, Logits, Placement, StepItem, StepOutput};
use crate::plan::{
    Plan, PrefillWork, PromptLogprob, Sampled, SeqId, SeqResult, SeqSpec, SnapshotFiles, SnapshotFilesReport,
};
use crate::sampling::{top_logprobs, Sampler};
use crate::snapshot_store::{Layout, SnapshotStore};

struct SeqCtl {
    spec: SeqSpec,
    sampler: Sampler,
}

/// The engine of one rank plus each sequence's sampler.
pub struct Executor<B: Backend = CpuBackend> {
    engine: Engine<B>,
    seqs: HashMap<SeqId, SeqCtl>,
}

impl<B: Backend> Executor<B> {
    pub fn new(engine: Engine<B>) -> Self {
        Executor { engine, seqs: HashMap::new() }
    }

    pub fn engine(&self) -> &Engine<B> {
        &self.engine
    }

    /// Seconds spent in collectives since the last call.
    pub fn take_collective_seconds(&mut self) -> f64 {
        self.engine.take_collective_seconds()
    }

    /// Time spent in collectives since the last call, by sub-group.
    pub fn take_collective_spent(&mut self) -> crate::comm::Spent {
        self.engine.take_collective_spent()
    }

    /// Frees sequences (unknown ones are ignored: freeing is idempotent).
    pub fn free(&mut self, ids: &[SeqId]) {
        for id in ids {
            if let Some(ctl) = self.seqs.remove(id) {
                tracing::debug!(request = %ctl.spec.request_id, seq = id, "sequence freed");
            }
            self.engine.free_sequence(*id);
        }
    }

    /// Runs a plan: frees, adds, then one engine step for all its prefill and decode work, then
    /// samples. A plan refused before its step ran (a bad item, a sequence or snapshot that does
    /// not exist, a full cache on any rank) changes nothing but its frees: the sequences it added
    /// are gone again. Every rank gets the same plans, so every rank refuses alike.
    pub fn execute(&mut self, plan: &Plan) -> Result<Vec<SeqResult>, EngineError> {
        self.free(&plan.free);
        for &id in &plan.drop_snapshots {
            self.engine.drop_snapshot(id);
        }
        let mut added = Vec::with_capacity(plan.add.len());
        let outputs = match self.add_and_step(plan, &mut added) {
            Ok(outputs) => outputs,
            Err(e) => {
                self.free(&added);
                return Err(e);
            }
        };
        // The step went through, so its tokens join the sequences' histories (for the
        // penalties) before anything is sampled; a step that failed leaves them as they were.
        // Every rank receives all of a step's tokens, so every rank keeps the same history.
        for p in &plan.prefill {
            if let Some(ctl) = self.seqs.get_mut(&p.seq) {
                ctl.sampler.observe_prompt(&p.tokens);
            }
            if let Some(id) = p.snapshot {
                self.engine.snapshot(p.seq, id)?;
            }
        }
        for d in &plan.decode {
            if let Some(ctl) = self.seqs.get_mut(&d.seq) {
                ctl.sampler.observe_generated(d.token);
            }
        }
        let vocab = self.engine.model().cfg.vocab_size;
        // Each output's sampler (the engine refuses a sequence twice in one step), so that the
        // outputs are sampled in parallel: a log-probability reads the whole vocabulary.
        let mut ctls: HashMap<SeqId, &mut SeqCtl> = self.seqs.iter_mut().map(|(id, c)| (*id, c)).collect();
        let mut mine = Vec::with_capacity(outputs.len());
        for out in &outputs {
            mine.push(ctls.remove(&out.seq).ok_or(EngineError::UnknownSequence(out.seq))?);
        }
        let mut results: Vec<SeqResult> = outputs
            .par_iter()
            .zip(mine.par_iter_mut())
            .enumerate()
            .map(|(i, (out, ctl))| {
                let (sample, prompt_logprobs) = match plan.prefill.get(i) {
                    Some(p) => {
                        let lps = if ctl.spec.prompt_logprobs {
                            prompt_logprobs(&out.logits, vocab, p, ctl.spec.top_logprobs)
                        } else {
                            Vec::new()
                        };
                        (p.sample, lps)
                    }
                    None => (true, Vec::new()),
                };
                let sampled = sample.then(|| {
                    let last = &out.logits[out.logits.len() - vocab..];
                    sample_next(&mut ctl.sampler, last, ctl.spec.top_logprobs)
                });
                SeqResult { seq: out.seq, sampled, prompt_logprobs, shard_tokens: 0 }
            })
            .collect();
        for r in &mut results {
            r.shard_tokens = self.engine.sequence_shard_len(r.seq).unwrap_or(0);
        }
        self.agree_on_tokens(&mut results)?;
        Ok(results)
    }

    /// The plan's sequences added (their ids pushed to `added`), then its one engine step.
    fn add_and_step(&mut self, plan: &Plan, added: &mut Vec<SeqId>) -> Result<Vec<StepOutput>, EngineError> {
        for spec in &plan.add {
            let mut sampler = Sampler::new(spec.sampling.clone());
            match spec.resume_from {
                Some(snap) => {
                    self.engine.add_sequence_from(spec.seq, snap)?;
                    sampler.observe_prompt(&spec.resumed_tokens);
                }
                None => self.engine.add_sequence(spec.seq)?,
            }
            tracing::debug!(request = %spec.request_id, seq = spec.seq, resume_from = ?spec.resume_from, "sequence added");
            self.seqs.insert(spec.seq, SeqCtl { spec: spec.clone(), sampler });
            added.push(spec.seq);
        }
        let decode_tokens: Vec<[u32; 1]> = plan.decode.iter().map(|d| [d.token]).collect();
        let mut items = Vec::new();
        for p in &plan.prefill {
            let wants_all = self.seqs.get(&p.seq).is_some_and(|c| c.spec.prompt_logprobs);
            let logits = match (wants_all, p.sample) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            let starts = (!p.chunk_starts.is_empty()).then(|| p.chunk_starts.clone());
            items.push(StepItem { seq: p.seq, tokens: &p.tokens, logits, placement: Placement::Sharded(starts) });
        }
        for (d, token) in plan.decode.iter().zip(&decode_tokens) {
            items.push(StepItem::decode(d.seq, token));
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.engine.step(&items)
    }

    /// The disk tier's store for this rank under `root`, for the model of `fingerprint`
    /// (`crate::snapshot_store::model_fingerprint`).
    pub fn open_store(&self, root: &std::path::Path, fingerprint: String) -> std::io::Result<SnapshotStore> {
        let e = &self.engine;
        let layout = Layout {
            model: fingerprint,
            world: e.world(),
            tp: e.tp_size(),
            rank: e.rank(),
            block_tokens: e.pool().block_tokens(),
            block_bytes: e.pool().block_bytes(),
            cache_dtype: e.pool().dtype().name().to_string(),
        };
        let (retention, window) = e.state_widths();
        SnapshotStore::open(root, layout, retention, window)
    }

    /// The disk tier's work on this rank (`store`: none when the group has no disk tier):
    /// removals, saves, drops, loads, listing; each save or load that fails is reported, not
    /// fatal.
    pub fn snapshot_files(&mut self, store: Option<&SnapshotStore>, req: &SnapshotFiles) -> SnapshotFilesReport {
        let mut report = SnapshotFilesReport::default();
        let no_tier = || "this worker group has no prefix-cache disk directory".to_string();
        for h in &req.remove {
            if let Some(store) = store {
                store.remove(h);
            }
        }
        for s in &req.save {
            let saved = store.ok_or_else(no_tier).and_then(|store| {
                let image = self.engine.export_snapshot(s.snap, s.parent.map(|p| p.0)).map_err(|e| e.to_string())?;
                store.save(&s.hash, s.parent.as_ref().map(|p| &p.1), &image).map_err(|e| e.to_string())
            });
            match saved {
                Ok(bytes) => report.saved.push((s.snap, bytes)),
                Err(why) => {
                    tracing::warn!(snapshot = s.snap, error = %why, "snapshot not written to disk");
                    report.failed.push((s.snap, why));
                }
            }
        }
        for &id in &req.drop {
            self.engine.drop_snapshot(id);
        }
        for l in &req.load {
            let loaded = store.ok_or_else(no_tier).and_then(|store| {
                let (_, image) = store.load(&l.hash).map_err(|e| e.to_string())?;
                self.engine.import_snapshot(l.snap, l.parent, &image).map_err(|e| e.to_string())
            });
            match loaded {
                Ok(()) => report.loaded.push(l.snap),
                Err(why) => {
                    tracing::warn!(snapshot = l.snap, error = %why, "snapshot not read from disk");
                    report.failed.push((l.snap, why));
                }
            }
        }
        match store {
            Some(store) if req.list => match store.list() {
                Ok(files) => report.listed = files,
                Err(e) => tracing::warn!(error = %e, dir = %store.dir().display(), "cannot list the snapshot files"),
            },
            _ => {}
        }
        report
    }

    /// Makes every rank use rank 0's sampled tokens.
    fn agree_on_tokens(&mut self, results: &mut [SeqResult]) -> Result<(), EngineError> {
        if self.engine.world() == 1 {
            return Ok(());
        }
        let engine = &mut self.engine;
        use_first_ranks_tokens(results, |tokens| engine.broadcast(0, tokens))
    }
}

/// Replaces the sampled tokens of `results` by rank 0's, which `broadcast` delivers (every
/// rank's executor does this after a step, so that the ranks never drift apart).
fn use_first_ranks_tokens<E>(
    results: &mut [SeqResult],
    broadcast: impl FnOnce(&mut Vec<f32>) -> Result<(), E>,
) -> Result<(), E> {
    let mut tokens: Vec<f32> = results.iter().filter_map(|r| r.sampled.as_ref()).map(|s| s.token as f32).collect();
    broadcast(&mut tokens)?;
    for (s, t) in results.iter_mut().filter_map(|r| r.sampled.as_mut()).zip(tokens) {
        // Token ids are below 2^24, so they travel exactly as f32.
        let t = t as u32;
        if s.token != t {
            tracing::warn!(mine = s.token, rank0 = t, "sampled token differed from rank 0's; using rank 0's");
            s.token = t;
        }
    }
    Ok(())
}

/// The next token from a row of logits, with its log-probability and the `top` most likely
/// alternatives, both of the raw logits: the penalties steer the choice, not the reported model.
fn sample_next(sampler: &mut Sampler, logits: &[f32], top: usize) -> Sampled {
    let token = sampler.sample(logits);
    let PromptLogprob { logprob, top_logprobs } = token_logprob(logits, token, top);
    Sampled { token, logprob, top_logprobs }
}

/// The log-probabilities of the prompt tokens that a prefill step's logits predict, each with
/// the `top` most likely tokens at its position: row t of `logits` (all positions of `p`)
/// predicts token t+1 of the step, the last row the next step's first (`p.next_token`; none at
/// the prompt's end). The rows go in parallel: each reads the whole vocabulary.
fn prompt_logprobs(logits: &[f32], vocab: usize, p: &PrefillWork, top: usize) -> Vec<PromptLogprob> {
    let targets: Vec<Option<u32>> = p.tokens.iter().skip(1).copied().map(Some).chain([p.next_token]).collect();
    logits
        .par_chunks_exact(vocab)
        .zip(targets)
        .filter_map(|(row, target)| target.map(|t| token_logprob(row, t, top)))
        .collect()
}

/// `token`'s log-probability under `logits` and the `top` most likely tokens, with the row's
/// normaliser computed once: the same values as [`logprob`] and [`top_logprobs`] of
/// [`log_softmax`], without materialising the row (for a sampled token and a prompt token alike).
fn token_logprob(logits: &[f32], token: u32, top: usize) -> PromptLogprob {
    let lse = crate::kernels::log_softmax::log_sum_exp(logits);
    let lp = |v: f32| (v as f64 - lse) as f32;
    // Ranked by logit: the same order as by log-probability.
    let top_logprobs = top_logprobs(logits, top).into_iter().map(|(t, v)| (t, lp(v))).collect();
    PromptLogprob { logprob: lp(logits[token as usize]), top_logprobs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{log_softmax, logprob};

    /// A prefill step's prompt log-probabilities and alternatives are, row by row, exactly what
    /// sampling reports for a generated token: `logprob` and the top of `log_softmax`.
    #[test]
    fn prompt_logprobs_match_the_sampled_tokens_definitions() {
        let vocab = 37;
        let logits: Vec<f32> = (0..4 * vocab).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.173).collect();
        let p = PrefillWork { tokens: vec![5, 9, 30, 2], next_token: Some(11), ..Default::default() };
        for top in [0, 1, 3, vocab + 5] {
            let got = prompt_logprobs(&logits, vocab, &p, top);
            let targets = [9, 30, 2, 11];
            assert_eq!(got.len(), 4);
            for ((row, t), g) in logits.chunks_exact(vocab).zip(targets).zip(&got) {
                assert_eq!(g.logprob, logprob(row, t));
                assert_eq!(g.top_logprobs, top_logprobs(&log_softmax(row), top));
            }
        }
        // At the prompt's end the last row predicts nothing.
        let end = PrefillWork { next_token: None, ..p };
        assert_eq!(prompt_logprobs(&logits, vocab, &end, 2).len(), 3);
    }
}
