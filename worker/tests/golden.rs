//! The engine against golden logits from the independent PyTorch reference
//! (`tools/reference/`): every fixture, prefilled whole and in chunks, then decoded greedily.
//! Tolerance: f32 logits within 1e-4 of the reference relative to |logit| + rms(logits).

mod common;

use common::*;
use yoco_worker::engine::{Logits, StepItem};

const TOL: f32 = 1e-4;
const FIXTURES: [&str; 4] = ["gret", "swa", "gret_bf16_tied", "swa_f16"];

/// Prompt logits for every position, feeding the prompt in chunks of `chunk` tokens.
fn prompt_logits(name: &str, chunk: usize, block_tokens: usize) -> Vec<f32> {
    let model = load(name);
    let exp = expected(name);
    let mut engine = engine(&model, block_tokens);
    engine.add_sequence(7).unwrap();
    let mut logits = Vec::new();
    for part in exp.prompt.chunks(chunk) {
        let out = engine.step(&[StepItem::prefill(7, part, Logits::All)]).unwrap();
        logits.extend(out[0].logits.iter());
    }
    logits
}

#[test]
fn prompt_logits_match_reference_whole_and_chunked() {
    for name in FIXTURES {
        let exp = expected(name);
        for (chunk, bt) in [(1000, 256), (1, 4), (7, 16), (64, 3), (129, 256)] {
            let got = prompt_logits(name, chunk, bt);
            let err = rel_err(&got, &exp.logits);
            assert!(err < TOL, "{name} chunk {chunk} block {bt}: rel err {err}");
        }
    }
}

#[test]
fn greedy_decode_matches_reference() {
    for name in FIXTURES {
        let model = load(name);
        let exp = expected(name);
        let vocab = model.cfg.vocab_size;
        for chunk in [exp.prompt.len(), 50] {
            let mut engine = engine(&model, 16);
            engine.add_sequence(1).unwrap();
            let mut last = Vec::new();
            let parts: Vec<&[u32]> = exp.prompt.chunks(chunk).collect();
            for (i, part) in parts.iter().enumerate() {
                let want = if i + 1 == parts.len() { Logits::Last } else { Logits::None };
                let out = engine.step(&[StepItem::prefill(1, part, want)]).unwrap();
                assert_eq!(out[0].logits.len(), if want == Logits::Last { vocab } else { 0 });
                last = out[0].logits.to_vec();
            }
            for (i, &want_token) in exp.greedy.iter().enumerate() {
                let want_row = &exp.greedy_logits[i * vocab..(i + 1) * vocab];
                let err = rel_err(&last, want_row);
                assert!(err < TOL, "{name} decode step {i}: rel err {err}");
                let token = argmax(&last);
                assert_eq!(token, want_token, "{name} greedy token {i}");
                let out = engine.step(&[StepItem::prefill(1, &[token], Logits::Last)]).unwrap();
                last = out[0].logits.to_vec();
            }
        }
    }
}

/// The angle table is rounded as the reference rounds it (f32 angle, then cos/sin), so even at
/// two million positions cos/sin agree to f32 rounding.
#[test]
fn rope_tables_match_reference_to_two_million_positions() {
    use yoco_worker::kernels::rope::{apply_rope, Rope};
    let bytes = std::fs::read(fixtures().join("rope.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let positions: Vec<usize> = read_tensor_i64(&st, "positions").into_iter().map(|p| p as usize).collect();
    for (theta, tag) in [(10000.0, "theta10000"), (8e7, "theta8e7")] {
        let table = Rope::new(theta, 16).table(positions.iter().copied());
        for (got, name) in [(&table.cos, "cos"), (&table.sin, "sin")] {
            let want = read_tensor_f32(&st, &format!("{name}_{tag}"));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            // torch's f32 cos/sin are within an ulp or two of the correctly rounded value.
            assert!(worst <= 3e-7, "{name} {tag}: max abs diff {worst}");
        }
        if tag == "theta10000" {
            let mut x = read_tensor_f32(&st, "x");
            apply_rope(&mut x, 1, 16, &table);
            let want = read_tensor_f32(&st, "x_rot_theta10000");
            let worst = x.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst <= 1e-6, "rotated x: max abs diff {worst}");
        }
    }
}
