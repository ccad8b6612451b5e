//! apply checked against a simple in-memory model (proptest), and replay determinism.
//!
//! The model knows users, one group, conversations (seq → message) and which messages each user's
//! stream must carry, in order. After random batches of commands it checks: seqs gapless and equal
//! to the model's; each user's events gapless 1..head, its message events exactly the model's in
//! order; dedup answers the original seq; cursors monotone, clamped to the head; receipts never go
//! backwards. Then it replays the same entries into a fresh state, and into one that is closed and
//! reopened halfway (a crash between entries), and compares every tree byte for byte.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::records::{Command, LogEntry};
use super::state::{Outcome, Refusal, State};
use crate::protocol::{EventPayload, ReceiptStatus};

const USERS: [&str; 3] = ["u0", "u1", "u2"];
const DEVICES: [&str; 2] = ["d0", "d1"];
const GROUP: &str = "grp";

#[derive(Debug, Clone)]
enum Op {
    Send { from: usize, to: usize, id: u8, body: String },
    SendGroup { from: usize, id: u8, body: String },
    Received { user: usize, device: usize, up_to: u64 },
    Read { user: usize, other: usize, seq: u64 },
    Add { by: usize, user: usize },
    Remove { by: usize, user: usize },
    Leave { user: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let u = 0..USERS.len();
    prop_oneof![
        4 => (u.clone(), u.clone(), 0u8..12, "[a-zé😀 ]{1,12}").prop_map(|(from, to, id, body)| Op::Send { from, to, id, body }),
        2 => (u.clone(), 0u8..12, "[a-z]{1,8}").prop_map(|(from, id, body)| Op::SendGroup { from, id, body }),
        2 => (u.clone(), 0..DEVICES.len(), 0u64..40).prop_map(|(user, device, up_to)| Op::Received { user, device, up_to }),
        2 => (u.clone(), u.clone(), 0u64..12).prop_map(|(user, other, seq)| Op::Read { user, other, seq }),
        1 => (u.clone(), u.clone()).prop_map(|(by, user)| Op::Add { by, user }),
        1 => (u.clone(), u.clone()).prop_map(|(by, user)| Op::Remove { by, user }),
        1 => u.prop_map(|user| Op::Leave { user }),
    ]
}

fn dm(a: &str, b: &str) -> String {
    if a <= b { format!("dm:{a}:{b}") } else { format!("dm:{b}:{a}") }
}

#[derive(Default)]
struct Model {
    /// conv → (from, id, body) by seq-1.
    convs: BTreeMap<String, Vec<(String, String, String)>>,
    dedup: HashMap<(String, String), (String, u64)>,
    /// user → message events (conv, seq) in stream order.
    streams: HashMap<String, Vec<(String, u64)>>,
    /// Group members, admins.
    members: Vec<(String, bool)>,
}

impl Model {
    fn is_member(&self, u: &str) -> bool {
        self.members.iter().any(|(m, _)| m == u)
    }

    fn drop_member(&mut self, u: &str) {
        self.members.retain(|(m, _)| m != u);
        if !self.members.is_empty() && !self.members.iter().any(|(_, a)| *a) {
            self.members[0].1 = true;
        }
    }

