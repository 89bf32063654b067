//! Runs this node's share of one generation of a job: starts its rank processes
//! (`ferryd worker`) and the job's teacher replicas placed here (`ferryd teacher`: on
//! teacher nodes, or beside rank 0 when the cluster has none); meets the other nodes' ranks through the store (each rank's ring
//! address under the generation's rendezvous prefix); turns rank 0's messages into status
//! updates and events; stops its processes on a cancel, a newer generation, or the end of
//! this node's session; and reports how its ranks ended for the coordinator to decide.
//! A rank that crashes, runs out of memory or aborts inside libtorch fails its job only.
//!
//! A process speaks the protocol (JSON lines) on a pipe of its own (fd 3); its stdout and
//! stderr are log text only, so nothing a model prints can pass for a protocol message.

use std::collections::{BTreeMap, VecDeque};
use std::process::Stdio;

use anyhow::Context as _;
use ferry_cluster::api::{EventKind, Job, TeacherRecord};
use ferry_cluster::store::{Txn, TxnOp};
use ferry_cluster::time::now_rfc3339;
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use super::coordinator::Report;
use super::{JobError, JobManager};
use crate::protocol::{Control, Peers, SaveAnswer, Stop, Teachers, WorkerMessage, WorkerPlan};
use crate::session::SessionInfo;

/// Log lines (stdout and stderr) kept per process to explain a failure.
const LOG_TAIL: usize = 20;
/// Log lines forwarded as events per attempt (the rest only count).
const LOG_EVENTS: usize = 200;
/// The longest log line kept (the rest of a longer line is dropped, and says so).
const MAX_LOG_LINE: usize = 4096;
/// The longest protocol line read.
const MAX_PROTOCOL_LINE: usize = 1 << 20;
/// The fd a process writes its protocol lines to.
pub const PROTOCOL_FD: i32 = 3;
/// How long ranks stopped for a newer generation get to save their state and exit before
/// they are killed.
const SAVE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How this node's ranks of a generation ended.
#[derive(Default)]
struct Local {
    done: bool,
    cancelled: bool,
    /// The job moved to another generation, or this node's session ended: nothing to report.
    superseded: bool,
    failures: Vec<(u8, String)>,
    step: Option<u64>,
    samples_per_sec: Option<f64>,
    train_loss: Option<f64>,
    val_accuracy: Option<f64>,
}

/// Runs this node's ranks of `job`'s current generation, then reports how they ended.
/// Never panics, never returns an error: every failure ends up in the report.
pub async fn run(m: &JobManager, job: Job, session: SessionInfo) {
    let id = job.id.clone();
    let gen = job.generation;
    let hosts_rank0 = job.placement.first().is_some_and(|p| p.node == m.node);
    let local = match attempt(m, &job, session).await {
        Ok(l) => l,
        Err(e) => Local {
            failures: vec![(0, format!("node {}: {e:#}", m.node))],
            ..Default::default()
        },
    };
    let label = if local.superseded || local.cancelled {
        "cancelled"
    } else if local.failures.is_empty() {
        "succeeded"
    } else {
        "failed"
    };
    m.metrics.rank_exits.with_label_values(&[label]).inc();
    if hosts_rank0 {
        m.metrics.retire_job(&id, &job.name);
    }
    if local.superseded {
        tracing::info!(job = %id, generation = gen, "ranks stopped: the job moved on");
        return;
    }
    let mut failures = local.failures;
    failures.sort_by_key(|(p, _)| *p);
    let report = Report {
        node: m.node.clone(),
        done: local.done,
        cancelled: local.cancelled,
        failure: failures.into_iter().next(),
        step: local.step,
        samples_per_sec: local.samples_per_sec,
        train_loss: local.train_loss,
        val_accuracy: local.val_accuracy,
    };
    let Some(fence) = m.membership.fence() else {
        return;
    };
    let txn = Txn {
        compares: vec![fence],
        success: vec![TxnOp::Put {
            key: m.keys.report(&id, gen, &m.node),
            value: serde_json::to_vec(&report).expect("report serialises"),
            lease: 0,
        }],
        failure: vec![],
    };
    // The coordinator acts on the report; retry while the store is away.
    for i in 0..30u32 {
        match m.store.txn(txn.clone()).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot write this node's report; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(i + 1))).await;
            }
        }
    }
}

