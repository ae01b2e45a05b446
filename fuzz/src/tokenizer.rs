//! cl100k_base on what clients send and what models generate: text (any bytes, made UTF-8 as
//! the HTTP and gRPC layers would have it) encoded with and without special tokens and decoded
//! back; arbitrary token ids (out-of-vocabulary ones included) decoded at once and through the
//! coordinator's streaming detokenizer and stop-string matcher.

use arbitrary::Unstructured;
use yoco::scheduler::detok::{IncrementalDetokenizer, StopMatcher, StopOutcome};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        text(rest);
    } else {
        ids(rest);
    }
}

fn text(bytes: &[u8]) {
    let tok = crate::cl100k();
    let text = String::from_utf8_lossy(bytes);
    let ids = tok.encode(&text).expect("cl100k encodes any text");
    assert!(ids.iter().all(|&t| (t as usize) < tok.vocab_size()));
    assert_eq!(tok.decode(&ids), text, "ordinary text round-trips");
    let special = tok.encode_with_special(&text).expect("cl100k encodes any text");
    assert_eq!(tok.decode(&special), text, "text with special-token markup round-trips");
    // Streaming the ids gives the same text.
    assert_eq!(stream(&ids), text);
}

fn ids(bytes: &[u8]) {
    let tok = crate::cl100k();
    let mut u = Unstructured::new(bytes);
    let Ok(stops) = u.arbitrary::<Vec<String>>() else { return };
    // Mostly ids near and past the vocabulary's end, where cl100k has holes and YOCO pads.
    let ids: Vec<u32> = u
        .take_rest()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .map(|id| match id % 4 {
            0 => id,
            1 => 100_250 + id % 50,
            _ => (id >> 2) % 100_300,
        })
        .collect();
    let whole = tok.decode(&ids);
    let streamed = stream(&ids);
    if !whole.contains('\u{FFFD}') {
        assert_eq!(streamed, whole);
    }
    // The stop matcher on the streamed deltas never loses or invents text before the stop.
    let mut m = StopMatcher::new(stops);
    let mut d = IncrementalDetokenizer::default();
    let mut out = String::new();
    for &id in &ids {
        match m.push(&d.push(tok, id)) {
            StopOutcome::Continue(t) => out.push_str(&t),
            StopOutcome::Stopped { text, stop } => {
                out.push_str(&text);
                out.push_str(&stop);
                assert!(streamed.starts_with(&out), "{out:?} is not a prefix of {streamed:?}");
                return;
            }
        }
    }
    out.push_str(&m.push(&d.flush(tok)).text());
    out.push_str(&m.flush());
}

/// The text of `ids` one token at a time, as the coordinator streams it.
fn stream(ids: &[u32]) -> String {
    let tok = crate::cl100k();
    let mut d = IncrementalDetokenizer::default();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&d.push(tok, id));
    }
    out.push_str(&d.flush(tok));
    out
}

trait Text {
    fn text(self) -> String;
}

impl Text for StopOutcome {
    fn text(self) -> String {
        match self {
            StopOutcome::Continue(t) => t,
            StopOutcome::Stopped { text, .. } => text,
        }
    }
}
