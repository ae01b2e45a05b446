//! The backend forward pass (`yoco_worker::backend::Forward`) on the CPU backend: against the
//! PyTorch reference's golden logits and greedy tokens, and against the engine on random models
//! of both mixers, for every cache type, in chunks. The CUDA backend runs this same code
//! (`scripts/gpu-check.sh`), so what is proved here of the model code holds there too.
//! Tolerance: logits within 1e-4 of the reference and 1e-5 of the engine, relative to
//! |logit| + rms(logits).

mod common;

use common::*;
use yoco_worker::backend::cpu::CpuBackend;
use yoco_worker::backend::{Forward, ForwardError, ForwardOptions};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::kernels::kv_block::CacheDtype;

fn opts(cache_dtype: CacheDtype, chunk_tokens: usize) -> ForwardOptions {
    ForwardOptions { cache_dtype, block_tokens: 16, cache_tokens: 4096, chunk_tokens, max_sequences: 2 }
}

#[test]
fn the_forward_pass_matches_the_reference_fixtures() {
    for name in ["gret", "swa", "gret_bf16_tied", "swa_f16"] {
        let model = load(name);
        let exp = expected(name);
        let vocab = model.cfg.vocab_size;
        for chunk in [64, 4096] {
            let mut fwd = Forward::new(CpuBackend, &model, opts(CacheDtype::F32, chunk)).unwrap();
            let mut seq = fwd.new_sequence().unwrap();
            let (tokens, logits) = fwd.generate_greedy(&mut seq, &exp.prompt, exp.greedy.len()).unwrap();
            let last_prompt_row = &exp.logits[exp.logits.len() - vocab..];
            let err = rel_err(&logits[0], last_prompt_row);
            assert!(err < 1e-4, "{name} chunk {chunk}: prompt logits rel err {err}");
            assert_eq!(tokens, exp.greedy, "{name} chunk {chunk}: greedy tokens");
            for (i, row) in logits.iter().enumerate() {
                let err = rel_err(row, &exp.greedy_logits[i * vocab..(i + 1) * vocab]);
                assert!(err < 1e-4, "{name} chunk {chunk}: decode step {i} rel err {err}");
            }
            assert_eq!(seq.len(), exp.prompt.len() + exp.greedy.len() - 1);
        }
    }
}

/// The engine's logits for the prompt's last token and then each of `extra`, one rank.
fn engine_logits(
    model: &std::sync::Arc<yoco_worker::model::Model>,
    dtype: CacheDtype,
    prompt: &[u32],
    extra: &[u32],
) -> Vec<Vec<f32>> {
    let mut e = Engine::new(
        model.clone(),
        &EngineOptions {
            block_tokens: 16,
            cache_budget_bytes: 64 << 20,
            cache_dtype: dtype,
            ..EngineOptions::default()
        },
    );
    e.add_sequence(1).unwrap();
    let mut out = vec![e.step(&[StepItem::prefill(1, prompt, Logits::Last)]).unwrap().remove(0).logits.into_vec()];
    for &t in extra {
        out.push(e.step(&[StepItem::decode(1, &[t])]).unwrap().remove(0).logits.into_vec());
    }
    out
}

#[test]
fn the_forward_pass_is_the_engine_for_both_mixers_and_every_cache_type() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tokens(150, 300, 3);
    let extra = tokens(5, 300, 4);
    for (mixer, tied) in [
        (SelfMixerKind::GatedRetention, false),
        (SelfMixerKind::GatedRetention, true),
        (SelfMixerKind::SlidingWindow { window: 8 }, false),
        (SelfMixerKind::SlidingWindow { window: 100 }, true),
    ] {
        let model = random_model(&small_config(mixer), 17, tied, &tmp.path().join(format!("{mixer:?}{tied}")));
        for (dtype, chunk) in CacheDtype::ALL.into_iter().flat_map(|d| [(d, 4096), (d, 64)]) {
            let want = engine_logits(&model, dtype, &prompt, &extra);
            let mut fwd = Forward::new(CpuBackend, &model, opts(dtype, chunk)).unwrap();
            let mut seq = fwd.new_sequence().unwrap();
            let mut got = vec![fwd.forward(&mut seq, &prompt).unwrap()];
            for &t in &extra {
                got.push(fwd.forward(&mut seq, &[t]).unwrap());
            }
            // In 64-token chunks the products run on other matrix kernels than the engine's one
            // 150-row step; an f32 K/V element that moves by an ulp can round to the next
            // bf16/f16 value, so half caches get 1e-4 there (measured: 3.3e-5).
            let bound = if chunk == 64 && dtype != CacheDtype::F32 { 1e-4 } else { 1e-5 };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = rel_err(g, w);
                assert!(err < bound, "{mixer:?} tied={tied} {dtype} chunk {chunk}: step {i} rel err {err:e}");
            }
        }
    }
}

