//! `GET /metrics`: Prometheus text format, through the `metrics` facade and its Prometheus
//! exporter. Names follow Prometheus conventions, units in the name (`_seconds`, `_bytes`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::{web, HttpResponse};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::shared::Shared;

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

/// Names every metric with its help text and registers it at zero, with its label values where
/// they are known, so a fresh server exports every family the README lists.
fn describe() {
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
    describe_gauge!("parley_sockets_open", "Open WebSocket connections");
    describe_gauge!("parley_sessions_authenticated", "Sessions past hello, registered online");
    describe_counter!("parley_state_rebuilds_total", "Start-ups that found sled damaged and rebuilt the state");
    describe_counter!("parley_logins_total", "Login attempts by result");
    describe_counter!("parley_registrations_total", "Users registered");
    describe_counter!("parley_messages_acked_total", "Messages acknowledged after commit");
    describe_histogram!("parley_ack_latency_seconds", Unit::Seconds, "send frame received → ack queued");
    describe_histogram!("parley_commit_batch_size", Unit::Count, "Commands per log entry (group commit)");
    describe_histogram!("parley_fsync_duration_seconds", Unit::Seconds, "Log append + fsync per batch");
    describe_histogram!("parley_commit_duration_seconds", Unit::Seconds, "Append + fsync + apply per batch");
    describe_histogram!("parley_checkpoint_duration_seconds", Unit::Seconds, "sled flush + fsync per checkpoint");
    describe_histogram!("parley_materialize_duration_seconds", Unit::Seconds, "Writing one layer of applied state from memory to sled");
    describe_histogram!("parley_materialize_keys", Unit::Count, "Keys per materialized layer");
    describe_counter!("parley_materialize_takeovers_total", "Layers the idle-priority sled writer left to the materializer (the machine was too busy)");
    describe_histogram!("parley_snapshot_duration_seconds", Unit::Seconds, "Writing one snapshot of the whole state");
    describe_gauge!("parley_log_bytes", Unit::Bytes, "Write-ahead log size");
    describe_gauge!("parley_log_segments", "Write-ahead log segment files");
    describe_gauge!("parley_recovery_seconds", Unit::Seconds, "Time the last start-up recovery took");
    describe_counter!("parley_duplicate_sends_total", "Resends answered from the dedup record");
    describe_counter!("parley_slow_consumer_closes_total", "Sockets closed with 4008");
    describe_counter!("parley_connections_aborted_total", "WebSocket connections still open slow_close_wait_ms after their session ended, aborted");
    describe_counter!("parley_rate_limited_total", "Refused sends and logins, by what was limited");
    describe_counter!("parley_admission_rejections_total", "WebSocket upgrades refused with 503, by why");
    describe_counter!("parley_session_restarts_total", "Session handler panics (supervision restarts)");
    describe_counter!("parley_actor_restarts_total", "Registry and presence actor restarts, by actor");
    describe_counter!("parley_commit_failures_total", "Commit batches that failed (answered unavailable)");
    describe_counter!("parley_bad_frames_total", "Client frames refused as malformed");
    describe_counter!("parley_frames_received_total", "Client frames decoded or refused");
    describe_gauge!("parley_presence_watched_users", "Users with at least one presence watcher");
    describe_counter!("parley_retention_deleted_total", "Messages deleted by retention");
    describe_gauge!("parley_xmpp_streams_open", "Open XMPP streams (TCP and WebSocket)");
    describe_counter!("parley_xmpp_stream_errors_total", "XMPP streams closed with a stream error");
    for g in ["parley_sockets_open", "parley_sessions_authenticated", "parley_log_bytes", "parley_log_segments", "parley_recovery_seconds", "parley_presence_watched_users", "parley_xmpp_streams_open"] {
        gauge!(g).set(0.0);
    }
    for c in [
        "parley_registrations_total",
        "parley_messages_acked_total",
        "parley_duplicate_sends_total",
        "parley_slow_consumer_closes_total",
        "parley_connections_aborted_total",
        "parley_session_restarts_total",
        "parley_commit_failures_total",
        "parley_bad_frames_total",
        "parley_frames_received_total",
        "parley_retention_deleted_total",
        "parley_xmpp_stream_errors_total",
        "parley_state_rebuilds_total",
        "parley_materialize_takeovers_total",
    ] {
        counter!(c).increment(0);
    }
    for result in ["ok", "failed"] {
        counter!("parley_logins_total", "result" => result).increment(0);
    }
    for what in ["send", "login", "password_hash"] {
        counter!("parley_rate_limited_total", "what" => what).increment(0);
    }
    for why in crate::http::ADMISSION_WHY.map(|(label, _)| label).into_iter().chain(["xmpp"]) {
        counter!("parley_admission_rejections_total", "why" => why).increment(0);
    }
    for actor in ["registry", "presence"] {
        counter!("parley_actor_restarts_total", "actor" => actor).increment(0);
    }
    for h in ["parley_ack_latency_seconds", "parley_commit_batch_size", "parley_fsync_duration_seconds", "parley_commit_duration_seconds", "parley_checkpoint_duration_seconds", "parley_materialize_duration_seconds", "parley_materialize_keys", "parley_snapshot_duration_seconds"] {
        // Registered without a sample: exported with empty buckets, a zero sum and count.
        let _ = histogram!(h);
    }
}

/// `GET /metrics`.
pub async fn render(s: web::Data<Arc<Shared>>) -> HttpResponse {
    let body = s.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body)
}
