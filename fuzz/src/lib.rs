//! The bodies of the fuzz targets (`fuzz_targets/*.rs` are one line each). Every target calls
//! the production parsers and validators of `yoco` and `yoco-worker`, never a copy of them, and
//! asserts what their callers rely on: no panic, no unbounded allocation, and the invariants a
//! successful parse promises.

pub mod collective_frames;
pub mod generate_request;
pub mod model_config;
pub mod safetensors;
pub mod snapshot_file;
pub mod tokenizer;
pub mod worker_step;

use std::sync::OnceLock;

use yoco_worker::tokenizer::Tokenizer;

/// cl100k_base, built once per process (the coordinator's default tokenizer).
pub fn cl100k() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(Tokenizer::cl100k)
}
