//! Data-parallel jobs: several rank processes on one TCP ring.

use std::time::{Duration, Instant};

use ferry_cluster::api::JobPhase;
use ferry_tests::{kill9, pid_alive, rank_pid, rank_pids, run_python, Daemon};

fn mlp_job(name: &str, ranks: u32, batch: u32) -> String {
    mlp_job_with(name, ranks, batch, "")
}

/// `train_extra`: more `train` fields, each followed by ", ".
fn mlp_job_with(name: &str, ranks: u32, batch: u32, train_extra: &str) -> String {
    format!(
        "name: {name}\nmodel: {{arch: torchscript, path: mlp.pt}}\n\
         data: {{train: {{path: train.safetensors}}, val: {{path: val}}, channels: 1}}\n\
         train: {{{train_extra}epochs: 2, batch_size: {batch}, seed: 3, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}}}\n\
         resources: {{ranks: {ranks}, threads: 1}}\noutput: {{dir: {name}}}\n"
    )
}

#[test]
fn n_ranks_train_the_same_weights_as_one_rank_with_n_times_the_batch() {
    let d = Daemon::start();
    // Tiny buckets (about one per parameter tensor), all-reduced during backward; and, for
    // 2 ranks, the path CUDA ranks take: one 25 MB bucket after backward.
    let runs = [
        (
            2u32,
            "train: {overlap_grad_sync: always, bucket_mb: 0.001, ",
        ),
        (3, "train: {overlap_grad_sync: always, bucket_mb: 0.001, "),
        (2, "train: {overlap_grad_sync: never, "),
    ];
    for (i, (n, extra)) in runs.into_iter().enumerate() {
        let overlap = extra.contains("always");
        let extra = extra.trim_start_matches("train: {");
        let one = d.submit(&mlp_job(&format!("single-{i}"), 1, 8 * n));
        let many = d.submit(&mlp_job_with(&format!("ranks-{i}"), n, 8, extra));
        let one = d.wait_terminal(&one.id, Duration::from_secs(120));
        let many = d.wait_terminal(&many.id, Duration::from_secs(120));
        assert_eq!(one.phase, JobPhase::Succeeded, "{:?}", one.status);
        assert_eq!(
            many.phase,
            JobPhase::Succeeded,
            "{:?}\n{}",
            many.status,
            d.log()
        );
        // 400 samples in global batches of 8n: the last step of each epoch is short
        // (for n = 3, 16 samples split 6/5/5), which the weighting must handle.
        assert_eq!(many.status.total_steps, one.status.total_steps);
        assert_eq!(many.status.step, 2 * 400u64.div_ceil(8 * u64::from(n)));
        let out = run_python(
            "close_tensors.py",
            &[
                d.out()
                    .join(format!("single-{i}/model.safetensors"))
                    .to_str()
                    .unwrap(),
                d.out()
                    .join(format!("ranks-{i}/model.safetensors"))
                    .to_str()
                    .unwrap(),
                "1e-5",
            ],
        );
        assert!(out.contains("max_abs_diff="), "{out}");
        eprintln!(
            "{n} ranks ({extra}) against 1 rank with batch {}: {}",
            8 * n,
            out.trim()
        );
        // Sharded evaluation sums to the same accuracy.
        assert_eq!(one.status.val_accuracy, many.status.val_accuracy);
        let events = d.events(&many.id).events;
        assert!(events
            .iter()
            .any(|e| e.message == format!("{n} ranks joined the ring")));
        // With overlap, every bucket's all-reduce started inside backward (each parameter
        // gets a gradient in this model), not after it.
        let overlapped = events.iter().find_map(|e| {
            e.message
                .strip_prefix("gradient all-reduce overlaps backward: ")
        });
        if overlap {
            let counts: Vec<u32> = overlapped
                .expect("no overlap report")
                .split(' ')
                .filter_map(|w| w.parse().ok())
                .collect();
            assert!(
                counts.len() == 2 && counts[1] > 1 && counts[0] == counts[1],
                "{overlapped:?}"
            );
        } else {
            assert!(overlapped.is_none(), "{overlapped:?}");
            assert!(events
                .iter()
                .any(|e| e.message
                    == "gradient all-reduce after backward (overlap_grad_sync: never)"));
        }
    }
}

