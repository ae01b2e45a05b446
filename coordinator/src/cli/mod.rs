//! The `yoco` subcommands that are neither a server nor the client: `generate` (one prompt,
//! in-process or on local workers), `bench`, `init-model`.

pub mod bench;
mod bench_torch;
pub mod generate_cmd;
pub mod init_model;
pub mod prompt_args;
