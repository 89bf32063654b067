//! The Helm chart (`charts/ferry`), checked offline and then run.
//!
//! No Kubernetes API server can run here, but Helm can (helm-python-sdk, in `.venv-chart`):
//! `tests/chart/check_chart.py check` renders the chart with several value sets, lints it
//! strictly, validates every manifest against the Kubernetes schemas, runs checkov and checks
//! that the values schema refuses wrong keys and types. Then the rendered worker pods are
//! *run*: etcd and two `ferryd` processes start from exactly the rendered config file,
//! command, arguments and environment (only what Kubernetes would fill in is filled in here:
//! the pod's name and IP, the token from its Secret, and each volume's mount point mapped to
//! a directory), a real Prometheus scrapes them with the chart's alert rules loaded, and a
//! distillation job with a rank killed half-way runs. Every dashboard panel's query and every
//! alert rule's query must then return data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_cluster::api::JobPhase;
use ferry_tests::etcd::Etcd;
use ferry_tests::{bin, fixtures, free_port, kill9, workspace, Daemon, Launch};
use serde_json::Value;

fn check_chart(args: &[&str]) -> std::process::Output {
    let python = workspace().join(".venv-chart/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh (it installs the chart checks' venv)",
        python.display()
    );
    Command::new(python)
        .arg(workspace().join("tests/chart/check_chart.py"))
        .args(args)
        .output()
        .expect("run check_chart.py")
}

