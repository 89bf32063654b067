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

use tch::nn;
use tch::{Kind, Tensor};

/// The outputs of named modules, collected during a forward pass (feature distillation).
pub struct Taps<'a> {
    names: &'a [String],
    pub got: Vec<Option<Tensor>>,
}

impl<'a> Taps<'a> {
    /// Collects the outputs of the modules `names`.
    pub fn new(names: &'a [String]) -> Taps<'a> {
        Taps {
            names,
            got: names.iter().map(|_| None).collect(),
        }
    }

    /// Records `t` as the output of module `name` if it is wanted.
    fn put(&mut self, name: &str, t: &Tensor) {
        for (i, n) in self.names.iter().enumerate() {
            if n == name {
                self.got[i] = Some(t.shallow_clone());
            }
        }
    }

    fn wanted(&self) -> bool {
        !self.names.is_empty()
    }
}

/// A built-in architecture: a forward pass that can report the outputs of its modules.
pub trait Net: Send {
    /// Logits for `x`; the outputs of the modules `taps` names are put in it.
    fn forward_taps(&self, x: &Tensor, train: bool, taps: &mut Taps) -> Tensor;
    /// The names of the modules whose outputs `forward_taps` can report, in forward order.
    fn modules(&self) -> Vec<String>;
}

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
    /// Each block with its module name (`layer2.1`) and, for its layer's last, the layer's.
    blocks: Vec<(String, Option<String>, Block)>,
    fc: nn::Linear,
}

impl Net for ResNet {
    fn forward_taps(&self, x: &Tensor, train: bool, taps: &mut Taps) -> Tensor {
        let on = taps.wanted();
        let mut x = x.apply(&self.conv1);
        if on {
            taps.put("conv1", &x);
        }
        x = self.bn1.t(&x, train);
        if on {
            taps.put("bn1", &x);
        }
        x = x.relu();
        if on {
            taps.put("relu", &x);
        }
        x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        if on {
            taps.put("maxpool", &x);
        }
        for (name, last, b) in &self.blocks {
            x = b.t(&x, train);
            if on {
                taps.put(name, &x);
                if let Some(layer) = last {
                    taps.put(layer, &x);
                }
            }
        }
        let x = x.adaptive_avg_pool2d([1, 1]);
        if on {
            taps.put("avgpool", &x);
        }
        let x = x.flatten(1, -1).apply(&self.fc);
        if on {
            taps.put("fc", &x);
        }
        x
    }

