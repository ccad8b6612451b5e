//! The write-ahead log: one append of a batch (one log entry holding N `send` commands, as the
//! commit pipeline writes them) followed by one fsync, by batch size. Elements are commands, so
//! criterion's throughput is commands per second at that batch size. Runs in a temporary
//! directory under `$TMPDIR` (the disk that is measured).
//!
//! `cargo bench --bench wal`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::storage::records::{encode, Command, LogEntry};
use parley::storage::wal::Wal;
use parley::storage::TERM;

/// A batch of `n` sends of real-sized bodies (30 bytes, the dialogs' median).
pub fn batch(n: usize, from: usize) -> LogEntry {
    let commands = (0..n)
        .map(|i| Command::Send {
            from: format!("u{}", (from + i) % 1000),
            device: "web".into(),
            id: format!("{}.{}", from + i, 1_000_000 + i),
            conv: format!("dm:u{}:u{}", (from + i) % 1000, (from + i + 1) % 1000),
            body: "Hi, how is it going? I'm fine.".into(),
        })
        .collect();
    LogEntry { ts: 1_796_000_000_000, commands }
}

fn wal(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append_fsync");
    g.sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    for n in [1usize, 16, 128, 1024] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (mut log, _) = Wal::open(dir.path(), 64 << 20).expect("open the log");
        let payload = encode(&batch(n, 0)).expect("encode the batch");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("commands", format!("{n} ({} bytes)", payload.len())), |b| {
            b.iter(|| {
                log.append_next(TERM, &payload).expect("append");
                log.sync().expect("fsync");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, wal);
criterion_main!(benches);
