//! The cluster store: the [`Store`] trait on etcd's v3 API (through `etcd-client`).
//!
//! The trait is etcd's model, so most calls map one to one. What this file adds:
//! - **Deadlines.** Every request runs under `request_timeout`, including the wait for a
//!   connection, which tonic's own timeout does not cover: nothing hangs while etcd is
//!   unreachable. Failures are [`StoreError::Unavailable`] (retryable) and name the endpoints.
//! - **Require-leader.** Requests carry etcd's `hasleader` flag, so a member cut off from its
//!   cluster fails them at once instead of holding them until the deadline, and ends its
//!   watches.
//! - **Keep-alive streams.** etcd renews leases over a bidirectional stream. The store keeps
//!   one per lease (until `revoke_lease`, or a keep-alive that finds the lease gone) and
//!   reopens it once when it fails: after an etcd restart the old stream fails forever while
//!   a new one on the same client works at once.
//! - **Watches.** A task per watch forwards etcd's events into the [`Watcher`] channel and
//!   ends with an `Err` when etcd cancels the watch (a compacted start revision gives
//!   [`StoreError::Compacted`]) or the stream breaks (an etcd restart included): watches are
//!   not resumed, the caller lists again and watches anew. Dropping the receiver cancels
//!   the watch.
//!
//! Keys are used as given: callers put their cluster prefix in every key.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as etcd;
use tokio::sync::mpsc;

use super::{
    CompareOp, CompareTarget, KeyValue, LeaseId, Store, StoreError, Txn, TxnOp, TxnResponse,
    WatchEvent, Watcher,
};

/// The largest response the store accepts (a big range, or a watch response of a large
/// transaction); gRPC's default of 4 MiB would fail a range of a few thousand events.
const MAX_MESSAGE: usize = 256 << 20;

/// HTTP/2 pings on an open stream, so that a watch or keep-alive on a dead connection fails
/// instead of waiting forever. etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`), or on a connection without streams, by closing it.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Where the watch task buffers events the caller has not read yet.
const WATCH_BUFFER: usize = 256;

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://host:2379`, or `https://` with `ca`).
    pub endpoints: Vec<String>,
    /// The CA that signed etcd's server certificates (PEM). `https` endpoints need it: no
    /// system roots are built in.
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM), for etcd's `--client-cert-auth`; needs `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// etcd user, for etcd's authentication; needs `password`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// The deadline of every request (and of a watch's or keep-alive's start).
    pub request_timeout: Duration,
    /// The deadline of a TCP (and TLS) connection to an endpoint.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// The etcd store; cheap to clone (clones share the connection and the keep-alive streams).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    kv: etcd::KvClient,
    lease: etcd::LeaseClient,
    watch: etcd::WatchClient,
    /// The endpoints, for messages.
    endpoints: String,
    request_timeout: Duration,
    /// One keep-alive stream per lease, each behind its own lock: a keep-alive is a send
    /// then a receive on the stream, which must not interleave with another's.
    keepers: Mutex<HashMap<LeaseId, Arc<tokio::sync::Mutex<Option<Keeper>>>>>,
}

