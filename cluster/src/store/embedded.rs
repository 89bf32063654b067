//! The single-node store: an embedded, transactional database ([redb]) in the data dir.
//!
//! Every write is one redb transaction, committed durably, and one revision. Watches are
//! served from an in-memory history of recent changes plus a broadcast of new ones.
//! Leases are persisted; after a restart each gets its full TTL again (as in etcd), so
//! the owner has that long to renew it.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc};

use super::{
    Compare, CompareOp, CompareTarget, KeyValue, LeaseId, Store, StoreError, Txn, TxnOp,
    TxnResponse, WatchEvent, Watcher,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");

/// Changes kept in memory for watches that start in the past.
const HISTORY: usize = 4096;

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

struct State {
    revision: u64,
    next_lease: u64,
    leases: HashMap<LeaseId, (Duration, Instant)>,
    history: VecDeque<WatchEvent>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Opens the store's file, or creates it where there is none. A file that exists is only
/// opened, never created over: an empty or damaged one is refused ([`StoreError::Corrupt`]),
/// including when redb panics on it (it does on some truncations).
fn open_db(path: &Path) -> Result<Database, StoreError> {
    let shown = path.display().to_string();
    let corrupt = |why: String| StoreError::Corrupt {
        path: shown.clone(),
        why,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(format!("{shown}: {e}"))),
    };
    let Some(meta) = meta else {
        return Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: shown.clone(),
            },
            other => io(format!("{shown}: {other}")),
        });
    };
    if meta.len() == 0 {
        return Err(corrupt("the file is empty (0 bytes)".into()));
    }
    // redb reports most damage as an error, and panics on some: both become Corrupt.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Database::open(path));
    std::panic::set_hook(previous);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::Locked {
            path: shown.clone(),
        }),
        // redb reports a damaged file as invalid data (or a read past its end).
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if !matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Err(io(format!("{shown}: {e}")))
        }
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the store library failed on it".into());
            Err(corrupt(why))
        }
    }
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        b.extend_from_slice(&n.to_le_bytes());
    }
    b.extend_from_slice(&kv.value);
    b
}

