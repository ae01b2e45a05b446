//! The ops of the forward pass, each named after the math, as a trait ([`Backend`]) with two
//! implementations: the CPU kernels ([`cpu::CpuBackend`]) and the CUDA ones
//! (`crate::cuda::ops::Gpu`, on a GPU with feature `cuda`, or in the tests' emulator). The YOCO
//! forward pass is written once over it (`crate::engine`). Activations, weights, retention
//! states and the global KV cache live where the backend keeps them (host memory or device
//! memory); token ids go in, logits come out, and what the ranks of a group exchange goes
//! through the host ([`Backend::download_owned`], [`Backend::upload_owned`]).
//!
//! Beside the ops, a backend has hooks for what makes it fast where the generic code would
//! not be: every sequence's retention of a step in one call ([`Backend::retention_batch`]:
//! in parallel on the CPU), a step's logits into a reused buffer ([`Backend::logits_into`]),
//! and rows of the cross-decoder grouped to fit the last-level cache ([`Backend::row_groups`]).

pub mod cpu;
pub mod gpu;

use std::ops::Range;

use crate::kernels::cross_attention::{CrossShape, Partial};
use crate::kernels::kv_block::CacheDtype;
use crate::kernels::rope::Rope;
use crate::weights::Tensor;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{backend} backend: {message}")]
pub struct BackendError {
    pub backend: &'static str,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// The ops of the forward pass, each named after the math and computing what the CPU kernel of
/// the same name computes. Row-major `[rows, width]` activations throughout.
///
/// A backend and its values are shared between threads (`Sync`): where [`Backend::row_groups`]
/// splits the cross-decoder's rows, the groups run in parallel over the same weights and cache.
/// An engine and its backend move between threads (`Send`): a CPU engine runs each step on a
/// thread pool of its own.
pub trait Backend: Send + Sync {
    /// f32 activations (and norm weights).
    type Buf: Send + Sync;
    /// A weight matrix `[out, in]` in its element type.
    type Matrix: Send + Sync;
    /// The global KV cache: blocks of `[K rows; V rows]`.
    type Pool: Send + Sync;
    /// RoPE angles for a list of positions.
    type RopeTable: Send + Sync;
    /// A sequence's block table, as cross-attention reads it.
    type BlockTable: Send + Sync;

    fn name(&self) -> &'static str;
    /// The type large products compute in, where the backend chooses it ("f32", "bf16"); empty
    /// where the weights' type decides (a GPU's GEMMs take the weights' type).
    fn compute_name(&self) -> &'static str {
        ""
    }
    /// Makes the backend's device current on the calling thread: the engine calls it at every
    /// entry that touches the device and before it drops its buffers, as it may be driven from
    /// any thread (by default nothing: host memory needs no binding).
    fn bind(&self) -> Result<()> {
        Ok(())
    }
    /// Whether the kernels run on host threads (rayon), so that the engine runs each step on a
    /// thread pool of its own (see `Engine::step`); a GPU backend's host side only launches.
    fn host_threads(&self) -> bool {
        false
    }
    fn upload(&self, x: &[f32]) -> Result<Self::Buf>;
    fn download(&self, x: &Self::Buf) -> Result<Vec<f32>>;
    /// The buffer's elements on the host, the buffer given up (on the CPU: no copy).
    fn download_owned(&self, x: Self::Buf) -> Result<Vec<f32>> {
        self.download(&x)
    }
    /// A buffer of the host's elements (on the CPU: no copy).
    fn upload_owned(&self, x: Vec<f32>) -> Result<Self::Buf> {
        self.upload(&x)
    }
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// Where `x` lives in device memory (address, f32 elements), every write to it complete, for
    /// collectives that move device memory (NCCL); `None` for host memory (the default).
    fn device_buffer(&self, x: &Self::Buf) -> Result<Option<(u64, usize)>> {
        let _ = x;
        Ok(None)
    }
    /// A matrix of the model, `[out, in]`, as the backend computes with it.
    fn matrix(&self, t: &Tensor) -> Result<Self::Matrix>;

