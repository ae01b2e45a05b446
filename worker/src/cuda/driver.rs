//! The GPU [`Runtime`]: a cudarc context and stream on one device, the kernel program compiled
//! by NVRTC for its compute capability at start-up, and a cuBLAS handle. Opening it never
//! panics: cudarc panics when libcuda is missing, so the libraries are probed first, and every
//! driver, NVRTC or cuBLAS failure is a [`DeviceError`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as cu, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr};

use super::compile::compile_program;
use super::ops::Gpu;
use super::runtime::{DeviceElem, DeviceError, Gemm, GemmType, Runtime};
use super::staging::{Arenas, Place, ARENA_BYTES};
use super::KERNELS;

/// The CUDA backend on one GPU.
pub type CudaBackend = Gpu<CudaRuntime>;

fn driver(e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Driver(format!("{e:?}"))
}

/// What a GPU is, for the start-up log line.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub capability: (i32, i32),
    pub total_bytes: usize,
}

/// How many GPUs this machine has (0 without the driver library).
pub fn gpu_count() -> usize {
    // SAFETY: this only tries to open the shared library by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

pub struct CudaRuntime {
    info: DeviceInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    staging: Mutex<Staging>,
}

/// Two page-locked arenas that small uploads pass through (see `staging.rs`), and the event
/// recorded behind each one's last copy when it was retired.
struct Staging {
    arenas: Arenas,
    memory: [*mut u8; 2],
    events: [Option<CudaEvent>; 2],
    /// Set after a failure that left it unknown whether the arenas' copies are done: every
    /// upload goes directly from then on.
    disabled: bool,
}

// SAFETY: the arenas are page-locked host memory owned by the runtime, written only under its
// mutex.
unsafe impl Send for Staging {}

impl Drop for CudaRuntime {
    fn drop(&mut self) {
        let staging = self.staging.get_mut().unwrap_or_else(|e| e.into_inner());
        // Copies from the arenas finish before they are freed; an error here has nowhere to go.
        let _ = self.stream.synchronize();
        for &ptr in &staging.memory {
            if !ptr.is_null() && self.stream.context().bind_to_thread().is_ok() {
                // SAFETY: allocated by cuMemHostAlloc in `open`, freed once, no copy pending.
                let _ = unsafe { cu::free_host(ptr.cast()) };
            }
        }
    }
}

impl CudaRuntime {
    /// An upload through arena `arena` at `offset` (see [`Place::Staged`]).
    #[allow(clippy::too_many_arguments)]
    fn staged_upload<T: DeviceElem>(
        &self,
        staging: &mut Staging,
        host: &[T],
        arena: usize,
        offset: usize,
        retire: Option<usize>,
        wait: bool,
    ) -> Result<CudaSlice<T>, DeviceError> {
        self.bind()?;
        if let Some(old) = retire {
            staging.events[old] = Some(self.stream.record_event(None).map_err(driver)?);
        }
        if wait {
            if let Some(event) = &staging.events[arena] {
                event.synchronize().map_err(driver)?;
            }
        }
        // SAFETY: `offset + bytes` lies within the arena (Arenas::place), which no copy still
        // reads (its event passed, or it was never retired and this range is new); offsets are
        // aligned for T; the device buffer is written whole by the copy before any use.
        unsafe {
            let staged = staging.memory[arena].add(offset);
            std::ptr::copy_nonoverlapping(host.as_ptr().cast::<u8>(), staged, std::mem::size_of_val(host));
            let dst = self.stream.alloc::<T>(host.len()).map_err(driver)?;
            let (ptr, record) = dst.device_ptr(&self.stream);
            let src = std::slice::from_raw_parts(staged.cast::<T>(), host.len());
            cu::memcpy_htod_async(ptr, src, self.stream.cu_stream()).map_err(driver)?;
            drop(record);
            Ok(dst)
        }
    }

    /// Opens GPU `ordinal`.
    pub fn open(ordinal: usize) -> Result<Self, DeviceError> {
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
        // One stream: its order is all the ordering the ops need.
        // SAFETY: no buffer is shared with another stream.
        unsafe { ctx.disable_event_tracking() };
        // Stream-ordered frees return memory to the device's default pool, which by default
        // hands it back to the driver at every synchronisation (release threshold 0): every
        // step's activations would come from the driver again. The pool keeps what it has.
        // SAFETY: the pool handle is the device's own; the attribute takes a u64.
        unsafe {
            use cudarc::driver::sys as cu_sys;
            let mut pool: cu_sys::CUmemoryPool = std::ptr::null_mut();
            cu_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().map_err(dev)?;
            let mut keep = u64::MAX;
            let attr = cu_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            cu_sys::cuMemPoolSetAttribute(pool, attr, (&mut keep as *mut u64).cast()).result().map_err(dev)?;
        }
        let capability = ctx.compute_capability().map_err(dev)?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(dev)?,
            capability,
            total_bytes: ctx.total_mem().map_err(dev)?,
        };
        let (major, minor) = capability;
        if major < 8 {
            return Err(DeviceError::Device {
                ordinal,
                message: format!("compute capability {major}.{minor}: yoco needs 8.0 (A100) or newer"),
            });
        }
        // Machine code for this GPU: no PTX for the driver to compile (a PTX from an NVRTC newer
        // than the driver is refused). An NVRTC that does not know a newer GPU gives PTX for
        // 9.0 instead, which the driver compiles forward.
        let arch = format!("sm_{major}{minor}");
        let program = match super::compile::compile_cubin(&arch) {
            Ok(cubin) => cudarc::nvrtc::Ptx::from_binary(cubin),
            Err(e) if major >= 10 => {
                tracing::warn!(error = %e, "no CUBIN for {arch}: PTX for compute_90, compiled by the driver");
                compile_program("compute_90")?
            }
            Err(e) => return Err(e.into()),
        };
        let module = ctx.load_module(program).map_err(|e| {
            DeviceError::Driver(format!(
                "loading the kernels ({arch}): {e:?} (a driver older than the NVRTC that compiled them? \
                 NVRTC 13 needs a CUDA 13 driver)"
            ))
        })?;
        let mut kernels = HashMap::new();
        for &(name, _) in KERNELS {
            kernels.insert(name, module.load_function(name).map_err(driver)?);
        }
        let stream = ctx.new_stream().map_err(dev)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| DeviceError::Blas(format!("{e:?}")))?;
        let mut memory = [std::ptr::null_mut(); 2];
        for m in &mut memory {
            // SAFETY: a plain page-locked allocation, freed in Drop; write-combined, as the host
            // only writes it.
            *m = unsafe { cu::malloc_host(ARENA_BYTES, cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED) }
                .map_err(dev)?
                .cast();
        }
        let staging =
            Mutex::new(Staging { arenas: Arenas::new(ARENA_BYTES), memory, events: [None, None], disabled: false });
        Ok(CudaRuntime { info, stream, blas, kernels, staging })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
}

