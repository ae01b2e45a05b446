//! NVRTC: the kernel program to PTX, at start-up or in a test. Needs only libnvrtc (the
//! `nvidia-cuda-nvrtc` wheel provides it on machines without a GPU), never a GPU.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// Whether libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: this only tries to open the shared library by name.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("libnvrtc cannot be loaded (install the nvidia-cuda-nvrtc wheel or the CUDA toolkit and put its lib folder on LD_LIBRARY_PATH)")]
    NoNvrtc,
    #[error("NVRTC could not compile the kernels for {arch}: {message}")]
    Compile { arch: String, message: String },
}

/// How the kernels are compiled, for PTX and CUBIN alike: IEEE division and square root, no
/// flush of subnormals. Multiply-adds may fuse (more accurate than the CPU kernels' separate
/// roundings, and faster): GPU results differ from the CPU's by rounding, within the stated
/// tolerances.
const FLAGS: [&str; 5] = ["--ftz=false", "--prec-sqrt=true", "--prec-div=true", "--fmad=true", "--std=c++17"];

/// Compiles the whole kernel program to PTX for a virtual architecture (`compute_90` for
/// H100/H200, or the device's own, `compute_XY`), which the driver compiles on loading.
pub fn compile_program(arch: &'static str) -> Result<Ptx, CompileError> {
    if !nvrtc_available() {
        return Err(CompileError::NoNvrtc);
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some("yoco_kernels.cu".into()),
        options: FLAGS.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    };
    compile_ptx_with_opts(super::program(), opts)
        .map_err(|e| CompileError::Compile { arch: arch.to_string(), message: format!("{e:?}") })
}

/// Compiles the whole kernel program to CUBIN, machine code for one architecture (`sm_90`):
/// what the GPU runs, loaded without the driver's PTX compiler. A PTX from an NVRTC newer than
/// the driver is refused by it ("unsupported PTX version"); a CUBIN is not.
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, CompileError> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_available() {
        return Err(CompileError::NoNvrtc);
    }
    let failed = |message: String| CompileError::Compile { arch: arch.to_string(), message };
    let src = std::ffi::CString::new(super::program()).map_err(|e| failed(e.to_string()))?;
    let name = std::ffi::CString::new("yoco_kernels.cu").expect("no NUL in the name");
    let prog = result::create_program(&src, Some(&name)).map_err(|e| failed(format!("{e:?}")))?;
    /// Destroys the program however this function returns.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let prog = Program(prog);
    let mut options = vec![format!("--gpu-architecture={arch}")];
    options.extend(FLAGS.iter().map(|f| f.to_string()));
    // SAFETY: `prog` is a live program; the options are valid C strings.
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
            .unwrap_or_default();
        return Err(failed(format!("{e:?}: {}", log.trim_end_matches('\0'))));
    }
    let mut size = 0usize;
    // SAFETY: `prog` compiled; `size` receives the CUBIN's length.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| failed(format!("{e:?}")))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds the `size` bytes NVRTC writes.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }.result().map_err(|e| failed(format!("{e:?}")))?;
    Ok(cubin)
}
