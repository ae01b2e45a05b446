//! The CUDA backend's forward pass, in CI: `Forward` over `Gpu<EmuRuntime>` runs every CUDA
//! kernel through the same ops, launch configurations and buffer handling as on a GPU (only the
//! runtime underneath differs: `emulator/`), and must give the PyTorch reference's greedy tokens
//! and logits and what the CPU backend gives.
//! Tolerances: f32 weights within 1e-4 of the reference and 1e-5 of the CPU backend; bf16/f16
//! weights (whose GEMM inputs the GPU path rounds to the weights' type, as cuBLAS takes them)
//! within 5e-2 / 1e-2 — about twice one rounding of the activations.

mod common;
mod emulator;

use common::*;
use emulator::EmuRuntime;
use yoco_worker::backend::cpu::CpuBackend;
use yoco_worker::backend::{Forward, ForwardOptions};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::cuda::ops::Gpu;
use yoco_worker::kernels::kv_block::CacheDtype;

fn gpu() -> Gpu<EmuRuntime> {
    Gpu::new(EmuRuntime)
}

fn opts(cache_dtype: CacheDtype) -> ForwardOptions {
    ForwardOptions { cache_dtype, block_tokens: 16, cache_tokens: 1024, chunk_tokens: 64, max_sequences: 2 }
}

#[test]
fn the_emulated_gpu_forward_pass_matches_the_reference_fixtures() {
    for (name, tol) in [("gret", 1e-4), ("swa", 1e-4), ("gret_bf16_tied", 5e-2), ("swa_f16", 1e-2)] {
        let model = load(name);
        let exp = expected(name);
        let vocab = model.cfg.vocab_size;
        let steps = exp.greedy.len();
        let mut fwd = Forward::new(gpu(), &model, opts(CacheDtype::F32)).unwrap();
        let mut seq = fwd.new_sequence().unwrap();
        let (tokens, logits) = fwd.generate_greedy(&mut seq, &exp.prompt, steps).unwrap();
        let mut cpu = Forward::new(CpuBackend, &model, opts(CacheDtype::F32)).unwrap();
        let mut cpu_seq = cpu.new_sequence().unwrap();
        let (cpu_tokens, cpu_logits) = cpu.generate_greedy(&mut cpu_seq, &exp.prompt, steps).unwrap();
        let err = rel_err(&logits[0], &exp.logits[exp.logits.len() - vocab..]);
        let mut worst_cpu = rel_err(&logits[0], &cpu_logits[0]);
        eprintln!("{name}: prompt logits vs reference {err:.2e}");
        assert!(err < tol, "{name}: prompt logits rel err {err}");
        for i in 1..steps {
            let err = rel_err(&logits[i], &exp.greedy_logits[i * vocab..(i + 1) * vocab]);
            assert!(err < tol, "{name}: decode step {i} rel err {err}");
            worst_cpu = worst_cpu.max(rel_err(&logits[i], &cpu_logits[i]));
        }
        eprintln!("{name}: largest relative error against the CPU backend {worst_cpu:.2e}");
        if tol <= 1e-4 {
            assert!(worst_cpu < 1e-5, "{name}: emulated GPU vs CPU backend {worst_cpu}");
            assert_eq!(tokens, exp.greedy, "{name}: greedy tokens");
            assert_eq!(tokens, cpu_tokens);
        }
    }
}

#[test]
fn the_emulated_gpu_forward_pass_is_the_cpu_one_for_both_mixers_and_half_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = small_config(SelfMixerKind::GatedRetention);
    cfg.dim = 64;
    cfg.n_layers = 4;
    let prompt = tokens(70, cfg.vocab_size, 9);
    let extra = tokens(3, cfg.vocab_size, 10);
    for (mixer, dtype) in [
        (SelfMixerKind::GatedRetention, CacheDtype::F32),
        (SelfMixerKind::GatedRetention, CacheDtype::Bf16),
        (SelfMixerKind::SlidingWindow { window: 8 }, CacheDtype::F16),
    ] {
        cfg.mixer = mixer;
        let model = random_model(&cfg, 4, false, &tmp.path().join(format!("{mixer:?}")));
        let run = |fwd_logits: &mut dyn FnMut(&[u32]) -> Vec<f32>| {
            let mut out = vec![fwd_logits(&prompt)];
            for &t in &extra {
                out.push(fwd_logits(&[t]));
            }
            out
        };
        let mut dev = Forward::new(gpu(), &model, opts(dtype)).unwrap();
        let mut seq = dev.new_sequence().unwrap();
        let got = run(&mut |t| dev.forward(&mut seq, t).unwrap());
        let mut cpu = Forward::new(CpuBackend, &model, opts(dtype)).unwrap();
        let mut cpu_seq = cpu.new_sequence().unwrap();
        let want = run(&mut |t| cpu.forward(&mut cpu_seq, t).unwrap());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = rel_err(g, w);
            // A half cache rounds K/V written from slightly different f32 values (another
            // summation order): an element may land on the neighbouring bf16/f16 value.
            let bound = if dtype == CacheDtype::F32 { 1e-5 } else { 1e-4 };
            assert!(err < bound, "{mixer:?} {dtype}: step {i} rel err {err:e}");
        }
    }
}

