//! The CPU backend: host vectors and the CPU kernels of `crate::kernels`.

use std::ops::Range;

use rayon::prelude::*;

use super::{Backend, BackendError, Result};
use crate::kernels::cross_attention::{cross_attention_partials, finalize, CrossShape, KvView, Partial};
use crate::kernels::kv_block::{Block, CacheDtype};
use crate::kernels::matmul::{linear, matmul_t};
use crate::kernels::matmul_bf16;
use crate::kernels::retention::{
    retention_add_incoming, retention_chunkwise, retention_recurrent_step, RetentionShape, RETENTION_BLOCK,
};
use crate::kernels::rope::{Rope, RopeTable};
use crate::kernels::widen::WeightRef;
use crate::weights::{ComputeDtype, Tensor};

/// The CPU kernels. Products of many rows compute in `compute` (resolved: f32 or bf16); bf16
/// needs AMX or AVX512_BF16, without which they stay f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend {
    compute: ComputeDtype,
}

impl CpuBackend {
    /// `compute` must be resolved ([`ComputeDtype::resolve`]): `auto` computes in f32.
    pub fn new(compute: ComputeDtype) -> Self {
        if compute == ComputeDtype::Bf16 {
            match matmul_bf16::kernel() {
                Some(kernel) => tracing::info!(
                    kernel = kernel.name(),
                    min_rows = matmul_bf16::MIN_ROWS,
                    "bf16 products (up to 64 rows on vdpbf16ps where the CPU has it)"
                ),
                None => tracing::warn!(
                    "bf16 compute asked, but this CPU has neither AMX nor AVX512_BF16: products stay f32"
                ),
            }
        }
        CpuBackend { compute }
    }

    pub fn compute(&self) -> ComputeDtype {
        self.compute
    }

    /// The backend `opts` asks for on `model` (its compute type resolved against the weights).
    pub fn for_model(model: &crate::model::Model, opts: &crate::engine::EngineOptions) -> Self {
        Self::new(opts.compute_dtype.resolve(model.weight_dtype()))
    }
}

/// The global cache in host memory. Blocks are allocated on their first write, so the pool's
/// memory follows its high-water mark, not its budget (blocks are handed out lowest first).
pub struct CpuPool {
    blocks: Vec<Block>,
    capacity: usize,
    dtype: CacheDtype,
    block_tokens: usize,
    kv_dim: usize,
}

impl CpuPool {
    /// Block `id`, allocated (zeroed) if this is its first use.
    fn block_mut(&mut self, id: u32) -> Result<&mut Block> {
        let id = id as usize;
        if id >= self.capacity {
            return Err(bad(format!("block {id} beyond the pool's {}", self.capacity)));
        }
        while self.blocks.len() <= id {
            self.blocks.push(Block::zeros(self.dtype, 2 * self.block_tokens * self.kv_dim));
        }
        Ok(&mut self.blocks[id])
    }

    fn block(&self, id: u32) -> Result<&Block> {
        self.blocks.get(id as usize).ok_or_else(|| bad(format!("block {id} read before it was written")))
    }
}

fn bad(message: impl Into<String>) -> BackendError {
    BackendError { backend: "cpu", message: message.into() }
}