/// A teacher replica of the running attempt.
#[derive(Default)]
struct TeacherState {
    pid: u32,
    /// It has reported its address at least once (since its last start).
    ready: bool,
    restarts: u32,
    reported: Option<String>,
    tail: VecDeque<String>,
    /// Its environment (its GPU, on a CUDA node), kept for restarts.
    env: Vec<(&'static str, std::ffi::OsString)>,
    /// It exited and is not restarted.
    gone: bool,
}

/// `env` with the one GPU of a placement's `device` (`cuda:N`) visible, if it names one.
fn with_device(
    env: &[(&'static str, std::ffi::OsString)],
    device: &str,
) -> Vec<(&'static str, std::ffi::OsString)> {
    let mut env = env.to_vec();
    let gpu = device
        .strip_prefix("cuda:")
        .and_then(|g| g.parse::<usize>().ok());
    if let Some(dev) = gpu.and_then(|g| crate::gpu::visible_device(g, usize::MAX)) {
        env.push(("CUDA_VISIBLE_DEVICES", dev.into()));
    }
    env
}

/// Registers a ready teacher in the store under this node's lease: it goes when the
/// replica exits or the node does.
async fn register_teacher(
    m: &JobManager,
    job: &Job,
    replica: u32,
    addr: &str,
    t: &TeacherState,
    session: SessionInfo,
) -> anyhow::Result<()> {
    let record = TeacherRecord {
        job: job.id.clone(),
        replica,
        addr: addr.to_string(),
        node: m.node.clone(),
        pid: t.pid,
        registered_at: now_rfc3339(),
    };
    m.store
        .put(
            &m.keys.teacher(&job.id, replica),
            serde_json::to_vec(&record)?,
            session.lease,
        )
        .await?;
    Ok(())
}

/// Writes one line to every rank still listening on stdin.
async fn tell_ranks(stdins: &mut BTreeMap<usize, Option<tokio::process::ChildStdin>>, line: &str) {
    for slot in stdins.values_mut() {
        tell(slot, line).await;
    }
}

/// Writes one line to a rank's stdin, and forgets the stdin once the rank stopped reading.
async fn tell(slot: &mut Option<tokio::process::ChildStdin>, line: &str) {
    if let Some(stdin) = slot {
        if stdin.write_all(line.as_bytes()).await.is_err() {
            *slot = None;
        }
    }
}

/// The teacher addresses registered for `job`, in replica order.
async fn teacher_addrs(m: &JobManager, job: &Job) -> anyhow::Result<Vec<String>> {
    Ok(m.store
        .range(&m.keys.teachers(&job.id))
        .await?
        .iter()
        .filter_map(|kv| serde_json::from_slice::<TeacherRecord>(&kv.value).ok())
        .map(|t| t.addr)
        .collect())
}

/// The ring addresses published for `job`'s generation, when every rank has published.
async fn peers_if_complete(
    m: &JobManager,
    job: &Job,
    world: usize,
) -> anyhow::Result<Option<Vec<String>>> {
    let kvs = m
        .store
        .range(&m.keys.rendezvous(&job.id, job.generation))
        .await?;
    if kvs.len() < world {
        return Ok(None);
    }
    let mut by_rank = vec![None; world];
    for kv in kvs {
        let rank = kv
            .key
            .rsplit('/')
            .next()
            .and_then(|r| r.parse::<usize>().ok());
        if let Some(r) = rank.filter(|r| *r < world) {
            by_rank[r] = Some(String::from_utf8_lossy(&kv.value).to_string());
        }
    }
    Ok(by_rank.into_iter().collect())
}

/// A watch on `prefix` from now; `None` (after a pause) while the store is unreachable,
/// so that an outage of the store never stops the ranks: the caller tries again later.
async fn rewatch(m: &JobManager, prefix: &str) -> Option<ferry_cluster::store::Watcher> {
    match m.store.watch(prefix, None).await {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::debug!(%prefix, error = %e, "cannot watch; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            None
        }
    }
}

/// Waits for the next change of an optional watch; without one, for a retry interval.
async fn next_change(
    w: &mut Option<ferry_cluster::store::Watcher>,
) -> Option<Result<ferry_cluster::store::WatchEvent, ferry_cluster::store::StoreError>> {
    match w {
        Some(w) => w.recv().await,
        None => {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            None
        }
    }
}

/// Why the local attempt should stop, from a new version of the job record.
#[derive(Debug, PartialEq)]
enum Superseded {
    Cancelled,
    /// The job moved on: a newer generation, or back to the queue for one, or it ended.
    Moved {
        /// It goes on (not ended): the ranks save the state they hold for the next
        /// generation. A save never replaces a checkpoint (`checkpoint::write_new`), so
        /// one that lands after the next generation has loaded an older checkpoint only
        /// leaves a valid state of this job, newer than that one.
        save: bool,
    },
}

fn supersedes(job: &Job, gen: u64) -> Option<Superseded> {
    use ferry_cluster::api::JobPhase;
    if job.cancel_requested {
        Some(Superseded::Cancelled)
    } else if job.generation != gen || job.phase != JobPhase::Running {
        let save = matches!(job.phase, JobPhase::Running | JobPhase::Pending);
        Some(Superseded::Moved { save })
    } else {
        None
    }
}

async fn attempt(m: &JobManager, job: &Job, session: SessionInfo) -> anyhow::Result<Local> {
    let gen = job.generation;
    let world = job.placement.len().max(1);
    let mine: Vec<usize> = (0..world)
        .filter(|&r| job.placement.get(r).is_some_and(|p| p.node == m.node))
        .collect();
    let hosts_rank0 = mine.first() == Some(&0);
    let scratch = m.scratch_dir.join(&job.id);
    std::fs::create_dir_all(&scratch)?;
    let plan = WorkerPlan {
        job_id: job.id.clone(),
        spec: job.spec.clone(),
        output_dir: job.spec.output.dir.clone(),
        threads: job
            .spec
            .resources
            .threads
            .unwrap_or_else(|| m.config.threads()),
        resume: gen > 1,
        progress_interval_ms: m.config.progress_interval_ms,
        bind_ip: m.config.data_plane_ip.clone(),
        collective_timeout_ms: m.config.collective_timeout_ms,
        node: m.node.clone(),
        generation: gen,
        scratch_dir: scratch.display().to_string(),
        roots: crate::protocol::PlanRoots {
            data: m.roots.data.display().to_string(),
            models: m.roots.models.display().to_string(),
            outputs: m.roots.outputs.display().to_string(),
        },
        sandbox: m.config.rank_sandbox.clone(),
    };
    let plan_path = m.plans_dir.join(format!("{}-g{gen}.json", job.id));
    std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan)?)?;
    let _plan_file = RemoveOnDrop(plan_path.clone());

    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let (kill_tx, kill_rx) = tokio::sync::watch::channel(false);
    // However this attempt ends (an error included), its processes are killed.
    let kill_tx = KillOnDrop(kill_tx);

    // CUDA processes find NCCL through a `libnccl.so` link on their library path.
    let cuda = job.spec.resources.device == ferry_cluster::spec::Device::Cuda;
    let mut gpu_env: Vec<(&str, std::ffi::OsString)> = Vec::new();
    // A temporary dir of the job's own (the sandbox gives no other).
    let tmp = scratch.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    // Ranks of another user own what they write: the job's output dir and its scratch.
    if let Some((uid, gid)) = m.rank_ids {
        for dir in [
            std::path::Path::new(&job.spec.output.dir),
            scratch.as_path(),
        ] {
            chown_tree(dir, uid, gid).with_context(|| {
                format!("cannot give {} to rank_user (uid {uid})", dir.display())
            })?;
        }
    }
    gpu_env.push(("TMPDIR", tmp.into_os_string()));
    if cuda {
        let linked = crate::gpu::find_nccl(m.config.nccl_library.as_deref()).and_then(|lib| {
            crate::gpu::nccl_link_dir(&m.config.data_dir, &lib)
                .map_err(|e| format!("cannot link {}: {e}", lib.display()))
        });
        match linked {
            Ok(dir) => gpu_env.push(("LD_LIBRARY_PATH", crate::gpu::library_path_with(&dir))),
            // One rank needs no collective; several cannot do without NCCL.
            Err(e) if world > 1 => anyhow::bail!("{world} CUDA ranks need NCCL: {e}"),
            Err(_) => {}
        }
    }

    // Watch first, so that no change after the placement is missed.
    let mut watch = Some(
        m.store
            .watch(&m.keys.job(&job.id), Some(job.revision + 1))
            .await?,
    );
    let mut rdzv_watch = Some(
        m.store
            .watch(&m.keys.rendezvous(&job.id, gen), None)
            .await?,
    );
    let mut session_changes = m.membership.subscribe();

    // Teachers first: they load their model while the ranks load theirs. They run where
    // the generation placed them (teacher nodes), or else beside rank 0.
    let distill = job.spec.distill.is_some();
    let replicas = job.spec.distill.as_ref().map_or(0, |d| d.teacher.replicas);
    let my_replicas: Vec<(u32, String)> = if job.teacher_placement.is_empty() {
        match hosts_rank0 {
            true => (0..replicas).map(|r| (r, String::new())).collect(),
            false => Vec::new(),
        }
    } else {
        job.teacher_placement
            .iter()
            .enumerate()
            .filter(|(_, p)| p.node == m.node && p.session == session.session)
            .map(|(r, p)| (r as u32, p.device.clone()))
            .collect()
    };
    let max_teacher_restarts = job
        .spec
        .distill
        .as_ref()
        .map_or(0, |d| d.teacher.max_restarts);
    let mut teachers: BTreeMap<u32, TeacherState> = BTreeMap::new();
    let mut teacher_watch = None;
    if distill {
        teacher_watch = Some(m.store.watch(&m.keys.teachers(&job.id), None).await?);
    }
    for (r, device) in my_replicas {
        // A registration left by an earlier generation names a dead process.
        let _ = m.store.delete(&m.keys.teacher(&job.id, r)).await;
        let env = with_device(&gpu_env, &device);
        let (pid, _stdin) = spawn_proc(
            m,
            &plan_path,
            Proc::Teacher(r),
            world,
            tx.clone(),
            kill_rx.clone(),
            &env,
        )?;
        m.event_for(
            session,
            &job.id,
            EventKind::Log,
            format!("teacher replica {r} started on node {} (pid {pid})", m.node),
            json!({"teacher": r, "pid": pid, "node": m.node}),
        )
        .await;
        teachers.insert(
            r,
            TeacherState {
                pid,
                env,
                ..Default::default()
            },
        );
    }
    let mut local = Local::default();
    let mut stdins = BTreeMap::new();
    for &rank in &mine {
        // A cancel (or a newer generation) while ranks start stops the starting: what runs
        // is stopped below, what has not started never starts.
        use futures_util::FutureExt;
        while let Some(Some(Ok(ev))) = next_change(&mut watch).now_or_never() {
            let Some(stop) = serde_json::from_slice::<Job>(&ev.kv().value)
                .ok()
                .and_then(|j| supersedes(&j, gen))
            else {
                continue;
            };
            match stop {
                Superseded::Cancelled => local.cancelled = true,
                Superseded::Moved { .. } => local.superseded = true,
            }
            let _ = kill_tx.send(true);
        }
        if local.cancelled || local.superseded {
            break;
        }
        let mut env = with_device(&gpu_env, &job.placement[rank].device);
        // The node's first rank saves the state its ranks hold if their ring breaks.
        if mine.first() == Some(&rank) {
            env.push(("FERRY_SAVER", "1".into()));
        }
        let (pid, stdin) = spawn_proc(
            m,
            &plan_path,
            Proc::Rank(rank),
            world,
            tx.clone(),
            kill_rx.clone(),
            &env,
        )?;
        stdins.insert(rank, Some(stdin));
        m.event_for(
            session,
            &job.id,
            EventKind::Log,
            format!("rank {rank} started on node {} (pid {pid})", m.node),
            json!({"rank": rank, "pid": pid, "node": m.node, "generation": gen}),
        )
        .await;
    }

    let mut tails: BTreeMap<usize, VecDeque<String>> =
        mine.iter().map(|&r| (r, VecDeque::new())).collect();
    let mut reported: BTreeMap<usize, String> = BTreeMap::new();
    // Whether rank 0 has reported a step yet (the first one ends a recovery), and when the
    // ranks joined their ring.
    let mut trained = false;
    let mut joined_at: Option<String> = None;
    let (mut log_lines, mut exited, mut peers_sent) = (0usize, 0usize, false);
    // After the first failure, the others get a moment to report why they stopped.
    let mut grace: Option<tokio::time::Instant> = None;

    // A node that only serves teachers keeps them until the job moves on.
    let teacher_only = mine.is_empty();
    loop {
        if !teacher_only && exited >= stdins.len() {
            break;
        }
        let over = local.cancelled || local.superseded || !local.failures.is_empty();
        if teacher_only && (over || teachers.values().all(|t| t.gone)) {
            break;
        }
        let grace_at = grace
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            ev = rx.recv() => {
                let Some((proc, ev)) = ev else { break };
                let rank = match proc {
                    Proc::Rank(rank) => rank,
                    Proc::Teacher(r) => {
                        let Some(t) = teachers.get_mut(&r) else { continue };
                        match ev {
                            RankEvent::Protocol(l) => match serde_json::from_str::<WorkerMessage>(&l) {
                                Ok(WorkerMessage::TeacherReady { addr, .. }) => {
                                    t.ready = true;
                                    register_teacher(m, job, r, &addr, t, session).await?;
                                    m.event_for(session, &job.id, EventKind::Log, format!("teacher replica {r} serves soft labels at {addr}"), json!({"teacher": r, "addr": addr, "pid": t.pid})).await;
                                }
                                Ok(WorkerMessage::Failed { reason }) => t.reported = Some(reason),
                                Ok(WorkerMessage::Log { message }) => m.event_for(session, &job.id, EventKind::Log, message, json!({"teacher": r})).await,
                                _ => m.event_for(session, &job.id, EventKind::Log, format!("unexpected protocol line: {l}"), json!({"teacher": r})).await,
                            },
                            RankEvent::Log(l) => log_line(m, job, session, &mut t.tail, &mut log_lines, l, json!({"teacher": r, "stream": "output"})).await,
                            RankEvent::Exited(status) => {
                                let _ = m.store.delete(&m.keys.teacher(&job.id, r)).await;
                                if local.cancelled || local.superseded || local.done || grace.is_some() {
                                    continue;
                                }
                                let status = status?;
                                let (_, why) = explain_exit(proc, &status, t.reported.take().as_ref(), &t.tail);
                                if !t.ready {
                                    // It never served: a bad teacher spec, not an outage.
                                    local.failures.push((0, format!("{why} before serving (check distill.teacher)")));
                                    let _ = kill_tx.send(true);
                                } else if t.restarts < max_teacher_restarts {
                                    t.restarts += 1;
                                    t.ready = false;
                                    t.tail.clear();
                                    m.event_for(session, &job.id, EventKind::Log, format!("{why}; restarting it ({} of {max_teacher_restarts} restarts)", t.restarts), json!({"teacher": r})).await;
                                    let (pid, _stdin) = spawn_proc(m, &plan_path, proc, world, tx.clone(), kill_rx.clone(), &t.env)?;
                                    t.pid = pid;
                                } else {
                                    t.gone = true;
                                    m.event_for(session, &job.id, EventKind::Log, format!("{why}; not restarted (distill.teacher.max_restarts = {max_teacher_restarts} used up)"), json!({"teacher": r})).await;
                                }
                            }
                        }
                        continue;
                    }
                };
                match ev {
                    RankEvent::Protocol(l) => match serde_json::from_str::<WorkerMessage>(&l) {
                        Ok(WorkerMessage::Rendezvous { addr, .. }) => {
                            let key = m.keys.rendezvous_rank(&job.id, gen, rank);
                            let fence = m.membership.fence().ok_or(JobError::Stale)?;
                            let txn = Txn {
                                compares: vec![fence],
                                success: vec![TxnOp::Put { key, value: addr.into_bytes(), lease: session.lease }],
                                failure: vec![],
                            };
                            if !m.store.txn(txn).await?.succeeded {
                                return Err(JobError::Stale.into());
                            }
                        }
                        Ok(WorkerMessage::Done { files, samples_per_sec }) => {
                            local.done = true;
                            local.samples_per_sec = Some(samples_per_sec);
                            let _ = m.update_gen(&job.id, (gen, session), |j| j.status.samples_per_sec = Some(samples_per_sec)).await;
                            m.event_for(session, &job.id, EventKind::Log, format!("wrote {}", files.join(", ")), json!({"files": files})).await;
                        }
                        Ok(WorkerMessage::Failed { reason }) => {
                            reported.insert(rank, reason);
                        }
                        Ok(WorkerMessage::MaySave { step }) => {
                            // Checked against the store, not this node's view: after a pause
                            // the node may not know yet that its lease is gone.
                            let fence = m.membership.fence_for(session);
                            let save = !local.cancelled && m.fence_holds(&[fence]).await.unwrap_or(false);
                            if !save && !local.cancelled {
                                tracing::warn!(job = %job.id, generation = gen, rank, step, "rank {rank} may not save its state: this node's session {} has ended (or the store cannot say)", session.session);
                            }
                            let line = format!("{}\n", serde_json::to_string(&Control::Save(SaveAnswer { save }))?);
                            if let Some(slot) = stdins.get_mut(&rank) {
                                tell(slot, &line).await;
                            }
                        }
                        Ok(WorkerMessage::Rescued { step, path, written, reason }) => {
                            let what = if written { "saved" } else { "holds, already checkpointed," };
                            m.event_for(session,
                                &job.id,
                                EventKind::Checkpoint,
                                format!("rank {rank} on node {} {what} the state of step {step} when its ring broke ({reason}): {path}", m.node),
                                json!({"rank": rank, "node": m.node, "step": step, "path": path, "written": written, "generation": gen, "rescue": true}),
                            )
                            .await;
                        }
                        Ok(WorkerMessage::Timing(t)) => m.metrics.record_timing(&job.id, &job.name, &t),
                        Ok(WorkerMessage::Link { rank, peer, bytes_per_second }) => {
                            m.metrics.record_link(&job.id, &job.name, rank, peer, bytes_per_second)
                        }
                        Ok(msg) if rank == 0 => {
                            if matches!(msg, WorkerMessage::Progress { .. }) && !trained {
                                trained = true;
                                recovered(m, job, joined_at.as_deref());
                            }
                            match &msg {
                                WorkerMessage::Progress { step, loss, .. } => {
                                    local.step = Some(*step);
                                    local.train_loss = Some(*loss);
                                }
                                WorkerMessage::Eval { step, val_accuracy, .. } => {
                                    local.step = Some(local.step.unwrap_or(0).max(*step));
                                    local.val_accuracy = Some(*val_accuracy);
                                }
                                _ => {}
                            }
                            handle(m, job, session, msg).await;
                        }
                        // Other ranks report what only they saw (a skipped image in their shard).
                        Ok(WorkerMessage::Log { message }) => m.event_for(session, &job.id, EventKind::Log, message, json!({"rank": rank})).await,
                        Ok(_) => {}
                        Err(_) => m.event_for(session, &job.id, EventKind::Log, format!("unreadable protocol line: {l}"), json!({"rank": rank})).await,
                    },
                    RankEvent::Log(l) => log_line(m, job, session, tails.entry(rank).or_default(), &mut log_lines, l, json!({"rank": rank, "stream": "output"})).await,
                    RankEvent::Exited(status) => {
                        exited += 1;
                        stdins.insert(rank, None);
                        let status = status?;
                        if !status.success() && !local.cancelled && !local.superseded {
                            let tail = tails.get(&rank).cloned().unwrap_or_default();
                            local.failures.push(explain_exit(proc, &status, reported.get(&rank), &tail));
                            if mine.len() == 1 {
                                continue;
                            }
                            grace.get_or_insert_with(|| tokio::time::Instant::now() + std::time::Duration::from_secs(2));
                        }
                    }
                }
            }
            ev = next_change(&mut rdzv_watch), if !peers_sent => {
                if !matches!(ev, Some(Ok(_))) {
                    // The watch ended (the store restarted, or it fell behind): watch again, then list.
                    rdzv_watch = rewatch(m, &m.keys.rendezvous(&job.id, gen)).await;
                }
                if let Ok(Some(peers)) = peers_if_complete(m, job, world).await {
                    peers_sent = true;
                    joined_at = Some(now_rfc3339());
                    let line = format!("{}\n", serde_json::to_string(&Control::Peers(Peers { peers: peers.clone() }))?);
                    tell_ranks(&mut stdins, &line).await;
                    if hosts_rank0 {
                        m.event_for(session, &job.id, EventKind::Log, format!("{world} ranks joined the ring"), json!({"peers": peers, "generation": gen})).await;
                    }
                }
            }
            ev = next_change(&mut teacher_watch), if distill => {
                if !matches!(ev, Some(Ok(_))) {
                    teacher_watch = rewatch(m, &m.keys.teachers(&job.id)).await;
                }
                // Students learn the replicas from the store's registrations, never from the
                // processes directly, on whichever node they run.
                if let Ok(teachers) = teacher_addrs(m, job).await {
                    let line = format!("{}\n", serde_json::to_string(&Control::Teachers(Teachers { teachers }))?);
                    tell_ranks(&mut stdins, &line).await;
                }
            }
            _ = tokio::time::sleep_until(grace_at), if grace.is_some() => {
                let _ = kill_tx.send(true);
                grace = None;
            }
            _ = session_changes.changed() => {
                if m.membership.current() != Some(session) && !local.superseded {
                    tracing::warn!(job = %job.id, generation = gen, "this node's session ended: stopping its ranks");
                    local.superseded = true;
                    let _ = kill_tx.send(true);
                }
            }
            ev = next_change(&mut watch), if !local.cancelled && !local.superseded => {
                let check = |j: &Job| supersedes(j, gen);
                let stop = match ev {
                    Some(Ok(ev)) => serde_json::from_slice::<Job>(&ev.kv().value).ok().and_then(|j| check(&j)),
                    // The watch ended (lagged, closed, the store restarted): read the record, watch again.
                    _ => {
                        watch = rewatch(m, &m.keys.job(&job.id)).await;
                        m.get(&job.id).await.ok().and_then(|j| check(&j))
                    }
                };
                match stop {
                    Some(Superseded::Cancelled) => { local.cancelled = true; let _ = kill_tx.send(true); }
                    Some(Superseded::Moved { save: false }) => { local.superseded = true; let _ = kill_tx.send(true); }
                    Some(Superseded::Moved { save: true }) => {
                        // The ranks break their ring, save what they hold and exit; the next
                        // generation starts here once they have (one local attempt at a time).
                        local.superseded = true;
                        let why = format!("generation {gen} is over; a newer one starts");
                        let line = format!("{}\n", serde_json::to_string(&Control::Stop(Stop { stop: why }))?);
                        tell_ranks(&mut stdins, &line).await;
                        grace = Some(tokio::time::Instant::now() + SAVE_GRACE);
                    }
                    None => {}
                }
            }
        }
    }
    let _ = kill_tx.send(true);
    for r in teachers.keys() {
        let _ = m.store.delete(&m.keys.teacher(&job.id, *r)).await;
    }
    if local.cancelled || local.superseded {
        local.failures.clear();
    }
    // The job is over for good: its node-local files go (a generation that failed keeps
    // them for the next one, which may run here; the agent removes what a failed job left).
    if local.done || local.cancelled {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(local)
}

/// Keeps a process's log line in its tail, and forwards it as an event while the
/// attempt's budget of log events lasts.
async fn log_line(
    m: &JobManager,
    job: &Job,
    session: SessionInfo,
    tail: &mut VecDeque<String>,
    count: &mut usize,
    line: String,
    data: serde_json::Value,
) {
    if tail.len() == LOG_TAIL {
        tail.pop_front();
    }
    tail.push_back(line.clone());
    *count += 1;
    if *count <= LOG_EVENTS {
        m.event_for(session, &job.id, EventKind::Log, line, data)
            .await;
    } else if *count == LOG_EVENTS + 1 {
        m.event_for(
            session,
            &job.id,
            EventKind::Log,
            format!("more output than {LOG_EVENTS} lines: the rest of this attempt's output is not kept as events (its last {LOG_TAIL} lines go into a failure's reason)"),
            json!({"dropped_after": LOG_EVENTS}),
        )
        .await;
    }
}

/// Gives `dir` and everything below it to `uid:gid`, following no link (a link itself is
/// given, not what it points to).
fn chown_tree(dir: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if meta.is_dir() {
        for e in std::fs::read_dir(dir)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Removes the plan file when the attempt ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A process of a job: a training rank, or a replica of its distillation teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proc {
    Rank(usize),
    Teacher(u32),
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proc::Rank(r) => write!(f, "rank {r}"),
            Proc::Teacher(r) => write!(f, "teacher replica {r}"),
        }
    }
}

/// What a process's task reports to the supervisor, in the order the process produced it.
enum RankEvent {
    /// A line on its protocol pipe.
    Protocol(String),
    /// A line of its stdout or stderr.
    Log(String),
    Exited(std::io::Result<std::process::ExitStatus>),
}

/// Reads one line of at most `max` bytes (the rest of a longer line is dropped, and the
/// line says how much); `None` at the end of the stream.
async fn next_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut dropped = 0usize;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            if buf.is_empty() && dropped == 0 {
                return Ok(None);
            }
            break;
        }
        let newline = avail.iter().position(|&b| b == b'\n');
        let chunk = &avail[..newline.unwrap_or(avail.len())];
        let take = chunk.len().min(max.saturating_sub(buf.len()));
        buf.extend_from_slice(&chunk[..take]);
        dropped += chunk.len() - take;
        let used = newline.map_or(avail.len(), |i| i + 1);
        r.consume(used);
        if newline.is_some() {
            break;
        }
    }
    let mut line = String::from_utf8_lossy(&buf).into_owned();
    if dropped > 0 {
        line.push_str(&format!(" [... {dropped} more bytes dropped]"));
    }
    Ok(Some(line))
}

