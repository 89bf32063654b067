//! The training runtime: what one rank process (`ferryd worker`) runs. It reads its
//! [`WorkerPlan`], trains, checkpoints and reports on stdout ([`WorkerMessage`] lines).
//! libtorch runs only here, never on the daemon's async threads.

pub mod builtin;
pub mod check;
pub mod checkpoint;
pub mod confine;
pub mod control;
pub mod data;
pub mod dist;
pub mod distill;
pub mod ema;
pub mod model;
pub mod optim;
pub mod overlap;
pub mod pipeline;
pub mod sampler;
pub mod sandbox;
pub mod scaler;
pub mod torchscript;
pub mod transform;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_cluster::collective::Wire;
use ferry_cluster::spec::Device as SpecDevice;
use ferry_cluster::spec::GradCompression;
use tch::{Device, Kind, Tensor};

use crate::protocol::{StepTiming, WorkerMessage, WorkerPlan};

/// How often rank 0 reports an index build that is still running.
const PREPARING_EVERY: Duration = Duration::from_secs(3);
use data::Dataset;
use dist::Dist;
use model::Model;
use optim::Optimizer;
use pipeline::{Loader, Planned};
use sampler::Sampler;
use transform::View;

/// Where protocol lines go: the pipe the daemon gave this process (`FERRY_PROTOCOL_FD`),
/// or stdout when started by hand.
fn protocol_out() -> &'static std::sync::Mutex<Box<dyn Write + Send>> {
    static OUT: std::sync::OnceLock<std::sync::Mutex<Box<dyn Write + Send>>> =
        std::sync::OnceLock::new();
    OUT.get_or_init(|| {
        let fd = std::env::var("FERRY_PROTOCOL_FD")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|fd| *fd > 2);
        let out: Box<dyn Write + Send> = match fd {
            Some(fd) => {
                use std::os::fd::FromRawFd;
                #[allow(unsafe_code)]
                // SAFETY: the daemon opened this fd for us (its write end of the protocol
                // pipe); nothing else in the process uses it, and it is wrapped once.
                Box::new(unsafe { std::fs::File::from_raw_fd(fd) })
            }
            None => Box::new(std::io::stdout()),
        };
        std::sync::Mutex::new(out)
    })
}

/// Writes one protocol message (the daemon reads it line by line).
pub fn emit(msg: &WorkerMessage) {
    // Paths as the user gave them, not as this process opened them (`confine`).
    let mut line =
        confine::shown_json(&serde_json::to_string(msg).unwrap_or_default()).into_bytes();
    line.push(b'\n');
    let mut out = protocol_out().lock().unwrap_or_else(|p| p.into_inner());
    let _ = out.write_all(&line);
    let _ = out.flush();
}

/// Loads `libtorch_cuda.so` so libtorch sees the GPUs (the linker drops it as unneeded).
pub(crate) fn load_cuda() -> Result<Device> {
    #[allow(unsafe_code)]
    // SAFETY: dlopen of a library that sits beside libtorch_cpu; kept loaded for the process.
    let handle = unsafe {
        libc::dlopen(
            c"libtorch_cuda.so".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_GLOBAL,
        )
    };
    if handle.is_null() || !tch::Cuda::is_available() {
        bail!("resources.device is cuda, but no CUDA device is usable on this node (libtorch_cuda loaded: {})", !handle.is_null());
    }
    Ok(Device::Cuda(0))
}

/// The libtorch device of a spec's `resources.device`.
fn device(d: SpecDevice) -> Result<Device> {
    match d {
        SpecDevice::Cpu => Ok(Device::Cpu),
        SpecDevice::Cuda => load_cuda(),
    }
}

/// Cross-entropy with hard labels, smoothed by `smoothing` and weighted per class by
/// `weight`, as PyTorch's `cross_entropy(..., weight=w, label_smoothing=e,
/// reduction="sum")`: divided by `w[y].sum()` over a batch, it is the mean that
/// `reduction="mean"` gives, so micro-batches divided by their whole batch's sum add up to
/// the loss of that batch.
fn hard_loss_sum(logits: &Tensor, y: &Tensor, smoothing: f64, weight: Option<&Tensor>) -> Tensor {
    logits.cross_entropy_loss(y, weight, tch::Reduction::Sum, -100, smoothing)
}

/// `train.class_weights`, one weight per class of the training set (a class without
/// samples weighs 1).
fn class_weights(
    spec: &ferry_cluster::spec::ClassWeights,
    labels: &[i64],
    classes: usize,
) -> Result<Vec<f64>> {
    use ferry_cluster::spec::ClassWeights;
    let w = match spec {
        ClassWeights::Given(w) if w.len() != classes => bail!(
            "train.class_weights has {} weights but data.train has {classes} classes; give one per class, in class order",
            w.len()
        ),
        ClassWeights::Given(w) => w.clone(),
        ClassWeights::Rule(_) => {
            let mut counts = vec![0u64; classes];
            for &l in labels {
                if let Some(c) = usize::try_from(l).ok().and_then(|l| counts.get_mut(l)) {
                    *c += 1;
                }
            }
            let n: u64 = counts.iter().sum();
            counts
                .iter()
                .map(|&c| {
                    if c == 0 {
                        1.0
                    } else {
                        n as f64 / (classes as f64 * c as f64)
                    }
                })
                .collect()
        }
    };
    Ok(w)
}

/// Scales every gradient so that their global L2 norm is at most `max`, as
/// `torch.nn.utils.clip_grad_norm_`: by `max / (norm + 1e-6)` when that is below 1. The
/// gradients are all-reduced already, so every rank computes the same norm.
fn clip_grad_norm(params: &[(String, Tensor)], max: f64) {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| p.grad())
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return;
    }
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| g.norm().to_kind(tch::Kind::Float))
        .collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (Tensor::from(max as f32) / (total + 1e-6)).clamp_max(1.0);
    tch::no_grad(|| {
        for g in &grads {
            let _ = g
                .shallow_clone()
                .g_mul_(&coef.to_kind(g.kind()).to_device(g.device()));
        }
    });
}

