//! The job lifecycle, written against the [`Store`] interface only, the same on one node
//! (the embedded store) and on many (etcd): submission, cancellation and events here; the
//! [`coordinator`] (one node at a time) places jobs and decides what follows each
//! generation; every node's [`agent`] runs the ranks placed on it ([`supervisor`]).
//!
//! A job record lives at `keys.job(id)`; every change to it is a compare-and-swap on its
//! revision, so concurrent writers (the API, the coordinator, the nodes running its ranks)
//! never lose each other's updates. Writes on behalf of ranks are fenced by the job's
//! generation and the writer's session.

pub mod agent;
pub mod coordinator;
mod supervisor;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_cluster::api::{
    EventKind, EventPage, FieldError, Job, JobEvent, JobPhase, JobStatus, Node,
};
use ferry_cluster::keys::Keys;
use ferry_cluster::paths::{RootKind, Roots};
use ferry_cluster::place;
use ferry_cluster::spec::{Arch, Device, JobSpec};
use ferry_cluster::store::{Compare, Store, StoreError, Txn, TxnOp, WatchEvent};
use ferry_cluster::time::now_rfc3339;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::Membership;

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
    /// A bound was reached (the queue is full); retry later.
    #[error("{0}")]
    Busy(String),
    #[error("the job has moved on (a newer generation, or this node's session ended); nothing was written")]
    Stale,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The job lifecycle of this node, on the store shared by every node of the cluster.
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
    /// Node-local scratch, a directory per job (see `WorkerPlan::scratch_dir`).
    pub scratch_dir: PathBuf,
    /// This node's registration; every write about a job is fenced by its session.
    pub membership: Arc<Membership>,
    /// Whether this daemon runs with an embedded store (`--standalone`).
    pub standalone: bool,
    /// Pending jobs in the cluster as of the agent's last listing, plus those this node
    /// accepted since (what `max_queued_jobs` bounds).
    pub queued: std::sync::atomic::AtomicUsize,
    /// The (uid, gid) rank and teacher processes run as (`rank_user`); None: ferryd's.
    pub rank_ids: Option<(u32, u32)>,
    /// Local attempts running in this process: job id to generation.
    local: Mutex<HashMap<String, u64>>,
    /// The newest generation of each job that this node has run (or runs).
    attempted: Mutex<HashMap<String, u64>>,
    /// Per job, the event counter as this node last wrote it (number, mod_revision): a
    /// hint that saves reading it back; a stale hint only costs one failed compare.
    event_hints: Mutex<HashMap<String, (u64, u64)>>,
    /// Woken when local attempts end.
    pub(crate) local_done: tokio::sync::Notify,
}

fn decode_job(kv: &ferry_cluster::store::KeyValue) -> Option<Job> {
    let mut job: Job = serde_json::from_slice(&kv.value).ok()?;
    job.revision = kv.mod_revision;
    Some(job)
}

/// A node record as read from the store, with its session filled in.
pub fn decode_node(kv: &ferry_cluster::store::KeyValue) -> Option<Node> {
    let mut node: Node = serde_json::from_slice(&kv.value).ok()?;
    node.session = kv.create_revision;
    Some(node)
}

fn new_job_id() -> String {
    // Time-ordered (sorts by submission) and unique enough for one cluster.
    format!(
        "j{:011x}{:04x}",
        ferry_cluster::time::now_millis(),
        rand::random::<u16>()
    )
}

/// Resolves once `notify` fires or `timeout` passes.
pub(crate) async fn nap(notify: &tokio::sync::Notify, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, notify.notified()).await;
}

