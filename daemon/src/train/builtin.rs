//! The built-in architectures (ResNet-18/50 as torchvision builds them, a small CNN and an
//! MLP), with parameter and buffer names as PyTorch's state_dicts spell them.
//!
//! They are written here rather than taken from `tch::vision` for one reason: a frozen
//! module's BatchNorm must stay in evaluation mode while the rest of the network trains
//! (normalise with its running statistics, and leave them alone), as ferry does for
//! TorchScript models and as PyTorch users get with `module.eval()` on the frozen part.
//! `tch::vision`'s ResNets pass one train flag to every layer. Here every BatchNorm layer
//! has a switch, registered under its name in [`Norms`], which `Model::freeze` turns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// Every BatchNorm layer of a built-in model, by module name, with its "frozen" switch.
#[derive(Default, Clone)]
pub struct Norms(Vec<(String, Arc<AtomicBool>)>);

impl Norms {
    /// Keeps every BatchNorm layer named `prefix` or under `prefix.` in evaluation mode
    /// (`frozen`), or lets it follow the model's mode again.
    pub fn set_frozen(&self, prefix: &str, frozen: bool) {
        for (name, flag) in &self.0 {
            if ferry_cluster::spec::under(name, prefix) {
                flag.store(frozen, Ordering::Relaxed);
            }
        }
    }

    fn batch_norm(&mut self, p: nn::Path, channels: i64) -> Bn {
        let name = p.components().collect::<Vec<_>>().join(".");
        let frozen = Arc::new(AtomicBool::new(false));
        self.0.push((name, frozen.clone()));
        Bn {
            bn: nn::batch_norm2d(p, channels, Default::default()),
            frozen,
        }
    }
}

/// A BatchNorm layer that stays in evaluation mode while its module is frozen.
#[derive(Debug)]
struct Bn {
    bn: nn::BatchNorm,
    frozen: Arc<AtomicBool>,
}

impl Bn {
    fn t(&self, x: &Tensor, train: bool) -> Tensor {
        x.apply_t(&self.bn, train && !self.frozen.load(Ordering::Relaxed))
    }
}

fn conv(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    padding: i64,
    stride: i64,
    bias: bool,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

/// torchvision's shortcut: a 1×1 convolution and BatchNorm when the shape changes.
struct Downsample(Option<(nn::Conv2D, Bn)>);

impl Downsample {
    fn new(p: nn::Path, norms: &mut Norms, c_in: i64, c_out: i64, stride: i64) -> Downsample {
        Downsample((stride != 1 || c_in != c_out).then(|| {
            (
                conv(&p / "0", c_in, c_out, 1, 0, stride, false),
                norms.batch_norm(&p / "1", c_out),
            )
        }))
    }

    fn t(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.0 {
            Some((c, bn)) => bn.t(&x.apply(c), train),
            None => x.shallow_clone(),
        }
    }
}

/// A residual block: torchvision's BasicBlock (two 3×3 convolutions) or Bottleneck (1×1,
/// 3×3 with the stride, 1×1 to four times the width).
struct Block {
    convs: Vec<(nn::Conv2D, Bn)>,
    downsample: Downsample,
}

impl Block {
    fn basic(p: nn::Path, norms: &mut Norms, c_in: i64, c_out: i64, stride: i64) -> Block {
        Block {
            convs: vec![
                (
                    conv(&p / "conv1", c_in, c_out, 3, 1, stride, false),
                    norms.batch_norm(&p / "bn1", c_out),
                ),
                (
                    conv(&p / "conv2", c_out, c_out, 3, 1, 1, false),
                    norms.batch_norm(&p / "bn2", c_out),
                ),
            ],
            downsample: Downsample::new(&p / "downsample", norms, c_in, c_out, stride),
        }
    }

    fn bottleneck(p: nn::Path, norms: &mut Norms, c_in: i64, width: i64, stride: i64) -> Block {
        let out = 4 * width;
        Block {
            convs: vec![
                (
                    conv(&p / "conv1", c_in, width, 1, 0, 1, false),
                    norms.batch_norm(&p / "bn1", width),
                ),
                (
                    conv(&p / "conv2", width, width, 3, 1, stride, false),
                    norms.batch_norm(&p / "bn2", width),
                ),
                (
                    conv(&p / "conv3", width, out, 1, 0, 1, false),
                    norms.batch_norm(&p / "bn3", out),
                ),
            ],
            downsample: Downsample::new(&p / "downsample", norms, c_in, out, stride),
        }
    }

    fn t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut y = x.shallow_clone();
        for (i, (c, bn)) in self.convs.iter().enumerate() {
            y = bn.t(&y.apply(c), train);
            if i < last {
                y = y.relu();
            }
        }
        (self.downsample.t(x, train) + y).relu()
    }
}

