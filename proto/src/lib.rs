//! yoco's gRPC contracts, generated from the `.proto` files beside this crate.

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("yoco.worker.v1");
    }
}

/// Encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("yoco_descriptor");
