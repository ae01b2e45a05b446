//! The CUDA backend's ops on one GPU: the kernel program compiled by NVRTC for the device at
//! start-up, cuBLAS for the matrix products, device buffers for activations, weights, the pool
//! of global-cache blocks and the retention states. Each op takes device buffers and the shapes
//! the CPU kernel of the same name takes, checks that the buffers are large enough for them
//! (an undersized buffer is an error, never an out-of-bounds kernel), and enqueues on the
//! backend's stream.
//!
//! Opening the backend never panics: cudarc panics when libcuda is missing, so the library is
//! probed first, and every driver, NVRTC or cuBLAS failure becomes a [`DeviceError`].

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::compile::{compile_program, CompileError};
use super::{ATTN_TILE, KERNELS, MAX_HEAD_DIM, RETENTION_COLS};
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::kv_block::CacheDtype;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the CUDA driver (libcuda.so) cannot be loaded: no NVIDIA driver on this machine")]
    NoDriver,
    #[error("cuBLAS (libcublas.so) cannot be loaded: install the CUDA toolkit or the nvidia-cublas wheel")]
    NoCublas,
    #[error("GPU {ordinal}: {message}")]
    Device { ordinal: usize, message: String },
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
}

fn driver(e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Driver(format!("{e:?}"))
}

fn check(op: &'static str, ok: bool, message: impl FnOnce() -> String) -> Result<(), DeviceError> {
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Shape { op, message: message() })
    }
}

/// Requires `buf` to hold at least `need` elements.
fn fits<T>(op: &'static str, what: &str, buf: &CudaSlice<T>, need: usize) -> Result<(), DeviceError> {
    check(op, buf.len() >= need, || format!("{what} holds {} elements, {need} needed", buf.len()))
}

fn i32_of(op: &'static str, n: usize) -> Result<i32, DeviceError> {
    i32::try_from(n).map_err(|_| DeviceError::Shape { op, message: format!("{n} exceeds the kernels' int range") })
}

/// What a machine's CUDA side offers, for the start-up log line.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub capability: (i32, i32),
    pub total_bytes: usize,
}

/// Whether a GPU can be opened here: the driver library loads and reports at least one device.
pub fn gpu_count() -> usize {
    // SAFETY: this only tries to open the shared library by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// A weight matrix `[rows, cols]` on the device, in its element type (bf16/f16 as bits).
pub enum DeviceMatrix {
    F32 { data: CudaSlice<f32>, rows: usize, cols: usize },
    Bf16 { data: CudaSlice<u16>, rows: usize, cols: usize },
    F16 { data: CudaSlice<u16>, rows: usize, cols: usize },
}

impl DeviceMatrix {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            DeviceMatrix::F32 { rows, cols, .. }
            | DeviceMatrix::Bf16 { rows, cols, .. }
            | DeviceMatrix::F16 { rows, cols, .. } => (*rows, *cols),
        }
    }
}

/// The global cache on one GPU: `blocks` blocks of `[K rows; V rows]`, each
/// `block_tokens × kv_dim`, allocated once at start-up.
pub struct DeviceKvPool {
    pub dtype: CacheDtype,
    data: PoolData,
    pub blocks: usize,
    pub block_tokens: usize,
    pub kv_dim: usize,
}

