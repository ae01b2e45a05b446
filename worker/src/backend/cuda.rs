//! The CUDA backend: [`CudaBackend`]'s device buffers and ops behind the [`Backend`] trait. Small
//! host inputs (token ids, positions, block tables) are uploaded per call; activations stay on
//! the device from the embedding to the logits.

use cudarc::driver::CudaSlice;

use super::{Backend, BackendError, Result};
use crate::cuda::device::{CudaBackend, DeviceError, DeviceKvPool, DeviceMatrix};
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::kv_block::CacheDtype;
use crate::weights::Tensor;

/// Positions per flash-decoding split of the cross-attention (the CPU kernel's split).
const SPLIT_TOKENS: usize = 4096;

impl From<DeviceError> for BackendError {
    fn from(e: DeviceError) -> Self {
        BackendError { backend: "cuda", message: e.to_string() }
    }
}

/// A device buffer of `n` elements (CUDA allocations are never empty).
fn buffer(b: &CudaBackend, n: usize) -> Result<CudaSlice<f32>> {
    Ok(b.zeros(n.max(1))?)
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Matrix = DeviceMatrix;
    type Pool = DeviceKvPool;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, x: &[f32]) -> Result<CudaSlice<f32>> {
        if x.is_empty() {
            return buffer(self, 0);
        }
        Ok(CudaBackend::upload(self, x)?)
    }

    fn download(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        Ok(CudaBackend::download(self, x)?)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        buffer(self, n)
    }

    fn matrix(&self, t: &Tensor) -> Result<DeviceMatrix> {
        match t.shape[..] {
            [rows, cols] => Ok(self.upload_matrix(t.view(), rows, cols)?),
            _ => Err(BackendError { backend: "cuda", message: format!("a matrix of shape {:?}", t.shape) }),
        }
    }

    fn matmul(&self, x: &CudaSlice<f32>, m: usize, w: &DeviceMatrix) -> Result<CudaSlice<f32>> {
        let (n, k) = w.shape();
        let mut y = buffer(self, m * n)?;
        let mut scratch = match w {
            DeviceMatrix::F32 { .. } => CudaBackend::zeros::<u16>(self, 1)?,
            _ => CudaBackend::zeros::<u16>(self, (m * k).max(1))?,
        };
        CudaBackend::matmul(self, x, m, w, &mut y, &mut scratch)?;
        Ok(y)
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        w: Option<&CudaSlice<f32>>,
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, rows * dim)?;
        CudaBackend::rms_norm(self, x, rows, dim, w, eps, &mut out)?;
        Ok(out)
    }

    fn add_assign(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>, n: usize) -> Result<()> {
        Ok(CudaBackend::add_assign(self, a, b, n)?)
    }

    fn silu_mul(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>, n: usize) -> Result<()> {
        Ok(CudaBackend::silu_mul(self, a, b, n)?)
    }

    fn log_sigmoid_scaled(&self, x: &CudaSlice<f32>, n: usize, normalizer: f32) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, n)?;
        CudaBackend::log_sigmoid_scaled(self, x, &mut out, n, normalizer)?;
        Ok(out)
    }

    fn embed(&self, ids: &[u32], table: &DeviceMatrix, scale: f32) -> Result<CudaSlice<f32>> {
        let (vocab, dim) = table.shape();
        let mut out = buffer(self, ids.len() * dim)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let dev_ids = CudaBackend::upload(self, ids)?;
        CudaBackend::embedding(self, &dev_ids, ids.len(), table, 0..vocab as u32, scale, &mut out)?;
        Ok(out)
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let (pos, freq) = (CudaBackend::upload(self, positions)?, CudaBackend::upload(self, inv_freq)?);
        Ok(CudaBackend::rope(self, x, &pos, positions.len(), &freq, heads, head_dim)?)
    }

    fn retention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, tokens * heads * head_dim)?;
        if tokens == 1 {
            let slot = CudaBackend::upload(self, &[0u32])?;
            self.retention_recurrent(q, k, v, gamma, &slot, state, &mut out, 1, heads, head_dim)?;
        } else {
            self.retention_chunkwise(q, k, v, gamma, state, &mut out, tokens, heads, head_dim)?;
        }
        Ok(out)
    }

    fn window_attention(
        &self,
        q: &CudaSlice<f32>,
        keys: &CudaSlice<f32>,
        values: &CudaSlice<f32>,
        tokens: usize,
        prefix: usize,
        window: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, tokens * heads * head_dim)?;
        CudaBackend::window_attention(self, q, keys, values, &mut out, tokens, prefix, window, heads, head_dim)?;
        Ok(out)
    }

    fn rows(&self, x: &CudaSlice<f32>, width: usize, rows: std::ops::Range<usize>) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, rows.len() * width)?;
        self.copy(x, rows.start * width..rows.end * width, &mut out, 0)?;
        Ok(out)
    }

    fn concat(
        &self,
        a: &CudaSlice<f32>,
        a_rows: usize,
        b: &CudaSlice<f32>,
        b_rows: usize,
        width: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, (a_rows + b_rows) * width)?;
        self.copy(a, 0..a_rows * width, &mut out, 0)?;
        self.copy(b, 0..b_rows * width, &mut out, a_rows * width)?;
        Ok(out)
    }

    fn kv_pool(&self, dtype: CacheDtype, blocks: usize, block_tokens: usize, kv_dim: usize) -> Result<DeviceKvPool> {
        Ok(CudaBackend::kv_pool(self, dtype, blocks, block_tokens, kv_dim)?)
    }

    fn kv_write(
        &self,
        pool: &mut DeviceKvPool,
        table: &[u32],
        start: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if let Some(&b) = table.iter().find(|&&b| b as usize >= pool.blocks) {
            return Err(BackendError {
                backend: "cuda",
                message: format!("block {b} beyond a pool of {}", pool.blocks),
            });
        }
        let dev_table = CudaBackend::upload(self, table)?;
        CudaBackend::kv_write(self, k, n, pool, &dev_table, table.len(), start, false)?;
        CudaBackend::kv_write(self, v, n, pool, &dev_table, table.len(), start, true)?;
        Ok(())
    }

    fn cross_attention(
        &self,
        q: &CudaSlice<f32>,
        pool: &DeviceKvPool,
        table: &[u32],
        len: usize,
        shape: CrossShape,
    ) -> Result<CudaSlice<f32>> {
        let mut out = buffer(self, shape.q_dim())?;
        if len == 0 {
            return Ok(out);
        }
        if len > table.len() * pool.block_tokens || table.iter().any(|&b| b as usize >= pool.blocks) {
            return Err(BackendError {
                backend: "cuda",
                message: format!("{len} positions over a table of {} blocks", table.len()),
            });
        }
        let dev_table = CudaBackend::upload(self, table)?;
        let (offsets, lens) = (CudaBackend::upload(self, &[0u32])?, CudaBackend::upload(self, &[len as u32])?);
        CudaBackend::cross_attention(
            self,
            q,
            pool,
            &dev_table,
            &offsets,
            &lens,
            1,
            len,
            shape,
            SPLIT_TOKENS,
            &mut out,
        )?;
        Ok(out)
    }
}
