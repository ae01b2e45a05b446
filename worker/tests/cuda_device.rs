//! The CUDA backend on a real GPU: every op against the CPU kernel it stands for. Without a GPU
//! the op checks skip (unless YOCO_REQUIRE_GPU is set, as `scripts/gpu-check.sh` sets it), and
//! what is checked instead is that opening the backend is a clean error, never a panic.
//!
//! Tolerances: f32 ops within 1e-5 relative (against the data's rms near zero); products with
//! bf16 / f16 weights, whose activations the GPU rounds to the weights' type, within 2e-2 /
//! 3e-3 — about twice the rounding of one bf16 / f16 input.
#![cfg(feature = "cuda")]

mod common;

use common::{assert_close, randn, rel_err};
use half::{bf16, f16};
use yoco_worker::cuda::driver::{gpu_count, CudaBackend};
use yoco_worker::cuda::runtime::DeviceError;
use yoco_worker::kernels::cross_attention::{cross_attention_reference, CrossShape};
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::kernels::widen::WeightRef;

fn backend() -> Option<CudaBackend> {
    match CudaBackend::open(0) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(std::env::var_os("YOCO_REQUIRE_GPU").is_none(), "YOCO_REQUIRE_GPU is set but: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[test]
fn opening_a_missing_gpu_is_a_clean_error() {
    let missing = gpu_count();
    match CudaBackend::open(missing) {
        Err(DeviceError::NoDriver | DeviceError::NoCublas | DeviceError::Device { .. }) => {}
        Err(other) => panic!("unexpected error for GPU {missing}: {other}"),
        Ok(_) => panic!("GPU {missing} opened on a machine that reports {missing} GPUs"),
    }
}

#[test]
fn every_op_matches_the_cpu_kernel_on_the_gpu() -> Result<(), DeviceError> {
    let Some(gpu) = backend() else { return Ok(()) };
    let info = gpu.runtime().info();
    eprintln!(
        "GPU {}: {} (compute {}.{}, {} GiB)",
        info.ordinal,
        info.name,
        info.capability.0,
        info.capability.1,
        info.total_bytes >> 30
    );
    uploads(&gpu)?;
    matmul(&gpu)?;
    norms_and_elementwise(&gpu)?;
    retention(&gpu)?;
    attention(&gpu)?;
    sampling(&gpu)?;
    Ok(())
}

/// Uploads through the page-locked arenas: many small ones of every element type, through both
/// arenas several times over (each reused once its copies are done), one larger than an arena,
/// all read back as uploaded, with the host's copies changed right after each upload.
fn uploads(gpu: &CudaBackend) -> Result<(), DeviceError> {
    use yoco_worker::cuda::staging::ARENA_BYTES;
    let mut kept = Vec::new();
    let mut host = vec![0f32; 3000];
    for i in 0..3 * 2 * ARENA_BYTES / (3000 * 4) {
        host.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 7 + j) as f32);
        kept.push((i, gpu.upload(&host)?));
        host.fill(-1.0); // the upload owns its bytes once it returns
        let ids: Vec<u32> = (0..17).map(|j| (i * 31 + j) as u32).collect();
        assert_eq!(gpu.download(&gpu.upload(&ids)?)?, ids, "u32 upload {i}");
    }
    for (i, buf) in &kept {
        let want: Vec<f32> = (0..3000).map(|j| (i * 7 + j) as f32).collect();
        assert_eq!(gpu.download(buf)?, want, "f32 upload {i}");
    }
    let large: Vec<u16> = (0..ARENA_BYTES).map(|j| j as u16).collect();
    assert_eq!(gpu.download(&gpu.upload(&large)?)?, large, "an upload larger than an arena");
    eprintln!("uploads: {} staged through both arenas, one direct", kept.len() * 2);
    Ok(())
}

