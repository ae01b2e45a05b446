//! The prefix cache, as the scheduler books it.
//!
//! Resuming a YOCO sequence at position `p` needs two things: the global KV cache of positions
//! `< p` and the self-decoder's state at `p` (gated-retention states, or the last W−1 keys and
//! values of each sliding-window layer). The workers keep both as a *snapshot*: the state copied,
//! the cache blocks shared with the sequence it was taken from (reference-counted, see
//! `yoco_worker::cache`). This index says which snapshots the workers hold and finds them by the
//! chained SHA-256 of the prompt blocks they cover (seeded with the model, so a hit means the
//! same model saw the same tokens: collisions are out of reach even for hostile prompts).
//!
//! Snapshots are taken at block boundaries: every `snapshot_interval` tokens of a long prompt and
//! at the last block boundary before a prompt's last token (a snapshot must leave at least one
//! token to prefill, whose logits sample the first new token). A request resumes from the latest
//! snapshot at or before its longest cached prefix and prefills only the rest.
//!
//! Budget: a snapshot holds the blocks beyond its parent (the snapshot its sequence resumed from
//! or took before), on rank r `⌈rows_r / block⌉ − ⌊parent_rows_r / block⌋`, plus its state
//! converted to blocks. While the sequence that took it runs, its blocks are that sequence's
//! (already reserved), so only the state counts, and the partial last block a rank may have:
//! the sequence's next write copies it (copy-on-write), so the snapshot's original is extra.
//! When the sequence ends the rest counts here. With the running sequences' reservations this
//! bounds every rank's real use, so admission can never overcommit. Only leaves (no child
//! snapshot) that no running sequence uses are evicted, least recently used first, which keeps
//! each snapshot's parent alive and the bound exact.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use yoco_worker::engine::SnapshotId;
use yoco_worker::plan::{SnapshotFiles, SnapshotFilesReport, SnapshotLoad, SnapshotSave};

use super::budget::Capacity;
pub use super::prefix_disk::DiskConfig;
use super::prefix_disk::DiskTier;

pub type Hash = [u8; 32];

/// Chained hashes of the full blocks of `tokens`: entry `i` covers tokens `[0, (i+1)·block)` and
/// depends on `seed` (the model) and on every token before it.
/// Blocks of the longest prefix of a `len`-token prompt with block `hashes` that `cached`
/// knows, leaving at least one token to prefill (the last position's logits come from a step).
pub fn longest_cached(hashes: &[Hash], len: usize, block: usize, cached: impl Fn(&Hash) -> bool) -> Option<usize> {
    let usable = (len.saturating_sub(1) / block).min(hashes.len());
    (1..=usable).rev().find(|&k| cached(&hashes[k - 1]))
}

pub fn block_hashes(seed: &Hash, tokens: &[u32], block: usize) -> Vec<Hash> {
    let mut prev = *seed;
    let mut bytes = Vec::with_capacity(4 * block);
    tokens
        .chunks_exact(block)
        .map(|b| {
            bytes.clear();
            bytes.extend(b.iter().flat_map(|t| t.to_le_bytes()));
            prev = Sha256::new().chain_update(prev).chain_update(&bytes).finalize().into();
            prev
        })
        .collect()
}

/// The seed of the chain: what the cached states depend on besides the tokens.
pub fn model_seed(model_identity: &str) -> Hash {
    Sha256::digest(model_identity.as_bytes()).into()
}

#[derive(Debug, Clone)]
pub struct PrefixConfig {
    pub enabled: bool,
    /// Snapshot every this many tokens inside long prompts (a multiple of the block size).
    pub snapshot_interval: usize,
    /// Seeds the block hashes (see [`model_seed`]).
    pub seed: Hash,
    /// Cache blocks one snapshot's self-decoder state is booked as, per rank.
    pub state_blocks: usize,
    /// The disk tier snapshots evicted from memory go to (see `prefix_disk`), if any.
    pub disk: Option<DiskConfig>,
    /// Bytes per rank snapshots may keep once their sequences end (`None`: whatever the
    /// running requests leave free); 0 with a disk tier: snapshots live on disk only. The
    /// group's starter turns it into `memory_blocks`, which the cache enforces.
    pub memory_bytes: Option<u64>,
    pub memory_blocks: Option<usize>,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            enabled: true,
            snapshot_interval: 8192,
            seed: model_seed(""),
            state_blocks: 1,
            disk: None,
            memory_bytes: None,
            memory_blocks: None,
        }
    }
}

