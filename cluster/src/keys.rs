//! The store's key layout. Every key lives under one prefix so that several clusters
//! (or tests) can share an etcd without seeing each other.

/// Keys of one ferry cluster under `prefix` (for example `/ferry`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// A layout under `prefix`; a trailing `/` is ignored.
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix holding every job record.
    pub fn jobs(&self) -> String {
        format!("{}/jobs/", self.prefix)
    }

    /// The record of job `id`.
    pub fn job(&self, id: &str) -> String {
        format!("{}/jobs/{id}", self.prefix)
    }

    /// The prefix holding the events of job `id`.
    pub fn events(&self, id: &str) -> String {
        format!("{}/events/{id}/", self.prefix)
    }

    /// Event number `seq` of job `id`; zero-padded so that keys sort in sequence order.
    pub fn event(&self, id: &str, seq: u64) -> String {
        format!("{}/events/{id}/{seq:012}", self.prefix)
    }

    /// The prefix holding node registrations (each attached to its node's lease).
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// The registration of node `name`.
    pub fn node(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.prefix)
    }

    /// The prefix holding the teacher replicas of job `id` (each attached to a lease).
    pub fn teachers(&self, id: &str) -> String {
        format!("{}/teachers/{id}/", self.prefix)
    }

    /// The registration of teacher replica `replica` of job `id`.
    pub fn teacher(&self, id: &str, replica: u32) -> String {
        format!("{}/teachers/{id}/{replica:03}", self.prefix)
    }

    /// The number of the newest event of job `id` (written with each event, in one
    /// transaction, so that several writers never share a number).
    pub fn event_seq(&self, id: &str) -> String {
        format!("{}/eventseq/{id}", self.prefix)
    }

    /// The coordinator's election key (attached to the coordinator's lease).
    pub fn coordinator(&self) -> String {
        format!("{}/coordinator", self.prefix)
    }

    /// The prefix holding the ring addresses of generation `gen` of job `id`.
    pub fn rendezvous(&self, id: &str, gen: u64) -> String {
        format!("{}/rdzv/{id}/{gen:08}/", self.prefix)
    }

    /// The ring address of rank `rank` in generation `gen` of job `id`.
    pub fn rendezvous_rank(&self, id: &str, gen: u64, rank: usize) -> String {
        format!("{}/rdzv/{id}/{gen:08}/{rank:05}", self.prefix)
    }

    /// The prefix holding every generation's rendezvous of job `id`.
    pub fn rendezvous_all(&self, id: &str) -> String {
        format!("{}/rdzv/{id}/", self.prefix)
    }

    /// The prefix holding the nodes' reports on generation `gen` of job `id`.
    pub fn reports(&self, id: &str, gen: u64) -> String {
        format!("{}/reports/{id}/{gen:08}/", self.prefix)
    }

    /// Node `node`'s report on how its ranks of generation `gen` of job `id` ended.
    pub fn report(&self, id: &str, gen: u64, node: &str) -> String {
        format!("{}/reports/{id}/{gen:08}/{node}", self.prefix)
    }

    /// The prefix holding every job's reports.
    pub fn reports_root(&self) -> String {
        format!("{}/reports/", self.prefix)
    }

    /// The prefix holding every generation's reports of job `id`.
    pub fn reports_all(&self, id: &str) -> String {
        format!("{}/reports/{id}/", self.prefix)
    }

    /// The name index: one empty key per job, `names/{name}/{id}` (ids sort by submission).
    pub fn job_name(&self, name: &str, id: &str) -> String {
        format!("{}/names/{name}/{id}", self.prefix)
    }

    /// The prefix of the jobs named `name` in the name index.
    pub fn job_names(&self, name: &str) -> String {
        format!("{}/names/{name}/", self.prefix)
    }

    /// The whole name index.
    pub fn names(&self) -> String {
        format!("{}/names/", self.prefix)
    }

    /// The claim on name `name` by a job that has not ended (its id), created in the same
    /// transaction as the job: names are unique among such jobs.
    pub fn active_name(&self, name: &str) -> String {
        format!("{}/active-names/{name}", self.prefix)
    }

    /// A submission's `Idempotency-Key` (`digest` is a hash of the key): the job it made
    /// and a digest of the spec it came with.
    pub fn idempotency(&self, digest: &str) -> String {
        format!("{}/idempotency/{digest}", self.prefix)
    }

    /// The claim on output directory `dir` (an absolute path): the id of the job that
    /// writes there, created in the same transaction as the job.
    pub fn output_claim(&self, dir: &str) -> String {
        format!("{}/outputs/{}", self.prefix, dir.trim_start_matches('/'))
    }
}
