//! The retention job (`[retention]`): deletes old messages through the commit pipeline, like
//! any command, so what is deleted is decided in apply and replay deletes the same.

use std::time::Duration;

use crate::config::Config;
use crate::storage::Pipeline;

/// Starts the retention job (unless `retention.mode` is `forever`): every `interval_ms`, purge
/// entries of at most `batch` messages each, through the commit pipeline like any command, until
/// a pass finds nothing more to delete. Small entries interleave with live traffic.
pub fn start(cfg: &Config, pipeline: &Pipeline, cluster: Option<std::sync::Arc<crate::cluster::node::Node>>) {
    use crate::storage::records::{Command, PurgePolicy};
    use crate::storage::Outcome;
    let r = cfg.retention.clone();
    if r.mode == "forever" {
        return;
    }
    let pipeline = pipeline.clone();
    let _ = std::thread::Builder::new().name("parley-retention".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(r.interval_ms));
        // In a cluster only the leader purges: the purge is one log entry every node applies.
        if cluster.as_ref().is_some_and(|n| n.role().0 != "leader") {
            continue;
        }
        let policy = if r.mode == "days" {
            let now = crate::actors::presence::now_ms();
            PurgePolicy::Before { ts: now.saturating_sub(r.days * 86_400_000) }
        } else {
            PurgePolicy::Delivered
        };
        let mut from = String::new();
        let mut total = 0u64;
        loop {
            let Ok(rx) = pipeline.submit(Command::Purge { policy, max: r.batch, from: from.clone() }) else { break };
            match rx.blocking_recv() {
                Ok(Ok(Outcome::Purged { deleted, next })) => {
                    total += u64::from(deleted);
                    match next {
                        Some(n) => from = n,
                        None => break,
                    }
                }
                Err(_) => return,
                _ => break,
            }
        }
        if total > 0 {
            metrics::counter!("parley_retention_deleted_total").increment(total);
            tracing::info!(deleted = total, mode = %r.mode, "retention pass");
        }
    });
}
