//! Tables for people, JSON and YAML for programs.

use anyhow::Result;
use ferry_cluster::api::{JobEvent, NodeList};

use crate::{Job, JobList};
use serde::Serialize;

use crate::Format;

/// `--no-headers`: tables without their header line.
pub static NO_HEADERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn structured<T: Serialize>(v: &T, fmt: Format) -> Result<bool> {
    match fmt {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(v)?),
        Format::Table | Format::Name => return Ok(false),
    }
    Ok(true)
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    if !NO_HEADERS.load(std::sync::atomic::Ordering::Relaxed) {
        line(header.iter().map(|s| s.to_string()).collect());
    }
    for r in rows {
        line(r);
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

/// `HH:MM:SS` of an RFC 3339 time.
pub fn short_time(t: &str) -> &str {
    t.get(11..19).unwrap_or(t)
}

/// A list of jobs.
pub fn jobs(list: &JobList, fmt: Format) -> Result<()> {
    if structured(list, fmt)? {
        return Ok(());
    }
    if fmt == Format::Name {
        list.jobs.iter().for_each(|j| println!("{}", j.id));
        return Ok(());
    }
    let rows = list
        .jobs
        .iter()
        .map(|j| {
            let s = &j.status;
            vec![
                j.id.clone(),
                j.name.clone(),
                j.phase.as_str().into(),
                format!("{}/{}", s.epoch, s.total_epochs),
                format!("{}/{}", s.step, s.total_steps),
                opt(s.train_loss, |l| format!("{l:.4}")),
                opt(s.val_accuracy, |a| format!("{:.2}%", a * 100.0)),
                opt(s.samples_per_sec, |v| format!("{v:.0}")),
                j.created_at
                    .get(..19)
                    .unwrap_or(&j.created_at)
                    .replace('T', " "),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "PHASE",
            "EPOCH",
            "STEP",
            "LOSS",
            "VAL-ACC",
            "SAMPLES/S",
            "CREATED",
        ],
        rows,
    );
    Ok(())
}

/// One job, in detail.
pub fn job(j: &Job, fmt: Format) -> Result<()> {
    if structured(j, fmt)? {
        return Ok(());
    }
    if fmt == Format::Name {
        println!("{}", j.id);
        return Ok(());
    }
    let s = &j.status;
    let mut rows = vec![
        ("id", j.id.clone()),
        ("name", j.name.clone()),
        ("phase", j.phase.as_str().into()),
        ("node", j.node.clone().unwrap_or_default()),
        ("created", j.created_at.clone()),
        ("epoch", format!("{}/{}", s.epoch, s.total_epochs)),
        ("step", format!("{}/{}", s.step, s.total_steps)),
        ("train loss", opt(s.train_loss, |l| format!("{l:.4}"))),
        (
            "val accuracy",
            opt(s.val_accuracy, |a| format!("{:.2}%", a * 100.0)),
        ),
        ("samples/s", opt(s.samples_per_sec, |v| format!("{v:.1}"))),
        ("attempts", s.attempts.to_string()),
    ];
    for (k, v) in [
        ("started", &s.started_at),
        ("finished", &s.finished_at),
        ("checkpoint", &s.checkpoint),
        ("output", &s.output_dir),
        ("failure", &s.failure),
    ] {
        if let Some(v) = v {
            rows.push((k, v.clone()));
        }
    }
    for (k, v) in rows {
        println!("{:<14}{v}", format!("{k}:"));
    }
    Ok(())
}

/// One event line.
pub fn event(e: &JobEvent, fmt: Format) -> Result<()> {
    match fmt {
        Format::Json => println!("{}", serde_json::to_string(e)?),
        Format::Yaml => print!("---\n{}", serde_yaml::to_string(e)?),
        Format::Table | Format::Name => println!(
            "{}  {:<10}  {}",
            e.time,
            format!("{:?}", e.kind).to_lowercase(),
            e.message
        ),
    }
    Ok(())
}

/// The nodes.
pub fn nodes(list: &NodeList, fmt: Format) -> Result<()> {
    if structured(list, fmt)? {
        return Ok(());
    }
    if fmt == Format::Name {
        list.nodes.iter().for_each(|n| println!("{}", n.name));
        return Ok(());
    }
    let rows = list
        .nodes
        .iter()
        .map(|n| {
            let coordinates = list.coordinator.as_deref() == Some(n.name.as_str());
            vec![
                if coordinates {
                    format!("{} *", n.name)
                } else {
                    n.name.clone()
                },
                n.role.clone(),
                n.mode.clone(),
                n.address.clone(),
                n.cpus.to_string(),
                n.cuda_devices.to_string(),
                n.running_jobs.len().to_string(),
                n.version.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ROLE", "MODE", "ADDRESS", "CPUS", "GPUS", "RUNNING", "VERSION",
        ],
        rows,
    );
    if list.coordinator.is_some() {
        println!("* coordinates the cluster");
    }
    Ok(())
}
