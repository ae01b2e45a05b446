//! Plans (`crate::executor::Plan`) run by the backend forward pass on one device: what
//! `yoco generate --device cuda` drives, and what a worker on a GPU serves (`crate::service`),
//! alone or as one rank of a context-parallel group (every rank runs the same plans; they agree
//! on each plan before it changes anything, and on rank 0's sampled tokens after). It does what the CPU engine's executor does with a plan: sampling is the
//! same code (same seeded sampler, same penalties, same reported log-probabilities), prefix-cache
//! snapshots share cache blocks, prompt log-probabilities run the cross-decoder for every
//! prompt position, and a plan's decode tokens run as one batch.

use std::collections::HashMap;

use super::{Backend, Forward, ForwardError, Sequence, Snapshot};
use crate::engine::{Logits, SeqId, SnapshotId};
use crate::executor::{prompt_logprobs, sample_next, use_first_ranks_tokens, Plan, SeqResult, SeqSpec};
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
    snapshots: HashMap<SnapshotId, Snapshot<B>>,
}

impl<B: Backend> ForwardRunner<B> {
    pub fn new(fwd: Forward<B>) -> Self {
        ForwardRunner { fwd, seqs: HashMap::new(), snapshots: HashMap::new() }
    }

    pub fn forward(&self) -> &Forward<B> {
        &self.fwd
    }

    /// Time spent exchanging with the other ranks of the group since the last call.
    pub fn take_collective_time(&mut self) -> std::time::Duration {
        self.fwd.take_collective_time()
    }

    /// Open sequences.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Snapshots held, and the bytes of self-decoder state they copy.
    pub fn snapshot_usage(&self) -> (usize, usize) {
        (self.snapshots.len(), self.snapshots.values().map(Snapshot::state_bytes).sum())
    }

    /// Frees sequences (unknown ones are ignored: freeing is idempotent).
    pub fn free(&mut self, ids: &[SeqId]) {
        for id in ids {
            if let Some(s) = self.seqs.remove(id) {
                self.fwd.free(s.caches);
            }
        }
    }

    /// Runs a plan: the same steps, in the same order, as the CPU engine's executor.
    pub fn execute(&mut self, plan: &Plan) -> Result<Vec<SeqResult>, ForwardError> {
        self.free(&plan.free);
        for id in &plan.drop_snapshots {
            if let Some(snap) = self.snapshots.remove(id) {
                self.fwd.drop_snapshot(snap);
            }
        }
        // Every rank checks the plan against its own shard; all go on only if all can.
        let checked = self.check(plan);
        self.fwd.agree(checked)?;
        for spec in &plan.add {
            let mut sampler = Sampler::new(spec.sampling.clone());
            let caches = match spec.resume_from {
                Some(id) => {
                    let snap = self.snapshots.get(&id).ok_or(ForwardError::UnknownSnapshot(id))?;
                    sampler.observe_prompt(&spec.resumed_tokens);
                    self.fwd.new_sequence_from(snap)?
                }
                None => self.fwd.new_sequence()?,
            };
            self.seqs.insert(spec.seq, Seq { caches, spec: spec.clone(), sampler });
        }
        let mut results = Vec::with_capacity(plan.prefill.len() + plan.decode.len());
        for p in &plan.prefill {
            let s = self.seqs.get_mut(&p.seq).ok_or(ForwardError::UnknownSequence(p.seq))?;
            let vocab = self.fwd.config().vocab_size;
            let starts = (!p.chunk_starts.is_empty()).then_some(&p.chunk_starts[..]);
            let (logits, prompt_logprobs) = if s.spec.prompt_logprobs {
                let all = self.fwd.prefill(&mut s.caches, &p.tokens, starts, Logits::All)?;
                let lps = prompt_logprobs(&all, vocab, p, s.spec.top_logprobs);
                (p.sample.then(|| all[all.len() - vocab..].to_vec()), lps)
            } else {
                let want = if p.sample { Logits::Last } else { Logits::None };
                let logits = self.fwd.prefill(&mut s.caches, &p.tokens, starts, want)?;
                (p.sample.then_some(logits), Vec::new())
            };
            s.sampler.observe_prompt(&p.tokens);
            if let Some(id) = p.snapshot {
                let snap = self.fwd.snapshot(&s.caches)?;
                if let Some(old) = self.snapshots.insert(id, snap) {
                    self.fwd.drop_snapshot(old);
                }
            }
            let sampled = logits.map(|l| sample_next(&mut s.sampler, &l, s.spec.top_logprobs));
            results.push(SeqResult { seq: p.seq, sampled, prompt_logprobs, shard_tokens: s.caches.shard_rows() });
        }
        if !plan.decode.is_empty() {
            let tokens: Vec<u32> = plan.decode.iter().map(|d| d.token).collect();
            // `check` made sure that every decode sequence exists and appears once.
            let mut batch: Vec<&mut Seq<B>> = Vec::with_capacity(tokens.len());
            let mut by_id: HashMap<SeqId, &mut Seq<B>> = self.seqs.iter_mut().map(|(id, s)| (*id, s)).collect();
            for d in &plan.decode {
                batch.push(by_id.remove(&d.seq).ok_or(ForwardError::UnknownSequence(d.seq))?);
            }
            let mut caches: Vec<&mut Sequence<B>> = batch.iter_mut().map(|s| &mut s.caches).collect();
            let logits = self.fwd.decode(&mut caches, &tokens)?;
            let vocab = self.fwd.config().vocab_size;
            for ((s, d), row) in batch.into_iter().zip(&plan.decode).zip(logits.chunks_exact(vocab)) {
                s.sampler.observe_generated(d.token);
                let sampled = Some(sample_next(&mut s.sampler, row, s.spec.top_logprobs));
                results.push(SeqResult {
                    seq: d.seq,
                    sampled,
                    prompt_logprobs: Vec::new(),
                    shard_tokens: s.caches.shard_rows(),
                });
            }
        }
        self.agree_on_tokens(&mut results)?;
        Ok(results)
    }

