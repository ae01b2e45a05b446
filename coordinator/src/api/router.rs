//! The worker groups serving now, and which one takes the next request. Several groups are
//! data-parallel replicas of one model; groups join when they form and leave when they fail or
//! lose a rank.
//!
//! A prompt goes to the group whose prefix cache holds the longest prefix of it, so that a
//! document asked many questions is prefilled once, not once per group — unless that group has
//! more than `balance_threshold` requests (running plus waiting) beyond the least-loaded one:
//! then load wins, as in SGLang's cache-aware router. A prompt no group holds goes to the least
//! loaded group, idle ones in turn. The `least-loaded` policy ignores the caches (a plain load
//! balancer, for comparison).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::cluster::group::GroupHandle;
use crate::metrics::METRICS;
use crate::scheduler::request::Limits;
use crate::scheduler::{Hash, Scheduler};

/// Requests a group holding a prompt's prefix may have beyond the least-loaded group and still
/// take it (`--route-balance-threshold`).
pub const DEFAULT_BALANCE_THRESHOLD: usize = 4;

/// One serving group.
pub struct Ready {
    /// Its name: the etcd group (`g0`), or `local` for a static group.
    pub name: String,
    pub scheduler: Scheduler,
    pub group: GroupHandle,
    pub limits: Limits,
    pub cache_bytes_per_token: usize,
    /// Requests routed to it.
    pub routed: AtomicU64,
    /// Requests routed to it and not yet queued on its scheduler: load that the scheduler's own
    /// counts do not show yet (a burst is routed before any of it is queued).
    pub in_transit: AtomicUsize,
}

impl Ready {
    /// Running, waiting and in-transit requests.
    fn load(&self) -> usize {
        let (running, waiting) = self.scheduler.load();
        running + waiting + self.in_transit.load(Ordering::Relaxed)
    }
}

pub struct Router {
    groups: RwLock<Vec<Arc<Ready>>>,
    policy: RoutePolicy,
    balance_threshold: usize,
}

impl Default for Router {
    fn default() -> Self {
        Router::new(RoutePolicy::CacheAware, DEFAULT_BALANCE_THRESHOLD)
    }
}

/// How the router picks a group (`--route-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutePolicy {
    /// The group caching the longest prefix, within the balance threshold of the least loaded.
    CacheAware,
    /// The least loaded group, caches ignored.
    LeastLoaded,
}

/// Why a request went where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// To the group holding the longest cached prefix of its prompt.
    Prefix,
    /// No group holds a prefix of it: to the least loaded.
    LeastLoaded,
    /// The group holding its prefix was loaded beyond the threshold: to the least loaded.
    Overloaded,
}

impl Decision {
    pub fn label(self) -> &'static str {
        match self {
            Decision::Prefix => "prefix",
            Decision::LeastLoaded => "least_loaded",
            Decision::Overloaded => "overloaded",
        }
    }
}

/// What the router knows of a group when it routes a prompt.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Prompt tokens of its longest cached prefix.
    pub cached: usize,
    /// Running plus waiting requests.
    pub load: usize,
    /// Requests routed to it so far.
    pub routed: u64,
}

/// The rule, on its own: the least-loaded candidate (fewest routed among equals), unless one
/// holds a cached prefix and is within `threshold` requests of it; then the one with the longest
/// prefix (least loaded among equals). None for no candidates.
pub fn choose(cands: &[Candidate], threshold: usize) -> Option<(usize, Decision)> {
    let least = (0..cands.len()).min_by_key(|&i| (cands[i].load, cands[i].routed))?;
    let best =
        (0..cands.len()).max_by_key(|&i| (cands[i].cached, std::cmp::Reverse((cands[i].load, cands[i].routed))))?;
    Some(match cands[best].cached {
        0 => (least, Decision::LeastLoaded),
        _ if cands[best].load <= cands[least].load + threshold => (best, Decision::Prefix),
        _ => (least, Decision::Overloaded),
    })
}

/// A request's group, with its prompt's block hashes when the group's prefix cache is on. The
/// request counts as the group's load until this is dropped (once it is queued there).
pub struct Routed {
    pub group: Arc<Ready>,
    pub hashes: Option<Vec<Hash>>,
    pub decision: Decision,
}

