//! Every node's agent: it watches the job records and runs the ranks that the current
//! generation of a Running job places on this node's current session, one local attempt
//! per job ([`super::supervisor`]). When the session ends (the lease expired), every local
//! attempt stops its processes: a node never trains on a membership it has lost.

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::api::JobPhase;

use super::{lifecycle_changes, nap, supervisor, wake_on_changes, JobManager};

/// Runs the ranks placed on this node; runs until the process exits.
pub async fn run(m: Arc<JobManager>) {
    let notify = Arc::new(tokio::sync::Notify::new());
    let _watch = wake_on_changes(
        m.store.clone(),
        m.keys.jobs(),
        notify.clone(),
        lifecycle_changes(),
    );
    let mut session_changes = m.membership.subscribe();
    loop {
        if let Some(session) = m.membership.current() {
            match m.list().await {
                Ok(jobs) => {
                    m.metrics.set_job_phases(&jobs);
                    for job in jobs {
                        let mine = job.phase == JobPhase::Running
                            && !job.cancel_requested
                            && job
                                .placement
                                .iter()
                                .any(|p| p.node == m.node && p.session == session.session);
                        if mine && m.claim_local(&job.id, job.generation) {
                            let m = m.clone();
                            tokio::spawn(async move {
                                let id = job.id.clone();
                                supervisor::run(&m, job, session).await;
                                m.release_local(&id);
                            });
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot list jobs; retrying"),
            }
        }
        tokio::select! {
            _ = nap(&notify, Duration::from_secs(5)) => {}
            _ = session_changes.changed() => {}
            _ = m.local_done.notified() => {}
        }
    }
}
