//! The benchmarks' requests: token ids spread over the vocabulary, the same for the same salt
//! (so runs compare), generated to their length.

use yoco_proto::v1 as pb;

/// Token ids spread over the vocabulary (deterministic, so runs compare).
pub fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ salt as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// A request for `max_tokens` tokens after `ids`, end-of-text ignored.
pub fn request(ids: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}