#[test]
fn the_chart_lints_validates_and_passes_its_security_scan() {
    let out = check_chart(&["check"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "check_chart.py check failed:\n{text}");
}

/// A rendered pod template turned into a `ferryd` command line on this machine: the pod's
/// name and IP, the token, and each config path's volume mapped to a directory.
fn launch_pod(
    pod: &Value,
    name: &str,
    ip: &str,
    token: &str,
    dirs: &[(&str, PathBuf)],
    home: &Path,
) -> Launch {
    // Mount points, longest first, each mapped to a directory here.
    let mut map: Vec<(String, PathBuf)> = Vec::new();
    for p in pod["config_paths"].as_array().expect("config_paths") {
        let key = p["key"].as_str().expect("key");
        let dir = dirs
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no directory for the chart's {key}"))
            .1
            .clone();
        std::fs::create_dir_all(&dir).expect("mount dir");
        map.push((p["path"].as_str().expect("path").to_string(), dir));
    }
    let config_path = pod["config_path"].as_str().expect("config_path");
    let config_dir = Path::new(config_path).parent().expect("config dir");
    let here = home.join("config");
    std::fs::create_dir_all(&here).expect("config dir");
    map.push((config_dir.display().to_string(), here));
    map.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let subst = |s: &str| {
        let mut s = s.replace("0.0.0.0:", &format!("{ip}:"));
        for (from, to) in &map {
            s = s.replace(from.as_str(), to.to_str().expect("utf-8"));
        }
        s
    };
    let config = subst(pod["config"].as_str().expect("config"));
    std::fs::write(subst(config_path), &config).expect("write config");
    let command: Vec<String> = pod["command"]
        .as_array()
        .expect("command")
        .iter()
        .chain(pod["args"].as_array().expect("args"))
        .map(|v| subst(v.as_str().expect("string")))
        .collect();
    assert_eq!(command[0], "ferryd", "the chart runs ferryd: {command:?}");
    let mut env = Vec::new();
    for e in pod["env"].as_array().expect("env") {
        let key = e["name"].as_str().expect("name").to_string();
        let value = if let Some(v) = e.get("value") {
            subst(v.as_str().expect("value"))
        } else if let Some(f) = e.get("fieldRef") {
            match f.as_str().expect("fieldRef") {
                "status.podIP" => ip.to_string(),
                "metadata.name" => name.to_string(),
                other => panic!("the test cannot fill in fieldRef {other}"),
            }
        } else if e.get("secret").is_some() && key == "FERRY_TOKEN" {
            token.to_string()
        } else {
            panic!("the test cannot fill in {e}");
        };
        env.push((key, value));
    }
    Launch {
        program: bin("ferryd"),
        args: command[1..].to_vec(),
        env,
    }
}

/// A Prometheus on loopback scraping `targets` every second, with `rules` loaded.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String], token: &str, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token).expect("token file");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n\
             - job_name: ferry\n  \
               authorization: {{credentials_file: {}}}\n  \
               static_configs: [{{targets: [{}]}}]\n",
            token_file.display(),
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&p.url("/-/ready")).call().is_err() {
            assert!(Instant::now() < deadline, "prometheus did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// An instant query: Ok(number of series) or Err(Prometheus's error).
    fn query(&self, q: &str) -> Result<usize, String> {
        let r = ureq::get(&self.url("/api/v1/query"))
            .query("query", q)
            .call();
        let body: Value = match r {
            Ok(r) => r.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(_, r)) => r.into_json().map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        if body["status"] != "success" {
            return Err(body["error"].to_string());
        }
        Ok(body["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = c.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rendered_pods_run_a_job_and_every_dashboard_query_returns_data() {
    let etcd = Etcd::new();
    let overrides = serde_json::json!({
        "etcd": {"external": {"endpoints": [etcd.endpoint()]}},
        "workers": {"replicas": 2},
    });
    let out = check_chart(&["render", "--set-json", &overrides.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: Value = serde_json::from_slice(&out.stdout).expect("render output");
    let token = rendered["token"]
        .as_str()
        .expect("generated token")
        .to_string();
    let pod = rendered["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["role"] == "worker")
        .expect("a worker pod template")
        .clone();
    assert_eq!(pod["replicas"], 2);
    let port = pod["port"].as_u64().expect("port") as u16;
    let shared = tempfile::tempdir().expect("outputs");
    let nodes: Vec<Daemon> = (0..2)
        .map(|i| {
            let name = format!("{}-{i}", pod["name"].as_str().expect("name"));
            let ip = format!("127.0.0.{}", 81 + i);
            let home = tempfile::tempdir().expect("pod dir");
            let dirs = [
                ("data_dir", home.path().join("state")),
                ("roots.data", fixtures().join("data")),
                ("roots.models", fixtures().join("models")),
                ("roots.outputs", shared.path().to_path_buf()),
            ];
            let launch = launch_pod(&pod, &name, &ip, &token, &dirs, home.path());
            Daemon::start_as(launch, &ip, port, &token, home)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = nodes[0].get("/v1/nodes");
        if body["nodes"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pods did not both register: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rules = check_chart(&["alerts"]);
    let rules = String::from_utf8_lossy(&rules.stdout).trim().to_string();
    let check = Command::new("promtool")
        .args(["check", "rules", &rules])
        .output()
        .expect("promtool");
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let targets: Vec<String> = (0..2)
        .map(|i| format!("127.0.0.{}:{port}", 81 + i))
        .collect();
    let prom = Prometheus::start(&targets, &token, &rules);

    // Distillation on two nodes (the teacher beside rank 0), checkpoints, and one rank killed
    // half-way: every row of the dashboard has something to show.
    let spec = "name: watched\nmodel: {arch: torchscript, path: mlp.pt}\n\
         data: {train: {path: few.safetensors}, unlabelled: {path: pool.safetensors}, val: {path: val}, channels: 1}\n\
         train: {epochs: 60, batch_size: 8, seed: 5, checkpoint_every_steps: 20, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}\n\
         resources: {ranks: 2, nodes: 2, threads: 1}\nrestart: {max_restarts: 2}\n\
         distill:\n  teacher: {arch: torchscript, path: teacher4.pt, replicas: 1, threads: 1}\n  temperature: 2.0\n  alpha: 0.5\n  top_k: 2\n\
         output: {dir: watched}\n";
    let job = nodes[0].submit(spec);
    let first = nodes[0].wait_for(&job.id, Duration::from_secs(120), "a checkpoint", |j| {
        j.status.checkpoint.is_some()
    });
    // Rank 1 runs on the other node (each node's ranks report their pids in events).
    assert_ne!(first.placement[0].node, first.placement[1].node);
    let pid = ferry_tests::rank_pid(&nodes[0], &job.id, 1);
    kill9(pid);
    let again = nodes[0].wait_for(
        &job.id,
        Duration::from_secs(120),
        "generation 2 training",
        |j| j.generation >= 2 && j.status.step > first.status.step + 5,
    );
    assert_eq!(again.phase, JobPhase::Running, "{:?}", again.status);
    // Enough scrapes for rates over a few samples.
    std::thread::sleep(Duration::from_secs(6));
    for n in &nodes {
        promtool_check_metrics(&n.metrics());
    }

    let queries = check_chart(&["queries"]);
    let queries: Vec<Value> = serde_json::from_slice(&queries.stdout).expect("queries");
    assert!(queries.len() > 20, "{queries:?}");
    let mut empty = Vec::new();
    for q in &queries {
        // An alert is checked on its query without the comparison: it must return data
        // (that it fires only past its threshold is the point of the threshold).
        let expr = q.get("query").unwrap_or(&q["expr"]).as_str().expect("expr");
        let what = format!(
            "{} {}: {expr}",
            q["source"].as_str().unwrap_or(""),
            q.get("panel")
                .or(q.get("alert"))
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        match prom.query(expr) {
            Ok(0) => empty.push(format!("no data: {what}")),
            Ok(_) => {}
            Err(e) => empty.push(format!("refused ({e}): {what}")),
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} queries:\n{}",
        empty.len(),
        queries.len(),
        empty.join("\n")
    );
    // The rules loaded and evaluate without errors.
    let rules: Value = ureq::get(&prom.url("/api/v1/rules"))
        .call()
        .expect("rules")
        .into_json()
        .expect("json");
    let groups = rules["data"]["groups"].as_array().expect("groups");
    let all: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(all.len() >= 5, "{rules}");
    for r in all {
        assert_eq!(r["health"], "ok", "{r}");
    }

    let end = nodes[0].wait_terminal(&job.id, Duration::from_secs(240));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    for n in &nodes {
        promtool_check_metrics(&n.metrics());
    }
    // Kubernetes stops a pod with SIGTERM: ferryd stops as on Ctrl-C.
    let mut nodes = nodes;
    let status = nodes[1].terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        nodes[1].log()
    );
    assert!(
        nodes[1].log().contains("ferryd stopped"),
        "{}",
        nodes[1].log()
    );
}
