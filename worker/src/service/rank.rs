//! What a loaded rank runs its steps on: the CPU engine of a worker group ([`Executor`], any
//! number of ranks, tensor parallelism, TCP or NCCL between them), or the backend forward pass
//! on one device ([`ForwardRunner`]: the CUDA backend, alone or in a context-parallel group),
//! behind one interface.

use tonic::Status;
use yoco_proto::worker::v1 as pb;

use super::status;
use crate::backend::runner::ForwardRunner;
use crate::backend::{Backend, ForwardError};
use crate::comm::Spent;
use crate::engine::SeqId;
use crate::executor::{Executor, Plan, SeqResult};

/// Where a worker computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU engine: every group size, tensor parallelism.
    Cpu,
    /// The CUDA backend on this GPU: one-rank and context-parallel groups.
    Cuda(usize),
    /// The backend forward pass of the CUDA path on the CPU backend: the GPU path's
    /// orchestration (batched decode, snapshots, plans, context parallelism) run where there is
    /// no GPU.
    CpuBackend,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CpuBackend => f.write_str("cpu-backend"),
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
    /// `auto`, `cpu`, `cuda` (GPU 0), `cuda:N`, or `cpu-backend`.
    pub fn parse(s: &str) -> Result<DeviceRequest, String> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Named(Device::Cpu)),
            "cpu-backend" => Ok(DeviceRequest::Named(Device::CpuBackend)),
            "cuda" => Ok(DeviceRequest::Named(Device::Cuda(0))),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::Named(Device::Cuda(n))),
                _ => Err(format!("device `{s}`: expected auto, cpu, cuda, cuda:<ordinal> or cpu-backend")),
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
    /// Asked for by name (`cuda`, `cuda:N`, `cpu-backend`), not picked by `auto`: a group the
    /// device cannot serve is then refused instead of served on the CPU engine.
    pub explicit: bool,
}

#[cfg(feature = "cuda")]
fn auto_device() -> Device {
    if crate::cuda::driver::gpu_count() > 0 {
        Device::Cuda(0)
    } else {
        tracing::info!("no GPU found (no NVIDIA driver or no device): the CPU engine serves");
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
    /// What Info reports about the rank (the fields the service fills in left empty).
    fn info(&self) -> pb::InfoResponse;
}

impl Rank for Executor {
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
            device: Device::Cpu.to_string(),
            max_sequences: 0,
            ..pb::InfoResponse::default()
        }
    }
}

/// A rank on a device backend.
pub(crate) struct DeviceRank<B: Backend> {
    pub runner: ForwardRunner<B>,
    pub device: Device,
    pub weight_bytes: usize,
    pub weight_dtype: &'static str,
    /// Set by a backend failure (a device error): the rank's state can no longer be trusted,
    /// so every later step is refused until the model is loaded again.
    pub broken: Option<String>,
}

/// The one place forward-pass errors become gRPC statuses.
fn forward_status(e: ForwardError) -> Status {
    match e {
        ForwardError::CacheFull { .. } | ForwardError::NoFreeSlot(_) | ForwardError::PeerRefused { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        ForwardError::Backend(_) => Status::internal(e.to_string()),
        ForwardError::Comm(_) => Status::unavailable(e.to_string()),
        ForwardError::Unsupported(_) => Status::failed_precondition(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl<B: Backend> Rank for DeviceRank<B>
where
    ForwardRunner<B>: Send,
{
    fn execute(&mut self, plan: &Plan) -> Result<Vec<SeqResult>, Status> {
        if let Some(why) = &self.broken {
            return Err(Status::unavailable(format!(
                "the {} backend failed earlier ({why}): load the model again",
                self.device
            )));
        }
        self.runner.execute(plan).map_err(|e| {
            if let ForwardError::Backend(b) = &e {
                tracing::error!(error = %b, "device backend failed: this rank is broken until the next LoadModel");
                self.broken = Some(b.to_string());
            }
            forward_status(e)
        })
    }
    fn free(&mut self, ids: &[SeqId]) {
        self.runner.free(ids)
    }
    fn take_collective_spent(&mut self) -> Spent {
        // A device group is context-parallel only: every exchange is the column's.
        Spent { cp: self.runner.take_collective_time(), ..Spent::default() }
    }
    fn cache_used_bytes(&self) -> usize {
        self.runner.forward().used_cache_bytes()
    }
    fn info(&self) -> pb::InfoResponse {
        let fwd = self.runner.forward();
        let (snapshots, snapshot_bytes) = self.runner.snapshot_usage();
        pb::InfoResponse {
            rank: fwd.rank() as u32,
            world: fwd.world() as u32,
            tp: 1,
            weight_bytes: self.weight_bytes as u64,
            cache_capacity_tokens: fwd.capacity_tokens() as u64,
            cache_used_bytes: fwd.used_cache_bytes() as u64,
            sequences: self.runner.sequences() as u32,
            snapshots: snapshots as u32,
            snapshot_state_bytes: snapshot_bytes as u64,
            cache_dtype: fwd.options().cache_dtype.name().to_string(),
            weight_dtype: self.weight_dtype.to_string(),
            broken: self.broken.clone().or_else(|| fwd.broken().map(|e| e.to_string())).unwrap_or_default(),
            device: self.device.to_string(),
            max_sequences: fwd.options().max_sequences as u32,
            ..pb::InfoResponse::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        let named = [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
            ("cpu-backend", Device::CpuBackend),
        ];
        for (s, device) in named {
            let asked = DeviceRequest::parse(s).unwrap();
            assert_eq!(asked, DeviceRequest::Named(device));
            assert_eq!(asked.resolve(), DeviceChoice { device, explicit: true });
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        assert_eq!(Device::CpuBackend.to_string(), "cpu-backend");
        // Without the `cuda` feature, or without a GPU, `auto` is the CPU engine.
        let auto = DeviceRequest::parse("auto").unwrap().resolve();
        assert!(!auto.explicit);
        if !cfg!(feature = "cuda") {
            assert_eq!(auto.device, Device::Cpu);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = DeviceRequest::parse(bad).unwrap_err();
            assert!(err.contains("expected auto, cpu"), "{bad}: {err}");
        }
    }
}