    /// The command for `op` and the outcome the model expects (None: don't check).
    fn step(&mut self, op: &Op) -> (Command, Option<Outcome>) {
        match op {
            Op::Send { from, id, body, .. } | Op::SendGroup { from, id, body } => {
                let from = USERS[*from];
                let (conv, members): (String, Vec<String>) = match op {
                    Op::Send { to, .. } => {
                        let to = USERS[*to];
                        let m = if from == to { vec![from.to_owned()] } else { vec![from.to_owned(), to.to_owned()] };
                        (dm(from, to), m)
                    }
                    _ => (format!("g:{GROUP}"), self.members.iter().map(|(m, _)| m.clone()).collect()),
                };
                let id = format!("m{id}");
                let cmd = Command::Send { from: from.into(), device: "d0".into(), id: id.clone(), conv: conv.clone(), body: body.clone() };
                if let Some((c, seq)) = self.dedup.get(&(from.to_owned(), id.clone())) {
                    return (cmd, Some(Outcome::Sent { conv: c.clone(), seq: *seq, ts: 0, duplicate: true }));
                }
                if conv.starts_with("g:") && !self.is_member(from) {
                    return (cmd, Some(Outcome::Refused(Refusal::NotMember)));
                }
                let msgs = self.convs.entry(conv.clone()).or_default();
                msgs.push((from.to_owned(), id.clone(), body.clone()));
                let seq = msgs.len() as u64;
                self.dedup.insert((from.to_owned(), id), (conv.clone(), seq));
                for m in members {
                    self.streams.entry(m).or_default().push((conv.clone(), seq));
                }
                (cmd, Some(Outcome::Sent { conv, seq, ts: 0, duplicate: false }))
            }
            Op::Received { user, device, up_to } => {
                (Command::Received { user: USERS[*user].into(), device: DEVICES[*device].into(), up_to: *up_to }, Some(Outcome::Done))
            }
            Op::Read { user, other, seq } => {
                (Command::Read { user: USERS[*user].into(), conv: dm(USERS[*user], USERS[*other]), seq: *seq }, None)
            }
            Op::Add { by, user } => {
                let (by, user) = (USERS[*by], USERS[*user]);
                let cmd = Command::GroupAdd { group: GROUP.into(), by: by.into(), users: vec![user.into()], cap: 1024 };
                let expect = match self.members.iter().find(|(m, _)| m == by) {
                    None => Outcome::Refused(Refusal::NotMember),
                    Some((_, false)) => Outcome::Refused(Refusal::NotAdmin),
                    Some(_) => {
                        if !self.is_member(user) {
                            self.members.push((user.to_owned(), false));
                        }
                        Outcome::Done
                    }
                };
                (cmd, Some(expect))
            }
            Op::Remove { by, user } => {
                let (by, user) = (USERS[*by], USERS[*user]);
                let cmd = Command::GroupRemove { group: GROUP.into(), by: by.into(), users: vec![user.into()] };
                let expect = match self.members.iter().find(|(m, _)| m == by) {
                    None => Outcome::Refused(Refusal::NotMember),
                    Some((_, false)) => Outcome::Refused(Refusal::NotAdmin),
                    Some(_) => {
                        self.drop_member(user);
                        Outcome::Done
                    }
                };
                (cmd, Some(expect))
            }
            Op::Leave { user } => {
                let user = USERS[*user];
                let cmd = Command::GroupLeave { group: GROUP.into(), by: user.into() };
                if self.is_member(user) {
                    self.drop_member(user);
                    (cmd, Some(Outcome::Done))
                } else {
                    (cmd, Some(Outcome::Refused(Refusal::NotMember)))
                }
            }
        }
    }
}

fn dump(s: &State) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    s.dump().unwrap()
}

