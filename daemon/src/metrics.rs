//! Prometheus metrics of the daemon and of the jobs it runs (`GET /metrics`).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric ferryd exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Jobs known to this daemon by phase (set at scrape time from the store).
    pub jobs: IntGaugeVec,
    pub job_step: GaugeVec,
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
    /// Distillation: soft-label cache hit rate of rank 0.
    pub distill_cache_hit_ratio: GaugeVec,
    /// Distillation: steps rank 0 trained on hard labels because no teacher answered.
    pub distill_fallback_steps: GaugeVec,
    /// Distillation: share of rank 0's training time spent waiting for soft labels.
    pub distill_teacher_wait_ratio: GaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Not `job`: Prometheus keeps that label for the scrape job (and renames ours).
        let job = &["job_id", "name"];
        let m = Metrics {
            http_requests: IntCounterVec::new(
                Opts::new(
                    "ferry_http_requests_total",
                    "REST API requests by route and status",
                ),
                &["method", "route", "status"],
            )
            .expect("valid metric"),
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ferry_http_request_duration_seconds",
                    "REST API request latency",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
                &["route"],
            )
            .expect("valid metric"),
            jobs: IntGaugeVec::new(Opts::new("ferry_jobs", "Jobs by phase"), &["phase"])
                .expect("valid metric"),
            job_step: GaugeVec::new(
                Opts::new("ferry_job_step", "Optimizer steps a running job has taken"),
                job,
            )
            .expect("valid metric"),
            job_loss: GaugeVec::new(
                Opts::new(
                    "ferry_job_train_loss",
                    "Last training loss of a running job",
                ),
                job,
            )
            .expect("valid metric"),
            job_val_accuracy: GaugeVec::new(
                Opts::new(
                    "ferry_job_val_accuracy",
                    "Last validation accuracy of a running job",
                ),
                job,
            )
            .expect("valid metric"),
            job_samples_per_second: GaugeVec::new(
                Opts::new(
                    "ferry_job_samples_per_second",
                    "Training throughput of a running job",
                ),
                job,
            )
            .expect("valid metric"),
            job_steps: IntCounterVec::new(
                Opts::new("ferry_job_steps_total", "Optimizer steps a job has trained"),
                job,
            )
            .expect("valid metric"),
            job_samples: IntCounterVec::new(
                Opts::new(
                    "ferry_job_samples_total",
                    "Training samples a job has trained on",
                ),
                job,
            )
            .expect("valid metric"),
            jobs_finished: IntCounterVec::new(
                Opts::new("ferry_jobs_finished_total", "Jobs that ended, by phase"),
                &["phase"],
            )
            .expect("valid metric"),
            rank_exits: IntCounterVec::new(
                Opts::new(
                    "ferry_rank_exits_total",
                    "Rank processes that ended, by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            distill_cache_hit_ratio: GaugeVec::new(
                Opts::new(
                    "ferry_distill_cache_hit_ratio",
                    "Soft-label cache hits over lookups (rank 0 of a distillation job)",
                ),
                job,
            )
            .expect("valid metric"),
            distill_fallback_steps: GaugeVec::new(
                Opts::new(
                    "ferry_distill_fallback_steps",
                    "Steps trained on hard labels because no teacher answered (rank 0)",
                ),
                job,
            )
            .expect("valid metric"),
            distill_teacher_wait_ratio: GaugeVec::new(
                Opts::new(
                    "ferry_distill_teacher_wait_ratio",
                    "Share of training time spent waiting for soft labels (rank 0)",
                ),
                job,
            )
            .expect("valid metric"),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new("ferry_build_info", "Always 1: this ferryd's version"),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [
            Box::new(m.http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.http_duration.clone()),
            Box::new(m.jobs.clone()),
            Box::new(m.job_step.clone()),
            Box::new(m.job_loss.clone()),
            Box::new(m.job_val_accuracy.clone()),
            Box::new(m.job_samples_per_second.clone()),
            Box::new(m.rank_exits.clone()),
            Box::new(m.job_steps.clone()),
            Box::new(m.job_samples.clone()),
            Box::new(m.jobs_finished.clone()),
            Box::new(m.distill_cache_hit_ratio.clone()),
            Box::new(m.distill_fallback_steps.clone()),
            Box::new(m.distill_teacher_wait_ratio.clone()),
            Box::new(build),
        ] {
            m.registry.register(c).expect("metric registered once");
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

    /// Drops the per-job series of a job that ended.
    pub fn forget_job(&self, id: &str, name: &str) {
        for c in [&self.job_steps, &self.job_samples] {
            let _ = c.remove_label_values(&[id, name]);
        }
        for g in [
            &self.job_step,
            &self.job_loss,
            &self.job_val_accuracy,
            &self.job_samples_per_second,
            &self.distill_cache_hit_ratio,
            &self.distill_fallback_steps,
            &self.distill_teacher_wait_ratio,
        ] {
            let _ = g.remove_label_values(&[id, name]);
        }
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
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_job_series_are_labelled_job_id_and_go_with_the_job() {
        let m = Metrics::new();
        m.job_step.with_label_values(&["j1", "digits"]).set(7.0);
        let text = m.render();
        assert!(
            text.contains(r#"ferry_job_step{job_id="j1",name="digits"} 7"#),
            "{text}"
        );
        assert!(text.contains(&format!(
            r#"ferry_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
        m.forget_job("j1", "digits");
        assert!(!m.render().contains("ferry_job_step{"));
    }
}
