//! Knowledge distillation: students trained from a teacher service's soft labels.

use std::time::Duration;

use ferry_cluster::api::{Job, JobPhase};
use ferry_tests::{final_distill, kill9, pid_alive, run_python, Daemon};
use serde_json::Value;

/// A distillation job: the MLP student learns 12 labelled images and the unlabelled pool
/// from the trained CNN teacher. `extra` is appended to the `distill` section.
fn job(name: &str, ranks: u32, replicas: u32, epochs: u32, extra: &str) -> String {
    format!(
        "name: {name}\nmodel: {{arch: torchscript, path: mlp.pt}}\n\
         data: {{train: {{path: few.safetensors}}, unlabelled: {{path: pool.safetensors}}, val: {{path: val}}, channels: 1}}\n\
         train: {{epochs: {epochs}, batch_size: 8, seed: 5, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}\n\
         resources: {{ranks: {ranks}, threads: 1}}\n\
         distill:\n  teacher: {{arch: torchscript, path: teacher4.pt, replicas: {replicas}, threads: 1}}\n  temperature: 2.0\n  alpha: 0.5\n  top_k: 2\n{extra}\
         output: {{dir: {name}}}\n"
    )
}

/// The pid of teacher replica `replica`, from its newest "serves soft labels" event.
fn teacher_pid(d: &Daemon, job: &Job, replica: u64) -> u32 {
    d.events(&job.id)
        .events
        .iter()
        .rev()
        .find(|e| e.data["teacher"] == replica && e.message.contains("serves soft labels"))
        .and_then(|e| e.data["pid"].as_u64())
        .expect("the teacher replica reported its address") as u32
}

fn messages(d: &Daemon, job: &Job) -> Vec<String> {
    d.events(&job.id)
        .events
        .into_iter()
        .map(|e| e.message)
        .collect()
}

#[test]
fn two_students_learn_from_two_teacher_replicas() {
    let d = Daemon::start();
    let scratch = d.submit(
        "name: few-scratch\nmodel: {arch: torchscript, path: mlp.pt}\n\
         data: {train: {path: few.safetensors}, val: {path: val}, channels: 1}\n\
         train: {epochs: 8, batch_size: 8, seed: 5, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}\n\
         resources: {threads: 1}\noutput: {dir: few-scratch}\n",
    );
    let j = d.submit(&job("distill-2x2", 2, 2, 8, ""));
    let end = d.wait_terminal(&j.id, Duration::from_secs(180));
    assert_eq!(
        end.phase,
        JobPhase::Succeeded,
        "{:?}\n{}",
        end.status,
        d.log()
    );
    let scratch = d.wait_terminal(&scratch.id, Duration::from_secs(120));
    // The teachers go with the job.
    std::thread::sleep(Duration::from_millis(300));
    for r in 0..2 {
        let pid = teacher_pid(&d, &j, r);
        assert!(
            !pid_alive(pid),
            "teacher replica {r} (pid {pid}) outlived its job"
        );
    }
    let msgs = messages(&d, &j);
    for r in 0..2 {
        assert!(
            msgs.iter()
                .any(|m| m.starts_with(&format!("teacher replica {r} serves soft labels at"))),
            "{msgs:#?}"
        );
    }
    assert!(msgs
        .iter()
        .any(|m| m == "training set: 12 labelled samples and 600 unlabelled ones"));
    let stats = final_distill(&d, "distill-2x2");
    assert_eq!(stats["fallback_steps"], 0, "{stats}");
    // 8 epochs over 612 samples, one cache for both ranks: after epoch 1, a rank finds
    // the samples of its new shard that the other rank fetched.
    let hit = stats["cache_hit_rate"].as_f64().unwrap();
    assert!(hit > 0.8, "cache hit rate {hit}");
    let left: Vec<_> = std::fs::read_dir(d.out().join("distill-2x2"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".softlabels"))
        .collect();
    assert!(left.is_empty(), "the cache is node-local: {left:?}");
    let scratch_dir = d.data_dir().join("scratch").join(&end.id);
    assert!(
        !scratch_dir.exists(),
        "the cache goes with a job that succeeded: {}",
        scratch_dir.display()
    );
    let (distilled, plain) = (
        end.status.val_accuracy.unwrap(),
        scratch.status.val_accuracy.unwrap(),
    );
    eprintln!("val accuracy: distilled {distilled:.3}, from 12 labels alone {plain:.3}; {stats}");
    assert!(
        distilled >= plain && distilled >= 0.9,
        "distilled {distilled}, scratch {plain}"
    );
}

