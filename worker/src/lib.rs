//! The YOCO engine: model definition, CPU kernels, caches and generation.

// Kernels index several arrays with one loop variable; iterator chains would hide the math.
#![allow(clippy::needless_range_loop)]

pub mod cache;
pub mod comm;
pub mod config;
pub mod cp;
pub mod engine;
pub mod executor;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod presets;
pub mod sampling;
pub mod service;
pub mod tokenizer;
pub mod weights;