pub fn run_worker(plan_path: &Path, rank: usize, world: usize) -> Result<()> {
    let mut plan: WorkerPlan = serde_json::from_slice(
        &std::fs::read(plan_path)
            .with_context(|| format!("cannot read {}", plan_path.display()))?,
    )
    .context("corrupt worker plan")?;
    // Every input and the output dir, opened again beneath their roots (no links), and
    // used only as opened from here on.
    let mut pins = confine::pin_plan(&mut plan, true)?;
    // Then the sandbox, before any thread runs (libtorch's pool included) and before the
    // model (code) and the data are loaded.
    let sandboxed = {
        let out = PathBuf::from(&plan.output_dir);
        let scratch = PathBuf::from(&plan.scratch_dir);
        let mut writes = vec![out.as_path()];
        if !plan.scratch_dir.is_empty() {
            writes.push(scratch.as_path());
        }
        confine::sandbox(&plan, &writes)?
    };
    let spec = &plan.spec;
    tch::set_num_threads(plan.threads as i32);
    tch::set_num_interop_threads(1);
    // A generation may run on fewer nodes than asked for (down to resources.min_nodes).
    if world == 0 || rank >= world || world > spec.resources.ranks as usize {
        bail!(
            "rank {rank} of {world} does not fit the job's resources.ranks = {}",
            spec.resources.ranks
        );
    }
    let control = control::ControlChannel::start();
    // One rank per node saves what it holds when the ring breaks (the daemon says which).
    let saver = std::env::var("FERRY_SAVER").is_ok_and(|v| v == "1");
    let device = device(spec.resources.device)?;
    let mut dist = Dist::form(&plan, rank, world, device, &control, emit)?;
    let leader = dist.is_leader();
    // Only rank 0 reports training progress and writes files; every rank trains.
    let say = |m: &WorkerMessage| {
        if leader {
            emit(m)
        }
    };
    if let Some(message) = sandboxed {
        say(&WorkerMessage::Log { message });
    }
    let out_dir = PathBuf::from(&plan.output_dir);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create output dir {}", out_dir.display()))?;

    // Files this node's ranks share (the soft-label cache): node-local, never on the
    // shared outputs root, where a mapped file is not coherent across hosts.
    let scratch = match plan.scratch_dir.is_empty() {
        true => out_dir.clone(),
        false => PathBuf::from(&plan.scratch_dir),
    };
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;

    // Indexing a large set (listing a folder, reading shards' headers, scanning float
    // pixels) is reported while it runs, by rank 0, every few seconds.
    let preparing = |message: String, done: u64, total: Option<u64>| {
        say(&WorkerMessage::Preparing {
            message,
            done,
            total,
        })
    };
    let indexing = data::Indexing::new(Some(&scratch), Some(&preparing), PREPARING_EVERY);
    let listed = Instant::now();
    let train_set = Arc::new(Dataset::load_training(
        &spec.data,
        spec.train.seed,
        &indexing,
    )?);
    say(&WorkerMessage::Log {
        message: format!(
            "training set: {} samples of {:?} (C,H,W), indexed in {:.2} s; images are decoded per batch",
            train_set.len(),
            train_set.shape(),
            listed.elapsed().as_secs_f64()
        ),
    });
    if spec.data.unlabelled.is_some() {
        let labelled = train_set.labelled();
        say(&WorkerMessage::Log {
            message: format!(
                "training set: {labelled} labelled samples and {} unlabelled ones",
                train_set.len() - labelled
            ),
        });
    }
    // An evaluation split (data.val, data.test): its classes matched to the training set's.
    let load_split = |field: &'static str, source: &ferry_cluster::spec::DataSource| {
        Dataset::load(
            Path::new(&source.path),
            field,
            &spec.data,
            spec.train.seed,
            &indexing,
        )?
        .matched_to(&train_set, field)
    };
    let val_set = spec
        .data
        .val
        .as_ref()
        .map(|v| load_split("data.val", v))
        .transpose()?;
    for (field, ds) in [
        ("data.train", Some(&*train_set)),
        ("data.val", val_set.as_ref()),
    ] {
        if let Some(classes) = ds.and_then(|d| d.classes.as_ref()) {
            say(&WorkerMessage::Log {
                message: format!("{field}: ImageFolder with classes {}", classes.join(", ")),
            });
        }
    }
    let val_set = val_set.map(Arc::new);
    let decode_threads = pipeline::decode_threads(spec.data.decode_threads, plan.threads);
    let depth = spec.data.prefetch_batches as usize;
    say(&WorkerMessage::Log {
        message: format!(
            "input: {decode_threads} decode threads, {depth} batches ahead each; {}",
            describe_views(&spec.data)
        ),
    });
    // TorchScript graphs run op by op, as eager PyTorch runs them, unless the spec asks for
    // the executor's optimisation (profiling runs, then fused kernels): measured on CPU and on
    // an H200, op by op warms up faster and trains no slower (docs/benchmarks.md).
    torchscript::jit_optimize(spec.model.jit_optimize);
    tch::manual_seed(spec.train.seed as i64);
    let mut model = Model::build(
        &spec.model,
        spec.model.path.as_deref().map(Path::new),
        train_set.shape(),
        device,
    )?;
    let init = spec
        .model
        .init
        .as_ref()
        .map(|i| model.load_init(i))
        .transpose()?;
    if !spec.model.reset.is_empty() {
        let reset = model.reset(&spec.model.reset)?;
        say(&WorkerMessage::Log {
            message: format!(
                "model.reset: {} tensors under {} re-initialised",
                reset.len(),
                spec.model.reset.join(", ")
            ),
        });
    }
    if let Some(r) = init {
        let frozen = model.freeze(&spec.model.freeze)?;
        say(&WorkerMessage::Init {
            loaded: r.loaded.len(),
            missing: r.missing,
            unexpected: r.unexpected,
            skipped_shape: r.skipped_shape,
            excluded: r.excluded,
            frozen: frozen.len(),
        });
    } else if !spec.model.freeze.is_empty() {
        let frozen = model.freeze(&spec.model.freeze)?;
        say(&WorkerMessage::Log {
            message: format!(
                "froze {} parameter tensors (no init: they keep their initial values)",
                frozen.len()
            ),
        });
    }
    let mut student = match &spec.distill {
        Some(d) => {
            if d.cache && train_set.transform.augments() {
                say(&WorkerMessage::Log {
                    message: "distill.cache is off: data.augment gives every epoch its own view of each sample, so soft labels are fetched for every step".to_string(),
                });
            }
            say(&WorkerMessage::Log {
                message: format!(
                    "waiting for a teacher replica (up to {} s)",
                    d.wait_timeout_s
                ),
            });
            Some(distill::Student::connect(
                d,
                control.teachers.clone(),
                &train_set,
                &scratch,
            )?)
        }
        None => None,
    };
    // distill.features: the hint layers train with the model, so they come before the
    // optimizer, the broadcast and the buckets (and a resumed job's checkpoint holds them).
    if let Some(st) = student.as_mut() {
        for message in st.attach_features(&mut model, spec.train.seed)? {
            say(&WorkerMessage::Log { message });
        }
    }
    model.set_precision(spec.train.precision);
    let mut scaler = (spec.train.precision == ferry_cluster::spec::Precision::Fp16)
        .then(scaler::GradScaler::default);
    // The optimizer holds what trains now and what model.unfreeze will thaw.
    let mut opt = Optimizer::with_groups(
        &spec.train.optimizer,
        &spec.train.param_groups,
        spec.train.layer_decay.as_ref(),
        model.trainable_with(&spec.model.unfreeze_prefixes()),
    )?;
    if let Some(groups) = opt.groups_summary() {
        say(&WorkerMessage::Log {
            message: format!("optimizer parameter groups: {groups}"),
        });
    }
    let sampler = Sampler {
        len: train_set.len(),
        // A step takes grad_accum_steps micro-batches of batch_size from each rank.
        batch: spec.train.batch_size as usize * spec.train.grad_accum_steps as usize,
        world,
        seed: spec.train.seed,
        shuffle: spec.data.shuffle,
    };
    let steps_per_epoch = sampler.steps_per_epoch() as u64;

    // Resume.
    let ckpt_root = confine::pin_subdir(&out_dir, "checkpoints", &mut pins)?;
    let (mut epoch, mut consumed, mut step, mut resumed_from) = (0u32, 0usize, 0u64, None);
    let mut last_loss = None;
    if plan.resume {
        let skipped = |message: String| say(&WorkerMessage::Log { message });
        if let Some(ck) = checkpoint::latest(&ckpt_root, skipped)? {
            model
                .load_state(ck.model)
                .with_context(|| format!("cannot resume from {}", ck.dir.display()))?;
            opt.load_state(ck.optimizer, ck.manifest.optimizer_steps)?;
            epoch = ck.manifest.epoch;
            consumed = ck.manifest.samples_in_epoch as usize;
            step = ck.manifest.step;
            last_loss = ck.manifest.train_loss;
            if let (Some(s), Some(scale)) = (scaler.as_mut(), ck.manifest.loss_scale) {
                s.scale = scale;
                s.growth_tracker = ck.manifest.scale_growth_tracker.unwrap_or(0);
            }
            resumed_from = Some(ck.dir.display().to_string());
            // Dropout draws continue from a seed tied to the step, so a resume is deterministic.
            tch::manual_seed(spec.train.seed.wrapping_add(step) as i64);
        }
    }
    let start_step = step;
    // Steps already done, then what is left at this world size: the rest of the epoch it
    // stopped in (an earlier generation may have had another world size) and the others.
    let mut total_steps = step
        + if epoch < spec.train.epochs {
            ((sampler.len - consumed.min(sampler.len)).div_ceil(sampler.global_batch()) as u64)
                + steps_per_epoch * u64::from(spec.train.epochs - epoch - 1)
        } else {
            0
        };
    if let Some(max) = spec.train.max_steps {
        total_steps = total_steps.min(max);
    }
    let rescue_at = Rescue {
        saver,
        start_step,
        root: &ckpt_root,
        keep: spec.train.keep_checkpoints,
        control: &control,
    };
    // Every rank starts from rank 0's weights (initialisation, init file or checkpoint).
    dist.broadcast_state(model.state())?;
    if let Some(e) = spec.train.ema {
        let resumed = opt.start_ema(e.decay, model.state())?;
        if let Some(avg) = opt.ema() {
            dist.broadcast_state(avg.averages().iter())?;
        }
        say(&WorkerMessage::Log {
            message: format!(
                "train.ema: weights averaged with decay {} after every step{}",
                e.decay,
                if resumed {
                    ", continued from the checkpoint"
                } else {
                    ", from the initial model"
                }
            ),
        });
    }
    let mut trainable_params = model.trainable();
    let overlap = dist.overlaps(spec.train.overlap_grad_sync, plan.threads as usize);
    let wire = match spec.train.grad_compression {
        GradCompression::None => Wire::F32,
        GradCompression::Bf16 => Wire::Bf16,
        GradCompression::Fp16 => Wire::F16,
    };
    if world > 1 && wire != Wire::F32 && !dist.compresses(wire) {
        say(&WorkerMessage::Log {
            message: "train.grad_compression has no effect here: every rank is on this host, where gradients go through shared memory as f32".to_string(),
        });
    }
    dist.plan_buckets(
        &trainable_params,
        (spec.train.bucket_mb * 1e6) as usize,
        overlap,
        wire,
    )?;
    if world > 1 && !overlap {
        use ferry_cluster::spec::OverlapGradSync;
        let message = match (spec.train.overlap_grad_sync, device.is_cuda()) {
            (OverlapGradSync::Auto, true) => "gradient all-reduce after backward (overlap_grad_sync: auto; on CUDA, overlap is opt-in with always until it has run on several GPUs)".to_string(),
            (OverlapGradSync::Auto, false) => format!(
                "gradient all-reduce after backward (overlap_grad_sync: auto): {world} ranks with {} threads and a communication thread each would crowd this host's {} cores",
                plan.threads,
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            _ => "gradient all-reduce after backward (overlap_grad_sync: never)".to_string(),
        };
        say(&WorkerMessage::Log { message });
    }
    let (trainable, frozen) = model.parameter_counts();
    say(&WorkerMessage::Started {
        total_steps,
        steps_per_epoch,
        epochs: spec.train.epochs,
        trainable_params: trainable,
        frozen_params: frozen,
        train_samples: train_set.len() as u64,
        val_samples: val_set.as_ref().map_or(0, |v| v.len() as u64),
        resumed_from,
        start_step: step,
    });

    let classes_needed = train_set.label_count();
    let mut metrics: Box<dyn Write> = if leader {
        Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                // A link put in its place is refused, not followed.
                .custom_flags(libc::O_NOFOLLOW)
                .open(out_dir.join("metrics.jsonl"))
                .context("cannot open metrics.jsonl")?,
        ))
    } else {
        Box::new(std::io::sink())
    };
    let interval = Duration::from_millis(plan.progress_interval_ms.max(50));
    let mut train_time = Duration::ZERO;
    let mut train_samples = 0u64;
    let mut checked_logits = false;
    let mut reported_overlap = false;
    // Bytes of gradient one step all-reduces (none in a job of one rank).
    let classes = class_count(&train_set);
    let ring = dist.world > 1;
    let bytes_of = |params: &[(String, Tensor)]| -> u64 {
        if ring {
            params
                .iter()
                .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                .sum()
        } else {
            0
        }
    };
    let mut grad_bytes = bytes_of(&trainable_params);
    // model.unfreeze steps taken so far (a resumed job takes those before its epoch at once).
    let mut thawed = 0usize;
    let weights = match &spec.train.class_weights {
        Some(w) => {
            let w = class_weights(w, train_set.labels(), classes)?;
            say(&WorkerMessage::Log {
                message: format!(
                    "train.class_weights: {}",
                    w.iter()
                        .map(|v| format!("{v:.3}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            let w: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            Some(Tensor::from_slice(&w).to_device(device))
        }
        None => None,
    };
    let mut weight_tensor: Option<Tensor> = None;
    let micro = spec.train.batch_size as i64;
    let mut timing = StepTiming {
        rank: rank as u32,
        ..Default::default()
    };
    let mut val_accuracy = None;
    let mut skipped_samples = 0u64;
    // train.best / train.early_stop: rank 0 keeps the record of the best epoch (in
    // model_best.json beside the outputs, read back on a resume) and decides when to stop;
    // the other ranks follow its decision.
    let best_by = spec.train.best.or(spec
        .train
        .early_stop
        .map(|_| ferry_cluster::spec::BestSpec::default()));
    let mut best = match (best_by, leader) {
        (Some(_), true) => BestRecord::read(&out_dir, step),
        _ => None,
    };
    let mut stopped_early = None;
    // The newest validation (epoch, result), for eval.json.
    let mut last_eval: Option<(u32, Evaluation)> = None;
    let mut last_ema_eval: Option<(u32, Evaluation)> = None;
    let prefetch = spec.distill.as_ref().map_or(0, |d| d.prefetch as usize);

    // Ends the rank with error `$e`, saving the state it holds at the cursor (see `Rescue`).
    macro_rules! rescue {
        ($e:expr) => {
            return Err(rescue_at.save(
                $e,
                &model,
                &opt,
                (step, epoch, consumed, world),
                (last_loss, val_accuracy),
                scaler.as_ref(),
            ))
        };
    }
    // Evaluation batches (twice the training batch: no gradients to keep), decode threads
    // and queue depth.
    let eval_input = (spec.train.batch_size as usize * 2, decode_threads, depth);
    control.stop.set_polled();
    'epochs: while epoch < spec.train.epochs && step < total_steps {
        // model.unfreeze: what is due by this epoch starts to train (at once, for a job
        // resumed past it), and the gradient buckets are planned again to take it.
        let due: Vec<String> = spec
            .model
            .unfreeze
            .iter()
            .skip(thawed)
            .take_while(|u| u.epoch <= epoch)
            .flat_map(|u| u.prefixes.iter().cloned())
            .collect();
        if !due.is_empty() {
            thawed += spec.model.unfreeze[thawed..]
                .iter()
                .take_while(|u| u.epoch <= epoch)
                .count();
            let names = model.unfreeze(&due)?;
            trainable_params = model.trainable();
            grad_bytes = bytes_of(&trainable_params);
            dist.plan_buckets(
                &trainable_params,
                (spec.train.bucket_mb * 1e6) as usize,
                overlap,
                wire,
            )?;
            let (trainable, frozen) = model.parameter_counts();
            say(&WorkerMessage::Log {
                message: format!(
                    "model.unfreeze at epoch {epoch}: {} parameter tensors under {} train from now on ({trainable} parameters train, {frozen} frozen)",
                    names.len(),
                    due.join(", ")
                ),
            });
        }
        let order = sampler.order(epoch);
        // This rank's batches for the rest of the epoch (and no further than the job goes):
        // the decode threads read those samples and no others.
        let view = View::Train { epoch };
        let batches: Vec<Planned> = (consumed..sampler.len)
            .step_by(sampler.global_batch())
            .take((total_steps - step) as usize)
            .map(|c| Planned {
                indices: sampler.batch(&order, c, rank).to_vec(),
                view,
            })
            .collect();
        let mut loader = Loader::start(train_set.clone(), batches, decode_threads, depth);
        let next_order =
            (prefetch > 0 && epoch + 1 < spec.train.epochs).then(|| sampler.order(epoch + 1));
        model.set_train(true)?;
        let (epoch_time, epoch_samples) = (train_time, train_samples);
        let mut window = (
            Instant::now(),
            0u64,
            Tensor::zeros([], (Kind::Float, device)),
            0u32,
        );
        while consumed < sampler.len {
            if step >= total_steps {
                break 'epochs;
            }
            // Stopped by the daemon (a one-rank job has no ring to break): save and go.
            if control.stop.reason().is_some() {
                rescue!(anyhow::anyhow!("stopped"));
            }
            let t0 = Instant::now();
            // On CUDA only the window's first step is timed (it waits for the device at
            // each boundary); on CPU every step is.
            let mut clock = Clock::new(device, window.3 == 0);
            let span = sampler.range(consumed, rank);
            let mine = &order[span.clone()];
            if let Some(st) = student.as_mut() {
                // Ask for this step's and the next steps' soft labels, into the next epoch:
                // the teacher works while this rank trains.
                let gb = sampler.global_batch();
                let left = (sampler.len - consumed).div_ceil(gb);
                for j in 0..=prefetch {
                    if step + j as u64 >= total_steps {
                        break;
                    }
                    if j < left {
                        st.prefetch(
                            step + j as u64,
                            sampler.batch(&order, consumed + j * gb, rank),
                            view,
                        );
                    } else if let Some(next) = &next_order {
                        let at = (j - left) * gb;
                        if at < sampler.len {
                            st.prefetch(
                                step + j as u64,
                                sampler.batch(next, at, rank),
                                View::Train { epoch: epoch + 1 },
                            );
                        }
                    }
                }
            }
            let batch = match loader.next_batch() {
                Some(Ok(b)) => b,
                Some(Err(e)) => rescue!(e),
                None => bail!("the input pipeline ran out of batches at step {step}"),
            };
            debug_assert_eq!(batch.kept.len() + batch.skipped.len(), span.len());
            for why in &batch.skipped {
                skipped_samples += 1;
                if skipped_samples <= 20 {
                    emit(&WorkerMessage::Log {
                        message: format!("data.skip_bad: rank {rank} left out {why}"),
                    });
                }
            }
            let (x, y) = batch.to_device(&train_set.transform, device);
            let lr = optim::learning_rate(&spec.train, step, total_steps);
            let mut parts = clock.lap();
            parts.data_s = parts.taken;
            let targets = match (student.as_mut(), &spec.distill) {
                (Some(st), Some(_)) => {
                    let mut targets = st.targets(step, mine, view, device)?;
                    parts.teacher_s = clock.lap().taken;
                    if batch.kept.len() < mine.len() {
                        let kept: Vec<i64> = batch.kept.iter().map(|&p| p as i64).collect();
                        let kept = Tensor::from_slice(&kept).to_device(device);
                        targets = targets.map(|t| t.rows(|x| x.index_select(0, &kept)));
                    }
                    targets
                }
                _ => None,
            };
            opt.zero_grad();
            // This rank's share of the global batch weighs its gradient, so the mean over
            // ranks equals the gradient of the whole batch even when shares differ.
            let global = sampler.step_size(consumed);
            // train.grad_accum_steps: the share goes through forward and backward in
            // micro-batches of batch_size, each loss divided by the whole share's size (or
            // class weight), so that the gradients add up to the share's. Only the last
            // backward arms the all-reduce.
            let share = x.size()[0];
            let chunks = (share.max(1) as u64).div_ceil(micro as u64) as i64;
            let denominator = match &weights {
                Some(w) if share > 0 => w
                    .index_select(0, &y)
                    .sum(Kind::Float)
                    .clamp_min(f64::from(f32::MIN_POSITIVE)),
                _ => Tensor::from(share.max(1) as f32),
            };
            let mut loss = Tensor::zeros([], (Kind::Float, device));
            for k in 0..chunks {
                let (at, len) = (k * micro, micro.min(share - k * micro));
                let (xs, ys) = if chunks == 1 {
                    (x.shallow_clone(), y.shallow_clone())
                } else {
                    (x.narrow(0, at, len), y.narrow(0, at, len))
                };
                let (logits, acts) = model.forward_taps(&xs, true)?;
                if !checked_logits {
                    check_logits(&logits, classes_needed)?;
                    checked_logits = true;
                    if let Some(w) = &weights {
                        // Outputs past the training set's classes weigh 1.
                        let extra = (logits.size()[1] - w.size()[0]).max(0);
                        let ones = Tensor::ones([extra], (Kind::Float, device));
                        weight_tensor = Some(Tensor::cat(&[w, &ones], 0));
                    }
                }
                let part = match (&targets, &spec.distill) {
                    (t, Some(d)) if student.is_some() => {
                        let t = t.as_ref().map(|t| {
                            if chunks == 1 {
                                t.rows(Tensor::shallow_clone)
                            } else {
                                t.rows(|x| x.narrow(0, at, len))
                            }
                        });
                        if let Some(t) = &t {
                            if t.soft.size()[1] != logits.size()[1] {
                                bail!(
                                    "the teacher has {} classes and the student {}; distillation needs the same classes",
                                    t.soft.size()[1],
                                    logits.size()[1]
                                );
                            }
                        }
                        let mut l = distill::loss(
                            &logits,
                            &ys,
                            t.as_ref().map(|t| &t.soft),
                            d.alpha,
                            d.temperature,
                        );
                        // A step on hard labels has no teacher activations either.
                        if let (Some(t), Some(st)) = (&t, student.as_ref()) {
                            if !acts.is_empty() {
                                l += st.feature_loss(&acts, &t.features);
                            }
                        }
                        l * (len.max(1) as f64 / share.max(1) as f64)
                    }
                    _ => {
                        hard_loss_sum(
                            &logits,
                            &ys,
                            spec.train.label_smoothing,
                            weight_tensor.as_ref(),
                        ) / &denominator
                    }
                };
                if k + 1 == chunks {
                    dist.begin_step(batch.kept.len() as f64 / global as f64);
                }
                match &scaler {
                    Some(s) => s.scale(&part).backward(),
                    None => part.backward(),
                }
                loss += part.detach();
            }
            parts.compute_s += clock.lap().taken;
            if let Err(e) = dist.sync_grads(&trainable_params) {
                // No update of this step has touched the weights: they hold `step` steps.
                rescue!(e);
            }
            parts.sync_s = clock.lap().taken;
            if let (Some(r), false) = (&dist.overlap_report, reported_overlap) {
                reported_overlap = true;
                let mut message = format!(
                    "gradient all-reduce overlaps backward: {} of {} buckets started during the first backward",
                    r.during_backward,
                    dist.bucket_count()
                );
                if !r.silent.is_empty() {
                    let names: Vec<&str> = r
                        .silent
                        .iter()
                        .take(5)
                        .map(|&i| trainable_params[i].0.as_str())
                        .collect();
                    message += &format!(
                        "; {} parameters got no gradient from backward ({}{}), so their buckets and all later ones waited for its end",
                        r.silent.len(),
                        names.join(", "),
                        if r.silent.len() > 5 { ", ..." } else { "" }
                    );
                }
                say(&WorkerMessage::Log { message });
            }
            // fp16: a step whose (all-reduced) gradients overflowed is skipped on every rank.
            let overflow = match &scaler {
                Some(s) => s.unscale(&trainable_params)?,
                None => false,
            };
            if !overflow {
                if let Some(max) = spec.train.clip_grad_norm {
                    clip_grad_norm(&trainable_params, max);
                }
                opt.step(lr)?;
            }
            if let Some(s) = scaler.as_mut() {
                s.update(overflow);
            }
            parts.optimizer_s = clock.lap().taken;
            timing.add(&parts, clock.timed, grad_bytes);
            let n = global as u64;
            consumed += global;
            step += 1;
            train_samples += n;
            window.1 += n;
            window.2 += loss.detach();
            window.3 += 1;

            let every = spec.train.checkpoint_every_steps;
            let ckpt_due = every > 0 && step % every == 0;
            // The first step of a start is reported at once: it says when training runs
            // again after a restart or a new generation.
            if window.0.elapsed() >= interval
                || step == start_step + 1
                || ckpt_due
                || consumed >= sampler.len
                || step >= total_steps
            {
                let mean_loss = window.2.double_value(&[]) / f64::from(window.3);
                if !mean_loss.is_finite() {
                    bail!("training diverged: the loss is {mean_loss} at step {step}; lower train.optimizer.lr");
                }
                let sps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                let distill = student.as_mut().map(|s| s.progress());
                say(&WorkerMessage::Progress {
                    epoch: epoch + 1,
                    step,
                    loss: mean_loss,
                    lr,
                    samples_per_sec: sps,
                    steps: u64::from(window.3),
                    samples: window.1,
                    distill: distill.clone(),
                });
                // Rank 0's mean seconds per timed step, by part (as the metric
                // ferry_rank_step_seconds): where the window's steps went.
                let timed = f64::from(timing.timed_steps.max(1));
                let step_seconds: serde_json::Map<String, serde_json::Value> =
                    crate::metrics::STEP_PARTS
                        .iter()
                        .zip(timing.parts())
                        .map(|(part, s)| (part.to_string(), serde_json::json!(s / timed)))
                        .collect();
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": step, "epoch": epoch + 1, "loss": mean_loss, "lr": lr, "samples_per_sec": sps, "step_seconds": step_seconds, "distill": distill.as_ref().map(|d| crate::protocol::DistillProgress { request_seconds: Vec::new(), ..d.clone() }), "generation": plan.generation, "time": unix_time()})
                )?;
                last_loss = Some(mean_loss);
                emit(&WorkerMessage::Timing(std::mem::replace(
                    &mut timing,
                    StepTiming {
                        rank: rank as u32,
                        ..Default::default()
                    },
                )));
                window = (
                    Instant::now(),
                    0,
                    Tensor::zeros([], (Kind::Float, device)),
                    0,
                );
            }
            // The step's time ends after the report: reading the loss waits for the device
            // to finish the work queued so far, and that work is this step's and the last
            // ones'. Stopping the clock before it would leave out what CUDA had queued
            // (measured on an H200: 9% of an epoch at fp32). Checkpoints are not counted.
            train_time += t0.elapsed();
            if ckpt_due && consumed < sampler.len && leader {
                save_checkpoint(
                    &ckpt_root,
                    &model,
                    &opt,
                    (step, epoch, consumed, world),
                    (last_loss, val_accuracy),
                    scaler.as_ref(),
                    spec.train.keep_checkpoints,
                )?;
            }
        }
        if consumed < sampler.len {
            break; // stopped by max_steps mid-epoch
        }
        // CUDA runs ahead of the host: the epoch ends when the device has done its work.
        train_time += sync_device(device);
        let (secs, n) = (
            (train_time - epoch_time).as_secs_f64(),
            train_samples - epoch_samples,
        );
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"epoch": epoch + 1, "epoch_samples_per_sec": n as f64 / secs.max(1e-9)})
        )?;
        if let Some(v) = &val_set {
            model.set_train(false)?;
            let evaluated = evaluate(&model, v, eval_input, device, classes, Some(&mut dist));
            let ev = match evaluated {
                Ok(r) => r,
                // The epoch's steps are done; a resume from here evaluates and goes on.
                Err(e) => rescue!(e),
            };
            let (vloss, acc) = (ev.loss, ev.top1);
            say(&WorkerMessage::Eval {
                epoch: epoch + 1,
                step,
                val_loss: vloss,
                val_accuracy: acc,
            });
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"step": step, "epoch": epoch + 1, "val_loss": vloss, "val_accuracy": acc, "val_top5": ev.top5})
            )?;
            val_accuracy = Some(acc);
            last_eval = Some((epoch + 1, ev));
            if let Some(avg) = opt.ema() {
                let evaluated = avg.with_average(|| {
                    evaluate(&model, v, eval_input, device, classes, Some(&mut dist))
                });
                let ev = match evaluated {
                    Ok(r) => r,
                    Err(e) => rescue!(e),
                };
                say(&WorkerMessage::Log {
                    message: format!(
                        "train.ema: epoch {}: val accuracy {:.2}%, loss {:.4} with the averaged weights",
                        epoch + 1,
                        ev.top1 * 100.0,
                        ev.loss
                    ),
                });
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": step, "epoch": epoch + 1, "val_ema_loss": ev.loss, "val_ema_accuracy": ev.top1, "val_ema_top5": ev.top5})
                )?;
                last_ema_eval = Some((epoch + 1, ev));
            }
            if let Some(by) = best_by {
                let value = match by.metric {
                    ferry_cluster::spec::BestMetric::ValAccuracy => acc,
                    ferry_cluster::spec::BestMetric::ValLoss => vloss,
                };
                let mut stop = 0f32;
                if leader {
                    let min_delta = spec.train.early_stop.map_or(0.0, |e| e.min_delta);
                    if by.improves(value, best.as_ref().map(|b| b.value), min_delta) {
                        let record = BestRecord {
                            epoch: epoch + 1,
                            step,
                            metric: by.metric_name().to_string(),
                            value,
                        };
                        let saved = match spec.train.best {
                            Some(_) => model.save_as(&out_dir, "model_best")?,
                            None => Vec::new(),
                        };
                        record.write(&out_dir)?;
                        say(&WorkerMessage::Log {
                            message: format!(
                                "best so far: epoch {} ({} {value:.4}){}",
                                epoch + 1,
                                record.metric,
                                if saved.is_empty() {
                                    String::new()
                                } else {
                                    format!("; saved as {}", saved.join(", "))
                                }
                            ),
                        });
                        best = Some(record);
                    }
                    if let (Some(es), Some(b)) = (spec.train.early_stop, &best) {
                        let since = epoch + 1 - b.epoch.min(epoch + 1);
                        if since >= es.patience && epoch + 1 < spec.train.epochs {
                            stop = 1.0;
                        }
                    }
                }
                // Every rank ends with rank 0, after this epoch's checkpoint.
                let mut decided = [stop];
                if let Err(e) = dist.sum(&mut decided) {
                    rescue!(e);
                }
                if decided[0] > 0.0 {
                    stopped_early = Some(epoch + 1);
                }
            }
        }
        metrics.flush()?;
        epoch += 1;
        consumed = 0;
        if leader {
            save_checkpoint(
                &ckpt_root,
                &model,
                &opt,
                (step, epoch, 0, world),
                (last_loss, val_accuracy),
                scaler.as_ref(),
                spec.train.keep_checkpoints,
            )?;
        }
        if let Some(at) = stopped_early {
            let (patience, b) = (
                spec.train.early_stop.map_or(0, |e| e.patience),
                best.as_ref(),
            );
            say(&WorkerMessage::Log {
                message: format!(
                    "early stop after epoch {at} of {}: {} has not improved for {patience} epochs (best: epoch {})",
                    spec.train.epochs,
                    best_by.map_or("val_accuracy", |b| b.metric_name()),
                    b.map_or(0, |b| b.epoch)
                ),
            });
            break 'epochs;
        }
    }
    metrics.flush()?;
    train_time += sync_device(device);
    model.set_train(false)?;
    // train.epochs: 0: the model as given, evaluated on data.val by every rank (and on
    // data.test below).
    let eval_only = spec.train.epochs == 0;
    if let (true, Some(v)) = (eval_only, &val_set) {
        let ev = evaluate(&model, v, eval_input, device, classes, Some(&mut dist))?;
        say(&WorkerMessage::Log {
            message: ev.summary("validation", "the model as given (train.epochs: 0)"),
        });
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": 0, "epoch": 0, "val_loss": ev.loss, "val_accuracy": ev.top1, "val_top5": ev.top5})
        )?;
        last_eval = Some((0, ev));
    }
    if skipped_samples > 0 {
        emit(&WorkerMessage::Log {
            message: format!(
                "data.skip_bad: rank {rank} left out {skipped_samples} unreadable samples in all"
            ),
        });
    }
    if !leader {
        return Ok(());
    }
    // Memory is bounded by the input queue, not by the data set: the number says so.
    let rss = pipeline::max_rss_mb();
    writeln!(metrics, "{}", serde_json::json!({ "max_rss_mb": rss }))?;
    metrics.flush()?;
    say(&WorkerMessage::Log {
        message: format!("rank 0: peak resident memory {rss:.0} MB"),
    });
    if let Some(st) = &student {
        st.remove_cache(&scratch);
    }
    if let Some(p) = student.as_mut().map(|s| s.progress()) {
        writeln!(metrics, "{}", serde_json::json!({ "distill": p }))?;
        metrics.flush()?;
        say(&WorkerMessage::Log {
            message: format!(
                "distillation (rank 0): {} soft labels over the network, cache hit rate {:.1}%, {} steps on hard labels, {} fail-overs, {:.1}% of training time waiting for the teacher, {} bytes sent, {} received",
                p.samples_fetched,
                p.cache_hit_rate * 100.0,
                p.fallback_steps,
                p.failovers,
                p.teacher_wait_fraction * 100.0,
                p.bytes_sent,
                p.bytes_received
            ),
        });
    }
    if let Some(s) = &scaler {
        say(&WorkerMessage::Log {
            message: format!(
                "fp16: {} steps skipped for non-finite gradients; final loss scale {}",
                s.skipped, s.scale
            ),
        });
    }
    // An evaluation-only job writes no model: it would be the one it was given.
    let mut files = if eval_only {
        Vec::new()
    } else {
        model.save_final(&out_dir)?
    };
    if let Some(avg) = opt.ema() {
        files.extend(avg.with_average(|| model.save_as(&out_dir, "model_ema"))?);
    }
    // eval.json: the last validation of the final model, and the test set, evaluated once
    // (by this rank alone) with the best epoch's model when there is one, else the final.
    let names = train_set.classes.as_deref();
    let mut report = serde_json::Map::new();
    if let Some((at, ev)) = &last_eval {
        report.insert(
            "val".into(),
            ev.to_json(
                &if eval_only {
                    "as given (train.epochs: 0)".to_string()
                } else {
                    format!("final (epoch {at})")
                },
                names,
            ),
        );
    }
    if let Some((at, ev)) = &last_ema_eval {
        report.insert(
            "val_ema".into(),
            ev.to_json(&format!("train.ema average (epoch {at})"), names),
        );
    }
    if let Some(t) = &spec.data.test {
        let test_set = Arc::new(load_split("data.test", t)?);
        let chosen = match (&best, spec.train.best.is_some()) {
            (Some(b), true) => {
                let weights = out_dir.join("model_best.safetensors");
                let state = Tensor::read_safetensors(&weights)
                    .with_context(|| format!("cannot read {}", weights.display()))?;
                model.load_state(state)?;
                format!("best (epoch {})", b.epoch)
            }
            _ if eval_only => "as given (train.epochs: 0)".to_string(),
            _ => format!("final (epoch {epoch})"),
        };
        let ev = evaluate(&model, &test_set, eval_input, device, classes, None)?;
        say(&WorkerMessage::Log {
            message: ev.summary("test", &format!("the {chosen} model")),
        });
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"test_loss": ev.loss, "test_accuracy": ev.top1, "test_top5": ev.top5, "model": chosen})
        )?;
        metrics.flush()?;
        report.insert("test".into(), ev.to_json(&chosen, names));
    }
    if !report.is_empty() {
        let path = out_dir.join("eval.json");
        write_file(&path, &serde_json::to_vec_pretty(&report)?)?;
        files.push(path.display().to_string());
    }
    if let Some(b) = &best {
        writeln!(metrics, "{}", serde_json::json!({ "best": b }))?;
        metrics.flush()?;
        let kept = spec.train.best.is_some();
        say(&WorkerMessage::Log {
            message: format!(
                "final model (model.*): epoch {epoch}; best: epoch {} ({} {:.4}){}",
                b.epoch,
                b.metric,
                b.value,
                if kept { " in model_best.*" } else { "" }
            ),
        });
        if kept {
            files.extend(
                ["model_best.safetensors", "model_best.pt", "model_best.json"]
                    .iter()
                    .map(|f| out_dir.join(f))
                    .filter(|p| p.exists())
                    .map(|p| p.display().to_string()),
            );
        }
    }
    let sps = train_samples as f64 / train_time.as_secs_f64().max(1e-9);
    say(&WorkerMessage::Done {
        files,
        samples_per_sec: sps,
    });
    Ok(())
}

