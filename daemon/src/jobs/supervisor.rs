//! Runs one attempt of a job: starts its rank process (`ferryd worker`), turns the rank's
//! messages into status updates and events, stops it on cancel, and records the outcome.
//! A rank that crashes, runs out of memory or aborts inside libtorch fails its job only.

use std::collections::VecDeque;
use std::process::Stdio;

use ferry_cluster::api::{EventKind, Job, JobPhase, TeacherRecord};
use ferry_cluster::store::LeaseId;
use ferry_cluster::time::now_rfc3339;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use super::JobManager;
use crate::protocol::{Control, Peers, Teachers, WorkerMessage, WorkerPlan};

/// stderr lines kept to explain a failure.
const STDERR_TAIL: usize = 20;
/// stderr lines forwarded as events per attempt (the rest only count).
const STDERR_EVENTS: usize = 200;

enum Outcome {
    Succeeded,
    Failed(String),
    Cancelled,
}

/// Runs `job` until it ends or is cancelled; never panics, never returns an error: every
/// failure ends up in the job's status.
pub async fn run(m: &JobManager, job: Job) {
    let id = job.id.clone();
    let resume = job.status.attempts > 0;
    let job = match m
        .update(&id, |j| {
            j.phase = JobPhase::Running;
            j.status.attempts += 1;
            j.status.failure = None;
            j.status.started_at.get_or_insert_with(now_rfc3339);
        })
        .await
    {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(job = %id, error = %e, "cannot mark job Running");
            return;
        }
    };
    let attempt = job.status.attempts;
    m.event(
        &id,
        EventKind::Phase,
        format!(
            "Running (attempt {attempt}{})",
            if resume { ", resuming" } else { "" }
        ),
        json!(null),
    )
    .await;
    let outcome = match attempt_once(m, &job, resume).await {
        Ok(o) => o,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    };
    let (phase, failure, label) = match outcome {
        Outcome::Succeeded => (JobPhase::Succeeded, None, "succeeded"),
        Outcome::Cancelled => (JobPhase::Cancelled, None, "cancelled"),
        Outcome::Failed(reason) => (JobPhase::Failed, Some(reason), "failed"),
    };
    m.metrics.rank_exits.with_label_values(&[label]).inc();
    // The restart policy: back to Pending, to resume from the newest checkpoint.
    let restarts_used = attempt.saturating_sub(1);
    if let (JobPhase::Failed, Some(reason)) = (phase, &failure) {
        let max = job.spec.restart.max_restarts;
        if restarts_used < max {
            m.event(
                &id,
                EventKind::Phase,
                format!(
                    "restarting ({} of {max} restarts) after: {reason}",
                    restarts_used + 1
                ),
                json!({"reason": reason}),
            )
            .await;
            let r = m
                .update(&id, |j| {
                    if !j.cancel_requested {
                        j.phase = JobPhase::Pending;
                        j.status.failure = Some(reason.clone());
                    }
                })
                .await;
            if r.is_ok_and(|j| j.phase == JobPhase::Pending) {
                return;
            }
        }
    }
    m.metrics.forget_job(&id, &job.name);
    let msg = match &failure {
        Some(r) => format!("Failed: {r}"),
        None => phase.as_str().to_string(),
    };
    // The event first: whoever sees the terminal phase also finds its event.
    m.event(&id, EventKind::Phase, msg, json!(null)).await;
    if let Err(e) = m
        .update(&id, |j| {
            j.phase = phase;
            j.status.failure = failure.clone();
            j.status.finished_at = Some(now_rfc3339());
        })
        .await
    {
        tracing::error!(job = %id, error = %e, "cannot record the job's outcome");
    }
    tracing::info!(job = %id, phase = phase.as_str(), "job ended");
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
    Stdout(String),
    Stderr(String),
    Exited(std::io::Result<std::process::ExitStatus>),
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
    let mut cmd = Command::new(&m.exe);
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
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[allow(unsafe_code)]
    // SAFETY: prctl is async-signal-safe; it makes the rank die with the daemon, so a
    // restarted daemon never finds an orphan still writing the job's output.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {proc} ({}): {e}", m.exe.display()))?;
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take().expect("piped");
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    tokio::spawn(async move {
        let (mut out_open, mut err_open, mut killed) = (true, true, false);
        while out_open || err_open {
            tokio::select! {
                l = out.next_line(), if out_open => match l {
                    Ok(Some(l)) => { let _ = tx.send((proc, RankEvent::Stdout(l))).await; }
                    _ => out_open = false,
                },
                l = err.next_line(), if err_open => match l {
                    Ok(Some(l)) => { let _ = tx.send((proc, RankEvent::Stderr(l))).await; }
                    _ => err_open = false,
                },
                _ = kill_requested(&mut kill), if !killed => {
                    killed = true;
                    let _ = child.start_kill();
                }
            }
        }
        let status = tokio::select! {
            st = child.wait() => st,
            _ = kill_requested(&mut kill), if !killed => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
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

/// Lease TTL of a teacher registration: a teacher whose supervisor is gone expires.
const TEACHER_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// A teacher replica of the running attempt.
#[derive(Default)]
struct TeacherState {
    pid: u32,
    /// It has reported its address at least once (since its last start).
    ready: bool,
    lease: Option<LeaseId>,
    keepalive: Option<tokio::task::JoinHandle<()>>,
    restarts: u32,
    reported: Option<String>,
    tail: VecDeque<String>,
}

impl TeacherState {
    /// Ends its registration (students are told it is gone).
    async fn deregister(&mut self, m: &JobManager) {
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        if let Some(l) = self.lease.take() {
            let _ = m.store.revoke_lease(l).await;
        }
    }
}

/// Registers a ready teacher in the store under a lease, kept alive while it runs.
async fn register_teacher(
    m: &JobManager,
    job: &Job,
    replica: u32,
    addr: &str,
    t: &mut TeacherState,
) -> anyhow::Result<()> {
    t.deregister(m).await;
    let lease = m.store.grant_lease(TEACHER_TTL).await?;
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
            lease,
        )
        .await?;
    let store = m.store.clone();
    t.lease = Some(lease);
    t.keepalive = Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(TEACHER_TTL / 4).await;
            if store.keep_alive(lease).await.is_err() {
                return;
            }
        }
    }));
    Ok(())
}

