//! What happens to a sample between its file and the model: geometry (stretch, or resize
//! the shorter side and crop the centre, or a random resized crop), then, on the batch's
//! tensor, flip, colour jitter and normalisation.
//!
//! Every random choice for sample `i` in epoch `e` is drawn from a generator seeded by
//! (`train.seed`, `e`, `i`) alone: the same view on 1 rank or 8, after a resume, and on the
//! teacher that recomputes a student's batch from its indices.

use ferry_cluster::spec::{Augment, DataSpec};
use tch::{Kind, Tensor};

use super::sampler::SplitMix64;

/// Which view of a sample a batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Training in `epoch` (0-based): augmented, when the spec augments.
    Train { epoch: u32 },
    /// Evaluation: no augmentation.
    Eval,
}

impl View {
    /// The view as the teacher protocol's `aug_seed` carries it (0: no augmentation).
    pub fn aug_seed(self) -> u64 {
        match self {
            View::Train { epoch } => u64::from(epoch) + 1,
            View::Eval => 0,
        }
    }

    /// The view an `aug_seed` names.
    pub fn from_aug_seed(seed: u64) -> View {
        match seed {
            0 => View::Eval,
            s => View::Train {
                epoch: u32::try_from(s - 1).unwrap_or(u32::MAX),
            },
        }
    }
}

/// The random choices for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Draw {
    /// The crop, in source pixels: left, top, width, height.
    pub crop: Option<[f64; 4]>,
    pub flip: bool,
    /// Brightness, contrast and saturation factors (1: unchanged).
    pub jitter: [f32; 3],
}

/// A data set's transform.
#[derive(Debug, Clone)]
pub struct Transform {
    /// `data.image_size`.
    pub size: Option<u32>,
    /// Shorter side before a centre crop (else: stretch).
    pub shorter: Option<u32>,
    pub augment: Augment,
    pub seed: u64,
    /// `data.normalize`: mean and std per channel.
    pub normalize: Option<(Vec<f64>, Vec<f64>)>,
}

impl Transform {
    pub fn new(spec: &DataSpec, seed: u64) -> Transform {
        Transform {
            size: spec.image_size,
            shorter: spec.eval_shorter_side(),
            augment: spec.augmentation(),
            seed,
            normalize: spec
                .normalize
                .as_ref()
                .map(|n| (n.mean.clone(), n.std.clone())),
        }
    }

    /// Whether training views differ from epoch to epoch.
    pub fn augments(&self) -> bool {
        self.augment.is_active()
    }

