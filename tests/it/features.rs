//! Receipts, read markers, typing, presence, history paging and the conversation list
//! (PROTOCOL.md §3.2, §3.3, §4.4-§4.6; issue 8).
//!
//! Where a test shows that something does NOT happen, it makes a later thing happen that must
//! come after it (a message in the same stream, a presence flush that follows) and checks that
//! nothing came before it: no test sleeps to wait for an absence.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use parley::protocol::{
    ClientFrame, ConversationItem, ErrorCode, EventPayload, MessageView, ReadMarkerView, ReceiptStatus,
    ReceiptView, ServerFrame, TypingState,
};

use crate::common::{dialog, now_ms, within, Client, Incoming, Server, TestDir, T};

use ReceiptStatus::{Delivered, Read};
use TypingState::{Composing, Paused};

const AB: &str = "dm:alice:bob";

fn receipt(conv: &str, by: &str, status: ReceiptStatus, up_to: u64) -> EventPayload {
    EventPayload::Receipt(ReceiptView { conv: conv.to_owned(), by: by.to_owned(), status, up_to })
}

fn marker(conv: &str, seq: u64) -> EventPayload {
    EventPayload::ReadMarker(ReadMarkerView { conv: conv.to_owned(), seq })
}

fn typing(conv: &str, from: &str, state: TypingState) -> ServerFrame {
    ServerFrame::Typing { conv: conv.to_owned(), from: from.to_owned(), state }
}

/// Every frame `c` gets within `d` (stashed ones first); panics if the socket closes.
async fn frames_for(c: &mut Client, d: Duration) -> Vec<ServerFrame> {
    let end = tokio::time::Instant::now() + d;
    let mut out = Vec::new();
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            None => return out,
            Some(Incoming::Frame(f)) => out.push(f),
            Some(Incoming::Closed(code)) => panic!("the socket closed ({code:?}); frames before: {out:?}"),
        }
    }
}

/// The next `n` frames of `c`, as a set (for frames whose relative order is not specified).
async fn next_set(c: &mut Client, n: usize) -> Vec<ServerFrame> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(c.recv().await);
    }
    v.sort_by_key(|f| format!("{f:?}"));
    v
}

fn sorted(mut v: Vec<ServerFrame>) -> Vec<ServerFrame> {
    v.sort_by_key(|f| format!("{f:?}"));
    v
}

