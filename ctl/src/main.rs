//! `ferryctl`: submit, follow and cancel ferry jobs. Talks to ferryd's REST API only
//! (no libtorch here: it installs on a laptop).

mod client;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use client::{failure, segment, Client, Failure};
use ferry_cluster::api::{EventKind, EventPage, JobPhase, NodeList};

/// Jobs as ferryctl reads them: the spec kept verbatim, so this ferryctl also reads jobs of
/// a newer daemon whose specs use fields it does not know.
type Job = ferry_cluster::api::Job<serde_json::Value>;
type JobList = ferry_cluster::api::JobList<serde_json::Value>;

// Exit statuses (docs/cli.md). 0: done (for `submit --wait` and `logs -f`: the job succeeded).
/// The job failed (`submit --wait`, `logs -f`), or ferryctl itself did.
const EXIT_FAILED: i32 = 1;
/// A usage error: bad arguments (clap's own status), or a spec file that cannot be read.
const EXIT_USAGE: i32 = 2;
/// The job was cancelled.
const EXIT_CANCELLED: i32 = 3;
/// ferryd could not be reached or did not answer in time (for a followed job: for
/// `--reattach-timeout`).
const EXIT_UNREACHABLE: i32 = 4;
/// ferryd refused the request (a bad spec, an unknown job, a missing token).
const EXIT_REJECTED: i32 = 5;

