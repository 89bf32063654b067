//! `ferryctl`: submit, follow and cancel ferry jobs. Talks to ferryd's REST API only
//! (no libtorch here: it installs on a laptop).

mod client;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use client::{segment, Client};
use ferry_cluster::api::{EventKind, EventPage, JobPhase, NodeList};

/// Jobs as ferryctl reads them: the spec kept verbatim, so this ferryctl also reads jobs of
/// a newer daemon whose specs use fields it does not know.
type Job = ferry_cluster::api::Job<serde_json::Value>;
type JobList = ferry_cluster::api::JobList<serde_json::Value>;

/// Exit status of `submit --wait` and `logs -f` when the job failed.
const EXIT_FAILED: i32 = 1;
/// Exit status when the job was cancelled.
const EXIT_CANCELLED: i32 = 2;

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
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job spec (YAML or JSON).
    Submit {
        file: PathBuf,
        /// Follow the job with a progress bar until it ends; exit 1 if it fails, 2 if cancelled.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, or show one (by id or name).
    Get { job: Option<String> },
    /// Cancel a job.
    Cancel { job: String },
    /// Print a job's events; -f follows until the job ends.
    Logs {
        job: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// List the nodes of the cluster.
    Nodes,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferryctl: {e:#}");
            std::process::exit(EXIT_FAILED);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let c = Client::new(&cli.server, cli.token.clone());
    let fmt = cli.output;
    match cli.command {
        Cmd::Submit { file, wait } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read job spec {}", file.display()))?;
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
            let end = follow(&c, &job.id)?;
            if fmt != Format::Table {
                output::job(&end, fmt)?;
            }
            Ok(exit_code(&end))
        }
        Cmd::Get { job: Some(j) } => {
            let job: Job = c.get(&format!("/v1/jobs/{}", segment(&j)))?;
            output::job(&job, fmt)?;
            Ok(0)
        }
        Cmd::Get { job: None } => {
            let list: JobList = c.get("/v1/jobs")?;
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
        Cmd::Logs { job, follow: f } => {
            let mut after = 0;
            loop {
                let wait = if f { 20 } else { 0 };
                let page: EventPage = c.get(&format!(
                    "/v1/jobs/{}/events?after={after}&wait={wait}",
                    segment(&job)
                ))?;
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
                        let j: Job = c.get(&format!("/v1/jobs/{}", segment(&job)))?;
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
fn follow(c: &Client, id: &str) -> Result<Job> {
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
        let page: EventPage = c.get(&format!(
            "/v1/jobs/{}/events?after={after}&wait=10",
            segment(id)
        ))?;
        for e in &page.events {
            // Progress shows in the bar; checkpoints are in `ferryctl logs`.
            if !matches!(e.kind, EventKind::Progress | EventKind::Checkpoint) {
                say(format!("{}  {}", output::short_time(&e.time), e.message));
            }
        }
        after = page.next;
        let job: Job = c.get(&format!("/v1/jobs/{}", segment(id)))?;
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
