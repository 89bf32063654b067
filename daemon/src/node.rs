//! This node's registration in the store: a record under `keys.node(name)` attached to a
//! lease that the daemon keeps alive; if the daemon dies, the record expires with it.

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::api::Node;
use ferry_cluster::store::{LeaseId, Store, StoreError};

use crate::jobs::JobManager;

/// Lease TTL of a node record.
pub const NODE_TTL: Duration = Duration::from_secs(10);

/// Number of CUDA devices libtorch would see, without initialising CUDA in the daemon.
pub fn cuda_devices() -> u32 {
    // The daemon never touches CUDA itself (ranks do); count the device nodes instead.
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia").is_some_and(|rest| {
                        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                    })
                })
                .count() as u32
        })
        .unwrap_or(0)
}

async fn register(store: &dyn Store, key: &str, node: &Node) -> Result<LeaseId, StoreError> {
    let lease = store.grant_lease(NODE_TTL).await?;
    store
        .put(
            key,
            serde_json::to_vec(node).expect("node serialises"),
            lease,
        )
        .await?;
    Ok(lease)
}

/// Registers the node and keeps its record alive and current until the process exits.
pub async fn keep_registered(
    jobs: Arc<JobManager>,
    mut node: Node,
    ready: tokio::sync::watch::Sender<bool>,
) {
    let key = jobs.keys.node(&node.name);
    let mut lease = None;
    loop {
        node.running_jobs = jobs.running_jobs();
        let ok = match lease {
            Some(l) => match jobs.store.keep_alive(l).await {
                Ok(()) => jobs
                    .store
                    .put(&key, serde_json::to_vec(&node).expect("node serialises"), l)
                    .await
                    .is_ok(),
                Err(_) => {
                    lease = None;
                    false
                }
            },
            None => match register(jobs.store.as_ref(), &key, &node).await {
                Ok(l) => {
                    lease = Some(l);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register this node; retrying");
                    false
                }
            },
        };
        let _ = ready.send(ok);
        tokio::time::sleep(NODE_TTL / 4).await;
    }
}
