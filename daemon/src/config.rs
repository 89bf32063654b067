//! The daemon's configuration: a file (`--config`), then `FERRY_*` environment variables
//! (nested keys with `__`, e.g. `FERRY_ROOTS__DATA`), then flags; later sources win.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The keys `FERRY_*` variables may set (others, like ferryctl's `FERRY_SERVER`, are not ours).
const KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "token",
    "node_name",
    "roots",
    "max_body_bytes",
    "body_timeout_ms",
    "max_connections",
    "max_requests_per_client",
    "max_queued_jobs",
    "keep_finished_jobs",
    "finished_job_ttl_hours",
    "cpu_rank_slots",
    "rank_sandbox",
    "rank_user",
    "max_running_jobs",
    "worker_threads",
    "progress_interval_ms",
    "metrics_retention_s",
    "log_format",
    "store_prefix",
    "data_plane_ip",
    "collective_timeout_ms",
    "nccl_library",
    "etcd",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password",
    "cluster",
    "node_ttl_ms",
    "role",
    "labels",
];

/// `FERRY_*` variables that are not settings but are read by ferry's other parts:
/// ferryd's log filter and config file, ferryctl's server, the scripts' and benchmarks'
/// variables, and what the daemon passes its ranks.
const OTHER_VARIABLES: &[&str] = &[
    "log",
    "config",
    "server",
    "root",
    "python",
    "saver",
    "job_limit",
    "chart_venv",
    "bench_port",
];
/// Prefixes of such variables (the benchmarks' knobs).
const OTHER_PREFIXES: &[&str] = &["ring_", "bench_"];

/// Warnings for `FERRY_*` variables in `vars` that no part of ferry reads (a misspelt
/// setting is otherwise silently ignored), each with the nearest setting's name when one
/// is close.
pub fn unknown_variables(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, _) in vars {
        let Some(rest) = k.strip_prefix("FERRY_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let top = rest.split("__").next().unwrap_or_default();
        if KEYS.contains(&top)
            || OTHER_VARIABLES.contains(&rest.as_str())
            || OTHER_PREFIXES.iter().any(|p| rest.starts_with(p))
        {
            continue;
        }
        let nearest = KEYS
            .iter()
            .map(|key| (edit_distance(top, key), *key))
            .min()
            .filter(|(d, _)| *d <= 3)
            .map(|(_, key)| format!(" (did you mean FERRY_{}?)", key.to_ascii_uppercase()))
            .unwrap_or_default();
        out.push(format!(
            "{k} is not a ferryd setting and is ignored{nearest}; the settings are in docs/ferryd.example.yaml"
        ));
    }
    out.sort();
    out
}

/// Levenshtein distance between two ASCII strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<u8> = b.bytes().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Directories that spec paths are confined to; each defaults to the daemon's working directory.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RootsConfig {
    pub data: Option<PathBuf>,
    pub models: Option<PathBuf>,
    pub outputs: Option<PathBuf>,
}

