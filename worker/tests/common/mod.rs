//! Helpers shared by the worker's integration tests: fixture loading and closeness checks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use yoco_worker::engine::{Engine, EngineError, EngineOptions};
use yoco_worker::model::Model;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub struct Expected {
    pub prompt: Vec<u32>,
    pub logits: Vec<f32>,
    pub greedy: Vec<u32>,
    pub greedy_logits: Vec<f32>,
}

pub fn read_tensor_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

pub fn read_tensor_i64(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

pub fn expected(name: &str) -> Expected {
    let bytes = std::fs::read(fixtures().join(format!("{name}.expected.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = |n| read_tensor_i64(&st, n).into_iter().map(|v| v as u32).collect();
    Expected {
        prompt: ids("prompt"),
        logits: read_tensor_f32(&st, "logits"),
        greedy: ids("greedy"),
        greedy_logits: read_tensor_f32(&st, "greedy_logits"),
    }
}

pub fn load(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
}

/// Runs `script` on a group of `world` ranks (threads talking over real TCP sockets on loopback,
/// cache blocks of 16 tokens) and returns each rank's result, in rank order.
pub fn run_group<T: Send>(model: &Arc<Model>, world: usize, script: &(dyn Fn(&mut Engine) -> T + Sync)) -> Vec<T> {
    let eo = EngineOptions { block_tokens: 16, cache_budget_bytes: 64 << 20, ..EngineOptions::default() };
    run_group_with(model, world, &eo, script)
}

/// [`run_group`] with these engine options on every rank.
pub fn run_group_with<T: Send>(
    model: &Arc<Model>,
    world: usize,
    eo: &EngineOptions,
    script: &(dyn Fn(&mut Engine) -> T + Sync),
) -> Vec<T> {
    run_group_parts(std::slice::from_ref(model), world, eo, script)
}

/// [`run_group_with`] on a tensor-parallel grid: rank r holds `parts[r % parts.len()]`.
pub fn run_group_parts<T: Send>(
    parts: &[Arc<Model>],
    world: usize,
    eo: &EngineOptions,
    script: &(dyn Fn(&mut Engine) -> T + Sync),
) -> Vec<T> {
    try_run_group_parts(parts, world, eo, script).into_iter().map(|r| r.unwrap()).collect()
}

/// [`run_group_parts`], with each rank's failure to form its engine.
pub fn try_run_group_parts<T: Send>(
    parts: &[Arc<Model>],
    world: usize,
    eo: &EngineOptions,
    script: &(dyn Fn(&mut Engine) -> T + Sync),
) -> Vec<Result<T, EngineError>> {
    try_run_group_on(parts, world, eo, &|| yoco_worker::backend::cpu::CpuBackend::default(), script)
}

/// [`try_run_group_parts`] on the backends `backend()` makes, one per rank.
pub fn try_run_group_on<B: yoco_worker::backend::Backend, T: Send>(
    parts: &[Arc<Model>],
    world: usize,
    eo: &EngineOptions,
    backend: &(dyn Fn() -> B + Sync),
    script: &(dyn Fn(&mut Engine<B>) -> T + Sync),
) -> Vec<Result<T, EngineError>> {
    tcp_group(world, &|rank, comm| {
        let mut engine = Engine::on_backend(backend(), &parts[rank % parts.len()], eo, comm)?;
        Ok(script(&mut engine))
    })
}

/// [`run_group_parts`] on the backends `backend()` makes, one per rank.
pub fn run_group_on<B: yoco_worker::backend::Backend, T: Send>(
    parts: &[Arc<Model>],
    world: usize,
    eo: &EngineOptions,
    backend: &(dyn Fn() -> B + Sync),
    script: &(dyn Fn(&mut Engine<B>) -> T + Sync),
) -> Vec<T> {
    try_run_group_on(parts, world, eo, backend, script).into_iter().map(|r| r.unwrap()).collect()
}

/// Runs `rank_main(rank, collective)` for each rank of a group of `world` (threads talking over
/// real TCP sockets on loopback, 30 s collective timeout) and returns the results in rank order.
pub fn tcp_group<T: Send>(
    world: usize,
    rank_main: &(dyn Fn(usize, Box<dyn yoco_worker::comm::Collective>) -> T + Sync),
) -> Vec<T> {
    use std::net::{SocketAddr, TcpListener};
    use yoco_worker::comm::{TcpCollective, TcpOptions};
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let opts = TcpOptions {
        timeout: std::time::Duration::from_secs(30),
        connect_timeout: std::time::Duration::from_secs(10),
        ..TcpOptions::default()
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, opts) = (&addrs, &opts);
                s.spawn(move || rank_main(rank, Box::new(TcpCollective::connect(rank, addrs, l, opts).unwrap())))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

pub fn engine(model: &Arc<Model>, block_tokens: usize) -> Engine {
    Engine::new(
        model.clone(),
        &EngineOptions { block_tokens, cache_budget_bytes: 64 << 20, ..EngineOptions::default() },
    )
}

/// Largest |a−b| / (|b| + rms(b)): the relative error with the data's scale as floor.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let rms = (b.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / b.len() as f64).sqrt() as f32;
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_finite() { (x - y).abs() / (y.abs() + rms) } else { f32::INFINITY })
        .fold(0.0, f32::max)
}

/// `n` reproducible values uniform in [-1, 1).
pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Asserts [`rel_err`]`(a, b) ≤ tol`, and reports the largest error.
pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let worst = rel_err(a, b);
    eprintln!("{what}: largest relative error {worst:.2e} (bound {tol:.0e})");
    assert!(worst <= tol, "{what}: relative error {worst} > {tol}");
}

#[allow(unused_imports)] // not every test binary uses it
pub use yoco_worker::sampling::argmax;

/// The small random-model shape the engine-level tests use: the tiny preset narrowed to dim 64,
/// FFN 96 and a 300-token vocabulary (4 self + 4 cross layers, self head dim 16, MQA).
pub fn small_config(mixer: yoco_worker::config::SelfMixerKind) -> yoco_worker::config::ModelConfig {
    let mut cfg = yoco_worker::presets::Preset::Tiny.config();
    cfg.dim = 64;
    cfg.hidden_dim = 96;
    cfg.vocab_size = 300;
    cfg.mixer = mixer;
    cfg
}

/// Writes a random f32 model of `cfg` into `dir` and loads it.
pub fn random_model(
    cfg: &yoco_worker::config::ModelConfig,
    seed: u64,
    tied: bool,
    dir: &std::path::Path,
) -> Arc<Model> {
    yoco_worker::presets::write_random_model(cfg, yoco_worker::presets::StoreDtype::F32, seed, tied, dir).unwrap();
    Arc::new(Model::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

/// `n` reproducible pseudo-random token ids below `vocab`.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            // xorshift64*: enough to spread ids over the vocabulary.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as u32 % vocab as u32
        })
        .collect()
}

/// The penalties written out plainly from the whole history, as the reference for the sampler's
/// incremental one: for every token, the repetition penalty if it is in the prompt or the output
/// (divide a positive logit, multiply a negative one), then the frequency penalty times its
/// count in the output, then the presence penalty if it is in the output.
pub fn penalise_reference(
    logits: &[f32],
    prompt: &[u32],
    output: &[u32],
    p: &yoco_worker::sampling::SamplingParams,
) -> Vec<f32> {
    let mut out = logits.to_vec();
    for (t, v) in out.iter_mut().enumerate() {
        let t = t as u32;
        let generated = output.iter().filter(|&&o| o == t).count();
        if prompt.contains(&t) || generated > 0 {
            *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
        }
        if generated > 0 {
            *v -= p.frequency_penalty * generated as f32;
            *v -= p.presence_penalty;
        }
    }
    out
}

/// Prefills `prompt` into a new sequence in chunks of `chunk` (logits of every position), then
/// decodes `extra`: every logit row, in order.
pub fn prefill_then_decode(engine: &mut Engine, prompt: &[u32], chunk: usize, extra: &[u32]) -> Vec<f32> {
    use yoco_worker::engine::{Logits, StepItem};
    engine.add_sequence(7).unwrap();
    let mut out = Vec::new();
    for part in prompt.chunks(chunk) {
        out.extend(engine.step(&[StepItem::prefill(7, part, Logits::All)]).unwrap().remove(0).logits.iter());
    }
    for &t in extra {
        out.extend(engine.step(&[StepItem::decode(7, &[t])]).unwrap().remove(0).logits.iter());
    }
    out
}

/// Asserts that a chunked prefill (37 tokens a step) and two context-parallel ranks (64 a step)
/// give `whole`, the one-chunk single-rank logits, within f32 tolerance (1e-4 relative).
pub fn assert_parallel_paths_agree(
    model: &Arc<Model>,
    opts: &EngineOptions,
    prompt: &[u32],
    extra: &[u32],
    whole: &[f32],
    what: &str,
) {
    let chunked = prefill_then_decode(&mut Engine::new(model.clone(), opts), prompt, 37, extra);
    let err = rel_err(&chunked, whole);
    assert!(err < 1e-4, "{what}: chunked vs whole: {err:e}");
    let ranks = run_group_with(model, 2, opts, &|e| prefill_then_decode(e, prompt, 64, extra));
    for (rank, got) in ranks.iter().enumerate() {
        let err = rel_err(got, whole);
        assert!(err < 1e-4, "{what}: rank {rank} of 2 vs one rank: {err:e}");
    }
}

/// A serving scenario as plans, run by the engine's executor and by `runner` in lockstep (the
/// decode tokens are the executor's samples): sequences with seeded sampling and penalties, one
/// with prompt log-probabilities, a prompt prefilled over two steps, a prefix-cache snapshot at a
/// block boundary resumed by a later sequence, decode batches of several sequences, frees and a
/// dropped snapshot. Every result must match: the sampled tokens exactly, their and the
/// prompt's log-probabilities within `tol` (absolute). `block_tokens` is the runner's block.
pub fn assert_plans_agree(
    model: &Arc<Model>,
    block_tokens: usize,
    runner: &mut dyn FnMut(&yoco_worker::plan::Plan) -> Vec<yoco_worker::plan::SeqResult>,
    tol: f32,
) {
    use yoco_worker::executor::Executor;
    use yoco_worker::plan::{DecodeWork, Plan, PrefillWork, SeqResult, SeqSpec};
    use yoco_worker::sampling::SamplingParams;
    let vocab = model.cfg.vocab_size;
    let mut executor = Executor::new(engine(model, block_tokens));
    let spec = |seq, seed, prompt_logprobs| SeqSpec {
        seq,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 30,
            seed,
            repetition_penalty: 1.15,
            frequency_penalty: 0.2,
            ..SamplingParams::default()
        },
        top_logprobs: 2,
        prompt_logprobs,
        request_id: format!("r{seq}"),
        ..SeqSpec::default()
    };
    let prefill = |seq, tokens: &[u32], sample, next_token, snapshot| PrefillWork {
        seq,
        tokens: tokens.to_vec(),
        chunk_starts: Vec::new(),
        sample,
        next_token,
        snapshot,
    };
    let shared = self::tokens(4 * block_tokens, vocab, 21);
    let long = self::tokens(3 * block_tokens + 5, vocab, 22);
    let mut plans = vec![Plan {
        add: vec![spec(1, 1, true), spec(2, 2, false), spec(3, 3, false)],
        prefill: vec![
            prefill(1, &self::tokens(40, vocab, 20), true, None, None),
            prefill(2, &shared, true, None, Some(7)),
            prefill(3, &long[..2 * block_tokens], false, Some(long[2 * block_tokens]), None),
        ],
        ..Plan::default()
    }];
    plans.push(Plan { prefill: vec![prefill(3, &long[2 * block_tokens..], true, None, None)], ..Plan::default() });
    // Resumes from snapshot 7 (the shared prefix) and prefills its own rest.
    let resumed = SeqSpec { resume_from: Some(7), resumed_tokens: shared.clone(), ..spec(4, 4, false) };
    plans.push(Plan {
        add: vec![resumed],
        prefill: vec![prefill(4, &self::tokens(9, vocab, 23), true, None, None)],
        ..Plan::default()
    });
    let mut live: Vec<(u64, u32)> = Vec::new();
    let mut check = |plan: &Plan, executor: &mut Executor, live: &mut Vec<(u64, u32)>| {
        let want: Vec<SeqResult> = executor.execute(plan).unwrap();
        let got = runner(plan);
        assert_eq!(got.len(), want.len(), "{plan:?}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.seq, w.seq);
            assert_eq!(g.shard_tokens, w.shard_tokens, "sequence {}: cache rows", w.seq);
            assert_eq!(g.prompt_logprobs.len(), w.prompt_logprobs.len(), "sequence {}", w.seq);
            for (a, b) in g.prompt_logprobs.iter().zip(&w.prompt_logprobs) {
                let (a, b) = (a.logprob, b.logprob);
                assert!((a - b).abs() <= tol, "sequence {}: prompt log-probability {a} vs {b}", w.seq);
            }
            match (&g.sampled, &w.sampled) {
                (None, None) => {}
                (Some(g), Some(w)) => {
                    assert_eq!(g.token, w.token, "sampled tokens differ");
                    assert!((g.logprob - w.logprob).abs() <= tol, "log-probability {} vs {}", g.logprob, w.logprob);
                    assert_eq!(g.top_logprobs.len(), w.top_logprobs.len());
                }
                other => panic!("sequence {}: sampled {other:?}", w.seq),
            }
            if let Some(s) = &w.sampled {
                live.retain(|&(id, _)| id != w.seq);
                live.push((w.seq, s.token));
            }
        }
    };
    for plan in &plans {
        check(plan, &mut executor, &mut live);
    }
    for step in 0..6 {
        live.sort();
        let mut plan =
            Plan { decode: live.iter().map(|&(seq, token)| DecodeWork { seq, token }).collect(), ..Plan::default() };
        if step == 3 {
            // A sequence ends and the snapshot goes while the others decode on.
            plan.decode.retain(|d| d.seq != 2);
            plan.free = vec![2];
            plan.drop_snapshots = vec![7];
            live.retain(|&(id, _)| id != 2);
        }
        check(&plan, &mut executor, &mut live);
    }
    assert_eq!(live.len(), 3, "sequences 1, 3 and 4 decoded to the end");
}
