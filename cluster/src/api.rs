//! The REST API's types (`/v1`), shared by the daemon, `ferryctl` and schedulers.

use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobPhase {
    /// Accepted, waiting for a slot (or for its resumption after a daemon restart).
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobPhase {
    /// Every phase, in the order a job goes through them.
    pub const ALL: [JobPhase; 5] = [
        JobPhase::Pending,
        JobPhase::Running,
        JobPhase::Succeeded,
        JobPhase::Failed,
        JobPhase::Cancelled,
    ];

    /// Whether the job has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled
        )
    }

    /// The phase as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Cancelled => "Cancelled",
        }
    }
}

/// Progress and outcome of a job. Optional fields are absent until known.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct JobStatus {
    /// Current epoch, 1-based (0 before training starts).
    pub epoch: u32,
    pub total_epochs: u32,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub total_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_sec: Option<f64>,
    /// The newest checkpoint's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// The resolved output directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
    /// Why the job failed, in words a person can act on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// When the current generation was placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_started_at: Option<String>,
    /// When the last generation that ended before the job did ended (the job went back to
    /// the queue to be placed again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_at: Option<String>,
    /// How many times the job's ranks have been started (a resume after a restart counts).
    pub attempts: u32,
    /// Restarts after a failure of its ranks (`restart.max_restarts` bounds them); a
    /// generation that ended because a node was lost does not count.
    pub restarts: u32,
}

/// A job: its spec as submitted, and what has become of it.
///
/// `S` is the spec's type: the daemon's [`JobSpec`], or for clients a `serde_json::Value`
/// kept verbatim, so that a `ferryctl` older than its daemon still reads jobs whose specs
/// use fields it does not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job<S = JobSpec> {
    pub id: String,
    pub name: String,
    pub phase: JobPhase,
    pub spec: S,
    pub status: JobStatus,
    pub created_at: String,
    /// The node that owns the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Set by a cancel request; the owner stops the ranks and marks the job Cancelled.
    #[serde(default)]
    pub cancel_requested: bool,
    /// How many times the job's ranks have been placed and started: each (re)start is a
    /// new generation. Every write about a running job is guarded by it, so a node still
    /// working on an older generation cannot overwrite anything newer.
    #[serde(default)]
    pub generation: u64,
    /// Where the current generation's ranks run: rank `i` at index `i`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<RankPlacement>,
    /// Where the current generation's distillation teachers run (replica `i` at index
    /// `i`) when the cluster has `teacher` nodes; empty: beside rank 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teacher_placement: Vec<RankPlacement>,
    /// The `Idempotency-Key` it was submitted with: a second submission with that key (and
    /// the same spec) within a day returns this job instead of making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The store revision of this record (for compare-and-swap); filled in on read. The
    /// API serves it as the record's `ETag`.
    #[serde(default)]
    pub revision: u64,
}

/// Where one rank of a job's generation runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RankPlacement {
    /// The node's name.
    pub node: String,
    /// The node's registration session when the rank was placed (the `create_revision`
    /// of its registration record). A node that restarted or lost its lease registers
    /// again under a new session, so a placement on an old one names ranks that are gone.
    pub session: u64,
    /// `cpu`, or `cuda:N` (the node's GPU N).
    pub device: String,
}

/// What a job event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A phase change.
    Phase,
    /// Training progress (epoch, step, loss, throughput).
    Progress,
    /// Validation at the end of an epoch.
    Eval,
    /// A checkpoint was written.
    Checkpoint,
    /// A log line from the job's ranks or the daemon.
    Log,
    /// Which `init` tensors were loaded, missing, unexpected or skipped.
    Init,
}

/// One entry of a job's event log (`GET /v1/jobs/{id}/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobEvent {
    /// Increasing per job, from 1.
    pub seq: u64,
    pub time: String,
    pub kind: EventKind,
    pub message: String,
    /// Structured details (numbers for progress, lists for init reports).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: serde_json::Value,
}

/// A page of events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventPage {
    pub events: Vec<JobEvent>,
    /// Pass as `after` to get the events that follow.
    pub next: u64,
    /// The job's phase when the page was read; a follower stops once it is terminal.
    pub phase: JobPhase,
}

/// A list of jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobList<S = JobSpec> {
    pub jobs: Vec<Job<S>>,
    /// With `limit`: the token that fetches the next page (`?continue=`), absent on the
    /// last one.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub cont: Option<String>,
}

