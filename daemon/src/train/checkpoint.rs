//! Checkpoints: `checkpoints/step-NNNNNNNNN/` holding `model.safetensors` (parameters and
//! buffers by state_dict name), `optimizer.safetensors` and `manifest.json`. A checkpoint
//! is written under a temporary name and renamed into place, so a crash never leaves a
//! half-written one where resumption would find it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// The format version this build writes and reads.
pub const FORMAT: u32 = 1;

/// A checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// The data cursor: the epoch (0-based) and samples of it consumed, world-size independent.
    pub epoch: u32,
    pub samples_in_epoch: u64,
    pub world_size: u32,
    pub optimizer_steps: u64,
    pub created_at: String,
    /// The last training loss, for the status of a resumed job.
    pub train_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// fp16 jobs: the loss scaler's scale and clean steps since it last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_growth_tracker: Option<u32>,
}

fn dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The directory of the checkpoint of `step` under `root`.
pub fn dir_of(root: &Path, step: u64) -> PathBuf {
    root.join(dir_name(step))
}

fn save(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a checkpoint and keeps only the newest `keep`; returns its directory.
pub fn write(
    root: &Path,
    manifest: &Manifest,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    write_dir(root, manifest, model, optimizer, keep, true)?
        .ok_or_else(|| anyhow::anyhow!("checkpoint of step {} not written", manifest.step))
}

/// Writes a checkpoint unless one of its step is there already (several ranks may save the
/// same state at once, on several hosts over a shared root: the first to land wins);
/// returns its directory if this call wrote it.
pub fn write_new(
    root: &Path,
    manifest: &Manifest,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<Option<PathBuf>> {
    write_dir(root, manifest, model, optimizer, keep, false)
}

fn write_dir(
    root: &Path,
    manifest: &Manifest,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
    replace: bool,
) -> Result<Option<PathBuf>> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = root.join(dir_name(manifest.step));
    if !replace && final_dir.join("manifest.json").is_file() {
        return Ok(None);
    }
    // A name of this process's own: concurrent writers never share a temporary directory.
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        dir_name(manifest.step),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    save(model, &tmp.join("model.safetensors"))?;
    save(optimizer, &tmp.join("optimizer.safetensors"))?;
    let m = serde_json::to_vec_pretty(manifest)?;
    std::fs::write(tmp.join("manifest.json"), m)?;
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "manifest.json",
    ] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    if replace {
        let _ = std::fs::remove_dir_all(&final_dir);
    }
    if let Err(e) = std::fs::rename(&tmp, &final_dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Not replacing: another writer's directory of the same step landed first.
        if !replace && final_dir.join("manifest.json").is_file() {
            return Ok(None);
        }
        return Err(e)
            .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()));
    }
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    let mut all = list(root);
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(Some(final_dir))
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        // Only directories ferry made: a link named like a checkpoint is neither read nor
        // pruned (pruning removes what it lists).
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("manifest.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// A checkpoint read back.
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// Reads the checkpoint in `dir`.
pub fn read(dir: &Path) -> Result<Loaded> {
    let text = std::fs::read(dir.join("manifest.json"))
        .with_context(|| format!("cannot read {}/manifest.json", dir.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("corrupt manifest in {}", dir.display()))?;
    if manifest.format != FORMAT {
        bail!(
            "checkpoint {} has format {}, this ferry reads format {FORMAT}",
            dir.display(),
            manifest.format
        );
    }
    let model = Tensor::read_safetensors(dir.join("model.safetensors"))
        .with_context(|| format!("cannot read model of {}", dir.display()))?;
    let optimizer = Tensor::read_safetensors(dir.join("optimizer.safetensors"))
        .with_context(|| format!("cannot read optimizer of {}", dir.display()))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        manifest,
        model,
        optimizer,
    })
}

/// The newest checkpoint under `root` that reads back whole, if any.
/// `skipped` hears of each unreadable checkpoint it passes over.
pub fn latest(root: &Path, mut skipped: impl FnMut(String)) -> Result<Option<Loaded>> {
    let mut last_err = None;
    for (_, dir) in list(root).into_iter().rev() {
        match read(&dir) {
            Ok(l) => return Ok(Some(l)),
            Err(e) => {
                skipped(format!(
                    "checkpoint {} is unreadable and was skipped: {e:#}",
                    dir.display()
                ));
                last_err = Some(e)
            }
        }
    }
    match last_err {
        Some(e) => Err(e.context("no readable checkpoint")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let model = vec![
            (
                "w".to_string(),
                Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]),
            ),
            ("bn.running_mean".into(), Tensor::from_slice(&[0.5f32])),
        ];
        let opt = vec![(
            "w.momentum_buffer".to_string(),
            Tensor::from_slice(&[0.1f32, 0.2, 0.3]).view([3, 1]),
        )];
        for step in [10, 20, 30] {
            let m = Manifest {
                format: FORMAT,
                step,
                epoch: 1,
                samples_in_epoch: step * 4,
                world_size: 1,
                optimizer_steps: step,
                created_at: "now".into(),
                train_loss: Some(0.5),
                val_accuracy: None,
                loss_scale: None,
                scale_growth_tracker: None,
            };
            write(dir.path(), &m, &model, &opt, 2).unwrap();
        }
        let steps: Vec<u64> = list(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let l = latest(dir.path(), |_| {}).unwrap().unwrap();
        assert_eq!(l.manifest.step, 30);
        assert_eq!(l.manifest.samples_in_epoch, 120);
        let w = &l.model.iter().find(|(n, _)| n == "w").unwrap().1;
        assert!(w.equal(&model[0].1));
        assert_eq!(l.optimizer[0].0, "w.momentum_buffer");
        // A half-written checkpoint (no manifest) is ignored.
        std::fs::create_dir_all(dir.path().join("step-000000040")).unwrap();
        assert_eq!(
            latest(dir.path(), |_| {}).unwrap().unwrap().manifest.step,
            30
        );
        // A rescue writes a step only if no one has: over the half-written one, then not again.
        let m40 = Manifest {
            step: 40,
            ..l.manifest.clone()
        };
        let first = write_new(dir.path(), &m40, &model, &opt, 3).unwrap();
        assert_eq!(first, Some(dir.path().join("step-000000040")));
        assert_eq!(write_new(dir.path(), &m40, &model, &opt, 3).unwrap(), None);
        assert_eq!(
            latest(dir.path(), |_| {}).unwrap().unwrap().manifest.step,
            40
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
