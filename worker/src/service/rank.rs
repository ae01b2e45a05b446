//! What a loaded rank runs its steps on: the one engine ([`Executor`] over
//! [`crate::engine::Engine`]) on the CPU backend or the CUDA one, for any `tp × cp` grid, behind
//! one interface the service drives.

use tonic::Status;
use yoco_proto::worker::v1 as pb;

use super::status;
use crate::backend::Backend;
use crate::comm::Spent;
use crate::executor::Executor;
use crate::plan::{Plan, SeqId, SeqResult, SnapshotFiles, SnapshotFilesReport};
use crate::snapshot_store::SnapshotStore;

/// Where a worker computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend on this GPU.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A worker's `--device`, as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// A GPU when this build has CUDA and the machine a GPU, else the CPU engine.
    Auto,
    Named(Device),
}

impl DeviceRequest {
    /// `auto`, `cpu`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<DeviceRequest, String> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Named(Device::Cpu)),
            "cuda" => Ok(DeviceRequest::Named(Device::Cuda(0))),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::Named(Device::Cuda(n))),
                _ => Err(format!("device `{s}`: expected auto, cpu, cuda or cuda:<ordinal>")),
            },
        }
    }

    /// The device, `auto` resolved against this build and machine (one log line when a CUDA
    /// build finds no GPU).
    pub fn resolve(self) -> DeviceChoice {
        match self {
            DeviceRequest::Auto => DeviceChoice { device: auto_device(), explicit: false },
            DeviceRequest::Named(device) => DeviceChoice { device, explicit: true },
        }
    }
}

/// A worker's device, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceChoice {
    pub device: Device,
    /// Asked for by name (`cpu`, `cuda`, `cuda:N`), not picked by `auto`.
    pub explicit: bool,
}

#[cfg(feature = "cuda")]
fn auto_device() -> Device {
    if crate::cuda::driver::gpu_count() > 0 {
        Device::Cuda(0)
    } else {
        tracing::info!("no GPU found (no NVIDIA driver or no device): the CPU backend serves");
        Device::Cpu
    }
}

#[cfg(not(feature = "cuda"))]
fn auto_device() -> Device {
    Device::Cpu
}

/// A loaded rank, as the service drives it.
pub(crate) trait Rank: Send {
    fn execute(&mut self, plan: &Plan) -> Result<Vec<SeqResult>, Status>;
    fn free(&mut self, ids: &[SeqId]);
    /// Time spent in collectives since the last call.
    fn take_collective_spent(&mut self) -> Spent;
    fn cache_used_bytes(&self) -> usize;
    /// The disk tier's store of this rank (see [`Executor::open_store`]).
    fn open_store(&self, root: &std::path::Path, fingerprint: String) -> std::io::Result<SnapshotStore>;
    fn snapshot_files(&mut self, store: Option<&SnapshotStore>, req: &SnapshotFiles) -> SnapshotFilesReport;
    /// What Info reports about the rank (the fields the service fills in left empty).
    fn info(&self) -> pb::InfoResponse;
}

impl<B: Backend> Rank for Executor<B>
where
    Executor<B>: Send,
{
    fn execute(&mut self, plan: &Plan) -> Result<Vec<SeqResult>, Status> {
        Executor::execute(self, plan).map_err(status)
    }
    fn free(&mut self, ids: &[SeqId]) {
        Executor::free(self, ids)
    }
    fn take_collective_spent(&mut self) -> Spent {
        Executor::take_collective_spent(self)
    }
    fn cache_used_bytes(&self) -> usize {
        self.engine().pool().used_bytes()
    }
    fn open_store(&self, root: &std::path::Path, fingerprint: String) -> std::io::Result<SnapshotStore> {
        Executor::open_store(self, root, fingerprint)
    }
    fn snapshot_files(&mut self, store: Option<&SnapshotStore>, req: &SnapshotFiles) -> SnapshotFilesReport {
        Executor::snapshot_files(self, store, req)
    }
    fn info(&self) -> pb::InfoResponse {
        let engine = self.engine();
        let (snapshots, snapshot_bytes) = engine.snapshot_usage();
        pb::InfoResponse {
            rank: engine.rank() as u32,
            world: engine.world() as u32,
            tp: engine.tp_size() as u32,
            weight_bytes: engine.model().weight_bytes() as u64,
            cache_capacity_tokens: engine.pool().capacity_tokens() as u64,
            cache_used_bytes: engine.pool().used_bytes() as u64,
            sequences: engine.sequences() as u32,
            snapshots: snapshots as u32,
            snapshot_state_bytes: snapshot_bytes as u64,
            cache_dtype: engine.pool().dtype().name().to_string(),
            weight_dtype: engine.model().weight_dtype().to_string(),
            broken: engine.broken().map(|e| e.to_string()).unwrap_or_default(),
            max_sequences: engine.options().max_sequences as u32,
            compute_dtype: engine.backend().compute_name().to_string(),
            ..pb::InfoResponse::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        let named = [("cpu", Device::Cpu), ("cuda", Device::Cuda(0)), ("cuda:3", Device::Cuda(3))];
        for (s, device) in named {
            let asked = DeviceRequest::parse(s).unwrap();
            assert_eq!(asked, DeviceRequest::Named(device));
            assert_eq!(asked.resolve(), DeviceChoice { device, explicit: true });
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        // Without the `cuda` feature, or without a GPU, `auto` is the CPU.
        let auto = DeviceRequest::parse("auto").unwrap().resolve();
        assert!(!auto.explicit);
        if !cfg!(feature = "cuda") {
            assert_eq!(auto.device, Device::Cpu);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "", "cpu-backend"] {
            let err = DeviceRequest::parse(bad).unwrap_err();
            assert!(err.contains("expected auto, cpu"), "{bad}: {err}");
        }
    }
}
