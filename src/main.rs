//! The `parley` binary: parses the command line, loads the configuration, starts tracing, and
//! calls [`parley::server::run`].

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use parley::config::Config;

#[derive(Parser)]
#[command(name = "parley", version, about = "A WhatsApp-class messaging server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        /// Listen address (default from config: 127.0.0.1:8080). Port 0 picks a free port.
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (default from config: ./data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A TOML file with settings to override (see config/default.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log format: text or json (overrides log.format).
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Run the load generator against a server (see BENCHMARKS.md).
    Load(parley::load::LoadArgs),
    /// Look at and change a running cluster (status, add, remove).
    Cluster {
        #[command(subcommand)]
        cmd: parley::cluster::cli::ClusterCmd,
    },
    /// Administer a data directory (refuses while a server holds it).
    Admin {
        /// Data directory (default from config: ./data). Accepted before or after the subcommand.
        #[arg(long, global = true)]
        data: Option<PathBuf>,
        /// A TOML file with settings to override. Accepted before or after the subcommand.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: parley::admin::AdminCmd,
    },
}

/// Exit status of a user error: a bad setting, address, data directory, or a port in use.
const EXIT_USAGE: i32 = 2;

/// Prints `parley: MESSAGE` on one line and exits with `code`. Used for every error, so none
/// ends in a backtrace (not even with `RUST_BACKTRACE=1`, which only panics honour).
fn fail(code: i32, message: impl std::fmt::Display) -> ! {
    eprintln!("parley: {message}");
    std::process::exit(code);
}

/// An error and its causes on one line, each cause once: a cause whose text its parent already
/// includes (`I/O error on X: File exists` caused by `File exists`) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !s.contains(&text) {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(&text);
        }
    }
    s
}

/// Loads the configuration or exits with status 2 and a message naming the bad key.
fn load_config(file: Option<&std::path::Path>) -> Config {
    Config::load(file).unwrap_or_else(|e| fail(EXIT_USAGE, e))
}

/// The warnings about `PARLEY_…` variables that set nothing (see [`Config::env_warnings`]).
fn env_warnings() -> Vec<String> {
    Config::env_warnings(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default()))))
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { listen, data, config, log_format } => serve(listen, data, config, log_format),
        Cmd::Load(args) => std::process::exit(parley::load::run(args)),
        Cmd::Cluster { cmd } => match parley::cluster::cli::run(cmd) {
            Ok(out) => println!("{out}"),
            Err(e) => {
                eprintln!("parley cluster: {}", one_line(&e));
                std::process::exit(1);
            }
        },
        Cmd::Admin { data, config, cmd } => {
            for w in env_warnings() {
                eprintln!("parley admin: warning: {w}");
            }
            let cfg = load_config(config.as_deref());
            let data = data.unwrap_or_else(|| cfg.server.data_dir.clone());
            if let Err(e) = parley::admin::run(&cfg, &data, cmd) {
                eprintln!("parley admin: {}", one_line(&e));
                std::process::exit(1);
            }
        }
    }
}

/// `parley serve`: every check a user can get wrong (settings, the data directory, the address)
/// runs before anything binds or logs that it is listening; each failure is one line and exit 2.
fn serve(listen: Option<String>, data: Option<PathBuf>, config: Option<PathBuf>, log_format: Option<String>) {
    let mut cfg = load_config(config.as_deref());
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    if let Some(d) = data {
        cfg.server.data_dir = d;
    }
    if let Some(f) = log_format {
        cfg.log.format = f;
    }
    if let Err(e) = cfg.validate() {
        fail(EXIT_USAGE, e);
    }
    if let Err(e) = parley::server::check_supported(&cfg) {
        fail(EXIT_USAGE, e);
    }
    if let Err(e) = parley::data_dir::check(&cfg.server.data_dir) {
        fail(EXIT_USAGE, e);
    }
    // Another server on the directory: say so now, before anything binds or logs. (The lock is
    // taken for good by `storage::open`; this probe is released at once.)
    if cfg.server.data_dir.join("LOCK").exists() {
        if let Err(e) = parley::storage::DataLock::acquire(&cfg.server.data_dir) {
            fail(EXIT_USAGE, e);
        }
    }
    init_tracing(&cfg);
    for w in env_warnings() {
        tracing::warn!("{w}");
    }
    let addr = cfg.listen_addr().unwrap_or_else(|e| fail(EXIT_USAGE, e));
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(EXIT_USAGE, format_args!("cannot listen on {addr}: {e}")));
    let result = actix_rt::System::new().block_on(async move {
        let shutdown = shutdown_signal().context("cannot install signal handlers")?;
        parley::server::run(cfg, listener, shutdown).await
    });
    if let Err(e) = result {
        // Another process on the data directory is the user's to fix; anything else is ours.
        let locked = matches!(e.downcast_ref::<parley::storage::StorageError>(), Some(parley::storage::StorageError::Locked { .. }));
        let user = locked || e.downcast_ref::<parley::server::UserError>().is_some();
        fail(if user { EXIT_USAGE } else { 1 }, one_line(&e));
    }
}

fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    // actix-server's own lines ("starting 2 workers", "accept thread stopped", ...) are kept to
    // warnings unless the level names actix_server: parley logs what it starts, in its words;
    // openraft's info lines (every vote, every replication session) likewise.
    // actix-http logs every unparsable request at ERROR ("stream error"), so any client could
    // fill the error log: those are the client's errors, answered 400/431, and kept off too.
    let mut level = cfg.log.level.clone();
    for (quiet, at) in [("actix_server", "warn"), ("openraft", "warn"), ("actix_http::h1::dispatcher", "off")] {
        if !cfg.log.level.contains(quiet) {
            level.push_str(&format!(",{quiet}={at}"));
        }
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&level));
    // Colour only on a terminal: a log file or journal gets no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives right after start-up is not fatal.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
