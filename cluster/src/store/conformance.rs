//! One behaviour for every [`Store`]: checks that each implementation must pass, with etcd
//! as the reference. The embedded store's unit tests and the etcd tests in `tests/` run them.
//!
//! Each check works under its own prefix (`{prefix}/{check}/`), so several runs can share one
//! etcd, one after another. The revision checks count every write to the store: nothing else
//! may write to it during a run.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::{
    Compare, CompareOp, CompareTarget, LeaseId, Store, StoreError, Txn, TxnOp, WatchEvent, Watcher,
};

/// How long a check waits for something that should happen at once (a watch event). Generous:
/// test machines are shared and noisy.
const WAIT: Duration = Duration::from_secs(10);

/// The lease TTL of the expiry check: etcd's minimum.
const SHORT_TTL: Duration = Duration::from_secs(2);

type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
type Check = for<'a> fn(&'a dyn Store, &'a str) -> CheckFuture<'a>;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |s, p| Box::pin($name(s, p))),)*]
    };
}

/// Every check, by name, in the order `run_all` runs them.
const CHECKS: &[(&str, Check)] = checks![
    revisions_and_versions,
    range_is_by_prefix_in_key_order,
    range_after_pages_a_prefix,
    delete_says_whether_the_key_existed,
    compare_and_swap,
    every_compare_target_and_op,
    txn_applies_one_branch_at_one_revision,
    txn_delete_prefix,
    txn_without_writes_keeps_the_revision,
    txn_with_an_unknown_lease_writes_nothing,
    leases_are_kept_alive_then_expire,
    revoking_a_lease_deletes_its_keys,
    watch_from_the_past_sees_history_then_live_changes,
    watch_sees_only_its_prefix,
    watch_from_now_sees_only_later_changes,
    watch_from_a_future_revision_waits_for_it,
    watch_sees_a_transaction_in_op_order,
    dropping_watchers_is_fine,
];

/// Runs every check under `prefix`; panics with the check's name and what went wrong. Nothing
/// else may write to the store meanwhile (a lease expiring included): the checks count
/// revisions.
pub async fn run_all(store: &dyn Store, prefix: &str) {
    for (name, check) in CHECKS {
        let dir = format!("{prefix}/{name}/");
        let started = Instant::now();
        if let Err(e) = check(store, &dir).await {
            panic!("store conformance check `{name}` failed (keys under {dir}): {e}");
        }
        eprintln!("conformance: {name} ok in {:.2?}", started.elapsed());
    }
}

/// Fails the check with a message (and where) unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

/// Fails the check unless `left == right`, showing both.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!(
                "{}:{}: {}: got {:?}, expected {:?}",
                file!(),
                line!(),
                format!($($msg)+),
                left,
                right
            ));
        }
    }};
}

/// A store call that must succeed.
trait Must<T> {
    fn must(self, what: &str) -> Result<T, String>;
}

impl<T> Must<T> for Result<T, StoreError> {
    fn must(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e} ({e:?})"))
    }
}

fn put_op(key: &str, value: &[u8], lease: LeaseId) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.to_vec(),
        lease,
    }
}

/// The next event of a watch, within [`WAIT`].
async fn next(w: &mut Watcher, what: &str) -> Result<WatchEvent, String> {
    match tokio::time::timeout(WAIT, w.recv()).await {
        Err(_) => Err(format!("no watch event within {WAIT:?} ({what})")),
        Ok(None) => Err(format!("the watch ended ({what})")),
        Ok(Some(Err(e))) => Err(format!("the watch failed ({what}): {e}")),
        Ok(Some(Ok(ev))) => Ok(ev),
    }
}

/// An event as `put KEY@REV` or `delete KEY@REV`, for comparing sequences.
fn show(ev: &WatchEvent) -> String {
    match ev {
        WatchEvent::Put(kv) => format!("put {}@{}", kv.key, kv.mod_revision),
        WatchEvent::Delete(kv) => format!("delete {}@{}", kv.key, kv.mod_revision),
    }
}

