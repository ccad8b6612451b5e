//! The `fanout` scenario (issue 3): one sender writes to a group of `--users` members (default
//! 1,024, WhatsApp's cap) of which `--online` percent (default 10) are connected and reading,
//! while a 1:1 pair chats beside it (closed loop, one message in flight). It measures, for the
//! group and for the pair, ack latency (send → ack) and delivery latency (send → each online
//! recipient's event), and checks that every online member got every acked group message exactly
//! once and in seq order. The ack depends only on the commit, so the group's ack latency should
//! stay close to the pair's even though each group message is referenced from 1,024 streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;

use super::dialogs::Script;
use super::stats::{self, hist};
use super::ws;
use crate::protocol::{ClientFrame, EventPayload, ServerFrame};

/// Send times by message id, shared by the senders and the readers.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

/// The group seqs a reader has seen, in arrival order (shared, so the run can await them).
type Seqs = Arc<Mutex<Vec<u64>>>;

pub async fn run(ctx: &super::Ctx) -> anyhow::Result<super::Outcome> {
    let a = &ctx.args;
    let members = a.users.unwrap_or(1024).clamp(2, 100_000);
    let online = ((members as f64) * a.online_percent / 100.0).round().max(1.0) as usize;
    let rate = ctx.args.rate(10.0)?.unwrap_or(10.0);
    let duration = Duration::from_secs_f64(a.duration.unwrap_or(10.0));
    let dialogs = ctx.dialogs()?;
    ctx.progress(&format!("fanout: a group of {members} members, {online} online, {rate} group msg/s for {duration:?}, beside a 1:1 pair"));
    let names = super::accounts::names(&ctx.prefix, members + 2);
    let accounts = super::accounts::setup(&ctx.targets, names, &ctx.password, a.setup_concurrency, a.quiet).await?;
    let (group_members, pair) = accounts.split_at(members);
    ctx.progress("fanout: users ready");

    // The sender creates the group with everyone.
    let mut sender = ws::connect(ctx.target_of(0), None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
    ws::hello(&mut sender, &group_members[0].token, None, ctx.enc, false).await?;
    let users: Vec<String> = group_members[1..].iter().map(|m| m.user.clone()).collect();
    sender.send(ws::encode_rid("g", ClientFrame::GroupCreate { name: "fan-out".into(), members: users }, ctx.enc)).await?;
    let group = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), sender.next()).await?.ok_or_else(|| anyhow!("closed"))??;
        match ws::decode(&msg)? {
            Some(ServerFrame::Result { group: Some(g), .. }) => break g,
            Some(ServerFrame::Error { code, message, .. }) => bail!("group_create: {} {message}", code.as_str()),
            _ => {}
        }
    };

    ctx.progress(&format!("fanout: group {group} created"));
    // Online members (the first `online` after the sender) connect and read.
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    let mut seen: Vec<Seqs> = Vec::new();
    for (k, m) in group_members.iter().enumerate().take(online.min(members - 1) + 1).skip(1) {
        let mut w = ws::connect(ctx.target_of(k), None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
        ws::hello(&mut w, &m.token, None, ctx.enc, false).await?;
        let seqs: Seqs = Arc::default();
        seen.push(seqs.clone());
        readers.push(tokio::spawn(read_until_stopped(w, sent.clone(), stop.clone(), group.clone(), seqs, ctx.enc)));
    }
    // The pair: b reads, a sends in a closed loop.
    let mut pa = ws::connect(ctx.target_of(members), None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
    ws::hello(&mut pa, &pair[0].token, None, ctx.enc, false).await?;
    let mut pb = ws::connect(ctx.target_of(members + 1), None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
    ws::hello(&mut pb, &pair[1].token, None, ctx.enc, false).await?;
    let pair_reader = tokio::spawn(read_until_stopped(pb, sent.clone(), stop.clone(), String::new(), Arc::default(), ctx.enc));
    let pair_to = pair[1].user.clone();
    let pair_sent = sent.clone();
    let pair_dialogs = dialogs.clone();
    let enc = ctx.enc;
    let pair_sender = tokio::spawn(async move {
        let mut script = Script::new(pair_dialogs, 7, None);
        let mut acks = hist();
        let mut refused = 0u64;
        let t0 = Instant::now();
        let mut k = 0u64;
        while t0.elapsed() < duration {
            k += 1;
            let id = format!("p{k}");
            let now = Instant::now();
            pair_sent.lock().insert(id.clone(), now);
            pa.send(ws::encode(ClientFrame::Send { id: id.clone(), to: pair_to.clone(), body: script.next_turn() }, enc)).await?;
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(30), pa.next()).await?.ok_or_else(|| anyhow!("pair socket closed"))??;
                match ws::decode(&msg)? {
                    Some(ServerFrame::Ack { id: got, .. }) if got == id => {
                        let _ = acks.record(now.elapsed().as_micros() as u64);
                        break;
                    }
                    // Refused (e.g. rate_limited with the default send limit): back off a little.
                    Some(ServerFrame::Error { id: Some(got), .. }) if got == id => {
                        refused += 1;
                        pair_sent.lock().remove(&id);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        break;
                    }
                    _ => {}
                }
            }
        }
        Ok::<_, anyhow::Error>((acks, refused))
    });

    ctx.progress("fanout: readers connected; sending");
    // The group sender: open loop at `rate`, acks read as they come.
    let mut script = Script::new(dialogs, 3, None);
    let mut group_acks = hist();
    let mut acked: Vec<u64> = Vec::new();
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut next = t0;
    let mut k = 0u64;
    let mut last_progress = Instant::now();
    while t0.elapsed() < duration || !pending.is_empty() {
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            ctx.progress(&format!("fanout: {} group messages acked, {} pending", acked.len(), pending.len()));
        }
        if t0.elapsed() > duration + Duration::from_secs(30) {
            bail!("{} group sends never acked", pending.len());
        }
        if t0.elapsed() < duration && Instant::now() >= next {
            k += 1;
            let id = format!("g{k}");
            sent.lock().insert(id.clone(), next);
            pending.insert(id.clone(), next);
            sender.send(ws::encode(ClientFrame::Send { id, to: group.clone(), body: script.next_turn() }, ctx.enc)).await?;
            next += interval;
        }
        let wait = next.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        if let Ok(Some(msg)) = tokio::time::timeout(wait, sender.next()).await {
            match ws::decode(&msg?)? {
                Some(ServerFrame::Ack { id, seq, .. }) => {
                    if let Some(t) = pending.remove(&id) {
                        let _ = group_acks.record(t.elapsed().as_micros() as u64);
                        acked.push(seq);
                    }
                }
                Some(ServerFrame::Error { code, message, id, .. }) => bail!("group send {id:?}: {} {message}", code.as_str()),
                _ => {}
            }
        }
    }
    let (pair_acks, pair_refused) = pair_sender.await.context("pair sender")??;
    // Let the readers drain: every acked group message must arrive (bounded wait).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < drain_deadline && seen.iter().any(|s| s.lock().len() < acked.len()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_waiters();
    acked.sort_unstable();
    let mut group_delivery = hist();
    let mut bad = 0usize;
    for (r, seqs) in readers.into_iter().zip(&seen) {
        let h = r.await.context("reader")??;
        group_delivery.add(&h).ok();
        if *seqs.lock() != acked {
            bad += 1;
        }
    }
    let pair_delivery = pair_reader.await.context("pair reader")??;
    let ok = bad == 0;
    let human = format!(
        "fanout: group of {members} ({online} online), {} group messages acked\n  group ack      {}\n  group delivery {} ({} deliveries)\n  1:1   ack      {}\n  1:1   delivery {} ({} 1:1 sends refused)\n  online members with every acked message once, in order: {}/{}",
        acked.len(),
        stats::line(&group_acks),
        stats::line(&group_delivery),
        group_delivery.len(),
        stats::line(&pair_acks),
        stats::line(&pair_delivery),
        pair_refused,
        online - bad,
        online
    );
    let json = json!({
        "scenario": "fanout", "members": members, "online": online, "group_acked": acked.len(),
        "group_ack": stats::summary(&group_acks), "group_delivery": stats::summary(&group_delivery),
        "pair_ack": stats::summary(&pair_acks), "pair_delivery": stats::summary(&pair_delivery),
        "members_complete": online - bad, "pair_refused": pair_refused, "ok": ok,
    });
    Ok(super::Outcome { human, json, ok })
}

/// Reads events until told to stop: delivery latency of every message whose send time is known
/// (its id in `sent`), and the seqs of `group` messages in arrival order. Confirms with
/// `received` every 100 ms.
async fn read_until_stopped(
    mut w: ws::Ws,
    sent: Sent,
    stop: Arc<tokio::sync::Notify>,
    group: String,
    seqs: Seqs,
    enc: crate::protocol::Encoding,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = hist();
    let mut max_ev = 0u64;
    let mut confirmed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return Ok(h),
            _ = tick.tick() => {
                if max_ev > confirmed {
                    confirmed = max_ev;
                    w.send(ws::encode(ClientFrame::Received { up_to: max_ev }, enc)).await?;
                }
            }
            msg = w.next() => {
                let Some(msg) = msg else { return Ok(h) };
                if let Some(ServerFrame::Event { ev, payload }) = ws::decode(&msg?)? {
                    max_ev = max_ev.max(ev);
                    if let EventPayload::Message(m) = payload {
                        if let Some(t) = sent.lock().get(&m.id) {
                            let _ = h.record(t.elapsed().as_micros() as u64);
                        }
                        if !group.is_empty() && m.conv == group {
                            seqs.lock().push(m.seq);
                        }
                    }
                }
            }
        }
    }
}
