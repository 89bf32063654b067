//! Gang placement: which nodes run which ranks of the queued jobs. A pure function of the
//! jobs and the nodes, so that every rule here is unit-tested without a store or a daemon.
//!
//! Rules, in order:
//! - A job's ranks are placed all together or not at all: `nodes` nodes (at least
//!   `min_nodes` when fewer are free), `ranks_per_node` on each.
//! - Only `worker` nodes whose labels include the job's `node_selector`, with room for one
//!   more job (`max_jobs`) and, for CUDA jobs, a free GPU for every rank on the node.
//! - Among those, the least busy first (fewest running jobs, then most free GPUs), then by
//!   name, so the result is deterministic. A node that failed the job recently (cool-down)
//!   comes last: it is used only when nothing else fits.
//! - Jobs are placed in queue order. A job that could run on the cluster but not now blocks
//!   the jobs behind it of the same device kind (no starvation of large jobs by small
//!   ones); a job that cannot fit even on an idle cluster blocks nothing and says why.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::api::RankPlacement;
use crate::spec::Device;

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Its registration session (see [`RankPlacement::session`]).
    pub session: u64,
    /// `worker` or `teacher`.
    pub role: String,
    pub cuda_devices: u32,
    pub max_jobs: u32,
    /// CPU ranks at once over all its jobs; 0: no limit.
    pub cpu_slots: u32,
    pub labels: BTreeMap<String, String>,
}

/// What a queued job asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub job: String,
    pub nodes: u32,
    pub min_nodes: u32,
    pub ranks_per_node: u32,
    pub device: Device,
    pub node_selector: BTreeMap<String, String>,
    /// Nodes that failed this job recently: used only when nothing else fits.
    pub cooling: BTreeSet<String>,
}

/// What already runs: per node, the jobs and the GPUs they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    pub jobs: HashMap<String, u32>,
    pub gpus: HashMap<String, BTreeSet<u32>>,
    /// CPU ranks per node.
    pub cpu_ranks: HashMap<String, u32>,
}

impl Load {
    /// Adds a running (or just placed) job's placement.
    pub fn add(&mut self, placement: &[RankPlacement]) {
        let nodes: BTreeSet<&str> = placement.iter().map(|p| p.node.as_str()).collect();
        for n in nodes {
            *self.jobs.entry(n.to_string()).or_default() += 1;
        }
        for p in placement {
            if let Some(g) = p.device.strip_prefix("cuda:").and_then(|g| g.parse().ok()) {
                self.gpus.entry(p.node.clone()).or_default().insert(g);
            } else if p.device == "cpu" {
                *self.cpu_ranks.entry(p.node.clone()).or_default() += 1;
            }
        }
    }
}

/// The outcome for one queued job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it here: rank `i` at index `i`.
    Place(Vec<RankPlacement>),
    /// It fits the cluster, but not now: it waits for running jobs to end.
    Wait(String),
    /// Not enough matching nodes even on an idle cluster: it waits for nodes to join.
    Unfit(String),
}

fn eligible(d: &Demand, n: &NodeView) -> bool {
    n.role == "worker"
        && d.node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v))
        && (d.device != Device::Cuda || n.cuda_devices >= d.ranks_per_node)
        && (d.device != Device::Cpu || n.cpu_slots == 0 || n.cpu_slots >= d.ranks_per_node)
}

/// Whether `n` has room for `d`'s CPU ranks next to the ones it runs.
fn cpu_room(d: &Demand, n: &NodeView, load: &Load) -> bool {
    d.device != Device::Cpu
        || n.cpu_slots == 0
        || load.cpu_ranks.get(&n.name).copied().unwrap_or(0) + d.ranks_per_node <= n.cpu_slots
}

/// GPUs of `n` not held by running jobs, lowest first.
fn free_gpus(n: &NodeView, load: &Load) -> Vec<u32> {
    let used = load.gpus.get(&n.name);
    (0..n.cuda_devices)
        .filter(|g| used.is_none_or(|u| !u.contains(g)))
        .collect()
}

fn describe(d: &Demand) -> String {
    let mut what = format!(
        "{} node(s) with {} {} rank(s) each",
        d.min_nodes,
        d.ranks_per_node,
        match d.device {
            Device::Cpu => "CPU",
            Device::Cuda => "CUDA",
        }
    );
    if !d.node_selector.is_empty() {
        let sel: Vec<String> = d
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        what.push_str(&format!(" labelled {}", sel.join(",")));
    }
    what
}

