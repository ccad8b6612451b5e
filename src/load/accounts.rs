//! Registering and logging in the simulated users, a few at a time over keep-alive connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rand::Rng;
use serde_json::json;

use super::http::{Client, Target};

/// A logged-in user: its id and a token for `hello`.
#[derive(Debug, Clone)]
pub struct Account {
    pub user: String,
    pub token: String,
}

/// A fresh prefix for this run's user ids: `ld` and 6 random letters or digits, so runs against
/// the same server never collide.
pub fn random_prefix() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::thread_rng();
    let tail: String = (0..6).map(|_| CHARS[r.gen_range(0..CHARS.len())] as char).collect();
    format!("ld{tail}")
}

/// The user ids of a run: `PREFIX.0`, `PREFIX.1`, ...
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}.{i}")).collect()
}

/// How many attempts a register or login gets when the server answers 429 or 503.
const ATTEMPTS: u32 = 20;

/// Registers (an existing user is fine) and logs in every name, `concurrency` at a time: name
/// i at `targets[i mod n]` (the node that user will connect to). Prints a progress line to
/// stderr each second unless `quiet`.
pub async fn setup(targets: &[Target], names: Vec<String>, password: &str, concurrency: usize, quiet: bool) -> anyhow::Result<Vec<Account>> {
    let n = names.len();
    let names = Arc::new(names);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (names, next, done, password) = (names.clone(), next.clone(), done.clone(), password.to_owned());
        // One keep-alive client per node.
        let mut clients: Vec<Client> = targets.iter().cloned().map(Client::new).collect();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(user) = names.get(i) else { break };
                let n = clients.len();
                let token = one(&mut clients[i % n], user, &password).await?;
                out.push((i, Account { user: user.clone(), token }));
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if !quiet {
                    eprintln!("setup: {}/{n} users registered and logged in ({:.0} s)", done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
                }
            }
        })
    };
    let mut all: Vec<Option<Account>> = vec![None; n];
    let mut failure = None;
    for w in workers {
        match w.await {
            Ok(Ok(v)) => v.into_iter().for_each(|(i, a)| all[i] = Some(a)),
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(anyhow!("setup task failed: {e}")),
        }
    }
    progress.abort();
    if let Some(e) = failure {
        return Err(e.context("registering and logging in the users"));
    }
    all.into_iter().map(|a| a.ok_or_else(|| anyhow!("a user was not set up"))).collect()
}

/// Registers and logs in one user; returns its token.
async fn one(client: &mut Client, user: &str, password: &str) -> anyhow::Result<String> {
    let creds = json!({ "user": user, "password": password, "device": "load" });
    let mut attempt = 0;
    loop {
        let r = client.post("/v1/register", &json!({ "user": user, "password": password })).await?;
        match r.status {
            201 | 409 => break,
            429 | 503 if attempt < ATTEMPTS => backoff(&mut attempt, r.retry_after).await,
            s => bail!("register {user}: HTTP {s} {}", String::from_utf8_lossy(&r.body)),
        }
    }
    let mut attempt = 0;
    loop {
        let r = client.post("/v1/login", &creds).await?;
        match r.status {
            200 => {
                return r.json()["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("login {user}: no token in the answer"))
            }
            429 | 503 if attempt < ATTEMPTS => backoff(&mut attempt, r.retry_after).await,
            s => bail!("login {user}: HTTP {s} {}", String::from_utf8_lossy(&r.body)),
        }
    }
}

async fn backoff(attempt: &mut u32, retry_after: Option<u64>) {
    *attempt += 1;
    let base = retry_after.map_or(50u64 << (*attempt).min(6), |s| s * 1000);
    let jitter = rand::thread_rng().gen_range(0..=base / 2);
    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
}
