//! Models: TorchScript files and built-in architectures behind one interface that exposes
//! parameters and buffers by their PyTorch state_dict names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_cluster::spec::{under, Arch, FreezeBn, InitSpec, ModelSpec, Precision};
use serde::Serialize;
use tch::nn;
use tch::{Device, Kind, Tensor};

use super::builtin::{self, Norms, Taps};
use super::torchscript::{set_autocast, TorchScriptModule};

enum Net {
    Script(TorchScriptModule),
    Builtin {
        _vs: nn::VarStore,
        module: Box<dyn builtin::Net>,
        /// The modules whose outputs `forward_taps` returns.
        taps: Vec<String>,
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
    /// The `model.unfreeze` prefixes applied so far: under a frozen prefix, they train.
    thawed_prefixes: Vec<String>,
    frozen_eval: bool,
    device: Device,
    /// (C, H, W) of an input, for tracing a built-in architecture.
    input: InputShape,
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
    /// In the file, left out by `include`/`exclude` (by their names in the file).
    pub excluded: Vec<String>,
}

/// The modules a TorchScript model keeps in evaluation mode while it trains, when some of
/// the frozen part has unfrozen: the largest modules (of those that hold the tensors
/// `names`) under a frozen prefix, not under an unfrozen one, and holding no unfrozen one.
fn eval_modules<'a>(
    names: impl Iterator<Item = &'a str>,
    frozen: &[String],
    thawed: &[String],
) -> Vec<String> {
    let mut modules: Vec<&str> = Vec::new();
    for name in names {
        let mut end = 0;
        while let Some(dot) = name[end..].find('.') {
            end += dot;
            modules.push(&name[..end]);
            end += 1;
        }
    }
    modules.sort_unstable();
    modules.dedup();
    let eval = |m: &str| {
        frozen.iter().any(|f| under(m, f)) && !thawed.iter().any(|t| under(m, t) || under(t, m))
    };
    let mut out: Vec<String> = Vec::new();
    for m in modules {
        // Sorted: a module comes after its parent, which already covers it.
        if eval(m) && !out.last().is_some_and(|p| under(m, p)) {
            out.push(m.to_string());
        }
    }
    out
}

/// What a forward pass returns, brought back to fp32 after autocast.
trait Outputs {
    fn to_float(self) -> Self;
}

impl Outputs for Tensor {
    fn to_float(self) -> Tensor {
        self.to_kind(Kind::Float)
    }
}

impl Outputs for (Tensor, Vec<Tensor>) {
    fn to_float(self) -> Self {
        (
            self.0.to_float(),
            self.1.into_iter().map(Outputs::to_float).collect(),
        )
    }
}

/// The bound of PyTorch's default initialisation of a `Linear` or `Conv*` with a weight of
/// `shape`: `kaiming_uniform_(a=sqrt(5))` draws the weight, and the bias, uniformly in
/// ±1/sqrt(fan_in).
pub fn default_init_bound(shape: &[i64]) -> f64 {
    1.0 / (shape[1..].iter().product::<i64>().max(1) as f64).sqrt()
}

