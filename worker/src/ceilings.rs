//! The machine's measured ceilings, which benchmarks state their figures against: the f32 GEMM
//! rate of the engine's product on a large square matrix (and the bf16 one, where the CPU has
//! it), and the memory read bandwidth, all with every thread.

use std::time::Instant;

use rayon::prelude::*;

use crate::kernels::matmul::matmul_t;

/// The CPU's model name, the instruction sets the kernels dispatch on (as `/proc/cpuinfo` names
/// them, `yes`/`no`) and the kernel bf16 products run on, which every benchmark figure depends
/// on.
pub fn cpu_summary() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map_or(String::new(), |(_, v)| v.trim().to_string())
    };
    let flags = field("flags");
    let has: Vec<String> = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16"]
        .iter()
        .map(|f| format!("{f} {}", if flags.split_whitespace().any(|x| x == *f) { "yes" } else { "no" }))
        .collect();
    let model = field("model name");
    let bf16 = crate::kernels::matmul_bf16::kernel().map_or("none (f32)", |k| k.name());
    format!(
        "{}; {}; bf16 products: {bf16}",
        if model.is_empty() { std::env::consts::ARCH } else { &model },
        has.join(", ")
    )
}

/// The best of three parallel reads (sums) of `bytes` with every thread, in GB/s: the ceiling of
/// a memory-bound decode, which streams weights and cache and writes next to nothing.
pub fn read_gbps(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = src
            .par_chunks(chunk)
            .map(|c| {
                // Sixteen running sums, so the loop vectorises.
                let acc = c.chunks_exact(16).fold([0f32; 16], |mut acc, x| {
                    for (a, v) in acc.iter_mut().zip(x) {
                        *a += v;
                    }
                    acc
                });
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(total);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// The best of three `n³` f32 products through the engine's GEMM path, in GFLOP/s.
pub fn gemm_gflops(n: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.01).collect();
    let mut c = vec![0f32; n * n];
    (0..3)
        .map(|_| {
            let t = Instant::now();
            matmul_t(&a, n, n, &b, n, &mut c);
            2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// The best of three `n³` products through the bf16 GEMM (`kernels::matmul_bf16`), in GFLOP/s;
/// `None` where the CPU has neither AMX nor AVX512_BF16.
pub fn bf16_gemm_gflops(n: usize) -> Option<f64> {
    use crate::kernels::matmul_bf16::{available, matmul_t_bf16};
    if !available() {
        return None;
    }
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let b: Vec<half::bf16> = (0..n * n).map(|i| half::bf16::from_f32((i % 7) as f32 * 0.01)).collect();
    let mut c = vec![0f32; n * n];
    let best = (0..3)
        .map(|_| {
            let t = Instant::now();
            matmul_t_bf16(&a, n, n, &b, n, &mut c);
            2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max);
    Some(best)
}
