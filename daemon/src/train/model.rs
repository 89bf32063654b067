//! Models: TorchScript files and built-in architectures behind one interface that exposes
//! parameters and buffers by their PyTorch state_dict names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_cluster::spec::{Arch, FreezeBn, ModelSpec, Precision};
use serde::Serialize;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use super::builtin::{self, Norms};
use super::torchscript::{set_autocast, TorchScriptModule};

enum Net {
    Script(TorchScriptModule),
    Builtin {
        _vs: nn::VarStore,
        module: Box<dyn ModuleT + Send>,
        /// Its BatchNorm layers' switches: frozen ones stay in evaluation mode.
        norms: Norms,
    },
}

/// A model ready to train.
pub struct Model {
    net: Net,
    /// Trainable and frozen parameters, in a fixed order (the module's own).
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    frozen: Vec<bool>,
    /// The `model.freeze` prefixes: those modules also stay in evaluation mode (unless
    /// `model.freeze_bn: train`).
    frozen_prefixes: Vec<String>,
    frozen_eval: bool,
    device: Device,
    /// Forward passes run under autocast to this precision (weights stay fp32).
    precision: Precision,
}

/// What `model.init` did, reported as a job event.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct InitReport {
    pub loaded: Vec<String>,
    /// In the model, not in the file: left as initialised.
    pub missing: Vec<String>,
    /// In the file, not in the model.
    pub unexpected: Vec<String>,
    /// In both with different shapes (a new head is the usual case): left as initialised.
    pub skipped_shape: Vec<String>,
}

/// Input shape (C, H, W) of the data, needed to build built-in architectures.
pub type InputShape = (i64, i64, i64);

impl Model {
    /// Loads or builds the model of `spec` on `device`. `model_path` is the resolved `model.path`.
    pub fn build(
        spec: &ModelSpec,
        model_path: Option<&Path>,
        input: InputShape,
        device: Device,
    ) -> Result<Model> {
        let net = match spec.arch {
            Arch::Torchscript => {
                let path = model_path.context("arch torchscript needs model.path")?;
                let cuda = match device {
                    Device::Cuda(i) => Some(i),
                    _ => None,
                };
                Net::Script(TorchScriptModule::load(path, cuda)?)
            }
            arch => {
                let vs = nn::VarStore::new(device);
                let classes = i64::from(
                    spec.num_classes
                        .context("built-in archs need model.num_classes")?,
                );
                let root = vs.root();
                let mut norms = Norms::default();
                let n = &mut norms;
                let module: Box<dyn ModuleT + Send> = match arch {
                    Arch::Resnet18 => Box::new(builtin::resnet18(&root, n, classes)),
                    Arch::Resnet50 => Box::new(builtin::resnet50(&root, n, classes)),
                    Arch::Cnn => Box::new(builtin::cnn(&root, n, input.0, classes)),
                    Arch::Mlp => {
                        Box::new(builtin::mlp(&root, input.0 * input.1 * input.2, classes))
                    }
                    Arch::Torchscript => unreachable!("handled above"),
                };
                Net::Builtin {
                    _vs: vs,
                    module,
                    norms,
                }
            }
        };
        let (params, buffers) = match &net {
            Net::Script(m) => (m.named_parameters()?, m.named_buffers()?),
            Net::Builtin { _vs: vs, .. } => {
                let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
                vars.sort_by_key(|a| natural_key(&a.0));
                vars.into_iter().partition(|(_, t)| t.requires_grad())
            }
        };
        let frozen = vec![false; params.len()];
        Ok(Model {
            net,
            params,
            buffers,
            frozen,
            frozen_prefixes: Vec::new(),
            frozen_eval: spec.freeze_bn == FreezeBn::Eval,
            device,
            precision: Precision::Fp32,
        })
    }

    /// Runs forward passes in mixed precision (`train.precision`).
    pub fn set_precision(&mut self, p: Precision) {
        self.precision = p;
    }

