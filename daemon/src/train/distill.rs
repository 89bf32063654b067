//! Knowledge distillation in the training runtime: the student's side (soft labels from
//! the teacher service, the loss) and the teacher process (`ferryd teacher`), which serves
//! soft labels computed by the teacher model.
//!
//! # The loss
//! Per sample `i`, with student logits `s`, teacher soft labels `q` (the teacher's
//! `softmax(z/T)`, top-k classes renormalised to sum to 1, the rest 0) and hard label `y`:
//!
//! `l_i = alpha * CE(s, y) * [y labelled] + (1 - alpha) * T^2 * KL(q || softmax(s/T))`,
//! `KL(q || p) = sum_c q_c (log q_c - log p_c)` (classes with `q_c = 0` add nothing),
//!
//! and the step's loss is `sum_i l_i / n` over the `n` samples of the batch. Unlabelled
//! samples have no CE term. On a step with no soft labels (`on_teacher_failure:
//! hard-labels`), `l_i = CE(s, y) * [y labelled]`, averaged over the `n` samples the same way.
//! Dividing by the batch size (not the labelled count) keeps data-parallel averaging exact.
//!
//! # Feature distillation
//! Each `distill.features` term adds `w * l_f,i` to `l_i`, where `l_f,i` compares the output
//! `a` of the student's module with the output `b` of the teacher's (both per sample):
//! - `mse`: `mean((h(a) - b)^2)` over the activation's values, where `h` is the hint layer
//!   (a 1×1 convolution for `C×H×W` activations, a linear map for vectors, both with a bias)
//!   when the channel counts differ, and the identity when they match. Hint layers are
//!   initialised as PyTorch initialises a new `Conv2d`/`Linear` right after
//!   `torch.manual_seed(train.seed)`, in the terms' order; they train with the student (and
//!   are checkpointed with it) but are not part of the saved model.
//! - `attention` (Zagoruyko & Komodakis): `mean((q(a) - q(b))^2)` over the spatial positions,
//!   `q(x) = v / |v|` with `v` the channel mean of `x^2`, flattened; widths may differ.
//!
//! The teacher computes `b` (or `q(b)`, `H×W` values instead of `C×H×W`) and sends it with
//! the soft label as f16: see [`ferry_cluster::distill`].

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_cluster::distill::client::{Client, ClientConfig, Directory};
use ferry_cluster::distill::server::{serve, ServerStats, Teacher};
use ferry_cluster::distill::{dense_targets, encode_dense, encode_topk, Inputs, SoftLabels};
use ferry_cluster::spec::{DistillMode, DistillSpec, FeatureLoss, Precision};
use tch::{Device, Kind, Tensor};

use super::data::Dataset;
use super::model::{default_init_bound, Model, AUX_PREFIX};
use super::pipeline::batch_now;
use super::transform::View;
use crate::protocol::{DistillProgress, WorkerMessage, WorkerPlan};

/// The soft-label cache the ranks of a job on one node share, in the node's scratch dir
/// for the job.
pub const CACHE_FILE: &str = ".softlabels.cache";

/// The distillation loss (see the module docs). `labels` holds -1 for unlabelled samples;
/// `targets` is `n × classes`, each row a distribution.
pub fn loss(
    logits: &Tensor,
    labels: &Tensor,
    targets: Option<&Tensor>,
    alpha: f64,
    temperature: f64,
) -> Tensor {
    let n = logits.size()[0].max(1) as f64;
    let labelled = labels.ge(0).to_kind(Kind::Float);
    let ce = -logits
        .log_softmax(1, Kind::Float)
        .gather(1, &labels.clamp_min(0).unsqueeze(1), false)
        .squeeze_dim(1)
        * labelled;
    match targets {
        None => ce.sum(Kind::Float) / n,
        Some(q) => {
            let log_p = (logits / temperature).log_softmax(1, Kind::Float);
            let kl = (q * (q.clamp_min(1e-30).log() - log_p)).sum_dim_intlist(
                [1i64].as_slice(),
                false,
                Kind::Float,
            );
            let t2 = temperature * temperature;
            (ce * alpha + kl * ((1.0 - alpha) * t2)).sum(Kind::Float) / n
        }
    }
}

