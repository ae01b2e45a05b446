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

/// Compiles the whole kernel program for a virtual architecture (`compute_90` for H100/H200,
/// or the device's own, `compute_XY`), with IEEE division and square root and no flush of
/// subnormals. Multiply-adds may fuse (more accurate than the CPU kernels' separate roundings,
/// and faster): GPU results differ from the CPU's by rounding, within the stated tolerances.
pub fn compile_program(arch: &'static str) -> Result<Ptx, CompileError> {
    if !nvrtc_available() {
        return Err(CompileError::NoNvrtc);
    }
    let opts = CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(true),
        use_fast_math: Some(false),
        arch: Some(arch),
        name: Some("yoco_kernels.cu".into()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(super::program(), opts)
        .map_err(|e| CompileError::Compile { arch: arch.to_string(), message: format!("{e:?}") })
}
