//! Optimizers with PyTorch's update rules (`torch.optim.SGD`, `torch.optim.AdamW`), over
//! an explicit list of parameters: frozen parameters are never in it, so they get no
//! update, no weight decay and no state.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Context, Result};
use ferry_cluster::spec::{
    under, LayerDecaySpec, LrScheduleName, OptimizerName, OptimizerSpec, ParamGroupSpec, TrainSpec,
};
use tch::Tensor;

use super::ema::{self, Ema};
use super::torchscript;

/// The parameters of one multi-tensor step, with their gradients and state.
#[derive(Default)]
struct Group {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
}

/// An optimizer and its per-parameter state.
pub struct Optimizer {
    spec: OptimizerSpec,
    params: Vec<(String, Tensor)>,
    /// SGD: momentum buffer; AdamW: first moment.
    state1: Vec<Option<Tensor>>,
    /// AdamW: second moment.
    state2: Vec<Option<Tensor>>,
    /// AdamW: the steps each parameter has taken (its bias correction), counted, as
    /// PyTorch counts them, only when it had a gradient.
    param_steps: Vec<u64>,
    /// Each parameter's learning-rate multiplier and weight decay (its parameter group).
    lr_mult: Vec<f64>,
    decay: Vec<f64>,
    /// What the groups hold, for the log (None: one group).
    groups_summary: Option<String>,
    /// Optimizer steps taken.
    pub steps: u64,
    /// `train.ema`: the weights' average, moved after every step, saved with the state.
    ema: Option<Ema>,
    /// A checkpoint's average, read by `load_state` until `start_ema` takes it.
    saved_ema: Vec<(String, Tensor)>,
}

impl Optimizer {
    /// An optimizer over `params` (name, tensor). A tensor listed twice (tied weights) is
    /// kept once, under its first name, as `model.parameters()` gives it to torch.optim:
    /// updating it twice would apply the step twice, and within one multi-tensor call the
    /// two writes would race.
    pub fn new(spec: &OptimizerSpec, params: Vec<(String, Tensor)>) -> Self {
        let mut seen = HashSet::new();
        let params: Vec<(String, Tensor)> = params
            .into_iter()
            .filter(|(_, p)| p.numel() == 0 || seen.insert(p.data_ptr() as usize))
            .collect();
        let n = params.len();
        let decay = spec.weight_decay.unwrap_or(match spec.name {
            OptimizerName::Sgd => 0.0,
            OptimizerName::Adamw => 0.01,
        });
        Optimizer {
            spec: spec.clone(),
            params,
            state1: (0..n).map(|_| None).collect(),
            state2: (0..n).map(|_| None).collect(),
            param_steps: vec![0; n],
            lr_mult: vec![1.0; n],
            decay: vec![decay; n],
            groups_summary: None,
            steps: 0,
            ema: None,
            saved_ema: Vec::new(),
        }
    }