fn matmul(gpu: &CudaBackend) -> Result<(), DeviceError> {
    let (n, k) = (1000usize, 256usize);
    let w = randn(n * k, 1);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    for m in [1usize, 7, 300] {
        let x = randn(m * k, 2 + m as u64);
        let dx = gpu.upload(&x)?;
        let mut y = gpu.zeros::<f32>(m * n)?;
        let mut scratch = gpu.zeros::<u16>(m * k)?;
        for (what, view, tol) in [
            ("f32", WeightRef::F32(&w), 1e-5),
            ("bf16", WeightRef::Bf16(&wb), 2e-2),
            ("f16", WeightRef::F16(&wh), 3e-3),
        ] {
            let dw = gpu.upload_matrix(view, n, k)?;
            gpu.matmul(&dx, m, &dw, &mut y, &mut scratch)?;
            let want = yoco_worker::with_weights!(view, |w| yoco_worker::kernels::matmul::linear(&x, m, k, w, n));
            assert_close(&gpu.download(&y)?, &want, tol, &format!("matmul {what} m={m}"));
        }
    }
    Ok(())
}

fn norms_and_elementwise(gpu: &CudaBackend) -> Result<(), DeviceError> {
    let (rows, dim) = (9usize, 3072usize);
    let x = randn(rows * dim, 10);
    let w = randn(dim, 11);
    let (dx, dw) = (gpu.upload(&x)?, gpu.upload(&w)?);
    let mut out = gpu.zeros::<f32>(rows * dim)?;
    gpu.rms_norm(&dx, rows, dim, Some(&dw), 1e-5, &mut out)?;
    let mut want = vec![0f32; x.len()];
    yoco_worker::kernels::rms_norm::rms_norm(&x, dim, Some(&w), 1e-5, &mut want);
    assert_close(&gpu.download(&out)?, &want, 1e-5, "rms_norm");

    let (heads, head_dim) = (24usize, 128usize);
    let rope = yoco_worker::kernels::rope::Rope::new(10000.0, head_dim);
    let inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| rope.angle(1, i)).collect();
    let positions: Vec<u32> = vec![0, 1, 4095, 524_287, 999_999, 1_048_575];
    let q = randn(positions.len() * heads * head_dim, 12);
    let mut dq = gpu.upload(&q)?;
    gpu.rope(&mut dq, &gpu.upload(&positions)?, positions.len(), &gpu.upload(&inv_freq)?, heads, head_dim)?;
    let mut want = q.clone();
    let table = rope.table(positions.iter().map(|&p| p as usize));
    yoco_worker::kernels::rope::apply_rope(&mut want, heads, head_dim, &table);
    assert_close(&gpu.download(&dq)?, &want, 1e-5, "rope");

    let a: Vec<f32> = randn(100_000, 13).iter().map(|v| v * 12.0).collect();
    let b = randn(100_000, 14);
    let (mut da, db) = (gpu.upload(&a)?, gpu.upload(&b)?);
    let mut gamma = gpu.zeros::<f32>(a.len())?;
    gpu.log_sigmoid_scaled(&da, &mut gamma, a.len(), 16.0)?;
    let want: Vec<f32> = a.iter().map(|&g| yoco_worker::kernels::swiglu::log_sigmoid(g) / 16.0).collect();
    assert_close(&gpu.download(&gamma)?, &want, 1e-5, "log_sigmoid_scaled");
    gpu.silu_mul(&mut da, &db, a.len())?;
    let mut want = a.clone();
    yoco_worker::kernels::swiglu::silu_mul(&mut want, &b);
    assert_close(&gpu.download(&da)?, &want, 1e-5, "silu_mul");
    gpu.add_assign(&mut da, &db, a.len())?;
    let want: Vec<f32> = want.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_close(&gpu.download(&da)?, &want, 1e-6, "add_assign");

    let table = randn(500 * 64, 15);
    let dt = gpu.upload_matrix(WeightRef::F32(&table), 500, 64)?;
    let ids = vec![100u32, 99, 599, 600, 350];
    let mut out = gpu.zeros::<f32>(ids.len() * 64)?;
    gpu.embedding(&gpu.upload(&ids)?, ids.len(), &dt, 100..600, 8.0, &mut out)?;
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&id| {
            if (100..600).contains(&id) {
                yoco_worker::kernels::embedding::embed(&[id - 100], &table, 64, 8.0)
            } else {
                vec![0.0; 64]
            }
        })
        .collect();
    assert_close(&gpu.download(&out)?, &want, 0.0, "embedding");
    Ok(())
}

