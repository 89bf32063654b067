//! Optimizers with PyTorch's update rules (`torch.optim.SGD`, `torch.optim.AdamW`), over
//! an explicit list of parameters: frozen parameters are never in it, so they get no
//! update, no weight decay and no state.

use std::collections::HashMap;

use anyhow::{Context, Result};
use ferry_cluster::spec::{LrScheduleName, OptimizerName, OptimizerSpec, TrainSpec};
use tch::Tensor;

/// An optimizer and its per-parameter state.
pub struct Optimizer {
    spec: OptimizerSpec,
    params: Vec<(String, Tensor)>,
    /// SGD: momentum buffer; AdamW: first moment.
    state1: Vec<Option<Tensor>>,
    /// AdamW: second moment.
    state2: Vec<Option<Tensor>>,
    /// Steps taken (AdamW's bias correction).
    pub steps: u64,
}

impl Optimizer {
    /// An optimizer over `params` (name, tensor).
    pub fn new(spec: &OptimizerSpec, params: Vec<(String, Tensor)>) -> Self {
        let n = params.len();
        Optimizer {
            spec: spec.clone(),
            params,
            state1: (0..n).map(|_| None).collect(),
            state2: (0..n).map(|_| None).collect(),
            steps: 0,
        }
    }

    /// Drops the gradients of the parameters (PyTorch's default `set_to_none=True`).
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            super::torchscript::clear_grad(p);
        }
    }

    /// One update with learning rate `lr`, from the gradients in `.grad()`.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let s = &self.spec;
        tch::no_grad(|| match s.name {
            OptimizerName::Sgd => {
                let momentum = s.momentum.unwrap_or(0.0);
                let wd = s.weight_decay.unwrap_or(0.0);
                let device = self
                    .params
                    .first()
                    .map_or(tch::Device::Cpu, |(_, p)| p.device());
                let neg_lr = Tensor::from(-lr)
                    .to_kind(tch::Kind::Float)
                    .to_device(device);
                for (i, (_, p)) in self.params.iter_mut().enumerate() {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    let mut d = if wd != 0.0 { &g + &*p * wd } else { g };
                    if momentum != 0.0 {
                        let buf = match self.state1[i].take() {
                            None => d.detach().copy(),
                            Some(mut b) => {
                                let _ = b.g_mul_scalar_(momentum).g_add_(&d);
                                b
                            }
                        };
                        d = if s.nesterov == Some(true) {
                            &d + &buf * momentum
                        } else {
                            buf.shallow_clone()
                        };
                        self.state1[i] = Some(buf);
                    }
                    // p += -lr * d in place (addcmul with a 0-d tensor: no temporary the size of p).
                    let _ = p.addcmul_(&d, &neg_lr);
                }
            }
            OptimizerName::Adamw => {
                let [b1, b2] = s.betas.unwrap_or([0.9, 0.999]);
                let eps = s.eps.unwrap_or(1e-8);
                let wd = s.weight_decay.unwrap_or(0.01);
                let t = self.steps as i32;
                let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                for (i, (_, p)) in self.params.iter_mut().enumerate() {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    if wd != 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * wd);
                    }
                    let m = self.state1[i].get_or_insert_with(|| g.zeros_like());
                    let _ = m.lerp_(&g, 1.0 - b1);
                    let v = self.state2[i].get_or_insert_with(|| g.zeros_like());
                    let _ = v.g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                    let denom = v.sqrt() / bc2.sqrt() + eps;
                    let _ = p.g_add_(&(&*m / denom * (-lr / bc1)));
                }
            }
        })
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
            }
        }
        out
    }

    /// Restores state written by [`Optimizer::state`].
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<()> {
        let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
        let (n1, n2) = self.state_names();
        let device = self.params.first().map(|(_, p)| p.device());
        for (i, (name, p)) in self.params.iter().enumerate() {
            let to_dev = |t: Tensor| device.map_or(t.shallow_clone(), |d| t.to_device(d));
            self.state1[i] = by_name.remove(&format!("{name}.{n1}")).map(to_dev);
            if !n2.is_empty() {
                self.state2[i] = by_name.remove(&format!("{name}.{n2}")).map(to_dev);
            }
            if let Some(t) = &self.state1[i] {
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
            opt.step(spec.lr);
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
        a.step(0.1);
        let mut b = Optimizer::new(&spec, vec![("w".into(), p.shallow_clone())]);
        b.load_state(a.state(), a.steps).unwrap();
        assert_eq!(b.state().len(), 1);
        assert_eq!(b.state()[0].0, "w.momentum_buffer");
        assert!(b.state()[0].1.equal(&a.state()[0].1));
    }
}
