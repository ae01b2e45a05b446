//! Membership in etcd: which worker ranks exist, and which coordinator owns each group.
//!
//! Layout, under `/yoco/<cluster>/`:
//! - `groups/<G>/ranks/<R>`: a worker rank, put under the worker's lease (JSON [`RankEntry`]).
//!   A rank whose process dies stops renewing its lease; etcd deletes the key when it expires.
//! - `owners/<G>`: the id of the coordinator that drives group G, under that coordinator's lease.
//!
//! This module is the plain part: key names, validated entries, and [`Members`], the view a
//! coordinator keeps of them. [`etcd`] talks to etcd; [`crate::server::dynamic`] acts on the view.

pub mod etcd;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest group a registration may claim (ranks are 0..world).
pub const MAX_WORLD: usize = 1024;
/// Largest value read from etcd; anything longer is not ours.
const MAX_VALUE_BYTES: usize = 4096;

/// What a worker rank publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankEntry {
    /// gRPC address of its `yoco.worker.v1.Worker` service.
    pub grpc: String,
    /// Address its collective (TCP, or NCCL's bootstrap) listens on.
    pub collective: String,
    /// Size of its group.
    pub world: usize,
    /// `cpu`, or `cuda:<n>`.
    pub device: String,
    /// Its global KV cache budget.
    pub cache_mib: usize,
    pub pid: u32,
}

/// A key of ours, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Rank { group: String, rank: usize },
    Owner { group: String },
}

/// Key names of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// Cluster and group names: what fits a path segment and a Kubernetes label.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Keys {
    pub fn new(cluster: &str) -> Result<Self, String> {
        if !valid_name(cluster) {
            return Err(format!("cluster name `{cluster}`: use 1 to 63 letters, digits, `-`, `_` or `.`"));
        }
        Ok(Keys { prefix: format!("/yoco/{cluster}/") })
    }

    /// Everything of the cluster (what a coordinator watches).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn rank(&self, group: &str, rank: usize) -> String {
        format!("{}groups/{group}/ranks/{rank}", self.prefix)
    }

    pub fn owner(&self, group: &str) -> String {
        format!("{}owners/{group}", self.prefix)
    }

    pub fn parse(&self, key: &str) -> Option<Key> {
        let rest = key.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["groups", g, "ranks", r] if valid_name(g) => {
                // Canonical decimal only: `01` and `1` must not be two keys for one rank.
                let rank: usize = r.parse().ok().filter(|n: &usize| *n < MAX_WORLD && n.to_string() == *r)?;
                Some(Key::Rank { group: g.to_string(), rank })
            }
            ["owners", g] if valid_name(g) => Some(Key::Owner { group: g.to_string() }),
            _ => None,
        }
    }
}

impl RankEntry {
    /// An entry read from etcd, checked: it names addresses and a world that holds its rank.
    pub fn parse(value: &[u8], rank: usize) -> Result<Self, String> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!("{} bytes, more than {MAX_VALUE_BYTES}", value.len()));
        }
        let e: RankEntry = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if e.world == 0 || e.world > MAX_WORLD || rank >= e.world {
            return Err(format!("rank {rank} of world {}: need rank < world <= {MAX_WORLD}", e.world));
        }
        for (what, addr) in [("grpc", &e.grpc), ("collective", &e.collective)] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("{what} address `{addr}` is not host:port with an IP host"));
            }
        }
        Ok(e)
    }
}

/// One watch event, or a full read (after connecting, or reconnecting to etcd).
#[derive(Debug, Clone)]
pub enum Change {
    Put(String, Vec<u8>),
    Delete(String),
    /// Everything under the prefix now: replaces what was known.
    Snapshot(Vec<(String, Vec<u8>)>),
}

/// The coordinator's view: the valid rank entries of each group, and each group's owner.
#[derive(Debug, Default)]
pub struct Members {
    ranks: BTreeMap<String, BTreeMap<usize, RankEntry>>,
    owners: BTreeMap<String, String>,
}

impl Members {
    /// Applies a change; malformed keys or entries are logged and skipped (a rank that wrote
    /// garbage is treated as absent).
    pub fn apply(&mut self, keys: &Keys, change: Change) {
        match change {
            Change::Snapshot(all) => {
                *self = Members::default();
                for (k, v) in all {
                    self.put(keys, &k, &v);
                }
            }
            Change::Put(k, v) => self.put(keys, &k, &v),
            Change::Delete(k) => match keys.parse(&k) {
                Some(Key::Rank { group, rank }) => {
                    if let Some(g) = self.ranks.get_mut(&group) {
                        g.remove(&rank);
                        if g.is_empty() {
                            self.ranks.remove(&group);
                        }
                    }
                }
                Some(Key::Owner { group }) => {
                    self.owners.remove(&group);
                }
                None => {}
            },
        }
    }

