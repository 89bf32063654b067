//! A real etcd for process-level tests: one single-member cluster per [`Etcd`], on free
//! loopback ports with a temporary data dir, that a test can stop, restart and kill. It is
//! killed on drop. [`Etcd::with_tls`] serves clients over TLS and requires client
//! certificates, with a CA made for it by `openssl`.
//!
//! Several tests may share one etcd by working under their own [`unique_prefix`]; a test
//! that restarts etcd or counts revisions gets its own.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long etcd may take to answer its health check after a start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A key prefix no other test (or test process) uses: `/t-{name}-{pid}-{n}`.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("/t-{name}-{}-{n}", std::process::id())
}

/// The etcd binary: `/usr/bin/etcd`, else the first `etcd` on `PATH`.
pub fn etcd_binary() -> PathBuf {
    let system = PathBuf::from("/usr/bin/etcd");
    if system.is_file() {
        return system;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcd"))
                .find(|p| p.is_file())
        })
        .expect("etcd is not installed: install etcd-server (scripts/setup.sh does)")
}

/// Three distinct free loopback ports (all held while asking, so they differ).
fn free_ports() -> [u16; 3] {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let held = [bind(), bind(), bind()];
    held.map(|l| l.local_addr().expect("local address").port())
}

/// PEM files for a TLS etcd: its CA, and a client certificate and key it accepts.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Tls {
    /// Makes a CA, a server certificate for 127.0.0.1 and a client certificate in `dir`.
    fn make(dir: &Path) -> Tls {
        std::fs::create_dir_all(dir).expect("tls dir");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        /// `openssl req` with a new P-256 key.
        fn req<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            let new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
            [&["req", "-nodes"], &new_key[..], extra].concat()
        }
        openssl(&req(&[
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=ferry test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]));
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let file = |suffix: &str| format!("{name}.{suffix}");
            std::fs::write(dir.join(file("ext")), ext).expect("extensions file");
            let subject = format!("/CN={name}");
            openssl(&req(&[
                "-subj",
                &subject,
                "-keyout",
                &file("key"),
                "-out",
                &file("csr"),
            ]));
            openssl(&[
                "x509",
                "-req",
                "-in",
                &file("csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &file("ext"),
                "-out",
                &file("pem"),
            ]);
        }
        Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("client.pem"),
            key: dir.join("client.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// A running (or stopped) single-member etcd.
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP for `/health` and `/metrics`, whether clients use TLS or not.
    metrics_port: u16,
    tls: Option<Tls>,
    /// Holds the data dir (`data/`), the log (`etcd.log`) and the TLS files (`tls/`).
    dir: tempfile::TempDir,
    agent: ureq::Agent,
}

impl Etcd {
    /// Starts a fresh etcd and waits until it is healthy.
    pub fn new() -> Etcd {
        Self::launch(false)
    }

    /// Starts a fresh etcd that serves clients over TLS only and requires a client
    /// certificate signed by its CA ([`Etcd::tls`] has the files).
    pub fn with_tls() -> Etcd {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Etcd {
        let [client_port, peer_port, metrics_port] = free_ports();
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls.then(|| Tls::make(&dir.path().join("tls")));
        let mut etcd = Etcd {
            child: None,
            client_port,
            peer_port,
            metrics_port,
            tls,
            dir,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build(),
        };
        etcd.start();
        etcd
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The TLS files of an etcd made by [`Etcd::with_tls`].
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The last lines of etcd's log (of every run so far).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts etcd (again, after [`Etcd::stop`] or [`Etcd::kill`]: same ports, same data) and
    /// waits until it is healthy; panics with the log's tail if it is not within 20 s.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new(etcd_binary())
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--listen-metrics-urls={}", self.metrics_url()))
            .args(self.tls.iter().flat_map(|tls| {
                [
                    format!("--cert-file={}", tls.server_cert.display()),
                    format!("--key-file={}", tls.server_key.display()),
                    format!("--trusted-ca-file={}", tls.ca.display()),
                    "--client-cert-auth".to_string(),
                ]
            }))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/health", self.metrics_url());
        loop {
            if let Ok(r) = self.agent.get(&url).call() {
                if r.into_string().is_ok_and(|body| body.contains("\"true\"")) {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "etcd exited ({status}) before it was healthy; its log:\n{}",
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd at {} was not healthy within {START_TIMEOUT:?}; its log:\n{}",
                    self.endpoint(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops etcd cleanly (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// Freezes etcd (SIGSTOP): its connections stay open but nothing answers, as with a
    /// hung host or a network partition.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("etcd is running");
        let ok = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {}", child.id());
    }

    /// Kills etcd (SIGKILL), as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process dies of SIGKILL too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether etcd is running (started and not stopped).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// etcd's Prometheus metrics (`GET /metrics`).
    pub fn metrics(&self) -> String {
        self.agent
            .get(&format!("{}/metrics", self.metrics_url()))
            .call()
            .expect("etcd metrics")
            .into_string()
            .expect("etcd metrics text")
    }

    /// The value of an unlabelled metric, e.g. `etcd_debugging_mvcc_watcher_total`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
    }

    /// Where the log and data dir are (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Etcd {
    fn default() -> Self {
        Etcd::new()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