/// The best epoch so far by `train.best`'s metric (`model_best.json` in the output dir).
#[derive(serde::Serialize, serde::Deserialize)]
struct BestRecord {
    /// 1-based, as events count epochs.
    epoch: u32,
    step: u64,
    metric: String,
    value: f64,
}

impl BestRecord {
    const FILE: &'static str = "model_best.json";

    /// The record a resumed job starts from: none past the step it resumes at (a record
    /// from steps that will be trained again would be of another run).
    fn read(dir: &Path, resumed_at: u64) -> Option<BestRecord> {
        let b: BestRecord =
            serde_json::from_slice(&std::fs::read(dir.join(Self::FILE)).ok()?).ok()?;
        (b.step <= resumed_at && resumed_at > 0).then_some(b)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        write_file(&dir.join(Self::FILE), &serde_json::to_vec_pretty(self)?)
    }
}

/// Writes `bytes` to `path` through a fresh file renamed into place: a link put where the
/// file goes is replaced, never written through.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What the input pipeline does to training and evaluation images, for the log.
fn describe_views(d: &ferry_cluster::spec::DataSpec) -> String {
    let a = d.augmentation();
    let mut train = Vec::new();
    if let Some(r) = &a.random_resized_crop {
        train.push(format!(
            "random resized crop (scale {:?}, ratio {:.3}-{:.3})",
            r.scale, r.ratio[0], r.ratio[1]
        ));
    }
    if let Some(p) = a.hflip.filter(|p| *p > 0.0) {
        train.push(format!("horizontal flip p={p}"));
    }
    if let Some(j) = a.color_jitter.as_ref().filter(|_| a.is_active()) {
        train.push(format!(
            "colour jitter (brightness {}, contrast {}, saturation {})",
            j.brightness, j.contrast, j.saturation
        ));
    }
    let eval = match (d.eval_shorter_side(), d.image_size) {
        (Some(r), Some(s)) => format!("shorter side to {r}, centre {s}x{s}"),
        (None, Some(s)) => format!("stretched to {s}x{s}"),
        _ => "as stored".to_string(),
    };
    let train = if train.is_empty() {
        "no augmentation".to_string()
    } else {
        format!(
            "training views: {}, seeded by (train.seed, epoch, sample)",
            train.join(", ")
        )
    };
    format!("{train}; plain views: {eval}")
}

