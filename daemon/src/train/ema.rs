//! `train.ema`: an exponential moving average of the weights, as timm's `ModelEmaV2`.
//!
//! After every optimizer step each floating-point tensor of the model's state (parameters
//! and buffers, BatchNorm statistics included) moves into its average,
//! `avg = decay * avg + (1 - decay) * value`; other tensors (`num_batches_tracked`) are
//! copied. The average starts as a copy of the model as training starts. The optimizer
//! carries it, so it is in every checkpoint and a resumed job continues the same average.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// The names of its tensors in the optimizer's state: `/` cannot occur in a module name,
/// so they never collide with `{param}.exp_avg` and the like.
pub const PREFIX: &str = "ema/";

/// The average of a model's state.
pub struct Ema {
    decay: f64,
    /// (name, the model's tensor, its average).
    tensors: Vec<(String, Tensor, Tensor)>,
}

impl Ema {
    /// An average of `state` (the model's tensors, shared, not copied), starting from
    /// `saved` where it holds a tensor (a checkpoint's average) and from a copy of the
    /// model's value otherwise.
    pub fn new<'a>(
        decay: f64,
        state: impl Iterator<Item = &'a (String, Tensor)>,
        saved: &mut Vec<(String, Tensor)>,
    ) -> Result<Ema> {
        let mut tensors = Vec::new();
        for (name, t) in state {
            let avg = match saved.iter().position(|(n, _)| n == name) {
                Some(i) => {
                    let s = saved.swap_remove(i).1;
                    if s.size() != t.size() {
                        anyhow::bail!(
                            "the checkpoint's train.ema average of `{name}` has shape {:?}, the model {:?}",
                            s.size(),
                            t.size()
                        );
                    }
                    s.to_device(t.device()).to_kind(t.kind())
                }
                None => t.detach().copy(),
            };
            tensors.push((name.clone(), t.shallow_clone(), avg));
        }
        Ok(Ema { decay, tensors })
    }

    /// Moves the average towards the model's current state (after an optimizer step).
    pub fn update(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (_, t, avg) in &self.tensors {
                let mut a = avg.shallow_clone();
                if is_float(t.kind()) {
                    let _ = a.f_lerp_(t, 1.0 - self.decay)?;
                } else {
                    a.f_copy_(t)?;
                }
            }
            Ok(())
        })
    }

    /// The average as named tensors (`ema/{name}`), for the optimizer's state.
    pub fn state(&self) -> impl Iterator<Item = (String, Tensor)> + '_ {
        self.tensors
            .iter()
            .map(|(n, _, a)| (format!("{PREFIX}{n}"), a.shallow_clone()))
    }

    /// The average's tensors, by the model's names (for a broadcast to every rank).
    pub fn averages(&self) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .map(|(n, _, a)| (n.clone(), a.shallow_clone()))
            .collect()
    }

    /// Runs `f` with the average in the model's tensors, then puts the model's own back
    /// (also when `f` fails).
    pub fn with_average<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let own: Vec<Tensor> = self
            .tensors
            .iter()
            .map(|(_, t, _)| t.detach().copy())
            .collect();
        let copy_all = |from: &mut dyn Iterator<Item = &Tensor>| -> Result<()> {
            tch::no_grad(|| {
                for ((_, t, _), src) in self.tensors.iter().zip(from) {
                    t.shallow_clone().f_copy_(src)?;
                }
                Ok(())
            })
        };
        copy_all(&mut self.tensors.iter().map(|(_, _, a)| a))
            .context("cannot load train.ema's average into the model")?;
        let out = f();
        copy_all(&mut own.iter())
            .context("cannot restore the model's weights after evaluating train.ema's average")?;
        out
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_follows_the_closed_form_and_is_swapped_in_and_out() {
        let w = Tensor::from_slice(&[0.0f32, 10.0]);
        let count = Tensor::from_slice(&[0i64]);
        let state = [
            ("w".to_string(), w.shallow_clone()),
            ("n".to_string(), count.shallow_clone()),
        ];
        let mut ema = Ema::new(0.9, state.iter(), &mut Vec::new()).unwrap();
        let mut expect = [0.0f64, 10.0];
        for step in 1..=3 {
            let _ = w.shallow_clone().fill_(f64::from(step));
            let _ = count.shallow_clone().fill_(i64::from(step));
            ema.update().unwrap();
            for e in &mut expect {
                *e = 0.9 * *e + 0.1 * f64::from(step);
            }
        }
        let avg = ema.averages();
        let got = Vec::<f32>::try_from(&avg[0].1).unwrap();
        for (g, e) in got.iter().zip(expect) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?} {expect:?}");
        }
        assert_eq!(avg[1].1.int64_value(&[0]), 3, "integer buffers are copied");
        let inside = ema
            .with_average(|| Ok(Vec::<f32>::try_from(&w).unwrap()))
            .unwrap();
        assert_eq!(inside, got);
        assert_eq!(
            Vec::<f32>::try_from(&w).unwrap(),
            [3.0, 3.0],
            "the model's own weights are back"
        );
        // A checkpoint's average is taken as it is.
        let mut saved = vec![("w".to_string(), Tensor::from_slice(&[5.0f32, 6.0]))];
        let again = Ema::new(0.9, state.iter(), &mut saved).unwrap();
        assert!(saved.is_empty());
        assert_eq!(
            Vec::<f32>::try_from(&again.averages()[0].1).unwrap(),
            [5.0, 6.0]
        );
    }
}