/// The step key of the request that learns the shapes of the teacher's activations.
const PROBE_KEY: u64 = u64::MAX;

/// A student rank's connection to the teacher service.
pub struct Student {
    client: Client,
    spec: DistillSpec,
    /// The training set (tensor mode sends its images, as the student sees them).
    data: Arc<Dataset>,
    started: Instant,
    /// Per `distill.features` term: its hint layer (weight, bias) where widths differ.
    hints: Vec<Option<(Tensor, Tensor)>>,
    /// Per term: one sample's shape of what the teacher sends.
    teacher_shapes: Vec<Vec<i64>>,
}

/// What a step learns from the teacher: soft labels (`n × classes`) and, per
/// `distill.features` term, the teacher's activation (`n × shape`).
pub struct Targets {
    pub soft: Tensor,
    pub features: Vec<Tensor>,
}

impl Targets {
    /// The targets with `f` applied to each tensor's rows (to pick the samples a batch
    /// kept, or a micro-batch's).
    pub fn rows(&self, f: impl Fn(&Tensor) -> Tensor) -> Targets {
        Targets {
            soft: f(&self.soft),
            features: self.features.iter().map(&f).collect(),
        }
    }
}

/// The attention map of activations `x` (`n × C × ...`): the channel mean of `x^2`,
/// flattened and L2-normalised per sample.
pub fn attention_map(x: &Tensor) -> Tensor {
    let v = x
        .pow_tensor_scalar(2)
        .mean_dim([1i64].as_slice(), false, Kind::Float)
        .flatten(1, -1);
    let norm = v
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    v / norm
}

/// `x` as `n × rest` (a sample's values in a row).
fn rows_of(x: &Tensor) -> Tensor {
    x.flatten(1, -1)
}

impl Student {
    /// Waits for a teacher replica (up to `wait_timeout_s`), then is ready to fetch.
    pub fn connect(
        spec: &DistillSpec,
        teachers: Directory,
        train: &Arc<Dataset>,
        scratch: &Path,
    ) -> Result<Student> {
        // One cache file for the job's ranks on this node, keyed by sample: with
        // augmentation every epoch has another view of a sample, so there is none.
        let augments = train.transform.augments();
        let cache = (spec.cache && !augments).then(|| (train.len(), scratch.join(CACHE_FILE)));
        let client = Client::new(
            ClientConfig {
                deadline: Duration::from_millis(spec.deadline_ms),
                policy: spec.on_teacher_failure,
                wait_timeout: Duration::from_secs(spec.wait_timeout_s),
                cache,
            },
            teachers,
        );
        client.wait_for_teachers(Duration::from_secs(spec.wait_timeout_s))?;
        Ok(Student {
            client,
            spec: spec.clone(),
            data: train.clone(),
            started: Instant::now(),
            hints: Vec::new(),
            teacher_shapes: Vec::new(),
        })
    }

