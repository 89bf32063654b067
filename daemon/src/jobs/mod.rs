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
    /// An `Idempotency-Key` sent again with another spec.
    #[error("{0}")]
    KeyReused(String),
    /// An `If-Match` that names another revision.
    #[error("{0}")]
    PreconditionFailed(String),
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

/// The ids of the finished jobs among `jobs` that retention deletes: all but the newest
/// `keep` (by when they ended; 0 keeps all), and those that ended more than `ttl_hours`
/// before `now_ms` (0: no limit).
pub fn prunable(jobs: &[Job], keep: usize, ttl_hours: f64, now_ms: u64) -> Vec<String> {
    let mut ended: Vec<(u64, &str)> = jobs
        .iter()
        .filter(|j| j.phase.is_terminal())
        .map(|j| {
            let at = j
                .status
                .finished_at
                .as_deref()
                .and_then(ferry_cluster::time::parse_rfc3339_millis)
                .or_else(|| ferry_cluster::time::parse_rfc3339_millis(&j.created_at))
                .unwrap_or(0);
            (at, j.id.as_str())
        })
        .collect();
    ended.sort_by(|a, b| b.cmp(a)); // newest first
    let ttl_ms = (ttl_hours * 3_600_000.0) as u64;
    ended
        .iter()
        .enumerate()
        .filter(|(i, (at, _))| {
            (keep > 0 && *i >= keep) || (ttl_ms > 0 && now_ms.saturating_sub(*at) > ttl_ms)
        })
        .map(|(_, (_, id))| id.to_string())
        .collect()
}

/// The daemon's variables that a process running a model (a rank, a teacher, a dry run's
/// check) never sees: its secrets, and where its configuration is.
pub(crate) const RANK_HIDDEN_VARIABLES: [&str; 3] =
    ["FERRY_TOKEN", "FERRY_ETCD_PASSWORD", "FERRY_CONFIG"];

/// How long a dry run's model and data checks may take.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an `Idempotency-Key` is remembered: a day, as the IETF draft suggests.
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 3600 * 1000;

/// How a submission is handled.
#[derive(Debug, Default, Clone)]
pub struct SubmitOptions {
    /// The client's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Check only: run every check that can run before training and record nothing.
    pub dry_run: bool,
}

/// What a submission did.
#[derive(Debug)]
pub enum Submitted {
    /// A new job, Pending.
    Created(Job),
    /// The job an earlier submission with the same `Idempotency-Key` and spec made.
    Replayed(Job),
    /// A dry run passed every check: the spec as it would run (paths resolved).
    Checked(Box<JobSpec>),
}

enum IdempotencyState {
    Free(Compare),
    Replay(Box<Job>),
}

/// What the store keeps of an `Idempotency-Key`.
#[derive(serde::Serialize, serde::Deserialize)]
struct IdempotencyRecord {
    job: String,
    digest: String,
    at_millis: u64,
}

/// A digest of a spec as parsed (YAML and JSON of one spec agree).
fn spec_digest(spec: &JobSpec) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(spec).expect("spec serialises");
    hex(&sha2::Sha256::digest(bytes))
}

