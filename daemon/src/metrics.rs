//! Prometheus metrics of the daemon and of the jobs it runs (`GET /metrics`).
//! docs/metrics.md lists every series, its labels, and what to alert on.
//!
//! Per-job series are labelled `job_id` and `name` (not `job`: Prometheus keeps that label
//! for the scrape job and renames ours). They come from the node that runs the job's rank 0,
//! except the per-rank series, which come from each rank's node. When a job ends here, its
//! series stay for `metrics_retention_s`, so that a short job's final numbers still reach
//! the scraper, then go.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The parts a rank's step time is split into (`ferry_rank_step_seconds{part}`).
pub const STEP_PARTS: [&str; 5] = ["data", "compute", "teacher", "sync", "optimizer"];

/// Every metric ferryd exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    /// Request latency by method and route; the events long-poll is left out (it waits by
    /// design, and would drown every other route's quantiles).
    pub http_duration: HistogramVec,
    /// Jobs by phase and the cluster's nodes and GPUs (set from the store, the same on
    /// every node: aggregate with `max`).
    pub jobs: IntGaugeVec,
    pub nodes: IntGaugeVec,
    pub gpus: IntGauge,
    /// 1, labelled with what the job is: `{strategy, arch, device, ranks, precision}`.
    pub job_info: IntGaugeVec,
    pub job_step: GaugeVec,
    pub job_total_steps: GaugeVec,
    pub job_epoch: GaugeVec,
    pub job_learning_rate: GaugeVec,
    pub job_generation: GaugeVec,
    pub job_loss: GaugeVec,
    pub job_val_accuracy: GaugeVec,
    pub job_samples_per_second: GaugeVec,
    /// Rank processes that ended, by outcome (`succeeded`, `failed`, `cancelled`).
    pub rank_exits: IntCounterVec,
    /// Steps and samples trained (`rate()` gives steps/s and samples/s; steps a restart
    /// repeats count again: they were trained again).
    pub job_steps: IntCounterVec,
    pub job_samples: IntCounterVec,
    /// Jobs that ended, by phase (counted by the node that coordinated their end).
    pub jobs_finished: IntCounterVec,
    /// From submission to end, by phase, and from submission to the first start.
    pub job_duration: HistogramVec,
    pub job_queue: Histogram,
    /// Mean seconds per step of each rank over its last report window, by part.
    pub rank_step_seconds: GaugeVec,
    /// Bytes each rank sent in gradient all-reduces, and seconds its training loop waited
    /// for them.
    pub allreduce_bytes: IntCounterVec,
    pub allreduce_seconds: prometheus::CounterVec,
    /// Bytes per second each rank received from the rank before it in the ring, measured
    /// once when the ring formed (links between hosts only).
    pub ring_link_bandwidth: GaugeVec,
    /// Distillation: soft-label cache hit rate of rank 0.
    pub distill_cache_hit_ratio: GaugeVec,
    /// Distillation: steps rank 0 trained on hard labels because no teacher answered.
    pub distill_fallback_steps: GaugeVec,
    /// Distillation: share of rank 0's training time spent waiting for soft labels.
    pub distill_teacher_wait_ratio: GaugeVec,
    /// Distillation: from a soft-label request to its answer, as rank 0 saw it.
    pub distill_request_seconds: Histogram,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_bytes: prometheus::IntCounter,
    /// Generations of a running job that ended before it did and were replaced (a node
    /// lost, a rank failed, the job grew back), counted when the new one trains.
    pub recoveries: IntCounterVec,
    /// How long recoveries took, by part, in order: `replace` (the old generation's end to
    /// the new one's placement), `rendezvous` (placement to the ring joined: the ranks start
    /// and meet), `first_step` (the ring joined to the first step: data, model and checkpoint
    /// load, the state broadcast and the step),
    /// and `total` (the old generation's end to the first step).
    pub recovery_seconds: HistogramVec,
    retention: Duration,
    /// Jobs whose series go at the given instant, and the rank labels each job's per-rank
    /// series were written with.
    retired: PerJob<Instant>,
    ranks: PerJob<BTreeSet<String>>,
    /// (rank, peer) pairs with a link bandwidth, per job.
    links: PerJob<BTreeSet<(String, String)>>,
    /// The label values of each job's info series.
    info: PerJob<Vec<String>>,
}

