//! The CUDA kernels, run on the CPU in the emulator (`emulator/`: the program NVRTC compiles,
//! built with the host C++ compiler over a model of the CUDA execution model), each checked
//! against the CPU kernel it stands for. This proves the kernels' indexing,
//! tiling, online softmax and merges on every machine; what it cannot prove (the GPU's memory
//! model, its float intrinsics, warp timing) is for `scripts/gpu-check.sh` on a GPU.
//!
//! Tolerances: f32 results within 2e-6 relative of the CPU kernel (the two sum in different
//! orders), against the rms of the data for elements near zero; conversions bit-exact.

mod common;
mod emulator;

use std::ffi::c_void;

use common::{assert_close, randn};
use emulator::{launch, raw_launch};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use yoco_worker::kernels::cross_attention::{cross_attention_reference, CrossShape};
use yoco_worker::kernels::retention::{retention_chunkwise, retention_recurrent_step, RetentionShape};
use yoco_worker::kernels::rope::Rope;

/// `args![a, b, …]`: pointers to the argument values, for [`launch`].
macro_rules! args {
    ($($a:expr),* $(,)?) => { &mut [$(&$a as *const _ as *mut c_void),*] };
}

const F32_TOL: f32 = 2e-6;

#[test]
fn narrowing_to_bf16_and_f16_rounds_as_the_half_crate() {
    // Random bit patterns (every exponent, subnormals included), plus the edges of f16's range
    // and its rounding ties.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut x: Vec<f32> = (0..200_000).map(|_| f32::from_bits(rng.random::<u32>())).collect();
    x.extend([
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        2.0f32.powi(-24),
        2.0f32.powi(-25),
        2.0f32.powi(-25) * 1.5,
        2.0f32.powi(-14) * (1.0 - 2.0f32.powi(-11)),
        1.0 + 2.0f32.powi(-11),
        1.0 + 3.0 * 2.0f32.powi(-11),
    ]);
    let n = x.len() as u64;
    let (mut b, mut h) = (vec![0u16; x.len()], vec![0u16; x.len()]);
    let (xp, bp, hp) = (x.as_ptr(), b.as_mut_ptr(), h.as_mut_ptr());
    let blocks = (x.len() as u32).div_ceil(256).min(64);
    launch("narrow_bf16", (blocks, 1, 1), 256, args![xp, bp, n]);
    launch("narrow_f16", (blocks, 1, 1), 256, args![xp, hp, n]);
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            assert!(bf16::from_bits(b[i]).is_nan() && f16::from_bits(h[i]).is_nan(), "NaN {v:?} stays NaN");
            continue;
        }
        assert_eq!(b[i], bf16::from_f32(v).to_bits(), "bf16 of {v:e} ({:#x})", v.to_bits());
        assert_eq!(h[i], f16::from_f32(v).to_bits(), "f16 of {v:e} ({:#x})", v.to_bits());
    }
}