/// Writes one line to every rank still listening on stdin.
async fn tell_ranks(stdins: &mut [Option<tokio::process::ChildStdin>], line: &str) {
    for slot in stdins.iter_mut() {
        if let Some(stdin) = slot {
            if stdin.write_all(line.as_bytes()).await.is_err() {
                *slot = None;
            }
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

async fn attempt_once(m: &JobManager, job: &Job, resume: bool) -> anyhow::Result<Outcome> {
    let world = job.spec.resources.ranks.max(1) as usize;
    let plan = WorkerPlan {
        job_id: job.id.clone(),
        spec: job.spec.clone(),
        output_dir: job.spec.output.dir.clone(),
        threads: job
            .spec
            .resources
            .threads
            .unwrap_or_else(|| m.config.threads()),
        resume,
        progress_interval_ms: m.config.progress_interval_ms,
        bind_ip: m.config.data_plane_ip.clone(),
        collective_timeout_ms: m.config.collective_timeout_ms,
    };
    let plan_path = m.plans_dir.join(format!("{}.json", job.id));
    std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan)?)?;

    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let (kill_tx, kill_rx) = tokio::sync::watch::channel(false);
    // However this attempt ends (an error included), its processes are killed.
    let kill_tx = KillOnDrop(kill_tx);

    // CUDA processes find NCCL through a `libnccl.so` link on their library path.
    let cuda = job.spec.resources.device == ferry_cluster::spec::Device::Cuda;
    let mut gpu_env: Vec<(&str, std::ffi::OsString)> = Vec::new();
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

    // Teachers first: they load their model while the ranks load theirs.
    let replicas = job.spec.distill.as_ref().map_or(0, |d| d.teacher.replicas);
    let max_teacher_restarts = job
        .spec
        .distill
        .as_ref()
        .map_or(0, |d| d.teacher.max_restarts);
    let mut teachers: Vec<TeacherState> = Vec::new();
    let mut teacher_watch = None;
    if replicas > 0 {
        // Registrations left by an earlier attempt name dead processes.
        for kv in m.store.range(&m.keys.teachers(&job.id)).await? {
            let _ = m.store.delete(&kv.key).await;
        }
        teacher_watch = Some(m.store.watch(&m.keys.teachers(&job.id), None).await?);
        for r in 0..replicas {
            let (pid, _stdin) = spawn_proc(
                m,
                &plan_path,
                Proc::Teacher(r),
                world,
                tx.clone(),
                kill_rx.clone(),
                &gpu_env,
            )?;
            m.event(
                &job.id,
                EventKind::Log,
                format!("teacher replica {r} started (pid {pid})"),
                json!({"teacher": r, "pid": pid}),
            )
            .await;
            teachers.push(TeacherState {
                pid,
                ..Default::default()
            });
        }
    }
    let mut stdins = Vec::with_capacity(world);
    for rank in 0..world {
        let mut env = gpu_env.clone();
        if cuda {
            if let Some(dev) = crate::gpu::visible_device(rank, world) {
                env.push(("CUDA_VISIBLE_DEVICES", dev.into()));
            }
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
        stdins.push(Some(stdin));
        m.event(
            &job.id,
            EventKind::Log,
            format!("rank {rank} started (pid {pid})"),
            json!({"rank": rank, "pid": pid}),
        )
        .await;
    }

    let mut watch = m
        .store
        .watch(&m.keys.job(&job.id), Some(job.revision + 1))
        .await?;
    let mut tails: Vec<VecDeque<String>> = vec![VecDeque::new(); world];
    let mut reported: Vec<Option<String>> = vec![None; world];
    let mut addrs: Vec<Option<String>> = vec![None; world];
    let mut failures: Vec<(u8, String)> = Vec::new();
    let (mut stderr_lines, mut exited, mut done, mut cancelled) = (0usize, 0usize, false, false);
    // After the first failure, the others get a moment to report why they stopped.
    let mut grace: Option<tokio::time::Instant> = None;

    while exited < world {
        let grace_at = grace
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            ev = rx.recv() => {
                let Some((proc, ev)) = ev else { break };
                let rank = match proc {
                    Proc::Rank(rank) => rank,
                    Proc::Teacher(r) => {
                        let t = &mut teachers[r as usize];
                        match ev {
                            RankEvent::Stdout(l) => match serde_json::from_str::<WorkerMessage>(&l) {
                                Ok(WorkerMessage::TeacherReady { addr, .. }) => {
                                    t.ready = true;
                                    register_teacher(m, job, r, &addr, t).await?;
                                    m.event(&job.id, EventKind::Log, format!("teacher replica {r} serves soft labels at {addr}"), json!({"teacher": r, "addr": addr, "pid": t.pid})).await;
                                }
                                Ok(WorkerMessage::Failed { reason }) => t.reported = Some(reason),
                                Ok(WorkerMessage::Log { message }) => m.event(&job.id, EventKind::Log, message, json!({"teacher": r})).await,
                                _ => m.event(&job.id, EventKind::Log, l, json!({"teacher": r})).await,
                            },
                            RankEvent::Stderr(l) => {
                                if t.tail.len() == STDERR_TAIL {
                                    t.tail.pop_front();
                                }
                                t.tail.push_back(l.clone());
                                stderr_lines += 1;
                                if stderr_lines <= STDERR_EVENTS {
                                    m.event(&job.id, EventKind::Log, l, json!({"teacher": r, "stream": "stderr"})).await;
                                }
                            }
                            RankEvent::Exited(status) => {
                                t.deregister(m).await;
                                if cancelled || done || grace.is_some() {
                                    continue;
                                }
                                let status = status?;
                                let (_, why) = explain_exit(proc, &status, t.reported.take().as_ref(), &t.tail);
                                if !t.ready {
                                    // It never served: a bad teacher spec, not an outage.
                                    failures.push((0, format!("{why} before serving (check distill.teacher)")));
                                    let _ = kill_tx.send(true);
                                } else if t.restarts < max_teacher_restarts {
                                    t.restarts += 1;
                                    t.ready = false;
                                    t.tail.clear();
                                    m.event(&job.id, EventKind::Log, format!("{why}; restarting it ({} of {max_teacher_restarts} restarts)", t.restarts), json!({"teacher": r})).await;
                                    let (pid, _stdin) = spawn_proc(m, &plan_path, proc, world, tx.clone(), kill_rx.clone(), &gpu_env)?;
                                    t.pid = pid;
                                } else {
                                    m.event(&job.id, EventKind::Log, format!("{why}; not restarted (distill.teacher.max_restarts = {max_teacher_restarts} used up)"), json!({"teacher": r})).await;
                                }
                            }
                        }
                        continue;
                    }
                };
                match ev {
                    RankEvent::Stdout(l) => match serde_json::from_str::<WorkerMessage>(&l) {
                        Ok(WorkerMessage::Rendezvous { addr, .. }) => {
                            addrs[rank] = Some(addr);
                            if addrs.iter().all(Option::is_some) {
                                let peers = Peers { peers: addrs.iter().flatten().cloned().collect() };
                                let line = format!("{}\n", serde_json::to_string(&Control::Peers(peers.clone()))?);
                                tell_ranks(&mut stdins, &line).await;
                                m.event(&job.id, EventKind::Log, format!("{world} ranks joined the ring"), json!({"peers": peers.peers})).await;
                            }
                        }
                        Ok(WorkerMessage::Done { files, samples_per_sec }) => {
                            done = true;
                            let _ = m.update(&job.id, |j| j.status.samples_per_sec = Some(samples_per_sec)).await;
                            m.event(&job.id, EventKind::Log, format!("wrote {}", files.join(", ")), json!({"files": files})).await;
                        }
                        Ok(WorkerMessage::Failed { reason }) => reported[rank] = Some(reason),
                        Ok(msg) => handle(m, job, msg).await,
                        Err(_) => m.event(&job.id, EventKind::Log, l, json!({"rank": rank})).await,
                    },
                    RankEvent::Stderr(l) => {
                        let tail = &mut tails[rank];
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(l.clone());
                        stderr_lines += 1;
                        if stderr_lines <= STDERR_EVENTS {
                            m.event(&job.id, EventKind::Log, l, json!({"rank": rank, "stream": "stderr"})).await;
                        }
                    }
                    RankEvent::Exited(status) => {
                        exited += 1;
                        stdins[rank] = None;
                        let status = status?;
                        if !status.success() && !cancelled {
                            failures.push(explain_exit(proc, &status, reported[rank].as_ref(), &tails[rank]));
                            if world == 1 {
                                continue;
                            }
                            grace.get_or_insert_with(|| tokio::time::Instant::now() + std::time::Duration::from_secs(2));
                        }
                    }
                }
            }
            ev = async { teacher_watch.as_mut().expect("guarded").recv().await }, if teacher_watch.is_some() => {
                if !matches!(ev, Some(Ok(_))) {
                    // The watch ended (lagged or closed): watch again, then list.
                    teacher_watch = Some(m.store.watch(&m.keys.teachers(&job.id), None).await?);
                }
                // Students learn the replicas from the store's registrations, never from the
                // processes directly: the same path cluster mode takes.
                let line = format!("{}\n", serde_json::to_string(&Control::Teachers(Teachers { teachers: teacher_addrs(m, job).await? }))?);
                tell_ranks(&mut stdins, &line).await;
            }
            _ = tokio::time::sleep_until(grace_at), if grace.is_some() => {
                let _ = kill_tx.send(true);
                grace = None;
            }
            ev = watch.recv(), if !cancelled => {
                let wants_cancel = match ev {
                    Some(Ok(ev)) => serde_json::from_slice::<Job>(&ev.kv().value).map(|j| j.cancel_requested).unwrap_or(false),
                    // The watch ended (lagged or closed): read the record instead, and watch again.
                    _ => {
                        watch = m.store.watch(&m.keys.job(&job.id), None).await?;
                        m.get(&job.id).await.map(|j| j.cancel_requested).unwrap_or(false)
                    }
                };
                if wants_cancel {
                    cancelled = true;
                    let _ = kill_tx.send(true);
                }
            }
        }
    }
    let _ = kill_tx.send(true);
    for t in &mut teachers {
        t.deregister(m).await;
    }
    let _ = std::fs::remove_file(&plan_path);
    if cancelled {
        return Ok(Outcome::Cancelled);
    }
    if failures.is_empty() && done {
        return Ok(Outcome::Succeeded);
    }
    failures.sort_by_key(|(priority, _)| *priority);
    Ok(Outcome::Failed(match failures.into_iter().next() {
        Some((_, reason)) => reason,
        None => "rank 0 exited without finishing its training (no `done` report)".into(),
    }))
}

/// Turns one rank message into a status update and an event.
async fn handle(m: &JobManager, job: &Job, msg: WorkerMessage) {
    let id = &job.id;
    let labels = [id.as_str(), job.name.as_str()];
    match msg {
        WorkerMessage::Started {
            total_steps,
            epochs,
            start_step,
            ref resumed_from,
            ..
        } => {
            let _ = m
                .update(id, |j| {
                    j.status.total_steps = total_steps;
                    j.status.total_epochs = epochs;
                    j.status.step = start_step;
                })
                .await;
            let text = match resumed_from {
                Some(dir) => {
                    format!("training resumed at step {start_step} of {total_steps} from {dir}")
                }
                None => format!("training started: {total_steps} steps"),
            };
            m.event(
                id,
                EventKind::Progress,
                text,
                serde_json::to_value(&msg).unwrap_or_default(),
            )
            .await;
        }
        WorkerMessage::Init {
            loaded,
            ref missing,
            ref unexpected,
            ref skipped_shape,
            frozen,
        } => {
            let text = format!(
                "init: {loaded} tensors loaded, {} missing, {} unexpected, {} skipped for shape ({}); {frozen} parameters frozen",
                missing.len(),
                unexpected.len(),
                skipped_shape.len(),
                skipped_shape.join(", ")
            );
            m.event(
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
            ref distill,
        } => {
            if let Some(d) = distill {
                m.metrics.record_distill(&labels, d);
            }
            let _ = m
                .update(id, |j| {
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
            m.metrics.job_loss.with_label_values(&labels).set(loss);
            m.metrics
                .job_samples_per_second
                .with_label_values(&labels)
                .set(samples_per_sec);
            m.event(
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
                .update(id, |j| j.status.val_accuracy = Some(val_accuracy))
                .await;
            m.metrics
                .job_val_accuracy
                .with_label_values(&labels)
                .set(val_accuracy);
            m.event(
                id,
                EventKind::Eval,
                format!("epoch {epoch}: val accuracy {:.2}%, val loss {val_loss:.4}", val_accuracy * 100.0),
                json!({"epoch": epoch, "step": step, "val_loss": val_loss, "val_accuracy": val_accuracy}),
            )
            .await;
        }
        WorkerMessage::Checkpoint { step, path } => {
            let _ = m
                .update(id, |j| j.status.checkpoint = Some(path.clone()))
                .await;
            m.event(
                id,
                EventKind::Checkpoint,
                format!("checkpoint at step {step}: {path}"),
                json!({"step": step, "path": path}),
            )
            .await;
        }
        WorkerMessage::Log { message } => {
            m.event(id, EventKind::Log, message, json!({"rank": 0}))
                .await
        }
        WorkerMessage::Done { .. }
        | WorkerMessage::Failed { .. }
        | WorkerMessage::Rendezvous { .. }
        | WorkerMessage::TeacherReady { .. } => {}
    }
}