/// ResNet-18 (`bottleneck: false`, blocks 2-2-2-2) or ResNet-50 (`true`, 3-4-6-3).
struct ResNet {
    conv1: nn::Conv2D,
    bn1: Bn,
    blocks: Vec<Block>,
    fc: nn::Linear,
}

impl std::fmt::Debug for ResNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResNet({} blocks)", self.blocks.len())
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = self.bn1.t(&x.apply(&self.conv1), train).relu().max_pool2d(
            [3, 3],
            [2, 2],
            [1, 1],
            [1, 1],
            false,
        );
        for b in &self.blocks {
            x = b.t(&x, train);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }
}

fn resnet(p: &nn::Path, norms: &mut Norms, classes: i64, bottleneck: bool) -> ResNet {
    // In torchvision's order, so that initialisation draws the same random numbers.
    let conv1 = conv(p / "conv1", 3, 64, 7, 3, 2, false);
    let bn1 = norms.batch_norm(p / "bn1", 64);
    let counts: [i64; 4] = if bottleneck {
        [3, 4, 6, 3]
    } else {
        [2, 2, 2, 2]
    };
    let expansion = if bottleneck { 4 } else { 1 };
    let mut blocks = Vec::new();
    let mut c_in = 64;
    for (layer, (&n, width)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
        let lp = p / format!("layer{}", layer + 1);
        for i in 0..n {
            let stride = if i == 0 && layer > 0 { 2 } else { 1 };
            let bp = &lp / i.to_string();
            blocks.push(if bottleneck {
                Block::bottleneck(bp, norms, c_in, width, stride)
            } else {
                Block::basic(bp, norms, c_in, width, stride)
            });
            c_in = width * expansion;
        }
    }
    ResNet {
        conv1,
        bn1,
        blocks,
        fc: nn::linear(p / "fc", 512 * expansion, classes, Default::default()),
    }
}

/// torchvision's ResNet-18.
pub fn resnet18(p: &nn::Path, norms: &mut Norms, classes: i64) -> impl ModuleT {
    resnet(p, norms, classes, false)
}

/// torchvision's ResNet-50.
pub fn resnet50(p: &nn::Path, norms: &mut Norms, classes: i64) -> impl ModuleT {
    resnet(p, norms, classes, true)
}

/// A small CNN: conv-bn-relu-pool twice, global average pooling, a linear head.
/// Names follow a PyTorch `nn.Sequential` (`features.0`, `features.1`, ..., `classifier`).
pub fn cnn(p: &nn::Path, norms: &mut Norms, in_channels: i64, classes: i64) -> impl ModuleT {
    let f = p / "features";
    let (c0, b1) = (
        conv(&f / "0", in_channels, 32, 3, 1, 1, true),
        norms.batch_norm(&f / "1", 32),
    );
    let (c4, b5) = (
        conv(&f / "4", 32, 64, 3, 1, 1, true),
        norms.batch_norm(&f / "5", 64),
    );
    let head = nn::linear(p / "classifier", 64, classes, Default::default());
    nn::func_t(move |x, train| {
        let x = b1.t(&x.apply(&c0), train).relu();
        let x = if x.size()[2] >= 2 && x.size()[3] >= 2 {
            x.max_pool2d_default(2)
        } else {
            x
        };
        let x = b5.t(&x.apply(&c4), train).relu();
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&head)
    })
}

/// A small MLP on flattened inputs: 256 and 128 hidden units, ReLU.
pub fn mlp(p: &nn::Path, inputs: i64, classes: i64) -> impl ModuleT {
    let l0 = nn::linear(p / "features" / "0", inputs, 256, Default::default());
    let l2 = nn::linear(p / "features" / "2", 256, 128, Default::default());
    let head = nn::linear(p / "classifier", 128, classes, Default::default());
    nn::func_t(move |x, _train| {
        x.flatten(1, -1)
            .to_kind(Kind::Float)
            .apply(&l0)
            .relu()
            .apply(&l2)
            .relu()
            .apply(&head)
    })
}