#[test]
fn embedding_widens_every_half_pattern_and_zeroes_ids_outside_the_part() {
    // Every bf16 and f16 bit pattern as one row of a one-id table: widening is exact.
    let ids = [0u32];
    let (idp, dim, scale, first, end) = (ids.as_ptr(), 65536i32, 1.0f32, 0u32, 1u32);
    for (kernel, widen) in [
        ("embedding_bf16", (|b| bf16::from_bits(b).to_f32()) as fn(u16) -> f32),
        ("embedding_f16", |b| f16::from_bits(b).to_f32()),
    ] {
        let table: Vec<u16> = (0..=u16::MAX).collect();
        let mut out = vec![0f32; 65536];
        let (tp, op) = (table.as_ptr(), out.as_mut_ptr());
        launch(kernel, (1, 1, 1), 256, args![idp, tp, op, dim, scale, first, end]);
        for (bits, &got) in table.iter().zip(&out) {
            let want = widen(*bits);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{kernel} of {bits:#x}");
        }
    }
    // A vocabulary part [10, 30) of a 40-id table, dim 70, scaled: the CPU kernel on the part.
    let dim = 70usize;
    let table = randn(20 * dim, 1);
    let ids = [12u32, 9, 29, 30, 10, 39, 0, 21];
    let mut out = vec![f32::NAN; ids.len() * dim];
    let (idp, tp, op, d, scale, first, end) =
        (ids.as_ptr(), table.as_ptr(), out.as_mut_ptr(), dim as i32, 16.0f32, 10u32, 30u32);
    launch("embedding_f32", (ids.len() as u32, 1, 1), 64, args![idp, tp, op, d, scale, first, end]);
    for (r, &id) in ids.iter().enumerate() {
        let want = if (10..30).contains(&id) {
            yoco_worker::kernels::embedding::embed(&[id - 10], &table, dim, 16.0)
        } else {
            vec![0.0; dim]
        };
        assert_eq!(&out[r * dim..(r + 1) * dim], &want[..], "row {r} (id {id})");
    }
}

#[test]
fn rms_norm_matches_the_cpu_kernel() {
    for (dim, threads) in [(256usize, 128u32), (77, 64), (3072, 256)] {
        let rows = 5;
        let x = randn(rows * dim, dim as u64);
        let w = randn(dim, 9);
        for weight in [Some(&w[..]), None] {
            let mut out = vec![0f32; x.len()];
            let wp = weight.map_or(std::ptr::null(), |w| w.as_ptr());
            let (xp, op, d, eps) = (x.as_ptr(), out.as_mut_ptr(), dim as i32, 1e-5f32);
            launch("rms_norm", (rows as u32, 1, 1), threads, args![xp, wp, op, d, eps]);
            let mut want = vec![0f32; x.len()];
            yoco_worker::kernels::rms_norm::rms_norm(&x, dim, weight, 1e-5, &mut want);
            assert_close(&out, &want, F32_TOL, &format!("rms_norm dim {dim}"));
        }
    }
}

#[test]
fn rope_matches_the_cpu_table() {
    let (heads, head_dim) = (3usize, 64usize);
    let rope = Rope::new(10000.0, head_dim);
    let inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| rope.angle(1, i)).collect();
    let positions: Vec<u32> = vec![0, 1, 2, 63, 4095, 131_071, 999_999, 1_048_575];
    let x = randn(positions.len() * heads * head_dim, 3);
    let mut got = x.clone();
    let (xp, pp, fp, h, d) = (got.as_mut_ptr(), positions.as_ptr(), inv_freq.as_ptr(), heads as i32, head_dim as i32);
    launch("rope_interleaved", (positions.len() as u32, 1, 1), 64, args![xp, pp, fp, h, d]);
    let mut want = x.clone();
    let table = rope.table(positions.iter().map(|&p| p as usize));
    yoco_worker::kernels::rope::apply_rope(&mut want, heads, head_dim, &table);
    assert_close(&got, &want, F32_TOL, "rope");
}

#[test]
fn swiglu_gate_and_retention_decay_match_the_cpu() {
    let n = 10_000usize;
    let a = randn(n, 4).iter().map(|v| v * 12.0).collect::<Vec<_>>();
    let b = randn(n, 5);
    let mut got = a.clone();
    let (ap, bp, nn) = (got.as_mut_ptr(), b.as_ptr(), n as u64);
    launch("silu_mul", (8, 1, 1), 128, args![ap, bp, nn]);
    let mut want = a.clone();
    yoco_worker::kernels::swiglu::silu_mul(&mut want, &b);
    assert_close(&got, &want, F32_TOL, "silu_mul");

    let mut gamma = vec![0f32; n];
    let (gp, outp, norm) = (a.as_ptr(), gamma.as_mut_ptr(), 16.0f32);
    launch("log_sigmoid_scaled", (8, 1, 1), 128, args![gp, outp, nn, norm]);
    let want: Vec<f32> = a.iter().map(|&g| yoco_worker::kernels::swiglu::log_sigmoid(g) / 16.0).collect();
    assert_close(&gamma, &want, F32_TOL, "log_sigmoid_scaled");
}

/// Per-head log-decays in the range the model produces (logsigmoid / 16 of a gate logit).
fn decays(n: usize, seed: u64) -> Vec<f32> {
    randn(n, seed).iter().map(|g| yoco_worker::kernels::swiglu::log_sigmoid(g * 6.0) / 16.0).collect()
}

