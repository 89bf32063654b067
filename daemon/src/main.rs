//! `ferryd`: the ferry node daemon. The daemon itself is the library (`ferry_daemon::run`);
//! this binary parses the command line, chooses the store (embedded or etcd), and is also
//! what the daemon starts as a rank (`ferryd worker`) or a teacher (`ferryd teacher`).

use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_cluster::paths::Roots;
use ferry_cluster::store::embedded::EmbeddedStore;
use ferry_cluster::store::Store;
use ferry_daemon::{config, doctor, protocol, train};

/// The ferry node daemon: runs fine-tuning jobs and serves the REST API.
#[derive(Parser)]
#[command(name = "ferryd", version, about)]
struct Cli {
    /// Run a single-node cluster with an embedded store (no etcd).
    #[arg(long)]
    standalone: bool,
    /// Configuration file (YAML or TOML); see docs/ferryd.example.yaml.
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the REST API [default: 127.0.0.1:7070] [env: FERRY_LISTEN].
    #[arg(long)]
    listen: Option<String>,
    /// Directory for the embedded store and worker plans [default: .ferry] [env: FERRY_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Bearer token the API requires (prefer FERRY_TOKEN: flags show up in `ps`) [env: FERRY_TOKEN].
    #[arg(long)]
    token: Option<String>,
    /// This node's name [default: the host name] [env: FERRY_NODE_NAME].
    #[arg(long)]
    node_name: Option<String>,
    /// Cluster mode: etcd endpoints, comma-separated (http://HOST:2379,...).
    #[arg(long, env = "FERRY_ETCD")]
    etcd: Option<String>,
    /// The cluster's name in etcd: its keys live under /ferry/NAME [default: none, /ferry].
    #[arg(long, env = "FERRY_CLUSTER")]
    cluster: Option<String>,
    /// The address this node's ranks bind their data-plane (ring) listeners to [env: FERRY_DATA_PLANE_IP].
    #[arg(long)]
    data_plane_ip: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Checks what CUDA jobs need on this node: libtorch's CUDA, the GPUs, NCCL (and a
    /// one-rank NCCL all-reduce and bf16 autocast on GPU 0). Exits 1 if a check fails.
    Doctor,
    /// Prints the effective configuration (file, then FERRY_* variables, then flags) as
    /// YAML, with its secrets redacted.
    Config,
    /// Internal: one rank of a job, started by the daemon.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        #[arg(long, default_value_t = 1)]
        world_size: u32,
    },
    /// Internal: a dry run's checks of a job's model and data, started by the daemon.
    #[command(hide = true)]
    Check {
        #[arg(long)]
        plan: PathBuf,
    },
    /// Internal: measures the input pipeline on a data set (scripts/bench-input.sh).
    #[command(hide = true)]
    BenchInput {
        /// The job spec's `data` section, as JSON.
        #[arg(long)]
        data: String,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Batches per measurement.
        #[arg(long, default_value_t = 40)]
        batches: usize,
        /// Decode thread counts to measure, in turn.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
    },
    /// Internal: one replica of a job's distillation teacher, started by the daemon.
    #[command(hide = true)]
    Teacher {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long, default_value_t = 0)]
        replica: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Some(Command::Worker { .. } | Command::Teacher { .. })
    ) {
        // A panic (libtorch refusing a model's output, say) reaches the daemon as the
        // reason the process failed, not as a bare exit status.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let what = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            let first = what.lines().next().unwrap_or("").to_string();
            train::emit(&protocol::WorkerMessage::Failed {
                reason: format!("the process failed: {first}"),
            });
            default(info);
        }));
    }
    if let Some(Command::Worker {
        plan,
        rank,
        world_size,
    }) = &cli.command
    {
        // Errors go to the daemon as a protocol message, then the exit status says "failed".
        if let Err(e) = train::run_worker(plan, *rank as usize, *world_size as usize) {
            let msg = protocol::WorkerMessage::Failed {
                reason: format!("{e:#}"),
            };
            train::emit(&msg);
            std::process::exit(1);
        }
        return;
    }
    if let Some(Command::Check { plan }) = &cli.command {
        if let Err(e) = train::check::run_check(plan) {
            eprintln!("ferryd check: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(Command::BenchInput {
        data,
        batch,
        batches,
        threads,
    }) = &cli.command
    {
        let run = serde_json::from_str(data)
            .map_err(anyhow::Error::from)
            .and_then(|d| train::pipeline::bench(&d, *batch, *batches, threads));
        if let Err(e) = run {
            eprintln!("ferryd bench-input: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(Command::Teacher { plan, replica }) = &cli.command {
        if let Err(e) = train::distill::run_teacher(plan, *replica, train::emit) {
            let msg = protocol::WorkerMessage::Failed {
                reason: format!("{e:#}"),
            };
            train::emit(&msg);
            std::process::exit(1);
        }
        return;
    }
    if let Some(Command::Config) = &cli.command {
        init_logging("text");
        warn_unknown_variables();
        match config::Config::load(cli.config.as_deref(), &overrides(&cli))
            .and_then(|c| c.to_redacted_yaml())
        {
            Ok(yaml) => print!("{yaml}"),
            Err(e) => {
                eprintln!("ferryd config: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Some(Command::Doctor) = &cli.command {
        let config = config::Config::load(cli.config.as_deref(), &[]).and_then(|c| doctor::run(&c));
        match config {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("ferryd doctor: {e:#}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = run_daemon(cli) {
        eprintln!("ferryd: {e:#}");
        std::process::exit(1);
    }
}

/// Logs to stderr: the filter from FERRY_LOG, else RUST_LOG, else `info`; colours only
/// when stderr is a terminal (a log file gets none).
fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| "info,actix_server=warn".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// The settings the command line gives (they win over the file and the environment).
fn overrides(cli: &Cli) -> [(&'static str, Option<String>); 7] {
    [
        ("listen", cli.listen.clone()),
        (
            "data_dir",
            cli.data_dir.as_ref().map(|p| p.display().to_string()),
        ),
        ("token", cli.token.clone()),
        ("node_name", cli.node_name.clone()),
        ("etcd", cli.etcd.clone()),
        ("cluster", cli.cluster.clone()),
        ("data_plane_ip", cli.data_plane_ip.clone()),
    ]
}

/// Warns about `FERRY_*` variables that no part of ferry reads.
fn warn_unknown_variables() {
    for w in config::unknown_variables(std::env::vars()) {
        tracing::warn!("{w}");
    }
}

fn run_daemon(cli: Cli) -> Result<()> {
    let overrides = overrides(&cli);
    let config = config::Config::load(cli.config.as_deref(), &overrides)?;
    init_logging(&config.log_format);
    warn_unknown_variables();
    match (cli.standalone, &config.etcd) {
        (true, Some(_)) => bail!(
            "--standalone runs on an embedded store and cannot use etcd: drop --standalone for cluster mode, or drop --etcd (and FERRY_ETCD, `etcd:` in the config)"
        ),
        (false, None) => bail!(
            "say which store to use: --standalone (one machine, embedded store), or --etcd http://HOST:2379 --cluster NAME (cluster mode)"
        ),
        _ => {}
    }
    let addr = config
        .listen
        .to_socket_addrs()
        .with_context(|| format!("listen address `{}` is not HOST:PORT", config.listen))?
        .next()
        .with_context(|| format!("listen address `{}` resolves to nothing", config.listen))?;
    if config.token.is_none() && !addr.ip().is_loopback() {
        bail!(
            "refusing to listen on {addr} without authentication: set a token (FERRY_TOKEN or `token:` in the config), \
             or listen on loopback (--listen 127.0.0.1:7070)"
        );
    }
    let cwd = std::env::current_dir()?;
    let root = |p: &Option<PathBuf>| p.clone().unwrap_or_else(|| cwd.clone());
    let roots = Roots::new(
        &root(&config.roots.data),
        &root(&config.roots.models),
        &root(&config.roots.outputs),
    )?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let mut config = config;
    config.data_dir = config.data_dir.canonicalize()?;
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (is another ferryd running there?)"))?;

    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let store: Arc<dyn Store> = match &config.etcd {
            None => Arc::new(EmbeddedStore::open(&config.data_dir.join("store.redb"))?),
            Some(endpoints) => Arc::new(connect_etcd(&config, endpoints).await?),
        };
        // SIGTERM (what Kubernetes and systemd send) stops ferryd as Ctrl-C does.
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        ferry_daemon::run(listener, store, config, roots, cli.standalone, shutdown).await
    })
}

/// Connects to etcd with the configured TLS and credentials.
async fn connect_etcd(
    config: &config::Config,
    endpoints: &str,
) -> Result<ferry_cluster::store::etcd::EtcdStore> {
    use ferry_cluster::store::etcd::{EtcdOptions, EtcdStore};
    let opts = EtcdOptions {
        endpoints: endpoints
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect(),
        ca: config.etcd_ca.clone(),
        cert: config.etcd_cert.clone(),
        key: config.etcd_key.clone(),
        user: config.etcd_user.clone(),
        password: config.etcd_password.clone(),
        ..Default::default()
    };
    EtcdStore::connect(opts)
        .await
        .with_context(|| format!("cannot connect to etcd at {endpoints}"))
}