/// Everything `ferryd` can be configured with; see `docs/ferryd.example.yaml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the REST API.
    pub listen: String,
    /// Where the embedded store and worker plans live.
    pub data_dir: PathBuf,
    /// Bearer token the API requires; without one the daemon listens on loopback only.
    pub token: Option<String>,
    /// This node's name (default: the host name).
    pub node_name: Option<String>,
    pub roots: RootsConfig,
    /// Largest request body accepted (bytes).
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (milliseconds): a slow sender gets 408.
    pub body_timeout_ms: u64,
    /// Open API connections at most (beyond it new ones wait in the listen backlog).
    pub max_connections: usize,
    /// Requests in flight from one client address at most (beyond it: 429).
    pub max_requests_per_client: usize,
    /// Pending jobs in the cluster at most (beyond it a submit gets 429 with Retry-After).
    pub max_queued_jobs: usize,
    /// Jobs that have ended kept in the store at most (the newest); older ones are
    /// deleted with their events, as `DELETE /v1/jobs/{id}` deletes (their outputs stay on
    /// disk). 0: keep every one.
    pub keep_finished_jobs: usize,
    /// Hours a job that has ended is kept in the store after it ended; 0: no limit.
    pub finished_job_ttl_hours: f64,
    /// CPU ranks this node runs at once over all its jobs (default: its cores).
    pub cpu_rank_slots: Option<u32>,
    /// What confines rank and teacher processes: `auto` (Landlock for CPU jobs where the
    /// kernel has it), `landlock` (every job; a job fails where it cannot be had), `off`.
    pub rank_sandbox: String,
    /// The user rank and teacher processes run as (a name, or `uid[:gid]`), when ferryd runs
    /// as root; unset: ferryd's own.
    pub rank_user: Option<String>,
    /// Jobs this node runs at once; the rest wait as Pending.
    pub max_running_jobs: usize,
    /// Intra-op threads per rank unless the spec says otherwise (default: all cores).
    pub worker_threads: Option<u32>,
    /// How often a rank reports progress (milliseconds).
    pub progress_interval_ms: u64,
    /// How long a finished job's series stay in `/metrics` (seconds), so that a short job
    /// still reaches the scraper with its final numbers.
    pub metrics_retention_s: u64,
    /// `text` or `json`.
    pub log_format: String,
    /// Key prefix in the store.
    pub store_prefix: String,
    /// The interface ranks bind their data-plane (ring) listeners to.
    pub data_plane_ip: String,
    /// How long a collective waits for a stalled peer before the rank fails (milliseconds).
    pub collective_timeout_ms: u64,
    /// `libnccl.so.2` for CUDA ranks (default: found next to the libtorch in use, in the
    /// torch wheel's `nvidia/nccl/lib`).
    pub nccl_library: Option<PathBuf>,
    /// etcd endpoints, comma-separated (`http://host:2379,...`): cluster mode. Without it
    /// the daemon needs `--standalone`.
    pub etcd: Option<String>,
    /// TLS to etcd: the CA that signed its certificate, and this node's client certificate
    /// and key (both or neither).
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    /// etcd user and password (prefer FERRY_ETCD_PASSWORD: flags show up in `ps`).
    pub etcd_user: Option<String>,
    pub etcd_password: Option<String>,
    /// The cluster's name: every key lives under `<store_prefix>/<cluster>`, so several
    /// clusters (or tests) can share one etcd.
    pub cluster: Option<String>,
    /// TTL of this node's lease (milliseconds): a node that stops renewing it is declared
    /// dead this long after its last renewal, and its jobs move on without it.
    pub node_ttl_ms: u64,
    /// `worker` (runs ranks) or `teacher` (runs distillation teachers only).
    pub role: String,
    /// Labels that jobs' `resources.node_selector` match.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7070".into(),
            data_dir: PathBuf::from(".ferry"),
            token: None,
            node_name: None,
            roots: RootsConfig::default(),
            max_body_bytes: 1 << 20,
            body_timeout_ms: 10_000,
            max_connections: 1024,
            max_requests_per_client: 64,
            max_queued_jobs: 1000,
            keep_finished_jobs: 1000,
            finished_job_ttl_hours: 0.0,
            cpu_rank_slots: None,
            rank_sandbox: "auto".into(),
            rank_user: None,
            max_running_jobs: 1,
            worker_threads: None,
            progress_interval_ms: 1000,
            metrics_retention_s: 300,
            log_format: "text".into(),
            store_prefix: "/ferry".into(),
            data_plane_ip: "127.0.0.1".into(),
            collective_timeout_ms: 60_000,
            nccl_library: None,
            etcd: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_password: None,
            cluster: None,
            node_ttl_ms: 5000,
            role: "worker".into(),
            labels: Default::default(),
        }
    }
}

