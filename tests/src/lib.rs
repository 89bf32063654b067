//! A harness for process-level tests: real `ferryd --standalone` processes on free
//! loopback ports, each with its own data dir and output root, driven over HTTP and with
//! the real `ferryctl`. Everything is cleaned up on drop.
//!
//! The binaries must be built first (`cargo build --workspace`; `scripts/test.sh` does it).
//! [`etcd`] runs a real etcd for the tests of the etcd store and of cluster mode.

pub mod etcd;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_cluster::api::{EventPage, Job};
use serde_json::Value;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// `target/<profile>`, where the binaries are.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// A built binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The Python with torch that the set-up script installed.
pub fn python() -> PathBuf {
    std::env::var_os("FERRY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"))
}

/// Runs a fixture script with the venv's Python; panics with its output on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/fixtures").join(script))
        .args(args)
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// Models and data made once per test binary by `tests/fixtures/make_fixtures.py`.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Keyed by the script's content: a changed script makes new fixtures.
        let script = std::fs::read(workspace().join("tests/fixtures/make_fixtures.py"))
            .expect("fixture script");
        let hash = script.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
        let dir = bin_dir().join(format!("ferry-fixtures-{hash:016x}"));
        let stamp = dir.join(".complete");
        if !stamp.exists() {
            let tmp = bin_dir().join(format!("ferry-fixtures.tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            run_python("make_fixtures.py", &[tmp.to_str().expect("utf-8 path")]);
            std::fs::write(tmp.join(".complete"), b"").expect("stamp");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).expect("move fixtures into place");
        }
        dir
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// How a cluster-mode node joins its cluster.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    /// etcd's client URL.
    pub etcd: String,
    /// The cluster's name (its key prefix): unique per test.
    pub cluster: String,
    pub name: String,
    /// The loopback address the node listens on (API and data plane): 127.0.0.11, ...
    pub ip: String,
    /// The outputs root every node of the cluster shares.
    pub out: PathBuf,
    /// `worker`, or `teacher` (serves distillation teachers only).
    pub role: String,
}

/// A running `ferryd --standalone`, or one node of a cluster (see [`Daemon::start_node`]).
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub token: Option<String>,
    /// Holds the data dir (and, standalone, the outputs root).
    pub dir: tempfile::TempDir,
    agent: ureq::Agent,
    /// Cluster mode: how it joins.
    pub node: Option<NodeOpts>,
    /// A command line of the test's own (see [`Daemon::start_as`]) instead of the usual one.
    launch: Option<Launch>,
    /// Environment set after the harness's own (see [`Daemon::start_env`]).
    extra_env: Vec<(String, String)>,
}

