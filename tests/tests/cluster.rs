//! Cluster mode: several `ferryd` nodes on one real etcd, each on its own loopback address
//! (127.0.0.1x) as if on its own host, sharing one outputs root.

use std::time::{Duration, Instant};

use ferry_cluster::api::{Job, JobPhase, NodeList};
use ferry_tests::etcd::{unique_prefix, Etcd};
use ferry_tests::{final_distill, metric_sum, pid_alive, rank_pid, run_python, Daemon, NodeOpts};

/// `n` nodes of a fresh cluster on `etcd`, named a, b, c, ... on 127.0.0.(base + i).
fn cluster(etcd: &Etcd, n: usize, base: u8, out: &std::path::Path) -> Vec<Daemon> {
    cluster_on(etcd, &vec![(out, "worker"); n], base)
}

/// A fresh cluster of one node per (outputs root, role) in `nodes`.
fn cluster_on(etcd: &Etcd, nodes: &[(&std::path::Path, &str)], base: u8) -> Vec<Daemon> {
    let name = unique_prefix("c").trim_start_matches('/').replace('/', "-");
    let n = nodes.len();
    let nodes: Vec<Daemon> = nodes
        .iter()
        .enumerate()
        .map(|(i, (out, role))| {
            Daemon::start_node(NodeOpts {
                etcd: etcd.endpoint(),
                cluster: name.clone(),
                name: ((b'a' + i as u8) as char).to_string(),
                ip: format!("127.0.0.{}", base + i as u8),
                out: out.to_path_buf(),
                role: role.to_string(),
            })
        })
        .collect();
    // Every node sees every other before the test goes on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes_of(&nodes[0]).len() < n {
        assert!(Instant::now() < deadline, "the nodes did not all register");
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes
}

fn nodes_of(d: &Daemon) -> Vec<String> {
    let (status, body) = d.get("/v1/nodes");
    assert_eq!(status, 200, "{body}");
    let list: NodeList = serde_json::from_value(body).unwrap();
    list.nodes.into_iter().map(|n| n.name).collect()
}

