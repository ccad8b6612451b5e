//! The state machine: `State::apply` of one log entry holding N `send` commands between 1,000
//! registered users (message, conversation meta, dedup, two events, two per-user conversation
//! states per send), by batch size; and of an entry holding 256 `received` confirmations, each
//! covering the newest message of its device's user (cursor, lowest cursor, a `delivered`
//! receipt to the sender); and of one group message to USERS members (elements are members).
//! Elsewhere elements are commands. Apply writes into memory; the materializer's
//! writes to sled are not in these figures (`materialize` is measured apart).
//!
//! `cargo bench --bench apply`

use std::cell::Cell;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::storage::records::{Command, LogEntry};
use parley::storage::State;

const USERS: usize = 1000;

fn sends(n: usize, from: usize) -> LogEntry {
    let commands = (0..n)
        .map(|i| {
            let (a, b) = ((from + i) % USERS, (from + i + 1) % USERS);
            let (x, y) = if format!("u{a}") <= format!("u{b}") { (a, b) } else { (b, a) };
            Command::Send {
                from: format!("u{a}"),
                device: "web".into(),
                id: format!("m{}", from + i),
                conv: format!("dm:u{x}:u{y}"),
                body: "Hi, how is it going? I'm fine.".into(),
            }
        })
        .collect();
    LogEntry { ts: 1_796_000_000_000, commands }
}

/// A state with USERS registered users, each logged in on device "web"; the next index is 3.
/// The materializer's work is kept out of apply's figures: each iteration's (unmeasured) setup
/// materializes what earlier iterations applied.
fn setup(dir: &std::path::Path) -> State {
    let state = State::open(dir, 64 << 20).expect("open the state");
    let users = (0..USERS).map(|i| Command::Register { user: format!("u{i}"), password_hash: "x".into() }).collect();
    state.apply(1, &LogEntry { ts: 1, commands: users }).expect("register the users");
    let logins = (0..USERS)
        .map(|i| Command::Login { token_hash: [(i % 256) as u8; 32], user: format!("u{i}"), device: "web".into() })
        .collect();
    state.apply(2, &LogEntry { ts: 2, commands: logins }).expect("log the users in");
    state.materialize().expect("materialize");
    state
}

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("state_apply");
    g.sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    for n in [1usize, 64, 256, 512] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = setup(dir.path());
        let next = Cell::new(3u64);
        let sent = Cell::new(0usize);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("sends", n), |b| {
            b.iter_batched(
                || {
                    state.materialize().expect("materialize");
                    let e = sends(n, sent.get());
                    sent.set(sent.get() + n);
                    e
                },
                |entry| {
                    let i = next.get();
                    state.apply(i, &entry).expect("apply");
                    next.set(i + 1);
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    // `received`: 256 devices each confirm the newest event of their user; the entry of sends
    // that made those events is applied in the (unmeasured) setup.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = setup(dir.path());
    let next = Cell::new(3u64);
    let sent = Cell::new(0usize);
    g.throughput(Throughput::Elements(256));
    g.bench_function(BenchmarkId::new("received", 256), |b| {
        b.iter_batched(
            || {
                let e = sends(256, sent.get());
                sent.set(sent.get() + 256);
                let i = next.get();
                state.apply(i, &e).expect("apply the sends");
                next.set(i + 1);
                state.materialize().expect("materialize");
                let commands = e
                    .commands
                    .iter()
                    .filter_map(|c| match c {
                        Command::Send { conv, from, .. } => conv.strip_prefix("dm:").and_then(|p| p.split(':').find(|u| u != from)).map(str::to_owned),
                        _ => None,
                    })
                    .map(|to| Command::Received { up_to: state.head(&to).expect("head"), user: to, device: "web".into() })
                    .collect();
                LogEntry { ts: 1_796_000_000_000, commands }
            },
            |entry| {
                let i = next.get();
                state.apply(i, &entry).expect("apply");
                next.set(i + 1);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // A group message: one `send` to a group of all USERS users appends an event to each
    // member (and, for the sender, its conversation state). Elements are members.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = setup(dir.path());
    let members: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let create = Command::GroupCreate { group: "bench".into(), by: "u0".into(), name: "bench".into(), members, cap: 1024 };
    let (created, _) = state.apply(3, &LogEntry { ts: 3, commands: vec![create] }).expect("create the group");
    assert!(matches!(created[..], [parley::storage::Outcome::GroupCreated { .. }]), "{created:?}");
    let probe = Command::Send { from: "u1".into(), device: "web".into(), id: "g-probe".into(), conv: "g:bench".into(), body: "Hi".into() };
    let (sent, _) = state.apply(4, &LogEntry { ts: 4, commands: vec![probe] }).expect("send to the group");
    assert!(matches!(sent[..], [parley::storage::Outcome::Sent { duplicate: false, .. }]), "{sent:?}");
    let next = Cell::new(5u64);
    let made = Cell::new(0usize);
    g.throughput(Throughput::Elements(USERS as u64));
    g.bench_function(BenchmarkId::new("group_send", USERS), |b| {
        b.iter_batched(
            || {
                state.materialize().expect("materialize");
                let n = made.get();
                made.set(n + 1);
                let from = format!("u{}", n % USERS);
                LogEntry { ts: 1_796_000_000_000, commands: vec![Command::Send { from, device: "web".into(), id: format!("g{n}"), conv: "g:bench".into(), body: "Hi, how is it going? I'm fine.".into() }] }
            },
            |entry| {
                let i = next.get();
                let (sent, _) = state.apply(i, &entry).expect("apply");
                next.set(i + 1);
                assert!(matches!(sent[..], [parley::storage::Outcome::Sent { duplicate: false, .. }]), "{sent:?}");
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The materializer: one layer of the writes of 64 entries of 64 sends each, to sled.
fn materialize(c: &mut Criterion) {
    let mut g = c.benchmark_group("state_materialize");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(4));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = setup(dir.path());
    let next = Cell::new(3u64);
    let sent = Cell::new(0usize);
    g.throughput(Throughput::Elements(64 * 64));
    g.bench_function(BenchmarkId::new("sends", 64 * 64), |b| {
        b.iter_batched(
            || {
                for _ in 0..64 {
                    let e = sends(64, sent.get());
                    sent.set(sent.get() + 64);
                    state.apply(next.get(), &e).expect("apply");
                    next.set(next.get() + 1);
                }
            },
            |()| state.materialize().expect("materialize"),
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, apply, materialize);
criterion_main!(benches);
