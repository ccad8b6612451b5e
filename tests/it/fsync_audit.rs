//! The fsync audit (ARCHITECTURE "ack after durable"): `parley serve` runs under
//! `strace -f` while it acks messages, with 4 KiB log segments and checkpoints every 50 ms so
//! that segments roll and old ones are deleted within seconds. Then, over the recorded system
//! calls, in the order strace saw them:
//!
//! 1. every ack (any socket write naming a message id) comes after an fdatasync of the log
//!    segment the message was written to, which returned after that write;
//! 2. a new segment's directory is fsync'd after the segment was created and before anything
//!    written to it is acked;
//! 3. a log segment is unlinked only after a checkpoint's fsyncs: sled's files and its
//!    directory fsync'd since the segment's last write.
//!
//! Needs `strace` (Debian's package; `.ci/run` installs it); without it the test says why and
//! passes, except under CI (`CI=true`), where it fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;

use parley::protocol::Encoding;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::{http, within, Client, TestDir, PASSWORD, T};

/// Messages acked during the trace.
const MESSAGES: usize = 150;

/// One system call as strace reported it.
#[derive(Debug, Clone)]
struct Call {
    /// Position of its entry and of its exit in strace's output (equal for a call printed whole).
    entry: usize,
    exit: usize,
    name: String,
    /// Everything between the parentheses (strings escaped as strace prints them).
    args: String,
    /// The return value (`-1 E...` on failure).
    ret: String,
}

/// Parses `strace -f -tt` output: joins `<unfinished ...>` with `<... resumed>` per pid.
fn parse(text: &str) -> Vec<Call> {
    let mut out = Vec::new();
    let mut pending: HashMap<String, (usize, String, String)> = HashMap::new();
    for (pos, line) in text.lines().enumerate() {
        // "PID  HH:MM:SS.micros rest"
        let Some((pid, rest)) = line.trim_start().split_once(char::is_whitespace) else { continue };
        let Some((_time, rest)) = rest.trim_start().split_once(' ') else { continue };
        if let Some(r) = rest.strip_prefix("<... ") {
            // "<... fdatasync resumed>) = 0"
            let Some((name, tail)) = r.split_once(" resumed>") else { continue };
            if let Some((entry, n, args)) = pending.remove(pid) {
                if n == name {
                    let (more, ret) = split_ret(tail);
                    out.push(Call { entry, exit: pos, name: n, args: args + more, ret: ret.trim().to_owned() });
                }
            }
            continue;
        }
        let Some((name, after)) = rest.split_once('(') else { continue };
        if name.contains(' ') || name.starts_with('+') || name.starts_with('-') {
            continue; // "+++ exited", "--- SIGKILL", ...
        }
        if let Some(args) = after.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_owned(), (pos, name.to_owned(), args.to_owned()));
            continue;
        }
        let (args, ret) = split_ret(after);
        out.push(Call { entry: pos, exit: pos, name: name.to_owned(), args: args.to_owned(), ret: ret.trim().to_owned() });
    }
    // A call takes effect at its exit, except close: the kernel frees the fd number at entry,
    // and another thread's openat may return that number (and be printed) before the close's
    // `resumed` line. Sorted by exit, the close would then unmap the new file, and a later
    // fsync of it (the log directory's, say) would go unseen.
    out.sort_by_key(|c| if c.name == "close" { c.entry } else { c.exit });
    out
}

#[test]
fn a_close_takes_effect_at_its_entry_so_a_reused_fd_keeps_its_new_file() {
    // Thread 2 closes fd 27 while thread 1 opens the log directory and gets 27 back; the
    // close's `resumed` line comes last. The fsync of 27 must stay the directory's.
    let trace = "\
1 00:00:00.000001 close(27 <unfinished ...>
2 00:00:00.000002 openat(AT_FDCWD, \"/d/wal\", O_RDONLY|O_DIRECTORY) = 27
1 00:00:00.000003 <... close resumed>) = 0
2 00:00:00.000004 fsync(27) = 0
";
    let calls = parse(trace);
    let order: Vec<&str> = calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(order, ["close", "openat", "fsync"]);
}

/// Splits `args) = ret` (strace pads the space before `=`).
fn split_ret(s: &str) -> (&str, &str) {
    match s.rsplit_once(" = ") {
        Some((l, r)) => {
            let l = l.trim_end();
            (l.strip_suffix(')').unwrap_or(l), r)
        }
        None => (s, "?"),
    }
}

/// The first argument (an fd) of a call.
fn fd_arg(c: &Call) -> Option<i64> {
    c.args.split(',').next()?.trim().parse().ok()
}

/// The first quoted string of the arguments (a path for openat/unlinkat/renameat).
fn path_arg(c: &Call, nth: usize) -> Option<String> {
    let mut it = c.args.split('"');
    it.nth(1 + 2 * nth).map(str::to_owned)
}

