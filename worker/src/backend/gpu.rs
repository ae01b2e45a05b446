//! The CUDA backend: [`Gpu`]'s device buffers and ops behind the [`Backend`] trait, over any
//! [`Runtime`] (the GPU's, or the tests' emulator). Small host inputs (token ids, positions,
//! block tables) go up per call; activations stay on the device from the embedding to the
//! logits.

use super::{Backend, BackendError, Result};
use crate::cuda::ops::{BlockTables, DeviceKvPool, DeviceMatrix, Gpu};
use crate::cuda::runtime::{DeviceError, Runtime};
use crate::kernels::cross_attention::{CrossShape, Partial};
use crate::kernels::kv_block::CacheDtype;
use crate::kernels::rope::Rope;
use crate::weights::Tensor;

/// RoPE on the device: the positions and the frequencies, uploaded once for every layer that
/// uses them (the kernel takes the angles' cos/sin itself).
pub struct GpuRopeTable<R: Runtime> {
    positions: R::Buf<u32>,
    rows: usize,
    inv_freq: R::Buf<f32>,
}

/// Positions per flash-decoding split of the cross-attention (the CPU kernel's split).
const SPLIT_TOKENS: usize = 4096;

impl From<DeviceError> for BackendError {
    fn from(e: DeviceError) -> Self {
        BackendError { backend: "cuda", message: e.to_string() }
    }
}

impl<R: Runtime> Backend for Gpu<R> {
    type Buf = R::Buf<f32>;
    type Matrix = DeviceMatrix<R>;
    type Pool = DeviceKvPool<R>;
    type RopeTable = GpuRopeTable<R>;
    type BlockTable = BlockTables<R>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn bind(&self) -> Result<()> {
        Ok(self.runtime().bind()?)
    }

    fn upload(&self, x: &[f32]) -> Result<R::Buf<f32>> {
        Ok(Gpu::upload(self, x)?)
    }

    fn download(&self, x: &R::Buf<f32>) -> Result<Vec<f32>> {
        Ok(Gpu::download(self, x)?)
    }

    fn zeros(&self, n: usize) -> Result<R::Buf<f32>> {
        Ok(Gpu::zeros(self, n)?)
    }

    fn device_buffer(&self, x: &R::Buf<f32>) -> Result<Option<(u64, usize)>> {
        // A collective on another stream reads it next: everything enqueued here finishes first.
        Gpu::synchronize(self)?;
        Ok(Some((self.runtime().addr(x), self.runtime().len(x))))
    }

    fn matrix(&self, t: &Tensor) -> Result<DeviceMatrix<R>> {
        match t.shape[..] {
            [rows, cols] => Ok(self.upload_matrix(t.view(), rows, cols)?),
            _ => Err(BackendError { backend: "cuda", message: format!("a matrix of shape {:?}", t.shape) }),
        }
    }

    fn matmul(&self, x: &R::Buf<f32>, m: usize, w: &DeviceMatrix<R>) -> Result<R::Buf<f32>> {
        let (n, k) = w.shape();
        let mut y = Gpu::zeros(self, m * n)?;
        let mut scratch = Gpu::zeros::<u16>(self, if w.is_f32() { 1 } else { m * k })?;
        Gpu::matmul(self, x, m, w, &mut y, &mut scratch)?;
        Ok(y)
    }