/// Waits for the device's queued work; returns how long that took (zero on the CPU).
fn sync_device(device: Device) -> Duration {
    let t = Instant::now();
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    t.elapsed()
}

/// Times the parts of one step. On CUDA a timed step waits for the device before each
/// reading, so that a part's work is counted in it and not in a later part.
struct Clock {
    device: Device,
    timed: bool,
    last: Instant,
}

/// One part's time, and the parts of a step as they are filled in.
#[derive(Default)]
struct Lap {
    taken: f64,
    data_s: f64,
    compute_s: f64,
    teacher_s: f64,
    sync_s: f64,
    optimizer_s: f64,
}

impl Clock {
    fn new(device: Device, first_of_window: bool) -> Clock {
        let timed = device == Device::Cpu || first_of_window;
        if timed && device != Device::Cpu {
            sync_device(device);
        }
        Clock {
            device,
            timed,
            last: Instant::now(),
        }
    }

    /// Seconds since the last reading.
    fn lap(&mut self) -> Lap {
        if self.timed && self.device != Device::Cpu {
            sync_device(self.device);
        }
        let now = Instant::now();
        let taken = (now - self.last).as_secs_f64();
        self.last = now;
        Lap {
            taken,
            ..Default::default()
        }
    }
}

impl StepTiming {
    /// Adds one step (its parts only if it was timed).
    fn add(&mut self, lap: &Lap, timed: bool, grad_bytes: u64) {
        self.sync_total_s += lap.sync_s;
        self.allreduce_bytes += grad_bytes;
        if timed {
            self.timed_steps += 1;
            self.data_s += lap.data_s;
            self.compute_s += lap.compute_s;
            self.teacher_s += lap.teacher_s;
            self.sync_s += lap.sync_s;
            self.optimizer_s += lap.optimizer_s;
        }
    }
}

