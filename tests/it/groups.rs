//! Groups (PROTOCOL.md §3.2 `group_*`, §4.7; issue 3): admins and membership events, fan-out to
//! online and offline members, what a removed or later-added member may see, per-member
//! receipts, and the size cap.

use parley::protocol::{ClientFrame, ErrorCode, EventPayload, GroupAction, GroupView, MessageView, ReceiptStatus, ReceiptView, ServerFrame};

use crate::common::{dialog, Client, Server, TestDir};

use GroupAction::{Added, Created, Left, Removed};

/// The next event of `who`'s device must be the group event (users compared as a set).
async fn group_event(c: &mut Client, who: &str, ev: u64, group: &str, action: GroupAction, users: &[&str], by: &str) {
    let (e, p) = c.event().await;
    let EventPayload::Group(mut v) = p else { panic!("{who}: expected the group event {action:?} {users:?} at ev {ev}, got ev {e}: {p:?}") };
    v.users.sort();
    let mut want: Vec<String> = users.iter().map(|u| u.to_string()).collect();
    want.sort();
    let want = GroupView { group: group.to_owned(), action, users: want, by: by.to_owned() };
    assert_eq!((e, v), (ev, want), "{who}'s group event");
}

/// A group request that must succeed with a bare `result` echoing `rid`.
async fn ok(c: &mut Client, rid: &str, frame: ClientFrame) {
    let what = format!("{frame:?}");
    match c.request(rid, frame).await {
        ServerFrame::Result { rid: Some(r), group: None, name: None, members: None, admins: None } => assert_eq!(r, rid),
        f => panic!("{what}: {f:?}"),
    }
}

fn users(v: &[&str]) -> Vec<String> {
    v.iter().map(|u| u.to_string()).collect()
}

fn receipt(conv: &str, by: &str, status: ReceiptStatus, up_to: u64) -> EventPayload {
    EventPayload::Receipt(ReceiptView { conv: conv.to_owned(), by: by.to_owned(), status, up_to })
}

