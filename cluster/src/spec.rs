//! The job spec, version 1: what a user submits as YAML or JSON.
//!
//! Parsing rejects unknown fields and names the field of every error (`train.optimizer.lr`);
//! [`JobSpec::validate`] then checks the values. Paths stay as the user wrote them: the
//! daemon resolves them against its configured roots (see [`crate::paths`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::FieldError;

/// A fine-tuning job as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// DNS-label style name; jobs can be named by it in `ferryctl`. Unique among the jobs
    /// that have not ended. May be left out when `generate_name` is given.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$")
    )]
    pub name: String,
    /// A prefix for a name the daemon makes unique by appending 5 random characters
    /// (as Kubernetes' `generateName`); for schedulers that submit many jobs of one kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    /// Labels to select jobs by (`GET /v1/jobs?labelSelector=team=vision`,
    /// `ferryctl get -l team=vision`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The model, its initial weights and what stays frozen.
    pub model: ModelSpec,
    /// Training and validation data.
    pub data: DataSpec,
    /// Epochs, batch size, optimizer, schedule, checkpoints.
    #[serde(default)]
    pub train: TrainSpec,
    /// Where and how wide the job runs.
    #[serde(default)]
    pub resources: Resources,
    /// Where results go.
    pub output: OutputSpec,
    /// What happens when a rank fails.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Knowledge distillation from a teacher served over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSpec>,
}

/// Knowledge distillation: the students learn from a teacher's soft labels,
/// `loss = alpha*CE(hard labels) + (1-alpha)*T^2*KL(teacher/T || student/T)`, per sample,
/// averaged over the batch. Samples without a label (`data.unlabelled`) have no CE term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    pub teacher: TeacherSpec,
    /// Softening temperature T.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the hard-label cross-entropy; `1 - alpha` weighs the distillation term.
    #[serde(default = "default_alpha")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0, maximum = 1.0))]
    pub alpha: f64,
    /// Soft labels travel and are cached as the k most likely classes (class, f16
    /// probability), renormalised over those k classes; 0 sends every class.
    #[serde(default = "default_top_k")]
    #[cfg_attr(feature = "openapi", schema(maximum = 65535))]
    pub top_k: u32,
    /// When no teacher replica answers: `wait` (up to `wait_timeout_s`, then fail),
    /// `hard-labels` (train that step on hard labels only) or `fail`.
    #[serde(default)]
    pub on_teacher_failure: OnTeacherFailure,
    /// `index`: ask by sample index (the teacher reads the same data); `tensor`: send images.
    #[serde(default)]
    pub mode: DistillMode,
    /// How long one request may take on one replica before it moves to another.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// How long `wait` waits for a teacher (including at start-up) before failing the job.
    #[serde(default = "default_wait_timeout_s")]
    pub wait_timeout_s: u64,
    /// Steps whose soft labels are requested ahead of training.
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    /// Cache soft labels for the students (the inputs are deterministic), so later epochs
    /// need no teacher round trip. The ranks of a node share one cache.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Feature distillation: intermediate activations of the student matched to the
    /// teacher's, each term added to the loss with its weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 16))]
    pub features: Vec<FeatureSpec>,
}

/// One feature-distillation term: the output of module `student` learns that of module
/// `teacher` (modules by their PyTorch names, e.g. `layer3` or `features.6`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub student: String,
    pub teacher: String,
    /// `mse`: mean squared error to the teacher's activation, through a hint layer (a 1x1
    /// convolution or a linear map, trained with the student) when the widths differ;
    /// `attention`: mean squared error between the two attention maps (channel mean of the
    /// squared activation, L2-normalised per sample), whatever the widths.
    #[serde(default)]
    pub loss: FeatureLoss,
    /// The term's weight in the loss.
    #[serde(default = "one_f64")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0.0))]
    pub weight: f64,
}

/// How a feature-distillation term compares activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FeatureLoss {
    #[default]
    Mse,
    Attention,
}

/// The teacher model and how it is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    pub arch: Arch,
    /// TorchScript file (`arch: torchscript`), relative to the models root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Output classes of a built-in architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub num_classes: Option<u32>,
    /// Weights (safetensors, by state_dict name) loaded into the teacher: a path, or
    /// `{path, include, exclude, rename}` as `model.init`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
    /// Teacher processes serving this job; students spread requests over them.
    #[serde(default = "one")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16))]
    pub replicas: u32,
    /// Most samples one forward pass of the teacher takes: requests from all students are
    /// coalesced up to it. Default: 512 on CUDA; on CPU, one request per pass (a CPU pass
    /// costs the same per sample at any batch size, so coalescing would only delay answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    /// Intra-op threads per teacher process (default: the daemon's `worker_threads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// How often the daemon restarts a teacher replica that dies.
    #[serde(default = "default_teacher_restarts")]
    #[cfg_attr(feature = "openapi", schema(maximum = 100))]
    pub max_restarts: u32,
}

impl TeacherSpec {
    /// The teacher as a model section (what loads it).
    pub fn model(&self) -> ModelSpec {
        ModelSpec {
            arch: self.arch,
            path: self.path.clone(),
            num_classes: self.num_classes,
            init: self.init.clone(),
            reset: Vec::new(),
            freeze: Vec::new(),
            freeze_bn: FreezeBn::Eval,
            unfreeze: Vec::new(),
            jit_optimize: false,
        }
    }
}

/// What a student does when no teacher replica answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OnTeacherFailure {
    #[default]
    Wait,
    HardLabels,
    Fail,
}

/// How students ask for soft labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DistillMode {
    /// By sample index: the teacher reads the same data set.
    #[default]
    Index,
    /// By input tensor: for data the teacher cannot read.
    Tensor,
}

fn default_temperature() -> f64 {
    4.0
}
fn default_alpha() -> f64 {
    0.5
}
fn default_top_k() -> u32 {
    10
}
fn default_deadline_ms() -> u64 {
    5_000
}
fn default_wait_timeout_s() -> u64 {
    300
}
fn default_prefetch() -> u32 {
    4
}
fn default_teacher_restarts() -> u32 {
    3
}
fn one() -> u32 {
    1
}

/// Restarts after a failure: the job goes back to Pending and resumes from its newest
/// checkpoint, at most `max_restarts` times; then it fails.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    #[cfg_attr(feature = "openapi", schema(maximum = 100))]
    pub max_restarts: u32,
}

/// Model architectures ferry can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// A TorchScript module exported from PyTorch (`model.path`).
    Torchscript,
    /// torchvision-compatible ResNet-18.
    Resnet18,
    /// torchvision-compatible ResNet-50.
    Resnet50,
    /// A small built-in convolutional network (`features.*`, `classifier.*`).
    Cnn,
    /// A small built-in multi-layer perceptron (`features.*`, `classifier.*`).
    Mlp,
}

impl Arch {
    /// Whether the architecture is built into ferry (as opposed to loaded from a file).
    pub fn is_builtin(self) -> bool {
        !matches!(self, Arch::Torchscript)
    }
}

/// The model section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    /// TorchScript file (`arch: torchscript`), relative to the models root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Output classes of a built-in architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub num_classes: Option<u32>,
    /// Parameter transfer: a safetensors file whose tensors (parameters and buffers) are
    /// loaded by name; tensors whose shape differs are skipped and reported. A path, or
    /// `{path, include, exclude, rename}` to choose which tensors are transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
    /// Parameter-name prefixes re-initialised after `init` (PyTorch's default
    /// initialisation for their shapes): a new head on a model that came with one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset: Vec<String>,
    /// Feature extraction: parameter-name prefixes that stay frozen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
    /// Frozen modules' BatchNorm (and, in TorchScript models, every layer's mode): `eval`
    /// (the default) keeps them in evaluation mode, normalising with and keeping their
    /// running statistics; `train` lets them follow the model, updating the statistics.
    #[serde(default, skip_serializing_if = "FreezeBn::is_default")]
    pub freeze_bn: FreezeBn,
    /// Gradual unfreezing: at the start of epoch `epoch` (counted from 0, as Lightning's
    /// `unfreeze_backbone_at_epoch`), the parameters under `prefixes` (each under a
    /// `model.freeze` prefix) start to train, with new optimizer state, and their modules
    /// leave evaluation mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unfreeze: Vec<UnfreezeSpec>,
    /// TorchScript only: let the graph executor optimise (profiling runs, then autodiff
    /// subgraphs and fused kernels) instead of running the graph op by op, as PyTorch eager
    /// does (the default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jit_optimize: bool,
}

impl ModelSpec {
    /// Every `model.unfreeze` prefix, in order.
    pub fn unfreeze_prefixes(&self) -> Vec<String> {
        self.unfreeze
            .iter()
            .flat_map(|u| u.prefixes.iter().cloned())
            .collect()
    }
}

/// One step of `model.unfreeze`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UnfreezeSpec {
    /// The epoch (from 0) at whose start they unfreeze: 3 means after three epochs.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub epoch: u32,
    /// Parameter-name prefixes, each under one of `model.freeze`.
    pub prefixes: Vec<String>,
}

/// `model.init`: a safetensors file, and which of its tensors are transferred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum InitSpec {
    /// Every tensor that matches the model by name and shape.
    Path(String),
    Select(InitSelect),
}

