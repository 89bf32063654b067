//! What a rank process and its daemon say to each other: the daemon writes a
//! [`WorkerPlan`] file; the rank writes one JSON [`WorkerMessage`] per line on its
//! protocol pipe (the fd named by `FERRY_PROTOCOL_FD`), and the daemon writes [`Control`]
//! lines on its stdin. Whatever the process prints on stdout or stderr (a model's own
//! output included) is kept as log text, never read as a message.

use ferry_cluster::spec::JobSpec;
use serde::{Deserialize, Serialize};

/// Everything a rank needs to run, with every path resolved and confined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub job_id: String,
    /// The spec with absolute paths.
    pub spec: JobSpec,
    pub output_dir: String,
    /// Intra-op threads.
    pub threads: u32,
    /// Resume from the newest checkpoint in the output dir, if there is one.
    pub resume: bool,
    /// Emit a progress message at most this often (milliseconds).
    pub progress_interval_ms: u64,
    /// The address ranks bind their ring listeners to.
    pub bind_ip: String,
    /// How long a collective may wait for a peer (milliseconds).
    pub collective_timeout_ms: u64,
    /// The node the process runs on (names node-local files, such as the soft-label cache).
    #[serde(default)]
    pub node: String,
    /// The job's generation this process belongs to (tags its ring, and its metrics lines).
    #[serde(default)]
    pub generation: u64,
    /// A directory of this node's own for the job (not shared with other nodes: a file
    /// that several ranks map, such as the soft-label cache, lives here, never on the
    /// shared outputs root). Empty: the output dir.
    #[serde(default)]
    pub scratch_dir: String,
    /// The roots the spec's paths lie under: the process opens each path beneath its root
    /// again, following no link (see `train::confine`). Empty: no check (a plan written by
    /// hand).
    #[serde(default)]
    pub roots: PlanRoots,
    /// The daemon's `rank_sandbox` (`auto`, `landlock`, `off`; empty: off).
    #[serde(default)]
    pub sandbox: String,
}

/// The daemon's roots, as the process should see them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlanRoots {
    pub data: String,
    pub models: String,
    pub outputs: String,
}

impl WorkerPlan {
    /// The ring tag of this plan's job and generation (FNV-1a), the same on every node.
    pub fn ring_tag(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .job_id
            .bytes()
            .chain(*b"/")
            .chain(self.generation.to_le_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

/// What the daemon writes on a rank's stdin once every rank has reported its address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peers {
    /// The ring listener of rank `i` at index `i`.
    pub peers: Vec<String>,
}

/// What the daemon writes on a student rank's stdin whenever the job's teacher replicas
/// (registered in the store) change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Teachers {
    /// Data-plane addresses of the live replicas.
    pub teachers: Vec<String>,
}

/// What the daemon writes on a rank's stdin when its generation ends while it runs (a newer
/// generation replaces it on this node): the rank breaks its ring, saves its state if it is
/// its node's saver and has trained since its start, and exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stop {
    /// Why, for the rank's last words.
    pub stop: String,
}

/// The daemon's answer to a rank's [`WorkerMessage::MaySave`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveAnswer {
    /// Save: the node still holds the session the rank was started in, and the job was
    /// not cancelled.
    pub save: bool,
}

/// Any line the daemon writes on a rank's stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Control {
    Peers(Peers),
    Teachers(Teachers),
    Stop(Stop),
    Save(SaveAnswer),
}

/// A student's distillation counters, sent with its progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DistillProgress {
    /// Soft-label cache hits over lookups, since the start of the attempt.
    pub cache_hit_rate: f64,
    /// Steps trained on hard labels because no teacher answered.
    pub fallback_steps: u64,
    /// Requests moved to another replica.
    pub failovers: u64,
    /// Share of training time spent waiting for soft labels.
    pub teacher_wait_fraction: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Samples whose soft labels came over the network.
    pub samples_fetched: u64,
    /// Seconds from each soft-label request to its answer, since the last report (at most
    /// `ferry_cluster::distill::client::MAX_LATENCIES` of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_seconds: Vec<f32>,
}

