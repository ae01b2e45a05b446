//! The prefix cache's disk tier, as the scheduler books it: which snapshots the workers hold
//! in files (`yoco_worker::snapshot_store`), by the hash of the prompt blocks they cover.
//!
//! A snapshot evicted from memory is written to disk (each rank its own file) as what it adds
//! to its parent — the same sharing as in memory, so a document's chain of snapshots takes its
//! size once on disk too. A file is therefore usable only with its parent, in memory or on
//! disk: an entry whose parent leaves the tier leaves with it. A hit on disk is read back as a
//! chain of snapshots, from the nearest one still in memory, before the request is admitted.
//!
//! Budget: bytes per rank (the largest rank's file of each entry), enforced before every
//! write by evicting the least recently used entries that nothing on disk continues.

use std::collections::HashMap;

use super::prefix::Hash;

/// The tier's size per rank, and what a snapshot's file takes on one rank (an estimate for
/// making room before a write; the workers report what they wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskConfig {
    pub budget_bytes: u64,
    /// One cache block, and one snapshot's self-decoder state, on one rank.
    pub block_bytes: u64,
    pub state_bytes: u64,
}

/// Header and layout of a file beyond its states and blocks (generous: the workers' JSON
/// header lists the shard's runs of positions).
const HEADER_ALLOWANCE: u64 = 64 << 10;

impl DiskConfig {
    /// Room to make before writing a snapshot that adds `blocks` blocks per rank to its parent.
    pub fn estimate(&self, blocks: usize) -> u64 {
        self.state_bytes + blocks as u64 * self.block_bytes + HEADER_ALLOWANCE
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    pub pos: usize,
    /// Each context-parallel rank's rows of it.
    pub shards: Vec<usize>,
    pub parent: Option<Hash>,
    /// Bytes booked: the largest rank's file (the estimate while the write is pending).
    pub bytes: u64,
    last_used: u64,
    /// Written by a save whose outcome is not in yet.
    pending: bool,
}

pub struct DiskTier {
    pub cfg: DiskConfig,
    entries: HashMap<Hash, DiskEntry>,
    used: u64,
    clock: u64,
    /// Files to delete on every rank with the next file request.
    to_remove: Vec<Hash>,
    /// Bumped whenever the entries a lookup can find change.
    version: u64,
}

impl DiskTier {
    pub fn new(cfg: DiskConfig) -> Self {
        DiskTier { cfg, entries: HashMap::new(), used: 0, clock: 0, to_remove: Vec::new(), version: 0 }
    }

    /// Whether the snapshot of `h` is on disk, or being written with the next file request
    /// (whose reads come after its writes, so it can be read back in the same request).
    pub fn contains(&self, h: &Hash) -> bool {
        self.entries.contains_key(h)
    }

    pub fn get(&self, h: &Hash) -> Option<&DiskEntry> {
        self.entries.get(h)
    }