/// A request that can resume from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub snap: SnapshotId,
    /// Prompt tokens it covers.
    pub pos: usize,
    /// Each rank's rows of it.
    pub shards: Vec<usize>,
    /// Read back from the disk tier for this request.
    pub from_disk: bool,
}

#[derive(Debug)]
struct Snap {
    pos: usize,
    hash: Hash,
    shards: Vec<usize>,
    parent: Option<SnapshotId>,
    children: usize,
    /// Running sequences resumed from it or continuing it.
    pins: usize,
    /// Blocks per rank it holds beyond its parent; booked once `kv_booked`.
    kv_blocks: usize,
    kv_booked: bool,
    /// 1 if a rank's last block is partial (booked from the start: see the module's budget).
    tail: usize,
    last_used: u64,
    /// Flushed: no longer found, dropped as soon as nothing uses it.
    doomed: bool,
    /// Read back from disk for a request not admitted yet.
    restored: bool,
}

/// What the cache holds, for metrics and the flush reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub snapshots: usize,
    pub blocks: usize,
    /// Snapshots in the disk tier, and bytes of their files per rank.
    pub disk_snapshots: usize,
    pub disk_bytes: u64,
}

/// A snapshot being read back from disk.
#[derive(Debug)]
struct Loading {
    hash: Hash,
    pos: usize,
    shards: Vec<usize>,
    parent: Option<SnapshotId>,
    kv_blocks: usize,
    /// The snapshot in memory the chain starts on, pinned until the read is done.
    anchor: Option<SnapshotId>,
}

pub struct PrefixCache {
    cfg: PrefixConfig,
    cap: Capacity,
    snaps: HashMap<SnapshotId, Snap>,
    by_hash: HashMap<Hash, SnapshotId>,
    /// Bumped whenever `by_hash` changes, so that its published copy is rebuilt only then.
    version: u64,
    next_id: SnapshotId,
    clock: u64,
    /// Blocks per rank booked for snapshots.
    held: usize,
    /// Planned snapshots not taken yet, and the blocks booked for each.
    pending: HashMap<SnapshotId, usize>,
    to_drop: Vec<SnapshotId>,
    disk: Option<DiskTier>,
    /// Snapshots to write before they are dropped (with their hash), and to read back.
    to_save: Vec<SnapshotSave>,
    to_load: Vec<SnapshotLoad>,
    loading: HashMap<SnapshotId, Loading>,
    /// Ask the workers for the files they hold (once, at start-up).
    to_list: bool,
}

impl PrefixCache {
    pub fn new(cap: Capacity, cfg: PrefixConfig) -> Self {
        assert!(cfg.snapshot_interval > 0 && cfg.snapshot_interval.is_multiple_of(cap.block_tokens));
        PrefixCache {
            cap,
            snaps: HashMap::new(),
            by_hash: HashMap::new(),
            version: 0,
            next_id: 1,
            clock: 0,
            held: 0,
            pending: HashMap::new(),
            to_drop: Vec::new(),
            disk: cfg.disk.map(DiskTier::new),
            to_save: Vec::new(),
            to_load: Vec::new(),
            loading: HashMap::new(),
            to_list: cfg.disk.is_some(),
            cfg,
        }
    }

    #[cfg(test)]
    pub fn seed(&self) -> &Hash {
        &self.cfg.seed
    }

    /// Blocks per rank booked for snapshots.
    pub fn held_blocks(&self) -> usize {
        self.held
    }

