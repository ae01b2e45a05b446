//! The YOCO engine: model definition, CPU kernels, caches and generation.

pub mod config;
pub mod kernels;
pub mod weights;