fn at_least(what: &str, buf: &[f32], n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(bad(format!("{what} holds {} elements, {n} needed", buf.len())));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    /// A clone of the model's tensor: a mapped tensor shares its map.
    type Matrix = Tensor;
    type Pool = CpuPool;
    type RopeTable = RopeTable;
    /// The blocks and the length.
    type BlockTable = (Vec<u32>, usize);

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn host_threads(&self) -> bool {
        true
    }

    fn compute_name(&self) -> &'static str {
        match self.compute {
            ComputeDtype::Bf16 if matmul_bf16::available() => "bf16",
            _ => "f32",
        }
    }

    fn upload(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn download_owned(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }

    fn upload_owned(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn matrix(&self, t: &Tensor) -> Result<Tensor> {
        if t.shape.len() != 2 {
            return Err(bad(format!("a matrix of shape {:?}", t.shape)));
        }
        Ok(t.clone())
    }

    fn matmul(&self, x: &Vec<f32>, m: usize, w: &Tensor) -> Result<Vec<f32>> {
        let (n, k) = (w.shape[0], w.shape[1]);
        at_least("matmul input", x, m * k)?;
        // Several rows of bf16 weights: bf16 products where the CPU has them (fewer rows than
        // `matmul_bf16::MIN_ROWS` stream the weights in f32: see `matmul_bf16::runs`).
        if let (ComputeDtype::Bf16, WeightRef::Bf16(wb)) = (self.compute, w.view()) {
            if matmul_bf16::runs(m) {
                return Ok(matmul_bf16::matmul_t_bf16_many(&x[..m * k], m, k, &[(wb, n)]).remove(0));
            }
        }
        Ok(crate::with_weights!(w.view(), |w| linear(&x[..m * k], m, k, w, n)))
    }

    /// In bf16, several rows of bf16 weights (`matmul_bf16::runs`) round `x` once for every product.
    fn matmuls(&self, x: &Vec<f32>, m: usize, ws: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        let bf16: Option<Vec<(&[half::bf16], usize)>> = ws
            .iter()
            .map(|w| match w.view() {
                WeightRef::Bf16(wb) => Some((wb, w.shape[0])),
                _ => None,
            })
            .collect();
        let k = ws.first().map_or(0, |w| w.shape[1]);
        match bf16 {
            Some(jobs)
                if self.compute == ComputeDtype::Bf16
                    && matmul_bf16::runs(m)
                    && ws.iter().all(|w| w.shape.len() == 2 && w.shape[1] == k) =>
            {
                at_least("matmul input", x, m * k)?;
                Ok(matmul_bf16::matmul_t_bf16_many(&x[..m * k], m, k, &jobs))
            }
            _ => ws.iter().map(|w| self.matmul(x, m, w)).collect(),
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, rows: usize, dim: usize, w: Option<&Vec<f32>>, eps: f32) -> Result<Vec<f32>> {
        at_least("rms_norm input", x, rows * dim)?;
        let mut out = vec![0.0; rows * dim];
        crate::kernels::rms_norm::rms_norm(&x[..rows * dim], dim, w.map(|w| &w[..dim]), eps, &mut out);
        Ok(out)
    }

    fn add_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>, n: usize) -> Result<()> {
        at_least("add_assign", a, n)?;
        at_least("add_assign", b, n)?;
        let add = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        if crate::kernels::parallel(n) {
            let task = crate::kernels::PAR_TASK;
            a[..n].par_chunks_mut(task).zip(b[..n].par_chunks(task)).for_each(|(a, b)| add(a, b));
        } else {
            add(&mut a[..n], &b[..n]);
        }
        Ok(())
    }

    fn silu_mul(&self, a: &mut Vec<f32>, b: &Vec<f32>, n: usize) -> Result<()> {
        at_least("silu_mul", a, n)?;
        at_least("silu_mul", b, n)?;
        crate::kernels::swiglu::silu_mul(&mut a[..n], &b[..n]);
        Ok(())
    }

    fn log_sigmoid_scaled(&self, x: &Vec<f32>, n: usize, normalizer: f32) -> Result<Vec<f32>> {
        at_least("log_sigmoid_scaled", x, n)?;
        let f = |&g: &f32| crate::kernels::swiglu::log_sigmoid(g) / normalizer;
        if crate::kernels::parallel(n) {
            return Ok(x[..n].par_iter().map(f).collect());
        }
        Ok(x[..n].iter().map(f).collect())
    }

    fn embed(&self, ids: &[u32], table: &Tensor, first: u32, scale: f32) -> Result<Vec<f32>> {
        let (rows, dim) = (table.shape[0], table.shape[1]);
        let held = |id: u32| id >= first && ((id - first) as usize) < rows;
        if ids.iter().all(|&id| held(id)) {
            let local: Vec<u32> = ids.iter().map(|&id| id - first).collect();
            return Ok(crate::with_weights!(table.view(), |t| crate::kernels::embedding::embed(&local, t, dim, scale)));
        }
        let local: Vec<u32> = ids.iter().filter(|&&id| held(id)).map(|&id| id - first).collect();
        let found = crate::with_weights!(table.view(), |t| crate::kernels::embedding::embed(&local, t, dim, scale));
        let mut out = vec![0.0; ids.len() * dim];
        let mut next = found.chunks_exact(dim);
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim)) {
            if held(id) {
                row.copy_from_slice(next.next().expect("one row per held id"));
            }
        }
        Ok(out)
    }

    fn rope_table(&self, rope: &Rope, positions: &[u32]) -> Result<RopeTable> {
        Ok(rope.table(positions.iter().map(|&p| p as usize)))
    }

    fn rope(&self, x: &mut Vec<f32>, table: &RopeTable, heads: usize, head_dim: usize) -> Result<()> {
        if table.half != head_dim / 2 {
            return Err(bad(format!("a rope table for head_dim {}, not {head_dim}", 2 * table.half)));
        }
        let rows = table.cos.len() / table.half.max(1);
        at_least("rope", x, rows * heads * head_dim)?;
        crate::kernels::rope::apply_rope(&mut x[..rows * heads * head_dim], heads, head_dim, table);
        Ok(())
    }

    fn retention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        gamma: &Vec<f32>,
        states: &mut Vec<f32>,
        slot: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let n = tokens * heads * head_dim;
        for (what, buf) in [("q", q), ("k", k), ("v", v)] {
            at_least(what, buf, n)?;
        }
        at_least("gamma", gamma, tokens * heads)?;
        let per = heads * head_dim * head_dim;
        at_least("retention states", states, (slot + 1) * per)?;
        let state = &mut states[slot * per..(slot + 1) * per];
        let mut out = vec![0.0; n];
        let (q, k, v, g) = (&q[..n], &k[..n], &v[..n], &gamma[..tokens * heads]);
        if tokens == 1 {
            retention_recurrent_step(q, k, v, g, heads, head_dim, state, &mut out);
        } else {
            let shape = RetentionShape { tokens, heads, head_dim };
            retention_chunkwise(q, k, v, g, shape, RETENTION_BLOCK, state, &mut out);
        }
        Ok(out)
    }

    /// Every segment in parallel, straight into its rows of the output (a step of 32 decodes
    /// is 32 small state updates per layer).
    fn retention_batch(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        gamma: &Vec<f32>,
        segments: &[Range<usize>],
        states: &mut [&mut Vec<f32>],
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let qd = heads * head_dim;
        let rows = segments.iter().map(|s| s.end).max().unwrap_or(0);
        for (what, buf) in [("q", q), ("k", k), ("v", v)] {
            at_least(what, buf, rows * qd)?;
        }
        at_least("gamma", gamma, rows * heads)?;
        if segments.len() != states.len() || segments.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(bad("retention_batch: one state per segment, segments in order without overlap"));
        }
        let per = heads * head_dim * head_dim;
        if let Some(s) = states.iter().find(|s| s.len() != per) {
            return Err(bad(format!("a retention state of {} elements, not {per}", s.len())));
        }
        let mut o = vec![0.0; rows * qd];
        // Each segment's rows of `o`, in order.
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(segments.len());
        let (mut rest, mut at) = (&mut o[..], 0);
        for seg in segments {
            let (mine, tail) = std::mem::take(&mut rest)[(seg.start - at) * qd..].split_at_mut(seg.len() * qd);
            outs.push(mine);
            (rest, at) = (tail, seg.end);
        }
        segments.par_iter().zip(states.par_iter_mut()).zip(outs.par_iter_mut()).for_each(|((seg, state), out)| {
            let r = seg.start * qd..seg.end * qd;
            let g = &gamma[seg.start * heads..seg.end * heads];
            let (qs, ks, vs) = (&q[r.clone()], &k[r.clone()], &v[r]);
            if seg.len() == 1 {
                retention_recurrent_step(qs, ks, vs, g, heads, head_dim, state, out);
            } else {
                let shape = RetentionShape { tokens: seg.len(), heads, head_dim };
                retention_chunkwise(qs, ks, vs, g, shape, RETENTION_BLOCK, state, out);
            }
        });
        Ok(o)
    }

    fn logits_into(&self, x: &Vec<f32>, m: usize, w: &Tensor, mut out: Vec<f32>) -> Result<Vec<f32>> {
        let (n, k) = (w.shape[0], w.shape[1]);
        at_least("logits input", x, m * k)?;
        if out.capacity() < m * n {
            // Zeroed pages from the allocator, not written twice.
            out = vec![0.0; m * n];
        } else {
            // Every element is overwritten; only those beyond the old length are zeroed first.
            out.truncate(m * n);
            out.resize(m * n, 0.0);
        }
        crate::with_weights!(w.view(), |w| matmul_t(&x[..m * k], m, k, w, n, &mut out));
        Ok(out)
    }

    fn row_groups(&self, bytes: &[usize], llc: usize) -> Option<Vec<Range<usize>>> {
        crate::cache_groups::cache_groups(bytes, llc, rayon::current_num_threads())
    }

    fn retention_add_incoming(
        &self,
        q: &Vec<f32>,
        gamma: &[f32],
        s_in: &[f32],
        out: &mut Vec<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let shape = RetentionShape { tokens, heads, head_dim };
        let n = tokens * heads * head_dim;
        at_least("q", q, n)?;
        at_least("out", out, n)?;
        if gamma.len() < tokens * heads || s_in.len() != heads * head_dim * head_dim {
            return Err(bad(format!(
                "retention_add_incoming: gamma {} or s_in {} of the wrong size",
                gamma.len(),
                s_in.len()
            )));
        }
        retention_add_incoming(&q[..n], &gamma[..tokens * heads], shape, s_in, &mut out[..n]);
        Ok(())
    }

    fn zero(&self, x: &mut Vec<f32>, range: Range<usize>) -> Result<()> {
        at_least("zero", x, range.end)?;
        x[range].fill(0.0);
        Ok(())
    }

    fn window_attention(
        &self,
        q: &Vec<f32>,
        keys: &Vec<f32>,
        values: &Vec<f32>,
        tokens: usize,
        prefix: usize,
        window: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let w = heads * head_dim;
        at_least("q", q, tokens * w)?;
        at_least("keys", keys, (prefix + tokens) * w)?;
        at_least("values", values, (prefix + tokens) * w)?;
        let mut out = vec![0.0; tokens * w];
        let (k, v) = (&keys[..(prefix + tokens) * w], &values[..(prefix + tokens) * w]);
        crate::kernels::window_attention::window_attention(
            &q[..tokens * w],
            k,
            v,
            prefix,
            window,
            heads,
            head_dim,
            &mut out,
        );
        Ok(out)
    }

    fn rows(&self, x: &Vec<f32>, width: usize, rows: Range<usize>) -> Result<Vec<f32>> {
        at_least("rows", x, rows.end * width)?;
        Ok(x[rows.start * width..rows.end * width].to_vec())
    }

    fn write_rows(&self, dst: &mut Vec<f32>, width: usize, at: usize, src: &Vec<f32>, rows: usize) -> Result<()> {
        at_least("write_rows src", src, rows * width)?;
        at_least("write_rows dst", dst, (at + rows) * width)?;
        dst[at * width..(at + rows) * width].copy_from_slice(&src[..rows * width]);
        Ok(())
    }

    fn concat(&self, a: &Vec<f32>, a_rows: usize, b: &Vec<f32>, b_rows: usize, width: usize) -> Result<Vec<f32>> {
        at_least("concat", a, a_rows * width)?;
        at_least("concat", b, b_rows * width)?;
        let mut out = a[..a_rows * width].to_vec();
        out.extend_from_slice(&b[..b_rows * width]);
        Ok(out)
    }

    fn kv_pool(&self, dtype: CacheDtype, blocks: usize, block_tokens: usize, kv_dim: usize) -> Result<CpuPool> {
        Ok(CpuPool { blocks: Vec::new(), capacity: blocks, dtype, block_tokens, kv_dim })
    }

    fn kv_write(
        &self,
        pool: &mut CpuPool,
        table: &[u32],
        start: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        n: usize,
    ) -> Result<()> {
        let (bt, kvd) = (pool.block_tokens, pool.kv_dim);
        at_least("k", k, n * kvd)?;
        at_least("v", v, n * kvd)?;
        if start + n > table.len() * bt {
            return Err(bad(format!("positions up to {} beyond {} blocks", start + n, table.len())));
        }
        for r in 0..n {
            let pos = start + r;
            let block = pool.block_mut(table[pos / bt])?;
            let j = pos % bt;
            block.write(j * kvd, &k[r * kvd..(r + 1) * kvd]);
            block.write((bt + j) * kvd, &v[r * kvd..(r + 1) * kvd]);
        }
        Ok(())
    }

    fn block_table(&self, pool: &CpuPool, table: &[u32], len: usize) -> Result<(Vec<u32>, usize)> {
        if len > table.len() * pool.block_tokens {
            return Err(bad(format!("{len} positions beyond {} blocks", table.len())));
        }
        Ok((table.to_vec(), len))
    }

    fn kv_copy_block(&self, pool: &mut CpuPool, src: u32, dst: u32) -> Result<()> {
        let block = pool.block(src)?.clone();
        *pool.block_mut(dst)? = block;
        Ok(())
    }

    fn kv_read_block(&self, pool: &CpuPool, block: u32) -> Result<Vec<u8>> {
        Ok(pool.block(block)?.to_bytes())
    }

    fn kv_write_block(&self, pool: &mut CpuPool, block: u32, bytes: &[u8]) -> Result<()> {
        pool.block_mut(block)?.set_bytes(bytes).map_err(bad)
    }

    fn cross_attention_partial(
        &self,
        q: &Vec<f32>,
        pool: &CpuPool,
        table: &(Vec<u32>, usize),
        shape: CrossShape,
    ) -> Result<Partial> {
        let mut parts = self.cross_attention_partials(q, pool, std::slice::from_ref(table), &[table.1], shape)?;
        Ok(parts.remove(0))
    }

    /// Every row's partial in one parallel pass (`kernels::cross_attention_partials`: tasks
    /// over rows and long ranges alike), not one row at a time.
    fn cross_attention_partials(
        &self,
        q: &Vec<f32>,
        pool: &CpuPool,
        tables: &[(Vec<u32>, usize)],
        visible: &[usize],
        shape: CrossShape,
    ) -> Result<Vec<Partial>> {
        if visible.len() != tables.len() {
            return Err(bad(format!("{} visible lengths for {} block tables", visible.len(), tables.len())));
        }
        at_least("q", q, tables.len() * shape.q_dim())?;
        let views = tables
            .iter()
            .zip(visible)
            .map(|((table, len), &seen)| {
                if seen > *len {
                    return Err(bad(format!("{seen} positions visible of a table of {len}")));
                }
                let used = &table[..(*len).div_ceil(pool.block_tokens).min(table.len())];
                let blocks = used.iter().map(|&b| pool.block(b).map(Block::as_ref)).collect::<Result<Vec<_>>>()?;
                Ok(KvView { blocks, block_tokens: pool.block_tokens, kv_dim: pool.kv_dim, len: *len })
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&KvView> = views.iter().collect();
        Ok(cross_attention_partials(&q[..tables.len() * shape.q_dim()], visible, &refs, shape))
    }

    fn cross_attention_rows(
        &self,
        q: &Vec<f32>,
        pool: &CpuPool,
        tables: &[(Vec<u32>, usize)],
        shape: CrossShape,
    ) -> Result<Vec<f32>> {
        let visible: Vec<usize> = tables.iter().map(|t| t.1).collect();
        let parts = self.cross_attention_partials(q, pool, tables, &visible, shape)?;
        let mut out = vec![0.0; tables.len() * shape.q_dim()];
        for (part, row) in parts.iter().zip(out.chunks_exact_mut(shape.q_dim())) {
            finalize(part, shape, row);
        }
        Ok(out)
    }

    fn cross_attention(
        &self,
        q: &Vec<f32>,
        pool: &CpuPool,
        table: &(Vec<u32>, usize),
        shape: CrossShape,
    ) -> Result<Vec<f32>> {
        let part = self.cross_attention_partial(q, pool, table, shape)?;
        let mut out = vec![0.0; shape.q_dim()];
        finalize(&part, shape, &mut out);
        Ok(out)
    }
}
