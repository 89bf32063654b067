//! A dry run's checks of the model and the data (`POST /v1/jobs?dryRun=true`), in a
//! process of its own (`ferryd check`), confined as a rank is: a TorchScript model is code.
//!
//! What it checks without training: the data files' headers (a safetensors header, an
//! ImageFolder's classes and first image), the model loads, `freeze` prefixes match its
//! parameters, `init` matches it by name and shape, a batch of the data's shape goes
//! through it, and its outputs cover the data's classes; the same for a distillation
//! teacher. Every error is reported with its field.

use std::path::Path;

use anyhow::{Context, Result};
use ferry_cluster::api::FieldError;
use ferry_cluster::spec::{Arch, JobSpec, ModelSpec, TrainSpec};
use tch::{Device, Kind, Tensor};

use super::data::{probe, Probe};
use super::model::Model;
use super::optim::Optimizer;
use crate::protocol::WorkerPlan;

/// Runs the checks of the plan at `plan_path`; the errors, as JSON, go to stdout.
pub fn run_check(plan_path: &Path) -> Result<()> {
    let mut plan: WorkerPlan = serde_json::from_slice(
        &std::fs::read(plan_path)
            .with_context(|| format!("cannot read {}", plan_path.display()))?,
    )
    .context("corrupt check plan")?;
    let errors = match super::confine::pin_plan(&mut plan, false) {
        Err(e) => vec![error_at("", &e)],
        Ok(_pins) => {
            super::confine::sandbox(&plan, &[])?;
            tch::set_num_threads(plan.threads.max(1) as i32);
            check(&plan.spec)
        }
    };
    println!("{}", serde_json::to_string(&errors)?);
    Ok(())
}

/// A field error from an error whose message starts with `field: ` (as the loaders'
/// messages do); else at `fallback`.
fn error_at(fallback: &str, e: &anyhow::Error) -> FieldError {
    let message = format!("{e:#}");
    let known = [
        "data.train.path",
        "data.val.path",
        "data.test.path",
        "data.unlabelled.path",
        "data.train",
        "data.val",
        "data.test",
        "data.unlabelled",
        "data.normalize",
        "model.path",
        "distill.teacher.path",
    ];
    for f in known {
        if let Some(rest) = message.strip_prefix(&format!("{f}: ")) {
            return FieldError {
                field: f.to_string(),
                message: rest.to_string(),
            };
        }
    }
    FieldError {
        field: if fallback.is_empty() {
            "(spec)".into()
        } else {
            fallback.into()
        },
        message,
    }
}

/// Every check; the errors found.
pub fn check(spec: &JobSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let data = &spec.data;
    let train = probe(Path::new(&data.train.path), "data.train", data, true)
        .map_err(|e| errs.push(error_at("data.train.path", &e)))
        .ok();
    let val = data.val.as_ref().and_then(|v| {
        probe(Path::new(&v.path), "data.val", data, true)
            .map_err(|e| errs.push(error_at("data.val.path", &e)))
            .ok()
    });
    let test = data.test.as_ref().and_then(|v| {
        probe(Path::new(&v.path), "data.test", data, true)
            .map_err(|e| errs.push(error_at("data.test.path", &e)))
            .ok()
    });
    let pool = data.unlabelled.as_ref().and_then(|u| {
        probe(Path::new(&u.path), "data.unlabelled", data, false)
            .map_err(|e| errs.push(error_at("data.unlabelled.path", &e)))
            .ok()
    });
    let Some(train) = train else { return errs };
    if let Some(n) = &data.normalize {
        let c = train.shape.0 as usize;
        if n.mean.len() != c || n.std.len() != c {
            errs.push(FieldError {
                field: "data.normalize".into(),
                message: format!(
                    "{} mean and {} std values for data.train's {c}-channel images; give {c} of each",
                    n.mean.len(),
                    n.std.len()
                ),
            });
        }
    }
    for (field, other) in [
        ("data.val", &val),
        ("data.test", &test),
        ("data.unlabelled", &pool),
    ] {
        if let Some(o) = other {
            if o.shape != train.shape {
                errs.push(FieldError {
                    field: field.into(),
                    message: format!(
                        "images are {:?} but data.train images are {:?} (C,H,W); set data.image_size",
                        o.shape, train.shape
                    ),
                });
            }
        }
    }
    if let (Some(ferry_cluster::spec::ClassWeights::Given(w)), Some(t)) =
        (&spec.train.class_weights, &train.classes)
    {
        if w.len() != t.len() {
            errs.push(FieldError {
                field: "train.class_weights".into(),
                message: format!(
                    "{} weights for data.train's {} classes ({}); give one per class, in this order",
                    w.len(),
                    t.len(),
                    t.join(", ")
                ),
            });
        }
    }
    for (field, split) in [("data.val", &val), ("data.test", &test)] {
        let (Some(v), Some(t)) = (
            split.as_ref().and_then(|v| v.classes.as_ref()),
            &train.classes,
        ) else {
            continue;
        };
        for c in v.iter().filter(|c| !t.contains(c)) {
            errs.push(FieldError {
                field: field.into(),
                message: format!(
                    "class `{c}` is not one of data.train's classes ({}): the model is not trained on it",
                    t.join(", ")
                ),
            });
        }
    }
    check_model(&mut errs, "model", &spec.model, &train, Some(&spec.train));
    if let Some(d) = &spec.distill {
        check_model(
            &mut errs,
            "distill.teacher",
            &d.teacher.model(),
            &train,
            None,
        );
    }
    errs
}