    /// The block hashes that snapshots can be resumed from (in memory or on disk), and the
    /// version of that set (it changes whenever the set does).
    pub fn index(&self) -> (u64, impl Iterator<Item = &Hash>) {
        let disk = self.disk.iter().flat_map(DiskTier::hashes);
        (self.version + self.disk.as_ref().map_or(0, DiskTier::version), self.by_hash.keys().chain(disk))
    }

    pub fn stats(&self) -> PrefixStats {
        let (disk_snapshots, disk_bytes) = self.disk.as_ref().map_or((0, 0), DiskTier::usage);
        PrefixStats { snapshots: self.snaps.len(), blocks: self.held, disk_snapshots, disk_bytes }
    }

    /// The latest snapshot a prompt of `len` tokens with block `hashes` can resume from; it
    /// leaves at least one token to prefill. Marks it (and what it builds on) recently used.
    pub fn lookup(&mut self, hashes: &[Hash], len: usize) -> Option<Hit> {
        let k = longest_cached(hashes, len, self.cap.block_tokens, |h| self.by_hash.contains_key(h))?;
        let id = self.by_hash[&hashes[k - 1]];
        self.clock += 1;
        let mut at = Some(id);
        while let Some(s) = at.and_then(|i| self.snaps.get_mut(&i)) {
            s.last_used = self.clock;
            at = s.parent;
        }
        if let Some(d) = &mut self.disk {
            d.touch(&hashes[k - 1]);
        }
        let s = &self.snaps[&id];
        Some(Hit { snap: id, pos: s.pos, shards: s.shards.clone(), from_disk: s.restored })
    }

    /// Plans reading back from disk the snapshot of a longer prefix of the prompt than memory
    /// holds (and the chain it continues), when memory has room for it beside the `reserved`
    /// blocks: true if the request should wait for the read (the next file request), after
    /// which [`PrefixCache::lookup`] finds it in memory.
    pub fn restore(&mut self, hashes: &[Hash], len: usize, reserved: usize) -> bool {
        let Some(disk) = &self.disk else { return false };
        let bt = self.cap.block_tokens;
        let on_disk = longest_cached(hashes, len, bt, |h| disk.contains(h));
        let in_memory = longest_cached(hashes, len, bt, |h| self.by_hash.contains_key(h));
        let Some(k) = on_disk.filter(|&k| Some(k) > in_memory) else { return false };
        let Some(chain) = disk.chain(&hashes[k - 1], |h| self.by_hash.contains_key(h)) else { return false };
        // Memory for each link: its state and the blocks beyond its parent, as if taken here.
        let first_parent = disk.get(&chain[0]).and_then(|e| e.parent);
        let anchor = first_parent.map(|p| self.by_hash[&p]);
        let mut parent_shards = anchor.map(|a| self.snaps[&a].shards.clone());
        let mut links = Vec::with_capacity(chain.len());
        for h in &chain {
            let e = disk.get(h).expect("a chain's links are on disk");
            let kv_blocks = e
                .shards
                .iter()
                .enumerate()
                .map(|(r, &n)| n.div_ceil(bt).saturating_sub(parent_shards.as_ref().map_or(0, |p| p[r]) / bt))
                .max()
                .unwrap_or(0);
            links.push((*h, e.pos, e.shards.clone(), kv_blocks));
            parent_shards = Some(e.shards.clone());
        }
        let cost: usize = links.iter().map(|l| self.cfg.state_blocks + l.3).sum();
        let over = (reserved + self.held + cost).saturating_sub(self.cap.blocks_per_rank);
        if over > 0 {
            if let Some(a) = anchor {
                self.pin(a);
            }
            let room = self.evictable() >= over;
            if room {
                self.evict(over);
            }
            if let Some(a) = anchor {
                self.unpin(a);
            }
            if !room {
                return false;
            }
        }
        if let Some(a) = anchor {
            self.pin(a);
        }
        let mut parent = anchor;
        for (i, (hash, pos, shards, kv_blocks)) in links.into_iter().enumerate() {
            let id = self.next_id;
            self.next_id += 1;
            self.held += self.cfg.state_blocks + kv_blocks;
            self.to_load.push(SnapshotLoad { snap: id, hash, parent });
            let anchor = if i == 0 { anchor } else { None };
            self.loading.insert(id, Loading { hash, pos, shards, parent, kv_blocks, anchor });
            parent = Some(id);
        }
        true
    }