/// The chunkwise op (its kernels emulated, its batched products on the host) against the CPU
/// kernel, from a carried state: partial last blocks, several heads, head dims that are not a
/// multiple of the block, and segments of one and two blocks, so that the state is carried
/// across segments as well as blocks. A slot past the first, so that its offset is used.
/// Tolerance 1e-5: the products sum 64 to 96 terms in another order than the CPU's.
#[test]
fn chunkwise_retention_matches_the_cpu_kernel_from_a_carried_state() {
    use yoco_worker::cuda::ops::Gpu;
    let gpu = Gpu::new(emulator::EmuRuntime);
    yoco_worker::cuda::runtime::Runtime::bind(gpu.runtime()).unwrap();
    for (tokens, heads, d) in [(150usize, 2usize, 64usize), (70, 1, 96), (5, 3, 32), (128, 2, 16)] {
        let w = heads * d;
        let (q, k, v) = (randn(tokens * w, 1), randn(tokens * w, 2), randn(tokens * w, 3));
        let gamma = decays(tokens * heads, 4);
        let state0 = randn(heads * d * d, 5);
        let shape = RetentionShape { tokens, heads, head_dim: d };
        let (mut want_state, mut want) = (state0.clone(), vec![0f32; tokens * w]);
        retention_chunkwise(&q, &k, &v, &gamma, shape, yoco_worker::cuda::RETENTION_BLOCK, &mut want_state, &mut want);

        for segment in [Some(64), Some(128), None] {
            let what = format!("T={tokens} H={heads} d={d} segment {segment:?}");
            let (dq, dk, dv, dg) = (
                gpu.upload(&q).unwrap(),
                gpu.upload(&k).unwrap(),
                gpu.upload(&v).unwrap(),
                gpu.upload(&gamma).unwrap(),
            );
            let mut states = gpu.upload(&[vec![7.0; heads * d * d], state0.clone()].concat()).unwrap();
            let mut out = gpu.upload(&vec![f32::NAN; tokens * w]).unwrap();
            gpu.retention_chunkwise(&dq, &dk, &dv, &dg, &mut states, 1, &mut out, tokens, heads, d, segment).unwrap();
            let states = gpu.download(&states).unwrap();
            assert!(states[..heads * d * d].iter().all(|&x| x == 7.0), "slot 0 changed ({what})");
            assert_close(&gpu.download(&out).unwrap(), &want, 1e-5, &format!("chunkwise retention output {what}"));
            assert_close(&states[heads * d * d..], &want_state, 1e-5, &format!("chunkwise retention state {what}"));
        }
    }
}

/// The workspace bound gives the 3b preset's heads segments of many blocks, and a model of one
/// huge head at least one block.
#[test]
fn chunkwise_retention_segments_fit_the_workspace() {
    use yoco_worker::cuda::ops::{retention_segment_blocks, RETENTION_WORKSPACE_BYTES};
    assert_eq!(retention_segment_blocks(24, 128), 45);
    assert_eq!(retention_segment_blocks(1 << 20, 256), 1);
    let per_block = 4 * 24 * (5 * 64 * 128 + 64 * 64 + 128 * 128 + 64 + 1);
    assert!(45 * per_block <= RETENTION_WORKSPACE_BYTES && 46 * per_block > RETENTION_WORKSPACE_BYTES);
}