/// Builds `m` for `train`'s images and runs a batch of two through it.
/// `student`: the job's training section, for a student model (its freeze and parameter
/// groups are checked); None for a teacher.
fn check_model(
    errs: &mut Vec<FieldError>,
    at: &str,
    m: &ModelSpec,
    train: &Probe,
    student: Option<&TrainSpec>,
) {
    let path_field = format!("{at}.path");
    let mut model = match Model::build(
        m,
        m.path.as_deref().map(Path::new),
        train.shape,
        Device::Cpu,
    ) {
        Ok(model) => model,
        Err(e) => {
            let field = if m.arch == Arch::Torchscript {
                path_field
            } else {
                at.to_string()
            };
            errs.push(FieldError {
                field,
                message: format!("{e:#}"),
            });
            return;
        }
    };
    // The model's messages name `model.init` and `model.freeze`; a teacher's are its own.
    let at_field = |what: &str, e: anyhow::Error| {
        let message = format!("{e:#}");
        FieldError {
            field: format!("{at}.{what}"),
            message: message
                .strip_prefix(&format!(
                    "model.{}: ",
                    what.split('[').next().unwrap_or(what)
                ))
                .unwrap_or(&message)
                .to_string(),
        }
    };
    if let Some(init) = &m.init {
        if let Err(e) = model.load_init(init) {
            errs.push(at_field("init", e));
        }
    }
    if !m.reset.is_empty() {
        if let Err(e) = model.reset(&m.reset) {
            errs.push(at_field("reset", e));
        }
    }
    if let Some(t) = student {
        if let Err(e) = model.freeze(&m.freeze) {
            errs.push(at_field("freeze", e));
        }
        let later = m.unfreeze_prefixes();
        for (i, u) in m.unfreeze.iter().enumerate() {
            if let Err(e) = model.unfreeze(&u.prefixes) {
                errs.push(at_field(&format!("unfreeze[{i}]"), e));
            }
        }
        if let Err(e) = Optimizer::with_groups(
            &t.optimizer,
            &t.param_groups,
            t.layer_decay.as_ref(),
            model.trainable_with(&later),
        ) {
            let message = format!("{e:#}");
            let (field, message) = message
                .split_once(": ")
                .unwrap_or(("train.param_groups", &message));
            errs.push(FieldError {
                field: field.to_string(),
                message: message.to_string(),
            });
        }
    }
    let (c, h, w) = train.shape;
    let batch = Tensor::zeros([2, c, h, w], (Kind::Float, Device::Cpu));
    match tch::no_grad(|| model.forward(&batch, false)) {
        Err(e) => errs.push(FieldError {
            field: at.to_string(),
            message: format!(
                "a batch of data.train's {c}x{h}x{w} images does not go through the model: {e:#}"
            ),
        }),
        Ok(out) => {
            let size = out.size();
            let classes = train.classes.as_ref().map_or(0, |c| c.len() as i64);
            match size.as_slice() {
                [2, k] if *k >= classes => {}
                [2, k] => errs.push(FieldError {
                    field: if m.arch == Arch::Torchscript {
                        at.to_string()
                    } else {
                        format!("{at}.num_classes")
                    },
                    message: format!(
                        "the model has {k} outputs but data.train has {classes} classes"
                    ),
                }),
                _ => errs.push(FieldError {
                    field: at.to_string(),
                    message: format!("the model's output is {size:?}; it must be (batch, classes)"),
                }),
            }
        }
    }
}
