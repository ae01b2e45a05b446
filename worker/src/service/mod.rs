//! The worker's gRPC service (`yoco.worker.v1.Worker`): one rank of a worker group. The engine
//! runs on blocking threads; one step at a time. A rank computes on the CPU backend or
//! (`--device cuda`) on the CUDA one, any `tp × cp` grid on either: see [`rank`].

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

use crate::comm::{Collective, CommError, TcpCollective, TcpOptions};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::executor::Executor;
use crate::kernels::kv_block::CacheDtype;
use crate::model::{Model, TpShard};
use crate::weights::{ComputeDtype, WeightDtype};
use rank::Rank;

/// Settings a worker starts with; LoadModel may override them.
#[derive(Debug, Clone)]
pub struct WorkerDefaults {
    pub model_dir: Option<PathBuf>,
    pub cache_budget_bytes: usize,
    pub device: DeviceChoice,
}

/// Sequences a GPU rank holds at once when LoadModel does not say (a CPU rank: no limit).
const DEFAULT_GPU_MAX_SEQUENCES: usize = 256;

struct Loaded {
    exec: Box<dyn Rank>,
    /// The prefix cache's disk tier on this rank, if the group has one.
    store: Option<crate::snapshot_store::SnapshotStore>,
    device: Device,
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
        device: l.device.to_string(),
        // `collective_addr` is filled in by Info from the listener.
        ..l.exec.info()
    }
}

/// A rank on `device`, alone or in a group (`comm`).
fn device_rank(
    model: &Model,
    device: Device,
    opts: &EngineOptions,
    comm: Box<dyn Collective>,
) -> Result<Box<dyn Rank>, Status> {
    let failed = |e: EngineError| Status::failed_precondition(format!("{device}: {e}"));
    match device {
        Device::Cpu => {
            let cpu = crate::backend::cpu::CpuBackend::for_model(model, opts);
            let engine = Engine::on_backend(cpu, model, opts, comm).map_err(failed)?;
            Ok(Box::new(Executor::new(engine)))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let gpu = crate::cuda::driver::CudaBackend::open(ordinal)
                .map_err(|e| Status::failed_precondition(format!("{device}: {e}")))?;
            let info = gpu.runtime().info().clone();
            tracing::info!(gpu = %info.name, capability = ?info.capability, memory_gib = info.total_bytes >> 30, "CUDA backend");
            Ok(Box::new(Executor::new(Engine::on_backend(gpu, model, opts, comm).map_err(failed)?)))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            drop(comm);
            Err(Status::failed_precondition(format!("{device}: this worker was built without the `cuda` feature")))
        }
    }
}

/// The one place engine errors become gRPC statuses.
fn status(e: EngineError) -> Status {
    match e {
        EngineError::Cache(_) | EngineError::PeerRefused { .. } | EngineError::TooManySequences(_) => {
            Status::resource_exhausted(e.to_string())
        }
        EngineError::Comm(_) => Status::unavailable(e.to_string()),
        EngineError::Backend(_) => Status::internal(e.to_string()),
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
        let device = self.defaults.device.device;
        let max_sequences = match req.max_sequences {
            0 if device == Device::Cpu => 0,
            0 => DEFAULT_GPU_MAX_SEQUENCES,
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
        let block_tokens =
            if req.block_tokens == 0 { crate::plan::DEFAULT_BLOCK_TOKENS } else { req.block_tokens as usize };
        if block_tokens > 1 << 16 {
            return Err(Status::invalid_argument(format!("block_tokens {block_tokens} exceeds 65536")));
        }
        let cache_dtype = match req.cache_dtype.as_str() {
            "" => CacheDtype::F32,
            name => name.parse::<CacheDtype>().map_err(Status::invalid_argument)?,
        };
        let compute_dtype = req.compute_dtype.parse::<ComputeDtype>().map_err(Status::invalid_argument)?;
        let weight_dtype = req.weight_dtype.parse::<WeightDtype>().map_err(Status::invalid_argument)?;
        // bf16 products take bf16 weights (a GPU rank keeps the weights it was asked for).
        let weight_dtype = if device == Device::Cpu { compute_dtype.weights(weight_dtype) } else { weight_dtype };
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
        let disk_dir = (!req.prefix_disk_dir.is_empty()).then(|| PathBuf::from(&req.prefix_disk_dir));
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
            let comm = form(listener)?;
            let opts = EngineOptions {
                block_tokens,
                cache_budget_bytes: budget,
                cache_dtype,
                max_sequences,
                compute_dtype,
                ..EngineOptions::default()
            };
            let exec = device_rank(&model, device, &opts, comm)?;
            let store = match disk_dir {
                None => None,
                Some(root) => {
                    let unusable = |e: std::io::Error| {
                        Status::failed_precondition(format!("prefix disk directory {}: {e}", root.display()))
                    };
                    let fingerprint = crate::snapshot_store::model_fingerprint(&model_dir).map_err(unusable)?;
                    let store = exec.open_store(&root, fingerprint).map_err(unusable)?;
                    tracing::info!(dir = %store.dir().display(), "prefix-cache disk tier");
                    Some(store)
                }
            };
            let loaded = Loaded { exec, store, device, model_dir, config_json, budget };
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
                %device,
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

    async fn snapshot_files(
        &self,
        req: Request<pb::SnapshotFilesRequest>,
    ) -> Result<Response<pb::SnapshotFilesResponse>, Status> {
        let files = convert::snapshot_files_from_pb(&req.into_inner()).map_err(Status::invalid_argument)?;
        let (state, info) = (self.state.clone(), self.info.clone());
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&state);
            let loaded = guard.as_mut().ok_or_else(|| Status::failed_precondition("no model loaded"))?;
            let report = loaded.exec.snapshot_files(loaded.store.as_ref(), &files);
            *lock(&info) = info_of(loaded);
            Ok(Response::new(convert::snapshot_report_to_pb(&report)))
        })
        .await
        .map_err(|e| Status::internal(format!("snapshot files task failed: {e}")))?
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
