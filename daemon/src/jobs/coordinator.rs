//! The coordinator: one node at a time, elected on its lease, places Pending jobs and
//! decides what follows each generation of a Running one (success, a new generation on
//! the nodes that remain, a restart, a failure, a cancel). Any node's API accepts and
//! answers every request; only the coordinator moves jobs between generations.
//!
//! The election is a key created absent under the node's lease: when the coordinator
//! dies, its lease expires and the key with it, and the next node to try takes over. Every
//! write the coordinator makes compares that key's `create_revision` (its term) and its
//! own session, so a deposed coordinator writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_cluster::api::{EventKind, Job, JobPhase, Node, RankPlacement};
use ferry_cluster::place::{self, Decision, Demand, Load, NodeView};
use ferry_cluster::spec::JobSpec;
use ferry_cluster::store::{Compare, CompareOp, CompareTarget, Txn, TxnOp};
use ferry_cluster::time::{now_rfc3339, seconds_between};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{any_change, lifecycle_changes, nap, wake_on_changes, JobError, JobManager};

/// How long the coordinator waits for the other nodes' reports after the first failure
/// of a generation, so that the cause is named, not its echo; at least a lease TTL and a
/// second, so that a node that died (and so never reports) is seen to be gone first: its
/// survivors' "lost the connection" is then a node loss, not a rank failure.
const FAILURE_GRACE: Duration = Duration::from_secs(3);
/// How long a node that failed a job is avoided for it.
const COOL_DOWN: Duration = Duration::from_secs(60);
/// A job that runs on fewer nodes than it asked for grows back onto nodes that have been
/// up this many lease TTLs, once its generation has run as long (no flapping node makes
/// it restart over and over).
const GROW_AFTER_TTLS: u32 = 2;

/// How one node's ranks of one generation ended, written by that node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    /// Rank 0 ran here and finished its training (final files written).
    pub done: bool,
    /// The ranks were stopped for a cancel.
    pub cancelled: bool,
    /// Why they failed: (priority, reason); lower priorities explain higher ones.
    pub failure: Option<(u8, String)>,
    /// The last step rank 0 reported, if it ran here.
    pub step: Option<u64>,
    /// Rank 0's last numbers (so that what the store missed during an outage is not lost).
    #[serde(default)]
    pub samples_per_sec: Option<f64>,
    #[serde(default)]
    pub train_loss: Option<f64>,
    #[serde(default)]
    pub val_accuracy: Option<f64>,
}

/// A node as placement sees it.
pub fn view(n: &Node) -> NodeView {
    NodeView {
        name: n.name.clone(),
        session: n.session,
        role: n.role.clone(),
        cuda_devices: n.cuda_devices,
        max_jobs: n.max_jobs,
        cpu_slots: n.cpu_slots,
        labels: n.labels.clone(),
    }
}

/// What a job asks placement for.
pub fn demand(id: &str, spec: &JobSpec, cooling: BTreeSet<String>) -> Demand {
    let r = &spec.resources;
    Demand {
        job: id.to_string(),
        nodes: r.nodes.max(1),
        min_nodes: r.min_nodes(),
        ranks_per_node: r.ranks_per_node().max(1),
        device: r.device,
        node_selector: r.node_selector.clone(),
        cooling,
    }
}

/// Why a generation ended badly.
enum Cause {
    /// A rank (or a teacher) failed: the restart policy decides.
    Rank(String),
    /// A node is gone: the job moves on without it, whatever the restart policy.
    NodeLost(String),
    /// Nodes joined that the job can use: it moves onto more of them (not a failure).
    Grow(String),
}

#[derive(Default)]
struct State {
    /// The term this node coordinates in (the election key's create_revision).
    term: Option<u64>,
    first_failure: HashMap<(String, u64), Instant>,
    cooling: HashMap<String, HashMap<String, Instant>>,
    /// The last waiting reason logged per job (logged again only when it changes).
    waiting: HashMap<String, String>,
    /// A job record changed in this round: list again before placing.
    changed: bool,
    /// A generation waits out its failure grace (or a grow its delay): look again soon,
    /// even without a change.
    grace_pending: bool,
    /// When this coordinator first saw each node session, and each job generation.
    seen_nodes: HashMap<(String, u64), Instant>,
    seen_generations: HashMap<(String, u64), Instant>,
}

