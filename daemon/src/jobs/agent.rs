//! Every node's agent: it watches the job records and runs the ranks (and teacher
//! replicas) that the current generation of a Running job places on this node's current
//! session, one local attempt per job ([`super::supervisor`]). When the session ends (the lease expired), every local
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
    // Whether the jobs found at start are in the name index (older records may not be).
    let mut indexed = false;
    loop {
        if let Some(session) = m.membership.current() {
            match m.list().await {
                Ok(jobs) => {
                    m.metrics.set_job_phases(&jobs);
                    let pending = jobs.iter().filter(|j| j.phase == JobPhase::Pending).count();
                    m.queued
                        .store(pending, std::sync::atomic::Ordering::Relaxed);
                    if !indexed {
                        indexed = m.index_names(&jobs).await.is_ok();
                    }
                    remove_stale_scratch(&m, &jobs);
                    for job in jobs {
                        let mine = job.phase == JobPhase::Running
                            && !job.cancel_requested
                            && job
                                .placement
                                .iter()
                                .chain(&job.teacher_placement)
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

/// Removes the node-local scratch of jobs that have ended (or are gone), unless an attempt
/// of theirs still runs here.
fn remove_stale_scratch(m: &JobManager, jobs: &[ferry_cluster::api::Job]) {
    let Ok(dirs) = std::fs::read_dir(&m.scratch_dir) else {
        return;
    };
    for d in dirs.flatten() {
        let id = d.file_name().to_string_lossy().into_owned();
        let live = jobs.iter().any(|j| j.id == id && !j.phase.is_terminal());
        if !live && !m.runs_locally(&id) {
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}