/// `model.init` with a choice of tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InitSelect {
    /// The safetensors file (a PyTorch `state_dict`), relative to the models root.
    pub path: String,
    /// Prefix renames applied to the file's tensor names first, longest prefix first:
    /// `{"module.": ""}` strips DataParallel's prefix, `{"backbone.": "features."}` maps a
    /// backbone onto the model's names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
    /// Only tensors (by their renamed names) under these prefixes are loaded; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Tensors under these prefixes are not loaded (a head from another task).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl InitSpec {
    /// The file.
    pub fn path(&self) -> &str {
        match self {
            InitSpec::Path(p) => p,
            InitSpec::Select(s) => &s.path,
        }
    }

    /// The file, to resolve it in place.
    pub fn path_mut(&mut self) -> &mut String {
        match self {
            InitSpec::Path(p) => p,
            InitSpec::Select(s) => &mut s.path,
        }
    }

    /// A file tensor's name after `rename` (the longest matching prefix is replaced).
    pub fn rename(&self, name: &str) -> String {
        let InitSpec::Select(s) = self else {
            return name.to_string();
        };
        s.rename
            .iter()
            .filter(|(from, _)| name.starts_with(from.as_str()))
            .max_by_key(|(from, _)| from.len())
            .map_or_else(
                || name.to_string(),
                |(from, to)| format!("{to}{}", &name[from.len()..]),
            )
    }

    /// Whether a (renamed) tensor is loaded: under an `include` prefix (when there are any)
    /// and under no `exclude` prefix.
    pub fn keeps(&self, renamed: &str) -> bool {
        let InitSpec::Select(s) = self else {
            return true;
        };
        (s.include.is_empty() || s.include.iter().any(|p| under(renamed, p)))
            && !s.exclude.iter().any(|p| under(renamed, p))
    }
}

/// Whether the tensor `name` is under the module prefix `prefix`: the name itself, or a
/// name below it (`features` covers `features.0.weight`, not `features_extra.weight`).
pub fn under(name: &str, prefix: &str) -> bool {
    name == prefix
        || (name.starts_with(prefix)
            && (prefix.ends_with('.') || name.as_bytes().get(prefix.len()) == Some(&b'.')))
}

/// How frozen modules' BatchNorm layers run (`model.freeze_bn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FreezeBn {
    #[default]
    Eval,
    Train,
}

impl FreezeBn {
    fn is_default(&self) -> bool {
        *self == FreezeBn::Eval
    }
}

/// The data section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub train: DataSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<DataSource>,
    /// A held-out test set, evaluated once after training with the chosen model (the best
    /// epoch's with `train.best`, else the last); its results go to `eval.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<DataSource>,
    /// Images without labels (safetensors with `images` only, or a directory of images),
    /// learned from the teacher's soft labels alone; needs `distill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabelled: Option<DataSource>,
    /// Side length ImageFolder images are resized to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4096))]
    pub image_size: Option<u32>,
    /// Channels of ImageFolder images: 1 (grayscale) or 3 (RGB, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3))]
    pub channels: Option<u32>,
    /// Shuffle the training set every epoch (seeded by `train.seed`); default true.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Per-channel normalisation applied after scaling pixels to [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
    /// Training-time augmentation: a preset (`imagenet`) or its fields. Every sample's view
    /// is fixed by (`train.seed`, epoch, sample index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<AugmentSpec>,
    /// Evaluation (and un-augmented training) images: shorter side resized to this, then
    /// the centre `image_size` square cropped, as torchvision's `Resize(256)` +
    /// `CenterCrop(224)`. Absent: images are stretched to `image_size` (or, with the
    /// `imagenet` preset, `image_size / 0.875`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 8192))]
    pub eval_resize: Option<u32>,
    /// Threads that decode images for each rank; 0 (the default): the cores the rank runs on.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    #[cfg_attr(feature = "openapi", schema(maximum = 256))]
    pub decode_threads: u32,
    /// Batches each decode thread prepares ahead of the step that needs them (default 2):
    /// memory is bounded by threads × (this + 1) batches, whatever the data set's size.
    #[serde(default = "two", skip_serializing_if = "is_two")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    pub prefetch_batches: u32,
    /// An image that cannot be decoded is left out of its batch (and counted) instead of
    /// failing the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_bad: bool,
}

/// `data.augment`: a preset's name, or fields (with an optional preset they override).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum AugmentSpec {
    Preset(AugmentPreset),
    Fields(Augment),
}

/// Augmentation presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AugmentPreset {
    /// torchvision's ImageNet reference: `RandomResizedCrop(image_size)` (scale 0.08-1,
    /// ratio 3/4-4/3) and a horizontal flip with probability 0.5; at evaluation
    /// `Resize(image_size / 0.875)` + `CenterCrop(image_size)`.
    Imagenet,
    /// No augmentation.
    None,
}

/// Augmentation fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// The preset these fields start from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<AugmentPreset>,
    /// A random crop of a random share of the image's area (`scale`) and aspect ratio
    /// (`ratio`, width / height), resized to `image_size`. Needs image files and `image_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_resized_crop: Option<RandomResizedCrop>,
    /// Probability of a horizontal flip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub hflip: Option<f64>,
    /// Random brightness, contrast and saturation factors, each uniform in `[1 - v, 1 + v]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_jitter: Option<ColorJitter>,
}

/// `data.augment.random_resized_crop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RandomResizedCrop {
    #[serde(default = "rrc_scale")]
    pub scale: [f64; 2],
    #[serde(default = "rrc_ratio")]
    pub ratio: [f64; 2],
}

impl Default for RandomResizedCrop {
    fn default() -> Self {
        RandomResizedCrop {
            scale: rrc_scale(),
            ratio: rrc_ratio(),
        }
    }
}

fn rrc_scale() -> [f64; 2] {
    [0.08, 1.0]
}

fn rrc_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}

/// `data.augment.color_jitter`: how far each factor strays from 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ColorJitter {
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub brightness: f64,
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub contrast: f64,
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub saturation: f64,
}

impl AugmentSpec {
    /// The fields in effect, the preset's filled in where the spec leaves them out.
    pub fn resolved(&self) -> Augment {
        let (preset, mut a) = match self {
            AugmentSpec::Preset(p) => (*p, Augment::default()),
            AugmentSpec::Fields(a) => (a.preset.unwrap_or(AugmentPreset::None), a.clone()),
        };
        if preset == AugmentPreset::Imagenet {
            a.random_resized_crop
                .get_or_insert_with(RandomResizedCrop::default);
            a.hflip.get_or_insert(0.5);
        }
        a.preset = Some(preset);
        a
    }
}

impl Augment {
    /// Whether any field changes the images.
    pub fn is_active(&self) -> bool {
        self.random_resized_crop.is_some()
            || self.hflip.is_some_and(|p| p > 0.0)
            || self
                .color_jitter
                .as_ref()
                .is_some_and(|j| j.brightness > 0.0 || j.contrast > 0.0 || j.saturation > 0.0)
    }
}

impl DataSpec {
    /// The augmentation in effect (all fields off without `augment`).
    pub fn augmentation(&self) -> Augment {
        self.augment
            .as_ref()
            .map(AugmentSpec::resolved)
            .unwrap_or_default()
    }

    /// The shorter side evaluation images are resized to before the centre crop, if they are
    /// cropped (else they are stretched to `image_size`).
    pub fn eval_shorter_side(&self) -> Option<u32> {
        if let Some(r) = self.eval_resize {
            return Some(r);
        }
        let imagenet = self.augmentation().preset == Some(AugmentPreset::Imagenet);
        match (imagenet, self.image_size) {
            (true, Some(s)) => Some((f64::from(s) / 0.875).round() as u32),
            _ => None,
        }
    }
}

/// A data set: a `.safetensors` file (`images`, `labels`) or an ImageFolder directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub path: String,
}

/// `(x - mean) / std` per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// The train section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Passes over data.train; 0: no training, the model as given is evaluated on
    /// data.val and data.test (into eval.json).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 100000))]
    pub epochs: u32,
    /// Per rank.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub batch_size: u32,
    pub optimizer: OptimizerSpec,
    pub lr_schedule: LrScheduleSpec,
    pub seed: u64,
    /// 0: checkpoint only at the end of each epoch.
    pub checkpoint_every_steps: u64,
    /// How many checkpoints to keep (the newest); at least 1.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub keep_checkpoints: u32,
    /// Stop after this many steps in all (for smoke tests); default: all epochs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Gradient all-reduce bucket size in MB (data-parallel jobs).
    pub bucket_mb: f64,
    /// CPU data-parallel jobs: whether each bucket is all-reduced while backward computes
    /// the rest, or after the whole backward (as CUDA ranks do for now).
    pub overlap_grad_sync: OverlapGradSync,
    /// Forward passes in `fp32`, or mixed precision with autocast to `bf16` or `fp16`
    /// (with dynamic loss scaling). Weights, gradients and optimizer state stay fp32.
    pub precision: Precision,
    /// Data-parallel jobs: gradients as they travel between hosts, `none` (f32) or rounded
    /// to `bf16` or `fp16` on the wire, half the bytes; sums are taken in f32 on CPU ranks.
    pub grad_compression: GradCompression,
    /// Cross-entropy against targets smoothed by this much (`torch.nn.CrossEntropyLoss`'s
    /// `label_smoothing`): `1 - e` on the label, `e / classes` everywhere. 0: hard labels.
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0, exclusive_maximum = 1.0))]
    pub label_smoothing: f64,
    /// Scales the (all-reduced) gradients so that their global L2 norm is at most this
    /// (`torch.nn.utils.clip_grad_norm_`); none: no clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0.0))]
    pub clip_grad_norm: Option<f64>,
    /// Learning-rate multipliers and weight decay by parameter-name prefix, as PyTorch's
    /// optimizer parameter groups: a parameter belongs to the first group whose prefix
    /// covers it, and the others to the optimizer's own settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub param_groups: Vec<ParamGroupSpec>,
    /// Keeps the best epoch's model by a validation metric, beside the last one
    /// (`model_best.safetensors`, and `model_best.pt` for TorchScript). Needs `data.val`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSpec>,
    /// Ends training when the `best` metric (val_accuracy by default) has not improved for
    /// `patience` epochs. Needs `data.val`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<EarlyStopSpec>,
    /// Gradient accumulation: each optimizer step runs this many forward/backward passes of
    /// `batch_size` samples (per rank) and steps once, exactly as one batch this many times
    /// larger would (models without BatchNorm; BatchNorm normalises each micro-batch).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1024))]
    #[serde(default = "one_u32", skip_serializing_if = "is_one")]
    pub grad_accum_steps: u32,
    /// Per-class weights of the cross-entropy (`torch.nn.CrossEntropyLoss(weight=)`): a
    /// list, one per class, or `balanced`: `samples / (classes * samples of the class)`
    /// from the training labels, as scikit-learn's `class_weight="balanced"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<ClassWeights>,
    /// An exponential moving average of the weights (timm's `ModelEmaV2`): after every
    /// optimizer step `ema = decay * ema + (1 - decay) * weights`, over parameters and
    /// floating-point buffers, starting from the initial model. It is validated beside the
    /// model and saved as `model_ema.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaSpec>,
    /// Layer-wise learning-rate decay (BEiT's and timm's `layer_decay`): the learning rate
    /// of the `layers` (in depth order, first the input's) falls by `rate` per layer below
    /// the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_decay: Option<LayerDecaySpec>,
}