#[cfg(test)]
mod tests {
    use super::super::model::Model;
    use ferry_cluster::spec::{Arch, FreezeBn, ModelSpec};
    use tch::{nn, Device, Kind, Tensor};

    fn spec(arch: Arch, freeze: &[&str], freeze_bn: FreezeBn) -> ModelSpec {
        ModelSpec {
            arch,
            path: None,
            num_classes: Some(5),
            init: None,
            reset: Vec::new(),
            freeze: freeze.iter().map(|s| s.to_string()).collect(),
            freeze_bn,
            unfreeze: Vec::new(),
            jit_optimize: false,
        }
    }

    /// The state_dict names and shapes are torchvision's (as `tch::vision` spells them).
    #[test]
    fn resnets_have_torchvisions_names_and_shapes() {
        for arch in [Arch::Resnet18, Arch::Resnet50] {
            let ours = Model::build(
                &spec(arch, &[], FreezeBn::Eval),
                None,
                (3, 32, 32),
                Device::Cpu,
            )
            .unwrap();
            let mut ours: Vec<(String, Vec<i64>)> =
                ours.state().map(|(n, t)| (n.clone(), t.size())).collect();
            let vs = nn::VarStore::new(Device::Cpu);
            let _net: Box<dyn tch::nn::ModuleT> = match arch {
                Arch::Resnet18 => Box::new(tch::vision::resnet::resnet18(&vs.root(), 5)),
                _ => Box::new(tch::vision::resnet::resnet50(&vs.root(), 5)),
            };
            let mut theirs: Vec<(String, Vec<i64>)> = vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            ours.sort();
            theirs.sort();
            assert_eq!(ours, theirs, "{arch:?}");
        }
    }

    /// Frozen modules' BatchNorm statistics stay as they were while the rest trains (and
    /// move with `freeze_bn: train`); the trainable part's move.
    #[test]
    fn frozen_batch_norm_keeps_its_statistics() {
        let backbone = ["conv1", "bn1", "layer1", "layer2", "layer3"];
        for freeze_bn in [FreezeBn::Eval, FreezeBn::Train] {
            let mut m = Model::build(
                &spec(Arch::Resnet18, &backbone, freeze_bn),
                None,
                (3, 32, 32),
                Device::Cpu,
            )
            .unwrap();
            m.freeze(&backbone.map(String::from)).unwrap();
            let stat = |m: &Model, name: &str| {
                m.state()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.copy())
                    .unwrap()
            };
            let watched = [
                "bn1.running_mean",
                "layer3.1.bn2.running_var",
                "layer4.1.bn2.running_mean",
            ];
            // Which watched statistics a few training steps move.
            let moved_by_training = |m: &mut Model| -> Vec<bool> {
                let before: Vec<Tensor> = watched.iter().map(|n| stat(m, n)).collect();
                m.set_train(true).unwrap();
                for _ in 0..3 {
                    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
                    let _ = m.forward(&x, true).unwrap();
                }
                watched
                    .iter()
                    .zip(&before)
                    .map(|(n, b)| !stat(m, n).equal(b))
                    .collect()
            };
            let moved = moved_by_training(&mut m);
            let frozen_moved = freeze_bn == FreezeBn::Train;
            assert_eq!(
                moved,
                vec![frozen_moved, frozen_moved, true],
                "{freeze_bn:?}"
            );
            // model.unfreeze of part of the backbone: its BatchNorm follows the model again,
            // the rest of the backbone keeps its statistics.
            let names = m.unfreeze(&["layer3".to_string()]).unwrap();
            assert!(names.iter().all(|n| n.starts_with("layer3.")) && !names.is_empty());
            assert!(
                m.unfreeze(&["layer3".to_string()]).is_err(),
                "unfrozen twice"
            );
            assert_eq!(
                moved_by_training(&mut m),
                vec![frozen_moved, true, true],
                "{freeze_bn:?}"
            );
        }
    }
}
