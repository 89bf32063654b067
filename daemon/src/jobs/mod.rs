//! The job lifecycle, written against the [`Store`] interface only: submission, the
//! scheduler that starts Pending jobs, cancellation, events, and recovery after a restart.
//!
//! A job record lives at `keys.job(id)`; every change to it is a compare-and-swap on its
//! revision, so concurrent writers (the API, the supervisor) never lose each other's updates.

mod supervisor;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_cluster::api::{EventKind, EventPage, FieldError, Job, JobEvent, JobPhase, JobStatus};
use ferry_cluster::keys::Keys;
use ferry_cluster::paths::{RootKind, Roots};
use ferry_cluster::spec::{Arch, JobSpec};
use ferry_cluster::store::{Compare, Store, StoreError, Txn};
use ferry_cluster::time::now_rfc3339;

use crate::config::Config;
use crate::metrics::Metrics;

/// Events kept per job (the newest), besides the first [`KEEP_FIRST_EVENTS`].
const MAX_EVENTS: u64 = 10_000;
const KEEP_FIRST_EVENTS: u64 = 100;

/// Errors of job operations, mapped to HTTP problems at the edge.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the job spec is invalid")]
    Invalid(Vec<FieldError>),
    #[error("no job has the id or name `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Owns the jobs of this node.
pub struct JobManager {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub node: String,
    pub roots: Roots,
    pub config: Config,
    pub metrics: Metrics,
    /// The `ferryd` binary, started again as `ferryd worker` for each rank.
    pub exe: PathBuf,
    /// Where worker plans are written.
    pub plans_dir: PathBuf,
    /// GPUs on this node (a CUDA job on a node without one is refused at submission).
    cuda_devices: u32,
    wake: tokio::sync::Notify,
    /// Next event number per job (this node is the only writer of its jobs' events).
    event_seq: Mutex<HashMap<String, u64>>,
    /// Jobs whose supervisor runs in this process.
    running: Mutex<HashSet<String>>,
}

fn decode_job(kv: &ferry_cluster::store::KeyValue) -> Option<Job> {
    let mut job: Job = serde_json::from_slice(&kv.value).ok()?;
    job.revision = kv.mod_revision;
    Some(job)
}

fn new_job_id() -> String {
    // Time-ordered (sorts by submission) and unique enough for one cluster.
    format!(
        "j{:011x}{:04x}",
        ferry_cluster::time::now_millis(),
        rand::random::<u16>()
    )
}

impl JobManager {
    /// A manager for `node`; call [`JobManager::recover`] then run [`JobManager::schedule_loop`].
    pub fn new(
        store: Arc<dyn Store>,
        config: Config,
        roots: Roots,
        node: String,
        metrics: Metrics,
        cuda_devices: u32,
    ) -> std::io::Result<Arc<Self>> {
        let exe = std::env::current_exe()?;
        let plans_dir = config.data_dir.join("plans");
        std::fs::create_dir_all(&plans_dir)?;
        Ok(Arc::new(JobManager {
            cuda_devices,
            keys: Keys::new(&config.store_prefix),
            store,
            node,
            roots,
            config,
            metrics,
            exe,
            plans_dir,
            wake: tokio::sync::Notify::new(),
            event_seq: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
        }))
    }