/// A `ferryd` command line given whole: program, arguments and environment.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon without a token.
    pub fn start() -> Daemon {
        Self::start_with(None)
    }

    /// Starts a daemon with these `FERRY_*` settings on top of the harness's.
    pub fn start_env(env: &[(&str, &str)]) -> Daemon {
        Self::launch_standalone(
            None,
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Starts a daemon, with a token if given.
    pub fn start_with(token: Option<&str>) -> Daemon {
        Self::launch_standalone(token, Vec::new())
    }

    fn launch_standalone(token: Option<&str>, extra_env: Vec<(String, String)>) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("out")).expect("out dir");
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let mut d = Daemon {
            child: None,
            port: free_port(),
            token: token.map(str::to_string),
            dir,
            agent,
            node: None,
            launch: None,
            extra_env,
        };
        d.spawn();
        d
    }

    /// Starts a cluster-mode node (`--etcd`), listening on `opts.ip`, in a process group
    /// of its own with its ranks (so that [`Daemon::pause`] freezes the whole "host").
    pub fn start_node(opts: NodeOpts) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let port = TcpListener::bind(format!("{}:0", opts.ip))
            .expect("bind the node's address")
            .local_addr()
            .expect("addr")
            .port();
        let mut d = Daemon {
            child: None,
            port,
            token: None,
            dir,
            agent,
            node: Some(opts),
            launch: None,
            extra_env: Vec::new(),
        };
        d.spawn();
        d
    }

    /// Starts `ferryd` exactly as `launch` says (no `FERRY_*` variable of the test's own
    /// environment leaks in), as a cluster node listening on `ip:port`, in a process group
    /// of its own; `dir` holds its log.
    pub fn start_as(
        launch: Launch,
        ip: &str,
        port: u16,
        token: &str,
        dir: tempfile::TempDir,
    ) -> Daemon {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let mut d = Daemon {
            child: None,
            port,
            token: Some(token.to_string()),
            dir,
            agent,
            node: Some(NodeOpts {
                etcd: String::new(),
                cluster: String::new(),
                name: String::new(),
                ip: ip.to_string(),
                out: PathBuf::new(),
                role: String::new(),
            }),
            launch: Some(launch),
            extra_env: Vec::new(),
        };
        d.spawn();
        d
    }

    /// The node's data dir (its store, plans, and node-local scratch).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The outputs root.
    pub fn out(&self) -> PathBuf {
        match &self.node {
            Some(n) => n.out.clone(),
            None => self.dir.path().join("out"),
        }
    }

    /// The address the API listens on.
    fn ip(&self) -> &str {
        self.node.as_ref().map_or("127.0.0.1", |n| n.ip.as_str())
    }

    /// The node's process id (its process group's, too, in cluster mode).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Freezes the node and its ranks (SIGSTOP to its process group), as a hung host.
    pub fn pause(&self) {
        signal_group(self.pid(), "-STOP");
    }

    /// Thaws a paused node (SIGCONT).
    pub fn resume(&self) {
        signal_group(self.pid(), "-CONT");
    }

    /// The `ferryd` command line this daemon runs with (for tests that start their own).
    pub fn command(&self) -> Command {
        if let Some(l) = &self.launch {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new(&l.program);
            for (k, _) in std::env::vars() {
                if k.starts_with("FERRY_") {
                    c.env_remove(k);
                }
            }
            c.args(&l.args).envs(l.env.iter().cloned()).process_group(0);
            return c;
        }
        let mut c = Command::new(bin("ferryd"));
        match &self.node {
            None => {
                c.arg("--standalone");
            }
            Some(n) => {
                use std::os::unix::process::CommandExt;
                c.args([
                    "--etcd",
                    &n.etcd,
                    "--cluster",
                    &n.cluster,
                    "--node-name",
                    &n.name,
                ])
                .args(["--data-plane-ip", &n.ip])
                .env("FERRY_ROLE", &n.role)
                .env("FERRY_NODE_TTL_MS", "3000")
                .process_group(0);
            }
        }
        c.arg("--listen")
            .arg(format!("{}:{}", self.ip(), self.port))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .env("FERRY_ROOTS__DATA", fixtures().join("data"))
            .env("FERRY_ROOTS__MODELS", fixtures().join("models"))
            .env("FERRY_ROOTS__OUTPUTS", self.out())
            .env("FERRY_PROGRESS_INTERVAL_MS", "100")
            .env("FERRY_WORKER_THREADS", "1")
            .env("FERRY_CPU_RANK_SLOTS", "8")
            .env("FERRY_MAX_RUNNING_JOBS", "2")
            .env_remove("FERRY_TOKEN")
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_ETCD")
            .env_remove("FERRY_CLUSTER");
        if let Some(t) = &self.token {
            c.env("FERRY_TOKEN", t);
        }
        c.envs(self.extra_env.iter().cloned());
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ferryd.log"))
            .expect("log");
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ferryd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.agent.get(&self.url("/readyz")).call() {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ferryd exited ({status}) during start-up:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "ferryd did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ferryd.log")).unwrap_or_default()
    }

    /// Kills the daemon with SIGKILL (no clean shutdown) and starts it again on the same data dir.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the daemon with SIGKILL (in cluster mode, with its ranks: the whole "host").
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.node.is_some() {
                signal_group(c.id(), "-KILL");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to the daemon (what Kubernetes sends to stop a pod) and waits up to
    /// `timeout` for it to exit: its exit status, or None if it did not.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .ok()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip(), self.port)
    }

    /// A request with any method to this daemon (with its token).
    pub fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &self.url(path));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// GET → (status, body as JSON or a string).
    pub fn get(&self, path: &str) -> (u16, Value) {
        respond(self.req("GET", path).call())
    }

    /// The node's `/metrics` exposition.
    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.as_str().unwrap_or_default().to_string()
    }

    /// POST a body → (status, JSON).
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        respond(self.req("POST", path).send_string(body))
    }

    /// Submits a spec over HTTP; panics unless it is accepted.
    pub fn submit(&self, spec: &str) -> Job {
        let (status, body) = self.post("/v1/jobs", spec);
        assert_eq!(status, 201, "submit failed: {body}");
        serde_json::from_value(body).expect("job")
    }

    /// A job by id or name.
    pub fn job(&self, id: &str) -> Job {
        let (status, body) = self.get(&format!("/v1/jobs/{id}"));
        assert_eq!(status, 200, "get {id}: {body}");
        serde_json::from_value(body).expect("job")
    }

    /// Every event of a job.
    /// Every event of job `id`, page by page.
    pub fn events(&self, id: &str) -> EventPage {
        let mut all: Option<EventPage> = None;
        loop {
            let after = all.as_ref().map_or(0, |p| p.next);
            let (status, body) = self.get(&format!("/v1/jobs/{id}/events?after={after}"));
            assert_eq!(status, 200, "events {id}: {body}");
            let page: EventPage = serde_json::from_value(body).expect("events");
            let last = page.events.is_empty();
            match all.as_mut() {
                None => all = Some(page),
                Some(a) => {
                    a.events.extend(page.events);
                    (a.next, a.phase) = (page.next, page.phase);
                }
            }
            if last {
                return all.expect("a page");
            }
        }
    }

    /// Polls job `id` until `done` holds for it; panics with its events after `timeout`.
    pub fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Job) -> bool,
    ) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if done(&job) {
                return job;
            }
            if Instant::now() > deadline {
                let ev: Vec<String> = self
                    .events(id)
                    .events
                    .iter()
                    .map(|e| format!("{} {:?} {}", e.seq, e.kind, e.message))
                    .collect();
                panic!("job {id} did not reach `{what}` in {timeout:?}; it is {:?} {:?}\nevents:\n{}\nlog:\n{}", job.phase, job.status, ev.join("\n"), self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the job has ended, for at most `timeout`.
    pub fn wait_terminal(&self, id: &str, timeout: Duration) -> Job {
        self.wait_for(id, timeout, "a terminal phase", |j| j.phase.is_terminal())
    }

    /// Runs `ferryctl` against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut c = Command::new(bin("ferryctl"));
        c.args(args)
            .env("FERRY_SERVER", self.url(""))
            .env_remove("FERRY_TOKEN");
        if let Some(t) = &self.token {
            c.env("FERRY_TOKEN", t);
        }
        c.output().expect("run ferryctl")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn respond(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Sends `signal` (`-STOP`, `-CONT`, `-KILL`) to the process group `pgid`.
fn signal_group(pgid: u32, signal: &str) {
    if pgid == 0 {
        return;
    }
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .status();
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

/// (rank, pid) of every rank the job has started, oldest first, from its events.
pub fn rank_pids(d: &Daemon, id: &str) -> Vec<(u64, u32)> {
    d.events(id)
        .events
        .iter()
        .filter_map(|e| {
            Some((
                e.data.get("rank")?.as_u64()?,
                e.data.get("pid")?.as_u64()? as u32,
            ))
        })
        .collect()
}

/// The pid of rank `rank` in the job's latest attempt.
pub fn rank_pid(d: &Daemon, id: &str, rank: u64) -> u32 {
    rank_pids(d, id)
        .into_iter()
        .rev()
        .find(|(r, _)| *r == rank)
        .expect("the rank started")
        .1
}

/// Sends SIGKILL to `pid`, as the OOM killer would.
pub fn kill9(pid: u32) {
    let ok = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -9 {pid}");
}

/// The last `distill` record rank 0 of job `name` wrote to its metrics.jsonl under `d`'s
/// outputs root.
pub fn final_distill(d: &Daemon, name: &str) -> Value {
    let text = std::fs::read_to_string(d.out().join(name).join("metrics.jsonl")).unwrap();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("distill").is_some_and(|d| !d.is_null()) && v.get("step").is_none())
        .expect("a final distill record")["distill"]
        .clone()
}

/// The value of the series that starts with `series` (a name and, if given, the opening of
/// its labels, exactly as exposed) in an exposition, summed over the series that match.
pub fn metric_sum(text: &str, series: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{', ',', '}']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