#[test]
fn bad_input_is_an_error_that_leaves_the_sequence_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::GatedRetention), 5, false, tmp.path());
    let small = ForwardOptions { cache_tokens: 64, ..opts(CacheDtype::F32, 64) };
    let mut fwd = Forward::new(CpuBackend, &model, small.clone()).unwrap();
    let mut seq = fwd.new_sequence().unwrap();
    assert!(matches!(fwd.forward(&mut seq, &[]), Err(ForwardError::Empty)));
    assert!(matches!(fwd.forward(&mut seq, &[1, 300]), Err(ForwardError::TokenOutOfRange { token: 300, vocab: 300 })));
    assert!(matches!(fwd.forward(&mut seq, &tokens(65, 300, 1)), Err(ForwardError::CacheFull { needed: 5, free: 4 })));
    assert_eq!((seq.len(), fwd.free_blocks()), (0, 4), "a refused prompt takes nothing");
    // The same sequence then runs, and its blocks return to the pool when freed.
    let prompt = tokens(60, 300, 2);
    let logits = fwd.forward(&mut seq, &prompt).unwrap();
    assert_eq!(fwd.free_blocks(), 0);
    fwd.free(seq);
    assert_eq!(fwd.free_blocks(), 4);
    let mut again = fwd.new_sequence().unwrap();
    assert_eq!(
        fwd.forward(&mut again, &prompt).unwrap(),
        logits,
        "reused blocks and state slots hold nothing of the old sequence"
    );
    // Two slots (max_sequences): a third open sequence is refused until one is freed.
    let other = fwd.new_sequence().unwrap();
    assert!(matches!(fwd.new_sequence(), Err(ForwardError::NoFreeSlot(2))));
    fwd.free(other);
    assert!(fwd.new_sequence().is_ok());
    for chunk in [0, 50] {
        let err = Forward::new(CpuBackend, &model, ForwardOptions { chunk_tokens: chunk, ..small.clone() }).err();
        assert!(matches!(err, Some(ForwardError::Unsupported(_))), "chunk_tokens {chunk}");
    }
}

/// A request through `generate` on the forward runner (what `yoco generate --device cuda`
/// runs) gives what the engine's executor gives: the same tokens under seeded sampling with
/// penalties, their log-probabilities (and the prompt's) within 1e-5.
#[test]
fn the_forward_runner_generates_what_the_executor_generates() {
    use yoco_worker::backend::runner::ForwardRunner;
    use yoco_worker::executor::Executor;
    use yoco_worker::generate::{generate, GenerateParams};
    use yoco_worker::sampling::SamplingParams;
    let model = load("gret");
    let prompt = expected("gret").prompt;
    let sampling =
        SamplingParams { temperature: 0.8, top_k: 20, seed: 5, repetition_penalty: 1.1, ..SamplingParams::default() };
    let params =
        GenerateParams { max_tokens: 12, sampling, top_logprobs: 3, prefill_chunk: 64, ..GenerateParams::default() };
    let mut executor = Executor::new(engine(&model, 16));
    let want = generate(&mut executor, 1, &prompt, &params, &mut |_| {}).unwrap();
    let mut runner = ForwardRunner::new(Forward::new(CpuBackend, &model, opts(CacheDtype::F32, 64)).unwrap());
    let got = generate(&mut runner, 1, &prompt, &params, &mut |_| {}).unwrap();
    assert_eq!(got.tokens, want.tokens);
    assert!(rel_err(&got.logprobs, &want.logprobs) < 1e-5);
    assert_eq!(got.top_logprobs.iter().map(|t| t.len()).collect::<Vec<_>>(), vec![3; 12]);
    assert_eq!(runner.forward().free_blocks(), 4096 / 16, "the sequence's blocks came back");
    // Prompt log-probabilities: the cross-decoder over every prompt position.
    let with_lps = GenerateParams { prompt_logprobs: true, ..params.clone() };
    let want = generate(&mut Executor::new(engine(&model, 16)), 2, &prompt, &with_lps, &mut |_| {}).unwrap();
    let got = generate(&mut runner, 2, &prompt, &with_lps, &mut |_| {}).unwrap();
    assert_eq!(got.tokens, want.tokens);
    let (got_lps, want_lps) = (got.prompt_logprobs.unwrap(), want.prompt_logprobs.unwrap());
    assert_eq!(got_lps.len(), prompt.len());
    let (g, w): (Vec<f32>, Vec<f32>) = got_lps.iter().zip(&want_lps).filter_map(|(g, w)| Some(((*g)?, (*w)?))).unzip();
    assert_eq!(g.len(), prompt.len() - 1, "every prompt token but the first has one");
    assert!(rel_err(&g, &w) < 1e-5, "prompt log-probabilities: {}", rel_err(&g, &w));
}

fn serving_opts() -> ForwardOptions {
    ForwardOptions {
        cache_dtype: CacheDtype::F32,
        block_tokens: 16,
        cache_tokens: 4096,
        chunk_tokens: 64,
        max_sequences: 8,
    }
}

