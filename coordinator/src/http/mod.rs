//! The HTTP API beside gRPC (axum): OpenAI-compatible `POST /v1/completions` (streaming as
//! server-sent events ending in `data: [DONE]`) and `GET /v1/models`, `POST /v1/chat/completions`
//! (with the model's chat template; a clear 400 for a model without one), `GET /health`
//! (liveness), `GET /ready` (a group is serving) and `GET /metrics` (Prometheus).
//!
//! A request is translated into the gRPC `GenerateRequest` and goes through the same validation
//! and scheduler. While a long prompt prefills, a stream carries its progress as SSE comment
//! lines (`: prefill 40960/1048576`), which clients ignore and people can watch with curl.
//! Streams follow OpenAI's `stream_options` (`include_usage`: a last chunk with the usage and no
//! choices) and vLLM's `continuous_usage_stats` (the usage so far in every chunk).

mod chat_completions;
mod completions;
mod error;
mod schema;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use self::error::ApiError;
use self::schema::{model_name, now_unix};
use crate::api::auth::ApiKeys;
use crate::api::Api;

/// The HTTP API; with `keys`, every route but the health probes needs an API key.
pub fn routes(api: Api, keys: Option<Arc<ApiKeys>>) -> Router {
    let guarded = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat_completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache));
    let guarded = match keys {
        Some(keys) => guarded.route_layer(axum::middleware::from_fn_with_state(keys, require_key)),
        None => guarded,
    };
    // Request bodies up to the gRPC API's message size: a million-token prompt is several MB
    // (axum's default would refuse anything over 2 MB).
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .merge(guarded)
        .layer(axum::extract::DefaultBodyLimit::max(crate::api::MAX_MESSAGE_BYTES))
        .with_state(api)
}

/// 401 with OpenAI's body for a missing or wrong key; nothing else is said.
async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match keys.check(header) {
        Some(id) => {
            req.extensions_mut().insert(id);
            next.run(req).await
        }
        None => ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            message: "invalid or missing API key (send `Authorization: Bearer <key>`)".into(),
            param: None,
        }
        .into_response(),
    }
}

/// vLLM's admin call of the same name: drops every cached prompt prefix.
async fn reset_prefix_cache(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let (dropped, in_use) = api.flush_prefix_cache().await?;
    Ok(Json(json!({"dropped": dropped, "in_use": in_use})))
}

async fn models(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let name = model_name(&api)?;
    let max = api.ready()?.limits.max_request_tokens;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": name, "object": "model", "created": now_unix(), "owned_by": "yoco", "max_model_len": max}],
    })))
}

async fn ready(State(api): State<Api>) -> Response {
    match api.ready() {
        Ok(r) if r.scheduler.accepting() => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "reason": "draining or failed"})))
            .into_response(),
        Err(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "reason": "starting"}))).into_response()
        }
    }
}

/// Prometheus text; the per-rank cache gauges are read from the workers at scrape time.
async fn metrics(State(api): State<Api>) -> Response {
    use crate::metrics::METRICS;
    let (mut used, mut cap, mut snapshots, mut blocks) = (0u64, 0u64, 0, 0);
    let (mut disk_snapshots, mut disk_bytes) = (0, 0);
    for ready in api.router().all() {
        if let Some(p) = ready.scheduler.prefix_stats() {
            (snapshots, blocks) = (snapshots + p.snapshots, blocks + p.blocks);
            (disk_snapshots, disk_bytes) = (disk_snapshots + p.disk_snapshots, disk_bytes + p.disk_bytes);
        }
        let Ok(infos) = ready.group.info().await else { continue };
        for info in &infos {
            let labels = [ready.name.as_str(), &info.rank.to_string()];
            METRICS.cache_used_bytes.with_label_values(&labels).set(info.cache_used_bytes as i64);
            METRICS.cache_capacity_bytes.with_label_values(&labels).set(info.cache_budget_bytes as i64);
            let frac = info.cache_used_bytes as f64 / info.cache_budget_bytes.max(1) as f64;
            METRICS.cache_usage.with_label_values(&labels).set(frac);
            used += info.cache_used_bytes;
            cap += info.cache_budget_bytes;
        }
    }
    METRICS.group_cache_usage.set(used as f64 / cap.max(1) as f64);
    METRICS.prefix_cache_snapshots.set(snapshots as i64);
    METRICS.prefix_cache_blocks.set(blocks as i64);
    METRICS.prefix_disk_snapshots.set(disk_snapshots as i64);
    METRICS.prefix_disk_bytes.set(disk_bytes as i64);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], METRICS.render()).into_response()
}
