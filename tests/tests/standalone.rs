//! `ferryd --standalone` end to end: real daemon, real ranks, real ferryctl.

use std::time::Duration;

use ferry_cluster::api::JobPhase;
use ferry_tests::{fixtures, kill9, pid_alive, rank_pid, run_python, Daemon};

/// Feature extraction on the fixture CNN: init from a 3-class source, new 4-class head.
fn feature_extraction(name: &str) -> String {
    format!(
        r#"
name: {name}
model:
  arch: torchscript
  path: cnn4.pt
  init: cnn3_init.safetensors
  freeze: [features]
data:
  train: {{path: train.safetensors}}
  val: {{path: val}}
  channels: 1
train:
  epochs: 4
  batch_size: 16
  optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
  lr_schedule: {{name: cosine}}
  checkpoint_every_steps: 30
output:
  dir: {name}
"#
    )
}

/// A job that runs for a long time unless stopped.
fn long_job(name: &str, epochs: u32, checkpoint_every: u32) -> String {
    format!(
        r#"
name: {name}
model: {{arch: torchscript, path: cnn4.pt}}
data: {{train: {{path: big.safetensors}}}}
train:
  epochs: {epochs}
  batch_size: 8
  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
  checkpoint_every_steps: {checkpoint_every}
resources: {{threads: 1}}
output: {{dir: {name}}}
"#
    )
}