    /// Feature distillation: makes `model` report the student modules' outputs, learns the
    /// shapes of the teacher's activations (one sample asked for), and adds the hint layers
    /// where widths differ (seeded by `seed`, see the module docs) to the model's
    /// parameters. Returns a line per term for the job's events.
    pub fn attach_features(&mut self, model: &mut Model, seed: u64) -> Result<Vec<String>> {
        let terms = self.spec.features.clone();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = terms.iter().map(|f| f.student.clone()).collect();
        model
            .set_taps(&names)
            .context("distill.features: a student module")?;
        let src = source(self.spec.mode, &self.data, View::Eval);
        let labels = self
            .client
            .take(PROBE_KEY, &[0], &src)?
            .context("distill.features: no teacher answered the first request, so the shapes of its activations are unknown; is the teacher up?")?;
        if labels.features.len() != terms.len() {
            bail!(
                "the teacher sends {} feature activations and distill.features has {} terms; do students and teacher run the same spec?",
                labels.features.len(),
                terms.len()
            );
        }
        // One sample's shape of each student module's output.
        let (c, h, w) = self.data.shape();
        let device = model.device();
        model.set_train(false)?;
        let (_, acts) = tch::no_grad(|| {
            model.forward_taps(&Tensor::zeros([1, c, h, w], (Kind::Float, device)), false)
        })?;
        tch::manual_seed(seed as i64);
        let mut lines = Vec::new();
        let mut aux = Vec::new();
        for (i, ((f, a), t)) in terms.iter().zip(&acts).zip(&labels.features).enumerate() {
            let s_shape = a.size()[1..].to_vec();
            let t_shape: Vec<i64> = t.iter().map(|&d| i64::from(d)).collect();
            let dims = |v: &[i64]| {
                v.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("×")
            };
            let what = format!(
                "distill.features[{i}]: the student's `{}` gives {} a sample, the teacher's `{}` {}",
                f.student,
                dims(&s_shape),
                f.teacher,
                if f.loss == FeatureLoss::Attention {
                    format!("an attention map of {}", dims(&t_shape))
                } else {
                    dims(&t_shape)
                }
            );
            let hint = match f.loss {
                FeatureLoss::Attention => {
                    if s_shape.len() < 2 || s_shape[1..] != t_shape[..] {
                        bail!("{what}; attention needs activations of the same spatial size (C×H×W with the same H×W); pick layers at the same resolution");
                    }
                    None
                }
                FeatureLoss::Mse => {
                    let same_rest = s_shape.len() == t_shape.len() && s_shape[1..] == t_shape[1..];
                    if !same_rest || !(s_shape.len() == 1 || s_shape.len() == 3) {
                        bail!("{what}; mse needs vectors, or C×H×W activations of the same H×W (a hint layer maps the student's channels to the teacher's); pick layers at the same resolution");
                    }
                    (s_shape[0] != t_shape[0]).then(|| {
                        let (cs, ct) = (s_shape[0], t_shape[0]);
                        let shape: Vec<i64> = if s_shape.len() == 3 {
                            vec![ct, cs, 1, 1]
                        } else {
                            vec![ct, cs]
                        };
                        // As PyTorch initialises a new Conv2d/Linear: weight, then bias.
                        let b = default_init_bound(&shape);
                        let (weight, bias) = tch::no_grad(|| {
                            let mut wt = Tensor::zeros(&shape[..], (Kind::Float, device));
                            let _ = wt.uniform_(-b, b);
                            let mut bs = Tensor::zeros([ct], (Kind::Float, device));
                            let _ = bs.uniform_(-b, b);
                            (wt.set_requires_grad(true), bs.set_requires_grad(true))
                        });
                        aux.push((
                            format!("{AUX_PREFIX}hint{i}.weight"),
                            weight.shallow_clone(),
                        ));
                        aux.push((format!("{AUX_PREFIX}hint{i}.bias"), bias.shallow_clone()));
                        (weight, bias)
                    })
                }
            };
            lines.push(format!(
                "{what}; {} loss, weight {}{}",
                match f.loss {
                    FeatureLoss::Mse => "mse",
                    FeatureLoss::Attention => "attention",
                },
                f.weight,
                match &hint {
                    Some((w, _)) => format!(
                        ", through a hint layer ({} from {} to {} channels)",
                        if w.dim() == 4 {
                            "1×1 convolution"
                        } else {
                            "linear"
                        },
                        s_shape[0],
                        t_shape[0]
                    ),
                    None => String::new(),
                }
            ));
            self.hints.push(hint);
            self.teacher_shapes.push(t_shape);
        }
        lines.push(format!(
            "distillation record: {} bytes a sample (soft label and activations as f16)",
            labels.record_len()
        ));
        model.add_aux_params(aux);
        Ok(lines)
    }