/// Keeps a watch on `prefix` and fires `notify` on every change that `relevant` keeps, and
/// always after the watch had to be re-created (the store restarted, the watcher fell
/// behind): whoever waits lists again, so no change is missed.
pub(crate) fn wake_on_changes(
    store: Arc<dyn Store>,
    prefix: String,
    notify: Arc<tokio::sync::Notify>,
    mut relevant: impl FnMut(&WatchEvent) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.watch(&prefix, None).await {
                Ok(mut w) => {
                    notify.notify_one();
                    while let Some(Ok(ev)) = w.recv().await {
                        backoff = Duration::from_millis(100);
                        if relevant(&ev) {
                            notify.notify_one();
                        }
                    }
                }
                Err(e) => tracing::debug!(%prefix, error = %e, "cannot watch; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    })
}

/// Every change is relevant.
pub(crate) fn any_change(_: &WatchEvent) -> bool {
    true
}

/// A filter for watches on the job records that keeps only lifecycle changes (a new or
/// removed job, its phase, generation or cancel request), not the progress that rank 0's
/// node writes every report: those wake no coordinator and no agent.
pub(crate) fn lifecycle_changes() -> impl FnMut(&WatchEvent) -> bool + Send + 'static {
    let mut seen: HashMap<String, (JobPhase, u64, bool)> = HashMap::new();
    move |ev| match ev {
        WatchEvent::Delete(kv) => {
            seen.remove(&kv.key);
            true
        }
        WatchEvent::Put(kv) => match serde_json::from_slice::<Job>(&kv.value) {
            Ok(j) => {
                let now = (j.phase, j.generation, j.cancel_requested);
                seen.insert(kv.key.clone(), now) != Some(now)
            }
            Err(_) => true,
        },
    }
}

impl JobManager {
    /// A manager for `node`; start [`coordinator::run`] and [`agent::run`] beside it.
    pub fn new(
        store: Arc<dyn Store>,
        config: Config,
        roots: Roots,
        node: String,
        metrics: Metrics,
        membership: Arc<Membership>,
        standalone: bool,
    ) -> std::io::Result<Arc<Self>> {
        let exe = std::env::current_exe()?;
        let rank_ids = config
            .rank_ids()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let plans_dir = config.data_dir.join("plans");
        std::fs::create_dir_all(&plans_dir)?;
        let scratch_dir = config.data_dir.join("scratch");
        Ok(Arc::new(JobManager {
            keys: Keys::new(&config.cluster_prefix()),
            store,
            node,
            roots,
            config,
            metrics,
            exe,
            plans_dir,
            scratch_dir,
            membership,
            standalone,
            queued: Default::default(),
            rank_ids,
            local: Mutex::new(HashMap::new()),
            attempted: Mutex::new(HashMap::new()),
            event_hints: Mutex::new(HashMap::new()),
            local_done: tokio::sync::Notify::new(),
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

    /// The registered nodes, by name.
    pub async fn nodes(&self) -> Result<Vec<Node>, JobError> {
        Ok(self
            .store
            .range(&self.keys.nodes())
            .await?
            .iter()
            .filter_map(decode_node)
            .collect())
    }

    /// The node that holds the coordinator's election key, if any.
    pub async fn coordinator(&self) -> Result<Option<String>, JobError> {
        Ok(self
            .store
            .get(&self.keys.coordinator())
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Standalone: refuses a job that this node can never run (too few GPUs, a selector
    /// its labels do not match), with the reason. In a cluster such a job is accepted and
    /// waits for nodes that fit (its events say so).
    async fn check_fits(&self, spec: &JobSpec) -> Result<(), JobError> {
        if !self.standalone {
            return Ok(());
        }
        let nodes = self.nodes().await?;
        if nodes.is_empty() {
            return Ok(());
        }
        let views: Vec<_> = nodes.iter().map(coordinator::view).collect();
        let demand = coordinator::demand("new", spec, Default::default());
        let decision = place::place_one(&demand, &views, &place::Load::default());
        let place::Decision::Unfit(reason) = decision else {
            return Ok(());
        };
        let r = &spec.resources;
        let (field, message) = if r.device == Device::Cuda {
            let best = nodes
                .iter()
                .max_by_key(|n| n.cuda_devices)
                .expect("non-empty");
            if best.cuda_devices == 0 {
                (
                    "resources.device",
                    format!(
                        "node {} has no CUDA device (see `ferryctl nodes`); use device: cpu",
                        best.name
                    ),
                )
            } else if best.cuda_devices < r.ranks_per_node() {
                (
                    "resources.ranks",
                    format!(
                        "{} CUDA ranks need a GPU each, and node {} has {}; NCCL cannot run two ranks on one GPU",
                        r.ranks_per_node(),
                        best.name,
                        best.cuda_devices
                    ),
                )
            } else {
                ("resources.nodes", reason)
            }
        } else if nodes
            .iter()
            .all(|n| n.cpu_slots > 0 && n.cpu_slots < r.ranks_per_node())
        {
            let best = nodes.iter().max_by_key(|n| n.cpu_slots).expect("non-empty");
            (
                "resources.ranks",
                format!(
                    "{} CPU ranks per node, and node {} runs at most {} at once (cpu_rank_slots, by default its cores); use fewer ranks, or raise cpu_rank_slots",
                    r.ranks_per_node(),
                    best.name,
                    best.cpu_slots
                ),
            )
        } else if !r.node_selector.is_empty() {
            ("resources.node_selector", reason)
        } else {
            ("resources.nodes", reason)
        };
        Err(JobError::Invalid(vec![FieldError {
            field: field.into(),
            message,
        }]))
    }

    /// Validates, resolves and records a new job as Pending. The job record and the claim
    /// on its output directory are created in one transaction, so two submissions (on one
    /// node or two) can never share a directory.
    pub async fn submit(&self, spec: JobSpec) -> Result<Job, JobError> {
        spec.validate().map_err(|e| JobError::Invalid(e.0))?;
        let queued = self.queued.load(std::sync::atomic::Ordering::Relaxed);
        if queued >= self.config.max_queued_jobs {
            return Err(JobError::Busy(format!(
                "{queued} jobs are waiting already (max_queued_jobs = {}); retry later, or cancel some",
                self.config.max_queued_jobs
            )));
        }
        self.check_fits(&spec).await?;
        let resolved = self.resolve(&spec).map_err(JobError::Invalid)?;
        let out_dir = PathBuf::from(&resolved.output.dir);
        let owner = out_dir.join(".ferry-job");
        self.check_output_dir(&out_dir)?;
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
            generation: 0,
            placement: vec![],
            teacher_placement: vec![],
            revision: 0,
        };
        let key = self.keys.job(&id);
        let claim = self.keys.output_claim(&job.spec.output.dir);
        // The claim: absent, or left by a job that has ended and whose directory was
        // emptied of its marker since (the user removed its results).
        let claim_compare = match self.store.get(&claim).await? {
            None => Compare::absent(&claim),
            Some(kv) => {
                let holder = String::from_utf8_lossy(&kv.value).to_string();
                match self.get(&holder).await {
                    Ok(other) if !other.phase.is_terminal() => {
                        return Err(JobError::Conflict(format!(
                            "output.dir {} is in use by job {} ({}); choose another directory",
                            job.spec.output.dir, other.id, other.name
                        )))
                    }
                    _ => Compare::mod_revision(&claim, kv.mod_revision),
                }
            }
        };
        let txn = Txn {
            compares: vec![Compare::absent(&key), claim_compare],
            success: vec![
                TxnOp::Put {
                    key: key.clone(),
                    value: serde_json::to_vec(&job).expect("job serialises"),
                    lease: 0,
                },
                TxnOp::Put {
                    key: claim.clone(),
                    value: id.clone().into_bytes(),
                    lease: 0,
                },
                TxnOp::Put {
                    key: self.keys.job_name(&job.name, &id),
                    value: Vec::new(),
                    lease: 0,
                },
            ],
            failure: vec![],
        };
        if !self.store.txn(txn).await?.succeeded {
            return Err(JobError::Conflict(format!(
                "output.dir {} was claimed by another submission at the same moment; choose another directory",
                job.spec.output.dir
            )));
        }
        // Made beneath the outputs root, following no link; the marker is a new file (a
        // name that exists, a link included, is not written through).
        let made = ferry_cluster::paths::open_beneath(&self.roots.outputs, &out_dir, true)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|dir| {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.path().join(".ferry-job"))?
                    .write_all(format!("{id}\n").as_bytes())
            });
        if let Err(e) = made {
            // Undo: the job never existed.
            let undo = Txn {
                compares: vec![],
                success: vec![
                    TxnOp::Delete { key },
                    TxnOp::Delete { key: claim },
                    TxnOp::Delete {
                        key: self.keys.job_name(&job.name, &id),
                    },
                ],
                failure: vec![],
            };
            let _ = self.store.txn(undo).await;
            return Err(JobError::Invalid(vec![FieldError {
                field: "output.dir".into(),
                message: format!("cannot create {}: {e}", out_dir.display()),
            }]));
        }
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.event(
            &id,
            EventKind::Phase,
            format!("accepted by node {}; Pending", self.node),
            serde_json::Value::Null,
        )
        .await;
        self.get(&id).await
    }

    /// Refuses an output dir ferry must not write into: the outputs root itself, one that
    /// overlaps the daemon's data dir, one reached through a link, or one that already
    /// holds files (ferry writes only into a new or empty directory, so it never replaces
    /// a user's own files, and deletes only what it made).
    fn check_output_dir(&self, out_dir: &std::path::Path) -> Result<(), JobError> {
        let bad = |message: String| {
            Err(JobError::Invalid(vec![FieldError {
                field: "output.dir".into(),
                message,
            }]))
        };
        let shown = out_dir.display();
        if out_dir == self.roots.outputs {
            return bad(format!(
                "{shown} is the outputs root itself; give a directory under it"
            ));
        }
        let data_dir = &self.config.data_dir;
        if out_dir.starts_with(data_dir) || data_dir.starts_with(out_dir) {
            return bad(format!(
                "{shown} overlaps ferryd's data_dir ({}), which holds its store; give a directory elsewhere under the outputs root",
                data_dir.display()
            ));
        }
        let owner = out_dir.join(".ferry-job");
        if std::fs::symlink_metadata(&owner).is_ok_and(|m| !m.is_file()) {
            return bad(format!(
                "{} is not a file (a link?); remove it or choose another directory",
                owner.display()
            ));
        }
        if owner.is_file() {
            return Ok(()); // another job's results: the caller says whose
        }
        match std::fs::symlink_metadata(out_dir) {
            Err(_) => return Ok(()), // made fresh
            Ok(m) if !m.is_dir() => return bad(format!("{shown} exists and is not a directory")),
            Ok(_) => {}
        }
        if let Err(e) = ferry_cluster::paths::open_beneath(&self.roots.outputs, out_dir, false) {
            return bad(e.to_string());
        }
        let mut names: Vec<String> = std::fs::read_dir(out_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !names.is_empty() {
            names.sort();
            let more = names.len().saturating_sub(5);
            names.truncate(5);
            return bad(format!(
                "{shown} already holds files ({}{}); ferry writes only into a new or empty directory, so that it never replaces files of yours",
                names.join(", "),
                if more > 0 { format!(", and {more} more") } else { String::new() }
            ));
        }
        Ok(())
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
        // By name: the newest job of that name, from the name index (never a scan).
        if ferry_cluster::spec::check_dns_label(id_or_name).is_ok() {
            let named = self.store.range(&self.keys.job_names(id_or_name)).await?;
            for kv in named.iter().rev() {
                let id = kv.key.rsplit('/').next().unwrap_or_default();
                if let Some(kv) = self.store.get(&self.keys.job(id)).await? {
                    if let Some(job) = decode_job(&kv) {
                        return Ok(job);
                    }
                }
            }
        }
        Err(JobError::NotFound(id_or_name.to_string()))
    }

    /// Adds the jobs missing from the name index (records written before it existed).
    pub async fn index_names(&self, jobs: &[Job]) -> Result<(), JobError> {
        let have: std::collections::HashSet<String> = self
            .store
            .range(&self.keys.names())
            .await?
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        for j in jobs {
            let key = self.keys.job_name(&j.name, &j.id);
            if !have.contains(&key) {
                self.store.put(&key, Vec::new(), 0).await?;
            }
        }
        Ok(())
    }

    /// Applies `f` to job `id` with compare-and-swap, retrying on concurrent changes.
    pub async fn update(&self, id: &str, mut f: impl FnMut(&mut Job)) -> Result<Job, JobError> {
        self.update_if(id, vec![], |j| {
            f(j);
            true
        })
        .await
    }

    /// Applies `f` to job `id` with compare-and-swap while every compare of `fence` holds
    /// too; `f` returning false leaves the record as it is ([`JobError::Stale`]).
    pub async fn update_if(
        &self,
        id: &str,
        fence: Vec<Compare>,
        mut f: impl FnMut(&mut Job) -> bool,
    ) -> Result<Job, JobError> {
        let key = self.keys.job(id);
        for _ in 0..100 {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| JobError::NotFound(id.into()))?;
            let mut job = decode_job(&kv).ok_or_else(|| JobError::NotFound(id.into()))?;
            if !f(&mut job) {
                return Err(JobError::Stale);
            }
            let value = serde_json::to_vec(&job).expect("job serialises");
            let mut txn = Txn::put_if(Compare::mod_revision(&key, kv.mod_revision), &key, value);
            txn.compares.extend(fence.iter().cloned());
            let r = self.store.txn(txn).await?;
            if r.succeeded {
                job.revision = r.revision;
                return Ok(job);
            }
            // Lost to a concurrent write, or fenced: which one?
            if !fence.is_empty() && !self.fence_holds(&fence).await? {
                return Err(JobError::Stale);
            }
        }
        Err(JobError::Conflict(format!(
            "job {id} is changing too fast to update; try again"
        )))
    }

    pub(crate) async fn fence_holds(&self, fence: &[Compare]) -> Result<bool, JobError> {
        let probe = Txn {
            compares: fence.to_vec(),
            success: vec![],
            failure: vec![],
        };
        Ok(self.store.txn(probe).await?.succeeded)
    }

    /// Updates job `id` on behalf of this node's ranks of generation `gen`: refused
    /// ([`JobError::Stale`]) once the job has moved to another generation, or this node's
    /// session has ended.
    pub async fn update_gen(
        &self,
        id: &str,
        (gen, session): (u64, crate::session::SessionInfo),
        mut f: impl FnMut(&mut Job),
    ) -> Result<Job, JobError> {
        let fence = self.membership.fence_for(session);
        self.update_if(id, vec![fence], |j| {
            if j.generation != gen || j.phase.is_terminal() {
                return false;
            }
            f(j);
            true
        })
        .await
    }

    /// Asks for a job to stop. A Pending job is Cancelled at once; a Running one once its
    /// ranks have stopped (the nodes running them watch the record). Any node can cancel
    /// any job: the decision is the record's, never a node's memory.
    pub async fn cancel(&self, id_or_name: &str) -> Result<Job, JobError> {
        let job = self.get(id_or_name).await?;
        if job.phase.is_terminal() {
            return Err(JobError::Conflict(format!(
                "job {} has already ended ({})",
                job.id,
                job.phase.as_str()
            )));
        }
        let job = self
            .update(&job.id, |j| {
                if j.phase.is_terminal() {
                    return;
                }
                j.cancel_requested = true;
                if j.phase == JobPhase::Pending {
                    j.phase = JobPhase::Cancelled;
                    j.placement.clear();
                    j.status.finished_at = Some(now_rfc3339());
                }
            })
            .await?;
        if job.phase == JobPhase::Cancelled {
            self.metrics.job_ended(&job);
        }
        let (kind, msg) = match job.phase {
            JobPhase::Cancelled => (EventKind::Phase, "cancelled before it started"),
            _ => (EventKind::Log, "cancel requested; stopping its ranks"),
        };
        self.event(&job.id, kind, msg.into(), serde_json::Value::Null)
            .await;
        Ok(job)
    }

    /// Deletes a job that has ended: its record, its events, its name-index entry, what the
    /// store still holds of its generations, and its claim on its output directory. Its
    /// outputs stay on disk. The record goes last, so a deletion cut short (the store went
    /// away) leaves a job that a second DELETE finishes.
    pub async fn delete(&self, id_or_name: &str) -> Result<Job, JobError> {
        let job = self.get(id_or_name).await?;
        if !job.phase.is_terminal() {
            return Err(JobError::Conflict(format!(
                "job {} is {}: only a job that has ended can be deleted (cancel it first)",
                job.id,
                job.phase.as_str()
            )));
        }
        let id = &job.id;
        for prefix in [
            self.keys.events(id),
            self.keys.reports_all(id),
            self.keys.rendezvous_all(id),
            self.keys.teachers(id),
        ] {
            for kv in self.store.range(&prefix).await? {
                self.store.delete(&kv.key).await?;
            }
        }
        self.store.delete(&self.keys.event_seq(id)).await?;
        let claim = self.keys.output_claim(&job.spec.output.dir);
        if let Some(kv) = self.store.get(&claim).await? {
            if kv.value == id.as_bytes() {
                self.store.delete(&claim).await?;
            }
        }
        self.store
            .delete(&self.keys.job_name(&job.name, id))
            .await?;
        self.store.delete(&self.keys.job(id)).await?;
        tracing::info!(job = %id, name = %job.name, "deleted");
        Ok(job)
    }

    /// Appends an event to a job's log. Failures are logged, not returned: an event that
    /// cannot be written must not fail the job.
    ///
    /// The number comes from the store: the event and the job's counter are written in one
    /// transaction that compares the counter, so writers on any node never share a
    /// number. A node whose session has ended writes nothing.
    pub async fn event(&self, id: &str, kind: EventKind, message: String, data: serde_json::Value) {
        let fence = self.membership.fence();
        if let Err(e) = self.try_event(id, kind, message, data, fence).await {
            tracing::warn!(job = id, error = %e, "cannot write event");
        }
    }

    /// An event on behalf of a task of this node's `session` (refused once it has ended).
    pub async fn event_for(
        &self,
        session: crate::session::SessionInfo,
        id: &str,
        kind: EventKind,
        message: String,
        data: serde_json::Value,
    ) {
        let fence = Some(self.membership.fence_for(session));
        if let Err(e) = self.try_event(id, kind, message, data, fence).await {
            tracing::warn!(job = id, error = %e, "cannot write event");
        }
    }

    async fn try_event(
        &self,
        id: &str,
        kind: EventKind,
        message: String,
        data: serde_json::Value,
        fence: Option<Compare>,
    ) -> Result<(), JobError> {
        let counter = self.keys.event_seq(id);
        let mut ev = JobEvent {
            seq: 0,
            time: now_rfc3339(),
            kind,
            message,
            data,
        };
        for _ in 0..100 {
            let (last, compare) = match self.store.get(&counter).await? {
                Some(kv) => (
                    String::from_utf8_lossy(&kv.value)
                        .parse::<u64>()
                        .unwrap_or(0),
                    Compare::mod_revision(&counter, kv.mod_revision),
                ),
                None => (0, Compare::absent(&counter)),
            };
            ev.seq = last + 1;
            let mut success = vec![
                TxnOp::Put {
                    key: self.keys.event(id, ev.seq),
                    value: serde_json::to_vec(&ev).expect("event serialises"),
                    lease: 0,
                },
                TxnOp::Put {
                    key: counter.clone(),
                    value: ev.seq.to_string().into_bytes(),
                    lease: 0,
                },
            ];
            // Retention: a job keeps its newest MAX_EVENTS events (its first ones stay
            // too: they hold the init report and the start).
            if ev.seq > MAX_EVENTS + KEEP_FIRST_EVENTS {
                success.push(TxnOp::Delete {
                    key: self.keys.event(id, ev.seq - MAX_EVENTS),
                });
            }
            let mut compares = vec![compare];
            compares.extend(fence.clone());
            let txn = Txn {
                compares,
                success,
                failure: vec![],
            };
            let r = self.store.txn(txn).await?;
            {
                let mut hints = self.event_hints.lock().expect("lock");
                if r.succeeded {
                    if hints.len() >= 10_000 {
                        hints.clear();
                    }
                    hints.insert(id.to_string(), (ev.seq, r.revision));
                } else {
                    hints.remove(id);
                }
            }
            if r.succeeded {
                return Ok(());
            }
            if let Some(f) = &fence {
                if !self.fence_holds(std::slice::from_ref(f)).await? {
                    return Err(JobError::Stale);
                }
            }
        }
        Err(JobError::Conflict("event counter contended".into()))
    }

    /// Up to `limit` events after `after` (a ranged read from there: a follower never
    /// reads the events it has); with `wait`, blocks up to that long for the first new one.
    pub async fn events(
        &self,
        id_or_name: &str,
        after: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<EventPage, JobError> {
        let job = self.get(id_or_name).await?;
        let prefix = self.keys.events(&job.id);
        let from = self.keys.event(&job.id, after);
        let read = |kvs: Vec<ferry_cluster::store::KeyValue>| -> Vec<JobEvent> {
            kvs.iter()
                .filter_map(|kv| serde_json::from_slice::<JobEvent>(&kv.value).ok())
                .filter(|e| e.seq > after)
                .collect()
        };
        let rev = self.store.revision().await?;
        let mut events = read(self.store.range_after(&prefix, &from, limit).await?);
        if events.is_empty() && !wait.is_zero() && !job.phase.is_terminal() {
            let mut w = self.store.watch(&prefix, Some(rev + 1)).await?;
            if let Ok(Some(Ok(_))) = tokio::time::timeout(wait, w.recv()).await {
                events = read(self.store.range_after(&prefix, &from, limit).await?);
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

    /// Ids of the jobs whose ranks run in this process.
    pub fn running_jobs(&self) -> Vec<String> {
        self.local.lock().expect("lock").keys().cloned().collect()
    }

    /// Claims a local attempt of (`id`, `gen`); false if one of that job already runs here.
    pub(crate) fn claim_local(&self, id: &str, gen: u64) -> bool {
        let mut local = self.local.lock().expect("lock");
        if local.contains_key(id) {
            return false;
        }
        // A generation runs here once: after its ranks ended (and this node reported), the
        // record still says Running until the coordinator decides; that is no new attempt.
        let mut attempted = self.attempted.lock().expect("lock");
        if attempted.get(id).is_some_and(|g| *g >= gen) {
            return false;
        }
        if attempted.len() >= 10_000 {
            attempted.clear();
        }
        attempted.insert(id.to_string(), gen);
        drop(attempted);
        local.insert(id.to_string(), gen);
        drop(local);
        self.membership.set_running_jobs(self.running_jobs());
        true
    }

    /// Whether an attempt of job `id` runs on this node now.
    pub(crate) fn runs_locally(&self, id: &str) -> bool {
        self.local.lock().expect("lock").contains_key(id)
    }

    pub(crate) fn release_local(&self, id: &str) {
        self.local.lock().expect("lock").remove(id);
        self.membership.set_running_jobs(self.running_jobs());
        self.local_done.notify_waiters();
    }
}
