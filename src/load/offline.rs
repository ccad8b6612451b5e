//! The `offline` scenario: one user sends `--messages` M messages (dialog turns) to a user that
//! is logged in but not connected; then that user connects, and the run times how long its
//! backlog takes: until `welcome`, until the last of the M messages, until `synced`. The backlog
//! must hold every acked message exactly once, in seq order, with the sender's ids and bodies.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;

use super::dialogs::Script;
use super::stats::{self, hist};
use super::ws;
use crate::protocol::{ClientFrame, ErrorCode, EventPayload, ServerFrame};

/// Longest the sending phase or the resync may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run(ctx: &super::Ctx) -> anyhow::Result<super::Outcome> {
    let a = &ctx.args;
    let m = a.messages.max(1);
    let window = a.window.max(1);
    let dialogs = ctx.dialogs()?;
    ctx.progress(&format!("offline: {m} messages to an offline user, {window} in flight"));
    let accounts = super::accounts::setup(&ctx.targets, super::accounts::names(&ctx.prefix, 2), &ctx.password, 2, a.quiet).await?;
    let (from, to) = (&accounts[0], &accounts[1]);

    // 1. The sender sends M messages, `window` in flight, retrying rate_limited/overloaded.
    let mut w = ws::connect(ctx.target_of(0), None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
    ws::hello(&mut w, &from.token, None, ctx.enc, false).await?;
    let mut script = Script::new(dialogs, 0, None);
    let mut inflight: HashMap<String, (Instant, String)> = HashMap::new();
    let mut retry: VecDeque<(Instant, String)> = VecDeque::new();
    let mut acked: Vec<(u64, String, String)> = Vec::new(); // (seq, id, body)
    let mut ack_lat = hist();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut k = 0u64;
    let t_send = Instant::now();
    let mut last_progress = Instant::now();
    while (acked.len() as u64) < m {
        anyhow::ensure!(t_send.elapsed() < PHASE_TIMEOUT, "sending took over {PHASE_TIMEOUT:?}");
        // Due resends first: they still hold their place in the window.
        while retry.front().is_some_and(|r| r.0 <= Instant::now()) {
            let id = retry.pop_front().map(|r| r.1).unwrap_or_default();
            let body = inflight.get(&id).map(|p| p.1.clone()).unwrap_or_default();
            w.feed(ws::encode(ClientFrame::Send { id, to: to.user.clone(), body }, ctx.enc)).await?;
        }
        while inflight.len() < window && k < m {
            k += 1;
            let id = format!("{k}.0");
            let body = script.next_turn();
            inflight.insert(id.clone(), (Instant::now(), body.clone()));
            w.feed(ws::encode(ClientFrame::Send { id, to: to.user.clone(), body }, ctx.enc)).await?;
        }
        w.flush().await?;
        let wait = retry.front().map_or(Duration::from_secs(10), |r| r.0.saturating_duration_since(Instant::now()));
        let msg = match tokio::time::timeout(wait, w.next()).await {
            Err(_) => continue,
            Ok(None) => bail!("the sender's socket closed"),
            Ok(Some(m)) => m?,
        };
        match ws::decode(&msg)? {
            Some(ServerFrame::Ack { id, seq, .. }) => {
                if let Some((t, body)) = inflight.remove(&id) {
                    let _ = ack_lat.record((t.elapsed().as_micros() as u64).max(1));
                    acked.push((seq, id, body));
                }
            }
            Some(ServerFrame::Error { code, id: Some(id), .. }) => {
                *errors.entry(code.as_str().to_owned()).or_insert(0) += 1;
                if matches!(code, ErrorCode::RateLimited | ErrorCode::Overloaded | ErrorCode::Unavailable) {
                    let d = Duration::from_millis(20 + rand::thread_rng().gen_range(0..20));
                    retry.push_back((Instant::now() + d, id));
                } else {
                    bail!("send {id} refused: {}", code.as_str());
                }
            }
            _ => {}
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            ctx.progress(&format!("offline: {}/{m} acked", acked.len()));
        }
    }
    let send_s = t_send.elapsed().as_secs_f64();
    let _ = w.close(None).await;

    // 2. The recipient connects and reads its backlog.
    let t0 = Instant::now();
    let mut r = ws::connect(ctx.target_of(1), None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
    let connected_ms = t0.elapsed().as_secs_f64() * 1000.0;
    r.send(ws::encode(ClientFrame::Hello { token: to.token.clone(), cursor: None }, ctx.enc)).await?;
    let (mut welcome_ms, mut last_msg_ms, synced_ms);
    welcome_ms = 0.0;
    last_msg_ms = 0.0;
    let mut got: Vec<(u64, String, String)> = Vec::new();
    let mut last_ev = 0u64;
    let mut ev_gaps = 0u64;
    let mut head = 0;
    loop {
        let msg = tokio::time::timeout(PHASE_TIMEOUT, r.next())
            .await
            .context("the backlog did not arrive in time")?
            .ok_or_else(|| anyhow!("the recipient's socket closed"))??;
        match ws::decode(&msg)? {
            Some(ServerFrame::Welcome { head: h, .. }) => {
                head = h;
                welcome_ms = t0.elapsed().as_secs_f64() * 1000.0;
            }
            Some(ServerFrame::Event { ev, payload }) => {
                if ev != last_ev + 1 {
                    ev_gaps += 1;
                }
                last_ev = ev;
                if let EventPayload::Message(mv) = payload {
                    if mv.from == from.user {
                        got.push((mv.seq, mv.id, mv.body));
                        if got.len() as u64 == m {
                            last_msg_ms = t0.elapsed().as_secs_f64() * 1000.0;
                        }
                    }
                }
            }
            Some(ServerFrame::Synced { .. }) => {
                synced_ms = t0.elapsed().as_secs_f64() * 1000.0;
                break;
            }
            _ => {}
        }
    }
    let _ = r.send(ws::encode(ClientFrame::Received { up_to: last_ev }, ctx.enc)).await;
    let _ = r.close(None).await;

    // 3. Check: the backlog is exactly the acked messages, in seq order.
    let out_of_order = got.windows(2).filter(|p| p[1].0 != p[0].0 + 1).count() as u64;
    let by_seq: HashMap<u64, Vec<&(u64, String, String)>> = got.iter().fold(HashMap::new(), |mut h, g| {
        h.entry(g.0).or_default().push(g);
        h
    });
    let (mut lost, mut dup, mut mismatched) = (0u64, 0u64, 0u64);
    for (seq, id, body) in &acked {
        match by_seq.get(seq) {
            None => lost += 1,
            Some(v) => {
                dup += v.len() as u64 - 1;
                if v[0].1 != *id || v[0].2 != *body {
                    mismatched += 1;
                }
            }
        }
    }
    let ok = lost == 0 && dup == 0 && out_of_order == 0 && mismatched == 0 && ev_gaps == 0 && got.len() as u64 == m;
    let backlog_s = (last_msg_ms - welcome_ms).max(0.001) / 1000.0;
    let errs = if errors.is_empty() { "none".to_owned() } else { format!("{errors:?}") };
    let human = format!(
        "offline: {m} messages sent to an offline user in {send_s:.2} s ({:.0}/s, {window} in flight), ack {}\n\
         \x20 the recipient connected: TCP+upgrade {connected_ms:.1} ms, welcome at {welcome_ms:.1} ms (head {head}), \
         last message at {last_msg_ms:.1} ms, synced at {synced_ms:.1} ms\n\
         \x20 backlog: {} messages in {:.1} ms ({:.0} msg/s)\n\
         \x20 errors while sending: {errs}\n\
         \x20 integrity: {}: lost {lost}, duplicated {dup}, out of order {out_of_order}, mismatched {mismatched}, ev gaps {ev_gaps}",
        m as f64 / send_s,
        stats::line(&ack_lat),
        got.len(),
        backlog_s * 1000.0,
        got.len() as f64 / backlog_s,
        if ok { "OK" } else { "FAILED" },
    );
    let json = json!({
        "scenario": "offline",
        "messages": m,
        "window": window,
        "send_s": send_s,
        "sent_per_s": m as f64 / send_s,
        "ack_latency": stats::summary(&ack_lat),
        "errors": errors,
        "recipient": {
            "connect_ms": connected_ms, "welcome_ms": welcome_ms, "last_message_ms": last_msg_ms,
            "synced_ms": synced_ms, "head": head, "backlog_messages": got.len(),
            "backlog_per_s": got.len() as f64 / backlog_s,
        },
        "integrity": { "ok": ok, "lost": lost, "duplicated": dup, "out_of_order": out_of_order, "mismatched": mismatched, "ev_gaps": ev_gaps },
    });
    Ok(super::Outcome { human, json, ok })
}