/// Unary requests etcd has served (every get, put, txn, lease grant, ...), from its metrics.
fn etcd_requests(etcd: &Etcd) -> f64 {
    etcd.metrics()
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total{") && l.contains("grpc_type=\"unary\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn mlp_job(name: &str, ranks: u32, nodes: u32, epochs: u32) -> String {
    format!(
        "name: {name}\nmodel: {{arch: torchscript, path: mlp.pt}}\n\
         data: {{train: {{path: train.safetensors}}, val: {{path: val}}, channels: 1}}\n\
         train: {{epochs: {epochs}, batch_size: 8, seed: 3, checkpoint_every_steps: 20, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}}}}\n\
         resources: {{ranks: {ranks}, nodes: {nodes}, threads: 1}}\noutput: {{dir: {name}}}\n"
    )
}

fn placed_nodes(job: &Job) -> Vec<String> {
    let mut n: Vec<String> = job.placement.iter().map(|p| p.node.clone()).collect();
    n.dedup();
    n
}

fn messages(d: &Daemon, id: &str) -> Vec<String> {
    d.events(id).events.into_iter().map(|e| e.message).collect()
}

/// The step a surviving rank held when generation `gen - 1`'s ring broke (and what it said:
/// it saved that state, or a checkpoint of that step had it already), and the start step
/// and steps lost of generation `gen`.
fn rescued_then_resumed(d: &Daemon, id: &str, gen: u64) -> (u64, String, u64, u64) {
    let resumed = |e: &ferry_cluster::api::JobEvent| {
        e.message.starts_with("training resumed") && e.data["generation"].as_u64() == Some(gen)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = d.events(id).events;
    while !events.iter().any(resumed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        events = d.events(id).events;
    }
    let all = || {
        events
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let rescue = events
        .iter()
        .find(|e| e.data["rescue"] == true && e.data["generation"].as_u64() == Some(gen - 1))
        .unwrap_or_else(|| panic!("no survivor saved generation {}:\n{}", gen - 1, all()));
    let resumed = events
        .iter()
        .find(|e| resumed(e))
        .unwrap_or_else(|| panic!("generation {gen} did not resume:\n{}", all()));
    (
        rescue.data["step"].as_u64().unwrap(),
        rescue.message.clone(),
        resumed.data["start_step"].as_u64().unwrap(),
        resumed.data["steps_lost"].as_u64().unwrap(),
    )
}

#[test]
fn three_nodes_train_a_three_rank_job_as_one_node_does() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let nodes = cluster(&etcd, 3, 11, out.path());
    let (requests, started) = (etcd_requests(&etcd), Instant::now());
    let job = nodes[0].submit(&mlp_job("spread", 3, 3, 2));
    // Any node answers for any job.
    let end = nodes[2].wait_terminal(&job.id, Duration::from_secs(180));
    let (requests, secs) = (
        etcd_requests(&etcd) - requests,
        started.elapsed().as_secs_f64(),
    );
    // Progress goes to the store at the rank's report rate (100 ms in these tests), never
    // per step: the count per step falls as steps get faster.
    eprintln!(
        "etcd requests during the job (3 nodes, polling included): {requests} in {secs:.1} s, {:.2} per step over {} steps",
        requests / end.status.step as f64,
        end.status.step
    );
    assert_eq!(
        end.phase,
        JobPhase::Succeeded,
        "{:?}\n{}",
        end.status,
        messages(&nodes[1], &job.id).join("\n")
    );
    assert_eq!(placed_nodes(&end), ["a", "b", "c"]);
    assert_eq!(end.generation, 1);
    for d in &nodes {
        assert_eq!(nodes_of(d), ["a", "b", "c"]);
        let ctl = d.ctl(&["get", "spread"]);
        assert!(String::from_utf8_lossy(&ctl.stdout).contains("Succeeded"));
    }
    // The same job on one standalone node, three ranks there.
    let alone = Daemon::start();
    let one = alone.submit(&mlp_job("alone", 3, 1, 2));
    let one = alone.wait_terminal(&one.id, Duration::from_secs(180));
    assert_eq!(one.phase, JobPhase::Succeeded, "{:?}", one.status);
    let diff = run_python(
        "close_tensors.py",
        &[
            alone
                .out()
                .join("alone/model.safetensors")
                .to_str()
                .unwrap(),
            out.path()
                .join("spread/model.safetensors")
                .to_str()
                .unwrap(),
            "0",
        ],
    );
    eprintln!("3 nodes against 1 node, 3 ranks each: {}", diff.trim());
    assert_eq!(end.status.val_accuracy, one.status.val_accuracy);
}

/// Two hosts of two ranks each: gradients are summed within each host through shared memory
/// and between the hosts over TCP (the hierarchical all-reduce), every rank measures its link
/// to the other host, and the model is the one a single node trains with four ranks (up to
/// the order of the sums). With bf16 on the wire between the hosts, the job learns as well.
#[test]
fn two_hosts_of_two_ranks_all_reduce_hierarchically_and_compressed() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let nodes = cluster(&etcd, 2, 101, out.path());
    let plain = nodes[0].submit(&mlp_job("hier", 4, 2, 2));
    let compressed =
        mlp_job("hier-bf16", 4, 2, 2).replace("seed: 3,", "seed: 3, grad_compression: bf16,");
    let compressed = nodes[1].submit(&compressed);
    let alone = Daemon::start();
    let one = alone.submit(&mlp_job("alone", 4, 1, 2));
    let mut ends = Vec::new();
    for job in [&plain, &compressed] {
        let end = nodes[1].wait_terminal(&job.id, Duration::from_secs(240));
        let log = messages(&nodes[0], &job.id);
        assert_eq!(
            end.phase,
            JobPhase::Succeeded,
            "{:?}\n{}",
            end.status,
            log.join("\n")
        );
        assert_eq!(placed_nodes(&end), ["a", "b"]);
        assert!(
            log.iter()
                .any(|m| m.contains("hierarchical all-reduce: 2 hosts x 2 ranks")),
            "{}",
            log.join("\n")
        );
        // Each node reports the links of its own ranks: four, one per rank.
        let links: Vec<String> = nodes
            .iter()
            .flat_map(|d| {
                d.metrics()
                    .lines()
                    .filter(|l| l.starts_with("ferry_ring_link_bytes_per_second{"))
                    .filter(|l| l.contains(&format!("job_id=\"{}\"", job.id)))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(links.len(), 4, "{links:?}");
        for l in &links {
            let bps: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(bps > 1e6, "{l}");
        }
        ends.push(end);
    }
    let one = alone.wait_terminal(&one.id, Duration::from_secs(240));
    assert_eq!(one.phase, JobPhase::Succeeded, "{:?}", one.status);
    let model = |root: &std::path::Path, name: &str| {
        root.join(name)
            .join("model.safetensors")
            .to_str()
            .unwrap()
            .to_string()
    };
    let same = run_python(
        "close_tensors.py",
        &[
            &model(&alone.out(), "alone"),
            &model(out.path(), "hier"),
            "1e-4",
        ],
    );
    eprintln!("2 hosts x 2 ranks against 1 host x 4: {}", same.trim());
    let bf16 = run_python(
        "close_tensors.py",
        &[
            &model(&alone.out(), "alone"),
            &model(out.path(), "hier-bf16"),
            "1",
        ],
    );
    let (f32_acc, bf16_acc) = (ends[0].status.val_accuracy, ends[1].status.val_accuracy);
    eprintln!(
        "bf16 on the wire against f32: {}; val accuracy {bf16_acc:?} against {f32_acc:?}",
        bf16.trim()
    );
    // Rounded gradients train a different model, but not a worse one (within noise).
    assert!(
        bf16_acc.unwrap() >= f32_acc.unwrap() - 0.05,
        "{bf16_acc:?} vs {f32_acc:?}"
    );
}

#[test]
fn a_job_submitted_to_one_node_is_cancelled_from_another() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let nodes = cluster(&etcd, 3, 21, out.path());
    let job = nodes[0].submit(&mlp_job("stop-me", 2, 2, 1000));
    let running = nodes[1].wait_for(&job.id, Duration::from_secs(60), "steps", |j| {
        j.status.step > 0
    });
    let pid = rank_pid(&nodes[0], &job.id, 0);
    let ctl = nodes[2].ctl(&["cancel", "stop-me"]);
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let end = nodes[0].wait_terminal(&job.id, Duration::from_secs(30));
    assert_eq!(end.phase, JobPhase::Cancelled);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pid_alive(pid), "rank 0 ({pid}) still runs");
    assert_eq!(placed_nodes(&running).len(), 2);
    // A second job with the same output dir is refused on any node while it is claimed.
    let (status, _) = nodes[1].post("/v1/jobs", &mlp_job("stop-me", 2, 2, 1));
    assert_eq!(status, 422);
}

#[test]
fn a_killed_node_costs_a_generation_not_the_job() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&etcd, 3, 31, out.path());
    let job = nodes[0].submit(&mlp_job("survive", 2, 2, 12));
    let before = nodes[0].wait_for(&job.id, Duration::from_secs(90), "a checkpoint", |j| {
        j.status.checkpoint.is_some() && j.status.step >= 40
    });
    // Kill a placed node that is not rank 0's: the job's status is written from rank 0's.
    let victim = placed_nodes(&before)[1].clone();
    let idx = (victim.as_bytes()[0] - b'a') as usize;
    let killed_at = Instant::now();
    nodes[idx].kill();
    let witness = if idx == 0 { 1 } else { 0 };
    let moved = nodes[witness].wait_for(&job.id, Duration::from_secs(60), "generation 2", |j| {
        j.generation >= 2 && j.phase == JobPhase::Running && j.status.step > before.status.step
    });
    eprintln!(
        "training again on {:?} {:.1} s after the kill",
        placed_nodes(&moved),
        killed_at.elapsed().as_secs_f64()
    );
    assert!(!placed_nodes(&moved).contains(&victim));
    let end = nodes[witness].wait_terminal(&job.id, Duration::from_secs(240));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(end.status.restarts, 0, "a lost node is not a restart");
    // 400 samples in global batches of 16, 12 epochs; not a step skipped or repeated.
    assert_eq!((end.status.step, end.status.total_steps), (300, 300));
    let msgs = messages(&nodes[witness], &job.id);
    let change = msgs
        .iter()
        .find(|m| m.starts_with("generation 1 ended"))
        .unwrap_or_else(|| panic!("no generation change in:\n{}", msgs.join("\n")));
    assert!(
        change.contains(&format!("node {victim}")) && change.contains("lease expired"),
        "{change}"
    );
    // The survivor saved what it held when the ring broke; generation 2 resumed from it.
    let (saved, why, start, lost) =
        rescued_then_resumed(&nodes[witness], &job.id, moved.generation);
    eprintln!(
        "{why}; generation {} resumed at step {start}, {lost} steps lost",
        moved.generation
    );
    assert_eq!(start, saved);
    assert_eq!(lost, 0);
    assert!(saved >= before.status.step);
    // Metrics: the recovery was counted and timed where it happened (rank 0's node times
    // its first step, the coordinator the re-placement); the finished job's series stay.
    let rank0 = &nodes[(placed_nodes(&moved)[0].as_bytes()[0] - b'a') as usize];
    let text = rank0.metrics();
    let series = format!("ferry_recoveries_total{{job_id=\"{}\"", job.id);
    assert_eq!(metric_sum(&text, &series), Some(1.0), "{text}");
    for part in ["total", "rendezvous", "first_step"] {
        let series = format!("ferry_recovery_seconds_count{{part=\"{part}\"}}");
        assert_eq!(metric_sum(&text, &series), Some(1.0), "{text}");
    }
    let replaced: f64 = nodes
        .iter_mut()
        .filter_map(|n| n.alive().then(|| n.metrics()))
        .filter_map(|t| metric_sum(&t, "ferry_recovery_seconds_count{part=\"replace\"}"))
        .sum();
    assert_eq!(replaced, 1.0);
    assert_eq!(
        metric_sum(&text, "ferry_nodes{role=\"worker\"}"),
        Some(2.0),
        "{text}"
    );
}

