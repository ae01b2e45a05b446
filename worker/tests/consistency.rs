//! The engine agrees with itself on small random models (gated retention, and sliding window
//! with windows 1, 3 and 40): whole vs chunked prefill, incremental decode vs one full forward,
//! batched vs alone, failed steps that change nothing, and reproducible sampling.

mod common;

use std::sync::Arc;

use common::{engine, random_model, rel_err, small_config, tokens};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::CacheError;
use yoco_worker::engine::{Engine, EngineError, EngineOptions, Logits, SeqId, StepItem};
use yoco_worker::executor::Executor;
use yoco_worker::generate::{generate, FinishReason, GenerateParams};
use yoco_worker::model::Model;
use yoco_worker::sampling::{log_softmax, SamplingParams};

const TOL: f32 = 1e-4;
const VOCAB: usize = 300;
const MIXERS: [SelfMixerKind; 4] = [
    SelfMixerKind::GatedRetention,
    SelfMixerKind::SlidingWindow { window: 1 },
    SelfMixerKind::SlidingWindow { window: 3 },
    SelfMixerKind::SlidingWindow { window: 40 },
];

/// Every mixer's model, with the directory that holds them.
fn models() -> (tempfile::TempDir, Vec<(String, Arc<Model>)>) {
    let tmp = tempfile::tempdir().unwrap();
    let models = MIXERS
        .iter()
        .enumerate()
        .map(|(i, &mixer)| {
            let name = format!("{mixer:?}");
            let dir = tmp.path().join(i.to_string());
            (name, random_model(&small_config(mixer), 17, false, &dir))
        })
        .collect();
    (tmp, models)
}

/// One prefill item alone in a step: its logits.
fn step1(engine: &mut Engine, seq: SeqId, tokens: &[u32], logits: Logits) -> Vec<f32> {
    engine.step(&[StepItem::prefill(seq, tokens, logits)]).unwrap().remove(0).logits.into_vec()
}

/// One decode token alone in a step: its logits.
fn decode1(engine: &mut Engine, seq: SeqId, token: u32) -> Vec<f32> {
    engine.step(&[StepItem::decode(seq, &[token])]).unwrap().remove(0).logits.into_vec()
}

fn row(logits: &[f32], i: usize) -> &[f32] {
    &logits[i * VOCAB..(i + 1) * VOCAB]
}

/// Logits of every position of `seq` (a fresh sequence) from one step over all of it.
fn full_forward(model: &Arc<Model>, seq: &[u32]) -> Vec<f32> {
    let mut e = engine(model, 16);
    e.add_sequence(0).unwrap();
    step1(&mut e, 0, seq, Logits::All)
}

#[test]
fn chunked_prefill_matches_whole_prefill() {
    let (_tmp, models) = models();
    let prompt = tokens(150, VOCAB, 1);
    for (name, model) in &models {
        let whole = full_forward(model, &prompt);
        assert_eq!(whole.len(), prompt.len() * VOCAB);
        for chunk in [1, 7, 64] {
            // Every position's logits, chunk by chunk.
            let mut e = engine(model, 16);
            e.add_sequence(3).unwrap();
            let mut got = Vec::new();
            for part in prompt.chunks(chunk) {
                got.extend(step1(&mut e, 3, part, Logits::All));
            }
            let err = rel_err(&got, &whole);
            assert!(err < TOL, "{name} chunk {chunk} All: rel err {err}");
            assert_eq!(e.sequence_len(3), Some(prompt.len()));

            // Early exit: no logits for all but the last chunk, then the last row only.
            let mut e = engine(model, 16);
            e.add_sequence(3).unwrap();
            let parts: Vec<&[u32]> = prompt.chunks(chunk).collect();
            let mut last = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let want = if i + 1 == parts.len() { Logits::Last } else { Logits::None };
                last = step1(&mut e, 3, part, want);
                let rows = if want == Logits::Last { 1 } else { 0 };
                assert_eq!(last.len(), rows * VOCAB, "{name} chunk {chunk}");
            }
            let err = rel_err(&last, row(&whole, prompt.len() - 1));
            assert!(err < TOL, "{name} chunk {chunk} None/Last: rel err {err}");
        }
    }
}

