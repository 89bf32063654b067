//! `ferryd`, the ferry node daemon, as a library: [`run`] serves one node of a cluster
//! over any [`Store`] (the embedded one standalone, etcd in a cluster), so that `main`
//! only chooses the store, and tests can run several nodes over one store.
//!
//! # Layout
//! - [`config`]: file, `FERRY_*` variables and flags.
//! - [`http`]: the REST API, probes, metrics and the OpenAPI document.
//! - [`jobs`]: the job lifecycle on the store; the coordinator (placement, generations),
//!   every node's agent, and the supervisor of a node's rank processes.
//! - [`session`]: this node's membership (a leased record) and the fence of its writes.
//! - [`node`]: what this node offers (its devices).
//! - [`gpu`]: finding NCCL and giving each CUDA rank its GPU; [`doctor`] checks them.
//! - [`metrics`]: Prometheus metrics.
//! - [`protocol`]: what a rank process and the daemon say to each other.
//! - [`train`]: the training runtime a rank process runs (the only code that touches libtorch).

#![recursion_limit = "512"]

pub mod config;
pub mod doctor;
pub mod gpu;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod node;
pub mod outputs;
pub mod protocol;
pub mod session;
pub mod train;

use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Result;
use ferry_cluster::api::Node;
use ferry_cluster::paths::Roots;
use ferry_cluster::store::Store;

/// Serves one node on `listener` over `store` until `shutdown` resolves: registers the
/// node, takes part in the coordinator election, runs the ranks placed on it, and serves
/// the API. `standalone` says the store is this node's own (one node, no etcd).
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: config::Config,
    roots: Roots,
    standalone: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let local = listener.local_addr()?;
    let node_name = config.node_name.clone().unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into())
    });
    let keys = ferry_cluster::keys::Keys::new(&config.cluster_prefix());
    // A cluster's nodes must share the outputs root: each leaves a marker there.
    let outputs_marker = if standalone {
        String::new()
    } else {
        outputs::write_marker(&roots.outputs, &node_name).unwrap_or_else(|e| {
            tracing::error!(root = %roots.outputs.display(), error = %e, "cannot write this node's marker in the outputs root: no job will be placed here until the root is writable");
            String::new()
        })
    };
    let record = Node {
        name: node_name.clone(),
        role: config.role.clone(),
        address: local.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        cuda_devices: node::cuda_devices(),
        started_at: ferry_cluster::time::now_rfc3339(),
        mode: if standalone { "standalone" } else { "cluster" }.into(),
        running_jobs: vec![],
        max_jobs: config.max_running_jobs as u32,
        cpu_slots: config.cpu_rank_slots(),
        labels: config.labels.clone(),
        data_plane_ip: config.data_plane_ip.clone(),
        session: 0,
        outputs_marker,
    };
    let membership = session::Membership::new(keys.node(&node_name), record);
    let metrics = metrics::Metrics::new(std::time::Duration::from_secs(config.metrics_retention_s));
    let jobs = jobs::JobManager::new(
        store.clone(),
        config.clone(),
        roots.clone(),
        node_name.clone(),
        metrics.clone(),
        membership.clone(),
        standalone,
    )?;
    let ready = membership.ready();
    let tasks = [
        tokio::spawn(membership.clone().run(store.clone(), config.node_ttl())),
        tokio::spawn(jobs::coordinator::run(jobs.clone())),
        tokio::spawn(jobs::agent::run(jobs.clone())),
    ];
    tracing::info!(
        listen = %local,
        node = %node_name,
        mode = if standalone { "standalone" } else { "cluster" },
        prefix = %config.cluster_prefix(),
        data_dir = %config.data_dir.display(),
        roots.data = %roots.data.display(),
        roots.models = %roots.models.display(),
        roots.outputs = %roots.outputs.display(),
        auth = config.token.is_some(),
        "ferryd is up"
    );
    let state = http::AppState {
        jobs,
        metrics,
        token: config.token.clone(),
        max_body_bytes: config.max_body_bytes,
        body_timeout: std::time::Duration::from_millis(config.body_timeout_ms),
        max_connections: config.max_connections,
        max_requests_per_client: config.max_requests_per_client,
        in_flight: Default::default(),
        ready,
        version: env!("CARGO_PKG_VERSION"),
    };
    let server = http::serve(listener, state)?;
    let handle = server.handle();
    tokio::select! {
        r = server => r?,
        _ = shutdown => handle.stop(true).await,
    }
    for t in tasks {
        t.abort();
    }
    tracing::info!("ferryd stopped");
    Ok(())
}
