//! The worker's gRPC service (`yoco.worker.v1.Worker`): one rank of a worker group. The engine
//! runs on blocking threads; one step at a time. A rank computes on the CPU engine, or
//! (`--device cuda`, alone or in a context-parallel group) on the CUDA backend: see [`rank`].

pub mod convert;
pub mod rank;

pub use rank::{Device, DeviceChoice, DeviceRequest};

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use yoco_proto::worker::v1 as pb;
use yoco_proto::worker::v1::worker_server::Worker;

use crate::backend::ForwardOptions;
use crate::comm::{Collective, CommError, TcpCollective, TcpOptions};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::executor::Executor;
use crate::kernels::kv_block::CacheDtype;
use crate::model::{Model, TpShard};
use crate::weights::WeightDtype;
use rank::{DeviceRank, Rank};

/// Settings a worker starts with; LoadModel may override them.
#[derive(Debug, Clone)]
pub struct WorkerDefaults {
    pub model_dir: Option<PathBuf>,
    pub cache_budget_bytes: usize,
    pub device: DeviceChoice,
}

/// Self-decoder state slots a device backend allocates when LoadModel does not say.
const DEFAULT_MAX_SEQUENCES: usize = 256;

struct Loaded {
    exec: Box<dyn Rank>,
    model_dir: PathBuf,
    config_json: String,
    budget: usize,
}

pub struct WorkerService {
    defaults: WorkerDefaults,
    /// The socket peers reach this rank's collective on; kept to re-form the group.
    collective: TcpListener,
    state: Arc<Mutex<Option<Loaded>>>,
    /// The latest Info, answered without waiting for a running step.
    info: Arc<Mutex<pb::InfoResponse>>,
    /// The cancel flag of the LoadModel in progress: a newer one, or the coordinator dropping
    /// the call, sets it, so that a group half-formed with a lost rank is given up at once
    /// instead of at its collective timeout.
    loading: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    /// Held for the whole of a load: two loads never accept peers on the same socket at once.
    load_lock: Arc<Mutex<()>>,
}

/// Sets a load's cancel flag when its call ends, whether it finished or was dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl WorkerService {
    pub fn new(defaults: WorkerDefaults, collective: TcpListener) -> Self {
        WorkerService {
            defaults,
            collective,
            state: Arc::new(Mutex::new(None)),
            info: Arc::new(Mutex::new(pb::InfoResponse::default())),
            loading: Arc::new(Mutex::new(None)),
            load_lock: Arc::new(Mutex::new(())),
        }
    }

    pub fn collective_addr(&self) -> std::io::Result<SocketAddr> {
        self.collective.local_addr()
    }
}

fn info_of(l: &Loaded) -> pb::InfoResponse {
    pb::InfoResponse {
        loaded: true,
        model_dir: l.model_dir.display().to_string(),
        model_config_json: l.config_json.clone(),
        cache_budget_bytes: l.budget as u64,
        // `collective_addr` is filled in by Info from the listener.
        ..l.exec.info()
    }
}

/// The device a rank of a group computes on: the worker's, unless that is a device backend
/// (context parallelism, no tensor parallelism) and the group splits the weights (`tp > 1`),
/// which `auto` serves on the CPU engine (logged) and an explicit device refuses.
fn device_for(choice: DeviceChoice, rank: usize, world: usize, tp: usize) -> Result<Device, Status> {
    match choice.device {
        Device::Cpu => Ok(Device::Cpu),
        device if tp == 1 => Ok(device),
        device if choice.explicit => Err(Status::failed_precondition(format!(
            "--device {device} runs context-parallel groups, not tensor-parallel ones (tp {tp}); this is rank \
             {rank} of {world}: start the worker with --device cpu or auto, or form the group with tp 1"
        ))),
        device => {
            tracing::info!(%device, world, tp, "a tensor-parallel group: this rank runs on the CPU engine (the device backend has no tensor parallelism)");
            Ok(Device::Cpu)
        }
    }
}

