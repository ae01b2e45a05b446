//! yoco's gRPC contracts, generated from the `.proto` files beside this crate.

/// The public API: `yoco.v1.Generation`.
pub mod v1 {
    tonic::include_proto!("yoco.v1");
}

/// The coordinator-worker API: `yoco.worker.v1.Worker`.
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("yoco.worker.v1");
    }
}

/// Encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("yoco_descriptor");