impl Config {
    /// The (uid, gid) of `rank_user`, checked: it needs ferryd to run as root, and must be
    /// able to reach the data dir (plans, scratch).
    #[allow(unsafe_code)]
    pub fn rank_ids(&self) -> Result<Option<(u32, u32)>> {
        let Some(user) = self
            .rank_user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("rank_user = {user}: switching the ranks' user needs ferryd to run as root; unset rank_user, or run ferryd as root");
        }
        let ids = if let Some((u, g)) = user.split_once(':') {
            match (u.parse::<u32>(), g.parse::<u32>()) {
                (Ok(u), Ok(g)) => (u, g),
                _ => bail!("rank_user = {user}: give a user name, or uid:gid in numbers"),
            }
        } else if let Ok(uid) = user.parse::<u32>() {
            (uid, uid)
        } else {
            let c = std::ffi::CString::new(user).context("rank_user has a NUL")?;
            // SAFETY: a NUL-terminated name; the result (if any) is read at once, at start-up
            // (getpwnam's static buffer is not shared with another thread yet).
            let pw = unsafe { libc::getpwnam(c.as_ptr()) };
            if pw.is_null() {
                bail!("rank_user = {user}: no such user on this node (see /etc/passwd)");
            }
            // SAFETY: non-null, just returned.
            unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
        };
        if ids.0 == 0 {
            bail!("rank_user = {user} is root: give an unprivileged user");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.data_dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if mode & 0o001 == 0 {
            bail!(
                "rank_user = {user}: the data dir {} (mode {:o}) is not traversable by other users, and ranks read their plans and write their scratch in it; chmod o+x it",
                self.data_dir.display(),
                mode & 0o777
            );
        }
        Ok(Some(ids))
    }

    /// CPU ranks this node runs at once: `cpu_rank_slots`, or its cores.
    pub fn cpu_rank_slots(&self) -> u32 {
        self.cpu_rank_slots.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
    }

    /// Layers the file, the environment and `overrides` (flag values, by key).
    pub fn load(file: Option<&Path>, overrides: &[(&str, Option<String>)]) -> Result<Config> {
        Self::load_with(file, std::env::vars(), overrides)
    }

