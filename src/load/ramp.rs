//! The `ramp` scenario: the chat engine in open loop, its offered rate stepped up (times
//! `--factor` each `--step` seconds) until a step fails, then bisected between the last step that
//! held and the first that did not. A step holds when its p99 ack latency is within
//! `--p99-bound-ms`, at least 95% of the offered rate was acked, delivery kept up (the recipients'
//! backlog at the end of the step is under 100 ms worth of traffic), and the client kept its pace.
//! The result is the highest rate that held.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use super::chat::{self, ChatConfig, Engine, Mode};
use super::stats::{self, Stats};

/// One step of the ramp.
struct Step {
    /// Offered, messages/s over all users.
    offered: f64,
    acked: f64,
    delivered: f64,
    ack_p50_us: u64,
    ack_p99_us: u64,
    delivery_p99_us: u64,
    /// Acked but not yet delivered at the end of the step.
    backlog: u64,
    skipped: u64,
    errors: u64,
    held: bool,
    why: String,
    /// Cores used during the step: (server, this client, other processes).
    cpu: (Option<f64>, Option<f64>, Option<f64>),
}

/// Pause between steps so that one step's queues do not spill into the next.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(ctx: &super::Ctx) -> anyhow::Result<super::Outcome> {
    let a = &ctx.args;
    let users = a.users.unwrap_or(100).max(2);
    let users = users - users % 2;
    let Some(start) = a.rate(10.0)? else { bail!("ramp needs a starting --rate per user (messages/s), not max") };
    anyhow::ensure!(a.factor > 1.0, "--factor must be above 1");
    let budget = a.duration.unwrap_or(60.0);
    let step_s = a.step.max(1.0);
    let bound_us = (a.p99_bound_ms * 1000.0) as u64;
    let dialogs = ctx.dialogs()?;
    ctx.progress(&format!(
        "ramp: {users} users, from {start} msg/s per user ({} msg/s), x{} per {step_s} s step, p99 bound {} ms, budget {budget} s",
        start * users as f64,
        a.factor,
        a.p99_bound_ms
    ));
    let accounts = super::accounts::setup(&ctx.targets, super::accounts::names(&ctx.prefix, users), &ctx.password, a.setup_concurrency, a.quiet).await?;
    let rate_milli = Arc::new(AtomicU64::new(0));
    let cfg = ChatConfig {
        enc: ctx.enc,
        protocol: a.chat_protocol(),
        xmpp_domain: a.xmpp_domain.clone(),
        password: ctx.password.clone(),
        mode: Mode::Open,
        rate_milli: rate_milli.clone(),
        received_every: Duration::from_millis(a.received_ms.max(1)),
        max_inflight: 10_000,
        connect_concurrency: a.setup_concurrency,
    };
    let stats = Arc::new(Stats::new());
    let mut engine = Engine::start(&ctx.targets, &accounts, dialogs, cfg, stats.clone()).await?;
    let server_pid = super::procfs::listener_pid(ctx.target.addr.port());
    engine.go();
    let t0 = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let (mut held, mut failed): (Option<f64>, Option<f64>) = (None, None);
    let mut per_user = start;
    while t0.elapsed().as_secs_f64() + step_s <= budget {
        let offered = per_user * users as f64;
        let cpu0 = super::procfs::CpuSample::now(server_pid);
        let mut s = step(ctx, &engine, &rate_milli, per_user, offered, step_s, bound_us).await;
        s.cpu = super::procfs::CpuSample::now(server_pid).since(&cpu0);
        ctx.progress(&format!(
            "ramp: {:.0} msg/s offered -> {:.0} acked/s, ack p99 {} ms: {}",
            s.offered,
            s.acked,
            stats::ms(s.ack_p99_us),
            if s.held { "held".to_owned() } else { format!("FAILED ({})", s.why) }
        ));
        if s.held {
            held = Some(held.map_or(offered, |h: f64| h.max(offered)));
        } else {
            failed = Some(failed.map_or(offered, |f: f64| f.min(offered)));
        }
        steps.push(s);
        // Settle: stop offering until the queues are empty, then go on.
        rate_milli.store(0, Ordering::Relaxed);
        tokio::time::sleep(SETTLE).await;
        let _ = engine.drain(Duration::from_secs(10)).await;
        per_user = match (held, failed) {
            (_, None) => per_user * a.factor,
            (None, Some(_)) => break,
            (Some(h), Some(f)) if (f - h) / h < 0.05 => break,
            (Some(h), Some(f)) => (h + f) / 2.0 / users as f64,
        };
    }
    engine.stop_sending();
    let drained = engine.drain(Duration::from_secs(30)).await;
    let verdict = engine.finish().await;
    let best = steps.iter().filter(|s| s.held).max_by(|x, y| x.offered.total_cmp(&y.offered));
    let mut human = format!("ramp: {users} users, p99 ack bound {} ms, {step_s} s steps\n", a.p99_bound_ms);
    human.push_str("  offered/s   acked/s  delivered/s  ack p50  ack p99  dlv p99  backlog  cpu srv/cli/other  result\n");
    for s in &steps {
        human.push_str(&format!(
            "  {:>9.0}  {:>8.0}  {:>11.0}  {:>7}  {:>7}  {:>7}  {:>7}  {:>17}  {}\n",
            s.offered,
            s.acked,
            s.delivered,
            stats::ms(s.ack_p50_us),
            stats::ms(s.ack_p99_us),
            stats::ms(s.delivery_p99_us),
            s.backlog,
            format!("{:.2}/{:.2}/{:.2}", s.cpu.0.unwrap_or(f64::NAN), s.cpu.1.unwrap_or(f64::NAN), s.cpu.2.unwrap_or(f64::NAN)),
            if s.held { "held".to_owned() } else { format!("failed: {}", s.why) }
        ));
    }
    match best {
        Some(b) => human.push_str(&format!(
            "  highest sustained rate: {:.0} msg/s offered, {:.0} acked/s, ack p99 {} ms\n",
            b.offered,
            b.acked,
            stats::ms(b.ack_p99_us)
        )),
        None => human.push_str("  no step held: lower --rate\n"),
    }
    human.push_str(&format!("  errors: {}\n  integrity: {}", stats.errors_line(), verdict.line()));
    let json = json!({
        "scenario": "ramp",
        "users": users,
        "p99_bound_ms": a.p99_bound_ms,
        "step_s": step_s,
        "steps": steps.iter().map(|s| json!({
            "offered_per_s": s.offered, "acked_per_s": s.acked, "delivered_per_s": s.delivered,
            "ack_p50_ms": s.ack_p50_us as f64 / 1000.0, "ack_p99_ms": s.ack_p99_us as f64 / 1000.0,
            "delivery_p99_ms": s.delivery_p99_us as f64 / 1000.0, "backlog": s.backlog,
            "skipped_ticks": s.skipped, "errors": s.errors, "held": s.held, "why": s.why,
            "cpu": super::procfs::cpu_report(s.cpu).1,
        })).collect::<Vec<_>>(),
        "highest_sustained": best.map(|b| json!({"offered_per_s": b.offered, "acked_per_s": b.acked, "ack_p99_ms": b.ack_p99_us as f64 / 1000.0})),
        "ack_latency": stats::summary(&stats.ack.lock().total),
        "delivery_latency": stats::summary(&stats.delivery.lock().total),
        "errors": stats.errors_json(),
        "drained": drained,
        "integrity": verdict.json(),
    });
    Ok(super::Outcome { human, json, ok: verdict.ok() && drained })
}