    pub fn hashes(&self) -> impl Iterator<Item = &Hash> {
        self.entries.keys()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Entries, and bytes per rank booked.
    pub fn usage(&self) -> (usize, u64) {
        (self.entries.len(), self.used)
    }

    /// Marks `h` and what it continues recently used.
    pub fn touch(&mut self, h: &Hash) {
        self.clock += 1;
        let mut at = Some(*h);
        while let Some(e) = at.and_then(|h| self.entries.get_mut(&h)) {
            e.last_used = self.clock;
            at = e.parent;
        }
    }

    /// Books a write of the snapshot of `h` (at `pos`, `shards`, continuing `parent`, adding
    /// `blocks` blocks per rank), evicting least recently used entries to make room. False
    /// when it is on disk already, its parent is not where a read could find it (`parent_ok`),
    /// or it cannot fit.
    pub fn plan_save(
        &mut self,
        h: Hash,
        pos: usize,
        shards: Vec<usize>,
        parent: Option<Hash>,
        blocks: usize,
        parent_ok: bool,
    ) -> bool {
        let bytes = self.cfg.estimate(blocks);
        if self.entries.contains_key(&h) || !parent_ok || bytes > self.cfg.budget_bytes {
            return false;
        }
        // Room, keeping the parent (whose loss would make the new file useless).
        let keep = parent.map(|p| self.lineage(&p)).unwrap_or_default();
        while self.used + bytes > self.cfg.budget_bytes {
            let Some(v) = self.lru_leaf(&keep) else { return false };
            self.remove(&v);
        }
        self.clock += 1;
        self.used += bytes;
        self.entries.insert(h, DiskEntry { pos, shards, parent, bytes, last_used: self.clock, pending: true });
        self.version += 1;
        true
    }

    /// The least recently used entry nothing on disk continues (evicting a parent would take
    /// its continuations along), other than `keep`.
    fn lru_leaf(&self, keep: &[Hash]) -> Option<Hash> {
        let parents: std::collections::HashSet<Hash> = self.entries.values().filter_map(|e| e.parent).collect();
        self.entries
            .iter()
            .filter(|(k, e)| !e.pending && !keep.contains(k) && !parents.contains(*k))
            .min_by_key(|(k, e)| (e.last_used, **k))
            .map(|(k, _)| *k)
    }

    /// `h` and the entries it continues.
    fn lineage(&self, h: &Hash) -> Vec<Hash> {
        let mut out = Vec::new();
        let mut at = Some(*h);
        while let Some(k) = at.filter(|k| self.entries.contains_key(k)) {
            out.push(k);
            at = self.entries[&k].parent;
        }
        out
    }

    /// The outcome of a planned write: the largest rank's bytes if every rank wrote it, or
    /// `None` (then whatever some ranks wrote is deleted).
    pub fn saved(&mut self, h: &Hash, bytes: Option<u64>) {
        let Some(e) = self.entries.get_mut(h).filter(|e| e.pending) else { return };
        match bytes {
            Some(b) => {
                self.used = self.used - e.bytes + b;
                e.bytes = b;
                e.pending = false;
                // The estimate errs large; should a file be larger, the budget still holds.
                self.shrink_to_budget();
            }
            None => self.remove(h),
        }
    }

    fn shrink_to_budget(&mut self) {
        while self.used > self.cfg.budget_bytes {
            let Some(v) = self.lru_leaf(&[]) else { break };
            self.remove(&v);
        }
    }

    /// Forgets `h` and every entry that continues it (useless without it); their files are
    /// deleted with the next file request.
    pub fn remove(&mut self, h: &Hash) {
        let Some(e) = self.entries.remove(h) else { return };
        self.used -= e.bytes;
        self.version += 1;
        self.to_remove.push(*h);
        crate::metrics::METRICS.prefix_disk_evictions.inc();
        self.orphan(h);
    }

    /// Forgets the entries that continue `h` (whose snapshot left memory without a file):
    /// nothing could read them any more.
    pub fn orphan(&mut self, h: &Hash) {
        let children: Vec<Hash> = self.entries.iter().filter(|(_, c)| c.parent == Some(*h)).map(|(k, _)| *k).collect();
        for c in children {
            self.remove(&c);
        }
    }

    /// Forgets everything (a flush): every file goes.
    pub fn clear(&mut self) {
        let all: Vec<Hash> = self.entries.keys().copied().collect();
        for h in all {
            self.remove(&h);
        }
    }

    pub fn has_removals(&self) -> bool {
        !self.to_remove.is_empty()
    }

    pub fn take_removals(&mut self) -> Vec<Hash> {
        std::mem::take(&mut self.to_remove)
    }

    /// The chain to read for a hit on `h`: entries from the first whose parent is in memory
    /// (`in_memory`) or none, to `h`; `None` if some link is missing.
    pub fn chain(&self, h: &Hash, in_memory: impl Fn(&Hash) -> bool) -> Option<Vec<Hash>> {
        let mut chain = vec![*h];
        let mut at = self.get(h)?.parent;
        while let Some(p) = at.filter(|p| !in_memory(p)) {
            at = self.get(&p)?.parent;
            chain.push(p);
        }
        chain.reverse();
        Some(chain)
    }

    /// Adopts what the ranks list at start-up (`listed[r]`: rank r's files, `cp` ranks each
    /// `tp` wide): entries every rank holds alike whose parents are entries too. Files of the
    /// rest are deleted; the budget is enforced, oldest entries (by position) first.
    pub fn adopt(&mut self, listed: &[Vec<yoco_worker::plan::SnapshotFile>], tp: usize) {
        let mut all: HashMap<Hash, (DiskEntry, usize)> = HashMap::new();
        let mut seen: Vec<Hash> = Vec::new();
        for (rank, files) in listed.iter().enumerate() {
            for f in files {
                seen.push(f.hash);
                let cp = rank / tp.max(1);
                let e = all.entry(f.hash).or_insert_with(|| {
                    let shards = vec![usize::MAX; listed.len() / tp.max(1)];
                    let entry =
                        DiskEntry { pos: f.pos, shards, parent: f.parent_hash, bytes: 0, last_used: 0, pending: false };
                    (entry, 0)
                });
                let consistent = e.0.pos == f.pos
                    && e.0.parent == f.parent_hash
                    && (e.0.shards[cp] == usize::MAX || e.0.shards[cp] == f.rows);
                if consistent {
                    e.0.shards[cp] = f.rows;
                    e.0.bytes = e.0.bytes.max(f.bytes);
                    e.1 += 1;
                } else {
                    e.1 = usize::MAX / 2;
                }
            }
        }
        let mut complete: HashMap<Hash, DiskEntry> =
            all.into_iter().filter(|(_, (_, n))| *n == listed.len()).map(|(h, (e, _))| (h, e)).collect();
        // Keep only entries whose whole chain is here.
        loop {
            let orphans: Vec<Hash> = complete
                .iter()
                .filter(|(_, e)| e.parent.is_some_and(|p| !complete.contains_key(&p)))
                .map(|(h, _)| *h)
                .collect();
            if orphans.is_empty() {
                break;
            }
            for o in orphans {
                complete.remove(&o);
            }
        }
        seen.sort_unstable();
        seen.dedup();
        self.to_remove.extend(seen.into_iter().filter(|h| !complete.contains_key(h)));
        // Ordered by position: after a restart the shorter prefixes count as the older.
        let mut order: Vec<(usize, Hash)> = complete.iter().map(|(h, e)| (e.pos, *h)).collect();
        order.sort_unstable();
        for (_, h) in order {
            self.clock += 1;
            let mut e = complete.remove(&h).expect("listed");
            e.last_used = self.clock;
            self.used += e.bytes;
            self.entries.insert(h, e);
        }
        self.version += 1;
        self.shrink_to_budget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yoco_worker::plan::SnapshotFile;

    fn tier(budget: u64) -> DiskTier {
        DiskTier::new(DiskConfig { budget_bytes: budget, block_bytes: 1000, state_bytes: 500 })
    }

    fn h(b: u8) -> Hash {
        [b; 32]
    }

    #[test]
    fn writes_make_room_lru_and_take_their_continuations_along() {
        let est = |blocks| DiskConfig { budget_bytes: 0, block_bytes: 1000, state_bytes: 500 }.estimate(blocks);
        let mut t = tier(3 * est(2));
        assert!(t.plan_save(h(1), 512, vec![512], None, 2, true));
        assert!(t.contains(&h(1)), "found while it is being written");
        t.saved(&h(1), Some(est(2)));
        assert!(t.plan_save(h(2), 1024, vec![1024], Some(h(1)), 2, true));
        t.saved(&h(2), Some(est(2)));
        assert!(t.plan_save(h(3), 256, vec![256], None, 1, true));
        t.saved(&h(3), Some(est(1)));
        assert!(!t.plan_save(h(3), 256, vec![256], None, 1, true), "on disk already");
        assert!(!t.plan_save(h(9), 256, vec![256], None, 1, false), "its parent is nowhere");
        assert_eq!(t.usage(), (3, 2 * est(2) + est(1)));
        t.touch(&h(3));
        // A large write evicts the least recently used leaves: 2, then 1 (a leaf once 2 went).
        assert!(t.plan_save(h(4), 512, vec![512], None, 4, true));
        assert!(!t.contains(&h(1)) && !t.contains(&h(2)) && t.contains(&h(3)));
        assert_eq!(t.take_removals(), [h(2), h(1)]);
        // A failed write is forgotten and its files deleted.
        t.saved(&h(4), None);
        assert_eq!(t.take_removals(), [h(4)]);
        assert_eq!(t.usage(), (1, est(1)));
        assert!(!t.plan_save(h(5), 0, vec![0], None, 1000, true), "larger than the whole tier");
    }

    #[test]
    fn a_write_never_evicts_its_own_parent() {
        let est = DiskConfig { budget_bytes: 0, block_bytes: 1000, state_bytes: 500 }.estimate(1);
        let mut t = tier(2 * est);
        assert!(t.plan_save(h(1), 256, vec![256], None, 1, true));
        t.saved(&h(1), Some(est));
        assert!(t.plan_save(h(2), 512, vec![512], Some(h(1)), 1, true));
        t.saved(&h(2), Some(est));
        // 3 continues 2: room must come from elsewhere, and there is none.
        assert!(!t.plan_save(h(3), 768, vec![768], Some(h(2)), 1, true));
        assert!(t.contains(&h(1)) && t.contains(&h(2)));
    }

    #[test]
    fn chains_run_from_the_nearest_snapshot_in_memory() {
        let mut t = tier(1 << 30);
        for (i, parent) in [(1, None), (2, Some(h(1))), (3, Some(h(2)))] {
            assert!(t.plan_save(h(i), 256 * i as usize, vec![256 * i as usize], parent, 1, true));
            t.saved(&h(i), Some(100));
        }
        assert_eq!(t.chain(&h(3), |_| false), Some(vec![h(1), h(2), h(3)]));
        assert_eq!(t.chain(&h(3), |x| *x == h(1)), Some(vec![h(2), h(3)]));
        t.remove(&h(2));
        assert_eq!(t.chain(&h(3), |_| false), None, "3 went with 2");
        assert_eq!(t.chain(&h(1), |_| false), Some(vec![h(1)]));
    }

    #[test]
    fn a_restart_adopts_what_every_rank_holds_alike() {
        let f = |b: u8, parent: Option<u8>, pos, rows| SnapshotFile {
            hash: h(b),
            parent_hash: parent.map(h),
            pos,
            rows,
            bytes: 1000 + rows as u64,
        };
        // cp 2 × tp 1: 1 ← 2 on both; 3 only on rank 0; 4's position disagrees; 5's parent is
        // missing.
        let rank0 = vec![
            f(1, None, 512, 256),
            f(2, Some(1), 1024, 512),
            f(3, None, 256, 128),
            f(4, None, 256, 128),
            f(5, Some(7), 2048, 1024),
        ];
        let mut rank1 = rank0.clone();
        rank1.remove(2);
        rank1[2].pos = 512;
        let mut t = tier(1 << 30);
        t.adopt(&[rank0.clone(), rank1.clone()], 1);
        assert_eq!(t.get(&h(2)).map(|e| (e.pos, e.shards.clone(), e.parent)), Some((1024, vec![512, 512], Some(h(1)))));
        assert!(t.contains(&h(1)) && !t.contains(&h(3)) && !t.contains(&h(4)) && !t.contains(&h(5)));
        let mut gone = t.take_removals();
        gone.sort();
        assert_eq!(gone, [h(3), h(4), h(5)]);
        assert_eq!(t.usage(), (2, 1256 + 1512));
        // tp 2 × cp 1: the two ranks are one shard. A budget below both entries keeps the one
        // the other continues.
        let mut t = tier(1600);
        t.adopt(&[rank0, rank1], 2);
        assert!(t.contains(&h(1)) && !t.contains(&h(2)) && !t.contains(&h(4)));
        assert_eq!(t.get(&h(1)).unwrap().shards, [256]);
    }
}
