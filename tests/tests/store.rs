//! The etcd store against a real etcd: the conformance suite both stores pass, and etcd's
//! pitfalls (restarts, compaction, an etcd that is down), each with an etcd of its own.

use std::time::{Duration, Instant};

use ferry_cluster::store::conformance::run_all;
use ferry_cluster::store::embedded::EmbeddedStore;
use ferry_cluster::store::etcd::{EtcdOptions, EtcdStore};
use ferry_cluster::store::{Store, StoreError, WatchEvent, Watcher};
use ferry_tests::etcd::{unique_prefix, Etcd};

/// Short deadlines, so that the tests of an etcd that is down are quick.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Generous bounds for what should take a moment: the machine is shared and noisy.
const WAIT: Duration = Duration::from_secs(15);

fn options(etcd: &Etcd) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        request_timeout: REQUEST_TIMEOUT,
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

async fn connect(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(options(etcd))
        .await
        .expect("connect to etcd")
}

/// Retries `f` until it succeeds, for up to `within`; returns the value and how long it took.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    loop {
        match f().await {
            Ok(v) => return (v, started.elapsed()),
            Err(e) if started.elapsed() < within => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what} still failed after {within:?}: {e}"),
        }
    }
}

async fn next(w: &mut Watcher) -> Option<Result<WatchEvent, StoreError>> {
    tokio::time::timeout(WAIT, w.recv())
        .await
        .expect("a watch item in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_etcd() {
    let etcd = Etcd::new();
    let store = connect(&etcd).await;
    run_all(&store, &unique_prefix("conformance")).await;
    // A second run on the same etcd, as another test process would.
    run_all(&store, &unique_prefix("conformance")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    run_all(&store, &unique_prefix("conformance")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_works_again_after_an_etcd_restart_and_the_key_survives() {
    let mut etcd = Etcd::new();
    let store = connect(&etcd).await;
    let key = format!("{}/node", unique_prefix("restart"));
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.put(&key, b"up".to_vec(), lease).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    store.keep_alive(lease).await.unwrap();

    etcd.stop();
    etcd.start();
    // The store's old keep-alive stream is dead; it must open a new one by itself.
    let ((), took) = eventually(
        Duration::from_secs(8),
        "keep-alive after the restart",
        || store.keep_alive(lease),
    )
    .await;
    eprintln!("keep-alive renewed {took:?} after the restart");
    let (kv, _) = eventually(WAIT, "get after the restart", || store.get(&key)).await;
    let kv = kv.expect("a restart shorter than the TTL keeps the leased key");
    assert_eq!((kv.value, kv.lease), (b"up".to_vec(), lease));
    // And it keeps working.
    for _ in 0..3 {
        store.keep_alive(lease).await.unwrap();
    }
    store.revoke_lease(lease).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_with_an_error_when_etcd_restarts_and_a_new_one_works() {
    let mut etcd = Etcd::new();
    let store = connect(&etcd).await;
    let prefix = format!("{}/", unique_prefix("watch-restart"));
    let mut w = store.watch(&prefix, None).await.unwrap();
    store
        .put(&format!("{prefix}a"), b"1".to_vec(), 0)
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, Some(Ok(WatchEvent::Put(_)))));

    etcd.stop();
    match next(&mut w).await {
        Some(Err(StoreError::Unavailable(msg))) => eprintln!("the watch ended: {msg}"),
        other => panic!("expected the watch to end with Unavailable, got {other:?}"),
    }
    assert!(next(&mut w).await.is_none(), "an error ends the watch");
    etcd.start();

    let (mut w, _) = eventually(WAIT, "watch after the restart", || {
        store.watch(&prefix, None)
    })
    .await;
    let rev = store
        .put(&format!("{prefix}b"), b"2".to_vec(), 0)
        .await
        .unwrap();
    match next(&mut w).await {
        Some(Ok(WatchEvent::Put(kv))) => {
            assert_eq!((kv.key, kv.mod_revision), (format!("{prefix}b"), rev))
        }
        other => panic!("expected the put, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_is_compacted() {
    let etcd = Etcd::new();
    let store = connect(&etcd).await;
    let prefix = format!("{}/", unique_prefix("compacted"));
    let key = format!("{prefix}k");
    let first = store.put(&key, b"1".to_vec(), 0).await.unwrap();
    store.put(&key, b"2".to_vec(), 0).await.unwrap();
    let last = store.put(&key, b"3".to_vec(), 0).await.unwrap();
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    client
        .compact(
            i64::try_from(last).unwrap(),
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();

    let mut w = store.watch(&prefix, Some(first)).await.unwrap();
    match next(&mut w).await {
        Some(Err(StoreError::Compacted { requested, oldest })) => {
            assert_eq!((requested, oldest), (first, last))
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(next(&mut w).await.is_none(), "an error ends the watch");
    // From the oldest revision kept, the watch works.
    let mut w = store.watch(&prefix, Some(last)).await.unwrap();
    match next(&mut w).await {
        Some(Ok(WatchEvent::Put(kv))) => {
            assert_eq!((kv.mod_revision, kv.value), (last, b"3".to_vec()))
        }
        other => panic!("expected the put at {last}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_in_time_while_etcd_is_down_and_work_when_it_is_back() {
    let mut etcd = Etcd::new();
    let store = connect(&etcd).await;
    let key = format!("{}/k", unique_prefix("down"));
    store.put(&key, b"v".to_vec(), 0).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.keep_alive(lease).await.unwrap();

    etcd.stop();
    // Within the request timeout, plus scheduling slack (not a hang).
    let bound = REQUEST_TIMEOUT + Duration::from_secs(3);
    macro_rules! fails_in_time {
        ($what:literal, $call:expr) => {{
            let started = Instant::now();
            let result = $call.await;
            let took = started.elapsed();
            match result {
                Err(StoreError::Unavailable(msg)) => {
                    eprintln!("{} failed in {took:?}: {msg}", $what);
                    assert!(msg.contains(&etcd.endpoint()), "{}: {msg}", $what);
                }
                other => panic!(
                    "{}: expected Unavailable, got {:?}",
                    $what,
                    other.map(|_| ())
                ),
            }
            assert!(took < bound, "{} took {took:?}", $what);
        }};
    }
    fails_in_time!("get", store.get(&key));
    fails_in_time!("put", store.put(&key, b"w".to_vec(), 0));
    fails_in_time!("range", store.range(&key));
    fails_in_time!("revision", store.revision());
    fails_in_time!("grant", store.grant_lease(Duration::from_secs(5)));
    fails_in_time!("keep-alive", store.keep_alive(lease));
    fails_in_time!("watch", store.watch(&key, None));

    etcd.start();
    let (kv, took) = eventually(WAIT, "get after etcd is back", || store.get(&key)).await;
    eprintln!("get works again {took:?} after the start");
    assert_eq!(kv.map(|kv| kv.value), Some(b"v".to_vec()));
    eventually(WAIT, "keep-alive after etcd is back", || {
        store.keep_alive(lease)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_outlive_the_request_timeout() {
    let etcd = Etcd::new();
    let store = EtcdStore::connect(EtcdOptions {
        request_timeout: Duration::from_secs(1),
        ..options(&etcd)
    })
    .await
    .unwrap();
    let prefix = format!("{}/", unique_prefix("long"));
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    let mut w = store.watch(&prefix, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The request timeout bounds a stream's start, not its life.
    store.keep_alive(lease).await.unwrap();
    let rev = store
        .put(&format!("{prefix}late"), b"v".to_vec(), 0)
        .await
        .unwrap();
    match next(&mut w).await {
        Some(Ok(ev)) => assert_eq!(ev.kv().mod_revision, rev),
        other => panic!("expected the late put, got {other:?}"),
    }
    store.revoke_lease(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_watcher_cancels_its_watch_on_etcd() {
    const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
    let etcd = Etcd::new();
    let store = connect(&etcd).await;
    let prefix = format!("{}/", unique_prefix("drop"));
    let count = || etcd.metric(WATCHERS).expect("etcd reports its watchers");
    let wait_for = |want: f64| {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = count();
            if n == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{WATCHERS} is {n}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let before = count();
    let mut watches = Vec::new();
    for _ in 0..5 {
        watches.push(store.watch(&prefix, None).await.unwrap());
    }
    wait_for(before + 5.0);
    drop(watches);
    wait_for(before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let etcd = Etcd::with_tls();
    let tls = etcd.tls().expect("a TLS etcd").clone();
    let store = EtcdStore::connect(EtcdOptions {
        ca: Some(tls.ca.clone()),
        cert: Some(tls.cert.clone()),
        key: Some(tls.key.clone()),
        ..options(&etcd)
    })
    .await
    .expect("connect over TLS");
    let key = format!("{}/k", unique_prefix("tls"));
    store.put(&key, b"v".to_vec(), 0).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"v");
    let mut w = store.watch(&key, None).await.unwrap();
    store.delete(&key).await.unwrap();
    assert!(matches!(
        next(&mut w).await,
        Some(Ok(WatchEvent::Delete(_)))
    ));

    // Without a client certificate, or without the CA, etcd cannot be reached.
    for (what, opts) in [
        (
            "no client certificate",
            EtcdOptions {
                ca: Some(tls.ca.clone()),
                ..options(&etcd)
            },
        ),
        (
            "no CA",
            EtcdOptions {
                cert: Some(tls.cert.clone()),
                key: Some(tls.key.clone()),
                ..options(&etcd)
            },
        ),
    ] {
        let started = Instant::now();
        match EtcdStore::connect(opts).await {
            Err(StoreError::Unavailable(msg)) => eprintln!("{what}: {msg}"),
            Err(e) => panic!("{what}: expected Unavailable, got {e:?}"),
            Ok(_) => panic!("{what}: connected"),
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_with_a_user_and_password() {
    let etcd = Etcd::new();
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    admin.user_add("root", "secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let store = EtcdStore::connect(EtcdOptions {
        user: Some("root".into()),
        password: Some("secret".into()),
        ..options(&etcd)
    })
    .await
    .expect("connect with a user");
    let key = format!("{}/k", unique_prefix("auth"));
    store.put(&key, b"v".to_vec(), 0).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    let mut w = store.watch(&key, None).await.unwrap();
    store.delete(&key).await.unwrap();
    assert!(matches!(
        next(&mut w).await,
        Some(Ok(WatchEvent::Delete(_)))
    ));

    for (what, user, password) in [
        ("a wrong password", Some("root"), Some("wrong")),
        ("no user", None, None),
    ] {
        let result = EtcdStore::connect(EtcdOptions {
            user: user.map(Into::into),
            password: password.map(Into::into),
            ..options(&etcd)
        })
        .await;
        // etcd answered: not an outage to wait out, but credentials to fix.
        match result {
            Err(e @ StoreError::Refused(_)) => {
                assert!(!e.is_retryable());
                eprintln!("{what}: {e}");
            }
            Err(e) => panic!("{what}: expected Refused, got {e:?}"),
            Ok(_) => panic!("{what}: connected"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_time_out_while_etcd_hangs_and_watches_end() {
    let etcd = Etcd::new();
    let store = connect(&etcd).await;
    let key = format!("{}/k", unique_prefix("hang"));
    store.put(&key, b"v".to_vec(), 0).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    let mut w = store.watch(&key, None).await.unwrap();

    etcd.pause();
    let bound = REQUEST_TIMEOUT + Duration::from_secs(3);
    let timed = |what: &str, started: Instant, result: Result<(), StoreError>| {
        let took = started.elapsed();
        match result {
            Err(StoreError::Unavailable(msg)) => eprintln!("{what} failed in {took:?}: {msg}"),
            other => panic!("{what}: expected Unavailable, got {other:?}"),
        }
        assert!(took < bound, "{what} took {took:?}");
    };
    let started = Instant::now();
    timed("get", started, store.get(&key).await.map(|_| ()));
    let started = Instant::now();
    timed("keep-alive", started, store.keep_alive(lease).await);
    let started = Instant::now();
    timed("watch", started, store.watch(&key, None).await.map(|_| ()));
    // The connection's HTTP/2 pings (every 10 s, answered within the request timeout) find
    // that etcd is gone and end the watch.
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(40), w.recv()).await {
        Ok(Some(Err(StoreError::Unavailable(msg)))) => {
            eprintln!("the watch ended after {:?}: {msg}", started.elapsed())
        }
        other => panic!("expected the watch to end with Unavailable, got {other:?}"),
    }

    etcd.resume();
    let (kv, _) = eventually(WAIT, "get after etcd resumes", || store.get(&key)).await;
    assert_eq!(kv.map(|kv| kv.value), Some(b"v".to_vec()));
    eventually(WAIT, "keep-alive after etcd resumes", || {
        store.keep_alive(lease)
    })
    .await;
}
