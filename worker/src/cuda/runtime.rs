//! What the CUDA ops need of a device, as a trait: memory, kernel launches in the
//! cuLaunchKernel convention (an array of pointers to the arguments) and a cuBLAS-style GEMM. The
//! GPU implements it with cudarc (`driver::CudaRuntime`, feature `cuda`); the tests implement it
//! with the CPU emulator of the kernels, so that every op, launch configuration and the whole
//! forward pass over the CUDA kernels run in CI.

use std::ffi::c_void;
use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the CUDA driver (libcuda.so) cannot be loaded: no NVIDIA driver on this machine")]
    NoDriver,
    #[error("cuBLAS (libcublas.so) cannot be loaded: install the CUDA toolkit or the nvidia-cublas wheel")]
    NoCublas,
    #[error("GPU {ordinal}: {message}")]
    Device { ordinal: usize, message: String },
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Compile(#[from] super::compile::CompileError),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
}

/// The element types of device buffers: f32 activations, u16 (bf16/f16 bits), u32 ids.
#[cfg(feature = "cuda")]
pub trait DeviceElem:
    sealed::Sealed + Copy + Default + Send + Sync + 'static + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
{
}
/// The element types of device buffers: f32 activations, u16 (bf16/f16 bits), u32 ids.
#[cfg(not(feature = "cuda"))]
pub trait DeviceElem: sealed::Sealed + Copy + Default + Send + Sync + 'static {}
impl DeviceElem for f32 {}
impl DeviceElem for u16 {}
impl DeviceElem for u32 {}

/// The element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmType {
    F32,
    Bf16,
    F16,
}

/// `C = op(A) · op(B)` (or `C += op(A) · op(B)` with `accumulate`) in cuBLAS's column-major
/// convention, f32 accumulation and output: `C` is `m × n` with leading dimension `ldc`;
/// `op(A)` is `m × k`, `op(B)` `k × n`; `trans_a` means A is stored `k × m` (leading dimension
/// `lda`), and so for B. With `batch`, `count` such products, the i-th operands `i · stride`
/// elements past the first (cuBLAS's strided-batched GEMM).
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: u64,
    pub lda: i32,
    pub b: u64,
    pub ldb: i32,
    /// Both inputs' type.
    pub input: GemmType,
    pub c: u64,
    pub ldc: i32,
    /// Adds the product to `C` (cuBLAS's beta 1) instead of overwriting it (beta 0, which
    /// never reads `C`).
    pub accumulate: bool,
    pub batch: Option<GemmBatch>,
}

/// The products of a strided-batched [`Gemm`]: how many, and the elements between one
/// product's operands and the next's.
#[derive(Debug, Clone, Copy)]
pub struct GemmBatch {
    pub count: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
}

/// # Safety
/// The ops trust an implementation: `len` and `addr` tell the truth about a buffer, `alloc` and
/// `upload` give buffers of the lengths asked, and `launch` and `gemm` run what they are given.
pub unsafe trait Runtime: Send + Sync {
    /// Shared between threads as the backend's buffers are (`crate::backend::Backend`).
    type Buf<T: DeviceElem>: Send + Sync;

    /// Makes this runtime's device current on the calling thread (CUDA: its context). Every
    /// call that touches the device, freeing a buffer included, must come after it on its
    /// thread: a worker's steps, frees and loads run on whichever thread of a pool is free.
    fn bind(&self) -> Result<(), DeviceError>;
    /// `n` zeroed elements (at least one: device allocations are never empty).
    fn alloc<T: DeviceElem>(&self, n: usize) -> Result<Self::Buf<T>, DeviceError>;
    /// `n` elements (at least one) of unspecified contents: for workspaces that kernels or
    /// products write whole before anything reads them (no memset on the device).
    fn alloc_scratch<T: DeviceElem>(&self, n: usize) -> Result<Self::Buf<T>, DeviceError>;
    fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<Self::Buf<T>, DeviceError>;
    fn download<T: DeviceElem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>, DeviceError>;
    fn len<T: DeviceElem>(&self, buf: &Self::Buf<T>) -> usize;
    /// The buffer's device address, as kernels take it.
    fn addr<T: DeviceElem>(&self, buf: &Self::Buf<T>) -> u64;
    /// Zeroes elements `range` of `buf` (within it: the caller checks).
    fn zero(&self, buf: &mut Self::Buf<f32>, range: Range<usize>) -> Result<(), DeviceError>;
    /// `dst[at..] = src[from]`; both ranges within their buffers (the caller checks).
    fn copy(
        &self,
        src: &Self::Buf<f32>,
        from: Range<usize>,
        dst: &mut Self::Buf<f32>,
        at: usize,
    ) -> Result<(), DeviceError>;
    /// Runs kernel `name` of the program over `grid` blocks of `threads` threads.
    ///
    /// # Safety
    /// `args` points at the kernel's arguments, of its parameter types, and every address among
    /// them is of a live buffer as large as the kernel's indexing for these arguments needs.
    unsafe fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        threads: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), DeviceError>;
    /// # Safety
    /// The addresses are of live buffers of the types and sizes the GEMM reads and writes.
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), DeviceError>;
    /// Waits for everything enqueued.
    fn synchronize(&self) -> Result<(), DeviceError>;
    /// Free and total device memory, in bytes.
    fn memory(&self) -> Result<(usize, usize), DeviceError>;
}
