//! The plan between the coordinator and the workers: what one step of a worker group does
//! (sequences to add, prefill chunks, decode tokens, sequences and snapshots to free), what each
//! rank answers, and the values both sides must agree on, each defined here once.

use crate::config::ModelConfig;
use crate::kernels::kv_block::CacheDtype;
use crate::sampling::SamplingParams;

/// A sequence of a worker group, named by the coordinator.
pub type SeqId = u64;
/// A prefix-cache snapshot: a sequence frozen at a position, to resume other sequences from.
pub type SnapshotId = u64;

/// Positions per global-cache block unless the group is loaded with another size: the unit of
/// the cache's allocation and of the prefix cache's matching.
pub const DEFAULT_BLOCK_TOKENS: usize = 256;

/// Prompt tokens per rank per step when every position needs logits (`rows × vocab` floats).
pub const PROMPT_LOGPROBS_CHUNK: usize = 256;

/// Bytes of global cache one position of context takes on the whole group (K and V of every KV
/// head, every rank's part together).
pub fn cache_bytes_per_token(cfg: &ModelConfig, dtype: CacheDtype) -> usize {
    cfg.cache_numbers_per_token() * dtype.bytes()
}

/// The context-parallel rank that keeps the K/V of a token every rank runs (decode): the one
/// with the smallest shard of the sequence's cache (`shard_lens`, in rank order; ties: the
/// lower rank), so that the shards stay even.
pub fn decode_owner(shard_lens: &[usize]) -> usize {
    (0..shard_lens.len()).min_by_key(|&r| (shard_lens[r], r)).expect("at least one rank")
}

/// A new sequence and how to sample it.
#[derive(Debug, Clone, Default)]
pub struct SeqSpec {
    pub seq: SeqId,
    pub sampling: SamplingParams,
    pub top_logprobs: usize,
    pub prompt_logprobs: bool,
    /// The request's id, for logs.
    pub request_id: String,
    /// Start from this prefix-cache snapshot instead of from nothing.
    pub resume_from: Option<SnapshotId>,
    /// The prompt tokens the snapshot already holds, for the repetition penalty's history
    /// (empty when the penalty is off: nothing else needs them).
    pub resumed_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct PrefillWork {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    /// Where each rank's chunk starts; empty for an even cut.
    pub chunk_starts: Vec<usize>,
    /// The prompt ends with this step: sample the first generated token.
    pub sample: bool,
    /// The prompt token after this step's last one (for its log-probability), if any.
    pub next_token: Option<u32>,
    /// After this step, save the sequence as this prefix-cache snapshot.
    pub snapshot: Option<SnapshotId>,
}

#[derive(Debug, Clone)]
pub struct DecodeWork {
    pub seq: SeqId,
    pub token: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub add: Vec<SeqSpec>,
    pub prefill: Vec<PrefillWork>,
    pub decode: Vec<DecodeWork>,
    pub free: Vec<SeqId>,
    /// Prefix-cache snapshots to drop (before anything else of the step).
    pub drop_snapshots: Vec<SnapshotId>,
}

/// A sampled token. Its log-probabilities are those of the raw model distribution: before the
/// penalties, the temperature and the filters that chose it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A prompt token's log-probability given the tokens before it, with the sequence's
/// `top_logprobs` most likely tokens at its position (most likely first; empty for none).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The prefix cache's disk tier: snapshot files every rank writes, reads or deletes, each its
/// own (no collective). Done in this order: removals, saves, drops of held snapshots (which
/// may just have been saved), loads (in order: a load may continue an earlier one), then the
/// listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotFiles {
    pub remove: Vec<BlockHash>,
    pub save: Vec<SnapshotSave>,
    pub drop: Vec<SnapshotId>,
    pub load: Vec<SnapshotLoad>,
    /// Report every file of this group's layout.
    pub list: bool,
}

/// The coordinator's hash of the prompt blocks a snapshot covers: the name of its file.
pub type BlockHash = [u8; 32];

/// Write snapshot `snap` (of blocks `hash`) to its file, as what it adds to `parent` (the
/// snapshot it continues, held too, and that one's hash).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSave {
    pub snap: SnapshotId,
    pub hash: BlockHash,
    pub parent: Option<(SnapshotId, BlockHash)>,
}

/// Make snapshot `snap` from the file of `hash`, on top of held snapshot `parent`.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotLoad {
    pub snap: SnapshotId,
    pub hash: BlockHash,
    pub parent: Option<SnapshotId>,
}

/// A snapshot file as a rank lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub hash: BlockHash,
    pub parent_hash: Option<BlockHash>,
    /// Where it resumes, and this rank's rows of it.
    pub pos: usize,
    pub rows: usize,
    pub bytes: u64,
}

/// One rank's answer to [`SnapshotFiles`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotFilesReport {
    /// Saved snapshots and their files' bytes.
    pub saved: Vec<(SnapshotId, u64)>,
    pub loaded: Vec<SnapshotId>,
    /// Saves and loads that failed, and why (a load that failed its checks removed its file).
    pub failed: Vec<(SnapshotId, String)>,
    pub listed: Vec<SnapshotFile>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeqResult {
    pub seq: SeqId,
    pub sampled: Option<Sampled>,
    /// Log-probabilities of the prompt tokens after each of this step's tokens (prefill with
    /// prompt log-probabilities only).
    pub prompt_logprobs: Vec<PromptLogprob>,
    /// This rank's rows of the sequence's global cache.
    pub shard_tokens: usize,
}