fn decode(key: &str, b: &[u8]) -> Result<KeyValue, StoreError> {
    if b.len() < 32 {
        return Err(StoreError::Io(format!("corrupt record for key {key}")));
    }
    let n = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(KeyValue {
        key: key.to_string(),
        create_revision: n(0),
        mod_revision: n(1),
        version: n(2),
        lease: n(3),
        value: b[32..].to_vec(),
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `path`, a file. Fails clearly if another process has it open.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let db = open_db(path)?;
        let (revision, next_lease, leases) = {
            let w = db.begin_write().map_err(io)?;
            let (rev, next, leases) = {
                w.open_table(KV).map_err(io)?;
                let meta = w.open_table(META).map_err(io)?;
                let rev = meta
                    .get("revision")
                    .map_err(io)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                let next = meta
                    .get("next_lease")
                    .map_err(io)?
                    .map(|v| v.value())
                    .unwrap_or(1);
                let lt = w.open_table(LEASES).map_err(io)?;
                let now = Instant::now();
                let mut leases = HashMap::new();
                for entry in lt.iter().map_err(io)? {
                    let (id, ttl) = entry.map_err(io)?;
                    let ttl = Duration::from_millis(ttl.value());
                    leases.insert(id.value(), (ttl, now + ttl));
                }
                (rev, next, leases)
            };
            w.commit().map_err(io)?;
            (rev, next, leases)
        };
        let (events, _) = broadcast::channel(HISTORY);
        let inner = Arc::new(Inner {
            db,
            state: Mutex::new(State {
                revision,
                next_lease,
                leases,
                history: VecDeque::new(),
            }),
            events,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("store-leases".into())
            .spawn(move || expire_leases(weak))
            .map_err(io)?;
        Ok(EmbeddedStore { inner })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

fn expire_leases(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> = {
            let st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            st.leases
                .iter()
                .filter(|(_, (_, deadline))| *deadline <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in expired {
            if let Err(e) = inner.revoke(id) {
                tracing::warn!(lease = id, error = %e, "could not expire lease");
            }
        }
    }
}

impl Inner {
    fn read_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        let v = t.get(key).map_err(io)?;
        v.map(|v| decode(key, v.value())).transpose()
    }

    fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        let mut out = Vec::new();
        for entry in t.range(prefix..).map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            out.push(decode(k, v.value())?);
        }
        Ok(out)
    }

    fn range_after(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        let start = if after < prefix { prefix } else { after };
        let mut out = Vec::new();
        for entry in t.range(start..).map_err(io)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(io)?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            if k > after {
                out.push(decode(k, v.value())?);
            }
        }
        Ok(out)
    }

    /// Applies a transaction under the state lock: one durable commit, one revision.
    fn apply(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let w = self.db.begin_write().map_err(io)?;
        let mut changes = Vec::new();
        let succeeded;
        let revision = st.revision + 1;
        {
            let mut kv = w.open_table(KV).map_err(io)?;
            let mut ok = true;
            for c in &txn.compares {
                let cur = kv
                    .get(c.key.as_str())
                    .map_err(io)?
                    .map(|v| decode(&c.key, v.value()))
                    .transpose()?;
                ok &= compare(c, cur.as_ref());
            }
            succeeded = ok;
            let ops = if ok { &txn.success } else { &txn.failure };
            for op in ops {
                match op {
                    TxnOp::Put { key, value, lease } => {
                        if *lease != 0 && !st.leases.contains_key(lease) {
                            return Err(StoreError::LeaseNotFound(*lease));
                        }
                        let prev = kv
                            .get(key.as_str())
                            .map_err(io)?
                            .map(|v| decode(key, v.value()))
                            .transpose()?;
                        let new = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                            mod_revision: revision,
                            version: prev.as_ref().map_or(1, |p| p.version + 1),
                            lease: *lease,
                        };
                        kv.insert(key.as_str(), encode(&new).as_slice())
                            .map_err(io)?;
                        changes.push(WatchEvent::Put(new));
                    }
                    TxnOp::Delete { key } => {
                        if let Some(prev) = kv
                            .remove(key.as_str())
                            .map_err(io)?
                            .map(|v| decode(key, v.value()))
                            .transpose()?
                        {
                            changes.push(WatchEvent::Delete(KeyValue {
                                mod_revision: revision,
                                ..prev
                            }));
                        }
                    }
                    TxnOp::DeletePrefix { prefix } => {
                        let keys: Vec<String> = {
                            let mut keys = Vec::new();
                            for entry in kv.range(prefix.as_str()..).map_err(io)? {
                                let (k, _) = entry.map_err(io)?;
                                if !k.value().starts_with(prefix.as_str()) {
                                    break;
                                }
                                keys.push(k.value().to_string());
                            }
                            keys
                        };
                        for key in keys {
                            if let Some(prev) = kv
                                .remove(key.as_str())
                                .map_err(io)?
                                .map(|v| decode(&key, v.value()))
                                .transpose()?
                            {
                                changes.push(WatchEvent::Delete(KeyValue {
                                    mod_revision: revision,
                                    ..prev
                                }));
                            }
                        }
                    }
                }
            }
        }
        if changes.is_empty() {
            // Nothing written: no new revision (as in etcd).
            w.abort().map_err(io)?;
            return Ok(TxnResponse {
                succeeded,
                revision: st.revision,
            });
        }
        w.open_table(META)
            .map_err(io)?
            .insert("revision", revision)
            .map_err(io)?;
        w.commit().map_err(io)?;
        st.revision = revision;
        for ev in changes {
            if st.history.len() == HISTORY {
                st.history.pop_front();
            }
            st.history.push_back(ev.clone());
            let _ = self.events.send(ev);
        }
        Ok(TxnResponse {
            succeeded,
            revision,
        })
    }

    fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let keys: Vec<String> = {
            let r = self.db.begin_read().map_err(io)?;
            let t = r.open_table(KV).map_err(io)?;
            let mut keys = Vec::new();
            for entry in t.iter().map_err(io)? {
                let (k, v) = entry.map_err(io)?;
                if decode(k.value(), v.value())?.lease == id {
                    keys.push(k.value().to_string());
                }
            }
            keys
        };
        let txn = Txn {
            success: keys.into_iter().map(|key| TxnOp::Delete { key }).collect(),
            ..Default::default()
        };
        self.apply(txn)?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.leases.remove(&id);
        let w = self.db.begin_write().map_err(io)?;
        w.open_table(LEASES).map_err(io)?.remove(id).map_err(io)?;
        w.commit().map_err(io)
    }
}

