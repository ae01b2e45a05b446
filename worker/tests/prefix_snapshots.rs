//! Prefix-cache snapshots in the engine: a sequence resumed from a snapshot must give the same
//! logits (rel 1e-4, the chunking tolerance) as one prefilled from scratch, for both mixers, on
//! one rank and on a context-parallel group (where each rank's shard ends mid-block, so the
//! resumed sequence copies a shared block before writing), while the sequence the snapshot was
//! taken from keeps writing into the blocks it shares. Dropping everything returns every block.

mod common;

use common::*;
use yoco_worker::engine::{Engine, Logits, StepItem};

const TOL: f32 = 1e-4;

/// Logits rows of a `Logits::All` prefill of `tokens` in steps of `step`, then `decode` greedy
/// tokens, for a sequence already added.
fn run(e: &mut Engine, seq: u64, tokens: &[u32], step: usize, decode: usize) -> Vec<Vec<f32>> {
    let vocab = e.model().cfg.vocab_size;
    let mut rows = Vec::new();
    for part in tokens.chunks(step) {
        let out = e.step(&[StepItem::prefill(seq, part, Logits::All)]).unwrap();
        rows.extend(out[0].logits.chunks(vocab).map(<[f32]>::to_vec));
    }
    for _ in 0..decode {
        let t = argmax(rows.last().unwrap());
        rows.push(e.step(&[StepItem::decode(seq, &[t])]).unwrap().remove(0).logits.into_vec());
    }
    rows
}

/// Per rank: (fresh rows, resumed-at-32 rows, resumed-at-16 rows, blocks left after dropping all).
type Out = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>, usize);

fn script<'a>(a: &'a [u32], b: &'a [u32]) -> impl Fn(&mut Engine) -> Out + Sync + 'a {
    move |e: &mut Engine| {
        // Sequence 1 prefills `a` in steps of 16; snapshots at 16 and at 32.
        e.add_sequence(1).unwrap();
        e.step(&[StepItem::prefill(1, &a[..16], Logits::None)]).unwrap();
        e.snapshot(1, 100).unwrap();
        e.step(&[StepItem::prefill(1, &a[16..32], Logits::None)]).unwrap();
        e.snapshot(1, 200).unwrap();
        // Sequence 1 goes on writing after its snapshots (into the blocks they share).
        run(e, 1, &a[32..], 16, 3);
        let full_state = 4 * e.model().cfg.self_state_numbers();
        assert_eq!(e.sequence_state_bytes(1), Some(full_state), "the config's state size is the engine's");
        assert_eq!(e.snapshot_usage(), (2, 2 * full_state));
        // Fresh: `b` (same first 32 tokens as `a`) from nothing.
        e.add_sequence(2).unwrap();
        let fresh = run(e, 2, b, 16, 4);
        // Resumed at 32 and at 16.
        e.add_sequence_from(3, 200).unwrap();
        assert_eq!(e.sequence_len(3), Some(32));
        let at32 = run(e, 3, &b[32..], 16, 4);
        e.add_sequence_from(4, 100).unwrap();
        let at16 = run(e, 4, &b[16..], 7, 4);
        assert!(e.add_sequence_from(5, 999).is_err(), "an unknown snapshot is refused");
        for seq in 1..=4 {
            e.free_sequence(seq);
        }
        assert!(e.pool().used_blocks() > 0, "the snapshots still hold their blocks");
        assert!(e.drop_snapshot(100) && e.drop_snapshot(200));
        (fresh, at32, at16, e.pool().used_blocks())
    }
}

#[test]
fn resumed_sequences_match_fresh_ones() {
    for name in ["gret", "swa"] {
        let model = load(name);
        let vocab = model.cfg.vocab_size;
        let a = tokens(45, vocab, 1);
        let mut b = a[..32].to_vec();
        b.extend(tokens(13, vocab, 2));
        for world in [1, 2, 3] {
            let outs = run_group(&model, world, &script(&a, &b));
            for (rank, (fresh, at32, at16, left)) in outs.iter().enumerate() {
                assert_eq!(*left, 0, "{name} P={world} rank {rank}: blocks leaked");
                assert_eq!(at32.len(), fresh.len() - 32);
                assert_eq!(at16.len(), fresh.len() - 16);
                for (i, row) in at32.iter().enumerate() {
                    let err = rel_err(row, &fresh[32 + i]);
                    assert!(err < TOL, "{name} P={world} rank {rank}: resumed at 32, row {i}: rel err {err}");
                }
                for (i, row) in at16.iter().enumerate() {
                    let err = rel_err(row, &fresh[16 + i]);
                    assert!(err < TOL, "{name} P={world} rank {rank}: resumed at 16, row {i}: rel err {err}");
                }
                // The greedy continuations agree token for token.
                let greedy = |rows: &[Vec<f32>]| rows[rows.len() - 5..].iter().map(|r| argmax(r)).collect::<Vec<_>>();
                assert_eq!(greedy(at32), greedy(fresh), "{name} P={world}");
                assert_eq!(greedy(at16), greedy(fresh), "{name} P={world}");
            }
        }
    }
}