#[test]
fn incremental_decode_matches_one_full_forward() {
    let (_tmp, models) = models();
    let prompt = tokens(150, VOCAB, 2);
    for (name, model) in &models {
        for prefill in [150, 1] {
            let mut e = engine(model, 16);
            e.add_sequence(9).unwrap();
            let mut seq = prompt[..prefill].to_vec();
            let mut steps = vec![step1(&mut e, 9, &seq, Logits::Last)];
            // Feed the rest of the prompt, then 30 tokens of its own greedy choice.
            while seq.len() < 180 {
                let next = match prompt.get(seq.len()) {
                    Some(&t) => t,
                    None => common::argmax(steps.last().unwrap()),
                };
                seq.push(next);
                steps.push(decode1(&mut e, 9, next));
            }
            // steps[i] holds the logits at position prefill - 1 + i.
            let full = full_forward(model, &seq);
            for (i, got) in steps.iter().enumerate() {
                let pos = prefill - 1 + i;
                let err = rel_err(got, row(&full, pos));
                assert!(err < TOL, "{name} prefill {prefill}, position {pos}: {err}");
            }
        }
    }
}

/// One sequence's history in the batch test.
struct Track {
    id: SeqId,
    tokens: Vec<u32>,
}

#[test]
fn batched_steps_match_each_sequence_alone() {
    let (_tmp, models) = models();
    // With a 4 KiB "last-level cache" the cross-decoder runs the rows of a step in groups
    // (cache_groups), with an unbounded one all rows layer by layer.
    for (name, model) in &models {
        for reuse in [usize::MAX, 4 << 10] {
            batched_against_alone(&format!("{name}, cache_reuse_bytes {reuse}"), model, reuse);
        }
    }
}

fn batched_against_alone(name: &str, model: &Arc<Model>, cache_reuse_bytes: usize) {
    // `batched` runs the mixed steps; `alone` runs each item on its own.
    let opts = |cache_reuse_bytes| EngineOptions {
        block_tokens: 16,
        cache_budget_bytes: 64 << 20,
        cache_reuse_bytes,
        ..EngineOptions::default()
    };
    let mut batched = Engine::new(model.clone(), &opts(cache_reuse_bytes));
    let mut alone = Engine::new(model.clone(), &opts(usize::MAX));
    let mut seqs: Vec<Track> = [(1, 90), (2, 37), (3, 5), (4, 0)]
        .into_iter()
        .map(|(id, len)| Track { id, tokens: tokens(len, VOCAB, 100 + id) })
        .collect();
    for s in &seqs {
        for e in [&mut batched, &mut alone] {
            e.add_sequence(s.id).unwrap();
            if !s.tokens.is_empty() {
                step1(e, s.id, &s.tokens, Logits::None);
            }
        }
    }
    // Rounds of one prefill chunk plus two single-token decodes, in varying order, so
    // blocks of different sequences interleave in the pool. Sequence 4 starts from
    // position 0 inside a batch. `None` marks a decode item.
    let rounds: [[(SeqId, usize, Option<Logits>); 3]; 4] = [
        [(1, 10, Some(Logits::All)), (2, 1, None), (3, 1, None)],
        [(2, 1, None), (1, 23, Some(Logits::All)), (3, 1, None)],
        [(4, 20, Some(Logits::All)), (3, 1, None), (2, 1, None)],
        [(3, 1, None), (2, 1, None), (4, 9, Some(Logits::Last))],
    ];
    for (r, round) in rounds.iter().enumerate() {
        let new: Vec<Vec<u32>> = round.iter().map(|&(id, n, _)| tokens(n, VOCAB, 1000 * r as u64 + id)).collect();
        let items: Vec<StepItem> = round
            .iter()
            .zip(&new)
            .map(|(&(seq, _, prefill), toks)| match prefill {
                Some(logits) => StepItem::prefill(seq, toks, logits),
                None => StepItem::decode(seq, toks),
            })
            .collect();
        let outs = batched.step(&items).unwrap();
        assert_eq!(outs.len(), items.len());
        for (item, out) in items.iter().zip(&outs) {
            assert_eq!(out.seq, item.seq);
            let one = StepItem { placement: item.placement.clone(), ..*item };
            let want = alone.step(&[one]).unwrap().remove(0).logits;
            assert_eq!(out.logits.len(), want.len());
            let err = rel_err(&out.logits, &want);
            assert!(err < TOL, "{name} round {r} seq {}: rel err {err}", item.seq);
        }
        for (&(id, _, _), toks) in round.iter().zip(&new) {
            let s = seqs.iter_mut().find(|s| s.id == id).unwrap();
            s.tokens.extend(toks);
        }
    }
    for s in &seqs {
        assert_eq!(batched.sequence_len(s.id), Some(s.tokens.len()));
        assert_eq!(batched.sequence_cache_bytes(s.id), alone.sequence_cache_bytes(s.id));
        assert!(batched.free_sequence(s.id));
    }
    assert_eq!(batched.pool().used_blocks(), 0, "{name}");
}