/// A job without its spec: what `GET /v1/jobs?view=summary` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    pub phase: JobPhase,
    /// The spec's labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    pub status: JobStatus,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Ranks the job asks for, and on which device (`cpu`, `cuda`).
    pub ranks: u32,
    pub device: String,
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub revision: u64,
}

impl From<&Job> for JobSummary {
    fn from(j: &Job) -> Self {
        JobSummary {
            id: j.id.clone(),
            name: j.name.clone(),
            phase: j.phase,
            labels: j.spec.labels.clone(),
            status: j.status.clone(),
            created_at: j.created_at.clone(),
            node: j.node.clone(),
            ranks: j.spec.resources.ranks,
            device: serde_json::to_value(j.spec.resources.device)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            generation: j.generation,
            revision: j.revision,
        }
    }
}

/// A page of job summaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSummaryList {
    pub jobs: Vec<JobSummary>,
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub cont: Option<String>,
}

/// What a dry run (`POST /v1/jobs?dryRun=true`) answers when every check passed; a spec
/// with errors gets a 422 problem listing them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DryRun<S = JobSpec> {
    /// Always true here.
    pub valid: bool,
    /// The spec as it would run: paths resolved against the daemon's roots, defaults in.
    pub spec: S,
}

/// A ferry node as registered in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Node {
    pub name: String,
    /// `worker` (trains) or `teacher` (serves soft labels).
    pub role: String,
    /// The REST address it listens on.
    pub address: String,
    pub version: String,
    pub cpus: u32,
    pub cuda_devices: u32,
    pub started_at: String,
    /// `standalone` or `cluster`.
    pub mode: String,
    /// Jobs this node is running now.
    #[serde(default)]
    pub running_jobs: Vec<String>,
    /// Jobs this node runs at once (its `max_running_jobs`).
    #[serde(default = "one")]
    pub max_jobs: u32,
    /// CPU ranks this node runs at once, over all its jobs (its `cpu_rank_slots`); 0: no
    /// limit (a record from before the setting).
    #[serde(default)]
    pub cpu_slots: u32,
    /// Labels that `resources.node_selector` matches.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The address its ranks bind their data-plane listeners to.
    #[serde(default)]
    pub data_plane_ip: String,
    /// Its registration session (the `create_revision` of this record); filled in on read.
    #[serde(default)]
    pub session: u64,
    /// The nonce of its marker in the outputs root it mounts (cluster mode; empty if it
    /// could not write one): the coordinator places ranks only on nodes whose marker it
    /// finds in its own outputs root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outputs_marker: String,
}

fn one() -> u32 {
    1
}

/// A teacher replica serving a job's students, registered under
/// `keys.teacher(job, replica)` with a lease: if its process or its node dies, the record
/// goes, and students stop being sent to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TeacherRecord {
    pub job: String,
    pub replica: u32,
    /// The data-plane address students connect to.
    pub addr: String,
    pub node: String,
    pub pid: u32,
    pub registered_at: String,
}

/// A list of nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeList {
    pub nodes: Vec<Node>,
    /// The node that coordinates the cluster now (none while an election is open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
}

/// One field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldError {
    /// Dotted path into the spec, e.g. `train.optimizer.lr`.
    pub field: String,
    pub message: String,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// For invalid specs: every wrong field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The media type of [`Problem`] documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_reads_jobs_whose_spec_has_fields_it_does_not_know() {
        let spec = JobSpec::parse(
            "name: a\nmodel: {arch: mlp, num_classes: 2}\ndata: {train: {path: t}}\noutput: {dir: o}\n",
        )
        .unwrap();
        let job = Job {
            id: "j1".into(),
            name: "a".into(),
            phase: JobPhase::Running,
            spec,
            status: JobStatus::default(),
            created_at: "now".into(),
            node: None,
            cancel_requested: false,
            generation: 0,
            placement: vec![],
            teacher_placement: vec![],
            idempotency_key: None,
            revision: 0,
        };
        let mut doc = serde_json::to_value(&job).unwrap();
        doc["spec"]["train"]["from_the_future"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Job>(doc.clone()).is_err());
        let seen: Job<serde_json::Value> = serde_json::from_value(doc).unwrap();
        assert_eq!(seen.spec["train"]["from_the_future"], 1);
        assert_eq!(seen.phase, JobPhase::Running);
    }
}
