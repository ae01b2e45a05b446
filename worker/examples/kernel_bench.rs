//! The two kernels batched decode spends its time in, beside the machine's ceilings measured in
//! the same run: the weight-streaming product `x [m, k] · wᵀ` at decode's shapes (GFLOP/s and
//! the fraction of the GEMM library's rate on a large square product), and cross-attention of
//! `seqs` queries over `context` cached positions each (GB/s of cache read and the fraction of
//! the measured read bandwidth). Each product is also timed with the weights in bf16: widened
//! to f32 as they are read, and in bf16 arithmetic where the CPU runs that for the rows
//! (`matmul_bf16::runs`; `-` elsewhere).
//!
//!   cargo run --release -p yoco-worker --example kernel_bench -- \
//!       [--preset tiny|small] [--rows 1,8,32|none] [--seqs 32] [--context 4096] [--repeat 20] \
//!       [--skew FLOATS]
//!
//! The product's operands start on a 64-byte boundary, or `--skew` floats past one (what the
//! allocator's 16-byte alignment gives: half the 32-byte loads then straddle cache lines).

use std::time::Instant;

use half::bf16;
use yoco_worker::ceilings::{gemm_gflops, read_gbps};
use yoco_worker::kernels::cross_attention::{cross_attention_partials, CrossShape, KvView};
use yoco_worker::kernels::kv_block::{Block, CacheDtype};
use yoco_worker::kernels::matmul::{matmul_t, matmul_t_library};
use yoco_worker::kernels::matmul_bf16;
use yoco_worker::presets::Preset;

struct Args {
    preset: String,
    rows: Vec<usize>,
    seqs: usize,
    context: usize,
    repeat: usize,
    /// Floats past a 64-byte boundary where the operands start.
    skew: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { preset: "tiny".into(), rows: vec![1, 8, 32], seqs: 32, context: 4096, repeat: 20, skew: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |s: String| s.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--preset" => a.preset = value()?,
            "--rows" => {
                let v = value()?;
                a.rows = if v == "none" {
                    Vec::new()
                } else {
                    v.split(',').map(|s| number(s.to_string())).collect::<Result<_, _>>()?
                }
            }
            "--seqs" => a.seqs = number(value()?)?,
            "--context" => a.context = number(value()?)?,
            "--repeat" => a.repeat = number(value()?)?.max(1),
            "--skew" => a.skew = number(value()?)? % 16,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// The best of `repeat` timings of `f`, in seconds.
fn best(repeat: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeat)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn filled(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * 1e-3).collect()
}

/// `len` elements of `buf` from its first 64-byte boundary plus `skew` floats.
fn aligned(buf: &[f32], len: usize, skew: usize) -> &[f32] {
    let start = (buf.as_ptr().align_offset(64) + skew) % 16;
    &buf[start..start + len]
}

fn main() -> Result<(), String> {
    let args = parse()?;
    let preset = Preset::parse(&args.preset).ok_or_else(|| format!("unknown preset {}", args.preset))?;
    let cfg = preset.config();
    let peak = gemm_gflops(2048);
    let bandwidth = read_gbps(1 << 30);
    println!("{} threads; f32 GEMM 2048³: {peak:.1} GFLOP/s; read: {bandwidth:.1} GB/s", rayon::current_num_threads());

    // Decode's products: (k, n) of the self-decoder's and cross-decoder's layers and the output.
    let (d, h, v) = (cfg.dim, cfg.hidden_dim, cfg.vocab_size);
    let shapes = [("dim → dim", d, d), ("dim → hidden", d, h), ("hidden → dim", h, d), ("dim → vocab", d, v)];
    if let Some(kernel) = matmul_bf16::kernel() {
        println!("bf16 products over 64 rows: {} (fewer: vdpbf16ps where the CPU has it)", kernel.name());
    }
    println!(
        "{:>14} {:>5} {:>6} {:>7} {:>10} {:>9} {:>8} {:>13} {:>11} {:>11}",
        "product", "rows", "k", "n", "ms", "GFLOP/s", "of peak", "gemm crate ms", "bf16 w ms", "bf16 ms"
    );
    for (name, k, nn) in shapes {
        let w_buf = filled(nn * k + 16, 4);
        let w = aligned(&w_buf, nn * k, args.skew);
        // The same weights in bf16 (as checkpoints store them), multiplied in f32 and, where
        // the CPU runs it for these rows, in bf16 (`matmul_bf16::runs`).
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for &m in &args.rows {
            let x_buf = filled(m * k + 16, 5);
            let x = aligned(&x_buf, m * k, args.skew);
            let mut out = vec![0f32; m * nn];
            let secs = best(args.repeat, || matmul_t(x, m, k, w, nn, &mut out));
            let gflops = 2.0 * (m * k * nn) as f64 / secs / 1e9;
            let library = best(args.repeat, || matmul_t_library(x, m, k, w, nn, &mut out));
            let widened = best(args.repeat, || matmul_t(x, m, k, &wb, nn, &mut out));
            let bf16_ms = if matmul_bf16::runs(m) {
                format!("{:.3}", 1e3 * best(args.repeat, || matmul_bf16::matmul_t_bf16(x, m, k, &wb, nn, &mut out)))
            } else {
                "-".into()
            };
            println!(
                "{name:>14} {m:>5} {k:>6} {nn:>7} {:>10.3} {gflops:>9.1} {:>7.0}% {:>13.3} {:>11.3} {bf16_ms:>11}",
                secs * 1e3,
                100.0 * gflops / peak,
                library * 1e3,
                widened * 1e3
            );
        }
    }

    // Cross-attention of one query per sequence over its whole cache (f32 blocks of 256).
    let shape =
        CrossShape { heads: cfg.n_attn_heads, kv_heads: cfg.n_attn_kv_heads, head_dim: cfg.dim / cfg.n_attn_heads };
    let kvd = shape.kv_dim();
    let (bt, ctx) = (256, args.context);
    // Each sequence's blocks of `[K rows; V rows]`, as the CPU backend keeps them.
    let seqs: Vec<Vec<Block>> = (0..args.seqs)
        .map(|s| {
            let (k, v) = (filled(ctx * kvd, 6 + s), filled(ctx * kvd, 7 + s));
            (0..ctx.div_ceil(bt))
                .map(|b| {
                    let mut block = Block::zeros(CacheDtype::F32, 2 * bt * kvd);
                    let rows = b * bt..((b + 1) * bt).min(ctx);
                    block.write(0, &k[rows.start * kvd..rows.end * kvd]);
                    block.write(bt * kvd, &v[rows.start * kvd..rows.end * kvd]);
                    block
                })
                .collect()
        })
        .collect();
    let views: Vec<KvView> = seqs
        .iter()
        .map(|blocks| KvView {
            blocks: blocks.iter().map(Block::as_ref).collect(),
            block_tokens: bt,
            kv_dim: kvd,
            len: ctx,
        })
        .collect();
    let refs: Vec<&KvView> = views.iter().collect();
    let q = filled(args.seqs * shape.q_dim(), 8);
    let visible = vec![ctx; args.seqs];
    let secs = best(args.repeat, || {
        std::hint::black_box(cross_attention_partials(&q, &visible, &refs, shape));
    });
    let bytes = args.seqs * ctx * 2 * kvd * 4;
    let gbps = bytes as f64 / secs / 1e9;
    println!(
        "cross-attention: {} queries × {ctx} positions ({} heads, {} KV heads, head dim {}): {:.3} ms, {gbps:.1} GB/s, {:.0}% of read",
        args.seqs,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        secs * 1e3,
        100.0 * gbps / bandwidth
    );
    Ok(())
}