/// What a failed step must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    used_blocks: usize,
    seqs: Vec<(Option<usize>, Option<usize>, Option<usize>)>,
}

fn snapshot(e: &Engine, ids: &[SeqId]) -> Snapshot {
    Snapshot {
        used_blocks: e.pool().used_blocks(),
        seqs: ids
            .iter()
            .map(|&id| (e.sequence_len(id), e.sequence_cache_bytes(id), e.sequence_state_bytes(id)))
            .collect(),
    }
}

#[test]
fn failed_steps_change_nothing_and_free_returns_every_block() {
    let (_tmp, models) = models();
    let kv_dim = small_config(SelfMixerKind::GatedRetention).kv_dim();
    // Blocks of 16 positions; the budget holds 4 of them.
    let block_bytes = 2 * 16 * kv_dim * 4;
    let opts = EngineOptions { block_tokens: 16, cache_budget_bytes: 4 * block_bytes, ..EngineOptions::default() };
    let (a, b) = (tokens(20, VOCAB, 7), tokens(16, VOCAB, 8));
    for (name, model) in &models {
        // Sequence 1 holds 20 positions (2 blocks), sequence 2 exactly 16 (1 full block).
        let setup = || {
            let mut e = Engine::new(model.clone(), &opts);
            for (id, toks) in [(1, &a), (2, &b)] {
                e.add_sequence(id).unwrap();
                step1(&mut e, id, toks, Logits::None);
            }
            e
        };
        let mut e = setup();
        let before = snapshot(&e, &[1, 2]);
        assert_eq!(before.used_blocks, 3);
        let ok = |seq| StepItem::prefill(seq, &[5, 6], Logits::All);
        let failures: Vec<(Vec<StepItem>, EngineError)> = vec![
            (vec![ok(1), ok(99)], EngineError::UnknownSequence(99)),
            (
                vec![ok(1), StepItem::prefill(2, &[1, 300], Logits::Last)],
                EngineError::TokenOutOfRange { token: 300, vocab: VOCAB },
            ),
            (vec![ok(2), StepItem::prefill(1, &[], Logits::Last)], EngineError::EmptyItem(1)),
            (vec![ok(1), ok(2), ok(1)], EngineError::SequenceTwiceInStep(1)),
        ];
        for (items, want) in failures {
            assert_eq!(e.step(&items).unwrap_err(), want, "{name}");
            assert_eq!(snapshot(&e, &[1, 2]), before, "{name}: after {want}");
        }
        // Out of cache: the step needs three blocks (one for sequence 2's item, two for sequence
        // 1's) where one is free; it is refused whole, nothing taken.
        let long = tokens(40, VOCAB, 9);
        let items = [ok(2), StepItem::prefill(1, &long, Logits::Last)];
        let err = e.step(&items).unwrap_err();
        assert!(
            matches!(err, EngineError::Cache(CacheError::OutOfBudget { needed: 3, free: 1, total: 4, .. })),
            "{name}: {err}"
        );
        assert_eq!(snapshot(&e, &[1, 2]), before, "{name}: after {err}");

        // A valid step now gives exactly what it gives on an engine that never saw the errors.
        let mut fresh = setup();
        let valid = [ok(2), ok(1)];
        let got = e.step(&valid).unwrap();
        let want = fresh.step(&valid).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.logits, w.logits, "{name}: seq {}", g.seq);
        }
        assert_eq!(snapshot(&e, &[1, 2]), snapshot(&fresh, &[1, 2]));

        assert!(e.free_sequence(1));
        assert!(e.free_sequence(2));
        assert!(!e.free_sequence(2), "freed twice");
        assert_eq!(e.pool().used_blocks(), 0, "{name}");
        assert_eq!(e.sequence_len(1), None);

        // generate() frees its sequence on error too, and the budget is whole again after.
        let mut x = Executor::new(e);
        let params = GenerateParams { max_tokens: 200, ..GenerateParams::default() };
        let err = generate(&mut x, 5, &long, &params, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("budget"), "{name}: {err}");
        assert_eq!(x.engine().sequence_len(5), None);
        assert_eq!(x.engine().pool().used_blocks(), 0, "{name}");
        let bad = [1, 2, 300];
        let err = generate(&mut x, 5, &bad, &params, &mut |_| {}).unwrap_err();
        assert_eq!(err.to_string(), EngineError::TokenOutOfRange { token: 300, vocab: VOCAB }.to_string());
        assert_eq!(x.engine().sequence_len(5), None);
        let err = generate(&mut x, 5, &[], &params, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert_eq!(x.engine().sequence_len(5), None);
        let short = GenerateParams { max_tokens: 4, ..GenerateParams::default() };
        generate(&mut x, 5, &long, &short, &mut |_| {}).unwrap();
        assert_eq!(x.engine().pool().used_blocks(), 0, "{name}");
    }

    // A budget too small for a single block: every step fails cleanly.
    let model = &models[0].1;
    let mut e = Engine::new(
        model.clone(),
        &EngineOptions { block_tokens: 16, cache_budget_bytes: block_bytes - 1, ..EngineOptions::default() },
    );
    assert_eq!(e.pool().total_blocks(), 0);
    e.add_sequence(1).unwrap();
    let err = step_err(&mut e, 1, &[1]);
    assert!(matches!(err, EngineError::Cache(_)), "{err}");
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(e.sequence_len(1), Some(0));
    assert!(e.free_sequence(1));
    assert_eq!(e.pool().used_blocks(), 0);
}

