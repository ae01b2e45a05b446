//! The CPU emulator of the CUDA kernels, shared by the tests that run them: the program NVRTC
//! compiles (`yoco_worker::cuda::program`), built with the host C++ compiler over
//! `cuda_emu/emu.h` (a block's threads are fibers, `__syncthreads` a switch back to the
//! scheduler), and [`EmuRuntime`], the `Runtime` of the CUDA ops over it: device buffers are host
//! vectors, launches go to the emulator, and the GEMM is cuBLAS's column-major contract computed
//! on the host. Within a block, threads run in a different order from phase to phase, so that
//! a race within a phase (a thread reading what another writes before their next barrier)
//! changes the result and fails the test; shared memory is poisoned at every block's start, so
//! a read before a write is caught too. What it cannot find: races between blocks (they run one
//! after another), a race whose every ordering gives the same bits (many threads adding to one
//! word: each runs its whole phase at once, so no update is lost), warp behaviour beyond
//! block-wide shuffles, CUDA's own maths (`expf`, `cos`, fused multiply-adds)
//! and cuBLAS itself. Those are for `scripts/gpu-check.sh` on a GPU.
#![allow(dead_code)]

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_void, CString};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;

use half::{bf16, f16};
use yoco_worker::cuda::runtime::{DeviceElem, DeviceError, Gemm, GemmBatch, GemmType, Runtime};

type Launch = unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, *mut *mut c_void) -> i32;

pub struct Emulator {
    _lib: libloading::Library,
    launch: Launch,
}

/// Compiles the kernel program with the emulator once per test binary.
pub fn emulator() -> &'static Emulator {
    static EMU: OnceLock<Emulator> = OnceLock::new();
    EMU.get_or_init(|| {
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_emu");
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join(format!("program_{}.cpp", std::process::id()));
        let registry = std::fs::read_to_string(here.join("registry.cpp")).unwrap();
        let fixtures = std::fs::read_to_string(here.join("fixtures.cu")).unwrap();
        let text = format!(
            "#include \"emu.h\"\n{}\n#line 1 \"fixtures.cu\"\n{fixtures}\n#line 1 \"registry.cpp\"\n{registry}",
            yoco_worker::cuda::program()
        );
        std::fs::write(&source, text).unwrap();
        let lib = dir.join(format!("libyoco_cuda_emu_{}.so", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = std::process::Command::new(&cxx)
            // No _FORTIFY_SOURCE (Ubuntu's compilers turn it on): its longjmp check aborts on every
            // switch between a fiber's stack and the scheduler's.
            .args([
                "-std=c++20",
                "-O1",
                "-ffp-contract=off",
                "-U_FORTIFY_SOURCE",
                "-D_FORTIFY_SOURCE=0",
                "-shared",
                "-fPIC",
                "-pthread",
                "-I",
            ])
            .arg(&here)
            .arg(&source)
            .arg("-o")
            .arg(&lib)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
        assert!(
            out.status.success(),
            "the kernels do not build for the emulator:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: the library was just built from our sources; it runs no code on load.
        let lib = unsafe { libloading::Library::new(&lib) }.unwrap();
        // SAFETY: registry.cpp defines emu_launch with exactly this signature.
        let launch = unsafe { *lib.get::<Launch>(b"emu_launch").unwrap() };
        Emulator { _lib: lib, launch }
    })
}

/// Runs kernel `name` over `grid` with `threads` per block; `args` point at the arguments, as
/// for cuLaunchKernel.
pub fn launch(name: &str, grid: (u32, u32, u32), threads: u32, args: &mut [*mut c_void]) {
    // SAFETY: every argument points at a live value of the type the kernel takes, and every
    // buffer behind a pointer argument is as large as the kernel's indexing needs (each test
    // sizes them from the same shapes it passes).
    let rc = unsafe { raw_launch(name, grid, threads, args.as_mut_ptr()) };
    assert_eq!(rc, 0, "emu_launch({name}) failed: {}", failure(rc));
}

fn failure(rc: i32) -> &'static str {
    match rc {
        1 => "no such kernel",
        2 => "bad block size",
        _ => "threads left the kernel while others waited at a barrier",
    }
}

/// `emu_launch`, one launch at a time: the emulator's block state is global.
///
/// # Safety
/// `args` points at the kernel's arguments (see [`launch`]), or the grid is empty.
pub unsafe fn raw_launch(name: &str, grid: (u32, u32, u32), threads: u32, args: *mut *mut c_void) -> i32 {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let emu = emulator();
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cname = CString::new(name).unwrap();
    unsafe { (emu.launch)(cname.as_ptr(), grid.0, grid.1, grid.2, threads, args) }
}

/// A device buffer of the emulator: host memory the kernels write through its address.
pub struct EmuBuf<T>(UnsafeCell<Vec<T>>);

// SAFETY: the emulator runs one launch at a time (a global lock), and the backend's code that
// shares buffers between threads reads them only (`Backend::row_groups` is the CPU backend's).
unsafe impl<T: Send> Sync for EmuBuf<T> {}

impl<T> EmuBuf<T> {
    fn ptr(&self) -> *mut T {
        // SAFETY: only the pointer is read; the emulator runs one launch at a time.
        unsafe { (*self.0.get()).as_mut_ptr() }
    }
    fn len(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.0.get()).len() }
    }
}

/// The CUDA ops' runtime over the emulator. Like a CUDA context, it must be bound on a thread
/// (`Runtime::bind`) before that thread touches the device, frees included: every call here
/// checks it, so that a path that would run without a current context on a GPU fails in CI.
#[derive(Default)]
pub struct EmuRuntime;

