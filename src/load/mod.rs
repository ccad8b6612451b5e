//! The load generator, `parley load <chat|offline|idle|storm|ramp> --url http://HOST:PORT`
//! (issue 5): simulated users that register, connect and replay real dialogs
//! (`assets/dialogs.jsonl`) against a running server, with HDR latency histograms and an
//! end-to-end check that every acked message is delivered exactly once and in order.
//!
//! Against a cluster, `--url` lists several nodes separated by commas: simulated user k
//! registers, logs in and connects at node k mod n (one node per user in turn, so a pair's two
//! users sit on different nodes), which checks delivery across nodes too. Server-side readings
//! (CPU, memory, healthz polls) are of the first node in the list.
//!
//! # Layout
//! - [`chat`]: the engine (pairs of users, closed or open loop) and the `chat` scenario.
//! - [`ramp`]: steps the offered rate up until p99 ack latency passes a bound.
//! - [`fanout`]: a 1,024-member group with 10% online beside a 1:1 pair (issue 3).
//! - [`offline`]: a backlog sent to an offline user, then its resync.
//! - [`idle`]: many authenticated idle sockets; server memory per socket from /proc.
//! - [`storm`]: every socket drops and reconnects at once; time until all are back.
//! - [`fleet`]: many sockets from many source addresses, held open by small tasks.
//! - [`accounts`], [`ws`], [`http`]: registering users, WebSocket and HTTP clients.
//! - [`xmpp`]: the XMPP-over-WebSocket client of `--protocol xmpp` (chat, ramp, idle).
//! - [`dialogs`], [`stats`], [`procfs`]: the replayed text, histograms, /proc readings.
//!
//! The tool runs on its own multi-threaded tokio runtime. Progress lines go to stderr; the
//! summary goes to stdout (as JSON with `--json`). The exit status is 0 when the run kept every
//! promise, 1 when it did not (a lost, duplicated, reordered or altered message; sockets that did
//! not come back), 2 when it could not run.

pub mod accounts;
pub mod chat;
pub mod dialogs;
pub mod fanout;
pub mod fleet;
pub mod http;
pub mod idle;
pub mod offline;
pub mod procfs;
pub mod ramp;
pub mod stats;
pub mod storm;
pub mod ws;
pub mod xmpp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::protocol::Encoding;

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// N users in pairs replay dialogs at R messages/s each for D seconds.
    Chat,
    /// One user sends M messages to an offline user, who then connects.
    Offline,
    /// N authenticated idle sockets; server memory per socket.
    Idle,
    /// N sockets drop and reconnect at once; time until all are back.
    Storm,
    /// Step the offered rate up until p99 ack latency passes a bound.
    Ramp,
    /// A group of --users members (default 1,024), --online-percent connected, beside a 1:1 pair.
    Fanout,
}

/// The wire encoding of the simulated clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireEncoding {
    /// Text frames of JSON.
    Json,
    /// Binary frames of postcard.
    Postcard,
}

/// The protocol of the simulated clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireProtocol {
    /// parley's own protocol over `/v1/ws` (PROTOCOL.md).
    Native,
    /// XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`, XEP-0198 acks (chat, ramp, idle).
    Xmpp,
}

/// `parley load`'s command line.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The server, http://HOST:PORT, or the nodes of a cluster separated by commas
    /// (http://A,http://B,...): simulated user k uses node k mod n. Loopback only unless
    /// --allow-remote.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Simulated users (default: chat and ramp 100, idle and storm 1000; offline uses 2).
    #[arg(long)]
    pub users: Option<usize>,
    /// Messages per second per user, or `max` (or 0) for a closed loop: each user sends its next
    /// message as soon as the previous one is acked (see --window). Ramp: the starting rate.
    /// Default 10.
    #[arg(long)]
    pub rate: Option<String>,
    /// Seconds of sending (chat, default 10); ramp: the whole ramp's budget (default 60);
    /// idle: seconds to hold the sockets open once all are up (default 5).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Dialogs to replay, JSON lines with a "turns" array (default assets/dialogs.jsonl).
    #[arg(long)]
    pub dialogs: Option<PathBuf>,
    /// Print the result as one JSON object on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Closed loop: sends in flight per user.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Wire encoding of the clients (native protocol only).
    #[arg(long, value_enum, default_value = "json")]
    pub encoding: WireEncoding,
    /// Protocol of the clients: `xmpp` runs chat, ramp and idle over XMPP-over-WebSocket.
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: WireProtocol,
    /// XMPP: the server's domain (its `xmpp.domain`).
    #[arg(long, default_value = "localhost")]
    pub xmpp_domain: String,
    /// Offline: messages sent to the offline user.
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Ramp: the p99 ack latency bound, in ms.
    #[arg(long, default_value_t = 20.0)]
    pub p99_bound_ms: f64,
    /// Ramp: seconds per step.
    #[arg(long, default_value_t = 4.0)]
    pub step: f64,
    /// Ramp: each step's rate is the previous one times this.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Idle and storm: source addresses to spread the sockets over (127.0.1.1, 127.0.1.2, ...),
    /// to get past the ~28,000 ephemeral ports of one address (default: one per 20,000 sockets).
    #[arg(long)]
    pub sources: Option<usize>,
    /// Idle: the server's pid, for its memory (default: the process listening on the port).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Storm: seconds the reconnection may take before the run fails.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Requests or connections in flight while setting up users and sockets.
    #[arg(long, default_value_t = 32)]
    pub setup_concurrency: usize,
    /// How often clients confirm events with `received`, in ms (native protocol; over XMPP the
    /// gateway asks for a confirmation every 100 ms with XEP-0198 `<r/>`).
    #[arg(long, default_value_t = 100)]
    pub received_ms: u64,
    /// Prefix of the user ids (default: `ld` and 6 random characters, new every run).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Worker threads of the load generator (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Allow a --url that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Fanout: percent of the group's members connected and reading.
    #[arg(long, default_value_t = 10.0)]
    pub online_percent: f64,
}