/// Reopens a state just dropped: sled releases its file lock from its flusher thread shortly
/// after the drop, so wait for that (bounded) instead of failing.
fn reopen(path: &std::path::Path) -> State {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match State::open(path, 8 << 20) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

fn run(batches: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(&dir.path().join("a"), 8 << 20).unwrap();
    let mut model = Model::default();
    let mut entries = Vec::new();
    let mut ts = 1_000;
    // Setup: every user, and the group with u0 (admin) and u1.
    let mut setup: Vec<Command> =
        USERS.iter().map(|u| Command::Register { user: (*u).into(), password_hash: "x".into() }).collect();
    setup.push(Command::GroupCreate { group: GROUP.into(), by: "u0".into(), name: "g".into(), members: vec!["u1".into()], cap: 1024 });
    model.members = vec![("u0".into(), true), ("u1".into(), false)];
    entries.push(LogEntry { ts, commands: setup });
    state.apply(1, &entries[0]).unwrap();

    let mut cursors: HashMap<(usize, usize), u64> = HashMap::new();
    for ops in batches {
        ts += 7;
        let heads: Vec<u64> = USERS.iter().map(|u| state.head(u).unwrap()).collect();
        let mut cmds = Vec::new();
        let mut expects = Vec::new();
        for op in &ops {
            let (c, e) = model.step(op);
            cmds.push(c);
            expects.push(e);
        }
        let entry = LogEntry { ts, commands: cmds };
        let index = entries.len() as u64 + 1;
        let (outcomes, _effects) = state.apply(index, &entry).unwrap();
        entries.push(entry);
        for ((o, e), op) in outcomes.iter().zip(&expects).zip(&ops) {
            if let Some(e) = e {
                match (o, e) {
                    (Outcome::Sent { conv, seq, duplicate, .. }, Outcome::Sent { conv: c2, seq: s2, duplicate: d2, .. }) => {
                        prop_assert_eq!((conv, seq, duplicate), (c2, s2, d2), "{:?}", op)
                    }
                    _ => prop_assert_eq!(o, e, "{:?}", op),
                }
            }
        }
        // Cursors: monotone, clamped to the head as it was before the batch at least.
        for op in &ops {
            if let Op::Received { user, device, up_to } = op {
                let c = cursors.entry((*user, *device)).or_default();
                if *up_to <= heads[*user] {
                    *c = (*c).max(*up_to);
                }
            }
        }
        for ((u, d), want_at_least) in &cursors {
            let got = state.cursor(USERS[*u], DEVICES[*d]).unwrap();
            prop_assert!(got >= *want_at_least && got <= state.head(USERS[*u]).unwrap());
        }
    }

    // Conversations: gapless, identical to the model.
    for (conv, msgs) in &model.convs {
        let from = msgs[0].0.clone();
        let c = crate::protocol::Conv::parse(conv).unwrap();
        // Read as the group's creator (never removed from what it could see? it may be): use the
        // stored records directly through a member's history where possible.
        let page = match state.history(&from, &c, None, 200).unwrap() {
            Ok(p) => p.messages,
            Err(_) => continue,
        };
        let seqs: Vec<u64> = page.iter().map(|m| m.seq).collect();
        prop_assert_eq!(seqs.windows(2).all(|w| w[1] == w[0] + 1), true);
        for m in &page {
            let (f, id, body) = &msgs[m.seq as usize - 1];
            prop_assert_eq!((&m.from, &m.id, &m.body), (f, id, body));
        }
    }
    // Streams: gapless; message events exactly the model's; receipts never backwards.
    for u in USERS {
        let head = state.head(u).unwrap();
        let evs = state.events(u, 0, head, usize::MAX).unwrap();
        prop_assert_eq!(evs.iter().map(|(e, _)| *e).collect::<Vec<_>>(), (1..=head).collect::<Vec<_>>());
        let msgs: Vec<(String, u64)> = evs
            .iter()
            .filter_map(|(_, p)| match p {
                EventPayload::Message(m) => Some((m.conv.clone(), m.seq)),
                _ => None,
            })
            .collect();
        let want = model.streams.get(u).cloned().unwrap_or_default();
        prop_assert_eq!(&msgs, &want);
        let mut last: BTreeMap<(String, String, ReceiptStatus), u64> = BTreeMap::new();
        for (_, p) in &evs {
            if let EventPayload::Receipt(r) = p {
                let k = (r.conv.clone(), r.by.clone(), r.status);
                let prev = last.insert(k, r.up_to).unwrap_or(0);
                prop_assert!(r.up_to > prev, "receipt went backwards: {:?}", r);
            }
        }
    }

    // Determinism: the same entries give the same bytes, also across a crash: materialized
    // halfway, then more entries applied in memory only, then a crash loses those; reopening
    // finds the halfway state in sled and replaying the rest gives the same bytes.
    let b = State::open(&dir.path().join("b"), 8 << 20).unwrap();
    let half = entries.len() / 2;
    for (i, e) in entries.iter().enumerate().take(half) {
        b.apply(i as u64 + 1, e).unwrap();
    }
    prop_assert_eq!(b.materialize().unwrap(), half as u64);
    for (i, e) in entries.iter().enumerate().skip(half).take((entries.len() - half) / 2) {
        b.apply(i as u64 + 1, e).unwrap();
    }
    b.crash();
    let b = reopen(&dir.path().join("b"));
    prop_assert_eq!(b.applied(), half as u64);
    for (i, e) in entries.iter().enumerate().skip(half) {
        b.apply(i as u64 + 1, e).unwrap();
    }
    // And a clean close keeps everything applied.
    drop(b);
    let b = reopen(&dir.path().join("b"));
    prop_assert_eq!(b.applied(), entries.len() as u64);
    prop_assert!(dump(&state) == dump(&b), "replay is not byte-identical");
    prop_assert_eq!(state.check_invariants().unwrap(), Vec::<String>::new());
    // A snapshot restores the same bytes: halfway (then the rest replayed), and at the end.
    let snaps = dir.path().join("snapshots");
    let (file, _) = b.snapshot(&snaps).unwrap();
    prop_assert_eq!(file.index, entries.len() as u64);
    prop_assert_eq!(State::restore_snapshot(&dir.path().join("c"), &file.path).unwrap(), entries.len() as u64);
    let c = reopen(&dir.path().join("c"));
    prop_assert!(dump(&state) == dump(&c), "a restored snapshot is not byte-identical");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn apply_matches_model_and_replays_identically(batches in proptest::collection::vec(proptest::collection::vec(op(), 1..8), 1..25)) {
        run(batches)?;
    }
}

#[test]
fn out_of_order_apply_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path(), 1 << 20).unwrap();
    let e = LogEntry { ts: 1, commands: vec![] };
    assert!(s.apply(2, &e).is_err());
    assert!(s.apply(1, &e).is_ok());
    assert!(s.apply(1, &e).is_err());
}