/// A store-safe name for a client's key.
fn key_digest(key: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(key.as_bytes())[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Five random characters for `generate_name` (no vowels, so no words; as Kubernetes).
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect()
}

/// Adds the field errors of `r` to `errs`; passes other errors on.
fn note(errs: &mut Vec<FieldError>, r: Result<(), JobError>) -> Result<(), JobError> {
    match r {
        Err(JobError::Invalid(e)) => {
            errs.extend(e);
            Ok(())
        }
        other => other,
    }
}

fn invalid(field: &str, message: String) -> JobError {
    JobError::Invalid(vec![FieldError {
        field: field.into(),
        message,
    }])
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
            fix("model.init", RootKind::Models, p.path_mut(), true);
        }
        fix(
            "data.train.path",
            RootKind::Data,
            &mut out.data.train.path,
            true,
        );
        if let Some(v) = out.data.test.as_mut() {
            fix("data.test.path", RootKind::Data, &mut v.path, true);
        }
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
                fix("distill.teacher.init", RootKind::Models, p.path_mut(), true);
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

    /// Validates, resolves and records a new job as Pending (or with `opts.dry_run`, runs
    /// every check that can run before training and records nothing). The job record, the
    /// claim on its output directory, the claim on its name (unique among the jobs that have
    /// not ended) and its idempotency key are created in one transaction, so two
    /// submissions (on one node or two) can never share a directory or a name, and one key
    /// never makes two jobs.
    pub async fn submit(
        &self,
        mut spec: JobSpec,
        opts: SubmitOptions,
    ) -> Result<Submitted, JobError> {
        let digest = spec_digest(&spec);
        let idem = match &opts.idempotency_key {
            Some(k) => Some(self.idempotency_lookup(k, &digest).await?),
            None => None,
        };
        if let Some(IdempotencyState::Replay(job)) = idem {
            return Ok(Submitted::Replayed(*job));
        }
        spec.validate().map_err(|e| JobError::Invalid(e.0))?;
        if !opts.dry_run {
            let queued = self.queued.load(std::sync::atomic::Ordering::Relaxed);
            if queued >= self.config.max_queued_jobs {
                return Err(JobError::Busy(format!(
                    "{queued} jobs are waiting already (max_queued_jobs = {}); retry later, or cancel some",
                    self.config.max_queued_jobs
                )));
            }
        }
        // Every check that fails adds its errors: a submission hears of them all at once.
        let mut errs: Vec<FieldError> = Vec::new();
        note(&mut errs, self.check_fits(&spec).await)?;
        let resolved = match self.resolve(&spec) {
            Ok(r) => Some(r),
            Err(e) => {
                note(&mut errs, Err(JobError::Invalid(e)))?;
                None
            }
        };
        let out_dir = resolved
            .as_ref()
            .map(|r| PathBuf::from(&r.output.dir))
            .filter(|_| !errs.iter().any(|e| e.field == "output.dir"));
        if let Some(out_dir) = &out_dir {
            note(&mut errs, self.check_output_dir(out_dir))?;
            if let Ok(previous) = std::fs::read_to_string(out_dir.join(".ferry-job")) {
                note(&mut errs, Err(invalid(
                    "output.dir",
                    format!(
                        "{} already holds the results of job {}; choose another directory or remove it",
                        out_dir.display(),
                        previous.trim()
                    ),
                )))?;
            }
        }
        if opts.dry_run {
            let name_free = match &spec.generate_name {
                Some(_) => Ok(()),
                None => self.name_claim(&spec.name).await.map(|_| ()),
            };
            note(
                &mut errs,
                name_free.map_err(|e| match e {
                    JobError::Conflict(m) => invalid("name", m),
                    e => e,
                }),
            )?;
            if let (Some(r), Some(out_dir)) = (&resolved, &out_dir) {
                note(
                    &mut errs,
                    self.claim_compare(&r.output.dir)
                        .await
                        .map(|_| ())
                        .map_err(|e| match e {
                            JobError::Conflict(m) => invalid("output.dir", m),
                            e => e,
                        }),
                )?;
                if errs.is_empty() {
                    // The model and the data: files' headers, parameter names against
                    // `freeze` and `init`, the data's shape against the model's input.
                    errs.extend(self.preflight(r, out_dir).await);
                }
            }
            if !errs.is_empty() {
                return Err(JobError::Invalid(errs));
            }
            let mut checked = resolved.expect("no errors");
            if checked.name.is_empty() {
                checked.name =
                    format!("{}{}", spec.generate_name.as_deref().unwrap_or(""), "xxxxx");
            }
            return Ok(Submitted::Checked(Box::new(checked)));
        }
        if !errs.is_empty() {
            return Err(JobError::Invalid(errs));
        }
        let mut resolved = resolved.expect("no errors");
        let out_dir = out_dir.expect("no errors");
        let id = new_job_id();
        let claim = self.keys.output_claim(&resolved.output.dir);
        let claim_compare = self.claim_compare(&resolved.output.dir).await?;
        // A generated name is tried a few times: another job may hold the first one drawn.
        let mut tries = 0;
        let (job, name_compare) = loop {
            tries += 1;
            if let Some(prefix) = &spec.generate_name {
                spec.name = format!("{prefix}{}", name_suffix());
                resolved.name = spec.name.clone();
            }
            let name_compare = match self.name_claim(&spec.name).await {
                Err(JobError::Conflict(_)) if spec.generate_name.is_some() && tries < 8 => continue,
                r => r?,
            };
            let job = Job {
                id: id.clone(),
                name: spec.name.clone(),
                phase: JobPhase::Pending,
                spec: resolved.clone(),
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
                idempotency_key: opts.idempotency_key.clone(),
                revision: 0,
            };
            break (job, name_compare);
        };
        let key = self.keys.job(&id);
        let active = self.keys.active_name(&job.name);
        let mut compares = vec![Compare::absent(&key), claim_compare, name_compare];
        let mut success = vec![
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
            TxnOp::Put {
                key: active.clone(),
                value: id.clone().into_bytes(),
                lease: 0,
            },
        ];
        let idem_key = opts
            .idempotency_key
            .as_deref()
            .map(|k| self.keys.idempotency(&key_digest(k)));
        if let (Some(IdempotencyState::Free(compare)), Some(k)) = (idem, &idem_key) {
            compares.push(compare);
            let record = IdempotencyRecord {
                job: id.clone(),
                digest: digest.clone(),
                at_millis: ferry_cluster::time::now_millis(),
            };
            success.push(TxnOp::Put {
                key: k.clone(),
                value: serde_json::to_vec(&record).expect("record serialises"),
                lease: 0,
            });
        }
        if !self
            .store
            .txn(Txn {
                compares,
                success,
                failure: vec![],
            })
            .await?
            .succeeded
        {
            // Whichever claim was taken meanwhile says what happened.
            if let Some(k) = &opts.idempotency_key {
                if let IdempotencyState::Replay(job) = self.idempotency_lookup(k, &digest).await? {
                    return Ok(Submitted::Replayed(*job));
                }
            }
            return Err(JobError::Conflict(format!(
                "another submission claimed output.dir {} or the name `{}` at the same moment; retry, or choose another",
                job.spec.output.dir, job.name
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
                    TxnOp::Delete { key: active },
                ]
                .into_iter()
                .chain(idem_key.map(|key| TxnOp::Delete { key }))
                .collect(),
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
        self.get(&id).await.map(Submitted::Created)
    }

    /// A dry run's checks of the model and the data, in a `ferryd check` process started
    /// as a rank is (as `rank_user`, without the daemon's secrets, confined by
    /// `rank_sandbox`): loading a TorchScript model runs its code.
    async fn preflight(&self, spec: &JobSpec, out_dir: &std::path::Path) -> Vec<FieldError> {
        let failed = |message: String| {
            vec![FieldError {
                field: "(spec)".into(),
                message,
            }]
        };
        let plan = crate::protocol::WorkerPlan {
            job_id: "dry-run".into(),
            spec: spec.clone(),
            output_dir: out_dir.display().to_string(),
            threads: spec
                .resources
                .threads
                .unwrap_or_else(|| self.config.threads())
                .min(4),
            resume: false,
            progress_interval_ms: self.config.progress_interval_ms,
            bind_ip: self.config.data_plane_ip.clone(),
            collective_timeout_ms: self.config.collective_timeout_ms,
            node: self.node.clone(),
            generation: 0,
            scratch_dir: String::new(),
            roots: crate::protocol::PlanRoots {
                data: self.roots.data.display().to_string(),
                models: self.roots.models.display().to_string(),
                outputs: self.roots.outputs.display().to_string(),
            },
            sandbox: self.config.rank_sandbox.clone(),
        };
        let plan_path = self
            .plans_dir
            .join(format!("check-{:016x}.json", rand::random::<u64>()));
        if let Err(e) = std::fs::write(
            &plan_path,
            serde_json::to_vec(&plan).expect("plan serialises"),
        ) {
            return failed(format!("cannot write {}: {e}", plan_path.display()));
        }
        let mut cmd = tokio::process::Command::new(&self.exe);
        if let Some((uid, gid)) = self.rank_ids {
            cmd.uid(uid).gid(gid);
        }
        for secret in RANK_HIDDEN_VARIABLES {
            cmd.env_remove(secret);
        }
        cmd.arg("check")
            .arg("--plan")
            .arg(&plan_path)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let run = tokio::time::timeout(PREFLIGHT_TIMEOUT, cmd.output()).await;
        let _ = std::fs::remove_file(&plan_path);
        let out = match run {
            Err(_) => {
                return failed(format!(
                    "the model and data checks took more than {} s",
                    PREFLIGHT_TIMEOUT.as_secs()
                ))
            }
            Ok(Err(e)) => return failed(format!("cannot start {}: {e}", self.exe.display())),
            Ok(Ok(out)) => out,
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<Vec<FieldError>>(stdout.lines().last().unwrap_or("")) {
            Ok(errs) if out.status.success() => errs,
            _ => failed(format!(
                "the model and data checks failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// The compare that lets a new job claim output directory `dir`: absent, or left by a
    /// job that has ended (whose directory was emptied of its marker since: the user
    /// removed its results).
    async fn claim_compare(&self, dir: &str) -> Result<Compare, JobError> {
        let claim = self.keys.output_claim(dir);
        match self.store.get(&claim).await? {
            None => Ok(Compare::absent(&claim)),
            Some(kv) => {
                let holder = String::from_utf8_lossy(&kv.value).to_string();
                match self.get(&holder).await {
                    Ok(other) if !other.phase.is_terminal() => Err(JobError::Conflict(format!(
                        "output.dir {dir} is in use by job {} ({}); choose another directory",
                        other.id, other.name
                    ))),
                    _ => Ok(Compare::mod_revision(&claim, kv.mod_revision)),
                }
            }
        }
    }

    /// The compare that lets a new job take `name`: free, or last held by a job that has
    /// ended (or was deleted).
    async fn name_claim(&self, name: &str) -> Result<Compare, JobError> {
        let key = self.keys.active_name(name);
        match self.store.get(&key).await? {
            None => Ok(Compare::absent(&key)),
            Some(kv) => {
                let holder = String::from_utf8_lossy(&kv.value).to_string();
                match self.store.get(&self.keys.job(&holder)).await?.as_ref().and_then(decode_job) {
                    Some(other) if !other.phase.is_terminal() => Err(JobError::Conflict(format!(
                        "job {} is already named `{name}` and is {}: names are unique among jobs that have not ended; wait for it, cancel it, choose another name, or give `generate_name: {name}-` for a unique one",
                        other.id,
                        other.phase.as_str()
                    ))),
                    _ => Ok(Compare::mod_revision(&key, kv.mod_revision)),
                }
            }
        }
    }

    /// What an `Idempotency-Key` says about a submission with spec digest `digest`: the job
    /// it made before (same spec, within [`IDEMPOTENCY_TTL_MS`]), or the compare under
    /// which it may be recorded now. The same key with another spec is refused.
    async fn idempotency_lookup(
        &self,
        key: &str,
        digest: &str,
    ) -> Result<IdempotencyState, JobError> {
        let store_key = self.keys.idempotency(&key_digest(key));
        let Some(kv) = self.store.get(&store_key).await? else {
            return Ok(IdempotencyState::Free(Compare::absent(&store_key)));
        };
        let expired = || {
            Ok(IdempotencyState::Free(Compare::mod_revision(
                &store_key,
                kv.mod_revision,
            )))
        };
        let Ok(record) = serde_json::from_slice::<IdempotencyRecord>(&kv.value) else {
            return expired();
        };
        if ferry_cluster::time::now_millis().saturating_sub(record.at_millis) > IDEMPOTENCY_TTL_MS {
            return expired();
        }
        let job = match self
            .store
            .get(&self.keys.job(&record.job))
            .await?
            .as_ref()
            .and_then(decode_job)
        {
            Some(job) => job,
            None => return expired(), // deleted since
        };
        if record.digest != digest {
            return Err(JobError::KeyReused(format!(
                "Idempotency-Key `{key}` was used for job {} with another spec; use a new key for a new job",
                job.id
            )));
        }
        Ok(IdempotencyState::Replay(Box::new(job)))
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
        // By name: the job of that name that has not ended, else the newest of that name,
        // from the name index (never a scan).
        if ferry_cluster::spec::check_dns_label(id_or_name).is_ok() {
            if let Some(kv) = self.store.get(&self.keys.active_name(id_or_name)).await? {
                let holder = String::from_utf8_lossy(&kv.value).to_string();
                if let Some(job) = self
                    .store
                    .get(&self.keys.job(&holder))
                    .await?
                    .as_ref()
                    .and_then(decode_job)
                {
                    if !job.phase.is_terminal() {
                        return Ok(job);
                    }
                }
            }
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
    /// Cancels a job; with `if_match`, only while its record is at that revision (its
    /// `ETag`), else [`JobError::PreconditionFailed`].
    pub async fn cancel(&self, id_or_name: &str, if_match: Option<u64>) -> Result<Job, JobError> {
        let job = self.get(id_or_name).await?;
        let moved = |now: u64| {
            JobError::PreconditionFailed(format!(
                "job {} is at revision {now}, not {} (If-Match): it changed since you read it; read it again",
                job.id,
                if_match.unwrap_or_default()
            ))
        };
        if if_match.is_some_and(|r| r != job.revision) {
            return Err(moved(job.revision));
        }
        if job.phase.is_terminal() {
            return Err(JobError::Conflict(format!(
                "job {} has already ended ({})",
                job.id,
                job.phase.as_str()
            )));
        }
        let mut seen = job.revision;
        let updated = self
            .update_if(&job.id, vec![], |j| {
                // With If-Match, the compare-and-swap is on that very revision.
                if if_match.is_some_and(|r| r != j.revision) {
                    seen = j.revision;
                    return false;
                }
                if j.phase.is_terminal() {
                    return true;
                }
                j.cancel_requested = true;
                if j.phase == JobPhase::Pending {
                    j.phase = JobPhase::Cancelled;
                    j.placement.clear();
                    j.status.finished_at = Some(now_rfc3339());
                }
                true
            })
            .await;
        let job = match updated {
            Err(JobError::Stale) => return Err(moved(seen)),
            r => r?,
        };
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
    pub async fn delete(&self, id_or_name: &str, if_match: Option<u64>) -> Result<Job, JobError> {
        let job = self.get(id_or_name).await?;
        if let Some(r) = if_match.filter(|r| *r != job.revision) {
            return Err(JobError::PreconditionFailed(format!(
                "job {} is at revision {}, not {r} (If-Match): it changed since you read it; read it again",
                job.id, job.revision
            )));
        }
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
        let active = self.keys.active_name(&job.name);
        if let Some(kv) = self.store.get(&active).await? {
            if kv.value == id.as_bytes() {
                self.store.delete(&active).await?;
            }
        }
        if let Some(k) = &job.idempotency_key {
            self.store
                .delete(&self.keys.idempotency(&key_digest(k)))
                .await?;
        }
        self.store
            .delete(&self.keys.job_name(&job.name, id))
            .await?;
        self.store.delete(&self.keys.job(id)).await?;
        tracing::info!(job = %id, name = %job.name, "deleted");
        Ok(job)
    }

    /// Deletes the jobs that have ended beyond what retention keeps: the newest
    /// `keep_finished_jobs`, each for at most `finished_job_ttl_hours` after it ended
    /// (`now_ms` is the time now). Run by the coordinator; returns how many went.
    pub async fn prune(&self, jobs: &[Job], now_ms: u64) -> usize {
        let doomed = prunable(
            jobs,
            self.config.keep_finished_jobs,
            self.config.finished_job_ttl_hours,
            now_ms,
        );
        let mut n = 0;
        for id in &doomed {
            match self.delete(id, None).await {
                Ok(_) => n += 1,
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot prune a finished job"),
            }
        }
        if n > 0 {
            tracing::info!(
                deleted = n,
                keep = self.config.keep_finished_jobs,
                ttl_hours = self.config.finished_job_ttl_hours,
                "pruned finished jobs"
            );
        }
        n
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

#[cfg(test)]
mod retention_tests {
    use super::*;

    fn job(id: &str, phase: JobPhase, finished_ms: Option<u64>) -> Job {
        let spec = JobSpec::parse(
            "name: a\nmodel: {arch: mlp, num_classes: 2}\ndata: {train: {path: t}}\noutput: {dir: o}\n",
        )
        .unwrap();
        Job {
            id: id.into(),
            name: "a".into(),
            phase,
            spec,
            status: JobStatus {
                finished_at: finished_ms.map(ferry_cluster::time::rfc3339_millis),
                ..Default::default()
            },
            created_at: ferry_cluster::time::rfc3339_millis(0),
            node: None,
            cancel_requested: false,
            generation: 0,
            placement: vec![],
            teacher_placement: vec![],
            idempotency_key: None,
            revision: 0,
        }
    }

    #[test]
    fn retention_keeps_the_newest_finished_jobs_and_never_a_running_one() {
        let hour = 3_600_000;
        let now = 100 * hour;
        let jobs = vec![
            job("j1", JobPhase::Succeeded, Some(now - 50 * hour)),
            job("j2", JobPhase::Running, None),
            job("j3", JobPhase::Failed, Some(now - 2 * hour)),
            job("j4", JobPhase::Cancelled, Some(now - hour)),
            job("j5", JobPhase::Pending, None),
        ];
        assert_eq!(prunable(&jobs, 2, 0.0, now), ["j1"]);
        assert_eq!(prunable(&jobs, 1, 0.0, now), ["j3", "j1"]);
        assert!(prunable(&jobs, 0, 0.0, now).is_empty(), "0 keeps all");
        assert_eq!(
            prunable(&jobs, 0, 24.0, now),
            ["j1"],
            "ended over a day ago"
        );
        assert_eq!(prunable(&jobs, 0, 1.5, now), ["j3", "j1"]);
        assert!(prunable(&jobs, 10, 0.0, now).is_empty());
    }
}
