//! Tables for people, JSON and YAML for programs.

use anyhow::Result;
use ferry_cluster::api::{EventKind, JobEvent, JobSummary, NodeList};

use crate::{Job, JobList};
use serde::Serialize;

use crate::Format;

/// `--no-headers`: tables without their header line.
pub static NO_HEADERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn structured<T: Serialize>(v: &T, fmt: &Format) -> Result<bool> {
    match fmt {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(v)?),
        Format::JsonPath(t) => println!("{}", jsonpath(&serde_json::to_value(v)?, t)?),
        Format::Table | Format::Wide | Format::Name => return Ok(false),
    }
    Ok(true)
}

/// A JSON document in a structured format (json, yaml, jsonpath); tables print it as JSON.
pub fn value(v: &serde_json::Value, fmt: &Format) -> Result<()> {
    if !structured(v, fmt)? {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

/// Fills a kubectl-style JSONPath template (`{.status.step}`, `{.jobs[*].id}`,
/// `{.jobs[0].name}`; text outside braces as it is, `\n` and `\t` escaped) from `doc`.
/// Several values of one expression are joined by spaces; strings print bare.
pub fn jsonpath(doc: &serde_json::Value, template: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open].replace("\\n", "\n").replace("\\t", "\t"));
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .ok_or_else(|| anyhow::anyhow!("jsonpath: `{{` at {open} is not closed"))?;
        let expr = rest[open + 1..close].trim();
        let values = select(doc, expr)?;
        let shown: Vec<String> = values
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .collect();
        out.push_str(&shown.join(" "));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        anyhow::bail!("jsonpath: a `}}` without its `{{`");
    }
    out.push_str(&rest.replace("\\n", "\n").replace("\\t", "\t"));
    Ok(out)
}

/// The values at a JSONPath expression: `.a.b`, `[N]`, `[*]`, `..` not supported.
fn select<'a>(doc: &'a serde_json::Value, expr: &str) -> Result<Vec<&'a serde_json::Value>> {
    let expr = expr.strip_prefix('$').unwrap_or(expr);
    let mut at = vec![doc];
    let mut rest = expr;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            if r.starts_with('.') {
                anyhow::bail!("jsonpath: `..` (recursive descent) is not supported in `{expr}`");
            }
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            if !key.is_empty() {
                at = at.into_iter().filter_map(|v| v.get(key)).collect();
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .ok_or_else(|| anyhow::anyhow!("jsonpath: `[` without `]` in `{expr}`"))?;
            let index = r[..end].trim();
            at = if index == "*" {
                at.into_iter()
                    .flat_map(|v| match v {
                        serde_json::Value::Array(a) => a.iter().collect::<Vec<_>>(),
                        serde_json::Value::Object(o) => o.values().collect(),
                        _ => Vec::new(),
                    })
                    .collect()
            } else {
                let i: i64 = index.parse().map_err(|_| {
                    anyhow::anyhow!("jsonpath: `[{index}]` is not an index or `*` in `{expr}`")
                })?;
                at.into_iter()
                    .filter_map(|v| {
                        let a = v.as_array()?;
                        let i = if i < 0 { a.len() as i64 + i } else { i };
                        a.get(usize::try_from(i).ok()?)
                    })
                    .collect()
            };
            rest = &r[end + 1..];
        } else {
            anyhow::bail!(
                "jsonpath: `{expr}` must start with `.` or `[` (e.g. `{{.status.phase}}`)"
            );
        }
    }
    Ok(at)
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    table_opt(header, rows, true)
}