impl Routed {
    fn new(group: Arc<Ready>, hashes: Option<Vec<Hash>>, decision: Decision) -> Self {
        group.routed.fetch_add(1, Ordering::Relaxed);
        group.in_transit.fetch_add(1, Ordering::Relaxed);
        Routed { group, hashes, decision }
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.group.in_transit.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    pub fn new(policy: RoutePolicy, balance_threshold: usize) -> Self {
        Router { groups: RwLock::default(), policy, balance_threshold }
    }

    /// Adds a group, replacing one of the same name.
    pub fn insert(&self, ready: Ready) -> Arc<Ready> {
        let ready = Arc::new(ready);
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        groups.retain(|g| g.name != ready.name);
        groups.push(ready.clone());
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        ready
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Ready>> {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        let i = groups.iter().position(|g| g.name == name)?;
        Some(groups.remove(i))
    }

    /// Every group, by name.
    pub fn all(&self) -> Vec<Arc<Ready>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The accepting group with the fewest requests (ties: the one routed fewer so far, so idle
    /// groups take turns), or, when none accepts, any group (so that its own refusal, draining
    /// or failed, is what the caller hears).
    pub fn pick(&self) -> Option<Arc<Ready>> {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        let load = |g: &Ready| (g.load(), g.routed.load(Ordering::Relaxed));
        groups.iter().filter(|g| g.scheduler.accepting()).min_by_key(|g| load(g)).or(groups.first()).cloned()
    }

    /// The group for `prompt` (of a request of `total` tokens with its output) by the rule of
    /// [`choose`] among the accepting groups with room for it, counting the request against
    /// it; when none accepts, any group (whose refusal the caller hears). Hashes the prompt
    /// once per way the groups key their caches: call it off the async threads.
    pub fn route(&self, prompt: &[u32], total: usize) -> Option<Routed> {
        let groups = self.all();
        let fits: Vec<&Arc<Ready>> =
            groups.iter().filter(|g| g.scheduler.accepting() && g.limits.max_request_tokens >= total).collect();
        if fits.is_empty() {
            return Some(Routed::new(groups.first()?.clone(), None, Decision::LeastLoaded));
        }
        // The prompt's block hashes, once per way the groups key their caches.
        let mut keyings: Vec<(usize, Vec<Hash>)> = Vec::new();
        let mut key_of = Vec::with_capacity(fits.len());
        for (i, g) in fits.iter().enumerate() {
            let same = keyings.iter().position(|&(j, _)| fits[j].scheduler.same_prefix_keys(&g.scheduler));
            key_of.push(same.unwrap_or_else(|| {
                keyings.push((i, g.scheduler.prefix_hashes(prompt)));
                keyings.len() - 1
            }));
        }
        let cands: Vec<Candidate> = fits
            .iter()
            .zip(&key_of)
            .map(|(g, &k)| Candidate {
                cached: match self.policy {
                    RoutePolicy::CacheAware => g.scheduler.cached_prefix_tokens(&keyings[k].1, prompt.len()),
                    RoutePolicy::LeastLoaded => 0,
                },
                load: g.load(),
                routed: g.routed.load(Ordering::Relaxed),
            })
            .collect();
        let (i, decision) = choose(&cands, self.balance_threshold)?;
        let group = fits[i].clone();
        METRICS.route_decisions.with_label_values(&[decision.label()]).inc();
        METRICS.route_cached_tokens.with_label_values(&[decision.label()]).inc_by(cands[i].cached as u64);
        Some(Routed::new(group, Some(keyings.swap_remove(key_of[i]).1), decision))
    }

    /// Whether some group takes requests.
    pub fn accepting(&self) -> bool {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).iter().any(|g| g.scheduler.accepting())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(cached: usize, load: usize, routed: u64) -> Candidate {
        Candidate { cached, load, routed }
    }

    #[test]
    fn the_longest_prefix_wins_within_the_threshold_and_load_beyond_it() {
        assert_eq!(choose(&[], 4), None);
        // Nothing cached: the least loaded, then the one routed fewer among equals.
        assert_eq!(choose(&[c(0, 3, 0), c(0, 1, 9), c(0, 1, 2)], 4), Some((2, Decision::LeastLoaded)));
        // A cached prefix within the threshold: it wins, the longest first.
        assert_eq!(choose(&[c(0, 0, 0), c(4096, 4, 0), c(8192, 3, 0)], 4), Some((2, Decision::Prefix)));
        // Equal prefixes: the less loaded of them.
        assert_eq!(choose(&[c(64, 2, 0), c(64, 1, 5)], 4), Some((1, Decision::Prefix)));
        // Beyond the threshold: the least loaded instead.
        assert_eq!(choose(&[c(0, 0, 0), c(8192, 5, 0)], 4), Some((0, Decision::Overloaded)));
        assert_eq!(choose(&[c(0, 1, 0), c(8192, 5, 0)], 4), Some((1, Decision::Prefix)));
        // A threshold of 0: the prefix only ties with the least load.
        assert_eq!(choose(&[c(0, 0, 0), c(8192, 1, 0)], 0), Some((0, Decision::Overloaded)));
    }
}
