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
use ferry_cluster::api::{EventKind, EventPage, JobPhase, JobSummaryList, NodeList};

/// Jobs as ferryctl reads them: the spec kept verbatim, so this ferryctl also reads jobs of
/// a newer daemon whose specs use fields it does not know.
type Job = ferry_cluster::api::Job<serde_json::Value>;
type JobList = ferry_cluster::api::JobList<serde_json::Value>;
type DryRun = ferry_cluster::api::DryRun<serde_json::Value>;

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
    /// Output format: table, wide (a table with more columns), json, yaml, name (ids only),
    /// or jsonpath=TEMPLATE (kubectl's: `jsonpath={.status.step}`, `jsonpath={.jobs[*].id}`).
    #[arg(short, long, global = true, value_parser = parse_format, default_value = "table")]
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    /// A table with more columns.
    Wide,
    Json,
    Yaml,
    /// Ids only (node names for `nodes`), one per line, for scripts.
    Name,
    /// A kubectl-style JSONPath template over the JSON form.
    JsonPath(String),
}

impl Format {
    /// Whether the output is a table (which reads job summaries, not whole records).
    fn is_table(&self) -> bool {
        matches!(self, Format::Table | Format::Wide | Format::Name)
    }
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Ok(match s {
        "table" => Format::Table,
        "wide" => Format::Wide,
        "json" => Format::Json,
        "yaml" => Format::Yaml,
        "name" => Format::Name,
        _ => match s.strip_prefix("jsonpath=") {
            Some(t) if !t.is_empty() => {
                output::jsonpath(&serde_json::Value::Null, t).map_err(|e| e.to_string())?;
                Format::JsonPath(t.to_string())
            }
            _ => {
                return Err(format!(
                    "`{s}` is not one of table, wide, json, yaml, name, jsonpath=TEMPLATE"
                ))
            }
        },
    })
}