impl LoadArgs {
    /// The chat engine's protocol.
    pub fn chat_protocol(&self) -> chat::Protocol {
        match self.protocol {
            WireProtocol::Native => chat::Protocol::Native,
            WireProtocol::Xmpp => chat::Protocol::Xmpp,
        }
    }

    fn enc(&self) -> Encoding {
        match self.encoding {
            WireEncoding::Json => Encoding::Json,
            WireEncoding::Postcard => Encoding::Postcard,
        }
    }

    /// `--rate`: `None` for a closed loop, else messages/s per user.
    fn rate(&self, default: f64) -> anyhow::Result<Option<f64>> {
        match self.rate.as_deref() {
            None => Ok(Some(default)),
            Some("max") => Ok(None),
            Some(s) => {
                let r: f64 = s.parse().with_context(|| format!("--rate {s}: a number or `max`"))?;
                if !(r >= 0.0 && r.is_finite()) {
                    bail!("--rate must be 0 or more");
                }
                Ok(if r == 0.0 { None } else { Some(r) })
            }
        }
    }
}

/// What a scenario reports.
pub struct Outcome {
    /// The human summary.
    pub human: String,
    /// The same for machines.
    pub json: Value,
    /// Whether the run kept every promise.
    pub ok: bool,
}

/// What every scenario gets.
pub struct Ctx {
    pub args: LoadArgs,
    /// The first (or only) node of `--url`: where server-side readings come from.
    pub target: http::Target,
    /// Every node of `--url`, in order (at least one).
    pub targets: Vec<http::Target>,
    pub enc: Encoding,
    /// Prefix of this run's user ids.
    pub prefix: String,
    /// Password of every simulated user.
    pub password: String,
}

impl Ctx {
    /// The node simulated user `k` uses: the (k mod n)-th of `--url`.
    pub fn target_of(&self, k: usize) -> &http::Target {
        &self.targets[k % self.targets.len()]
    }

    fn dialogs(&self) -> anyhow::Result<Arc<dialogs::Dialogs>> {
        Ok(Arc::new(dialogs::Dialogs::load(self.args.dialogs.as_deref())?))
    }

    /// Prints a progress line unless `--quiet`.
    pub fn progress(&self, line: &str) {
        if !self.args.quiet {
            eprintln!("{line}");
        }
    }
}

/// Runs `parley load`; returns the process exit status.
pub fn run(args: LoadArgs) -> i32 {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("parley load: cannot start the runtime: {e}");
            return 2;
        }
    };
    let json = args.json;
    let res = rt.block_on(run_async(args));
    // Sockets still held by aborted tasks are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(2));
    match res {
        Ok(o) => {
            if json {
                eprintln!("{}", o.human);
                println!("{}", serde_json::to_string_pretty(&o.json).unwrap_or_default());
            } else {
                println!("{}", o.human);
            }
            if o.ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("parley load: {e:#}");
            2
        }
    }
}

async fn run_async(args: LoadArgs) -> anyhow::Result<Outcome> {
    let targets = http::parse_targets(&args.url, args.allow_remote).await?;
    let target = targets[0].clone();
    let prefix = args.prefix.clone().unwrap_or_else(accounts::random_prefix);
    let password = format!("pw-{prefix}-load");
    let ctx = Ctx { enc: args.enc(), target, targets, prefix, password, args };
    if ctx.args.protocol == WireProtocol::Xmpp && !matches!(ctx.args.scenario, Scenario::Chat | Scenario::Ramp | Scenario::Idle) {
        bail!("--protocol xmpp runs chat, ramp and idle only");
    }
    match ctx.args.scenario {
        Scenario::Chat => chat::run(&ctx).await,
        Scenario::Offline => offline::run(&ctx).await,
        Scenario::Idle => idle::run(&ctx).await,
        Scenario::Storm => storm::run(&ctx).await,
        Scenario::Ramp => ramp::run(&ctx).await,
        Scenario::Fanout => fanout::run(&ctx).await,
    }
}