/// Waits until the clock has passed `ts` (ms), so that a message accepted now gets a later ts.
async fn clock_past(ts: u64) {
    within(T, "the clock to advance", async {
        while now_ms() <= ts {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

/// The `conversations` list of `c`.
async fn conversations(c: &mut Client) -> Vec<ConversationItem> {
    match c.request("conversations", ClientFrame::Conversations).await {
        ServerFrame::Conversations { items, .. } => items,
        f => panic!("conversations: {f:?}"),
    }
}

/// One `history` page: (messages, more).
async fn page(c: &mut Client, conv: &str, before: Option<u64>, limit: Option<u64>) -> (Vec<MessageView>, bool) {
    match c.request("page", ClientFrame::History { conv: conv.to_owned(), before, limit }).await {
        ServerFrame::History { conv: got, messages, more, .. } => {
            assert_eq!(got, conv);
            (messages, more)
        }
        f => panic!("history of {conv} before {before:?} limit {limit:?}: {f:?}"),
    }
}

fn seqs(ms: &[MessageView]) -> Vec<u64> {
    ms.iter().map(|m| m.seq).collect()
}

// ---------------------------------------------------------------------------------- receipts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_follow_received_and_read_one_per_conversation_never_backwards() {
    const BC: &str = "dm:bob:carol";
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob, mut carol] = srv.clients(["alice", "bob", "carol"]).await;
    let t = dialog(11, 40);

    // bob's stream interleaves two conversations, so an ev is not a seq.
    let plan = [("alice", "a1"), ("alice", "a2"), ("carol", "c1"), ("alice", "a3"), ("alice", "a4"), ("carol", "c2"), ("alice", "a5")];
    for (k, (from, id)) in plan.iter().enumerate() {
        let sender = if *from == "alice" { &mut alice } else { &mut carol };
        sender.send_acked(id, "bob", &t[k]).await;
        let (ev, m) = bob.message_event().await;
        assert_eq!((ev, m.id.as_str()), (k as u64 + 1, *id));
    }
    for k in 1..=5 {
        assert_eq!(alice.message_event().await.0, k, "alice's own a{k}");
    }
    for k in 1..=2 {
        assert_eq!(carol.message_event().await.0, k, "carol's own c{k}");
    }

    // bob got everything live but confirmed nothing: no receipt. alice's next event is her a6.
    bob.barrier().await;
    alice.send_acked("a6", "bob", &t[7]).await;
    assert_eq!(alice.message_event().await.0, 6, "a receipt before bob's `received`");
    assert_eq!(bob.message_event().await.0, 8);

    // `received` up to ev 4 covers a1, a2, c1, a3: delivered up to seq 3 for alice, 1 for carol.
    bob.send(ClientFrame::Received { up_to: 4 }).await;
    assert_eq!(alice.event().await, (7, receipt(AB, "bob", Delivered, 3)));
    assert_eq!(carol.event().await, (3, receipt(BC, "bob", Delivered, 1)));

    // Ten more from alice, then one `received` covering 13 messages of two conversations: one
    // receipt per conversation (alice's next event after it is the read receipt below).
    for k in 7..=16u64 {
        alice.send_acked(&format!("a{k}"), "bob", &t[k as usize + 1]).await;
        assert_eq!(alice.message_event().await.0, k + 1);
        assert_eq!(bob.message_event().await.0, k + 2);
    }
    bob.send(ClientFrame::Received { up_to: 18 }).await;
    assert_eq!(alice.event().await, (18, receipt(AB, "bob", Delivered, 16)));
    assert_eq!(carol.event().await, (4, receipt(BC, "bob", Delivered, 2)));
    // A `received` below the cursor is no news.
    bob.send(ClientFrame::Received { up_to: 10 }).await;

    // `read` makes a read receipt and a read marker; a lower `read` makes neither.
    bob.send(ClientFrame::Read { conv: AB.into(), seq: 2 }).await;
    assert_eq!(bob.event().await, (19, marker(AB, 2)));
    assert_eq!(alice.event().await, (19, receipt(AB, "bob", Read, 2)), "one delivered receipt for the whole `received`");
    bob.send(ClientFrame::Read { conv: AB.into(), seq: 1 }).await;
    bob.send(ClientFrame::Read { conv: AB.into(), seq: 2 }).await;
    bob.send(ClientFrame::Read { conv: AB.into(), seq: 5 }).await;
    assert_eq!(bob.event().await, (20, marker(AB, 5)), "a read marker for a read that went backwards");
    assert_eq!(alice.event().await, (20, receipt(AB, "bob", Read, 5)), "a receipt for a read that went backwards");

    // Read implies delivered: bob reads a17 before any device confirmed it with `received`.
    alice.send_acked("a17", "bob", &t[20]).await;
    assert_eq!(alice.message_event().await.0, 21);
    assert_eq!(bob.message_event().await.0, 21);
    bob.send(ClientFrame::Read { conv: AB.into(), seq: 17 }).await;
    assert_eq!(bob.event().await, (22, marker(AB, 17)));
    assert_eq!(alice.event().await, (22, receipt(AB, "bob", Read, 17)), "read must not wait for delivery");
    // The `received` that follows may restate delivery (up to 17), never report less.
    bob.send(ClientFrame::Received { up_to: 22 }).await;
    bob.barrier().await;
    alice.send_acked("a18", "bob", &t[21]).await;
    let mut next = alice.event().await;
    if let (23, EventPayload::Receipt(r)) = &next {
        assert_eq!((r.conv.as_str(), r.by.as_str(), r.status, r.up_to), (AB, "bob", Delivered, 17));
        next = alice.event().await;
    }
    match next {
        (_, EventPayload::Message(m)) => assert_eq!(m.id, "a18"),
        e => panic!("expected alice's a18, got {e:?}"),
    }

    // carol got receipts only about her own conversation: her next event is her next message.
    carol.send_acked("c3", "bob", &t[22]).await;
    let (ev, m) = carol.message_event().await;
    assert_eq!((ev, m.id.as_str()), (5, "c3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_an_offline_sender_in_its_backlog() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let b = srv.user("bob").await;
    let t = dialog(12, 2);

    let mut alice = srv.connect(&a, None).await.client;
    alice.send_acked("a1", "bob", &t[0]).await;
    alice.send_acked("a2", "bob", &t[1]).await;
    assert_eq!(alice.message_event().await.0, 1);
    assert_eq!(alice.message_event().await.0, 2);
    alice.send(ClientFrame::Received { up_to: 2 }).await;
    alice.barrier().await;
    alice.close().await;

    // alice is offline while bob confirms and reads.
    let mut bob = srv.connect(&b, None).await;
    assert_eq!(bob.messages().len(), 2);
    bob.client.send(ClientFrame::Received { up_to: 2 }).await;
    bob.client.send(ClientFrame::Read { conv: AB.into(), seq: 2 }).await;
    assert_eq!(bob.client.event().await, (3, marker(AB, 2)));

    // Both receipts are in alice's backlog, before `synced`.
    let s = srv.connect(&a, None).await;
    assert_eq!(s.head, 4);
    assert_eq!(s.backlog, vec![(3, receipt(AB, "bob", Delivered, 2)), (4, receipt(AB, "bob", Read, 2))]);
    // ... and in the backlog of her phone, which never connected, after her two messages.
    let s = srv.connect(&a_phone, None).await;
    let kinds: Vec<(u64, &str)> = s.backlog.iter().map(|(ev, p)| (*ev, p.kind())).collect();
    assert_eq!(kinds, [(1, "message"), (2, "message"), (3, "receipt"), (4, "receipt")]);
    assert_eq!(s.backlog[2..], [(3, receipt(AB, "bob", Delivered, 2)), (4, receipt(AB, "bob", Read, 2))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_reach_every_device_of_the_reader_and_its_conversation_list() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b_web = srv.user("bob").await;
    let b_phone = srv.login("bob", "phone").await;
    let b_tablet = srv.login("bob", "tablet").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut web = srv.connect(&b_web, None).await.client;
    let mut phone = srv.connect(&b_phone, None).await.client;
    let t = dialog(13, 3);
    for (k, body) in t.iter().enumerate() {
        alice.send_acked(&format!("a{}", k + 1), "bob", body).await;
    }
    for c in [&mut web, &mut phone] {
        for k in 1..=3 {
            assert_eq!(c.message_event().await.0, k);
        }
    }

    // A read on the web device: a read_marker event on both devices, the web one included.
    web.send(ClientFrame::Read { conv: AB.into(), seq: 2 }).await;
    assert_eq!(web.event().await, (4, marker(AB, 2)), "the reading device's own read_marker");
    assert_eq!(phone.event().await, (4, marker(AB, 2)), "the other device's read_marker");
    let items = conversations(&mut phone).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let it = &items[0];
    assert_eq!((it.conv.as_str(), it.last_seq, it.read_seq, it.unread), (AB, 3, 2, 1));
    assert_eq!(it.last.as_ref().map(|m| m.id.as_str()), Some("a3"));

    // A read past the end, from the phone: clamped to the last seq.
    phone.send(ClientFrame::Read { conv: AB.into(), seq: 99 }).await;
    assert_eq!(phone.event().await, (5, marker(AB, 3)));
    assert_eq!(web.event().await, (5, marker(AB, 3)));
    let items = conversations(&mut web).await;
    assert_eq!((items[0].conv.as_str(), items[0].read_seq, items[0].unread), (AB, 3, 0));
    let items = conversations(&mut phone).await;
    assert_eq!((items[0].read_seq, items[0].unread), (3, 0));

    // A device that was offline gets the markers in its backlog.
    let s = srv.connect(&b_tablet, None).await;
    assert_eq!(s.backlog[3..], [(4, marker(AB, 2)), (5, marker(AB, 3))]);
}

// ---------------------------------------------------------------------------------- membership

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_conversations_answer_not_member_and_reveal_nothing() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob] = srv.clients(["alice", "bob"]).await;
    let e = srv.user("eve").await;
    let mut eve = srv.connect(&e, None).await.client;
    let t = dialog(14, 6);
    const NAME: &str = "alice and bob only";

    alice.send_acked("m1", "bob", &t[0]).await;
    let g = alice.create_group(NAME, &["bob"]).await;
    alice.send_acked("m2", &g, &t[1]).await;
    for c in [&mut alice, &mut bob] {
        let kinds: Vec<(u64, &str)> = [c.event().await, c.event().await, c.event().await].into_iter().map(|(ev, p)| (ev, p.kind())).collect();
        assert_eq!(kinds, [(1, "message"), (2, "group"), (3, "message")]);
    }

    // eve tries every per-conversation request on both conversations.
    let mut n = 0;
    for conv in [AB, g.as_str()] {
        let frames = [
            ClientFrame::Read { conv: conv.into(), seq: 1 },
            ClientFrame::History { conv: conv.into(), before: None, limit: None },
            ClientFrame::Typing { conv: conv.into(), state: Composing },
            ClientFrame::Typing { conv: conv.into(), state: Paused },
        ];
        for f in frames {
            n += 1;
            let what = format!("{f:?}");
            let (code, message) = eve.request_err(&format!("r{n}"), f).await;
            assert_eq!(code, ErrorCode::NotMember, "{what}");
            for secret in [t[0].as_str(), t[1].as_str(), "alice", "bob", NAME] {
                assert!(!message.contains(secret), "the error to {what} reveals {secret:?}: {message}");
            }
        }
    }
    assert_eq!(eve.request_err("info", ClientFrame::GroupInfo { group: g.clone() }).await.0, ErrorCode::NotMember);
    eve.send_msg("e1", &g, &t[2]).await;
    let err = eve
        .until("the error of e1", |f| match f {
            ServerFrame::Error { id: Some(i), code, .. } if i == "e1" => Some(*code),
            _ => None,
        })
        .await;
    assert_eq!(err, ErrorCode::NotMember);
    eve.barrier().await;
    assert!(eve.take_stash().is_empty(), "eve got more than her errors");

    // Nothing reached the members: their next frames are the barrier messages, nothing before.
    bob.send_acked("m3", "alice", &t[3]).await;
    match alice.recv().await {
        ServerFrame::Event { ev: 4, payload: EventPayload::Message(m) } => assert_eq!(m.id, "m3"),
        f => panic!("alice got {f:?} before bob's m3"),
    }
    alice.send_acked("m4", &g, &t[4]).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        match bob.recv().await {
            ServerFrame::Event { ev, payload: EventPayload::Message(m) } => got.push((ev, m.id)),
            f => panic!("bob got {f:?} before alice's m4"),
        }
    }
    assert_eq!(got, [(4, "m3".to_owned()), (5, "m4".to_owned())]);
    // eve's stream is still empty.
    eve.close().await;
    assert_eq!(srv.connect(&e, Some(0)).await.head, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_an_empty_dm_of_ones_own_is_not_an_error() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob] = srv.clients(["alice", "bob"]).await;

    // alice is a member of dm:alice:bob and of dm:alice:alice, which have no message yet: history
    // gives an empty page, typing is relayed; `read` (clamped to seq 0) has nothing to do.
    match alice.request("h", ClientFrame::History { conv: AB.into(), before: None, limit: None }).await {
        ServerFrame::History { messages, more, .. } => assert_eq!((messages.len(), more), (0, false)),
        f => panic!("{f:?}"),
    }
    alice.send(ClientFrame::Typing { conv: AB.into(), state: Composing }).await;
    assert_eq!(bob.recv().await, typing(AB, "alice", Composing));
    for conv in [AB, "dm:alice:alice"] {
        alice.send_rid(&format!("read {conv}"), ClientFrame::Read { conv: conv.into(), seq: 3 }).await;
    }
    alice.barrier().await;
    let errors = alice.take_stash();
    assert!(errors.is_empty(), "`read` of an empty dm alice is in: {errors:?}");
    // Nothing was marked: the first message is unread.
    bob.send_acked("b1", "alice", &dialog(19, 1)[0]).await;
    let items = conversations(&mut alice).await;
    assert_eq!((items[0].conv.as_str(), items[0].read_seq, items[0].unread), (AB, 0, 1));
}

// ---------------------------------------------------------------------------------- typing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_members_devices_is_never_stored_and_ends_on_send_or_disconnect() {
    let dir = TestDir::new();
    // A timeout far beyond the test: every `paused` it sees comes from what it checks.
    let srv = Server::start_with(&dir, &[("PARLEY__SESSION__TYPING_TIMEOUT_MS", "600000")]).await;
    let a_web = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let b_web = srv.user("bob").await;
    let b_phone = srv.login("bob", "phone").await;
    let b_tablet = srv.login("bob", "tablet").await;
    let c = srv.user("carol").await;
    let mut aw = srv.connect(&a_web, None).await.client;
    let mut ap = srv.connect(&a_phone, None).await.client;
    let mut bw = srv.connect(&b_web, None).await.client;
    let mut bp = srv.connect(&b_phone, None).await.client;
    let mut cw = srv.connect(&c, None).await.client;
    let t = dialog(15, 2);

    let g = aw.create_group("typing", &["bob", "carol"]).await;
    for d in [&mut aw, &mut ap, &mut bw, &mut bp, &mut cw] {
        assert_eq!(d.event().await.1.kind(), "group");
    }

    // A dm: both of bob's devices, not alice's other device, not carol.
    aw.send(ClientFrame::Typing { conv: AB.into(), state: Composing }).await;
    for d in [&mut bw, &mut bp] {
        assert_eq!(d.recv().await, typing(AB, "alice", Composing));
    }
    // Sending a message in the dm ends it: `paused` with the message.
    aw.send_msg("m1", "bob", &t[0]).await;
    for d in [&mut bw, &mut bp] {
        let got = next_set(d, 2).await;
        assert!(got.contains(&typing(AB, "alice", Paused)), "no paused with the message: {got:?}");
        assert!(got.iter().any(|f| matches!(f, ServerFrame::Event { ev: 2, payload: EventPayload::Message(m) } if m.id == "m1")), "{got:?}");
    }
    match ap.recv().await {
        ServerFrame::Event { ev: 2, payload: EventPayload::Message(m) } => assert_eq!(m.id, "m1"),
        f => panic!("alice's phone got {f:?} before her m1: typing goes to the other members only"),
    }
    aw.ack("m1").await;
    assert_eq!(aw.message_event().await.0, 2);

    // A group: every other member's devices.
    aw.send(ClientFrame::Typing { conv: g.clone(), state: Composing }).await;
    for d in [&mut bw, &mut bp, &mut cw] {
        assert_eq!(d.recv().await, typing(&g, "alice", Composing), "carol saw nothing of the dm before this");
    }
    cw.send(ClientFrame::Typing { conv: g.clone(), state: Composing }).await;
    for d in [&mut aw, &mut ap, &mut bw, &mut bp] {
        assert_eq!(d.recv().await, typing(&g, "carol", Composing));
    }

    // alice's web device, composing in both, disconnects: `paused` for both at once, though her
    // phone stays online (docs/protocol.md: typing belongs to the device that typed).
    aw.send(ClientFrame::Typing { conv: AB.into(), state: Composing }).await;
    for d in [&mut bw, &mut bp] {
        assert_eq!(d.recv().await, typing(AB, "alice", Composing));
    }
    aw.close().await;
    for d in [&mut bw, &mut bp] {
        assert_eq!(next_set(d, 2).await, sorted(vec![typing(AB, "alice", Paused), typing(&g, "alice", Paused)]));
    }
    assert_eq!(cw.recv().await, typing(&g, "alice", Paused));
    // carol's device disconnects while composing: the last device of a composing user.
    cw.close().await;
    for d in [&mut ap, &mut bw, &mut bp] {
        assert_eq!(d.recv().await, typing(&g, "carol", Paused));
    }
    // An explicit `paused` is relayed as is.
    ap.send(ClientFrame::Typing { conv: AB.into(), state: Composing }).await;
    ap.send(ClientFrame::Typing { conv: AB.into(), state: Paused }).await;
    for d in [&mut bw, &mut bp] {
        assert_eq!(d.recv().await, typing(AB, "alice", Composing));
        assert_eq!(d.recv().await, typing(AB, "alice", Paused));
    }

    // Never stored: a replay of bob's whole stream holds the group event and m1 only (the
    // harness fails on any non-event frame before `synced`).
    let s = srv.connect(&b_tablet, Some(0)).await;
    let kinds: Vec<&str> = s.backlog.iter().map(|(_, p)| p.kind()).collect();
    assert_eq!((s.head, kinds), (2, vec!["group", "message"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_any_device_of_the_typer_ends_its_typing() {
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__SESSION__TYPING_TIMEOUT_MS", "600000")]).await;
    let a_web = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let b = srv.user("bob").await;
    let mut aw = srv.connect(&a_web, None).await.client;
    let mut ap = srv.connect(&a_phone, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;

    // PROTOCOL.md §4.6: when a composing user "sends a message in that conversation", the other
    // members get `paused`. alice composes on the web and sends from her phone.
    aw.send(ClientFrame::Typing { conv: AB.into(), state: Composing }).await;
    assert_eq!(bob.recv().await, typing(AB, "alice", Composing));
    ap.send_acked("m1", "bob", &dialog(20, 1)[0]).await;
    // The paused comes with m1 (before or after it); a second message is the barrier.
    ap.send_acked("m2", "bob", &dialog(20, 2)[1]).await;
    let mut got = Vec::new();
    loop {
        let f = bob.recv().await;
        let done = matches!(&f, ServerFrame::Event { payload: EventPayload::Message(m), .. } if m.id == "m2");
        got.push(f);
        if done {
            break;
        }
    }
    assert!(got.contains(&typing(AB, "alice", Paused)), "alice sent a message while composing, bob got no paused: {got:?}");
    let messages: Vec<(u64, String)> = got
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Event { ev, payload: EventPayload::Message(m) } => Some((*ev, m.id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(messages, [(1, "m1".to_owned()), (2, "m2".to_owned())]);
    // alice's web device, which was composing, is told nothing about it (typing goes to others).
    let (ev, m) = aw.message_event().await;
    assert_eq!((ev, m.id.as_str()), (1, "m1"));
    match aw.recv().await {
        ServerFrame::Event { ev: 2, payload: EventPayload::Message(m) } => assert_eq!(m.id, "m2"),
        f => panic!("alice's web device got {f:?} between m1 and m2"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composing_expires_to_paused_after_the_timeout_unless_refreshed() {
    const TIMEOUT: Duration = Duration::from_millis(2000);
    const REFRESH: Duration = Duration::from_millis(400);
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__SESSION__TYPING_TIMEOUT_MS", "2000")]).await;
    let [mut alice, mut bob] = srv.clients(["alice", "bob"]).await;
    let composing = ClientFrame::Typing { conv: AB.into(), state: Composing };

    // Not refreshed: `paused` once the timeout has passed, not before.
    let t0 = Instant::now();
    alice.send(composing.clone()).await;
    assert_eq!(bob.recv().await, typing(AB, "alice", Composing));
    assert_eq!(bob.recv().await, typing(AB, "alice", Paused));
    assert!(t0.elapsed() >= TIMEOUT, "paused after {:?}, before the timeout {TIMEOUT:?}", t0.elapsed());

    // Refreshed every 400 ms for 2.4 s (longer than the timeout): no `paused` meanwhile.
    let start = Instant::now();
    let mut last = Instant::now();
    alice.send(composing.clone()).await;
    let mut seen = 0;
    while start.elapsed() < TIMEOUT + REFRESH {
        for f in frames_for(&mut bob, REFRESH).await {
            assert_eq!(f, typing(AB, "alice", Composing), "while composing was refreshed every {REFRESH:?}");
            seen += 1;
        }
        last = Instant::now();
        alice.send(composing.clone()).await;
    }
    assert!(seen >= 5, "the refreshes are relayed: {seen}");
    // Then it stops: `paused` a full timeout after the last refresh.
    loop {
        match bob.recv().await {
            f if f == typing(AB, "alice", Composing) => continue,
            f => {
                assert_eq!(f, typing(AB, "alice", Paused));
                break;
            }
        }
    }
    assert!(last.elapsed() >= TIMEOUT, "paused {:?} after the last refresh, before the timeout", last.elapsed());
}

// ---------------------------------------------------------------------------------- presence

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_goes_offline_with_the_last_device_and_keeps_last_seen_while_online() {
    const BW: &str = "dm:bob:wendy";
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let w = srv.user("wendy").await;
    let w2 = srv.login("wendy", "phone").await;
    let b_web = srv.user("bob").await;
    let b_phone = srv.login("bob", "phone").await;
    let c = srv.user("carol").await;
    let mut wendy = srv.connect(&w, None).await.client;

    // The phone types to wendy and disconnects: its `paused` reaches wendy just after its
    // disconnect was handed to the registry, and a hello after that is registered after it.
    // Returns the time at which the disconnect has certainly been processed.
    async fn gone(srv: &Server, dev: Client, wendy: &mut Client, settle: &str) -> u64 {
        let mut dev = dev;
        dev.send(ClientFrame::Typing { conv: BW.into(), state: Composing }).await;
        wendy.until("bob composing", |f| (*f == typing(BW, "bob", Composing)).then_some(())).await;
        dev.close().await;
        wendy.until("bob paused", |f| (*f == typing(BW, "bob", Paused)).then_some(())).await;
        srv.connect(settle, None).await.client.close().await;
        now_ms()
    }

    wendy.send(ClientFrame::Watch { users: vec!["bob".into()] }).await;
    assert_eq!(wendy.presence_of("bob").await, (false, None), "bob was never seen");
    let bw = srv.connect(&b_web, None).await.client;
    assert_eq!(wendy.presence_of("bob").await, (true, None), "online, still never seen offline");

    // Two devices; the phone leaves first: bob stays online.
    let bp = srv.connect(&b_phone, None).await.client;
    let mid = gone(&srv, bp, &mut wendy, &c).await;
    bw.close().await;
    let (online, last_seen) = wendy.presence_of("bob").await;
    let after = now_ms();
    assert!(!online);
    let l1 = last_seen.expect("last_seen once offline");
    assert!(mid <= l1 && l1 <= after, "last_seen {l1} is not when the last device left (after {mid}, before {after})");

    // Back online: last_seen keeps its value, also for a new watcher.
    let bw = srv.connect(&b_web, None).await.client;
    assert_eq!(wendy.presence_of("bob").await, (true, Some(l1)));
    let mut wendy2 = srv.connect(&w2, None).await.client;
    wendy2.send(ClientFrame::Watch { users: vec!["bob".into()] }).await;
    assert_eq!(wendy2.presence_of("bob").await, (true, Some(l1)));
    // A second device coming and going while the first stays does not touch it.
    let bp = srv.connect(&b_phone, None).await.client;
    gone(&srv, bp, &mut wendy, &c).await;
    let mut wendy3 = srv.connect(&w2, None).await.client;
    wendy3.send(ClientFrame::Watch { users: vec!["bob".into()] }).await;
    assert_eq!(wendy3.presence_of("bob").await, (true, Some(l1)), "last_seen moved while bob stayed online");

    // The last device leaves again: a new last_seen, to every watcher.
    let before = now_ms();
    bw.close().await;
    for w in [&mut wendy, &mut wendy2, &mut wendy3] {
        let (online, last_seen) = w.presence_of("bob").await;
        let l2 = last_seen.expect("last_seen");
        assert!(!online && l2 >= before && l2 >= l1, "offline again: last_seen {l2}, left after {before}");
    }
    for w in [&mut wendy, &mut wendy2, &mut wendy3] {
        let extra: Vec<ServerFrame> = w.take_stash().into_iter().filter(|f| matches!(f, ServerFrame::Presence { .. })).collect();
        assert!(extra.is_empty(), "presence frames that changed nothing: {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_takes_up_to_1000_users_and_unwatch_stops_updates() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let w = srv.user("wendy").await;
    let b = srv.user("bob").await;
    let c = srv.user("carol").await;
    let mut wendy = srv.connect(&w, None).await.client;

    // 1,000 users: bob (registered, never connected) and 999 ids nobody registered.
    let mut users: Vec<String> = vec!["bob".into()];
    users.extend((1..1000).map(|i| format!("u{i:04}")));
    wendy.send_rid("w1000", ClientFrame::Watch { users: users.clone() }).await;
    let mut got = BTreeSet::new();
    for _ in 0..1000 {
        match wendy.recv().await {
            ServerFrame::Presence { user, online, last_seen } => {
                assert_eq!((online, last_seen), (false, None), "{user} was never seen");
                assert!(got.insert(user.clone()), "two presence frames for {user}");
            }
            f => panic!("expected 1,000 presence frames, got {f:?} after {}", got.len()),
        }
    }
    assert_eq!(got, users.iter().cloned().collect::<BTreeSet<_>>());
    users.push("u1000".into());
    let (code, _) = wendy.request_err("w1001", ClientFrame::Watch { users }).await;
    assert_eq!(code, ErrorCode::TooLarge, "watch of 1,001 users");
    wendy.barrier().await;
    assert!(wendy.take_stash().is_empty(), "frames after the refused watch");
    // The same user named many times: one presence frame.
    wendy.send(ClientFrame::Watch { users: vec!["bob".into(); 500] }).await;
    assert_eq!(wendy.presence_of("bob").await, (false, None));
    wendy.barrier().await;
    let dup = wendy.take_stash();
    assert!(dup.is_empty(), "frames after one presence of bob: {dup:?}");

    // Unwatch bob; carol is watched and serves as the barrier: her online, then her offline
    // (a later presence flush than any about bob) reach wendy, and nothing about bob before.
    wendy.send(ClientFrame::Watch { users: vec!["carol".into()] }).await;
    assert_eq!(wendy.presence_of("carol").await, (false, None));
    wendy.send(ClientFrame::Unwatch { users: vec!["bob".into()] }).await;
    wendy.barrier().await;
    let bob = srv.connect(&b, None).await.client;
    let carol = srv.connect(&c, None).await.client;
    assert_eq!(wendy.presence_of("carol").await, (true, None));
    carol.close().await;
    assert!(!wendy.presence_of("carol").await.0);
    let stray: Vec<ServerFrame> = wendy.take_stash();
    assert!(stray.is_empty(), "frames after unwatch: {stray:?}");
    // Watching again shows bob as he is now.
    wendy.send(ClientFrame::Watch { users: vec!["bob".into()] }).await;
    assert_eq!(wendy.presence_of("bob").await, (true, None));
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_survives_a_restart() {
    let dir = TestDir::new();
    let mut srv = Server::start(&dir).await;
    let w = srv.user("wendy").await;
    let b = srv.user("bob").await;
    let c = srv.user("carol").await;
    let mut wendy = srv.connect(&w, None).await.client;
    wendy.send(ClientFrame::Watch { users: vec!["bob".into(), "carol".into()] }).await;
    assert_eq!(wendy.presence_of("bob").await, (false, None));
    assert_eq!(wendy.presence_of("carol").await, (false, None));
    let bob = srv.connect(&b, None).await.client;
    assert_eq!(wendy.presence_of("bob").await, (true, None));
    bob.close().await;
    let (online, l) = wendy.presence_of("bob").await;
    assert!(!online);
    let l = l.expect("last_seen");
    // carol is still online when the server stops: her sockets close with the shutdown.
    let mut carol = srv.connect(&c, None).await.client;
    assert_eq!(wendy.presence_of("carol").await, (true, None));

    let stop = now_ms();
    srv.sigterm();
    for cl in [&mut wendy, &mut carol] {
        let (_, code) = cl.until_closed().await;
        assert_eq!(code, Some(parley::protocol::close::GOING_AWAY));
    }
    let status = srv.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    srv.restart().await;

    let mut wendy = srv.connect(&w, None).await.client;
    wendy.send(ClientFrame::Watch { users: vec!["bob".into(), "carol".into()] }).await;
    assert_eq!(wendy.presence_of("bob").await, (false, Some(l)), "bob's last_seen after the restart");
    let (online, lc) = wendy.presence_of("carol").await;
    assert!(!online);
    let lc = lc.expect("carol's last device left at the shutdown: last_seen must be set");
    assert!(lc >= stop, "carol's last_seen {lc} is before the shutdown at {stop}");
}

// ---------------------------------------------------------------------------------- history

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_stay_gapless_while_messages_keep_arriving() {
    const N: usize = 450;
    const M: usize = 300;
    const LIMIT: u64 = 50;
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a_web = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let b = srv.user("bob").await;
    let t = dialog(16, N + M);
    let mut aw = srv.connect(&a_web, None).await.client;
    for (k, body) in t[..N].iter().enumerate() {
        aw.send_msg(&format!("m{k}"), "bob", body).await;
    }
    for k in 0..N {
        aw.ack(&format!("m{k}")).await;
    }
    let mut bob = srv.connect(&b, None).await.client;

    // alice's phone keeps sending while bob pages from the newest page back to seq 1.
    let mut ap = srv.connect(&a_phone, None).await.client;
    let tail: Vec<String> = t[N..].to_vec();
    let sender = tokio::spawn(async move {
        for (k, body) in tail.iter().enumerate() {
            ap.send_msg(&format!("m{}", N + k), "bob", body).await;
        }
        for k in N..N + M {
            ap.ack(&format!("m{k}")).await;
        }
    });
    let mut pages: Vec<Vec<MessageView>> = Vec::new();
    let mut before = None;
    let mut top = 0;
    loop {
        let (ms, more) = page(&mut bob, AB, before, Some(LIMIT)).await;
        let (Some(first), Some(last)) = (ms.first(), ms.last()) else { panic!("an empty page before {before:?}") };
        for w in ms.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1, "page before {before:?}: {:?}", seqs(&ms));
        }
        match before {
            Some(b) => assert_eq!(last.seq + 1, b, "the page before {b} ends at {}", last.seq),
            None => {
                top = last.seq;
                assert!(top >= N as u64, "the newest page ends at {top}");
            }
        }
        assert_eq!(more, first.seq > 1, "more on the page {:?}", seqs(&ms));
        if more {
            assert_eq!(ms.len() as u64, LIMIT, "a short page while older messages exist");
        }
        let next = first.seq;
        pages.push(ms);
        if !more {
            break;
        }
        before = Some(next);
    }
    let all: Vec<MessageView> = pages.into_iter().rev().flatten().collect();
    assert_eq!(seqs(&all), (1..=top).collect::<Vec<_>>(), "the pages are exactly 1..={top}");
    for m in &all {
        let k = m.seq as usize - 1;
        assert_eq!((m.id.as_str(), m.from.as_str(), m.body.as_str()), (format!("m{k}").as_str(), "alice", t[k].as_str()));
    }
    within(T, "the sender", sender).await.expect("sender task");

    // The limit: 1-200, default 50.
    for bad in [0, 201] {
        let (code, _) = bob.request_err("bad-limit", ClientFrame::History { conv: AB.into(), before: None, limit: Some(bad) }).await;
        assert_eq!(code, ErrorCode::BadRequest, "limit {bad}");
    }
    let total = (N + M) as u64;
    let (ms, more) = page(&mut bob, AB, None, Some(200)).await;
    assert_eq!((seqs(&ms), more), (((total - 199)..=total).collect::<Vec<_>>(), true));
    let (ms, more) = page(&mut bob, AB, None, None).await;
    assert_eq!((seqs(&ms), more), (((total - 49)..=total).collect::<Vec<_>>(), true), "the default limit is 50");
    let (ms, more) = page(&mut bob, AB, Some(1), Some(10)).await;
    assert_eq!((ms.len(), more), (0, false), "before seq 1");
    assert_eq!(bob.history_all(AB).await.len() as u64, total);
}

// ---------------------------------------------------------------------------------- conversations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_lists_every_conversation_newest_first_with_unread_counts() {
    const AA: &str = "dm:alice:alice";
    const AC: &str = "dm:alice:carol";
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob, mut carol, mut dave] = srv.clients(["alice", "bob", "carol", "dave"]).await;
    let t = dialog(17, 20);
    let g = alice.create_group("conversations", &["bob", "carol"]).await;

    // Blocks of messages, each accepted in a later millisecond than the one before, so the list
    // order is the block order reversed: g, dm:alice:bob, dm:alice:carol, dm:alice:alice (which is
    // neither the name order nor its reverse).
    let plan: [(&str, &str); 12] = [
        ("alice", "alice"),
        ("alice", "alice"),
        ("carol", "alice"),
        ("carol", "alice"),
        ("alice", "bob"),
        ("bob", "alice"),
        ("bob", "alice"),
        ("alice", "bob"),
        ("bob", "alice"),
        ("carol", g.as_str()),
        ("alice", g.as_str()),
        ("carol", g.as_str()),
    ];
    let mut last = std::collections::BTreeMap::new();
    let mut prev_conv = String::new();
    let mut prev_ts = 0;
    for (k, (from, to)) in plan.iter().enumerate() {
        let sender = match *from {
            "alice" => &mut alice,
            "bob" => &mut bob,
            _ => &mut carol,
        };
        let id = format!("x{k}");
        let conv_now = if to.starts_with("g:") { to.to_string() } else { parley::protocol::Conv::dm(from, to).to_string() };
        if conv_now != prev_conv {
            clock_past(prev_ts).await;
        }
        let (conv, seq, ts) = sender.send_acked(&id, to, &t[k]).await;
        assert_eq!(conv, conv_now);
        prev_conv = conv.clone();
        prev_ts = ts;
        last.insert(conv.clone(), MessageView { conv, seq, id, from: from.to_string(), body: t[k].clone(), ts });
    }
    alice.send(ClientFrame::Read { conv: AB.into(), seq: 2 }).await;

    type Last = std::collections::BTreeMap<String, MessageView>;
    fn item(last: &Last, conv: &str, last_seq: u64, read_seq: u64, unread: u64) -> ConversationItem {
        ConversationItem { conv: conv.to_owned(), last_seq, read_seq, unread, last: Some(last[conv].clone()) }
    }
    assert_eq!(
        conversations(&mut alice).await,
        vec![item(&last, &g, 3, 0, 2), item(&last, AB, 5, 2, 2), item(&last, AC, 2, 0, 2), item(&last, AA, 2, 0, 0)],
        "alice: her own messages are never unread; dm:alice:bob read up to 2 leaves bob's 3 and 5"
    );
    assert_eq!(conversations(&mut bob).await, vec![item(&last, &g, 3, 0, 3), item(&last, AB, 5, 0, 2)]);
    assert_eq!(conversations(&mut dave).await, vec![], "dave has no conversation");

    // Reading the group, then a new message in the dm: the dm moves to the top.
    alice.send(ClientFrame::Read { conv: g.clone(), seq: 3 }).await;
    clock_past(prev_ts).await;
    let (conv, seq, ts) = bob.send_acked("x12", "alice", &t[12]).await;
    last.insert(conv.clone(), MessageView { conv, seq, id: "x12".into(), from: "bob".into(), body: t[12].clone(), ts });
    assert_eq!(
        conversations(&mut alice).await,
        vec![item(&last, AB, 6, 2, 3), item(&last, &g, 3, 3, 0), item(&last, AC, 2, 0, 2), item(&last, AA, 2, 0, 0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_order_follows_acceptance_when_last_messages_share_a_millisecond() {
    let dir = TestDir::new();
    // A wide commit window: two pipelined sends land in one batch, so they share one ts.
    let srv = Server::start_with(&dir, &[("PARLEY__STORAGE__BATCH_WINDOW_US", "50000")]).await;
    let a = srv.user("alice").await;
    srv.user("bob").await;
    let mut alice = srv.connect(&a, None).await.client;
    let t = dialog(18, 2);
    let g = alice.create_group("same millisecond", &["bob"]).await;
    alice.send_msg("d1", "bob", &t[0]).await;
    alice.send_msg("g1", &g, &t[1]).await;
    let (_, _, td) = alice.ack("d1").await;
    let (_, _, tg) = alice.ack("g1").await;
    let order: Vec<String> = conversations(&mut alice).await.into_iter().map(|i| i.conv).collect();
    assert_eq!(order, [g.clone(), AB.to_owned()], "g1 was accepted after d1 (ts {tg} and {td}): the group is the newest");
}


/// Every refused `send` answers an `error` with the client's `id`, an invalid id too
/// (PROTOCOL.md §3), so a client can settle that pending send; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_send_echoes_its_id_even_an_invalid_one() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, _bob] = srv.clients(["alice", "bob"]).await;
    let long = "x".repeat(65);
    let cases: [(&str, &str, &str, ErrorCode); 5] = [
        ("", "bob", "hi", ErrorCode::BadRequest),
        (&long, "bob", "hi", ErrorCode::BadRequest),
        ("e-body", "bob", "", ErrorCode::BadRequest),
        ("e-to", "not a user!", "hi", ErrorCode::BadRequest),
        ("e-group", "g:nosuchgroup", "hi", ErrorCode::NotMember),
    ];
    for (id, to, body, want) in cases {
        alice.send_msg(id, to, body).await;
        let (code, message) = alice
            .until(&format!("the error of send {id:?}"), |f| match f {
                ServerFrame::Error { id: Some(i), code, message, .. } if i == id => Some((*code, message.clone())),
                ServerFrame::Error { id: None, .. } => panic!("an error without the id of send {id:?}: {f:?}"),
                _ => None,
            })
            .await;
        assert_eq!(code, want, "send {id:?} to {to:?}: {message}");
    }
    alice.barrier().await;
    assert!(alice.history_all("dm:alice:bob").await.is_empty(), "a refused send was stored");
}

/// Replies come in request order (docs/protocol.md, "order of replies on one socket") also when
/// a refusal decided by apply (a dm to a user that does not exist) comes before refusals the
/// session decides at once (a bad `to`) and an `ack`: the apply refusal used to be queued
/// behind every reply still waiting when its turn came, so later replies overtook it (found by
/// a fresh user's trial).
#[tokio::test]
async fn a_refusal_from_apply_keeps_its_place_among_the_replies() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, _bob] = srv.clients(["alice", "bob"]).await;
    let sends = [("n1", "nosuchuser"), ("n2", "BAD"), ("n3", "bob"), ("n4", "nosuchuser2"), ("n5", "BAD"), ("n6", "bob")];
    let codes = [Some(ErrorCode::UnknownUser), Some(ErrorCode::BadRequest), None, Some(ErrorCode::UnknownUser), Some(ErrorCode::BadRequest), None];
    for round in 0..5 {
        let ids: Vec<String> = sends.iter().map(|(id, _)| format!("{id}-{round}")).collect();
        for ((_, to), id) in sends.iter().zip(&ids) {
            alice.send_msg(id, to, "hi").await;
        }
        let mut order = Vec::new();
        while order.len() < ids.len() {
            match alice.recv().await {
                ServerFrame::Ack { id, .. } => order.push((id, None)),
                ServerFrame::Error { id: Some(id), code, .. } => order.push((id, Some(code))),
                ServerFrame::Event { .. } => {}
                f => panic!("unexpected {f:?}"),
            }
        }
        let want: Vec<(String, Option<ErrorCode>)> = ids.iter().cloned().zip(codes).collect();
        assert_eq!(order, want, "round {round}: replies in request order");
    }
}
