//! Turns a formed worker group into a serving one: its scheduler, sized by the group's cache,
//! and the limits every request is checked against.

use std::sync::Arc;

use yoco_worker::config::ModelConfig;
use yoco_worker::tokenizer::Tokenizer;

use crate::api::router::Ready;
use crate::cluster::group::WorkerGroup;
use crate::scheduler::prefix::model_seed;
use crate::scheduler::request::Limits;
use crate::scheduler::{Capacity, Scheduler, SchedulerConfig};

/// Turns formed worker groups into serving ones: a scheduler each, sized by the group's cache.
pub struct GroupStarter {
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
}

impl GroupStarter {
    pub fn new(tokenizer: Arc<Tokenizer>, config: SchedulerConfig) -> Self {
        GroupStarter { tokenizer, config }
    }

    pub fn start(&self, name: &str, group: WorkerGroup) -> anyhow::Result<(Ready, tokio::task::JoinHandle<()>)> {
        let handle = group.handle();
        let cfg = ModelConfig::from_json(&serde_json::from_str(&handle.config_json)?)?;
        // The scheduler cuts prompts over the context-parallel ranks; a tensor-parallel row
        // holds one shard between its ranks, each of its KV heads.
        let (world, tp) = (group.cp(), group.tp());
        let block_tokens = handle.ranks[0].block_tokens;
        let blocks_per_rank = handle.ranks.iter().map(|r| r.cache_capacity_tokens / r.block_tokens).min().unwrap_or(0);
        let capacity = Capacity { world, blocks_per_rank, block_tokens };
        let limits = Limits { vocab_size: cfg.vocab_size, max_request_tokens: capacity.max_request_tokens() };
        let cache_bytes_per_token = yoco_worker::plan::cache_bytes_per_token(&cfg, handle.ranks[0].cache_dtype);
        let mut config = self.config.clone();
        // A rank may hold a bounded number of sequences (a GPU rank: 256 unless configured).
        if let Some(slots) = handle.ranks.iter().map(|r| r.max_sequences).filter(|&n| n > 0).min() {
            config.max_running = config.max_running.min(slots);
        }
        // The cached states depend on the model; a snapshot's self-decoder state is kept on
        // every rank, outside the cache blocks, and is booked as that many blocks so that
        // admission bounds it too.
        config.prefix.seed = model_seed(&format!("{}\n{}", handle.model_dir, handle.config_json));
        let state_bytes = cfg.self_state_numbers() * std::mem::size_of::<f32>();
        config.prefix.state_blocks = state_bytes.div_ceil(cache_bytes_per_token * block_tokens).max(1);
        // A rank holds its part of the heads: 1/tp of a block and of a state.
        let block_bytes = (cache_bytes_per_token * block_tokens / tp) as u64;
        if let Some(d) = &mut config.prefix.disk {
            d.block_bytes = block_bytes;
            d.state_bytes = (state_bytes / tp) as u64;
        }
        config.prefix.memory_blocks = config.prefix.memory_bytes.map(|b| (b / block_bytes.max(1)) as usize);
        let max_running = config.max_running;
        let (scheduler, task) = Scheduler::start(group.named(name), self.tokenizer.clone(), capacity, config);
        tracing::info!(
            group = name,
            cp = world,
            tp,
            capacity_tokens = capacity.max_request_tokens(),
            cache_bytes_per_token,
            device = %handle.ranks[0].device,
            max_running,
            "group serving"
        );
        let ready = Ready {
            name: name.to_string(),
            scheduler,
            group: handle,
            limits,
            cache_bytes_per_token,
            routed: Default::default(),
            in_transit: Default::default(),
        };
        Ok((ready, task))
    }
}
