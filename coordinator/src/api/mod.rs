//! The public gRPC service `yoco.v1.Generation`: requests are validated here, then handed to
//! the scheduler; its events stream back to the client.

pub mod auth;
pub mod chat_template;
pub mod limits;
pub mod router;
pub mod validate;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_server::Generation;
use yoco_worker::tokenizer::Tokenizer;

use crate::api::auth::KeyId;
use crate::api::limits::{RequestLimits, StreamCounts};
use crate::api::router::{Ready, Router};
use crate::api::validate::{prompt_tokens, validate};
use crate::scheduler::request::{GenRequest, Hold, RequestError};

/// Largest request or response message of the public API: a million-token prompt as text or
/// ids is a few MB.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The front both APIs (gRPC and HTTP) share: tokenizer, the serving groups, request ids.
#[derive(Clone)]
pub struct Api {
    tokenizer: Arc<Tokenizer>,
    chat: Arc<Option<crate::api::chat_template::ChatTemplate>>,
    router: Arc<Router>,
    next_id: Arc<AtomicU64>,
    /// Log each request's prompt (off: logs carry ids and lengths, never text).
    log_prompts: bool,
    limits: Arc<RequestLimits>,
    streams: Arc<StreamCounts>,
}

impl Api {
    pub fn new(tokenizer: Arc<Tokenizer>, chat: Option<crate::api::chat_template::ChatTemplate>) -> Self {
        Api {
            tokenizer,
            chat: Arc::new(chat),
            router: Arc::new(Router::default()),
            next_id: Arc::new(AtomicU64::new(1)),
            log_prompts: false,
            limits: Arc::default(),
            streams: Arc::default(),
        }
    }

