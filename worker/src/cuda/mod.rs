//! The CUDA backend's kernels: CUDA C sources, one family per file and named after the math as
//! the CPU kernels are, compiled at start-up by NVRTC into one module. The sources are plain
//! data, built into every binary, so that tests on machines without a GPU can compile them with
//! NVRTC and run them in the CPU emulator of `worker/tests/cuda_emulated.rs` against the CPU
//! kernels.

#[cfg(feature = "cuda")]
pub mod compile;
#[cfg(feature = "cuda")]
pub mod driver;
pub mod nccl_lib;
pub mod ops;
pub mod runtime;
pub mod staging;

/// The sources in the order they form the program: the prelude first (reductions, element
/// types), then the kernel families.
pub const SOURCES: &[(&str, &str)] = &[
    ("prelude.cuh", include_str!("kernels/prelude.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("embedding.cu", include_str!("kernels/embedding.cu")),
    ("rms_norm.cu", include_str!("kernels/rms_norm.cu")),
    ("rope.cu", include_str!("kernels/rope.cu")),
    ("swiglu.cu", include_str!("kernels/swiglu.cu")),
    ("retention.cu", include_str!("kernels/retention.cu")),
    ("window_attention.cu", include_str!("kernels/window_attention.cu")),
    ("cross_attention.cu", include_str!("kernels/cross_attention.cu")),
    ("sampling.cu", include_str!("kernels/sampling.cu")),
];

/// Every kernel entry point of the program, with the most threads a block of it is launched
/// with. `Gpu::launch` refuses a launch past that bound (so the emulated tests, which make every
/// launch the ops make, keep the table true), and `tests/cuda_nvrtc.rs` checks the bound against
/// the registers NVRTC's machine code uses: a block whose registers exceed the register file
/// fails to launch on a GPU, and only there.
pub const KERNELS: &[(&str, u32)] = &[
    ("add_assign", 256),
    ("narrow_bf16", 256),
    ("narrow_f16", 256),
    ("copy_u16", 256),
    ("embedding_f32", 128),
    ("embedding_bf16", 128),
    ("embedding_f16", 128),
    ("rms_norm", 256),
    ("rope_interleaved", 128),
    ("silu_mul", 256),
    ("log_sigmoid_scaled", 256),
    ("retention_recurrent", 64),
    ("retention_gather", 64),
    ("retention_scan", 256),
    ("retention_decay_terms", 256),
    ("retention_scatter", 256),
    ("retention_add_incoming", 64),
    ("window_attention", 128),
    ("kv_write_f32", 128),
    ("kv_write_bf16", 128),
    ("kv_write_f16", 128),
    ("cross_attention_partials_f32", 128),
    ("cross_attention_partials_bf16", 128),
    ("cross_attention_partials_f16", 128),
    ("lse_merge", 64),
    ("argmax_rows", 1024),
    ("log_softmax_rows", 512),
];

/// The most threads a block of kernel `name` is launched with (`None`: no such kernel).
pub fn max_threads(name: &str) -> Option<u32> {
    KERNELS.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}

/// Tokens per block of the chunkwise retention kernel (`RETENTION_BLOCK` in retention.cu): the
/// CPU kernel's block, so that both compute the same sums in the same order.
pub use crate::kernels::retention::RETENTION_BLOCK;
/// Threads per block of the chunkwise retention kernel, one per value column of a tile.
pub const RETENTION_COLS: usize = 64;
/// The largest head dimension the attention and retention kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// The most threads an attention block may have (its key tile).
pub const ATTN_TILE: usize = 256;

/// The whole program as NVRTC compiles it, each file introduced by a `#line` directive so that
/// a compile error names the file and line it is in.
pub fn program() -> String {
    let mut out = String::new();
    for (name, text) in SOURCES {
        out.push_str(&format!("#line 1 \"{name}\"\n"));
        out.push_str(text);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust side's copies of the sources' constants. (That every kernel in `KERNELS` is
    /// an entry point is checked on the compiled program: NVRTC's PTX and the emulator.)
    #[test]
    fn constants_match_the_sources() {
        let program = program();
        for (constant, value) in [
            ("RETENTION_BLOCK", RETENTION_BLOCK),
            ("RETENTION_COLS", RETENTION_COLS),
            ("ATTN_MAX_DIM", MAX_HEAD_DIM),
            ("ATTN_TILE", ATTN_TILE),
        ] {
            assert!(program.contains(&format!("#define {constant} {value}\n")), "{constant} differs from the sources");
        }
    }
}