/// A rank of a device backend, alone or in a context-parallel group (`comm`).
fn device_rank(
    model: &Model,
    device: Device,
    opts: ForwardOptions,
    comm: Option<Box<dyn Collective>>,
) -> Result<Box<dyn Rank>, Status> {
    use crate::backend::runner::ForwardRunner;
    use crate::backend::{Backend, Forward};
    let failed = |e: crate::backend::ForwardError| Status::failed_precondition(format!("{device}: {e}"));
    let (weight_bytes, weight_dtype) = (model.weight_bytes(), model.weight_dtype());
    fn forward<B: Backend>(
        b: B,
        model: &Model,
        opts: ForwardOptions,
        comm: Option<Box<dyn Collective>>,
    ) -> Result<Forward<B>, crate::backend::ForwardError> {
        match comm {
            Some(comm) => Forward::with_group(b, model, opts, comm),
            None => Forward::new(b, model, opts),
        }
    }
    match device {
        Device::CpuBackend => {
            let runner =
                ForwardRunner::new(forward(crate::backend::cpu::CpuBackend, model, opts, comm).map_err(failed)?);
            Ok(Box::new(DeviceRank { runner, device, weight_bytes, weight_dtype, broken: None }))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let gpu = crate::cuda::driver::CudaBackend::open(ordinal)
                .map_err(|e| Status::failed_precondition(format!("{device}: {e}")))?;
            let info = gpu.runtime().info().clone();
            tracing::info!(gpu = %info.name, capability = ?info.capability, memory_gib = info.total_bytes >> 30, "CUDA backend");
            let runner = ForwardRunner::new(forward(gpu, model, opts, comm).map_err(failed)?);
            Ok(Box::new(DeviceRank { runner, device, weight_bytes, weight_dtype, broken: None }))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            drop(comm);
            Err(Status::failed_precondition(format!("{device}: this worker was built without the `cuda` feature")))
        }
        Device::Cpu => unreachable!("the CPU engine is not a device backend"),
    }
}

