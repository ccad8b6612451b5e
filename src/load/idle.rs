//! The `idle` scenario: N authenticated, idle sockets (one user each), spread over loopback
//! source addresses; the server's memory per socket, read from /proc before and after. With
//! `--protocol xmpp` each socket is an XMPP-over-WebSocket session (logged in, bound, initial
//! presence sent), so the figure is the cost of an idle XMPP session.
//!
//! Reported per socket: the growth of the server's resident set (VmRSS of `--server-pid`, or of
//! the process listening on the port), and the growth of the kernel's TCP buffer memory and slab
//! (machine-wide: both ends of each loopback connection, this client's included).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::sync::Semaphore;

use super::fleet::{self, End, Held};
use super::procfs;

/// How long connecting may take in all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// Memory readings at one moment, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    server_rss: Option<u64>,
    tcp: Option<u64>,
    slab: Option<u64>,
    client_rss: Option<u64>,
}

fn mem(pid: Option<u32>) -> Mem {
    Mem { server_rss: pid.and_then(procfs::rss_kib), tcp: procfs::tcp_mem_kib(), slab: procfs::slab_kib(), client_rss: procfs::self_rss_kib() }
}

/// (after - before) KiB per socket.
fn per(before: Option<u64>, after: Option<u64>, n: u64) -> Option<f64> {
    Some((after? as f64 - before? as f64) / n.max(1) as f64)
}

fn kib(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.1} KiB"))
}

pub async fn run(ctx: &super::Ctx) -> anyhow::Result<super::Outcome> {
    let a = &ctx.args;
    let n = a.users.unwrap_or(1000).max(1);
    let sources = a.sources.unwrap_or(n.div_ceil(fleet::PER_SOURCE)).max(1);
    let hold = a.duration.unwrap_or(5.0);
    let limit = procfs::raise_nofile(n as u64 + 256);
    if limit < n as u64 + 64 {
        bail!("this process may open {limit} files, too few for {n} sockets (raise `ulimit -n`, or run several load processes)");
    }
    let pid = a.server_pid.or_else(|| procfs::listener_pid(ctx.target.addr.port()));
    if pid.is_none() {
        ctx.progress("idle: server pid not found (pass --server-pid): no server memory figures");
    }
    ctx.progress(&format!("idle: {n} sockets from {sources} source address(es), server pid {pid:?}"));
    let accounts = super::accounts::setup(&ctx.targets, super::accounts::names(&ctx.prefix, n), &ctx.password, a.setup_concurrency, a.quiet).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mem(pid);

    let t0 = Instant::now();
    let deadline = t0 + CONNECT_TIMEOUT;
    let sem = Arc::new(Semaphore::new(a.setup_concurrency.max(1)));
    let up = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    let xmpp = a.protocol == super::WireProtocol::Xmpp;
    for (i, acc) in accounts.iter().enumerate() {
        let (sem, target, token, enc, up) = (sem.clone(), ctx.target_of(i).clone(), acc.token.clone(), ctx.enc, up.clone());
        let (user, password, domain) = (acc.user.clone(), ctx.password.clone(), a.xmpp_domain.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let source = fleet::source_ip(i, sources);
            let r = if xmpp {
                fleet::connect_xmpp(&target, source, &user, &password, &domain, deadline).await
            } else {
                fleet::connect(&target, source, &token, enc, deadline).await
            };
            if r.is_ok() {
                up.fetch_add(1, Ordering::Relaxed);
            }
            r.map(|c| Held::new(c.ws))
        }));
    }
    let ticker = fleet::ticker("idle", "sockets up", up.clone(), n, a.quiet, t0);
    let mut held = Vec::with_capacity(n);
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for t in tasks {
        match t.await {
            Ok(Ok(h)) => held.push(h),
            Ok(Err(codes)) => codes.into_iter().for_each(|c| *errors.entry(c).or_insert(0) += 1),
            Err(_) => *errors.entry("task_failed".into()).or_insert(0) += 1,
        }
    }
    ticker.abort();
    let connect_s = t0.elapsed().as_secs_f64();
    let connected = held.len() as u64;
    ctx.progress(&format!("idle: {connected} sockets up in {connect_s:.1} s; holding {hold} s"));
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let after = mem(pid);
    let mut health = super::http::Client::new(ctx.target.clone());
    let server_sockets = health.get("/v1/healthz").await.ok().and_then(|r| r.json()["sockets"].as_u64());
    let still_open = held.iter().filter(|h| !h.is_finished()).count() as u64;
    fleet::end_all(held, End::Close, Duration::from_secs(20)).await;

    let rss = per(before.server_rss, after.server_rss, connected);
    let tcp = per(before.tcp, after.tcp, connected);
    let slab = per(before.slab, after.slab, connected);
    let client = per(before.client_rss, after.client_rss, connected);
    let ok = connected == n as u64 && still_open == connected;
    let what = if xmpp { "XMPP sessions (RFC 7395 WebSocket, SASL PLAIN, bound, available)" } else { "sockets" };
    let human = format!(
        "idle: {connected}/{n} authenticated idle {what} up in {connect_s:.1} s from {sources} source address(es); \
         {still_open} still open after {hold} s; server says {} sockets\n\
         \x20 server RSS: {} -> {} KiB: {} per socket\n\
         \x20 kernel (both ends of each loopback connection, machine-wide): TCP buffers {} and slab {} per socket\n\
         \x20 this client: {} per socket\n\
         \x20 connection failures: {}",
        server_sockets.map_or("?".into(), |s| s.to_string()),
        before.server_rss.map_or("?".into(), |v| v.to_string()),
        after.server_rss.map_or("?".into(), |v| v.to_string()),
        kib(rss),
        kib(tcp),
        kib(slab),
        kib(client),
        if errors.is_empty() { "none".to_owned() } else { format!("{errors:?}") }
    );
    let json = json!({
        "scenario": "idle",
        "protocol": if xmpp { "xmpp" } else { "native" },
        "sockets": n,
        "connected": connected,
        "still_open": still_open,
        "server_sockets": server_sockets,
        "sources": sources,
        "connect_s": connect_s,
        "server_pid": pid,
        "server_rss_kib": { "before": before.server_rss, "after": after.server_rss, "per_socket": rss },
        "kernel_tcp_kib_per_socket_both_ends": tcp,
        "kernel_slab_kib_per_socket_both_ends": slab,
        "client_rss_kib_per_socket": client,
        "errors": errors,
        "ok": ok,
    });
    Ok(super::Outcome { human, json, ok })
}