/// Where the names of [`Model::add_aux_params`]'s parameters start.
pub const AUX_PREFIX: &str = "__ferry_aux.";

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
                let module: Box<dyn builtin::Net> = match arch {
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
                    taps: Vec::new(),
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
            thawed_prefixes: Vec::new(),
            frozen_eval: spec.freeze_bn == FreezeBn::Eval,
            device,
            input,
            precision: Precision::Fp32,
        })
    }

    /// The device the model is on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs forward passes in mixed precision (`train.precision`).
    pub fn set_precision(&mut self, p: Precision) {
        self.precision = p;
    }

    /// Logits for a batch, as fp32 whatever the precision of the pass.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.autocast(|| self.forward_plain(x, train))
    }

    /// Runs `f` (a forward pass) under autocast to the model's precision, and its outputs
    /// back in fp32. Autocast covers the forward pass only; backward follows the forward's
    /// dtypes.
    fn autocast<T: Outputs>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.precision == Precision::Fp32 {
            return f();
        }
        set_autocast(self.device, self.precision);
        let out = f();
        set_autocast(self.device, Precision::Fp32);
        Ok(out?.to_float())
    }

    fn forward_plain(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.net {
            Net::Script(m) => m.forward(x),
            Net::Builtin { module, .. } => Ok(module.forward_taps(x, train, &mut Taps::new(&[]))),
        }
    }

    /// Makes [`Model::forward_taps`] return the outputs of the modules `names` (PyTorch
    /// names), or says which name is not a module whose output can be had.
    pub fn set_taps(&mut self, names: &[String]) -> Result<()> {
        match &mut self.net {
            Net::Script(m) => m.set_taps(names),
            Net::Builtin { module, taps, .. } => {
                let known = module.modules();
                if let Some(bad) = names.iter().find(|n| !known.contains(n)) {
                    bail!(
                        "no module `{bad}` in this built-in model; its modules are {}",
                        known.join(", ")
                    );
                }
                *taps = names.to_vec();
                Ok(())
            }
        }
    }

    /// Logits (fp32) and the outputs (fp32) of the modules of [`Model::set_taps`].
    pub fn forward_taps(&self, x: &Tensor, train: bool) -> Result<(Tensor, Vec<Tensor>)> {
        self.autocast(|| match &self.net {
            Net::Script(m) => m.forward_taps(x),
            Net::Builtin { module, taps, .. } => {
                let mut t = Taps::new(taps);
                let logits = module.forward_taps(x, train, &mut t);
                let got = t
                    .got
                    .into_iter()
                    .zip(taps)
                    .map(|(g, n)| g.with_context(|| format!("module `{n}` did not run")))
                    .collect::<Result<Vec<_>>>()?;
                Ok((logits, got))
            }
        })
    }

    /// Adds parameters that train with the model but are not part of it (feature
    /// distillation's hint layers, named under [`AUX_PREFIX`]): they are in checkpoints and
    /// the optimizer, not in the saved model.
    pub fn add_aux_params(&mut self, params: Vec<(String, Tensor)>) {
        for (name, t) in params {
            debug_assert!(name.starts_with(AUX_PREFIX));
            self.params.push((name, t));
            self.frozen.push(false);
        }
    }

    /// Training or evaluation mode (dropout, BatchNorm). For TorchScript models, frozen
    /// modules stay in evaluation mode while the rest trains.
    pub fn set_train(&mut self, on: bool) -> Result<()> {
        match &mut self.net {
            Net::Script(m) if self.frozen_eval && self.thawed_prefixes.is_empty() => {
                m.set_train(on, &self.frozen_prefixes)
            }
            Net::Script(m) if self.frozen_eval => {
                let names = self
                    .params
                    .iter()
                    .chain(&self.buffers)
                    .map(|(n, _)| n.as_str());
                let eval = eval_modules(names, &self.frozen_prefixes, &self.thawed_prefixes);
                m.set_train(on, &eval)
            }
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

    /// The parameters that train now or once `later` (`model.unfreeze` prefixes) unfreeze:
    /// what the optimizer holds. A frozen one has no gradient, so it gets no update and no
    /// state until it trains, as in a torch.optim optimizer whose parameter has
    /// `requires_grad` off.
    pub fn trainable_with(&self, later: &[String]) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.frozen)
            .filter(|((n, _), f)| !**f || later.iter().any(|p| under(n, p)))
            .map(|((n, t), _)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Unfreezes the frozen parameters under `prefixes` (`model.unfreeze`): they train from
    /// now on, and their modules (BatchNorm included) follow the model's mode again. Every
    /// prefix must cover a frozen parameter.
    pub fn unfreeze(&mut self, prefixes: &[String]) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for prefix in prefixes {
            let p = prefix.trim_end_matches('.');
            let mut hit = false;
            for (i, (name, t)) in self.params.iter().enumerate() {
                if self.frozen[i] && under(name, p) {
                    hit = true;
                    self.frozen[i] = false;
                    let _ = t.set_requires_grad(true);
                    names.push(name.clone());
                }
            }
            if !hit {
                bail!("model.unfreeze: `{prefix}` covers no frozen parameter (an earlier step may have unfrozen it, or model.freeze does not cover it)");
            }
            if let Net::Builtin { norms, .. } = &self.net {
                norms.set_frozen(p, false);
            }
            self.thawed_prefixes.push(p.to_string());
        }
        Ok(names)
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
                norms.set_frozen(p, true);
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
    /// match; everything else is reported, not an error. `init` renames the file's tensors
    /// and chooses which are loaded; a rename, include or exclude prefix that matches no
    /// tensor of the file is an error (a typo would otherwise load everything, or nothing).
    pub fn load_init(&mut self, init: &InitSpec) -> Result<InitReport> {
        let path = Path::new(init.path());
        let file = Tensor::read_safetensors(path).with_context(|| {
            format!("model.init: cannot read {} as safetensors", path.display())
        })?;
        let mut report = InitReport::default();
        // Every file tensor's name in the file and after rename.
        let mut names = Vec::new();
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in file {
            let target = init.rename(&name);
            names.push((name.clone(), target.clone()));
            if !init.keeps(&target) {
                report.excluded.push(name);
            } else if by_name.insert(target.clone(), t).is_some() {
                bail!(
                    "model.init.rename: two tensors of {} are renamed to `{target}`",
                    path.display()
                );
            }
        }
        if let InitSpec::Select(sel) = init {
            let some = |names: &mut dyn Iterator<Item = &String>| {
                names.take(8).cloned().collect::<Vec<_>>().join(", ")
            };
            for from in sel.rename.keys() {
                if !names.iter().any(|(n, _)| n.starts_with(from.as_str())) {
                    bail!(
                        "model.init.rename: no tensor of {} starts with `{from}`; its names start with: {}",
                        path.display(),
                        some(&mut names.iter().map(|(n, _)| n))
                    );
                }
            }
            for (field, prefixes) in [("include", &sel.include), ("exclude", &sel.exclude)] {
                for p in prefixes {
                    if !names.iter().any(|(_, r)| under(r, p)) {
                        bail!(
                            "model.init.{field}: `{p}` matches no tensor of {} (names after rename); they start with: {}",
                            path.display(),
                            some(&mut names.iter().map(|(_, r)| r))
                        );
                    }
                }
            }
        }
        report.excluded.sort();
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

    /// Re-initialises every parameter and buffer under `prefixes` as PyTorch initialises a
    /// new `Linear`, `Conv*`, `BatchNorm*` or `LayerNorm` of its shape: weights of 2 or more
    /// dimensions uniform in ±1/sqrt(fan_in) (`kaiming_uniform_(a=sqrt(5))`), their biases
    /// uniform in the same bound, 1-D weights (norm layers) 1, their biases 0, running
    /// statistics 0 and 1. Every prefix must match; returns the names reset.
    pub fn reset(&mut self, prefixes: &[String]) -> Result<Vec<String>> {
        let names: Vec<String> = self.state().map(|(n, _)| n.clone()).collect();
        for p in prefixes {
            if !names.iter().any(|n| under(n, p)) {
                bail!(
                    "model.reset: `{p}` matches no tensor of the model; its names start with: {}",
                    names
                        .iter()
                        .take(12)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let shapes: HashMap<String, Vec<i64>> =
            self.state().map(|(n, t)| (n.clone(), t.size())).collect();
        let mut reset = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in self.params.iter().chain(self.buffers.iter()) {
                if !prefixes.iter().any(|p| under(name, p)) {
                    continue;
                }
                let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
                let mut t = t.shallow_clone();
                let weight = shapes
                    .get(&format!("{module}.weight"))
                    .filter(|s| s.len() >= 2);
                match (leaf, t.dim()) {
                    ("weight", d) if d >= 2 => {
                        let b = default_init_bound(&t.size());
                        let _ = t.uniform_(-b, b);
                    }
                    ("weight", _) => {
                        let _ = t.fill_(1.0);
                    }
                    ("bias", _) => match weight {
                        Some(w) => {
                            let b = default_init_bound(w);
                            let _ = t.uniform_(-b, b);
                        }
                        None => {
                            let _ = t.zero_();
                        }
                    },
                    ("running_mean" | "num_batches_tracked", _) => {
                        let _ = t.zero_();
                    }
                    ("running_var", _) => {
                        let _ = t.fill_(1.0);
                    }
                    _ => bail!(
                        "model.reset: cannot tell how PyTorch initialises `{name}` (only weights, biases and BatchNorm statistics are reset); name a narrower prefix"
                    ),
                }
                reset.push(name.clone());
            }
            Ok(())
        })?;
        Ok(reset)
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
        self.save_as(dir, "model")
    }

    /// Writes `STEM.safetensors` (and, for TorchScript, `STEM.pt`) to `dir`, as
    /// [`Model::save_final`] does.
    pub fn save_as(&self, dir: &Path, stem: &str) -> Result<Vec<String>> {
        let tmp = dir.join(format!(".ferry-{stem}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let r = self.save_into(&tmp, dir, stem);
        let _ = std::fs::remove_dir_all(&tmp);
        r
    }

    fn save_into(&self, tmp: &Path, dir: &Path, stem: &str) -> Result<Vec<String>> {
        let mut files = Vec::new();
        let own = |list: &'_ [(String, Tensor)]| -> Vec<(String, Tensor)> {
            list.iter()
                .filter(|(n, _)| !n.starts_with(AUX_PREFIX))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        };
        let (params, buffers) = (own(&self.params), own(&self.buffers));
        let named: Vec<(&str, Tensor)> = params
            .iter()
            .chain(&buffers)
            .map(|(n, t)| (n.as_str(), t.to_device(Device::Cpu).contiguous()))
            .collect();
        let file = format!("{stem}.safetensors");
        let weights = dir.join(&file);
        Tensor::write_safetensors(&named, tmp.join(&file))
            .with_context(|| format!("cannot write {}", weights.display()))?;
        std::fs::rename(tmp.join(&file), &weights)
            .with_context(|| format!("cannot write {}", weights.display()))?;
        files.push(weights.display().to_string());
        let file = format!("{stem}.pt");
        let ts = dir.join(&file);
        match &self.net {
            Net::Script(m) => m.save(&tmp.join(&file))?,
            // A built-in architecture is traced in evaluation mode, its weights read through
            // the module's attributes (its state_dict), for torch.jit.load: an inference graph
            // (training it again in PyTorch starts from model.safetensors and torchvision's
            // module of the same names).
            Net::Builtin { module, .. } => {
                let (c, h, w) = self.input;
                let x = Tensor::zeros([1, c, h, w], (Kind::Float, self.device));
                // The weights enter the graph through the module's attributes, detached.
                let traced = tch::no_grad(|| {
                    TorchScriptModule::trace(&params, &buffers, &x, |x| {
                        module.forward_taps(x, false, &mut Taps::new(&[]))
                    })
                })
                .context("cannot trace the built-in model for model.pt")?;
                traced.save(&tmp.join(&file))?;
            }
        }
        std::fs::rename(tmp.join(&file), &ts)
            .with_context(|| format!("cannot write {}", ts.display()))?;
        files.push(ts.display().to_string());
        Ok(files)
    }
}

/// Sorts `layer10` after `layer2`: digit runs compare as numbers.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    s.split('.')
        .map(|part| (part.parse::<u64>().unwrap_or(u64::MAX), part.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::spec::InitSelect;

    fn built(arch: Arch) -> Model {
        let spec = ModelSpec {
            arch,
            path: None,
            num_classes: Some(5),
            init: None,
            reset: Vec::new(),
            freeze: Vec::new(),
            freeze_bn: FreezeBn::Eval,
            unfreeze: Vec::new(),
            jit_optimize: false,
        };
        Model::build(&spec, None, (3, 8, 8), Device::Cpu).unwrap()
    }

    fn value(m: &Model, name: &str) -> Tensor {
        m.state().find(|(n, _)| n == name).unwrap().1.copy()
    }

    /// A checkpoint saved from a DataParallel model (names under `module.`) with a
    /// same-shaped head from another task: the head is left out and reported, the rest is
    /// loaded under the stripped names, and a prefix that matches nothing is refused.
    #[test]
    fn unfrozen_parts_of_a_frozen_module_leave_evaluation_mode() {
        let names = [
            "features.0.weight",
            "features.1.running_mean",
            "features.2.conv.0.weight",
            "features.2.conv.1.running_mean",
            "features.3.conv.1.running_mean",
            "head.weight",
        ];
        let s = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let eval = eval_modules(names.into_iter(), &s(&["features"]), &s(&["features.2"]));
        // `features` holds an unfrozen module: its frozen children go to eval one by one.
        assert_eq!(eval, ["features.0", "features.1", "features.3"]);
        let eval = eval_modules(
            names.into_iter(),
            &s(&["features"]),
            &s(&["features.2.conv.1"]),
        );
        assert_eq!(
            eval,
            [
                "features.0",
                "features.1",
                "features.2.conv.0",
                "features.3"
            ]
        );
    }

    #[test]
    fn init_include_exclude_and_rename_choose_what_is_transferred() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("source.safetensors");
        let source = built(Arch::Mlp);
        let named: Vec<(String, Tensor)> = source
            .state()
            .enumerate()
            .map(|(i, (n, t))| (format!("module.{n}"), t.ones_like() * (i + 2) as f64))
            .collect();
        Tensor::write_safetensors(&named, &file).unwrap();
        let select = |include: &[&str], exclude: &[&str], rename: &[(&str, &str)]| {
            InitSpec::Select(InitSelect {
                path: file.to_string_lossy().into_owned(),
                include: include.iter().map(|s| s.to_string()).collect(),
                exclude: exclude.iter().map(|s| s.to_string()).collect(),
                rename: rename
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            })
        };
        let mut m = built(Arch::Mlp);
        let head_before = value(&m, "classifier.weight");
        let r = m
            .load_init(&select(&[], &["classifier"], &[("module.", "")]))
            .unwrap();
        assert_eq!(
            r.excluded,
            ["module.classifier.bias", "module.classifier.weight"]
        );
        assert_eq!(r.loaded.len(), 4, "{r:?}");
        assert!(
            r.missing.iter().all(|n| n.starts_with("classifier.")),
            "{r:?}"
        );
        assert!(
            r.unexpected.is_empty() && r.skipped_shape.is_empty(),
            "{r:?}"
        );
        assert!(
            value(&m, "classifier.weight").equal(&head_before),
            "the head is not loaded"
        );
        for (i, (n, _)) in named.iter().enumerate() {
            if !n.starts_with("module.classifier.") {
                let loaded = value(&m, n.strip_prefix("module.").unwrap());
                assert_eq!(
                    loaded.mean(Kind::Float).double_value(&[]),
                    (i + 2) as f64,
                    "{n}"
                );
            }
        }
        // include: only the first layer.
        let r = built(Arch::Mlp)
            .load_init(&select(&["features.0"], &[], &[("module.", "")]))
            .unwrap();
        let mut loaded = r.loaded.clone();
        loaded.sort();
        assert_eq!(loaded, ["features.0.bias", "features.0.weight"]);
        // Without the rename nothing matches by name: refused, as before.
        assert!(built(Arch::Mlp).load_init(&select(&[], &[], &[])).is_err());
        // Typos are refused with the names there are.
        for (bad, says) in [
            (
                select(&["feature"], &[], &[("module.", "")]),
                "model.init.include: `feature` matches no tensor",
            ),
            (
                select(&[], &["head"], &[("module.", "")]),
                "model.init.exclude: `head` matches no tensor",
            ),
            (
                select(&[], &[], &[("model.", "")]),
                "model.init.rename: no tensor of",
            ),
        ] {
            let e = format!("{:#}", built(Arch::Mlp).load_init(&bad).err().unwrap());
            assert!(e.contains(says) && e.contains("features.0.weight"), "{e}");
        }
    }

    /// `model.reset` re-draws Linear/Conv weights and biases in PyTorch's bounds
    /// (±1/sqrt(fan_in)) and sets norm layers and their statistics as a new module has them.
    #[test]
    fn reset_reinitialises_as_pytorch_initialises_a_new_module() {
        let mut m = built(Arch::Cnn);
        tch::no_grad(|| {
            for (_, t) in m.params.iter().chain(m.buffers.iter()) {
                let _ = t.shallow_clone().fill_(7.0);
            }
        });
        let reset = m
            .reset(&["classifier".into(), "features.1".into()])
            .unwrap();
        assert_eq!(reset.len(), 6, "{reset:?}");
        // classifier: Linear(64, 5): bound 1/8.
        for n in ["classifier.weight", "classifier.bias"] {
            let t = value(&m, n);
            let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
            assert!(
                lo >= -0.125 && hi <= 0.125 && hi - lo > 0.01,
                "{n}: {lo} {hi}"
            );
        }
        // features.1: BatchNorm2d(32).
        for (n, v) in [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            let t = value(&m, &format!("features.1.{n}"));
            assert!(t.eq(v).all().int64_value(&[]) == 1, "features.1.{n}");
        }
        // features.0: Conv2d(3, 32, 3) untouched.
        assert!(
            value(&m, "features.0.weight")
                .eq(7.0)
                .all()
                .int64_value(&[])
                == 1
        );
        let e = m.reset(&["head".into()]).err().unwrap().to_string();
        assert!(
            e.contains("model.reset: `head` matches no tensor") && e.contains("classifier.weight"),
            "{e}"
        );
    }
}
