//! One admitted request on its way through the group: what it has prefilled and generated, and
//! the events it sends its client (progress, tokens with their text, the final message).

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use yoco_worker::engine::{SeqId, SnapshotId};
use yoco_worker::plan::{PromptLogprob, Sampled};
use yoco_worker::tokenizer::Tokenizer;

use super::detok::{IncrementalDetokenizer, StopMatcher, StopOutcome};
use super::event::{End, Event, Finished, Progress, Timing, TokenChunk, Usage};
use super::prefix::Hash;
use super::request::{GenRequest, RequestError};
use crate::metrics::METRICS;

/// Where a request's events go: the gRPC or HTTP stream (or a test).
pub type EventSender = UnboundedSender<Event>;

pub struct Active {
    pub seq: SeqId,
    pub req: GenRequest,
    pub tx: EventSender,
    /// Cache blocks reserved on every rank for prompt + max_tokens.
    pub blocks: usize,
    /// The sequence exists on the workers.
    pub added: bool,
    pub prefilled: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached: usize,
    /// Chained hashes of the prompt's full blocks (prefix cache on).
    pub hashes: Vec<Hash>,
    /// The snapshot this sequence resumed from or took last (it pins it).
    pub head: Option<SnapshotId>,
    /// Snapshots this sequence took.
    pub made: Vec<SnapshotId>,
    /// Each rank's rows of the sequence's global cache.
    pub shards: Vec<usize>,
    /// The token to feed back in the next decode step.
    pub next: Option<u32>,
    pub generated: usize,
    prompt_logprobs: Vec<PromptLogprob>,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    prefill_started: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Active {
    pub fn new(seq: SeqId, req: GenRequest, tx: EventSender, blocks: usize, world: usize, hashes: Vec<Hash>) -> Self {
        let stop = StopMatcher::new(req.stop.clone());
        Active {
            seq,
            req,
            tx,
            blocks,
            added: false,
            prefilled: 0,
            cached: 0,
            hashes,
            head: None,
            made: Vec::new(),
            shards: vec![0; world],
            next: None,
            generated: 0,
            prompt_logprobs: Vec::new(),
            detok: IncrementalDetokenizer::default(),
            stop,
            prefill_started: None,
            first_token: None,
            last_token: None,
        }
    }

    /// Starts from snapshot `snap` of the prompt's first `pos` tokens (shards: each rank's rows).
    pub fn resume_from(&mut self, snap: SnapshotId, pos: usize, shards: Vec<usize>) {
        self.head = Some(snap);
        self.cached = pos;
        self.prefilled = pos;
        self.shards = shards;
    }

    pub fn remaining_prompt(&self) -> usize {
        self.req.prompt.len() - self.prefilled
    }

    pub fn send(&self, event: Event) {
        // A closed stream is noticed (and the request cancelled) before the next step.
        let _ = self.tx.send(event);
    }

    pub fn prefill_scheduled(&mut self) {
        self.prefill_started.get_or_insert_with(Instant::now);
    }

    /// A prefill step of `n` tokens ran; the first generated token comes with the last one.
    pub fn prefill_done(
        &mut self,
        tok: &Tokenizer,
        n: usize,
        logprobs: &[PromptLogprob],
        sampled: Option<Sampled>,
    ) -> Option<End> {
        self.prefilled += n;
        self.prompt_logprobs.extend_from_slice(logprobs);
        METRICS.prefill_tokens.inc_by(n as u64);
        if self.prefilled < self.req.prompt.len() {
            METRICS.prefill_progress.with_label_values(&[&self.req.id]).set(self.prefilled as i64);
            METRICS.prefill_total.with_label_values(&[&self.req.id]).set(self.req.prompt.len() as i64);
            let started = self.prefill_started.unwrap_or_else(Instant::now);
            self.send(Event::Progress(Progress {
                prefilled_tokens: self.prefilled,
                prompt_tokens: self.req.prompt.len(),
                elapsed_seconds: started.elapsed().as_secs_f64(),
            }));
            return None;
        }
        if self.req.prompt_logprobs {
            let lps = std::mem::take(&mut self.prompt_logprobs);
            self.send(Event::PromptLogprobs(lps));
        }
        match sampled {
            Some(s) => self.token(tok, s),
            None => {
                Some(End::Failed(RequestError::Internal("the group sampled no token at the end of the prompt".into())))
            }
        }
    }

    /// A generated token: sends it with its text; says whether the request ends with it.
    pub fn token(&mut self, tok: &Tokenizer, s: Sampled) -> Option<End> {
        let now = Instant::now();
        match self.last_token {
            None => {
                METRICS.time_to_first_token.observe(now.saturating_duration_since(self.req.arrived).as_secs_f64());
                self.clear_progress();
            }
            Some(t) => METRICS.inter_token_latency.observe(now.saturating_duration_since(t).as_secs_f64()),
        }
        METRICS.generation_tokens.inc();
        self.last_token = Some(now);
        self.first_token.get_or_insert(now);
        self.generated += 1;
        let id = s.token;
        // A stop token is in the output, its text is not.
        if self.req.stop_token_ids.contains(&id) {
            let text = self.flush(tok);
            self.send(Event::Tokens(TokenChunk { tokens: vec![s], text }));
            return Some(End::StopToken(id));
        }
        let delta = self.detok.push(tok, id);
        let (mut text, mut end) = match self.stop.push(&delta) {
            StopOutcome::Continue(text) => (text, None),
            StopOutcome::Stopped { text, stop } => (text, Some(End::StopString(stop))),
        };
        if end.is_none() && self.generated >= self.req.max_tokens {
            let rest = self.detok.flush(tok);
            match self.stop.push(&rest) {
                StopOutcome::Continue(t) => {
                    text.push_str(&t);
                    text.push_str(&self.stop.flush());
                    end = Some(End::Length);
                }
                StopOutcome::Stopped { text: t, stop } => {
                    text.push_str(&t);
                    end = Some(End::StopString(stop));
                }
            }
        }
        self.send(Event::Tokens(TokenChunk { tokens: vec![s], text }));
        if end.is_none() {
            self.next = Some(id);
        }
        end
    }

    /// Text held back so far, given when generation ends without a stop string.
    fn flush(&mut self, tok: &Tokenizer) -> String {
        let rest = self.detok.flush(tok);
        match self.stop.push(&rest) {
            StopOutcome::Continue(mut t) => {
                t.push_str(&self.stop.flush());
                t
            }
            StopOutcome::Stopped { text, .. } => text,
        }
    }

    fn clear_progress(&self) {
        let _ = METRICS.prefill_progress.remove_label_values(&[&self.req.id]);
        let _ = METRICS.prefill_total.remove_label_values(&[&self.req.id]);
    }

    /// Sends the final message.
    pub fn finish(&mut self, end: &End) {
        // The caller may open its next stream as soon as it reads the final message.
        self.req.hold = None;
        let now = Instant::now();
        let arrived = self.req.arrived;
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let prefill_start = self.prefill_started.unwrap_or(now);
        let timing = Timing {
            queue_seconds: secs(arrived, prefill_start),
            time_to_first_token_seconds: self.first_token.map_or(0.0, |t| secs(arrived, t)),
            prefill_tokens_per_second: self
                .first_token
                .map_or(0.0, |t| self.req.prompt.len() as f64 / secs(prefill_start, t).max(1e-9)),
            decode_tokens_per_second: self
                .first_token
                .map_or(0.0, |t| self.generated.saturating_sub(1) as f64 / secs(t, now).max(1e-9)),
            total_seconds: secs(arrived, now),
        };
        self.clear_progress();
        METRICS.e2e_latency.observe(timing.total_seconds);
        if self.prefill_started.is_some() {
            METRICS.queue_time.observe(timing.queue_seconds);
        }
        METRICS.prompt_tokens.inc_by(self.req.prompt.len() as u64);
        let label = match end {
            End::Length => "length",
            End::StopString(_) | End::StopToken(_) => "stop",
            End::Cancelled(_) => "abort",
            End::Failed(_) => "error",
        };
        METRICS.requests_finished.with_label_values(&[label]).inc();
        self.send(Event::Finished(Finished {
            end: end.clone(),
            usage: Usage {
                prompt_tokens: self.req.prompt.len(),
                completion_tokens: self.generated,
                cached_prompt_tokens: self.cached,
            },
            timing,
            seed: self.req.sampling.seed,
        }));
    }
}