    /// Resolves every path of `spec` under the roots; returns the spec with absolute paths.
    fn resolve(&self, spec: &JobSpec) -> Result<JobSpec, Vec<FieldError>> {
        let mut out = spec.clone();
        let mut errs = Vec::new();
        let mut fix = |field: &str, kind: RootKind, p: &mut String, must_exist: bool| match self
            .roots
            .resolve(kind, p, must_exist)
        {
            Ok(abs) => *p = abs.display().to_string(),
            Err(e) => errs.push(FieldError {
                field: field.into(),
                message: e.to_string(),
            }),
        };
        if let Some(p) = out.model.path.as_mut() {
            fix("model.path", RootKind::Models, p, true);
        }
        if let Some(p) = out.model.init.as_mut() {
            fix("model.init", RootKind::Models, p, true);
        }
        fix(
            "data.train.path",
            RootKind::Data,
            &mut out.data.train.path,
            true,
        );
        if let Some(v) = out.data.val.as_mut() {
            fix("data.val.path", RootKind::Data, &mut v.path, true);
        }
        if let Some(u) = out.data.unlabelled.as_mut() {
            fix("data.unlabelled.path", RootKind::Data, &mut u.path, true);
        }
        if let Some(t) = out.distill.as_mut().map(|d| &mut d.teacher) {
            if let Some(p) = t.path.as_mut() {
                fix("distill.teacher.path", RootKind::Models, p, true);
            }
            if let Some(p) = t.init.as_mut() {
                fix("distill.teacher.init", RootKind::Models, p, true);
            }
        }
        fix("output.dir", RootKind::Outputs, &mut out.output.dir, false);
        if spec.model.arch == Arch::Torchscript && errs.is_empty() {
            if let Some(p) = &out.model.path {
                if !std::path::Path::new(p).is_file() {
                    errs.push(FieldError {
                        field: "model.path".into(),
                        message: format!("`{p}` is not a file"),
                    });
                }
            }
        }
        if let Some(p) = out.distill.as_ref().and_then(|d| d.teacher.path.as_ref()) {
            if errs.is_empty() && !std::path::Path::new(p).is_file() {
                errs.push(FieldError {
                    field: "distill.teacher.path".into(),
                    message: format!("`{p}` is not a file"),
                });
            }
        }
        if errs.is_empty() {
            Ok(out)
        } else {
            Err(errs)
        }
    }

    /// Validates, resolves and records a new job as Pending.
    pub async fn submit(&self, spec: JobSpec) -> Result<Job, JobError> {
        spec.validate().map_err(|e| JobError::Invalid(e.0))?;
        if spec.resources.device == ferry_cluster::spec::Device::Cuda {
            if self.cuda_devices == 0 {
                return Err(JobError::Invalid(vec![FieldError {
                    field: "resources.device".into(),
                    message: format!(
                        "node {} has no CUDA device (see `ferryctl nodes`); use device: cpu",
                        self.node
                    ),
                }]));
            }
            if spec.resources.ranks > self.cuda_devices {
                return Err(JobError::Invalid(vec![FieldError {
                    field: "resources.ranks".into(),
                    message: format!(
                        "{} CUDA ranks need a GPU each, and node {} has {}; NCCL cannot run two ranks on one GPU",
                        spec.resources.ranks, self.node, self.cuda_devices
                    ),
                }]));
            }
        }
        let resolved = self.resolve(&spec).map_err(JobError::Invalid)?;
        let out_dir = PathBuf::from(&resolved.output.dir);
        // One job per output directory: results of two runs never mix.
        for other in self.list().await? {
            if other.status.output_dir.as_deref() == Some(resolved.output.dir.as_str())
                && !other.phase.is_terminal()
            {
                return Err(JobError::Conflict(format!(
                    "output.dir {} is in use by job {} ({}); choose another directory",
                    resolved.output.dir, other.id, other.name
                )));
            }
        }
        let owner = out_dir.join(".ferry-job");
        if let Ok(previous) = std::fs::read_to_string(&owner) {
            return Err(JobError::Invalid(vec![FieldError {
                field: "output.dir".into(),
                message: format!(
                    "{} already holds the results of job {}; choose another directory or remove it",
                    resolved.output.dir,
                    previous.trim()
                ),
            }]));
        }
        let id = new_job_id();
        std::fs::create_dir_all(&out_dir)
            .and_then(|_| std::fs::write(&owner, format!("{id}\n")))
            .map_err(|e| {
                JobError::Invalid(vec![FieldError {
                    field: "output.dir".into(),
                    message: format!("cannot create {}: {e}", out_dir.display()),
                }])
            })?;
        let job = Job {
            id: id.clone(),
            name: spec.name.clone(),
            phase: JobPhase::Pending,
            spec: resolved,
            status: JobStatus {
                total_epochs: spec.train.epochs,
                output_dir: Some(out_dir.display().to_string()),
                ..Default::default()
            },
            created_at: now_rfc3339(),
            node: Some(self.node.clone()),
            cancel_requested: false,
            revision: 0,
        };
        let key = self.keys.job(&id);
        let txn = Txn::put_if(
            Compare::absent(&key),
            &key,
            serde_json::to_vec(&job).expect("job serialises"),
        );
        let r = self.store.txn(txn).await?;
        if !r.succeeded {
            return Err(JobError::Conflict(format!(
                "job id {id} already exists; submit again"
            )));
        }
        self.event(
            &id,
            EventKind::Phase,
            format!("accepted; Pending on node {}", self.node),
            serde_json::Value::Null,
        )
        .await;
        self.wake.notify_one();
        self.get(&id).await
    }