mod admin_and_retention {
    use super::super::records::{Command, LogEntry, PurgePolicy};
    use super::super::state::{Outcome, Refusal, State};
    use crate::protocol::{Conv, EventPayload};

    struct T {
        s: State,
        index: u64,
        _dir: tempfile::TempDir,
    }

    impl T {
        fn new() -> T {
            let dir = tempfile::tempdir().unwrap();
            T { s: State::open(dir.path(), 1 << 20).unwrap(), index: 0, _dir: dir }
        }
        fn run(&mut self, ts: u64, commands: Vec<Command>) -> Vec<Outcome> {
            self.index += 1;
            self.s.apply(self.index, &LogEntry { ts, commands }).unwrap().0
        }
        fn send(&mut self, ts: u64, from: &str, conv: &str, id: &str) -> Outcome {
            let c = Command::Send { from: from.into(), device: "d".into(), id: id.into(), conv: conv.into(), body: format!("body {id}") };
            self.run(ts, vec![c]).remove(0)
        }
        fn setup(&mut self, users: &[&str]) {
            let mut c: Vec<Command> = users.iter().map(|u| Command::Register { user: (*u).into(), password_hash: "h".into() }).collect();
            c.extend(users.iter().map(|u| Command::Login { token_hash: [u.as_bytes()[0]; 32], user: (*u).into(), device: "d".into() }));
            self.run(1, c);
        }
    }

    /// A send in an existing dm writes 6 keys: the conversation's meta, the message, the
    /// sender's dedup record, an event per member, and the sender's conversation state (its own
    /// messages after its read marker). No head is written (a head is the key of the user's last
    /// event), and no recipient's state (an unread count follows from the last seq). Each key
    /// written is a key the materializer inserts into sled.
    #[test]
    fn a_send_writes_only_what_changes() {
        let mut t = T::new();
        t.setup(&["a", "b"]);
        t.send(100, "a", "dm:a:b", "m1");
        t.s.materialize().unwrap();
        assert_eq!(t.s.dirty_keys(), 0);
        t.send(101, "a", "dm:a:b", "m2");
        assert_eq!(t.s.dirty_keys(), 6);
        assert_eq!((t.s.head("a").unwrap(), t.s.head("b").unwrap()), (2, 2));
        let items = t.s.conversations("a").unwrap();
        assert_eq!((items.len(), items[0].last_seq, items[0].unread), (1, 2, 0), "the sender's list still shows the new message");
        assert_eq!(t.s.conversations("b").unwrap()[0].unread, 2);
    }

    /// A message to a group of 5 writes the meta, the message, the dedup record, 5 events and
    /// the sender's state: 9 keys, not 4 more for the other members' unread counts; those
    /// counts still rise, the sender's does not, and a read marker brings one back to 0.
    #[test]
    fn a_group_message_writes_only_its_senders_state() {
        let mut t = T::new();
        let users = ["a", "b", "c", "d", "e"];
        t.setup(&users);
        let members: Vec<String> = users[1..].iter().map(|u| (*u).to_owned()).collect();
        let create = Command::GroupCreate { group: "g1".into(), by: "a".into(), name: "five".into(), members, cap: 16 };
        assert!(matches!(t.run(100, vec![create])[..], [Outcome::GroupCreated { .. }]));
        t.send(101, "a", "g:g1", "m1");
        t.s.materialize().unwrap();
        t.send(102, "a", "g:g1", "m2");
        assert_eq!(t.s.dirty_keys(), 9);
        t.send(103, "b", "g:g1", "m3");
        let unread = |t: &T, u: &str| t.s.conversations(u).unwrap()[0].unread;
        assert_eq!(users.map(|u| unread(&t, u)), [1, 2, 3, 3, 3]);
        t.run(104, vec![Command::Read { user: "c".into(), conv: "g:g1".into(), seq: 2 }]);
        t.run(105, vec![Command::Read { user: "b".into(), conv: "g:g1".into(), seq: 3 }]);
        assert_eq!(users.map(|u| unread(&t, u)), [1, 0, 1, 3, 3]);
    }