/// Something kept per job, by (job id, name).
type PerJob<T> = Arc<Mutex<HashMap<(String, String), T>>>;

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Duration::from_secs(300))
    }
}

/// Not `job`: Prometheus keeps that label for the scrape job (and renames ours).
const JOB: &[&str] = &["job_id", "name"];

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric")
}

/// Seconds to days, for job durations and queue times.
const LONG: &[f64] = &[
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

impl Metrics {
    /// Creates and registers the metrics; a finished job's series stay for `retention`.
    pub fn new(retention: Duration) -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            http_requests: counter(
                "ferry_http_requests_total",
                "REST API requests by method, route and status",
                &["method", "route", "status"],
            ),
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ferry_http_request_duration_seconds",
                    "REST API request latency by method and route (the events long-poll is left out)",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
                &["method", "route"],
            )
            .expect("valid metric"),
            jobs: IntGaugeVec::new(
                Opts::new("ferry_jobs", "Jobs in the cluster by phase"),
                &["phase"],
            )
            .expect("valid metric"),
            nodes: IntGaugeVec::new(
                Opts::new("ferry_nodes", "Live nodes in the cluster by role"),
                &["role"],
            )
            .expect("valid metric"),
            gpus: IntGauge::new("ferry_gpus", "GPUs on the cluster's live nodes")
                .expect("valid metric"),
            job_info: IntGaugeVec::new(
                Opts::new(
                    "ferry_job_info",
                    "Always 1: what a running job is (strategy, architecture, device, ranks, precision)",
                ),
                &[
                    "job_id",
                    "name",
                    "strategy",
                    "arch",
                    "device",
                    "ranks",
                    "precision",
                ],
            )
            .expect("valid metric"),
            job_step: gauge(
                "ferry_job_step",
                "Optimizer steps a job has taken (its position, kept across restarts)",
                JOB,
            ),
            job_total_steps: gauge(
                "ferry_job_total_steps",
                "Optimizer steps a job takes in all",
                JOB,
            ),
            job_epoch: gauge("ferry_job_epoch", "Epoch a job is in (1-based)", JOB),
            job_learning_rate: gauge(
                "ferry_job_learning_rate",
                "Learning rate of a job's last step",
                JOB,
            ),
            job_generation: gauge(
                "ferry_job_generation",
                "A job's generation: how many times its ranks were placed",
                JOB,
            ),
            job_loss: gauge(
                "ferry_job_train_loss",
                "Mean training loss of a job's last report window",
                JOB,
            ),
            job_val_accuracy: gauge(
                "ferry_job_val_accuracy",
                "Last validation accuracy of a job",
                JOB,
            ),
            job_samples_per_second: gauge(
                "ferry_job_samples_per_second",
                "Training throughput of a job's last report window",
                JOB,
            ),
            job_steps: counter(
                "ferry_job_steps_total",
                "Optimizer steps a job has trained",
                JOB,
            ),
            job_samples: counter(
                "ferry_job_samples_total",
                "Training samples a job has trained on",
                JOB,
            ),
            jobs_finished: counter(
                "ferry_jobs_finished_total",
                "Jobs that ended, by phase",
                &["phase"],
            ),
            job_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ferry_job_duration_seconds",
                    "From a job's submission to its end, by phase",
                )
                .buckets(LONG.to_vec()),
                &["phase"],
            )
            .expect("valid metric"),
            job_queue: histogram(
                "ferry_job_queue_seconds",
                "From a job's submission to its first start",
                LONG,
            ),
            rank_step_seconds: gauge(
                "ferry_rank_step_seconds",
                "Mean seconds per step of a rank over its last report window, by part (data, compute, teacher, sync, optimizer)",
                &["job_id", "name", "rank", "part"],
            ),
            allreduce_bytes: counter(
                "ferry_allreduce_bytes_total",
                "Gradient bytes a rank all-reduced",
                &["job_id", "name", "rank"],
            ),
            allreduce_seconds: prometheus::CounterVec::new(
                Opts::new(
                    "ferry_allreduce_seconds_total",
                    "Seconds a rank's training loop waited for gradient all-reduces",
                ),
                &["job_id", "name", "rank"],
            )
            .expect("valid metric"),
            ring_link_bandwidth: gauge(
                "ferry_ring_link_bytes_per_second",
                "Bytes per second a rank received from its ring neighbour on another host (peer), measured when the ring formed with traffic in both directions",
                &["job_id", "name", "rank", "peer"],
            ),
            distill_cache_hit_ratio: gauge(
                "ferry_distill_cache_hit_ratio",
                "Soft-label cache hits over lookups (rank 0 of a distillation job)",
                JOB,
            ),
            distill_fallback_steps: gauge(
                "ferry_distill_fallback_steps",
                "Steps trained on hard labels because no teacher answered (rank 0)",
                JOB,
            ),
            distill_teacher_wait_ratio: gauge(
                "ferry_distill_teacher_wait_ratio",
                "Share of training time spent waiting for soft labels (rank 0)",
                JOB,
            ),
            distill_request_seconds: histogram(
                "ferry_distill_teacher_request_seconds",
                "From a soft-label request to its answer (rank 0 of distillation jobs)",
                &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            ),
            checkpoint_seconds: histogram(
                "ferry_checkpoint_seconds",
                "Time to write a checkpoint",
                &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0],
            ),
            checkpoint_bytes: prometheus::IntCounter::new(
                "ferry_checkpoint_bytes_total",
                "Bytes of checkpoints written",
            )
            .expect("valid metric"),
            rank_exits: counter(
                "ferry_rank_exits_total",
                "Rank processes that ended, by outcome",
                &["outcome"],
            ),
            recoveries: counter(
                "ferry_recoveries_total",
                "Generations of a running job replaced by a new one (node lost, rank failed, grow), counted when the new one trains",
                JOB,
            ),
            recovery_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "ferry_recovery_seconds",
                    "How long a recovery took, by part (replace, rendezvous, first_step, total)",
                )
                .buckets(vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]),
                &["part"],
            )
            .expect("valid metric"),
            registry,
            retention,
            retired: Default::default(),
            ranks: Default::default(),
            links: Default::default(),
            info: Default::default(),
        };
        let build = IntGaugeVec::new(
            Opts::new("ferry_build_info", "Always 1: this ferryd's version"),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.http_requests.clone()),
            Box::new(m.http_duration.clone()),
            Box::new(m.jobs.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.gpus.clone()),
            Box::new(m.job_info.clone()),
            Box::new(m.job_step.clone()),
            Box::new(m.job_total_steps.clone()),
            Box::new(m.job_epoch.clone()),
            Box::new(m.job_learning_rate.clone()),
            Box::new(m.job_generation.clone()),
            Box::new(m.job_loss.clone()),
            Box::new(m.job_val_accuracy.clone()),
            Box::new(m.job_samples_per_second.clone()),
            Box::new(m.rank_exits.clone()),
            Box::new(m.job_steps.clone()),
            Box::new(m.job_samples.clone()),
            Box::new(m.jobs_finished.clone()),
            Box::new(m.job_duration.clone()),
            Box::new(m.job_queue.clone()),
            Box::new(m.rank_step_seconds.clone()),
            Box::new(m.allreduce_bytes.clone()),
            Box::new(m.allreduce_seconds.clone()),
            Box::new(m.ring_link_bandwidth.clone()),
            Box::new(m.distill_cache_hit_ratio.clone()),
            Box::new(m.distill_fallback_steps.clone()),
            Box::new(m.distill_teacher_wait_ratio.clone()),
            Box::new(m.distill_request_seconds.clone()),
            Box::new(m.checkpoint_seconds.clone()),
            Box::new(m.checkpoint_bytes.clone()),
            Box::new(m.recoveries.clone()),
            Box::new(m.recovery_seconds.clone()),
            Box::new(build),
            // process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric registered once");
        }
        // Every known label value starts at zero, so that `rate()` and `increase()` see the
        // first event, and a query for one that has not happened yet returns 0, not nothing.
        for phase in ["Succeeded", "Failed", "Cancelled"] {
            m.jobs_finished.with_label_values(&[phase]);
            m.job_duration.with_label_values(&[phase]);
        }
        for outcome in ["succeeded", "failed", "cancelled"] {
            m.rank_exits.with_label_values(&[outcome]);
        }
        for part in ["replace", "rendezvous", "first_step", "total"] {
            m.recovery_seconds.with_label_values(&[part]);
        }
        m
    }

    /// Sets the jobs-by-phase gauge from a listing of every job.
    pub fn set_job_phases(&self, jobs: &[ferry_cluster::api::Job]) {
        use ferry_cluster::api::JobPhase;
        for phase in [
            JobPhase::Pending,
            JobPhase::Running,
            JobPhase::Succeeded,
            JobPhase::Failed,
            JobPhase::Cancelled,
        ] {
            let n = jobs.iter().filter(|j| j.phase == phase).count();
            self.jobs.with_label_values(&[phase.as_str()]).set(n as i64);
        }
    }

    /// Counts a job that ended (by the node that wrote its end): its phase, and how long
    /// it took from submission.
    pub fn job_ended(&self, job: &ferry_cluster::api::Job) {
        let phase = job.phase.as_str();
        self.jobs_finished.with_label_values(&[phase]).inc();
        let took = job
            .status
            .finished_at
            .as_deref()
            .and_then(|end| ferry_cluster::time::seconds_between(&job.created_at, end));
        if let Some(took) = took {
            self.job_duration.with_label_values(&[phase]).observe(took);
        }
    }

    /// Sets the nodes-by-role and GPU gauges from a listing of the live nodes.
    pub fn set_nodes(&self, nodes: &[ferry_cluster::api::Node]) {
        self.nodes.reset();
        for role in ["worker", "teacher"] {
            self.nodes.with_label_values(&[role]).set(0);
        }
        for n in nodes {
            self.nodes.with_label_values(&[&n.role]).inc();
        }
        self.gpus
            .set(nodes.iter().map(|n| i64::from(n.cuda_devices)).sum());
    }

    /// Sets a job's info series: `what` is (strategy, arch, device, ranks, precision).
    pub fn set_job_info(&self, id: &str, name: &str, what: [&str; 5]) {
        let mut values = vec![id.to_string(), name.to_string()];
        values.extend(what.iter().map(|s| s.to_string()));
        let key = (id.to_string(), name.to_string());
        let mut info = self.info.lock().expect("metrics");
        if let Some(old) = info.insert(key, values.clone()) {
            let old: Vec<&str> = old.iter().map(String::as_str).collect();
            let _ = self.job_info.remove_label_values(&old);
        }
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        self.job_info.with_label_values(&values).set(1);
    }

    /// A job's series are written again (a new generation here): they stay.
    pub fn touch_job(&self, id: &str, name: &str) {
        let key = (id.to_string(), name.to_string());
        self.retired.lock().expect("metrics").remove(&key);
    }

    /// The job ended here (or moved on): its series go after the retention time.
    pub fn retire_job(&self, id: &str, name: &str) {
        let key = (id.to_string(), name.to_string());
        self.retired
            .lock()
            .expect("metrics")
            .insert(key, Instant::now() + self.retention);
    }

    /// Drops the per-job series of a job at once.
    pub fn forget_job(&self, id: &str, name: &str) {
        let labels = [id, name];
        for c in [&self.job_steps, &self.job_samples, &self.recoveries] {
            let _ = c.remove_label_values(&labels);
        }
        for g in [
            &self.job_step,
            &self.job_total_steps,
            &self.job_epoch,
            &self.job_learning_rate,
            &self.job_generation,
            &self.job_loss,
            &self.job_val_accuracy,
            &self.job_samples_per_second,
            &self.distill_cache_hit_ratio,
            &self.distill_fallback_steps,
            &self.distill_teacher_wait_ratio,
        ] {
            let _ = g.remove_label_values(&labels);
        }
        let key = (id.to_string(), name.to_string());
        if let Some(info) = self.info.lock().expect("metrics").remove(&key) {
            let values: Vec<&str> = info.iter().map(String::as_str).collect();
            let _ = self.job_info.remove_label_values(&values);
        }
        let ranks = self.ranks.lock().expect("metrics").remove(&key);
        for rank in ranks.unwrap_or_default() {
            let _ = self.allreduce_bytes.remove_label_values(&[id, name, &rank]);
            let _ = self
                .allreduce_seconds
                .remove_label_values(&[id, name, &rank]);
            for part in STEP_PARTS {
                let _ = self
                    .rank_step_seconds
                    .remove_label_values(&[id, name, &rank, part]);
            }
        }
        let links = self.links.lock().expect("metrics").remove(&key);
        for (rank, peer) in links.unwrap_or_default() {
            let _ = self
                .ring_link_bandwidth
                .remove_label_values(&[id, name, &rank, &peer]);
        }
    }

    /// Sets the bandwidth a rank measured from its ring neighbour `peer`.
    pub fn record_link(&self, id: &str, name: &str, rank: u32, peer: u32, bytes_per_second: f64) {
        let (rank, peer) = (rank.to_string(), peer.to_string());
        self.ring_link_bandwidth
            .with_label_values(&[id, name, &rank, &peer])
            .set(bytes_per_second);
        self.links
            .lock()
            .expect("metrics")
            .entry((id.to_string(), name.to_string()))
            .or_default()
            .insert((rank, peer));
    }

    /// Sets a distillation job's gauges from rank 0's progress.
    pub fn record_distill(&self, labels: &[&str], d: &crate::protocol::DistillProgress) {
        self.distill_cache_hit_ratio
            .with_label_values(labels)
            .set(d.cache_hit_rate);
        self.distill_fallback_steps
            .with_label_values(labels)
            .set(d.fallback_steps as f64);
        self.distill_teacher_wait_ratio
            .with_label_values(labels)
            .set(d.teacher_wait_fraction);
        for &s in &d.request_seconds {
            self.distill_request_seconds.observe(f64::from(s));
        }
    }

    /// Sets a rank's step-time split and all-reduce counters from its timing report.
    pub fn record_timing(&self, id: &str, name: &str, t: &crate::protocol::StepTiming) {
        let rank = t.rank.to_string();
        self.ranks
            .lock()
            .expect("metrics")
            .entry((id.to_string(), name.to_string()))
            .or_default()
            .insert(rank.clone());
        if t.timed_steps > 0 {
            let n = f64::from(t.timed_steps);
            for (part, secs) in STEP_PARTS.iter().zip(t.parts()) {
                self.rank_step_seconds
                    .with_label_values(&[id, name, &rank, part])
                    .set(secs / n);
            }
        }
        self.allreduce_bytes
            .with_label_values(&[id, name, &rank])
            .inc_by(t.allreduce_bytes);
        self.allreduce_seconds
            .with_label_values(&[id, name, &rank])
            .inc_by(t.sync_total_s.max(0.0));
    }

    /// The text exposition format (first dropping the series of jobs retired long enough).
    pub fn render(&self) -> String {
        let now = Instant::now();
        let due: Vec<(String, String)> = {
            let mut retired = self.retired.lock().expect("metrics");
            let due = retired
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>();
            for k in &due {
                retired.remove(k);
            }
            due
        };
        for (id, name) in due {
            self.forget_job(&id, &name);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_job_series_are_labelled_job_id_and_stay_for_the_retention_time() {
        let m = Metrics::new(Duration::from_millis(200));
        m.job_step.with_label_values(&["j1", "digits"]).set(7.0);
        m.set_job_info("j1", "digits", ["finetune", "mlp", "cpu", "2", "fp32"]);
        m.record_timing(
            "j1",
            "digits",
            &crate::protocol::StepTiming {
                rank: 1,
                timed_steps: 2,
                compute_s: 0.5,
                sync_s: 0.1,
                sync_total_s: 0.1,
                allreduce_bytes: 4096,
                ..Default::default()
            },
        );
        let text = m.render();
        assert!(
            text.contains(r#"ferry_job_step{job_id="j1",name="digits"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ferry_rank_step_seconds{job_id="j1",name="digits",part="compute",rank="1"} 0.25"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ferry_allreduce_bytes_total{job_id="j1",name="digits",rank="1"} 4096"#
            ),
            "{text}"
        );
        assert!(text.contains(&format!(
            r#"ferry_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        // Retired: still there until the retention time has passed, then gone.
        m.retire_job("j1", "digits");
        assert!(m.render().contains("ferry_job_step{"));
        std::thread::sleep(Duration::from_millis(250));
        let text = m.render();
        for series in [
            "ferry_job_step{",
            "ferry_job_info{",
            "ferry_rank_step_seconds{",
            "ferry_allreduce_bytes_total{",
        ] {
            assert!(!text.contains(series), "{series} stayed:\n{text}");
        }
    }

    #[test]
    fn a_job_written_again_is_not_retired() {
        let m = Metrics::new(Duration::ZERO);
        m.job_step.with_label_values(&["j1", "digits"]).set(7.0);
        m.retire_job("j1", "digits");
        m.touch_job("j1", "digits");
        assert!(m.render().contains("ferry_job_step{"));
    }
}
