//! The queue of workloads that may carry an injection no binding wants any
//! more (see `controller::sweeper`). Filled by watch events on every replica
//! (deduplicated: at most one entry per workload), drained by the leader.

use std::collections::BTreeSet;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::WorkloadId;

/// Workloads waiting to be looked at.
#[derive(Default)]
pub struct Orphans {
    pending: Mutex<BTreeSet<WorkloadId>>,
    /// Woken on every addition.
    pub wake: Notify,
}

impl Orphans {
    /// Asks for a look at `id` (deduplicated).
    pub fn add(&self, id: WorkloadId) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id);
        }
        self.wake.notify_one();
    }

    /// Takes every pending workload.
    pub fn take(&self) -> Vec<WorkloadId> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p).into_iter().collect())
            .unwrap_or_default()
    }
}