    fn rms_norm(
        &self,
        x: &R::Buf<f32>,
        rows: usize,
        dim: usize,
        w: Option<&R::Buf<f32>>,
        eps: f32,
    ) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, rows * dim)?;
        Gpu::rms_norm(self, x, rows, dim, w, eps, &mut out)?;
        Ok(out)
    }

    fn add_assign(&self, a: &mut R::Buf<f32>, b: &R::Buf<f32>, n: usize) -> Result<()> {
        Ok(Gpu::add_assign(self, a, b, n)?)
    }

    fn silu_mul(&self, a: &mut R::Buf<f32>, b: &R::Buf<f32>, n: usize) -> Result<()> {
        Ok(Gpu::silu_mul(self, a, b, n)?)
    }

    fn log_sigmoid_scaled(&self, x: &R::Buf<f32>, n: usize, normalizer: f32) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, n)?;
        Gpu::log_sigmoid_scaled(self, x, &mut out, n, normalizer)?;
        Ok(out)
    }

    fn embed(&self, ids: &[u32], table: &DeviceMatrix<R>, first: u32, scale: f32) -> Result<R::Buf<f32>> {
        let (rows, dim) = table.shape();
        let mut out = Gpu::zeros(self, ids.len() * dim)?;
        let dev_ids = Gpu::upload(self, ids)?;
        self.embedding(&dev_ids, ids.len(), table, first..first + rows as u32, scale, &mut out)?;
        Ok(out)
    }

    fn rope_table(&self, rope: &Rope, positions: &[u32]) -> Result<GpuRopeTable<R>> {
        let inv_freq: Vec<f32> = (0..rope.half()).map(|i| rope.angle(1, i)).collect();
        Ok(GpuRopeTable {
            positions: Gpu::upload(self, positions)?,
            rows: positions.len(),
            inv_freq: Gpu::upload(self, &inv_freq)?,
        })
    }

    fn rope(&self, x: &mut R::Buf<f32>, table: &GpuRopeTable<R>, heads: usize, head_dim: usize) -> Result<()> {
        Ok(Gpu::rope(self, x, &table.positions, table.rows, &table.inv_freq, heads, head_dim)?)
    }

    fn retention(
        &self,
        q: &R::Buf<f32>,
        k: &R::Buf<f32>,
        v: &R::Buf<f32>,
        gamma: &R::Buf<f32>,
        states: &mut R::Buf<f32>,
        slot: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, tokens * heads * head_dim)?;
        if tokens == 1 {
            let slot =
                u32::try_from(slot).map_err(|_| BackendError { backend: "cuda", message: "slot beyond u32".into() })?;
            self.retention_recurrent(q, k, v, gamma, &[slot], states, &mut out, heads, head_dim)?;
        } else {
            self.retention_chunkwise(q, k, v, gamma, states, slot, &mut out, tokens, heads, head_dim, None)?;
        }
        Ok(out)
    }

    fn retention_add_incoming(
        &self,
        q: &R::Buf<f32>,
        gamma: &[f32],
        s_in: &[f32],
        out: &mut R::Buf<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        if gamma.len() < tokens * heads {
            return Err(BackendError {
                backend: "cuda",
                message: format!("{} log-decays for {tokens} tokens", gamma.len()),
            });
        }
        // exp(G_t), G accumulated in f64 from the first token: the CPU kernel's decays.
        let mut g = vec![0f64; heads];
        let mut decay = Vec::with_capacity(tokens * heads);
        for row in gamma[..tokens * heads].chunks_exact(heads.max(1)) {
            for (acc, &x) in g.iter_mut().zip(row) {
                *acc += x as f64;
                decay.push(acc.exp() as f32);
            }
        }
        let (decay, s_in) = (Gpu::upload(self, &decay)?, Gpu::upload(self, s_in)?);
        Ok(Gpu::retention_add_incoming(self, q, &decay, &s_in, out, tokens, heads, head_dim)?)
    }

    fn zero(&self, x: &mut R::Buf<f32>, range: std::ops::Range<usize>) -> Result<()> {
        Ok(Gpu::zero(self, x, range)?)
    }

    fn window_attention(
        &self,
        q: &R::Buf<f32>,
        keys: &R::Buf<f32>,
        values: &R::Buf<f32>,
        tokens: usize,
        prefix: usize,
        window: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, tokens * heads * head_dim)?;
        Gpu::window_attention(self, q, keys, values, &mut out, tokens, prefix, window, heads, head_dim)?;
        Ok(out)
    }

    fn rows(&self, x: &R::Buf<f32>, width: usize, rows: std::ops::Range<usize>) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, rows.len() * width)?;
        self.copy(x, rows.start * width..rows.end * width, &mut out, 0)?;
        Ok(out)
    }

    fn write_rows(&self, dst: &mut R::Buf<f32>, width: usize, at: usize, src: &R::Buf<f32>, rows: usize) -> Result<()> {
        Ok(self.copy(src, 0..rows * width, dst, at * width)?)
    }

    fn concat(
        &self,
        a: &R::Buf<f32>,
        a_rows: usize,
        b: &R::Buf<f32>,
        b_rows: usize,
        width: usize,
    ) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, (a_rows + b_rows) * width)?;
        self.copy(a, 0..a_rows * width, &mut out, 0)?;
        self.copy(b, 0..b_rows * width, &mut out, a_rows * width)?;
        Ok(out)
    }

    fn kv_pool(&self, dtype: CacheDtype, blocks: usize, block_tokens: usize, kv_dim: usize) -> Result<DeviceKvPool<R>> {
        Ok(Gpu::kv_pool(self, dtype, blocks, block_tokens, kv_dim)?)
    }

    fn kv_write(
        &self,
        pool: &mut DeviceKvPool<R>,
        table: &[u32],
        start: usize,
        k: &R::Buf<f32>,
        v: &R::Buf<f32>,
        n: usize,
    ) -> Result<()> {
        Gpu::kv_write(self, k, n, pool, table, start, false)?;
        Gpu::kv_write(self, v, n, pool, table, start, true)?;
        Ok(())
    }

    fn block_table(&self, pool: &DeviceKvPool<R>, table: &[u32], len: usize) -> Result<BlockTables<R>> {
        Ok(self.block_tables(pool, &[table], &[len])?)
    }

    fn kv_copy_block(&self, pool: &mut DeviceKvPool<R>, src: u32, dst: u32) -> Result<()> {
        Ok(self.copy_block(pool, src as usize, dst as usize)?)
    }

    fn kv_read_block(&self, pool: &DeviceKvPool<R>, block: u32) -> Result<Vec<u8>> {
        Ok(self.read_block(pool, block as usize)?.into_iter().flat_map(u16::to_le_bytes).collect())
    }

    fn kv_write_block(&self, pool: &mut DeviceKvPool<R>, block: u32, bytes: &[u8]) -> Result<()> {
        if !bytes.len().is_multiple_of(2) {
            return Err(BackendError {
                backend: self.name(),
                message: format!("{} bytes: not whole elements", bytes.len()),
            });
        }
        let words: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Ok(self.write_block(pool, block as usize, &words)?)
    }

    fn cross_attention_partial(
        &self,
        q: &R::Buf<f32>,
        pool: &DeviceKvPool<R>,
        table: &BlockTables<R>,
        shape: CrossShape,
    ) -> Result<Partial> {
        let (qd, h) = (shape.q_dim(), shape.heads);
        let mut out = Gpu::zeros(self, qd + 2 * h)?;
        Gpu::cross_attention_partial(self, q, pool, table, shape, SPLIT_TOKENS, &mut out)?;
        let host = Gpu::download(self, &out)?;
        Ok(Partial { o: host[..qd].to_vec(), m: host[qd..qd + h].to_vec(), l: host[qd + h..qd + 2 * h].to_vec() })
    }

    fn cross_attention(
        &self,
        q: &R::Buf<f32>,
        pool: &DeviceKvPool<R>,
        table: &BlockTables<R>,
        shape: CrossShape,
    ) -> Result<R::Buf<f32>> {
        let mut out = Gpu::zeros(self, shape.q_dim())?;
        Gpu::cross_attention(self, q, pool, table, shape, SPLIT_TOKENS, &mut out)?;
        Ok(out)
    }
}
