//! Every kernel source compiles with NVRTC, for the GPUs we serve on (compute_90: H100/H200)
//! and for the oldest one we support (compute_80: A100), and each entry point is in the PTX;
//! and to CUBIN (machine code, what `CudaRuntime::open` loads) for sm_90, sm_80 and sm_86.
//! Runs without a GPU: only libnvrtc is needed. `scripts/test.sh` installs it and sets
//! YOCO_REQUIRE_NVRTC, so that in CI a missing library fails instead of skipping.
#![cfg(feature = "cuda")]

use yoco_worker::cuda::compile::{compile_cubin, compile_program, nvrtc_available};
use yoco_worker::cuda::KERNELS;

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("YOCO_REQUIRE_NVRTC").is_none(),
            "YOCO_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").ok()
        );
        eprintln!("skipped: libnvrtc is not on this machine (pip install nvidia-cuda-nvrtc)");
        return;
    }
    for arch in ["compute_90", "compute_80"] {
        let ptx = compile_program(arch).unwrap_or_else(|e| panic!("{e}")).to_src();
        for name in KERNELS {
            assert!(ptx.contains(&format!(".entry {name}(")), "{arch}: kernel {name} is not in the PTX");
        }
        let entries = ptx.matches(".entry ").count();
        assert_eq!(entries, KERNELS.len(), "{arch}: the PTX has entry points KERNELS does not list");
    }
    // What a GPU loads: machine code for its own architecture, an ELF image naming every kernel.
    for arch in ["sm_90", "sm_80", "sm_86"] {
        let cubin = compile_cubin(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: not an ELF image");
        for name in KERNELS {
            let symbol = format!("{name}\0");
            assert!(
                cubin.windows(symbol.len()).any(|w| w == symbol.as_bytes()),
                "{arch}: kernel {name} is not in the CUBIN"
            );
        }
    }
    assert!(compile_cubin("sm_1").is_err(), "an architecture NVRTC does not know is an error");
}