    /// Server-wide request limits.
    pub fn request_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = Arc::new(limits);
        self
    }

    /// Where the server puts the groups as they form (and takes them out as they go).
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }

    /// Logs every request's prompt (text or ids) at info level.
    pub fn log_prompts(mut self, on: bool) -> Self {
        self.log_prompts = on;
        self
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&crate::api::chat_template::ChatTemplate> {
        self.chat.as_ref().as_ref()
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Validates a request and queues it. `caller` is the API key that passed the check, if
    /// keys are on.
    pub async fn submit(
        &self,
        req: pb::GenerateRequest,
        arrived: Instant,
        deadline: Option<Instant>,
        caller: Option<KeyId>,
    ) -> Result<Submitted, RequestError> {
        let slot = match (caller, self.limits.max_streams_per_key) {
            (Some(key), Some(limit)) => Some(Hold(Arc::new(self.streams.open(key, limit)?))),
            _ => None,
        };
        let deadline = self.limits.deadline(arrived, deadline);
        let ready = self.router.route().ok_or_else(no_group)?;
        let (tokenizer, limits, fresh) = (self.tokenizer.clone(), ready.limits.clone(), self.fresh_id());
        if self.log_prompts {
            match &req.prompt {
                Some(pb::generate_request::Prompt::Text(t)) => tracing::info!(request = %fresh, prompt = %t, "prompt"),
                Some(pb::generate_request::Prompt::TokenIds(ids)) => {
                    tracing::info!(request = %fresh, prompt_ids = ?ids.ids, "prompt")
                }
                None => {}
            }
        }
        // Tokenizing a long text prompt takes a while: off the async threads.
        let gen = tokio::task::spawn_blocking(move || {
            let prompt = prompt_tokens(&req, &tokenizer)?;
            validate(&req, prompt, &tokenizer, &limits, arrived, deadline, || fresh)
        })
        .await
        .map_err(|e| RequestError::Internal(format!("validation task failed: {e}")))??;
        self.limits.check_prompt(gen.prompt.len())?;
        let gen = GenRequest { hold: slot, ..gen };
        let (id, prompt_tokens) = (gen.id.clone(), gen.prompt.len());
        tracing::info!(
            request = %id, group = %ready.name, prompt_tokens, max_tokens = gen.max_tokens,
            "request"
        );
        Ok(Submitted { id, prompt_tokens, events: ready.scheduler.submit(gen)? })
    }

    /// The group the next request would go to.
    pub fn ready(&self) -> Result<Arc<Ready>, RequestError> {
        self.router.pick().ok_or_else(no_group)
    }

    /// Drops every group's cached prefixes; the snapshots dropped now and still in use.
    pub async fn flush_prefix_cache(&self) -> Result<(usize, usize), Status> {
        let (mut dropped, mut in_use) = (0, 0);
        for g in self.router.all() {
            let (d, u) = g.scheduler.flush_prefix_cache().await?;
            (dropped, in_use) = (dropped + d, in_use + u);
        }
        Ok((dropped, in_use))
    }

    fn fresh_id(&self) -> String {
        format!("gen-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// A queued request: its id, its prompt's length in tokens and its events.
pub struct Submitted {
    pub id: String,
    pub prompt_tokens: usize,
    pub events: crate::scheduler::EventStream,
}

fn group_status(g: &Ready) -> pb::GroupStatus {
    let (running, waiting) = g.scheduler.load();
    pb::GroupStatus {
        name: g.name.clone(),
        world: g.group.ranks.len() as u32,
        accepting: g.scheduler.accepting(),
        running: running as u32,
        waiting: waiting as u32,
        routed: g.routed.load(Ordering::Relaxed),
        addresses: g.group.ranks.iter().map(|r| r.address.clone()).collect(),
    }
}

fn no_group() -> RequestError {
    RequestError::Unavailable("the server is starting: no worker group has formed yet, or none is serving".into())
}

/// gRPC's view of a refused request: the one place its codes are chosen.
impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match &e {
            RequestError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            RequestError::Busy(m) => Status::resource_exhausted(m),
            RequestError::Unavailable(m) => Status::unavailable(m),
            RequestError::Internal(m) => Status::internal(m),
        }
    }
}

/// The deadline a client set with the standard `grpc-timeout` header (`<digits><unit>`).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for Api {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        let deadline = grpc_timeout(request.metadata()).and_then(|d| arrived.checked_add(d));
        let caller = request.extensions().get::<KeyId>().copied();
        let Submitted { id, events, .. } = self.submit(request.into_inner(), arrived, deadline, caller).await?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(events)
            .map(move |e| e.map(|event| pb::GenerateResponse { request_id: id.clone(), event: Some(event) }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let text = request.into_inner().text;
        let tokenizer = self.tokenizer.clone();
        let ids = tokio::task::spawn_blocking(move || tokenizer.encode(&text))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("text: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let ids = request.into_inner().ids;
        let vocab = self.ready()?.limits.vocab_size;
        if let Some((i, bad)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "ids: id {i} is {bad}, outside the vocabulary (size {vocab})"
            )));
        }
        let tokenizer = self.tokenizer.clone();
        let text = tokio::task::spawn_blocking(move || tokenizer.decode(&ids))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let ready = self.ready()?;
        let infos = ready.group.info().await.map_err(|e| Status::unavailable(format!("worker group: {e:#}")))?;
        let cap = ready.scheduler.capacity();
        let config = ready.scheduler.config();
        let (running, waiting) = ready.scheduler.load();
        let prefix = ready.scheduler.prefix_stats();
        let ranks = infos
            .iter()
            .zip(&ready.group.ranks)
            .enumerate()
            .map(|(rank, (info, r))| pb::WorkerRank {
                rank: rank as u32,
                address: r.address.clone(),
                cache_capacity_tokens: info.cache_capacity_tokens,
                cache_used_bytes: info.cache_used_bytes,
                sequences: info.sequences,
                weight_bytes: info.weight_bytes,
                device: r.device.clone(),
            })
            .collect();
        Ok(Response::new(pb::ModelInfoResponse {
            model: ready.group.model_dir.clone(),
            config_json: ready.group.config_json.clone(),
            vocab_size: ready.limits.vocab_size as u32,
            tokenizer: self.tokenizer.name().to_string(),
            eos_token_id: self.tokenizer.eos_token().filter(|&t| (t as usize) < ready.limits.vocab_size),
            world: infos.len() as u32,
            tp: (infos.len() / cap.world.max(1)) as u32,
            cp: cap.world as u32,
            ranks,
            transport: ready.group.transport.clone(),
            cache_bytes_per_token: ready.cache_bytes_per_token as u64,
            cache_capacity_tokens: cap.max_request_tokens() as u64,
            max_request_tokens: ready.limits.max_request_tokens as u64,
            max_batch_tokens: config.max_batch_tokens as u32,
            max_queue: config.max_queue as u32,
            max_running: config.max_running as u32,
            running: running as u32,
            waiting: waiting as u32,
            prefix_cache: prefix.is_some(),
            prefix_cache_snapshots: prefix.map_or(0, |p| p.snapshots as u32),
            prefix_cache_blocks: prefix.map_or(0, |p| p.blocks as u64),
            groups: self.router.all().iter().map(|g| group_status(g)).collect(),
        }))
    }

    async fn flush_prefix_cache(
        &self,
        _: Request<pb::FlushPrefixCacheRequest>,
    ) -> Result<Response<pb::FlushPrefixCacheResponse>, Status> {
        let (dropped, in_use) = self.flush_prefix_cache().await?;
        Ok(Response::new(pb::FlushPrefixCacheResponse { dropped: dropped as u32, in_use: in_use as u32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (v, d) in
            [("5S", Duration::from_secs(5)), ("250m", Duration::from_millis(250)), ("2M", Duration::from_secs(120))]
        {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(d));
        }
        m.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
