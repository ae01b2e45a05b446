//! Admission, whatever the transport: a request is validated (`validate`), checked against the
//! server's limits and the caller's key (`limits`, `auth`), routed to a group (`router`) and
//! queued on its scheduler; its events go back to the transport that asked, the gRPC service
//! (`grpc`) or the HTTP API (`crate::http`).

pub mod auth;
pub mod chat_template;
pub mod grpc;
pub mod limits;
pub mod router;
pub mod validate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use yoco_proto::v1 as pb;
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

    /// Requests a group caching a prompt's prefix may have beyond the least-loaded group and
    /// still be routed the prompt.
    /// How requests are spread over the groups (see [`crate::api::router`]).
    pub fn routing(mut self, policy: router::RoutePolicy, balance_threshold: usize) -> Self {
        self.router = Arc::new(Router::new(policy, balance_threshold));
        self
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
        // Validation checks against the group the request would go to if nothing were cached
        // (the groups serve one model; one too small for the request is not routed to).
        let provisional = self.router.pick().ok_or_else(no_group)?;
        let (tokenizer, limits, fresh) = (self.tokenizer.clone(), provisional.limits.clone(), self.fresh_id());
        if self.log_prompts {
            match &req.prompt {
                Some(pb::generate_request::Prompt::Text(t)) => tracing::info!(request = %fresh, prompt = %t, "prompt"),
                Some(pb::generate_request::Prompt::TokenIds(ids)) => {
                    tracing::info!(request = %fresh, prompt_ids = ?ids.ids, "prompt")
                }
                None => {}
            }
        }
        // Tokenizing a long text prompt and hashing it for the prefix caches take a while: off
        // the async threads.
        let (router, server_limits) = (self.router.clone(), self.limits.clone());
        let (gen, mut routed) = tokio::task::spawn_blocking(move || {
            let prompt = prompt_tokens(&req, &tokenizer)?;
            let gen = validate(&req, prompt, &tokenizer, &limits, arrived, deadline, || fresh)?;
            server_limits.check_prompt(gen.prompt.len())?;
            let routed = router.route(&gen.prompt, gen.prompt.len() + gen.max_tokens).ok_or_else(no_group)?;
            Ok::<_, RequestError>((gen, routed))
        })
        .await
        .map_err(|e| RequestError::Internal(format!("validation task failed: {e}")))??;
        let gen = GenRequest { hold: slot, ..gen };
        let (id, prompt_tokens) = (gen.id.clone(), gen.prompt.len());
        let ready = &routed.group;
        tracing::info!(
            request = %id, group = %ready.name, prompt_tokens, max_tokens = gen.max_tokens,
            route = routed.decision.label(), "request"
        );
        let events = ready.scheduler.submit_hashed(gen, routed.hashes.take())?;
        // Queued: the scheduler's counts show the request from now on.
        drop(routed);
        Ok(Submitted { id, prompt_tokens, events })
    }

    /// The group the next request would go to.
    pub fn ready(&self) -> Result<Arc<Ready>, RequestError> {
        self.router.pick().ok_or_else(no_group)
    }

    /// Drops every group's cached prefixes; the snapshots dropped now and still in use.
    pub async fn flush_prefix_cache(&self) -> Result<(usize, usize), RequestError> {
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

fn no_group() -> RequestError {
    RequestError::Unavailable("the server is starting: no worker group has formed yet, or none is serving".into())
}
