//! Prometheus metrics, served at `/metrics`.

use std::time::Instant;

use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Labels of per-queue metrics.
const QUEUE_LABELS: [&str; 2] = ["namespace", "taskqueue"];

/// The operator's metrics, in one registry.
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    queue_ready: IntGaugeVec,
    queue_unacked: IntGaugeVec,
    queue_latency: GaugeVec,
    queue_scheduled: IntGaugeVec,
    broker_safe: IntGaugeVec,
    probe_duration: HistogramVec,
    probe_errors: IntCounterVec,
    broker_incidents: IntCounterVec,
    pool_desired: IntGaugeVec,
    pool_current: IntGaugeVec,
    pool_backlog: IntGaugeVec,
    pool_in_flight: IntGaugeVec,
    decision_latency: prometheus::Histogram,
    scale_events: IntCounterVec,
    leader: prometheus::IntGauge,
    events_dropped: IntCounterVec,
    events_retrying: prometheus::IntGauge,
    pool_condition: IntGaugeVec,
    /// The label sets of `pool_condition` each pool exports now, to remove them when they change.
    pool_condition_labels: std::sync::Mutex<std::collections::HashMap<[String; 2], Vec<[String; 5]>>>,
    api_unavailable: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Labels of per-pool metrics.
const POOL_LABELS: [&str; 2] = ["namespace", "workerpool"];

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
        let gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &QUEUE_LABELS).expect("valid metric");
        let queue_ready = gauge("celery_operator_queue_ready", "Messages waiting in the queue, all priorities");
        let queue_unacked = gauge("celery_operator_queue_unacked", "Messages delivered but not acknowledged");
        let queue_latency = GaugeVec::new(
            Opts::new(
                "celery_operator_queue_latency_seconds",
                "How long the oldest waiting due task has waited (0 when none waits), to within one probe",
            ),
            &QUEUE_LABELS,
        )
        .expect("valid metric");
        let queue_scheduled = gauge(
            "celery_operator_queue_scheduled",
            "Tasks scheduled for later (ETA in the future) on the queue, held by workers or delayed",
        );
        let broker_safe =
            gauge("celery_operator_broker_safe", "1 when the broker cannot silently drop the queue's tasks");
        let probe_duration = HistogramVec::new(
            HistogramOpts::new("celery_operator_probe_duration_seconds", "Broker probe duration")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &QUEUE_LABELS,
        )
        .expect("valid metric");
        let probe_errors = IntCounterVec::new(
            Opts::new("celery_operator_probe_errors_total", "Failed broker probes, by error"),
            &["namespace", "taskqueue", "error"],
        )
        .expect("valid metric");
        let broker_incidents = IntCounterVec::new(
            Opts::new(
                "celery_operator_broker_incidents_total",
                "Broker incidents (keys evicted, eviction policy fixed) seen by a poll of the queue's broker, by reason",
            ),
            &["namespace", "taskqueue", "reason"],
        )
        .expect("valid metric");
        let pool_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &POOL_LABELS).expect("valid metric");
        let pool_desired = pool_gauge("celery_operator_pool_desired_replicas", "Worker replicas the autoscaler wants");
        let pool_current =
            pool_gauge("celery_operator_pool_current_replicas", "Worker replicas of the Deployment (spec.replicas)");
        let pool_backlog = pool_gauge("celery_operator_pool_backlog", "Messages waiting in the pool's queues");
        let pool_in_flight =
            pool_gauge("celery_operator_pool_in_flight", "Tasks being worked on by the pool (unacked + active)");
        let decision_latency = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "celery_operator_autoscaler_decision_seconds",
                "From the start of a broker poll to its decisions applied (replicas patched when they changed)",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )
        .expect("valid metric");
        let scale_events = IntCounterVec::new(
            Opts::new("celery_operator_autoscaler_scale_events_total", "Replica changes made by the autoscaler"),
            &["namespace", "workerpool", "direction"],
        )
        .expect("valid metric");
        let leader = prometheus::IntGauge::new(
            "celery_operator_leader",
            "1 while this replica reconciles (holds the Lease, or runs without leader election), else 0",
        )
        .expect("valid metric");
        let events_dropped = IntCounterVec::new(
            Opts::new(
                "celery_operator_events_dropped_total",
                "Kubernetes Events that could not be published after their retries, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let events_retrying = prometheus::IntGauge::new(
            "celery_operator_events_retrying",
            "Kubernetes Events that failed to publish and wait for a retry in the background",
        )
        .expect("valid metric");
        let pool_condition = IntGaugeVec::new(
            Opts::new(
                "celery_operator_pool_condition",
                "1 for each of the autoscaler's conditions a WorkerPool has now (ScalingActive, ScalingLimited), \
                 with its status and reason",
            ),
            &["namespace", "workerpool", "type", "status", "reason"],
        )
        .expect("valid metric");
        let collectors: [Box<dyn prometheus::core::Collector>; 21] = [
            Box::new(events_retrying.clone()),
            Box::new(queue_latency.clone()),
            Box::new(queue_scheduled.clone()),
            Box::new(pool_condition.clone()),
            Box::new(events_dropped.clone()),
            Box::new(leader.clone()),
            Box::new(pool_desired.clone()),
            Box::new(pool_current.clone()),
            Box::new(pool_backlog.clone()),
            Box::new(pool_in_flight.clone()),
            Box::new(decision_latency.clone()),
            Box::new(scale_events.clone()),
            Box::new(reconciles.clone()),
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(queue_ready.clone()),
            Box::new(queue_unacked.clone()),
            Box::new(broker_safe.clone()),
            Box::new(probe_duration.clone()),
            Box::new(probe_errors.clone()),
            Box::new(broker_incidents.clone()),
        ];
        for m in collectors {
            registry.register(m).expect("metric registered once");
        }
        let api_unavailable = IntGaugeVec::new(
            Opts::new(
                "celery_operator_optional_api_unavailable",
                "1 while an optional API (HPAs, KEDA ScaledObjects) cannot be watched (not served or forbidden): \
                 the autoscaler then runs without conflict detection for it",
            ),
            &["resource"],
        )
        .expect("valid metric");
        registry.register(Box::new(api_unavailable.clone())).expect("metric registered once");
        Self {
            registry,
            reconciles,
            failures,
            duration,
            queue_ready,
            queue_unacked,
            queue_latency,
            queue_scheduled,
            broker_safe,
            probe_duration,
            probe_errors,
            broker_incidents,
            pool_desired,
            pool_current,
            pool_backlog,
            pool_in_flight,
            decision_latency,
            scale_events,
            leader,
            events_dropped,
            events_retrying,
            pool_condition,
            pool_condition_labels: Default::default(),
            api_unavailable,
        }
    }

    /// Exports the autoscaler's conditions of a pool (type, status, reason), replacing the ones it
    /// exported before, so `celery_operator_pool_condition{reason="ScalerConflict"}` exists exactly
    /// while the condition holds.
    pub fn pool_conditions(
        &self,
        pool: &[&str; 2],
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) {
        let key = pool.map(str::to_string);
        let now: Vec<[String; 5]> = conditions
            .iter()
            .map(|c| [key[0].clone(), key[1].clone(), c.type_.clone(), c.status.clone(), c.reason.clone()])
            .collect();
        let mut exported = self.pool_condition_labels.lock().expect("metrics lock");
        for gone in exported.get(&key).into_iter().flatten().filter(|l| !now.contains(l)) {
            let _ = self.pool_condition.remove_label_values(&gone.each_ref().map(String::as_str));
        }
        for labels in &now {
            self.pool_condition.with_label_values(&labels.each_ref().map(String::as_str)).set(1);
        }
        exported.insert(key, now);
    }

    /// Counts an Event given up on after its retries.
    pub fn event_dropped(&self, reason: &str) {
        self.events_dropped.with_label_values(&[reason]).inc();
    }

    /// An Event starts (`true`) or ends (`false`) waiting for a retry.
    pub fn event_retrying(&self, waiting: bool) {
        if waiting { self.events_retrying.inc() } else { self.events_retrying.dec() }
    }

    /// Records whether an optional API can be watched.
    pub fn optional_api_unavailable(&self, resource: &str, unavailable: bool) {
        self.api_unavailable.with_label_values(&[resource]).set(i64::from(unavailable));
    }

    /// Records whether this replica reconciles. One that stops drops its per-queue and per-pool
    /// gauges: their last values would otherwise be exported beside the new leader's for as long
    /// as it runs, doubling dashboard sums and keeping alerts on a state that has changed since.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if !leading {
            self.queue_latency.reset();
            for gauges in [
                &self.queue_ready,
                &self.queue_scheduled,
                &self.queue_unacked,
                &self.broker_safe,
                &self.pool_desired,
                &self.pool_current,
                &self.pool_backlog,
                &self.pool_in_flight,
                &self.pool_condition,
            ] {
                gauges.reset();
            }
            self.pool_condition_labels.lock().expect("metrics lock").clear();
        }
    }

    /// Records one autoscaling decision for a pool (`[namespace, workerpool]`).
    pub fn pool_decided(
        &self,
        pool: &[&str; 2],
        desired: u32,
        current: u32,
        backlog: Option<u64>,
        in_flight: Option<u64>,
    ) {
        self.pool_desired.with_label_values(pool).set(i64::from(desired));
        self.pool_current.with_label_values(pool).set(i64::from(current));
        if let Some(backlog) = backlog {
            self.pool_backlog.with_label_values(pool).set(backlog.try_into().unwrap_or(i64::MAX));
        }
        if let Some(in_flight) = in_flight {
            self.pool_in_flight.with_label_values(pool).set(in_flight.try_into().unwrap_or(i64::MAX));
        }
    }

    /// Counts a replica change made by the autoscaler.
    pub fn pool_scaled(&self, pool: &[&str; 2], up: bool) {
        let direction = if up { "up" } else { "down" };
        self.scale_events.with_label_values(&[pool[0], pool[1], direction]).inc();
    }

    /// Records how long one broker poll took from probe start to decisions applied.
    pub fn decision_latency(&self, took: Duration) {
        self.decision_latency.observe(took.as_secs_f64());
    }

    /// Drops a pool's gauges (the pool was deleted or stopped autoscaling).
    pub fn forget_pool(&self, pool: &[&str; 2]) {
        for gauge in [&self.pool_desired, &self.pool_current, &self.pool_backlog, &self.pool_in_flight] {
            let _ = gauge.remove_label_values(pool);
        }
        self.pool_conditions(pool, &[]);
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

    /// The probe duration series of a queue (`[namespace, taskqueue]`): the poller keeps it, so a
    /// poll records each queue's probe without looking the series up again.
    pub fn probe_duration(&self, queue: &[String; 2]) -> prometheus::Histogram {
        self.probe_duration.with_label_values(&[queue[0].as_str(), queue[1].as_str()])
    }

    /// Counts a failed broker probe for a queue (`[namespace, taskqueue]`), by its error label.
    pub fn probe_failed(&self, queue: &[String; 2], error: &str) {
        self.probe_errors.with_label_values(&[queue[0].as_str(), queue[1].as_str(), error]).inc();
    }

    /// Counts an incident (e.g. `KeysEvicted`) on the broker of a queue (`[namespace, taskqueue]`).
    pub fn broker_incident(&self, queue: &[String; 2], reason: &str) {
        self.broker_incidents.with_label_values(&[queue[0].as_str(), queue[1].as_str(), reason]).inc();
    }

    /// Records what a probe saw of a queue.
    pub fn queue_observed(&self, queue: &[String; 2], ready: i64, unacked: Option<i64>, unsafe_broker: bool) {
        let labels = [queue[0].as_str(), queue[1].as_str()];
        self.queue_ready.with_label_values(&labels).set(ready);
        if let Some(unacked) = unacked {
            self.queue_unacked.with_label_values(&labels).set(unacked);
        }
        self.broker_safe.with_label_values(&labels).set(i64::from(!unsafe_broker));
    }

    /// Records a queue's latency and scheduled tasks, where the broker can tell (a series the
    /// broker cannot tell about is not exported rather than exported as 0).
    pub fn queue_demand(&self, queue: &[String; 2], latency: Option<Duration>, scheduled: Option<i64>) {
        let labels = [queue[0].as_str(), queue[1].as_str()];
        match latency {
            Some(l) => self.queue_latency.with_label_values(&labels).set(l.as_secs_f64()),
            None => {
                let _ = self.queue_latency.remove_label_values(&labels);
            }
        }
        match scheduled {
            Some(n) => self.queue_scheduled.with_label_values(&labels).set(n),
            None => {
                let _ = self.queue_scheduled.remove_label_values(&labels);
            }
        }
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

    #[test]
    fn a_replica_that_stops_leading_exports_no_queue_or_pool_gauges() {
        let m = Metrics::new();
        assert!(m.encode().contains("celery_operator_leader 0"), "a replica starts as a standby");
        m.set_leader(true);
        m.queue_observed(&["prod".into(), "emails".into()], 7, Some(1), false);
        m.queue_demand(&["prod".into(), "emails".into()], Some(Duration::from_millis(2500)), Some(3));
        m.pool_decided(&["prod", "mail"], 3, 2, Some(7), Some(1));
        m.pool_scaled(&["prod", "mail"], true);
        let text = m.encode();
        assert!(text.contains("celery_operator_leader 1"), "{text}");
        assert!(text.contains("celery_operator_queue_ready{namespace=\"prod\",taskqueue=\"emails\"} 7"), "{text}");
        assert!(
            text.contains("celery_operator_queue_latency_seconds{namespace=\"prod\",taskqueue=\"emails\"} 2.5"),
            "{text}"
        );
        assert!(text.contains("celery_operator_queue_scheduled{namespace=\"prod\",taskqueue=\"emails\"} 3"), "{text}");

        m.set_leader(false);
        let text = m.encode();
        assert!(text.contains("celery_operator_leader 0"), "{text}");
        for gauge in [
            "queue_ready",
            "queue_unacked",
            "queue_latency_seconds",
            "queue_scheduled",
            "broker_safe",
            "pool_desired_replicas",
            "pool_current_replicas",
            "pool_backlog",
            "pool_in_flight",
        ] {
            assert!(!text.contains(&format!("celery_operator_{gauge}{{")), "{gauge} still exported:\n{text}");
        }
        // Counters count what happened, whoever leads now.
        assert!(text.contains("celery_operator_autoscaler_scale_events_total{"), "{text}");
    }

    #[test]
    fn a_pool_exports_exactly_its_current_autoscaler_conditions() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let condition = |type_: &str, status: &str, reason: &str| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ),
            observed_generation: None,
        };
        let m = Metrics::new();
        let pool = ["prod", "mail"];
        m.pool_conditions(&pool, &[condition("ScalingActive", "False", "ScalerConflict")]);
        let conflict = r#"celery_operator_pool_condition{namespace="prod",reason="ScalerConflict",status="False",type="ScalingActive",workerpool="mail"} 1"#;
        assert!(m.encode().contains(conflict), "{}", m.encode());
        m.pool_conditions(
            &pool,
            &[
                condition("ScalingActive", "True", "ScalingFromQueueDepth"),
                condition("ScalingLimited", "True", "TooManyReplicas"),
            ],
        );
        let text = m.encode();
        assert!(!text.contains("ScalerConflict"), "a condition that ended is no longer exported: {text}");
        assert!(text.contains(r#"reason="TooManyReplicas",status="True",type="ScalingLimited""#), "{text}");
        m.forget_pool(&pool);
        assert!(!m.encode().contains("celery_operator_pool_condition{"), "a forgotten pool exports none");
    }
}