/// Bytes of the files in a directory (not recursive: a checkpoint is flat).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn check_logits(logits: &Tensor, classes_needed: i64) -> Result<()> {
    let s = logits.size();
    if s.len() != 2 {
        bail!("the model must return logits of shape (batch, classes), got {s:?}");
    }
    if s[1] < classes_needed {
        bail!("the training labels go up to {} but the model outputs {} classes; give the model a head with {classes_needed} outputs", classes_needed - 1, s[1]);
    }
    Ok(())
}

/// Seconds since the Unix epoch, for the metrics lines.
fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// What a rank does with the state it holds when its ring breaks: a peer died, stalled past
/// the timeout, or the daemon stopped the generation (which breaks the ring on purpose).
/// Every rank holds the same weights and optimizer state after the same completed steps, so
/// one per node (its saver) writes them as the checkpoint of that step, unless a rank of
/// another node was first; the next generation resumes from it, and loses at most the step
/// that was in flight.
struct Rescue<'a> {
    saver: bool,
    /// The step this generation started from (nothing newer to save before it moves on).
    start_step: u64,
    root: &'a Path,
    keep: u32,
    control: &'a control::ControlChannel,
}

impl Rescue<'_> {
    /// Saves (if this rank is its node's saver and has trained since its start) and returns
    /// the error to exit with: the daemon's stop if it asked, else what broke.
    fn save(
        &self,
        e: anyhow::Error,
        model: &Model,
        opt: &Optimizer,
        cursor: (u64, u32, usize, usize),
        last: (Option<f64>, Option<f64>),
        scaler: Option<&scaler::GradScaler>,
    ) -> anyhow::Error {
        let step = cursor.0;
        let stop = &self.control.stop;
        let why = match stop.reason() {
            Some(s) => format!("the daemon stopped it: {s}"),
            None => format!("{e:#}"),
        };
        // Right after its start, the checkpoint it resumed from holds the same state. The
        // daemon allows the save only while its node holds the session this rank began in.
        let allowed = self.saver && step > self.start_step && {
            emit(&WorkerMessage::MaySave { step });
            self.control.may_save(Duration::from_secs(10))
        };
        if allowed {
            match write_state(
                self.root, model, opt, cursor, last, scaler, self.keep, false,
            ) {
                Ok(dir) => emit(&WorkerMessage::Rescued {
                    step,
                    written: dir.is_some(),
                    path: dir
                        .unwrap_or_else(|| checkpoint::dir_of(self.root, step))
                        .display()
                        .to_string(),
                    reason: why.clone(),
                }),
                Err(se) => {
                    return e.context(format!(
                        "the state at step {step} could not be saved either: {se:#}"
                    ))
                }
            }
        }
        match stop.reason() {
            Some(s) => anyhow::anyhow!("stopped at step {step}: {s}"),
            None => e,
        }
    }
}

