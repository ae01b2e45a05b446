//! The CUDA backend's ops on one device ([`Gpu`]), over any [`Runtime`]: the GPU's (cudarc) or
//! the tests' CPU emulator. Each op takes device buffers and the shapes the CPU kernel of the
//! same name takes, checks that the buffers are large enough for them (an undersized buffer is
//! an error, never an out-of-bounds kernel), and enqueues the kernel with its launch
//! configuration.

use std::ffi::c_void;
use std::ops::Range;

use super::runtime::{DeviceElem, DeviceError, Gemm, GemmType, Runtime};
use super::{ATTN_TILE, MAX_HEAD_DIM, RETENTION_COLS};
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::kv_block::CacheDtype;
use crate::kernels::widen::WeightRef;

fn check(op: &'static str, ok: bool, message: impl FnOnce() -> String) -> Result<(), DeviceError> {
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Shape { op, message: message() })
    }
}

fn i32_of(op: &'static str, n: usize) -> Result<i32, DeviceError> {
    i32::try_from(n).map_err(|_| DeviceError::Shape { op, message: format!("{n} exceeds the kernels' int range") })
}

fn u32_of(op: &'static str, n: usize) -> Result<u32, DeviceError> {
    u32::try_from(n).map_err(|_| DeviceError::Shape { op, message: format!("{n} exceeds a grid dimension") })
}

/// One kernel argument, by value; [`Gpu::launch`] passes pointers to them.
enum Arg {
    Addr(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::U32(v)
    }
}
impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::U64(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}

/// A weight matrix `[rows, cols]` on the device, in its element type (bf16/f16 as bits). Its
/// fields are private: the ops trust its shape, so only [`Gpu::upload_matrix`] makes one.
pub struct DeviceMatrix<R: Runtime> {
    data: MatrixData<R>,
    rows: usize,
    cols: usize,
}

enum MatrixData<R: Runtime> {
    F32(R::Buf<f32>),
    Bf16(R::Buf<u16>),
    F16(R::Buf<u16>),
}

impl<R: Runtime> DeviceMatrix<R> {
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Whether the elements are f32 (a product then takes f32 activations as they are).
    pub fn is_f32(&self) -> bool {
        matches!(self.data, MatrixData::F32(_))
    }
}

/// The global cache on one device: `blocks` blocks of `[K rows; V rows]`, each
/// `block_tokens × kv_dim`, allocated once at start-up. Private fields, as for
/// [`DeviceMatrix`]: only [`Gpu::kv_pool`] makes one.
pub struct DeviceKvPool<R: Runtime> {
    dtype: CacheDtype,
    data: PoolData<R>,
    blocks: usize,
    block_tokens: usize,
    kv_dim: usize,
}

enum PoolData<R: Runtime> {
    F32(R::Buf<f32>),
    Half(R::Buf<u16>),
}

impl<R: Runtime> DeviceKvPool<R> {
    pub fn dtype(&self) -> CacheDtype {
        self.dtype
    }
    pub fn blocks(&self) -> usize {
        self.blocks
    }
    pub fn bytes(&self) -> usize {
        self.blocks * 2 * self.block_tokens * self.kv_dim * self.dtype.bytes()
    }
}

/// Sequences' block tables on the device, made by [`Gpu::block_tables`] for one pool.
pub struct BlockTables<R: Runtime> {
    tables: R::Buf<u32>,
    offsets: R::Buf<u32>,
    lens: R::Buf<u32>,
    seqs: usize,
    max_len: usize,
    /// The pool's blocks and block size, which the tables were checked against.
    pool: (usize, usize),
}

/// One device's ops.
pub struct Gpu<R: Runtime> {
    rt: R,
}

impl<R: Runtime> Gpu<R> {
    pub fn new(rt: R) -> Self {
        Gpu { rt }
    }

    pub fn runtime(&self) -> &R {
        &self.rt
    }

    /// Requires `buf` to hold at least `need` elements.
    fn fits<T: DeviceElem>(
        &self,
        op: &'static str,
        what: &str,
        buf: &R::Buf<T>,
        need: usize,
    ) -> Result<(), DeviceError> {
        let len = self.rt.len(buf);
        check(op, len >= need, || format!("{what} holds {len} elements, {need} needed"))
    }