/// `train.layer_decay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LayerDecaySpec {
    /// In (0, 1]: layer `j` of `L` (from 0, input side) learns at `rate^(L - j)` times the
    /// rate; what is under no layer (the head) at the full rate.
    pub rate: f64,
    /// Module prefixes in depth order. A prefix whose children are numbered (`features`
    /// holding `features.0`, `features.1`, ...) stands for those children, in order.
    pub layers: Vec<String>,
}

/// `train.class_weights`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum ClassWeights {
    /// `balanced`.
    Rule(ClassWeightRule),
    /// One non-negative weight per class, in class order.
    Given(Vec<f64>),
}

/// The rule of `train.class_weights: balanced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ClassWeightRule {
    Balanced,
}

/// `train.ema`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EmaSpec {
    /// The weight of the average at each step, in (0, 1): 0.999 averages over about
    /// the last thousand steps.
    pub decay: f64,
}

fn one_u32() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

/// `train.best`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BestSpec {
    #[serde(default)]
    pub metric: BestMetric,
    /// `max` or `min`; default: max for accuracy, min for loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BestMode>,
}

/// The validation metric that chooses the best epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    #[default]
    ValAccuracy,
    ValLoss,
}

/// Whether larger or smaller is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BestMode {
    Max,
    Min,
}

impl BestSpec {
    /// The metric's name as metrics.jsonl and events spell it.
    pub fn metric_name(&self) -> &'static str {
        match self.metric {
            BestMetric::ValAccuracy => "val_accuracy",
            BestMetric::ValLoss => "val_loss",
        }
    }

    /// Whether `new` beats `old` by more than `min_delta`.
    pub fn improves(&self, new: f64, old: Option<f64>, min_delta: f64) -> bool {
        let max = self.mode.unwrap_or(match self.metric {
            BestMetric::ValAccuracy => BestMode::Max,
            BestMetric::ValLoss => BestMode::Min,
        }) == BestMode::Max;
        match old {
            None => new.is_finite(),
            Some(old) if max => new > old + min_delta,
            Some(old) => new < old - min_delta,
        }
    }
}

impl Default for BestSpec {
    fn default() -> Self {
        BestSpec {
            metric: BestMetric::ValAccuracy,
            mode: None,
        }
    }
}

/// `train.early_stop`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EarlyStopSpec {
    /// Epochs without improvement before training ends.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub patience: u32,
    /// An improvement smaller than this does not count.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0))]
    pub min_delta: f64,
}

/// One parameter group (`train.param_groups`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ParamGroupSpec {
    /// The parameters under this module prefix (`features` covers `features.0.weight`).
    pub prefix: String,
    /// Their learning rate is the schedule's times this (0.1: a backbone learning ten
    /// times slower than a new head).
    #[serde(default = "one_f64")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0))]
    pub lr_mult: f64,
    /// Their weight decay, instead of the optimizer's (and of `norm_weight_decay` and
    /// `bias_weight_decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0))]
    pub weight_decay: Option<f64>,
}

fn one_f64() -> f64 {
    1.0
}

/// How gradients travel between hosts (`train.grad_compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum GradCompression {
    #[default]
    None,
    Bf16,
    Fp16,
}

/// When a CPU rank all-reduces gradient buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OverlapGradSync {
    /// During backward, unless every rank is on this host and their threads already fill
    /// its cores (then the communication thread would only compete with them).
    #[default]
    Auto,
    /// During backward, on a communication thread, as soon as a bucket's gradients exist.
    Always,
    /// After backward.
    Never,
}

/// Numeric precision of forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            epochs: 1,
            batch_size: 32,
            optimizer: OptimizerSpec::default(),
            lr_schedule: LrScheduleSpec::default(),
            seed: 0,
            checkpoint_every_steps: 0,
            keep_checkpoints: 2,
            max_steps: None,
            bucket_mb: 25.0,
            overlap_grad_sync: OverlapGradSync::Auto,
            precision: Precision::Fp32,
            grad_compression: GradCompression::None,
            label_smoothing: 0.0,
            clip_grad_norm: None,
            param_groups: Vec::new(),
            best: None,
            early_stop: None,
            grad_accum_steps: 1,
            class_weights: None,
            ema: None,
            layer_decay: None,
        }
    }
}

/// Optimizers, with PyTorch's semantics (`torch.optim.SGD`, `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Sgd,
    Adamw,
}

/// The optimizer and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    pub name: OptimizerName,
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0.0))]
    pub lr: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Weight decay of normalisation layers' parameters (those of a module whose weight is
    /// one-dimensional: BatchNorm, LayerNorm, GroupNorm), as torchvision's
    /// `--norm-weight-decay`; 0 is the usual choice. None: the optimizer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0))]
    pub norm_weight_decay: Option<f64>,
    /// Weight decay of the other biases, as torchvision's `--bias-weight-decay`. None: the
    /// optimizer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0))]
    pub bias_weight_decay: Option<f64>,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            name: OptimizerName::Sgd,
            lr: 0.01,
            momentum: None,
            nesterov: None,
            weight_decay: None,
            betas: None,
            eps: None,
            norm_weight_decay: None,
            bias_weight_decay: None,
        }
    }
}

/// Learning-rate schedules. All start with an optional linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LrScheduleName {
    Constant,
    Cosine,
    Step,
}

/// The learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LrScheduleSpec {
    pub name: LrScheduleName,
    #[serde(default)]
    pub warmup_steps: u64,
    /// `step`: multiply by `gamma` every `step_size` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// `cosine`: the learning rate at the last step (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
}

impl Default for LrScheduleSpec {
    fn default() -> Self {
        LrScheduleSpec {
            name: LrScheduleName::Constant,
            warmup_steps: 0,
            step_size: None,
            gamma: None,
            min_lr: None,
        }
    }
}

/// Devices a job can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// The resources section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// Data-parallel ranks (processes).
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub ranks: u32,
    pub device: Device,
    /// Intra-op threads per rank (default: the daemon's `worker_threads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Nodes the ranks are spread over, `ranks / nodes` on each (gang placement: all or
    /// none). In standalone mode there is one node.
    pub nodes: u32,
    /// The fewest nodes the job may shrink to when a node is lost (default: `nodes`,
    /// i.e. it does not shrink). Each node keeps `ranks / nodes` ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_nodes: Option<u32>,
    /// Only nodes whose labels include all of these.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            ranks: 1,
            device: Device::Cpu,
            threads: None,
            nodes: 1,
            min_nodes: None,
            node_selector: Default::default(),
        }
    }
}

impl Resources {
    /// Ranks on each placed node.
    pub fn ranks_per_node(&self) -> u32 {
        self.ranks / self.nodes.max(1)
    }

    /// The fewest nodes the job runs on.
    pub fn min_nodes(&self) -> u32 {
        self.min_nodes
            .unwrap_or(self.nodes)
            .clamp(1, self.nodes.max(1))
    }
}

/// The output section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Directory for checkpoints, final weights and `metrics.jsonl`, relative to the outputs root.
    pub dir: String,
}

fn yes() -> bool {
    true
}

fn two() -> u32 {
    2
}