/// Writes a checkpoint at the cursor (step, epoch, samples consumed in the epoch, world size),
/// with the last (loss, accuracy) for the status of a resumed job, and reports it.
fn save_checkpoint(
    root: &Path,
    model: &Model,
    opt: &Optimizer,
    cursor: (u64, u32, usize, usize),
    last: (Option<f64>, Option<f64>),
    scaler: Option<&scaler::GradScaler>,
    keep: u32,
) -> Result<()> {
    let t = Instant::now();
    let dir = write_state(root, model, opt, cursor, last, scaler, keep, true)?
        .ok_or_else(|| anyhow::anyhow!("checkpoint of step {} not written", cursor.0))?;
    emit(&WorkerMessage::Checkpoint {
        step: cursor.0,
        path: dir.display().to_string(),
        seconds: t.elapsed().as_secs_f64(),
        bytes: dir_bytes(&dir),
    });
    Ok(())
}

/// The checkpoint of this rank's state at the cursor; with `replace` false, only if no
/// checkpoint of that step exists (returns `None` then).
#[allow(clippy::too_many_arguments)]
fn write_state(
    root: &Path,
    model: &Model,
    opt: &Optimizer,
    (step, epoch, consumed, world): (u64, u32, usize, usize),
    (train_loss, val_accuracy): (Option<f64>, Option<f64>),
    scaler: Option<&scaler::GradScaler>,
    keep: u32,
    replace: bool,
) -> Result<Option<PathBuf>> {
    let manifest = checkpoint::Manifest {
        format: checkpoint::FORMAT,
        step,
        epoch,
        samples_in_epoch: consumed as u64,
        world_size: world as u32,
        optimizer_steps: opt.steps,
        created_at: ferry_cluster::time::now_rfc3339(),
        train_loss,
        val_accuracy,
        loss_scale: scaler.map(|s| s.scale),
        scale_growth_tracker: scaler.map(|s| s.growth_tracker),
    };
    let state: Vec<(String, Tensor)> = model
        .state()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    if replace {
        checkpoint::write(root, &manifest, &state, &opt.state(), keep as usize).map(Some)
    } else {
        checkpoint::write_new(root, &manifest, &state, &opt.state(), keep as usize)
    }
}