fn retention(gpu: &CudaBackend) -> Result<(), DeviceError> {
    use yoco_worker::kernels::retention::{retention_chunkwise, retention_recurrent_step, RetentionShape};
    let decays = |n, seed| -> Vec<f32> {
        randn(n, seed).iter().map(|g| yoco_worker::kernels::swiglu::log_sigmoid(g * 6.0) / 16.0).collect()
    };
    // The 3b preset's heads over 6000 tokens: three segments of the default workspace.
    for (tokens, heads, d) in [(1000usize, 4usize, 64usize), (333, 3, 128), (6000, 24, 128)] {
        let w = heads * d;
        let (q, k, v) = (randn(tokens * w, 20), randn(tokens * w, 21), randn(tokens * w, 22));
        let gamma = decays(tokens * heads, 23);
        let state0 = randn(heads * d * d, 24);
        let (mut want_state, mut want) = (state0.clone(), vec![0f32; tokens * w]);
        let shape = RetentionShape { tokens, heads, head_dim: d };
        retention_chunkwise(&q, &k, &v, &gamma, shape, yoco_worker::cuda::RETENTION_BLOCK, &mut want_state, &mut want);
        let (dq, dk, dv, dg) = (gpu.upload(&q)?, gpu.upload(&k)?, gpu.upload(&v)?, gpu.upload(&gamma)?);
        for segment in [None, Some(128)] {
            let what = format!("T={tokens} H={heads} d={d} segment {segment:?}");
            let (mut ds, mut dout) = (gpu.upload(&state0)?, gpu.zeros::<f32>(tokens * w)?);
            gpu.retention_chunkwise(&dq, &dk, &dv, &dg, &mut ds, 0, &mut dout, tokens, heads, d, segment)?;
            assert_close(&gpu.download(&dout)?, &want, 1e-4, &format!("retention_chunkwise {what}"));
            assert_close(&gpu.download(&ds)?, &want_state, 1e-4, &format!("retention state {what}"));
        }
        if tokens > 2000 {
            continue; // the long case is for the segments; the checks below ran on the others
        }

        // One recurrent step from the state the chunkwise pass left, in slot 1 of 2.
        let (q1, k1, v1) = (randn(w, 25), randn(w, 26), randn(w, 27));
        let g1 = decays(heads, 28);
        let mut states = vec![0f32; heads * d * d];
        states.extend_from_slice(&want_state);
        let mut dstates = gpu.upload(&states)?;
        let mut dout = gpu.zeros::<f32>(w)?;
        let (dq, dk, dv, dg) = (gpu.upload(&q1)?, gpu.upload(&k1)?, gpu.upload(&v1)?, gpu.upload(&g1)?);
        gpu.retention_recurrent(&dq, &dk, &dv, &dg, &[1], &mut dstates, &mut dout, heads, d)?;
        let mut want = vec![0f32; w];
        retention_recurrent_step(&q1, &k1, &v1, &g1, heads, d, &mut want_state, &mut want);
        assert_close(&gpu.download(&dout)?, &want, 1e-4, "retention_recurrent");

        // A context-parallel rank's correction by the state before its chunk.
        use yoco_worker::backend::Backend;
        let (s_in, out0) = (randn(heads * d * d, 29), randn(tokens * w, 30));
        let mut want = out0.clone();
        let cpu = yoco_worker::backend::cpu::CpuBackend::default();
        cpu.retention_add_incoming(&q, &gamma, &s_in, &mut want, tokens, heads, d)
            .map_err(|e| DeviceError::Driver(e.to_string()))?;
        let (dq, mut dout) = (gpu.upload(&q)?, gpu.upload(&out0)?);
        Backend::retention_add_incoming(gpu, &dq, &gamma, &s_in, &mut dout, tokens, heads, d)
            .map_err(|e| DeviceError::Driver(e.to_string()))?;
        assert_close(&gpu.download(&dout)?, &want, 1e-4, &format!("retention_add_incoming T={tokens} d={d}"));
    }
    // Throughput at the 3b preset's heads (24 × 128) over 16K tokens, after a warm-up: four
    // products of 4·64·d + 4·d² flops a token and head in all.
    let (tokens, heads, d) = (16384usize, 24usize, 128usize);
    let w = heads * d;
    let (dq, dk, dv) =
        (gpu.upload(&randn(tokens * w, 40))?, gpu.upload(&randn(tokens * w, 41))?, gpu.upload(&randn(tokens * w, 42))?);
    let dg = gpu.upload(&decays(tokens * heads, 43))?;
    let (mut ds, mut dout) = (gpu.zeros::<f32>(heads * d * d)?, gpu.zeros::<f32>(tokens * w)?);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        gpu.synchronize()?;
        let started = std::time::Instant::now();
        gpu.retention_chunkwise(&dq, &dk, &dv, &dg, &mut ds, 0, &mut dout, tokens, heads, d, None)?;
        gpu.synchronize()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    let flops = (4 * 64 * d + 4 * d * d) as f64 * (heads * tokens) as f64;
    eprintln!(
        "retention_chunkwise 3b heads, {tokens} tokens: {:.2} ms, {:.0} tokens/s, {:.1} TFLOP/s",
        best * 1e3,
        tokens as f64 / best,
        flops / best / 1e12
    );
    Ok(())
}