#[test]
fn recurrent_retention_steps_a_batch_of_pooled_states() {
    let (heads, d, seqs) = (2usize, 64usize, 3usize);
    let w = heads * d;
    let (q, k, v) = (randn(seqs * w, 11), randn(seqs * w, 12), randn(seqs * w, 13));
    let gamma = decays(seqs * heads, 14);
    // Four slots; the sequences hold slots 2, 0 and 3; slot 1 must stay untouched.
    let slots: Vec<u32> = vec![2, 0, 3];
    let states0 = randn(4 * heads * d * d, 15);
    let mut states = states0.clone();
    let mut out = vec![f32::NAN; seqs * w];
    let (qp, kp, vp, gp, slp, sp, op) =
        (q.as_ptr(), k.as_ptr(), v.as_ptr(), gamma.as_ptr(), slots.as_ptr(), states.as_mut_ptr(), out.as_mut_ptr());
    let (h, hd) = (heads as i32, d as i32);
    launch("retention_recurrent", (heads as u32, seqs as u32, 1), 32, args![qp, kp, vp, gp, slp, sp, op, h, hd]);
    let slot_len = heads * d * d;
    for (s, &slot) in slots.iter().enumerate() {
        let slot = slot as usize;
        let mut want_state = states0[slot * slot_len..(slot + 1) * slot_len].to_vec();
        let mut want = vec![0f32; w];
        let rows = s * w..(s + 1) * w;
        retention_recurrent_step(
            &q[rows.clone()],
            &k[rows.clone()],
            &v[rows.clone()],
            &gamma[s * heads..(s + 1) * heads],
            heads,
            d,
            &mut want_state,
            &mut want,
        );
        assert_close(&out[rows], &want, F32_TOL, &format!("recurrent output of sequence {s}"));
        assert_close(&states[slot * slot_len..(slot + 1) * slot_len], &want_state, F32_TOL, "recurrent state");
    }
    assert_eq!(&states[slot_len..2 * slot_len], &states0[slot_len..2 * slot_len], "a free slot was written");
}

#[test]
fn window_attention_matches_the_cpu_kernel() {
    // Windows shorter than, equal to and longer than the rows; 32 threads make several key tiles.
    let (heads, d, prefix, tokens) = (2usize, 64usize, 37usize, 40usize);
    let w = heads * d;
    let q = randn(tokens * w, 21);
    let (keys, values) = (randn((prefix + tokens) * w, 22), randn((prefix + tokens) * w, 23));
    for (window, threads) in [(16usize, 32u32), (77, 64), (1000, 32), (1, 32)] {
        let mut want = vec![0f32; tokens * w];
        yoco_worker::kernels::window_attention::window_attention(
            &q, &keys, &values, prefix, window, heads, d, &mut want,
        );
        let mut out = vec![f32::NAN; tokens * w];
        let (qp, kp, vp, op) = (q.as_ptr(), keys.as_ptr(), values.as_ptr(), out.as_mut_ptr());
        let (p, win, h, hd) = (prefix as i32, window as i32, heads as i32, d as i32);
        launch("window_attention", (tokens as u32, heads as u32, 1), threads, args![qp, kp, vp, op, p, win, h, hd]);
        assert_close(&out, &want, 1e-5, &format!("window attention, window {window}"));
    }
}

/// A paged cache on the "device": a pool of blocks and each sequence's block table.
struct PagedCache {
    pool: Vec<u16>,
    pool_f32: Vec<f32>,
    tables: Vec<u32>,
    offsets: Vec<u32>,
    lens: Vec<u32>,
}

/// Writes each sequence's K and V rows into a pool of `blocks` blocks through `kv_write_<dtype>`,
/// sequence s taking the blocks its table lists.
fn write_cache(dtype: &str, seqs: &[(&[f32], &[f32], Vec<u32>)], blocks: usize, bt: usize, kvd: usize) -> PagedCache {
    let mut cache = PagedCache {
        pool: vec![0u16; blocks * 2 * bt * kvd],
        pool_f32: vec![0f32; blocks * 2 * bt * kvd],
        tables: Vec::new(),
        offsets: Vec::new(),
        lens: Vec::new(),
    };
    let kernel = format!("kv_write_{dtype}");
    for (keys, values, table) in seqs {
        let n = keys.len() / kvd;
        cache.offsets.push(cache.tables.len() as u32);
        cache.tables.extend(table);
        cache.lens.push(n as u32);
        if n == 0 {
            continue;
        }
        for (which, rows) in [(0i32, keys), (1, values)] {
            let pool: *mut c_void =
                if dtype == "f32" { cache.pool_f32.as_mut_ptr().cast() } else { cache.pool.as_mut_ptr().cast() };
            let (rp, tp, start, b, k) = (rows.as_ptr(), table.as_ptr(), 0i32, bt as i32, kvd as i32);
            launch(&kernel, (n as u32, 1, 1), 32, args![rp, pool, tp, start, b, k, which]);
        }
    }
    cache
}