    /// Every job, oldest first.
    pub async fn list(&self) -> Result<Vec<Job>, JobError> {
        Ok(self
            .store
            .range(&self.keys.jobs())
            .await?
            .iter()
            .filter_map(decode_job)
            .collect())
    }

    /// A job by id, or else the newest job with that name.
    pub async fn get(&self, id_or_name: &str) -> Result<Job, JobError> {
        if let Some(kv) = self.store.get(&self.keys.job(id_or_name)).await? {
            if let Some(job) = decode_job(&kv) {
                return Ok(job);
            }
        }
        self.list()
            .await?
            .into_iter()
            .rev()
            .find(|j| j.name == id_or_name)
            .ok_or_else(|| JobError::NotFound(id_or_name.to_string()))
    }

    /// Applies `f` to job `id` with compare-and-swap, retrying on concurrent changes.
    pub async fn update(&self, id: &str, mut f: impl FnMut(&mut Job)) -> Result<Job, JobError> {
        let key = self.keys.job(id);
        for _ in 0..100 {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| JobError::NotFound(id.into()))?;
            let mut job = decode_job(&kv).ok_or_else(|| JobError::NotFound(id.into()))?;
            f(&mut job);
            let value = serde_json::to_vec(&job).expect("job serialises");
            let txn = Txn::put_if(Compare::mod_revision(&key, kv.mod_revision), &key, value);
            let r = self.store.txn(txn).await?;
            if r.succeeded {
                job.revision = r.revision;
                return Ok(job);
            }
        }
        Err(JobError::Conflict(format!(
            "job {id} is changing too fast to update; try again"
        )))
    }

    /// Asks for a job to stop. A Pending job is Cancelled at once; a Running one once its ranks stop.
    pub async fn cancel(&self, id_or_name: &str) -> Result<Job, JobError> {
        let job = self.get(id_or_name).await?;
        if job.phase.is_terminal() {
            return Err(JobError::Conflict(format!(
                "job {} has already ended ({})",
                job.id,
                job.phase.as_str()
            )));
        }
        let was_pending =
            job.phase == JobPhase::Pending && !self.running.lock().expect("lock").contains(&job.id);
        let job = self
            .update(&job.id, |j| {
                j.cancel_requested = true;
                if was_pending && j.phase == JobPhase::Pending {
                    j.phase = JobPhase::Cancelled;
                    j.status.finished_at = Some(now_rfc3339());
                }
            })
            .await?;
        let msg = if job.phase == JobPhase::Cancelled {
            "cancelled before it started"
        } else {
            "cancel requested; stopping its ranks"
        };
        self.event(
            &job.id,
            if job.phase == JobPhase::Cancelled {
                EventKind::Phase
            } else {
                EventKind::Log
            },
            msg.into(),
            serde_json::Value::Null,
        )
        .await;
        Ok(job)
    }

    /// Appends an event to a job's log. Failures are logged, not returned: an event that
    /// cannot be written must not fail the job.
    pub async fn event(&self, id: &str, kind: EventKind, message: String, data: serde_json::Value) {
        // Take the next number under one lock, so concurrent writers never share one.
        let take = |map: &mut HashMap<String, u64>, first: Option<u64>| -> Option<u64> {
            let next = match first {
                Some(f) => map.entry(id.to_string()).or_insert(f),
                None => map.get_mut(id)?,
            };
            *next += 1;
            Some(*next - 1)
        };
        let cached = take(&mut self.event_seq.lock().expect("lock"), None);
        let seq = match cached {
            Some(s) => s,
            None => {
                let first = match self.store.range(&self.keys.events(id)).await {
                    Ok(kvs) => {
                        kvs.last()
                            .and_then(|kv| kv.key.rsplit('/').next()?.parse::<u64>().ok())
                            .unwrap_or(0)
                            + 1
                    }
                    Err(e) => {
                        tracing::warn!(job = id, error = %e, "cannot read events");
                        return;
                    }
                };
                take(&mut self.event_seq.lock().expect("lock"), Some(first)).expect("inserted")
            }
        };
        let ev = JobEvent {
            seq,
            time: now_rfc3339(),
            kind,
            message,
            data,
        };
        if let Err(e) = self
            .store
            .put(
                &self.keys.event(id, seq),
                serde_json::to_vec(&ev).expect("event serialises"),
                0,
            )
            .await
        {
            tracing::warn!(job = id, error = %e, "cannot write event");
        }
        // Retention: a job keeps its newest MAX_EVENTS events (its first ones stay too:
        // they hold the init report and the start).
        if seq > MAX_EVENTS + KEEP_FIRST_EVENTS {
            let _ = self
                .store
                .delete(&self.keys.event(id, seq - MAX_EVENTS))
                .await;
        }
    }

    /// Events after `after`; with `wait`, blocks up to that long for the first new one.
    pub async fn events(
        &self,
        id_or_name: &str,
        after: u64,
        wait: Duration,
    ) -> Result<EventPage, JobError> {
        let job = self.get(id_or_name).await?;
        let prefix = self.keys.events(&job.id);
        let read = |kvs: Vec<ferry_cluster::store::KeyValue>| -> Vec<JobEvent> {
            kvs.iter()
                .filter_map(|kv| serde_json::from_slice::<JobEvent>(&kv.value).ok())
                .filter(|e| e.seq > after)
                .collect()
        };
        let rev = self.store.revision().await?;
        let mut events = read(self.store.range(&prefix).await?);
        if events.is_empty() && !wait.is_zero() && !job.phase.is_terminal() {
            let mut w = self.store.watch(&prefix, Some(rev + 1)).await?;
            if let Ok(Some(Ok(_))) = tokio::time::timeout(wait, w.recv()).await {
                events = read(self.store.range(&prefix).await?);
            }
        }
        let phase = if events.is_empty() {
            job.phase
        } else {
            self.get(&job.id).await?.phase
        };
        let next = events.last().map_or(after, |e| e.seq);
        Ok(EventPage {
            events,
            next,
            phase,
        })
    }

    /// After a restart: this node's jobs that were Running go back to Pending and resume
    /// from their newest checkpoint when the scheduler starts them again.
    pub async fn recover(&self) -> Result<usize, JobError> {
        let mut n = 0;
        for job in self.list().await? {
            if job.phase == JobPhase::Running && job.node.as_deref() == Some(&self.node) {
                self.update(&job.id, |j| j.phase = JobPhase::Pending)
                    .await?;
                self.event(
                    &job.id,
                    EventKind::Phase,
                    "the daemon restarted; Pending until it resumes from its newest checkpoint"
                        .into(),
                    serde_json::Value::Null,
                )
                .await;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts Pending jobs while there is room; runs until the process exits.
    pub async fn schedule_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.schedule_once().await {
                tracing::warn!(error = %e, "scheduling failed; retrying");
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
        }
    }

    async fn schedule_once(self: &Arc<Self>) -> Result<(), JobError> {
        let jobs = self.list().await?;
        let mut counts: HashMap<JobPhase, i64> = HashMap::new();
        for j in &jobs {
            *counts.entry(j.phase).or_default() += 1;
        }
        for phase in [
            JobPhase::Pending,
            JobPhase::Running,
            JobPhase::Succeeded,
            JobPhase::Failed,
            JobPhase::Cancelled,
        ] {
            self.metrics
                .jobs
                .with_label_values(&[phase.as_str()])
                .set(counts.get(&phase).copied().unwrap_or(0));
        }
        for job in jobs {
            if job.phase != JobPhase::Pending || job.node.as_deref() != Some(&self.node) {
                continue;
            }
            {
                let mut running = self.running.lock().expect("lock");
                if running.len() >= self.config.max_running_jobs || running.contains(&job.id) {
                    continue;
                }
                running.insert(job.id.clone());
            }
            let me = self.clone();
            tokio::spawn(async move {
                let id = job.id.clone();
                supervisor::run(&me, job).await;
                me.running.lock().expect("lock").remove(&id);
                me.wake.notify_one();
            });
        }
        Ok(())
    }

    /// Ids of the jobs running in this process.
    pub fn running_jobs(&self) -> Vec<String> {
        self.running.lock().expect("lock").iter().cloned().collect()
    }
}
