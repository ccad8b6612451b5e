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
    /// Administer a data directory (refuses while a server holds it).
    Admin {
        /// Data directory (default from config: ./data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A TOML file with settings to override.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: parley::admin::AdminCmd,
    },
}

/// Loads the configuration or exits with status 2 and a message naming the bad key.
fn load_config(file: Option<&std::path::Path>) -> Config {
    match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("parley: {e}");
            std::process::exit(2);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { listen, data, config, log_format } => {
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
                eprintln!("parley: {e}");
                std::process::exit(2);
            }
            init_tracing(&cfg);
            let addr = cfg.listen_addr()?;
            let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
            actix_rt::System::new().block_on(async move {
                let shutdown = shutdown_signal().context("cannot install signal handlers")?;
                parley::server::run(cfg, listener, shutdown).await
            })
        }
        Cmd::Load(args) => std::process::exit(parley::load::run(args)),
        Cmd::Admin { data, config, cmd } => {
            let cfg = load_config(config.as_deref());
            let data = data.unwrap_or_else(|| cfg.server.data_dir.clone());
            if let Err(e) = parley::admin::run(&cfg, &data, cmd) {
                eprintln!("parley admin: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
