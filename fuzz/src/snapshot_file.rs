//! Prefix-cache snapshot files as a worker reads them back from its disk tier
//! (`SnapshotStore::parse`, which `load` runs on a file's bytes): anything but a whole file
//! written for this layout and hash is refused with a reason, and what is accepted encodes and
//! parses again to the same image (the same bytes when encoded once more). The first byte picks a mode: odd, the input's last 32 bytes
//! are replaced by the SHA-256 of the rest (so that mutations reach the header and body parsing
//! behind the checksum); even, the input is taken as it is.

use sha2::{Digest, Sha256};
use yoco_worker::snapshot_store::{Layout, SnapshotStore};

/// The file name's hash every input is read as.
pub const HASH: [u8; 32] = [7; 32];

/// A rank's store of a small layout: blocks of 4 positions of 8 K and 8 V numbers (f32).
pub fn store() -> SnapshotStore {
    let layout = Layout {
        model: "ab".repeat(32),
        world: 2,
        tp: 1,
        rank: 1,
        block_tokens: 4,
        block_bytes: 2 * 4 * 8 * 4,
        cache_dtype: "f32".into(),
    };
    SnapshotStore::detached(layout, 16, 8)
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= 32 {
        let body = bytes.len() - 32;
        let digest = Sha256::digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&digest);
    }
    let s = store();
    match s.parse(&bytes, &HASH) {
        Ok((info, image)) => {
            assert_eq!(info.hash, HASH);
            assert_eq!(info.bytes, bytes.len() as u64);
            assert_eq!(info.rows, image.rows);
            assert!(image.blocks.iter().all(|b| b.len() == 2 * 4 * 8 * 4));
            let mut again = Vec::new();
            s.encode(&HASH, info.parent_hash.as_ref(), &image, &mut again).expect("encodes into memory");
            let (info2, image2) = s.parse(&again, &HASH).expect("an accepted image encodes to an accepted file");
            assert_eq!((info2.pos, info2.rows, info2.parent_hash), (info.pos, info.rows, info.parent_hash));
            // Bit for bit (states may hold NaNs, which no comparison of floats equates).
            let mut third = Vec::new();
            s.encode(&HASH, info2.parent_hash.as_ref(), &image2, &mut third).expect("encodes into memory");
            assert_eq!(third, again);
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}