fn attention(gpu: &CudaBackend) -> Result<(), DeviceError> {
    let (heads, d, prefix, tokens, window) = (4usize, 128usize, 300usize, 700usize, 512usize);
    let w = heads * d;
    let q = randn(tokens * w, 30);
    let (keys, values) = (randn((prefix + tokens) * w, 31), randn((prefix + tokens) * w, 32));
    let mut dout = gpu.zeros::<f32>(tokens * w)?;
    gpu.window_attention(
        &gpu.upload(&q)?,
        &gpu.upload(&keys)?,
        &gpu.upload(&values)?,
        &mut dout,
        tokens,
        prefix,
        window,
        heads,
        d,
    )?;
    let mut want = vec![0f32; tokens * w];
    yoco_worker::kernels::window_attention::window_attention(&q, &keys, &values, prefix, window, heads, d, &mut want);
    assert_close(&gpu.download(&dout)?, &want, 1e-5, "window_attention");

    // Two sequences over one pool: 10,000 positions over scattered blocks, and 3 positions.
    let shape = CrossShape { heads: 24, kv_heads: 8, head_dim: 128 };
    let (bt, kvd) = (64usize, shape.kv_dim());
    let lens = [10_000usize, 3];
    let blocks_needed: Vec<usize> = lens.iter().map(|l| l.div_ceil(bt)).collect();
    let total: usize = blocks_needed.iter().sum();
    let mut order: Vec<u32> = (0..total as u32).collect();
    order.reverse();
    let tables = [order[..blocks_needed[0]].to_vec(), order[blocks_needed[0]..].to_vec()];
    let kv: Vec<(Vec<f32>, Vec<f32>)> =
        lens.iter().map(|&n| (randn(n * kvd, 40 + n as u64), randn(n * kvd, 50 + n as u64))).collect();
    let q = randn(lens.len() * shape.q_dim(), 60);
    for dtype in CacheDtype::ALL {
        let mut pool = gpu.kv_pool(dtype, total, bt, kvd)?;
        for ((keys, values), table) in kv.iter().zip(&tables) {
            let n = keys.len() / kvd;
            gpu.kv_write(&gpu.upload(keys)?, n, &mut pool, table, 0, false)?;
            gpu.kv_write(&gpu.upload(values)?, n, &mut pool, table, 0, true)?;
        }
        let mut dout = gpu.zeros::<f32>(lens.len() * shape.q_dim())?;
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
        let block_tables = gpu.block_tables(&pool, &table_refs, &lens)?;
        gpu.cross_attention(&gpu.upload(&q)?, &pool, &block_tables, shape, 4096, &mut dout)?;
        let got = gpu.download(&dout)?;
        let round = |x: &[f32]| -> Vec<f32> {
            match dtype {
                CacheDtype::F32 => x.to_vec(),
                CacheDtype::Bf16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                CacheDtype::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            }
        };
        for (s, (keys, values)) in kv.iter().enumerate() {
            let qd = shape.q_dim();
            let want = cross_attention_reference(&q[s * qd..(s + 1) * qd], &round(keys), &round(values), shape);
            assert_close(&got[s * qd..(s + 1) * qd], &want, 1e-5, &format!("cross_attention {dtype} sequence {s}"));
        }
    }
    Ok(())
}

