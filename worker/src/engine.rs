//! The single-rank engine: sequences with their caches, and `step`, which advances a batch of
//! sequences by some tokens each (prefill chunks and decode tokens mixed) and returns the logits
//! asked for. The cross-decoder runs only for rows whose logits are wanted (prefill early exit).

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::{BlockPool, CacheError, KvSeq, LayerState};
use crate::kernels::cross_attention::KvView;
use crate::model::{Model, Segment};

pub type SeqId = u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
    #[error("sequence {0} appears twice in one step")]
    SequenceTwiceInStep(SeqId),
    #[error("sequence {0}: a step item needs at least one token")]
    EmptyItem(SeqId),
    #[error("token id {token} is out of the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Which logits a step item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: a prefill chunk that is not the prompt's last (the cross-decoder is skipped).
    None,
    /// The last token's: to sample the next token.
    Last,
    /// Every token's: prompt log-probabilities (the cross-decoder runs for each position).
    All,
}

pub struct StepItem<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

#[derive(Debug)]
pub struct StepOutput {
    pub seq: SeqId,
    /// `[rows, vocab]`: one row for `Last`, one per token for `All`, none for `None`.
    pub logits: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Positions per global-cache block.
    pub block_tokens: usize,
    /// Bytes the global KV cache may use.
    pub cache_budget_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_tokens: 256,
            cache_budget_bytes: 8 << 30,
        }
    }
}

struct Sequence {
    /// Tokens seen so far: the position of the next token.
    pos: usize,
    self_state: Vec<LayerState>,
    kv: KvSeq,
}

pub struct Engine {
    model: Arc<Model>,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
}

impl Engine {
    pub fn new(model: Arc<Model>, opts: &EngineOptions) -> Self {
        let pool = BlockPool::new(
            opts.block_tokens,
            model.cfg.kv_dim(),
            opts.cache_budget_bytes,
        );
        Engine {
            model,
            pool,
            seqs: HashMap::new(),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn add_sequence(&mut self, id: SeqId) -> Result<(), EngineError> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        let seq = Sequence {
            pos: 0,
            self_state: self.model.new_self_state(),
            kv: KvSeq::default(),
        };
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Frees a sequence and its cache blocks; false if it did not exist.
    pub fn free_sequence(&mut self, id: SeqId) -> bool {
        match self.seqs.remove(&id) {
            Some(mut seq) => {
                seq.kv.free(&mut self.pool);
                true
            }
            None => false,
        }
    }

    pub fn sequence_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.pos)
    }

    /// Bytes of global cache a sequence holds (whole blocks).
    pub fn sequence_cache_bytes(&self, id: SeqId) -> Option<usize> {
        self.seqs
            .get(&id)
            .map(|s| s.kv.n_blocks() * self.pool.block_bytes())
    }

    /// Bytes of self-decoder state a sequence holds (constant in its length).
    pub fn sequence_state_bytes(&self, id: SeqId) -> Option<usize> {
        self.seqs
            .get(&id)
            .map(|s| s.self_state.iter().map(LayerState::bytes).sum())
    }

    /// Advances every item's sequence by its tokens. Either the whole step happens, or (on an
    /// error) no sequence changes.
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<StepOutput>, EngineError> {
        self.validate(items)?;
        let mut seqs: Vec<Sequence> = items
            .iter()
            .map(|it| self.seqs.remove(&it.seq).expect("validated"))
            .collect();
        let reserved = reserve_all(&mut seqs, items, &mut self.pool);
        let result = reserved.map(|()| self.forward(items, &mut seqs));
        for (it, seq) in items.iter().zip(seqs) {
            self.seqs.insert(it.seq, seq);
        }
        result
    }

    fn validate(&self, items: &[StepItem]) -> Result<(), EngineError> {
        let vocab = self.model.cfg.vocab_size;
        for (i, it) in items.iter().enumerate() {
            if !self.seqs.contains_key(&it.seq) {
                return Err(EngineError::UnknownSequence(it.seq));
            }
            if items[..i].iter().any(|o| o.seq == it.seq) {
                return Err(EngineError::SequenceTwiceInStep(it.seq));
            }
            if it.tokens.is_empty() {
                return Err(EngineError::EmptyItem(it.seq));
            }
            if let Some(&token) = it.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange { token, vocab });
            }
        }
        Ok(())
    }

    fn forward(&mut self, items: &[StepItem], seqs: &mut [Sequence]) -> Vec<StepOutput> {
        let model = &*self.model;
        let mut segments = Vec::with_capacity(items.len());
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for (it, seq) in items.iter().zip(seqs.iter()) {
            let start = tokens.len();
            tokens.extend_from_slice(it.tokens);
            positions.extend(seq.pos..seq.pos + it.tokens.len());
            segments.push(Segment {
                rows: start..tokens.len(),
                start_pos: seq.pos,
            });
        }
        let mut x = model.embed(&tokens);
        let rope = model.self_rope(&positions);
        for layer in 0..model.self_layers.len() {
            let mut states: Vec<&mut LayerState> =
                seqs.iter_mut().map(|s| &mut s.self_state[layer]).collect();
            model.self_layer(layer, &mut x, &segments, &mut states, &rope);
        }
        let (k, v) = model.kv_project(&x, &positions);
        let kvd = model.cfg.kv_dim();
        for (seg, seq) in segments.iter().zip(seqs.iter_mut()) {
            let r = seg.rows.start * kvd..seg.rows.end * kvd;
            seq.kv.append(&mut self.pool, &k[r.clone()], &v[r]);
            seq.pos += seg.rows.len();
        }

        // Early exit: only rows whose logits are wanted enter the cross-decoder.
        let dim = model.cfg.dim;
        let views: Vec<KvView> = seqs.iter().map(|s| s.kv.view(&self.pool)).collect();
        let mut rows_x = Vec::new();
        let mut rows_pos = Vec::new();
        let mut rows_view = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        for (i, (it, seg)) in items.iter().zip(&segments).enumerate() {
            let rows = match it.logits {
                Logits::None => seg.rows.end..seg.rows.end,
                Logits::Last => seg.rows.end - 1..seg.rows.end,
                Logits::All => seg.rows.clone(),
            };
            counts.push(rows.len());
            for r in rows {
                rows_x.extend_from_slice(&x[r * dim..(r + 1) * dim]);
                rows_pos.push(positions[r]);
                rows_view.push(&views[i]);
            }
        }
        let logits = if rows_pos.is_empty() {
            Vec::new()
        } else {
            model.logits(&model.cross_decode(rows_x, &rows_pos, &rows_view))
        };
        let vocab = model.cfg.vocab_size;
        let mut start = 0;
        items
            .iter()
            .zip(counts)
            .map(|(it, n)| {
                let out = StepOutput {
                    seq: it.seq,
                    logits: logits[start * vocab..(start + n) * vocab].to_vec(),
                };
                start += n;
                out
            })
            .collect()
    }
}

/// Reserves cache blocks for every item, or (on failure) gives back what this call took.
fn reserve_all(
    seqs: &mut [Sequence],
    items: &[StepItem],
    pool: &mut BlockPool,
) -> Result<(), EngineError> {
    for i in 0..items.len() {
        if let Err(e) = seqs[i].kv.reserve(pool, items[i].tokens.len()) {
            for seq in &mut seqs[..i] {
                seq.kv.trim(pool);
            }
            return Err(e.into());
        }
    }
    Ok(())
}