    /// An optimizer with parameter groups (`train.param_groups`) and the optimizer's
    /// `norm_weight_decay`/`bias_weight_decay`: a parameter takes the first group whose
    /// prefix covers it; its weight decay is its group's, else (a normalisation layer's
    /// parameter, a bias) the norm or bias decay, else the optimizer's. A group that covers
    /// no trainable parameter is an error.
    pub fn with_groups(
        spec: &OptimizerSpec,
        groups: &[ParamGroupSpec],
        layer_decay: Option<&LayerDecaySpec>,
        params: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let mut opt = Optimizer::new(spec, params);
        let mut parts = Vec::new();
        if let Some(l) = layer_decay {
            let names: Vec<&str> = opt.params.iter().map(|(n, _)| n.as_str()).collect();
            let layers = expand_layers(&l.layers, &names)?;
            let depth = layers.len() as i32;
            for (i, (name, _)) in opt.params.iter().enumerate() {
                if let Some(j) = layers.iter().position(|p| under(name, p)) {
                    opt.lr_mult[i] *= l.rate.powi(depth - j as i32);
                }
            }
            parts.push(format!(
                "layer decay {} over {depth} layers ({} .. {}: lr x{:.4} .. x{:.4})",
                l.rate,
                layers[0],
                layers[layers.len() - 1],
                l.rate.powi(depth),
                l.rate
            ));
        }
        if groups.is_empty() && spec.norm_weight_decay.is_none() && spec.bias_weight_decay.is_none()
        {
            opt.groups_summary = (!parts.is_empty()).then(|| parts.join("; "));
            return Ok(opt);
        }
        // Normalisation layers: modules whose weight is one-dimensional.
        let norms: HashSet<&str> = opt
            .params
            .iter()
            .filter(|(n, t)| n.ends_with(".weight") && t.dim() == 1)
            .map(|(n, _)| &n[..n.len() - ".weight".len()])
            .collect();
        let mut counts = vec![0usize; groups.len()];
        let (mut norm_n, mut bias_n) = (0, 0);
        for (i, (name, _)) in opt.params.iter().enumerate() {
            let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
            let group = groups.iter().position(|g| under(name, &g.prefix));
            if let Some(k) = group {
                counts[k] += 1;
                opt.lr_mult[i] *= groups[k].lr_mult;
            }
            let special = if norms.contains(module) {
                spec.norm_weight_decay.inspect(|_| norm_n += 1)
            } else if leaf == "bias" {
                spec.bias_weight_decay.inspect(|_| bias_n += 1)
            } else {
                None
            };
            if let Some(wd) = group.and_then(|k| groups[k].weight_decay).or(special) {
                opt.decay[i] = wd;
            }
        }
        for (k, (g, n)) in groups.iter().zip(&counts).enumerate() {
            if *n == 0 {
                bail!(
                    "train.param_groups[{k}].prefix: `{}` covers no trainable parameter (an earlier group or model.freeze may hold them); trainable parameters start with: {}",
                    g.prefix,
                    opt.params.iter().take(12).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            let wd = g
                .weight_decay
                .map_or(String::new(), |w| format!(", weight decay {w}"));
            parts.push(format!("{} ({n} tensors, lr x{}{wd})", g.prefix, g.lr_mult));
        }
        if let Some(w) = spec.norm_weight_decay {
            parts.push(format!(
                "weight decay {w} on {norm_n} normalisation tensors"
            ));
        }
        if let Some(w) = spec.bias_weight_decay {
            parts.push(format!("weight decay {w} on {bias_n} other biases"));
        }
        opt.groups_summary = Some(parts.join("; "));
        Ok(opt)
    }

    /// Keeps an average of `state` (the model's tensors) with `decay` from now on
    /// (`train.ema`), continuing a checkpoint's average if `load_state` read one.
    pub fn start_ema<'a>(
        &mut self,
        decay: f64,
        state: impl Iterator<Item = &'a (String, Tensor)>,
    ) -> Result<bool> {
        let resumed = !self.saved_ema.is_empty();
        self.ema = Some(Ema::new(decay, state, &mut self.saved_ema)?);
        self.saved_ema.clear();
        Ok(resumed)
    }

    /// The weights' average (`train.ema`), if kept.
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// The parameter groups, for the log; None when there is one.
    pub fn groups_summary(&self) -> Option<&str> {
        self.groups_summary.as_deref()
    }

    /// Drops the gradients of the parameters (PyTorch's default `set_to_none=True`).
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            super::torchscript::clear_grad(p);
        }
    }

    /// One update with learning rate `lr`, from the gradients in `.grad()`; parameters
    /// without a gradient are left alone (and get no state), as in PyTorch. The update runs
    /// on PyTorch's multi-tensor kernels, a few launches for the whole model (AdamW: one
    /// such call per distinct step count, usually one).
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.steps += 1;
        let s = &self.spec;
        let adam = s.name == OptimizerName::Adamw;
        let momentum = s.momentum.unwrap_or(0.0);
        // The parameters that have a gradient, grouped by their parameter group (learning
        // rate multiplier, weight decay) and step count (AdamW's bias correction depends on
        // it; SGD's update does not).
        let mut groups: BTreeMap<(u64, u64, u64), Group> = BTreeMap::new();
        for (i, (_, p)) in self.params.iter().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let t = if adam {
                self.param_steps[i] += 1;
                self.param_steps[i]
            } else {
                0
            };
            let key = (t, self.lr_mult[i].to_bits(), self.decay[i].to_bits());
            let group = groups.entry(key).or_default();
            // State starts at zero: SGD's first buffer is then 0 * momentum + d = d, exactly
            // PyTorch's clone of d; Adam's moments start at zero in PyTorch too.
            if adam || momentum != 0.0 {
                let b = self.state1[i].get_or_insert_with(|| p.zeros_like());
                group.first.push(b.shallow_clone());
            }
            if adam {
                let v = self.state2[i].get_or_insert_with(|| p.zeros_like());
                group.second.push(v.shallow_clone());
            }
            group.params.push(p.shallow_clone());
            group.grads.push(g);
        }
        for ((t, mult, decay), g) in groups {
            let (lr, weight_decay) = (lr * f64::from_bits(mult), f64::from_bits(decay));
            match s.name {
                OptimizerName::Sgd => torchscript::sgd_step(
                    &g.params,
                    &g.grads,
                    &g.first,
                    lr,
                    momentum,
                    weight_decay,
                    s.nesterov == Some(true),
                )?,
                OptimizerName::Adamw => {
                    let betas = s.betas.unwrap_or([0.9, 0.999]);
                    // powf, as Python's `**` computes beta ** step.
                    torchscript::adamw_step(
                        &g.params,
                        &g.grads,
                        &g.first,
                        &g.second,
                        &torchscript::AdamwStep {
                            lr,
                            betas,
                            eps: s.eps.unwrap_or(1e-8),
                            weight_decay,
                            bc1: 1.0 - betas[0].powf(t as f64),
                            bc2: 1.0 - betas[1].powf(t as f64),
                        },
                    )?
                }
            }
        }
        if let Some(e) = self.ema.as_mut() {
            e.update()?;
        }
        Ok(())
    }

    /// Suffixes of the per-parameter state tensors, as PyTorch names them ("" for none).
    fn state_names(&self) -> (&'static str, &'static str) {
        match self.spec.name {
            OptimizerName::Sgd => ("momentum_buffer", ""),
            OptimizerName::Adamw => ("exp_avg", "exp_avg_sq"),
        }
    }

    /// The optimizer state as named tensors (`{param}.momentum_buffer`, `.exp_avg`, `.exp_avg_sq`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let (n1, n2) = self.state_names();
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            if let Some(t) = &self.state1[i] {
                out.push((format!("{name}.{n1}"), t.shallow_clone()));
            }
            if let Some(t) = &self.state2[i] {
                out.push((format!("{name}.{n2}"), t.shallow_clone()));
                // As PyTorch's state_dict holds it: a 0-d float tensor.
                out.push((
                    format!("{name}.step"),
                    Tensor::from(self.param_steps[i] as f32),
                ));
            }
        }
        if let Some(e) = &self.ema {
            out.extend(e.state());
        }
        out
    }

    /// Restores state written by [`Optimizer::state`].
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<()> {
        let (averages, tensors): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|(n, _)| n.starts_with(ema::PREFIX));
        self.saved_ema = averages
            .into_iter()
            .map(|(n, t)| (n[ema::PREFIX.len()..].to_string(), t))
            .collect();
        let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
        let (n1, n2) = self.state_names();
        let device = self.params.first().map(|(_, p)| p.device());
        for (i, (name, p)) in self.params.iter().enumerate() {
            let to_dev = |t: Tensor| device.map_or(t.shallow_clone(), |d| t.to_device(d));
            self.state1[i] = by_name.remove(&format!("{name}.{n1}")).map(to_dev);
            if !n2.is_empty() {
                self.state2[i] = by_name.remove(&format!("{name}.{n2}")).map(to_dev);
            }
            // A checkpoint written before per-parameter counts had only the global one.
            self.param_steps[i] = match by_name.remove(&format!("{name}.step")) {
                Some(t) => t.double_value(&[]) as u64,
                None if self.state2[i].is_some() => steps,
                None => 0,
            };
            for t in self.state1[i].iter().chain(&self.state2[i]) {
                if t.size() != p.size() {
                    return Err(anyhow::anyhow!(
                        "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                        t.size(),
                        p.size()
                    ))
                    .context("the checkpoint does not match the job's model");
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// `train.layer_decay.layers` as module prefixes in depth order: a prefix with numbered
/// children (`features.0`, `features.1`, ...) stands for them, in numeric order. Every prefix
/// must cover a parameter of `names`.
fn expand_layers(prefixes: &[String], names: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for p in prefixes {
        let p = p.trim_end_matches('.');
        if !names.iter().any(|n| under(n, p)) {
            bail!(
                "train.layer_decay.layers: `{p}` covers no trainable parameter; parameter names start with: {}",
                names.iter().take(12).copied().collect::<Vec<_>>().join(", ")
            );
        }
        let mut children: Vec<u64> = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix(p)?
                    .strip_prefix('.')?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        children.sort_unstable();
        children.dedup();
        if children.is_empty() {
            out.push(p.to_string());
        } else {
            out.extend(children.iter().map(|k| format!("{p}.{k}")));
        }
    }
    Ok(out)
}

/// The learning rate before optimizer step `step` (0-based) of `total`.
pub fn learning_rate(t: &TrainSpec, step: u64, total: u64) -> f64 {
    let base = t.optimizer.lr;
    let s = &t.lr_schedule;
    if step < s.warmup_steps {
        return base * (step + 1) as f64 / s.warmup_steps as f64;
    }
    match s.name {
        LrScheduleName::Constant => base,
        LrScheduleName::Cosine => {
            let min = s.min_lr.unwrap_or(0.0);
            let span = total.saturating_sub(s.warmup_steps).max(1) as f64;
            let progress = ((step - s.warmup_steps) as f64 / span).min(1.0);
            min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        LrScheduleName::Step => {
            let size = s.step_size.unwrap_or(1).max(1);
            base * s
                .gamma
                .unwrap_or(0.1)
                .powi(((step - s.warmup_steps) / size) as i32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::spec::LrScheduleSpec;

    fn train(name: LrScheduleName, warmup: u64) -> TrainSpec {
        let mut t = TrainSpec::default();
        t.optimizer.lr = 0.1;
        t.lr_schedule = LrScheduleSpec {
            name,
            warmup_steps: warmup,
            step_size: Some(10),
            gamma: Some(0.5),
            min_lr: None,
        };
        t
    }

    #[test]
    fn schedules() {
        let c = train(LrScheduleName::Cosine, 0);
        assert!((learning_rate(&c, 0, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&c, 50, 100) - 0.05).abs() < 1e-12);
        assert!(learning_rate(&c, 99, 100) < 1e-3);
        let w = train(LrScheduleName::Constant, 4);
        assert!((learning_rate(&w, 0, 100) - 0.025).abs() < 1e-12);
        assert!((learning_rate(&w, 3, 100) - 0.1).abs() < 1e-12);
        let s = train(LrScheduleName::Step, 0);
        assert!((learning_rate(&s, 9, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&s, 25, 100) - 0.025).abs() < 1e-12);
    }

    fn quadratic_steps(spec: &OptimizerSpec, steps: usize) -> Vec<f64> {
        // Minimise sum((p - 3)^2) from p = [0, 1].
        let p = Tensor::from_slice(&[0.0f32, 1.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(spec, vec![("p".into(), p.shallow_clone())]);
        for _ in 0..steps {
            opt.zero_grad();
            (&p - 3.0).square().sum(tch::Kind::Float).backward();
            opt.step(spec.lr).unwrap();
        }
        Vec::<f64>::try_from(p.to_kind(tch::Kind::Double)).unwrap()
    }

    #[test]
    fn sgd_with_momentum_matches_the_closed_form() {
        let spec = OptimizerSpec {
            lr: 0.1,
            momentum: Some(0.9),
            ..Default::default()
        };
        // By hand for p0 = 0: g = -6 -> buf = -6 -> p = 0.6; g = -4.8 -> buf = -10.2 -> p = 1.62.
        let p = quadratic_steps(&spec, 2);
        assert!((p[0] - 1.62).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let spec = OptimizerSpec {
            name: OptimizerName::Adamw,
            lr: 0.01,
            weight_decay: Some(0.0),
            ..Default::default()
        };
        // The first Adam step is lr * sign(g) (up to eps).
        let p = quadratic_steps(&spec, 1);
        assert!(
            (p[0] - 0.01).abs() < 1e-6 && (p[1] - 1.01).abs() < 1e-6,
            "{p:?}"
        );
    }

    /// Random initial values of the given shapes (seeded), and two trainable copies of them:
    /// one for the optimizer under test, one for the reference.
    fn random_params(shapes: &[Vec<i64>], seed: i64) -> (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) {
        tch::manual_seed(seed);
        let init: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(s.as_slice(), (tch::Kind::Float, tch::Device::Cpu)))
            .collect();
        let fresh = || -> Vec<Tensor> {
            init.iter()
                .map(|t| t.copy().set_requires_grad(true))
                .collect()
        };
        let (a, b) = (fresh(), fresh());
        (init, a, b)
    }

    /// The per-parameter update rules of `torch.optim.SGD` and `torch.optim.AdamW`, written
    /// out one tensor at a time: what the multi-tensor step must equal.
    fn reference_step(
        spec: &OptimizerSpec,
        params: &[Tensor],
        state: &mut [[Option<Tensor>; 2]],
        steps: &mut [i32],
    ) {
        tch::no_grad(|| {
            for ((p, st), t) in params.iter().zip(state.iter_mut()).zip(steps.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                // torch.optim.AdamW's state["step"]: this parameter's own steps.
                *t += 1;
                let t = *t;
                let mut p = p.shallow_clone();
                match spec.name {
                    OptimizerName::Sgd => {
                        let (m, wd) = (
                            spec.momentum.unwrap_or(0.0),
                            spec.weight_decay.unwrap_or(0.0),
                        );
                        let mut d = &g + &p * wd;
                        if m != 0.0 {
                            let buf = match st[0].take() {
                                None => d.copy(),
                                Some(b) => b * m + &d,
                            };
                            d = if spec.nesterov == Some(true) {
                                &d + &buf * m
                            } else {
                                buf.copy()
                            };
                            st[0] = Some(buf);
                        }
                        p -= d * spec.lr;
                    }
                    OptimizerName::Adamw => {
                        let [b1, b2] = spec.betas.unwrap_or([0.9, 0.999]);
                        let wd = spec.weight_decay.unwrap_or(0.01);
                        p *= 1.0 - spec.lr * wd;
                        let m =
                            st[0].take().unwrap_or_else(|| g.zeros_like()) * b1 + &g * (1.0 - b1);
                        let v = st[1].take().unwrap_or_else(|| g.zeros_like()) * b2
                            + &g * &g * (1.0 - b2);
                        let (bc1, bc2) = (1.0 - b1.powf(t.into()), 1.0 - b2.powf(t.into()));
                        p -= (&m / bc1) / ((&v / bc2).sqrt() + spec.eps.unwrap_or(1e-8)) * spec.lr;
                        st[0] = Some(m);
                        st[1] = Some(v);
                    }
                }
            }
        });
    }

    #[test]
    fn multi_tensor_steps_match_the_per_parameter_rules() {
        let specs = [
            OptimizerSpec {
                lr: 0.05,
                ..Default::default()
            },
            OptimizerSpec {
                lr: 0.05,
                momentum: Some(0.9),
                weight_decay: Some(0.01),
                ..Default::default()
            },
            OptimizerSpec {
                lr: 0.05,
                momentum: Some(0.8),
                nesterov: Some(true),
                ..Default::default()
            },
            OptimizerSpec {
                name: OptimizerName::Adamw,
                lr: 0.01,
                ..Default::default()
            },
            OptimizerSpec {
                name: OptimizerName::Adamw,
                lr: 0.01,
                weight_decay: Some(0.0),
                ..Default::default()
            },
        ];
        for spec in &specs {
            let shapes = [vec![5, 3], vec![3], vec![4], vec![2, 2]];
            let (init, ours, theirs) = random_params(&shapes, 7);
            let named = ours
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
                .collect();
            let mut opt = Optimizer::new(spec, named);
            let mut state: Vec<[Option<Tensor>; 2]> =
                (0..init.len()).map(|_| [None, None]).collect();
            let mut steps = vec![0; init.len()];
            for step in 1..=4 {
                let g = Tensor::randn([4], (tch::Kind::Float, tch::Device::Cpu));
                for ps in [&ours, &theirs] {
                    for p in ps.iter() {
                        super::torchscript::clear_grad(&mut p.shallow_clone());
                    }
                    // The last parameter gets no gradient on odd steps: it must be left alone.
                    let used = if step % 2 == 1 { &ps[..3] } else { &ps[..] };
                    let loss = used
                        .iter()
                        .map(|p| {
                            p.sum(tch::Kind::Float) * &g.get(0)
                                + p.square().sum(tch::Kind::Float) * &g.get(1)
                        })
                        .fold(
                            Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
                            |a, b| a + b,
                        );
                    loss.backward();
                }
                opt.step(spec.lr).unwrap();
                reference_step(spec, &theirs, &mut state, &mut steps);
                for (a, b) in ours.iter().zip(&theirs) {
                    let diff = (a - b).abs().max().double_value(&[]);
                    assert!(diff < 1e-6, "{spec:?} step {step}: {a} vs {b}");
                }
            }
            // The parameter without a gradient at step 1 got its state at step 2, like the rest
            // (AdamW: both moments and the step count).
            assert_eq!(
                opt.state().len(),
                init.len()
                    * if spec.name == OptimizerName::Adamw {
                        3
                    } else if spec.momentum.is_some() {
                        1
                    } else {
                        0
                    }
            );
        }
    }

    /// Parameter groups: each parameter steps as PyTorch steps a parameter group with the
    /// group's lr and weight decay; normalisation layers and biases take their own decay.
    #[test]
    fn param_groups_step_each_parameter_with_its_groups_lr_and_decay() {
        let shapes: [(&str, Vec<i64>); 5] = [
            ("features.0.weight", vec![4, 3]),
            ("features.1.weight", vec![4]),
            ("features.1.bias", vec![4]),
            ("classifier.weight", vec![2, 4]),
            ("classifier.bias", vec![2]),
        ];
        // (lr multiplier, weight decay) each parameter must get.
        let expected = [(0.1, 0.01), (0.1, 0.0), (0.1, 0.0), (1.0, 0.01), (1.0, 0.0)];
        let groups = [ParamGroupSpec {
            prefix: "features".into(),
            lr_mult: 0.1,
            weight_decay: None,
        }];
        for name in [OptimizerName::Sgd, OptimizerName::Adamw] {
            let spec = OptimizerSpec {
                name,
                lr: 0.05,
                momentum: (name == OptimizerName::Sgd).then_some(0.9),
                weight_decay: Some(0.01),
                norm_weight_decay: Some(0.0),
                bias_weight_decay: Some(0.0),
                ..Default::default()
            };
            let sizes: Vec<Vec<i64>> = shapes.iter().map(|(_, s)| s.clone()).collect();
            let (init, ours, theirs) = random_params(&sizes, 3);
            let named = shapes
                .iter()
                .zip(&ours)
                .map(|((n, _), p)| (n.to_string(), p.shallow_clone()))
                .collect();
            let mut opt = Optimizer::with_groups(&spec, &groups, None, named).unwrap();
            let summary = opt.groups_summary().unwrap().to_string();
            assert!(
                summary.contains("features (3 tensors, lr x0.1)")
                    && summary.contains("0 on 2 normalisation tensors")
                    && summary.contains("0 on 1 other biases"),
                "{summary}"
            );
            let mut state: Vec<[Option<Tensor>; 2]> =
                (0..init.len()).map(|_| [None, None]).collect();
            let mut steps = vec![0; init.len()];
            for _ in 0..3 {
                for ps in [&ours, &theirs] {
                    for p in ps.iter() {
                        super::torchscript::clear_grad(&mut p.shallow_clone());
                    }
                    ps.iter()
                        .map(|p| (p * p).sum(tch::Kind::Float) + p.sum(tch::Kind::Float))
                        .fold(
                            Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
                            |a, b| a + b,
                        )
                        .backward();
                }
                opt.step(spec.lr).unwrap();
                for (i, (mult, wd)) in expected.iter().enumerate() {
                    let own = OptimizerSpec {
                        lr: spec.lr * mult,
                        weight_decay: Some(*wd),
                        ..spec.clone()
                    };
                    reference_step(&own, &theirs[i..=i], &mut state[i..=i], &mut steps[i..=i]);
                }
                for ((a, b), (n, _)) in ours.iter().zip(&theirs).zip(&shapes) {
                    let diff = (a - b).abs().max().double_value(&[]);
                    assert!(diff < 1e-6, "{name:?} {n}: {a} vs {b}");
                }
            }
        }
        // A group that covers nothing trainable is refused with the names there are.
        let p = vec![(
            "fc.weight".to_string(),
            Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu)),
        )];
        let e = Optimizer::with_groups(&OptimizerSpec::default(), &groups, None, p)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("train.param_groups[0].prefix: `features` covers no trainable parameter")
                && e.contains("fc.weight"),
            "{e}"
        );
    }

    #[test]
    fn state_round_trips() {
        let spec = OptimizerSpec {
            lr: 0.1,
            momentum: Some(0.9),
            ..Default::default()
        };
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut a = Optimizer::new(&spec, vec![("w".into(), p.shallow_clone())]);
        (&p * 2.0).sum(tch::Kind::Float).backward();
        a.step(0.1).unwrap();
        let mut b = Optimizer::new(&spec, vec![("w".into(), p.shallow_clone())]);
        b.load_state(a.state(), a.steps).unwrap();
        assert_eq!(b.state().len(), 1);
        assert_eq!(b.state()[0].0, "w.momentum_buffer");
        assert!(b.state()[0].1.equal(&a.state()[0].1));
    }

    /// Steps `opt` once with gradient `scale * 2p` on every parameter in `with_grad`.
    fn step_on(opt: &mut Optimizer, params: &[Tensor], with_grad: &[usize], scale: f64) {
        for p in params {
            super::torchscript::clear_grad(&mut p.shallow_clone());
        }
        let loss = with_grad
            .iter()
            .map(|&i| params[i].square().sum(tch::Kind::Float) * scale)
            .fold(
                Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
                |a, b| a + b,
            );
        loss.backward();
        opt.step(0.01).unwrap();
    }

    #[test]
    fn adamw_per_parameter_steps_survive_a_checkpoint_file() {
        let spec = OptimizerSpec {
            name: OptimizerName::Adamw,
            lr: 0.01,
            ..Default::default()
        };
        let params = || {
            vec![
                Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true),
                Tensor::from_slice(&[0.5f32]).set_requires_grad(true),
            ]
        };
        let named = |ps: &[Tensor]| -> Vec<(String, Tensor)> {
            ps.iter()
                .enumerate()
                .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
                .collect()
        };
        let ps = params();
        let mut a = Optimizer::new(&spec, named(&ps));
        // p0 steps three times, p1 once: their bias corrections differ from here on.
        step_on(&mut a, &ps, &[0], 1.0);
        step_on(&mut a, &ps, &[0], 1.0);
        step_on(&mut a, &ps, &[0, 1], 1.0);
        assert_eq!(a.param_steps, [3, 1]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("optimizer.safetensors");
        Tensor::write_safetensors(&a.state(), &file).unwrap();
        let qs: Vec<Tensor> = ps
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut b = Optimizer::new(&spec, named(&qs));
        b.load_state(Tensor::read_safetensors(&file).unwrap(), a.steps)
            .unwrap();
        assert_eq!(b.param_steps, [3, 1]);
        step_on(&mut a, &ps, &[0, 1], 0.5);
        step_on(&mut b, &qs, &[0, 1], 0.5);
        for (p, q) in ps.iter().zip(&qs) {
            assert!(p.equal(q), "{p} vs {q}");
        }
        // A checkpoint from before per-parameter counts falls back to the global count.
        let old: Vec<(String, Tensor)> = a
            .state()
            .into_iter()
            .filter(|(n, _)| !n.ends_with(".step"))
            .collect();
        let mut c = Optimizer::new(&spec, named(&qs));
        c.load_state(old, 7).unwrap();
        assert_eq!(c.param_steps, [7, 7]);
    }

    #[test]
    fn layer_decay_scales_each_layers_rate_by_its_depth() {
        let names = [
            "stem.weight",
            "features.0.weight",
            "features.1.conv.0.weight",
            "features.10.weight",
            "features.2.weight",
            "head.weight",
        ];
        let params: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu)),
                )
            })
            .collect();
        let decay = LayerDecaySpec {
            rate: 0.5,
            layers: vec!["stem".into(), "features".into()],
        };
        // Layers: stem, features.0, features.1, features.2, features.10 (numeric order): 5.
        let groups = [ParamGroupSpec {
            prefix: "head".into(),
            lr_mult: 2.0,
            weight_decay: None,
        }];
        let opt = Optimizer::with_groups(&OptimizerSpec::default(), &groups, Some(&decay), params)
            .unwrap();
        let by_name: Vec<(&str, f64)> = opt
            .params
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(opt.lr_mult.iter().copied())
            .collect();
        assert_eq!(
            by_name,
            [
                ("stem.weight", 0.5f64.powi(5)),
                ("features.0.weight", 0.5f64.powi(4)),
                ("features.1.conv.0.weight", 0.5f64.powi(3)),
                ("features.10.weight", 0.5),
                ("features.2.weight", 0.5f64.powi(2)),
                // Under no layer: the full rate, times its group's multiplier.
                ("head.weight", 2.0),
            ]
        );
        assert!(opt
            .groups_summary()
            .unwrap()
            .contains("layer decay 0.5 over 5 layers"));
        let typo = LayerDecaySpec {
            rate: 0.5,
            layers: vec!["backbone".into()],
        };
        let p = vec![(
            "stem.weight".to_string(),
            Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu)),
        )];
        let e = Optimizer::with_groups(&OptimizerSpec::default(), &[], Some(&typo), p)
            .err()
            .unwrap();
        assert!(
            format!("{e}").contains("`backbone` covers no trainable parameter"),
            "{e}"
        );
    }

    #[test]
    fn a_tied_tensor_is_updated_once() {
        let spec = OptimizerSpec {
            lr: 0.01,
            momentum: Some(0.9),
            ..Default::default()
        };
        let tied = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let once = tied.detach().copy().set_requires_grad(true);
        let mut twice = Optimizer::new(
            &spec,
            vec![
                ("enc.w".into(), tied.shallow_clone()),
                ("dec.w".into(), tied.shallow_clone()),
            ],
        );
        let mut single = Optimizer::new(&spec, vec![("enc.w".into(), once.shallow_clone())]);
        for _ in 0..3 {
            step_on(&mut twice, std::slice::from_ref(&tied), &[0], 1.0);
            step_on(&mut single, std::slice::from_ref(&once), &[0], 1.0);
        }
        assert!(tied.equal(&once), "{tied} vs {once}");
        let names: Vec<String> = twice.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["enc.w.momentum_buffer"]);
    }
}