    /// `x [m, in] · wᵀ`: `[m, out]`.
    fn matmul(&self, x: &Self::Buf, m: usize, w: &Self::Matrix) -> Result<Self::Buf>;
    /// `x · wᵀ` for each of `ws`, which share the input (a layer's projections of one normed
    /// input): a backend may prepare `x` once for all of them.
    fn matmuls(&self, x: &Self::Buf, m: usize, ws: &[&Self::Matrix]) -> Result<Vec<Self::Buf>> {
        ws.iter().map(|w| self.matmul(x, m, w)).collect()
    }
    fn rms_norm(&self, x: &Self::Buf, rows: usize, dim: usize, w: Option<&Self::Buf>, eps: f32) -> Result<Self::Buf>;
    /// `a += b` over n elements.
    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf, n: usize) -> Result<()>;
    /// `a ← silu(a) ⊙ b` over n elements.
    fn silu_mul(&self, a: &mut Self::Buf, b: &Self::Buf, n: usize) -> Result<()>;
    /// `logsigmoid(x) / normalizer` over n elements.
    fn log_sigmoid_scaled(&self, x: &Self::Buf, n: usize, normalizer: f32) -> Result<Self::Buf>;
    /// Rows of the embedding table for `ids`, times `scale`: the table holds the ids from
    /// `first` on (a tensor-parallel rank's part of the vocabulary); an id outside it gets a
    /// row of zeros (the rank that holds it adds its row in the all-reduce).
    fn embed(&self, ids: &[u32], table: &Self::Matrix, first: u32, scale: f32) -> Result<Self::Buf>;
    /// The RoPE angles of `positions` for `rope`'s frequencies, made once and shared by every
    /// layer (and by q and k) that rotates rows at those positions.
    fn rope_table(&self, rope: &Rope, positions: &[u32]) -> Result<Self::RopeTable>;
    /// Interleaved RoPE of `x [positions, heads · head_dim]` in place, by `table`'s angles.
    fn rope(&self, x: &mut Self::Buf, table: &Self::RopeTable, heads: usize, head_dim: usize) -> Result<()>;
    /// Gated retention over `tokens` tokens from the state in slot `slot` of
    /// `states [slots, heads, d, d]`, left there after the last token: the chunkwise form, or
    /// the recurrent one for a single token.
    #[allow(clippy::too_many_arguments)]
    fn retention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        gamma: &Self::Buf,
        states: &mut Self::Buf,
        slot: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self::Buf>;
    /// [`Self::retention`] of several sequences at once: the rows `segments[i]` of the step's
    /// `q`, `k`, `v`, `gamma` from the state `states[i]` (`[heads, d, d]`, left after the
    /// segment's last row). Returns `[rows, heads · head_dim]`, zero outside the segments. By
    /// default one segment after another.
    #[allow(clippy::too_many_arguments)]
    fn retention_batch(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        gamma: &Self::Buf,
        segments: &[Range<usize>],
        states: &mut [&mut Self::Buf],
        heads: usize,
        head_dim: usize,
    ) -> Result<Self::Buf> {
        let qd = heads * head_dim;
        let rows = segments.iter().map(|s| s.end).max().unwrap_or(0);
        let mut o = self.zeros(rows * qd)?;
        for (seg, state) in segments.iter().zip(states.iter_mut()) {
            let part = |x: &Self::Buf, w: usize| self.rows(x, w, seg.clone());
            let (qs, ks, vs, gs) = (part(q, qd)?, part(k, qd)?, part(v, qd)?, part(gamma, heads)?);
            let os = self.retention(&qs, &ks, &vs, &gs, state, 0, seg.len(), heads, head_dim)?;
            self.write_rows(&mut o, qd, seg.start, &os, seg.len())?;
        }
        Ok(o)
    }
    /// `out [tokens, heads · head_dim] += exp(G_t) · q_t S_in` per head, `G_t` the log-decays
    /// `gamma [tokens, heads]` summed (in f64) from the first token to t and `s_in [heads, d, d]`
    /// the state before the tokens: how a context-parallel rank corrects outputs it computed
    /// from a zero state once it knows what came before its chunk. (`gamma` and `s_in` are on
    /// the host: they come from the exchange with the other ranks.)
    #[allow(clippy::too_many_arguments)]
    fn retention_add_incoming(
        &self,
        q: &Self::Buf,
        gamma: &[f32],
        s_in: &[f32],
        out: &mut Self::Buf,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// Zeroes elements `range` of `x`.
    fn zero(&self, x: &mut Self::Buf, range: Range<usize>) -> Result<()>;
    /// Sliding-window attention of `tokens` queries over `prefix + tokens` key/value rows.
    #[allow(clippy::too_many_arguments)]
    fn window_attention(
        &self,
        q: &Self::Buf,
        keys: &Self::Buf,
        values: &Self::Buf,
        tokens: usize,
        prefix: usize,
        window: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self::Buf>;
    /// `x [m, in] · wᵀ` on the host, in `out`, whose allocation it reuses where it is large
    /// enough: a step's logits (`[rows, vocab]` is megabytes, whose fresh pages cost more to
    /// fault in than the step's sampling takes).
    fn logits_into(&self, x: &Self::Buf, m: usize, w: &Self::Matrix, out: Vec<f32>) -> Result<Vec<f32>> {
        drop(out);
        self.download_owned(self.matmul(x, m, w)?)
    }
    /// Consecutive groups of the cross-decoder's rows (row r reading `bytes[r]` of cache) that
    /// are best run through every layer apart, in parallel, so that each group's caches stay in
    /// a last-level cache of `llc` bytes; `None`: all rows at once (the default).
    fn row_groups(&self, bytes: &[usize], llc: usize) -> Option<Vec<Range<usize>>> {
        let _ = (bytes, llc);
        None
    }
    /// Rows `rows` of `x [_, width]`, as a new buffer.
    fn rows(&self, x: &Self::Buf, width: usize, rows: Range<usize>) -> Result<Self::Buf>;
    /// Copies rows `0..rows` of `src [_, width]` over rows `at..at + rows` of `dst`.
    fn write_rows(&self, dst: &mut Self::Buf, width: usize, at: usize, src: &Self::Buf, rows: usize) -> Result<()>;
    /// `a` then `b`, both `[_, width]`, as one buffer.
    fn concat(&self, a: &Self::Buf, a_rows: usize, b: &Self::Buf, b_rows: usize, width: usize) -> Result<Self::Buf>;

    fn kv_pool(&self, dtype: CacheDtype, blocks: usize, block_tokens: usize, kv_dim: usize) -> Result<Self::Pool>;
    /// Stores K and V rows `[n, kv_dim]` as positions `start..start + n` of the sequence whose
    /// blocks `table` lists.
    #[allow(clippy::too_many_arguments)]
    fn kv_write(
        &self,
        pool: &mut Self::Pool,
        table: &[u32],
        start: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        n: usize,
    ) -> Result<()>;
    /// Positions `0..len` of the sequence whose blocks `table` lists, checked against `pool`
    /// and made once for every cross-decoder layer of a step.
    fn block_table(&self, pool: &Self::Pool, table: &[u32], len: usize) -> Result<Self::BlockTable>;
    /// Copies cache block `src` of `pool` over block `dst` (copy-on-write of a block shared
    /// with a prefix-cache snapshot).
    fn kv_copy_block(&self, pool: &mut Self::Pool, src: u32, dst: u32) -> Result<()>;
    /// Cache block `block` of `pool` as little-endian bytes of its elements, K rows then V rows
    /// (a prefix snapshot written to disk).
    fn kv_read_block(&self, pool: &Self::Pool, block: u32) -> Result<Vec<u8>>;
    /// Overwrites cache block `block` of `pool` with [`Backend::kv_read_block`]'s bytes.
    fn kv_write_block(&self, pool: &mut Self::Pool, block: u32, bytes: &[u8]) -> Result<()>;
    /// The attention of one query over the positions of `table`, not yet normalised: the
    /// partial a context-parallel rank merges with the other ranks' (log-sum-exp).
    fn cross_attention_partial(
        &self,
        q: &Self::Buf,
        pool: &Self::Pool,
        table: &Self::BlockTable,
        shape: CrossShape,
    ) -> Result<Partial>;
    /// Attention of one query `[heads · head_dim]` over the positions of `table`.
    fn cross_attention(
        &self,
        q: &Self::Buf,
        pool: &Self::Pool,
        table: &Self::BlockTable,
        shape: CrossShape,
    ) -> Result<Self::Buf>;
    /// [`Self::cross_attention_partial`] of query row i of `q` (`[rows, heads · head_dim]`)
    /// over `tables[i]`, or the empty partial where `visible[i]` is 0: a step's rows in one
    /// call, which a backend may run in parallel (by default one row after another).
    fn cross_attention_partials(
        &self,
        q: &Self::Buf,
        pool: &Self::Pool,
        tables: &[Self::BlockTable],
        visible: &[usize],
        shape: CrossShape,
    ) -> Result<Vec<Partial>> {
        let qd = shape.q_dim();
        tables
            .iter()
            .zip(visible)
            .enumerate()
            .map(|(i, (table, &len))| match len {
                0 => Ok(Partial::empty(shape)),
                _ => self.cross_attention_partial(&self.rows(q, qd, i..i + 1)?, pool, table, shape),
            })
            .collect()
    }
    /// [`Self::cross_attention`] of query row i of `q` (`[rows, heads · head_dim]`) over
    /// `tables[i]`: `[rows, heads · head_dim]`, in one call (by default one row after another).
    fn cross_attention_rows(
        &self,
        q: &Self::Buf,
        pool: &Self::Pool,
        tables: &[Self::BlockTable],
        shape: CrossShape,
    ) -> Result<Self::Buf> {
        let qd = shape.q_dim();
        if let [table] = tables {
            return self.cross_attention(q, pool, table, shape);
        }
        let mut o = self.zeros(tables.len() * qd)?;
        for (i, table) in tables.iter().enumerate() {
            let oi = self.cross_attention(&self.rows(q, qd, i..i + 1)?, pool, table, shape)?;
            self.write_rows(&mut o, qd, i, &oi, 1)?;
        }
        Ok(o)
    }
}
