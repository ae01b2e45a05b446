//! Every kernel source compiles with NVRTC, for the GPUs we serve on (compute_90: H100/H200)
//! and for the oldest one we support (compute_80: A100), and each entry point is in the PTX.
//! Runs without a GPU: only libnvrtc is needed. `scripts/test.sh` installs it and sets
//! YOCO_REQUIRE_NVRTC, so that in CI a missing library fails instead of skipping.
#![cfg(feature = "cuda")]

use yoco_worker::cuda::compile::{compile_program, nvrtc_available};
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
}
