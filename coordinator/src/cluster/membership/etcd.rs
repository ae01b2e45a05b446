//! The etcd side of membership (etcd-client): a lease kept alive for as long as the process
//! lives, a rank's registration under it, the coordinator's watch of the cluster's keys, and
//! group ownership by compare-and-set.
//!
//! Every loop here outlives etcd outages: on an error it reconnects with backoff. A lease that
//! etcd no longer knows (it expired while we could not reach etcd) is replaced by a new one and
//! the keys are put again. A watch that broke is re-established by a full read first, so no
//! change is missed.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::{mpsc, watch};

use super::Change;

/// Where etcd is and how long leases live.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Seconds a lease outlives its last renewal: how quickly a lost process is noticed.
    pub lease_ttl: u64,
}

impl EtcdConfig {
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(self.lease_ttl.max(2)))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        Client::connect(&self.endpoints, Some(opts)).await
    }
}

/// Waits before the next attempt: 0.2 s doubling to 3 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(200))
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(3));
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(200);
    }
}

/// The lease id of a live lease, or `None` while there is none (etcd unreachable, or the lease
/// was lost and is being replaced).
pub type LeaseWatch = watch::Receiver<Option<i64>>;

/// Keeps a lease alive until the process ends, replacing it when it is lost. `on_new` runs
/// with each new lease (to put the keys that live under it) before it is published.
pub fn keep_lease<F, Fut>(cfg: EtcdConfig, what: String, on_new: F) -> LeaseWatch
where
    F: Fn(Client, i64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), etcd_client::Error>> + Send,
{
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            let outcome: Result<std::convert::Infallible, etcd_client::Error> = async {
                let mut client = cfg.connect().await?;
                let lease = client.lease_grant(cfg.lease_ttl as i64, None).await?.id();
                on_new(client.clone(), lease).await?;
                tx.send_replace(Some(lease));
                tracing::info!(what = %what, lease, ttl = cfg.lease_ttl, "registered in etcd");
                let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
                let period = Duration::from_millis(cfg.lease_ttl * 1000 / 3).max(Duration::from_millis(200));
                loop {
                    keeper.keep_alive().await?;
                    match tokio::time::timeout(period.max(Duration::from_secs(1)), responses.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Ok(_)) => return Err(etcd_client::Error::LeaseKeepAliveError("the lease expired".into())),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(etcd_client::Error::LeaseKeepAliveError("no keep-alive reply".into())),
                    }
                    tokio::time::sleep(period).await;
                }
            }
            .await;
            let Err(e) = outcome;
            if tx.borrow().is_some() {
                backoff.reset();
            }
            tx.send_replace(None);
            tracing::warn!(what = %what, error = %e, "etcd lease lost; registering again");
            backoff.wait().await;
        }
    });
    rx
}

/// Registers `key = value` under a lease of its own for as long as the process lives.
pub fn register(cfg: EtcdConfig, key: String, value: String) -> LeaseWatch {
    let what = key.clone();
    keep_lease(cfg, what, move |mut client, lease| {
        let (key, value) = (key.clone(), value.clone());
        async move {
            client.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
            Ok(())
        }
    })
}

/// Revokes a lease (its keys go at once): a clean shutdown's last word.
pub async fn revoke(cfg: &EtcdConfig, lease: i64) {
    let done = async {
        let mut c = cfg.connect().await?;
        c.lease_revoke(lease).await
    };
    match tokio::time::timeout(Duration::from_secs(2), done).await {
        Ok(Ok(_)) => tracing::info!(lease, "etcd lease revoked"),
        Ok(Err(e)) => tracing::warn!(lease, error = %e, "could not revoke the etcd lease; it will expire"),
        Err(_) => tracing::warn!(lease, "etcd did not answer the revoke; the lease will expire"),
    }
}

/// Streams every change under `prefix`: a full read first (and again after each reconnect),
/// then the watch events from just after that read.
pub fn watch_prefix(cfg: EtcdConfig, prefix: String) -> mpsc::UnboundedReceiver<Change> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            let outcome: Result<(), etcd_client::Error> = async {
                let mut client = cfg.connect().await?;
                let all = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
                let revision = all.header().map_or(0, |h| h.revision());
                let kvs =
                    all.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()));
                if tx.send(Change::Snapshot(kvs.collect())).is_err() {
                    return Ok(());
                }
                backoff.reset();
                let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(revision + 1);
                let mut stream = client.watch(prefix.as_str(), Some(opts)).await?;
                while let Some(resp) = stream.message().await? {
                    if resp.canceled() {
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch cancelled: {}",
                            resp.cancel_reason()
                        )));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let change = match ev.event_type() {
                            EventType::Put => Change::Put(key, kv.value().to_vec()),
                            EventType::Delete => Change::Delete(key),
                        };
                        if tx.send(change).is_err() {
                            return Ok(());
                        }
                    }
                }
                Err(etcd_client::Error::WatchError("the watch stream ended".into()))
            }
            .await;
            match outcome {
                Ok(()) => return, // nobody listens any more
                Err(e) => tracing::warn!(error = %e, "etcd watch lost; reconnecting (membership kept as it was)"),
            }
            backoff.wait().await;
        }
    });
    rx
}

/// Puts `key = id` under `lease` if the key does not exist; true if it is (now) ours.
pub async fn claim(client: &mut Client, key: &str, id: &str, lease: i64) -> Result<bool, etcd_client::Error> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, id, Some(PutOptions::new().with_lease(lease)))])
        .or_else([TxnOp::get(key, None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        return Ok(true);
    }
    let mine = resp.op_responses().into_iter().any(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().iter().any(|kv| kv.value() == id.as_bytes()),
        _ => false,
    });
    Ok(mine)
}

/// Deletes `key` if it still says `id`.
pub async fn release(client: &mut Client, key: &str, id: &str) -> Result<(), etcd_client::Error> {
    let txn = Txn::new().when([Compare::value(key, CompareOp::Equal, id)]).and_then([TxnOp::delete(key, None)]);
    client.txn(txn).await?;
    Ok(())
}