    #[test]
    fn purge_before_deletes_old_messages_in_small_entries() {
        let mut t = T::new();
        t.setup(&["a", "b"]);
        for i in 0..10 {
            t.send(100 + i, "a", "dm:a:b", &format!("m{i}"));
        }
        // Delete messages older than ts 105 (seqs 1-5), at most 2 per entry.
        let mut from = String::new();
        let mut entries = 0;
        loop {
            let o = t.run(200, vec![Command::Purge { policy: PurgePolicy::Before { ts: 105 }, max: 2, from: from.clone() }]).remove(0);
            entries += 1;
            match o {
                Outcome::Purged { next: Some(n), .. } => from = n,
                Outcome::Purged { next: None, .. } => break,
                o => panic!("{o:?}"),
            }
        }
        assert!(entries >= 3, "bounded work per entry");
        let conv = Conv::parse("dm:a:b").unwrap();
        let page = t.s.history("b", &conv, None, 200).unwrap().unwrap();
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (6..=10).collect::<Vec<_>>());
        assert_eq!((page.more, page.deleted_upto), (false, Some(5)));
        // A resync skips the deleted messages and keeps the order of the rest.
        let evs = t.s.events("b", 0, 100, 100).unwrap();
        let seqs: Vec<u64> = evs.iter().filter_map(|(_, p)| if let EventPayload::Message(m) = p { Some(m.seq) } else { None }).collect();
        assert_eq!(seqs, (6..=10).collect::<Vec<_>>());
        assert!(t.s.check_invariants().unwrap().is_empty());
        // New messages continue the sequence.
        assert!(matches!(t.send(300, "b", "dm:a:b", "x"), Outcome::Sent { seq: 11, .. }));
    }

    #[test]
    fn purge_delivered_waits_for_every_device() {
        let mut t = T::new();
        t.setup(&["a", "b"]);
        // b has a second device that logs in and confirms nothing yet.
        t.run(2, vec![Command::Login { token_hash: [9; 32], user: "b".into(), device: "tablet".into() }]);
        for i in 0..3 {
            t.send(10 + i, "a", "dm:a:b", &format!("m{i}"));
        }
        let purge = |t: &mut T| match t.run(50, vec![Command::Purge { policy: PurgePolicy::Delivered, max: 100, from: String::new() }]).remove(0) {
            Outcome::Purged { deleted, .. } => deleted,
            o => panic!("{o:?}"),
        };
        let head_b = t.s.head("b").unwrap();
        let head_a = t.s.head("a").unwrap();
        t.run(20, vec![Command::Received { user: "a".into(), device: "d".into(), up_to: head_a }]);
        t.run(21, vec![Command::Received { user: "b".into(), device: "d".into(), up_to: head_b }]);
        assert_eq!(purge(&mut t), 0, "b's tablet has not confirmed");
        t.run(22, vec![Command::Received { user: "b".into(), device: "tablet".into(), up_to: 2 }]);
        assert_eq!(purge(&mut t), 2, "both of b's devices and a's device have seqs 1-2");
        t.run(23, vec![Command::Received { user: "b".into(), device: "tablet".into(), up_to: head_b }]);
        assert_eq!(purge(&mut t), 1);
        assert!(t.s.check_invariants().unwrap().is_empty());
    }

    #[test]
    fn deleted_user_is_a_tombstone_and_reset_password_revokes_tokens() {
        let mut t = T::new();
        t.setup(&["a", "b"]);
        let g = t.run(3, vec![Command::GroupCreate { group: "g1".into(), by: "a".into(), name: "n".into(), members: vec!["b".into()], cap: 10 }]);
        assert!(matches!(g[0], Outcome::GroupCreated { .. }));
        assert!(t.s.token(&[b'b'; 32]).unwrap().is_some());
        assert_eq!(t.run(4, vec![Command::DeleteUser { user: "b".into() }]), vec![Outcome::Done]);
        assert!(t.s.token(&[b'b'; 32]).unwrap().is_none(), "tokens revoked");
        assert!(!t.s.group("g1").unwrap().unwrap().members.iter().any(|m| m.user == "b"), "groups left");
        let again = t.run(5, vec![Command::Register { user: "b".into(), password_hash: "h2".into() }]);
        assert_eq!(again, vec![Outcome::Refused(Refusal::UserExists)], "the id is not given out again");
        let login = t.run(6, vec![Command::Login { token_hash: [7; 32], user: "b".into(), device: "d".into() }]);
        assert_eq!(login, vec![Outcome::Refused(Refusal::Unauthorized)]);
        assert_eq!(t.run(7, vec![Command::SetPassword { user: "a".into(), password_hash: "new".into() }]), vec![Outcome::Done]);
        assert!(t.s.token(&[b'a'; 32]).unwrap().is_none());
        assert_eq!(t.s.user("a").unwrap().unwrap().password_hash, "new");
        assert!(t.s.check_invariants().unwrap().is_empty());
    }
}