#[test]
fn a_paused_node_fences_itself_and_the_coordinator_can_die() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&etcd, 3, 41, out.path());
    let coordinator = nodes
        .iter()
        .position(|d| d.log().contains("this node coordinates the cluster"))
        .expect("a coordinator");
    let job = nodes[0].submit(&mlp_job("frozen", 2, 2, 12));
    let before = nodes[0].wait_for(&job.id, Duration::from_secs(90), "a checkpoint", |j| {
        j.status.checkpoint.is_some() && j.status.step >= 40
    });
    let placed = placed_nodes(&before);
    // Pause a placed node past its lease (3 s), and keep it paused until the job moved on.
    let frozen = placed
        .iter()
        .map(|n| (n.as_bytes()[0] - b'a') as usize)
        .find(|&i| i != coordinator)
        .expect("a placed node that does not coordinate");
    let witness = (0..3).find(|&i| i != frozen).unwrap();
    nodes[frozen].pause();
    let moved = nodes[witness].wait_for(&job.id, Duration::from_secs(60), "generation 2", |j| {
        j.generation >= 2 && j.phase == JobPhase::Running
    });
    let gen2 = moved.generation;
    // The other placed node's ranks were stopped for generation 2 (their ring blocked on the
    // paused peer): they saved their state, and generation 2 resumed from it.
    let (saved, why, start, lost) = rescued_then_resumed(&nodes[witness], &job.id, gen2);
    assert!(why.contains("the daemon stopped it"), "{why}");
    assert_eq!((start, lost), (saved, 0));
    assert!(saved >= before.status.step);
    nodes[frozen].resume();
    // It fences itself and comes back as a new member.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes[frozen].log().contains("lease expired: fencing") {
        assert!(Instant::now() < deadline, "{}", nodes[frozen].log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Now the coordinator dies: another node takes over, the job completes.
    let survivor = (0..3).find(|&i| i != coordinator).unwrap();
    nodes[coordinator].kill();
    let end = nodes[survivor].wait_terminal(&job.id, Duration::from_secs(240));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    // Another node takes over once the dead one's lease expires (the job may have ended
    // before that).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes
        .iter()
        .enumerate()
        .any(|(i, d)| i != coordinator && d.log().contains("this node coordinates the cluster"))
    {
        assert!(
            Instant::now() < deadline,
            "no node took over from the dead coordinator"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing of generation 1 was written after generation 2 started.
    let events = nodes[survivor].events(&job.id).events;
    let start2 = events
        .iter()
        .position(|e| {
            e.data["generation"].as_u64() == Some(gen2) && e.message.starts_with("Running")
        })
        .expect("generation 2 started");
    // (What generation 1's survivor reported of the state it saved is not stale: its node
    // kept its session.)
    let frozen_name = ((b'a' + frozen as u8) as char).to_string();
    let stale: Vec<_> = events[start2..]
        .iter()
        .filter(|e| e.data["generation"].as_u64().is_some_and(|g| g < gen2))
        .filter(|e| !(e.data["rescue"] == true && e.data["node"] != frozen_name.as_str()))
        .map(|e| e.message.clone())
        .collect();
    assert!(stale.is_empty(), "stale writes accepted: {stale:?}");
}

#[test]
fn training_goes_on_while_etcd_is_down_and_nothing_is_lost() {
    let mut etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let nodes = cluster(&etcd, 2, 51, out.path());
    let job = nodes[0].submit(&mlp_job("outage", 2, 2, 12));
    let before = nodes[1].wait_for(&job.id, Duration::from_secs(90), "steps", |j| {
        j.status.step >= 20
    });
    let events_before = nodes[1].events(&job.id).events.len();
    etcd.stop();
    // The API says the store is away, clearly; the ranks train on.
    let (status, body) = nodes[0].get(&format!("/v1/jobs/{}", job.id));
    assert_eq!(status, 503, "{body}");
    std::thread::sleep(Duration::from_secs(10));
    etcd.start();
    let end = nodes[0].wait_terminal(&job.id, Duration::from_secs(240));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(
        end.generation, before.generation,
        "the outage cost a generation"
    );
    assert_eq!((end.status.step, end.status.total_steps), (300, 300));
    let events = nodes[1].events(&job.id).events;
    assert!(events.len() > events_before);
    // Event numbers stay dense and unique across the outage.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn a_node_that_mounts_another_outputs_root_takes_no_ranks() {
    let etcd = Etcd::new();
    let (out, elsewhere) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = "worker";
    let nodes = cluster_on(
        &etcd,
        &[(out.path(), w), (out.path(), w), (elsewhere.path(), w)],
        61,
    );
    // Three nodes asked for: c's root is not the others', so the job waits, and says why.
    let wide = nodes[0].submit(&mlp_job("wide", 3, 3, 1));
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let msgs = messages(&nodes[1], &wide.id);
        if let Some(m) = msgs.iter().find(|m| m.starts_with("waiting for nodes")) {
            break m.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no waiting event:\n{}",
            msgs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        waiting.contains("node c does not share the coordinator's outputs root"),
        "{waiting}"
    );
    assert_eq!(nodes[2].job(&wide.id).phase, JobPhase::Pending);
    nodes[2].ctl(&["cancel", "wide"]);
    // Two nodes fit: a and b.
    let narrow = nodes[0].submit(&mlp_job("narrow", 2, 2, 1));
    let end = nodes[2].wait_terminal(&narrow.id, Duration::from_secs(120));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(placed_nodes(&end), ["a", "b"]);
    assert!(
        out.path().join("narrow/model.safetensors").is_file(),
        "{:?}\n{}",
        std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>(),
        messages(&nodes[0], &narrow.id).join("\n")
    );
}

#[test]
fn students_on_two_nodes_learn_from_a_teacher_on_a_third() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let roles = [
        (out.path(), "worker"),
        (out.path(), "worker"),
        (out.path(), "teacher"),
    ];
    let nodes = cluster_on(&etcd, &roles, 71);
    let spec = "name: kd\nmodel: {arch: torchscript, path: mlp.pt}\n\
         data: {train: {path: few.safetensors}, unlabelled: {path: pool.safetensors}, val: {path: val}, channels: 1}\n\
         train: {epochs: 4, batch_size: 8, seed: 5, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}\n\
         resources: {ranks: 2, nodes: 2, threads: 1}\n\
         distill:\n  teacher: {arch: torchscript, path: teacher4.pt, replicas: 1, threads: 1}\n  temperature: 2.0\n  alpha: 0.5\n  top_k: 2\n\
         output: {dir: kd}\n";
    let job = nodes[2].submit(spec);
    let end = nodes[1].wait_terminal(&job.id, Duration::from_secs(240));
    let msgs = messages(&nodes[0], &job.id);
    assert_eq!(
        end.phase,
        JobPhase::Succeeded,
        "{:?}\n{}",
        end.status,
        msgs.join("\n")
    );
    // The students on the workers, the teacher on the teacher node.
    assert_eq!(placed_nodes(&end), ["a", "b"]);
    let teachers: Vec<&str> = end
        .teacher_placement
        .iter()
        .map(|p| p.node.as_str())
        .collect();
    assert_eq!(teachers, ["c"]);
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("teacher replica 0 serves soft labels at 127.0.0.73:")),
        "{}",
        msgs.join("\n")
    );
    // Every step had soft labels (the students never fell back to hard labels).
    let last = final_distill(&nodes[0], "kd");
    assert_eq!(last["fallback_steps"], 0, "{last}");
    assert!(last["samples_fetched"].as_u64().unwrap() > 0, "{last}");
    // Each node's students shared a cache of their own, never one on the shared root.
    let shared: Vec<_> = std::fs::read_dir(out.path().join("kd"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".softlabels"))
        .collect();
    assert!(shared.is_empty(), "{shared:?}");
}

