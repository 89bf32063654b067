//! The student's side of the teacher service.
//!
//! A [`Client`] keeps one connection per teacher replica. The training loop calls
//! [`Client::prefetch`] for the steps ahead (the sampler's order is known in advance) and
//! [`Client::take`] for the current step, so the teacher computes while the student trains
//! and the answer is usually there when it is needed.
//!
//! Requests go to the replica with the lowest `latency × (1 + requests in flight)`, so load
//! spreads and follows measured speed. A request that passes its deadline (counted from
//! when its step needs it, so deep prefetching is not punished) or whose connection
//! breaks moves to another replica. When no replica can answer, the
//! `on_teacher_failure` policy decides: `fail` ends the job, `hard-labels` trains the step on
//! hard labels alone, `wait` retries (the daemon restarts dead teachers) for up to
//! `wait_timeout`, then ends the job. Nothing blocks longer than a deadline without a
//! policy deciding.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::cache::Cache;
use super::{read_response, Inputs, Request, SoftLabels};
use crate::spec::OnTeacherFailure;

/// How long a replica that failed is skipped (unless the directory changes first).
const BACKOFF: Duration = Duration::from_secs(1);

/// The teacher replicas' addresses, kept current by whoever discovers them (in standalone
/// mode, the daemon watching the store writes them to the rank's stdin).
#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<(Mutex<Versioned>, Condvar)>,
}

/// (version, addresses): the version grows with every change.
type Versioned = (u64, Vec<String>);

impl Directory {
    /// Replaces the list of addresses.
    pub fn set(&self, addrs: Vec<String>) {
        let mut g = self.inner.0.lock().expect("directory lock");
        g.0 += 1;
        g.1 = addrs;
        self.inner.1.notify_all();
    }

    /// (version, addresses).
    pub fn snapshot(&self) -> (u64, Vec<String>) {
        self.inner.0.lock().expect("directory lock").clone()
    }

    /// Waits until the version differs from `seen`, for at most `timeout`.
    pub fn wait_change(&self, seen: u64, timeout: Duration) {
        let g = self.inner.0.lock().expect("directory lock");
        let _ = self
            .inner
            .1
            .wait_timeout_while(g, timeout, |g| g.0 == seen)
            .expect("directory lock");
    }

    /// Waits until at least one address is known; false after `timeout`.
    pub fn wait_nonempty(&self, timeout: Duration) -> bool {
        let g = self.inner.0.lock().expect("directory lock");
        let (g, _) = self
            .inner
            .1
            .wait_timeout_while(g, timeout, |g| g.1.is_empty())
            .expect("directory lock");
        !g.1.is_empty()
    }
}

/// The client's settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long one request may take on one replica.
    pub deadline: Duration,
    pub policy: OnTeacherFailure,
    /// How long `wait` waits for a teacher before the job fails.
    pub wait_timeout: Duration,
    /// Cache soft labels: (samples in the data set, the cache file the ranks of the job on
    /// this node share). Only valid when the inputs are deterministic.
    pub cache: Option<(usize, PathBuf)>,
}

/// Why the student cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

/// What the client did so far.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Samples whose soft labels came from the teacher.
    pub samples_fetched: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Steps trained on hard labels because no teacher answered.
    pub fallback_steps: u64,
    /// Requests moved to another replica (deadline passed or connection lost).
    pub failovers: u64,
    /// Time the training loop spent blocked in [`Client::take`].
    pub blocked: Duration,
    /// Seconds from each answered request's sending to its answer's arrival, oldest first,
    /// until the caller takes them (at most [`MAX_LATENCIES`] kept).
    pub latencies: Vec<f32>,
}

/// The most request latencies [`ClientStats::latencies`] keeps between takes.
pub const MAX_LATENCIES: usize = 1024;

impl ClientStats {
    /// Cache hits over lookups (0 before any lookup).
    pub fn hit_rate(&self) -> f64 {
        let all = self.cache_hits + self.cache_misses;
        if all == 0 {
            0.0
        } else {
            self.cache_hits as f64 / all as f64
        }
    }
}

