//! Runs one attempt of a job: starts its rank process (`ferryd worker`), turns the rank's
//! messages into status updates and events, stops it on cancel, and records the outcome.
//! A rank that crashes, runs out of memory or aborts inside libtorch fails its job only.

use std::collections::VecDeque;
use std::process::Stdio;

use ferry_cluster::api::{EventKind, Job, JobPhase};
use ferry_cluster::time::now_rfc3339;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::JobManager;
use crate::protocol::{WorkerMessage, WorkerPlan};

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

async fn attempt_once(m: &JobManager, job: &Job, resume: bool) -> anyhow::Result<Outcome> {
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
    };
    let plan_path = m.plans_dir.join(format!("{}.json", job.id));
    std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan)?)?;

    let mut cmd = Command::new(&m.exe);
    cmd.arg("worker")
        .arg("--plan")
        .arg(&plan_path)
        .arg("--rank")
        .arg("0")
        .arg("--world-size")
        .arg("1");
    cmd.stdin(Stdio::null())
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
        .map_err(|e| anyhow::anyhow!("cannot start rank process {}: {e}", m.exe.display()))?;
    let pid = child.id().unwrap_or(0);
    m.event(
        &job.id,
        EventKind::Log,
        format!("rank 0 started (pid {pid})"),
        json!({"rank": 0, "pid": pid}),
    )
    .await;

    let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut stderr = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut watch = m
        .store
        .watch(&m.keys.job(&job.id), Some(job.revision + 1))
        .await?;
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut stderr_lines = 0usize;
    let mut done = false;
    let mut worker_failure: Option<String> = None;
    let (mut out_open, mut err_open) = (true, true);
    let mut cancelled = false;

    let status = loop {
        tokio::select! {
            line = stdout.next_line(), if out_open => match line {
                Ok(Some(l)) => match serde_json::from_str::<WorkerMessage>(&l) {
                    Ok(WorkerMessage::Done { files, samples_per_sec }) => {
                        done = true;
                        let _ = m.update(&job.id, |j| j.status.samples_per_sec = Some(samples_per_sec)).await;
                        m.event(&job.id, EventKind::Log, format!("wrote {}", files.join(", ")), json!({"files": files})).await;
                    }
                    Ok(WorkerMessage::Failed { reason }) => worker_failure = Some(reason),
                    Ok(msg) => handle(m, job, msg).await,
                    Err(_) => m.event(&job.id, EventKind::Log, l, json!({"rank": 0})).await,
                },
                _ => out_open = false,
            },
            line = stderr.next_line(), if err_open => match line {
                Ok(Some(l)) => {
                    if tail.len() == STDERR_TAIL { tail.pop_front(); }
                    tail.push_back(l.clone());
                    stderr_lines += 1;
                    if stderr_lines <= STDERR_EVENTS {
                        m.event(&job.id, EventKind::Log, l, json!({"rank": 0, "stream": "stderr"})).await;
                    }
                }
                _ => err_open = false,
            },
            ev = watch.recv(), if !cancelled => match ev {
                Some(Ok(ev)) => {
                    let wants_cancel = serde_json::from_slice::<Job>(&ev.kv().value).map(|j| j.cancel_requested).unwrap_or(false);
                    if wants_cancel {
                        cancelled = true;
                        let _ = child.start_kill();
                    }
                }
                // The watch ended (lagged or closed): fall back to reading the record.
                _ => {
                    if m.get(&job.id).await.map(|j| j.cancel_requested).unwrap_or(false) {
                        cancelled = true;
                        let _ = child.start_kill();
                    } else {
                        watch = m.store.watch(&m.keys.job(&job.id), None).await?;
                    }
                }
            },
            status = child.wait(), if !out_open && !err_open => break status?,
        }
    };
    let _ = std::fs::remove_file(&plan_path);
    if cancelled {
        return Ok(Outcome::Cancelled);
    }
    if status.success() && done {
        return Ok(Outcome::Succeeded);
    }
    if let Some(reason) = worker_failure {
        return Ok(Outcome::Failed(format!("rank 0: {reason}")));
    }
    use std::os::unix::process::ExitStatusExt;
    let how = match status.signal() {
        Some(libc::SIGKILL) => "was killed (SIGKILL; out of memory, or killed by hand)".to_string(),
        Some(libc::SIGABRT) => "aborted (SIGABRT, usually a libtorch assertion)".to_string(),
        Some(libc::SIGSEGV) => "crashed (SIGSEGV)".to_string(),
        Some(s) => format!("was killed by signal {s}"),
        None => format!("exited with status {}", status.code().unwrap_or(-1)),
    };
    let last = tail.iter().rev().find(|l| !l.trim().is_empty()).cloned();
    Ok(Outcome::Failed(match last {
        Some(l) => format!("rank 0 {how}; last output: {l}"),
        None => format!("rank 0 {how}"),
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
        } => {
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
                json!({"epoch": epoch, "step": step, "loss": loss, "lr": lr, "samples_per_sec": samples_per_sec}),
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
        WorkerMessage::Done { .. } | WorkerMessage::Failed { .. } => {}
    }
}