/// What a worker on a device backend serves: the coordinator's plans (batched decode, prefix
/// snapshots resumed, prompt log-probabilities, prompts over several steps, frees) give what the
/// CPU engine's executor gives, for both mixers. Tolerance 1e-4 on log-probabilities.
#[test]
fn the_forward_runner_serves_plans_as_the_executor_does() {
    use yoco_worker::backend::runner::ForwardRunner;
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 9, false, tmp.path());
        let mut runner = ForwardRunner::new(Forward::new(CpuBackend, &model, serving_opts()).unwrap());
        assert_plans_agree(&model, 16, &mut |plan| runner.execute(plan).unwrap(), 1e-4);
        assert_eq!(runner.snapshot_usage().0, 0, "the snapshot was dropped");
        runner.free(&[1, 3, 4]);
        assert_eq!(runner.forward().free_blocks(), 4096 / 16, "{mixer:?}: every block came back");
    }
}

/// A batch of decode tokens is one pass whose rows are what each sequence alone computes.
#[test]
fn batched_decode_is_each_sequence_alone() {
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 4, false, tmp.path());
        let vocab = model.cfg.vocab_size;
        let mut fwd = Forward::new(CpuBackend, &model, serving_opts()).unwrap();
        let prompts = [tokens(20, vocab, 1), tokens(37, vocab, 2), tokens(5, vocab, 3)];
        let mut seqs: Vec<_> = prompts.iter().map(|_| fwd.new_sequence().unwrap()).collect();
        let mut alone = Vec::new();
        for (s, p) in seqs.iter_mut().zip(&prompts) {
            fwd.forward(s, p).unwrap();
        }
        let next = [7, 8, 9];
        // The same prompts again, each decoded alone.
        for (p, &t) in prompts.iter().zip(&next) {
            let mut s = fwd.new_sequence().unwrap();
            fwd.forward(&mut s, p).unwrap();
            alone.push(fwd.forward(&mut s, &[t]).unwrap());
            fwd.free(s);
        }
        let mut batch: Vec<&mut _> = seqs.iter_mut().collect();
        let rows = fwd.decode(&mut batch, &next).unwrap();
        for (i, want) in alone.iter().enumerate() {
            assert_close(&rows[i * vocab..(i + 1) * vocab], want, 1e-5, &format!("{mixer:?} row {i}"));
        }
        // A refused batch (a token outside the vocabulary) moves no sequence.
        let mut batch: Vec<&mut _> = seqs.iter_mut().collect();
        assert!(matches!(fwd.decode(&mut batch, &[1, 300, 2]), Err(ForwardError::TokenOutOfRange { .. })));
        assert_eq!(seqs.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![21, 38, 6]);
    }
}

/// A plan that cannot run is refused before it changes anything, and the runner serves on.
#[test]
fn a_refused_plan_changes_nothing() {
    use yoco_worker::backend::runner::ForwardRunner;
    use yoco_worker::executor::{DecodeWork, Plan, PrefillWork, SeqSpec};
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::GatedRetention), 5, false, tmp.path());
    let small = ForwardOptions { cache_tokens: 64, ..serving_opts() };
    let mut runner = ForwardRunner::new(Forward::new(CpuBackend, &model, small).unwrap());
    let add = |seq| SeqSpec { seq, ..SeqSpec::default() };
    let fill = |seq, n, seed| PrefillWork { seq, tokens: tokens(n, 300, seed), sample: true, ..PrefillWork::default() };
    let first = Plan { add: vec![add(1)], prefill: vec![fill(1, 20, 1)], ..Plan::default() };
    let token = runner.execute(&first).unwrap()[0].sampled.as_ref().unwrap().token;
    let bad = [
        // Blocks: sequence 1 needs none more for a decode, sequence 2's 50 tokens need 4 of 2.
        Plan {
            add: vec![add(2)],
            prefill: vec![fill(2, 50, 2)],
            decode: vec![DecodeWork { seq: 1, token }],
            ..Plan::default()
        },
        Plan {
            add: vec![add(2)],
            prefill: vec![fill(2, 3, 2), PrefillWork { tokens: vec![1, 300], ..fill(1, 1, 0) }],
            ..Plan::default()
        },
        Plan { add: vec![add(1)], ..Plan::default() },
        Plan { add: vec![SeqSpec { resume_from: Some(9), ..add(2) }], ..Plan::default() },
        Plan { decode: vec![DecodeWork { seq: 1, token }, DecodeWork { seq: 1, token }], ..Plan::default() },
        Plan { decode: vec![DecodeWork { seq: 5, token }], ..Plan::default() },
    ];
    for plan in &bad {
        assert!(runner.execute(plan).is_err(), "{plan:?}");
        assert_eq!((runner.sequences(), runner.forward().free_blocks()), (1, 2), "{plan:?} changed something");
    }
    let next = Plan { decode: vec![DecodeWork { seq: 1, token }], ..Plan::default() };
    assert_eq!(runner.execute(&next).unwrap()[0].shard_tokens, 21);
}