/// The one place engine errors become gRPC statuses.
fn status(e: EngineError) -> Status {
    match e {
        EngineError::Cache(_) | EngineError::PeerRefused { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::Comm(_) => Status::unavailable(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the data half-written in a way we rely on:
    // the engine marks itself broken on failures that matter.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Nccl {
        device: usize,
    },
}

/// Forms this rank's collective: TCP, or NCCL bootstrapped over TCP.
fn form_group(
    rank: usize,
    addrs: &[SocketAddr],
    listener: TcpListener,
    opts: &TcpOptions,
    transport: Transport,
) -> Result<Box<dyn Collective>, CommError> {
    let tcp = TcpCollective::connect(rank, addrs, listener, opts)?;
    match transport {
        Transport::Tcp => Ok(Box::new(tcp)),
        #[cfg(feature = "cuda")]
        Transport::Nccl { device } => {
            let mut tcp = tcp;
            Ok(Box::new(crate::comm::NcclCollective::from_bootstrap(&mut tcp, device, opts.timeout)?))
        }
        #[cfg(not(feature = "cuda"))]
        Transport::Nccl { .. } => Err(CommError::Setup("built without the `cuda` feature".into())),
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let mut info = lock(&self.info).clone();
        info.collective_addr = self.collective_addr().map(|a| a.to_string()).unwrap_or_default();
        Ok(Response::new(info))
    }

    async fn load_model(&self, req: Request<pb::LoadModelRequest>) -> Result<Response<pb::LoadModelResponse>, Status> {
        let req = req.into_inner();
        let (rank, world) = (req.rank as usize, req.world as usize);
        if world == 0 || rank >= world || req.peer_addrs.len() != world {
            return Err(Status::invalid_argument(format!(
                "rank {rank} of world {world} with {} peer addresses: need 0 <= rank < world and one address per rank",
                req.peer_addrs.len()
            )));
        }
        let tp = req.tp.max(1) as usize;
        if !world.is_multiple_of(tp) {
            return Err(Status::invalid_argument(format!("tp {tp} must divide the group's {world} ranks")));
        }
        let device = device_for(self.defaults.device, rank, world, tp)?;
        let max_sequences = match req.max_sequences {
            0 => DEFAULT_MAX_SEQUENCES,
            // A device backend puts a step's sequences in a CUDA grid's y or z dimension.
            n if n > crate::cuda::ops::MAX_GRID_YZ => {
                let max = crate::cuda::ops::MAX_GRID_YZ;
                return Err(Status::invalid_argument(format!("max_sequences {n} exceeds {max}")));
            }
            n => n as usize,
        };
        let addrs = req
            .peer_addrs
            .iter()
            .map(|a| a.parse::<SocketAddr>().map_err(|e| Status::invalid_argument(format!("peer address `{a}`: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let model_dir = if req.model_dir.is_empty() {
            self.defaults
                .model_dir
                .clone()
                .ok_or_else(|| Status::invalid_argument("no model_dir given and none configured"))?
        } else {
            PathBuf::from(&req.model_dir)
        };
        let budget = if req.cache_budget_bytes == 0 {
            self.defaults.cache_budget_bytes
        } else {
            req.cache_budget_bytes as usize
        };
        let block_tokens = if req.block_tokens == 0 { 256 } else { req.block_tokens as usize };
        if block_tokens > 1 << 16 {
            return Err(Status::invalid_argument(format!("block_tokens {block_tokens} exceeds 65536")));
        }
        let cache_dtype = match req.cache_dtype.as_str() {
            "" => CacheDtype::F32,
            name => name.parse::<CacheDtype>().map_err(Status::invalid_argument)?,
        };
        let weight_dtype = req.weight_dtype.parse::<WeightDtype>().map_err(Status::invalid_argument)?;
        let timeout = if req.collective_timeout_seconds > 0.0 { req.collective_timeout_seconds } else { 120.0 };
        if !timeout.is_finite() || timeout > 86400.0 {
            return Err(Status::invalid_argument("collective_timeout_seconds must be at most a day"));
        }
        let transport = match req.transport.as_str() {
            "" | "tcp" => Transport::Tcp,
            // A rank on the CUDA backend talks NCCL from its own GPU.
            "nccl" if cfg!(feature = "cuda") => {
                Transport::Nccl { device: if let Device::Cuda(n) = device { n } else { req.device as usize } }
            }
            "nccl" => {
                return Err(Status::failed_precondition("this worker was built without the `cuda` feature: no NCCL"))
            }
            other => return Err(Status::invalid_argument(format!("transport `{other}`: expected `tcp` or `nccl`"))),
        };
        let listener = self.collective.try_clone().map_err(|e| Status::internal(e.to_string()))?;
        let (state, info) = (self.state.clone(), self.info.clone());
        let formation = req.formation;
        let cancel = Arc::new(AtomicBool::new(false));
        if let Some(previous) = lock(&self.loading).replace(cancel.clone()) {
            previous.store(true, Ordering::Release);
        }
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let load_lock = self.load_lock.clone();
        let started = Instant::now();
        let span = tracing::info_span!("load_model", rank, world, tp, %device, model = %model_dir.display());
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let _exclusive = lock(&load_lock);
            let cancelled = || {
                cancel.load(Ordering::Acquire).then(|| {
                    tracing::info!("load cancelled (a newer LoadModel, or the coordinator gave up)");
                    Status::cancelled("LoadModel cancelled: superseded, or the coordinator gave up on the group")
                })
            };
            if let Some(s) = cancelled() {
                return Err(s);
            }
            tracing::info!("loading the model and forming the group");
            // Drop the old group first: its sockets must close before peers re-form.
            *lock(&state) = None;
            *lock(&info) = pb::InfoResponse::default();
            let shard = TpShard { rank: rank % tp, size: tp };
            let model = Model::load_sharded(&model_dir, weight_dtype, shard)
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            let config_json = model.cfg.to_json().to_string();
            let opts = TcpOptions {
                timeout: Duration::from_secs_f64(timeout),
                connect_timeout: Duration::from_secs_f64(timeout),
                cancel: Some(cancel.clone()),
                formation,
            };
            let form = |listener| {
                form_group(rank, &addrs, listener, &opts, transport).map_err(|e| match cancelled() {
                    Some(s) => s,
                    None => Status::unavailable(e.to_string()),
                })
            };
            if device != Device::Cpu {
                let bytes_per_token = model.cfg.cache_numbers_per_token() * cache_dtype.bytes();
                let fwd_opts = ForwardOptions {
                    cache_dtype,
                    block_tokens,
                    cache_tokens: budget / bytes_per_token.max(1),
                    max_sequences,
                    ..ForwardOptions::default()
                };
                let comm = if world > 1 { Some(form(listener)?) } else { None };
                let exec = device_rank(&model, device, fwd_opts, comm)?;
                let loaded = Loaded { exec, model_dir, config_json, budget };
                let snapshot = info_of(&loaded);
                let mut slot = lock(&state);
                if let Some(s) = cancelled() {
                    return Err(s);
                }
                *lock(&info) = snapshot.clone();
                *slot = Some(loaded);
                tracing::info!(seconds = started.elapsed().as_secs_f64(), %device, "model loaded on the device backend");
                return Ok(Response::new(pb::LoadModelResponse {
                    info: Some(snapshot),
                    load_seconds: started.elapsed().as_secs_f64(),
                }));
            }
            let comm = form(listener)?;
            let engine = Engine::with_group(
                Arc::new(model),
                &EngineOptions { block_tokens, cache_budget_bytes: budget, cache_dtype, ..EngineOptions::default() },
                comm,
            )
            .map_err(status)?;
            let loaded = Loaded { exec: Box::new(Executor::new(engine)), model_dir, config_json, budget };
            let snapshot = info_of(&loaded);
            let mut slot = lock(&state);
            if let Some(s) = cancelled() {
                return Err(s);
            }
            *lock(&info) = snapshot.clone();
            *slot = Some(loaded);
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                weight_dtype = %snapshot.weight_dtype,
                "model loaded, group formed"
            );
            Ok(Response::new(pb::LoadModelResponse {
                info: Some(snapshot),
                load_seconds: started.elapsed().as_secs_f64(),
            }))
        })
        .await
        .map_err(|e| Status::internal(format!("load task failed: {e}")))?
    }

    async fn step(&self, req: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        let req = req.into_inner();
        let plan = convert::plan_from_pb(&req).map_err(Status::invalid_argument)?;
        let (state, info) = (self.state.clone(), self.info.clone());
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut guard = lock(&state);
            let loaded =
                guard.as_mut().ok_or_else(|| Status::failed_precondition("no model loaded: call LoadModel first"))?;
            let result = loaded.exec.execute(&plan);
            let spent = loaded.exec.take_collective_spent();
            *lock(&info) = info_of(loaded);
            let results = result?;
            Ok(Response::new(pb::StepResponse {
                step_id: req.step_id,
                results: results.iter().map(convert::result_to_pb).collect(),
                cache_used_bytes: loaded.exec.cache_used_bytes() as u64,
                step_seconds: started.elapsed().as_secs_f64(),
                collective_seconds: spent.total().as_secs_f64(),
                tp_collective_seconds: spent.tp.as_secs_f64(),
                cp_collective_seconds: spent.cp.as_secs_f64(),
            }))
        })
        .await
        .map_err(|e| Status::internal(format!("step task failed: {e}")))?
    }

    async fn free(&self, req: Request<pb::FreeRequest>) -> Result<Response<pb::FreeResponse>, Status> {
        let ids = req.into_inner().seq_ids;
        let (state, info) = (self.state.clone(), self.info.clone());
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&state);
            let loaded = guard.as_mut().ok_or_else(|| Status::failed_precondition("no model loaded"))?;
            loaded.exec.free(&ids);
            *lock(&info) = info_of(loaded);
            Ok(Response::new(pb::FreeResponse { cache_used_bytes: loaded.exec.cache_used_bytes() as u64 }))
        })
        .await
        .map_err(|e| Status::internal(format!("free task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device backends take one-rank and context-parallel groups; a tensor-parallel group runs
    /// on the CPU engine when the device was `auto`, and is refused when it was named.
    #[test]
    fn device_backends_serve_context_but_not_tensor_parallel_groups() {
        let named = DeviceChoice { device: Device::CpuBackend, explicit: true };
        let auto = DeviceChoice { device: Device::Cuda(0), explicit: false };
        assert_eq!(device_for(named, 0, 1, 1).unwrap(), Device::CpuBackend);
        assert_eq!(device_for(named, 1, 3, 1).unwrap(), Device::CpuBackend);
        assert_eq!(device_for(auto, 1, 2, 1).unwrap(), Device::Cuda(0));
        assert_eq!(device_for(auto, 1, 4, 2).unwrap(), Device::Cpu);
        let refused = device_for(named, 1, 4, 2).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("tensor-parallel"), "{refused:?}");
        let cpu = DeviceChoice { device: Device::Cpu, explicit: true };
        assert_eq!(device_for(cpu, 0, 4, 2).unwrap(), Device::Cpu);
    }

    /// A plan is checked before anything runs: invalid sampling is refused as such even on a
    /// worker with no model (which would otherwise answer FAILED_PRECONDITION).
    #[tokio::test]
    async fn invalid_sampling_is_invalid_argument_before_anything_runs() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let defaults = WorkerDefaults {
            model_dir: None,
            cache_budget_bytes: 1 << 20,
            device: DeviceChoice { device: Device::Cpu, explicit: true },
        };
        let svc = WorkerService::new(defaults, listener);
        let spec = |sampling| pb::SequenceSpec { seq_id: 1, sampling: Some(sampling), ..pb::SequenceSpec::default() };
        let valid = convert::sampling_to_pb(&crate::sampling::SamplingParams::default());
        let bad = [
            pb::Sampling { repetition_penalty: 20.0, ..valid },
            pb::Sampling { presence_penalty: -3.0, ..valid },
            pb::Sampling { frequency_penalty: f32::INFINITY, ..valid },
            pb::Sampling { temperature: 101.0, ..valid },
        ];
        for sampling in bad {
            let req = pb::StepRequest { step_id: 1, add: vec![spec(sampling)], ..Default::default() };
            let err = svc.step(Request::new(req)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{sampling:?}: {err}");
        }
        let req = pb::StepRequest { step_id: 2, add: vec![spec(valid)], ..Default::default() };
        let err = svc.step(Request::new(req)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    }
}
