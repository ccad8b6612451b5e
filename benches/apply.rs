//! The state machine: `State::apply` of one log entry holding N `send` commands between 1,000
//! registered users (sled trees: message, conversation meta, dedup, two events, two per-user
//! conversation states per send), by batch size. Elements are commands.
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

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("state_apply");
    g.sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    for n in [1usize, 64, 512] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = State::open(dir.path(), 64 << 20).expect("open the state");
        let users = (0..USERS).map(|i| Command::Register { user: format!("u{i}"), password_hash: "x".into() }).collect();
        state.apply(1, &LogEntry { ts: 1, commands: users }).expect("register the users");
        let next = Cell::new(2u64);
        let sent = Cell::new(0usize);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("sends", n), |b| {
            b.iter_batched(
                || {
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
    g.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
