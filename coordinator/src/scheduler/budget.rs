//! The arithmetic of the scheduler: how much cache a request reserves, and how a prefill chunk is
//! cut across the ranks so that every rank's shard of a sequence stays within one token of the
//! others (which is what makes the reservation exact).

/// The group's global KV cache, as the scheduler books it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub world: usize,
    /// Cache blocks each rank holds (the smallest rank's count).
    pub blocks_per_rank: usize,
    pub block_tokens: usize,
}

impl Capacity {
    /// Blocks a sequence of `tokens` positions needs on its fullest rank. Prefill chunks keep the
    /// shards within one token of each other and decode tokens go to the smallest shard, so no
    /// shard exceeds `ceil(tokens / world)`.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.world).div_ceil(self.block_tokens)
    }

    /// Blocks full on every rank of a snapshot whose ranks hold `shards` rows: what a sequence
    /// resumed from it shares instead of booking (a partial last block is copied on its first
    /// write, so it is booked).
    pub fn shared_blocks(&self, shards: &[usize]) -> usize {
        shards.iter().map(|n| n / self.block_tokens).min().unwrap_or(0)
    }

    /// The longest request (prompt + max_tokens) the group can hold on its own.
    pub fn max_request_tokens(&self) -> usize {
        self.blocks_per_rank * self.block_tokens * self.world
    }
}

/// Chunk starts for `n` new tokens given each rank's current shard: every rank gets `n / world`
/// tokens and the `n % world` ranks with the smallest shards one more (ties: lower rank), so the
/// shards stay balanced step after step.
pub fn balanced_starts(shards: &[usize], n: usize) -> Vec<usize> {
    let world = shards.len();
    let mut sizes = vec![n / world; world];
    let mut order: Vec<usize> = (0..world).collect();
    order.sort_by_key(|&r| (shards[r], r));
    for &r in order.iter().take(n % world) {
        sizes[r] += 1;
    }
    let mut starts = Vec::with_capacity(world);
    let mut at = 0;
    for size in sizes {
        starts.push(at);
        at += size;
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;
    use yoco_worker::cp::{chunk, validate_split};

    #[test]
    fn shards_stay_within_one_token() {
        for world in 1..=5 {
            let mut shards = vec![0; world];
            for (i, n) in [1usize, 7, 3, 64, 5, 2, 11, 1, 1, 9].iter().cycle().take(40).enumerate() {
                let starts = balanced_starts(&shards, *n);
                validate_split(&starts, *n, world).unwrap();
                for (r, shard) in shards.iter_mut().enumerate() {
                    *shard += chunk(&starts, *n, r).len();
                }
                let (lo, hi) = (shards.iter().min().unwrap(), shards.iter().max().unwrap());
                assert!(hi - lo <= 1, "world {world} step {i}: {shards:?}");
                let total: usize = shards.iter().sum();
                assert_eq!(*hi, total.div_ceil(world));
            }
        }
    }

    #[test]
    fn reservation_covers_the_fullest_rank() {
        let cap = Capacity { world: 3, blocks_per_rank: 10, block_tokens: 16 };
        assert_eq!(cap.max_request_tokens(), 480);
        assert_eq!(cap.blocks_for(1), 1);
        assert_eq!(cap.blocks_for(48), 1);
        assert_eq!(cap.blocks_for(49), 2);
        assert_eq!(cap.blocks_for(480), 10);
        assert_eq!(cap.blocks_for(481), 11);
    }
}
