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

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_cluster::distill::client::{Client, ClientConfig, Directory};
use ferry_cluster::distill::server::{serve, ServerStats, Teacher};
use ferry_cluster::distill::{dense_targets, encode_dense, encode_topk, Inputs, SoftLabels};
use ferry_cluster::spec::{DistillMode, DistillSpec, Precision};
use tch::{Device, Kind, Tensor};

use super::data::Dataset;
use super::model::Model;
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

/// A student rank's connection to the teacher service.
pub struct Student {
    client: Client,
    spec: DistillSpec,
    /// The training set (tensor mode sends its images, as the student sees them).
    data: Arc<Dataset>,
    started: Instant,
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
        })
    }

    /// Asks for step `key`'s soft labels (of `indices` in `view`) ahead of time.
    pub fn prefetch(&mut self, key: u64, indices: &[u32], view: View) {
        let src = source(self.spec.mode, &self.data, view);
        self.client.prefetch(key, indices, &src);
    }

    /// Step `key`'s distillation targets (`n × classes` on `device`, a row per index), or
    /// None for a step on hard labels.
    pub fn targets(
        &mut self,
        key: u64,
        indices: &[u32],
        view: View,
        device: Device,
    ) -> Result<Option<Tensor>> {
        let src = source(self.spec.mode, &self.data, view);
        let Some(labels) = self.client.take(key, indices, &src)? else {
            return Ok(None);
        };
        Ok(Some(to_targets(&labels, device)?))
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
        (0..labels.len()).map(|i| labels.record(i)),
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
        let logits = tch::no_grad(|| model.forward(&x.to_device(self.device), false))?;
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
        if k > 0 && k < classes {
            let (vals, idx) = probs.topk(k, 1, true, true);
            let vals = Vec::<f32>::try_from(vals.contiguous().flatten(0, -1))?;
            let idx = Vec::<i64>::try_from(idx.contiguous().flatten(0, -1))?;
            Ok(encode_topk(classes as u32, k as u32, &idx, &vals))
        } else {
            let p = Vec::<f32>::try_from(probs.contiguous().flatten(0, -1))?;
            Ok(encode_dense(classes as u32, &p))
        }
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