#[test]
fn a_job_grows_back_onto_a_node_that_returns() {
    let etcd = Etcd::new();
    let out = tempfile::tempdir().unwrap();
    let mut nodes = cluster(&etcd, 3, 81, out.path());
    // Long enough (about 20 s) to shrink and to grow back.
    let spec = mlp_job("regrow", 3, 3, 300).replace("nodes: 3,", "nodes: 3, min_nodes: 2,");
    let job = nodes[0].submit(&spec);
    let before = nodes[0].wait_for(&job.id, Duration::from_secs(90), "steps", |j| {
        j.phase == JobPhase::Running && j.status.step >= 20
    });
    assert_eq!(placed_nodes(&before), ["a", "b", "c"]);
    nodes[2].kill();
    let shrunk = nodes[0].wait_for(&job.id, Duration::from_secs(60), "generation 2", |j| {
        j.generation == 2 && j.phase == JobPhase::Running
    });
    assert_eq!(placed_nodes(&shrunk), ["a", "b"]);
    // c comes back: once it has been up two lease TTLs, the job moves onto it.
    nodes[2].crash_and_restart();
    let grown = nodes[1].wait_for(&job.id, Duration::from_secs(120), "generation 3", |j| {
        j.generation >= 3 || j.phase.is_terminal()
    });
    assert_eq!(grown.generation, 3, "{:?}", grown.status);
    let (saved, why, start, lost) = rescued_then_resumed(&nodes[1], &job.id, 3);
    eprintln!("{why}; generation 3 resumed at step {start}, {lost} steps lost");
    assert_eq!((start, lost), (saved, 0));
    let end = nodes[1].wait_terminal(&job.id, Duration::from_secs(240));
    assert_eq!(end.phase, JobPhase::Succeeded, "{:?}", end.status);
    assert_eq!(placed_nodes(&end), ["a", "b", "c"]);
    assert_eq!(end.status.restarts, 0);
    assert_eq!(end.status.failure, None, "growing is not a failure");
    // 400 samples in global batches of 24, then 16, then 24 again: the count of steps
    // follows the world size, and every step of the plan was taken.
    assert_eq!(end.status.step, end.status.total_steps);
    assert!(end.status.step > 300 * 17 && end.status.step < 300 * 25);
    let msgs = messages(&nodes[0], &job.id);
    assert!(
        msgs.iter().any(|m| m
            == "generation 2 ends: node(s) c can take ranks: growing from 2 to 3 nodes; its ranks save their state for the next"),
        "{}",
        msgs.join("\n")
    );
}