/// Above this many classes no confusion matrix is kept (it would be classes² numbers).
const MAX_CONFUSION_CLASSES: usize = 1000;

/// What one evaluation found, summed over the ranks that shared it.
struct Evaluation {
    samples: u64,
    loss: f64,
    top1: f64,
    top5: f64,
    /// Rows: the true class; columns: the predicted class, then one column for predictions
    /// outside the data's classes (a model with more outputs). None above
    /// `MAX_CONFUSION_CLASSES`.
    confusion: Option<Vec<Vec<u64>>>,
}

impl Evaluation {
    /// The record `eval.json` holds for a split: the model it evaluated, top-1 and top-5,
    /// per-class accuracy and the confusion matrix, classes named when the data names them.
    /// A line for the job's events: `SET set: top-1 ..., with MODEL`.
    fn summary(&self, set: &str, model: &str) -> String {
        format!(
            "{set} set: top-1 {:.2}%, top-5 {:.2}%, loss {:.4} over {} samples, with {model}",
            self.top1 * 100.0,
            self.top5 * 100.0,
            self.loss,
            self.samples
        )
    }

    fn to_json(&self, model: &str, names: Option<&[String]>) -> serde_json::Value {
        let name = |k: usize| {
            names
                .and_then(|n| n.get(k))
                .cloned()
                .unwrap_or(k.to_string())
        };
        let per_class: Vec<serde_json::Value> = self
            .confusion
            .iter()
            .flatten()
            .enumerate()
            .map(|(k, row)| {
                let n: u64 = row.iter().sum();
                serde_json::json!({
                    "class": name(k),
                    "samples": n,
                    "accuracy": (n > 0).then(|| row[k] as f64 / n as f64),
                })
            })
            .collect();
        serde_json::json!({
            "model": model,
            "samples": self.samples,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": per_class,
            "confusion": self.confusion.as_ref().map(|m| serde_json::json!({
                "rows": "true class",
                "columns": (0..m.len()).map(name).chain(std::iter::once("(other output)".to_string())).collect::<Vec<_>>(),
                "matrix": m,
            })),
        })
    }
}