async fn revisions_and_versions(s: &dyn Store, p: &str) -> Result<(), String> {
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let r0 = s.revision().await.must("revision")?;
    let r1 = s.put(&a, b"1".to_vec(), 0).await.must("put a")?;
    ensure_eq!(r1, r0 + 1, "a put is one revision");
    ensure_eq!(
        s.revision().await.must("revision")?,
        r1,
        "revision after a put"
    );
    let r2 = s.put(&a, b"2".to_vec(), 0).await.must("put a again")?;
    ensure_eq!(r2, r1 + 1, "the next put is the next revision");
    let kv = s.get(&a).await.must("get a")?.ok_or("a is missing")?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        (r1, r2, 2, 0),
        "a's (create, mod, version, lease)"
    );
    ensure_eq!(kv.value, b"2".to_vec(), "a's value");
    ensure_eq!(kv.key, a, "a's key");
    let r3 = s.put(&b, Vec::new(), 0).await.must("put b")?;
    ensure_eq!(r3, r2 + 1, "a put of another key");
    let kv = s.get(&b).await.must("get b")?.ok_or("b is missing")?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r3, r3, 1),
        "a new key's (create, mod, version)"
    );
    ensure!(kv.value.is_empty(), "an empty value stays empty");
    ensure!(s.delete(&a).await.must("delete a")?, "a existed");
    ensure_eq!(
        s.revision().await.must("revision")?,
        r3 + 1,
        "a delete is one revision"
    );
    ensure_eq!(s.get(&a).await.must("get a")?, None, "a after its delete");
    let r5 = s
        .put(&a, b"3".to_vec(), 0)
        .await
        .must("put a after its delete")?;
    let kv = s.get(&a).await.must("get a")?.ok_or("a is missing")?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r5, r5, 1),
        "a re-created key starts again"
    );
    ensure_eq!(
        s.get(&format!("{p}none")).await.must("get none")?,
        None,
        "a missing key"
    );
    Ok(())
}

async fn range_is_by_prefix_in_key_order(s: &dyn Store, p: &str) -> Result<(), String> {
    let keys = ["j/2", "j/1", "jobs", "j/10", "k/1", "j/B", "j/1/x", "j"];
    for k in keys {
        s.put(&format!("{p}{k}"), k.as_bytes().to_vec(), 0)
            .await
            .must("put")?;
    }
    let got = |kvs: Vec<super::KeyValue>| -> Result<Vec<String>, String> {
        kvs.into_iter()
            .map(|kv| {
                let short = kv.key.strip_prefix(p).unwrap_or(&kv.key).to_string();
                if kv.value != short.as_bytes() {
                    return Err(format!("{} has the value of another key", kv.key));
                }
                Ok(short)
            })
            .collect()
    };
    let j = got(s.range(&format!("{p}j/")).await.must("range j/")?)?;
    // Byte order: uppercase before digits' successors, "1" < "1/x" < "10" < "2".
    ensure_eq!(j, vec!["j/1", "j/1/x", "j/10", "j/2", "j/B"], "range j/");
    let all_j = got(s.range(&format!("{p}j")).await.must("range j")?)?;
    ensure_eq!(
        all_j,
        vec!["j", "j/1", "j/1/x", "j/10", "j/2", "j/B", "jobs"],
        "range j (a prefix is not a path)"
    );
    ensure!(
        s.range(&format!("{p}none/"))
            .await
            .must("range none/")?
            .is_empty(),
        "an empty range"
    );
    ensure_eq!(
        s.range(p).await.must("range all")?.len(),
        keys.len(),
        "range of the check's prefix"
    );
    Ok(())
}

async fn range_after_pages_a_prefix(s: &dyn Store, p: &str) -> Result<(), String> {
    for k in ["e/003", "e/001", "e/002", "e/010", "e0", "f/001"] {
        s.put(&format!("{p}{k}"), b"v".to_vec(), 0)
            .await
            .must("put")?;
    }
    let keys = |kvs: Vec<super::KeyValue>| -> Vec<String> {
        kvs.into_iter()
            .map(|kv| kv.key.strip_prefix(p).unwrap_or(&kv.key).to_string())
            .collect()
    };
    let e = format!("{p}e/");
    let page = |after: String, limit| {
        let e = e.clone();
        async move { s.range_after(&e, &after, limit).await.must("range_after") }
    };
    // From before the prefix: its first keys.
    ensure_eq!(
        keys(page(p.to_string(), 2).await?),
        vec!["e/001", "e/002"],
        "first page"
    );
    // Strictly after a key, whether it exists or not; never past the prefix.
    ensure_eq!(
        keys(page(format!("{p}e/002"), 2).await?),
        vec!["e/003", "e/010"],
        "after e/002"
    );
    ensure_eq!(
        keys(page(format!("{p}e/004"), 10).await?),
        vec!["e/010"],
        "after a missing key"
    );
    ensure!(
        page(format!("{p}e/010"), 10).await?.is_empty(),
        "after the last key"
    );
    ensure!(page(format!("{p}e/"), 0).await?.is_empty(), "limit 0");
    Ok(())
}

