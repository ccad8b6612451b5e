//! `GET /metrics`: Prometheus text format, through the `metrics` facade and its Prometheus
//! exporter. Names follow Prometheus conventions, units in the name (`_seconds`, `_bytes`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::{web, HttpResponse};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::server::Shared;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let latency = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("parley_commit_batch_size".into()), &sizes))
                .map(|b| b.build_recorder());
            let recorder = match recorder {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics disabled");
                    return None;
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                return None;
            }
            let h = handle.clone();
            let _ = std::thread::Builder::new().name("parley-metrics".into()).spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                h.run_upkeep();
            });
            describe();
            Some(handle)
        })
        .clone()
}

/// Names every metric with its help text and makes it visible from the start.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("parley_sockets_open", "Open WebSocket connections");
    describe_gauge!("parley_sessions_authenticated", "Sessions past hello, registered online");
    describe_counter!("parley_messages_acked_total", "Messages acknowledged after commit");
    describe_counter!("parley_duplicate_sends_total", "Resends answered from the dedup record");
    describe_counter!("parley_frames_received_total", "Client frames decoded or refused");
    describe_counter!("parley_bad_frames_total", "Client frames refused as malformed");
    describe_counter!("parley_slow_consumer_closes_total", "Sockets closed with 4008");
    describe_counter!("parley_session_restarts_total", "Session handler panics (supervision restarts)");
    describe_counter!("parley_commit_failures_total", "Commit batches that failed (answered unavailable)");
    describe_counter!("parley_state_rebuilds_total", "Start-ups that found sled damaged and rebuilt the state from the whole log");
    describe_counter!("parley_logins_total", "Login attempts by result");
    describe_counter!("parley_registrations_total", "Users registered");
    describe_histogram!("parley_ack_latency_seconds", Unit::Seconds, "send frame received → ack queued");
    describe_histogram!("parley_commit_batch_size", Unit::Count, "Commands per log entry (group commit)");
    describe_histogram!("parley_fsync_duration_seconds", Unit::Seconds, "Log append + fsync per batch");
    describe_histogram!("parley_commit_duration_seconds", Unit::Seconds, "Append + fsync + apply per batch");
    describe_histogram!("parley_checkpoint_duration_seconds", Unit::Seconds, "sled flush + fsync per checkpoint");
    describe_gauge!("parley_log_bytes", Unit::Bytes, "Write-ahead log size");
    describe_gauge!("parley_log_segments", "Write-ahead log segment files");
    describe_gauge!("parley_recovery_seconds", Unit::Seconds, "Time the last start-up recovery took");
    describe_gauge!("parley_presence_watched_users", "Users with at least one presence watcher");
    metrics::gauge!("parley_sockets_open").set(0.0);
    metrics::gauge!("parley_sessions_authenticated").set(0.0);
    metrics::counter!("parley_messages_acked_total").absolute(0);
    metrics::counter!("parley_duplicate_sends_total").absolute(0);
    metrics::counter!("parley_slow_consumer_closes_total").absolute(0);
    metrics::counter!("parley_session_restarts_total").absolute(0);
}

/// `GET /metrics`.
pub async fn render(s: web::Data<Arc<Shared>>) -> HttpResponse {
    let body = s.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body)
}
