//! A bad setting stops start-up before anything is bound, with an error naming the key.

use std::process::Stdio;

use crate::common::{within, TestDir, T};

async fn serve_with(env: (&str, &str)) -> std::process::Output {
    let dir = TestDir::new();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.data())
        .env(env.0, env.1)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(T, "parley to exit on a bad setting", out).await.expect("run parley");
    assert!(!dir.data().exists(), "a bad setting must stop start-up before the data directory is touched");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_setting_exits_non_zero_naming_the_key() {
    let out = serve_with(("PARLEY__SESSION__HELLO_TIMEOUT_MS", "soon")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    // Case-insensitive: figment names an environment key in upper case (SESSION.HELLO_TIMEOUT_MS).
    assert!(stderr.to_lowercase().contains("hello_timeout_ms"), "stderr does not name the key: {stderr}");
    assert!(!stdout.contains("listening"), "it started anyway: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_range_setting_exits_non_zero_naming_the_key() {
    let out = serve_with(("PARLEY__SESSION__HELLO_TIMEOUT_MS", "0")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    assert!(stderr.contains("session.hello_timeout_ms"), "stderr does not name the key: {stderr}");
}
