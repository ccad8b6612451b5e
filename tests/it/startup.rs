//! Start-up as a new user meets it (issue 15): a data directory that cannot be used, a port in
//! use, a second server on one directory, a typo in a config file, a misspelt variable. Each is
//! one line on stderr and exit status 2, before anything listens; no backtrace.

use std::path::Path;
use std::process::Stdio;

use serde_json::Value;

use crate::common::{within, Server, TestDir, T};

/// What one `parley serve` run that is expected to stop by itself did.
struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `parley serve --listen LISTEN --data DATA ARGS...` with `env`; waits for it to exit.
async fn serve(data: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Exit {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .args(args)
        // No XMPP listener unless a test asks (its default port may be another server's).
        .env("PARLEY__XMPP__LISTEN", "")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(T, "parley to exit", out).await.expect("run parley");
    Exit { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Exit 2, one line on stderr containing `want`, nothing about listening, no backtrace.
fn refused(e: &Exit, want: &str) {
    let all = format!("exit {:?}\nstdout: {}\nstderr: {}", e.code, e.stdout, e.stderr);
    assert_eq!(e.code, Some(2), "{all}");
    assert_eq!(e.stderr.trim().lines().count(), 1, "not one line: {all}");
    assert!(e.stderr.starts_with("parley: ") && e.stderr.contains(want), "no `{want}`: {all}");
    assert!(!e.stdout.contains("listening") && !e.stderr.contains("listening"), "it listened first: {all}");
    assert!(!e.stderr.contains("backtrace") && !e.stderr.contains("Caused by"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_that_is_a_file_is_refused_before_listening() {
    let dir = TestDir::new();
    let file = dir.path().join("data");
    std::fs::write(&file, "not a directory").expect("write");
    let e = serve(&file, "127.0.0.1:0", &[], &[]).await;
    refused(&e, &format!("{} is a file, not a directory", file.display()));
}

/// A missing data directory that cannot be created (procfs refuses mkdir, even to root) is a
/// start-up error, exit 2, not a storage error after the stand-in server started (it was exit 1;
/// found by a fresh user's trial).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_that_cannot_be_created_is_refused_before_listening() {
    let data = Path::new("/proc/parley-it-no-such-dir");
    let e = serve(data, "127.0.0.1:0", &[], &[]).await;
    refused(&e, "cannot use /proc/parley-it-no-such-dir as the data directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_someone_elses_files_is_refused_and_left_alone() {
    let dir = TestDir::new();
    let data = dir.path().join("mine");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("notes.txt"), "my notes").expect("write");
    let e = serve(&data, "127.0.0.1:0", &[], &[]).await;
    refused(&e, "is not empty and is not a parley data directory (it holds notes.txt)");
    let left: Vec<_> = std::fs::read_dir(&data).expect("read").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, ["notes.txt"], "parley wrote into the user's directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_one_line_and_exit_2_even_with_rust_backtrace_set() {
    let dir = TestDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let e = serve(&dir.data(), &addr, &[], &[("RUST_BACKTRACE", "1")]).await;
    refused(&e, &format!("cannot listen on {addr}"));
    let e = serve(&dir.data(), "localhost:80", &[], &[("RUST_BACKTRACE", "1")]).await;
    refused(&e, "server.listen");
    // The XMPP listener's port too, before storage recovery starts.
    let e = serve(&dir.data(), "127.0.0.1:0", &[], &[("RUST_BACKTRACE", "1"), ("PARLEY__XMPP__LISTEN", &addr)]).await;
    refused(&e, &format!("cannot listen on {addr} (xmpp.listen)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_typo_names_the_key_the_file_and_the_nearest_key() {
    let dir = TestDir::new();
    let toml = dir.path().join("typo.toml");
    std::fs::write(&toml, "[session]\nhello_timout_ms = 5000\n").expect("write");
    let e = serve(&dir.data(), "127.0.0.1:0", &["--config", toml.to_str().expect("utf-8")], &[("RUST_BACKTRACE", "1")]).await;
    refused(&e, &format!("unknown key `session.hello_timout_ms` in {}; did you mean `session.hello_timeout_ms`?", toml.display()));
    assert!(!e.stderr.contains("default.") && !e.stderr.contains("``"), "{}", e.stderr);
    assert!(!dir.data().exists(), "a bad setting must stop start-up before the data directory is touched");
}

/// A server that parley made: the marker is written; a second server on it is refused (exit 2,
/// no hint about the admin endpoint, which is for `parley admin`); a misspelt variable is
/// warned about with the nearest key; the stand-in server of recovery is one line, not actix's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_directory_is_refused_and_start_up_says_what_it_does() {
    let dir = TestDir::new();
    let mut srv = Server::start_with(&dir, &[("PARLEY_SESSION_HELLO_TIMEOUT_MS", "5000")]).await;
    assert!(dir.data().join(parley::data_dir::MARKER).is_file(), "no marker in the data directory");
    let e = serve(&dir.data(), "127.0.0.1:0", &[], &[]).await;
    refused(&e, "is in use by another parley process");
    assert!(!e.stderr.contains("/v1/admin/backup"), "serve's refusal carries admin's hint: {}", e.stderr);
    // ... which `parley admin` does carry: a backup while the server runs is an HTTP request.
    let admin = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley")).args(["admin", "stats", "--data"]).arg(dir.data()).stdin(Stdio::null()).kill_on_drop(true).output();
    let admin = within(T, "parley admin to exit", admin).await.expect("run parley admin");
    let err = String::from_utf8_lossy(&admin.stderr);
    assert_eq!(admin.status.code(), Some(1), "{err}");
    assert!(err.contains("is in use by another parley process") && err.contains("POST /v1/admin/backup"), "{err}");

    let log = srv.log();
    let messages: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| format!("{} {}", v["level"].as_str().unwrap_or(""), v["fields"]["message"].as_str().unwrap_or("")))
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("WARN") && m.contains("PARLEY_SESSION_HELLO_TIMEOUT_MS") && m.contains("did you mean PARLEY__SESSION__HELLO_TIMEOUT_MS?")),
        "no warning about the misspelt variable:\n{log}"
    );
    assert!(messages.iter().any(|m| m.contains("stand-in server answers 503")), "{log}");
    for noise in ["starting 1 workers", "accept thread stopped", "shutting down idle worker"] {
        assert!(!messages.iter().any(|m| m.contains(noise)), "actix's `{noise}` at info:\n{log}");
    }
    srv.sigterm();
    assert_eq!(srv.wait_exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_other_kind_is_refused_and_bad_cluster_keys_are_named() {
    let dir = TestDir::new();
    // A single node's data directory (its `wal/`) cannot start a cluster node.
    let mut single = Server::start(&dir).await;
    single.sigterm();
    assert_eq!(single.wait_exit().await.code(), Some(0));
    let cluster = [
        ("PARLEY__CLUSTER__NODE_ID", "1"),
        ("PARLEY__CLUSTER__LISTEN", "127.0.0.1:0"),
        ("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103"),
    ];
    let e = serve(&dir.data(), "127.0.0.1:0", &[], &cluster).await;
    refused(&e, "holds a single node's log (wal/)");
    assert!(!dir.data().join("raft").exists(), "it created a cluster log beside the single node's");
    let other = TestDir::new();
    let e = serve(&other.data(), "127.0.0.1:0", &[], &[("PARLEY__CLUSTER__NODE_ID", "2")]).await;
    refused(&e, "cluster.listen");
    let e = serve(&other.data(), "127.0.0.1:0", &[], &[("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:7101")]).await;
    refused(&e, "cluster.node_id");
    let e = serve(&other.data(), "127.0.0.1:0", &[], &[("PARLEY__CLUSTER__NODE_ID", "1"), ("PARLEY__CLUSTER__LISTEN", "127.0.0.1:0"), ("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:0,2=127.0.0.1:0")]).await;
    refused(&e, "cluster.peers");
    assert!(!other.data().exists(), "it created the data directory");
    // parley admin on a cluster node's directory refuses, and creates nothing in it.
    std::fs::create_dir_all(other.data().join("raft")).expect("mkdir");
    std::fs::write(other.data().join("PARLEY_DATA"), b"").expect("marker");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley")).args(["admin", "user", "list", "--data"]).arg(other.data()).output().expect("run admin");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cluster node's data directory"), "{err}");
    assert!(!other.data().join("wal").exists() && !other.data().join("state").exists(), "admin created a single node's state in a cluster node's directory");
}