thread_local! {
    static BOUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn check_bound(op: &str) {
    assert!(
        BOUND.with(|b| b.get()),
        "{op} on thread {:?}, which never bound the device (Runtime::bind)",
        std::thread::current().name().unwrap_or("unnamed")
    );
}

impl<T> Drop for EmuBuf<T> {
    fn drop(&mut self) {
        // Not while unwinding: a failed assertion must not become an abort.
        if !std::thread::panicking() {
            check_bound("freeing a buffer");
        }
    }
}

/// An operand element of the emulated GEMM at index `i`.
///
/// # Safety
/// `addr` is of a live buffer of `t` elements holding index `i`.
unsafe fn element(addr: u64, t: GemmType, i: usize) -> f32 {
    unsafe {
        match t {
            GemmType::F32 => *(addr as *const f32).add(i),
            GemmType::Bf16 => bf16::from_bits(*(addr as *const u16).add(i)).to_f32(),
            GemmType::F16 => f16::from_bits(*(addr as *const u16).add(i)).to_f32(),
        }
    }
}

// SAFETY: the buffers are host vectors whose lengths and addresses these report; launches run
// in the emulator, the GEMM on the host, both as given.
unsafe impl Runtime for EmuRuntime {
    type Buf<T: DeviceElem> = EmuBuf<T>;

    fn bind(&self) -> Result<(), DeviceError> {
        BOUND.with(|b| b.set(true));
        Ok(())
    }

    fn alloc<T: DeviceElem>(&self, n: usize) -> Result<EmuBuf<T>, DeviceError> {
        check_bound("alloc");
        Ok(EmuBuf(UnsafeCell::new(vec![T::default(); n.max(1)])))
    }

    /// Poisoned (all bits set: NaN for f32), so that a read before a write shows in the results.
    fn alloc_scratch<T: DeviceElem>(&self, n: usize) -> Result<EmuBuf<T>, DeviceError> {
        check_bound("alloc_scratch");
        let mut v = vec![T::default(); n.max(1)];
        // SAFETY: f32, u16 and u32 (the DeviceElem types) are valid for every bit pattern.
        unsafe { std::ptr::write_bytes(v.as_mut_ptr(), 0xFF, v.len()) };
        Ok(EmuBuf(UnsafeCell::new(v)))
    }

    fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<EmuBuf<T>, DeviceError> {
        check_bound("upload");
        Ok(EmuBuf(UnsafeCell::new(host.to_vec())))
    }

    fn download<T: DeviceElem>(&self, buf: &EmuBuf<T>) -> Result<Vec<T>, DeviceError> {
        check_bound("download");
        // SAFETY: no launch is running (they are synchronous here).
        Ok(unsafe { (*buf.0.get()).clone() })
    }

    fn len<T: DeviceElem>(&self, buf: &EmuBuf<T>) -> usize {
        buf.len()
    }

    fn addr<T: DeviceElem>(&self, buf: &EmuBuf<T>) -> u64 {
        buf.ptr() as u64
    }

    fn zero(&self, buf: &mut EmuBuf<f32>, range: Range<usize>) -> Result<(), DeviceError> {
        check_bound("zero");
        assert!(range.end <= buf.len(), "the ops check ranges");
        // SAFETY: no launch is running; the range lies in the buffer (asserted).
        unsafe { std::ptr::write_bytes(buf.ptr().add(range.start), 0, range.len()) };
        Ok(())
    }

    fn copy(&self, src: &EmuBuf<f32>, from: Range<usize>, dst: &mut EmuBuf<f32>, at: usize) -> Result<(), DeviceError> {
        check_bound("copy");
        assert!(from.end <= src.len() && at + from.len() <= dst.len(), "the ops check copies");
        // SAFETY: both ranges lie in their buffers (asserted); src and dst are distinct buffers.
        unsafe { std::ptr::copy(src.ptr().add(from.start), dst.ptr().add(at), from.len()) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        threads: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), DeviceError> {
        check_bound(name);
        // SAFETY: the caller guarantees the arguments.
        match unsafe { raw_launch(name, grid, threads, args.as_mut_ptr()) } {
            0 => Ok(()),
            rc => Err(DeviceError::Driver(format!("emulated {name}: {}", failure(rc)))),
        }
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), DeviceError> {
        check_bound("gemm");
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let batch = g.batch.unwrap_or(GemmBatch { count: 1, stride_a: 0, stride_b: 0, stride_c: 0 });
        for p in 0..batch.count as usize {
            let (a0, b0, c0) = (p * batch.stride_a as usize, p * batch.stride_b as usize, p * batch.stride_c as usize);
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0f32;
                    for q in 0..k {
                        let a = a0 + if g.trans_a { q + i * lda } else { i + q * lda };
                        let b = b0 + if g.trans_b { j + q * ldb } else { q + j * ldb };
                        // SAFETY: the caller guarantees the operands' sizes.
                        acc += unsafe { element(g.a, g.input, a) * element(g.b, g.input, b) };
                    }
                    // SAFETY: as above, for C. With beta 0 cuBLAS never reads C (it may hold NaN).
                    let c = unsafe { &mut *(g.c as *mut f32).add(c0 + i + j * ldc) };
                    *c = if g.accumulate { *c + acc } else { acc };
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn memory(&self) -> Result<(usize, usize), DeviceError> {
        Ok((0, 0))
    }
}