#[derive(Default)]
struct InboxState {
    /// Request ids someone waits for; answers to others (abandoned after a deadline) are dropped.
    wanted: HashSet<u64>,
    answers: HashMap<u64, (Instant, Result<SoftLabels, String>)>,
    /// Connections that broke, with why.
    dead: HashMap<u64, String>,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    changed: Condvar,
}

struct Replica {
    addr: String,
    conn: Option<(u64, TcpStream)>,
    /// Smoothed request latency in seconds (None until measured).
    latency: Option<f64>,
    in_flight: usize,
    down_until: Option<Instant>,
    last_error: Option<String>,
}

struct Sent {
    id: u64,
    conn: u64,
    addr: String,
    at: Instant,
}

struct Pending {
    indices: Vec<u32>,
    /// Indices not in the cache, in `indices` order.
    missing: Vec<u32>,
    sent: Option<Sent>,
    /// Records of `missing` when there is no cache.
    got: Option<SoftLabels>,
}

enum Wait {
    /// The answer, and when it arrived.
    Answer(Instant, Result<SoftLabels, String>),
    Down(String),
    TimedOut,
}

/// A student's connection to the teacher replicas.
pub struct Client {
    cfg: ClientConfig,
    dir: Directory,
    dir_version: u64,
    replicas: Vec<Replica>,
    inbox: Arc<Inbox>,
    received: Arc<AtomicU64>,
    next_id: u64,
    next_conn: u64,
    pending: HashMap<u64, Pending>,
    /// (classes, k, feature shapes) of the teacher's answers, known after the first.
    format: Option<(u32, u32, Vec<Vec<u32>>)>,
    cache: Option<Cache>,
    pub stats: ClientStats,
}

impl Client {
    pub fn new(cfg: ClientConfig, dir: Directory) -> Client {
        Client {
            cfg,
            dir,
            dir_version: u64::MAX,
            replicas: Vec::new(),
            inbox: Arc::default(),
            received: Arc::default(),
            next_id: 1,
            next_conn: 1,
            pending: HashMap::new(),
            format: None,
            cache: None,
            stats: ClientStats::default(),
        }
    }

    /// Waits until the directory names at least one teacher.
    pub fn wait_for_teachers(&self, timeout: Duration) -> Result<(), ClientError> {
        if self.dir.wait_nonempty(timeout) {
            Ok(())
        } else {
            Err(ClientError(format!(
                "no teacher replica came up within {timeout:?}; see the job's events for the teacher's errors"
            )))
        }
    }

    /// Asks for the soft labels of step `key` ahead of time. `source` turns indices into
    /// what is sent (the indices themselves, or the images). Failures are left for
    /// [`Client::take`] to handle.
    pub fn prefetch(&mut self, key: u64, indices: &[u32], source: &dyn Fn(&[u32]) -> Inputs) {
        if self.pending.contains_key(&key) {
            return;
        }
        let missing: Vec<u32> = match &self.cache {
            Some(c) => indices
                .iter()
                .copied()
                .filter(|&i| !c.contains(i))
                .collect(),
            None => indices.to_vec(),
        };
        self.stats.cache_misses += missing.len() as u64;
        self.stats.cache_hits += (indices.len() - missing.len()) as u64;
        let mut p = Pending {
            indices: indices.to_vec(),
            missing,
            sent: None,
            got: None,
        };
        if !p.missing.is_empty() {
            self.send(&mut p, source);
        }
        self.pending.insert(key, p);
    }

