//! The mixers' and the global cache's ops of [`Gpu`]: gated retention (chunkwise, recurrent,
//! and the incoming state of context parallelism), sliding-window attention, writes of K/V
//! rows into cache blocks and copies of blocks, block tables, and cross-attention over the
//! blocks (flash-decoding split, log-sum-exp merge).

use super::{check, i32_of, u32_of, Arg, BlockTables, DeviceKvPool, Gpu, PoolData};
use crate::cuda::runtime::{DeviceError, Gemm, GemmBatch, GemmType, Runtime};
use crate::cuda::{ATTN_TILE, MAX_HEAD_DIM, RETENTION_BLOCK, RETENTION_COLS};
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::kv_block::CacheDtype;

/// The most device memory one chunkwise retention call takes for its workspace: segments of the
/// prompt are as long as fits (2,880 tokens for the 3b preset, 24 heads of 128: 45 blocks of 24
/// heads, over a thousand products a batch).
pub const RETENTION_WORKSPACE_BYTES: usize = 256 << 20;

/// Blocks per segment of [`Gpu::retention_chunkwise`] within [`RETENTION_WORKSPACE_BYTES`]: a
/// block of a head takes five head-major row blocks (q, k, v, decayed k, o), its scores, its
/// state and its decays.
pub fn retention_segment_blocks(heads: usize, head_dim: usize) -> usize {
    let (bt, d) = (RETENTION_BLOCK, head_dim);
    let per_block = 4 * heads.max(1) * (5 * bt * d + bt * bt + d * d + bt + 1);
    (RETENTION_WORKSPACE_BYTES / per_block).max(1)
}

/// A batched product's operand: the first matrix, its leading dimension, the elements from one
/// product's matrix to the next's.
#[derive(Clone, Copy)]
struct Operand {
    addr: u64,
    ld: i32,
    stride: i64,
}

/// `count` f32 products `(m, n, k)` of `C (+)= op(A) · op(B)` (see [`Gemm`]).
fn batched(
    count: i32,
    (m, n, k): (i32, i32, i32),
    (a, trans_a): (Operand, bool),
    (b, trans_b): (Operand, bool),
    c: Operand,
    accumulate: bool,
) -> Gemm {
    Gemm {
        trans_a,
        trans_b,
        m,
        n,
        k,
        a: a.addr,
        lda: a.ld,
        b: b.addr,
        ldb: b.ld,
        input: GemmType::F32,
        c: c.addr,
        ldc: c.ld,
        accumulate,
        batch: Some(GemmBatch { count, stride_a: a.stride, stride_b: b.stride, stride_c: c.stride }),
    }
}

/// The device buffers of one chunkwise retention call (layouts in retention.cu).
struct RetentionWorkspace<R: Runtime> {
    qh: R::Buf<f32>,
    kh: R::Buf<f32>,
    vh: R::Buf<f32>,
    kd: R::Buf<f32>,
    o: R::Buf<f32>,
    w: R::Buf<f32>,
    s: R::Buf<f32>,
    gcum: R::Buf<f32>,
    bdecay: R::Buf<f32>,
}

impl<R: Runtime> Gpu<R> {
    fn check_head_dim(op: &'static str, head_dim: usize) -> Result<(), DeviceError> {
        check(op, head_dim > 0 && head_dim <= MAX_HEAD_DIM && head_dim.is_multiple_of(2), || {
            format!("head_dim {head_dim}: the kernels take even head dims up to {MAX_HEAD_DIM}")
        })
    }