fn is_two(v: &u32) -> bool {
    *v == 2
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// A spec that could not be parsed or is not valid; every entry names its field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid job spec: {}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
pub struct SpecError(pub Vec<FieldError>);

/// The deepest a spec's flow collections (`[`, `{`) may nest.
const MAX_DEPTH: usize = 32;

/// The bracket depth of `text` (outside quoted strings and comments), if it passes `max`.
fn flow_depth_over(text: &str, max: usize) -> Option<usize> {
    let (mut depth, mut quote, mut comment, mut prev) = (0usize, None::<char>, false, ' ');
    for c in text.chars() {
        match (quote, c) {
            _ if comment => comment = c != '\n',
            (Some('"'), '"') if prev != '\\' => quote = None,
            (Some('\''), '\'') => quote = None,
            (Some(_), _) => {}
            // A quote opens a scalar only where one starts (`don't` is plain text).
            (None, '"' | '\'') if matches!(prev, ' ' | '\t' | '\n' | ':' | '[' | '{' | ',') => {
                quote = Some(c)
            }
            (None, '#') if prev.is_whitespace() => comment = true,
            (None, '[' | '{') => {
                depth += 1;
                if depth > max {
                    return Some(depth);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    None
}

impl JobSpec {
    /// Parses a spec from YAML or JSON (JSON when the text starts with `{`), then validates it.
    pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
        // A spec is a few levels deep; a body of nested brackets would keep the parser busy
        // for minutes (200 KB of `[` took 211 s), so depth is checked first, in one pass.
        if let Some(depth) = flow_depth_over(text, MAX_DEPTH) {
            return Err(SpecError(vec![field_error(
                "",
                &format!("the spec nests brackets {depth} deep or more; a job spec needs at most {MAX_DEPTH}"),
            )]));
        }
        let json = text.trim_start().starts_with('{');
        let parsed: Result<JobSpec, FieldError> = if json {
            let mut de = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(&mut de)
                .map_err(|e| field_error(&e.path().to_string(), &e.into_inner().to_string()))
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de)
                .map_err(|e| field_error(&e.path().to_string(), &e.into_inner().to_string()))
                .and_then(|spec| yaml_nulls(text).map(|()| spec))
        };
        let spec = match parsed {
            Ok(spec) => spec,
            Err(first) => return Err(SpecError(every_error(text, json, first))),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks values that the types alone do not (ranges, combinations).
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut errs = Vec::new();
        let mut bad = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.to_string(),
                message,
            })
        };

        match (&self.generate_name, self.name.is_empty()) {
            (Some(_), false) => bad(
                "generate_name",
                "give `name` or `generate_name`, not both".into(),
            ),
            (Some(prefix), true) => {
                // The prefix and a 5-character suffix make a DNS label.
                if let Err(m) = check_dns_label(&format!("{prefix}x")) {
                    bad("generate_name", m);
                } else if prefix.len() > 58 {
                    bad(
                        "generate_name",
                        "may be at most 58 characters (5 are appended)".into(),
                    );
                }
            }
            (None, true) => bad(
                "name",
                "missing: give the job a `name` (or a `generate_name` prefix)".into(),
            ),
            (None, false) => {}
        }
        if self.labels.len() > 64 {
            bad("labels", "at most 64 labels".into());
        }
        for (k, v) in &self.labels {
            if let Err(m) = check_label_key(k) {
                bad(&format!("labels.{k}"), m);
            } else if let Err(m) = check_label_value(v) {
                bad(&format!("labels.{k}"), m);
            }
        }
        if self.name.is_empty() {
            // reported above
        } else if let Err(m) = check_dns_label(&self.name) {
            bad("name", m);
        } else if looks_like_job_id(&self.name) {
            bad(
                "name",
                format!("`{}` has the form of a job id (j + 15 hex digits), which a look-up would take as an id; choose another name", self.name),
            );
        }
        let m = &self.model;
        check_model(&mut bad, "model", m.arch, m.path.as_ref(), m.num_classes);
        if let Some(p) = &m.init {
            check_init(&mut bad, "model.init", p);
        }
        check_prefixes(&mut bad, "model.reset", &m.reset);
        if m.jit_optimize && m.arch != Arch::Torchscript {
            bad(
                "model.jit_optimize",
                "applies to arch: torchscript only; remove it".into(),
            );
        }
        for (i, f) in m.freeze.iter().enumerate() {
            if f.trim().is_empty() || f.ends_with('.') {
                bad(
                    &format!("model.freeze[{i}]"),
                    "must be a parameter-name prefix such as `features` or `layer1.0`".into(),
                );
            }
        }
        for (i, u) in m.unfreeze.iter().enumerate() {
            let at = |f: &str| format!("model.unfreeze[{i}].{f}");
            if u.epoch == 0 {
                bad(&at("epoch"), "must be at least 1: what trains from the first epoch is not frozen (leave it out of model.freeze)".into());
            } else if u.epoch >= self.train.epochs && self.train.epochs > 0 {
                bad(
                    &at("epoch"),
                    format!(
                        "epoch {} never starts: the job trains epochs 0 to {} (train.epochs: {})",
                        u.epoch,
                        self.train.epochs.saturating_sub(1),
                        self.train.epochs
                    ),
                );
            }
            if u.prefixes.is_empty() {
                bad(&at("prefixes"), "must name at least one prefix".into());
            }
            for (k, p) in u.prefixes.iter().enumerate() {
                if !m.freeze.iter().any(|f| under(p, f)) {
                    bad(
                        &format!("model.unfreeze[{i}].prefixes[{k}]"),
                        format!(
                            "`{p}` is not under a model.freeze prefix ({}): only frozen parameters can unfreeze",
                            if m.freeze.is_empty() { "there are none".to_string() } else { m.freeze.join(", ") }
                        ),
                    );
                }
            }
        }

        check_path(&mut bad, "data.train.path", &self.data.train.path);
        if let Some(v) = &self.data.test {
            check_path(&mut bad, "data.test.path", &v.path);
        }
        if let Some(v) = &self.data.val {
            check_path(&mut bad, "data.val.path", &v.path);
        }
        if let Some(s) = self.data.image_size {
            if !(1..=4096).contains(&s) {
                bad(
                    "data.image_size",
                    "must be between 1 and 4096 pixels".into(),
                );
            }
        }
        if let Some(c) = self.data.channels {
            if c != 1 && c != 3 {
                bad("data.channels", "must be 1 (grayscale) or 3 (RGB)".into());
            }
        }
        if let Some(n) = &self.data.normalize {
            if n.mean.len() != n.std.len() || n.mean.is_empty() {
                bad(
                    "data.normalize",
                    "mean and std need one value per channel, the same number of each".into(),
                );
            }
            if n.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
                bad("data.normalize.std", "every value must be positive".into());
            }
        }
        let a = self.data.augmentation();
        if let Some(r) = &a.random_resized_crop {
            let [lo, hi] = r.scale;
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                bad(
                    "data.augment.random_resized_crop.scale",
                    "must be [min, max] with 0 < min <= max <= 1 (shares of the image's area)"
                        .into(),
                );
            }
            let [lo, hi] = r.ratio;
            if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
                bad(
                    "data.augment.random_resized_crop.ratio",
                    "must be [min, max] with 0 < min <= max (width / height)".into(),
                );
            }
            if self.data.image_size.is_none() {
                bad(
                    "data.augment.random_resized_crop",
                    "needs data.image_size (the side the crop is resized to)".into(),
                );
            }
        }
        if let Some(p) = a.hflip {
            if !(0.0..=1.0).contains(&p) {
                bad("data.augment.hflip", "must be a probability, 0 to 1".into());
            }
        }
        if let Some(j) = &a.color_jitter {
            for (f, v) in [
                ("brightness", j.brightness),
                ("contrast", j.contrast),
                ("saturation", j.saturation),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    bad(
                        &format!("data.augment.color_jitter.{f}"),
                        "must be between 0 and 1 (the factor is drawn from [1 - v, 1 + v])".into(),
                    );
                }
            }
        }
        if let Some(r) = self.data.eval_resize {
            match self.data.image_size {
                None => bad(
                    "data.eval_resize",
                    "needs data.image_size (the side of the centre crop)".into(),
                ),
                Some(s) if r < s || r > 8192 => bad(
                    "data.eval_resize",
                    format!("must be between data.image_size ({s}) and 8192"),
                ),
                _ => {}
            }
        }
        if self.data.decode_threads > 256 {
            bad("data.decode_threads", "must be at most 256".into());
        }
        if !(1..=64).contains(&self.data.prefetch_batches) {
            bad("data.prefetch_batches", "must be between 1 and 64".into());
        }

        let t = &self.train;
        if t.epochs > 100_000 {
            bad("train.epochs", "must be between 0 and 100000".into());
        } else if t.epochs == 0 {
            // An evaluation-only job: the model as given, on data.val and data.test.
            let needs = [
                (
                    self.data.val.is_none() && self.data.test.is_none(),
                    "a data.val or data.test set to evaluate",
                ),
                (
                    self.distill.is_some(),
                    "no distill section (nothing trains)",
                ),
                (
                    t.best.is_some() || t.early_stop.is_some(),
                    "no train.best or train.early_stop (there are no epochs to choose from)",
                ),
                (!m.unfreeze.is_empty(), "no model.unfreeze"),
                (t.ema.is_some(), "no train.ema"),
            ];
            for (wrong, what) in needs {
                if wrong {
                    bad(
                        "train.epochs",
                        format!("0 evaluates the model without training, which needs {what}"),
                    );
                }
            }
        }
        if t.batch_size == 0 || t.batch_size > 65_536 {
            bad("train.batch_size", "must be between 1 and 65536".into());
        }
        if t.keep_checkpoints == 0 {
            bad(
                "train.keep_checkpoints",
                "must be at least 1 (a job resumes from its newest checkpoint)".into(),
            );
        }
        if t.max_steps == Some(0) {
            bad("train.max_steps", "must be at least 1".into());
        }
        let o = &t.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            bad(
                "train.optimizer.lr",
                format!("must be a positive number, got {}", o.lr),
            );
        } else if o.lr > 100.0 {
            bad(
                "train.optimizer.lr",
                format!("{} would make the first step diverge; learning rates are at most 100 (usually 1e-5 to 1)", o.lr),
            );
        }
        for (field, wd) in [
            ("train.optimizer.weight_decay", o.weight_decay),
            ("train.optimizer.norm_weight_decay", o.norm_weight_decay),
            ("train.optimizer.bias_weight_decay", o.bias_weight_decay),
        ] {
            if wd.is_some_and(|wd| !(wd >= 0.0 && wd.is_finite())) {
                bad(field, "must be zero or positive".into());
            }
        }
        if self.data.val.is_none() {
            for (field, set) in [
                ("train.best", self.train.best.is_some()),
                ("train.early_stop", self.train.early_stop.is_some()),
            ] {
                if set {
                    bad(
                        field,
                        "needs a validation set (data.val) to measure epochs by".into(),
                    );
                }
            }
        }
        if let Some(e) = &self.train.early_stop {
            if e.patience == 0 {
                bad(
                    "train.early_stop.patience",
                    "must be at least 1 epoch".into(),
                );
            }
            if !(e.min_delta >= 0.0 && e.min_delta.is_finite()) {
                bad(
                    "train.early_stop.min_delta",
                    "must be zero or positive".into(),
                );
            }
        }
        for (i, g) in self.train.param_groups.iter().enumerate() {
            let at = |f: &str| format!("train.param_groups[{i}].{f}");
            if g.prefix.trim().is_empty() {
                bad(&at("prefix"), "must not be empty".into());
            }
            if !(g.lr_mult >= 0.0 && g.lr_mult.is_finite()) {
                bad(
                    &at("lr_mult"),
                    format!("must be zero or positive, got {}", g.lr_mult),
                );
            }
            if g.weight_decay
                .is_some_and(|wd| !(wd >= 0.0 && wd.is_finite()))
            {
                bad(&at("weight_decay"), "must be zero or positive".into());
            }
        }
        match o.name {
            OptimizerName::Sgd => {
                if let Some(mo) = o.momentum {
                    if !(0.0..1.0).contains(&mo) {
                        bad("train.optimizer.momentum", "must be in [0, 1)".into());
                    }
                }
                if o.nesterov == Some(true) && o.momentum.unwrap_or(0.0) <= 0.0 {
                    bad(
                        "train.optimizer.nesterov",
                        "Nesterov momentum needs momentum > 0".into(),
                    );
                }
                if o.betas.is_some() || o.eps.is_some() {
                    bad(
                        "train.optimizer",
                        "betas and eps apply to adamw only".into(),
                    );
                }
            }
            OptimizerName::Adamw => {
                if o.momentum.is_some() || o.nesterov.is_some() {
                    bad(
                        "train.optimizer.momentum",
                        "momentum and nesterov apply to sgd only; adamw takes betas".into(),
                    );
                }
                if let Some([b1, b2]) = o.betas {
                    if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
                        bad(
                            "train.optimizer.betas",
                            "both betas must be in [0, 1)".into(),
                        );
                    }
                }
                if let Some(e) = o.eps {
                    if e.is_nan() || e <= 0.0 {
                        bad("train.optimizer.eps", "must be positive".into());
                    }
                }
            }
        }
        let s = &t.lr_schedule;
        match s.name {
            LrScheduleName::Step => {
                if s.step_size.unwrap_or(0) == 0 {
                    bad(
                        "train.lr_schedule.step_size",
                        "schedule `step` needs step_size >= 1".into(),
                    );
                }
                if let Some(g) = s.gamma {
                    if !(g > 0.0 && g <= 1.0) {
                        bad("train.lr_schedule.gamma", "must be in (0, 1]".into());
                    }
                }
            }
            _ => {
                if s.step_size.is_some() || s.gamma.is_some() {
                    bad(
                        "train.lr_schedule",
                        "step_size and gamma apply to schedule `step` only".into(),
                    );
                }
            }
        }
        if let Some(min) = s.min_lr {
            if s.name != LrScheduleName::Cosine {
                bad(
                    "train.lr_schedule.min_lr",
                    "applies to schedule `cosine` only".into(),
                );
            } else if !(min >= 0.0 && min < o.lr) {
                bad(
                    "train.lr_schedule.min_lr",
                    "must be at least 0 and below train.optimizer.lr".into(),
                );
            }
        }

        if self.resources.ranks == 0 {
            bad("resources.ranks", "must be at least 1".into());
        } else if self.resources.ranks > 256 {
            bad("resources.ranks", "must be at most 256".into());
        }
        if !(self.train.label_smoothing >= 0.0 && self.train.label_smoothing < 1.0) {
            bad(
                "train.label_smoothing",
                format!("must be in [0, 1), got {}", self.train.label_smoothing),
            );
        }
        if !(1..=1024).contains(&self.train.grad_accum_steps) {
            bad(
                "train.grad_accum_steps",
                "must be between 1 and 1024".into(),
            );
        }
        if let Some(ClassWeights::Given(w)) = &self.train.class_weights {
            if w.is_empty()
                || w.iter().any(|w| !(w.is_finite() && *w >= 0.0))
                || w.iter().all(|w| *w == 0.0)
            {
                bad(
                    "train.class_weights",
                    "must be `balanced` or a list of zero or positive weights, one per class, not all zero".into(),
                );
            }
            if self.distill.is_some() {
                bad(
                    "train.class_weights",
                    "does not apply to distillation (its loss has soft targets); remove it".into(),
                );
            }
        }
        if let Some(l) = &self.train.layer_decay {
            if !(l.rate > 0.0 && l.rate <= 1.0) {
                bad(
                    "train.layer_decay.rate",
                    format!("must be in (0, 1], usually 0.65 to 0.9; got {}", l.rate),
                );
            }
            if l.layers.is_empty() {
                bad(
                    "train.layer_decay.layers",
                    "must name at least one module prefix, input side first".into(),
                );
            }
            check_prefixes(&mut bad, "train.layer_decay.layers", &l.layers);
        }
        if let Some(e) = &self.train.ema {
            if !(e.decay > 0.0 && e.decay < 1.0) {
                bad(
                    "train.ema.decay",
                    format!("must be in (0, 1), usually 0.99 to 0.9999; got {}", e.decay),
                );
            }
        }
        if let Some(c) = self.train.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                bad(
                    "train.clip_grad_norm",
                    format!("must be a positive number, got {c}"),
                );
            }
        }
        if !(self.train.bucket_mb > 0.0 && self.train.bucket_mb <= 4096.0) {
            bad("train.bucket_mb", "must be in (0, 4096] megabytes".into());
        }
        let r = &self.resources;
        if r.nodes == 0 || r.nodes > 64 {
            bad("resources.nodes", "must be between 1 and 64".into());
        } else if r.ranks > 0 && !r.ranks.is_multiple_of(r.nodes) {
            bad(
                "resources.nodes",
                format!(
                    "{} ranks cannot be spread evenly over {} nodes; make resources.ranks a multiple of resources.nodes",
                    r.ranks, r.nodes
                ),
            );
        }
        if let Some(min) = r.min_nodes {
            if min == 0 || min > r.nodes {
                bad(
                    "resources.min_nodes",
                    format!("must be between 1 and resources.nodes ({})", r.nodes),
                );
            }
        }
        if let Some(th) = self.resources.threads {
            if th == 0 || th > 1024 {
                bad("resources.threads", "must be between 1 and 1024".into());
            }
        }
        check_path(&mut bad, "output.dir", &self.output.dir);
        if self.restart.max_restarts > 100 {
            bad("restart.max_restarts", "must be at most 100".into());
        }
        if let Some(u) = &self.data.unlabelled {
            check_path(&mut bad, "data.unlabelled.path", &u.path);
        }
        match &self.distill {
            None if self.data.unlabelled.is_some() => bad(
                "data.unlabelled",
                "unlabelled data is learned from a teacher's soft labels; add a distill section"
                    .into(),
            ),
            None => {}
            Some(d) => validate_distill(&mut bad, d, self.data.unlabelled.is_some()),
        }

        if errs.is_empty() {
            Ok(())
        } else {
            Err(SpecError(errs))
        }
    }
}