    /// The soft labels of step `key` (records in `indices` order), or `None` when the policy
    /// is `hard-labels` and no teacher could answer in time.
    pub fn take(
        &mut self,
        key: u64,
        indices: &[u32],
        source: &dyn Fn(&[u32]) -> Inputs,
    ) -> Result<Option<SoftLabels>, ClientError> {
        let started = Instant::now();
        self.prefetch(key, indices, source);
        let mut p = self.pending.remove(&key).expect("just prefetched");
        let r = self.complete(&mut p, source);
        self.stats.blocked += started.elapsed();
        match r {
            Ok(true) => self.assemble(&p).map(Some),
            Ok(false) => {
                self.stats.fallback_steps += 1;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes the cache file this client opened (the job is over).
    pub fn remove_cache(&self) {
        if let Some(c) = &self.cache {
            c.remove();
        }
    }

    /// Drives `p` to an answer: Ok(true) answered, Ok(false) fall back to hard labels.
    fn complete(
        &mut self,
        p: &mut Pending,
        source: &dyn Fn(&[u32]) -> Inputs,
    ) -> Result<bool, ClientError> {
        let mut failing_since: Option<Instant> = None;
        // A prefetched request may sit in the teacher's queue behind others for a while;
        // its deadline counts from when this step needs it.
        let needed_at = Instant::now();
        while !p.missing.is_empty() && p.got.is_none() {
            if p.sent.is_none() && !self.send(p, source) {
                let why = self.unavailable();
                match self.cfg.policy {
                    OnTeacherFailure::Fail => {
                        return Err(ClientError(format!(
                            "no teacher replica answered ({why}); on_teacher_failure is `fail`"
                        )))
                    }
                    OnTeacherFailure::HardLabels => return Ok(false),
                    OnTeacherFailure::Wait => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.cfg.wait_timeout {
                            return Err(ClientError(format!(
                                "no teacher replica answered for {:?} ({why}); on_teacher_failure is `wait` and distill.wait_timeout_s passed",
                                self.cfg.wait_timeout
                            )));
                        }
                        // A restarted teacher shows up in the directory; a backed-off one
                        // is tried again after BACKOFF.
                        self.dir.wait_change(self.dir_version, BACKOFF / 4);
                        continue;
                    }
                }
            }
            let sent = p.sent.take().expect("sent above");
            match self.wait(&sent, sent.at.max(needed_at)) {
                Wait::Answer(at, Ok(labels)) => {
                    self.finish_request(&sent, true);
                    if self.stats.latencies.len() < MAX_LATENCIES {
                        let secs = at.saturating_duration_since(sent.at).as_secs_f32();
                        self.stats.latencies.push(secs);
                    }
                    if labels.len() != p.missing.len() {
                        return Err(ClientError(format!(
                            "teacher {} answered {} soft labels for {} samples",
                            sent.addr,
                            labels.len(),
                            p.missing.len()
                        )));
                    }
                    self.stats.samples_fetched += labels.len() as u64;
                    self.store(p, labels)?;
                }
                Wait::Answer(_, Err(msg)) => {
                    return Err(ClientError(format!(
                        "teacher {} refused the request: {msg}",
                        sent.addr
                    )))
                }
                Wait::Down(why) => {
                    self.finish_request(&sent, false);
                    self.mark_down(&sent.addr, why);
                    self.stats.failovers += 1;
                }
                Wait::TimedOut => {
                    self.finish_request(&sent, false);
                    self.mark_down(
                        &sent.addr,
                        format!("no answer within the deadline of {:?}", self.cfg.deadline),
                    );
                    self.stats.failovers += 1;
                }
            }
        }
        Ok(true)
    }

    /// Keeps fresh soft labels: in the cache when there is one, else with the request.
    fn store(&mut self, p: &mut Pending, labels: SoftLabels) -> Result<(), ClientError> {
        let fmt = (labels.classes, labels.k, labels.features.clone());
        if self.format.as_ref().is_some_and(|f| *f != fmt) {
            return Err(ClientError(format!(
                "teacher replicas disagree: soft labels of {} classes (top {}) with activations {:?} after {:?}",
                fmt.0, fmt.1, fmt.2, self.format
            )));
        }
        self.format = Some(fmt);
        if self.cache.is_none() {
            if let Some((samples, path)) = &self.cfg.cache {
                self.cache = Some(Cache::open(path, *samples, labels.record_len()).map_err(
                    |e| ClientError(format!("soft-label cache {}: {e}", path.display())),
                )?);
            }
        }
        match &mut self.cache {
            Some(cache) => {
                for (j, &i) in p.missing.iter().enumerate() {
                    cache
                        .put(i, labels.record(j))
                        .map_err(|e| ClientError(format!("soft-label cache: {e}")))?;
                }
                p.missing.clear();
            }
            None => p.got = Some(labels),
        }
        Ok(())
    }

    fn assemble(&self, p: &Pending) -> Result<SoftLabels, ClientError> {
        if let Some(got) = &p.got {
            return Ok(got.clone());
        }
        let (classes, k, features) = self.format.clone().ok_or_else(|| {
            ClientError("no soft labels received yet, but the cache claims some".into())
        })?;
        let mut labels = SoftLabels {
            classes,
            k,
            features,
            records: Vec::new(),
        };
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| ClientError("soft labels expected in the cache".into()))?;
        let mut records = Vec::with_capacity(p.indices.len() * labels.record_len());
        for &i in &p.indices {
            let rec = cache
                .get(i)
                .map_err(|e| ClientError(format!("soft-label cache: {e}")))?
                .ok_or_else(|| ClientError(format!("sample {i} vanished from the cache")))?;
            records.extend_from_slice(&rec);
        }
        labels.records = records;
        Ok(labels)
    }

    /// Sends `p`'s missing samples to the best replica; false when none takes it.
    fn send(&mut self, p: &mut Pending, source: &dyn Fn(&[u32]) -> Inputs) -> bool {
        self.sync_directory();
        let id = self.next_id;
        self.next_id += 1;
        let frame = Request {
            id,
            inputs: source(&p.missing),
        }
        .encode();
        while let Some(i) = self.pick() {
            if let Err(e) = self.connection(i) {
                let addr = self.replicas[i].addr.clone();
                self.mark_down(&addr, format!("cannot connect: {e}"));
                continue;
            }
            self.inbox.state.lock().expect("inbox").wanted.insert(id);
            let r = &mut self.replicas[i];
            let (conn_id, stream) = r.conn.as_mut().expect("connected");
            match stream.write_all(&frame).and_then(|()| stream.flush()) {
                Ok(()) => {
                    r.in_flight += 1;
                    self.stats.requests += 1;
                    self.stats.bytes_sent += frame.len() as u64;
                    p.sent = Some(Sent {
                        id,
                        conn: *conn_id,
                        addr: r.addr.clone(),
                        at: Instant::now(),
                    });
                    return true;
                }
                Err(e) => {
                    self.inbox.state.lock().expect("inbox").wanted.remove(&id);
                    let addr = r.addr.clone();
                    self.mark_down(&addr, format!("cannot send: {e}"));
                }
            }
        }
        false
    }

    /// The replica to ask next: the lowest latency × (1 + in flight) among those not
    /// backed off; unmeasured replicas count as fastest, so each gets tried.
    fn pick(&self) -> Option<usize> {
        let now = Instant::now();
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.down_until.is_none_or(|t| t <= now))
            .min_by(|(_, a), (_, b)| {
                let score = |r: &Replica| r.latency.unwrap_or(0.0) * (1 + r.in_flight) as f64;
                score(a)
                    .total_cmp(&score(b))
                    .then(a.in_flight.cmp(&b.in_flight))
            })
            .map(|(i, _)| i)
    }

