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
}