    /// Logits for a batch, as fp32 whatever the precision of the pass.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.precision == Precision::Fp32 {
            return self.forward_plain(x, train);
        }
        // Autocast covers the forward pass only; backward follows the forward's dtypes.
        set_autocast(self.device, self.precision);
        let out = self.forward_plain(x, train);
        set_autocast(self.device, Precision::Fp32);
        Ok(out?.to_kind(Kind::Float))
    }

    fn forward_plain(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.net {
            Net::Script(m) => m.forward(x),
            Net::Builtin { module, .. } => Ok(module.forward_t(x, train)),
        }
    }

    /// Training or evaluation mode (dropout, BatchNorm). For TorchScript models, frozen
    /// modules stay in evaluation mode while the rest trains.
    pub fn set_train(&mut self, on: bool) -> Result<()> {
        match &mut self.net {
            Net::Script(m) if self.frozen_eval => m.set_train(on, &self.frozen_prefixes),
            Net::Script(m) => m.set_train(on, &[]),
            // forward_t takes the mode per call; frozen BatchNorm layers hold their own.
            Net::Builtin { .. } => Ok(()),
        }
    }

    /// Every parameter and buffer, by state_dict name.
    pub fn state(&self) -> impl Iterator<Item = &(String, Tensor)> {
        self.params.iter().chain(self.buffers.iter())
    }

    /// The parameters that train (not frozen), in module order.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.frozen)
            .filter(|(_, f)| !**f)
            .map(|((n, t), _)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Counts of (trainable parameters, frozen parameters) in elements.
    pub fn parameter_counts(&self) -> (i64, i64) {
        let mut c = (0, 0);
        for ((_, t), f) in self.params.iter().zip(&self.frozen) {
            if *f {
                c.1 += t.numel() as i64;
            } else {
                c.0 += t.numel() as i64;
            }
        }
        c
    }

    /// Freezes every parameter whose name is a prefix or starts with `prefix.`; every
    /// prefix must match at least one parameter.
    pub fn freeze(&mut self, prefixes: &[String]) -> Result<Vec<String>> {
        let mut frozen_names = Vec::new();
        for prefix in prefixes {
            let p = prefix.trim_end_matches('.');
            self.frozen_prefixes.push(p.to_string());
            if let (Net::Builtin { norms, .. }, true) = (&self.net, self.frozen_eval) {
                norms.freeze(p);
            }
            let mut hit = false;
            for (i, (name, t)) in self.params.iter().enumerate() {
                if name == p || name.starts_with(&format!("{p}.")) {
                    hit = true;
                    if !self.frozen[i] {
                        self.frozen[i] = true;
                        let _ = t.set_requires_grad(false);
                        frozen_names.push(name.clone());
                    }
                }
            }
            if !hit {
                let names: Vec<_> = self
                    .params
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .take(12)
                    .collect();
                bail!(
                    "model.freeze: `{prefix}` matches no parameter; parameter names start with: {}",
                    names.join(", ")
                );
            }
        }
        Ok(frozen_names)
    }

    /// Loads tensors by name from a safetensors file (parameter transfer): shapes must
    /// match; everything else is reported, not an error.
    pub fn load_init(&mut self, path: &Path) -> Result<InitReport> {
        let file = Tensor::read_safetensors(path).with_context(|| {
            format!("model.init: cannot read {} as safetensors", path.display())
        })?;
        let mut by_name: HashMap<String, Tensor> = file.into_iter().collect();
        let mut report = InitReport::default();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in self.params.iter().chain(self.buffers.iter()) {
                match by_name.remove(name) {
                    None => report.missing.push(name.clone()),
                    Some(src) if src.size() != t.size() => report.skipped_shape.push(format!(
                        "{name} {:?} -> {:?}",
                        src.size(),
                        t.size()
                    )),
                    Some(src) => {
                        t.shallow_clone().f_copy_(&src.to_kind(t.kind()))?;
                        report.loaded.push(name.clone());
                    }
                }
            }
            Ok(())
        })?;
        report.unexpected = by_name.into_keys().collect();
        report.unexpected.sort();
        if report.loaded.is_empty() {
            bail!(
                "model.init: no tensor of {} matches the model by name and shape (model tensors: {}; file tensors: {}); \
                 export it with safetensors.torch.save_file(model.state_dict(), ...)",
                path.display(),
                self.state().map(|(n, _)| n.as_str()).take(8).collect::<Vec<_>>().join(", "),
                report.unexpected.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(report)
    }

    /// Copies a full state (a checkpoint) into the model; every tensor must be present.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in self.params.iter().chain(self.buffers.iter()) {
                let src = by_name.remove(name).with_context(|| {
                    format!("checkpoint has no tensor `{name}`: it was written for another model")
                })?;
                if src.size() != t.size() {
                    bail!(
                        "checkpoint tensor `{name}` has shape {:?}, the model {:?}",
                        src.size(),
                        t.size()
                    );
                }
                t.shallow_clone().f_copy_(&src)?;
            }
            Ok(())
        })
    }

    /// Writes the final weights (and, for TorchScript, the trained module) to `dir`.
    ///
    /// Each file is written into a directory this call makes fresh, then renamed into place:
    /// a link put where a file goes is replaced, never written through.
    pub fn save_final(&self, dir: &Path) -> Result<Vec<String>> {
        let tmp = dir.join(format!(".ferry-final-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let r = self.save_final_into(&tmp, dir);
        let _ = std::fs::remove_dir_all(&tmp);
        r
    }

    fn save_final_into(&self, tmp: &Path, dir: &Path) -> Result<Vec<String>> {
        let mut files = Vec::new();
        let named: Vec<(&str, Tensor)> = self
            .state()
            .map(|(n, t)| (n.as_str(), t.to_device(Device::Cpu).contiguous()))
            .collect();
        let weights = dir.join("model.safetensors");
        Tensor::write_safetensors(&named, tmp.join("model.safetensors"))
            .with_context(|| format!("cannot write {}", weights.display()))?;
        std::fs::rename(tmp.join("model.safetensors"), &weights)
            .with_context(|| format!("cannot write {}", weights.display()))?;
        files.push(weights.display().to_string());
        if let Net::Script(m) = &self.net {
            let ts = dir.join("model.pt");
            m.save(&tmp.join("model.pt"))?;
            std::fs::rename(tmp.join("model.pt"), &ts)
                .with_context(|| format!("cannot write {}", ts.display()))?;
            files.push(ts.display().to_string());
        }
        Ok(files)
    }
}

/// Sorts `layer10` after `layer2`: digit runs compare as numbers.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    s.split('.')
        .map(|part| (part.parse::<u64>().unwrap_or(u64::MAX), part.to_string()))
        .collect()
}
