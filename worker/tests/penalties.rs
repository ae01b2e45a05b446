//! Repetition, presence and frequency penalties: the sampler's incremental history against a
//! plain reference over the whole history, generation against a reference loop over the engine,
//! failed steps that leave the history alone, and a two-rank group that samples what one rank
//! does.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{argmax, engine, penalise_reference, random_model, small_config, tokens};
use yoco_worker::comm::{TcpCollective, TcpOptions};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineError, EngineOptions, Logits, StepItem};
use yoco_worker::executor::Executor;
use yoco_worker::generate::{generate, GenerateParams, PlanRunner, RunError};
use yoco_worker::model::Model;
use yoco_worker::plan::{DecodeWork, Plan, PrefillWork, SeqResult, SeqSpec};
use yoco_worker::sampling::{log_softmax, Sampler, SamplingParams};

const VOCAB: usize = 300;
const TOL: f32 = 1e-4;

fn penalties(repetition_penalty: f32, presence_penalty: f32, frequency_penalty: f32) -> SamplingParams {
    SamplingParams { repetition_penalty, presence_penalty, frequency_penalty, ..SamplingParams::default() }
}

/// `n` reproducible logits of both signs, roughly in [-4, 4].
fn logits(n: usize, seed: u64) -> Vec<f32> {
    tokens(n, 2001, seed).into_iter().map(|x| (x as f32 - 1000.0) / 250.0).collect()
}

#[test]
fn sampler_history_matches_the_reference() {
    // 70 ids: the bitset spans two words, and sampled tokens repeat often.
    let vocab = 70;
    let sets = [
        penalties(1.5, 0.4, 0.3),
        penalties(0.7, 0.0, 0.0),
        penalties(1.0, -1.0, 0.0),
        penalties(1.0, 0.0, 2.0),
        penalties(10.0, 2.0, -2.0),
        penalties(1.0, 0.0, 0.0),
    ];
    for base in sets {
        for temperature in [0.0, 0.9] {
            let p = SamplingParams { temperature, seed: 5, ..base.clone() };
            let mut s = Sampler::new(p.clone());
            let prompt = tokens(45, vocab, 3);
            // The prompt arrives in chunks of uneven size, as prefill steps.
            for part in [&prompt[..1], &prompt[1..17], &prompt[17..40], &prompt[40..]] {
                s.observe_prompt(part);
            }
            let mut output = Vec::new();
            for step in 0..80 {
                let raw = logits(vocab, 100 + step);
                let want = penalise_reference(&raw, &prompt, &output, &p);
                assert_eq!(&s.penalised(&raw)[..], &want[..], "{p:?} step {step}");
                let token = s.sample(&raw);
                if temperature == 0.0 {
                    assert_eq!(token, argmax(&want), "{p:?} step {step}");
                }
                s.observe_generated(token);
                output.push(token);
            }
            if temperature == 0.0 && p.repetition_penalty > 1.0 {
                // The penalties did steer: greedy on the raw logits would not pick these.
                let raw_choices: Vec<u32> = (0..80).map(|step| argmax(&logits(vocab, 100 + step))).collect();
                assert_ne!(output, raw_choices, "{p:?}");
            }
        }
    }
}

/// Greedy generation as a plain loop over the engine, in the same prefill chunks as `generate`:
/// the tokens, and the raw log-probability of each.
fn reference_greedy(model: &Arc<Model>, prompt: &[u32], chunk: usize, n: usize, p: &SamplingParams) -> Vec<(u32, f32)> {
    let mut e = engine(model, 16);
    e.add_sequence(1).unwrap();
    let parts: Vec<&[u32]> = prompt.chunks(chunk).collect();
    let mut raw = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let want = if i + 1 == parts.len() { Logits::Last } else { Logits::None };
        raw = e.step(&[StepItem::prefill(1, part, want)]).unwrap().remove(0).logits.into_vec();
    }
    let mut output: Vec<u32> = Vec::new();
    let mut out = Vec::new();
    loop {
        let token = argmax(&penalise_reference(&raw, prompt, &output, p));
        out.push((token, log_softmax(&raw)[token as usize]));
        output.push(token);
        if output.len() == n {
            return out;
        }
        raw = e.step(&[StepItem::decode(1, &[token])]).unwrap().remove(0).logits.into_vec();
    }
}