/// Phases `wait --for` accepts: a phase, or `ended` (any of the last three).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WaitFor {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Ended,
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
        /// Check the spec (every check that can run before training) and submit nothing.
        #[arg(long)]
        dry_run: bool,
        /// The submission's Idempotency-Key [default: a new random one]: ferryctl retries
        /// an unanswered submit with it, and a scheduler passing its own may retry too,
        /// without making a second job.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Check a job spec without submitting it: every error, with its field, at once.
    Validate { file: PathBuf },
    /// List jobs, or show one (by id or name).
    Get {
        job: Option<String>,
        /// Only jobs in this phase (Pending, Running, Succeeded, Failed, Cancelled).
        #[arg(long)]
        phase: Option<String>,
        /// Only jobs with these labels: `k=v`, `k!=v`, `k`, `!k`, comma-separated.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// At most this many jobs (the oldest first).
        #[arg(long)]
        limit: Option<usize>,
        /// Watch: print the job (or each job of the list) again whenever it changes, until
        /// interrupted (a single job: until it ends).
        #[arg(short, long)]
        watch: bool,
    },
    /// A job in detail: status, placement, init report, metrics, the last events.
    Describe { job: String },
    /// Wait until a job reaches a phase; exit 0 then, 1 or 3 if it ends otherwise (failed,
    /// cancelled), 4 on timeout.
    Wait {
        job: String,
        /// The phase to wait for.
        #[arg(long = "for", value_enum, default_value_t = WaitFor::Ended)]
        phase: WaitFor,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
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
    let fmt = cli.output.clone();
    let reattach = Duration::from_secs(cli.reattach_timeout);
    match cli.command {
        Cmd::Submit {
            file,
            wait,
            dry_run,
            idempotency_key,
        } => {
            let (text, ct) = read_spec(&file)?;
            if dry_run {
                return validate(&c, &text, ct, &fmt);
            }
            // One key for this submission: a retry after a lost answer returns the job
            // the first attempt made, never a second one.
            let key = idempotency_key.unwrap_or_else(random_key);
            let job: Job = reattaching(&c, reattach, || {
                c.post_with("/v1/jobs", ct, &text, &[("Idempotency-Key", &key)])
            })?;
            if !wait {
                output::job(&job, &fmt)?;
                return Ok(0);
            }
            if fmt == Format::Table {
                eprintln!("job {} ({}) submitted", job.id, job.name);
            }
            let end = follow(&c, &job.id, reattach)?;
            if fmt != Format::Table {
                output::job(&end, &fmt)?;
            }
            Ok(exit_code(&end))
        }
        Cmd::Validate { file } => {
            let (text, ct) = read_spec(&file)?;
            validate(&c, &text, ct, &fmt)
        }
        Cmd::Get {
            job: Some(j),
            watch: true,
            ..
        } => {
            let path = format!("/v1/jobs/{}", segment(&j));
            let mut last = None;
            loop {
                let job: Job = reattaching(&c, reattach, || c.get(&path))?;
                if last != Some(job.revision) {
                    last = Some(job.revision);
                    output::job_line(&job, &fmt)?;
                }
                if job.phase.is_terminal() {
                    return Ok(0);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Cmd::Get { job: Some(j), .. } => {
            let job: Job = c.get(&format!("/v1/jobs/{}", segment(&j)))?;
            output::job(&job, &fmt)?;
            Ok(0)
        }
        Cmd::Get {
            job: None,
            phase,
            selector,
            limit,
            watch,
        } => {
            let mut query = String::new();
            if let Some(p) = &phase {
                query.push_str(&format!("&phase={}", segment(p)));
            }
            if let Some(l) = &selector {
                query.push_str(&format!("&labelSelector={}", segment(l)));
            }
            if !fmt.is_table() {
                let list: JobList = list_pages(&c, &query, limit)?;
                output::jobs(&list, &fmt)?;
                return Ok(0);
            }
            query.push_str("&view=summary");
            let mut seen: std::collections::HashMap<String, u64> = Default::default();
            let mut first = true;
            loop {
                let list: JobSummaryList = list_pages(&c, &query, limit)?;
                if !watch {
                    output::summaries(&list.jobs, &fmt, true)?;
                    return Ok(0);
                }
                // Watching: the rows that changed since the last look.
                let changed: Vec<_> = list
                    .jobs
                    .into_iter()
                    .filter(|j| seen.insert(j.id.clone(), j.revision) != Some(j.revision))
                    .collect();
                if first || !changed.is_empty() {
                    output::summaries(&changed, &fmt, first)?;
                    first = false;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Cmd::Describe { job } => {
            let j: Job = c.get(&format!("/v1/jobs/{}", segment(&job)))?;
            let queued_behind = match j.phase {
                JobPhase::Pending => Some(queued_ahead(&c, &j.id)?),
                _ => None,
            };
            let events: EventPage = c.get(&format!(
                "/v1/jobs/{}/events?after=0&limit=10000",
                segment(&j.id)
            ))?;
            output::describe(&j, &events.events, queued_behind, &fmt)?;
            Ok(0)
        }
        Cmd::Wait {
            job,
            phase,
            timeout,
        } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            let path = format!("/v1/jobs/{}", segment(&job));
            loop {
                let j: Job = reattaching(&c, reattach, || c.get(&path))?;
                let reached = match phase {
                    WaitFor::Ended => j.phase.is_terminal(),
                    WaitFor::Running => j.phase == JobPhase::Running,
                    WaitFor::Succeeded => j.phase == JobPhase::Succeeded,
                    WaitFor::Failed => j.phase == JobPhase::Failed,
                    WaitFor::Cancelled => j.phase == JobPhase::Cancelled,
                };
                if reached {
                    if fmt == Format::Table {
                        println!("job {} ({}) is {}", j.id, j.name, j.phase.as_str());
                    } else {
                        output::job(&j, &fmt)?;
                    }
                    return Ok(if phase == WaitFor::Ended {
                        exit_code(&j)
                    } else {
                        0
                    });
                }
                if j.phase.is_terminal() {
                    eprintln!(
                        "ferryctl: job {} ({}) ended {} and will not be {}",
                        j.id,
                        j.name,
                        j.phase.as_str(),
                        match phase {
                            WaitFor::Running => "Running",
                            WaitFor::Succeeded => "Succeeded",
                            WaitFor::Failed => "Failed",
                            WaitFor::Cancelled => "Cancelled",
                            WaitFor::Ended => "ended",
                        }
                    );
                    return Ok(match exit_code(&j) {
                        0 => EXIT_FAILED,
                        c => c,
                    });
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    eprintln!(
                        "ferryctl: job {} ({}) is still {} after {timeout} s (--timeout)",
                        j.id,
                        j.name,
                        j.phase.as_str()
                    );
                    return Ok(EXIT_UNREACHABLE);
                }
                std::thread::sleep(left.min(Duration::from_secs(2)));
            }
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
                output::job(&job, &fmt)?;
            }
            Ok(0)
        }
        Cmd::Delete { job } => {
            let job: Job = c.delete(&format!("/v1/jobs/{}", segment(&job)))?;
            if fmt == Format::Table {
                println!("job {} ({}) deleted", job.id, job.name);
            } else {
                output::job(&job, &fmt)?;
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
                    output::event(e, &fmt)?;
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
            output::nodes(&nodes, &fmt)?;
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

/// A spec file's text and media type.
fn read_spec(file: &std::path::Path) -> Result<(String, &'static str)> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Usage(format!("cannot read job spec {}: {e}", file.display())))?;
    let ct = if file.extension().is_some_and(|e| e == "json") {
        "application/json"
    } else {
        "application/yaml"
    };
    Ok((text, ct))
}

/// A dry run: 0 and the spec as it would run, or every error (exit 5).
fn validate(c: &Client, text: &str, ct: &str, fmt: &Format) -> Result<i32> {
    let checked: DryRun = c.post("/v1/jobs?dryRun=true", ct, text)?;
    if *fmt == Format::Table {
        let name = checked.spec["name"].as_str().unwrap_or("?");
        println!("job spec `{name}` is valid: every check before training passed (nothing was submitted)");
    } else {
        output::value(&serde_json::to_value(&checked)?, fmt)?;
    }
    Ok(0)
}

/// An Idempotency-Key no other submission has: 128 bits from the standard library's
/// per-process random hasher keys, the time and the process id.
fn random_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Every page of `GET /v1/jobs` with `query` (`&k=v...`), until `limit` jobs or the last
/// page, as one list.
fn list_pages<L: Paged>(c: &Client, query: &str, limit: Option<usize>) -> Result<L> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let want = limit.map_or(1000, |l| (l - all.len()).min(1000));
        let mut path = format!("/v1/jobs?limit={want}{query}");
        if let Some(t) = &token {
            path.push_str(&format!("&continue={}", segment(t)));
        }
        let (jobs, next) = c.get::<L>(&path)?.split();
        all.extend(jobs);
        token = next;
        if token.is_none() || limit.is_some_and(|l| all.len() >= l) {
            return Ok(L::of(all));
        }
    }
}

/// A page of `GET /v1/jobs`: its jobs and its `continue` token.
trait Paged: serde::de::DeserializeOwned {
    type Item;
    fn split(self) -> (Vec<Self::Item>, Option<String>);
    fn of(items: Vec<Self::Item>) -> Self;
}

impl Paged for JobList {
    type Item = Job;
    fn split(self) -> (Vec<Job>, Option<String>) {
        (self.jobs, self.cont)
    }
    fn of(jobs: Vec<Job>) -> Self {
        JobList { jobs, cont: None }
    }
}

impl Paged for JobSummaryList {
    type Item = ferry_cluster::api::JobSummary;
    fn split(self) -> (Vec<Self::Item>, Option<String>) {
        (self.jobs, self.cont)
    }
    fn of(jobs: Vec<Self::Item>) -> Self {
        JobSummaryList { jobs, cont: None }
    }
}

/// How many Pending jobs were submitted before `id` (the queue ahead of it).
fn queued_ahead(c: &Client, id: &str) -> Result<usize> {
    let pending: JobSummaryList = list_pages(c, "&phase=Pending&view=summary", None)?;
    Ok(pending.jobs.iter().filter(|p| p.id.as_str() < id).count())
}

fn exit_code(job: &Job) -> i32 {
    match job.phase {
        JobPhase::Failed => EXIT_FAILED,
        JobPhase::Cancelled => EXIT_CANCELLED,
        _ => 0,
    }
}

/// The bar's message for a `preparing` event: its message, and how far it is when the
/// total is known.
fn preparing_line(message: &str, p: &serde_json::Value) -> String {
    let done = p.get("done").and_then(serde_json::Value::as_u64);
    match (done, p.get("total").and_then(serde_json::Value::as_u64)) {
        (Some(d), Some(t)) if t > 0 => {
            format!("Preparing: {message} ({:.0}%)", d as f64 * 100.0 / t as f64)
        }
        _ => format!("Preparing: {message}"),
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
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps (ETA {eta})  {msg}",
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
    // Why the coordinator says the job waits (its newest "waiting" event).
    let mut waiting: Option<String> = None;
    // How the ranks' preparation (indexing the data) is going, before training starts.
    let mut preparing: Option<String> = None;
    loop {
        let path = format!("/v1/jobs/{}/events?after={after}&wait=10", segment(id));
        let page: EventPage = reattaching(c, reattach, || c.get(&path))?;
        for e in &page.events {
            if e.message.starts_with("waiting") {
                waiting = Some(e.message.clone());
            }
            if let Some(p) = e.data.get("preparing") {
                // Shown in the bar, not as lines: there may be many.
                preparing = Some(preparing_line(&e.message, p));
                continue;
            }
            // Progress shows in the bar; checkpoints are in `ferryctl logs`.
            if !matches!(e.kind, EventKind::Progress | EventKind::Checkpoint) {
                say(format!("{}  {}", output::short_time(&e.time), e.message));
            }
        }
        after = page.next;
        let path = format!("/v1/jobs/{}", segment(id));
        let job: Job = reattaching(c, reattach, || c.get(&path))?;
        let s = &job.status;
        if job.phase == JobPhase::Pending {
            // Not "0/1 steps": why it waits.
            let ahead = queued_ahead(c, &job.id).unwrap_or(0);
            let why = waiting.as_deref().unwrap_or("next to be placed");
            bar.set_message(match ahead {
                0 => format!("Pending: {why}"),
                n => format!(
                    "Pending: queued behind {n} job{} ({why})",
                    if n == 1 { "" } else { "s" }
                ),
            });
            continue;
        }
        if let (Some(p), 0) = (&preparing, s.total_steps) {
            if !job.phase.is_terminal() {
                // Not "0/1 steps" while the data is indexed.
                bar.set_message(p.clone());
                continue;
            }
        }
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
