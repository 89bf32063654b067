//! The coordination store: the interface the daemon's job lifecycle is written against.
//!
//! It is etcd's data model, cut to what ferry needs: keys with revisions (a global revision
//! that every write increments, and per key its create and modification revisions and a
//! version), leases that delete their keys when they expire, prefix watches, and
//! compare-and-swap transactions. [`embedded::EmbeddedStore`] implements it on one machine
//! (standalone mode); `etcd::EtcdStore` (feature `etcd`) on etcd, for cluster mode.
//! [`conformance`] holds the checks both pass, etcd being the reference.

pub mod conformance;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;

use std::time::Duration;

use async_trait::async_trait;

/// A lease's id; 0 is "no lease".
pub type LeaseId = u64;

/// A key, its value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision at which the key was created (0 for a key that does not exist).
    pub create_revision: u64,
    /// The revision of the last write to the key.
    pub mod_revision: u64,
    /// Writes since creation, from 1.
    pub version: u64,
    /// The lease the key is attached to (0: none).
    pub lease: LeaseId,
}

/// What a transaction compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// 0 when the key does not exist.
    CreateRevision(u64),
    /// 0 when the key does not exist.
    ModRevision(u64),
    /// 0 when the key does not exist.
    Version(u64),
    /// Compared as bytes. Every comparison with a missing key fails, `NotEqual` included
    /// (etcd's rule).
    Value(Vec<u8>),
}

/// How a transaction compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// One condition of a transaction: `key`'s target `op` the given value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: &str) -> Compare {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(0),
        }
    }

    /// The key was last written at `revision` (optimistic concurrency).
    pub fn mod_revision(key: &str, revision: u64) -> Compare {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(revision),
        }
    }
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
}

/// If every compare holds, apply `success`, else `failure`; atomically, as one revision
/// (none when the branch changes nothing).
///
/// etcd also refuses a branch that writes one key twice (a put and a delete, or a prefix
/// delete covering a put, included) and, by default, more than 128 ops; the embedded store
/// accepts both, so stay within them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// Writes `value` at `key` (no lease) if `compare` holds, and nothing otherwise.
    pub fn put_if(compare: Compare, key: &str, value: Vec<u8>) -> Txn {
        Txn {
            compares: vec![compare],
            success: vec![TxnOp::Put {
                key: key.into(),
                value,
                lease: 0,
            }],
            failure: vec![],
        }
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: u64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key's new value.
    Put(KeyValue),
    /// The key as it was before; `mod_revision` is the revision of the delete.
    Delete(KeyValue),
}

impl WatchEvent {
    /// The key-value the event carries.
    pub fn kv(&self) -> &KeyValue {
        match self {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => kv,
        }
    }
}

/// A stream of changes under a prefix. An `Err` ends it (the watcher fell behind, its start
/// revision was compacted, or the store's connection broke); the caller lists again and
/// starts a new watch.
pub type Watcher = tokio::sync::mpsc::Receiver<Result<WatchEvent, StoreError>>;

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}; check the data directory's disk and permissions")]
    Io(String),
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} has been compacted (oldest available: {oldest}); list again and watch from now")]
    Compacted { requested: u64, oldest: u64 },
    #[error("the watcher fell behind and missed changes; list again and watch from now")]
    WatchLagged,
    #[error("the store at {path} is in use by another process (is another ferryd running with this --data-dir?)")]
    Locked { path: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded store's file exists but cannot be read as a store (truncated, empty,
    /// overwritten). Never started over silently: the records it held would be gone.
    #[error("the store at {path} is damaged ({why}). Restore it from a backup; or, to start with an empty store and lose every job record it held, move it away (mv {path} {path}.damaged) and start again")]
    Corrupt { path: String, why: String },
    /// The store answered, and refused: wrong credentials, no permission, a request it
    /// will never take. Retrying does not help; the message says what to fix.
    #[error("the store refused the request: {0}")]
    Refused(String),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::WatchLagged | StoreError::Compacted { .. }
        )
    }
}

/// The store interface; see the module documentation.
#[async_trait]
pub trait Store: Send + Sync {
    /// The value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;
    /// The first `limit` keys starting with `prefix` that sort after `after`, in key order:
    /// a page of a long prefix (a job's events), read without the keys before it.
    async fn range_after(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;
    /// Writes `key`; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<u64, StoreError>;
    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Runs a compare-and-swap transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    /// The current revision.
    async fn revision(&self) -> Result<u64, StoreError>;
    /// A lease that expires `ttl` after its last keep-alive (etcd: whole seconds, at least 2).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease; fails with [`StoreError::LeaseNotFound`] if it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends a lease now, deleting its keys; a lease already gone is not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Changes under `prefix` from `start_revision` on (inclusive; it may be in the future),
    /// or from now when `None`: every write after the call returns is seen. A compacted
    /// start revision is the stream's first item ([`StoreError::Compacted`]).
    async fn watch(&self, prefix: &str, start_revision: Option<u64>)
        -> Result<Watcher, StoreError>;
}