/// Coordinates whenever this node holds the election; runs until the process exits.
pub async fn run(m: Arc<JobManager>) {
    let notify = Arc::new(tokio::sync::Notify::new());
    let p = m.keys.clone();
    let _watches = [
        wake_on_changes(
            m.store.clone(),
            p.jobs(),
            notify.clone(),
            lifecycle_changes(),
        ),
        wake_on_changes(m.store.clone(), p.nodes(), notify.clone(), any_change),
        wake_on_changes(
            m.store.clone(),
            p.reports_root(),
            notify.clone(),
            any_change,
        ),
        wake_on_changes(m.store.clone(), p.coordinator(), notify.clone(), any_change),
    ];
    let mut st = State::default();
    loop {
        match elect(&m, &mut st).await {
            Ok(true) => {
                if let Err(e) = coordinate(&m, &mut st).await {
                    tracing::warn!(error = %e, "coordinating failed; retrying");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "cannot reach the store for the election"),
        }
        // Changes wake it at once; the timer serves the failure grace (and, seldom, a
        // look at a quiet cluster).
        let timer = if st.grace_pending { 1 } else { 10 };
        nap(&notify, Duration::from_secs(timer)).await;
    }
}

/// Takes or keeps the election; true while this node coordinates.
async fn elect(m: &JobManager, st: &mut State) -> Result<bool, JobError> {
    let Some(session) = m.membership.current() else {
        st.term = None;
        return Ok(false);
    };
    let key = m.keys.coordinator();
    let kv = match m.store.get(&key).await? {
        Some(kv) => kv,
        None => {
            let txn = Txn {
                compares: vec![Compare::absent(&key)],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value: m.node.clone().into_bytes(),
                    lease: session.lease,
                }],
                failure: vec![],
            };
            match m.store.txn(txn).await {
                Ok(r) if r.succeeded => {}
                Ok(_) => return Ok(false),
                // The lease just ended: the session will be renewed.
                Err(ferry_cluster::store::StoreError::LeaseNotFound(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            match m.store.get(&key).await? {
                Some(kv) => kv,
                None => return Ok(false),
            }
        }
    };
    let mine = kv.lease == session.lease;
    if mine && st.term != Some(kv.create_revision) {
        tracing::info!(
            term = kv.create_revision,
            "this node coordinates the cluster"
        );
        st.first_failure.clear();
    }
    st.term = mine.then_some(kv.create_revision);
    Ok(mine)
}

/// The compares that fence the coordinator's writes to its term and session.
fn fence(m: &JobManager, st: &State) -> Vec<Compare> {
    let mut f = vec![Compare {
        key: m.keys.coordinator(),
        op: CompareOp::Equal,
        target: CompareTarget::CreateRevision(st.term.unwrap_or(u64::MAX)),
    }];
    f.extend(m.membership.fence());
    f
}

async fn coordinate(m: &JobManager, st: &mut State) -> Result<(), JobError> {
    let nodes: BTreeMap<String, Node> = m
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
    st.changed = false;
    st.grace_pending = false;
    let jobs = m.list().await?;
    let now = Instant::now();
    for n in nodes.values() {
        st.seen_nodes
            .entry((n.name.clone(), n.session))
            .or_insert(now);
    }
    st.seen_nodes
        .retain(|(name, session), _| nodes.get(name).is_some_and(|n| n.session == *session));
    for job in jobs.iter().filter(|j| j.phase == JobPhase::Running) {
        evaluate(m, st, job, &nodes).await?;
    }
    // Read once per round: the outputs-root markers are files.
    let usable = usable(m, &nodes);
    if !st.changed {
        grow(m, st, &usable.0, &jobs).await?;
    }
    let jobs = if st.changed { m.list().await? } else { jobs };
    // Retention, every round (one runs at least every 10 s): the jobs are listed already.
    if m.prune(&jobs, ferry_cluster::time::now_millis()).await > 0 {
        let jobs = m.list().await?;
        return schedule(m, st, &usable, jobs).await;
    }
    schedule(m, st, &usable, jobs).await
}

/// The nodes that may take ranks, as placement sees them, and why the others may not: in
/// a cluster, only nodes that share this coordinator's outputs root.
fn usable(m: &JobManager, nodes: &BTreeMap<String, Node>) -> (Vec<NodeView>, Vec<String>) {
    let (mut views, mut unshared) = (Vec::new(), Vec::new());
    for n in nodes.values() {
        match m.standalone {
            true => views.push(view(n)),
            false => match crate::outputs::check(&m.roots.outputs, &n.name, &n.outputs_marker) {
                Ok(()) => views.push(view(n)),
                Err(why) => unshared.push(why),
            },
        }
    }
    (views, unshared)
}

/// Grows back a Running job that runs on fewer nodes than `resources.nodes` once more
/// nodes fit it (they joined, or returned, and have been up a while): its generation ends
/// (its ranks save their state, see the supervisor) and the next one is placed on more
/// nodes, in the same round.
async fn grow(
    m: &JobManager,
    st: &mut State,
    views: &[NodeView],
    jobs: &[Job],
) -> Result<(), JobError> {
    let settle = m.config.node_ttl() * GROW_AFTER_TTLS;
    let now = Instant::now();
    let running: Vec<&Job> = jobs
        .iter()
        .filter(|j| j.phase == JobPhase::Running)
        .collect();
    st.seen_generations
        .retain(|(id, gen), _| running.iter().any(|j| j.id == *id && j.generation == *gen));
    // Only nodes up long enough count.
    let settled: Vec<NodeView> = views
        .iter()
        .filter(|v| {
            st.seen_nodes
                .get(&(v.name.clone(), v.session))
                .is_some_and(|t| now.duration_since(*t) >= settle)
        })
        .cloned()
        .collect();
    for job in &running {
        let have: BTreeSet<&str> = job.placement.iter().map(|p| p.node.as_str()).collect();
        if job.cancel_requested || have.len() as u32 >= job.spec.resources.nodes.max(1) {
            continue;
        }
        let since = *st
            .seen_generations
            .entry((job.id.clone(), job.generation))
            .or_insert(now);
        if now.duration_since(since) < settle {
            st.grace_pending = true;
            continue;
        }
        let mut load = Load::default();
        for other in running.iter().filter(|o| o.id != job.id) {
            load.add(&other.placement);
        }
        let d = demand(&job.id, &job.spec, BTreeSet::new());
        let Decision::Place(p) = place::place_one(&d, &settled, &load) else {
            continue;
        };
        let more: BTreeSet<&str> = p.iter().map(|r| r.node.as_str()).collect();
        if more.len() <= have.len() {
            continue;
        }
        let joined: Vec<&str> = more.difference(&have).copied().collect();
        let why = format!(
            "node(s) {} can take ranks: growing from {} to {} nodes",
            joined.join(", "),
            have.len(),
            more.len()
        );
        next_generation(m, st, job, Cause::Grow(why), &BTreeMap::new()).await?;
    }
    Ok(())
}

/// Looks at a Running job's generation and acts once its outcome is known.
async fn evaluate(
    m: &JobManager,
    st: &mut State,
    job: &Job,
    nodes: &BTreeMap<String, Node>,
) -> Result<(), JobError> {
    let gen = job.generation;
    let reports: BTreeMap<String, Report> = m
        .store
        .range(&m.keys.reports(&job.id, gen))
        .await?
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Report>(&kv.value).ok())
        .map(|r| (r.node.clone(), r))
        .collect();
    let placed: BTreeMap<&str, u64> = job
        .placement
        .iter()
        .map(|p| (p.node.as_str(), p.session))
        .collect();
    let mut lost = Vec::new();
    let mut pending = Vec::new();
    for (&node, &session) in &placed {
        if reports.contains_key(node) {
            continue;
        }
        match nodes.get(node) {
            Some(n) if n.session == session => pending.push(node),
            Some(_) => lost.push(format!(
                "node {node} left and registered again (it restarted, or its lease expired) while running generation {gen}"
            )),
            None => lost.push(format!(
                "node {node} is gone: its lease expired (no keep-alive for {} s)",
                m.config.node_ttl().as_secs_f64()
            )),
        }
    }
    if job.cancel_requested {
        if pending.is_empty() {
            finish(m, st, job, JobPhase::Cancelled, None).await?;
        }
        return Ok(());
    }
    let mut failures: Vec<(u8, u8, String)> = reports
        .values()
        .filter_map(|r| r.failure.clone())
        .map(|(p, why)| (p, 0, why))
        .collect();
    failures.extend(lost.iter().map(|why| (1, 1, why.clone())));
    if failures.is_empty() {
        if pending.is_empty() {
            if let Some(r) = reports.values().find(|r| r.done) {
                let last = r.clone();
                finish_with(m, st, job, JobPhase::Succeeded, None, Some(&last)).await?;
            } else {
                let why = "rank 0 exited without finishing its training (no `done` report)";
                finish(m, st, job, JobPhase::Failed, Some(why.into())).await?;
            }
        }
        return Ok(());
    }
    let first = *st
        .first_failure
        .entry((job.id.clone(), gen))
        .or_insert_with(Instant::now);
    // A lost node ends the generation at once: whatever else failed, the job moves on
    // without it. Otherwise the others get the grace to report, or to be seen gone.
    let grace = FAILURE_GRACE.max(m.config.node_ttl() + Duration::from_secs(1));
    if lost.is_empty() && !pending.is_empty() && first.elapsed() < grace {
        st.grace_pending = true;
        return Ok(());
    }
    failures.sort();
    let (_, kind, why) = failures.swap_remove(0);
    let cause = if kind == 1 {
        Cause::NodeLost(why)
    } else {
        Cause::Rank(why)
    };
    let failed_nodes: Vec<String> = reports
        .values()
        .filter(|r| r.failure.as_ref().is_some_and(|(p, _)| *p < 2))
        .map(|r| r.node.clone())
        .chain(
            placed
                .keys()
                .filter(|n| !reports.contains_key(**n) && !pending.contains(n))
                .map(|n| n.to_string()),
        )
        .collect();
    let cooling = st.cooling.entry(job.id.clone()).or_default();
    for n in failed_nodes {
        cooling.insert(n, Instant::now());
    }
    next_generation(m, st, job, cause, &reports).await
}

/// Ends generation `job.generation` badly: back to Pending for the next one (placed by
/// [`schedule`] at once if there is room), or Failed when the restart policy is used up.
async fn next_generation(
    m: &JobManager,
    st: &mut State,
    job: &Job,
    cause: Cause,
    reports: &BTreeMap<String, Report>,
) -> Result<(), JobError> {
    st.changed = true;
    let gen = job.generation;
    let max = job.spec.restart.max_restarts;
    let steps_done = reports.values().filter_map(|r| r.step).max();
    let (reason, counted) = match &cause {
        Cause::Rank(r) => (r.clone(), true),
        Cause::NodeLost(r) | Cause::Grow(r) => (r.clone(), false),
    };
    if counted && job.status.restarts >= max {
        return finish(m, st, job, JobPhase::Failed, Some(reason)).await;
    }
    let text = match &cause {
        Cause::Rank(_) => format!(
            "restarting ({} of {max} restarts) after: {reason}",
            job.status.restarts + 1
        ),
        Cause::NodeLost(_) => {
            format!("generation {gen} ended: {reason}; the job moves to the nodes that remain")
        }
        Cause::Grow(_) => {
            format!("generation {gen} ends: {reason}; its ranks save their state for the next")
        }
    };
    let grow = matches!(cause, Cause::Grow(_));
    m.event(
        &job.id,
        EventKind::Phase,
        text,
        json!({"reason": reason, "generation": gen, "node_lost": matches!(cause, Cause::NodeLost(_)), "grow": grow, "step": steps_done,
               "checkpoint": job.status.checkpoint}),
    )
    .await;
    let r = m
        .update_if(&job.id, fence(m, st), |j| {
            if j.generation != gen || j.phase != JobPhase::Running {
                return false;
            }
            if j.cancel_requested {
                j.phase = JobPhase::Cancelled;
                j.status.finished_at = Some(now_rfc3339());
            } else {
                j.phase = JobPhase::Pending;
                j.status.interrupted_at = Some(now_rfc3339());
            }
            j.placement.clear();
            j.teacher_placement.clear();
            if !grow {
                j.status.failure = Some(reason.clone());
            }
            if counted {
                j.status.restarts += 1;
            }
            true
        })
        .await;
    if let Ok(j) = &r {
        if j.phase == JobPhase::Cancelled {
            m.metrics.job_ended(j);
        }
    }
    forget_generation(m, job, gen).await;
    match r {
        Ok(_) | Err(JobError::Stale) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records a job's end: the event first, so whoever sees the terminal phase finds it.
async fn finish(
    m: &JobManager,
    st: &mut State,
    job: &Job,
    phase: JobPhase,
    failure: Option<String>,
) -> Result<(), JobError> {
    finish_with(m, st, job, phase, failure, None).await
}

/// [`finish`], also taking rank 0's last numbers from its node's report (the store may
/// have missed its last progress writes, during an outage).
async fn finish_with(
    m: &JobManager,
    st: &mut State,
    job: &Job,
    phase: JobPhase,
    failure: Option<String>,
    last: Option<&Report>,
) -> Result<(), JobError> {
    st.changed = true;
    let gen = job.generation;
    let msg = match &failure {
        Some(r) => format!("Failed: {r}"),
        None => phase.as_str().to_string(),
    };
    m.event(&job.id, EventKind::Phase, msg, json!(null)).await;
    let r = m
        .update_if(&job.id, fence(m, st), |j| {
            if j.generation != gen || j.phase.is_terminal() {
                return false;
            }
            j.phase = phase;
            j.status.failure = failure.clone();
            j.status.finished_at = Some(now_rfc3339());
            if let Some(last) = last {
                j.status.step = j.status.step.max(last.step.unwrap_or(0));
                j.status.epoch = j.status.total_epochs;
                j.status.samples_per_sec = last.samples_per_sec.or(j.status.samples_per_sec);
                j.status.train_loss = last.train_loss.or(j.status.train_loss);
                j.status.val_accuracy = last.val_accuracy.or(j.status.val_accuracy);
            }
            true
        })
        .await;
    if let Ok(j) = &r {
        m.metrics.job_ended(j);
    }
    forget_generation(m, job, gen).await;
    st.cooling.remove(&job.id);
    st.first_failure.retain(|(id, _), _| id != &job.id);
    tracing::info!(job = %job.id, phase = phase.as_str(), "job ended");
    match r {
        Ok(_) | Err(JobError::Stale) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a finished generation's rendezvous and reports.
async fn forget_generation(m: &JobManager, job: &Job, gen: u64) {
    let txn = Txn {
        compares: vec![],
        success: vec![
            TxnOp::DeletePrefix {
                prefix: m.keys.rendezvous(&job.id, gen),
            },
            TxnOp::DeletePrefix {
                prefix: m.keys.reports(&job.id, gen),
            },
        ],
        failure: vec![],
    };
    if let Err(e) = m.store.txn(txn).await {
        tracing::warn!(job = %job.id, error = %e, "cannot remove an old generation's keys");
    }
}

/// Places Pending jobs, in queue order, on the nodes with room.
async fn schedule(
    m: &JobManager,
    st: &mut State,
    (views, unshared): &(Vec<NodeView>, Vec<String>),
    jobs: Vec<Job>,
) -> Result<(), JobError> {
    let mut running = Load::default();
    // Teacher replicas per node, of the jobs that run.
    let mut hosted: HashMap<String, u32> = HashMap::new();
    for j in jobs.iter().filter(|j| j.phase == JobPhase::Running) {
        running.add(&j.placement);
        for t in &j.teacher_placement {
            *hosted.entry(t.node.clone()).or_default() += 1;
        }
    }
    let now = Instant::now();
    let queue: Vec<&Job> = jobs
        .iter()
        .filter(|j| j.phase == JobPhase::Pending && !j.cancel_requested)
        .collect();
    let demands: Vec<Demand> = queue
        .iter()
        .map(|j| {
            let cooling = st
                .cooling
                .get_mut(&j.id)
                .map(|c| {
                    c.retain(|_, t| now.duration_since(*t) < COOL_DOWN);
                    c.keys().cloned().collect()
                })
                .unwrap_or_default();
            demand(&j.id, &j.spec, cooling)
        })
        .collect();
    for (job, (_, decision)) in queue
        .into_iter()
        .zip(place::place(&demands, views, &running))
    {
        match decision {
            // Paths are resolved by the node that accepted the job: in a cluster every
            // node must mount the shared outputs root at the same path.
            Decision::Place(_)
                if !m.standalone
                    && !std::path::Path::new(&job.spec.output.dir)
                        .starts_with(&m.roots.outputs) =>
            {
                let why = format!(
                    "the job's output dir {} is not under this coordinator's outputs root {}: mount the shared outputs root at the same path on every node",
                    job.spec.output.dir,
                    m.roots.outputs.display()
                );
                if st.waiting.get(&job.id) != Some(&why) {
                    m.event(
                        &job.id,
                        EventKind::Log,
                        format!("waiting: {why}"),
                        json!(null),
                    )
                    .await;
                    st.waiting.insert(job.id.clone(), why);
                }
            }
            Decision::Place(p) => {
                st.waiting.remove(&job.id);
                let teachers = match &job.spec.distill {
                    Some(d) => {
                        let t = place::place_teachers(
                            d.teacher.replicas,
                            job.spec.resources.device,
                            views,
                            &hosted,
                        );
                        for r in &t {
                            *hosted.entry(r.node.clone()).or_default() += 1;
                        }
                        t
                    }
                    None => Vec::new(),
                };
                start(m, st, job, p, teachers).await?;
            }
            Decision::Wait(why) | Decision::Unfit(why) => {
                let why = match unshared.is_empty() {
                    true => why,
                    false => format!("{why}; not used: {}", unshared.join("; ")),
                };
                if st.waiting.get(&job.id) != Some(&why) {
                    m.event(
                        &job.id,
                        EventKind::Log,
                        format!("waiting for nodes: {why}"),
                        json!(null),
                    )
                    .await;
                    st.waiting.insert(job.id.clone(), why);
                }
            }
        }
    }
    Ok(())
}

/// Starts the next generation of `job` on `placement`.
async fn start(
    m: &JobManager,
    st: &State,
    job: &Job,
    placement: Vec<RankPlacement>,
    teachers: Vec<RankPlacement>,
) -> Result<(), JobError> {
    let gen = job.generation + 1;
    let r = m
        .update_if(&job.id, fence(m, st), |j| {
            if j.phase != JobPhase::Pending || j.cancel_requested || j.generation + 1 != gen {
                return false;
            }
            j.phase = JobPhase::Running;
            j.generation = gen;
            j.placement = placement.clone();
            j.teacher_placement = teachers.clone();
            j.status.attempts += 1;
            j.status.started_at.get_or_insert_with(now_rfc3339);
            j.status.generation_started_at = Some(now_rfc3339());
            true
        })
        .await;
    let job = match r {
        Ok(j) => j,
        Err(JobError::Stale) => return Ok(()),
        Err(e) => return Err(e),
    };
    let waited =
        |from: Option<&str>| seconds_between(from?, job.status.generation_started_at.as_deref()?);
    if job.status.attempts == 1 {
        if let Some(q) = waited(Some(&job.created_at)) {
            m.metrics.job_queue.observe(q);
        }
    } else if let Some(r) = waited(job.status.interrupted_at.as_deref()) {
        m.metrics
            .recovery_seconds
            .with_label_values(&["replace"])
            .observe(r);
    }
    let mut spans: Vec<(String, usize, usize)> = Vec::new();
    for (rank, p) in placement.iter().enumerate() {
        match spans.last_mut() {
            Some((n, _, last)) if *n == p.node => *last = rank,
            _ => spans.push((p.node.clone(), rank, rank)),
        }
    }
    let mut on: Vec<String> = spans
        .iter()
        .map(|(n, a, b)| {
            if a == b {
                format!("{n} (rank {a})")
            } else {
                format!("{n} (ranks {a}-{b})")
            }
        })
        .collect();
    for (r, t) in teachers.iter().enumerate() {
        on.push(format!("{} (teacher replica {r})", t.node));
    }
    m.event(
        &job.id,
        EventKind::Phase,
        format!(
            "Running (attempt {}{}): generation {gen} on {}",
            job.status.attempts,
            if gen > 1 { ", resuming" } else { "" },
            on.join(", ")
        ),
        json!({"generation": gen, "placement": placement, "teacher_placement": teachers}),
    )
    .await;
    Ok(())
}