fn step_err(e: &mut Engine, seq: SeqId, tokens: &[u32]) -> EngineError {
    e.step(&[StepItem::decode(seq, tokens)]).unwrap_err()
}

fn sampled(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed, ..SamplingParams::default() }
}

#[test]
fn generate_is_reproducible_and_its_logprobs_match_the_engine() {
    let (_tmp, models) = models();
    // Longer than generate's prompt-logprobs chunk (256), so that path is chunked too.
    let prompt = tokens(300, VOCAB, 4);
    for (name, model) in &models {
        let mut e = Executor::new(engine(model, 16));
        let params = |seed, prompt_logprobs| GenerateParams {
            max_tokens: 12,
            sampling: sampled(0.8, seed),
            top_logprobs: 3,
            prompt_logprobs,
            ..GenerateParams::default()
        };
        let run = |e: &mut Executor, p: &GenerateParams| {
            let mut progress = Vec::new();
            let gen = generate(e, 1, &prompt, p, &mut |p| progress.push(p.prefilled)).unwrap();
            assert_eq!(progress.last(), Some(&prompt.len()));
            gen
        };
        let first = run(&mut e, &params(42, true));
        let again = run(&mut e, &params(42, true));
        let other = run(&mut e, &params(43, true));
        assert_eq!(first.tokens.len(), 12);
        assert_eq!(first.finish_reason, FinishReason::Length);
        assert_eq!(first.tokens, again.tokens, "{name}: same seed");
        assert_eq!(first.logprobs, again.logprobs, "{name}: same seed");
        assert_ne!(first.tokens, other.tokens, "{name}: other seed");
        assert_eq!(e.engine().pool().used_blocks(), 0);

        // Prompt log-probabilities: log_softmax of the All-logits row before each token.
        let full = full_forward(model, &prompt);
        let lps = first.prompt_logprobs.as_ref().unwrap();
        assert_eq!(lps.len(), prompt.len());
        assert_eq!(lps[0], None);
        for (i, lp) in lps.iter().enumerate().skip(1) {
            let want = log_softmax(row(&full, i - 1))[prompt[i] as usize];
            let got = lp.unwrap();
            assert!((got - want).abs() <= TOL * want.abs().max(1.0), "{name}: prompt token {i}: {got} vs {want}");
        }
        // The first generated token's log-probability is under the last prompt row.
        let want = log_softmax(row(&full, prompt.len() - 1))[first.tokens[0] as usize];
        assert!((first.logprobs[0] - want).abs() <= TOL * want.abs().max(1.0));
        for (lp, top) in first.logprobs.iter().zip(&first.top_logprobs) {
            assert_eq!(top.len(), 3);
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
            assert!(*lp <= top[0].1);
        }

        // Without prompt log-probabilities the prefill path differs; the tokens do not.
        let plain = run(&mut e, &params(42, false));
        assert_eq!(plain.prompt_logprobs, None);
        assert_eq!(plain.tokens, first.tokens, "{name}");

        // Greedy: a stop token ends generation right after it is produced.
        let greedy = GenerateParams { max_tokens: 6, ..GenerateParams::default() };
        let g = run(&mut e, &greedy);
        assert_eq!(g.tokens[0], common::argmax(row(&full, prompt.len() - 1)));
        let stop = GenerateParams { stop_token_ids: vec![g.tokens[1]], ..greedy };
        let s = run(&mut e, &stop);
        assert_eq!(s.finish_reason, FinishReason::Stop);
        assert_eq!(s.tokens, g.tokens[..=g.tokens.iter().position(|&t| t == g.tokens[1]).unwrap()]);
    }
}