#[test]
fn greedy_generation_with_penalties_matches_a_reference_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tokens(40, VOCAB, 5);
    for (i, mixer) in
        [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 3 }].into_iter().enumerate()
    {
        let model = random_model(&small_config(mixer), 23, false, &tmp.path().join(i.to_string()));
        let mut x = Executor::new(engine(&model, 16));
        let run = |x: &mut Executor, sampling: SamplingParams| {
            let params = GenerateParams { max_tokens: 30, sampling, prefill_chunk: 16, ..GenerateParams::default() };
            generate(x, 1, &prompt, &params, &mut |_| {}).unwrap()
        };
        let plain = run(&mut x, SamplingParams::default());
        for p in [penalties(3.0, 0.0, 0.0), penalties(1.5, 0.5, 0.5), penalties(1.0, 0.0, 1.0)] {
            let gen = run(&mut x, p.clone());
            let want = reference_greedy(&model, &prompt, 16, 30, &p);
            let want_tokens: Vec<u32> = want.iter().map(|w| w.0).collect();
            assert_eq!(gen.tokens, want_tokens, "{mixer:?} {p:?}");
            // Log-probabilities stay those of the raw model distribution.
            let want_lps: Vec<f32> = want.iter().map(|w| w.1).collect();
            assert_eq!(gen.logprobs, want_lps, "{mixer:?} {p:?}");
            assert_ne!(gen.tokens, plain.tokens, "{mixer:?} {p:?}: the penalty changed nothing");
        }
        // The unpenalised run is the reference loop with the penalties off.
        let want: Vec<u32> =
            reference_greedy(&model, &prompt, 16, 30, &SamplingParams::default()).iter().map(|w| w.0).collect();
        assert_eq!(plain.tokens, want, "{mixer:?}");
        assert_eq!(x.engine().pool().used_blocks(), 0);
    }
}

fn sampled(r: &[SeqResult]) -> u32 {
    r[0].sampled.as_ref().expect("a sampled token").token
}

#[test]
fn a_failed_step_leaves_the_history_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::GatedRetention), 29, false, tmp.path());
    let p = penalties(10.0, 2.0, 0.0);
    let prompt = tokens(20, VOCAB, 6);
    let start = Plan {
        add: vec![SeqSpec {
            seq: 1,
            sampling: p.clone(),
            top_logprobs: 0,
            prompt_logprobs: false,
            ..SeqSpec::default()
        }],
        prefill: vec![PrefillWork {
            seq: 1,
            tokens: prompt.clone(),
            chunk_starts: vec![],
            sample: true,
            ..PrefillWork::default()
        }],
        ..Plan::default()
    };
    let decode = |token| Plan { decode: vec![DecodeWork { seq: 1, token }], ..Plan::default() };
    let (mut a, mut b) = (Executor::new(engine(&model, 16)), Executor::new(engine(&model, 16)));
    let first = sampled(&a.execute(&start).unwrap());
    assert_eq!(sampled(&b.execute(&start).unwrap()), first);
    let second = sampled(&b.execute(&decode(first)).unwrap());

    // On `a`, a step that would have fed `second` as generated fails (an unknown sequence)...
    let failing = Plan {
        prefill: vec![PrefillWork { seq: 99, tokens: vec![1], sample: true, ..PrefillWork::default() }],
        ..decode(second)
    };
    assert_eq!(a.execute(&failing).unwrap_err(), EngineError::UnknownSequence(99));
    // ... so `a` goes on exactly as `b` did, while a history holding `second` would not.
    assert_eq!(sampled(&a.execute(&decode(first)).unwrap()), second);
    let mut e = engine(&model, 16);
    e.add_sequence(1).unwrap();
    e.step(&[StepItem::prefill(1, &prompt, Logits::None)]).unwrap();
    let raw = e.step(&[StepItem::decode(1, &[first])]).unwrap().remove(0).logits;
    assert_eq!(argmax(&penalise_reference(&raw, &prompt, &[first], &p)), second);
    assert_ne!(argmax(&penalise_reference(&raw, &prompt, &[first, second], &p)), second);
}