fn compare(c: &Compare, cur: Option<&KeyValue>) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        CompareTarget::CreateRevision(v) => cur.map_or(0, |kv| kv.create_revision).cmp(v),
        CompareTarget::ModRevision(v) => cur.map_or(0, |kv| kv.mod_revision).cmp(v),
        CompareTarget::Version(v) => cur.map_or(0, |kv| kv.version).cmp(v),
        CompareTarget::Value(v) => match cur {
            Some(kv) => kv.value.as_slice().cmp(v.as_slice()),
            // etcd fails every value comparison on a missing key, NotEqual included.
            None => return false,
        },
    };
    match c.op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Less => ord == Ordering::Less,
        CompareOp::Greater => ord == Ordering::Greater,
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |i| i.read_kv(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.range(&prefix)).await
    }

    async fn range_after(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (prefix, after) = (prefix.to_string(), after.to_string());
        self.blocking(move |i| i.range_after(&prefix, &after, limit))
            .await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<u64, StoreError> {
        let txn = Txn {
            success: vec![TxnOp::Put {
                key: key.into(),
                value,
                lease,
            }],
            ..Default::default()
        };
        Ok(self.blocking(move |i| i.apply(txn)).await?.revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let txn = Txn {
            compares: vec![Compare {
                key: key.into(),
                op: CompareOp::Greater,
                target: CompareTarget::CreateRevision(0),
            }],
            success: vec![TxnOp::Delete { key: key.into() }],
            failure: vec![],
        };
        Ok(self.blocking(move |i| i.apply(txn)).await?.succeeded)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.blocking(move |i| i.apply(txn)).await
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |i| {
            let mut st = i.state.lock().unwrap_or_else(|p| p.into_inner());
            let id = st.next_lease;
            let w = i.db.begin_write().map_err(io)?;
            w.open_table(LEASES)
                .map_err(io)?
                .insert(id, ttl.as_millis() as u64)
                .map_err(io)?;
            w.open_table(META)
                .map_err(io)?
                .insert("next_lease", id + 1)
                .map_err(io)?;
            w.commit().map_err(io)?;
            st.next_lease = id + 1;
            st.leases.insert(id, (ttl, Instant::now() + ttl));
            Ok(id)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match st.leases.get_mut(&lease) {
            Some((ttl, deadline)) if *deadline > now => {
                *deadline = now + *ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |i| i.revoke(lease)).await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<Watcher, StoreError> {
        let (tx, rx) = mpsc::channel(256);
        // As in etcd, a start revision that is no longer in the history is the stream's
        // first (and last) item, not an error of the call.
        let (backlog, mut live) = {
            let st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut backlog = Vec::new();
            if let Some(start) = start_revision {
                let oldest = st
                    .history
                    .front()
                    .map_or(st.revision + 1, |e| e.kv().mod_revision);
                if start < oldest && start <= st.revision {
                    backlog.push(Err(StoreError::Compacted {
                        requested: start,
                        oldest,
                    }));
                } else {
                    backlog.extend(
                        st.history
                            .iter()
                            .filter(|e| {
                                e.kv().mod_revision >= start && e.kv().key.starts_with(prefix)
                            })
                            .cloned()
                            .map(Ok),
                    );
                }
            }
            (backlog, self.inner.events.subscribe())
        };
        let compacted = backlog.iter().any(|e| e.is_err());
        // Live events before a start revision in the future are not wanted.
        let start = start_revision.unwrap_or(0);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            for ev in backlog {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            if compacted {
                return;
            }
            loop {
                let msg = tokio::select! {
                    m = live.recv() => m,
                    _ = tx.closed() => return,
                };
                match msg {
                    Ok(ev) if ev.kv().key.starts_with(&prefix) && ev.kv().mod_revision >= start => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Err(StoreError::WatchLagged)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::run_all;
    use super::*;

    fn open() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn conformance() {
        let (_d, s) = open();
        run_all(&s, "/conf").await;
    }

    #[tokio::test]
    async fn an_empty_or_truncated_file_is_refused_not_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            for i in 0..200 {
                s.put(&format!("/k/{i:04}"), vec![7; 4096], 0)
                    .await
                    .unwrap();
            }
        }
        // The lease thread lets go of the database within its 200 ms tick.
        std::thread::sleep(Duration::from_millis(500));
        let len = std::fs::metadata(&path).unwrap().len();
        for cut in [0, len / 2, len / 8] {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            match EmbeddedStore::open(&path) {
                Err(StoreError::Corrupt { why, .. }) => {
                    eprintln!("cut at {cut} of {len}: {why}");
                }
                Err(e) => panic!("cut at {cut}: {e}"),
                Ok(_) => panic!("cut at {cut} of {len} bytes: opened"),
            }
            // Nothing was written over it.
            assert_eq!(std::fs::metadata(&path).unwrap().len(), cut);
        }
    }

    #[tokio::test]
    async fn a_watch_from_before_the_history_is_compacted() {
        let (_d, s) = open();
        let first = s.put("/c", b"0".to_vec(), 0).await.unwrap();
        // One transaction of many puts: one revision, many history entries.
        let txn = Txn {
            success: (0..HISTORY + 1)
                .map(|i| TxnOp::Put {
                    key: format!("/c/{i}"),
                    value: vec![],
                    lease: 0,
                })
                .collect(),
            ..Default::default()
        };
        let last = s.txn(txn).await.unwrap().revision;
        let mut w = s.watch("/c", Some(first)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .unwrap();
        match got {
            Some(Err(StoreError::Compacted { requested, oldest })) => {
                assert_eq!(requested, first);
                assert!(oldest > first && oldest <= last, "oldest {oldest}");
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(w.recv().await.is_none(), "the error ends the watch");
    }

    #[tokio::test]
    async fn revisions_and_versions() {
        let (_d, s) = open();
        let r1 = s.put("/a", b"1".to_vec(), 0).await.unwrap();
        let r2 = s.put("/a", b"2".to_vec(), 0).await.unwrap();
        assert_eq!(r2, r1 + 1);
        let kv = s.get("/a").await.unwrap().unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (r1, r2, 2)
        );
        assert_eq!(kv.value, b"2");
        assert!(s.delete("/a").await.unwrap());
        assert!(!s.delete("/a").await.unwrap());
        assert_eq!(s.get("/a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn range_is_by_prefix_in_key_order() {
        let (_d, s) = open();
        for k in ["/j/2", "/j/1", "/jobs", "/k/1"] {
            s.put(k, k.as_bytes().to_vec(), 0).await.unwrap();
        }
        let keys: Vec<_> = s
            .range("/j/")
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, vec!["/j/1", "/j/2"]);
    }

    #[tokio::test]
    async fn compare_and_swap() {
        let (_d, s) = open();
        let create = |v: &[u8]| Txn {
            compares: vec![Compare::absent("/x")],
            success: vec![TxnOp::Put {
                key: "/x".into(),
                value: v.to_vec(),
                lease: 0,
            }],
            failure: vec![],
        };
        assert!(s.txn(create(b"first")).await.unwrap().succeeded);
        assert!(!s.txn(create(b"second")).await.unwrap().succeeded);
        let kv = s.get("/x").await.unwrap().unwrap();
        let stale = Txn {
            compares: vec![Compare::mod_revision("/x", kv.mod_revision - 1)],
            success: vec![TxnOp::Put {
                key: "/x".into(),
                value: b"lost".to_vec(),
                lease: 0,
            }],
            failure: vec![],
        };
        assert!(!s.txn(stale).await.unwrap().succeeded);
        let fresh = Txn {
            compares: vec![Compare::mod_revision("/x", kv.mod_revision)],
            success: vec![TxnOp::Put {
                key: "/x".into(),
                value: b"won".to_vec(),
                lease: 0,
            }],
            failure: vec![],
        };
        assert!(s.txn(fresh).await.unwrap().succeeded);
        assert_eq!(s.get("/x").await.unwrap().unwrap().value, b"won");
    }

    #[tokio::test]
    async fn leases_expire_and_delete_their_keys() {
        let (_d, s) = open();
        let lease = s.grant_lease(Duration::from_millis(600)).await.unwrap();
        s.put("/n/1", b"up".to_vec(), lease).await.unwrap();
        s.put("/n/2", b"kept".to_vec(), 0).await.unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.keep_alive(lease).await.unwrap();
        }
        assert!(s.get("/n/1").await.unwrap().is_some(), "kept alive");
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.get("/n/1").await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "lease did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(s.keep_alive(lease).await.is_err());
        assert!(s.get("/n/2").await.unwrap().is_some());
        assert!(matches!(
            s.put("/n/3", vec![], lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    #[tokio::test]
    async fn watches_see_history_and_live_changes_under_their_prefix() {
        let (_d, s) = open();
        let r1 = s.put("/w/a", b"1".to_vec(), 0).await.unwrap();
        s.put("/other", b"x".to_vec(), 0).await.unwrap();
        let mut w = s.watch("/w/", Some(r1)).await.unwrap();
        s.put("/w/b", b"2".to_vec(), 0).await.unwrap();
        s.delete("/w/a").await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let ev = tokio::time::timeout(Duration::from_secs(5), w.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen.push(match ev {
                WatchEvent::Put(kv) => format!("put {}", kv.key),
                WatchEvent::Delete(kv) => format!("delete {}", kv.key),
            });
        }
        assert_eq!(seen, vec!["put /w/a", "put /w/b", "delete /w/a"]);
    }

    #[tokio::test]
    async fn data_and_revision_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let rev = {
            let s = EmbeddedStore::open(&path).unwrap();
            s.put("/keep", b"v".to_vec(), 0).await.unwrap()
        };
        // The lease thread holds the database until it notices the drop.
        let s = loop {
            match EmbeddedStore::open(&path) {
                Ok(s) => break s,
                Err(StoreError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(s.get("/keep").await.unwrap().unwrap().value, b"v");
        assert_eq!(s.revision().await.unwrap(), rev);
        assert!(s.put("/keep", b"w".to_vec(), 0).await.unwrap() > rev);
    }
}