impl Gpu<CudaRuntime> {
    /// The CUDA backend on GPU `ordinal`.
    pub fn open(ordinal: usize) -> Result<Self, DeviceError> {
        Ok(Gpu::new(CudaRuntime::open(ordinal)?))
    }
}

fn data_type(t: GemmType) -> blas_sys::cudaDataType {
    match t {
        GemmType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        GemmType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
        GemmType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
    }
}

fn op(trans: bool) -> blas_sys::cublasOperation_t {
    if trans {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

// SAFETY: cudarc's slices know their lengths and addresses; launches and GEMMs go to the driver
// and cuBLAS as given.
unsafe impl Runtime for CudaRuntime {
    type Buf<T: DeviceElem> = CudaSlice<T>;

    fn bind(&self) -> Result<(), DeviceError> {
        self.stream.context().bind_to_thread().map_err(driver)
    }

    fn alloc<T: DeviceElem>(&self, n: usize) -> Result<CudaSlice<T>, DeviceError> {
        self.stream.alloc_zeros(n.max(1)).map_err(driver)
    }

    fn alloc_scratch<T: DeviceElem>(&self, n: usize) -> Result<CudaSlice<T>, DeviceError> {
        // SAFETY: device memory of any bits is a valid DeviceElem (f32, u16, u32); the callers
        // write it before reading (Runtime::alloc_scratch).
        unsafe { self.stream.alloc(n.max(1)) }.map_err(driver)
    }

    fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<CudaSlice<T>, DeviceError> {
        let bytes = std::mem::size_of_val(host);
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let place = if staging.disabled { Place::Direct } else { staging.arenas.place(bytes) };
        let Place::Staged { arena, offset, retire, wait } = place else {
            drop(staging);
            return self.stream.clone_htod(host).map_err(driver);
        };
        let staged = self.staged_upload(&mut staging, host, arena, offset, retire, wait);
        if staged.is_err() {
            // The bookkeeping moved on before a step failed: an event may be missing or stale.
            // Start afresh once every copy is done; if even that cannot be known, stage no more.
            if self.stream.synchronize().is_ok() {
                staging.arenas = Arenas::new(ARENA_BYTES);
                staging.events = [None, None];
            } else {
                staging.disabled = true;
            }
        }
        staged
    }

    fn download<T: DeviceElem>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>, DeviceError> {
        self.stream.clone_dtoh(buf).map_err(driver)
    }

    fn len<T: DeviceElem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn addr<T: DeviceElem>(&self, buf: &CudaSlice<T>) -> u64 {
        // Event tracking is off, so the guard records nothing.
        buf.device_ptr(&self.stream).0
    }

    fn zero(&self, buf: &mut CudaSlice<f32>, range: Range<usize>) -> Result<(), DeviceError> {
        self.stream.memset_zeros(&mut buf.slice_mut(range)).map_err(driver)
    }

    fn copy(
        &self,
        src: &CudaSlice<f32>,
        from: Range<usize>,
        dst: &mut CudaSlice<f32>,
        at: usize,
    ) -> Result<(), DeviceError> {
        let n = from.len();
        self.stream.memcpy_dtod(&src.slice(from), &mut dst.slice_mut(at..at + n)).map_err(driver)
    }

    unsafe fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        threads: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), DeviceError> {
        let f = self.kernels.get(name).ok_or_else(|| DeviceError::Driver(format!("no kernel {name}")))?;
        self.bind()?;
        // SAFETY: the caller guarantees the arguments (see `Runtime::launch`).
        unsafe { cu::launch_kernel(f.cu_function(), grid, (threads, 1, 1), 0, self.stream.cu_stream(), args) }
            .map_err(driver)
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), DeviceError> {
        // cuBLAS runs in the current context; cudarc binds only for its own stream calls.
        self.bind()?;
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let (alpha, beta) = ((&alpha as *const f32).cast::<c_void>(), (&beta as *const f32).cast::<c_void>());
        let (a, b, c) = (g.a as *const c_void, g.b as *const c_void, g.c as *mut c_void);
        let (input, output) = (data_type(g.input), blas_sys::cudaDataType::CUDA_R_32F);
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let handle = *self.blas.handle();
        let (ta, tb) = (op(g.trans_a), op(g.trans_b));
        // SAFETY: the caller guarantees the operands (see `Runtime::gemm`); the handle is on
        // this runtime's stream.
        unsafe {
            match g.batch {
                None => blas::gemm_ex(
                    handle, ta, tb, g.m, g.n, g.k, alpha, a, input, g.lda, b, input, g.ldb, beta, c, output, g.ldc,
                    compute, algo,
                ),
                Some(batch) => blas::gemm_strided_batched_ex(
                    handle,
                    ta,
                    tb,
                    g.m,
                    g.n,
                    g.k,
                    alpha,
                    a,
                    input,
                    g.lda,
                    batch.stride_a,
                    b,
                    input,
                    g.ldb,
                    batch.stride_b,
                    beta,
                    c,
                    output,
                    g.ldc,
                    batch.stride_c,
                    batch.count,
                    compute,
                    algo,
                ),
            }
        }
        .map_err(|e| DeviceError::Blas(format!("{e:?}")))
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream.synchronize().map_err(driver)
    }

    fn memory(&self) -> Result<(usize, usize), DeviceError> {
        self.stream.context().mem_get_info().map_err(driver)
    }
}