/// A group name of exactly `n` chars taken from real chat text (multi-byte where it is).
fn name_of(n: usize) -> String {
    let s: String = dialog(21, 50).concat().chars().filter(|c| !c.is_control()).take(n).collect();
    assert_eq!(s.chars().count(), n);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_lifecycle_admins_membership_events_and_validation() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob, mut carol, mut dave, mut erin] = srv.clients(["alice", "bob", "carol", "dave", "erin"]).await;
    let gc = |name: &str, members: &[&str]| ClientFrame::GroupCreate { name: name.to_owned(), members: users(members) };

    // Names are 1-100 chars; members must exist. None of these creates anything.
    assert_eq!(alice.request_err("n0", gc("", &["bob"])).await.0, ErrorCode::BadRequest, "empty name");
    assert_eq!(alice.request_err("n101", gc(&name_of(101), &["bob"])).await.0, ErrorCode::BadRequest, "101 chars");
    assert_eq!(alice.request_err("zed", gc("g", &["bob", "zed"])).await.0, ErrorCode::UnknownUser, "an unknown member");
    assert_eq!(alice.request_err("bad", gc("g", &["bob", "Not An Id"])).await.0, ErrorCode::UnknownUser, "an invalid member id");

    // 100 chars (not bytes) is fine; duplicate ids (the creator included) are collapsed.
    let name = name_of(100);
    assert!(name.len() > 100, "the name has multi-byte chars");
    let g = alice.create_group(&name, &["bob", "carol", "bob", "alice"]).await;
    let hex = g.strip_prefix("g:").expect("g:<id>");
    assert!(hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{g}");
    // ev 1 of each member: nothing came from the refused creations.
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob), ("carol", &mut carol)] {
        group_event(c, who, 1, &g, Created, &["alice", "bob", "carol"], "alice").await;
    }
    let info = (name.clone(), users(&["alice", "bob", "carol"]), users(&["alice"]));
    assert_eq!(bob.group_info(&g).await, info, "the creator is the first admin");
    let groups = alice.request("convs", ClientFrame::Conversations).await;
    let ServerFrame::Conversations { items, .. } = groups else { panic!("{groups:?}") };
    assert_eq!(items.iter().map(|i| i.conv.as_str()).collect::<Vec<_>>(), [g.as_str()], "one group was created");

    // Only admins add and remove; a non-member learns nothing.
    assert_eq!(dave.request_err("i", ClientFrame::GroupInfo { group: g.clone() }).await.0, ErrorCode::NotMember);
    assert_eq!(dave.request_err("a", ClientFrame::GroupAdd { group: g.clone(), users: users(&["dave"]) }).await.0, ErrorCode::NotMember);
    assert_eq!(bob.request_err("a", ClientFrame::GroupAdd { group: g.clone(), users: users(&["dave"]) }).await.0, ErrorCode::NotAdmin);
    assert_eq!(bob.request_err("r", ClientFrame::GroupRemove { group: g.clone(), users: users(&["carol"]) }).await.0, ErrorCode::NotAdmin);
    assert_eq!(carol.group_info(&g).await, info, "refused requests changed the group");

    // Adds, one request each (dave joins before erin): every member hears, the new one included.
    ok(&mut alice, "add-dave", ClientFrame::GroupAdd { group: g.clone(), users: users(&["dave"]) }).await;
    for (who, c, ev) in [("alice", &mut alice, 2), ("bob", &mut bob, 2), ("carol", &mut carol, 2), ("dave", &mut dave, 1)] {
        group_event(c, who, ev, &g, Added, &["dave"], "alice").await;
    }
    ok(&mut alice, "add-erin", ClientFrame::GroupAdd { group: g.clone(), users: users(&["erin"]) }).await;
    for (who, c, ev) in [("alice", &mut alice, 3), ("bob", &mut bob, 3), ("carol", &mut carol, 3), ("dave", &mut dave, 2), ("erin", &mut erin, 1)] {
        group_event(c, who, ev, &g, Added, &["erin"], "alice").await;
    }

    // A removal reaches everyone who was a member, the removed one included.
    ok(&mut alice, "rm-bob", ClientFrame::GroupRemove { group: g.clone(), users: users(&["bob"]) }).await;
    for (who, c, ev) in [("alice", &mut alice, 4), ("bob", &mut bob, 4), ("carol", &mut carol, 4), ("dave", &mut dave, 3), ("erin", &mut erin, 2)] {
        group_event(c, who, ev, &g, Removed, &["bob"], "alice").await;
    }
    assert_eq!(bob.request_err("i", ClientFrame::GroupInfo { group: g.clone() }).await.0, ErrorCode::NotMember);

    // The last admin leaves: the longest-standing member (carol, there since the creation)
    // becomes admin.
    ok(&mut alice, "leave-alice", ClientFrame::GroupLeave { group: g.clone() }).await;
    for (who, c, ev) in [("alice", &mut alice, 5), ("carol", &mut carol, 5), ("dave", &mut dave, 4), ("erin", &mut erin, 3)] {
        group_event(c, who, ev, &g, Left, &["alice"], "alice").await;
    }
    assert_eq!(dave.group_info(&g).await, (name.clone(), users(&["carol", "dave", "erin"]), users(&["carol"])));
    assert_eq!(alice.request_err("i", ClientFrame::GroupInfo { group: g.clone() }).await.0, ErrorCode::NotMember);
    assert_eq!(alice.request_err("l", ClientFrame::GroupLeave { group: g.clone() }).await.0, ErrorCode::NotMember);

    // The new admin re-adds bob, then leaves: dave (added before erin, long before bob's return)
    // becomes admin.
    ok(&mut carol, "add-bob", ClientFrame::GroupAdd { group: g.clone(), users: users(&["bob"]) }).await;
    for (who, c, ev) in [("bob", &mut bob, 5), ("carol", &mut carol, 6), ("dave", &mut dave, 5), ("erin", &mut erin, 4)] {
        group_event(c, who, ev, &g, Added, &["bob"], "carol").await;
    }
    ok(&mut carol, "leave-carol", ClientFrame::GroupLeave { group: g.clone() }).await;
    for (who, c, ev) in [("bob", &mut bob, 6), ("carol", &mut carol, 7), ("dave", &mut dave, 6), ("erin", &mut erin, 5)] {
        group_event(c, who, ev, &g, Left, &["carol"], "carol").await;
    }
    assert_eq!(erin.group_info(&g).await, (name, users(&["bob", "dave", "erin"]), users(&["dave"])));
    assert_eq!(erin.request_err("a", ClientFrame::GroupAdd { group: g.clone(), users: users(&["alice"]) }).await.0, ErrorCode::NotAdmin);

    // Those who left get nothing more: a group message, then a dm to each as the barrier.
    let t = dialog(22, 3);
    dave.send_acked("g1", &g, &t[0]).await;
    dave.send_acked("to-alice", "alice", &t[1]).await;
    dave.send_acked("to-carol", "carol", &t[2]).await;
    for (who, c, ev) in [("alice", &mut alice, 6), ("carol", &mut carol, 8)] {
        let (e, m) = c.message_event().await;
        assert_eq!((e, m.id.as_str()), (ev, format!("to-{who}").as_str()), "{who} got a message of a group it left");
    }
    for (who, c, ev) in [("bob", &mut bob, 7), ("erin", &mut erin, 6)] {
        let (e, m) = c.message_event().await;
        assert_eq!((e, m.id.as_str()), (ev, "g1"), "{who}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_reach_online_members_live_and_offline_members_in_their_backlog() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a_web = srv.user("alice").await;
    let a_phone = srv.login("alice", "phone").await;
    let mut aw = srv.connect(&a_web, None).await.client;
    let mut ap = srv.connect(&a_phone, None).await.client;
    let names: Vec<String> = (1..=7).map(|i| format!("m{i}")).collect();
    let mut tokens = Vec::new();
    for n in &names {
        tokens.push(srv.user(n).await);
    }
    // m1..m3 online, m4..m7 offline.
    let mut online = Vec::new();
    for tok in &tokens[..3] {
        online.push(srv.connect(tok, None).await.client);
    }
    let member_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let g = aw.create_group("eight", &member_refs).await;
    let mut all: Vec<&str> = vec!["alice"];
    all.extend(member_refs.iter().copied());

    // alice (web) and m1 take turns: five messages, each acked before the next.
    let t = dialog(23, 5);
    let mut sent = Vec::new();
    for (k, body) in t.iter().enumerate() {
        let id = format!("g{}", k + 1);
        let (from, c) = if k % 2 == 0 { ("alice", &mut aw) } else { ("m1", &mut online[0]) };
        let (conv, seq, ts) = c.send_acked(&id, &g, body).await;
        assert_eq!((conv.as_str(), seq), (g.as_str(), k as u64 + 1));
        sent.push(MessageView { conv, seq, id, from: from.to_owned(), body: body.clone(), ts });
    }

    // Live: the created event then the five in order, on every online device, alice's own
    // devices included (her phone gets a copy of what her web device sent).
    let mut devices: Vec<(String, &mut Client)> = vec![("alice/web".into(), &mut aw), ("alice/phone".into(), &mut ap)];
    for (i, c) in online.iter_mut().enumerate() {
        devices.push((format!("m{}", i + 1), c));
    }
    for (who, c) in devices {
        group_event(c, &who, 1, &g, Created, &all, "alice").await;
        for (k, want) in sent.iter().enumerate() {
            let (ev, m) = c.message_event().await;
            assert_eq!((ev, &m), (k as u64 + 2, want), "{who}");
        }
    }
    // Offline: the same six events, in order, before `synced`.
    for (i, tok) in tokens[3..].iter().enumerate() {
        let s = srv.connect(tok, None).await;
        assert_eq!(s.head, 6, "m{}", i + 4);
        let EventPayload::Group(v) = &s.backlog[0].1 else { panic!("m{}: {:?}", i + 4, s.backlog[0]) };
        assert_eq!((v.action, v.users.len()), (Created, 8));
        let ms: Vec<MessageView> = s.messages().into_iter().map(|(_, m)| m).collect();
        assert_eq!(ms, sent, "m{}'s backlog", i + 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_sees_the_group_only_while_it_is_in_it() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob, mut carol, mut dave] = srv.clients(["alice", "bob", "carol", "dave"]).await;
    let c_phone = srv.login("carol", "phone").await;
    let t = dialog(24, 8);
    let g = alice.create_group("isolation", &["bob", "carol"]).await;

    // g1, g2; dave joins; g3; carol is removed; g4, g5.
    alice.send_acked("g1", &g, &t[0]).await;
    bob.send_acked("g2", &g, &t[1]).await;
    ok(&mut alice, "add-dave", ClientFrame::GroupAdd { group: g.clone(), users: users(&["dave"]) }).await;
    carol.send_acked("g3", &g, &t[2]).await;
    ok(&mut alice, "rm-carol", ClientFrame::GroupRemove { group: g.clone(), users: users(&["carol"]) }).await;
    alice.send_acked("g4", &g, &t[3]).await;
    bob.send_acked("g5", &g, &t[4]).await;

    // carol's stream ends with her removal; the next thing she gets is a dm (the barrier).
    let kinds: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            let (_, p) = carol.event().await;
            v.push(match p {
                EventPayload::Message(m) => m.id,
                EventPayload::Group(gv) => format!("{:?}", gv.action),
                p => panic!("{p:?}"),
            });
        }
        v
    };
    assert_eq!(kinds, ["Created", "g1", "g2", "Added", "g3", "Removed"]);
    alice.send_acked("dm", "carol", &t[5]).await;
    let (ev, m) = carol.message_event().await;
    assert_eq!((ev, m.id.as_str()), (7, "dm"), "carol got a group message after her removal");

    // She can no longer send, type or read there.
    carol.send_msg("late", &g, &t[6]).await;
    let err = carol
        .until("the error of late", |f| match f {
            ServerFrame::Error { id: Some(i), code, .. } if i == "late" => Some(*code),
            ServerFrame::Ack { id, seq, .. } if id == "late" => panic!("a removed member's send was accepted as seq {seq}"),
            _ => None,
        })
        .await;
    assert_eq!(err, ErrorCode::NotMember, "a removed member's send");
    let typing = ClientFrame::Typing { conv: g.clone(), state: parley::protocol::TypingState::Composing };
    assert_eq!(carol.request_err("ty", typing).await.0, ErrorCode::NotMember);

    // Her history is what she saw: g1..g3, and her list keeps the group at g3.
    let h = carol.history_all(&g).await;
    assert_eq!(h.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["g1", "g2", "g3"]);
    match carol.request("p", ClientFrame::History { conv: g.clone(), before: Some(3), limit: Some(1) }).await {
        ServerFrame::History { messages, more, .. } => {
            assert_eq!((messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), more), (vec!["g2"], true))
        }
        f => panic!("{f:?}"),
    }
    let ServerFrame::Conversations { items, .. } = carol.request("c", ClientFrame::Conversations).await else { panic!() };
    let it = items.iter().find(|i| i.conv == g).expect("the group stays in carol's list");
    assert_eq!((it.last_seq, it.last.as_ref().map(|m| m.id.as_str())), (3, Some("g3")));
    // A device of hers that was never online gets the same in its backlog: nothing after g3.
    let s = srv.connect(&c_phone, Some(0)).await;
    let seen: Vec<String> = s.messages().into_iter().map(|(_, m)| m.id).collect();
    assert_eq!(seen, ["g1", "g2", "g3", "dm"]);

    let it = items.iter().find(|i| i.conv == g).expect("listed");
    assert_eq!((it.read_seq, it.unread), (0, 2), "carol's unread: g1 and g2 (g3 is hers)");

    // dave, added after g2, sees g3..g5 only: `more` turns false at his join.
    assert_eq!(page(&mut dave, &g, None, 50).await, (ids(&["g3", "g4", "g5"]), false));
    assert_eq!(page(&mut dave, &g, None, 2).await, (ids(&["g4", "g5"]), true));
    assert_eq!(page(&mut dave, &g, Some(4), 5).await, (ids(&["g3"]), false));
    assert_eq!(page(&mut dave, &g, Some(3), 5).await, (ids(&[]), false));
    let ServerFrame::Conversations { items, .. } = dave.request("c", ClientFrame::Conversations).await else { panic!() };
    let it = items.iter().find(|i| i.conv == g).expect("listed");
    assert_eq!((it.last_seq, it.last.as_ref().map(|m| m.id.as_str())), (5, Some("g5")));
    // Consistent with what he may see: unread counts g3..g5 (others' messages after read_seq).
    assert_eq!((it.read_seq, it.unread), (2, 3), "dave's read_seq and unread");
}