#[test]
fn a_job_submitted_with_ferryctl_succeeds_with_a_sane_accuracy() {
    let d = Daemon::start();
    let spec = d.dir.path().join("job.yaml");
    std::fs::write(&spec, feature_extraction("fe")).unwrap();
    let out = d.ctl(&["submit", spec.to_str().unwrap(), "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ferryctl submit --wait failed: {stderr}\n{}",
        d.log()
    );
    assert!(stderr.contains("Succeeded"), "{stderr}");
    assert!(
        stderr.contains("init: 14 tensors loaded"),
        "the init report is shown: {stderr}"
    );

    let job = d.job("fe");
    assert_eq!(job.phase, JobPhase::Succeeded);
    let s = &job.status;
    assert_eq!((s.step, s.total_steps, s.epoch), (100, 100, 4));
    assert!(
        s.val_accuracy.unwrap() >= 0.9,
        "val accuracy {:?}",
        s.val_accuracy
    );
    assert!(s.train_loss.unwrap() < 1.0, "loss {:?}", s.train_loss);
    assert!(s.started_at.is_some() && s.finished_at.is_some() && s.samples_per_sec.unwrap() > 0.0);

    let dir = d.out().join("fe");
    for f in ["model.safetensors", "model.pt", "metrics.jsonl"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("val_accuracy"))
            .count(),
        4,
        "one eval per epoch"
    );
    // The trained TorchScript module loads in PyTorch and holds the same weights.
    let py = run_python(
        "load_torchscript.py",
        &[
            dir.join("model.pt").to_str().unwrap(),
            dir.join("model.safetensors").to_str().unwrap(),
        ],
    );
    assert!(py.contains("ok"), "{py}");

    // Feature extraction: the frozen backbone, BatchNorm statistics included, is exactly the
    // source's; the head trained.
    let init = fixtures().join("models/cnn3_init.safetensors");
    let py = run_python(
        "same_tensors.py",
        &[
            dir.join("model.safetensors").to_str().unwrap(),
            init.to_str().unwrap(),
            "features",
        ],
    );
    assert!(py.contains("unchanged 14 under features"), "{py}");

    // ferryctl's views of it.
    let get = d.ctl(&["get"]);
    assert!(String::from_utf8_lossy(&get.stdout).contains("Succeeded"));
    let json = d.ctl(&["get", "fe", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json output");
    assert_eq!(v["phase"], "Succeeded");
    let logs = d.ctl(&["logs", "fe"]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("val accuracy"));
    // Events come in pages read from `after` on; `ferryctl logs` reads them all.
    let all = d.events(&job.id).events;
    let (status, body) = d.get(&format!("/v1/jobs/{}/events?after=2&limit=3", job.id));
    assert_eq!(status, 200, "{body}");
    let page: ferry_cluster::api::EventPage = serde_json::from_value(body).unwrap();
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!((seqs, page.next), (vec![3, 4, 5], 5));
    let lines = String::from_utf8_lossy(&logs.stdout).lines().count();
    assert_eq!(lines, all.len(), "ferryctl logs prints every event once");
    let nodes = d.ctl(&["nodes", "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&nodes.stdout).contains("mode: standalone"));
}

/// `train.best` keeps the best epoch's model beside the last one, `train.early_stop` ends
/// the job on a plateau, `model.init`'s `exclude` leaves the source's head out, and the test
/// set is evaluated once with the best model into eval.json.
#[test]
fn the_best_epoch_is_kept_and_a_plateau_ends_the_job_early() {
    let d = Daemon::start();
    let spec = feature_extraction("best")
        .replace(
            "  val: {path: val}\n",
            "  val: {path: val}\n  test: {path: val}\n",
        )
        .replace(
            "init: cnn3_init.safetensors",
            "init: {path: cnn3_init.safetensors, exclude: [classifier]}",
        )
        .replace(
            "  epochs: 4\n",
            "  epochs: 40\n  best: {metric: val_accuracy}\n  early_stop: {patience: 2}\n",
        );
    let job = d.submit(&spec);
    let end = d.wait_terminal(&job.id, Duration::from_secs(300));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let events = d.events(&job.id).events;
    let said = |start: &str| {
        events
            .iter()
            .find(|e| e.message.starts_with(start))
            .map(|e| e.message.clone())
            .unwrap_or_else(|| panic!("no event starting with {start:?}: {events:?}"))
    };
    assert!(
        said("init:").contains("2 excluded (classifier.bias, classifier.weight)"),
        "{}",
        said("init:")
    );
    let stop = said("early stop after epoch ");
    let stopped: u32 = stop["early stop after epoch ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(stopped < 40, "{stop}");
    let out = d.out().join("best");
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model_best.json")).unwrap()).unwrap();
    let best_epoch = best["epoch"].as_u64().unwrap() as u32;
    assert_eq!(stopped - best_epoch, 2, "{stop}; {best}");
    // The record is the first epoch with the highest validation accuracy.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let accs: Vec<(u32, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["epoch"].as_u64()? as u32, v["val_accuracy"].as_f64()?))
        })
        .collect();
    assert_eq!(
        accs.len() as u32,
        stopped,
        "one evaluation per epoch trained"
    );
    let top = accs.iter().map(|a| a.1).fold(f64::MIN, f64::max);
    let first_top = accs.iter().find(|a| a.1 == top).unwrap().0;
    assert_eq!(
        (first_top, top),
        (best_epoch, best["value"].as_f64().unwrap())
    );
    for f in [
        "model_best.safetensors",
        "model_best.pt",
        "model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert!(said("final model (model.*): epoch ").contains(&format!("best: epoch {best_epoch}")));
    // eval.json: the final model on the validation set, the best on the test set (here the
    // same images, so its accuracy is the best epoch's validation accuracy, exactly).
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    let (val, test) = (&eval["val"], &eval["test"]);
    assert_eq!(val["model"], format!("final (epoch {stopped})"));
    assert_eq!(test["model"], format!("best (epoch {best_epoch})"));
    assert_eq!(test["top1"].as_f64().unwrap(), top);
    assert!(said("test set: top-1 ").contains(&format!("with the best (epoch {best_epoch}) model")));
    for split in [val, test] {
        let (top1, top5) = (
            split["top1"].as_f64().unwrap(),
            split["top5"].as_f64().unwrap(),
        );
        assert!(top5 >= top1 && top5 <= 1.0, "{split}");
        let m: Vec<Vec<u64>> =
            serde_json::from_value(split["confusion"]["matrix"].clone()).unwrap();
        let n: u64 = m.iter().flatten().sum();
        assert_eq!(n, split["samples"].as_u64().unwrap());
        let diag: u64 = (0..m.len()).map(|k| m[k][k]).sum();
        assert!((diag as f64 / n as f64 - top1).abs() < 1e-9, "{split}");
        let per_class = split["per_class"].as_array().unwrap();
        assert_eq!(per_class.len(), m.len());
        for (k, c) in per_class.iter().enumerate() {
            assert_eq!(c["samples"].as_u64().unwrap(), m[k].iter().sum::<u64>());
        }
    }
    assert_eq!(
        val["confusion"]["columns"].as_array().unwrap().len(),
        5,
        "4 classes and (other output)"
    );
}

#[test]
fn a_bad_spec_gets_a_4xx_naming_the_field() {
    let d = Daemon::start();
    let good = feature_extraction("bad");
    // (text in the good spec, its replacement, the field the 422 must name)
    let cases = [
        ("lr: 0.1", "lr: -0.1", "train.optimizer.lr"),
        ("channels: 1", "channels: 1\n  colour: true", "data.colour"),
        ("name: sgd", "name: lbfgs", "train.optimizer.name"),
        (
            "path: train.safetensors",
            "path: ../models/cnn4.pt",
            "data.train.path",
        ),
        (
            "path: train.safetensors",
            "path: /etc/passwd",
            "data.train.path",
        ),
        (
            "path: train.safetensors",
            "path: nope.safetensors",
            "data.train.path",
        ),
        ("path: cnn4.pt", "path: missing.pt", "model.path"),
    ];
    let mut cases = cases.to_vec();
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        // On a node without a GPU, a CUDA job is refused at submission.
        cases.push((
            "channels: 1",
            "channels: 1\nresources: {device: cuda}",
            "resources.device",
        ));
        cases.push((
            "channels: 1",
            "channels: 1\nresources: {device: cuda, ranks: 2}",
            "resources.device",
        ));
    }
    for (from, to, field) in cases {
        let (got, body) = d.post("/v1/jobs", &good.replace(from, to));
        assert_eq!(got, 422, "{field}: {body}");
        assert_eq!(body["status"], 422);
        let fields: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "expected {field} in {body}");
    }
    // Not YAML at all, and an empty body.
    let (got, body) = d.post("/v1/jobs", "{{{");
    assert_eq!(got, 422, "{body}");
    let (got, _) = d.post("/v1/jobs", "");
    assert_eq!(got, 400);
    // Too large.
    let (got, body) = d.post("/v1/jobs", &"#".repeat(2 << 20));
    assert_eq!(got, 413, "{body}");
    // Nothing was created, and ferryctl says which field is wrong.
    assert_eq!(d.get("/v1/jobs").1["jobs"].as_array().unwrap().len(), 0);
    let f = d.dir.path().join("bad.yaml");
    std::fs::write(&f, good.replace("epochs: 4", "epochs: 200000")).unwrap();
    let out = d.ctl(&["submit", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "a rejected request exits 5");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("train.epochs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Bad query parameters are 400 problems too.
    let (got, body) = d.get("/v1/jobs?colour=red");
    assert_eq!((got, body["status"].as_u64()), (400, Some(400)), "{body}");
    // Unknown jobs are 404 problems.
    let (got, body) = d.get("/v1/jobs/nope");
    assert_eq!((got, body["title"].as_str()), (404, Some("Job not found")));
}

#[test]
fn a_cancelled_job_stops() {
    let d = Daemon::start();
    let job = d.submit(&long_job("cancel-me", 1000, 0));
    d.wait_for(&job.id, Duration::from_secs(60), "steps", |j| {
        j.status.step > 0
    });
    let pid = rank_pid(&d, &job.id, 0);
    assert!(pid_alive(pid));
    // While it runs, its steps and samples are counters (what `rate()` needs).
    let (_, body) = d.get("/metrics");
    let text = body.as_str().unwrap().to_string();
    let series = format!(
        "ferry_job_steps_total{{job_id=\"{}\",name=\"cancel-me\"}} ",
        job.id
    );
    let steps: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series}in:\n{text}"))
        .parse()
        .unwrap();
    assert!(steps > 0);
    assert!(text.contains("ferry_job_samples_total{job_id="), "{text}");
    let out = d.ctl(&["cancel", "cancel-me"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = d.wait_terminal(&job.id, Duration::from_secs(20));
    assert_eq!(end.phase, JobPhase::Cancelled);
    assert!(end.status.finished_at.is_some());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pid_alive(pid), "rank process {pid} still runs");
    // Cancelling again is a conflict; a Pending job is cancelled at once.
    assert_eq!(d.post(&format!("/v1/jobs/{}/cancel", job.id), "").0, 409);
}

#[test]
fn a_killed_rank_fails_the_job_but_not_the_daemon() {
    let mut d = Daemon::start();
    let job = d.submit(&long_job("victim", 1000, 0));
    d.wait_for(&job.id, Duration::from_secs(60), "steps", |j| {
        j.status.step > 0
    });
    let pid = rank_pid(&d, &job.id, 0);
    kill9(pid);
    let end = d.wait_terminal(&job.id, Duration::from_secs(20));
    assert_eq!(end.phase, JobPhase::Failed);
    let reason = end.status.failure.unwrap();
    assert!(
        reason.contains("rank 0") && reason.contains("SIGKILL"),
        "{reason}"
    );
    assert!(d.alive(), "the daemon died with its rank");
    // The daemon still runs jobs.
    let ok = d.submit(&feature_extraction("after-kill"));
    assert_eq!(
        d.wait_terminal(&ok.id, Duration::from_secs(60)).phase,
        JobPhase::Succeeded
    );
}

#[test]
fn a_rank_error_fails_the_job_with_its_reason() {
    let d = Daemon::start();
    // The fixture CNN has 4 outputs; freezing a prefix that matches nothing is a user error
    // found only once the model is loaded.
    let job =
        d.submit(&feature_extraction("typo").replace("freeze: [features]", "freeze: [backbone]"));
    let end = d.wait_terminal(&job.id, Duration::from_secs(60));
    assert_eq!(end.phase, JobPhase::Failed);
    let reason = end.status.failure.unwrap();
    assert!(
        reason.contains("model.freeze")
            && reason.contains("backbone")
            && reason.contains("features."),
        "{reason}"
    );
}

#[test]
fn a_restarted_daemon_keeps_its_jobs_and_resumes_a_running_one() {
    let mut d = Daemon::start();
    let done = d.submit(&feature_extraction("finished-before"));
    d.wait_terminal(&done.id, Duration::from_secs(60));
    // 2000 samples / batch 8 = 250 steps per epoch.
    let job = d.submit(&long_job("survivor", 8, 100));
    d.wait_for(&job.id, Duration::from_secs(120), "a checkpoint", |j| {
        j.status.checkpoint.is_some() && j.status.step >= 300
    });
    let pid = rank_pid(&d, &job.id, 0);
    d.crash_and_restart();
    assert!(!pid_alive(pid), "the rank outlived its daemon");

    assert_eq!(
        d.job(&done.id).phase,
        JobPhase::Succeeded,
        "finished jobs are still listed"
    );
    let end = d.wait_terminal(&job.id, Duration::from_secs(300));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(end.status.attempts, 2);
    assert_eq!((end.status.step, end.status.total_steps), (2000, 2000));
    let events = d.events(&job.id).events;
    let resumed = events
        .iter()
        .find(|e| e.message.starts_with("training resumed at step"))
        .expect("a resume event");
    let from = resumed.data["start_step"].as_u64().unwrap();
    assert!(from >= 300 && from % 100 == 0, "resumed from step {from}");
    // Steps are not repeated: the metrics of the second attempt start after the checkpoint.
    let metrics = std::fs::read_to_string(d.out().join("survivor/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(*steps.last().unwrap(), 2000);
}

#[test]
fn ferry_matches_pytorch_sgd_and_adamw_step_for_step() {
    let d = Daemon::start();
    let sgd = "{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}";
    // Mixed precision against torch.autocast("cpu") (and GradScaler for fp16). TorchScript
    // runs op by op on both sides, except in the last case (model.jit_optimize: true against
    // the optimising executor): under bf16 autocast the two modes differ by ~1e-4, far over
    // the tolerance, so that case fails unless the spec's setting reaches the executor.
    // Label smoothing and gradient clipping against cross_entropy(label_smoothing=) and
    // clip_grad_norm_ (the reference fails unless clipping took effect). Parameter groups
    // (the backbone at a tenth of the lr, biases without weight decay) against torch.optim's
    // parameter groups.
    let adamw = "{name: adamw, lr: 0.001, weight_decay: 0.01}";
    let grouped = |o: &str| o.replace('}', ", bias_weight_decay: 0}");
    for (opt, yaml, precision, jit, smoothing, clip, groups) in [
        ("sgd", sgd.to_string(), "fp32", "op-by-op", "0", "0", ""),
        ("adamw", adamw.to_string(), "fp32", "op-by-op", "0", "0", ""),
        ("sgd", sgd.to_string(), "bf16", "op-by-op", "0", "0", ""),
        ("sgd", sgd.to_string(), "fp16", "op-by-op", "0", "0", ""),
        ("sgd", sgd.to_string(), "bf16", "optimize", "0", "0", ""),
        (
            "sgd",
            sgd.to_string(),
            "fp32",
            "op-by-op",
            "0.1",
            "0.05",
            "",
        ),
        (
            "sgd",
            grouped(sgd),
            "fp32",
            "op-by-op",
            "0",
            "0",
            "features:0.1",
        ),
        (
            "adamw",
            grouped(adamw),
            "fp32",
            "op-by-op",
            "0",
            "0",
            "features:0.1",
        ),
    ] {
        let name = format!(
            "numerics-{opt}-{precision}-{jit}-{}{}",
            smoothing.replace('.', ""),
            if groups.is_empty() { "" } else { "-groups" }
        );
        let mut extra = if clip == "0" {
            String::new()
        } else {
            format!(", label_smoothing: {smoothing}, clip_grad_norm: {clip}")
        };
        if let Some((prefix, mult)) = groups.split_once(':') {
            extra += &format!(", param_groups: [{{prefix: {prefix}, lr_mult: {mult}}}]");
        }
        let optimize = jit == "optimize";
        let spec = format!(
            "name: {name}\nmodel: {{arch: torchscript, path: mlp.pt, jit_optimize: {optimize}}}\ndata: {{train: {{path: train.safetensors}}, shuffle: false}}\n\
             train: {{epochs: 1, batch_size: 16, max_steps: 6, precision: {precision}, optimizer: {yaml}{extra}}}\noutput: {{dir: {name}}}\n"
        );
        let job = d.submit(&spec);
        let end = d.wait_terminal(&job.id, Duration::from_secs(60));
        assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
        let f = fixtures();
        let out = run_python(
            "sgd_reference.py",
            &[
                f.join("models/mlp.pt").to_str().unwrap(),
                f.join("data/train.safetensors").to_str().unwrap(),
                d.out()
                    .join(&name)
                    .join("model.safetensors")
                    .to_str()
                    .unwrap(),
                opt,
                "6",
                "16",
                precision,
                jit,
                smoothing,
                clip,
                groups,
            ],
        );
        assert!(out.contains("max_abs_diff="), "{out}");
        eprintln!("{opt} {precision} {jit} against PyTorch: {}", out.trim());
    }
}

/// A job that unfreezes its backbone and averages its weights, resumed from a checkpoint
/// after its daemon crashed, ends as PyTorch's uninterrupted loop does: the unfreezing is
/// applied again at the resume, the optimizer state of the unfrozen part and the average
/// come back from the checkpoint.
#[test]
fn a_resumed_job_unfreezes_and_averages_as_an_uninterrupted_one() {
    let mut d = Daemon::start();
    // 2000 samples / batch 8 = 250 steps per epoch; the backbone trains from step 250.
    let spec = "name: resumed-recipe\nmodel: {arch: torchscript, path: cnn4.pt, freeze: [features], unfreeze: [{epoch: 1, prefixes: [features]}]}\n\
                data: {train: {path: big.safetensors}, shuffle: false}\n\
                train: {epochs: 6, batch_size: 8, checkpoint_every_steps: 100, optimizer: {name: adamw, lr: 0.001, weight_decay: 0.01}, ema: {decay: 0.99}}\n\
                output: {dir: resumed-recipe}\n";
    let job = d.submit(spec);
    d.wait_for(&job.id, Duration::from_secs(120), "a checkpoint", |j| {
        j.status.checkpoint.is_some() && j.status.step >= 400
    });
    d.crash_and_restart();
    let end = d.wait_terminal(&job.id, Duration::from_secs(300));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!((end.status.attempts, end.status.step), (2, 1500));
    let events = d.events(&job.id).events;
    let said = |start: &str| {
        events
            .iter()
            .filter(|e| e.message.starts_with(start))
            .count()
    };
    assert_eq!(said("training resumed at step"), 1, "{events:?}");
    // Once in the first attempt, once again at the resume.
    assert_eq!(said("model.unfreeze at epoch 1"), 2, "{events:?}");
    assert_eq!(said("train.ema: weights averaged with decay 0.99 after every step, continued from the checkpoint"), 1, "{events:?}");
    let f = fixtures();
    let model = d.out().join("resumed-recipe/model.safetensors");
    let out = run_python(
        "sgd_reference.py",
        &[
            f.join("models/cnn4.pt").to_str().unwrap(),
            f.join("data/big.safetensors").to_str().unwrap(),
            model.to_str().unwrap(),
            "adamw",
            "1500",
            "8",
            "fp32",
            "op-by-op",
            "0",
            "0",
            "",
            "unfreeze=features@250",
            "ema=0.99",
        ],
    );
    eprintln!("resumed against PyTorch: {}", out.trim());
}

/// (top-1, mean loss) of TorchScript file `model` on ImageFolder `folder`, as PyTorch
/// computes them (tests/fixtures/eval_reference.py).
fn pytorch_scores(model: &std::path::Path, folder: &std::path::Path) -> (f64, f64) {
    let out = run_python(
        "eval_reference.py",
        &[model.to_str().unwrap(), folder.to_str().unwrap()],
    );
    let value = |key: &str| -> f64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{out}"))
            .parse()
            .unwrap()
    };
    (value("top1"), value("loss"))
}

/// A built-in architecture's model.pt is its trained network traced for torch.jit.load: in
/// PyTorch it scores the validation images exactly as ferry's last validation did.
#[test]
fn a_built_in_model_loads_in_pytorch_and_scores_as_ferry_did() {
    let d = Daemon::start();
    let spec = "name: builtin-export\nmodel: {arch: cnn, num_classes: 4}\n\
                data: {train: {path: train.safetensors}, val: {path: val}, channels: 1}\n\
                train: {epochs: 2, batch_size: 16, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}\noutput: {dir: builtin-export}\n";
    let job = d.submit(spec);
    let end = d.wait_terminal(&job.id, Duration::from_secs(120));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let out = d.out().join("builtin-export");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    let (top1, loss) = (
        report["val"]["top1"].as_f64().unwrap(),
        report["val"]["loss"].as_f64().unwrap(),
    );
    assert!(top1 > 0.5, "it trained: {report}");
    let (py_top1, py_loss) = pytorch_scores(&out.join("model.pt"), &fixtures().join("data/val"));
    assert!(
        (top1 - py_top1).abs() < 1e-9,
        "{top1} against PyTorch's {py_top1}"
    );
    assert!(
        (loss - py_loss).abs() < 1e-4,
        "{loss} against PyTorch's {py_loss}"
    );
    // Its state_dict is model.safetensors, under the same names.
    let py = run_python(
        "load_torchscript.py",
        &[
            out.join("model.pt").to_str().unwrap(),
            out.join("model.safetensors").to_str().unwrap(),
        ],
    );
    assert!(py.contains("ok"), "{py}");
}

/// `train.epochs: 0` evaluates the model as given, on two ranks, and writes no model: its
/// accuracy and loss are PyTorch's on the same images.
#[test]
fn an_evaluation_only_job_scores_the_model_as_pytorch_does() {
    let d = Daemon::start();
    let spec = "name: eval-only\nmodel: {arch: torchscript, path: teacher4.pt}\n\
                data: {train: {path: train.safetensors}, val: {path: val}, test: {path: val}, channels: 1}\n\
                train: {epochs: 0, batch_size: 8}\nresources: {ranks: 2, threads: 1}\noutput: {dir: eval-only}\n";
    let job = d.submit(spec);
    let end = d.wait_terminal(&job.id, Duration::from_secs(120));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let out = d.out().join("eval-only");
    assert!(
        !out.join("model.safetensors").exists(),
        "an evaluation writes no model"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    let f = fixtures();
    let (py_top1, py_loss) = pytorch_scores(&f.join("models/teacher4.pt"), &f.join("data/val"));
    for split in ["val", "test"] {
        let r = &report[split];
        assert_eq!(r["model"], "as given (train.epochs: 0)", "{report}");
        let top1 = r["top1"].as_f64().unwrap_or_else(|| panic!("{report}"));
        let loss = r["loss"].as_f64().unwrap();
        assert!(
            (top1 - py_top1).abs() < 1e-9,
            "{split}: {top1} against PyTorch's {py_top1}"
        );
        assert!(
            (loss - py_loss).abs() < 1e-4,
            "{split}: {loss} against PyTorch's {py_loss}"
        );
    }
}

/// Gradient accumulation, gradual unfreezing, weight EMA, class weights and layer decay, each against
/// the same loop in PyTorch (tests/fixtures/sgd_reference.py), to 1e-5.
#[test]
fn accumulation_unfreezing_ema_and_class_weights_match_pytorch() {
    let d = Daemon::start();
    let sgd = "{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}";
    let adamw = "{name: adamw, lr: 0.001, weight_decay: 0.01}";
    /// One job and its reference: the spec's extra train and model fields, ferry's batch per
    /// rank and steps, and the reference's label smoothing and options (its batch is 16).
    struct Case {
        case: &'static str,
        opt: &'static str,
        train: &'static str,
        model: &'static str,
        resources: &'static str,
        batch: u32,
        steps: u32,
        smoothing: &'static str,
        groups: &'static str,
        options: &'static [&'static str],
    }
    let plain = Case {
        case: "",
        opt: sgd,
        train: "",
        model: "",
        resources: "",
        batch: 16,
        steps: 6,
        smoothing: "0",
        groups: "",
        options: &[],
    };
    let cases = [
        // Two micro-batches of 8 are one batch of 16.
        Case {
            case: "accum",
            train: "grad_accum_steps: 2",
            batch: 8,
            ..plain
        },
        // Across two ranks, with the all-reduce armed on the last micro-batch's backward:
        // 2 ranks x 2 micro-batches of 4 are one batch of 16.
        Case {
            case: "accum-ranks",
            train: "grad_accum_steps: 2, overlap_grad_sync: always",
            resources: "resources: {ranks: 2, threads: 1}\n",
            batch: 4,
            ..plain
        },
        // The backbone frozen for the first epoch (25 steps of 16 of 400 samples), then
        // trained: AdamW's per-parameter step counts start when it does, as in torch.optim.
        Case {
            case: "unfreeze",
            opt: adamw,
            model: "freeze: [features], unfreeze: [{epoch: 1, prefixes: [features]}]",
            steps: 30,
            options: &["unfreeze=features@25"],
            ..plain
        },
        Case {
            case: "ema",
            train: "ema: {decay: 0.9}",
            options: &["ema=0.9"],
            ..plain
        },
        // Per-class weights with label smoothing, over accumulated micro-batches: each is
        // divided by the whole batch's weight sum, so they add up to PyTorch's weighted mean.
        Case {
            case: "weights",
            train: "class_weights: [1.0, 2.0, 0.5, 1.5], label_smoothing: 0.1, grad_accum_steps: 2",
            batch: 8,
            smoothing: "0.1",
            options: &["weights=1.0,2.0,0.5,1.5"],
            ..plain
        },
        // Layer decay over one layer (features.1, the MLP's only one with parameters): the
        // backbone at half the rate, as a torch.optim parameter group.
        Case {
            case: "layer-decay",
            opt: "{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005, bias_weight_decay: 0}",
            train: "layer_decay: {rate: 0.5, layers: [features]}",
            groups: "features:0.5",
            ..plain
        },
    ];
    let f = fixtures();
    for Case {
        case,
        opt,
        train,
        model,
        resources,
        batch,
        steps,
        smoothing,
        groups,
        options,
    } in cases
    {
        let name = format!("recipe-{case}");
        let model_extra = if model.is_empty() {
            String::new()
        } else {
            format!(", {model}")
        };
        let train_extra = if train.is_empty() {
            String::new()
        } else {
            format!(", {train}")
        };
        let spec = format!(
            "name: {name}\nmodel: {{arch: torchscript, path: mlp.pt{model_extra}}}\ndata: {{train: {{path: train.safetensors}}, shuffle: false}}\n\
             train: {{epochs: 2, batch_size: {batch}, max_steps: {steps}, optimizer: {opt}{train_extra}}}\n{resources}output: {{dir: {name}}}\n"
        );
        let job = d.submit(&spec);
        let end = d.wait_terminal(&job.id, Duration::from_secs(120));
        assert_eq!(end.phase, JobPhase::Succeeded, "{case}: {:?}", end.status);
        let name_of = if opt.contains("sgd") { "sgd" } else { "adamw" };
        let out_model = d.out().join(&name).join("model.safetensors");
        let steps = steps.to_string();
        let mut args = vec![
            f.join("models/mlp.pt").to_str().unwrap().to_string(),
            f.join("data/train.safetensors")
                .to_str()
                .unwrap()
                .to_string(),
            out_model.to_str().unwrap().to_string(),
            name_of.to_string(),
            steps,
            "16".to_string(),
            "fp32".to_string(),
            "op-by-op".to_string(),
            smoothing.to_string(),
            "0".to_string(),
            groups.to_string(),
        ];
        args.extend(options.iter().map(|o| o.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_python("sgd_reference.py", &args);
        assert!(out.contains("max_abs_diff="), "{out}");
        eprintln!("{case} against PyTorch: {}", out.trim());
        if case == "unfreeze" {
            let events = d.events(&job.id).events;
            assert!(
                events
                    .iter()
                    .any(|e| e.message.starts_with("model.unfreeze at epoch 1")),
                "{events:?}"
            );
        }
    }
}

#[test]
fn the_api_requires_the_token_when_one_is_set() {
    let token = "0123456789abcdef0123456789abcdef";
    let d = Daemon::start_with(Some(token));
    let agent = ureq::agent();
    let status = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status(agent.get(&d.url("/v1/jobs")).call()), 401);
    assert_eq!(
        status(
            agent
                .get(&d.url("/v1/jobs"))
                .set("Authorization", "Bearer wrong")
                .call()
        ),
        401
    );
    assert_eq!(status(agent.get(&d.url("/metrics")).call()), 401);
    assert_eq!(
        status(agent.get(&d.url("/healthz")).call()),
        200,
        "probes stay open"
    );
    assert_eq!(d.get("/v1/jobs").0, 200, "with the token");
    let out = d.ctl(&["get"]);
    assert!(out.status.success());
    let mut no_token = std::process::Command::new(ferry_tests::bin("ferryctl"));
    let out = no_token
        .args(["get"])
        .env("FERRY_SERVER", d.url(""))
        .env_remove("FERRY_TOKEN")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_a_token_the_daemon_refuses_to_listen_beyond_loopback() {
    let d = Daemon::start();
    let out = std::process::Command::new(ferry_tests::bin("ferryd"))
        .args(["--standalone", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(d.dir.path().join("other"))
        .env_remove("FERRY_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0") && err.contains("FERRY_TOKEN"),
        "{err}"
    );
}

#[test]
fn metrics_and_openapi_are_served() {
    let d = Daemon::start();
    let job = d.submit(&feature_extraction("observed"));
    d.wait_terminal(&job.id, Duration::from_secs(60));
    // The finished counter is bumped just after the record is written, so a reader can
    // see the record a moment before the counter.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, body) = d.get("/metrics");
        assert_eq!(status, 200);
        let text = body.as_str().unwrap().to_string();
        if text.contains("ferry_jobs_finished_total{phase=\"Succeeded\"} 1")
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(text.contains("ferry_jobs{phase=\"Succeeded\"} 1"), "{text}");
    assert!(
        text.contains("ferry_rank_exits_total{outcome=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ferry_jobs_finished_total{phase=\"Succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("ferry_build_info{version="), "{text}");
    // The finished job's series stay (metrics_retention_s), with its final numbers.
    let job_series = format!("{{job_id=\"{}\",name=\"observed\"}}", job.id);
    for name in ["ferry_job_step", "ferry_job_total_steps", "ferry_job_epoch"] {
        let v = ferry_tests::metric_sum(&text, &format!("{name}{job_series}"));
        assert!(v.is_some_and(|v| v >= 1.0), "{name}: {text}");
    }
    // Labels come sorted by name.
    let info = format!(
        "ferry_job_info{{arch=\"torchscript\",device=\"cpu\",job_id=\"{}\",name=\"observed\",precision=\"fp32\",ranks=\"1\",strategy=\"feature_extraction\"}} 1",
        job.id
    );
    assert!(text.lines().any(|l| l == info), "{info}: {text}");
    for part in ["data", "compute", "sync", "optimizer"] {
        let series = format!(
            "ferry_rank_step_seconds{{job_id=\"{}\",name=\"observed\",part=\"{part}\",rank=\"0\"}}",
            job.id
        );
        assert!(
            ferry_tests::metric_sum(&text, &series).is_some(),
            "{series}: {text}"
        );
    }
    for series in [
        "ferry_job_queue_seconds_count",
        "ferry_job_duration_seconds_count{phase=\"Succeeded\"}",
        "ferry_nodes{role=\"worker\"}",
        "ferry_checkpoint_seconds_count",
    ] {
        let v = ferry_tests::metric_sum(&text, series);
        assert!(v.is_some_and(|v| v >= 1.0), "{series}: {text}");
    }
    assert!(text.contains("process_resident_memory_bytes "), "{text}");
    assert!(
        text.contains(
            "ferry_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"} 1"
        ),
        "{text}"
    );
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
    {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (status, doc) = d.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    // Generated from the types: the spec's bounds and enums are there.
    assert_eq!(
        doc.pointer("/components/schemas/TrainSpec/properties/epochs/maximum"),
        Some(&serde_json::json!(100000)),
        "{doc}"
    );
    assert!(doc.pointer("/components/schemas/Precision").is_some());
    let path = d.dir.path().join("openapi.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    let out = run_python("validate_openapi.py", &[path.to_str().unwrap()]);
    assert!(out.contains("valid"), "{out}");
}

#[test]
fn ferryd_doctor_checks_this_nodes_gpu_stack() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ferry_tests::bin("ferryd"))
        .arg("doctor")
        .env("FERRY_DATA_DIR", dir.path())
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("result: ok"), "{text}");
    // The pinned torch wheel ships NCCL as libnccl.so.2: ferryd finds it beside libtorch,
    // links it as libnccl.so and loads it through cudarc, as CUDA ranks do.
    let wheel_has_nccl = std::fs::read_dir(ferry_tests::workspace().join(".venv/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|py| {
            py.path()
                .join("site-packages/nvidia/nccl/lib/libnccl.so.2")
                .is_file()
        });
    if wheel_has_nccl {
        assert!(text.contains("nccl loadable: yes"), "{text}");
        assert!(dir.path().join("lib/libnccl.so").exists());
    }
    eprintln!("{text}");
}

#[test]
fn a_damaged_store_is_refused_with_what_to_do_and_kept() {
    let mut d = Daemon::start();
    let job = d.submit(&feature_extraction("kept"));
    d.wait_terminal(&job.id, Duration::from_secs(60));
    d.kill();
    let store = d.data_dir().join("store.redb");
    let len = std::fs::metadata(&store).unwrap().len();
    for cut in [len / 2, 0] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&store)
            .unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let out = d.command().output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "started on a store cut to {cut} bytes"
        );
        assert!(
            err.contains("is damaged")
                && err.contains("Restore it from a backup")
                && err.contains(".damaged"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        // The file is left as it was, for whoever restores it.
        assert_eq!(std::fs::metadata(&store).unwrap().len(), cut);
    }
}

/// Opens a connection that starts `POST /v1/jobs` declaring `length` bytes and sends `sent`
/// of them.
fn slow_post(d: &Daemon, length: usize, sent: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    write!(
        s,
        "POST /v1/jobs HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/yaml\r\nContent-Length: {length}\r\n\r\n{sent}"
    )
    .unwrap();
    s.flush().unwrap();
    s
}

/// The status line of the answer on `s` (waiting up to `timeout`).
fn status_line(s: &mut std::net::TcpStream, timeout: Duration) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn slow_bodies_time_out_and_one_client_cannot_hold_the_api() {
    let d = Daemon::start_env(&[
        ("FERRY_BODY_TIMEOUT_MS", "1000"),
        ("FERRY_MAX_REQUESTS_PER_CLIENT", "3"),
    ]);
    // A declared length over the limit is refused before the body is read.
    let mut big = slow_post(&d, 50 << 20, "");
    assert!(
        status_line(&mut big, Duration::from_secs(5)).contains(" 413 "),
        "a 50 MB declaration was not refused at once"
    );
    // Three bodies that never finish hold this client's three slots...
    let mut slow: Vec<_> = (0..3).map(|_| slow_post(&d, 10_000, "name: x\n")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = d.get("/v1/jobs");
    assert_eq!(status, 429, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("max_requests_per_client"),
        "{body}"
    );
    // ...but not the probes,
    assert_eq!(d.get("/healthz").0, 200);
    // and each gets 408 when the body timeout passes; then the client is served again.
    for s in &mut slow {
        let line = status_line(s, Duration::from_secs(10));
        assert!(line.contains(" 408 "), "{line}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.get("/v1/jobs").0, 200);
}

#[test]
fn the_queue_is_bounded_and_ranks_are_bounded_by_slots() {
    let d = Daemon::start_env(&[
        ("FERRY_MAX_QUEUED_JOBS", "1"),
        ("FERRY_MAX_RUNNING_JOBS", "1"),
        ("FERRY_CPU_RANK_SLOTS", "2"),
    ]);
    // More CPU ranks than the node's slots: refused at submission, naming the field.
    let wide = long_job("wide", 1, 0).replace("{threads: 1}", "{ranks: 3, threads: 1}");
    let (status, body) = d.post("/v1/jobs", &wide);
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "resources.ranks", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("cpu_rank_slots"),
        "{body}"
    );
    // One runs, one waits, the next is refused with Retry-After.
    let running = d.submit(&long_job("first", 1000, 0));
    d.wait_for(&running.id, Duration::from_secs(60), "Running", |j| {
        j.phase == JobPhase::Running
    });
    // The bound counts the Pending jobs of the node's last listing (it lists on every
    // phase change) plus its own submissions since: "first" leaves the count shortly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let (status, body) = d.post("/v1/jobs", &long_job("second", 1000, 0));
        if status == 201 {
            break serde_json::from_value::<ferry_cluster::api::Job>(body).unwrap();
        }
        assert_eq!(status, 429, "{body}");
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (status, body) = d.post("/v1/jobs", &long_job("third", 1000, 0));
    assert_eq!(status, 429, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("max_queued_jobs"),
        "{body}"
    );
    let r = ureq::post(&d.url("/v1/jobs")).send_string(&long_job("third", 1000, 0));
    match r {
        Err(ureq::Error::Status(429, r)) => assert_eq!(r.header("Retry-After"), Some("30")),
        other => panic!("{other:?}"),
    }
    for j in [&waiting, &running] {
        let status = d.post(&format!("/v1/jobs/{}/cancel", j.id), "").0;
        assert!(status == 200 || status == 202, "{status}");
    }
    d.wait_terminal(&running.id, Duration::from_secs(30));
}

#[test]
fn a_deeply_nested_spec_is_refused_at_once_and_the_api_stays_up() {
    let d = Daemon::start();
    // 200 KB of brackets, under the body limit: refused before any parsing.
    let body = format!("model: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let posts: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (d.url("/v1/jobs"), body.clone());
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let r = ureq::post(&url).send_string(&body);
                (
                    r.err().and_then(|e| e.into_response()).map(|r| r.status()),
                    started.elapsed(),
                )
            })
        })
        .collect();
    assert_eq!(d.get("/healthz").0, 200);
    for p in posts {
        let (status, took) = p.join().unwrap();
        // An invalid spec (the depth limit names it), answered at once.
        assert_eq!(status, Some(422), "took {took:?}");
    }
}

/// `ferryd config` prints the effective configuration with its secrets redacted, names a
/// misspelt FERRY_* variable with the setting it resembles, and writes no colour codes to a
/// stderr that is not a terminal.
#[test]
fn ferryd_config_redacts_secrets_and_names_misspelt_variables() {
    let out = std::process::Command::new(ferry_tests::bin("ferryd"))
        .arg("config")
        .env("FERRY_TOKEN", "a-token-of-24-characters")
        .env("FERRY_MAX_RUNNING_JOBS", "3")
        .env("FERRY_MAX_RUNING_JOBS", "5")
        .env_remove("FERRY_LOG")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("token: <redacted>") && !stdout.contains("a-token-of"),
        "{stdout}"
    );
    assert!(stdout.contains("max_running_jobs: 3"), "{stdout}");
    assert!(
        stderr.contains("FERRY_MAX_RUNING_JOBS is not a ferryd setting")
            && stderr.contains("did you mean FERRY_MAX_RUNNING_JOBS?"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a piped log: {stderr:?}"
    );
    // RUST_LOG is honoured: at `error`, the warning goes.
    let quiet = std::process::Command::new(ferry_tests::bin("ferryd"))
        .arg("config")
        .env("FERRY_MAX_RUNING_JOBS", "5")
        .env_remove("FERRY_LOG")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&quiet.stderr).is_empty());
}

/// `ferryctl submit --wait` follows its job across a restart of ferryd (it says so, and
/// tries again) and ends with the job's exit status: 0 when it succeeds, 3 when it is
/// cancelled.
#[test]
fn submit_wait_reattaches_across_a_daemon_restart_and_exits_with_the_jobs_status() {
    let mut d = Daemon::start();
    let follow = |d: &Daemon, name: &str, epochs: u32| {
        let spec = d.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&spec, long_job(name, epochs, 100)).unwrap();
        let child = std::process::Command::new(ferry_tests::bin("ferryctl"))
            .args(["submit", spec.to_str().unwrap(), "--wait"])
            .env("FERRY_SERVER", d.url(""))
            .env_remove("FERRY_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let id = loop {
            let (_, list) = d.get("/v1/jobs");
            let found = list["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["name"] == name)
                .map(|j| j["id"].as_str().unwrap().to_string());
            if let Some(id) = found {
                break id;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ferryctl submitted nothing"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        (child, id)
    };
    let (ctl, id) = follow(&d, "reattach", 2);
    d.wait_for(&id, Duration::from_secs(120), "a checkpoint", |j| {
        j.status.checkpoint.is_some()
    });
    d.crash_and_restart();
    let out = ctl.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("lost ferryd") && stderr.contains("again; following on"),
        "{stderr}"
    );
    assert_eq!(d.job(&id).phase, JobPhase::Succeeded);
    // Cancelled: 3.
    let (ctl, id) = follow(&d, "cancelled", 50);
    d.wait_for(&id, Duration::from_secs(120), "a step", |j| {
        j.status.step > 0
    });
    assert_eq!(d.ctl(&["cancel", &id]).status.code(), Some(0));
    let out = ctl.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// HTTP as a client expects it: pages of jobs that see every job once, strict query
/// parameters, 405 with `Allow`, HEAD, and 415 for a body that is not YAML or JSON.
#[test]
fn lists_page_strictly_and_methods_and_media_types_are_answered_properly() {
    let d = Daemon::start();
    let ids: Vec<String> = (0..30)
        .map(|i| d.submit(&long_job(&format!("page-{i}"), 50, 0)).id)
        .collect();
    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=7".to_string();
    for page in 0.. {
        let (status, body) = d.get(&path);
        assert_eq!(status, 200, "{body}");
        let jobs = body["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 7);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match body["continue"].as_str() {
            Some(token) => path = format!("/v1/jobs?limit=7&continue={token}"),
            None => {
                assert_eq!(page, 4, "30 jobs in pages of 7");
                break;
            }
        }
    }
    assert_eq!(seen, ids, "every job once, oldest first");
    for (bad, what) in [
        ("/v1/jobs?phase=Bogus", "phase `Bogus` is not one of"),
        ("/v1/jobs?limit=0", "limit"),
        ("/v1/jobs?continue=zz", "continue token"),
        (&format!("/v1/jobs/{}/events?wait=61", ids[0]), "at most 60"),
    ] {
        let (status, body) = d.get(bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(what),
            "{bad}: {body}"
        );
    }
    let (status, body) = d.get("/v1/jobs?phase=pending&limit=1000");
    assert_eq!(status, 200, "{body}");
    // 405 with Allow, for a known path; 404 for an unknown one.
    let put = d.req("PUT", "/v1/jobs").call().unwrap_err();
    match put {
        ureq::Error::Status(405, r) => assert_eq!(r.header("Allow"), Some("GET, HEAD, POST")),
        other => panic!("{other:?}"),
    }
    let del = d
        .req("DELETE", &format!("/v1/jobs/{}/cancel", ids[0]))
        .call();
    assert!(matches!(del, Err(ureq::Error::Status(405, _))), "{del:?}");
    assert!(matches!(
        d.req("GET", "/v2/x").call(),
        Err(ureq::Error::Status(404, _))
    ));
    // HEAD answers as GET does, without a body.
    let head = d
        .req("HEAD", &format!("/v1/jobs/{}", ids[0]))
        .call()
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.into_string().unwrap(), "");
    // 415 for XML.
    let xml = d
        .req("POST", "/v1/jobs")
        .set("Content-Type", "application/xml")
        .send_string("<job/>");
    assert!(matches!(xml, Err(ureq::Error::Status(415, _))), "{xml:?}");
    for id in &ids {
        d.ctl(&["cancel", id]);
    }
}

/// ferryctl for scripts: `-o name`, `--no-headers`, `version` with the server's version,
/// and shell completion.
#[test]
fn ferryctl_speaks_to_scripts_and_shells() {
    let d = Daemon::start();
    let job = d.submit(&feature_extraction("scripted"));
    let text = |args: &[&str]| {
        let out = d.ctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(text(&["get", "-o", "name"]), format!("{}\n", job.id));
    assert_eq!(
        text(&["get", "scripted", "-o", "name"]),
        format!("{}\n", job.id)
    );
    let rows = text(&["get", "--no-headers"]);
    assert!(
        rows.starts_with(&job.id) && !rows.contains("PHASE"),
        "{rows}"
    );
    let version = text(&["version"]);
    let server = d.get("/openapi.json").1["info"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        version.contains("client: ") && version.contains(&format!("server: {server}")),
        "{version}"
    );
    for shell in ["bash", "zsh", "fish"] {
        assert!(text(&["completion", shell]).contains("ferryctl"), "{shell}");
    }
    assert_eq!(
        text(&["get", "-o", "jsonpath={.jobs[*].id}:{.jobs[0].name}"]),
        format!("{}:scripted\n", job.id)
    );
    assert!(text(&["get", "-o", "wide"])
        .lines()
        .next()
        .unwrap()
        .contains("LABELS"));
    // wait: exit 0 once the job ends as it should; describe shows its story.
    let out = d.ctl(&["wait", "scripted", "--for", "succeeded", "--timeout", "120"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let described = text(&["describe", "scripted"]);
    for part in [
        "phase:",
        "Succeeded",
        "Init report:",
        "Validation by epoch:",
        "Events (last 15):",
    ] {
        assert!(described.contains(part), "{part} in {described}");
    }
    // Waiting for a phase the job will not reach: exit 1 at once; a timeout: 4.
    let out = d.ctl(&["wait", "scripted", "--for", "failed"]);
    assert_eq!(out.status.code(), Some(1));
    let other = d.submit(&long_job("waited", 50, 0));
    let out = d.ctl(&["wait", &other.id, "--for", "succeeded", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        text(&["get", &other.id, "-o", "jsonpath={.spec.resources.ranks}"]),
        "1\n"
    );
    d.ctl(&["cancel", &other.id]);
}

/// A job that has ended can be deleted (by id or name), with its events; its outputs stay.
/// A job that has not ended cannot.
#[test]
fn a_finished_job_is_deleted_with_its_events_and_a_running_one_is_not() {
    let d = Daemon::start();
    let gone = d.submit(&feature_extraction("gone"));
    d.wait_terminal(&gone.id, Duration::from_secs(120));
    let busy = d.submit(&long_job("busy", 50, 0));
    d.wait_for(&busy.id, Duration::from_secs(60), "a step", |j| {
        j.status.step > 0
    });
    let del = d.req("DELETE", &format!("/v1/jobs/{}", busy.id)).call();
    assert!(matches!(del, Err(ureq::Error::Status(409, _))), "{del:?}");
    let out = d.ctl(&["delete", "gone"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted"));
    for path in [
        format!("/v1/jobs/{}", gone.id),
        "/v1/jobs/gone".to_string(),
        format!("/v1/jobs/{}/events", gone.id),
    ] {
        assert_eq!(d.get(&path).0, 404, "{path}");
    }
    let (_, list) = d.get("/v1/jobs");
    let names: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["busy"]);
    assert!(
        d.out().join("gone/model.safetensors").is_file(),
        "the outputs stay"
    );
    // Deleting again: 404 (exit 5 from ferryctl).
    assert_eq!(d.ctl(&["delete", &gone.id]).status.code(), Some(5));
    d.ctl(&["cancel", &busy.id]);
}

/// What a scheduler that retries needs: one `Idempotency-Key` makes one job (another spec
/// with it is refused), names are unique among jobs that have not ended (or generated),
/// and `get NAME` names one job.
#[test]
fn retried_submits_make_one_job_and_names_are_unique_while_jobs_run() {
    let d = Daemon::start();
    let spec = long_job("retried", 50, 0);
    let post = |key: &str, body: &str| {
        let r = d
            .req("POST", "/v1/jobs")
            .set("Idempotency-Key", key)
            .send_string(body);
        let (replayed, r) = match r {
            Ok(r) => (r.header("Idempotent-Replayed").is_some(), Ok(r)),
            Err(e) => (false, Err(e)),
        };
        let (status, body) = ferry_tests::respond(r);
        (status, replayed, body)
    };
    let (s1, r1, first) = post("key-1", &spec);
    assert_eq!((s1, r1), (201, false), "{first}");
    let (s2, r2, again) = post("key-1", &spec);
    assert_eq!((s2, r2), (200, true), "{again}");
    assert_eq!(again["id"], first["id"], "the same job, not a second one");
    // The same key with another spec: refused, nothing made.
    let (s3, _, other) = post("key-1", &spec.replace("epochs: 50", "epochs: 51"));
    assert_eq!(s3, 422, "{other}");
    assert!(other["detail"].as_str().unwrap().contains("another spec"));
    let (_, list) = d.get("/v1/jobs?name=retried");
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    // A second job of that name while the first runs: 409; after it ends, fine.
    let (s4, dup) = d.post("/v1/jobs", &spec.replace("dir: retried", "dir: retried-2"));
    assert_eq!(s4, 409, "{dup}");
    assert!(dup["detail"].as_str().unwrap().contains("unique"), "{dup}");
    // generate_name: unique names of one prefix.
    let gen = |dir: &str| {
        long_job("x", 50, 0)
            .replace("name: x", "generate_name: sweep-")
            .replace("dir: x", &format!("dir: {dir}"))
    };
    let a = d.submit(&gen("sweep-a"));
    let b = d.submit(&gen("sweep-b"));
    assert!(
        a.name.starts_with("sweep-") && a.name.len() == 11,
        "{}",
        a.name
    );
    assert_ne!(a.name, b.name);
    let id = first["id"].as_str().unwrap();
    assert_eq!(d.ctl(&["cancel", id]).status.code(), Some(0));
    d.wait_terminal(id, Duration::from_secs(60));
    let again = d.submit(&spec.replace("dir: retried", "dir: retried-3"));
    assert_eq!(
        d.job("retried").id,
        again.id,
        "the name names the job that runs"
    );
    for j in [&again.id, &a.id, &b.id] {
        d.ctl(&["cancel", j]);
    }
}

/// A dry run reports every error at once, each with its field, and records nothing: the
/// spec's own (parse and values), then the model's and the data's (`ferryd check`).
#[test]
fn a_dry_run_reports_every_error_at_once_and_submits_nothing() {
    let d = Daemon::start();
    let fields = |body: &serde_json::Value| -> Vec<String> {
        body["errors"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_string())
            .collect()
    };
    // A dry run's 422: the fields in error, sorted.
    let refused = |spec: &str| -> Vec<String> {
        let (status, body) = d.post("/v1/jobs?dryRun=true", spec);
        assert_eq!(status, 422, "{body}");
        let mut got = fields(&body);
        got.sort();
        got
    };
    // Three errors in the spec itself: an unknown field, a wrong type, a bad value.
    let spec = feature_extraction("dry").replace(
        "  epochs: 4\n  batch_size: 16\n",
        "  epochs: 200000\n  optimiser: {}\n  batch_size: lots\n",
    );
    assert_eq!(
        refused(&spec),
        ["train.batch_size", "train.epochs", "train.optimiser"]
    );
    // Three errors only the model and the data show: a freeze prefix that matches no
    // parameter, a teacher's init file none of whose tensors fit it, normalisation for 3
    // channels of 1-channel images.
    let spec = feature_extraction("dry")
        .replace("freeze: [features]", "freeze: [featurez]")
        .replace(
            "output:",
            "distill:\n  teacher: {arch: mlp, num_classes: 4, init: cnn3_init.safetensors}\noutput:",
        )
        .replace(
            "  channels: 1\n",
            "  channels: 1\n  normalize: {mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}\n",
        );
    assert_eq!(
        refused(&spec),
        ["data.normalize", "distill.teacher.init", "model.freeze"]
    );
    // A good spec: 200, the spec as it would run, and no job.
    let good = feature_extraction("dry");
    let (status, body) = d.post("/v1/jobs?dryRun=true", &good);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["valid"], true);
    assert!(body["spec"]["model"]["path"]
        .as_str()
        .unwrap()
        .ends_with("/cnn4.pt"));
    assert_eq!(d.get("/v1/jobs").1["jobs"].as_array().unwrap().len(), 0);
    // ferryctl: `validate` and `submit --dry-run`, exit 0 or 5 with every error.
    let dir = tempfile::tempdir().unwrap();
    let (good_file, bad_file) = (dir.path().join("good.yaml"), dir.path().join("bad.yaml"));
    std::fs::write(&good_file, &good).unwrap();
    std::fs::write(&bad_file, &spec).unwrap();
    let out = d.ctl(&["validate", good_file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    let out = d.ctl(&["submit", "--dry-run", bad_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    for f in ["data.normalize", "distill.teacher.init", "model.freeze"] {
        assert!(err.contains(f), "{f} in {err}");
    }
    assert_eq!(d.get("/v1/jobs").1["jobs"].as_array().unwrap().len(), 0);
}

/// Labels select jobs (API and ferryctl), summaries leave the spec out, lists come gzipped
/// when asked, records carry an ETag that `If-None-Match` and `If-Match` use, and
/// retention deletes the oldest finished jobs beyond `keep_finished_jobs`.
#[test]
fn labels_summaries_gzip_etags_and_retention() {
    let d = Daemon::start_env(&[("FERRY_KEEP_FINISHED_JOBS", "2")]);
    let labelled = |name: &str, team: &str| {
        long_job(name, 50, 0).replacen(
            &format!("name: {name}\n"),
            &format!("name: {name}\nlabels: {{team: {team}, sweep: lr}}\n"),
            1,
        )
    };
    let a = d.submit(&labelled("lab-a", "vision"));
    let b = d.submit(&labelled("lab-b", "speech"));
    let c = d.submit(&long_job("lab-c", 50, 0));
    let ids = |path: &str| -> Vec<String> {
        let (status, body) = d.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids("/v1/jobs?labelSelector=team=vision"),
        vec![a.id.clone()]
    );
    assert_eq!(
        ids("/v1/jobs?labelSelector=team!=vision"),
        [b.id.clone(), c.id.clone()]
    );
    assert_eq!(
        ids("/v1/jobs?labelSelector=sweep,!nope"),
        [a.id.clone(), b.id.clone()]
    );
    assert_eq!(d.get("/v1/jobs?labelSelector=Bad%20Key").0, 400);
    let out = d.ctl(&["get", "-l", "team=speech", "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", b.id));
    let (_, summary) = d.get("/v1/jobs?view=summary");
    let first = &summary["jobs"][0];
    assert!(
        first.get("spec").is_none() && first["labels"]["team"] == "vision",
        "{first}"
    );
    // gzip when the client accepts it.
    let r = d
        .req("GET", "/v1/jobs")
        .set("Accept-Encoding", "gzip")
        .call()
        .unwrap();
    assert_eq!(r.header("Content-Encoding"), Some("gzip"));
    // ETag: 304 for the same revision; If-Match with an old one: 412, nothing changed.
    let r = d.req("GET", &format!("/v1/jobs/{}", a.id)).call().unwrap();
    let tag = r.header("ETag").unwrap().to_string();
    let same = d
        .req("GET", &format!("/v1/jobs/{}", a.id))
        .set("If-None-Match", &tag)
        .call()
        .unwrap();
    assert_eq!(same.status(), 304);
    let stale = d
        .req("POST", &format!("/v1/jobs/{}/cancel", c.id))
        .set("If-Match", "\"1\"")
        .call();
    assert!(
        matches!(stale, Err(ureq::Error::Status(412, _))),
        "{stale:?}"
    );
    assert!(!d.job(&c.id).phase.is_terminal());
    let now = d.req("GET", &format!("/v1/jobs/{}", c.id)).call().unwrap();
    let tag = now.header("ETag").unwrap().to_string();
    let ok = d
        .req("POST", &format!("/v1/jobs/{}/cancel", c.id))
        .set("If-Match", &tag)
        .call();
    // The job may have moved on (a step) between the read and the cancel: then 412 again.
    match ok {
        Ok(r) => assert_eq!(r.status(), 202),
        Err(ureq::Error::Status(412, _)) => {
            d.ctl(&["cancel", &c.id]);
        }
        Err(e) => panic!("{e:?}"),
    }
    // Retention: of three finished jobs, the newest two stay.
    for j in [&a.id, &b.id] {
        d.ctl(&["cancel", j]);
    }
    // (Waiting for each to end would race the pruning.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = d.get("/v1/jobs");
        let left = list["jobs"].as_array().unwrap().clone();
        let ended = left
            .iter()
            .all(|j| ["Cancelled", "Failed", "Succeeded"].contains(&j["phase"].as_str().unwrap()));
        if left.len() == 2 && ended {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not pruned: {left:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The feature-extraction job, its training set read from WebDataset shards (PNG members, so
/// lossless) on two ranks with two decode threads each: the same accuracy as from the
/// safetensors file, one damaged member left out and named, the shards' index cached in
/// the job's scratch dir.
#[test]
fn a_job_trains_from_webdataset_shards_on_two_ranks_and_skips_a_bad_image() {
    let data = tempfile::tempdir().unwrap();
    let py = run_python(
        "make_shards.py",
        &[
            fixtures().join("data/train.safetensors").to_str().unwrap(),
            data.path().join("shards").to_str().unwrap(),
        ],
    );
    assert!(py.contains("ok"), "{py}");
    let val = data.path().join("val");
    for e in std::fs::read_dir(fixtures().join("data/val"))
        .unwrap()
        .flatten()
    {
        std::fs::create_dir_all(val.join(e.file_name())).unwrap();
        for f in std::fs::read_dir(e.path()).unwrap().flatten() {
            std::fs::copy(f.path(), val.join(e.file_name()).join(f.file_name())).unwrap();
        }
    }
    let d = Daemon::start_env(&[("FERRY_ROOTS__DATA", data.path().to_str().unwrap())]);
    let spec = feature_extraction("shards")
        .replace("train: {path: train.safetensors}", "train: {path: shards}")
        .replace(
            "  channels: 1\n",
            "  channels: 1\n  skip_bad: true\n  decode_threads: 2\n",
        )
        + "resources: {ranks: 2, threads: 1}\n";
    let j = d.submit(&spec);
    let end = d.wait_terminal(&j.id, Duration::from_secs(300));
    assert_eq!(
        end.phase,
        JobPhase::Succeeded,
        "{:?}\n{}",
        end.status,
        d.log()
    );
    let acc = end.status.val_accuracy.unwrap();
    assert!(
        acc >= 0.9,
        "val accuracy {acc} (0.9 from the same data as safetensors)"
    );
    let events = d.events(&j.id).events;
    let said = |what: &str| events.iter().any(|e| e.message.contains(what));
    assert!(
        said("input: 2 decode threads, 2 batches ahead each"),
        "{events:?}"
    );
    assert!(said("left out data.train: the image at byte"), "{events:?}");
    assert!(said("unreadable samples in all"), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("left out") && e.message.contains("000001.tar")),
        "the damaged member's shard is named: {events:?}"
    );
}