/// Places one job on the nodes given what already runs, or says why not.
pub fn place_one(d: &Demand, nodes: &[NodeView], load: &Load) -> Decision {
    let matching: Vec<&NodeView> = nodes.iter().filter(|n| eligible(d, n)).collect();
    if (matching.len() as u32) < d.min_nodes {
        return Decision::Unfit(format!(
            "needs {}; {} of the {} registered node(s) match (see `ferryctl nodes`)",
            describe(d),
            matching.len(),
            nodes.len()
        ));
    }
    let mut free: Vec<(&NodeView, Vec<u32>)> = matching
        .into_iter()
        .filter(|n| load.jobs.get(&n.name).copied().unwrap_or(0) < n.max_jobs.max(1))
        .map(|n| (n, free_gpus(n, load)))
        .filter(|(_, gpus)| d.device != Device::Cuda || gpus.len() as u32 >= d.ranks_per_node)
        .filter(|(n, _)| cpu_room(d, n, load))
        .collect();
    if (free.len() as u32) < d.min_nodes {
        return Decision::Wait(format!(
            "needs {}; {} are free now",
            describe(d),
            free.len()
        ));
    }
    free.sort_by(|(a, ga), (b, gb)| {
        let key = |n: &NodeView, g: &Vec<u32>| {
            (
                d.cooling.contains(&n.name),
                load.jobs.get(&n.name).copied().unwrap_or(0),
                std::cmp::Reverse(g.len()),
            )
        };
        key(a, ga)
            .cmp(&key(b, gb))
            .then_with(|| a.name.cmp(&b.name))
    });
    free.truncate(d.nodes as usize);
    // Ranks in node-name order, so that a job's ring neighbours are stable.
    free.sort_by(|(a, _), (b, _)| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity((d.ranks_per_node as usize) * free.len());
    for (n, gpus) in free {
        let devices: Vec<String> = match d.device {
            Device::Cpu => vec!["cpu".into(); d.ranks_per_node as usize],
            Device::Cuda => gpus
                .iter()
                .take(d.ranks_per_node as usize)
                .map(|g| format!("cuda:{g}"))
                .collect(),
        };
        for device in devices {
            out.push(RankPlacement {
                node: n.name.clone(),
                session: n.session,
                device,
            });
        }
    }
    Decision::Place(out)
}

/// Places the queued jobs (in queue order) on the nodes, given what already runs.
pub fn place(queue: &[Demand], nodes: &[NodeView], running: &Load) -> Vec<(String, Decision)> {
    let mut load = running.clone();
    let mut blocked: BTreeSet<&'static str> = BTreeSet::new();
    let kind = |d: &Demand| match d.device {
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
    };
    let mut out = Vec::with_capacity(queue.len());
    for d in queue {
        if blocked.contains(kind(d)) {
            out.push((
                d.job.clone(),
                Decision::Wait("queued behind an earlier job that waits for room".into()),
            ));
            continue;
        }
        let decision = place_one(d, nodes, &load);
        match &decision {
            Decision::Place(p) => load.add(p),
            Decision::Wait(_) => {
                blocked.insert(kind(d));
            }
            Decision::Unfit(_) => {}
        }
        out.push((d.job.clone(), decision));
    }
    out
}

/// Where a distillation job's `replicas` teacher processes run: spread over the
/// `teacher`-role nodes, each replica on the node with the fewest replicas so far (those of
/// running jobs in `hosted` included), then by name. On a CUDA node a replica gets one GPU,
/// in turn. Empty when the cluster has no teacher node: the replicas then run beside rank 0.
pub fn place_teachers(
    replicas: u32,
    device: Device,
    nodes: &[NodeView],
    hosted: &HashMap<String, u32>,
) -> Vec<RankPlacement> {
    let teachers: Vec<&NodeView> = nodes.iter().filter(|n| n.role == "teacher").collect();
    if teachers.is_empty() {
        return Vec::new();
    }
    let mut count: HashMap<&str, u32> = teachers
        .iter()
        .map(|n| (n.name.as_str(), hosted.get(&n.name).copied().unwrap_or(0)))
        .collect();
    let mut mine: HashMap<&str, u32> = HashMap::new();
    (0..replicas)
        .map(|_| {
            let n = teachers
                .iter()
                .min_by_key(|n| (count[n.name.as_str()], n.name.as_str()))
                .expect("at least one teacher node");
            *count.get_mut(n.name.as_str()).expect("counted") += 1;
            let k = mine.entry(n.name.as_str()).or_default();
            let dev = match device {
                Device::Cuda if n.cuda_devices > 0 => format!("cuda:{}", *k % n.cuda_devices),
                _ => "cpu".to_string(),
            };
            *k += 1;
            RankPlacement {
                node: n.name.clone(),
                session: n.session,
                device: dev,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teachers_spread_over_teacher_nodes_fewest_first() {
        let mut t1 = node("t1", 2, 4);
        t1.role = "teacher".into();
        let mut t2 = node("t2", 0, 4);
        t2.role = "teacher".into();
        let nodes = [node("w", 8, 4), t1, t2];
        let none = HashMap::new();
        let p = place_teachers(3, Device::Cuda, &nodes, &none);
        let got: Vec<String> = p
            .iter()
            .map(|r| format!("{}/{}", r.node, r.device))
            .collect();
        assert_eq!(got, ["t1/cuda:0", "t2/cpu", "t1/cuda:1"]);
        // t1 already hosts two replicas of another job: t2 first.
        let busy = HashMap::from([("t1".to_string(), 2)]);
        let got: Vec<String> = place_teachers(2, Device::Cpu, &nodes, &busy)
            .iter()
            .map(|r| r.node.clone())
            .collect();
        assert_eq!(got, ["t2", "t2"]);
        // No teacher node: none (they run beside rank 0).
        assert!(place_teachers(2, Device::Cpu, &nodes[..1], &none).is_empty());
    }

    fn node(name: &str, gpus: u32, max_jobs: u32) -> NodeView {
        NodeView {
            name: name.into(),
            session: 7,
            role: "worker".into(),
            cuda_devices: gpus,
            max_jobs,
            cpu_slots: 0,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn cpu_ranks_fit_the_slots_of_a_node() {
        let mut a = node("a", 0, 4);
        a.cpu_slots = 4;
        // Never fits: more ranks than the node has slots.
        assert!(matches!(
            place_one(
                &job("big", 1, 5, Device::Cpu),
                std::slice::from_ref(&a),
                &Load::default()
            ),
            Decision::Unfit(_)
        ));
        let mut load = Load::default();
        match place_one(
            &job("j1", 1, 3, Device::Cpu),
            std::slice::from_ref(&a),
            &load,
        ) {
            Decision::Place(p) => load.add(&p),
            other => panic!("{other:?}"),
        }
        // One slot left: two more ranks wait, one fits.
        assert!(matches!(
            place_one(
                &job("j2", 1, 2, Device::Cpu),
                std::slice::from_ref(&a),
                &load
            ),
            Decision::Wait(_)
        ));
        assert!(matches!(
            place_one(
                &job("j3", 1, 1, Device::Cpu),
                std::slice::from_ref(&a),
                &load
            ),
            Decision::Place(_)
        ));
    }

    fn job(id: &str, nodes: u32, per_node: u32, device: Device) -> Demand {
        Demand {
            job: id.into(),
            nodes,
            min_nodes: nodes,
            ranks_per_node: per_node,
            device,
            node_selector: BTreeMap::new(),
            cooling: BTreeSet::new(),
        }
    }

    fn nodes_of(d: &Decision) -> Vec<String> {
        match d {
            Decision::Place(p) => p
                .iter()
                .map(|r| format!("{}/{}", r.node, r.device))
                .collect(),
            other => panic!("not placed: {other:?}"),
        }
    }

    #[test]
    fn a_gang_spreads_its_ranks_over_distinct_nodes_in_name_order() {
        let nodes = [node("c", 0, 1), node("a", 0, 1), node("b", 0, 1)];
        let out = place(&[job("j", 3, 2, Device::Cpu)], &nodes, &Load::default());
        assert_eq!(
            nodes_of(&out[0].1),
            ["a/cpu", "a/cpu", "b/cpu", "b/cpu", "c/cpu", "c/cpu"]
        );
    }

    #[test]
    fn all_or_nothing_and_the_queue_order_holds() {
        let nodes = [node("a", 0, 1), node("b", 0, 1)];
        let q = [
            job("one", 1, 1, Device::Cpu),
            job("two", 2, 1, Device::Cpu),
            job("three", 1, 1, Device::Cpu),
        ];
        let out = place(&q, &nodes, &Load::default());
        assert_eq!(nodes_of(&out[0].1), ["a/cpu"]);
        // Only b is free: `two` waits, and `three` may not take b from it.
        assert!(matches!(&out[1].1, Decision::Wait(w) if w.contains("1 are free")));
        assert!(matches!(&out[2].1, Decision::Wait(w) if w.contains("behind")));
    }

    #[test]
    fn a_job_that_can_never_fit_blocks_nobody_and_says_why() {
        let nodes = [node("a", 0, 1)];
        let q = [
            job("big", 2, 1, Device::Cpu),
            job("small", 1, 1, Device::Cpu),
        ];
        let out = place(&q, &nodes, &Load::default());
        assert!(
            matches!(&out[0].1, Decision::Unfit(w) if w.contains("1 of the 1 registered")),
            "{:?}",
            out[0].1
        );
        assert_eq!(nodes_of(&out[1].1), ["a/cpu"]);
    }

    #[test]
    fn gpus_are_allocated_per_rank_and_fragmentation_is_respected() {
        let nodes = [node("a", 4, 4), node("b", 2, 4)];
        let mut running = Load::default();
        running.add(&[RankPlacement {
            node: "a".into(),
            session: 7,
            device: "cuda:1".into(),
        }]);
        // a has 3 free GPUs (0, 2, 3), b has 2: a 3-rank node job only fits on a.
        let out = place(&[job("j", 1, 3, Device::Cuda)], &nodes, &running);
        assert_eq!(nodes_of(&out[0].1), ["a/cuda:0", "a/cuda:2", "a/cuda:3"]);
        // Two 2-GPU jobs after it: one more fits on b; a has 0 left after the first.
        let q = [
            job("x", 1, 3, Device::Cuda),
            job("y", 1, 2, Device::Cuda),
            job("z", 1, 2, Device::Cuda),
        ];
        let out = place(&q, &nodes, &running);
        assert_eq!(nodes_of(&out[0].1), ["a/cuda:0", "a/cuda:2", "a/cuda:3"]);
        assert_eq!(nodes_of(&out[1].1), ["b/cuda:0", "b/cuda:1"]);
        assert!(matches!(out[2].1, Decision::Wait(_)));
        // A CPU job is not blocked by a waiting CUDA job.
        let q = [job("z", 1, 2, Device::Cuda), job("c", 1, 1, Device::Cpu)];
        let mut full = running.clone();
        full.add(&nodes_of_place(&out[0].1));
        full.add(&nodes_of_place(&out[1].1));
        let out = place(&q, &nodes, &full);
        assert!(matches!(out[0].1, Decision::Wait(_)));
        assert!(matches!(out[1].1, Decision::Place(_)));
    }

    fn nodes_of_place(d: &Decision) -> Vec<RankPlacement> {
        match d {
            Decision::Place(p) => p.clone(),
            other => panic!("not placed: {other:?}"),
        }
    }

    #[test]
    fn a_cuda_job_never_lands_on_a_node_with_too_few_gpus() {
        let nodes = [node("vm", 1, 1)];
        let out = place(&[job("j", 1, 2, Device::Cuda)], &nodes, &Load::default());
        assert!(matches!(&out[0].1, Decision::Unfit(_)), "{:?}", out[0].1);
    }

    #[test]
    fn selectors_roles_max_jobs_and_cool_down() {
        let mut gpu = node("gpu", 0, 1);
        gpu.labels.insert("zone".into(), "x".into());
        let mut teacher = node("t", 0, 1);
        teacher.role = "teacher".into();
        let nodes = [node("a", 0, 2), gpu, teacher];
        let mut d = job("j", 1, 1, Device::Cpu);
        d.node_selector.insert("zone".into(), "x".into());
        assert_eq!(
            nodes_of(&place(&[d.clone()], &nodes, &Load::default())[0].1),
            ["gpu/cpu"]
        );
        // A teacher node never runs ranks: 2 nodes means a and gpu.
        let d2 = job("k", 2, 1, Device::Cpu);
        assert_eq!(
            nodes_of(&place(&[d2], &nodes, &Load::default())[0].1),
            ["a/cpu", "gpu/cpu"]
        );
        // Cool-down: a is avoided while gpu is free, used when it is not.
        let mut d3 = job("m", 1, 1, Device::Cpu);
        d3.cooling.insert("a".into());
        assert_eq!(
            nodes_of(&place(&[d3.clone()], &nodes, &Load::default())[0].1),
            ["gpu/cpu"]
        );
        let mut busy = Load::default();
        busy.jobs.insert("gpu".into(), 1);
        assert_eq!(nodes_of(&place(&[d3], &nodes, &busy)[0].1), ["a/cpu"]);
        // max_jobs: a takes two jobs, the third waits.
        let q = [
            job("1", 1, 1, Device::Cpu),
            job("2", 1, 1, Device::Cpu),
            job("3", 1, 1, Device::Cpu),
            job("4", 1, 1, Device::Cpu),
        ];
        let out = place(&q, &nodes, &Load::default());
        let placed: Vec<_> = out[..3]
            .iter()
            .map(|(_, d)| nodes_of(d)[0].clone())
            .collect();
        assert_eq!(placed, ["a/cpu", "gpu/cpu", "a/cpu"]);
        assert!(matches!(out[3].1, Decision::Wait(_)));
    }

    #[test]
    fn an_elastic_job_starts_on_fewer_nodes_down_to_min_nodes() {
        let nodes = [node("a", 0, 1), node("b", 0, 1)];
        let mut d = job("j", 3, 1, Device::Cpu);
        d.min_nodes = 2;
        assert_eq!(
            nodes_of(&place(&[d.clone()], &nodes, &Load::default())[0].1),
            ["a/cpu", "b/cpu"]
        );
        d.min_nodes = 3;
        assert!(matches!(
            place(&[d], &nodes, &Load::default())[0].1,
            Decision::Unfit(_)
        ));
    }
}
