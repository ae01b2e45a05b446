//! The YOCO engine: model definition, CPU kernels, caches and generation.

// Kernels index several arrays with one loop variable; iterator chains would hide the math.
#![allow(clippy::needless_range_loop)]

pub mod alloc;
pub mod backend;
pub mod cache_groups;
pub mod ceilings;
pub mod comm;
pub mod config;
pub mod cp;
pub mod cuda;
pub mod engine;
pub mod executor;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod plan;
pub mod presets;
pub mod sampling;
pub mod service;
pub mod snapshot_store;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod test_alloc;

/// Entry points for the fuzz targets (`fuzz/`) into parsing code that is otherwise private to
/// its module. Not an API: it may change with the code it reaches.
#[doc(hidden)]
pub mod fuzzing {
    use std::io::{Read, Write};
    use std::time::Duration;

    use crate::comm::{tcp, CommError};

    /// The TCP collective's frame reader, on any byte source: frame number `expected_seq` of
    /// the link to `peer`.
    pub fn read_frame(r: &mut impl Read, expected_seq: u64, peer: usize) -> Result<Vec<f32>, CommError> {
        tcp::read_frame_from(r, expected_seq, peer, Duration::from_secs(1))
    }

    /// The TCP collective's frame writer, on any byte sink.
    pub fn write_frame(w: &mut impl Write, seq: u64, data: &[f32]) -> std::io::Result<()> {
        tcp::write_frame_to(w, seq, data)
    }

    /// The rank a connecting peer's 16-byte hello names, in a group of `world` formed as
    /// attempt `formation`.
    pub fn parse_hello(hello: &[u8; 16], world: usize, formation: u32) -> Result<usize, CommError> {
        tcp::parse_hello(hello, world, formation)
    }

    /// The hello that rank `rank` of a group of `world` sends in attempt `formation`.
    pub fn hello(rank: usize, world: usize, formation: u32) -> [u8; 16] {
        tcp::hello(rank, world, formation)
    }
}