/// The number of classes a data set's labels come from: its ImageFolder classes, else the
/// largest label + 1.
fn class_count(ds: &Dataset) -> usize {
    ds.classes.as_ref().map_or_else(
        || {
            ds.labels()
                .iter()
                .copied()
                .max()
                .map_or(0, |m| (m + 1).max(0) as usize)
        },
        Vec::len,
    )
}

/// Loss, top-1 and top-5 accuracy and the confusion matrix over a data set of `classes`
/// classes, in evaluation mode. With `dist`, each rank evaluates every `world`-th sample
/// and the sums are added across ranks (a collective: every rank calls it); without, this
/// process evaluates every sample.
fn evaluate(
    model: &Model,
    ds: &Arc<Dataset>,
    (batch, threads, depth): (usize, usize, usize),
    device: Device,
    classes: usize,
    mut dist: Option<&mut Dist>,
) -> Result<Evaluation> {
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world));
    let mine: Vec<u32> = (rank as u32..ds.len() as u32).step_by(world).collect();
    let plan = mine
        .chunks(batch.max(1))
        .map(|c| Planned {
            indices: c.to_vec(),
            view: View::Eval,
        })
        .collect();
    let mut loader = Loader::start(ds.clone(), plan, threads, depth);
    let keep = classes > 0 && classes <= MAX_CONFUSION_CLASSES;
    let width = classes as i64 + 1;
    let cells = if keep { classes as i64 * width } else { 0 };
    let (sums, confusion) = tch::no_grad(|| -> Result<([f64; 4], Tensor)> {
        let mut sums = [0f64; 4];
        let mut confusion = Tensor::zeros([cells], (Kind::Int64, device));
        while let Some(b) = loader.next_batch() {
            let (x, y) = b?.to_device(&ds.transform, device);
            let len = y.size()[0];
            let logits = model.forward(&x, false)?;
            let k = logits.size()[1].min(5);
            let (_, top) = logits.topk(k, 1, true, true);
            let hit = top.eq_tensor(&y.unsqueeze(1));
            let pred = top.select(1, 0);
            sums[0] += logits.cross_entropy_for_logits(&y).double_value(&[]) * len as f64;
            sums[1] += hit.select(1, 0).sum(Kind::Int64).int64_value(&[]) as f64;
            sums[2] += hit.any_dim(1, false).sum(Kind::Int64).int64_value(&[]) as f64;
            sums[3] += len as f64;
            if keep {
                let col = pred.clamp_max(classes as i64);
                let cell = &y * width + col;
                confusion += cell.bincount::<Tensor>(None, cells);
            }
        }
        Ok((sums, confusion))
    })?;
    let mut flat: Vec<f32> = sums.iter().map(|v| *v as f32).collect();
    flat.extend(
        Vec::<i64>::try_from(&confusion.to_device(Device::Cpu))?
            .iter()
            .map(|&c| c as f32),
    );
    if let Some(d) = dist.as_mut() {
        d.sum(&mut flat)?;
    }
    let n = f64::from(flat[3]).max(1.0);
    Ok(Evaluation {
        samples: flat[3] as u64,
        loss: f64::from(flat[0]) / n,
        top1: f64::from(flat[1]) / n,
        top5: f64::from(flat[2]) / n,
        confusion: keep.then(|| {
            flat[4..]
                .chunks(width as usize)
                .map(|row| row.iter().map(|&c| c as u64).collect())
                .collect()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::spec::{ClassWeightRule, ClassWeights};

    #[test]
    fn balanced_class_weights_are_scikit_learns() {
        // 6 samples: 3 of class 0, 2 of class 1, 1 of class 2, none of class 3 (weighs 1);
        // an unlabelled one (-1) does not count.
        let labels = [0, 0, 0, 1, 1, 2, -1];
        let w = class_weights(&ClassWeights::Rule(ClassWeightRule::Balanced), &labels, 4).unwrap();
        let n = 6.0;
        assert_eq!(w, [n / (4.0 * 3.0), n / (4.0 * 2.0), n / 4.0, 1.0]);
        let given = ClassWeights::Given(vec![1.0, 2.0]);
        assert_eq!(class_weights(&given, &labels, 2).unwrap(), [1.0, 2.0]);
        let e = class_weights(&given, &labels, 4).unwrap_err().to_string();
        assert!(e.contains("2 weights but data.train has 4 classes"), "{e}");
    }
}
