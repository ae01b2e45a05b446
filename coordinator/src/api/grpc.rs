//! The public gRPC service `yoco.v1.Generation` over [`Api`]: the one place where requests'
//! errors become gRPC statuses and the scheduler's events become `GenerateResponse` messages.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_server::Generation;

use super::auth::KeyId;
use super::router::Ready;
use super::{Api, Submitted};
use crate::scheduler::event::{End, Event, Finished};
use crate::scheduler::request::RequestError;

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

/// A scheduler event as the public API's message.
fn event_to_pb(e: Event) -> pb::generate_response::Event {
    use pb::generate_response::Event as E;
    let top = |t: &[(u32, f32)]| -> Vec<pb::TopLogprob> {
        t.iter().map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob }).collect()
    };
    match e {
        Event::Progress(p) => E::Progress(pb::PrefillProgress {
            prefilled_tokens: p.prefilled_tokens as u64,
            prompt_tokens: p.prompt_tokens as u64,
            elapsed_seconds: p.elapsed_seconds,
        }),
        Event::PromptLogprobs(lps) => {
            let asked = lps.iter().any(|p| !p.top_logprobs.is_empty());
            E::PromptLogprobs(pb::PromptLogprobs {
                logprobs: lps.iter().map(|p| p.logprob).collect(),
                top_logprobs: if asked {
                    lps.iter().map(|p| pb::TopLogprobs { alternatives: top(&p.top_logprobs) }).collect()
                } else {
                    Vec::new()
                },
            })
        }
        Event::Tokens(c) => E::Tokens(pb::TokenChunk {
            tokens: c
                .tokens
                .iter()
                .map(|s| pb::Token { id: s.token, logprob: s.logprob, top_logprobs: top(&s.top_logprobs) })
                .collect(),
            text: c.text,
        }),
        Event::Finished(f) => {
            use pb::finished::Matched;
            let (reason, matched, error) = match f.end {
                End::Length => (pb::FinishReason::Length, None, String::new()),
                End::StopString(s) => (pb::FinishReason::Stop, Some(Matched::StopString(s)), String::new()),
                End::StopToken(t) => (pb::FinishReason::Stop, Some(Matched::StopTokenId(t)), String::new()),
                End::Cancelled(why) => (pb::FinishReason::Cancelled, None, why),
                End::Failed(e) => (pb::FinishReason::Error, None, e.to_string()),
            };
            let (u, t) = (f.usage, f.timing);
            E::Finished(pb::Finished {
                reason: reason as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: u.prompt_tokens as u64,
                    completion_tokens: u.completion_tokens as u64,
                    cached_prompt_tokens: u.cached_prompt_tokens as u64,
                }),
                timing: Some(pb::Timing {
                    queue_seconds: t.queue_seconds,
                    time_to_first_token_seconds: t.time_to_first_token_seconds,
                    prefill_tokens_per_second: t.prefill_tokens_per_second,
                    decode_tokens_per_second: t.decode_tokens_per_second,
                    total_seconds: t.total_seconds,
                }),
                seed: f.seed,
                matched,
                error,
            })
        }
    }
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
        // A failed request's final message, then its error status: the status is set aside when
        // the final message passes and read once the events have ended.
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let set = failed.clone();
        let messages = tokio_stream::wrappers::UnboundedReceiverStream::new(events).map(move |e| {
            if let Event::Finished(Finished { end: End::Failed(e), .. }) = &e {
                *set.lock().unwrap_or_else(|p| p.into_inner()) = Some(Status::from(e.clone()));
            }
            Ok(pb::GenerateResponse { request_id: id.clone(), event: Some(event_to_pb(e)) })
        });
        let status = std::iter::from_fn(move || failed.lock().unwrap_or_else(|p| p.into_inner()).take().map(Err));
        let stream = messages.chain(tokio_stream::iter(status));
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
            prefix_disk_snapshots: prefix.map_or(0, |p| p.disk_snapshots as u32),
            prefix_disk_bytes: prefix.map_or(0, |p| p.disk_bytes),
            groups: self.router.all().iter().map(|g| group_status(g)).collect(),
        }))
    }

    async fn flush_prefix_cache(
        &self,
        _: Request<pb::FlushPrefixCacheRequest>,
    ) -> Result<Response<pb::FlushPrefixCacheResponse>, Status> {
        let (dropped, in_use) = Api::flush_prefix_cache(self).await?;
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
