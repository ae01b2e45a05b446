//! The worker groups: connecting to a group's ranks and driving their steps (`group`), and
//! which ranks exist, as etcd says (`membership`).

pub mod group;
pub mod membership;
