//! The yoco coordinator and command line as a library: the binary `yoco` (main.rs) and the
//! fuzz targets (`fuzz/`) use it.

pub mod api;
pub mod auth;
pub mod bench;
pub mod bench_prefix;
pub mod bench_serve;
pub mod chat;
pub mod client;
pub mod cluster;
pub mod default_model;
pub mod detok;
pub mod generate;
pub mod group;
pub mod init_model;
pub mod limits;
pub mod listen;
pub mod membership;
pub mod metrics;
pub mod openai;
pub mod prompt_args;
pub mod request;
pub mod router;
pub mod scheduler;
pub mod serve;
pub mod tls;
pub mod worker_cmd;