fn sampling(gpu: &CudaBackend) -> Result<(), DeviceError> {
    let vocab = 100_288usize;
    let mut logits: Vec<f32> = randn(4 * vocab, 70).iter().map(|v| v * 20.0).collect();
    logits[vocab + 5] = 40.0;
    logits[vocab + 50_000] = 40.0;
    let dl = gpu.upload(&logits)?;
    let mut ids = gpu.zeros::<u32>(4)?;
    gpu.argmax_rows(&dl, 4, vocab, &mut ids)?;
    let want: Vec<u32> = logits.chunks(vocab).map(yoco_worker::sampling::argmax).collect();
    assert_eq!(gpu.download(&ids)?, want, "argmax_rows");
    let mut out = gpu.zeros::<f32>(logits.len())?;
    gpu.log_softmax_rows(&dl, 4, vocab, &mut out)?;
    let want: Vec<f32> = logits.chunks(vocab).flat_map(yoco_worker::sampling::log_softmax).collect();
    assert_close(&gpu.download(&out)?, &want, 1e-5, "log_softmax_rows");
    Ok(())
}

/// Greedy generation on an engine: the prompt's last logits, then `n − 1` decode steps.
fn greedy<B: yoco_worker::backend::Backend>(
    e: &mut yoco_worker::engine::Engine<B>,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    use yoco_worker::engine::{Logits, StepItem};
    e.add_sequence(1).unwrap();
    let mut logits = e.step(&[StepItem::prefill(1, prompt, Logits::Last)]).unwrap().remove(0).logits.into_vec();
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    for i in 0..n {
        let next = common::argmax(&logits);
        tokens.push(next);
        rows.push(logits);
        if i + 1 == n {
            break;
        }
        logits = e.step(&[StepItem::decode(1, &[next])]).unwrap().remove(0).logits.into_vec();
    }
    e.free_sequence(1);
    (tokens, rows)
}

/// Greedy tokens equal to the CPU's, up to a near-tie: where they first differ, the CPU's logits
/// (`want_rows[i]` chose `want[i]`) must put the two tokens within 1e-4 of each other relative
/// to the row's scale — a tie the GPU's rounding may break the other way, reported with its gap
/// (the continuations then differ, so nothing after it is compared). A larger gap fails.
///
/// Returns how many rows of logits are comparable: all, or those up to the near-tie.
fn same_greedy_tokens(got: &[u32], want: &[u32], want_rows: &[Vec<f32>], what: &str) -> usize {
    let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) else {
        assert_eq!(got.len(), want.len(), "{what}");
        return want_rows.len();
    };
    let row = &want_rows[i];
    let rms = (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / row.len() as f64).sqrt() as f32;
    let gap = row[want[i] as usize] - row[got[i] as usize];
    eprintln!(
        "{what}: first difference at token {i} ({} vs {}): CPU logit gap {gap:.3e} (row rms {rms:.3e})",
        got[i], want[i]
    );
    assert!(gap.abs() <= 1e-4 * (row[want[i] as usize].abs() + rms), "{what}: not a near-tie");
    i + 1
}

fn gpu_opts() -> yoco_worker::engine::EngineOptions {
    yoco_worker::engine::EngineOptions { block_tokens: 64, cache_budget_bytes: 256 << 20, ..Default::default() }
}

