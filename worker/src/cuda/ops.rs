//! The CUDA backend's ops on one device ([`Gpu`]), over any [`Runtime`]: the GPU's (cudarc) or
//! the tests' CPU emulator. Each op takes device buffers and the shapes the CPU kernel of the
//! same name takes, checks that the buffers are large enough for them (an undersized buffer is
//! an error, never an out-of-bounds kernel), and enqueues the kernel with its launch
//! configuration.

use std::ffi::c_void;
use std::ops::Range;

use super::runtime::{DeviceElem, DeviceError, Gemm, GemmType, Runtime};
use crate::kernels::kv_block::CacheDtype;
use crate::kernels::widen::WeightRef;

mod attention;
pub use attention::{retention_segment_blocks, RETENTION_WORKSPACE_BYTES};

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

/// CUDA's limits on a launch: grid x up to 2^31 − 1 blocks, y and z up to 65535, 1024 threads
/// a block. A launch past them fails on the GPU with an unspecific error (and would pass in
/// the emulator), so every launch is checked against them first.
pub const MAX_GRID_X: u32 = i32::MAX as u32;
pub const MAX_GRID_YZ: u32 = 65_535;
pub const MAX_BLOCK_THREADS: u32 = 1024;

/// `name`'s launch of `grid` blocks of `threads` threads, checked against CUDA's limits.
fn check_launch(name: &'static str, grid: (u32, u32, u32), threads: u32) -> Result<(), DeviceError> {
    let (x, y, z) = grid;
    let ok = (1..=MAX_GRID_X).contains(&x)
        && (1..=MAX_GRID_YZ).contains(&y)
        && (1..=MAX_GRID_YZ).contains(&z)
        && (1..=MAX_BLOCK_THREADS).contains(&threads);
    if ok {
        return Ok(());
    }
    Err(DeviceError::Shape {
        op: name,
        message: format!(
            "a grid of ({x}, {y}, {z}) blocks of {threads} threads is outside CUDA's limits (x 1..=2^31-1, y and z \
             1..=65535, 1..=1024 threads)"
        ),
    })
}

fn u32_of(op: &'static str, n: usize) -> Result<u32, DeviceError> {
    u32::try_from(n).map_err(|_| DeviceError::Shape { op, message: format!("{n} exceeds a grid dimension") })
}

/// One kernel argument, by value; [`Gpu::launch`] passes pointers to them.
#[derive(Clone, Copy)]
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
        check_launch(name, grid, threads)?;
        let bound = super::max_threads(name);
        check(name, bound.is_some_and(|b| threads <= b), || {
            format!("{threads} threads a block, past the {bound:?} that cuda::KERNELS lists for it")
        })?;
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

    /// A workspace of `n` elements that the op writes whole before reading (not zeroed).
    fn scratch<T: DeviceElem>(&self, n: usize) -> Result<R::Buf<T>, DeviceError> {
        self.rt.alloc_scratch(n.max(1))
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
            accumulate: false,
            batch: None,
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

#[cfg(test)]
mod launch_tests {
    use super::*;

    #[test]
    fn launches_past_cudas_limits_are_refused_by_name() {
        assert!(check_launch("k", (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ), MAX_BLOCK_THREADS).is_ok());
        for (grid, threads) in [
            ((1, MAX_GRID_YZ + 1, 1), 64),
            ((1, 1, MAX_GRID_YZ + 1), 64),
            ((MAX_GRID_X + 1, 1, 1), 64),
            ((0, 1, 1), 64),
            ((1, 1, 1), MAX_BLOCK_THREADS + 1),
            ((1, 1, 1), 0),
        ] {
            let e = check_launch("lse_merge", grid, threads).unwrap_err().to_string();
            assert!(e.starts_with("lse_merge: ") && e.contains("CUDA's limits"), "{e}");
        }
    }
}
