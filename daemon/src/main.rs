//! `ferryd`: the ferry node daemon.
//!
//! # Layout
//! - [`config`]: file, `FERRY_*` variables and flags.
//! - [`http`]: the REST API, probes, metrics and the OpenAPI document.
//! - [`jobs`]: the job lifecycle on the store, the scheduler, and the supervisor of rank processes.
//! - [`node`]: this node's registration (a leased record).
//! - [`gpu`]: finding NCCL and giving each CUDA rank its GPU; [`doctor`] checks them.
//! - [`metrics`]: Prometheus metrics.
//! - [`protocol`]: what a rank process and the daemon say to each other.
//! - [`train`]: the training runtime a rank process runs (the only code that touches libtorch).

#![recursion_limit = "512"]

mod config;
mod doctor;
mod gpu;
mod http;
mod jobs;
mod metrics;
mod node;
mod protocol;
mod train;

use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_cluster::api::Node;
use ferry_cluster::paths::Roots;
use ferry_cluster::store::embedded::EmbeddedStore;
use ferry_cluster::store::Store;

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
    /// Address of the REST API [default: 127.0.0.1:7070].
    #[arg(long)]
    listen: Option<String>,
    /// Directory for the embedded store and worker plans [default: .ferry].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Bearer token the API requires (prefer FERRY_TOKEN: flags show up in `ps`).
    #[arg(long)]
    token: Option<String>,
    /// This node's name [default: the host name].
    #[arg(long)]
    node_name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Checks what CUDA jobs need on this node: libtorch's CUDA, the GPUs, NCCL (and a
    /// one-rank NCCL all-reduce and bf16 autocast on GPU 0). Exits 1 if a check fails.
    Doctor,
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
            println!("{}", serde_json::to_string(&msg).unwrap_or_default());
            std::process::exit(1);
        }
        return;
    }
    if let Some(Command::Teacher { plan, replica }) = &cli.command {
        if let Err(e) = train::distill::run_teacher(plan, *replica, train::emit) {
            let msg = protocol::WorkerMessage::Failed {
                reason: format!("{e:#}"),
            };
            println!("{}", serde_json::to_string(&msg).unwrap_or_default());
            std::process::exit(1);
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

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| "info,actix_server=warn".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn run_daemon(cli: Cli) -> Result<()> {
    let overrides = [
        ("listen", cli.listen.clone()),
        (
            "data_dir",
            cli.data_dir.as_ref().map(|p| p.display().to_string()),
        ),
        ("token", cli.token.clone()),
        ("node_name", cli.node_name.clone()),
    ];
    let config = config::Config::load(cli.config.as_deref(), &overrides)?;
    init_logging(&config.log_format);
    if !cli.standalone {
        bail!("cluster mode (etcd) is not available in this version of ferryd; start it with --standalone");
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
    let local = listener.local_addr()?;

    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&config.data_dir.join("store.redb"))?);
        let node_name = config.node_name.clone().unwrap_or_else(|| {
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into())
        });
        let metrics = metrics::Metrics::new();
        let jobs = jobs::JobManager::new(
            store,
            config.clone(),
            roots.clone(),
            node_name.clone(),
            metrics.clone(),
            node::cuda_devices(),
        )?;
        let recovered = jobs.recover().await?;
        let node = Node {
            name: node_name.clone(),
            role: "worker".into(),
            address: local.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            cuda_devices: node::cuda_devices(),
            started_at: ferry_cluster::time::now_rfc3339(),
            mode: "standalone".into(),
            running_jobs: vec![],
        };
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(node::keep_registered(jobs.clone(), node, ready_tx));
        tokio::spawn(jobs.clone().schedule_loop());
        tracing::info!(
            listen = %local,
            node = %node_name,
            data_dir = %config.data_dir.display(),
            roots.data = %roots.data.display(),
            roots.models = %roots.models.display(),
            roots.outputs = %roots.outputs.display(),
            auth = config.token.is_some(),
            recovered,
            "ferryd standalone is up"
        );
        let state = http::AppState {
            jobs,
            metrics,
            token: config.token.clone(),
            max_body_bytes: config.max_body_bytes,
            ready: ready_rx,
            version: env!("CARGO_PKG_VERSION"),
        };
        http::serve(listener, state)?.await?;
        tracing::info!("ferryd stopped");
        Ok::<_, anyhow::Error>(())
    })
}
