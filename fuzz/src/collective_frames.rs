//! The TCP collective's wire format, as a corrupt or hostile peer could send it: a stream of
//! frames read one after the other (each must be the next in sequence), the 16-byte hello of a
//! connecting rank, and frames written by `write_frame` read back bit for bit.
//!
//! A header may announce up to 8 GiB; the reader must fail on the missing bytes without having
//! allocated what was announced (libFuzzer's `-malloc_limit_mb`, which defaults to
//! `-rss_limit_mb`, reports any single allocation above it as a crash).

use std::io::Cursor;

use arbitrary::Unstructured;
use yoco_worker::comm::CommError;
use yoco_worker::fuzzing;

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => stream(rest),
        1 => hello(rest),
        _ => round_trip(rest),
    }
}

fn stream(bytes: &[u8]) {
    let mut r = Cursor::new(bytes);
    for seq in 0.. {
        let before = r.position();
        match fuzzing::read_frame(&mut r, seq, 1) {
            Ok(frame) => assert_eq!(r.position() - before, 20 + 4 * frame.len() as u64),
            Err(e) => {
                assert!(matches!(e, CommError::PeerLost { peer: 1 } | CommError::Protocol { peer: 1, .. }), "{e:?}");
                return;
            }
        }
    }
}

fn hello(bytes: &[u8]) {
    let Some((&world, rest)) = bytes.split_first() else { return };
    let world = world as usize;
    let Some(b) = rest.first_chunk::<16>() else { return };
    // The attempt this rank forms, from the 4 bytes after the hello (0 when absent).
    let formation = rest.get(16..20).map_or(0, |f| u32::from_le_bytes(f.try_into().expect("4 bytes")));
    if let Ok(rank) = fuzzing::parse_hello(b, world, formation) {
        // An accepted hello names a rank of the group, and is what that rank would send.
        assert!(rank < world, "rank {rank} of {world}");
        assert_eq!(fuzzing::hello(rank, world, formation), *b);
    }
}

fn round_trip(bytes: &[u8]) {
    let mut u = Unstructured::new(bytes);
    let Ok(frames) = u.arbitrary::<Vec<Vec<u32>>>() else { return };
    let mut wire = Vec::new();
    for (seq, bits) in frames.iter().enumerate() {
        let data: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        fuzzing::write_frame(&mut wire, seq as u64, &data).expect("writing to memory");
    }
    let mut r = Cursor::new(wire.as_slice());
    for (seq, bits) in frames.iter().enumerate() {
        let got = fuzzing::read_frame(&mut r, seq as u64, 0).expect("a frame that was written reads back");
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), *bits);
    }
    assert_eq!(r.position() as usize, wire.len());
    // A frame read out of order is refused.
    if !frames.is_empty() {
        let err = fuzzing::read_frame(&mut Cursor::new(wire.as_slice()), 1, 0).unwrap_err();
        assert!(matches!(err, CommError::Protocol { .. }), "{err:?}");
    }
}