struct Keeper {
    sender: etcd::LeaseKeeper,
    stream: etcd::LeaseKeepAliveStream,
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers a first read; fails with
    /// [`StoreError::Refused`] when etcd turns the credentials down, and
    /// [`StoreError::Unavailable`] (naming the endpoints) when it does not answer within
    /// `connect_timeout` + `request_timeout` (connection and authentication), then
    /// `request_timeout` (the read).
    pub async fn connect(opts: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let endpoints = opts.endpoints.join(",");
        if opts.endpoints.is_empty() {
            return Err(StoreError::Unavailable(
                "no etcd endpoints given; set --etcd".into(),
            ));
        }
        let options = connect_options(&opts)?;
        let deadline = opts.connect_timeout + opts.request_timeout;
        let failed = |msg: String| StoreError::Unavailable(with_hint(&endpoints, msg));
        let client = match tokio::time::timeout(
            deadline,
            etcd::Client::connect(&opts.endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) if is_permanent(&e) => {
                return Err(StoreError::Refused(with_hint(
                    &endpoints,
                    format!(
                        "etcd at {endpoints} refused the connection: {}",
                        describe(&e)
                    ),
                )))
            }
            Ok(Err(e)) => {
                return Err(failed(format!(
                    "cannot connect to etcd at {endpoints}: {}",
                    describe(&e)
                )))
            }
            Err(_) => {
                return Err(failed(format!(
                    "etcd at {endpoints} did not answer within {deadline:?}"
                )))
            }
        };
        let store = EtcdStore {
            inner: Arc::new(Inner {
                kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                lease: client.lease_client(),
                watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                endpoints: endpoints.clone(),
                request_timeout: opts.request_timeout,
                keepers: Mutex::new(HashMap::new()),
            }),
        };
        // The client connects lazily: a first request proves that etcd is there.
        store.revision().await.map_err(|e| match e {
            StoreError::Unavailable(msg) => failed(msg),
            other => other,
        })?;
        Ok(store)
    }
}

/// A failed connection's message, with what to check: the credentials, the TLS files, or
/// (most often) whether etcd runs where `--etcd` says.
fn with_hint(endpoints: &str, msg: String) -> String {
    let lower = msg.to_lowercase();
    let hint = if [
        "authentication",
        "user name",
        "permission denied",
        "auth token",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        "check the etcd user and password".to_string()
    } else if ["certificate", "tls", "alert", "handshake"]
        .iter()
        .any(|w| lower.contains(w))
    {
        "check the etcd TLS files (CA, client certificate and key)".to_string()
    } else if endpoints.contains("https://") {
        // A refused client certificate can look like a closed connection.
        format!("is etcd running at {endpoints}? check --etcd and the etcd TLS files")
    } else {
        format!("is etcd running at {endpoints}? check --etcd")
    };
    format!("{msg}; {hint}")
}