/// The engine on the GPU against the same engine on the CPU backend: the reference fixtures
/// and a random model of each mixer, prompt then greedy decode. With f32 weights the greedy
/// tokens are identical and the logits within 1e-4; with bf16/f16 weights the GPU's products
/// take activations rounded to the weights' type, so logits are compared within 5e-2 / 1e-2 and
/// the tokens reported.
#[test]
fn the_engine_on_the_gpu_is_the_cpu_one() {
    use std::path::PathBuf;
    use yoco_worker::comm::SingleRank;
    use yoco_worker::engine::Engine;
    use yoco_worker::model::Model;
    if backend().is_none() {
        return;
    }
    // At run time first: scripts/gpu-check.sh runs this binary in another checkout.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let fixtures = PathBuf::from(manifest).join("tests/fixtures");
    let tmp = tempfile::tempdir().unwrap();
    let load = |dir: &std::path::Path| std::sync::Arc::new(Model::load(dir).unwrap());
    let mut models: Vec<(String, std::sync::Arc<Model>, f32)> =
        ["gret", "swa"].iter().map(|n| (n.to_string(), load(&fixtures.join(n)), 1e-4)).collect();
    models.push(("gret_bf16_tied".into(), load(&fixtures.join("gret_bf16_tied")), 5e-2));
    models.push(("swa_f16".into(), load(&fixtures.join("swa_f16")), 1e-2));
    for (name, mixer) in [
        ("random retention", yoco_worker::config::SelfMixerKind::GatedRetention),
        ("random window", yoco_worker::config::SelfMixerKind::SlidingWindow { window: 100 }),
    ] {
        let mut cfg = yoco_worker::presets::Preset::Tiny.config();
        cfg.mixer = mixer;
        let dir = tmp.path().join(name.replace(' ', "_"));
        yoco_worker::presets::write_random_model(&cfg, yoco_worker::presets::StoreDtype::F32, 3, false, &dir).unwrap();
        models.push((name.into(), load(&dir), 1e-4));
    }
    for (name, model, tol) in models {
        let prompt: Vec<u32> = (0..1500u32).map(|i| (i * 7919 + 13) % model.cfg.vocab_size as u32).collect();
        let (want_tokens, want) = greedy(&mut Engine::new(model.clone(), &gpu_opts()), &prompt, 16);
        // A backend of its own per model (the kernels compile again: a second or two).
        let gpu = backend().expect("the GPU opened above");
        let mut dev = Engine::on_backend(gpu, &model, &gpu_opts(), Box::new(SingleRank)).unwrap();
        let (tokens, got) = greedy(&mut dev, &prompt, 16);
        let same = tokens.iter().zip(&want_tokens).take_while(|(a, b)| a == b).count();
        // With f32 weights the tokens must agree up to a near-tie; with half weights the first
        // difference only ends the comparison (the continuations differ after it).
        let rows = if tol <= 1e-4 {
            same_greedy_tokens(&tokens, &want_tokens, &want, &format!("{name}: greedy tokens in f32"))
        } else {
            (same + 1).min(want.len())
        };
        let worst = got[..rows].iter().zip(&want).map(|(g, w)| rel_err(g, w)).fold(0f32, f32::max);
        eprintln!("{name}: largest relative logit error {worst:.2e} over {rows} rows (bound {tol:.0e}); first {same} of 16 greedy tokens equal");
        assert!(worst <= tol, "{name}: GPU vs CPU logits rel err {worst}");
    }
}

/// Prefill, a snapshot, a resumed sequence, batched greedy decode of both: tokens and rows.
fn group_script<B: yoco_worker::backend::Backend>(
    e: &mut yoco_worker::engine::Engine<B>,
    prompt: &[u32],
) -> (Vec<u32>, Vec<Vec<f32>>) {
    use yoco_worker::engine::{Logits, StepItem};
    let last = |e: &mut yoco_worker::engine::Engine<B>, items: &[StepItem]| -> Vec<Vec<f32>> {
        e.step(items).unwrap().into_iter().map(|o| o.logits.into_vec()).collect()
    };
    e.add_sequence(1).unwrap();
    e.step(&[StepItem::prefill(1, &prompt[..1000], Logits::None)]).unwrap();
    e.snapshot(1, 9).unwrap();
    e.add_sequence_from(2, 9).unwrap();
    let mut rows = last(e, &[StepItem::prefill(1, &prompt[1000..], Logits::Last)]);
    rows.extend(last(e, &[StepItem::prefill(2, &prompt[1000..1100], Logits::Last)]));
    let mut tokens = Vec::new();
    for _ in 0..8 {
        let next = [common::argmax(&rows[rows.len() - 2]), common::argmax(&rows[rows.len() - 1])];
        tokens.extend(next);
        rows.extend(last(e, &[StepItem::decode(1, &next[..1]), StepItem::decode(2, &next[1..])]));
    }
    (tokens, rows)
}