    /// A request was admitted resuming from `id` (pinned): it, and what it continues, no
    /// longer wait to be used.
    pub fn resumed(&mut self, id: SnapshotId) {
        let mut at = Some(id);
        while let Some(s) = at.and_then(|i| self.snaps.get_mut(&i)) {
            s.restored = false;
            at = s.parent;
        }
    }

    pub fn pin(&mut self, id: SnapshotId) {
        if let Some(s) = self.snaps.get_mut(&id) {
            s.pins += 1;
        }
    }

    pub fn unpin(&mut self, id: SnapshotId) {
        if let Some(s) = self.snaps.get_mut(&id) {
            s.pins -= 1;
        }
        self.drop_doomed();
    }

    /// Where a prompt of `len` tokens prefilled up to `from` should next stop to be
    /// snapshotted: the next multiple of the interval or the last block boundary before the
    /// prompt's last token, unless a snapshot of that prefix exists already.
    pub fn next_point(&self, hashes: &[Hash], from: usize, len: usize) -> Option<usize> {
        let bt = self.cap.block_tokens;
        let end = (len.saturating_sub(1) / bt) * bt;
        let interval = self.cfg.snapshot_interval;
        let mut p = (from / interval + 1) * interval;
        let mut candidates = std::iter::from_fn(|| {
            let next = p;
            p += interval;
            (next < end).then_some(next)
        })
        .chain((end > from).then_some(end));
        candidates.find(|&p| p > from && hashes.get(p / bt - 1).is_some_and(|h| !self.by_hash.contains_key(h)))
    }