/// The rows as the cache stores them: rounded to the cache's type.
fn rounded(x: &[f32], dtype: &str) -> Vec<f32> {
    match dtype {
        "bf16" => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        "f16" => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        _ => x.to_vec(),
    }
}

#[test]
fn cross_attention_partials_merge_to_the_reference_for_every_cache_type() {
    let shape = CrossShape { heads: 4, kv_heads: 2, head_dim: 64 };
    let (bt, kvd, qd) = (16usize, shape.kv_dim(), shape.q_dim());
    // Three sequences: 100 positions over scattered blocks, one position, and none.
    let lens = [100usize, 1, 0];
    let tables: Vec<Vec<u32>> = vec![vec![7, 2, 9, 0, 4, 11, 5], vec![3], vec![]];
    let kv: Vec<(Vec<f32>, Vec<f32>)> =
        lens.iter().enumerate().map(|(s, &n)| (randn(n * kvd, 30 + s as u64), randn(n * kvd, 40 + s as u64))).collect();
    let q = randn(lens.len() * qd, 50);
    for dtype in ["f32", "bf16", "f16"] {
        let seqs: Vec<(&[f32], &[f32], Vec<u32>)> =
            kv.iter().zip(&tables).map(|((k, v), t)| (&k[..], &v[..], t.clone())).collect();
        let cache = write_cache(dtype, &seqs, 12, bt, kvd);
        let split_tokens = 32usize;
        let splits = 100usize.div_ceil(split_tokens);
        let n_parts = lens.len() * shape.heads * splits;
        let (mut po, mut pm, mut pl) = (vec![f32::NAN; n_parts * 64], vec![f32::NAN; n_parts], vec![f32::NAN; n_parts]);
        let pool: *const c_void =
            if dtype == "f32" { cache.pool_f32.as_ptr().cast() } else { cache.pool.as_ptr().cast() };
        let (qp, tp, offp, lp) = (q.as_ptr(), cache.tables.as_ptr(), cache.offsets.as_ptr(), cache.lens.as_ptr());
        let (pop, pmp, plp) = (po.as_mut_ptr(), pm.as_mut_ptr(), pl.as_mut_ptr());
        let (h, kvh, hd, b, st) = (4i32, 2i32, 64i32, bt as i32, split_tokens as i32);
        launch(
            &format!("cross_attention_partials_{dtype}"),
            (shape.heads as u32, splits as u32, lens.len() as u32),
            64,
            args![qp, pool, tp, offp, lp, pop, pmp, plp, h, kvh, hd, b, st],
        );
        let mut out = vec![f32::NAN; lens.len() * qd];
        let (parts, finalize, op, null) = (splits as i32, 1i32, out.as_mut_ptr(), std::ptr::null_mut::<f32>());
        let (pop, pmp, plp) = (po.as_ptr(), pm.as_ptr(), pl.as_ptr());
        launch(
            "lse_merge",
            (shape.heads as u32, lens.len() as u32, 1),
            32,
            args![pop, pmp, plp, parts, hd, finalize, op, null, null],
        );
        for (s, (k, v)) in kv.iter().enumerate() {
            let got = &out[s * qd..(s + 1) * qd];
            if lens[s] == 0 {
                assert!(got.iter().all(|&x| x == 0.0), "{dtype}: an empty cache attends to zeros");
                continue;
            }
            let want =
                cross_attention_reference(&q[s * qd..(s + 1) * qd], &rounded(k, dtype), &rounded(v, dtype), shape);
            assert_close(got, &want, 1e-5, &format!("{dtype} cache, sequence {s}"));
        }
    }
}