    /// Chunkwise gated retention over `tokens` tokens from the state in slot `slot` of
    /// `states [slots, heads, d, d]` (left there after the last token): `out [tokens, heads · d]`.
    /// The blocks' products are batched GEMMs over every head and block of a segment of the
    /// prompt (see retention.cu), segments of `segment` tokens (rounded up to whole blocks; the
    /// tests carry the state across segments with small prompts) or, with `None`, as long as
    /// [`RETENTION_WORKSPACE_BYTES`] of workspace allows.
    #[allow(clippy::too_many_arguments)]
    pub fn retention_chunkwise(
        &self,
        q: &R::Buf<f32>,
        k: &R::Buf<f32>,
        v: &R::Buf<f32>,
        gamma: &R::Buf<f32>,
        states: &mut R::Buf<f32>,
        slot: usize,
        out: &mut R::Buf<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        segment: Option<usize>,
    ) -> Result<(), DeviceError> {
        const OP: &str = "retention_chunkwise";
        Self::check_head_dim(OP, head_dim)?;
        let n = tokens * heads * head_dim;
        for (what, buf) in [("q", q), ("k", k), ("v", v)] {
            self.fits(OP, what, buf, n)?;
        }
        self.fits(OP, "gamma", gamma, tokens * heads)?;
        let per = heads * head_dim * head_dim;
        self.fits(OP, "states", states, (slot + 1) * per)?;
        self.fits(OP, "out", out, n)?;
        if tokens == 0 || heads == 0 {
            return Ok(());
        }
        let (d, bt) = (head_dim, RETENTION_BLOCK);
        let segment = segment.unwrap_or_else(|| retention_segment_blocks(heads, head_dim) * bt);
        let max_nb = segment.div_ceil(bt).max(1).min(tokens.div_ceil(bt));
        let rows = heads * max_nb * bt * d;
        // Not zeroed: the gather writes every row (zeros past the prompt), the products with
        // beta 0 every score, state and output, the scan every entering state.
        let ws = RetentionWorkspace::<R> {
            qh: self.scratch(rows)?,
            kh: self.scratch(rows)?,
            vh: self.scratch(rows)?,
            kd: self.scratch(rows)?,
            o: self.scratch(rows)?,
            w: self.scratch(heads * max_nb * bt * bt)?,
            s: self.scratch(heads * max_nb * d * d)?,
            gcum: self.scratch(heads * max_nb * bt)?,
            bdecay: self.scratch(heads * max_nb)?,
        };
        let (h32, d32, t32) = (i32_of(OP, heads)?, i32_of(OP, d)?, i32_of(OP, tokens)?);
        let state = self.at_offset(states, slot * per);
        let mut first = 0;
        while first < tokens {
            let nb = max_nb.min((tokens - first).div_ceil(bt));
            let (nb32, batch) = (i32_of(OP, nb)?, i32_of(OP, heads * nb)?);
            let grid = (u32_of(OP, nb)?, u32_of(OP, heads)?, 1);
            let args = vec![
                self.at(q),
                self.at(k),
                self.at(v),
                self.at(gamma),
                self.at(&ws.qh),
                self.at(&ws.kh),
                self.at(&ws.vh),
                self.at(&ws.kd),
                self.at(&ws.gcum),
                self.at(&ws.bdecay),
                i32_of(OP, first)?.into(),
                t32.into(),
                h32.into(),
                d32.into(),
                nb32.into(),
            ];
            // SAFETY: q, k, v, gamma hold the prompt's rows (checked above); the workspace holds
            // heads · nb blocks (nb <= max_nb).
            unsafe { self.launch("retention_gather", grid, bt as u32, args)? };
            let (b32, rows, dd, tile) = (bt as i32, (bt * d) as i64, (d * d) as i64, (bt * bt) as i64);
            let op = |buf: &R::Buf<f32>, ld: i32, stride: i64| Operand { addr: self.rt.addr(buf), ld, stride };
            let (qh, kh, vh, kd) =
                (op(&ws.qh, d32, rows), op(&ws.kh, d32, rows), op(&ws.vh, d32, rows), op(&ws.kd, d32, rows));
            let (o, w, st) = (op(&ws.o, d32, rows), op(&ws.w, b32, tile), op(&ws.s, d32, dd));
            // Row-major blocks are column-major transposes: each product below is written for
            // cuBLAS as the transpose of the one named.
            // w[p] = Q Kᵀ, [t][u]: K (stored d × 64) transposed, times Qᵀ.
            let scores = batched(batch, (b32, b32, d32), (kh, true), (qh, false), w, false);
            // s[p] = Kdᵀ V, [i][j]: Vᵀ times Kd (stored d × 64) transposed.
            let state_add = batched(batch, (d32, d32, b32), (vh, false), (kd, true), st, false);
            // o[p] = Q s[p]: s[p]ᵀ Qᵀ.
            let inter = batched(batch, (d32, b32, d32), (st, false), (qh, false), o, false);
            // o[p] += w[p] V: Vᵀ wᵀ, added.
            let intra = batched(batch, (d32, b32, b32), (vh, false), (w, false), o, true);
            // SAFETY (the products and kernels below): every operand lies in the workspace,
            // sized for heads · max_nb blocks, and state in `states` (checked above).
            unsafe {
                self.rt.gemm(&scores)?;
                self.rt.gemm(&state_add)?;
                let scan = (u32_of(OP, (d * d).div_ceil(256))?, u32_of(OP, heads)?, 1);
                let args = vec![self.at(&ws.s), self.at(&ws.bdecay), state, nb32.into(), d32.into()];
                self.launch("retention_scan", scan, 256, args)?;
                self.rt.gemm(&inter)?;
                let args = vec![self.at(&ws.w), self.at(&ws.o), self.at(&ws.gcum), d32.into()];
                self.launch("retention_decay_terms", (u32_of(OP, heads * nb)?, 1, 1), 256, args)?;
                self.rt.gemm(&intra)?;
                let args = vec![
                    self.at(&ws.o),
                    self.at(out),
                    i32_of(OP, first)?.into(),
                    t32.into(),
                    h32.into(),
                    d32.into(),
                    nb32.into(),
                ];
                self.launch("retention_scatter", grid, 256, args)?;
            }
            first += nb * bt;
        }
        Ok(())
    }

