//! Removal without finalizers. A binding deleted (while the operator runs or
//! not), a workload relabelled out of every selector, a namespace no longer
//! allowed: each leaves a workload carrying fields of ours that no binding
//! wants. Such workloads are found from the workloads themselves (what our
//! field manager owns in them), at start-up, on every resync, on a binding's
//! deletion and on the workload's own events, and brought back to what the
//! remaining bindings want, which takes out exactly the fields we own.

use std::sync::Arc;

use tracing::warn;

use super::Context;

/// Queues every workload that carries fields of ours but that no binding
/// selects.
pub fn scan(ctx: &Context) {
    for id in ctx.stores.workloads_carrying_ours() {
        if ctx.watches_namespace(&id.namespace) && !ctx.stores.selected_by_any(&id) {
            ctx.orphans.add(id);
        }
    }
}

/// The leader's sweeper: brings the queued workloads to what the remaining
/// bindings want (nothing, for those no binding selects), until `shutdown`
/// resolves. Failures are retried with per-workload
/// exponential backoff.
pub async fn sweep(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut resync = tokio::time::interval(ctx.options.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = resync.tick() => scan(&ctx),
            () = ctx.orphans.wake.notified() => {}
        }
        for id in ctx.orphans.take() {
            // Looked at again now: the fields may be gone. A workload that a
            // remaining binding still selects is brought to what the
            // remaining bindings want, like any other (nothing is written
            // when that is what it carries).
            if !ctx.watches_namespace(&id.namespace) || !ctx.stores.carries_ours(&id) {
                continue;
            }
            let key = format!("orphan {id}");
            match super::binding::sync_workload(id.clone(), "", None, &ctx).await {
                // `sync_workload` logs what it applied.
                Ok(_) => ctx.backoff.succeeded(&key),
                Err(err) => {
                    let wait = ctx.backoff.failed(&key);
                    warn!(workload = %id, error = %err, retry_in = ?wait, "removing the injection failed");
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        ctx.orphans.add(id);
                    });
                }
            }
        }
    }
}
