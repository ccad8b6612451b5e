//! The postcard encoding end to end (PROTOCOL.md §3): the first frame's kind picks the encoding
//! of every server frame on that socket. [`Client`] checks the kind of every frame it receives.

use parley::protocol::{ClientFrame, Encoding, ErrorCode, EventPayload, ServerFrame};

use crate::common::{dialog, Client, Server, TestDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_client_gets_binary_frames_and_talks_to_json_clients() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b_bin = srv.user("bob").await;
    let b_json = srv.login("bob", "laptop").await;
    let t = dialog(7, 4);

    let alice = Client::connect(srv.addr, &a, None, Encoding::Postcard).await;
    assert_eq!((alice.user.as_str(), alice.device.as_str(), alice.head), ("alice", "web", 0));
    let mut alice = alice.client;
    let mut bob_bin = Client::connect(srv.addr, &b_bin, None, Encoding::Postcard).await.client;
    let mut bob_json = Client::connect(srv.addr, &b_json, None, Encoding::Json).await.client;

    // Binary sender → one binary and one JSON recipient device.
    let (conv, seq, ts) = alice.send_acked("p1", "bob", &t[0]).await;
    assert_eq!((conv.as_str(), seq), ("dm:alice:bob", 1));
    for c in [&mut bob_bin, &mut bob_json] {
        let (ev, m) = c.message_event().await;
        assert_eq!((ev, m.id.as_str(), m.from.as_str(), m.body.as_str(), m.ts), (1, "p1", "alice", t[0].as_str(), ts));
    }
    // JSON sender → the binary client.
    let (_, seq, _) = bob_json.send_acked("j1", "alice", &t[1]).await;
    assert_eq!(seq, 2);
    let (ev, m) = bob_bin.message_event().await;
    assert_eq!((ev, m.id.as_str(), m.body.as_str()), (2, "j1", t[1].as_str()), "the binary device's copy of its user's message");
    let (ev, m) = alice.message_event().await;
    assert_eq!(ev, 1, "alice's own p1 is her ev 1");
    assert_eq!(m.id, "p1");
    let (ev, m) = alice.message_event().await;
    assert_eq!((ev, m.id.as_str(), m.body.as_str()), (2, "j1", t[1].as_str()));

    // Replies and errors are binary too, with their rid.
    let h = alice.history_all("dm:alice:bob").await;
    assert_eq!(h.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), [t[0].as_str(), t[1].as_str()]);
    let reply = alice.request("bad", ClientFrame::History { conv: "dm:alice:bob".into(), before: None, limit: Some(0) }).await;
    assert!(matches!(reply, ServerFrame::Error { code: ErrorCode::BadRequest, .. }), "{reply:?}");
    let reply = alice.request("c", ClientFrame::Conversations).await;
    let ServerFrame::Conversations { items, .. } = reply else { panic!("{reply:?}") };
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].conv.as_str(), items[0].last_seq, items[0].unread), ("dm:alice:bob", 2, 1));

    // A group, created and used over binary.
    let reply = alice.request("g", ClientFrame::GroupCreate { name: t[2].chars().take(50).collect(), members: vec!["bob".into()] }).await;
    let ServerFrame::Result { group: Some(g), .. } = reply else { panic!("{reply:?}") };
    let (_, seq, _) = alice.send_acked("p2", &g, &t[3]).await;
    assert_eq!(seq, 1);
    let mut got_group_event = false;
    loop {
        match bob_bin.event().await {
            (_, EventPayload::Group(gv)) => {
                assert_eq!(gv.group, g);
                got_group_event = true;
            }
            (_, EventPayload::Message(m)) if m.id == "p2" => {
                assert_eq!((m.conv.as_str(), m.body.as_str()), (g.as_str(), t[3].as_str()));
                break;
            }
            (ev, p) => panic!("unexpected ev {ev}: {p:?}"),
        }
    }
    assert!(got_group_event, "bob's stream has the group's creation before its first message");

    // A binary resync from a cursor is binary as well.
    let s = Client::connect(srv.addr, &b_bin, Some(0), Encoding::Postcard).await;
    assert_eq!(s.messages().len(), 3);
}