    /// Replica `i`'s connection, opened (with its reader thread) if needed.
    fn connection(&mut self, i: usize) -> std::io::Result<()> {
        if self.replicas[i].conn.is_some() {
            return Ok(());
        }
        let addr: SocketAddr = self.replicas[i]
            .addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        let stream =
            TcpStream::connect_timeout(&addr, self.cfg.deadline.min(Duration::from_secs(2)))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(self.cfg.deadline))?;
        let reader = stream.try_clone()?;
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let inbox = self.inbox.clone();
        let received = self.received.clone();
        std::thread::Builder::new()
            .name("teacher-reader".into())
            .spawn(move || read_answers(reader, conn_id, inbox, received))?;
        self.replicas[i].conn = Some((conn_id, stream));
        Ok(())
    }

    /// Waits for `sent`'s answer until `since` + the deadline.
    fn wait(&self, sent: &Sent, since: Instant) -> Wait {
        let deadline = since + self.cfg.deadline;
        let mut st = self.inbox.state.lock().expect("inbox");
        loop {
            if let Some((at, a)) = st.answers.remove(&sent.id) {
                st.wanted.remove(&sent.id);
                return Wait::Answer(at, a);
            }
            if let Some(why) = st.dead.get(&sent.conn).cloned() {
                st.wanted.remove(&sent.id);
                return Wait::Down(why);
            }
            let now = Instant::now();
            if now >= deadline {
                st.wanted.remove(&sent.id);
                return Wait::TimedOut;
            }
            st = self
                .inbox
                .changed
                .wait_timeout(st, deadline - now)
                .expect("inbox")
                .0;
        }
    }

    /// Books the end of a request on its replica: its latency when it was answered.
    fn finish_request(&mut self, sent: &Sent, answered: bool) {
        self.stats.bytes_received = self.received.load(Ordering::Relaxed);
        if let Some(r) = self.replicas.iter_mut().find(|r| r.addr == sent.addr) {
            r.in_flight = r.in_flight.saturating_sub(1);
            if answered {
                let t = sent.at.elapsed().as_secs_f64();
                r.latency = Some(r.latency.map_or(t, |l| 0.8 * l + 0.2 * t));
                r.last_error = None;
            }
        }
    }

    /// Skips `addr` for a while and drops its connection: requests in flight on it fail
    /// over when their turn comes.
    fn mark_down(&mut self, addr: &str, why: String) {
        if let Some(r) = self.replicas.iter_mut().find(|r| r.addr == addr) {
            if let Some((_, s)) = r.conn.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            r.down_until = Some(Instant::now() + BACKOFF);
            r.in_flight = 0;
            r.last_error = Some(why);
        }
    }

    /// Why nothing could be sent, for messages.
    fn unavailable(&self) -> String {
        if self.replicas.is_empty() {
            return "no teacher replica is registered".into();
        }
        self.replicas
            .iter()
            .map(|r| {
                format!(
                    "{}: {}",
                    r.addr,
                    r.last_error.as_deref().unwrap_or("backing off")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Takes in a new list of replicas: known ones keep their connection and latency,
    /// gone ones are dropped, and every backoff ends (the list is news).
    fn sync_directory(&mut self) {
        let (version, addrs) = self.dir.snapshot();
        if version == self.dir_version {
            return;
        }
        self.dir_version = version;
        let mut old: HashMap<String, Replica> = self
            .replicas
            .drain(..)
            .map(|r| (r.addr.clone(), r))
            .collect();
        for addr in addrs {
            let mut r = old.remove(&addr).unwrap_or(Replica {
                addr,
                conn: None,
                latency: None,
                in_flight: 0,
                down_until: None,
                last_error: None,
            });
            r.down_until = None;
            self.replicas.push(r);
        }
        for (_, r) in old {
            if let Some((_, s)) = r.conn {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A connection's reader thread: files answers by request id until the stream ends.
fn read_answers(stream: TcpStream, conn: u64, inbox: Arc<Inbox>, received: Arc<AtomicU64>) {
    let mut r = BufReader::new(CountingReader {
        inner: stream,
        count: received,
    });
    let why = loop {
        match read_response(&mut r) {
            Ok(Some(resp)) => {
                let mut st = inbox.state.lock().expect("inbox");
                if st.wanted.contains(&resp.id) {
                    st.answers.insert(resp.id, (Instant::now(), resp.body));
                    inbox.changed.notify_all();
                }
            }
            Ok(None) => break "the teacher closed the connection".to_string(),
            Err(e) => break format!("connection lost: {e}"),
        }
    };
    inbox.state.lock().expect("inbox").dead.insert(conn, why);
    inbox.changed.notify_all();
}

struct CountingReader {
    inner: TcpStream,
    count: Arc<AtomicU64>,
}

impl std::io::Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::server::{serve, ServerStats, Teacher};
    use super::super::{dense_targets, encode_topk};
    use super::*;
    use std::net::TcpListener;

    /// A real teacher server whose "model" gives sample i all its mass on class i % 3,
    /// after `delay`.
    struct Modulo {
        delay: Duration,
    }

    impl Teacher for Modulo {
        fn soft_labels(&mut self, batch: &[&Inputs]) -> Vec<Result<SoftLabels, String>> {
            std::thread::sleep(self.delay);
            batch
                .iter()
                .map(|inp| match inp {
                    Inputs::Indices { indices, .. } => {
                        let classes: Vec<i64> = indices.iter().map(|&i| i64::from(i % 3)).collect();
                        let probs = vec![1.0; classes.len()];
                        Ok(encode_topk(3, 1, &classes, &probs))
                    }
                    Inputs::Tensor { .. } => Err("tensor requests are not served here".into()),
                })
                .collect()
        }
    }

    fn start_teacher(delay: Duration) -> (String, Arc<ServerStats>) {
        start_teacher_batch(delay, 64)
    }

    fn start_teacher_batch(delay: Duration, max_batch: usize) -> (String, Arc<ServerStats>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stats = Arc::new(ServerStats::default());
        let s = stats.clone();
        std::thread::spawn(move || serve(l, &mut Modulo { delay }, max_batch, s));
        (addr, stats)
    }

    /// A replica that accepts connections and never answers.
    fn start_stalled() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming() {
                held.push(c);
            }
        });
        addr
    }

    /// An address where nothing listens.
    fn dead_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    static NEXT: AtomicU64 = AtomicU64::new(0);

    fn client(policy: OnTeacherFailure, addrs: Vec<String>, cache: bool) -> (Client, Directory) {
        let dir = Directory::default();
        dir.set(addrs);
        let spill = std::env::temp_dir().join(format!(
            "ferry-cache-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let cfg = ClientConfig {
            deadline: Duration::from_millis(300),
            policy,
            wait_timeout: Duration::from_secs(5),
            cache: cache.then_some((100, spill)),
        };
        (Client::new(cfg, dir.clone()), dir)
    }

    fn by_index(idx: &[u32]) -> Inputs {
        Inputs::Indices {
            aug_seed: 0,
            indices: idx.to_vec(),
        }
    }

    fn argmax_rows(labels: &SoftLabels) -> Vec<usize> {
        let d = dense_targets(
            labels.classes,
            labels.k,
            (0..labels.len()).map(|i| labels.label(i)),
        )
        .unwrap();
        d.chunks(3)
            .map(|r| r.iter().position(|&v| v == 1.0).unwrap())
            .collect()
    }

    #[test]
    fn answers_come_in_request_order_and_the_cache_serves_repeats() {
        let (addr, stats) = start_teacher(Duration::ZERO);
        let (mut c, _dir) = client(OnTeacherFailure::Fail, vec![addr], true);
        for (key, idx) in [(1u64, vec![4u32, 7, 2]), (2, vec![9, 1])] {
            c.prefetch(key, &idx, &by_index);
        }
        let a = c.take(1, &[4, 7, 2], &by_index).unwrap().unwrap();
        assert_eq!(argmax_rows(&a), vec![1, 1, 2]);
        let b = c.take(2, &[9, 1], &by_index).unwrap().unwrap();
        assert_eq!(argmax_rows(&b), vec![0, 1]);
        // A later epoch: every sample from the cache, no request.
        let before = stats.requests.load(Ordering::Relaxed);
        let again = c.take(3, &[1, 2, 4, 7, 9], &by_index).unwrap().unwrap();
        assert_eq!(argmax_rows(&again), vec![1, 2, 1, 1, 0]);
        assert_eq!(stats.requests.load(Ordering::Relaxed), before);
        assert_eq!((c.stats.cache_hits, c.stats.cache_misses), (5, 5));
        assert!(c.stats.bytes_received > 0 && c.stats.bytes_sent > 0);
    }

    #[test]
    fn requests_fail_over_from_dead_and_stalled_replicas() {
        let (good, _) = start_teacher(Duration::ZERO);
        let (mut c, _dir) = client(
            OnTeacherFailure::Fail,
            vec![dead_addr(), start_stalled(), good],
            false,
        );
        for key in 0..6u64 {
            let idx = [key as u32];
            let got = c.take(key, &idx, &by_index).unwrap().unwrap();
            assert_eq!(argmax_rows(&got), vec![(key % 3) as usize]);
        }
        assert!(c.stats.failovers >= 1, "{:?}", c.stats);
    }

    #[test]
    fn deep_prefetching_is_not_mistaken_for_a_dead_teacher() {
        // One sample per forward pass, 100 ms each, and a 300 ms deadline: the sixth
        // prefetched request is answered 600 ms after it was sent, but only ~100 ms after
        // its step asked for it.
        let (slow, stats) = start_teacher_batch(Duration::from_millis(100), 1);
        let (mut c, _dir) = client(OnTeacherFailure::Fail, vec![slow], false);
        for key in 0..6u64 {
            c.prefetch(key, &[key as u32], &by_index);
        }
        for key in 0..6u64 {
            let got = c.take(key, &[key as u32], &by_index).unwrap().unwrap();
            assert_eq!(argmax_rows(&got), vec![(key % 3) as usize]);
        }
        assert_eq!(c.stats.failovers, 0);
        assert_eq!(stats.batches.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn load_follows_measured_latency() {
        let (fast, fast_stats) = start_teacher(Duration::from_millis(1));
        let (slow, slow_stats) = start_teacher(Duration::from_millis(40));
        let (mut c, _dir) = client(OnTeacherFailure::Fail, vec![slow, fast], false);
        for key in 0..40u64 {
            c.take(key, &[key as u32], &by_index).unwrap().unwrap();
        }
        let (f, s) = (
            fast_stats.requests.load(Ordering::Relaxed),
            slow_stats.requests.load(Ordering::Relaxed),
        );
        assert!(s >= 1, "every replica gets measured");
        assert!(f > 4 * s, "fast {f} slow {s}");
    }

    #[test]
    fn policies_decide_when_no_teacher_answers() {
        let (mut c, _) = client(OnTeacherFailure::HardLabels, vec![dead_addr()], false);
        assert!(c.take(1, &[1], &by_index).unwrap().is_none());
        assert_eq!(c.stats.fallback_steps, 1);

        let (mut c, _) = client(OnTeacherFailure::Fail, vec![start_stalled()], false);
        let e = c.take(1, &[1], &by_index).unwrap_err().to_string();
        assert!(
            e.contains("no answer within the deadline") && e.contains("`fail`"),
            "{e}"
        );

        // `wait`: a teacher that appears later (a restarted replica) is used.
        let (mut c, dir) = client(OnTeacherFailure::Wait, vec![dead_addr()], false);
        let (good, _) = start_teacher(Duration::ZERO);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            dir.set(vec![good]);
        });
        let got = c.take(1, &[5], &by_index).unwrap().unwrap();
        assert_eq!(argmax_rows(&got), vec![2]);
        t.join().unwrap();

        // A refusal is the teacher's answer, not an outage: it ends the job.
        let (good, _) = start_teacher(Duration::ZERO);
        let (mut c, _) = client(OnTeacherFailure::HardLabels, vec![good], false);
        let tensor = |_: &[u32]| Inputs::Tensor {
            shape: [1, 1, 1],
            data: vec![0.0],
        };
        let e = c.take(1, &[0], &tensor).unwrap_err().to_string();
        assert!(e.contains("refused"), "{e}");
    }
}