/// Runs one step at `per_user` msg/s per user and judges it.
async fn step(ctx: &super::Ctx, engine: &Engine, rate_milli: &AtomicU64, per_user: f64, offered: f64, secs: f64, bound_us: u64) -> Step {
    let s = &engine.stats;
    s.ack.lock().step.reset();
    s.delivery.lock().step.reset();
    let before = (Stats::load(&s.acked), Stats::load(&s.delivered), Stats::load(&s.skipped), s.error_total());
    rate_milli.store((per_user * 1000.0).round().max(1.0) as u64, Ordering::Relaxed);
    let t = Instant::now();
    chat::progress(ctx, engine, secs, &format!("ramp {offered:.0}/s ")).await;
    let dt = t.elapsed().as_secs_f64();
    let after = (Stats::load(&s.acked), Stats::load(&s.delivered), Stats::load(&s.skipped), s.error_total());
    let (ack_p50_us, ack_p99_us) = {
        let l = s.ack.lock();
        if l.step.is_empty() { (0, 0) } else { (l.step.value_at_quantile(0.5), l.step.value_at_quantile(0.99)) }
    };
    let delivery_p99_us = {
        let l = s.delivery.lock();
        if l.step.is_empty() { 0 } else { l.step.value_at_quantile(0.99) }
    };
    let acked = (after.0 - before.0) as f64 / dt;
    let delivered = (after.1 - before.1) as f64 / dt;
    let backlog = after.0.saturating_sub(after.1);
    let skipped = after.2 - before.2;
    let errors = after.3 - before.3;
    let mut why = Vec::new();
    if ack_p99_us > bound_us {
        why.push(format!("p99 {} ms over the bound", stats::ms(ack_p99_us)));
    }
    if acked < 0.95 * offered {
        why.push(format!("acked {acked:.0}/s under 95% of offered"));
    }
    if backlog as f64 > (offered * 0.1).max(100.0) {
        why.push(format!("delivery behind by {backlog}"));
    }
    if skipped > 0 {
        why.push(format!("{skipped} sends skipped (too many in flight or client behind)"));
    }
    Step { offered, acked, delivered, ack_p50_us, ack_p99_us, delivery_p99_us, backlog, skipped, errors, held: why.is_empty(), why: why.join("; "), cpu: (None, None, None) }
}