    /// The feature terms' part of the loss: `sum_i sum_f w_f * l_f,i / n` over the `n` rows
    /// (see the module docs), for the student modules' outputs `acts` and the teacher's
    /// `targets` (rows in the same order).
    pub fn feature_loss(&self, acts: &[Tensor], targets: &[Tensor]) -> Tensor {
        let n = acts.first().map_or(1, |a| a.size()[0].max(1)) as f64;
        let mut total: Option<Tensor> = None;
        for (((f, a), t), hint) in self
            .spec
            .features
            .iter()
            .zip(acts)
            .zip(targets)
            .zip(&self.hints)
        {
            // The student's side of the comparison, a row per sample; the teacher's is `t`.
            let s = match (f.loss, hint) {
                (FeatureLoss::Attention, _) => attention_map(a),
                (FeatureLoss::Mse, Some((w, b))) if w.dim() == 4 => {
                    rows_of(&a.conv2d(w, Some(b), [1, 1], [0, 0], [1, 1], 1))
                }
                (FeatureLoss::Mse, Some((w, b))) => a.linear(w, Some(b)),
                (FeatureLoss::Mse, None) => rows_of(a),
            };
            let per_sample = (s - rows_of(t)).pow_tensor_scalar(2).mean_dim(
                [1i64].as_slice(),
                false,
                Kind::Float,
            );
            let term = per_sample.sum(Kind::Float) * (f.weight / n);
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
        }
        total.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, Device::Cpu)))
    }

    /// Asks for step `key`'s soft labels (of `indices` in `view`) ahead of time.
    pub fn prefetch(&mut self, key: u64, indices: &[u32], view: View) {
        let src = source(self.spec.mode, &self.data, view);
        self.client.prefetch(key, indices, &src);
    }

    /// Step `key`'s distillation targets (on `device`, a row per index), or None for a step
    /// on hard labels.
    pub fn targets(
        &mut self,
        key: u64,
        indices: &[u32],
        view: View,
        device: Device,
    ) -> Result<Option<Targets>> {
        let src = source(self.spec.mode, &self.data, view);
        let Some(labels) = self.client.take(key, indices, &src)? else {
            return Ok(None);
        };
        let soft = to_targets(&labels, device)?;
        let mut features = Vec::with_capacity(self.teacher_shapes.len());
        for (f, shape) in self.teacher_shapes.iter().enumerate() {
            let got: Vec<i64> = labels
                .features
                .get(f)
                .map_or(Vec::new(), |s| s.iter().map(|&d| i64::from(d)).collect());
            if got != *shape {
                bail!(
                    "the teacher's activation {f} changed shape from {shape:?} to {got:?} a sample"
                );
            }
            let values = labels.feature(f);
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                bail!(
                    "the teacher's activation for distill.features[{f}] holds {bad} as f16 (its values must stay within ±65504): the teacher's `{}` overflows",
                    self.spec.features[f].teacher
                );
            }
            let mut dims = vec![labels.len() as i64];
            dims.extend(shape);
            features.push(
                Tensor::from_slice(&values)
                    .view(&dims[..])
                    .to_device(device),
            );
        }
        Ok(Some(Targets { soft, features }))
    }

    /// Removes the shared cache files (rank 0, when the job has succeeded), including any
    /// that only the other ranks opened.
    pub fn remove_cache(&self, scratch: &Path) {
        self.client.remove_cache();
        let prefix = format!("{CACHE_FILE}.");
        for e in std::fs::read_dir(scratch).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Counters for progress reports (taking the request latencies since the last one).
    pub fn progress(&mut self) -> DistillProgress {
        let request_seconds = std::mem::take(&mut self.client.stats.latencies);
        let s = &self.client.stats;
        DistillProgress {
            cache_hit_rate: s.hit_rate(),
            fallback_steps: s.fallback_steps,
            failovers: s.failovers,
            teacher_wait_fraction: s.blocked.as_secs_f64()
                / self.started.elapsed().as_secs_f64().max(1e-9),
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            samples_fetched: s.samples_fetched,
            request_seconds,
        }
    }
}

/// What a request carries: the indices and the view (the teacher decodes them as the
/// student does), or (tensor mode) the images themselves, decoded here.
fn source(mode: DistillMode, data: &Dataset, view: View) -> impl Fn(&[u32]) -> Inputs + '_ {
    let view = if data.transform.augments() {
        view
    } else {
        View::Eval
    };
    move |idx: &[u32]| match mode {
        DistillMode::Index => Inputs::Indices {
            aug_seed: view.aug_seed(),
            indices: idx.to_vec(),
        },
        DistillMode::Tensor => {
            // A sample that cannot be read (skip_bad) is sent as zeros: its row is dropped
            // with it on the student's side.
            let (c, h, w) = data.shape();
            let x = match data.batch(idx, view) {
                Ok(b) => full_rows(&b, idx.len(), &data.transform, Device::Cpu),
                Err(_) => Tensor::zeros([idx.len() as i64, c, h, w], (Kind::Float, Device::Cpu)),
            };
            let data = Vec::<f32>::try_from(x.contiguous().flatten(0, -1)).unwrap_or_default();
            Inputs::Tensor {
                shape: [c as u32, h as u32, w as u32],
                data,
            }
        }
    }
}