enum PoolData {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

impl DeviceKvPool {
    pub fn bytes(&self) -> usize {
        self.blocks * 2 * self.block_tokens * self.kv_dim * self.dtype.bytes()
    }
}

/// One GPU's stream, kernels and cuBLAS handle.
pub struct CudaBackend {
    info: DeviceInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
}

impl CudaBackend {
    /// Opens GPU `ordinal`: a context and a stream, the kernel program compiled by NVRTC for
    /// its compute capability, and a cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Self, DeviceError> {
        // SAFETY: these only try to open shared libraries by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DeviceError::NoDriver);
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(DeviceError::NoCublas);
        }
        let count = CudaContext::device_count().map_err(driver)?.max(0) as usize;
        if ordinal >= count {
            return Err(DeviceError::Device { ordinal, message: format!("this machine has {count} GPUs") });
        }
        let dev = |e: cudarc::driver::DriverError| DeviceError::Device { ordinal, message: format!("{e:?}") };
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        let capability = ctx.compute_capability().map_err(dev)?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(dev)?,
            capability,
            total_bytes: ctx.total_mem().map_err(dev)?,
        };
        let arch = match capability {
            (9, _) => "compute_90",
            (8, 9) => "compute_89",
            (8, 6) => "compute_86",
            (8, _) => "compute_80",
            (major, _) if major >= 10 => "compute_90", // PTX for 9.0 is JIT-compiled forward
            (major, minor) => {
                return Err(DeviceError::Device {
                    ordinal,
                    message: format!("compute capability {major}.{minor}: yoco needs 8.0 (A100) or newer"),
                })
            }
        };
        let ptx = compile_program(arch)?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let mut kernels = HashMap::new();
        for &name in KERNELS {
            kernels.insert(name, module.load_function(name).map_err(driver)?);
        }
        let stream = ctx.new_stream().map_err(dev)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| DeviceError::Blas(format!("{e:?}")))?;
        Ok(CudaBackend { info, stream, blas, kernels })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize), DeviceError> {
        self.stream.context().mem_get_info().map_err(driver)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, DeviceError> {
        self.stream.clone_htod(host).map_err(driver)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, DeviceError> {
        self.stream.clone_dtoh(dev).map_err(driver)
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>, DeviceError> {
        self.stream.alloc_zeros(n).map_err(driver)
    }

    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream.synchronize().map_err(driver)
    }

    /// `dst[at..] = src[from]`, on the device.
    pub fn copy(
        &self,
        src: &CudaSlice<f32>,
        from: Range<usize>,
        dst: &mut CudaSlice<f32>,
        at: usize,
    ) -> Result<(), DeviceError> {
        check("copy", from.start <= from.end && from.end <= src.len(), || format!("{from:?} of {}", src.len()))?;
        fits("copy", "dst", dst, at + from.len())?;
        if from.is_empty() {
            return Ok(());
        }
        let n = from.len();
        self.stream.memcpy_dtod(&src.slice(from), &mut dst.slice_mut(at..at + n)).map_err(driver)
    }

    /// A weight matrix uploaded in its element type.
    pub fn upload_matrix(
        &self,
        view: crate::kernels::widen::WeightRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<DeviceMatrix, DeviceError> {
        use crate::kernels::widen::WeightRef as TensorView;
        let n = rows * cols;
        let matrix = match view {
            TensorView::F32(w) => {
                check("upload_matrix", w.len() == n, || format!("{} elements for [{rows}, {cols}]", w.len()))?;
                DeviceMatrix::F32 { data: self.upload(w)?, rows, cols }
            }
            TensorView::Bf16(w) => {
                check("upload_matrix", w.len() == n, || format!("{} elements for [{rows}, {cols}]", w.len()))?;
                let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
                DeviceMatrix::Bf16 { data: self.upload(&bits)?, rows, cols }
            }
            TensorView::F16(w) => {
                check("upload_matrix", w.len() == n, || format!("{} elements for [{rows}, {cols}]", w.len()))?;
                let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
                DeviceMatrix::F16 { data: self.upload(&bits)?, rows, cols }
            }
        };
        Ok(matrix)
    }

    /// A pool of `blocks` cache blocks, zeroed.
    pub fn kv_pool(
        &self,
        dtype: CacheDtype,
        blocks: usize,
        block_tokens: usize,
        kv_dim: usize,
    ) -> Result<DeviceKvPool, DeviceError> {
        let n = blocks * 2 * block_tokens * kv_dim;
        let data = match dtype {
            CacheDtype::F32 => PoolData::F32(self.zeros(n)?),
            CacheDtype::Bf16 | CacheDtype::F16 => PoolData::Half(self.zeros(n)?),
        };
        Ok(DeviceKvPool { dtype, data, blocks, block_tokens, kv_dim })
    }

    fn kernel(&self, name: &'static str) -> &CudaFunction {
        &self.kernels[name]
    }

    /// A grid covering `n` elements with 256-thread blocks (capped; the kernels stride).
    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    fn rows_config(rows: usize, threads: u32) -> Result<LaunchConfig, DeviceError> {
        let rows =
            u32::try_from(rows).map_err(|_| DeviceError::Shape { op: "launch", message: "too many rows".into() })?;
        Ok(LaunchConfig { grid_dim: (rows.max(1), 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
    }

    /// `y [m, n] = x [m, k] · wᵀ` for `w [n, k]`: cuBLAS, f32 accumulation. bf16/f16 weights
    /// take the activations narrowed to their type (`scratch`, at least m·k elements).
    pub fn matmul(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &DeviceMatrix,
        y: &mut CudaSlice<f32>,
        scratch: &mut CudaSlice<u16>,
    ) -> Result<(), DeviceError> {
        const OP: &str = "matmul";
        let (n, k) = w.shape();
        fits(OP, "x", x, m * k)?;
        fits(OP, "y", y, m * n)?;
        let (mi, ni, ki) = (i32_of(OP, m)?, i32_of(OP, n)?, i32_of(OP, k)?);
        if m == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major y = x wᵀ is column-major yᵀ [n, m] = w [n, k] (stored as wᵀ) · xᵀ [k, m].
        let (data_type, a) = match w {
            DeviceMatrix::F32 { data, .. } => (blas_sys::cudaDataType::CUDA_R_32F, data.device_ptr(&self.stream)),
            DeviceMatrix::Bf16 { data, .. } => {
                self.narrow(x, m * k, scratch, CacheDtype::Bf16)?;
                (blas_sys::cudaDataType::CUDA_R_16BF, data.device_ptr(&self.stream))
            }
            DeviceMatrix::F16 { data, .. } => {
                self.narrow(x, m * k, scratch, CacheDtype::F16)?;
                (blas_sys::cudaDataType::CUDA_R_16F, data.device_ptr(&self.stream))
            }
        };
        let (a_ptr, _a_sync) = a;
        let (b_ptr, _b_sync) = match w {
            DeviceMatrix::F32 { .. } => x.device_ptr(&self.stream),
            _ => scratch.device_ptr(&self.stream),
        };
        let (c_ptr, _c_sync) = y.device_ptr_mut(&self.stream);
        // SAFETY: the pointers are live device allocations of at least n·k, m·k and m·n
        // elements of the types named (checked above), on the handle's stream.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                a_ptr as *const _,
                data_type,
                ki,
                b_ptr as *const _,
                data_type,
                ki,
                (&beta as *const f32).cast(),
                c_ptr as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| DeviceError::Blas(format!("{e:?}")))
    }

    /// `out[..n] = x[..n]` rounded to bf16 or f16 (as bits).
    pub fn narrow(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        out: &mut CudaSlice<u16>,
        to: CacheDtype,
    ) -> Result<(), DeviceError> {
        fits("narrow", "x", x, n)?;
        fits("narrow", "out", out, n)?;
        let name = match to {
            CacheDtype::Bf16 => "narrow_bf16",
            CacheDtype::F16 => "narrow_f16",
            CacheDtype::F32 => return Err(DeviceError::Shape { op: "narrow", message: "f32 is not narrower".into() }),
        };
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(self.kernel(name));
        b.arg(x).arg(out).arg(&n64);
        // SAFETY: the kernel reads and writes the first n elements of buffers that hold them.
        unsafe { b.launch(Self::elementwise(n)) }.map(drop).map_err(driver)
    }

    /// `a[..n] += b[..n]`.
    pub fn add_assign(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>, n: usize) -> Result<(), DeviceError> {
        fits("add_assign", "a", a, n)?;
        fits("add_assign", "b", b, n)?;
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.kernel("add_assign"));
        l.arg(a).arg(b).arg(&n64);
        // SAFETY: both buffers hold n elements.
        unsafe { l.launch(Self::elementwise(n)) }.map(drop).map_err(driver)
    }

    /// Rows of the embedding table for `ids` (this rank's vocabulary part `vocab`; zeros for the
    /// other ids), scaled: `out [ids, dim]`.
    pub fn embedding(
        &self,
        ids: &CudaSlice<u32>,
        n_ids: usize,
        table: &DeviceMatrix,
        vocab: Range<u32>,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), DeviceError> {
        let (rows, dim) = table.shape();
        fits("embedding", "ids", ids, n_ids)?;
        fits("embedding", "out", out, n_ids * dim)?;
        check("embedding", vocab.len() == rows, || format!("vocabulary part {vocab:?} for a table of {rows} rows"))?;
        let d = i32_of("embedding", dim)?;
        let cfg = Self::rows_config(n_ids, 128)?;
        if n_ids == 0 {
            return Ok(());
        }
        macro_rules! go {
            ($name:literal, $data:expr) => {{
                let mut l = self.stream.launch_builder(self.kernel($name));
                l.arg(ids).arg($data).arg(out).arg(&d).arg(&scale).arg(&vocab.start).arg(&vocab.end);
                // SAFETY: ids are read only where in [start, end), which indexes the table's rows.
                unsafe { l.launch(cfg) }
            }};
        }
        match table {
            DeviceMatrix::F32 { data, .. } => go!("embedding_f32", data),
            DeviceMatrix::Bf16 { data, .. } => go!("embedding_bf16", data),
            DeviceMatrix::F16 { data, .. } => go!("embedding_f16", data),
        }
        .map(drop)
        .map_err(driver)
    }

    /// RMSNorm of `rows` rows of `dim` into `out`; no weight means no affine scale.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        weight: Option<&CudaSlice<f32>>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), DeviceError> {
        fits("rms_norm", "x", x, rows * dim)?;
        fits("rms_norm", "out", out, rows * dim)?;
        if let Some(w) = weight {
            fits("rms_norm", "weight", w, dim)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let d = i32_of("rms_norm", dim)?;
        let null = 0u64;
        let mut l = self.stream.launch_builder(self.kernel("rms_norm"));
        l.arg(x);
        match weight {
            Some(w) => l.arg(w),
            None => l.arg(&null),
        };
        l.arg(out).arg(&d).arg(&eps);
        // SAFETY: rows × dim elements in and out, dim weights (or none).
        unsafe { l.launch(Self::rows_config(rows, 256)?) }.map(drop).map_err(driver)
    }

    /// Rotates `x [rows, heads · head_dim]` in place, row r by `positions[r]`; `inv_freq` is
    /// the model's `θ_i` (`Rope::angle(1, i)`).
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        rows: usize,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        fits("rope", "x", x, rows * heads * head_dim)?;
        fits("rope", "positions", positions, rows)?;
        fits("rope", "inv_freq", inv_freq, head_dim / 2)?;
        if rows == 0 {
            return Ok(());
        }
        let (h, d) = (i32_of("rope", heads)?, i32_of("rope", head_dim)?);
        let mut l = self.stream.launch_builder(self.kernel("rope_interleaved"));
        l.arg(x).arg(positions).arg(inv_freq).arg(&h).arg(&d);
        // SAFETY: rows × heads × head_dim elements, rows positions, head_dim / 2 frequencies.
        unsafe { l.launch(Self::rows_config(rows, 128)?) }.map(drop).map_err(driver)
    }

    /// `a ← silu(a) ⊙ b` over n elements.
    pub fn silu_mul(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>, n: usize) -> Result<(), DeviceError> {
        fits("silu_mul", "a", a, n)?;
        fits("silu_mul", "b", b, n)?;
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.kernel("silu_mul"));
        l.arg(a).arg(b).arg(&n64);
        // SAFETY: both buffers hold n elements.
        unsafe { l.launch(Self::elementwise(n)) }.map(drop).map_err(driver)
    }

    /// `gamma = logsigmoid(gt) / normalizer` over n elements.
    pub fn log_sigmoid_scaled(
        &self,
        gt: &CudaSlice<f32>,
        gamma: &mut CudaSlice<f32>,
        n: usize,
        normalizer: f32,
    ) -> Result<(), DeviceError> {
        fits("log_sigmoid_scaled", "gt", gt, n)?;
        fits("log_sigmoid_scaled", "gamma", gamma, n)?;
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.kernel("log_sigmoid_scaled"));
        l.arg(gt).arg(gamma).arg(&n64).arg(&normalizer);
        // SAFETY: both buffers hold n elements.
        unsafe { l.launch(Self::elementwise(n)) }.map(drop).map_err(driver)
    }

    fn check_head_dim(op: &'static str, head_dim: usize) -> Result<(), DeviceError> {
        check(op, head_dim > 0 && head_dim <= MAX_HEAD_DIM && head_dim.is_multiple_of(2), || {
            format!("head_dim {head_dim}: the kernels take even head dims up to {MAX_HEAD_DIM}")
        })
    }

    /// Chunkwise gated retention over `tokens` tokens from `state [heads, d, d]` (left after
    /// the last token): `out [tokens, heads · d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn retention_chunkwise(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "retention_chunkwise";
        Self::check_head_dim(OP, head_dim)?;
        let n = tokens * heads * head_dim;
        for (what, buf) in [("q", q), ("k", k), ("v", v)] {
            fits(OP, what, buf, n)?;
        }
        fits(OP, "gamma", gamma, tokens * heads)?;
        fits(OP, "state", state, heads * head_dim * head_dim)?;
        fits(OP, "out", out, n)?;
        if tokens == 0 {
            return Ok(());
        }
        let (t, h, d) = (i32_of(OP, tokens)?, i32_of(OP, heads)?, i32_of(OP, head_dim)?);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, head_dim.div_ceil(RETENTION_COLS) as u32, 1),
            block_dim: (RETENTION_COLS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(self.kernel("retention_chunkwise"));
        l.arg(q).arg(k).arg(v).arg(gamma).arg(state).arg(out).arg(&t).arg(&h).arg(&d);
        // SAFETY: every buffer holds what the shapes need (checked above).
        unsafe { l.launch(cfg) }.map(drop).map_err(driver)
    }

    /// One recurrent retention step for `seqs` sequences, sequence s on state slot `slots[s]` of
    /// `states [slots, heads, d, d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn retention_recurrent(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        slots: &CudaSlice<u32>,
        states: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        seqs: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "retention_recurrent";
        Self::check_head_dim(OP, head_dim)?;
        let n = seqs * heads * head_dim;
        for (what, buf) in [("q", q), ("k", k), ("v", v)] {
            fits(OP, what, buf, n)?;
        }
        fits(OP, "gamma", gamma, seqs * heads)?;
        fits(OP, "slots", slots, seqs)?;
        fits(OP, "out", out, n)?;
        check(OP, states.len().is_multiple_of(heads * head_dim * head_dim), || "states is not whole slots".into())?;
        if seqs == 0 {
            return Ok(());
        }
        // The slot numbers are host-validated by the state pool that hands them out.
        let (h, d) = (i32_of(OP, heads)?, i32_of(OP, head_dim)?);
        let cfg = LaunchConfig { grid_dim: (heads as u32, seqs as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(self.kernel("retention_recurrent"));
        l.arg(q).arg(k).arg(v).arg(gamma).arg(slots).arg(states).arg(out).arg(&h).arg(&d);
        // SAFETY: buffers sized above; slots index whole slots of states.
        unsafe { l.launch(cfg) }.map(drop).map_err(driver)
    }

    /// Sliding-window attention of `tokens` queries over `prefix + tokens` key/value rows.
    #[allow(clippy::too_many_arguments)]
    pub fn window_attention(
        &self,
        q: &CudaSlice<f32>,
        keys: &CudaSlice<f32>,
        values: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        tokens: usize,
        prefix: usize,
        window: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "window_attention";
        Self::check_head_dim(OP, head_dim)?;
        let w = heads * head_dim;
        fits(OP, "q", q, tokens * w)?;
        fits(OP, "keys", keys, (prefix + tokens) * w)?;
        fits(OP, "values", values, (prefix + tokens) * w)?;
        fits(OP, "out", out, tokens * w)?;
        check(OP, window > 0, || "window 0".into())?;
        if tokens == 0 {
            return Ok(());
        }
        let (p, win, h, d) = (i32_of(OP, prefix)?, i32_of(OP, window)?, i32_of(OP, heads)?, i32_of(OP, head_dim)?);
        let cfg =
            LaunchConfig { grid_dim: (tokens as u32, heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(self.kernel("window_attention"));
        l.arg(q).arg(keys).arg(values).arg(out).arg(&p).arg(&win).arg(&h).arg(&d);
        // SAFETY: buffers sized above.
        unsafe { l.launch(cfg) }.map(drop).map_err(driver)
    }

    /// Writes `rows [n, kv_dim]` as positions `start..start + n` of the sequence whose blocks
    /// `block_table` lists, into the K (`values = false`) or V half of its blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        rows: &CudaSlice<f32>,
        n: usize,
        pool: &mut DeviceKvPool,
        block_table: &CudaSlice<u32>,
        table_len: usize,
        start: usize,
        values: bool,
    ) -> Result<(), DeviceError> {
        const OP: &str = "kv_write";
        let (bt, kvd) = (pool.block_tokens, pool.kv_dim);
        fits(OP, "rows", rows, n * kvd)?;
        fits(OP, "block_table", block_table, table_len)?;
        check(OP, start + n <= table_len * bt, || {
            format!("positions {start}..{} beyond {table_len} blocks of {bt}", start + n)
        })?;
        if n == 0 {
            return Ok(());
        }
        let (s, b, k, which) = (i32_of(OP, start)?, i32_of(OP, bt)?, i32_of(OP, kvd)?, i32::from(values));
        let cfg = Self::rows_config(n, 128)?;
        let name = match pool.dtype {
            CacheDtype::F32 => "kv_write_f32",
            CacheDtype::Bf16 => "kv_write_bf16",
            CacheDtype::F16 => "kv_write_f16",
        };
        let mut l = self.stream.launch_builder(self.kernel(name));
        l.arg(rows);
        match &mut pool.data {
            PoolData::F32(d) => l.arg(d),
            PoolData::Half(d) => l.arg(d),
        };
        l.arg(block_table).arg(&s).arg(&b).arg(&k).arg(&which);
        // SAFETY: the positions lie within the table's blocks; the block numbers in the table are
        // handed out by the host's block allocator, below `pool.blocks`.
        unsafe { l.launch(cfg) }.map(drop).map_err(driver)
    }

    /// Cross-attention of one query per sequence over its cache, the flash-decoding split:
    /// partials over `split_tokens` positions, then the log-sum-exp merge into
    /// `out [seqs, heads · head_dim]`. `tables` holds every sequence's block table, sequence s
    /// starting at `offsets[s]`, covering `lens[s]` positions (`max_len` the largest).
    #[allow(clippy::too_many_arguments)]
    pub fn cross_attention(
        &self,
        q: &CudaSlice<f32>,
        pool: &DeviceKvPool,
        tables: &CudaSlice<u32>,
        offsets: &CudaSlice<u32>,
        lens: &CudaSlice<u32>,
        seqs: usize,
        max_len: usize,
        shape: CrossShape,
        split_tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), DeviceError> {
        const OP: &str = "cross_attention";
        Self::check_head_dim(OP, shape.head_dim)?;
        check(OP, shape.kv_dim() == pool.kv_dim && shape.heads.is_multiple_of(shape.kv_heads), || {
            format!("{shape:?} against a pool of kv_dim {}", pool.kv_dim)
        })?;
        check(OP, split_tokens > 0, || "split_tokens 0".into())?;
        fits(OP, "q", q, seqs * shape.q_dim())?;
        fits(OP, "offsets", offsets, seqs)?;
        fits(OP, "lens", lens, seqs)?;
        fits(OP, "out", out, seqs * shape.q_dim())?;
        if seqs == 0 {
            return Ok(());
        }
        let splits = max_len.div_ceil(split_tokens).max(1);
        let parts = seqs * shape.heads * splits;
        let mut po = self.zeros::<f32>(parts * shape.head_dim)?;
        let mut pm = self.zeros::<f32>(parts)?;
        let mut pl = self.zeros::<f32>(parts)?;
        let (h, kvh, d) = (i32_of(OP, shape.heads)?, i32_of(OP, shape.kv_heads)?, i32_of(OP, shape.head_dim)?);
        let (b, st) = (i32_of(OP, pool.block_tokens)?, i32_of(OP, split_tokens)?);
        let name = match pool.dtype {
            CacheDtype::F32 => "cross_attention_partials_f32",
            CacheDtype::Bf16 => "cross_attention_partials_bf16",
            CacheDtype::F16 => "cross_attention_partials_f16",
        };
        let cfg = LaunchConfig {
            grid_dim: (shape.heads as u32, splits as u32, seqs as u32),
            block_dim: (ATTN_TILE.min(128) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(self.kernel(name));
        l.arg(q);
        match &pool.data {
            PoolData::F32(data) => l.arg(data),
            PoolData::Half(data) => l.arg(data),
        };
        l.arg(tables).arg(offsets).arg(lens).arg(&mut po).arg(&mut pm).arg(&mut pl);
        l.arg(&h).arg(&kvh).arg(&d).arg(&b).arg(&st);
        // SAFETY: the tables (host-built from the block allocator) cover lens[s] ≤ max_len
        // positions of sequence s in blocks below `pool.blocks`; partials sized for the grid.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        let (n_parts, finalize, null) = (i32_of(OP, splits)?, 1i32, 0u64);
        let merge =
            LaunchConfig { grid_dim: (shape.heads as u32, seqs as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(self.kernel("lse_merge"));
        l.arg(&po).arg(&pm).arg(&pl).arg(&n_parts).arg(&d).arg(&finalize).arg(out).arg(&null).arg(&null);
        // SAFETY: the partials written above, merged into out [seqs, heads · head_dim].
        unsafe { l.launch(merge) }.map(drop).map_err(driver)
    }

    /// The greedy token of each of `rows` rows of logits.
    pub fn argmax_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), DeviceError> {
        fits("argmax_rows", "logits", logits, rows * vocab)?;
        fits("argmax_rows", "out", out, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let v = i32_of("argmax_rows", vocab)?;
        let mut l = self.stream.launch_builder(self.kernel("argmax_rows"));
        l.arg(logits).arg(out).arg(&v);
        // SAFETY: rows × vocab logits, rows outputs; 1024 threads, a power of two.
        unsafe { l.launch(Self::rows_config(rows, 1024)?) }.map(drop).map_err(driver)
    }

    /// `out = log_softmax(logits)` row by row.
    pub fn log_softmax_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), DeviceError> {
        fits("log_softmax_rows", "logits", logits, rows * vocab)?;
        fits("log_softmax_rows", "out", out, rows * vocab)?;
        if rows == 0 {
            return Ok(());
        }
        let v = i32_of("log_softmax_rows", vocab)?;
        let mut l = self.stream.launch_builder(self.kernel("log_softmax_rows"));
        l.arg(logits).arg(out).arg(&v);
        // SAFETY: rows × vocab elements in and out; 512 threads, a power of two.
        unsafe { l.launch(Self::rows_config(rows, 512)?) }.map(drop).map_err(driver)
    }
}