#[test]
fn tensor_mode_sends_the_images_and_teaches_the_same() {
    let d = Daemon::start();
    let index = d.submit(&job("mode-index", 1, 1, 2, "  cache: false\n"));
    let tensor = d.submit(&job(
        "mode-tensor",
        1,
        1,
        2,
        "  cache: false\n  mode: tensor\n",
    ));
    let index = d.wait_terminal(&index.id, Duration::from_secs(120));
    let tensor = d.wait_terminal(&tensor.id, Duration::from_secs(120));
    assert_eq!(tensor.phase, JobPhase::Succeeded, "{:?}", tensor.status);
    assert_eq!(index.phase, JobPhase::Succeeded, "{:?}", index.status);
    let (i, t) = (
        final_distill(&d, "mode-index"),
        final_distill(&d, "mode-tensor"),
    );
    let per =
        |s: &Value| s["bytes_sent"].as_f64().unwrap() / s["samples_fetched"].as_f64().unwrap();
    // 8x8 float images are 256 bytes a sample; an index is 4.
    assert!(per(&t) > 256.0 && per(&i) < 8.0, "tensor {t}, index {i}");
    // The same soft labels either way: the same weights.
    let out = run_python(
        "close_tensors.py",
        &[
            d.out()
                .join("mode-index/model.safetensors")
                .to_str()
                .unwrap(),
            d.out()
                .join("mode-tensor/model.safetensors")
                .to_str()
                .unwrap(),
            "1e-5",
        ],
    );
    eprintln!("tensor mode against index mode: {}", out.trim());
}

#[test]
fn the_distillation_loss_matches_pytorch() {
    let d = Daemon::start();
    let spec = job("distill-numerics", 1, 1, 1, "")
        .replace("channels: 1}", "channels: 1, shuffle: false}")
        .replace(
            "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}",
            "max_steps: 6, optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}",
        )
        .replace("alpha: 0.5", "alpha: 0.3");
    let j = d.submit(&spec);
    let end = d.wait_terminal(&j.id, Duration::from_secs(120));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let f = ferry_tests::fixtures();
    let path = |p: &str| f.join(p).to_str().unwrap().to_string();
    // Step 1 (samples 8-15) mixes 4 labelled and 4 unlabelled images; steps 2-5 are unlabelled.
    let out = run_python(
        "distill_reference.py",
        &[
            "check",
            &path("models/mlp.pt"),
            &path("models/teacher4.pt"),
            &path("data/few.safetensors"),
            &path("data/pool.safetensors"),
            d.out()
                .join("distill-numerics/model.safetensors")
                .to_str()
                .unwrap(),
            "6",
            "8",
            "5",
        ],
    );
    eprintln!("distillation loss against PyTorch: {}", out.trim());
}

/// Kills the only teacher replica of a job whose students need it at every step (no cache),
/// and returns the job's end.
fn kill_the_teacher(d: &Daemon, name: &str, policy: &str, replicas: u32) -> Job {
    let spec = job(
        name,
        1,
        replicas,
        1000,
        &format!("  on_teacher_failure: {policy}\n  cache: false\n  deadline_ms: 2000\n"),
    )
    .replace("seed: 5,", "seed: 5, max_steps: 600,");
    let j = d.submit(&spec);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Every replica serves (students start with the first), and the students have had
    // steps enough to learn of the others: a fail-over needs a replica to fail over to.
    while d
        .events(&j.id)
        .events
        .iter()
        .filter(|e| e.message.contains("serves soft labels"))
        .count()
        < replicas as usize
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replicas did not all start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let at = d.job(&j.id).status.step;
    d.wait_for(&j.id, Duration::from_secs(60), "steps", |j| {
        j.status.step > 20.max(at + 10)
    });
    let victim = teacher_pid(d, &j, 0);
    kill9(victim);
    let end = d.wait_terminal(&j.id, Duration::from_secs(180));
    assert!(!pid_alive(victim));
    end
}

#[test]
fn a_killed_teacher_with_policy_fail_fails_the_job_naming_the_teacher() {
    let d = Daemon::start();
    let end = kill_the_teacher(&d, "teacher-fail", "fail", 1);
    assert_eq!(end.phase, JobPhase::Failed);
    let reason = end.status.failure.unwrap();
    assert!(
        reason.contains("no teacher replica answered") && reason.contains("`fail`"),
        "{reason}"
    );
    eprintln!("policy fail: {reason}");
}

