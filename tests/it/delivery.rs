//! Live delivery, the offline backlog, and idempotent resends (PROTOCOL.md §3.1, §4.2, §4.3).

use parley::protocol::{EventPayload, MessageView, ServerFrame};

use crate::common::{dialog, now_ms, Server, TestDir};

/// Splits the frames a sender's socket gets after a send into its ack and its own event.
fn ack_and_event(frames: &[ServerFrame], id: &str) -> ((String, u64, u64), (u64, MessageView)) {
    let acks: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ack { id: i, conv, seq, ts, .. } if i == id => Some((conv.clone(), *seq, *ts)),
            _ => None,
        })
        .collect();
    let evs: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Event { ev, payload: EventPayload::Message(m) } if m.id == id => Some((*ev, m.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 1, "one ack for {id}: {frames:?}");
    assert_eq!(evs.len(), 1, "one event for {id} on the sending device: {frames:?}");
    (acks[0].clone(), evs[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_reaches_every_device_of_both_users() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a_web = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let b_web = srv.user("bob").await;

    let mut aw = srv.connect(&a_web, None).await;
    let mut ap = srv.connect(&a_phone, None).await;
    let mut bw = srv.connect(&b_web, None).await;
    assert_eq!((aw.user.as_str(), aw.device.as_str(), aw.head), ("alice", "web", 0));
    assert_eq!((ap.user.as_str(), ap.device.as_str(), ap.head), ("alice", "phone", 0));
    assert_eq!((bw.user.as_str(), bw.device.as_str(), bw.head), ("bob", "web", 0));

    // A real dialog: turn i is sent by alice (from her web device) when i is even, else by bob.
    let turns = dialog(1, 8);
    for (i, body) in turns.iter().enumerate() {
        let n = i as u64 + 1; // seq in the conversation and ev in both users' streams
        let id = format!("d-{n}");
        let (sender, to) = if i % 2 == 0 { (&mut aw, "bob") } else { (&mut bw, "alice") };
        let from = if i % 2 == 0 { "alice" } else { "bob" };
        let t0 = now_ms();
        sender.client.send_msg(&id, to, body).await;
        // The sending socket gets both its ack and (its own stream) the event, in either order.
        let mut frames = Vec::new();
        while frames.iter().filter(|f| matches!(f, ServerFrame::Ack { .. } | ServerFrame::Event { .. })).count() < 2 {
            frames.push(sender.client.recv().await);
        }
        let t1 = now_ms();
        let ((conv, seq, ts), (ev, m)) = ack_and_event(&frames, &id);
        assert_eq!((conv.as_str(), seq), ("dm:alice:bob", n), "ack of {id}");
        assert!(t0.saturating_sub(1000) <= ts && ts <= t1 + 1000, "ack ts {ts} is not between {t0} and {t1}");
        let expected = MessageView { conv: conv.clone(), seq, id: id.clone(), from: from.to_owned(), body: body.clone(), ts };
        assert_eq!((ev, &m), (n, &expected), "the sender's own copy of {id}");

        // Every other device of both users gets the same event, with the ack's ts.
        let others: Vec<&mut crate::common::Synced> = if i % 2 == 0 { vec![&mut ap, &mut bw] } else { vec![&mut aw, &mut ap] };
        for o in others {
            let (ev, m) = o.client.message_event().await;
            assert_eq!((ev, &m), (n, &expected), "{}/{} got {id}", o.user, o.device);
        }
    }

    // The wire shape of the last event as the recipient saw it (JSON field names, UTF-8 as is).
    let raw: serde_json::Value = serde_json::from_str(ap.client.last_raw.as_deref().expect("a JSON frame")).unwrap();
    assert_eq!(raw["type"], "event");
    assert_eq!(raw["kind"], "message");
    assert_eq!(raw["ev"], 8);
    assert_eq!(raw["message"]["body"], turns[7].as_str());
    assert_eq!(raw["message"]["from"], "bob");
    assert_eq!(raw["message"]["conv"], "dm:alice:bob");

    // A device that connects later gets the same eight events from storage.
    let late = srv.login("bob", "tablet").await;
    let s = srv.connect(&late, None).await;
    assert_eq!(s.head, 8);
    let bodies: Vec<String> = s.messages().into_iter().map(|(_, m)| m.body).collect();
    assert_eq!(bodies, turns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backlog_arrives_in_order_before_synced_then_live_without_gaps() {
    const N: usize = 200;
    const M: usize = 100;
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let b_phone = srv.login("bob", "phone").await;
    let mut alice = srv.connect(&a, None).await.client;

    // bob is offline: N messages, pipelined (no wait between sends). Frames of one socket take
    // effect in arrival order, so message k gets seq k.
    let turns = dialog(2, N + M);
    for (k, body) in turns[..N].iter().enumerate() {
        alice.send_msg(&format!("m{k}"), "bob", body).await;
    }
    for k in 0..N {
        let (conv, seq, _) = alice.ack(&format!("m{k}")).await;
        assert_eq!((conv.as_str(), seq), ("dm:alice:bob", k as u64 + 1));
    }

    let s = srv.connect(&b, None).await;
    assert_eq!(s.head, N as u64);
    assert_eq!(s.backlog.len(), N, "every event before synced");
    for (k, (ev, p)) in s.backlog.iter().enumerate() {
        let EventPayload::Message(m) = p else { panic!("ev {ev}: {p:?}") };
        assert_eq!(*ev, k as u64 + 1);
        assert_eq!((m.seq, m.id.as_str(), m.from.as_str(), m.body.as_str()), (k as u64 + 1, format!("m{k}").as_str(), "alice", turns[k].as_str()));
    }
    s.client.close().await;

    // bob's phone says hello while alice is sending M more: its backlog and the live events that
    // follow must be exactly ev 1..=N+M, each once, in order, whatever the interleaving.
    let sender = tokio::spawn(async move {
        for (k, body) in turns[N..].iter().enumerate() {
            alice.send_msg(&format!("m{}", N + k), "bob", body).await;
        }
        for k in N..N + M {
            alice.ack(&format!("m{k}")).await;
        }
        turns
    });
    let mut p = srv.connect(&b_phone, Some(0)).await;
    let mut seen: Vec<MessageView> = p.messages().into_iter().map(|(_, m)| m).collect();
    let mut last_ev = p.head;
    while seen.len() < N + M {
        let (ev, m) = p.client.message_event().await;
        assert_eq!(ev, last_ev + 1, "live event after the backlog");
        last_ev = ev;
        seen.push(m);
    }
    let turns = sender.await.unwrap();
    for (k, m) in seen.iter().enumerate() {
        assert_eq!((m.seq, m.body.as_str()), (k as u64 + 1, turns[k].as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_get_the_original_ack_and_are_delivered_once() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a_web = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let b = srv.user("bob").await;
    let mut aw = srv.connect(&a_web, None).await.client;
    let mut ap = srv.connect(&a_phone, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    let t = dialog(3, 6);

    // Sequential resends: the same device, another device, and a resend with another body.
    let first = aw.send_acked("x1", "bob", &t[0]).await;
    assert_eq!(aw.send_acked("x1", "bob", &t[0]).await, first, "resend from the same device");
    assert_eq!(ap.send_acked("x1", "bob", &t[0]).await, first, "resend from another device");
    assert_eq!(ap.send_acked("x1", "bob", &t[1]).await, first, "resend with another body");

    // bob gets x1 once: the next message after it is x2.
    let next = aw.send_acked("x2", "bob", &t[2]).await;
    assert_eq!(next.1, first.1 + 1);
    let (ev1, m1) = bob.message_event().await;
    let (ev2, m2) = bob.message_event().await;
    assert_eq!((ev1, m1.id.as_str(), m1.body.as_str(), m1.ts), (1, "x1", t[0].as_str(), first.2));
    assert_eq!((ev2, m2.id.as_str(), m2.seq), (2, "x2", next.1));

    // Racing resends: the same id twice back to back on one socket and once on another device,
    // all written before any answer is read.
    aw.send_msg("r1", "bob", &t[3]).await;
    aw.send_msg("r1", "bob", &t[3]).await;
    ap.send_msg("r1", "bob", &t[3]).await;
    let a1 = aw.ack("r1").await;
    let a2 = aw.ack("r1").await;
    let a3 = ap.ack("r1").await;
    assert_eq!(a1, a2);
    assert_eq!(a1, a3);
    assert_eq!(a1.1, 3);
    let sentinel = aw.send_acked("r2", "bob", &t[4]).await;
    assert_eq!(sentinel.1, 4, "r1 was stored once");
    let (ev3, m3) = bob.message_event().await;
    let (ev4, m4) = bob.message_event().await;
    assert_eq!((ev3, m3.id.as_str(), m3.seq, m3.ts), (3, "r1", 3, a1.2));
    assert_eq!((ev4, m4.id.as_str()), (4, "r2"), "r1 was delivered once");

    // The history agrees: four messages, no duplicate.
    let h = bob.history_all("dm:alice:bob").await;
    let ids: Vec<&str> = h.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["x1", "x2", "r1", "r2"]);
    assert_eq!(h[0].body, t[0], "the resend with another body did not overwrite the message");

    // A message id is unique per sender, not globally: bob may use "x1" too.
    let bx = bob.send_acked("x1", "alice", &t[5]).await;
    assert_eq!(bx.1, 5);
}