/// Forwards every line of `r` as `wrap(line)` to `tx`.
fn forward<R: AsyncBufRead + Unpin + Send + 'static>(
    mut r: R,
    max: usize,
    proc: Proc,
    wrap: fn(String) -> RankEvent,
    tx: tokio::sync::mpsc::Sender<(Proc, RankEvent)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(l)) = next_line(&mut r, max).await {
            if tx.send((proc, wrap(l))).await.is_err() {
                return;
            }
        }
    })
}

/// A pipe for a child's protocol lines: (read end, write end), both close-on-exec.
fn protocol_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    #[allow(unsafe_code)]
    // SAFETY: pipe2 writes two new descriptors into `fds`, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

/// Starts `proc` (of a job of `world` ranks); its task forwards its output, then its exit,
/// to `tx`, and kills it when `kill` turns true.
fn spawn_proc(
    m: &JobManager,
    plan_path: &std::path::Path,
    proc: Proc,
    world: usize,
    tx: tokio::sync::mpsc::Sender<(Proc, RankEvent)>,
    mut kill: tokio::sync::watch::Receiver<bool>,
    env: &[(&str, std::ffi::OsString)],
) -> anyhow::Result<(u32, tokio::process::ChildStdin)> {
    use std::os::fd::AsRawFd;
    let mut cmd = Command::new(&m.exe);
    if let Some((uid, gid)) = m.rank_ids {
        // The standard library drops supplementary groups, then sets gid and uid.
        cmd.uid(uid).gid(gid);
    }
    // The model runs in this process: it gets no secret of the daemon's.
    for secret in super::RANK_HIDDEN_VARIABLES {
        cmd.env_remove(secret);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    match proc {
        Proc::Rank(rank) => cmd
            .arg("worker")
            .arg("--plan")
            .arg(plan_path)
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--world-size")
            .arg(world.to_string()),
        Proc::Teacher(replica) => cmd
            .arg("teacher")
            .arg("--plan")
            .arg(plan_path)
            .arg("--replica")
            .arg(replica.to_string()),
    };
    let (proto_read, proto_write) = protocol_pipe()?;
    let write_fd = proto_write.as_raw_fd();
    cmd.env("FERRY_PROTOCOL_FD", PROTOCOL_FD.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[allow(unsafe_code)]
    // SAFETY: prctl, dup2 and fcntl are async-signal-safe. PDEATHSIG makes the rank die
    // with the daemon, so a restarted daemon never finds an orphan still writing the job's
    // output; the protocol pipe's write end becomes the child's fd 3 (without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Nothing the process execs gains privileges (setuid binaries, file caps).
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            if write_fd == PROTOCOL_FD {
                if libc::fcntl(PROTOCOL_FD, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(write_fd, PROTOCOL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {proc} ({}): {e}", m.exe.display()))?;
    // Only the child writes: its exit closes the pipe.
    drop(proto_write);
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take().expect("piped");
    let proto = tokio::net::unix::pipe::Receiver::from_owned_fd(proto_read)?;
    let readers = [
        forward(
            BufReader::new(proto),
            MAX_PROTOCOL_LINE,
            proc,
            RankEvent::Protocol,
            tx.clone(),
        ),
        forward(
            BufReader::new(child.stdout.take().expect("piped")),
            MAX_LOG_LINE,
            proc,
            RankEvent::Log,
            tx.clone(),
        ),
        forward(
            BufReader::new(child.stderr.take().expect("piped")),
            MAX_LOG_LINE,
            proc,
            RankEvent::Log,
            tx.clone(),
        ),
    ];
    tokio::spawn(async move {
        let status = tokio::select! {
            st = child.wait() => st,
            _ = kill_requested(&mut kill) => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        // Its output first, then its exit (a process it left behind holding the pipes
        // open gets a moment, not forever).
        for r in readers {
            let abort = r.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), r)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let _ = tx.send((proc, RankEvent::Exited(status))).await;
    });
    Ok((pid, stdin))
}

/// Asks every rank of an attempt to be killed, at the latest when dropped.
struct KillOnDrop(tokio::sync::watch::Sender<bool>);

impl KillOnDrop {
    fn send(&self, kill: bool) -> Result<(), tokio::sync::watch::error::SendError<bool>> {
        self.0.send(kill)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// Resolves once the supervisor asks for the ranks to be killed (never, if it goes away).
async fn kill_requested(kill: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let requested = *kill.borrow_and_update();
        if requested {
            return;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Why a rank stopped, ranked so that the cause of a failure is reported, not its echo:
/// a rank that crashed or was killed explains the others' "lost the connection" errors.
fn explain_exit(
    who: Proc,
    status: &std::process::ExitStatus,
    reported: Option<&String>,
    tail: &VecDeque<String>,
) -> (u8, String) {
    use std::os::unix::process::ExitStatusExt;
    if let Some(reason) = reported {
        let echo = reason.contains("lost the connection") || reason.contains("is stalled");
        return (if echo { 2 } else { 0 }, format!("{who}: {reason}"));
    }
    let how = match status.signal() {
        Some(libc::SIGKILL) => "was killed (SIGKILL; out of memory, or killed by hand)".to_string(),
        Some(libc::SIGABRT) => "aborted (SIGABRT, usually a libtorch assertion)".to_string(),
        Some(libc::SIGSEGV) => "crashed (SIGSEGV)".to_string(),
        Some(s) => format!("was killed by signal {s}"),
        None => format!("exited with status {}", status.code().unwrap_or(-1)),
    };
    match tail.iter().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => (1, format!("{who} {how}; last output: {l}")),
        None => (1, format!("{who} {how}")),
    }
}

/// What a job is, for `ferry_job_info`: (strategy, arch, device, ranks, precision).
fn job_info(job: &Job) -> [String; 5] {
    let s = &job.spec;
    let strategy = if s.distill.is_some() {
        "distillation"
    } else if !s.model.freeze.is_empty() {
        "feature_extraction"
    } else if s.model.init.is_some() {
        "parameter_transfer"
    } else {
        "scratch"
    };
    // The values as a spec spells them (`arch: resnet18`, `device: cuda`, ...).
    let spelled = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
    [
        strategy.into(),
        spelled(json!(s.model.arch)),
        spelled(json!(s.resources.device)),
        s.resources.ranks.to_string(),
        spelled(json!(s.train.precision)),
    ]
}

/// The first step of a generation after the first one: the job has recovered from the
/// end of the one before (a node lost, a rank failed, or the job grew back). Times the
/// parts this node saw: `rendezvous` (placement to the ring joined), `first_step` (the ring
/// joined, or the placement in a one-rank job, to the first step) and `total`.
fn recovered(m: &JobManager, job: &Job, joined_at: Option<&str>) {
    use ferry_cluster::time::seconds_between;
    let Some(interrupted) = job.status.interrupted_at.as_deref() else {
        return;
    };
    if job.generation < 2 {
        return;
    }
    let now = now_rfc3339();
    let placed = job.status.generation_started_at.as_deref();
    m.metrics
        .recoveries
        .with_label_values(&[&job.id, &job.name])
        .inc();
    let parts = [
        ("total", Some(interrupted), Some(now.as_str())),
        ("rendezvous", placed, joined_at),
        ("first_step", joined_at.or(placed), Some(now.as_str())),
    ];
    for (part, from, to) in parts {
        if let Some(secs) = from.zip(to).and_then(|(f, t)| seconds_between(f, t)) {
            m.metrics
                .recovery_seconds
                .with_label_values(&[part])
                .observe(secs);
        }
    }
}

/// Turns one rank message into a status update and an event.
async fn handle(m: &JobManager, job: &Job, session: SessionInfo, msg: WorkerMessage) {
    let id = &job.id;
    let gen = job.generation;
    let labels = [id.as_str(), job.name.as_str()];
    match msg {
        WorkerMessage::Started {
            total_steps,
            epochs,
            start_step,
            ref resumed_from,
            ..
        } => {
            m.metrics.touch_job(id, &job.name);
            let info = job_info(job);
            m.metrics
                .set_job_info(id, &job.name, info.each_ref().map(String::as_str));
            m.metrics
                .job_total_steps
                .with_label_values(&labels)
                .set(total_steps as f64);
            m.metrics
                .job_generation
                .with_label_values(&labels)
                .set(gen as f64);
            let _ = m
                .update_gen(id, (gen, session), |j| {
                    j.status.total_steps = total_steps;
                    j.status.total_epochs = epochs;
                    j.status.step = start_step;
                })
                .await;
            // The last step the job's record holds from earlier generations (a lower bound of
            // how far they got: progress is recorded at a bounded rate).
            let recorded = job.status.step;
            let lost = recorded.saturating_sub(start_step);
            let text = match resumed_from {
                Some(dir) => format!(
                    "training resumed at step {start_step} of {total_steps} from {dir} (generation {gen}; {lost} steps lost since the last recorded step {recorded})"
                ),
                None if recorded > 0 => format!(
                    "training started over: {total_steps} steps (no checkpoint; {recorded} steps lost)"
                ),
                None => format!("training started: {total_steps} steps"),
            };
            let mut data = serde_json::to_value(&msg).unwrap_or_default();
            if let Some(o) = data.as_object_mut() {
                o.insert("generation".into(), json!(gen));
                o.insert("steps_lost".into(), json!(lost));
            }
            m.event_for(session, id, EventKind::Progress, text, data)
                .await;
        }
        WorkerMessage::Init {
            loaded,
            ref missing,
            ref unexpected,
            ref skipped_shape,
            ref excluded,
            frozen,
        } => {
            let mut text = format!(
                "init: {loaded} tensors loaded, {} missing, {} unexpected, {} skipped for shape ({})",
                missing.len(),
                unexpected.len(),
                skipped_shape.len(),
                skipped_shape.join(", ")
            );
            if !excluded.is_empty() {
                text += &format!(
                    ", {} excluded ({}{})",
                    excluded.len(),
                    excluded
                        .iter()
                        .take(6)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if excluded.len() > 6 { ", ..." } else { "" }
                );
            }
            text += &format!("; {frozen} parameters frozen");
            m.event_for(
                session,
                id,
                EventKind::Init,
                text,
                serde_json::to_value(&msg).unwrap_or_default(),
            )
            .await;
        }
        WorkerMessage::Progress {
            epoch,
            step,
            loss,
            lr,
            samples_per_sec,
            steps,
            samples,
            ref distill,
        } => {
            if let Some(d) = distill {
                m.metrics.record_distill(&labels, d);
            }
            m.metrics
                .job_epoch
                .with_label_values(&labels)
                .set(f64::from(epoch));
            m.metrics
                .job_learning_rate
                .with_label_values(&labels)
                .set(lr);

            let _ = m
                .update_gen(id, (gen, session), |j| {
                    j.status.epoch = epoch;
                    j.status.step = step;
                    j.status.train_loss = Some(loss);
                    j.status.samples_per_sec = Some(samples_per_sec);
                })
                .await;
            m.metrics
                .job_step
                .with_label_values(&labels)
                .set(step as f64);
            m.metrics.job_steps.with_label_values(&labels).inc_by(steps);
            m.metrics
                .job_samples
                .with_label_values(&labels)
                .inc_by(samples);
            m.metrics.job_loss.with_label_values(&labels).set(loss);
            m.metrics
                .job_samples_per_second
                .with_label_values(&labels)
                .set(samples_per_sec);
            m.event_for(session,
                id,
                EventKind::Progress,
                format!("epoch {epoch} step {step}: loss {loss:.4}, lr {lr:.3e}, {samples_per_sec:.0} samples/s"),
                json!({"epoch": epoch, "step": step, "loss": loss, "lr": lr, "samples_per_sec": samples_per_sec, "distill": distill}),
            )
            .await;
        }
        WorkerMessage::Eval {
            epoch,
            step,
            val_loss,
            val_accuracy,
        } => {
            let _ = m
                .update_gen(id, (gen, session), |j| {
                    j.status.val_accuracy = Some(val_accuracy)
                })
                .await;
            m.metrics
                .job_val_accuracy
                .with_label_values(&labels)
                .set(val_accuracy);
            m.event_for(session,
                id,
                EventKind::Eval,
                format!("epoch {epoch}: val accuracy {:.2}%, val loss {val_loss:.4}", val_accuracy * 100.0),
                json!({"epoch": epoch, "step": step, "val_loss": val_loss, "val_accuracy": val_accuracy}),
            )
            .await;
        }
        WorkerMessage::Checkpoint {
            step,
            path,
            seconds,
            bytes,
        } => {
            m.metrics.checkpoint_seconds.observe(seconds);
            m.metrics.checkpoint_bytes.inc_by(bytes);
            let _ = m
                .update_gen(id, (gen, session), |j| {
                    j.status.checkpoint = Some(path.clone())
                })
                .await;
            m.event_for(
                session,
                id,
                EventKind::Checkpoint,
                format!("checkpoint at step {step}: {path}"),
                json!({"step": step, "path": path}),
            )
            .await;
        }
        WorkerMessage::Log { message } => {
            m.event_for(session, id, EventKind::Log, message, json!({"rank": 0}))
                .await
        }
        WorkerMessage::Preparing {
            message,
            done,
            total,
        } => {
            m.event_for(
                session,
                id,
                EventKind::Log,
                message,
                json!({"rank": 0, "preparing": {"done": done, "total": total}}),
            )
            .await
        }
        WorkerMessage::Done { .. }
        | WorkerMessage::Rescued { .. }
        | WorkerMessage::MaySave { .. }
        | WorkerMessage::Failed { .. }
        | WorkerMessage::Rendezvous { .. }
        | WorkerMessage::Timing(_)
        | WorkerMessage::Link { .. }
        | WorkerMessage::TeacherReady { .. } => {}
    }
}