async fn delete_says_whether_the_key_existed(s: &dyn Store, p: &str) -> Result<(), String> {
    let k = format!("{p}k");
    let before = s.revision().await.must("revision")?;
    ensure!(
        !s.delete(&k).await.must("delete missing")?,
        "a missing key did not exist"
    );
    ensure_eq!(
        s.revision().await.must("revision")?,
        before,
        "deleting nothing writes nothing"
    );
    s.put(&k, b"v".to_vec(), 0).await.must("put")?;
    ensure!(s.delete(&k).await.must("delete")?, "the key existed");
    ensure!(!s.delete(&k).await.must("delete again")?, "the key is gone");
    Ok(())
}

async fn compare_and_swap(s: &dyn Store, p: &str) -> Result<(), String> {
    let x = format!("{p}x");
    let create = |v: &[u8]| Txn::put_if(Compare::absent(&x), &x, v.to_vec());
    ensure!(
        s.txn(create(b"first")).await.must("create")?.succeeded,
        "create when absent"
    );
    ensure!(
        !s.txn(create(b"second"))
            .await
            .must("create again")?
            .succeeded,
        "create when present"
    );
    let kv = s.get(&x).await.must("get")?.ok_or("x is missing")?;
    ensure_eq!(kv.value, b"first".to_vec(), "the first create won");
    let stale = Txn::put_if(
        Compare::mod_revision(&x, kv.mod_revision - 1),
        &x,
        b"lost".to_vec(),
    );
    let resp = s.txn(stale).await.must("stale swap")?;
    ensure!(!resp.succeeded, "a stale mod_revision loses");
    let fresh = Txn::put_if(
        Compare::mod_revision(&x, kv.mod_revision),
        &x,
        b"won".to_vec(),
    );
    let resp = s.txn(fresh).await.must("fresh swap")?;
    ensure!(resp.succeeded, "the current mod_revision wins");
    let now = s.get(&x).await.must("get")?.ok_or("x is missing")?;
    ensure_eq!(now.value, b"won".to_vec(), "the swap's value");
    ensure_eq!(
        now.mod_revision,
        resp.revision,
        "a transaction's revision is its write's"
    );
    let again = Txn::put_if(
        Compare::mod_revision(&x, kv.mod_revision),
        &x,
        b"twice".to_vec(),
    );
    ensure!(
        !s.txn(again).await.must("replayed swap")?.succeeded,
        "a swap cannot be replayed"
    );
    s.delete(&x).await.must("delete")?;
    ensure!(
        s.txn(create(b"again")).await.must("re-create")?.succeeded,
        "absent again after a delete"
    );
    Ok(())
}