/// A batch's images with a row for every index asked for: zeros where a sample was left out.
fn full_rows(
    b: &super::data::Batch,
    n: usize,
    transform: &super::transform::Transform,
    device: Device,
) -> Tensor {
    let (x, _) = b.to_device(transform, device);
    if b.kept.len() == n {
        return x;
    }
    let s = x.size();
    let full = Tensor::zeros([n as i64, s[1], s[2], s[3]], (Kind::Float, device));
    let kept: Vec<i64> = b.kept.iter().map(|&p| p as i64).collect();
    full.index_copy(0, &Tensor::from_slice(&kept).to_device(device), &x)
}

/// Decodes soft labels into a dense `n × classes` tensor.
fn to_targets(labels: &SoftLabels, device: Device) -> Result<Tensor> {
    let n = labels.len() as i64;
    let dense = dense_targets(
        labels.classes,
        labels.k,
        (0..labels.len()).map(|i| labels.label(i)),
    )
    .map_err(anyhow::Error::msg)
    .context("corrupt soft labels from the teacher")?;
    Ok(Tensor::from_slice(&dense)
        .view([n, i64::from(labels.classes)])
        .to_device(device))
}

/// The teacher model behind the server.
struct TeacherModel {
    model: Option<Model>,
    /// Index mode: the job's training set (train, then unlabelled).
    data: Option<Dataset>,
    /// Threads that decode a request's images.
    decode_threads: usize,
    spec: DistillSpec,
    device: Device,
    precision: Precision,
}

impl TeacherModel {
    /// The request's images as a tensor, or why it cannot be served.
    fn inputs(&mut self, inp: &Inputs) -> Result<Tensor, String> {
        match inp {
            Inputs::Indices { indices, aug_seed } => {
                let data = self.data.as_ref().ok_or(
                    "this teacher serves tensor requests (distill.mode: tensor), not indices",
                )?;
                let n = data.len();
                if let Some(bad) = indices.iter().find(|&&i| i as usize >= n) {
                    return Err(format!(
                        "sample {bad} is out of range: the teacher's data set has {n} samples; do students and teacher read the same data?"
                    ));
                }
                let view = View::from_aug_seed(*aug_seed);
                let b = batch_now(data, indices, view, self.decode_threads)
                    .map_err(|e| format!("{e:#}"))?;
                Ok(full_rows(&b, indices.len(), &data.transform, Device::Cpu))
            }
            Inputs::Tensor { shape, data } => {
                let [c, h, w] = shape.map(i64::from);
                if let Some(d) = &self.data {
                    if d.shape() != (c, h, w) {
                        return Err(format!(
                            "images of shape {shape:?}; the teacher expects {:?}",
                            d.shape()
                        ));
                    }
                }
                if self.model.is_none() {
                    // A built-in teacher in tensor mode learns its input shape from the first request.
                    self.model = Some(
                        build_teacher(&self.spec, (c, h, w), self.device, self.precision)
                            .map_err(|e| format!("{e:#}"))?,
                    );
                }
                let n = inp.len() as i64;
                Ok(Tensor::from_slice(data).view([n, c, h, w]))
            }
        }
    }
}

