//! Prometheus metrics (`GET /metrics` on the HTTP port), named like vLLM's where they apply
//! (same meanings and units) with a `yoco_` prefix: vLLM's `vllm:` puts a colon in the name,
//! which Prometheus reserves for recording rules (`promtool check metrics` flags every one). Beyond vLLM's: the global KV cache of
//! every rank (bytes and fraction), the live prefill progress of each prompt being prefilled, and
//! the prefix cache (queries and hits in tokens, like vLLM's, plus snapshots and blocks held).

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub prefill_tokens: IntCounter,
    pub requests_finished: IntCounterVec,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub step_seconds: HistogramVec,
    pub collective_seconds: Histogram,
    pub cache_used_bytes: IntGaugeVec,
    pub cache_capacity_bytes: IntGaugeVec,
    pub cache_usage: prometheus::GaugeVec,
    pub group_cache_usage: prometheus::Gauge,
    pub prefill_progress: IntGaugeVec,
    pub prefill_total: IntGaugeVec,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub prefix_cache_evictions: IntCounter,
    pub prefix_cache_snapshots: IntGauge,
    pub prefix_cache_blocks: IntGauge,
    pub prefix_disk_hits: IntCounter,
    pub prefix_disk_writes: IntCounter,
    pub prefix_disk_reads: IntCounter,
    pub prefix_disk_failures: IntCounterVec,
    pub prefix_disk_evictions: IntCounter,
    pub prefix_disk_snapshots: IntGauge,
    pub prefix_disk_bytes: IntGauge,
    pub route_decisions: IntCounterVec,
    pub route_cached_tokens: IntCounterVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let requests_finished = IntCounterVec::new(
            Opts::new("yoco_request_success_total", "Requests finished, by finish reason"),
            &["finished_reason"],
        )?;
        registry.register(Box::new(requests_finished.clone()))?;
        let step_seconds = HistogramVec::new(
            HistogramOpts::new("yoco_step_seconds", "Engine step time of the worker group (all ranks), by step kind")
                .buckets(latency_buckets()),
            &["kind"],
        )?;
        registry.register(Box::new(step_seconds.clone()))?;
        let cache_usage = prometheus::GaugeVec::new(
            Opts::new("yoco_cache_usage_perc", "Fraction of a rank's global KV cache in use"),
            &["group", "rank"],
        )?;
        registry.register(Box::new(cache_usage.clone()))?;
        let group_cache_usage = prometheus::Gauge::new(
            "yoco_kv_cache_usage_perc",
            "Fraction of the serving groups' global KV cache in use",
        )?;
        registry.register(Box::new(group_cache_usage.clone()))?;
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let route_decisions = counter_vec(
            "yoco_router_requests_total",
            "Requests routed, by decision: prefix (to the group caching the longest prefix of the prompt), \
             least_loaded (no group caches one), overloaded (the group caching it was too loaded)",
            &["decision"],
        )?;
        let route_cached_tokens = counter_vec(
            "yoco_router_cached_prefix_tokens_total",
            "Prompt tokens the chosen group held cached when the request was routed, by decision",
            &["decision"],
        )?;
        Ok(Metrics {
            time_to_first_token: hist("yoco_time_to_first_token_seconds", "Time from arrival to the first token")?,
            inter_token_latency: hist("yoco_inter_token_latency_seconds", "Time between consecutive tokens")?,
            e2e_latency: hist("yoco_e2e_request_latency_seconds", "Time from arrival to the end")?,
            queue_time: hist("yoco_request_queue_time_seconds", "Time from arrival to the start of prefill")?,
            prompt_tokens: counter("yoco_prompt_tokens_total", "Prompt tokens of finished requests")?,
            generation_tokens: counter("yoco_generation_tokens_total", "Generated tokens")?,
            prefill_tokens: counter("yoco_prefill_tokens_total", "Prompt tokens prefilled (rate: prefill tokens/s)")?,
            requests_finished,
            running: gauge("yoco_num_requests_running", "Requests prefilling or decoding")?,
            waiting: gauge("yoco_num_requests_waiting", "Requests waiting for admission")?,
            step_seconds,
            collective_seconds: hist(
                "yoco_collective_seconds",
                "Time per step in collectives on the slowest rank (waiting for peers included)",
            )?,
            cache_used_bytes: gauge_vec(
                "yoco_cache_used_bytes",
                "Global KV cache bytes in use on a rank",
                &["group", "rank"],
            )?,
            cache_capacity_bytes: gauge_vec(
                "yoco_cache_capacity_bytes",
                "Global KV cache bytes of a rank",
                &["group", "rank"],
            )?,
            cache_usage,
            group_cache_usage,
            prefill_progress: gauge_vec(
                "yoco_prefill_progress_tokens",
                "Prompt tokens prefilled so far, per request being prefilled",
                &["request_id"],
            )?,
            prefill_total: gauge_vec(
                "yoco_prefill_prompt_tokens",
                "Prompt length, per request being prefilled",
                &["request_id"],
            )?,
            prefix_cache_queries: counter(
                "yoco_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache (hit rate: hits / queries)",
            )?,
            prefix_cache_hits: counter(
                "yoco_prefix_cache_hits_total",
                "Prompt tokens served from the prefix cache instead of prefilled",
            )?,
            prefix_cache_evictions: counter("yoco_prefix_cache_evictions_total", "Prefix-cache snapshots evicted")?,
            prefix_cache_snapshots: gauge(
                "yoco_prefix_cache_snapshots",
                "Prefix-cache snapshots held by the serving groups",
            )?,
            prefix_cache_blocks: gauge(
                "yoco_prefix_cache_blocks",
                "Global-cache blocks per rank booked for prefix-cache snapshots (states included), summed over groups",
            )?,
            prefix_disk_hits: counter(
                "yoco_prefix_disk_hits_total",
                "Prompt tokens served from snapshots read back from the prefix cache's disk tier",
            )?,
            prefix_disk_writes: counter("yoco_prefix_disk_writes_total", "Snapshots written to the disk tier")?,
            prefix_disk_reads: counter("yoco_prefix_disk_reads_total", "Snapshots read back from the disk tier")?,
            prefix_disk_failures: counter_vec(
                "yoco_prefix_disk_failures_total",
                "Disk-tier writes and reads that failed on some rank (a read that fails is a miss)",
                &["op"],
            )?,
            prefix_disk_evictions: counter(
                "yoco_prefix_disk_evictions_total",
                "Snapshot files removed from the disk tier (budget, failures, flushes)",
            )?,
            prefix_disk_snapshots: gauge(
                "yoco_prefix_disk_snapshots",
                "Snapshots in the disk tier, summed over groups",
            )?,
            prefix_disk_bytes: gauge(
                "yoco_prefix_disk_bytes",
                "Bytes per rank of the disk tier's files (the largest rank's), summed over groups",
            )?,
            route_decisions,
            route_cached_tokens,
            registry,
        })
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own well-formed metrics into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new().expect("metric definitions are valid"));
