//! The YOCO engine: model definition, CPU kernels, caches and generation.

pub mod cache;
pub mod config;
pub mod engine;
pub mod kernels;
pub mod model;
pub mod weights;
