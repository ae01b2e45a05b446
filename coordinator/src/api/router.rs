//! The worker groups serving now, and which one takes the next request: the least loaded
//! (running plus waiting requests) of those accepting work, idle ones in turn. Several groups are data-parallel
//! replicas of one model; groups join when they form and leave when they fail or lose a rank.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::cluster::group::GroupHandle;
use crate::scheduler::request::Limits;
use crate::scheduler::Scheduler;

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
}

#[derive(Default)]
pub struct Router {
    groups: RwLock<Vec<Arc<Ready>>>,
}

impl Router {
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
        let load = |g: &Ready| {
            let (running, waiting) = g.scheduler.load();
            (running + waiting, g.routed.load(Ordering::Relaxed))
        };
        groups.iter().filter(|g| g.scheduler.accepting()).min_by_key(|g| load(g)).or(groups.first()).cloned()
    }

    /// Like [`Router::pick`], counting the request against the group.
    pub fn route(&self) -> Option<Arc<Ready>> {
        let g = self.pick()?;
        g.routed.fetch_add(1, Ordering::Relaxed);
        Some(g)
    }

    /// Whether some group takes requests.
    pub fn accepting(&self) -> bool {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).iter().any(|g| g.scheduler.accepting())
    }
}