    /// [`Config::load`] with the environment given.
    fn load_with(
        file: Option<&Path>,
        vars: impl Iterator<Item = (String, String)>,
        overrides: &[(&str, Option<String>)],
    ) -> Result<Config> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            if !f.is_file() {
                bail!("config file {} does not exist", f.display());
            }
            b = b.add_source(config::File::from(f));
        }
        let env: std::collections::HashMap<String, String> = vars
            .filter(|(k, _)| {
                k.strip_prefix("FERRY_")
                    .map(|rest| rest.to_ascii_lowercase())
                    .is_some_and(|rest| {
                        KEYS.iter()
                            .any(|key| rest == *key || rest.starts_with(&format!("{key}__")))
                    })
            })
            .collect();
        b = b.add_source(
            config::Environment::with_prefix("FERRY")
                .prefix_separator("_")
                .separator("__")
                .source(Some(env)),
            // Values stay strings (a numeric token is a token, not a number); numeric
            // settings are parsed when they are read into their fields.
        );
        for (key, value) in overrides {
            if let Some(v) = value {
                b = b.set_override(*key, v.clone())?;
            }
        }
        let cfg: Config = b
            .build()
            .context("cannot read the configuration")?
            .try_deserialize()
            .context("invalid configuration (see docs/ferryd.example.yaml for the keys)")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as YAML, with its secrets (the API token, the etcd password)
    /// replaced by `<redacted>`: what `ferryd config` prints.
    pub fn to_redacted_yaml(&self) -> Result<String> {
        let mut c = self.clone();
        for secret in [&mut c.token, &mut c.etcd_password] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        Ok(serde_yaml_ng::to_string(&c)?)
    }

    fn validate(&self) -> Result<()> {
        if self.max_running_jobs == 0 {
            bail!("max_running_jobs must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            bail!("max_body_bytes must be at least 1024");
        }
        if !(self.finished_job_ttl_hours.is_finite() && self.finished_job_ttl_hours >= 0.0) {
            bail!(
                "finished_job_ttl_hours must be 0 (no limit) or a positive number of hours, got {}",
                self.finished_job_ttl_hours
            );
        }
        if self.data_plane_ip.parse::<std::net::IpAddr>().is_err() {
            bail!(
                "data_plane_ip must be an IP address, got `{}`",
                self.data_plane_ip
            );
        }
        if self.collective_timeout_ms < 100 {
            bail!("collective_timeout_ms must be at least 100");
        }
        if self.node_ttl_ms < 2000 {
            bail!("node_ttl_ms must be at least 2000 (etcd's smallest lease TTL is 2 s)");
        }
        if !matches!(self.role.as_str(), "worker" | "teacher") {
            bail!("role must be `worker` or `teacher`, got `{}`", self.role);
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            bail!("etcd_cert and etcd_key go together: set both or neither");
        }
        if let Some(c) = &self.cluster {
            if c.is_empty()
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                bail!("cluster must be a name of letters, digits, `-`, `_` and `.`, got `{c}`");
            }
        }
        if !matches!(self.rank_sandbox.as_str(), "auto" | "landlock" | "off") {
            bail!("rank_sandbox must be `auto`, `landlock` or `off`");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!("log_format must be `text` or `json`");
        }
        if self.token.as_deref().is_some_and(|t| t.len() < 16) {
            bail!(
                "token must be at least 16 characters (generate one with `openssl rand -hex 32`)"
            );
        }
        Ok(())
    }

    /// The store prefix of this node's cluster.
    pub fn cluster_prefix(&self) -> String {
        let base = self.store_prefix.trim_end_matches('/');
        match &self.cluster {
            Some(c) => format!("{base}/{c}"),
            None => base.to_string(),
        }
    }

    /// The lease TTL of this node's registration.
    pub fn node_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.node_ttl_ms)
    }

    /// Intra-op threads for a rank.
    pub fn threads(&self) -> u32 {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_take_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ferryd.yaml");
        std::fs::write(
            &f,
            "listen: 127.0.0.1:9000\nmax_running_jobs: 3\nroots:\n  data: /srv/data\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            &[
                ("listen", Some("127.0.0.1:9100".into())),
                ("data_dir", None),
            ],
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9100");
        assert_eq!(c.max_running_jobs, 3);
        assert_eq!(c.roots.data.as_deref(), Some(Path::new("/srv/data")));
        assert_eq!(c.data_dir, PathBuf::from(".ferry"));
    }

    #[test]
    fn variables_stay_strings_unless_the_setting_is_a_number() {
        let token = "12345678901234567890123";
        let vars = [
            ("FERRY_TOKEN", token),
            ("FERRY_MAX_RUNNING_JOBS", "4"),
            ("FERRY_NODE_TTL_MS", "3000"),
            ("FERRY_ROOTS__DATA", "/srv/data"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load_with(None, vars.into_iter(), &[]).unwrap();
        assert_eq!(c.token.as_deref(), Some(token));
        assert_eq!((c.max_running_jobs, c.node_ttl_ms), (4, 3000));
        assert_eq!(c.roots.data.as_deref(), Some(Path::new("/srv/data")));
        let bad = [("FERRY_MAX_RUNNING_JOBS".to_string(), "four".to_string())];
        assert!(Config::load_with(None, bad.into_iter(), &[]).is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "lisen: 1\n").unwrap();
        assert!(format!("{:#}", Config::load(Some(&f), &[]).unwrap_err()).contains("lisen"));
        std::fs::write(&f, "token: short\n").unwrap();
        assert!(Config::load(Some(&f), &[])
            .unwrap_err()
            .to_string()
            .contains("16"));
    }

    #[test]
    fn misspelt_variables_are_named_with_the_setting_they_resemble() {
        let vars = [
            ("FERRY_MAX_RUNING_JOBS", "3"),
            ("FERRY_ROOTS__DATA", "/srv"),
            ("FERRY_LOG", "debug"),
            ("FERRY_SERVER", "http://x"),
            ("FERRY_RING_SHM", "0"),
            ("FERRY_WHATEVER_ELSE_ENTIRELY", "1"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let w = unknown_variables(vars.into_iter());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("FERRY_MAX_RUNING_JOBS is not a ferryd setting"),
            "{w:?}"
        );
        assert!(
            w[0].contains("did you mean FERRY_MAX_RUNNING_JOBS?"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("FERRY_WHATEVER_ELSE_ENTIRELY") && !w[1].contains("did you mean"),
            "{w:?}"
        );
    }

    #[test]
    fn the_printed_configuration_hides_its_secrets() {
        let vars = [
            ("FERRY_TOKEN", "s3cret-0123456789abcdef"),
            ("FERRY_ETCD_PASSWORD", "hunter2"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load_with(None, vars.into_iter(), &[]).unwrap();
        let y = c.to_redacted_yaml().unwrap();
        assert!(!y.contains("s3cret") && !y.contains("hunter2"), "{y}");
        assert!(
            y.contains("token: <redacted>") && y.contains("max_running_jobs:"),
            "{y}"
        );
    }
}
