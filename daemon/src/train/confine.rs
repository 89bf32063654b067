//! Confinement at the time of use. The daemon checked the spec's paths when the job was
//! submitted, but a path can change after that (a directory swapped for a symbolic link
//! while the job waited). So a rank (or teacher) opens every input and its output
//! directory again, beneath its root, following no link below the root
//! ([`ferry_cluster::paths::open_beneath`]), and from then on uses only what it opened
//! (`/proc/self/fd/N`): a later swap redirects nothing. Messages to the daemon name the
//! paths as the user gave them ([`shown`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use ferry_cluster::paths::{open_beneath, Pinned};

use crate::protocol::WorkerPlan;

/// What this process opened, held open for its lifetime.
pub struct Pins(Vec<Pinned>);

/// (pinned path, the path as the user knows it), longest pinned path first.
static SHOWN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn pin(root: &str, path: &mut String, field: &str, create: bool, pins: &mut Pins) -> Result<()> {
    let p = open_beneath(Path::new(root), Path::new(path.as_str()), create)
        .with_context(|| format!("{field}: cannot open it beneath its root {root}"))?;
    let pinned = p.path().display().to_string();
    // In the user's terms (a subdirectory of a pinned directory names that one).
    let user = shown(path);
    let mut shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner());
    shown.push((pinned.clone(), user));
    shown.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    drop(shown);
    *path = pinned;
    pins.0.push(p);
    Ok(())
}

/// Opens the plan's inputs (and, with `output`, its output directory, made if missing)
/// beneath their roots and points the plan at what was opened.
pub fn pin_plan(plan: &mut WorkerPlan, output: bool) -> Result<Pins> {
    let mut pins = Pins(Vec::new());
    let roots = plan.roots.clone();
    if roots.data.is_empty() {
        return Ok(pins);
    }
    let spec = &mut plan.spec;
    pin(
        &roots.data,
        &mut spec.data.train.path,
        "data.train.path",
        false,
        &mut pins,
    )?;
    if let Some(v) = spec.data.test.as_mut() {
        pin(&roots.data, &mut v.path, "data.test.path", false, &mut pins)?;
    }
    if let Some(v) = spec.data.val.as_mut() {
        pin(&roots.data, &mut v.path, "data.val.path", false, &mut pins)?;
    }
    if let Some(u) = spec.data.unlabelled.as_mut() {
        pin(
            &roots.data,
            &mut u.path,
            "data.unlabelled.path",
            false,
            &mut pins,
        )?;
    }
    if let Some(p) = spec.model.path.as_mut() {
        pin(&roots.models, p, "model.path", false, &mut pins)?;
    }
    if let Some(p) = spec.model.init.as_mut() {
        pin(&roots.models, p.path_mut(), "model.init", false, &mut pins)?;
    }
    if let Some(d) = spec.distill.as_mut() {
        if let Some(p) = d.teacher.path.as_mut() {
            pin(&roots.models, p, "distill.teacher.path", false, &mut pins)?;
        }
        if let Some(p) = d.teacher.init.as_mut() {
            pin(
                &roots.models,
                p.path_mut(),
                "distill.teacher.init",
                false,
                &mut pins,
            )?;
        }
    }
    if output {
        pin(
            &roots.outputs,
            &mut plan.output_dir,
            "output.dir",
            true,
            &mut pins,
        )?;
        spec.output.dir = plan.output_dir.clone();
    }
    Ok(pins)
}

/// Restricts this process per the plan's `sandbox` (see [`super::sandbox`]), before any
/// thread runs model code; returns what to report (None: nothing to say).
pub fn sandbox(plan: &WorkerPlan, writes: &[&Path]) -> Result<Option<String>> {
    use ferry_cluster::spec::Device;
    let cuda = plan.spec.resources.device == Device::Cuda;
    let wanted = match plan.sandbox.as_str() {
        "landlock" => true,
        "auto" => !cuda,
        _ => false,
    };
    if !wanted {
        return Ok(None);
    }
    let reads = [Path::new(&plan.roots.data), Path::new(&plan.roots.models)];
    let policy = super::sandbox::Policy::for_rank(&reads, writes);
    match policy.enforce() {
        Ok(abi) => Ok(Some(format!(
            "sandbox: Landlock (ABI {abi}): the model may read the data and models roots and the system's libraries, and write only its output dir, its scratch (TMPDIR) and /dev/shm"
        ))),
        Err(e) if plan.sandbox == "auto" => Ok(Some(format!(
            "sandbox: none ({e:#}); the model can read and write whatever ferryd's user can (rank_sandbox: auto)"
        ))),
        Err(e) => Err(e.context("rank_sandbox is `landlock`")),
    }
}

/// A directory `name` inside the pinned directory `dir`, made if missing and refused if it
/// is a link; pinned too.
pub fn pin_subdir(dir: &Path, name: &str, pins: &mut Pins) -> Result<PathBuf> {
    let mut path = dir.join(name).display().to_string();
    pin(&dir.display().to_string(), &mut path, name, true, pins)?;
    Ok(PathBuf::from(path))
}

/// `text` with every pinned path put back as the user gave it.
pub fn shown(text: &str) -> String {
    put_back(text, false)
}

/// [`shown`] for a JSON text: the paths put back are escaped as inside a JSON string.
pub fn shown_json(text: &str) -> String {
    put_back(text, true)
}

fn put_back(text: &str, json: bool) -> String {
    let shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for (pinned, user) in shown.iter() {
        if out.contains(pinned.as_str()) {
            let with = if json {
                let esc = serde_json::to_string(user).unwrap_or_default();
                esc[1..esc.len().saturating_sub(1)].to_string()
            } else {
                user.clone()
            };
            out = out.replace(pinned.as_str(), &with);
        }
    }
    out
}

/// Refuses a directory entry that is a symbolic link (an ImageFolder member, a checkpoint).
pub fn no_link(entry: &std::fs::DirEntry) -> Result<()> {
    if entry.file_type().is_ok_and(|t| t.is_symlink()) {
        bail!(
            "{} is a symbolic link; ferry follows no link below its roots (replace it with the file or directory itself)",
            shown(&entry.path().display().to_string())
        );
    }
    Ok(())
}
