//! The yoco coordinator and command line as a library: the binary `yoco` (main.rs) and the
//! fuzz targets (`fuzz/`) use it.
//!
//! Rooms by concern; imports run one way, from the entry points down to the workers:
//! `cli`, `client`, `server` → `http` → `api` → `scheduler` → `cluster` → the worker API, with
//! `net`, `metrics` and `default_model` as leaves anyone may use.

pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod default_model;
pub mod http;
pub mod metrics;
pub mod net;
pub mod scheduler;
pub mod server;