#[test]
fn a_killed_teacher_with_policy_hard_labels_trains_on_and_recovers() {
    let d = Daemon::start();
    let end = kill_the_teacher(&d, "teacher-hard", "hard-labels", 1);
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(end.status.step, 600);
    let msgs = messages(&d, &end);
    assert!(
        msgs.iter()
            .any(|m| m.contains("restarting it (1 of 3 restarts)")),
        "{msgs:#?}"
    );
    let stats = final_distill(&d, "teacher-hard");
    let fallback = stats["fallback_steps"].as_u64().unwrap();
    assert!((1..600).contains(&fallback), "{stats}");
    eprintln!("policy hard-labels: {stats}");
}

#[test]
fn a_killed_teacher_with_policy_wait_resumes_on_the_restarted_teacher() {
    let d = Daemon::start();
    let end = kill_the_teacher(&d, "teacher-wait", "wait", 1);
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let stats = final_distill(&d, "teacher-wait");
    assert_eq!(stats["fallback_steps"], 0, "{stats}");
    let pids: Vec<_> = d
        .events(&end.id)
        .events
        .iter()
        .filter(|e| e.message.contains("serves soft labels"))
        .map(|e| e.data["pid"].clone())
        .collect();
    assert_eq!(pids.len(), 2, "the teacher came back once: {pids:?}");
    eprintln!("policy wait: {stats}");
}

#[test]
fn students_fail_over_to_another_replica_when_one_dies() {
    // Policy `fail`: the job only survives if every request moves to the live replica.
    let d = Daemon::start();
    let end = kill_the_teacher(&d, "teacher-failover", "fail", 2);
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    let stats = final_distill(&d, "teacher-failover");
    assert_eq!(stats["fallback_steps"], 0, "{stats}");
    eprintln!("fail-over: {stats}");
}

#[test]
fn a_teacher_that_cannot_start_fails_the_job_with_its_reason() {
    let d = Daemon::start();
    // A built-in teacher whose init does not fit it.
    let spec = job("teacher-broken", 1, 1, 1, "").replace(
        "{arch: torchscript, path: teacher4.pt,",
        "{arch: mlp, num_classes: 4, init: teacher4.safetensors,",
    );
    let j = d.submit(&spec);
    let end = d.wait_terminal(&j.id, Duration::from_secs(60));
    assert_eq!(end.phase, JobPhase::Failed);
    let reason = end.status.failure.unwrap();
    assert!(
        reason.starts_with("teacher replica 0: ") && reason.contains("distill.teacher"),
        "{reason}"
    );
}

/// A feature-distillation job on the labelled images and the pool, in order, and its terms
/// as `distill_features_reference.py` takes them.
fn feature_job(name: &str, model: &str, terms: &[(&str, &str, &str, f64)]) -> (String, String) {
    let yaml: Vec<String> = terms
        .iter()
        .map(|(s, t, l, w)| {
            format!("    - {{student: {s}, teacher: {t}, loss: {l}, weight: {w}}}\n")
        })
        .collect();
    let arg: Vec<String> = terms
        .iter()
        .map(|(s, t, l, w)| format!("{s}:{t}:{l}:{w}"))
        .collect();
    let spec = format!(
        "name: {name}\nmodel: {model}\n\
         data: {{train: {{path: few.safetensors}}, unlabelled: {{path: pool.safetensors}}, channels: 1, shuffle: false}}\n\
         train: {{epochs: 1, max_steps: 6, batch_size: 8, seed: 5, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}}}\n\
         resources: {{threads: 1}}\n\
         distill:\n  teacher: {{arch: torchscript, path: teacher4.pt, threads: 1}}\n  temperature: 2.0\n  alpha: 0.3\n  top_k: 2\n  features:\n{}\
         output: {{dir: {name}}}\n",
        yaml.concat()
    );
    (spec, arg.join(","))
}