/// Groups on the one GPU (threads, TCP between them, as worker processes sharing a GPU talk):
/// two context-parallel ranks (prompts cut across them, retention states and window halos
/// exchanged, the cache sharded, a snapshot's partial blocks copied on write, decode tokens
/// batched), and a tensor-parallel pair (`--tp 2`: half the heads, FFN columns and vocabulary
/// each, row all-reduces): the logits of one CPU rank within 1e-4, the greedy tokens equal, the
/// ranks' logits identical.
#[test]
fn groups_on_the_gpu_are_one_cpu_rank() {
    use yoco_worker::engine::Engine;
    use yoco_worker::model::{Model, TpShard};
    if backend().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (name, mixer) in [
        ("retention", yoco_worker::config::SelfMixerKind::GatedRetention),
        ("window", yoco_worker::config::SelfMixerKind::SlidingWindow { window: 100 }),
    ] {
        let mut cfg = yoco_worker::presets::Preset::Tiny.config();
        cfg.mixer = mixer;
        let dir = tmp.path().join(name);
        yoco_worker::presets::write_random_model(&cfg, yoco_worker::presets::StoreDtype::F32, 5, false, &dir).unwrap();
        let model = std::sync::Arc::new(Model::load(&dir).unwrap());
        let prompt: Vec<u32> = (0..1500u32).map(|i| (i * 7919 + 13) % model.cfg.vocab_size as u32).collect();
        let (want_tokens, want) = group_script(&mut Engine::new(model.clone(), &gpu_opts()), &prompt);
        let halves: Vec<_> = (0..2)
            .map(|rank| {
                let shard = TpShard { rank, size: 2 };
                std::sync::Arc::new(Model::load_sharded(&dir, yoco_worker::weights::WeightDtype::Auto, shard).unwrap())
            })
            .collect();
        for (grid, parts) in [("cp 2", std::slice::from_ref(&model)), ("tp 2", &halves[..])] {
            let ranks =
                common::run_group_on(parts, 2, &gpu_opts(), &|| backend().expect("the GPU opened above"), &|e| {
                    group_script(e, &prompt)
                });
            for (r, (tokens, rows)) in ranks.iter().enumerate() {
                let n = same_greedy_tokens(tokens, &want_tokens, &want, &format!("{name} {grid}: greedy tokens"));
                let worst = rows[..n].iter().zip(&want).map(|(g, w)| rel_err(g, w)).fold(0f32, f32::max);
                eprintln!(
                    "{name} {grid}: rank {r} of 2 on the GPU: largest relative logit error {worst:.2e} over {n} rows (bound 1e-4)"
                );
                assert!(worst <= 1e-4, "{name} {grid}: rank {r}: rel err {worst}");
                assert_eq!(rows, &ranks[0].1, "{name} {grid}: the ranks disagree");
            }
        }
    }
}

/// The GPU tests' token check (runs without a GPU): equal tokens pass, a difference at a
/// near-tie of the CPU's logits ends the comparison there, any other difference fails.
#[test]
fn greedy_tokens_may_differ_at_a_near_tie_only() {
    let rows = vec![vec![1.0, 0.5, 3.0], vec![2.0, 2.00001, 0.0], vec![0.0, 1.0, 0.0]];
    assert_eq!(same_greedy_tokens(&[2, 1, 1], &[2, 1, 1], &rows, "equal"), 3);
    assert_eq!(same_greedy_tokens(&[2, 0, 2], &[2, 1, 1], &rows, "a near-tie"), 2);
    let far = std::panic::catch_unwind(|| same_greedy_tokens(&[0, 1, 1], &[2, 1, 1], &rows, "a real difference"));
    assert!(far.is_err());
}