impl Teacher for TeacherModel {
    fn soft_labels(&mut self, batch: &[&Inputs]) -> Vec<Result<SoftLabels, String>> {
        let mut out: Vec<Result<SoftLabels, String>> = vec![Err(String::new()); batch.len()];
        let mut parts = Vec::new();
        let mut rows = Vec::new();
        for (i, inp) in batch.iter().enumerate() {
            match self.inputs(inp) {
                Ok(x) => {
                    rows.push((i, x.size()[0]));
                    parts.push(x);
                }
                Err(e) => out[i] = Err(e),
            }
        }
        if parts.is_empty() {
            return out;
        }
        let computed = self.compute(&Tensor::cat(&parts, 0));
        match computed {
            Ok(labels) => {
                let rec = labels.record_len();
                let mut off = 0usize;
                for (i, n) in rows {
                    let n = n as usize;
                    out[i] = Ok(SoftLabels {
                        classes: labels.classes,
                        k: labels.k,
                        features: labels.features.clone(),
                        records: labels.records[off * rec..(off + n) * rec].to_vec(),
                    });
                    off += n;
                }
            }
            Err(e) => {
                for (i, _) in rows {
                    out[i] = Err(format!("the teacher model failed: {e:#}"));
                }
            }
        }
        out
    }
}

impl TeacherModel {
    /// Soft labels for a batch of images: `softmax(logits / T)`, top-k or all classes.
    fn compute(&self, x: &Tensor) -> Result<SoftLabels> {
        let model = self
            .model
            .as_ref()
            .context("the teacher model is not loaded")?;
        let (logits, acts) = tch::no_grad(|| model.forward_taps(&x.to_device(self.device), false))?;
        let s = logits.size();
        if s.len() != 2 {
            bail!("the teacher must return logits of shape (batch, classes), got {s:?}");
        }
        let classes = s[1];
        if classes > i64::from(u16::MAX) + 1 {
            bail!("the teacher has {classes} classes; at most 65536 are supported");
        }
        let probs = (logits / self.spec.temperature)
            .softmax(1, Kind::Float)
            .to_device(Device::Cpu);
        let k = i64::from(self.spec.top_k);
        let mut labels = if k > 0 && k < classes {
            let (vals, idx) = probs.topk(k, 1, true, true);
            let vals = Vec::<f32>::try_from(vals.contiguous().flatten(0, -1))?;
            let idx = Vec::<i64>::try_from(idx.contiguous().flatten(0, -1))?;
            encode_topk(classes as u32, k as u32, &idx, &vals)
        } else {
            let p = Vec::<f32>::try_from(probs.contiguous().flatten(0, -1))?;
            encode_dense(classes as u32, &p)
        };
        if !acts.is_empty() {
            let mut shapes = Vec::with_capacity(acts.len());
            let mut values = Vec::with_capacity(acts.len());
            for (f, a) in self.spec.features.iter().zip(acts) {
                let sent = match f.loss {
                    FeatureLoss::Mse => a,
                    FeatureLoss::Attention if a.dim() >= 3 => {
                        // The map keeps the spatial shape: what the student checks.
                        let spatial = a.size()[2..].to_vec();
                        let mut dims = vec![a.size()[0]];
                        dims.extend(spatial);
                        attention_map(&a).view(&dims[..])
                    }
                    FeatureLoss::Attention => bail!(
                        "distill.features: the teacher's `{}` gives {:?} a sample; attention needs a C×H×W activation",
                        f.teacher,
                        &a.size()[1..]
                    ),
                };
                shapes.push(sent.size()[1..].iter().map(|&d| d as u32).collect());
                values.push(Vec::<f32>::try_from(
                    sent.to_device(Device::Cpu).contiguous().flatten(0, -1),
                )?);
            }
            labels.attach_features(shapes, &values);
        }
        Ok(labels)
    }
}

/// Loads the teacher for inputs of `shape`: its weights, eval mode, the job's precision.
fn build_teacher(
    spec: &DistillSpec,
    shape: (i64, i64, i64),
    device: Device,
    precision: Precision,
) -> Result<Model> {
    let t = &spec.teacher;
    let mut model = Model::build(&t.model(), t.path.as_deref().map(Path::new), shape, device)?;
    if let Some(init) = &spec.teacher.init {
        let r = model.load_init(init).context("distill.teacher.init")?;
        if !r.missing.is_empty() || !r.skipped_shape.is_empty() {
            bail!(
                "distill.teacher.init leaves the teacher partly untrained: missing {:?}, skipped for shape {:?}",
                r.missing,
                r.skipped_shape
            );
        }
    }
    if !spec.features.is_empty() {
        let names: Vec<String> = spec.features.iter().map(|f| f.teacher.clone()).collect();
        model
            .set_taps(&names)
            .context("distill.features: a teacher module")?;
    }
    model.set_train(false)?;
    model.set_precision(precision);
    Ok(model)
}