/// Drive ferry: submit fine-tuning jobs, follow them, cancel them.
#[derive(Parser)]
#[command(name = "ferryctl", version, about)]
struct Cli {
    /// ferryd's REST address.
    #[arg(
        long,
        global = true,
        env = "FERRY_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// Bearer token, if ferryd requires one.
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Tables without their header line.
    #[arg(long, global = true)]
    no_headers: bool,
    /// While following a job (`submit --wait`, `logs -f`): how long to keep trying to reach
    /// ferryd again when it goes away (a restart, a network blip), in seconds; the job goes
    /// on meanwhile.
    #[arg(long, global = true, default_value_t = 600)]
    reattach_timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
    /// Ids only (node names for `nodes`), one per line, for scripts.
    Name,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job spec (YAML or JSON).
    Submit {
        file: PathBuf,
        /// Follow the job with a progress bar until it ends; exit 0 if it succeeds, 1 if it
        /// fails, 3 if it is cancelled (docs/cli.md lists every status).
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, or show one (by id or name).
    Get {
        job: Option<String>,
        /// Only jobs in this phase (Pending, Running, Succeeded, Failed, Cancelled).
        #[arg(long)]
        phase: Option<String>,
        /// At most this many jobs (the oldest first).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Cancel a job.
    Cancel { job: String },
    /// Delete a job that has ended, with its events (its outputs stay on disk).
    Delete { job: String },
    /// Print a job's events; -f follows until the job ends.
    Logs {
        job: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// List the nodes of the cluster.
    Nodes,
    /// Print this ferryctl's version and the server's.
    Version,
    /// Print a shell completion script: `source <(ferryctl completion bash)`.
    Completion { shell: clap_complete::Shell },
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferryctl: {e:#}");
            let code = match failure(&e) {
                Some(Failure::Unreachable) => EXIT_UNREACHABLE,
                Some(Failure::Rejected) => EXIT_REJECTED,
                None if e.downcast_ref::<Usage>().is_some() => EXIT_USAGE,
                None => EXIT_FAILED,
            };
            std::process::exit(code);
        }
    }
}

/// A usage error found after parsing (a spec file that cannot be read).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Calls `f` until it succeeds, fails for another reason than an unreachable ferryd, or
/// ferryd stays unreachable for `timeout`: waiting 0.5 s, then twice as long each time (at
/// most 10 s), and saying so on stderr.
fn reattaching<T>(c: &Client, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut since: Option<std::time::Instant> = None;
    let mut pause = Duration::from_millis(500);
    loop {
        match f() {
            Ok(v) => {
                if since.is_some() {
                    eprintln!(
                        "ferryctl: reached ferryd at {} again; following on",
                        c.base()
                    );
                }
                return Ok(v);
            }
            Err(e) if failure(&e) == Some(Failure::Unreachable) => {
                let start = *since.get_or_insert_with(std::time::Instant::now);
                if start.elapsed() >= timeout {
                    return Err(e.context(format!(
                        "gave up after {} s (--reattach-timeout); the job itself goes on",
                        timeout.as_secs()
                    )));
                }
                eprintln!(
                    "ferryctl: lost ferryd ({e:#}); trying again in {:.1} s, for up to {} s more",
                    pause.as_secs_f64(),
                    timeout.saturating_sub(start.elapsed()).as_secs()
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    output::NO_HEADERS.store(cli.no_headers, std::sync::atomic::Ordering::Relaxed);
    let c = Client::new(&cli.server, cli.token.clone());
    let fmt = cli.output;
    let reattach = Duration::from_secs(cli.reattach_timeout);
    match cli.command {
        Cmd::Submit { file, wait } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Usage(format!("cannot read job spec {}: {e}", file.display())))?;
            let ct = if file.extension().is_some_and(|e| e == "json") {
                "application/json"
            } else {
                "application/yaml"
            };
            let job: Job = c.post("/v1/jobs", ct, &text)?;
            if !wait {
                output::job(&job, fmt)?;
                return Ok(0);
            }
            if fmt == Format::Table {
                eprintln!("job {} ({}) submitted", job.id, job.name);
            }
            let end = follow(&c, &job.id, reattach)?;
            if fmt != Format::Table {
                output::job(&end, fmt)?;
            }
            Ok(exit_code(&end))
        }
        Cmd::Get { job: Some(j), .. } => {
            let job: Job = c.get(&format!("/v1/jobs/{}", segment(&j)))?;
            output::job(&job, fmt)?;
            Ok(0)
        }
        Cmd::Get {
            job: None,
            phase,
            limit,
        } => {
            // A page at a time, until `limit` jobs or the last page.
            let mut list = JobList {
                jobs: Vec::new(),
                cont: None,
            };
            let mut token: Option<String> = None;
            loop {
                let want = limit.map_or(1000, |l| (l - list.jobs.len()).min(1000));
                let mut path = format!("/v1/jobs?limit={want}");
                if let Some(p) = &phase {
                    path.push_str(&format!("&phase={}", segment(p)));
                }
                if let Some(t) = &token {
                    path.push_str(&format!("&continue={}", segment(t)));
                }
                let page: JobList = c.get(&path)?;
                list.jobs.extend(page.jobs);
                token = page.cont;
                if token.is_none() || limit.is_some_and(|l| list.jobs.len() >= l) {
                    break;
                }
            }
            output::jobs(&list, fmt)?;
            Ok(0)
        }
        Cmd::Cancel { job } => {
            let job: Job = c.post(
                &format!("/v1/jobs/{}/cancel", segment(&job)),
                "application/json",
                "",
            )?;
            if fmt == Format::Table {
                println!(
                    "job {} ({}): {}",
                    job.id,
                    job.name,
                    if job.phase == JobPhase::Cancelled {
                        "cancelled"
                    } else {
                        "cancel requested"
                    }
                );
            } else {
                output::job(&job, fmt)?;
            }
            Ok(0)
        }
        Cmd::Delete { job } => {
            let job: Job = c.delete(&format!("/v1/jobs/{}", segment(&job)))?;
            if fmt == Format::Table {
                println!("job {} ({}) deleted", job.id, job.name);
            } else {
                output::job(&job, fmt)?;
            }
            Ok(0)
        }
        Cmd::Logs { job, follow: f } => {
            let mut after = 0;
            loop {
                let wait = if f { 20 } else { 0 };
                let path = format!(
                    "/v1/jobs/{}/events?after={after}&wait={wait}",
                    segment(&job)
                );
                let page: EventPage = if f {
                    reattaching(&c, reattach, || c.get(&path))?
                } else {
                    c.get(&path)?
                };
                for e in &page.events {
                    output::event(e, fmt)?;
                }
                after = page.next;
                let done = page.phase.is_terminal() && page.events.is_empty();
                // Without -f: every page there is, then stop.
                if !f && !page.events.is_empty() {
                    continue;
                }
                if !f || done {
                    if f {
                        let path = format!("/v1/jobs/{}", segment(&job));
                        let j: Job = reattaching(&c, reattach, || c.get(&path))?;
                        return Ok(exit_code(&j));
                    }
                    return Ok(0);
                }
            }
        }
        Cmd::Nodes => {
            let nodes: NodeList = c.get("/v1/nodes")?;
            output::nodes(&nodes, fmt)?;
            Ok(0)
        }
        Cmd::Version => {
            println!("client: {}", env!("CARGO_PKG_VERSION"));
            let doc: serde_json::Value = c.get("/openapi.json")?;
            let server = doc["info"]["version"].as_str().unwrap_or("unknown");
            println!("server: {server} ({})", c.base());
            Ok(0)
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "ferryctl", &mut std::io::stdout());
            Ok(0)
        }
    }
}

fn exit_code(job: &Job) -> i32 {
    match job.phase {
        JobPhase::Failed => EXIT_FAILED,
        JobPhase::Cancelled => EXIT_CANCELLED,
        _ => 0,
    }
}

/// Follows a job until it ends: a progress bar on a terminal, event lines otherwise.
/// When ferryd goes away meanwhile, it tries again for `reattach` and then goes on.
fn follow(c: &Client, id: &str, reattach: Duration) -> Result<Job> {
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let say = |line: String| {
        if tty {
            bar.println(line)
        } else {
            eprintln!("{line}")
        }
    };
    let mut after = 0;
    loop {
        let path = format!("/v1/jobs/{}/events?after={after}&wait=10", segment(id));
        let page: EventPage = reattaching(c, reattach, || c.get(&path))?;
        for e in &page.events {
            // Progress shows in the bar; checkpoints are in `ferryctl logs`.
            if !matches!(e.kind, EventKind::Progress | EventKind::Checkpoint) {
                say(format!("{}  {}", output::short_time(&e.time), e.message));
            }
        }
        after = page.next;
        let path = format!("/v1/jobs/{}", segment(id));
        let job: Job = reattaching(c, reattach, || c.get(&path))?;
        let s = &job.status;
        bar.set_length(s.total_steps.max(1));
        bar.set_position(s.step);
        bar.set_message(format!(
            "epoch {}/{}  loss {}  val acc {}  {}",
            s.epoch,
            s.total_epochs,
            s.train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            s.val_accuracy
                .map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
            s.samples_per_sec
                .map_or(String::new(), |v| format!("{v:.0} samples/s")),
        ));
        if job.phase.is_terminal() && page.events.is_empty() {
            bar.finish_and_clear();
            let summary = match job.phase {
                JobPhase::Succeeded => format!(
                    "job {} ({}) Succeeded: val accuracy {}, output in {}",
                    job.id,
                    job.name,
                    s.val_accuracy
                        .map_or("n/a".into(), |a| format!("{:.2}%", a * 100.0)),
                    s.output_dir.as_deref().unwrap_or("?")
                ),
                JobPhase::Failed => format!(
                    "job {} ({}) Failed: {}",
                    job.id,
                    job.name,
                    s.failure.as_deref().unwrap_or("no reason recorded")
                ),
                p => format!("job {} ({}) {}", job.id, job.name, p.as_str()),
            };
            eprintln!("{summary}");
            return Ok(job);
        }
    }
}