#[test]
fn feature_distillation_matches_pytorch_hint_and_attention_losses() {
    let f = ferry_tests::fixtures();
    let path = |p: &str| f.join(p).to_str().unwrap().to_string();
    // The built-in student's initial weights, which the PyTorch side starts from too.
    let init = f.join("models/cnn_student_init.safetensors");
    if !init.exists() {
        let tmp = f.join(format!("models/.cnn_student_init.{}", std::process::id()));
        run_python("distill_reference.py", &["init", tmp.to_str().unwrap()]);
        std::fs::rename(&tmp, &init).unwrap();
    }
    let d = Daemon::start();
    // A built-in student: a 1×1-convolution hint (32 to 8 channels) and an attention term.
    let builtin = feature_job(
        "features-builtin",
        "{arch: cnn, num_classes: 4, init: cnn_student_init.safetensors}",
        &[
            ("features.3", "features.3", "mse", 0.5),
            ("features.6", "features.6", "attention", 100.0),
        ],
    );
    // A TorchScript student: a linear hint (32 to 64 values).
    let script = feature_job(
        "features-script",
        "{arch: torchscript, path: mlp.pt}",
        &[("features", "features", "mse", 2.0)],
    );
    // The same on two ranks of 4 samples a step: the hint layer's gradient is all-reduced
    // with the student's.
    let two = (
        script
            .0
            .replace("features-script", "features-2-ranks")
            .replace("batch_size: 8", "batch_size: 4")
            .replace(
                "resources: {threads: 1}",
                "resources: {threads: 1, ranks: 2}",
            ),
        script.1.clone(),
    );
    assert!(two.0.contains("ranks: 2"), "{}", two.0);
    let jobs: Vec<Job> = [&builtin, &script, &two]
        .iter()
        .map(|(s, _)| d.submit(s))
        .collect();
    for j in &jobs {
        let end = d.wait_terminal(&j.id, Duration::from_secs(120));
        assert_eq!(
            end.phase,
            JobPhase::Succeeded,
            "{:?}\n{:#?}",
            end.status,
            messages(&d, j)
        );
    }
    // What each term compares, and what a sample costs on the wire: a top-2 soft label (8
    // bytes), the teacher's 8×4×4 activation (256) and its 4×4 attention map (32) as f16.
    let msgs = messages(&d, &jobs[0]);
    for want in [
        "distill.features[0]: the student's `features.3` gives 32×4×4 a sample, the teacher's `features.3` 8×4×4; mse loss, weight 0.5, through a hint layer (1×1 convolution from 32 to 8 channels)",
        "distill.features[1]: the student's `features.6` gives 64×4×4 a sample, the teacher's `features.6` an attention map of 4×4; attention loss, weight 100",
        "distillation record: 296 bytes a sample (soft label and activations as f16)",
    ] {
        assert!(msgs.iter().any(|m| m == want), "{want}\n{msgs:#?}");
    }
    let msgs = messages(&d, &jobs[1]);
    let want = "distill.features[0]: the student's `features` gives 32 a sample, the teacher's `features` 64; mse loss, weight 2, through a hint layer (linear from 32 to 64 channels)";
    assert!(msgs.iter().any(|m| m == want), "{want}\n{msgs:#?}");
    for ((name, student), (_, terms)) in [
        ("features-builtin", format!("cnn:{}", init.display())),
        ("features-script", path("models/mlp.pt")),
        ("features-2-ranks", path("models/mlp.pt")),
    ]
    .iter()
    .zip([&builtin, &script, &two])
    {
        let out = run_python(
            "distill_reference.py",
            &[
                "check",
                student,
                &path("models/teacher4.pt"),
                &path("data/few.safetensors"),
                &path("data/pool.safetensors"),
                d.out()
                    .join(format!("{name}/model.safetensors"))
                    .to_str()
                    .unwrap(),
                "6",
                "8",
                "5",
                terms,
            ],
        );
        eprintln!(
            "feature distillation ({name}) against PyTorch: {}",
            out.trim()
        );
    }
}

#[test]
fn a_feature_term_naming_a_missing_or_mismatched_layer_fails_with_the_layers_it_has() {
    let d = Daemon::start();
    let spec = |student: &str, teacher: &str, loss: &str| {
        format!(
            "name: bad-features-{}\n\
             model: {{arch: cnn, num_classes: 4}}\n\
             data: {{train: {{path: few.safetensors}}, channels: 1}}\n\
             train: {{epochs: 1, batch_size: 8}}\nresources: {{threads: 1}}\n\
             distill:\n  teacher: {{arch: torchscript, path: teacher4.pt, threads: 1}}\n  wait_timeout_s: 30\n  features: \
             [{{student: {student}, teacher: {teacher}, loss: {loss}}}]\n\
             output: {{dir: bad-features-{student}-{loss}}}\n",
            student.replace('.', "-")
        )
    };
    for (s, t, loss, want) in [
        (
            "features.9",
            "features.3",
            "mse",
            "no module `features.9` in this built-in model; its modules are features.0",
        ),
        (
            "features.2",
            "features.6",
            "mse",
            "the student's `features.2` gives 32×8×8 a sample, the teacher's `features.6` 16×4×4; mse needs",
        ),
        (
            "features.2",
            "features.3",
            "attention",
            "attention needs activations of the same spatial size",
        ),
    ] {
        let j = d.submit(&spec(s, t, loss));
        let end = d.wait_terminal(&j.id, Duration::from_secs(120));
        assert_eq!(end.phase, JobPhase::Failed, "{s} {t}");
        let reason = end.status.failure.unwrap_or_default();
        assert!(reason.contains(want), "{s} {t}: {reason}");
    }
}