/// The `ferryd teacher` entry point: replica `replica` of the job's teacher.
pub fn run_teacher(plan_path: &Path, replica: u32, emit: impl Fn(&WorkerMessage)) -> Result<()> {
    let mut plan: WorkerPlan = serde_json::from_slice(
        &std::fs::read(plan_path)
            .with_context(|| format!("cannot read {}", plan_path.display()))?,
    )
    .context("corrupt worker plan")?;
    // The teacher's model and the data, opened beneath their roots (no links).
    let _pins = super::confine::pin_plan(&mut plan, false)?;
    let scratch = PathBuf::from(&plan.scratch_dir);
    let writes: Vec<&Path> = if plan.scratch_dir.is_empty() {
        vec![]
    } else {
        vec![scratch.as_path()]
    };
    if let Some(message) = super::confine::sandbox(&plan, &writes)? {
        emit(&WorkerMessage::Log { message });
    }
    let spec = &plan.spec;
    let d = spec
        .distill
        .clone()
        .context("the job has no distill section")?;
    tch::set_num_threads(d.teacher.threads.unwrap_or(plan.threads) as i32);
    tch::set_num_interop_threads(1);
    // A TorchScript teacher runs op by op, as students do by default: the optimising
    // executor would re-specialise for every new batch size the server coalesces. The
    // switch is per thread, and this thread serves every request.
    super::torchscript::jit_optimize(false);
    let device = super::device(spec.resources.device)?;
    let data = match d.mode {
        DistillMode::Index => Some(Dataset::load_training(
            &spec.data,
            spec.train.seed,
            &super::data::Indexing::cached(
                (!plan.scratch_dir.is_empty()).then_some(scratch.as_path()),
            ),
        )?),
        DistillMode::Tensor => None,
    };
    // A built-in teacher needs the input shape: without data (tensor mode) it is built
    // from the first request. A TorchScript teacher needs none.
    let model = match (
        data.as_ref().map(Dataset::shape),
        d.teacher.arch.is_builtin(),
    ) {
        (None, true) => None,
        (shape, _) => Some(build_teacher(
            &d,
            shape.unwrap_or((0, 0, 0)),
            device,
            spec.train.precision,
        )?),
    };
    let ip: IpAddr = plan
        .bind_ip
        .parse()
        .with_context(|| format!("bad bind address {}", plan.bind_ip))?;
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("teacher replica {replica}: cannot listen on {ip}"))?;
    emit(&WorkerMessage::TeacherReady {
        replica,
        addr: listener.local_addr()?.to_string(),
    });
    let stats = Arc::new(ServerStats::default());
    {
        // A line now and then on how well requests coalesce.
        let stats = stats.clone();
        let every = Duration::from_millis(plan.progress_interval_ms.max(1000) * 10);
        std::thread::spawn(move || {
            let mut last = 0;
            loop {
                std::thread::sleep(every);
                let (r, s, b) = (
                    stats.requests.load(Ordering::Relaxed),
                    stats.samples.load(Ordering::Relaxed),
                    stats.batches.load(Ordering::Relaxed),
                );
                if r != last {
                    last = r;
                    emit_line(&WorkerMessage::Log {
                        message: format!(
                            "teacher replica {replica}: {r} requests, {s} samples in {b} forward passes ({:.1} samples per pass)",
                            s as f64 / b.max(1) as f64
                        ),
                    });
                }
            }
        });
    }
    let mut teacher = TeacherModel {
        model,
        data,
        decode_threads: super::pipeline::decode_threads(
            spec.data.decode_threads,
            d.teacher.threads.unwrap_or(plan.threads),
        ),
        spec: d.clone(),
        device,
        precision: spec.train.precision,
    };
    let max_batch = d.teacher.max_batch.map_or(
        if matches!(device, Device::Cuda(_)) {
            512
        } else {
            1
        },
        |b| b as usize,
    );
    serve(listener, &mut teacher, max_batch, stats).context("the teacher server stopped")?;
    Ok(())
}

fn emit_line(msg: &WorkerMessage) {
    super::emit(msg)
}
