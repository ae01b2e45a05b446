//! The scheduling loop's side of the prefix cache's disk tier: sending the cache's file work
//! (writes, reads, removals, the listing) to every rank between steps, and writing what memory
//! holds before a drained server stops.

use std::time::Instant;

use tokio::sync::watch;

use super::prefix::PrefixCache;
use super::{aborted_with, Loop, StepRunner};

impl<R: StepRunner> Loop<R> {
    /// Runs the prefix cache's pending disk-tier work on the workers, if any.
    pub(super) async fn files(&mut self, aborted: &mut watch::Receiver<Option<String>>) {
        let Some(files) = self.prefix.as_mut().and_then(PrefixCache::take_files) else { return };
        let world = self.runner.cp_size();
        let started = Instant::now();
        let call = self.runner.snapshot_files(files.clone());
        let result = tokio::select! {
            r = call => r,
            _ = aborted_with(aborted) => return,
        };
        let reports = match result {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e.message, "prefix-cache disk tier request failed");
                None
            }
        };
        let tp = reports.as_ref().map_or(1, |r| (r.len() / world.max(1)).max(1));
        // Bytes written and read, on the busiest rank.
        let written = reports.iter().flatten().map(|r| r.saved.iter().map(|s| s.1).sum::<u64>()).max().unwrap_or(0);
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            removed = files.remove.len(),
            written = files.save.len(),
            written_bytes = written,
            read = files.load.len(),
            "prefix-cache disk tier"
        );
        if let Some(p) = self.prefix.as_mut() {
            p.files_done(&files, reports.as_deref(), tp);
        }
        self.publish();
    }

    /// A drained server's snapshots go to the disk tier (if there is one) before it stops.
    pub(super) async fn spill_before_exit(&mut self, aborted: &mut watch::Receiver<Option<String>>) {
        let Some(p) = self.prefix.as_mut() else { return };
        p.spill_all();
        let started = Instant::now();
        self.files(aborted).await;
        let stats = self.prefix.as_ref().map(PrefixCache::stats).unwrap_or_default();
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            disk_snapshots = stats.disk_snapshots,
            "prefix cache written to disk before shutdown"
        );
    }
}
