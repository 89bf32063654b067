//! This node's membership: one lease, kept alive on a task of its own, and the node's record
//! under it. Everything the node holds in the store for as long as it lives (its record,
//! its teachers' registrations, its coordinator election, its rendezvous addresses) is
//! attached to this one lease, so it all goes when the node does.
//!
//! A **session** is one registration: the record is created fresh under a new lease, and
//! its `create_revision` names the session. Placements remember the session they placed
//! ranks on, and every write a node makes about a job compares its session, so a node that
//! lost its lease (paused, partitioned, restarted) can no longer write anything: it fences
//! itself, stops its ranks, and registers again as a new member.
//!
//! While the store is unreachable the session is kept (training goes on): only the store
//! saying the lease is gone ends it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_cluster::api::Node;
use ferry_cluster::store::{Compare, LeaseId, Store, StoreError, Txn};
use tokio::sync::watch;

/// One registration of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub lease: LeaseId,
    /// The `create_revision` of the node's record.
    pub session: u64,
}

/// The node's membership, shared by everything that writes about jobs.
pub struct Membership {
    pub key: String,
    state: watch::Sender<Option<SessionInfo>>,
    /// Whether the last keep-alive reached the store.
    reachable: watch::Sender<bool>,
    record: Mutex<Node>,
}

impl Membership {
    /// A membership for the node record `node` at `key`; call [`Membership::run`].
    pub fn new(key: String, node: Node) -> Arc<Membership> {
        Arc::new(Membership {
            key,
            state: watch::channel(None).0,
            reachable: watch::channel(false).0,
            record: Mutex::new(node),
        })
    }

    /// The current session, if registered.
    pub fn current(&self) -> Option<SessionInfo> {
        *self.state.borrow()
    }

    /// Changes of the session (a new one, or none while re-registering).
    pub fn subscribe(&self) -> watch::Receiver<Option<SessionInfo>> {
        self.state.subscribe()
    }

    /// Whether the node is registered and its store answers (readiness).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    /// The compare that fences a write to this session: it fails once the node's record
    /// is gone or belongs to a later session. `None` while unregistered.
    pub fn fence(&self) -> Option<Compare> {
        self.current().map(|s| self.fence_for(s))
    }

    /// The compare that holds only while `session` is this node's registration: what a
    /// task started in that session (a local attempt) carries, so that nothing it writes
    /// lands after the node has registered again under a new one.
    pub fn fence_for(&self, session: SessionInfo) -> Compare {
        Compare {
            key: self.key.clone(),
            op: ferry_cluster::store::CompareOp::Equal,
            target: ferry_cluster::store::CompareTarget::CreateRevision(session.session),
        }
    }

    /// Updates the published record (written at the next keep-alive if it changed).
    pub fn set_running_jobs(&self, mut jobs: Vec<String>) {
        jobs.sort();
        self.record.lock().expect("lock").running_jobs = jobs;
    }

    fn record_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.record.lock().expect("lock")).expect("node serialises")
    }

    /// Registers the node and keeps it registered until the process exits.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, ttl: Duration) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let (info, mut written) = match self.register(store.as_ref(), ttl).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.reachable.send(false);
                    tracing::warn!(error = %e, "cannot register this node; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(
                lease = info.lease,
                session = info.session,
                "node registered"
            );
            let _ = self.state.send(Some(info));
            let _ = self.reachable.send(true);
            let mut last_ok = Instant::now();
            let mut warned = false;
            loop {
                tokio::time::sleep(ttl / 4).await;
                match store.keep_alive(info.lease).await {
                    Ok(()) => {
                        last_ok = Instant::now();
                        if warned {
                            tracing::info!("the store answers again; lease renewed");
                            warned = false;
                        }
                        let _ = self.reachable.send(true);
                        let now = self.record_bytes();
                        if now != written {
                            match store.put(&self.key, now.clone(), info.lease).await {
                                Ok(_) => written = now,
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot update this node's record")
                                }
                            }
                        }
                    }
                    Err(StoreError::LeaseNotFound(_)) => {
                        tracing::warn!(
                            lease = info.lease,
                            since_last_renewal = ?last_ok.elapsed(),
                            "this node's lease expired: fencing (stopping its ranks) and registering again"
                        );
                        break;
                    }
                    Err(e) => {
                        let _ = self.reachable.send(false);
                        if !warned {
                            tracing::warn!(error = %e, "cannot renew this node's lease; training goes on, retrying");
                            warned = true;
                        }
                    }
                }
            }
            let _ = self.state.send(None);
            let _ = self.reachable.send(false);
        }
    }

    /// A fresh record under a new lease: the old one (a previous process's, or a lost
    /// session's) is removed first, so the new record's `create_revision` is new.
    async fn register(
        &self,
        store: &dyn Store,
        ttl: Duration,
    ) -> Result<(SessionInfo, Vec<u8>), StoreError> {
        let lease = store.grant_lease(ttl).await?;
        store.delete(&self.key).await?;
        let value = self.record_bytes();
        let txn = Txn {
            compares: vec![Compare::absent(&self.key)],
            success: vec![ferry_cluster::store::TxnOp::Put {
                key: self.key.clone(),
                value: value.clone(),
                lease,
            }],
            failure: vec![],
        };
        let r = store.txn(txn).await?;
        if !r.succeeded {
            let _ = store.revoke_lease(lease).await;
            return Err(StoreError::Unavailable(format!(
                "another process registered as this node ({}) at the same moment; is a second ferryd running with the same node name?",
                self.key
            )));
        }
        Ok((
            SessionInfo {
                lease,
                session: r.revision,
            },
            value,
        ))
    }
}
