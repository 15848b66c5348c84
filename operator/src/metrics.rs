//! Prometheus metrics, served at `/metrics`.

use std::time::Instant;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

/// The operator's metrics, in one registry.
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles =
            IntCounterVec::new(Opts::new("celery_operator_reconcile_total", "Reconciles started, by kind"), &["kind"])
                .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new("celery_operator_reconcile_errors_total", "Reconciles that failed, by kind and error"),
            &["kind", "error"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("celery_operator_reconcile_duration_seconds", "Reconcile duration, by kind")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            &["kind"],
        )
        .expect("valid metric");
        for m in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Self { registry, reconciles, failures, duration }
    }

    /// Counts a reconcile of `kind` and times it until the returned guard drops.
    pub fn reconcile_timer(&self, kind: &str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[kind]).inc();
        ReconcileTimer { histogram: self.duration.with_label_values(&[kind]), start: Instant::now() }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failure(&self, kind: &str, error: &str) {
        self.failures.with_label_values(&[kind, error]).inc();
    }

    /// The registry, for other components' metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    histogram: prometheus::Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_failures_are_counted_by_kind() {
        let m = Metrics::new();
        drop(m.reconcile_timer("WorkerPool"));
        m.reconcile_failure("WorkerPool", "api");
        let text = m.encode();
        assert!(text.contains("celery_operator_reconcile_total{kind=\"WorkerPool\"} 1"), "{text}");
        assert!(text.contains("celery_operator_reconcile_errors_total{error=\"api\",kind=\"WorkerPool\"} 1"), "{text}");
        assert!(text.contains("celery_operator_reconcile_duration_seconds_count{kind=\"WorkerPool\"} 1"), "{text}");
    }
}