/// A group of executors on threads, joined by TCP on loopback and driven like worker
/// processes: every rank gets every plan. Keeps every rank's results of every step.
struct ThreadGroup {
    plans: Vec<mpsc::Sender<Plan>>,
    results: Vec<mpsc::Receiver<Result<Vec<SeqResult>, EngineError>>>,
    log: Vec<Vec<Vec<SeqResult>>>,
}

impl PlanRunner for ThreadGroup {
    fn cp_size(&self) -> usize {
        self.plans.len()
    }
    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        for tx in &self.plans {
            tx.send(plan.clone()).map_err(|_| "a rank has stopped")?;
        }
        let results = self.results.iter().map(|rx| Ok(rx.recv()??)).collect::<Result<Vec<_>, RunError>>()?;
        self.log.push(results.clone());
        Ok(results)
    }
}

/// Runs `f` with a group of `world` ranks of `model`.
fn with_group<R>(model: &Arc<Model>, world: usize, f: impl FnOnce(&mut ThreadGroup) -> R) -> R {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let opts = TcpOptions {
        timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
        ..TcpOptions::default()
    };
    std::thread::scope(|s| {
        let mut group = ThreadGroup { plans: Vec::new(), results: Vec::new(), log: Vec::new() };
        for (rank, listener) in listeners.into_iter().enumerate() {
            let (plan_tx, plan_rx) = mpsc::channel::<Plan>();
            let (result_tx, result_rx) = mpsc::channel();
            group.plans.push(plan_tx);
            group.results.push(result_rx);
            let (addrs, opts, model) = (&addrs, &opts, model.clone());
            s.spawn(move || {
                let comm = TcpCollective::connect(rank, addrs, listener, opts).unwrap();
                let eo = EngineOptions { block_tokens: 16, cache_budget_bytes: 64 << 20, ..EngineOptions::default() };
                let mut exec = Executor::new(Engine::with_group(model, &eo, Box::new(comm)).unwrap());
                for plan in plan_rx {
                    if result_tx.send(exec.execute(&plan)).is_err() {
                        break;
                    }
                }
            });
        }
        // Dropping the group closes the channels and ends the ranks.
        f(&mut group)
    })
}

#[test]
fn two_ranks_sample_what_one_rank_samples_with_penalties() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::SlidingWindow { window: 3 }), 31, false, tmp.path());
    let prompt = tokens(40, VOCAB, 7);
    for sampling in
        [penalties(1.8, 0.5, 0.5), SamplingParams { temperature: 0.8, seed: 11, ..penalties(1.3, 0.2, 0.4) }]
    {
        // Prefill in several steps on both: 8 tokens per step alone, 8 per rank in the group.
        let params = GenerateParams { max_tokens: 20, sampling, prefill_chunk: 8, ..GenerateParams::default() };
        let one = generate(&mut Executor::new(engine(&model, 16)), 1, &prompt, &params, &mut |_| {}).unwrap();
        let (two, log) = with_group(&model, 2, |g| {
            let gen = generate(g, 1, &prompt, &params, &mut |_| {}).unwrap();
            (gen, std::mem::take(&mut g.log))
        });
        assert_eq!(two.tokens, one.tokens, "{:?}", params.sampling);
        for (a, b) in two.logprobs.iter().zip(&one.logprobs) {
            assert!((a - b).abs() <= TOL * b.abs().max(1.0), "{a} vs {b}");
        }
        // Every rank drew the same token itself: rank 0's broadcast replaces a differing token
        // but not its log-probability, which is of the rank's own draw.
        for (step, ranks) in log.iter().enumerate() {
            for r in &ranks[1..] {
                let mine: Vec<_> = r.iter().map(|x| &x.sampled).collect();
                let rank0: Vec<_> = ranks[0].iter().map(|x| &x.sampled).collect();
                assert_eq!(mine, rank0, "step {step}");
            }
        }
    }
}