/// Where a rank's steps spent their time over one report window. Every rank sends it
/// (not only rank 0): the slowest rank, and why it is slow, are read from these.
///
/// On CPU every step is timed. On CUDA the work is asynchronous, so only the first step
/// of each window is timed, with the device synchronised at each boundary between parts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub rank: u32,
    /// Steps the part seconds below cover.
    pub timed_steps: u32,
    /// Picking the batch (and, on CUDA, copying it to the device).
    pub data_s: f64,
    /// Forward pass, loss and backward pass (soft-label waits excluded).
    pub compute_s: f64,
    /// Waiting for the teacher's soft labels.
    pub teacher_s: f64,
    /// Waiting for the gradient all-reduce after backward (what overlap did not hide).
    pub sync_s: f64,
    /// Unscaling and the optimizer update.
    pub optimizer_s: f64,
    /// Sync seconds over every step of the window (timed or not), for the all-reduce
    /// counters.
    pub sync_total_s: f64,
    /// Gradient bytes this rank all-reduced over the window.
    pub allreduce_bytes: u64,
}

impl StepTiming {
    /// The part seconds in the order of `metrics::STEP_PARTS`.
    pub fn parts(&self) -> [f64; 5] {
        [
            self.data_s,
            self.compute_s,
            self.teacher_s,
            self.sync_s,
            self.optimizer_s,
        ]
    }
}

/// One line a rank prints on stdout. In a data-parallel job only rank 0 reports training
/// progress; every rank reports `rendezvous` and, when it cannot go on, `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// The rank listens for its ring neighbour here; it waits for [`Peers`] on stdin.
    Rendezvous { rank: u32, addr: String },
    /// Set-up is done; training starts.
    Started {
        total_steps: u64,
        steps_per_epoch: u64,
        epochs: u32,
        trainable_params: i64,
        frozen_params: i64,
        train_samples: u64,
        val_samples: u64,
        /// Where training resumed from, if it did.
        resumed_from: Option<String>,
        start_step: u64,
    },
    /// Free-form information worth an event.
    Log { message: String },
    /// Before training: how a long preparation (indexing the data set) is going.
    Preparing {
        message: String,
        done: u64,
        /// What `done` counts up to, when it is known.
        total: Option<u64>,
    },
    /// The outcome of `model.init`.
    Init {
        loaded: usize,
        missing: Vec<String>,
        unexpected: Vec<String>,
        skipped_shape: Vec<String>,
        /// File tensors left out by `model.init`'s include/exclude.
        #[serde(default)]
        excluded: Vec<String>,
        frozen: usize,
    },
    Progress {
        epoch: u32,
        step: u64,
        loss: f64,
        lr: f64,
        samples_per_sec: f64,
        /// Steps and samples (of the global batch) trained since the last report.
        #[serde(default)]
        steps: u64,
        #[serde(default)]
        samples: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        distill: Option<DistillProgress>,
    },
    /// A teacher process serves soft labels at `addr` (printed by `ferryd teacher`).
    TeacherReady { replica: u32, addr: String },
    Eval {
        epoch: u32,
        step: u64,
        val_loss: f64,
        val_accuracy: f64,
    },
    Checkpoint {
        step: u64,
        path: String,
        /// How long the write took, and how many bytes it wrote.
        #[serde(default)]
        seconds: f64,
        #[serde(default)]
        bytes: u64,
    },
    /// Every rank, once per report window.
    Timing(StepTiming),
    /// A rank measured the link from its ring neighbour `peer` on another host when the
    /// ring formed.
    Link {
        rank: u32,
        peer: u32,
        bytes_per_second: f64,
    },
    /// A rank whose ring broke asks before it saves its state into the shared outputs: a
    /// node that was cut off (paused, partitioned) past its lease must write nothing.
    MaySave { step: u64 },
    /// A rank whose ring broke (a peer died, or the daemon stopped the generation) holds
    /// the state of the last step every rank completed, and saved it for the next
    /// generation at `path` (`written`), or found it there already (a checkpoint of that
    /// step, or another node's save).
    Rescued {
        step: u64,
        path: String,
        written: bool,
        reason: String,
    },
    /// Training finished; final files written.
    Done {
        files: Vec<String>,
        samples_per_sec: f64,
    },
    /// The rank could not go on; `reason` says why and what to do.
    Failed { reason: String },
}