#[test]
fn partials_of_two_shards_merge_like_one_cache() {
    // Context parallelism: rank 0 holds positions 0..48, rank 1 positions 48..90. Each rank's
    // partials are merged (finalize = 0) into one partial per head, then the two are merged.
    let shape = CrossShape { heads: 2, kv_heads: 1, head_dim: 32 };
    let (bt, kvd, qd) = (16usize, shape.kv_dim(), shape.q_dim());
    let (keys, values) = (randn(90 * kvd, 61), randn(90 * kvd, 62));
    let q = randn(qd, 63);
    let mut merged = (Vec::new(), Vec::new(), Vec::new());
    for (rank, range) in [(0usize, 0..48usize), (1, 48..90)] {
        let n_blocks = range.len().div_ceil(bt);
        let table: Vec<u32> = (0..n_blocks as u32).rev().collect();
        let seq = [(&keys[range.start * kvd..range.end * kvd], &values[range.start * kvd..range.end * kvd], table)];
        let cache = write_cache("f32", &seq, n_blocks, bt, kvd);
        let splits = 2usize;
        let n = shape.heads * splits;
        let (mut po, mut pm, mut pl) = (vec![0f32; n * 32], vec![0f32; n], vec![0f32; n]);
        let (qp, pool, tp, offp, lp) =
            (q.as_ptr(), cache.pool_f32.as_ptr(), cache.tables.as_ptr(), cache.offsets.as_ptr(), cache.lens.as_ptr());
        let (pop, pmp, plp) = (po.as_mut_ptr(), pm.as_mut_ptr(), pl.as_mut_ptr());
        let (h, kvh, hd, b, st) = (2i32, 1i32, 32i32, bt as i32, 32i32);
        launch(
            "cross_attention_partials_f32",
            (2, splits as u32, 1),
            32,
            args![qp, pool, tp, offp, lp, pop, pmp, plp, h, kvh, hd, b, st],
        );
        let (mut o, mut m, mut l) = (vec![0f32; qd], vec![0f32; 2], vec![0f32; 2]);
        let (pop, pmp, plp) = (po.as_ptr(), pm.as_ptr(), pl.as_ptr());
        let (parts, finalize, op, mp, lp2) = (splits as i32, 0i32, o.as_mut_ptr(), m.as_mut_ptr(), l.as_mut_ptr());
        launch("lse_merge", (2, 1, 1), 32, args![pop, pmp, plp, parts, hd, finalize, op, mp, lp2]);
        assert!(m.iter().all(|v| v.is_finite()) && l.iter().all(|&v| v > 0.0), "rank {rank} saw its keys");
        merged.0.push((rank, o));
        merged.1.push(m);
        merged.2.push(l);
    }
    // Lay the ranks' partials out [heads, ranks, …] and merge them.
    let (mut po, mut pm, mut pl) = (Vec::new(), Vec::new(), Vec::new());
    for h in 0..2 {
        for r in 0..2 {
            po.extend_from_slice(&merged.0[r].1[h * 32..(h + 1) * 32]);
            pm.push(merged.1[r][h]);
            pl.push(merged.2[r][h]);
        }
    }
    let mut out = vec![f32::NAN; qd];
    let (pop, pmp, plp, parts, hd, finalize, op, null) =
        (po.as_ptr(), pm.as_ptr(), pl.as_ptr(), 2i32, 32i32, 1i32, out.as_mut_ptr(), std::ptr::null_mut::<f32>());
    launch("lse_merge", (2, 1, 1), 32, args![pop, pmp, plp, parts, hd, finalize, op, null, null]);
    assert_close(&out, &cross_attention_reference(&q, &keys, &values, shape), 1e-5, "two shards merged");
}

#[test]
fn argmax_and_log_softmax_match_the_cpu() {
    let vocab = 100_288usize;
    let mut logits = randn(3 * vocab, 71).iter().map(|v| v * 20.0).collect::<Vec<_>>();
    // Row 1: a tie between two maxima, the lower index must win; row 2: the max at the end.
    logits[vocab + 70_000] = 50.0;
    logits[vocab + 90_000] = 50.0;
    logits[3 * vocab - 1] = 60.0;
    let mut ids = vec![u32::MAX; 3];
    let (lp, ip, v) = (logits.as_ptr(), ids.as_mut_ptr(), vocab as i32);
    launch("argmax_rows", (3, 1, 1), 256, args![lp, ip, v]);
    let want: Vec<u32> = logits.chunks(vocab).map(yoco_worker::sampling::argmax).collect();
    assert_eq!(ids, want);
    assert_eq!(ids[1], 70_000);

    let mut out = vec![f32::NAN; logits.len()];
    let op = out.as_mut_ptr();
    launch("log_softmax_rows", (3, 1, 1), 256, args![lp, op, v]);
    let want: Vec<f32> = logits.chunks(vocab).flat_map(yoco_worker::sampling::log_softmax).collect();
    assert_close(&out, &want, F32_TOL, "log_softmax");
}