/// A plan that cannot run is refused before it changes anything (the sequences it would add
/// are not left behind), and the executor serves on; a rank holds at most `max_sequences`.
#[test]
fn a_refused_plan_changes_nothing() {
    use yoco_worker::plan::{DecodeWork, Plan, PrefillWork, SeqSpec};
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::GatedRetention), 5, false, tmp.path());
    let block_bytes = 2 * 16 * model.cfg.kv_dim() * 4;
    let opts = EngineOptions {
        block_tokens: 16,
        cache_budget_bytes: 4 * block_bytes,
        max_sequences: 2,
        ..EngineOptions::default()
    };
    let mut x = Executor::new(Engine::new(model.clone(), &opts));
    let add = |seq| SeqSpec { seq, ..SeqSpec::default() };
    let fill =
        |seq, n, seed| PrefillWork { seq, tokens: tokens(n, VOCAB, seed), sample: true, ..PrefillWork::default() };
    let first = Plan { add: vec![add(1)], prefill: vec![fill(1, 20, 1)], ..Plan::default() };
    let token = x.execute(&first).unwrap()[0].sampled.as_ref().unwrap().token;
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
        Plan { add: vec![add(2), add(2)], ..Plan::default() },
        Plan { add: vec![add(2), add(3)], ..Plan::default() },
        Plan { add: vec![SeqSpec { resume_from: Some(9), ..add(2) }], ..Plan::default() },
        Plan { decode: vec![DecodeWork { seq: 1, token }, DecodeWork { seq: 1, token }], ..Plan::default() },
        Plan { decode: vec![DecodeWork { seq: 5, token }], ..Plan::default() },
    ];
    for plan in &bad {
        let err = x.execute(plan).unwrap_err();
        let e = x.engine();
        assert_eq!((e.sequences(), e.pool().free_blocks(), e.sequence_len(2)), (1, 2, None), "{plan:?}: {err}");
    }
    let err = x.execute(&bad[4]).unwrap_err();
    assert_eq!(err, EngineError::TooManySequences(2));
    let next = Plan { add: vec![add(2)], decode: vec![DecodeWork { seq: 1, token }], ..Plan::default() };
    assert_eq!(x.execute(&next).unwrap()[0].shard_tokens, 21);
    assert_eq!(x.engine().sequences(), 2);
}