/// `generate` on the forward runner over the emulated GPU: the tokens the CPU engine's executor
/// samples (temperature, top-k, repetition penalty, seeded).
#[test]
fn the_emulated_gpu_runner_samples_what_the_engine_samples() {
    use yoco_worker::backend::runner::ForwardRunner;
    use yoco_worker::executor::Executor;
    use yoco_worker::generate::{generate, GenerateParams};
    use yoco_worker::sampling::SamplingParams;
    let model = load("swa");
    let prompt = expected("swa").prompt;
    let sampling =
        SamplingParams { temperature: 0.7, top_k: 10, seed: 11, repetition_penalty: 1.2, ..SamplingParams::default() };
    let params = GenerateParams { max_tokens: 8, sampling, prefill_chunk: 64, ..GenerateParams::default() };
    let want = generate(&mut Executor::new(engine(&model, 16)), 1, &prompt, &params, &mut |_| {}).unwrap();
    let mut runner = ForwardRunner::new(Forward::new(gpu(), &model, opts(CacheDtype::F32)).unwrap());
    let got = generate(&mut runner, 1, &prompt, &params, &mut |_| {}).unwrap();
    assert_eq!(got.tokens, want.tokens);
    assert!(rel_err(&got.logprobs, &want.logprobs) < 1e-4);
}

/// What a worker serves on the CUDA backend: the coordinator's plans (batched decode, prefix
/// snapshots resumed, prompt log-probabilities, prompts over several steps, frees) through the
/// CUDA kernels give what the CPU engine's executor gives, for both mixers (log-probabilities
/// within 1e-4).
#[test]
fn the_emulated_gpu_runner_serves_plans_as_the_engine_does() {
    use yoco_worker::backend::runner::ForwardRunner;
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 9, false, tmp.path());
        let opts = ForwardOptions { max_sequences: 8, ..opts(CacheDtype::F32) };
        let mut runner = ForwardRunner::new(Forward::new(gpu(), &model, opts).unwrap());
        assert_plans_agree(&model, 16, &mut |plan| runner.execute(plan).unwrap(), 1e-4);
        runner.free(&[1, 3, 4]);
        assert_eq!(runner.forward().free_blocks(), 1024 / 16, "{mixer:?}: every block came back");
    }
}

/// Context parallelism through the CUDA kernels: two ranks (threads over TCP), each running its
/// chunks on its own emulated GPU and keeping its shard, give what one CPU-backend rank gives:
/// prefill in steps (every position's logits), a snapshot where the shards end inside blocks
/// (copy-on-write through `copy_u16`), a resumed sequence and batched decode; f32 and bf16
/// caches. Tolerance 1e-4 (partials merged across ranks in another order), the ranks equal.
#[test]
fn the_emulated_gpu_forward_pass_in_a_group_of_two_is_one_cpu_rank() {
    for (mixer, dtype) in [
        (SelfMixerKind::GatedRetention, CacheDtype::F32),
        (SelfMixerKind::SlidingWindow { window: 8 }, CacheDtype::Bf16),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 6, false, tmp.path());
        let vocab = model.cfg.vocab_size;
        let (shared, rest_a, rest_b) = (tokens(40, vocab, 1), tokens(23, vocab, 2), tokens(5, vocab, 3));
        let o = ForwardOptions { max_sequences: 4, ..opts(dtype) };
        fn script<B: yoco_worker::backend::Backend>(
            fwd: &mut Forward<B>,
            (shared, rest_a, rest_b): (&[u32], &[u32], &[u32]),
            vocab: usize,
        ) -> Vec<Vec<f32>> {
            use yoco_worker::engine::Logits;
            let mut a = fwd.new_sequence().unwrap();
            let mut rows: Vec<Vec<f32>> = Vec::new();
            for part in shared.chunks(17) {
                rows.extend(fwd.prefill(&mut a, part, None, Logits::All).unwrap().chunks(vocab).map(<[f32]>::to_vec));
            }
            let snap = fwd.snapshot(&a).unwrap();
            rows.push(fwd.prefill(&mut a, rest_a, None, Logits::Last).unwrap());
            let mut b = fwd.new_sequence_from(&snap).unwrap();
            rows.push(fwd.prefill(&mut b, rest_b, None, Logits::Last).unwrap());
            for _ in 0..3 {
                let (ta, tb) = (argmax(&rows[rows.len() - 2]), argmax(&rows[rows.len() - 1]));
                let out = fwd.decode(&mut [&mut a, &mut b], &[ta, tb]).unwrap();
                rows.extend(out.chunks(vocab).map(<[f32]>::to_vec));
            }
            rows
        }
        let prompts = (&shared[..], &rest_a[..], &rest_b[..]);
        let want = script(&mut Forward::new(CpuBackend, &model, o.clone()).unwrap(), prompts, vocab);
        let ranks = run_forward_group(&model, 2, &o, &gpu, &|fwd| script(fwd, prompts, vocab));
        for (r, got) in ranks.iter().enumerate() {
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = rel_err(g, w);
                assert!(err < 1e-4, "{mixer:?} {dtype}: rank {r} row {i} rel err {err:e}");
                assert_eq!(g, &ranks[0][i], "{mixer:?}: ranks disagree at row {i}");
            }
        }
    }
}