fn ids(v: &[&str]) -> Vec<String> {
    users(v)
}

/// One `history` page of `conv` as (message ids, more).
async fn page(c: &mut Client, conv: &str, before: Option<u64>, limit: u64) -> (Vec<String>, bool) {
    match c.request("page", ClientFrame::History { conv: conv.to_owned(), before, limit: Some(limit) }).await {
        ServerFrame::History { messages, more, .. } => (messages.into_iter().map(|m| m.id).collect(), more),
        f => panic!("history of {conv} before {before:?}: {f:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_in_a_group_are_per_member() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut bob, mut carol, mut dave] = srv.clients(["alice", "bob", "carol", "dave"]).await;
    let t = dialog(25, 4);
    let g = alice.create_group("receipts", &["bob", "carol", "dave"]).await;
    alice.send_acked("g1", &g, &t[0]).await;
    alice.send_acked("g2", &g, &t[1]).await;
    for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let evs: Vec<(u64, &str)> = [c.event().await, c.event().await, c.event().await].iter().map(|(e, p)| (*e, p.kind())).collect();
        assert_eq!(evs, [(1, "group"), (2, "message"), (3, "message")]);
    }
    use ReceiptStatus::{Delivered, Read};

    // bob confirms: delivered by bob. dave reads g1 only: read by dave. carol does nothing yet.
    bob.send(ClientFrame::Received { up_to: 3 }).await;
    assert_eq!(alice.event().await, (4, receipt(&g, "bob", Delivered, 2)));
    dave.send(ClientFrame::Read { conv: g.clone(), seq: 1 }).await;
    assert_eq!(alice.event().await, (5, receipt(&g, "dave", Read, 1)));

    // bob sends g3; carol confirms all three: each sender gets a receipt by carol.
    bob.send_acked("g3", &g, &t[2]).await;
    assert_eq!(alice.message_event().await.0, 6);
    assert_eq!(carol.message_event().await.0, 4);
    carol.send(ClientFrame::Received { up_to: 4 }).await;
    assert_eq!(alice.event().await, (7, receipt(&g, "carol", Delivered, 3)));
    let bob_evs: Vec<(u64, EventPayload)> = vec![bob.event().await, bob.event().await];
    assert_eq!(bob_evs[0].0, 4, "bob's own g3");
    assert_eq!(bob_evs[1], (5, receipt(&g, "carol", Delivered, 3)), "bob's receipt for his g3");

    // Nothing else: no receipt by a member that did not confirm, none to bob for dave's read of
    // g1 (not his). The next events are g4.
    alice.send_acked("g4", &g, &t[3]).await;
    assert_eq!(alice.message_event().await.0, 8, "an unexpected receipt in alice's stream");
    assert_eq!(bob.message_event().await.0, 6, "an unexpected receipt in bob's stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_capped_at_the_configured_size() {
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__LIMITS__GROUP_MAX_MEMBERS", "5")]).await;
    let a = srv.user("alice").await;
    for u in ["u1", "u2", "u3", "u4", "u5"] {
        srv.register(u).await;
    }
    let mut alice = srv.connect(&a, None).await.client;
    let gc = |members: &[&str]| ClientFrame::GroupCreate { name: "cap".into(), members: users(members) };

    // Five members, the creator included, duplicates not counted.
    let full = alice.create_group("cap", &["u1", "u2", "u3", "u4", "u4"]).await;
    assert_eq!(alice.group_info(&full).await.1.len(), 5);
    assert_eq!(alice.request_err("six", gc(&["u1", "u2", "u3", "u4", "u5"])).await.0, ErrorCode::TooLarge);
    assert_eq!(
        alice.request_err("add", ClientFrame::GroupAdd { group: full.clone(), users: users(&["u5"]) }).await.0,
        ErrorCode::TooLarge
    );
    assert_eq!(alice.group_info(&full).await.1.len(), 5, "a refused add changed the group");
    // Adding to four: two is one too many, one fits.
    let four = alice.create_group("cap", &["u1", "u2", "u3"]).await;
    assert_eq!(
        alice.request_err("add2", ClientFrame::GroupAdd { group: four.clone(), users: users(&["u4", "u5"]) }).await.0,
        ErrorCode::TooLarge
    );
    ok(&mut alice, "add1", ClientFrame::GroupAdd { group: four.clone(), users: users(&["u5"]) }).await;
    assert_eq!(alice.group_info(&four).await.1, users(&["alice", "u1", "u2", "u3", "u5"]));
    // Two groups were created, and nothing else.
    let ServerFrame::Conversations { items, .. } = alice.request("c", ClientFrame::Conversations).await else { panic!() };
    let mut convs: Vec<String> = items.into_iter().map(|i| i.conv).collect();
    convs.sort();
    let mut want = vec![full, four];
    want.sort();
    assert_eq!(convs, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_capped_at_1024_members_by_default() {
    let dir = TestDir::new();
    // The smallest argon2 memory cost: 1,025 registrations stay cheap in a debug build.
    let srv = Server::start_with(&dir, &[("PARLEY__AUTH__ARGON2_MEMORY_KIB", "8")]).await;
    let a = srv.user("alice").await;
    let names: Vec<String> = (0..1024).map(|i| format!("u{i:04}")).collect();
    for chunk in names.chunks(32) {
        futures_util::future::join_all(chunk.iter().map(|n| srv.register(n))).await;
    }
    let mut alice = srv.connect(&a, None).await.client;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();

    let (fits, over) = (&refs[..1023], &refs[..1024]);
    let gc = ClientFrame::GroupCreate { name: "over".into(), members: users(over) };
    assert_eq!(alice.request_err("over", gc).await.0, ErrorCode::TooLarge, "1,025 members");
    // Too many names is refused as too many before any name is looked up.
    let strangers: Vec<String> = (0..1100).map(|i| format!("nobody{i}")).collect();
    let gc = ClientFrame::GroupCreate { name: "over".into(), members: strangers };
    assert_eq!(alice.request_err("strangers", gc).await.0, ErrorCode::TooLarge, "1,100 unregistered names");
    let g = alice.create_group("full", fits).await;
    assert_eq!(alice.group_info(&g).await.1.len(), 1024);
    let add = ClientFrame::GroupAdd { group: g.clone(), users: users(&[refs[1023]]) };
    assert_eq!(alice.request_err("add", add).await.0, ErrorCode::TooLarge, "the 1,025th member");
    let (ev, p) = alice.event().await;
    let EventPayload::Group(v) = p else { panic!("{p:?}") };
    assert_eq!((ev, v.action, v.users.len()), (1, Created, 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_can_mark_what_it_saw_as_read() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let [mut alice, mut carol] = srv.clients(["alice", "carol"]).await;
    let t = dialog(26, 2);
    let g = alice.create_group("left unread", &["carol"]).await;
    alice.send_acked("g1", &g, &t[0]).await;
    alice.send_acked("g2", &g, &t[1]).await;
    ok(&mut alice, "rm", ClientFrame::GroupRemove { group: g.clone(), users: users(&["carol"]) }).await;
    for _ in 0..4 {
        carol.event().await; // created, g1, g2, removed
    }

    // The group stays in carol's list with the history she saw (PROTOCOL.md §4.7), unread 2.
    let item = |items: Vec<parley::protocol::ConversationItem>| items.into_iter().find(|i| i.conv == g).map(|i| (i.last_seq, i.read_seq, i.unread));
    let ServerFrame::Conversations { items, .. } = carol.request("c1", ClientFrame::Conversations).await else { panic!() };
    assert_eq!(item(items), Some((2, 0, 2)));
    // Reading it is reading what she was allowed to see, as `history` lets her.
    carol.send_rid("read", ClientFrame::Read { conv: g.clone(), seq: 2 }).await;
    let ServerFrame::Conversations { items, .. } = carol.request("c2", ClientFrame::Conversations).await else { panic!() };
    let errors = carol.take_stash();
    assert!(errors.iter().all(|f| !matches!(f, ServerFrame::Error { .. })), "read of what she saw: {errors:?}");
    assert_eq!(item(items), Some((2, 2, 0)), "reading a group she left clears its unread count");
}