/// Message ids (`A7Q<k>Z`) named in a write's buffer.
fn ids_in(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("A7Q") {
        rest = &rest[i + 3..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !digits.is_empty() && rest[digits.len()..].starts_with('Z') {
            if let Ok(k) = digits.parse() {
                out.push(k);
            }
        }
    }
    out
}

fn skip(why: String) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("fsync audit: {why} (CI=true: the audit must run; .ci/run installs strace)");
    }
    eprintln!("fsync audit: SKIPPED: {why}");
}

async fn register_login(addr: SocketAddr, user: &str) -> String {
    let (st, b) = http(addr, "POST", "/v1/register", Some(&json!({"user": user, "password": PASSWORD})), None).await;
    assert_eq!(st, 201, "register {user}: {b}");
    let (st, b) = http(addr, "POST", "/v1/login", Some(&json!({"user": user, "password": PASSWORD, "device": "web"})), None).await;
    assert_eq!(st, 200, "login {user}: {b}");
    b["token"].as_str().expect("token").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_follow_fdatasync_segments_follow_directory_fsync_unlinks_follow_checkpoints() {
    let probe = tokio::process::Command::new("strace").args(["-f", "-o", "/dev/null", "true"]).stdout(Stdio::null()).stderr(Stdio::piped()).output().await;
    match probe {
        Err(e) => return skip(format!("strace is not installed ({e})")),
        Ok(o) if !o.status.success() => return skip(format!("strace cannot trace here: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Ok(_) => {}
    }
    let dir = TestDir::new();
    let trace = dir.path().join("strace.txt");
    let data = dir.data();
    let exe = dir.path().join("it-audited");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_parley"), &exe).expect("symlink the binary");
    let mut child = tokio::process::Command::new("strace")
        .args(["-f", "-tt", "-s", "65536", "-e"])
        .arg("trace=openat,close,write,writev,pwrite64,pwritev,sendto,sendmsg,fsync,fdatasync,unlink,unlinkat,rename,renameat,renameat2")
        .arg("-o")
        .arg(&trace)
        .arg(&exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--data"])
        .arg(&data)
        .env("PARLEY__XMPP__LISTEN", "")
        .env_remove("RUST_LOG")
        .env("PARLEY__AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("PARLEY__AUTH__ARGON2_ITERATIONS", "1")
        .env("PARLEY__LIMITS__SEND_RATE_PER_S", "1000000")
        .env("PARLEY__LIMITS__SEND_BURST", "1000000")
        .env("PARLEY__STORAGE__SEGMENT_BYTES", "4096")
        .env("PARLEY__STORAGE__CHECKPOINT_INTERVAL_MS", "50")
        .env("PARLEY__STORAGE__CHECKPOINT_LOG_BYTES", "4096")
        // Segments are deleted only up to the newest snapshot: take them often.
        .env("PARLEY__STORAGE__SNAPSHOT_INTERVAL_MS", "50")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn strace");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr: SocketAddr = within(T, "the traced server to listen", async {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(a) = l.strip_prefix("parley listening on http://") {
                return a.trim().parse().expect("address");
            }
        }
        panic!("the traced server exited before listening");
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let alice = register_login(addr, "alice").await;
    register_login(addr, "bob").await;
    let mut a = Client::connect(addr, &alice, None, Encoding::Json).await.client;
    let first = data.join("wal").join("00000000000000000001.wal");
    let mut sent = 0;
    // Until the log rolled and a checkpoint deleted its first segment (bounded).
    while sent < MESSAGES || first.exists() {
        assert!(sent < 20 * MESSAGES, "no segment was deleted after {sent} messages");
        a.send_acked(&format!("A7Q{sent}Z"), "bob", "a message for the audit, long enough to roll 4 KiB segments").await;
        sent += 1;
    }
    a.close().await;
    // kill -9 the server (strace's child); strace then exits.
    let pid = child.id().expect("strace pid");
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for k in kids.split_whitespace().filter_map(|k| k.parse::<i32>().ok()) {
        // SAFETY: kill(2) on the traced server, a child of our own child.
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    within(T, "strace to exit", child.wait()).await.expect("wait strace");

    let text = std::fs::read_to_string(&trace).expect("strace output");
    let calls = parse(&text);
    let wal_dir = data.join("wal").display().to_string();
    let state_dir = data.join("state").display().to_string();
    // fd → path while open.
    let mut fds: HashMap<i64, String> = HashMap::new();
    // Message id → (segment, position of the write's exit).
    let mut written: HashMap<usize, (String, usize)> = HashMap::new();
    // Segment → exit positions of its successful fdatasyncs.
    let mut datasyncs: HashMap<String, Vec<usize>> = HashMap::new();
    // Exit positions of fsyncs of the log directory, and of sled's directory and files.
    let (mut wal_dir_syncs, mut state_dir_syncs, mut state_file_syncs) = (Vec::new(), Vec::new(), Vec::new());
    // Segment → (created at, last written at).
    let mut segments: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut acks: BTreeMap<usize, usize> = BTreeMap::new();
    let mut unlinks: Vec<(String, usize)> = Vec::new();
    for c in &calls {
        let ok = !c.ret.starts_with('-');
        match c.name.as_str() {
            "openat" if ok => {
                let (Some(p), Ok(fd)) = (path_arg(c, 0), c.ret.split_whitespace().next().unwrap_or("").parse::<i64>()) else { continue };
                if p.starts_with(&wal_dir) && p.ends_with(".wal") && c.args.contains("O_CREAT") {
                    segments.entry(p.clone()).or_insert((c.exit, c.exit));
                }
                fds.insert(fd, p);
            }
            "close" => {
                if let Some(fd) = fd_arg(c) {
                    fds.remove(&fd);
                }
            }
            "write" | "writev" | "pwrite64" | "pwritev" | "sendto" | "sendmsg" if ok => {
                let Some(fd) = fd_arg(c) else { continue };
                match fds.get(&fd) {
                    Some(p) if p.starts_with(&wal_dir) => {
                        for k in ids_in(&c.args) {
                            written.entry(k).or_insert((p.clone(), c.exit));
                        }
                        if let Some(s) = segments.get_mut(p) {
                            s.1 = c.exit;
                        }
                    }
                    Some(_) => {}
                    None if fd > 2 => {
                        for k in ids_in(&c.args) {
                            acks.entry(k).or_insert(c.entry);
                        }
                    }
                    None => {}
                }
            }
            "fdatasync" | "fsync" if ok => {
                let Some(p) = fd_arg(c).and_then(|fd| fds.get(&fd).cloned()) else { continue };
                if p == wal_dir {
                    wal_dir_syncs.push(c.exit);
                } else if p.starts_with(&wal_dir) {
                    datasyncs.entry(p).or_default().push(c.exit);
                } else if p == state_dir {
                    state_dir_syncs.push(c.exit);
                } else if p.starts_with(&state_dir) {
                    state_file_syncs.push(c.exit);
                }
            }
            "unlink" | "unlinkat" if ok => {
                let p = path_arg(c, 0).unwrap_or_default();
                let p = if p.starts_with('/') { p } else { format!("{wal_dir}/{p}") };
                if p.starts_with(&wal_dir) && p.ends_with(".wal") {
                    unlinks.push((p, c.entry));
                }
            }
            _ => {}
        }
    }

    // 1. Every ack after an fdatasync of its segment that returned after the message's write.
    assert!(acks.len() >= MESSAGES, "only {} acks found in the trace (of {sent}); the trace:\n{}", acks.len(), &text[..text.len().min(4000)]);
    let mut checked = 0;
    for (k, at) in &acks {
        let (seg, w) = written.get(k).unwrap_or_else(|| panic!("A7Q{k}Z was acked (strace line {at}) but never written to a log segment"));
        let synced = datasyncs.get(seg).is_some_and(|v| v.iter().any(|s| s > w && s < at));
        assert!(synced, "A7Q{k}Z was acked (line {at}) without an fdatasync of {seg} after its write (line {w})");
        checked += 1;
    }
    // 2. Every new segment's directory fsync'd after its creation, before its first ack.
    let mut first_ack: HashMap<&str, usize> = HashMap::new();
    for (k, at) in &acks {
        let seg = written[k].0.as_str();
        let e = first_ack.entry(seg).or_insert(*at);
        *e = (*e).min(*at);
    }
    for (seg, (created, _)) in &segments {
        let Some(acked) = first_ack.get(seg.as_str()) else { continue };
        assert!(
            wal_dir_syncs.iter().any(|s| s > created && s < acked),
            "{seg} (created at line {created}) held an ack at line {acked} before its directory was fsync'd"
        );
    }
    // 3. Every unlinked segment: after its last write, sled's files and directory were fsync'd
    //    (a checkpoint) before the unlink.
    assert!(!unlinks.is_empty(), "no log segment was deleted during the audit");
    for (seg, at) in &unlinks {
        let last_write = segments.get(seg).map(|s| s.1).unwrap_or(0);
        let dir_synced = state_dir_syncs.iter().any(|s| *s > last_write && s < at);
        let files_synced = state_file_syncs.iter().any(|s| *s > last_write && s < at);
        assert!(dir_synced && files_synced, "{seg} was unlinked (line {at}) without a checkpoint's fsyncs of {state_dir} after its last write (line {last_write})");
    }
    let rolled: HashSet<&String> = segments.keys().collect();
    eprintln!(
        "fsync audit: {checked} acks each after the fdatasync of their segment; {} segments created, each directory-fsync'd before its first ack; \
         {} segments unlinked, each after a checkpoint's fsyncs ({} syscalls traced)",
        rolled.len(),
        unlinks.len(),
        calls.len()
    );
}