    /// One recurrent retention step for `seqs` sequences, sequence s on state slot `slots[s]` of
    /// `states [slots, heads, d, d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn retention_recurrent(
        &self,
        q: &R::Buf<f32>,
        k: &R::Buf<f32>,
        v: &R::Buf<f32>,
        gamma: &R::Buf<f32>,
        slots: &[u32],
        states: &mut R::Buf<f32>,
        out: &mut R::Buf<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "retention_recurrent";
        Self::check_head_dim(OP, head_dim)?;
        let seqs = slots.len();
        let n = seqs * heads * head_dim;
        for (what, buf) in [("q", q), ("k", k), ("v", v)] {
            self.fits(OP, what, buf, n)?;
        }
        self.fits(OP, "gamma", gamma, seqs * heads)?;
        self.fits(OP, "out", out, n)?;
        let mut sorted = slots.to_vec();
        sorted.sort_unstable();
        // Two sequences on one slot would race on its state.
        check(OP, sorted.windows(2).all(|p| p[0] != p[1]), || format!("a slot twice in {slots:?}"))?;
        let slot_len = heads * head_dim * head_dim;
        let max = slots.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
        self.fits(OP, "states", states, max * slot_len)?;
        if seqs == 0 {
            return Ok(());
        }
        let dev_slots = self.upload(slots)?;
        let args = vec![
            self.at(q),
            self.at(k),
            self.at(v),
            self.at(gamma),
            self.at(&dev_slots),
            self.at(states),
            self.at(out),
            i32_of(OP, heads)?.into(),
            i32_of(OP, head_dim)?.into(),
        ];
        // SAFETY: buffers sized above; every slot lies within states.
        unsafe { self.launch("retention_recurrent", (u32_of(OP, heads)?, u32_of(OP, seqs)?, 1), 64, args) }
    }

    /// `out [tokens, heads · d] += decay_t · q_t S_in` per head: a context-parallel rank's
    /// correction of outputs computed from a zero state, `decay [tokens, heads]` being
    /// `exp(G_t)` and `s_in [heads, d, d]` the state before its chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn retention_add_incoming(
        &self,
        q: &R::Buf<f32>,
        decay: &R::Buf<f32>,
        s_in: &R::Buf<f32>,
        out: &mut R::Buf<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "retention_add_incoming";
        Self::check_head_dim(OP, head_dim)?;
        let n = tokens * heads * head_dim;
        self.fits(OP, "q", q, n)?;
        self.fits(OP, "out", out, n)?;
        self.fits(OP, "decay", decay, tokens * heads)?;
        self.fits(OP, "s_in", s_in, heads * head_dim * head_dim)?;
        if tokens == 0 {
            return Ok(());
        }
        let args = vec![
            self.at(q),
            self.at(decay),
            self.at(s_in),
            self.at(out),
            i32_of(OP, heads)?.into(),
            i32_of(OP, head_dim)?.into(),
        ];
        let grid = (u32_of(OP, tokens)?, u32_of(OP, heads)?, 1);
        // SAFETY: every buffer holds what the shapes need (checked above).
        unsafe { self.launch(OP, grid, RETENTION_COLS as u32, args) }
    }

    /// Copies cache block `src` of `pool` over block `dst` (K and V rows).
    pub fn copy_block(&self, pool: &mut DeviceKvPool<R>, src: usize, dst: usize) -> Result<(), DeviceError> {
        const OP: &str = "copy_block";
        check(OP, src < pool.blocks && dst < pool.blocks, || format!("blocks {src}, {dst} of {}", pool.blocks))?;
        if src == dst {
            return Ok(());
        }
        // The block's bits as 16-bit words (an f32 element is two), copied by one kernel.
        let ((from, words), (to, _)) = (self.block_words(pool, src), self.block_words(pool, dst));
        let args = vec![from, to, Arg::U64(words as u64)];
        // SAFETY: both blocks lie inside the pool (checked) and are distinct, so do not overlap.
        unsafe { self.launch("copy_u16", Self::elementwise(words), 256, args) }
    }

    /// The bits of cache block `id` as 16-bit words (an f32 element is two, low word first, as
    /// in memory): one kernel copies them to a staging buffer, which is downloaded.
    pub fn read_block(&self, pool: &DeviceKvPool<R>, id: usize) -> Result<Vec<u16>, DeviceError> {
        const OP: &str = "read_block";
        check(OP, id < pool.blocks, || format!("block {id} of {}", pool.blocks))?;
        let (from, words) = self.block_words(pool, id);
        let staging = self.rt.alloc::<u16>(words)?;
        let args = vec![from, self.at_offset(&staging, 0), Arg::U64(words as u64)];
        // SAFETY: the block lies inside the pool (checked), the staging buffer holds `words`.
        unsafe { self.launch("copy_u16", Self::elementwise(words), 256, args)? };
        self.rt.download(&staging)
    }

    /// Overwrites cache block `id` with [`Gpu::read_block`]'s words.
    pub fn write_block(&self, pool: &mut DeviceKvPool<R>, id: usize, words: &[u16]) -> Result<(), DeviceError> {
        const OP: &str = "write_block";
        check(OP, id < pool.blocks, || format!("block {id} of {}", pool.blocks))?;
        let (to, n) = self.block_words(pool, id);
        check(OP, words.len() == n, || format!("{} words for a block of {n}", words.len()))?;
        let staging = self.rt.upload(words)?;
        let args = vec![self.at_offset(&staging, 0), to, Arg::U64(n as u64)];
        // SAFETY: the block lies inside the pool (checked), the staging buffer holds its words.
        unsafe { self.launch("copy_u16", Self::elementwise(n), 256, args) }
    }

    /// The address of block `id`'s first word and its length in 16-bit words.
    fn block_words(&self, pool: &DeviceKvPool<R>, id: usize) -> (Arg, usize) {
        let per = 2 * pool.block_tokens * pool.kv_dim;
        match &pool.data {
            PoolData::F32(d) => (self.at_offset(d, id * per), 2 * per),
            PoolData::Half(d) => (self.at_offset(d, id * per), per),
        }
    }

    /// Sliding-window attention of `tokens` queries over `prefix + tokens` key/value rows.
    #[allow(clippy::too_many_arguments)]
    pub fn window_attention(
        &self,
        q: &R::Buf<f32>,
        keys: &R::Buf<f32>,
        values: &R::Buf<f32>,
        out: &mut R::Buf<f32>,
        tokens: usize,
        prefix: usize,
        window: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "window_attention";
        Self::check_head_dim(OP, head_dim)?;
        let w = heads * head_dim;
        self.fits(OP, "q", q, tokens * w)?;
        self.fits(OP, "keys", keys, (prefix + tokens) * w)?;
        self.fits(OP, "values", values, (prefix + tokens) * w)?;
        self.fits(OP, "out", out, tokens * w)?;
        check(OP, window > 0, || "window 0".into())?;
        if tokens == 0 {
            return Ok(());
        }
        let args = vec![
            self.at(q),
            self.at(keys),
            self.at(values),
            self.at(out),
            i32_of(OP, prefix)?.into(),
            i32_of(OP, window)?.into(),
            i32_of(OP, heads)?.into(),
            i32_of(OP, head_dim)?.into(),
        ];
        // SAFETY: buffers sized above.
        unsafe { self.launch("window_attention", (u32_of(OP, tokens)?, u32_of(OP, heads)?, 1), 128, args) }
    }

    /// Writes `rows [n, kv_dim]` as positions `start..start + n` of the sequence whose blocks
    /// `table` lists, into the K (`values = false`) or V half of its blocks.
    pub fn kv_write(
        &self,
        rows: &R::Buf<f32>,
        n: usize,
        pool: &mut DeviceKvPool<R>,
        table: &[u32],
        start: usize,
        values: bool,
    ) -> Result<(), DeviceError> {
        const OP: &str = "kv_write";
        let (bt, kvd) = (pool.block_tokens, pool.kv_dim);
        self.fits(OP, "rows", rows, n * kvd)?;
        check(OP, start + n <= table.len() * bt, || {
            format!("positions {start}..{} beyond {} blocks of {bt}", start + n, table.len())
        })?;
        check(OP, table.iter().all(|&b| (b as usize) < pool.blocks), || {
            format!("a block beyond the pool of {}", pool.blocks)
        })?;
        if n == 0 {
            return Ok(());
        }
        let name = match pool.dtype {
            CacheDtype::F32 => "kv_write_f32",
            CacheDtype::Bf16 => "kv_write_bf16",
            CacheDtype::F16 => "kv_write_f16",
        };
        let dev_table = self.upload(table)?;
        let data = match &pool.data {
            PoolData::F32(d) => self.at(d),
            PoolData::Half(d) => self.at(d),
        };
        let args = vec![
            self.at(rows),
            data,
            self.at(&dev_table),
            i32_of(OP, start)?.into(),
            i32_of(OP, bt)?.into(),
            i32_of(OP, kvd)?.into(),
            i32::from(values).into(),
        ];
        // SAFETY: the positions lie within the table's blocks, and the blocks within the pool.
        unsafe { self.launch(name, (u32_of(OP, n)?, 1, 1), 128, args) }
    }

    /// The block tables of `seqs` sequences for [`Gpu::cross_attention`], checked against
    /// `pool` and uploaded once (every cross-decoder layer of a step reads the same ones):
    /// sequence s attends over positions `0..lens[s]` of the blocks `tables[s]` lists.
    pub fn block_tables(
        &self,
        pool: &DeviceKvPool<R>,
        tables: &[&[u32]],
        lens: &[usize],
    ) -> Result<BlockTables<R>, DeviceError> {
        const OP: &str = "block_tables";
        check(OP, tables.len() == lens.len(), || "one table per sequence".into())?;
        let (mut flat, mut offsets) = (Vec::new(), Vec::with_capacity(lens.len()));
        for (table, &len) in tables.iter().zip(lens) {
            check(OP, len <= table.len() * pool.block_tokens, || {
                format!("{len} positions beyond {} blocks", table.len())
            })?;
            check(OP, table.iter().all(|&b| (b as usize) < pool.blocks), || "a block beyond the pool".into())?;
            offsets.push(
                u32::try_from(flat.len())
                    .map_err(|_| DeviceError::Shape { op: OP, message: "tables too long".into() })?,
            );
            flat.extend_from_slice(table);
        }
        let lens32 = lens.iter().map(|&l| u32_of(OP, l)).collect::<Result<Vec<u32>, _>>()?;
        Ok(BlockTables {
            tables: self.upload(&flat)?,
            offsets: self.upload(&offsets)?,
            lens: self.upload(&lens32)?,
            seqs: lens.len(),
            max_len: lens.iter().copied().max().unwrap_or(0),
            pool: (pool.blocks, pool.block_tokens),
        })
    }

    /// Cross-attention of one query per sequence over its cache, the flash-decoding split:
    /// partials over `split_tokens` positions, then the log-sum-exp merge into
    /// `out [seqs, heads · head_dim]`, for the sequences of `tables`.
    pub fn cross_attention(
        &self,
        q: &R::Buf<f32>,
        pool: &DeviceKvPool<R>,
        tables: &BlockTables<R>,
        shape: CrossShape,
        split_tokens: usize,
        out: &mut R::Buf<f32>,
    ) -> Result<(), DeviceError> {
        self.fits("cross_attention", "out", out, tables.seqs * shape.q_dim())?;
        self.attend(q, pool, tables, shape, split_tokens, out, None)
    }

    /// [`Gpu::cross_attention`] stopped before the normalisation: per sequence the partial
    /// over its whole range (`o = Σ exp(s − m) v`, the max `m` and the sum `l` per head), for a
    /// merge with other ranks' partials. `out` holds `[seqs · heads · head_dim]` of `o`, then
    /// `[seqs · heads]` of `m`, then of `l`.
    pub fn cross_attention_partial(
        &self,
        q: &R::Buf<f32>,
        pool: &DeviceKvPool<R>,
        tables: &BlockTables<R>,
        shape: CrossShape,
        split_tokens: usize,
        out: &mut R::Buf<f32>,
    ) -> Result<(), DeviceError> {
        let (seqs, qd, h) = (tables.seqs, shape.q_dim(), shape.heads);
        self.fits("cross_attention_partial", "out", out, seqs * (qd + 2 * h))?;
        let (m, l) = (self.at_offset(out, seqs * qd), self.at_offset(out, seqs * (qd + h)));
        self.attend(q, pool, tables, shape, split_tokens, out, Some((m, l)))
    }

    /// The flash-decoding split and its merge: finalised into `out` when `partial` is `None`,
    /// else `o` into `out` and `m`, `l` at the addresses given (inside `out`, checked by the
    /// caller).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &R::Buf<f32>,
        pool: &DeviceKvPool<R>,
        tables: &BlockTables<R>,
        shape: CrossShape,
        split_tokens: usize,
        out: &mut R::Buf<f32>,
        partial: Option<(Arg, Arg)>,
    ) -> Result<(), DeviceError> {
        const OP: &str = "cross_attention";
        Self::check_head_dim(OP, shape.head_dim)?;
        check(OP, shape.kv_dim() == pool.kv_dim && shape.heads.is_multiple_of(shape.kv_heads), || {
            format!("{shape:?} against a pool of kv_dim {}", pool.kv_dim)
        })?;
        check(OP, tables.pool == (pool.blocks, pool.block_tokens), || "block tables made for another pool".into())?;
        check(OP, split_tokens > 0, || "split_tokens 0".into())?;
        let seqs = tables.seqs;
        self.fits(OP, "q", q, seqs * shape.q_dim())?;
        if seqs == 0 {
            return Ok(());
        }
        let splits = tables.max_len.div_ceil(split_tokens).max(1);
        let parts = seqs * shape.heads * splits;
        let (po, pm, pl) =
            (self.zeros::<f32>(parts * shape.head_dim)?, self.zeros::<f32>(parts)?, self.zeros::<f32>(parts)?);
        let (name, data) = match (&pool.data, pool.dtype) {
            (PoolData::F32(d), _) => ("cross_attention_partials_f32", self.at(d)),
            (PoolData::Half(d), CacheDtype::Bf16) => ("cross_attention_partials_bf16", self.at(d)),
            (PoolData::Half(d), _) => ("cross_attention_partials_f16", self.at(d)),
        };
        let d = i32_of(OP, shape.head_dim)?;
        let args = vec![
            self.at(q),
            data,
            self.at(&tables.tables),
            self.at(&tables.offsets),
            self.at(&tables.lens),
            self.at(&po),
            self.at(&pm),
            self.at(&pl),
            i32_of(OP, shape.heads)?.into(),
            i32_of(OP, shape.kv_heads)?.into(),
            d.into(),
            i32_of(OP, pool.block_tokens)?.into(),
            i32_of(OP, split_tokens)?.into(),
        ];
        let grid = (u32_of(OP, shape.heads)?, u32_of(OP, splits)?, u32_of(OP, seqs)?);
        // SAFETY: each sequence's positions lie within its blocks (checked), the blocks within
        // the pool; the partials are sized for the grid.
        unsafe { self.launch(name, grid, ATTN_TILE.min(128) as u32, args)? };
        let args = vec![
            self.at(&po),
            self.at(&pm),
            self.at(&pl),
            i32_of(OP, splits)?.into(),
            d.into(),
            i32::from(partial.is_none()).into(),
            self.at(out),
        ];
        let (m, l) = partial.unwrap_or((Arg::Addr(0), Arg::Addr(0)));
        let args = args.into_iter().chain([m, l]).collect();
        // SAFETY: the partials written above, merged into out [seqs, heads · head_dim] (and,
        // unfinalised, m and l where the caller checked they fit).
        unsafe { self.launch("lse_merge", (u32_of(OP, shape.heads)?, u32_of(OP, seqs)?, 1), 64, args) }
    }
}