fn validate_distill(bad: &mut impl FnMut(&str, String), d: &DistillSpec, unlabelled: bool) {
    let t = &d.teacher;
    check_model(
        bad,
        "distill.teacher",
        t.arch,
        t.path.as_ref(),
        t.num_classes,
    );
    if let Some(p) = &t.init {
        check_init(bad, "distill.teacher.init", p);
    }
    if !(1..=16).contains(&t.replicas) {
        bad(
            "distill.teacher.replicas",
            "must be between 1 and 16".into(),
        );
    }
    if t.max_batch.is_some_and(|b| !(1..=65_536).contains(&b)) {
        bad(
            "distill.teacher.max_batch",
            "must be between 1 and 65536".into(),
        );
    }
    if t.threads.is_some_and(|th| th == 0 || th > 1024) {
        bad(
            "distill.teacher.threads",
            "must be between 1 and 1024".into(),
        );
    }
    if t.max_restarts > 100 {
        bad("distill.teacher.max_restarts", "must be at most 100".into());
    }
    if !(d.temperature > 0.0 && d.temperature <= 100.0) {
        bad("distill.temperature", "must be in (0, 100]".into());
    }
    if !(0.0..=1.0).contains(&d.alpha) {
        bad("distill.alpha", "must be in [0, 1]".into());
    } else if d.alpha == 1.0 && unlabelled && d.features.is_empty() {
        bad(
            "distill.alpha",
            "alpha 1 ignores the teacher's soft labels, so data.unlabelled would teach nothing; lower alpha or add distill.features"
                .into(),
        );
    }
    if d.top_k > 65_535 {
        bad(
            "distill.top_k",
            "must be at most 65535 (0 sends every class)".into(),
        );
    }
    if !(1..=3_600_000).contains(&d.deadline_ms) {
        bad(
            "distill.deadline_ms",
            "must be between 1 and 3600000".into(),
        );
    }
    if d.wait_timeout_s == 0 {
        bad("distill.wait_timeout_s", "must be at least 1".into());
    }
    if d.prefetch > 1024 {
        bad("distill.prefetch", "must be at most 1024 steps".into());
    }
    if d.features.len() > 16 {
        bad(
            "distill.features",
            "at most 16 feature terms are supported".into(),
        );
    }
    for (i, f) in d.features.iter().enumerate() {
        for (side, layer) in [("student", &f.student), ("teacher", &f.teacher)] {
            if layer.is_empty() || layer.starts_with('.') || layer.ends_with('.') {
                bad(
                    &format!("distill.features[{i}].{side}"),
                    "must name a module by its PyTorch name, such as `layer3` or `features.6`"
                        .into(),
                );
            }
        }
        if !(f.weight > 0.0 && f.weight <= 1e6) {
            bad(
                &format!("distill.features[{i}].weight"),
                "must be in (0, 1e6]".into(),
            );
        }
    }
}

