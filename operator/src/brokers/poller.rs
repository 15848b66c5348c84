//! One endpoint's poller task: owns the [`Broker`] (its connection), the worker-event
//! subscription and the latency tracker; polls every queue of every consumer in one probe at the
//! shortest interval asked for, and publishes a [`Snapshot`] per poll.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use celery_broker::events::WorkerEvents;
use celery_broker::{Broker, BrokerConfig, LatencyTracker, Reason, Severity};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{Notify, watch};

use super::snapshot::{HeldIncident, Incidents, Snapshot};
use super::{QueueRef, Shared, TASK_QUEUE_INTERVAL, close};
use crate::broker_config::EndpointKey;

/// How long a fresh subscription listens before its view of the fleet is trusted: workers send a
/// heartbeat every 2 s, so after this every live worker has been heard.
const EVENTS_WARM_UP: Duration = Duration::from_secs(5);

/// The union of the consumers' interests, for one poll. Cheap to clone: it is kept by the
/// registry until the consumers change, and every poll in between reuses it.
#[derive(Clone, Debug, Default)]
pub(super) struct Plan {
    /// Every Celery queue, once.
    pub queues: Arc<BTreeSet<String>>,
    /// The same, sorted, as the probe takes them.
    pub list: Arc<Vec<String>>,
    /// The shortest interval asked for.
    pub interval: Option<Duration>,
    pub worker_events: bool,
    /// TaskQueue consumers (whose reconciles are triggered) and their intervals.
    pub triggered: Arc<BTreeMap<QueueRef, Duration>>,
    /// Every TaskQueue the endpoint reports for (see `Endpoint::task_queues`), with its probe
    /// duration series.
    pub reported: Arc<Vec<Reported>>,
}

/// A TaskQueue the endpoint reports for.
#[derive(Debug)]
pub(super) struct Reported {
    pub tq: QueueRef,
    /// Its Celery queue name.
    pub queue: String,
    pub probe_duration: prometheus::Histogram,
}

pub(super) struct Poller {
    pub shared: Arc<Shared>,
    pub key: EndpointKey,
    pub id: u64,
    pub broker: Broker,
    pub config: BrokerConfig,
    pub snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    pub wake: Arc<Notify>,
}

/// The worker-event subscription, started when a consumer asks for worker activity.
struct Events {
    events: WorkerEvents,
    /// Since when the subscription has been up without a break.
    up_since: Option<Instant>,
}

/// What about a snapshot makes the TaskQueues' conditions change.
#[derive(PartialEq, Eq)]
struct Signature {
    error: Option<String>,
    findings: BTreeSet<(Reason, Severity, Option<String>)>,
}

impl Signature {
    fn of(snapshot: &Snapshot) -> Self {
        match &snapshot.probe {
            Err(e) => Self { error: Some(e.to_string()), findings: BTreeSet::new() },
            Ok(o) => Self {
                error: None,
                findings: o.findings.iter().map(|f| (f.reason, f.severity, f.queue.clone())).collect(),
            },
        }
    }
}

