//! Caches: the paged global KV cache and the per-sequence self-decoder state.

mod block_pool;
mod self_state;

pub use block_pool::{BlockId, BlockPool, CacheError, KvSeq};
pub use self_state::LayerState;