fn check_model(
    bad: &mut impl FnMut(&str, String),
    section: &str,
    arch: Arch,
    path: Option<&String>,
    num_classes: Option<u32>,
) {
    match (arch, path) {
        (Arch::Torchscript, None) => bad(
            &format!("{section}.path"),
            "arch `torchscript` needs the path of a TorchScript file exported with torch.jit.script or torch.jit.trace".into(),
        ),
        (a, Some(_)) if a.is_builtin() => bad(
            &format!("{section}.path"),
            format!("arch `{}` is built in and takes no path; use arch: torchscript to load a file", arch_name(a)),
        ),
        _ => {}
    }
    match (arch, num_classes) {
        (a, None) if a.is_builtin() => bad(
            &format!("{section}.num_classes"),
            format!(
                "arch `{}` needs num_classes (the size of its head)",
                arch_name(a)
            ),
        ),
        (Arch::Torchscript, Some(_)) => bad(
            &format!("{section}.num_classes"),
            "a TorchScript model has its own head; num_classes applies to built-in archs only"
                .into(),
        ),
        (_, Some(0)) => bad(
            &format!("{section}.num_classes"),
            "must be at least 1".into(),
        ),
        _ => {}
    }
    if let Some(p) = path {
        check_path(bad, &format!("{section}.path"), p);
    }
}

fn check_init(bad: &mut impl FnMut(&str, String), field: &str, init: &InitSpec) {
    let p = init.path();
    let at = match init {
        InitSpec::Path(_) => field.to_string(),
        InitSpec::Select(_) => format!("{field}.path"),
    };
    check_path(bad, &at, p);
    if !p.ends_with(".safetensors") {
        let hint = if p.ends_with(".pth") || p.ends_with(".pt") || p.ends_with(".bin") {
            "a PyTorch pickle is code, and ferry does not run it: convert it once with \
             safetensors.torch.save_file(torch.load(p, weights_only=True), \"model.safetensors\")"
        } else {
            "export it with safetensors.torch.save_file(model.state_dict(), ...)"
        };
        bad(&at, format!("must be a .safetensors file; {hint}"));
    }
    if let InitSpec::Select(s) = init {
        check_prefixes(bad, &format!("{field}.include"), &s.include);
        check_prefixes(bad, &format!("{field}.exclude"), &s.exclude);
        for from in s.rename.keys() {
            if from.is_empty() {
                bad(&format!("{field}.rename"), "a prefix to rename must not be empty (to add a prefix to every name, rename the names' first part)".into());
            }
        }
    }
}

/// Module prefixes (`model.reset`, `include`, `exclude`): not empty.
fn check_prefixes(bad: &mut impl FnMut(&str, String), field: &str, prefixes: &[String]) {
    for (i, p) in prefixes.iter().enumerate() {
        if p.trim().is_empty() {
            bad(&format!("{field}[{i}]"), "must not be empty".into());
        }
    }
}

/// The spec's spelling of an architecture.
pub fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::Torchscript => "torchscript",
        Arch::Resnet18 => "resnet18",
        Arch::Resnet50 => "resnet50",
        Arch::Cnn => "cnn",
        Arch::Mlp => "mlp",
    }
}

fn check_path(bad: &mut impl FnMut(&str, String), field: &str, p: &str) {
    if p.trim().is_empty() {
        bad(field, "must not be empty".into());
    } else if p.contains('\0') {
        bad(field, "must not contain NUL bytes".into());
    }
}