async fn every_compare_target_and_op(s: &dyn Store, p: &str) -> Result<(), String> {
    use std::cmp::Ordering;
    let k = format!("{p}k");
    s.put(&k, b"a".to_vec(), 0).await.must("put")?;
    s.put(&k, b"b".to_vec(), 0).await.must("put")?;
    let kv = s.get(&k).await.must("get")?.ok_or("k is missing")?;
    let (c, m) = (kv.create_revision, kv.mod_revision);
    let ops = [
        CompareOp::Equal,
        CompareOp::NotEqual,
        CompareOp::Less,
        CompareOp::Greater,
    ];
    let holds = |op: CompareOp, ord: Ordering| match op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Less => ord == Ordering::Less,
        CompareOp::Greater => ord == Ordering::Greater,
    };
    // (key, target, how the key's value compares with the operand; None: every op fails):
    // the stored value against a smaller, an equal and a larger operand, for the key and
    // for a missing one.
    let missing = format!("{p}missing");
    let mut cases: Vec<(&str, CompareTarget, Option<Ordering>)> = Vec::new();
    for (actual, operand, target) in [
        (c, c - 1, CompareTarget::CreateRevision(c - 1)),
        (c, c, CompareTarget::CreateRevision(c)),
        (c, c + 1, CompareTarget::CreateRevision(c + 1)),
        (m, m - 1, CompareTarget::ModRevision(m - 1)),
        (m, m, CompareTarget::ModRevision(m)),
        (m, m + 1, CompareTarget::ModRevision(m + 1)),
        (2, 1, CompareTarget::Version(1)),
        (2, 2, CompareTarget::Version(2)),
        (2, 3, CompareTarget::Version(3)),
    ] {
        cases.push((&k, target, Some(actual.cmp(&operand))));
    }
    for operand in [b"a", b"b", b"c"] {
        let ord = b"b".cmp(operand);
        cases.push((&k, CompareTarget::Value(operand.to_vec()), Some(ord)));
    }
    // A missing key has revisions and version 0.
    for (operand, target) in [
        (0, CompareTarget::CreateRevision(0)),
        (1, CompareTarget::CreateRevision(1)),
        (0, CompareTarget::ModRevision(0)),
        (1, CompareTarget::ModRevision(1)),
        (0, CompareTarget::Version(0)),
        (1, CompareTarget::Version(1)),
    ] {
        cases.push((&missing, target, Some(0u64.cmp(&operand))));
    }
    // etcd fails every value comparison on a missing key, NotEqual included.
    for operand in [b"".to_vec(), b"x".to_vec()] {
        cases.push((&missing, CompareTarget::Value(operand), None));
    }
    let before = s.revision().await.must("revision")?;
    for (key, target, expected) in &cases {
        for op in ops {
            let txn = Txn {
                compares: vec![Compare {
                    key: key.to_string(),
                    op,
                    target: target.clone(),
                }],
                ..Default::default()
            };
            let got = s.txn(txn).await.must("compare")?.succeeded;
            let expected = expected.is_some_and(|ord| holds(op, ord));
            ensure_eq!(got, expected, "{key} {target:?} {op:?}");
        }
    }
    // Several compares: all must hold.
    let both = |second: CompareTarget| Txn {
        compares: vec![
            Compare::mod_revision(&k, m),
            Compare {
                key: k.clone(),
                op: CompareOp::Equal,
                target: second,
            },
        ],
        ..Default::default()
    };
    ensure!(
        s.txn(both(CompareTarget::Version(2)))
            .await
            .must("two compares")?
            .succeeded,
        "both hold"
    );
    ensure!(
        !s.txn(both(CompareTarget::Version(3)))
            .await
            .must("two compares")?
            .succeeded,
        "one fails"
    );
    ensure_eq!(
        s.revision().await.must("revision")?,
        before,
        "compares alone write nothing"
    );
    Ok(())
}