fn table_opt(header: &[&str], rows: Vec<Vec<String>>, with_header: bool) {
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
    if with_header && !NO_HEADERS.load(std::sync::atomic::Ordering::Relaxed) {
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

/// A list of whole jobs (json, yaml, jsonpath).
pub fn jobs(list: &JobList, fmt: &Format) -> Result<()> {
    if !structured(list, fmt)? {
        list.jobs.iter().for_each(|j| println!("{}", j.id));
    }
    Ok(())
}

fn created(t: &str) -> String {
    t.get(..19).unwrap_or(t).replace('T', " ")
}

/// Job summaries as a table (`wide`: with node, ranks, generation and labels), or ids.
pub fn summaries(jobs: &[JobSummary], fmt: &Format, header: bool) -> Result<()> {
    if *fmt == Format::Name {
        jobs.iter().for_each(|j| println!("{}", j.id));
        return Ok(());
    }
    let wide = *fmt == Format::Wide;
    let rows = jobs
        .iter()
        .map(|j| {
            let s = &j.status;
            let mut row = vec![
                j.id.clone(),
                j.name.clone(),
                j.phase.as_str().into(),
                format!("{}/{}", s.epoch, s.total_epochs),
                format!("{}/{}", s.step, s.total_steps),
                opt(s.train_loss, |l| format!("{l:.4}")),
                opt(s.val_accuracy, |a| format!("{:.2}%", a * 100.0)),
                opt(s.samples_per_sec, |v| format!("{v:.0}")),
                created(&j.created_at),
            ];
            if wide {
                row.extend([
                    j.node.clone().unwrap_or_else(|| "-".into()),
                    format!("{}x{}", j.ranks, j.device),
                    j.generation.to_string(),
                    s.restarts.to_string(),
                    labels(&j.labels),
                ]);
            }
            row
        })
        .collect();
    let mut head = vec![
        "ID",
        "NAME",
        "PHASE",
        "EPOCH",
        "STEP",
        "LOSS",
        "VAL-ACC",
        "SAMPLES/S",
        "CREATED",
    ];
    if wide {
        head.extend(["NODE", "RANKS", "GEN", "RESTARTS", "LABELS"]);
    }
    table_opt(&head, rows, header);
    Ok(())
}

fn labels(l: &std::collections::BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One line about a job (for `get -w` on one job).
pub fn job_line(j: &Job, fmt: &Format) -> Result<()> {
    if fmt.is_table() {
        let first = FIRST_LINE.swap(false, std::sync::atomic::Ordering::Relaxed);
        let summary = JobSummary {
            id: j.id.clone(),
            name: j.name.clone(),
            phase: j.phase,
            labels: Default::default(),
            status: j.status.clone(),
            created_at: j.created_at.clone(),
            node: j.node.clone(),
            ranks: j.spec["resources"]["ranks"].as_u64().unwrap_or(1) as u32,
            device: j.spec["resources"]["device"]
                .as_str()
                .unwrap_or("cpu")
                .into(),
            generation: j.generation,
            revision: j.revision,
        };
        return summaries(&[summary], fmt, first);
    }
    match fmt {
        Format::Json => println!("{}", serde_json::to_string(j)?),
        _ => {
            structured(j, fmt)?;
        }
    }
    Ok(())
}

static FIRST_LINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `describe`: the job, where it runs, its init report, its metrics and its last events.
pub fn describe(
    j: &Job,
    events: &[JobEvent],
    queued_behind: Option<usize>,
    fmt: &Format,
) -> Result<()> {
    if !fmt.is_table() {
        let doc = serde_json::json!({"job": j, "events": events, "queued_behind": queued_behind});
        return value(&doc, fmt);
    }
    job(j, &Format::Table)?;
    if let Some(n) = queued_behind {
        // The coordinator's newest word on why (free GPUs, ranks, nodes).
        let why = events
            .iter()
            .rev()
            .find(|e| e.message.starts_with("waiting"))
            .map_or("next to be placed (see `ferryctl nodes`)", |e| {
                e.message.as_str()
            });
        println!(
            "{:<14}{}",
            "pending:",
            match n {
                0 => why.to_string(),
                n => format!(
                    "queued behind {n} Pending job{}; {why}",
                    if n == 1 { "" } else { "s" }
                ),
            }
        );
    }
    if let Some(l) = j.spec.get("labels").and_then(|l| l.as_object()) {
        let shown: Vec<String> = l
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        println!("{:<14}{}", "labels:", shown.join(", "));
    }
    let r = &j.spec["resources"];
    println!(
        "{:<14}{} rank(s) on {}, generation {}, {} restart(s)",
        "resources:",
        r["ranks"].as_u64().unwrap_or(1),
        r["device"].as_str().unwrap_or("cpu"),
        j.generation,
        j.status.restarts
    );
    if !j.placement.is_empty() {
        println!("\nPlacement:");
        for (i, p) in j.placement.iter().enumerate() {
            println!("  rank {i:<4} {}  {}", p.node, p.device);
        }
        for (i, p) in j.teacher_placement.iter().enumerate() {
            println!("  teacher {i:<2} {}  {}", p.node, p.device);
        }
    }
    if let Some(init) = events.iter().rev().find(|e| e.kind == EventKind::Init) {
        println!("\nInit report:\n  {}", init.message);
        for key in ["missing", "unexpected", "skipped_shape"] {
            if let Some(list) = init.data.get(key).and_then(|v| v.as_array()) {
                if !list.is_empty() {
                    let names: Vec<&str> =
                        list.iter().filter_map(|v| v.as_str()).take(10).collect();
                    let more = list.len().saturating_sub(names.len());
                    println!(
                        "  {key}: {}{}",
                        names.join(", "),
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }
    let evals: Vec<&JobEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::Eval)
        .collect();
    if !evals.is_empty() {
        println!("\nValidation by epoch:");
        for e in evals.iter().rev().take(10).rev() {
            println!("  {}  {}", short_time(&e.time), e.message);
        }
    }
    println!("\nEvents (last 15):");
    let shown: Vec<&JobEvent> = events
        .iter()
        .filter(|e| e.kind != EventKind::Progress)
        .collect();
    for e in &shown[shown.len().saturating_sub(15)..] {
        println!(
            "  {}  {:<10}  {}",
            short_time(&e.time),
            format!("{:?}", e.kind).to_lowercase(),
            e.message
        );
    }
    Ok(())
}

/// One job, in detail.
pub fn job(j: &Job, fmt: &Format) -> Result<()> {
    if structured(j, fmt)? {
        return Ok(());
    }
    if *fmt == Format::Name {
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
pub fn event(e: &JobEvent, fmt: &Format) -> Result<()> {
    match fmt {
        Format::Json => println!("{}", serde_json::to_string(e)?),
        Format::Yaml => print!("---\n{}", serde_yaml_ng::to_string(e)?),
        Format::JsonPath(t) => println!("{}", jsonpath(&serde_json::to_value(e)?, t)?),
        Format::Table | Format::Wide | Format::Name => println!(
            "{}  {:<10}  {}",
            e.time,
            format!("{:?}", e.kind).to_lowercase(),
            e.message
        ),
    }
    Ok(())
}

/// The nodes.
pub fn nodes(list: &NodeList, fmt: &Format) -> Result<()> {
    if structured(list, fmt)? {
        return Ok(());
    }
    if *fmt == Format::Name {
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

#[cfg(test)]
mod tests {
    use super::jsonpath;
    use serde_json::json;

    #[test]
    fn jsonpath_templates_select_as_kubectl_does() {
        let doc = json!({"jobs": [{"id": "a", "status": {"step": 3}}, {"id": "b", "status": {"step": 7}}]});
        assert_eq!(jsonpath(&doc, "{.jobs[*].id}").unwrap(), "a b");
        assert_eq!(jsonpath(&doc, "{.jobs[0].status.step}").unwrap(), "3");
        assert_eq!(jsonpath(&doc, "{.jobs[-1].id}").unwrap(), "b");
        assert_eq!(
            jsonpath(&doc, "{$.jobs[1].status}").unwrap(),
            r#"{"step":7}"#
        );
        assert_eq!(
            jsonpath(&doc, "ids: {.jobs[*].id}\\n").unwrap(),
            "ids: a b\n"
        );
        assert_eq!(jsonpath(&doc, "{.nothing}").unwrap(), "");
        for bad in ["{.jobs[x]}", "{.jobs", "{..id}", "{jobs}", "a}"] {
            assert!(jsonpath(&doc, bad).is_err(), "{bad}");
        }
    }
}