/// A context-parallel rank's correction (`Backend::retention_add_incoming`): the CUDA op (its
/// decays made on the host, its kernel emulated) against the CPU kernel, with decays that
/// underflow to zero part-way (the kernel's early exit).
#[test]
fn incoming_retention_state_is_added_as_the_cpu_kernel_adds_it() {
    use yoco_worker::backend::cpu::CpuBackend;
    use yoco_worker::backend::Backend;
    use yoco_worker::cuda::ops::Gpu;
    let gpu = Gpu::new(emulator::EmuRuntime);
    yoco_worker::cuda::runtime::Runtime::bind(gpu.runtime()).unwrap();
    for (tokens, heads, d) in [(150usize, 2usize, 64usize), (7, 3, 96), (1, 1, 32)] {
        let w = heads * d;
        let q = randn(tokens * w, 31);
        let mut gamma = decays(tokens * heads, 32);
        if tokens > 100 {
            gamma[100 * heads] = -200.0; // head 0's decay underflows from token 100 on
        }
        let (s_in, out0) = (randn(heads * d * d, 33), randn(tokens * w, 34));
        let mut want = out0.clone();
        CpuBackend::default().retention_add_incoming(&q, &gamma, &s_in, &mut want, tokens, heads, d).unwrap();
        let (dq, mut dout) = (gpu.upload(&q).unwrap(), gpu.upload(&out0).unwrap());
        Backend::retention_add_incoming(&gpu, &dq, &gamma, &s_in, &mut dout, tokens, heads, d).unwrap();
        assert_close(&gpu.download(&dout).unwrap(), &want, F32_TOL, &format!("add_incoming T={tokens} d={d}"));
    }
}

#[test]
fn copy_u16_copies_bits() {
    let src: Vec<u16> = (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u16).collect();
    let mut dst = vec![0u16; 5000];
    let (sp, dp, n) = (src.as_ptr(), dst.as_mut_ptr(), 4999u64);
    launch("copy_u16", (3, 1, 1), 256, args![sp, dp, n]);
    assert_eq!(&dst[..4999], &src[..4999]);
    assert_eq!(dst[4999], 0, "past n");
}

#[test]
fn the_residual_add_adds() {
    let (a, b) = (randn(1000, 81), randn(1000, 82));
    let mut got = a.clone();
    let (ap, bp, n) = (got.as_mut_ptr(), b.as_ptr(), 1000u64);
    launch("add_assign", (2, 1, 1), 128, args![ap, bp, n]);
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(got, want);
}

#[test]
fn every_listed_kernel_is_in_the_emulator() {
    // An unknown name is refused, and every kernel of the program is registered (a kernel the
    // registry names but the program lacks fails to build above).
    for name in yoco_worker::cuda::KERNELS.iter().map(|&(name, _)| name).chain(["no_such_kernel"]) {
        // SAFETY: a grid of zero blocks runs nothing; the kernel's arguments are never read.
        let rc = unsafe { raw_launch(name, (0, 0, 0), 32, std::ptr::null_mut()) };
        assert_eq!(rc, if name == "no_such_kernel" { 1 } else { 0 }, "{name}");
    }
}

/// The emulator's race detector: a kernel that reads a neighbour's shared word and overwrites
/// its own in one phase computes its intended result when threads run in order, and another
/// here (threads run backwards in its second phase); with the barrier that removes the race it
/// computes the intended result in every order.
#[test]
fn the_emulator_exposes_a_race_within_a_phase() {
    for threads in [32u32, 96, 256] {
        let intended: Vec<f32> = (1..=threads).map(|t| t as f32).collect();
        let mut out = vec![0f32; threads as usize];
        let op = out.as_mut_ptr();
        launch("emu_fixture_fenced_shift", (1, 1, 1), threads, args![op]);
        assert_eq!(out, intended, "the fenced kernel, {threads} threads");
        launch("emu_fixture_racy_shift", (1, 1, 1), threads, args![op]);
        assert_ne!(out, intended, "the race went unseen, {threads} threads");
    }
}