/// Polls until the endpoint has no consumer left (or the registry closes it).
pub(super) async fn run(p: Poller) {
    let mut seq = 0;
    let mut incidents = Incidents::default();
    let mut tracker = LatencyTracker::new();
    let mut events: Option<Events> = None;
    let mut last_triggered: HashMap<QueueRef, Instant> = HashMap::new();
    let mut last_signature: Option<Signature> = None;
    loop {
        let Some(plan) = p.plan() else { return };
        if !plan.worker_events {
            events = None;
        } else if events.is_none() {
            match WorkerEvents::start(&p.config) {
                Ok(started) => events = Some(Events { events: started, up_since: None }),
                Err(e) => {
                    tracing::warn!(broker = %p.broker.endpoint(), error = %e, "cannot subscribe to worker events")
                }
            }
        }
        let started = Instant::now();
        let at = Timestamp::now();
        let result = p.broker.probe_with(&plan.list, &tracker.hints()).await;
        let took = started.elapsed();
        seq += 1;
        incidents.expire(started);
        let (probe, new) = match result {
            Ok(mut observation) => {
                let new = incidents.latch(&mut observation.findings, at, started);
                tracker.observe(unix_seconds(), &observation);
                (Ok(Arc::new(observation)), new)
            }
            Err(e) => {
                tracing::debug!(broker = %p.broker.endpoint(), error = %e, "probe failed");
                (Err(e), Vec::new())
            }
        };
        let snapshot = Arc::new(Snapshot {
            poller: p.id,
            seq,
            endpoint: p.broker.endpoint(),
            started,
            at,
            took,
            latency: plan.list.iter().filter_map(|q| Some((q.clone(), tracker.latency(q)?))).collect(),
            queues: plan.queues.clone(),
            probe,
            incidents: incidents.held(),
            last_incident: incidents.last_id(),
            workers: events.as_mut().and_then(Events::workers).map(Arc::new),
        });
        let Some(reported_for) = p.account(&snapshot) else { return };
        p.record(&snapshot, &new, &reported_for);
        p.snapshots.send_replace(Some(snapshot.clone()));
        p.shared.published.send_modify(|n| *n = n.wrapping_add(1));

        // Reconcile the TaskQueues when their conditions may change, else once per interval.
        let signature = Signature::of(&snapshot);
        let changed = !new.is_empty() || last_signature.as_ref() != Some(&signature);
        last_signature = Some(signature);
        last_triggered.retain(|tq, _| plan.triggered.contains_key(tq));
        let due: Vec<QueueRef> = plan
            .triggered
            .iter()
            .filter(|(tq, interval)| {
                changed || last_triggered.get(*tq).is_none_or(|t| started.saturating_duration_since(*t) >= **interval)
            })
            .map(|(tq, _)| tq.clone())
            .collect();
        for tq in &due {
            last_triggered.insert(tq.clone(), started);
        }
        p.shared.trigger(due);

        let interval = plan.interval.unwrap_or(TASK_QUEUE_INTERVAL);
        tokio::select! {
            _ = tokio::time::sleep_until((started + interval).into()) => {}
            _ = p.wake.notified() => {}
        }
    }
}

impl Poller {
    /// The consumers' interests after dropping expired registrations; `None` when the endpoint
    /// has none left (it is then closed) or the registry closed it.
    fn plan(&self) -> Option<Plan> {
        let mut state = self.shared.state();
        let endpoint = state.endpoints.get_mut(&self.key).filter(|e| e.id == self.id)?;
        let now = Instant::now();
        let gone = endpoint.expire(now);
        let plan = (!endpoint.consumers.is_empty()).then(|| endpoint.plan(&self.shared.metrics));
        if let Some(plan) = &plan {
            endpoint.polled = plan.clone();
        }
        for c in gone {
            state.consumers.remove(&c);
        }
        if plan.is_none() {
            close(&mut state, &self.key);
        }
        plan
    }

    /// Records the snapshot's last incident id in the registry and returns every TaskQueue the
    /// endpoint reports for, with its Celery queue name — under the registry's lock, so a
    /// TaskQueue gets the metric for exactly the incidents its reconcile will report. `None` when
    /// the registry closed this poller.
    fn account(&self, snapshot: &Snapshot) -> Option<Arc<Vec<Reported>>> {
        let mut state = self.shared.state();
        let endpoint = state.endpoints.get_mut(&self.key).filter(|e| e.id == self.id)?;
        endpoint.last_incident = snapshot.last_incident;
        Some(endpoint.plan(&self.shared.metrics).reported)
    }

    /// Probe duration and errors, and new incidents, once per TaskQueue concerned.
    fn record(&self, snapshot: &Snapshot, new: &[HeldIncident], reported: &[Reported]) {
        let metrics = &self.shared.metrics;
        let error = snapshot.probe.as_ref().err().map(|e| e.metric_label());
        let took = snapshot.took.as_secs_f64();
        for r in reported {
            r.probe_duration.observe(took);
            if error.is_none() && new.is_empty() {
                continue;
            }
            let labels = r.tq.labels();
            if let Some(error) = error {
                metrics.probe_failed(&labels, error);
            }
            for incident in new {
                if incident.finding.queue.as_deref().is_none_or(|q| q == r.queue) {
                    metrics.broker_incident(&labels, incident.finding.reason.as_str());
                }
            }
        }
    }
}

impl Events {
    /// Live workers, once the subscription has been up for [`EVENTS_WARM_UP`].
    fn workers(&mut self) -> Option<Vec<celery_broker::events::WorkerState>> {
        if !self.events.is_subscribed() {
            self.up_since = None;
            return None;
        }
        let up_since = *self.up_since.get_or_insert_with(Instant::now);
        (up_since.elapsed() >= EVENTS_WARM_UP).then(|| self.events.alive())
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}