    /// An id for a snapshot to take with the next step, booked (its state, and a partial last
    /// block, see the module's budget) from now: evicting what nothing uses to make room beside
    /// the `reserved` blocks of the running sequences, or `None` when there is none (the
    /// snapshot is skipped; snapshots never hold up a request).
    pub fn plan_snapshot(&mut self, reserved: usize) -> Option<SnapshotId> {
        let cost = self.cfg.state_blocks + 1;
        let over = (reserved + self.held + cost).saturating_sub(self.cap.blocks_per_rank);
        if over > 0 {
            if self.evictable() < over {
                return None;
            }
            self.evict(over);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.held += cost;
        self.pending.insert(id, cost);
        Some(id)
    }

    /// The workers took snapshot `id` of a running sequence at `pos` (covering the prompt
    /// blocks up to `hash`), continuing `parent` (the sequence's previous snapshot, or the one
    /// it resumed from). The sequence's pin moves from the parent to the new snapshot.
    pub fn insert(&mut self, id: SnapshotId, pos: usize, hash: Hash, shards: Vec<usize>, parent: Option<SnapshotId>) {
        let bt = self.cap.block_tokens;
        let parent_rows = |r: usize| parent.and_then(|p| self.snaps.get(&p)).map_or(0, |p| p.shards[r]);
        let kv_blocks =
            shards.iter().enumerate().map(|(r, &n)| n.div_ceil(bt).saturating_sub(parent_rows(r) / bt)).max();
        let tail = usize::from(shards.iter().any(|n| !n.is_multiple_of(bt)));
        self.clock += 1;
        self.snaps.insert(
            id,
            Snap {
                pos,
                hash,
                shards,
                parent,
                children: 0,
                pins: 1,
                kv_blocks: kv_blocks.unwrap_or(0),
                kv_booked: false,
                tail,
                last_used: self.clock,
                doomed: false,
                restored: false,
            },
        );
        self.by_hash.entry(hash).or_insert(id);
        self.version += 1;
        let planned = self.pending.remove(&id).unwrap_or(0);
        self.held = self.held + self.cfg.state_blocks + tail - planned;
        if let Some(p) = parent.and_then(|p| self.snaps.get_mut(&p)) {
            p.children += 1;
        }
        if let Some(p) = parent {
            self.unpin(p);
        }
    }

    /// A running sequence ended: it no longer uses `head`, and the cache of the snapshots it
    /// took (`made`) is no longer its reservation, so it is booked here.
    pub fn sequence_ended(&mut self, head: Option<SnapshotId>, made: &[SnapshotId]) {
        for id in made {
            if let Some(s) = self.snaps.get_mut(id) {
                if !s.kv_booked {
                    s.kv_booked = true;
                    self.held += s.kv_blocks - s.tail;
                }
            }
        }
        if let Some(h) = head {
            self.unpin(h);
        }
        // Snapshots read back for a request still waiting stay for it, or it would read them again.
        if let Some(limit) = self.cfg.memory_blocks {
            self.evict_where(self.held.saturating_sub(limit), |s| !s.restored);
        }
    }

    /// Before a shutdown: every snapshot nothing uses leaves memory, to the disk tier where it
    /// fits, so that a restarted server finds them. The next [`PrefixCache::take_files`] writes
    /// them.
    pub fn spill_all(&mut self) {
        if self.disk.is_some() {
            self.evict(usize::MAX);
        }
    }

    /// Blocks per rank that evicting every snapshot nothing running depends on would free.
    pub fn evictable(&self) -> usize {
        let mut kept = std::collections::HashSet::new();
        for (&id, s) in &self.snaps {
            if s.pins > 0 {
                let mut at = Some(id);
                while let Some(i) = at.filter(|i| kept.insert(*i)) {
                    at = self.snaps.get(&i).and_then(|s| s.parent);
                }
            }
        }
        self.snaps.iter().filter(|(id, _)| !kept.contains(id)).map(|(_, s)| self.booked(s)).sum()
    }

    fn booked(&self, s: &Snap) -> usize {
        self.cfg.state_blocks + if s.kv_booked { s.kv_blocks } else { s.tail }
    }

    /// Evicts least-recently-used leaves nothing uses until `need` blocks per rank are free or
    /// nothing more can go; returns the blocks freed.
    pub fn evict(&mut self, need: usize) -> usize {
        self.evict_where(need, |_| true)
    }

    fn evict_where(&mut self, need: usize, pick: impl Fn(&Snap) -> bool) -> usize {
        let mut freed = 0;
        while freed < need {
            let victim = self
                .snaps
                .iter()
                .filter(|(_, s)| s.pins == 0 && s.children == 0 && pick(s))
                .min_by_key(|(&id, s)| (s.last_used, id))
                .map(|(&id, _)| id);
            let Some(id) = victim else { break };
            let s = self.snaps.remove(&id).expect("victim exists");
            freed += self.booked(&s);
            self.held -= self.booked(&s);
            if self.by_hash.get(&s.hash) == Some(&id) {
                self.by_hash.remove(&s.hash);
                self.version += 1;
            }
            self.spill(id, &s);
            if let Some(p) = s.parent.and_then(|p| self.snaps.get_mut(&p)) {
                p.children -= 1;
            }
            self.to_drop.push(id);
            crate::metrics::METRICS.prefix_cache_evictions.inc();
        }
        freed
    }

    /// Snapshot `id` leaves memory: to disk, if the tier takes it (it must be a snapshot of
    /// the cache's own, not flushed, and continue one in memory or on disk). A snapshot that
    /// does not go leaves the disk entries that continue it without a parent.
    fn spill(&mut self, id: SnapshotId, s: &Snap) {
        let Some(disk) = &mut self.disk else { return };
        if disk.contains(&s.hash) || self.by_hash.contains_key(&s.hash) {
            return;
        }
        let parent = s.parent.and_then(|p| self.snaps.get(&p)).map(|p| (s.parent.expect("some"), p.hash));
        if !s.doomed && disk.plan_save(s.hash, s.pos, s.shards.clone(), parent.map(|p| p.1), s.kv_blocks, true) {
            let save = SnapshotSave { snap: id, hash: s.hash, parent };
            self.to_save.push(save);
        } else {
            disk.orphan(&s.hash);
        }
    }

    /// The disk tier's work for the workers, if any: removals, writes of snapshots leaving
    /// memory, then (with the drops, so that the reads find room) reads. Call before taking
    /// the next plan's drops; hand the ranks' reports to [`PrefixCache::files_done`].
    pub fn take_files(&mut self) -> Option<SnapshotFiles> {
        let disk = self.disk.as_mut()?;
        let remove = disk.take_removals();
        if remove.is_empty() && self.to_save.is_empty() && self.to_load.is_empty() && !self.to_list {
            return None;
        }
        let list = std::mem::take(&mut self.to_list);
        let drop = if self.to_load.is_empty() { Vec::new() } else { std::mem::take(&mut self.to_drop) };
        Some(SnapshotFiles {
            remove,
            save: std::mem::take(&mut self.to_save),
            drop,
            load: std::mem::take(&mut self.to_load),
            list,
        })
    }

    /// What the ranks (`reports`, every rank of the group; `tp` per context-parallel rank)
    /// did of `files` (`None`: the request failed as a whole, so nothing counts as done).
    pub fn files_done(&mut self, files: &SnapshotFiles, reports: Option<&[SnapshotFilesReport]>, tp: usize) {
        let Some(disk) = &mut self.disk else { return };
        let all = |f: &dyn Fn(&SnapshotFilesReport) -> bool| reports.is_some_and(|r| !r.is_empty() && r.iter().all(f));
        let metrics = &crate::metrics::METRICS;
        for s in &files.save {
            let done = all(&|r| r.saved.iter().any(|x| x.0 == s.snap));
            let bytes = reports.and_then(|r| {
                r.iter().map(|r| r.saved.iter().find(|x| x.0 == s.snap).map(|x| x.1)).collect::<Option<Vec<u64>>>()
            });
            if done {
                metrics.prefix_disk_writes.inc();
            } else {
                metrics.prefix_disk_failures.with_label_values(&["write"]).inc();
            }
            disk.saved(&s.hash, bytes.filter(|_| done).map(|b| b.into_iter().max().unwrap_or(0)));
        }
        // Reads come after the writes: a snapshot written and read back in one request counts.
        for l in &files.load {
            let Some(info) = self.loading.remove(&l.snap) else { continue };
            if let Some(a) = info.anchor {
                if let Some(s) = self.snaps.get_mut(&a) {
                    s.pins -= 1;
                }
            }
            let booked = self.cfg.state_blocks + info.kv_blocks;
            // A link whose parent did not come back fails on every rank too.
            let parent_ok = info.parent.is_none_or(|p| self.snaps.contains_key(&p));
            if parent_ok && all(&|r| r.loaded.contains(&l.snap)) {
                metrics.prefix_disk_reads.inc();
                self.clock += 1;
                let snap = Snap {
                    pos: info.pos,
                    hash: info.hash,
                    shards: info.shards,
                    parent: info.parent,
                    children: 0,
                    pins: 0,
                    kv_blocks: info.kv_blocks,
                    kv_booked: true,
                    tail: 0,
                    last_used: self.clock,
                    doomed: false,
                    restored: true,
                };
                if let Some(p) = info.parent.and_then(|p| self.snaps.get_mut(&p)) {
                    p.children += 1;
                }
                self.by_hash.entry(info.hash).or_insert(l.snap);
                self.version += 1;
                self.snaps.insert(l.snap, snap);
            } else {
                metrics.prefix_disk_failures.with_label_values(&["read"]).inc();
                tracing::warn!(snapshot = l.snap, pos = info.pos, "a prefix snapshot could not be read back: a miss");
                self.held -= booked;
                self.to_drop.push(l.snap);
                disk.remove(&info.hash);
            }
        }
        if files.list {
            if let Some(r) = reports {
                let listed: Vec<_> = r.iter().map(|r| r.listed.clone()).collect();
                disk.adopt(&listed, tp);
                let (n, bytes) = disk.usage();
                tracing::info!(snapshots = n, bytes, "prefix-cache disk tier found");
            }
        }
        self.drop_doomed();
    }

    fn drop_doomed(&mut self) {
        if self.snaps.values().any(|s| s.doomed) {
            self.evict_where(usize::MAX, |s| s.doomed);
        }
    }

    /// Forgets every snapshot: those nothing uses are dropped now, the others as soon as their
    /// sequences end. Returns how many were dropped now and how many are still in use.
    pub fn flush(&mut self) -> (usize, usize) {
        self.by_hash.clear();
        self.version += 1;
        if let Some(d) = &mut self.disk {
            d.clear();
        }
        for s in self.snaps.values_mut() {
            s.doomed = true;
        }
        let before = self.snaps.len();
        self.drop_doomed();
        (before - self.snaps.len(), self.snaps.len())
    }

    /// Whether the workers have something to do for the cache: drops, or disk-tier work.
    pub fn has_work(&self) -> bool {
        !self.to_drop.is_empty()
            || !self.to_save.is_empty()
            || !self.to_load.is_empty()
            || self.to_list
            || self.disk.as_ref().is_some_and(DiskTier::has_removals)
    }

    /// Snapshots the workers should drop with the next plan.
    pub fn take_drops(&mut self) -> Vec<SnapshotId> {
        std::mem::take(&mut self.to_drop)
    }

    /// Snapshots planned but never taken (their step failed) are unbooked, and dropped on the
    /// workers in case some rank took them; so are other ids given (dropping is idempotent).
    pub fn discard(&mut self, ids: impl IntoIterator<Item = SnapshotId>) {
        for id in ids {
            if let Some(cost) = self.pending.remove(&id) {
                self.held -= cost;
            }
            if !self.snaps.contains_key(&id) {
                self.to_drop.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(world: usize, blocks: usize) -> PrefixCache {
        let cap = Capacity { world, blocks_per_rank: blocks, block_tokens: 4 };
        PrefixCache::new(cap, PrefixConfig { snapshot_interval: 8, seed: model_seed("m"), ..PrefixConfig::default() })
    }

    #[test]
    fn hashes_chain_and_depend_on_the_model() {
        let t: Vec<u32> = (0..10).collect();
        let a = block_hashes(&model_seed("m"), &t, 4);
        assert_eq!(a.len(), 2, "only full blocks");
        let mut u = t.clone();
        u[1] = 99;
        let b = block_hashes(&model_seed("m"), &u, 4);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "a change in an earlier block changes every later hash");
        assert_ne!(block_hashes(&model_seed("other"), &t, 4)[0], a[0]);
        assert_eq!(block_hashes(&model_seed("m"), &t[..8], 4), a);
    }

    #[test]
    fn snapshot_points_lookup_and_booking() {
        let mut c = cache(2, 100);
        let prompt: Vec<u32> = (0..23).collect();
        let h = block_hashes(c.seed(), &prompt, 4);
        // Interval points 8 and 16, then the last boundary before token 22: 20.
        assert_eq!(c.next_point(&h, 0, 23), Some(8));
        assert_eq!(c.next_point(&h, 8, 23), Some(16));
        assert_eq!(c.next_point(&h, 16, 23), Some(20));
        assert_eq!(c.next_point(&h, 20, 23), None);
        // A sequence takes snapshots at 8, 16 and 20.
        let s8 = c.plan_snapshot(0).unwrap();
        assert_eq!(c.held_blocks(), 2, "planned: its state and a possible partial block");
        c.insert(s8, 8, h[1], vec![4, 4], None);
        assert_eq!(c.held_blocks(), 1, "taken: no partial block");
        let s16 = c.plan_snapshot(0).unwrap();
        c.insert(s16, 16, h[3], vec![8, 8], Some(s8));
        let s20 = c.plan_snapshot(0).unwrap();
        c.insert(s20, 20, h[4], vec![10, 10], Some(s16));
        assert_eq!(c.held_blocks(), 4, "while the sequence runs: the states and 20's partial block");
        assert_eq!(c.next_point(&h, 0, 23), None, "nothing left to snapshot");
        assert_eq!(c.evictable(), 0, "the running sequence depends on all three");
        c.sequence_ended(Some(s20), &[s8, s16, s20]);
        // kv: 8 → ⌈4/4⌉ = 1, 16 → 2 − ⌊4/4⌋ = 1, 20 → 3 − ⌊8/4⌋ = 1 (its partial block).
        assert_eq!(c.held_blocks(), 6);
        assert_eq!(c.evictable(), 6);
        // The same prompt resumes at 20; a prompt of 21 tokens at 20 too (one token left);
        // one of 20 tokens at 16; one diverging inside block 3 at 8.
        assert_eq!(c.lookup(&h, 23).unwrap().pos, 20);
        assert_eq!(c.lookup(&h[..5], 21).unwrap().pos, 20);
        assert_eq!(c.lookup(&h[..5], 20).unwrap().pos, 16);
        let mut other = prompt.clone();
        other[13] = 77;
        let ho = block_hashes(c.seed(), &other, 4);
        let hit = c.lookup(&ho, 23).unwrap();
        assert_eq!((hit.pos, hit.shards), (8, vec![4, 4]));
        assert_eq!(c.lookup(&ho[..1], 23), None, "no snapshot at 4");
        // A request resumed from 8 pins it (and so its line); leaves go first, LRU.
        c.pin(hit.snap);
        assert_eq!(c.evictable(), 4);
        assert_eq!(c.evict(1), 2, "the leaf at 20: its kv block and its state");
        assert!(c.lookup(&h, 23).unwrap().pos == 16);
        assert_eq!(c.evict(100), 2, "16 goes; 8 is in use");
        assert_eq!(c.take_drops(), vec![s20, s16]);
        c.unpin(hit.snap);
        assert_eq!(c.flush(), (1, 0));
        assert_eq!(c.held_blocks(), 0);
        assert_eq!(c.lookup(&h, 23), None);
    }

    #[test]
    fn snapshots_are_skipped_without_room_and_make_room_by_evicting() {
        let mut c = cache(1, 10);
        let h = block_hashes(c.seed(), &(0..9).collect::<Vec<u32>>(), 4);
        assert_eq!(c.plan_snapshot(9), None, "9 blocks reserved: no room for 2");
        let a = c.plan_snapshot(8).unwrap();
        c.insert(a, 8, h[1], vec![8], None);
        c.sequence_ended(Some(a), &[a]);
        assert_eq!(c.held_blocks(), 3, "state and two blocks");
        // 7 reserved: 7 + 3 + 2 > 10, and only `a` can go.
        let b = c.plan_snapshot(7).unwrap();
        assert_eq!(c.take_drops(), vec![a]);
        assert_eq!(c.held_blocks(), 2);
        // Its step failed: unbooked, and dropped on the workers in case.
        c.discard([b]);
        assert_eq!(c.held_blocks(), 0);
        assert_eq!(c.take_drops(), vec![b]);
    }

    #[test]
    fn flush_waits_for_running_sequences() {
        let mut c = cache(1, 100);
        let prompt: Vec<u32> = (0..9).collect();
        let h = block_hashes(c.seed(), &prompt, 4);
        let id = c.plan_snapshot(0).unwrap();
        c.insert(id, 8, h[1], vec![8], None);
        assert_eq!(c.flush(), (0, 1), "in use by its own sequence");
        assert_eq!(c.lookup(&h, 9), None, "flushed snapshots are not found");
        c.sequence_ended(Some(id), &[id]);
        assert_eq!(c.stats(), PrefixStats::default(), "dropped when its sequence ended");
        assert_eq!(c.take_drops(), vec![id]);
    }
}