    /// Makes every rank of a group use rank 0's sampled tokens (as the CPU engine's executor).
    fn agree_on_tokens(&mut self, results: &mut [SeqResult]) -> Result<(), ForwardError> {
        if self.fwd.world() == 1 {
            return Ok(());
        }
        let fwd = &mut self.fwd;
        use_first_ranks_tokens(results, |tokens| fwd.broadcast_from_first(tokens))
    }

    /// Everything a plan could fail on before it changes anything: sequences to add that exist,
    /// snapshots to resume from that do not, work for unknown sequences or twice for one, and
    /// cache blocks or state slots beyond what is free.
    fn check(&self, plan: &Plan) -> Result<(), ForwardError> {
        let mut added = std::collections::HashSet::new();
        for spec in &plan.add {
            if self.seqs.contains_key(&spec.seq) || !added.insert(spec.seq) {
                return Err(ForwardError::DuplicateSequence(spec.seq));
            }
            if let Some(id) = spec.resume_from.filter(|id| !self.snapshots.contains_key(id)) {
                return Err(ForwardError::UnknownSnapshot(id));
            }
        }
        let free_slots = self.fwd.options().max_sequences - self.fwd.open_sequences();
        if plan.add.len() > free_slots {
            return Err(ForwardError::NoFreeSlot(self.fwd.options().max_sequences));
        }
        let (rank, world) = (self.fwd.rank(), self.fwd.world());
        for p in &plan.prefill {
            if p.tokens.is_empty() {
                return Err(ForwardError::Empty);
            }
            if !p.chunk_starts.is_empty() {
                crate::cp::validate_split(&p.chunk_starts, p.tokens.len(), world).map_err(ForwardError::BadSplit)?;
            }
        }
        let vocab = self.fwd.config().vocab_size;
        let tokens = plan.prefill.iter().flat_map(|p| &p.tokens).chain(plan.decode.iter().map(|d| &d.token));
        if let Some(&token) = tokens.into_iter().find(|&&t| t as usize >= vocab) {
            return Err(ForwardError::TokenOutOfRange { token, vocab });
        }
        // This rank's new rows of each sequence: its chunk of a prefill, a decode token if it
        // keeps that token's K/V.
        let mut seen = std::collections::HashSet::new();
        let mut blocks = 0;
        let prefills = plan.prefill.iter().map(|p| (p.seq, Some(p)));
        for (id, prefill) in prefills.chain(plan.decode.iter().map(|d| (d.seq, None))) {
            if !seen.insert(id) {
                return Err(ForwardError::SequenceTwiceInStep(id));
            }
            let ((table, rows, owner), resumed) = match (self.seqs.get(&id), plan.add.iter().find(|s| s.seq == id)) {
                (Some(s), _) => (s.caches.growth(), false),
                (None, Some(spec)) => match spec.resume_from.and_then(|id| self.snapshots.get(&id)) {
                    Some(snap) => (snap.growth(), true),
                    None => ((&[][..], 0, 0), false),
                },
                (None, None) => return Err(ForwardError::UnknownSequence(id)),
            };
            let mine = match prefill {
                Some(p) if p.chunk_starts.is_empty() => {
                    crate::cp::chunk(&crate::cp::even_split(p.tokens.len(), world), p.tokens.len(), rank).len()
                }
                Some(p) => crate::cp::chunk(&p.chunk_starts, p.tokens.len(), rank).len(),
                None => usize::from(owner == rank),
            };
            blocks += self.fwd.blocks_to_grow(table, rows, mine, resumed);
        }
        if blocks > self.fwd.free_blocks() {
            return Err(ForwardError::CacheFull { needed: blocks, free: self.fwd.free_blocks() });
        }
        Ok(())
    }
}

impl<B: Backend> PlanRunner for ForwardRunner<B> {
    fn world(&self) -> usize {
        self.fwd.world()
    }

    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        Ok(vec![self.execute(plan)?])
    }
}