    fn modules(&self) -> Vec<String> {
        let mut m: Vec<String> = ["conv1", "bn1", "relu", "maxpool"]
            .map(String::from)
            .to_vec();
        for (name, last, _) in &self.blocks {
            m.push(name.clone());
            m.extend(last.clone());
        }
        m.extend(["avgpool", "fc"].map(String::from));
        m
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
            let block = if bottleneck {
                Block::bottleneck(bp, norms, c_in, width, stride)
            } else {
                Block::basic(bp, norms, c_in, width, stride)
            };
            let name = format!("layer{}", layer + 1);
            blocks.push((format!("{name}.{i}"), (i + 1 == n).then_some(name), block));
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
pub fn resnet18(p: &nn::Path, norms: &mut Norms, classes: i64) -> impl Net {
    resnet(p, norms, classes, false)
}

/// torchvision's ResNet-50.
pub fn resnet50(p: &nn::Path, norms: &mut Norms, classes: i64) -> impl Net {
    resnet(p, norms, classes, true)
}

/// A small CNN: conv-bn-relu-pool, conv-bn-relu, global average pooling, a linear head.
/// Names follow a PyTorch `nn.Sequential` (`features.0` to `features.6`, then `classifier`).
struct Cnn {
    c0: nn::Conv2D,
    b1: Bn,
    c4: nn::Conv2D,
    b5: Bn,
    head: nn::Linear,
}

impl Net for Cnn {
    fn forward_taps(&self, x: &Tensor, train: bool, taps: &mut Taps) -> Tensor {
        let on = taps.wanted();
        let mut x = x.shallow_clone();
        for i in 0..7 {
            x = match i {
                0 => x.apply(&self.c0),
                1 => self.b1.t(&x, train),
                4 => x.apply(&self.c4),
                5 => self.b5.t(&x, train),
                // An input too small to pool is not pooled.
                3 if x.size()[2] < 2 || x.size()[3] < 2 => x,
                3 => x.max_pool2d_default(2),
                _ => x.relu(),
            };
            if on {
                taps.put(&format!("features.{i}"), &x);
            }
        }
        if on {
            taps.put("features", &x);
        }
        let x = x
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&self.head);
        if on {
            taps.put("classifier", &x);
        }
        x
    }

    fn modules(&self) -> Vec<String> {
        let mut m: Vec<String> = (0..7).map(|i| format!("features.{i}")).collect();
        m.extend(["features", "classifier"].map(String::from));
        m
    }
}

/// The small CNN (see [`Cnn`]) for `in_channels`-channel images.
pub fn cnn(p: &nn::Path, norms: &mut Norms, in_channels: i64, classes: i64) -> impl Net {
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
    Cnn {
        c0,
        b1,
        c4,
        b5,
        head,
    }
}

/// A small MLP on flattened inputs: 256 and 128 hidden units, ReLU (`features.0` to
/// `features.3`, then `classifier`).
struct Mlp {
    layers: [nn::Linear; 2],
    head: nn::Linear,
}

impl Net for Mlp {
    fn forward_taps(&self, x: &Tensor, _train: bool, taps: &mut Taps) -> Tensor {
        let on = taps.wanted();
        let mut x = x.flatten(1, -1).to_kind(Kind::Float);
        for i in 0..4 {
            x = if i % 2 == 0 {
                x.apply(&self.layers[i / 2])
            } else {
                x.relu()
            };
            if on {
                taps.put(&format!("features.{i}"), &x);
            }
        }
        if on {
            taps.put("features", &x);
        }
        let x = x.apply(&self.head);
        if on {
            taps.put("classifier", &x);
        }
        x
    }

    fn modules(&self) -> Vec<String> {
        let mut m: Vec<String> = (0..4).map(|i| format!("features.{i}")).collect();
        m.extend(["features", "classifier"].map(String::from));
        m
    }
}

/// The small MLP (see [`Mlp`]) for inputs of `inputs` values.
pub fn mlp(p: &nn::Path, inputs: i64, classes: i64) -> impl Net {
    Mlp {
        layers: [
            nn::linear(p / "features" / "0", inputs, 256, Default::default()),
            nn::linear(p / "features" / "2", 256, 128, Default::default()),
        ],
        head: nn::linear(p / "classifier", 128, classes, Default::default()),
    }
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

    /// The outputs of named modules, as feature distillation takes them: a layer's is its
    /// last block's, `fc`'s the logits, and asking for them changes nothing.
    #[test]
    fn taps_report_module_outputs_without_changing_the_forward_pass() {
        let mut m = Model::build(
            &spec(Arch::Resnet18, &[], FreezeBn::Eval),
            None,
            (3, 32, 32),
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let plain = m.forward(&x, false).unwrap();
        let names = ["maxpool", "layer3.1", "layer3", "avgpool", "fc"].map(String::from);
        m.set_taps(&names).unwrap();
        let (logits, taps) = m.forward_taps(&x, false).unwrap();
        assert!(logits.equal(&plain));
        let shapes: Vec<Vec<i64>> = taps.iter().map(Tensor::size).collect();
        assert_eq!(
            shapes,
            [
                vec![2, 64, 8, 8],
                vec![2, 256, 2, 2],
                vec![2, 256, 2, 2],
                vec![2, 512, 1, 1],
                vec![2, 5]
            ]
        );
        assert!(taps[1].equal(&taps[2]) && taps[4].equal(&plain));
        let e = m.set_taps(&["layer5".to_string()]).unwrap_err().to_string();
        assert!(
            e.contains("no module `layer5`") && e.contains("layer4.1"),
            "{e}"
        );
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