async fn txn_applies_one_branch_at_one_revision(s: &dyn Store, p: &str) -> Result<(), String> {
    let (a, b, flag) = (format!("{p}a"), format!("{p}b"), format!("{p}flag"));
    s.put(&b, b"old".to_vec(), 0).await.must("put b")?;
    let txn = |want: &[u8]| Txn {
        compares: vec![Compare {
            key: flag.clone(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(want.to_vec()),
        }],
        success: vec![put_op(&a, b"yes", 0), TxnOp::Delete { key: b.clone() }],
        failure: vec![put_op(&a, b"no", 0), put_op(&b, b"no", 0)],
    };
    let before = s.revision().await.must("revision")?;
    // The flag is missing: the failure branch runs.
    let resp = s.txn(txn(b"on")).await.must("txn")?;
    ensure!(!resp.succeeded, "the compare failed");
    ensure_eq!(resp.revision, before + 1, "a branch is one revision");
    let (ka, kb) = (
        s.get(&a).await.must("get a")?.ok_or("a is missing")?,
        s.get(&b).await.must("get b")?.ok_or("b is missing")?,
    );
    ensure_eq!(
        (ka.value, kb.value),
        (b"no".to_vec(), b"no".to_vec()),
        "the failure branch's writes"
    );
    ensure_eq!(
        (ka.mod_revision, kb.mod_revision),
        (resp.revision, resp.revision),
        "one revision"
    );
    s.put(&flag, b"on".to_vec(), 0).await.must("put flag")?;
    let resp = s.txn(txn(b"on")).await.must("txn")?;
    ensure!(resp.succeeded, "the compare held");
    ensure_eq!(
        s.get(&a).await.must("get a")?.map(|kv| kv.value),
        Some(b"yes".to_vec()),
        "a"
    );
    ensure_eq!(
        s.get(&b).await.must("get b")?,
        None,
        "b was deleted by the success branch"
    );
    ensure_eq!(
        s.revision().await.must("revision")?,
        resp.revision,
        "the store's revision"
    );
    Ok(())
}

async fn txn_delete_prefix(s: &dyn Store, p: &str) -> Result<(), String> {
    for k in ["d/a", "d/b", "d/b/c", "dx", "e"] {
        s.put(&format!("{p}{k}"), b"v".to_vec(), 0)
            .await
            .must("put")?;
    }
    let before = s.revision().await.must("revision")?;
    let mut w = s.watch(p, Some(before + 1)).await.must("watch")?;
    let txn = Txn {
        success: vec![TxnOp::DeletePrefix {
            prefix: format!("{p}d/"),
        }],
        ..Default::default()
    };
    let resp = s.txn(txn).await.must("delete prefix")?;
    ensure!(resp.succeeded, "no compares: the success branch");
    ensure_eq!(resp.revision, before + 1, "a prefix delete is one revision");
    let left: Vec<String> = s
        .range(p)
        .await
        .must("range")?
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    ensure_eq!(
        left,
        vec![format!("{p}dx"), format!("{p}e")],
        "what is left"
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(show(&next(&mut w, "the prefix delete").await?));
    }
    let r = resp.revision;
    ensure_eq!(
        seen,
        vec![
            format!("delete {p}d/a@{r}"),
            format!("delete {p}d/b@{r}"),
            format!("delete {p}d/b/c@{r}"),
        ],
        "a delete event per key, in key order"
    );
    Ok(())
}

async fn txn_without_writes_keeps_the_revision(s: &dyn Store, p: &str) -> Result<(), String> {
    let k = format!("{p}k");
    s.put(&k, b"v".to_vec(), 0).await.must("put")?;
    let before = s.revision().await.must("revision")?;
    let cases = [
        (
            "a failed compare without a failure branch",
            Txn::put_if(Compare::absent(&k), &k, vec![]),
        ),
        ("no compares and no writes", Txn::default()),
        (
            "a delete of a missing key",
            Txn {
                success: vec![TxnOp::Delete {
                    key: format!("{p}missing"),
                }],
                ..Default::default()
            },
        ),
        (
            "a prefix delete that matches nothing",
            Txn {
                success: vec![TxnOp::DeletePrefix {
                    prefix: format!("{p}none/"),
                }],
                ..Default::default()
            },
        ),
    ];
    for (what, txn) in cases {
        let resp = s.txn(txn).await.must(what)?;
        ensure_eq!(resp.revision, before, "{what}: the answer's revision");
        ensure_eq!(
            s.revision().await.must("revision")?,
            before,
            "{what}: the store's revision"
        );
    }
    Ok(())
}

async fn txn_with_an_unknown_lease_writes_nothing(s: &dyn Store, p: &str) -> Result<(), String> {
    let gone = s.grant_lease(Duration::from_secs(30)).await.must("grant")?;
    s.revoke_lease(gone).await.must("revoke")?;
    let before = s.revision().await.must("revision")?;
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let txn = Txn {
        success: vec![put_op(&a, b"v", 0), put_op(&b, b"v", gone)],
        ..Default::default()
    };
    match s.txn(txn).await {
        Err(StoreError::LeaseNotFound(id)) => ensure_eq!(id, gone, "the lease named"),
        other => {
            return Err(format!(
                "a put with a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    ensure_eq!(
        s.get(&a).await.must("get a")?,
        None,
        "the transaction is all or nothing"
    );
    ensure_eq!(
        s.revision().await.must("revision")?,
        before,
        "nothing was written"
    );
    match s.put(&b, b"v".to_vec(), gone).await {
        Err(StoreError::LeaseNotFound(id)) => ensure_eq!(id, gone, "the lease named"),
        other => {
            return Err(format!(
                "a put with a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    Ok(())
}

async fn leases_are_kept_alive_then_expire(s: &dyn Store, p: &str) -> Result<(), String> {
    let (k, other) = (format!("{p}leased"), format!("{p}plain"));
    let lease = s.grant_lease(SHORT_TTL).await.must("grant")?;
    ensure!(lease != 0, "0 is no lease");
    s.put(&k, b"up".to_vec(), lease)
        .await
        .must("put with the lease")?;
    s.put(&other, b"kept".to_vec(), 0)
        .await
        .must("put without")?;
    let kv = s
        .get(&k)
        .await
        .must("get")?
        .ok_or("the leased key is missing")?;
    ensure_eq!(kv.lease, lease, "the key records its lease");
    let mut w = s.watch(&k, None).await.must("watch")?;
    // Twice the TTL, renewed every eighth of it (slack for a slow machine).
    let until = Instant::now() + SHORT_TTL * 2;
    while Instant::now() < until {
        tokio::time::sleep(SHORT_TTL / 8).await;
        s.keep_alive(lease).await.must("keep-alive")?;
    }
    ensure!(
        s.get(&k).await.must("get")?.is_some(),
        "keep-alives kept the key"
    );
    let stopped = Instant::now();
    let deadline = stopped + SHORT_TTL + WAIT;
    while s.get(&k).await.must("get")?.is_some() {
        ensure!(
            Instant::now() < deadline,
            "the lease did not expire {:?} after its last keep-alive",
            deadline - stopped
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match next(&mut w, "the expiry").await? {
        WatchEvent::Delete(kv) => {
            ensure_eq!(
                (kv.key, kv.value),
                (k.clone(), b"up".to_vec()),
                "the expiry's delete event"
            )
        }
        ev => return Err(format!("expected the expiry's delete, got {}", show(&ev))),
    }
    match s.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(id)) => ensure_eq!(id, lease, "the lease named"),
        other => {
            return Err(format!(
                "keep-alive of an expired lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    match s.put(&k, b"again".to_vec(), lease).await {
        Err(StoreError::LeaseNotFound(id)) => ensure_eq!(id, lease, "the lease named"),
        other => {
            return Err(format!(
                "a put with an expired lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    ensure!(
        s.get(&other).await.must("get")?.is_some(),
        "a key without the lease stays"
    );
    s.revoke_lease(lease)
        .await
        .must("revoking an expired lease is not an error")?;
    Ok(())
}

async fn revoking_a_lease_deletes_its_keys(s: &dyn Store, p: &str) -> Result<(), String> {
    let lease = s.grant_lease(Duration::from_secs(30)).await.must("grant")?;
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    s.put(&a, b"1".to_vec(), lease).await.must("put a")?;
    s.put(&b, b"2".to_vec(), lease).await.must("put b")?;
    s.keep_alive(lease).await.must("keep-alive")?;
    let before = s.revision().await.must("revision")?;
    s.revoke_lease(lease).await.must("revoke")?;
    ensure!(
        s.range(p).await.must("range")?.is_empty(),
        "the lease's keys are gone at once"
    );
    ensure_eq!(
        s.revision().await.must("revision")?,
        before + 1,
        "a revoke is one revision"
    );
    s.revoke_lease(lease)
        .await
        .must("revoking twice is not an error")?;
    match s.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(id)) => ensure_eq!(id, lease, "the lease named"),
        other => {
            return Err(format!(
                "keep-alive of a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    Ok(())
}

async fn watch_from_the_past_sees_history_then_live_changes(
    s: &dyn Store,
    p: &str,
) -> Result<(), String> {
    let (a, b) = (format!("{p}w/a"), format!("{p}w/b"));
    let r1 = s.put(&a, b"1".to_vec(), 0).await.must("put a")?;
    let r2 = s.put(&a, b"2".to_vec(), 0).await.must("put a")?;
    s.put(&format!("{p}other"), b"x".to_vec(), 0)
        .await
        .must("put other")?;
    let mut w = s.watch(&format!("{p}w/"), Some(r2)).await.must("watch")?;
    let r4 = s.put(&b, b"3".to_vec(), 0).await.must("put b")?;
    s.delete(&a).await.must("delete a")?;
    let r5 = s.revision().await.must("revision")?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut w, "history and live").await?);
    }
    let shown: Vec<String> = seen.iter().map(show).collect();
    ensure_eq!(
        shown,
        vec![
            format!("put {a}@{r2}"),
            format!("put {b}@{r4}"),
            format!("delete {a}@{r5}")
        ],
        "events from revision {r2} (inclusive), in order"
    );
    let WatchEvent::Put(put) = &seen[0] else {
        unreachable!("checked above")
    };
    ensure_eq!(
        (put.value.clone(), put.create_revision, put.version),
        (b"2".to_vec(), r1, 2),
        "a put event carries the key as written"
    );
    let WatchEvent::Delete(del) = &seen[2] else {
        unreachable!("checked above")
    };
    ensure_eq!(
        (del.value.clone(), del.create_revision, del.version),
        (b"2".to_vec(), r1, 2),
        "a delete event carries the key as it was"
    );
    Ok(())
}

async fn watch_sees_only_its_prefix(s: &dyn Store, p: &str) -> Result<(), String> {
    let mut w = s.watch(&format!("{p}w/"), None).await.must("watch")?;
    for k in ["wx", "other", "w", "w/a"] {
        s.put(&format!("{p}{k}"), b"v".to_vec(), 0)
            .await
            .must("put")?;
    }
    let ev = next(&mut w, "the first event under the prefix").await?;
    ensure_eq!(
        ev.kv().key,
        format!("{p}w/a"),
        "the first event (keys outside the prefix are not seen)"
    );
    Ok(())
}

async fn watch_from_now_sees_only_later_changes(s: &dyn Store, p: &str) -> Result<(), String> {
    let (before, after) = (format!("{p}before"), format!("{p}after"));
    s.put(&before, b"v".to_vec(), 0).await.must("put before")?;
    let mut w = s.watch(p, None).await.must("watch")?;
    let r = s.put(&after, b"v".to_vec(), 0).await.must("put after")?;
    ensure_eq!(
        show(&next(&mut w, "a write after the watch").await?),
        format!("put {after}@{r}"),
        "the first event"
    );
    Ok(())
}

async fn watch_from_a_future_revision_waits_for_it(s: &dyn Store, p: &str) -> Result<(), String> {
    let now = s.revision().await.must("revision")?;
    let mut w = s.watch(p, Some(now + 2)).await.must("watch")?;
    s.put(&format!("{p}early"), b"v".to_vec(), 0)
        .await
        .must("put early")?;
    let r = s
        .put(&format!("{p}due"), b"v".to_vec(), 0)
        .await
        .must("put due")?;
    ensure_eq!(r, now + 2, "the second write's revision");
    ensure_eq!(
        show(&next(&mut w, "the write at the start revision").await?),
        format!("put {p}due@{r}"),
        "the first event"
    );
    Ok(())
}

async fn watch_sees_a_transaction_in_op_order(s: &dyn Store, p: &str) -> Result<(), String> {
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    s.put(&a, b"old".to_vec(), 0).await.must("put a")?;
    let mut w = s.watch(p, None).await.must("watch")?;
    let txn = Txn {
        success: vec![
            put_op(&c, b"1", 0),
            TxnOp::Delete { key: a.clone() },
            put_op(&b, b"2", 0),
        ],
        ..Default::default()
    };
    let r = s.txn(txn).await.must("txn")?.revision;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(show(&next(&mut w, "the transaction").await?));
    }
    ensure_eq!(
        seen,
        vec![
            format!("put {c}@{r}"),
            format!("delete {a}@{r}"),
            format!("put {b}@{r}")
        ],
        "one event per op, in op order, at one revision"
    );
    Ok(())
}

async fn dropping_watchers_is_fine(s: &dyn Store, p: &str) -> Result<(), String> {
    for _ in 0..3 {
        let w = s.watch(p, None).await.must("watch")?;
        drop(w);
    }
    // One that is dropped with events queued.
    let w = s.watch(p, None).await.must("watch")?;
    for i in 0..5 {
        s.put(&format!("{p}k{i}"), b"v".to_vec(), 0)
            .await
            .must("put")?;
    }
    drop(w);
    let mut w = s.watch(p, None).await.must("watch after the drops")?;
    let r = s
        .put(&format!("{p}last"), b"v".to_vec(), 0)
        .await
        .must("put")?;
    ensure_eq!(
        show(&next(&mut w, "a watch after others were dropped").await?),
        format!("put {p}last@{r}"),
        "the event"
    );
    Ok(())
}
