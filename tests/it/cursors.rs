//! Cursors (PROTOCOL.md §3.1, §3.2 `received`, §4.3): stored per device, moved only forwards by
//! `received`, overridden by an explicit `cursor` in `hello`, bounded by the head.

use parley::protocol::close;
use parley::protocol::{ClientFrame, EventPayload, ServerFrame};

use crate::common::{dialog, Server, TestDir};

/// The message ids of a backlog.
fn ids(s: &crate::common::Synced) -> Vec<String> {
    s.backlog
        .iter()
        .map(|(_, p)| match p {
            EventPayload::Message(m) => m.id.clone(),
            p => panic!("unexpected event {p:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_moves_the_cursor_forwards_only_and_per_device() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b_web = srv.user("bob").await;
    let b_phone = srv.login("bob", "phone").await;
    let mut alice = srv.connect(&a, None).await.client;
    let t = dialog(4, 7);
    for (k, body) in t[..5].iter().enumerate() {
        alice.send_acked(&format!("m{}", k + 1), "bob", body).await;
    }

    // First hello: the stored cursor is 0, so all five.
    let mut s = srv.connect(&b_web, None).await;
    assert_eq!((s.head, ids(&s)), (5, vec!["m1", "m2", "m3", "m4", "m5"].into_iter().map(String::from).collect::<Vec<_>>()));
    s.client.send(ClientFrame::Received { up_to: 3 }).await;
    s.client.barrier().await;
    s.client.close().await;

    // Without a cursor: only what is past the stored cursor 3.
    let mut s = srv.connect(&b_web, None).await;
    assert_eq!(ids(&s), ["m4", "m5"]);
    assert_eq!(s.backlog[0].0, 4);
    s.client.send(ClientFrame::Received { up_to: 5 }).await;
    s.client.barrier().await;
    s.client.close().await;

    // Everything confirmed: nothing old comes back.
    let s = srv.connect(&b_web, None).await;
    assert_eq!((s.head, s.backlog.len()), (5, 0));
    s.client.close().await;

    // A lower explicit cursor replays, without moving the stored cursor.
    let s = srv.connect(&b_web, Some(2)).await;
    assert_eq!(ids(&s), ["m3", "m4", "m5"]);
    s.client.close().await;
    let mut s = srv.connect(&b_web, None).await;
    assert_eq!(s.backlog.len(), 0, "hello with a cursor must not move the stored cursor");

    // A backwards `received` is ignored.
    s.client.send(ClientFrame::Received { up_to: 1 }).await;
    s.client.barrier().await;
    s.client.close().await;
    let s = srv.connect(&b_web, None).await;
    assert_eq!(s.backlog.len(), 0, "received up_to 1 after 5 moved the cursor backwards");

    // `received` past the head is clamped to it: a later event is still delivered.
    let mut c = s.client;
    c.send(ClientFrame::Received { up_to: 1_000 }).await;
    c.barrier().await;
    c.close().await;
    alice.send_acked("m6", "bob", &t[5]).await;
    let s = srv.connect(&b_web, None).await;
    assert_eq!((s.head, ids(&s)), (6, vec!["m6".to_owned()]), "received past the head skipped a later event");
    s.client.close().await;

    // The phone's cursor is its own: it never confirmed anything.
    let s = srv.connect(&b_phone, None).await;
    assert_eq!(ids(&s), ["m1", "m2", "m3", "m4", "m5", "m6"]);
    s.client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_past_the_head_is_refused_with_4003() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let mut alice = srv.connect(&a, None).await.client;
    alice.send_acked("m1", "bob", &dialog(5, 1)[0]).await;

    let mut c = crate::common::Client::open(srv.addr, &b, Some(2), parley::protocol::Encoding::Json).await;
    let (frames, code) = c.until_closed().await;
    assert_eq!(code, Some(close::VIOLATION), "frames before the close: {frames:?}");
    assert!(
        frames.iter().any(|f| matches!(f, ServerFrame::Error { code: parley::protocol::ErrorCode::BadRequest, .. })),
        "an error bad_request before the close: {frames:?}"
    );
    assert!(!frames.iter().any(|f| matches!(f, ServerFrame::Event { .. } | ServerFrame::Synced { .. })), "{frames:?}");

    // The head itself is fine.
    let s = srv.connect(&b, Some(1)).await;
    assert_eq!((s.head, s.backlog.len()), (1, 0));
    let mut c = s.client;
    c.barrier().await; // the socket stays open and usable
}