    fn at<T: DeviceElem>(&self, buf: &R::Buf<T>) -> Arg {
        Arg::Addr(self.rt.addr(buf))
    }

    /// The address of element `offset` of `buf` (the caller checks that it lies inside).
    fn at_offset<T: DeviceElem>(&self, buf: &R::Buf<T>, offset: usize) -> Arg {
        Arg::Addr(self.rt.addr(buf) + (offset * std::mem::size_of::<T>()) as u64)
    }

    /// Zeroes elements `range` of `x`.
    pub fn zero(&self, x: &mut R::Buf<f32>, range: Range<usize>) -> Result<(), DeviceError> {
        self.fits("zero", "x", x, range.end)?;
        if range.is_empty() {
            return Ok(());
        }
        self.rt.zero(x, range)
    }

    /// Launches `name` with `args` in order.
    ///
    /// # Safety
    /// The arguments are the kernel's, in its parameter types, and the buffers behind the
    /// addresses are as large as the kernel's indexing needs (every op checks that first).
    unsafe fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        threads: u32,
        mut args: Vec<Arg>,
    ) -> Result<(), DeviceError> {
        let mut ptrs: Vec<*mut c_void> = args
            .iter_mut()
            .map(|a| match a {
                Arg::Addr(v) | Arg::U64(v) => (v as *mut u64).cast(),
                Arg::I32(v) => (v as *mut i32).cast(),
                Arg::U32(v) => (v as *mut u32).cast(),
                Arg::F32(v) => (v as *mut f32).cast(),
            })
            .collect();
        unsafe { self.rt.launch(name, grid, threads, &mut ptrs) }
    }

    /// A grid covering `n` elements with 256-thread blocks (capped; the kernels stride).
    fn elementwise(n: usize) -> (u32, u32, u32) {
        (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1)
    }

    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<R::Buf<T>, DeviceError> {
        if host.is_empty() {
            return self.rt.alloc(1);
        }
        self.rt.upload(host)
    }

    pub fn download<T: DeviceElem>(&self, buf: &R::Buf<T>) -> Result<Vec<T>, DeviceError> {
        self.rt.download(buf)
    }

    pub fn zeros<T: DeviceElem>(&self, n: usize) -> Result<R::Buf<T>, DeviceError> {
        self.rt.alloc(n.max(1))
    }

    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.rt.synchronize()
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize), DeviceError> {
        self.rt.memory()
    }

    /// `dst[at..] = src[from]`, on the device.
    pub fn copy(
        &self,
        src: &R::Buf<f32>,
        from: Range<usize>,
        dst: &mut R::Buf<f32>,
        at: usize,
    ) -> Result<(), DeviceError> {
        let len = self.rt.len(src);
        check("copy", from.start <= from.end && from.end <= len, || format!("{from:?} of {len}"))?;
        self.fits("copy", "dst", dst, at + from.len())?;
        if from.is_empty() {
            return Ok(());
        }
        self.rt.copy(src, from, dst, at)
    }

    /// A weight matrix uploaded in its element type.
    pub fn upload_matrix(&self, view: WeightRef<'_>, rows: usize, cols: usize) -> Result<DeviceMatrix<R>, DeviceError> {
        let n = rows * cols;
        let len = match view {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) => w.len(),
            WeightRef::F16(w) => w.len(),
        };
        check("upload_matrix", len == n, || format!("{len} elements for [{rows}, {cols}]"))?;
        Ok(match view {
            WeightRef::F32(w) => DeviceMatrix { data: MatrixData::F32(self.upload(w)?), rows, cols },
            WeightRef::Bf16(w) => {
                let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
                DeviceMatrix { data: MatrixData::Bf16(self.upload(&bits)?), rows, cols }
            }
            WeightRef::F16(w) => {
                let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
                DeviceMatrix { data: MatrixData::F16(self.upload(&bits)?), rows, cols }
            }
        })
    }

    /// A pool of `blocks` cache blocks, zeroed.
    pub fn kv_pool(
        &self,
        dtype: CacheDtype,
        blocks: usize,
        block_tokens: usize,
        kv_dim: usize,
    ) -> Result<DeviceKvPool<R>, DeviceError> {
        let n = blocks * 2 * block_tokens * kv_dim;
        let data = match dtype {
            CacheDtype::F32 => PoolData::F32(self.zeros(n)?),
            CacheDtype::Bf16 | CacheDtype::F16 => PoolData::Half(self.zeros(n)?),
        };
        Ok(DeviceKvPool { dtype, data, blocks, block_tokens, kv_dim })
    }

    /// `y [m, n] = x [m, k] · wᵀ` for `w [n, k]`: a GEMM with f32 accumulation. bf16/f16 weights
    /// take the activations narrowed to their type (`scratch`, at least m·k elements).
    pub fn matmul(
        &self,
        x: &R::Buf<f32>,
        m: usize,
        w: &DeviceMatrix<R>,
        y: &mut R::Buf<f32>,
        scratch: &mut R::Buf<u16>,
    ) -> Result<(), DeviceError> {
        const OP: &str = "matmul";
        let (n, k) = w.shape();
        self.fits(OP, "x", x, m * k)?;
        self.fits(OP, "y", y, m * n)?;
        let (mi, ni, ki) = (i32_of(OP, m)?, i32_of(OP, n)?, i32_of(OP, k)?);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (input, a, b) = match &w.data {
            MatrixData::F32(data) => (GemmType::F32, self.rt.addr(data), self.rt.addr(x)),
            MatrixData::Bf16(data) => {
                self.narrow(x, m * k, scratch, CacheDtype::Bf16)?;
                (GemmType::Bf16, self.rt.addr(data), self.rt.addr(scratch))
            }
            MatrixData::F16(data) => {
                self.narrow(x, m * k, scratch, CacheDtype::F16)?;
                (GemmType::F16, self.rt.addr(data), self.rt.addr(scratch))
            }
        };
        // Row-major y = x wᵀ is column-major yᵀ [n, m] = op(w) · xᵀ, where w [n, k] row-major is
        // wᵀ [k, n] column-major, so op = transpose; x [m, k] row-major is xᵀ [k, m].
        let g = Gemm {
            trans_a: true,
            trans_b: false,
            m: ni,
            n: mi,
            k: ki,
            a,
            lda: ki,
            b,
            ldb: ki,
            input,
            c: self.rt.addr(y),
            ldc: ni,
        };
        // SAFETY: w holds n·k elements, x (or its narrowed copy) m·k, y m·n (checked above).
        unsafe { self.rt.gemm(&g) }
    }

    /// `out[..n] = x[..n]` rounded to bf16 or f16 (as bits).
    pub fn narrow(&self, x: &R::Buf<f32>, n: usize, out: &mut R::Buf<u16>, to: CacheDtype) -> Result<(), DeviceError> {
        self.fits("narrow", "x", x, n)?;
        self.fits("narrow", "out", out, n)?;
        let name = match to {
            CacheDtype::Bf16 => "narrow_bf16",
            CacheDtype::F16 => "narrow_f16",
            CacheDtype::F32 => return Err(DeviceError::Shape { op: "narrow", message: "f32 is not narrower".into() }),
        };
        // SAFETY: the kernel reads and writes the first n elements of buffers that hold them.
        unsafe { self.launch(name, Self::elementwise(n), 256, vec![self.at(x), self.at(out), (n as u64).into()]) }
    }

    /// `a[..n] += b[..n]`.
    pub fn add_assign(&self, a: &mut R::Buf<f32>, b: &R::Buf<f32>, n: usize) -> Result<(), DeviceError> {
        self.fits("add_assign", "a", a, n)?;
        self.fits("add_assign", "b", b, n)?;
        // SAFETY: both buffers hold n elements.
        unsafe { self.launch("add_assign", Self::elementwise(n), 256, vec![self.at(a), self.at(b), (n as u64).into()]) }
    }

    /// Rows of the embedding table for `ids` (this rank's vocabulary part `vocab`; zeros for the
    /// other ids), scaled: `out [ids, dim]`.
    pub fn embedding(
        &self,
        ids: &R::Buf<u32>,
        n_ids: usize,
        table: &DeviceMatrix<R>,
        vocab: Range<u32>,
        scale: f32,
        out: &mut R::Buf<f32>,
    ) -> Result<(), DeviceError> {
        let (rows, dim) = table.shape();
        self.fits("embedding", "ids", ids, n_ids)?;
        self.fits("embedding", "out", out, n_ids * dim)?;
        check("embedding", vocab.len() == rows, || format!("vocabulary part {vocab:?} for a table of {rows} rows"))?;
        if n_ids == 0 {
            return Ok(());
        }
        let (name, data) = match &table.data {
            MatrixData::F32(data) => ("embedding_f32", self.at(data)),
            MatrixData::Bf16(data) => ("embedding_bf16", self.at(data)),
            MatrixData::F16(data) => ("embedding_f16", self.at(data)),
        };
        let args = vec![
            self.at(ids),
            data,
            self.at(out),
            i32_of("embedding", dim)?.into(),
            scale.into(),
            vocab.start.into(),
            vocab.end.into(),
        ];
        // SAFETY: ids are read only where in [start, end), which indexes the table's rows.
        unsafe { self.launch(name, (u32_of("embedding", n_ids)?, 1, 1), 128, args) }
    }

    /// RMSNorm of `rows` rows of `dim` into `out`; no weight means no affine scale.
    pub fn rms_norm(
        &self,
        x: &R::Buf<f32>,
        rows: usize,
        dim: usize,
        weight: Option<&R::Buf<f32>>,
        eps: f32,
        out: &mut R::Buf<f32>,
    ) -> Result<(), DeviceError> {
        self.fits("rms_norm", "x", x, rows * dim)?;
        self.fits("rms_norm", "out", out, rows * dim)?;
        if let Some(w) = weight {
            self.fits("rms_norm", "weight", w, dim)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let w = weight.map_or(Arg::Addr(0), |w| self.at(w));
        let args = vec![self.at(x), w, self.at(out), i32_of("rms_norm", dim)?.into(), eps.into()];
        // SAFETY: rows × dim elements in and out, dim weights (or none).
        unsafe { self.launch("rms_norm", (u32_of("rms_norm", rows)?, 1, 1), 256, args) }
    }

    /// Rotates `x [rows, heads · head_dim]` in place, row r by `positions[r]`; `inv_freq` is
    /// the model's `θ_i` (`Rope::angle(1, i)`).
    pub fn rope(
        &self,
        x: &mut R::Buf<f32>,
        positions: &R::Buf<u32>,
        rows: usize,
        inv_freq: &R::Buf<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        self.fits("rope", "x", x, rows * heads * head_dim)?;
        self.fits("rope", "positions", positions, rows)?;
        self.fits("rope", "inv_freq", inv_freq, head_dim / 2)?;
        if rows == 0 {
            return Ok(());
        }
        let args = vec![
            self.at(x),
            self.at(positions),
            self.at(inv_freq),
            i32_of("rope", heads)?.into(),
            i32_of("rope", head_dim)?.into(),
        ];
        // SAFETY: rows × heads × head_dim elements, rows positions, head_dim / 2 frequencies.
        unsafe { self.launch("rope_interleaved", (u32_of("rope", rows)?, 1, 1), 128, args) }
    }

    /// `a ← silu(a) ⊙ b` over n elements.
    pub fn silu_mul(&self, a: &mut R::Buf<f32>, b: &R::Buf<f32>, n: usize) -> Result<(), DeviceError> {
        self.fits("silu_mul", "a", a, n)?;
        self.fits("silu_mul", "b", b, n)?;
        // SAFETY: both buffers hold n elements.
        unsafe { self.launch("silu_mul", Self::elementwise(n), 256, vec![self.at(a), self.at(b), (n as u64).into()]) }
    }

    /// `gamma = logsigmoid(gt) / normalizer` over n elements.
    pub fn log_sigmoid_scaled(
        &self,
        gt: &R::Buf<f32>,
        gamma: &mut R::Buf<f32>,
        n: usize,
        normalizer: f32,
    ) -> Result<(), DeviceError> {
        self.fits("log_sigmoid_scaled", "gt", gt, n)?;
        self.fits("log_sigmoid_scaled", "gamma", gamma, n)?;
        let args = vec![self.at(gt), self.at(gamma), (n as u64).into(), normalizer.into()];
        // SAFETY: both buffers hold n elements.
        unsafe { self.launch("log_sigmoid_scaled", Self::elementwise(n), 256, args) }
    }

    fn check_head_dim(op: &'static str, head_dim: usize) -> Result<(), DeviceError> {
        check(op, head_dim > 0 && head_dim <= MAX_HEAD_DIM && head_dim.is_multiple_of(2), || {
            format!("head_dim {head_dim}: the kernels take even head dims up to {MAX_HEAD_DIM}")
        })
    }

    /// Chunkwise gated retention over `tokens` tokens from the state in slot `slot` of
    /// `states [slots, heads, d, d]` (left there after the last token): `out [tokens, heads · d]`.
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
        if tokens == 0 {
            return Ok(());
        }
        let grid = (u32_of(OP, heads)?, head_dim.div_ceil(RETENTION_COLS) as u32, 1);
        let args = vec![
            self.at(q),
            self.at(k),
            self.at(v),
            self.at(gamma),
            self.at_offset(states, slot * per),
            self.at(out),
            i32_of(OP, tokens)?.into(),
            i32_of(OP, heads)?.into(),
            i32_of(OP, head_dim)?.into(),
        ];
        // SAFETY: every buffer holds what the shapes need (checked above).
        unsafe { self.launch("retention_chunkwise", grid, RETENTION_COLS as u32, args) }
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
        let per = 2 * pool.block_tokens * pool.kv_dim;
        if src == dst {
            return Ok(());
        }
        // The block's bits as 16-bit words (an f32 element is two), copied by one kernel.
        let (from, to, words) = match &pool.data {
            PoolData::F32(d) => (self.at_offset(d, src * per), self.at_offset(d, dst * per), 2 * per),
            PoolData::Half(d) => (self.at_offset(d, src * per), self.at_offset(d, dst * per), per),
        };
        let args = vec![from, to, Arg::U64(words as u64)];
        // SAFETY: both blocks lie inside the pool (checked) and are distinct, so do not overlap.
        unsafe { self.launch("copy_u16", Self::elementwise(words), 256, args) }
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

    /// The greedy token of each of `rows` rows of logits.
    pub fn argmax_rows(
        &self,
        logits: &R::Buf<f32>,
        rows: usize,
        vocab: usize,
        out: &mut R::Buf<u32>,
    ) -> Result<(), DeviceError> {
        self.fits("argmax_rows", "logits", logits, rows * vocab)?;
        self.fits("argmax_rows", "out", out, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let args = vec![self.at(logits), self.at(out), i32_of("argmax_rows", vocab)?.into()];
        // SAFETY: rows × vocab logits, rows outputs; 1024 threads, a power of two.
        unsafe { self.launch("argmax_rows", (u32_of("argmax_rows", rows)?, 1, 1), 1024, args) }
    }

    /// `out = log_softmax(logits)` row by row.
    pub fn log_softmax_rows(
        &self,
        logits: &R::Buf<f32>,
        rows: usize,
        vocab: usize,
        out: &mut R::Buf<f32>,
    ) -> Result<(), DeviceError> {
        self.fits("log_softmax_rows", "logits", logits, rows * vocab)?;
        self.fits("log_softmax_rows", "out", out, rows * vocab)?;
        if rows == 0 {
            return Ok(());
        }
        let args = vec![self.at(logits), self.at(out), i32_of("log_softmax_rows", vocab)?.into()];
        // SAFETY: rows × vocab elements in and out; 512 threads, a power of two.
        unsafe { self.launch("log_softmax_rows", (u32_of("log_softmax_rows", rows)?, 1, 1), 512, args) }
    }
}
