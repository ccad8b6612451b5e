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
use super::trees::TREES;
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
    TREES
        .iter()
        .map(|n| s.db().open_tree(n).unwrap().iter().map(|kv| kv.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect())
        .collect()
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
        let (page, _) = match state.history(&from, &c, None, 200).unwrap() {
            Ok(p) => p,
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

    // Determinism: the same entries give the same bytes, also across a reopen halfway.
    let b = State::open(&dir.path().join("b"), 8 << 20).unwrap();
    let half = entries.len() / 2;
    for (i, e) in entries.iter().enumerate().take(half) {
        b.apply(i as u64 + 1, e).unwrap();
    }
    drop(b);
    let b = State::open(&dir.path().join("b"), 8 << 20).unwrap();
    prop_assert_eq!(b.applied(), half as u64);
    for (i, e) in entries.iter().enumerate().skip(half) {
        b.apply(i as u64 + 1, e).unwrap();
    }
    prop_assert!(dump(&state) == dump(&b), "replay is not byte-identical");
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