/// Whether `s` has the form of a job id (`j` and 15 lowercase hex digits).
pub fn looks_like_job_id(s: &str) -> bool {
    s.len() == 16
        && s.starts_with('j')
        && s[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn check_dns_label(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ends_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 63 || !ok_chars || !ends_ok {
        return Err(format!(
            "`{name}` is not a DNS label: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// YAML hands a string field the text `null` for a null (`dir: null`, `dir: ~`, `dir:`), so
/// the spec would name a directory "null": read as a plain document, a null where a string
/// goes is the error it is. (Numbers and booleans where a string goes stay accepted as their
/// text, as YAML users write `tier: 1`.)
fn yaml_nulls(text: &str) -> Result<(), FieldError> {
    let Ok(doc) = serde_yaml_ng::from_str::<serde_json::Value>(text) else {
        return Ok(());
    };
    match serde_path_to_error::deserialize::<_, JobSpec>(&doc) {
        Err(e) if e.inner().to_string().starts_with("invalid type: null") => Err(field_error(
            &e.path().to_string(),
            &e.into_inner().to_string(),
        )),
        _ => Ok(()),
    }
}

/// Every error of a spec that does not parse, the first (`first`, with its line and
/// column) included: the text is read as a plain document, and each field in error is
/// noted and taken out until the rest parses, so that one request reports them all. Errors
/// that only the removals caused (a required field taken out) are not reported; nor are
/// errors after a syntax error, which leaves no document to read.
fn every_error(text: &str, json: bool, first: FieldError) -> Vec<FieldError> {
    let mut errs = vec![first];
    let doc: Option<serde_json::Value> = if json {
        serde_json::from_str(text).ok()
    } else {
        serde_yaml_ng::from_str(text).ok()
    };
    let Some(mut doc) = doc else { return errs };
    // Fields taken out (dotted), so that their absence is not reported as missing.
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, JobSpec>(&doc) {
            Ok(spec) => {
                let outside = |f: &str| {
                    !removed
                        .iter()
                        .any(|r| f == r || f.starts_with(&format!("{r}.")))
                };
                if let Err(SpecError(more)) = spec.validate() {
                    for e in more.into_iter().filter(|e| outside(&e.field)) {
                        if !errs.iter().any(|x| x.field == e.field) {
                            errs.push(e);
                        }
                    }
                }
                return errs;
            }
            Err(e) => field_error(&e.path().to_string(), &e.into_inner().to_string()),
        };
        let ours = err.message.starts_with("missing field `") && removed.contains(&err.field);
        // A missing field: its section cannot be read; take the section out instead.
        let target = if err.message.starts_with("missing field `") {
            err.field.rsplit_once('.').map(|(p, _)| p.to_string())
        } else {
            Some(err.field.clone()).filter(|f| f != "(document)")
        };
        if !ours && !errs.iter().any(|x| x.field == err.field) {
            errs.push(err);
        }
        let Some(target) = target else { return errs };
        if !remove_at(&mut doc, &target) {
            return errs;
        }
        removed.push(target);
    }
    errs
}

/// Takes the node at dotted `path` (`train.optimizer.lr`, `data.normalize.mean[1]`) out of
/// `doc`; false if there is none.
fn remove_at(doc: &mut serde_json::Value, path: &str) -> bool {
    let mut parts: Vec<String> = Vec::new();
    for seg in path.split('.') {
        let mut rest = seg;
        while let Some(open) = rest.find('[') {
            if open > 0 {
                parts.push(rest[..open].to_string());
            }
            let close = rest[open..].find(']').map_or(rest.len(), |c| open + c);
            parts.push(rest[open..=close.min(rest.len() - 1)].to_string());
            rest = rest.get(close + 1..).unwrap_or("");
        }
        if !rest.is_empty() {
            parts.push(rest.to_string());
        }
    }
    let Some((last, parents)) = parts.split_last() else {
        return false;
    };
    let mut node = doc;
    for p in parents {
        let next = match p.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
            Some(i) => i.parse::<usize>().ok().and_then(|i| node.get_mut(i)),
            None => node.get_mut(p.as_str()),
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match last.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
        Some(i) => match (i.parse::<usize>(), node.as_array_mut()) {
            (Ok(i), Some(a)) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        None => node
            .as_object_mut()
            .is_some_and(|o| o.remove(last.as_str()).is_some()),
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of 1-63 letters,
/// digits, `-`, `_` and `.`, starting and ending with a letter or digit (as Kubernetes).
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok =
            !p.is_empty() && p.len() <= 253 && p.split('.').all(|l| check_dns_label(l).is_ok());
        if !ok {
            return Err(format!(
                "the prefix of label `{key}` must be a DNS subdomain (lower-case labels joined by '.')"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("label `{key}` has no name"));
    }
    check_label_value(name).map_err(|_| {
        format!("label key `{key}`: the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    })
}

/// A label value: empty, or 1-63 letters, digits, `-`, `_` and `.`, starting and ending with
/// a letter or digit.
pub fn check_label_value(v: &str) -> Result<(), String> {
    let ok = v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!("label value `{v}` must be empty or 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))
    }
}

/// Turns a serde message at `path` into a field error; `unknown field`/`missing field`
/// messages name the field inside the path, so it is appended.
fn field_error(path: &str, message: &str) -> FieldError {
    let mut field = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    for marker in ["unknown field `", "missing field `"] {
        if let Some(rest) = message.strip_prefix(marker) {
            if let Some(name) = rest.split('`').next() {
                if !field.ends_with(name) {
                    field = if field.is_empty() {
                        name.to_string()
                    } else {
                        format!("{field}.{name}")
                    };
                }
            }
        }
    }
    // serde_yaml prefixes the path (already in `field`) and appends " at line L column C";
    // drop the first, keep the second: it helps find the spot.
    let message = message
        .strip_prefix(&format!("{path}: "))
        .unwrap_or(message);
    FieldError {
        field: if field.is_empty() {
            "(document)".into()
        } else {
            field
        },
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("model: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let e = JobSpec::parse(&deep).unwrap_err();
        assert!(
            e.0[0].message.contains("nests brackets 33 deep"),
            "{:?}",
            e.0
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let json = format!("{}{}", "{\"a\":".repeat(40), "}".repeat(40));
        assert!(JobSpec::parse(&json).unwrap_err().0[0]
            .message
            .contains("nests"));
        // Brackets in strings and comments, and apostrophes in plain text, do not count.
        assert_eq!(
            flow_depth_over(
                &format!(
                    "a: '{}'\nb: \"{}\"\n# {}\n",
                    "[".repeat(50),
                    "{".repeat(50),
                    "[".repeat(50)
                ),
                32
            ),
            None
        );
        assert_eq!(flow_depth_over("name: don't\nx: [[1]]\n", 32), None);
        assert_eq!(
            flow_depth_over(&format!("name: don't\nx: {}\n", "[".repeat(40)), 32),
            Some(33)
        );
    }

    const GOOD: &str = r#"
name: digits-target
model:
  arch: torchscript
  path: models/student.pt
  init: models/source.safetensors
  freeze: [features]
data:
  train: {path: data/train.safetensors}
  val: {path: data/val}
  image_size: 32
train:
  epochs: 20
  batch_size: 32
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}
  lr_schedule: {name: cosine, warmup_steps: 0}
  seed: 0
  checkpoint_every_steps: 100
resources:
  ranks: 1
  device: cpu
output:
  dir: runs/digits-target
"#;

    fn errors(text: &str) -> Vec<FieldError> {
        JobSpec::parse(text).expect_err("spec should be rejected").0
    }

    #[test]
    fn model_init_chooses_tensors_by_prefix_after_renames_and_refuses_pickles() {
        let spec = JobSpec::parse(&GOOD.replace(
            "  init: models/source.safetensors",
            "  init: {path: models/source.safetensors, rename: {\"module.\": \"\", \"module.backbone.\": \"features.\"}, exclude: [classifier]}\n  reset: [features.7]",
        ))
        .unwrap();
        let init = spec.model.init.as_ref().unwrap();
        assert_eq!(init.path(), "models/source.safetensors");
        assert_eq!(spec.model.reset, ["features.7"]);
        // The longest matching prefix wins; names outside every prefix stay.
        assert_eq!(init.rename("module.backbone.0.weight"), "features.0.weight");
        assert_eq!(init.rename("module.classifier.bias"), "classifier.bias");
        assert_eq!(init.rename("other.weight"), "other.weight");
        assert!(init.keeps("features.0.weight"));
        assert!(!init.keeps("classifier.bias"));
        // Prefixes are module boundaries.
        assert!(under("features.0.weight", "features") && under("features.0.weight", "features."));
        assert!(!under("features_extra.weight", "features"));
        assert!(under("fc", "fc") && !under("fc2.weight", "fc"));
        // A plain path keeps everything; the spec round-trips as written.
        let plain = JobSpec::parse(GOOD).unwrap();
        assert!(plain.model.init.as_ref().unwrap().keeps("anything"));
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(JobSpec::parse(&json).unwrap(), spec);
        // A pickle is refused with the one-line conversion; unknown keys and empty prefixes too.
        let e = errors(&GOOD.replace("models/source.safetensors", "models/source.pth"));
        assert_eq!(e[0].field, "model.init");
        assert!(
            e[0].message.contains("a PyTorch pickle is code")
                && e[0].message.contains("weights_only=True"),
            "{e:?}"
        );
        let e = errors(&GOOD.replace(
            "  init: models/source.safetensors",
            "  init: {path: a.bin, include: ['']}\n  reset: ['']",
        ));
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["model.init.path", "model.init.include[0]", "model.reset[0]"],
            "{e:?}"
        );
        assert!(JobSpec::parse(&GOOD.replace(
            "  init: models/source.safetensors",
            "  init: {path: a.safetensors, exclud: [fc]}"
        ))
        .is_err());
    }

    #[test]
    fn every_error_of_a_spec_that_does_not_parse_comes_back_at_once() {
        // Unknown fields at two levels, a wrong type, a wrong enum value, and a value that
        // parses but is out of range: five errors, in YAML and in JSON.
        let bad = GOOD
            .replace("  seed: 0", "  seed: 0\n  bogus: 1\n  precision: fp8")
            .replace("  batch_size: 32", "  batch_size: lots")
            .replace("  epochs: 20", "  epochs: 200000")
            .replace("resources:", "extra: 1\nresources:");
        let fields = |e: Vec<FieldError>| {
            let mut f: Vec<String> = e.into_iter().map(|e| e.field).collect();
            f.sort();
            f
        };
        let want = [
            "extra",
            "train.batch_size",
            "train.bogus",
            "train.epochs",
            "train.precision",
        ];
        assert_eq!(fields(errors(&bad)), want);
        let doc: serde_json::Value = serde_yaml_ng::from_str(&bad).unwrap();
        assert_eq!(fields(errors(&doc.to_string())), want);
        // A wrong type and a value check elsewhere; a missing required section is reported
        // once, and nothing its absence causes.
        let e = errors(
            &GOOD
                .replace("  path: models/student.pt\n", "")
                .replace("  epochs: 20", "  epochs: x"),
        );
        assert_eq!(
            fields(e),
            ["model.path", "train.epochs"],
            "a wrong type, then what validation finds in the rest"
        );
        let e = errors(
            &GOOD
                .replace("output:\n  dir: runs/digits-target\n", "")
                .replace("  seed: 0", "  seed: -1"),
        );
        assert_eq!(fields(e), ["output", "train.seed"]);
        // A syntax error: that one alone (there is no document to read on).
        assert_eq!(errors("name: [a\nmodel: {").len(), 1);
    }

    #[test]
    fn a_yaml_null_is_not_the_string_null() {
        for null in ["null", "~", ""] {
            let e = errors(&GOOD.replace("  dir: runs/digits-target", &format!("  dir: {null}")));
            assert_eq!(e[0].field, "output.dir", "{null}: {e:?}");
        }
        let labelled = GOOD.replace("name: digits-target", "name: a\nlabels: {tier: 1}");
        assert_eq!(JobSpec::parse(&labelled).unwrap().labels["tier"], "1");
    }

    #[test]
    fn unfreezing_accumulation_class_weights_and_ema_are_checked() {
        let with = |extra: &str| GOOD.replace("  seed: 0", &format!("  seed: 0\n{extra}"));
        let model = |extra: &str| {
            GOOD.replace(
                "  freeze: [features]",
                &format!("  freeze: [features]\n{extra}"),
            )
        };
        let s = JobSpec::parse(&model(
            "  unfreeze: [{epoch: 3, prefixes: [features.6, features.7]}]",
        ))
        .unwrap();
        assert_eq!(s.model.unfreeze_prefixes(), ["features.6", "features.7"]);
        let s = JobSpec::parse(&with(
            "  grad_accum_steps: 4\n  class_weights: balanced\n  ema: {decay: 0.999}",
        ))
        .unwrap();
        assert_eq!(s.train.grad_accum_steps, 4);
        assert_eq!(
            s.train.class_weights,
            Some(ClassWeights::Rule(ClassWeightRule::Balanced))
        );
        assert_eq!(s.train.ema, Some(EmaSpec { decay: 0.999 }));
        let s = JobSpec::parse(&with("  class_weights: [1, 2.5]")).unwrap();
        assert_eq!(
            s.train.class_weights,
            Some(ClassWeights::Given(vec![1.0, 2.5]))
        );
        for (bad, field) in [
            (
                model("  unfreeze: [{epoch: 0, prefixes: [features]}]"),
                "model.unfreeze[0].epoch",
            ),
            (
                model("  unfreeze: [{epoch: 20, prefixes: [features]}]"),
                "model.unfreeze[0].epoch",
            ),
            (
                model("  unfreeze: [{epoch: 2, prefixes: [classifier]}]"),
                "model.unfreeze[0].prefixes[0]",
            ),
            (
                model("  unfreeze: [{epoch: 2, prefixes: []}]"),
                "model.unfreeze[0].prefixes",
            ),
            (with("  grad_accum_steps: 0"), "train.grad_accum_steps"),
            (with("  class_weights: [0, 0]"), "train.class_weights"),
            (with("  class_weights: [1, -1]"), "train.class_weights"),
            (with("  ema: {decay: 1.0}"), "train.ema.decay"),
        ] {
            assert_eq!(errors(&bad)[0].field, field, "{bad}");
        }
        // A typo in the rule is not taken for a list.
        assert!(JobSpec::parse(&with("  class_weights: balance")).is_err());
    }

    #[test]
    fn label_smoothing_and_clipping_are_bounded() {
        let with = |extra: &str| GOOD.replace("  seed: 0", &format!("  seed: 0\n{extra}"));
        let s = JobSpec::parse(&with("  label_smoothing: 0.1\n  clip_grad_norm: 1.0")).unwrap();
        assert_eq!(
            (s.train.label_smoothing, s.train.clip_grad_norm),
            (0.1, Some(1.0))
        );
        for (bad, field) in [
            ("  label_smoothing: 1.0", "train.label_smoothing"),
            ("  label_smoothing: -0.1", "train.label_smoothing"),
            ("  clip_grad_norm: 0", "train.clip_grad_norm"),
            ("  clip_grad_norm: -2", "train.clip_grad_norm"),
        ] {
            assert_eq!(errors(&with(bad))[0].field, field, "{bad}");
        }
    }

    #[test]
    fn generate_name_and_labels_are_checked() {
        let gen = GOOD.replace("name: digits-target", "generate_name: sweep-");
        let s = JobSpec::parse(&gen).unwrap();
        assert_eq!(
            (s.name.as_str(), s.generate_name.as_deref()),
            ("", Some("sweep-"))
        );
        let both = GOOD.replace("name: digits-target", "name: a\ngenerate_name: b-");
        assert_eq!(errors(&both)[0].field, "generate_name");
        let none = GOOD.replace("name: digits-target\n", "");
        assert_eq!(errors(&none)[0].field, "name");
        assert_eq!(
            errors(&GOOD.replace("name: digits-target", "generate_name: Bad_"))[0].field,
            "generate_name"
        );
        let labelled = GOOD.replace(
            "name: digits-target",
            "name: a\nlabels: {team: vision, ferry.dev/tier: gold, empty: ''}",
        );
        assert_eq!(JobSpec::parse(&labelled).unwrap().labels.len(), 3);
        for bad in ["'-x': a", "a: 'b c'", "'Bad Prefix/x': a", "a: -lead"] {
            let spec = GOOD.replace(
                "name: digits-target",
                &format!("name: a\nlabels: {{{bad}}}"),
            );
            assert!(errors(&spec)[0].field.starts_with("labels."), "{bad}");
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!(s.model.arch, Arch::Torchscript);
        assert_eq!(s.model.freeze, vec!["features"]);
        assert_eq!(s.train.optimizer.momentum, Some(0.9));
        assert_eq!(s.train.lr_schedule.name, LrScheduleName::Cosine);
        assert!(s.data.shuffle);
        assert_eq!(s.train.precision, Precision::Fp32);
        let bf16 =
            JobSpec::parse(&GOOD.replace("  seed: 0", "  seed: 0\n  precision: bf16")).unwrap();
        assert_eq!(bf16.train.precision, Precision::Bf16);
        let e = errors(&GOOD.replace("  seed: 0", "  seed: 0\n  precision: fp8"));
        assert_eq!(e[0].field, "train.precision");
        assert_eq!(s.train.overlap_grad_sync, OverlapGradSync::Auto);
        assert_eq!(s.train.grad_compression, GradCompression::None);
        let bf16 = GOOD.replace("  seed: 0", "  seed: 0\n  grad_compression: bf16");
        assert_eq!(
            JobSpec::parse(&bf16).unwrap().train.grad_compression,
            GradCompression::Bf16
        );
        let e = errors(&GOOD.replace("  seed: 0", "  seed: 0\n  grad_compression: int8"));
        assert_eq!(e[0].field, "train.grad_compression", "{e:?}");
        let never = GOOD.replace("  seed: 0", "  seed: 0\n  overlap_grad_sync: never");
        assert_eq!(
            JobSpec::parse(&never).unwrap().train.overlap_grad_sync,
            OverlapGradSync::Never
        );
        let e = errors(&GOOD.replace("  seed: 0", "  seed: 0\n  overlap_grad_sync: true"));
        assert_eq!(e[0].field, "train.overlap_grad_sync", "{e:?}");
        assert!(!s.model.jit_optimize);
        let jit = GOOD.replace(
            "  freeze: [features]",
            "  freeze: [features]\n  jit_optimize: true",
        );
        assert!(JobSpec::parse(&jit).unwrap().model.jit_optimize);
        let e = errors(
            &jit.replace("arch: torchscript", "arch: resnet18")
                .replace("  path: models/student.pt\n", "  num_classes: 10\n"),
        );
        assert_eq!(e[0].field, "model.jit_optimize", "{e:?}");
    }

    #[test]
    fn json_and_yaml_give_the_same_spec() {
        let s = JobSpec::parse(GOOD).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(JobSpec::parse(&json).unwrap(), s);
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = errors(&GOOD.replace("  seed: 0", "  sede: 0"));
        assert_eq!(e[0].field, "train.sede", "{e:?}");
        assert!(e[0].message.contains("unknown field"));
        let e = errors(&GOOD.replace("{name: sgd,", "{name: sgd, lrr: 1,"));
        assert_eq!(e[0].field, "train.optimizer.lrr", "{e:?}");
    }

    #[test]
    fn wrong_types_and_variants_are_named() {
        let e = errors(&GOOD.replace("batch_size: 32", "batch_size: many"));
        assert_eq!(e[0].field, "train.batch_size", "{e:?}");
        let e = errors(&GOOD.replace("name: sgd", "name: lbfgs"));
        assert_eq!(e[0].field, "train.optimizer.name", "{e:?}");
        assert!(e[0].message.starts_with("unknown variant `lbfgs`"), "{e:?}");
    }

    #[test]
    fn missing_fields_are_named() {
        let e = errors(&GOOD.replace("output:\n  dir: runs/digits-target\n", ""));
        assert_eq!(e[0].field, "output", "{e:?}");
        let e = errors(
            r#"{"name": "x", "model": {"arch": "cnn", "num_classes": 2}, "data": {}, "output": {"dir": "o"}}"#,
        );
        assert_eq!(e[0].field, "data.train", "{e:?}");
    }

    #[test]
    fn values_are_validated_with_their_field() {
        let e = errors(
            &GOOD
                .replace("lr: 0.05", "lr: -1")
                .replace("name: digits-target", "name: Digits_Target"),
        );
        let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["name", "train.optimizer.lr"]);
        let e = errors(&GOOD.replace("lr: 0.05", "lr: 1e308"));
        assert_eq!(e[0].field, "train.optimizer.lr", "{e:?}");
        let e = errors(&GOOD.replace("name: digits-target", "name: j0192af33bc10f2e"));
        assert_eq!(e[0].field, "name", "{e:?}");
        assert!(e[0].message.contains("form of a job id"), "{e:?}");
        let e = errors(&GOOD.replace("arch: torchscript", "arch: cnn"));
        let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["model.path", "model.num_classes"]);
        // Several CUDA ranks are valid specs; the node decides whether it has the GPUs.
        assert!(JobSpec::parse(
            &GOOD
                .replace("ranks: 1", "ranks: 4")
                .replace("device: cpu", "device: cuda"),
        )
        .is_ok());
        assert!(JobSpec::parse(&GOOD.replace("ranks: 1", "ranks: 4")).is_ok());
        let e = errors(&GOOD.replace("{name: cosine, warmup_steps: 0}", "{name: step}"));
        assert_eq!(e[0].field, "train.lr_schedule.step_size");
        let e = errors(&GOOD.replace("momentum: 0.9", "betas: [0.9, 0.99]"));
        assert_eq!(e[0].field, "train.optimizer");
    }

    #[test]
    fn distillation_specs_are_validated() {
        let with = |d: &str| format!("{GOOD}distill:\n{d}");
        let s = JobSpec::parse(&with(
            "  teacher: {arch: torchscript, path: models/teacher.pt}\n",
        ))
        .unwrap();
        let d = s.distill.unwrap();
        assert_eq!((d.temperature, d.alpha, d.top_k), (4.0, 0.5, 10));
        assert_eq!(d.on_teacher_failure, OnTeacherFailure::Wait);
        assert_eq!(d.mode, DistillMode::Index);
        assert_eq!(d.teacher.replicas, 1);
        let s = JobSpec::parse(&with(
            "  teacher: {arch: cnn, num_classes: 4, init: models/t.safetensors, replicas: 2}\n  on_teacher_failure: hard-labels\n  mode: tensor\n  top_k: 0\n",
        ))
        .unwrap();
        assert_eq!(
            s.distill.as_ref().unwrap().on_teacher_failure,
            OnTeacherFailure::HardLabels
        );
        let e = errors(&with(
            "  teacher: {arch: cnn, path: x.pt}\n  alpha: 1.5\n  temperature: 0\n",
        ));
        let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "distill.teacher.path",
                "distill.teacher.num_classes",
                "distill.temperature",
                "distill.alpha"
            ]
        );
        let e = errors(&with(
            "  teacher: {arch: mlp, num_classes: 4}\n  on_teacher_failure: retry\n",
        ));
        assert_eq!(e[0].field, "distill.on_teacher_failure", "{e:?}");
        // Unlabelled data needs a teacher, and a teacher that counts.
        let pool = GOOD.replace(
            "  image_size: 32",
            "  image_size: 32\n  unlabelled: {path: data/pool.safetensors}",
        );
        let e = errors(&pool);
        assert_eq!(e[0].field, "data.unlabelled");
        let e = errors(&format!(
            "{pool}distill:\n  teacher: {{arch: mlp, num_classes: 4}}\n  alpha: 1\n"
        ));
        assert_eq!(e[0].field, "distill.alpha");
    }

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("a").is_ok());
        assert!(check_dns_label("digits-5-9").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", &"x".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }
}
