//! The `storm` scenario: N connected users all lose their connection at once (the TCP
//! connection is dropped without a WebSocket close, as when a network goes away) and reconnect
//! at once, each retrying with jittered backoff (honouring `Retry-After`). Measures the time
//! until every one is back (`hello` answered through `synced`), and polls `GET /v1/healthz`
//! every 100 ms throughout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Semaphore;

use super::fleet::{self, End, Held};
use super::stats::{self, hist};
use super::{http, procfs};

/// How often healthz is polled.
const POLL: Duration = Duration::from_millis(100);
/// A healthz answer slower than this counts as not answering.
const HEALTHZ_LIMIT: Duration = Duration::from_secs(2);

/// Polls healthz until `stop`: (polls, failures, latency histogram in µs).
async fn poll_healthz(target: http::Target, stop: Arc<AtomicBool>) -> (u64, u64, hdrhistogram::Histogram<u64>) {
    let mut h = hist();
    let (mut polls, mut failed) = (0, 0);
    let mut client = http::Client::new(target);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        polls += 1;
        match tokio::time::timeout(HEALTHZ_LIMIT, client.get("/v1/healthz")).await {
            Ok(Ok(r)) if r.status == 200 => {}
            _ => {
                failed += 1;
                client = http::Client::new(client_target(&client));
            }
        }
        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
        tokio::time::sleep(POLL.saturating_sub(t.elapsed())).await;
    }
    (polls, failed, h)
}

/// Runs [`poll_healthz`] on a thread and runtime of its own. On the load generator's runtime
/// the poll waited behind the 19,000 reconnecting clients' tasks: it reported a 3-4 s poll
/// while a separate process polling the same server saw at most 0.36 s (2026-12-02).
fn spawn_poller(target: http::Target, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<(u64, u64, hdrhistogram::Histogram<u64>)>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(std::thread::Builder::new().name("healthz-poller".into()).spawn(move || rt.block_on(poll_healthz(target, stop)))?)
}

fn client_target(c: &http::Client) -> http::Target {
    c.target().clone()
}

pub async fn run(ctx: &super::Ctx) -> anyhow::Result<super::Outcome> {
    let a = &ctx.args;
    let n = a.users.unwrap_or(1000).max(1);
    // The dropped connections sit in TIME_WAIT on this side: the reconnections come from the
    // next `sources` addresses.
    let sources = a.sources.unwrap_or(n.div_ceil(fleet::PER_SOURCE)).max(1);
    let limit = procfs::raise_nofile(n as u64 + 256);
    if limit < n as u64 + 64 {
        bail!("this process may open {limit} files, too few for {n} sockets (raise `ulimit -n`)");
    }
    let timeout = Duration::from_secs_f64(a.timeout.max(1.0));
    ctx.progress(&format!("storm: {n} clients from {sources} source address(es) (then {sources} others), reconnect timeout {timeout:?}"));
    let accounts = super::accounts::setup(&ctx.targets, super::accounts::names(&ctx.prefix, n), &ctx.password, a.setup_concurrency, a.quiet).await?;

    // 1. Everyone connects (a few at a time).
    let t_conn = Instant::now();
    let sem = Arc::new(Semaphore::new(a.setup_concurrency.max(1)));
    let mut tasks = Vec::new();
    for (i, acc) in accounts.iter().enumerate() {
        let (sem, target, token, enc) = (sem.clone(), ctx.target_of(i).clone(), acc.token.clone(), ctx.enc);
        let deadline = Instant::now() + Duration::from_secs(600);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            fleet::connect(&target, fleet::source_ip_from(i, sources, 0), &token, enc, deadline).await.map(|c| Held::new(c.ws))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(h)) => held.push(h),
            _ => bail!("could not connect every client before the storm"),
        }
    }
    let connect_s = t_conn.elapsed().as_secs_f64();
    ctx.progress(&format!("storm: {n} clients connected in {connect_s:.1} s; dropping them all"));

    // 2. healthz is polled from before the drop until after the last client is back.
    let stop_poll = Arc::new(AtomicBool::new(false));
    let poller = spawn_poller(ctx.target.clone(), stop_poll.clone())?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 3. Drop them all, then all reconnect at once.
    let t0 = Instant::now();
    fleet::end_all(held, End::Drop, Duration::from_secs(10)).await;
    let dropped_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let deadline = Instant::now() + timeout;
    let back = Arc::new(AtomicU64::new(0));
    let times = Arc::new(Mutex::new(hist()));
    let mut tasks = Vec::new();
    for (i, acc) in accounts.iter().enumerate() {
        let (target, token, enc, back, times) = (ctx.target_of(i).clone(), acc.token.clone(), ctx.enc, back.clone(), times.clone());
        tasks.push(tokio::spawn(async move {
            let r = fleet::connect(&target, fleet::source_ip_from(i, sources, sources), &token, enc, deadline).await;
            if r.is_ok() {
                back.fetch_add(1, Ordering::Relaxed);
                let _ = times.lock().record((t0.elapsed().as_micros() as u64).max(1));
            }
            r.map(|c| (Held::new(c.ws), c.attempts, c.failures))
        }));
    }
    let ticker = fleet::ticker("storm", "back", back.clone(), n, a.quiet, t0);
    let mut held = Vec::new();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut attempts_total = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok((h, attempts, failures))) => {
                held.push(h);
                attempts_total += u64::from(attempts);
                failures.into_iter().for_each(|c| *errors.entry(c).or_insert(0) += 1);
            }
            Ok(Err(failures)) => {
                *errors.entry("never_back".into()).or_insert(0) += 1;
                failures.into_iter().for_each(|c| *errors.entry(c).or_insert(0) += 1);
            }
            Err(_) => *errors.entry("task_failed".into()).or_insert(0) += 1,
        }
    }
    ticker.abort();
    let all_back_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_poll.store(true, Ordering::Relaxed);
    let (polls, poll_failed, poll_lat) = tokio::task::spawn_blocking(move || poller.join()).await.ok().and_then(Result::ok).unwrap_or((0, 1, hist()));
    let came_back = held.len() as u64;
    fleet::end_all(held, End::Close, Duration::from_secs(20)).await;

    let times = times.lock().clone();
    let ok = came_back == n as u64 && poll_failed == 0;
    let human = format!(
        "storm: {n} clients dropped at once ({dropped_ms:.0} ms to drop) and reconnected: {came_back}/{n} back, \
         the last after {all_back_s:.2} s (timeout {:.0} s)\n\
         \x20 time back per client: {}\n\
         \x20 connection attempts: {attempts_total} for {came_back} clients; failures: {}\n\
         \x20 healthz during the storm: {polls} polls, {poll_failed} failed or over {HEALTHZ_LIMIT:?}; latency {}\n\
         \x20 before the storm: {n} clients connected in {connect_s:.1} s from {sources} source address(es)\n\
         \x20 result: {}",
        timeout.as_secs_f64(),
        stats::line(&times),
        if errors.is_empty() { "none".to_owned() } else { format!("{errors:?}") },
        stats::line(&poll_lat),
        if ok { "OK" } else { "FAILED" }
    );
    let json = json!({
        "scenario": "storm",
        "clients": n,
        "sources": sources,
        "connect_s": connect_s,
        "back": came_back,
        "all_back_s": all_back_s,
        "time_back": stats::summary(&times),
        "attempts": attempts_total,
        "errors": errors,
        "healthz": { "polls": polls, "failed": poll_failed, "latency": stats::summary(&poll_lat) },
        "ok": ok,
    });
    Ok(super::Outcome { human, json, ok })
}