    fn put(&mut self, keys: &Keys, key: &str, value: &[u8]) {
        match keys.parse(key) {
            Some(Key::Rank { group, rank }) => match RankEntry::parse(value, rank) {
                Ok(e) => {
                    self.ranks.entry(group).or_default().insert(rank, e);
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "ignoring a malformed rank registration");
                    if let Some(g) = self.ranks.get_mut(&group) {
                        g.remove(&rank);
                    }
                }
            },
            Some(Key::Owner { group }) => {
                let owner = String::from_utf8_lossy(&value[..value.len().min(MAX_VALUE_BYTES)]).into_owned();
                self.owners.insert(group, owner);
            }
            None => tracing::debug!(key, "ignoring a key that is not ours"),
        }
    }

    /// Groups with at least one rank registered.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.ranks.keys().map(String::as_str)
    }

    /// The ranks of `group` in order, when all of them are registered and agree on the world.
    pub fn complete(&self, group: &str) -> Option<Vec<RankEntry>> {
        let ranks = self.ranks.get(group)?;
        let world = ranks.values().next()?.world;
        let all =
            ranks.len() == world && ranks.keys().copied().eq(0..world) && ranks.values().all(|e| e.world == world);
        all.then(|| ranks.values().cloned().collect())
    }

    /// The registration of one rank, if valid.
    pub fn rank(&self, group: &str, rank: usize) -> Option<&RankEntry> {
        self.ranks.get(group)?.get(&rank)
    }

    pub fn owner(&self, group: &str) -> Option<&str> {
        self.owners.get(group).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, world: usize) -> Vec<u8> {
        serde_json::to_vec(&RankEntry {
            grpc: format!("127.0.0.1:{port}"),
            collective: format!("127.0.0.1:{}", port + 1),
            world,
            device: "cpu".into(),
            cache_mib: 64,
            pid: 1,
        })
        .unwrap()
    }

    #[test]
    fn keys_round_trip_and_reject_what_is_not_ours() {
        let k = Keys::new("prod").unwrap();
        assert_eq!(k.rank("g0", 3), "/yoco/prod/groups/g0/ranks/3");
        assert_eq!(k.parse(&k.rank("g0", 3)), Some(Key::Rank { group: "g0".into(), rank: 3 }));
        assert_eq!(k.parse(&k.owner("g1")), Some(Key::Owner { group: "g1".into() }));
        for bad in [
            "/yoco/other/groups/g0/ranks/0",
            "/yoco/prod/groups/g0/ranks/x",
            "/yoco/prod/groups/g0/ranks/01",
            "/yoco/prod/groups/g0/ranks/99999",
            "/yoco/prod/groups/g 0/ranks/0",
            "/yoco/prod/groups/g0/ranks/0/extra",
            "/yoco/prod/owners/",
        ] {
            assert_eq!(k.parse(bad), None, "{bad}");
        }
        assert!(Keys::new("a/b").is_err() && Keys::new("").is_err());
    }

    #[test]
    fn a_group_is_complete_when_every_rank_agrees() {
        let k = Keys::new("c").unwrap();
        let mut m = Members::default();
        m.apply(&k, Change::Put(k.rank("g0", 1), entry(2000, 2)));
        assert_eq!(m.complete("g0"), None);
        assert_eq!(m.rank("g0", 0), None);
        m.apply(&k, Change::Put(k.rank("g0", 0), entry(1000, 2)));
        let ranks = m.complete("g0").unwrap();
        assert_eq!(ranks.iter().map(|e| e.grpc.as_str()).collect::<Vec<_>>(), ["127.0.0.1:1000", "127.0.0.1:2000"]);
        // A rank that claims another world breaks the agreement.
        m.apply(&k, Change::Put(k.rank("g0", 1), entry(2000, 3)));
        assert_eq!(m.complete("g0"), None);
        assert_eq!(m.rank("g0", 1).unwrap().world, 3);
        m.apply(&k, Change::Put(k.rank("g0", 1), entry(2000, 2)));
        assert!(m.complete("g0").is_some());
        // A lease expired.
        m.apply(&k, Change::Delete(k.rank("g0", 0)));
        assert_eq!(m.complete("g0"), None);
        // Garbage is no registration; a snapshot replaces everything.
        m.apply(&k, Change::Put(k.rank("g1", 0), b"{not json".to_vec()));
        m.apply(&k, Change::Put(k.rank("g2", 0), entry(3000, 1)));
        m.apply(&k, Change::Put(k.owner("g2"), b"coord-a".to_vec()));
        assert!(m.complete("g1").is_none() && m.complete("g2").is_some());
        assert_eq!(m.owner("g2"), Some("coord-a"));
        m.apply(&k, Change::Snapshot(vec![(k.rank("g3", 0), entry(4000, 1))]));
        assert_eq!(m.groups().collect::<Vec<_>>(), ["g3"]);
        assert_eq!(m.owner("g2"), None);
    }

    #[test]
    fn entries_are_checked() {
        assert!(RankEntry::parse(&entry(1, 2), 1).is_ok());
        assert!(RankEntry::parse(&entry(1, 2), 2).unwrap_err().contains("rank 2 of world 2"));
        assert!(RankEntry::parse(&entry(1, 0), 0).is_err());
        let bad_addr =
            br#"{"grpc":"worker-0:1","collective":"1.2.3.4:5","world":1,"device":"cpu","cache_mib":1,"pid":1}"#;
        assert!(RankEntry::parse(bad_addr, 0).unwrap_err().contains("grpc address"));
        assert!(RankEntry::parse(&vec![b' '; 5000], 0).is_err());
    }
}
