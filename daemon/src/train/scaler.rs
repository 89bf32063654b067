//! Dynamic loss scaling for fp16 training, with `torch.amp.GradScaler`'s rules: the loss is
//! multiplied by the scale before backward; the gradients are divided by it before the
//! optimizer step; a step whose gradients hold an inf or NaN is skipped and halves the
//! scale; 2000 clean steps in a row double it. In a data-parallel job the check runs after
//! the all-reduce, so every rank sees the same non-finite sums and skips the same steps.

use super::torchscript;
use anyhow::Result;
use tch::{Kind, Tensor};

/// PyTorch's defaults.
pub const INIT_SCALE: f64 = 65536.0;
const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;
const GROWTH_INTERVAL: u32 = 2000;

/// The scaler's state (checkpointed with the model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub growth_tracker: u32,
    /// Steps skipped for non-finite gradients, in this attempt.
    pub skipped: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler {
            scale: INIT_SCALE,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl GradScaler {
    /// The loss to call backward on.
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        loss * self.scale
    }

    /// Divides every gradient by the scale; true when any of them holds an inf or NaN.
    /// As GradScaler: one multi-tensor kernel over all gradients, then one read.
    pub fn unscale(&self, params: &[(String, Tensor)]) -> Result<bool> {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        let Some(first) = grads.first() else {
            return Ok(false);
        };
        let device = first.device();
        // fp32 reciprocal of the scale, as GradScaler computes it; made on the device by a
        // fill, not copied from the host (a copy could wait for backward).
        let inv = Tensor::full(
            [1],
            f64::from((1.0 / self.scale) as f32),
            (Kind::Float, device),
        );
        let mut found_inf = Tensor::zeros([1], (Kind::Float, device));
        torchscript::unscale_grads(&grads, &mut found_inf, &inv)?;
        Ok(found_inf.double_value(&[0]) != 0.0)
    }

    /// Moves the scale after a step: `found_inf` halves it (and the step was skipped);
    /// `GROWTH_INTERVAL` clean steps double it.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            self.skipped += 1;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == GROWTH_INTERVAL {
                self.scale *= GROWTH_FACTOR;
                self.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = GradScaler::default();
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (32768.0, 0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
    }

    #[test]
    fn unscaling_divides_gradients_and_finds_non_finite_ones() {
        let s = GradScaler::default();
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        (s.scale(&(&p * &p).sum(Kind::Float))).backward();
        let params = vec![("p".to_string(), p.shallow_clone())];
        assert!(!s.unscale(&params).unwrap());
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), vec![2.0, 4.0]);
        let q = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        (&q * f64::INFINITY).sum(Kind::Float).backward();
        // A finite gradient, a parameter without one, then the inf: all are looked at.
        let unused = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let params = vec![
            ("p".to_string(), p.shallow_clone()),
            ("unused".to_string(), unused),
            ("q".to_string(), q.shallow_clone()),
        ];
        assert!(s.unscale(&params).unwrap(), "an inf gradient is found");
        let n = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
        (&n * Tensor::from_slice(&[1.0f32, f32::NAN]))
            .sum(Kind::Float)
            .backward();
        let params = vec![("n".to_string(), n.shallow_clone())];
        assert!(s.unscale(&params).unwrap(), "a NaN gradient is found");
        let none = vec![("unused".to_string(), Tensor::from_slice(&[1.0f32]))];
        assert!(!s.unscale(&none).unwrap(), "no gradients, nothing to find");
    }
}