#[test]
fn a_killed_rank_stops_every_other_rank_within_seconds() {
    let d = Daemon::start();
    // Small buckets all-reduced during backward: the kill lands while several are queued
    // on the survivors' communication threads.
    let spec = "name: dp-victim\nmodel: {arch: torchscript, path: cnn4.pt}\n\
                data: {train: {path: big.safetensors}}\n\
                train: {epochs: 1000, batch_size: 8, overlap_grad_sync: always, bucket_mb: 0.002, optimizer: {name: sgd, lr: 0.01}}\n\
                resources: {ranks: 3, threads: 1}\noutput: {dir: dp-victim}\n";
    let job = d.submit(spec);
    d.wait_for(&job.id, Duration::from_secs(60), "steps", |j| {
        j.status.step > 5
    });
    let pids = rank_pids(&d, &job.id);
    assert_eq!(pids.len(), 3, "{pids:?}");
    let victim = rank_pid(&d, &job.id, 1);
    let killed_at = Instant::now();
    kill9(victim);
    let end = d.wait_terminal(&job.id, Duration::from_secs(30));
    let took = killed_at.elapsed();
    assert_eq!(end.phase, JobPhase::Failed);
    let reason = end.status.failure.unwrap();
    assert!(
        reason.starts_with("rank 1 was killed (SIGKILL"),
        "the reason names the dead rank: {reason}"
    );
    assert!(
        took < Duration::from_secs(15),
        "the job took {took:?} to fail"
    );
    std::thread::sleep(Duration::from_millis(300));
    for (rank, pid) in pids {
        assert!(!pid_alive(pid), "rank {rank} (pid {pid}) still runs");
    }
    eprintln!("job failed {took:?} after rank 1 was killed: {reason}");
}

#[test]
fn a_restart_policy_resumes_a_job_whose_rank_was_killed() {
    let d = Daemon::start();
    let spec = "name: dp-phoenix\nmodel: {arch: torchscript, path: cnn4.pt}\n\
                data: {train: {path: big.safetensors}}\n\
                train: {epochs: 8, batch_size: 8, checkpoint_every_steps: 50, optimizer: {name: sgd, lr: 0.01}}\n\
                resources: {ranks: 2, threads: 1}\nrestart: {max_restarts: 1}\noutput: {dir: dp-phoenix}\n";
    let job = d.submit(spec);
    d.wait_for(&job.id, Duration::from_secs(60), "a checkpoint", |j| {
        j.status.checkpoint.is_some() && j.status.step >= 100
    });
    let victim = rank_pid(&d, &job.id, 1);
    kill9(victim);
    let end = d.wait_terminal(&job.id, Duration::from_secs(180));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(end.status.attempts, 2);
    assert_eq!(end.status.step, 1000);
    let events = d.events(&job.id).events;
    let restart = events
        .iter()
        .find(|e| e.message.starts_with("restarting (1 of 1 restarts)"))
        .expect("a restart event");
    assert!(
        restart.message.contains("rank 1 was killed"),
        "{}",
        restart.message
    );
    let resumed = events
        .iter()
        .find(|e| e.message.starts_with("training resumed at step"))
        .expect("a resume");
    assert!(resumed.data["start_step"].as_u64().unwrap() >= 100);
}

#[test]
fn feature_extraction_on_two_ranks_matches_one_rank() {
    // A frozen backbone (BatchNorm in eval mode, so per-rank batch statistics play no part)
    // and a new head: only the head trains, and both runs must agree.
    let d = Daemon::start();
    let job = |name: &str, ranks: u32, batch: u32| {
        format!(
            "name: {name}\nmodel: {{arch: torchscript, path: cnn4.pt, init: cnn3_init.safetensors, freeze: [features]}}\n\
             data: {{train: {{path: train.safetensors}}}}\n\
             train: {{epochs: 2, batch_size: {batch}, optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}}}\n\
             resources: {{ranks: {ranks}, threads: 1}}\noutput: {{dir: {name}}}\n"
        )
    };
    let one = d.submit(&job("fe-one", 1, 16));
    let two = d.submit(&job("fe-two", 2, 8));
    for j in [&one, &two] {
        let end = d.wait_terminal(&j.id, Duration::from_secs(120));
        assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    }
    let out = run_python(
        "close_tensors.py",
        &[
            d.out().join("fe-one/model.safetensors").to_str().unwrap(),
            d.out().join("fe-two/model.safetensors").to_str().unwrap(),
            "1e-5",
        ],
    );
    eprintln!("feature extraction, 2 ranks against 1: {}", out.trim());
}