fn connect_options(opts: &EtcdOptions) -> Result<etcd::ConnectOptions, StoreError> {
    let mut options = etcd::ConnectOptions::new()
        .with_timeout(opts.request_timeout)
        .with_connect_timeout(opts.connect_timeout)
        .with_keep_alive(PING_INTERVAL, opts.request_timeout)
        .with_keep_alive_while_idle(false)
        .with_require_leader(true);
    match (&opts.user, &opts.password) {
        // etcd's tokens expire (`--auth-token-ttl`, 5 min by default): get a new one then.
        (Some(user), Some(password)) => {
            options = options
                .with_user(user, password)
                .with_auto_token_refresh(true)
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Unavailable(
                "etcd authentication needs both a user and a password".into(),
            ))
        }
    }
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot read the etcd {what} {}: {e}",
                path.display()
            ))
        })
    };
    let identity = match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => Some(etcd::Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        )),
        (None, None) => None,
        _ => {
            return Err(StoreError::Unavailable(
                "an etcd client certificate needs both the certificate and its key".into(),
            ))
        }
    };
    if opts.ca.is_some() || identity.is_some() {
        let mut tls = etcd::TlsOptions::new();
        if let Some(ca) = &opts.ca {
            tls = tls.ca_certificate(etcd::Certificate::from_pem(read("CA certificate", ca)?));
        }
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// An error's message with its causes, which carry the useful part of transport errors
/// ("Connection refused"), and a gRPC status as its code and message only.
fn describe(e: &etcd::Error) -> String {
    let mut text = match e {
        etcd::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    // etcd-client's error has no `source`; its inner errors do.
    let mut source = match e {
        etcd::Error::GRpcStatus(s) => std::error::Error::source(s),
        etcd::Error::TransportError(t) => std::error::Error::source(t),
        _ => None,
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Whether etcd refused the request for good (credentials, permissions, a malformed or
/// oversized request), as opposed to being away or without a leader.
fn is_permanent(e: &etcd::Error) -> bool {
    // gRPC's codes: INVALID_ARGUMENT 3, PERMISSION_DENIED 7, OUT_OF_RANGE 11,
    // UNIMPLEMENTED 12, UNAUTHENTICATED 16.
    match e {
        etcd::Error::GRpcStatus(s) => matches!(s.code() as i32, 3 | 7 | 11 | 12 | 16),
        etcd::Error::InvalidArgs(_) | etcd::Error::InvalidUri(_) => true,
        _ => false,
    }
}

/// Whether etcd answered that a lease does not exist.
fn is_lease_not_found(e: &etcd::Error) -> bool {
    match e {
        etcd::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The first key after every key that starts with `prefix` (etcd's range end for it).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key: the prefix was empty or all 0xff
}

fn key_value(kv: &etcd::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: to_u64(kv.create_revision()),
        mod_revision: to_u64(kv.mod_revision()),
        version: to_u64(kv.version()),
        lease: to_u64(kv.lease()),
    }
}

fn header_revision(header: Option<&etcd::ResponseHeader>) -> u64 {
    header.map_or(0, |h| to_u64(h.revision()))
}

fn put_options(lease: LeaseId) -> Option<etcd::PutOptions> {
    (lease != 0).then(|| etcd::PutOptions::new().with_lease(to_i64(lease)))
}

/// A watch event as the trait has it: a delete carries the key's last value (etcd's
/// `prev_kv`) with the delete's revision. Without `prev_kv` (etcd could not read it) the
/// delete carries the key and revision only.
fn watch_event(ev: &etcd::Event) -> Option<WatchEvent> {
    let kv = key_value(ev.kv()?);
    Some(match ev.event_type() {
        etcd::EventType::Put => WatchEvent::Put(kv),
        etcd::EventType::Delete => WatchEvent::Delete(match ev.prev_kv() {
            Some(prev) => KeyValue {
                mod_revision: kv.mod_revision,
                ..key_value(prev)
            },
            None => kv,
        }),
    })
}

fn txn_op(op: TxnOp) -> etcd::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => etcd::TxnOp::put(key, value, put_options(lease)),
        TxnOp::Delete { key } => etcd::TxnOp::delete(key, None),
        TxnOp::DeletePrefix { prefix } => {
            etcd::TxnOp::delete(prefix, Some(etcd::DeleteOptions::new().with_prefix()))
        }
    }
}

fn compare(c: super::Compare) -> etcd::Compare {
    let op = match c.op {
        CompareOp::Equal => etcd::CompareOp::Equal,
        CompareOp::NotEqual => etcd::CompareOp::NotEqual,
        CompareOp::Less => etcd::CompareOp::Less,
        CompareOp::Greater => etcd::CompareOp::Greater,
    };
    match c.target {
        CompareTarget::CreateRevision(r) => etcd::Compare::create_revision(c.key, op, to_i64(r)),
        CompareTarget::ModRevision(r) => etcd::Compare::mod_revision(c.key, op, to_i64(r)),
        CompareTarget::Version(v) => etcd::Compare::version(c.key, op, to_i64(v)),
        CompareTarget::Value(v) => etcd::Compare::value(c.key, op, v),
    }
}

/// A lease's TTL in etcd's whole seconds: rounded up, at least 1 (etcd itself raises
/// anything under 2 s to 2 s).
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    to_i64(secs.max(1))
}

impl Inner {
    /// Runs one request under the deadline; `what` names it in the error.
    async fn call<T>(
        &self,
        what: impl FnOnce() -> String,
        request: impl Future<Output = Result<T, etcd::Error>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            // tonic's deadline (the same one) may fire first.
            Ok(Err(etcd::Error::GRpcStatus(s))) if s.message() == "Timeout expired" => {
                Err(CallError::Timeout(what()))
            }
            Ok(Err(e)) => Err(CallError::Etcd(e, what())),
            Err(_) => Err(CallError::Timeout(what())),
        }
    }

    /// A failure as [`StoreError::Unavailable`] (retryable), naming the request and the
    /// endpoints.
    fn unavailable(&self, e: CallError) -> StoreError {
        match e {
            CallError::Etcd(e, what) if is_permanent(&e) => StoreError::Refused(format!(
                "etcd at {}: {what}: {} (check the cluster's etcd user, password, certificates and permissions)",
                self.endpoints,
                describe(&e)
            )),
            CallError::Etcd(e, what) => StoreError::Unavailable(format!(
                "etcd at {}: {what} failed: {}",
                self.endpoints,
                describe(&e)
            )),
            CallError::Timeout(what) => StoreError::Unavailable(format!(
                "etcd at {} did not answer {what} within {:?}",
                self.endpoints, self.request_timeout
            )),
        }
    }

    /// Like [`Inner::unavailable`], but "lease not found" is [`StoreError::LeaseNotFound`].
    fn lease_error(&self, lease: LeaseId, e: CallError) -> StoreError {
        match &e {
            CallError::Etcd(inner, _) if is_lease_not_found(inner) => {
                StoreError::LeaseNotFound(lease)
            }
            _ => self.unavailable(e),
        }
    }

    /// The keep-alive slot of `lease`, created empty on first use.
    fn keeper(&self, lease: LeaseId) -> Arc<tokio::sync::Mutex<Option<Keeper>>> {
        let mut keepers = self.keepers.lock().unwrap_or_else(|p| p.into_inner());
        keepers.entry(lease).or_default().clone()
    }

    fn forget_keeper(&self, lease: LeaseId) {
        let mut keepers = self.keepers.lock().unwrap_or_else(|p| p.into_inner());
        keepers.remove(&lease);
    }

    /// Opens a keep-alive stream for `lease`; opening it renews the lease once.
    async fn open_keeper(&self, lease: LeaseId) -> Result<Keeper, StoreError> {
        let mut client = self.lease.clone();
        let (sender, stream) = self
            .call(
                || format!("keep-alive of lease {lease}"),
                client.keep_alive(to_i64(lease)),
            )
            .await
            .map_err(|e| self.lease_error(lease, e))?;
        Ok(Keeper { sender, stream })
    }

    /// One keep-alive on an open stream: a request, then its answer. `Err(None)`: the
    /// stream broke (worth reopening); `Err(Some(e))`: anything else.
    async fn renew(&self, lease: LeaseId, keeper: &mut Keeper) -> Result<(), Option<StoreError>> {
        let answer = self
            .call(|| format!("keep-alive of lease {lease}"), async {
                keeper.sender.keep_alive().await?;
                keeper.stream.message().await
            })
            .await;
        match answer {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(()),
            Ok(Some(_)) => Err(Some(StoreError::LeaseNotFound(lease))),
            Err(CallError::Etcd(e, _)) if is_lease_not_found(&e) => {
                Err(Some(StoreError::LeaseNotFound(lease)))
            }
            Err(CallError::Etcd(e, _)) => {
                tracing::debug!(lease, error = %describe(&e), "the keep-alive stream broke");
                Err(None)
            }
            Ok(None) => Err(None),
            Err(e @ CallError::Timeout(_)) => Err(Some(self.unavailable(e))),
        }
    }
}

/// Forwards one watch's events into its [`Watcher`].
struct WatchTask {
    /// "the watch of PREFIX on etcd at ENDPOINTS", for messages.
    what: String,
    start_revision: Option<u64>,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
}

impl WatchTask {
    /// Runs until the watch ends, which an `Err` tells the receiver, or until the receiver
    /// is dropped, which cancels the watch (dropping the stream closes it on etcd too).
    async fn run(self, mut stream: etcd::WatchStream, created: Option<etcd::WatchResponse>) {
        let mut next = created;
        let mut watch_id = None;
        let end = loop {
            let resp = match next.take() {
                Some(resp) => resp,
                None => tokio::select! {
                    r = stream.message() => match r {
                        Ok(Some(resp)) => resp,
                        Ok(None) => break self.unavailable("etcd ended it"),
                        Err(e) => break self.unavailable(&format!("it broke: {}", describe(&e))),
                    },
                    _ = self.tx.closed() => {
                        if let Some(id) = watch_id {
                            let _ = stream.cancel(id).await;
                        }
                        return;
                    }
                },
            };
            if resp.created() {
                watch_id = Some(resp.watch_id());
            }
            for ev in resp.events().iter().filter_map(watch_event) {
                if self.tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if resp.canceled() {
                break if resp.compact_revision() > 0 {
                    StoreError::Compacted {
                        requested: self.start_revision.unwrap_or(0),
                        oldest: to_u64(resp.compact_revision()),
                    }
                } else {
                    self.unavailable(&format!("etcd canceled it: {}", resp.cancel_reason()))
                };
            }
        };
        let _ = self.tx.send(Err(end)).await;
    }

    fn unavailable(&self, why: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "{} ended: {why}; list again and watch anew",
            self.what
        ))
    }
}

/// A failed request, before it becomes a [`StoreError`]: what was asked and what happened.
enum CallError {
    Etcd(etcd::Error, String),
    Timeout(String),
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let i = &self.inner;
        let mut kv = i.kv.clone();
        let resp = i
            .call(|| format!("get {key}"), kv.get(key, None))
            .await
            .map_err(|e| i.unavailable(e))?;
        Ok(resp.kvs().first().map(key_value))
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let i = &self.inner;
        let mut kv = i.kv.clone();
        let resp = i
            .call(
                || format!("range {prefix}"),
                kv.get(prefix, Some(etcd::GetOptions::new().with_prefix())),
            )
            .await
            .map_err(|e| i.unavailable(e))?;
        // etcd returns a range in key order unless asked to sort otherwise.
        Ok(resp.kvs().iter().map(key_value).collect())
    }

    async fn range_after(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let i = &self.inner;
        let mut kv = i.kv.clone();
        // The smallest key after `after` (or the prefix itself) up to the prefix's end.
        let start = if after < prefix {
            prefix.as_bytes().to_vec()
        } else {
            let mut k = after.as_bytes().to_vec();
            k.push(0);
            k
        };
        let opts = etcd::GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(limit as i64);
        let resp = i
            .call(
                || format!("range {prefix} after {after}"),
                kv.get(start, Some(opts)),
            )
            .await
            .map_err(|e| i.unavailable(e))?;
        Ok(resp.kvs().iter().map(key_value).collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<u64, StoreError> {
        let i = &self.inner;
        let mut kv = i.kv.clone();
        let resp = i
            .call(
                || format!("put {key}"),
                kv.put(key, value, put_options(lease)),
            )
            .await
            .map_err(|e| i.lease_error(lease, e))?;
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let i = &self.inner;
        let mut kv = i.kv.clone();
        let resp = i
            .call(|| format!("delete {key}"), kv.delete(key, None))
            .await
            .map_err(|e| i.unavailable(e))?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let i = &self.inner;
        // A put with a lease that etcd does not know fails the whole transaction. etcd does
        // not say which lease: the error names the first.
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            })
            .unwrap_or(0);
        let first_key = txn.compares.first().map(|c| c.key.clone());
        let request = etcd::Txn::new()
            .when(txn.compares.into_iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.into_iter().map(txn_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(txn_op).collect::<Vec<_>>());
        let mut kv = i.kv.clone();
        let resp = i
            .call(
                || match first_key {
                    Some(key) => format!("transaction on {key}"),
                    None => "transaction".into(),
                },
                kv.txn(request),
            )
            .await
            .map_err(|e| i.lease_error(lease, e))?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
        })
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let i = &self.inner;
        let mut kv = i.kv.clone();
        // The cheapest linearizable read: count one key that need not exist.
        let resp = i
            .call(
                || "a read of the revision".into(),
                kv.get("\0", Some(etcd::GetOptions::new().with_count_only())),
            )
            .await
            .map_err(|e| i.unavailable(e))?;
        Ok(header_revision(resp.header()))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let i = &self.inner;
        let mut lease = i.lease.clone();
        let resp = i
            .call(
                || format!("a lease of {ttl:?}"),
                lease.grant(ttl_seconds(ttl), None),
            )
            .await
            .map_err(|e| i.unavailable(e))?;
        if !resp.error().is_empty() {
            return Err(StoreError::Unavailable(format!(
                "etcd at {} refused a lease of {ttl:?}: {}",
                i.endpoints,
                resp.error()
            )));
        }
        Ok(to_u64(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let i = &self.inner;
        let slot = i.keeper(lease);
        let mut slot = slot.lock().await;
        let result = match slot.as_mut() {
            Some(keeper) => match i.renew(lease, keeper).await {
                Ok(()) => Ok(()),
                Err(Some(e)) => Err(e),
                // After an etcd restart the old stream fails forever while a new one on the
                // same client renews at once. Opening it is the keep-alive.
                Err(None) => i.open_keeper(lease).await.map(|k| *slot = Some(k)),
            },
            None => i.open_keeper(lease).await.map(|k| *slot = Some(k)),
        };
        match &result {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                drop(slot);
                i.forget_keeper(lease);
            }
            Err(_) => *slot = None,
        }
        result
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let i = &self.inner;
        let mut client = i.lease.clone();
        let result = i
            .call(
                || format!("revoke of lease {lease}"),
                client.revoke(to_i64(lease)),
            )
            .await;
        match result {
            Ok(_) => {}
            // Already gone: what the caller wanted.
            Err(CallError::Etcd(e, _)) if is_lease_not_found(&e) => {}
            Err(e) => return Err(i.unavailable(e)),
        }
        i.forget_keeper(lease);
        Ok(())
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<Watcher, StoreError> {
        let i = &self.inner;
        let mut options = etcd::WatchOptions::new().with_prefix().with_prev_key();
        if let Some(start) = start_revision {
            // etcd reads 0 as "now"; the trait's 0 is "from the start", and etcd's first
            // revision is 1.
            options = options.with_start_revision(to_i64(start.max(1)));
        }
        let what = || format!("watch of {prefix}");
        let mut client = i.watch.clone();
        // Wait for etcd to confirm the watch: every write after that is seen.
        let (stream, created) = i
            .call(what, async {
                let mut stream = client.watch(prefix, Some(options)).await?;
                let created = stream.message().await?;
                Ok((stream, created))
            })
            .await
            .map_err(|e| i.unavailable(e))?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watch = WatchTask {
            what: format!("the watch of {prefix} on etcd at {}", i.endpoints),
            start_revision,
            tx,
        };
        tokio::spawn(watch.run(stream, created));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(2001)), 3);
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_in_time_and_names_the_endpoint() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let started = std::time::Instant::now();
        let err = EtcdStore::connect(EtcdOptions {
            endpoints: vec![endpoint.clone()],
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .err()
        .expect("no etcd there");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let StoreError::Unavailable(msg) = &err else {
            panic!("expected Unavailable, got {err:?}");
        };
        assert!(msg.contains(&endpoint) && msg.contains("--etcd"), "{msg}");
    }

    #[test]
    fn half_configured_credentials_are_refused() {
        let opts = EtcdOptions {
            user: Some("ferry".into()),
            ..Default::default()
        };
        assert!(connect_options(&opts).is_err());
        let opts = EtcdOptions {
            cert: Some("/nonexistent.pem".into()),
            ..Default::default()
        };
        assert!(connect_options(&opts).is_err());
    }
}