    fn rng(&self, epoch: u32, index: u32) -> SplitMix64 {
        let mut r = SplitMix64(
            self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (u64::from(epoch) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
                ^ (u64::from(index) + 1).wrapping_mul(0xABC9_8388_FB8D_AC03),
        );
        r.next();
        r
    }

    /// The choices for sample `index` of source size `w`×`h`: its crop box and output size.
    pub fn draw(&self, view: View, index: u32, (w, h): (u32, u32)) -> (Draw, (u32, u32)) {
        let mut d = Draw {
            jitter: [1.0; 3],
            ..Draw::default()
        };
        let (fw, fh) = (f64::from(w), f64::from(h));
        let epoch = match view {
            View::Train { epoch } if self.augments() => epoch,
            _ => {
                let out = self.plain(&mut d, (fw, fh), (w, h));
                return (d, out);
            }
        };
        let mut rng = self.rng(epoch, index);
        let out = match (&self.augment.random_resized_crop, self.size) {
            (Some(r), Some(s)) => {
                d.crop = Some(random_resized_crop(&mut rng, (w, h), r.scale, r.ratio));
                (s, s)
            }
            _ => self.plain(&mut d, (fw, fh), (w, h)),
        };
        if let Some(p) = self.augment.hflip {
            d.flip = rng.uniform() < p;
        }
        if let Some(j) = &self.augment.color_jitter {
            for (k, v) in [j.brightness, j.contrast, j.saturation]
                .into_iter()
                .enumerate()
            {
                if v > 0.0 {
                    d.jitter[k] = rng.between((1.0 - v).max(0.0), 1.0 + v) as f32;
                }
            }
        }
        (d, out)
    }

    /// The un-augmented geometry: shorter side to `shorter` and the centre `size` square,
    /// or a stretch to `size`, or the image as it is.
    fn plain(&self, d: &mut Draw, (fw, fh): (f64, f64), native: (u32, u32)) -> (u32, u32) {
        match (self.shorter, self.size) {
            (Some(r), Some(s)) => {
                // As torchvision: Resize(r) makes the shorter side r and the longer
                // int(r * long / short); CenterCrop(s) starts at round((side - s) / 2), with
                // Python's rounding (half to even).
                let r = f64::from(r);
                let (rw, rh) = if fw <= fh {
                    (r, (r * fh / fw).floor())
                } else {
                    ((r * fw / fh).floor(), r)
                };
                let s = f64::from(s);
                let (left, top) = (
                    ((rw - s) / 2.0).round_ties_even(),
                    ((rh - s) / 2.0).round_ties_even(),
                );
                let (sx, sy) = (fw / rw, fh / rh);
                d.crop = Some([left * sx, top * sy, s * sx, s * sy]);
                (s as u32, s as u32)
            }
            (None, Some(s)) => (s, s),
            _ => native,
        }
    }

    /// Whether [`Transform::finish`] changes a batch with these draws.
    pub fn changes(&self, draws: &[Draw]) -> bool {
        self.normalize.is_some() || draws.iter().any(|d| d.flip || d.jitter != [1.0; 3])
    }

    /// Flip, jitter and normalise a batch (`n×C×H×W`, float in [0, 1]), in place: one
    /// batch-sized buffer per step, whatever the augmentation (the temporaries are a third
    /// of it or less).
    pub fn finish(&self, mut x: Tensor, draws: &[Draw]) -> Tensor {
        let device = x.device();
        let flips: Vec<i64> = (0..draws.len() as i64)
            .filter(|&i| draws[i as usize].flip)
            .collect();
        if !flips.is_empty() {
            let idx = Tensor::from_slice(&flips).to_device(device);
            let flipped = x.index_select(0, &idx).flip([3]);
            let _ = x.index_copy_(0, &idx, &flipped);
        }
        if draws.iter().any(|d| d.jitter != [1.0; 3]) {
            jitter(&mut x, draws);
        }
        if let Some((mean, std)) = &self.normalize {
            let c = x.size()[1];
            let shape = [1, c, 1, 1];
            let mean = Tensor::from_slice(mean).to_kind(Kind::Float).view(shape);
            let std = Tensor::from_slice(std).to_kind(Kind::Float).view(shape);
            let _ = x.g_sub_(&mean.to_device(device));
            let _ = x.g_div_(&std.to_device(device));
        }
        x
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a box of a random area share
/// and log-uniform aspect ratio, then the whole image clamped to the ratio range.
fn random_resized_crop(
    rng: &mut SplitMix64,
    (w, h): (u32, u32),
    scale: [f64; 2],
    ratio: [f64; 2],
) -> [f64; 4] {
    let (fw, fh) = (f64::from(w), f64::from(h));
    let area = fw * fh;
    let (lo, hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.between(scale[0], scale[1]);
        let aspect = rng.between(lo, hi).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && cw <= fw && ch > 0.0 && ch <= fh {
            let top = rng.below((fh - ch) as u64 + 1) as f64;
            let left = rng.below((fw - cw) as u64 + 1) as f64;
            return [left, top, cw, ch];
        }
    }
    let in_ratio = fw / fh;
    let (cw, ch) = if in_ratio < ratio[0] {
        (fw, (fw / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((fh * ratio[1]).round(), fh)
    } else {
        (fw, fh)
    };
    [((fw - cw) / 2.0).floor(), ((fh - ch) / 2.0).floor(), cw, ch]
}

/// Brightness, contrast, saturation, in that order, as torchvision's functional ops do
/// them (blend with black, with the grey mean, with the greyscale image; clamp to [0, 1]),
/// in place.
fn jitter(x: &mut Tensor, draws: &[Draw]) {
    let (n, c) = (x.size()[0], x.size()[1]);
    let device = x.device();
    let factor = |k: usize| {
        let v: Vec<f32> = draws.iter().map(|d| d.jitter[k]).collect();
        Tensor::from_slice(&v).view([n, 1, 1, 1]).to_device(device)
    };
    // ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: n×1×H×W.
    let grey = |x: &Tensor| -> Tensor {
        if c == 3 {
            x.narrow(1, 0, 1) * 0.299 + x.narrow(1, 1, 1) * 0.587 + x.narrow(1, 2, 1) * 0.114
        } else {
            x.shallow_clone()
        }
    };
    // x <- clamp(f x + (1 - f) other, 0, 1)
    let blend = |x: &mut Tensor, other: &Tensor, f: &Tensor| {
        let rest = other * (f.ones_like() - f);
        let _ = x.g_mul_(f);
        let _ = x.g_add_(&rest);
        let _ = x.clamp_(0.0, 1.0);
    };
    let _ = x.g_mul_(&factor(0));
    let _ = x.clamp_(0.0, 1.0);
    let mean = grey(x).mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float);
    blend(x, &mean, &factor(1));
    if c == 3 {
        let g = grey(x);
        blend(x, &g, &factor(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::spec::{AugmentPreset, AugmentSpec};

    fn transform(augment: Option<AugmentSpec>, size: u32) -> Transform {
        let mut spec: DataSpec =
            serde_json::from_value(serde_json::json!({"train": {"path": "x"}})).unwrap();
        spec.image_size = Some(size);
        spec.augment = augment;
        Transform::new(&spec, 7)
    }

    #[test]
    fn draws_depend_on_seed_epoch_and_index_only() {
        let t = transform(Some(AugmentSpec::Preset(AugmentPreset::Imagenet)), 224);
        let a = t.draw(View::Train { epoch: 3 }, 42, (500, 375));
        assert_eq!(a, t.draw(View::Train { epoch: 3 }, 42, (500, 375)));
        assert_ne!(a, t.draw(View::Train { epoch: 4 }, 42, (500, 375)));
        assert_ne!(a, t.draw(View::Train { epoch: 3 }, 43, (500, 375)));
        let [l, tp, w, h] = a.0.crop.unwrap();
        assert!(
            l >= 0.0 && tp >= 0.0 && l + w <= 500.0 && tp + h <= 375.0,
            "{a:?}"
        );
        assert_eq!(a.1, (224, 224));
        // Flips come out about half the time.
        let flips = (0..1000)
            .filter(|&i| t.draw(View::Train { epoch: 0 }, i, (64, 64)).0.flip)
            .count();
        assert!((420..580).contains(&flips), "{flips}");
    }

    #[test]
    fn evaluation_resizes_the_shorter_side_and_crops_the_centre_as_torchvision() {
        let t = transform(Some(AugmentSpec::Preset(AugmentPreset::Imagenet)), 224);
        assert_eq!(t.shorter, Some(256));
        // 500×375: Resize(256) gives 341×256; CenterCrop(224) starts at (round(58.5), 16),
        // and Python rounds 58.5 to 58.
        let (d, out) = t.draw(View::Eval, 0, (500, 375));
        assert_eq!(out, (224, 224));
        let [l, tp, w, h] = d.crop.unwrap();
        let sx = 500.0 / 341.0;
        let sy = 375.0 / 256.0;
        assert!((l - 58.0 * sx).abs() < 1e-9 && (tp - 16.0 * sy).abs() < 1e-9);
        assert!((w - 224.0 * sx).abs() < 1e-9 && (h - 224.0 * sy).abs() < 1e-9);
        assert!(!d.flip && d.jitter == [1.0; 3]);
        // Without a preset or eval_resize: stretched, as before.
        let plain = transform(None, 32);
        assert_eq!(
            plain.draw(View::Train { epoch: 1 }, 5, (50, 40)).0.crop,
            None
        );
        assert_eq!(
            plain.draw(View::Train { epoch: 1 }, 5, (50, 40)).1,
            (32, 32)
        );
    }

    #[test]
    fn the_crop_falls_back_to_the_centre_as_torchvision_does() {
        let mut rng = SplitMix64(1);
        // A scale range no box can meet: the fallback, clamped to ratio 4/3 at most.
        let b = random_resized_crop(&mut rng, (400, 100), [1.0, 1.0], [0.75, 4.0 / 3.0]);
        assert_eq!(b, [133.0, 0.0, 133.0, 100.0]);
    }

    #[test]
    fn jitter_matches_torchvision_formulas() {
        let x = Tensor::from_slice(&[
            0.2f32, 0.4, 0.6, 0.8, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0, 0.2, 0.4,
        ])
        .view([1, 3, 2, 2]);
        let d = Draw {
            jitter: [1.2, 0.8, 0.5],
            ..Draw::default()
        };
        let mut y = x.copy();
        jitter(&mut y, &[d]);
        // By hand: brightness, then contrast against the grey mean, then saturation.
        let b = (&x * 1.2).clamp(0.0, 1.0);
        let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([1, 3, 1, 1]);
        let mean = (&b * &w).sum(Kind::Float) / 4.0;
        let c = (&b * 0.8 + mean * 0.2).clamp(0.0, 1.0);
        let g = (&c * &w).sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        let s = (&c * 0.5 + g * 0.5).clamp(0.0, 1.0);
        let diff = (y - s).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }
}
