//! The broker registry: one poller per broker endpoint, one snapshot per poll, every finding
//! reported once.
//!
//! ```text
//!  TaskQueue reconcile ──┐ register queues            one poller task per broker endpoint
//!  (URL resolved)        │ + interval       ┌─────────────────────────────────────────────┐
//!  autoscaler (pools) ───┴─────────────────▶│ Broker (one connection) + worker events     │
//!                                           │ ONE probe of all queues, shortest interval  │
//!                                           │ latches incidents, counts errors/incidents  │
//!                                           └──────────────────────┬──────────────────────┘
//!                                                                  │ Snapshot (watch channel)
//!                        ┌─────────────────────────────────────────┼────────────────────┐
//!                        ▼                                         ▼                    ▼
//!       TaskQueue status, conditions, Events         autoscaler decisions →       /metrics
//!       (reconcile triggered by the poller)          Deployment spec.replicas
//! ```
//!
//! - **Endpoints.** Consumers are TaskQueues (after their broker is resolved, Secrets included)
//!   and autoscaled WorkerPools. Each registers its [`Interest`] — the Celery queues it reads, how
//!   often, whether it needs worker events — under an [`EndpointKey`]. The first consumer of a key
//!   starts its poller; the last one to leave closes it: the poller task, its connection and its
//!   worker-event subscription go with it. A consumer registering under a new key (a rotated
//!   Secret) leaves the old one at once, so a rotation leaves nothing behind. Consumers that stop
//!   renewing (a deleted TaskQueue is never reconciled again; a replica that lost the Lease stops
//!   reconciling) expire after [`lease`] of their interval.
//! - **Polls.** The poller polls at the shortest interval any consumer asks for and probes the
//!   queues of all consumers in one [`Broker::probe_with`] call; a consumer asking for a queue not
//!   yet polled, or for a shorter interval, wakes it at once. Each poll becomes one [`Snapshot`],
//!   published through a `tokio::sync::watch` channel: the observation or the probe's error,
//!   incidents, live workers, queue latencies, time and a sequence number.
//! - **Incidents** ([`is_incident`]: keys evicted, eviction policy fixed) are findings about
//!   something that happened between two probes, which the broker client reports in one probe
//!   only. The poller moves them out of the observation, numbers them, and holds the latest per
//!   reason in every snapshot for [`INCIDENT_HOLD`](snapshot::INCIDENT_HOLD), so whoever's interval
//!   the poll served, the TaskQueue's BrokerSafe condition shows it. Metrics are counted by the
//!   poller, at the poll, once per TaskQueue concerned (`celery_operator_broker_incidents_total`,
//!   and `celery_operator_probe_errors_total` for every failed poll); the Warning Event is
//!   published by the TaskQueue's reconcile, which takes the incidents it has not reported yet
//!   from the registry ([`Brokers::unreported`]: a cursor per TaskQueue and endpoint).
//! - **Triggers.** The TaskQueue controller does not poll. The poller wakes the reconcile of every
//!   TaskQueue on the endpoint ([`Brokers::task_queue_triggers`], fed to
//!   `Controller::reconcile_on`) when a snapshot brings a new incident, a probe error appearing
//!   or clearing, or a different set of findings, and otherwise once per TaskQueue status
//!   interval; the reconcile maps the latest snapshot.
//!
//! The registry never logs an [`EndpointKey`] (it holds the URL with its password); snapshots
//! carry only the redacted endpoint, and probe errors are scrubbed by the broker crate.

mod poller;
pub mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_broker::{Broker, ProbeError};
use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc, watch};

use crate::broker_config::{EndpointKey, ResolvedBroker, broker_config};
use crate::crd::{BrokerSpec, TaskQueue};
use crate::metrics::Metrics;
pub use snapshot::{HeldIncident, Snapshot, is_incident};

/// An endpoint's snapshots: `None` until its first poll.
pub type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

/// How often a TaskQueue's status is refreshed from its endpoint's snapshots.
pub const TASK_QUEUE_INTERVAL: Duration = Duration::from_secs(10);
/// A consumer's registration lasts at least this long without renewal.
pub const MIN_LEASE: Duration = Duration::from_secs(60);

/// How long a registration asking for `interval` lasts without renewal: six intervals, at least
/// [`MIN_LEASE`].
pub fn lease(interval: Duration) -> Duration {
    (interval * 6).max(MIN_LEASE)
}

/// A TaskQueue, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueRef {
    pub namespace: String,
    pub name: String,
}

impl QueueRef {
    pub fn of(tq: &TaskQueue) -> Self {
        use kube::ResourceExt;
        Self { namespace: tq.namespace().unwrap_or_default(), name: tq.name_any() }
    }

    /// `[namespace, name]`, the labels of per-queue metrics.
    pub fn labels(&self) -> [String; 2] {
        [self.namespace.clone(), self.name.clone()]
    }

    fn object_ref(&self) -> ObjectRef<TaskQueue> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

/// Who reads an endpoint's snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Consumer {
    /// A TaskQueue's status.
    TaskQueue(QueueRef),
    /// An autoscaled WorkerPool, by `namespace/name`.
    Pool(String),
}

/// What a consumer needs from its endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interest {
    /// The TaskQueues it reads, each with its Celery queue name.
    pub queues: Vec<(QueueRef, String)>,
    /// How often it needs a fresh snapshot.
    pub interval: Duration,
    /// Whether it needs worker activity from heartbeats.
    pub worker_events: bool,
}

impl Interest {
    /// A TaskQueue's status: its own queue, every [`TASK_QUEUE_INTERVAL`], no worker events.
    pub fn task_queue(tq: &TaskQueue) -> Self {
        Self {
            queues: vec![(QueueRef::of(tq), tq.queue_name().to_owned())],
            interval: TASK_QUEUE_INTERVAL,
            worker_events: false,
        }
    }
}

/// One consumer's registration.
struct Registration {
    interest: Interest,
    renewed: Instant,
}

/// One endpoint's poller, as the registry sees it.
struct Endpoint {
    /// Tells this poller from a later one for the same key.
    id: u64,
    consumers: BTreeMap<Consumer, Registration>,
    /// Per TaskQueue the endpoint reports for: the highest incident id its reconcile published
    /// an Event for (or that happened before the TaskQueue was on the endpoint).
    cursors: HashMap<QueueRef, u64>,
    /// The highest incident id the poller published.
    last_incident: u64,
    /// What the poller polls for since it last looked at the consumers.
    polled: poller::Plan,
    /// The plan of the current consumers, until one joins, leaves or changes its interest (a
    /// renewal changes nothing): a poll of an unchanged fleet rebuilds nothing.
    plan: Option<poller::Plan>,
    snapshots: Snapshots,
    /// Wakes the poller before its interval is up (a new queue, a shorter interval).
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// What the poller must do next: the union of every consumer's interest (built again only
    /// after the consumers changed).
    fn plan(&mut self, metrics: &Metrics) -> poller::Plan {
        if let Some(plan) = &self.plan {
            return plan.clone();
        }
        let mut interval: Option<Duration> = None;
        let mut worker_events = false;
        let mut queues = BTreeSet::new();
        for r in self.consumers.values() {
            let i = &r.interest;
            interval = Some(interval.map_or(i.interval, |p| p.min(i.interval)));
            worker_events |= i.worker_events;
            queues.extend(i.queues.iter().map(|(_, queue)| queue.clone()));
        }
        let triggered = self
            .consumers
            .iter()
            .filter_map(|(c, r)| match c {
                Consumer::TaskQueue(tq) => Some((tq.clone(), r.interest.interval)),
                Consumer::Pool(_) => None,
            })
            .collect();
        let reported = self
            .task_queues()
            .into_iter()
            .map(|(tq, queue)| {
                let probe_duration = metrics.probe_duration(&tq.labels());
                poller::Reported { tq, queue, probe_duration }
            })
            .collect();
        let plan = poller::Plan {
            list: Arc::new(queues.iter().cloned().collect()),
            queues: Arc::new(queues),
            interval,
            worker_events,
            triggered: Arc::new(triggered),
            reported: Arc::new(reported),
        };
        self.plan = Some(plan.clone());
        plan
    }

    /// Every TaskQueue the endpoint reports for (those of TaskQueue consumers and those pools
    /// read), with its Celery queue name.
    fn task_queues(&self) -> BTreeMap<QueueRef, String> {
        let mut all = BTreeMap::new();
        for r in self.consumers.values() {
            for (tq, queue) in &r.interest.queues {
                all.entry(tq.clone()).or_insert_with(|| queue.clone());
            }
        }
        all
    }

    /// Drops the consumers whose registration was not renewed within its lease (and the cursors of
    /// TaskQueues that left with them); returns them.
    fn expire(&mut self, now: Instant) -> Vec<Consumer> {
        let mut gone = Vec::new();
        self.consumers.retain(|c, r| {
            let keep = now.saturating_duration_since(r.renewed) < lease(r.interest.interval);
            if !keep {
                gone.push(c.clone());
            }
            keep
        });
        if !gone.is_empty() {
            self.plan = None;
            self.sync_cursors();
        }
        gone
    }

    /// Starts cursors for TaskQueues new to the endpoint and drops those of TaskQueues that left.
    fn sync_cursors(&mut self) {
        let wanted = self.task_queues();
        self.cursors.retain(|tq, _| wanted.contains_key(tq));
        for tq in wanted.into_keys() {
            self.cursors.entry(tq).or_insert(self.last_incident);
        }
    }
}

#[derive(Default)]
struct State {
    endpoints: HashMap<EndpointKey, Endpoint>,
    /// Each consumer's endpoint.
    consumers: HashMap<Consumer, EndpointKey>,
    next_id: u64,
}

/// A TaskQueue controller's subscription to reconcile triggers.
struct Trigger {
    namespace: Option<String>,
    sender: mpsc::UnboundedSender<ObjectRef<TaskQueue>>,
}

struct Shared {
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    triggers: Mutex<Vec<Trigger>>,
    /// Counts snapshots published on any endpoint, for the autoscaler to wake on.
    published: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the TaskQueue controllers to reconcile these TaskQueues.
    fn trigger(&self, queues: impl IntoIterator<Item = QueueRef>) {
        let mut triggers = self.triggers.lock().unwrap_or_else(|e| e.into_inner());
        for tq in queues {
            triggers.retain(|t| {
                if t.namespace.as_ref().is_some_and(|ns| *ns != tq.namespace) {
                    return true;
                }
                t.sender.send(tq.object_ref()).is_ok()
            });
        }
    }
}

/// The registry of broker endpoints and their pollers, shared by the TaskQueue controller and the
/// autoscaler. See the module documentation.
#[derive(Clone)]
pub struct Brokers {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys: they hold the URLs with their passwords.
        f.debug_struct("Brokers").field("endpoints", &self.endpoint_count()).finish()
    }
}

impl Brokers {
    /// An empty registry whose pollers record into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (published, _) = watch::channel(0);
        Self { shared: Arc::new(Shared { metrics, state: Mutex::default(), triggers: Mutex::default(), published }) }
    }

    /// Registers (or renews) `consumer`'s interest in the endpoint of `spec` and `resolved`,
    /// starting its poller on first use, and leaving the consumer's previous endpoint if it had
    /// another one. Returns the endpoint's key and snapshots. Fails only on an invalid broker
    /// URL or CA (no network I/O here); must run inside a Tokio runtime.
    pub fn register(
        &self,
        consumer: Consumer,
        spec: &BrokerSpec,
        resolved: &ResolvedBroker,
        interest: Interest,
    ) -> Result<(EndpointKey, Snapshots), ProbeError> {
        let key = EndpointKey::new(spec, resolved);
        let mut state = self.shared.state();
        if state.consumers.get(&consumer).is_some_and(|k| *k != key) {
            self.leave(&mut state, &consumer);
        }
        let fresh = !state.endpoints.contains_key(&key);
        if fresh {
            let config = broker_config(spec, resolved);
            let broker = Broker::new(config.clone())?;
            state.next_id += 1;
            let id = state.next_id;
            let (tx, rx) = watch::channel(None);
            let wake = Arc::new(Notify::new());
            let task = tokio::spawn(poller::run(poller::Poller {
                shared: self.shared.clone(),
                key: key.clone(),
                id,
                broker,
                config,
                snapshots: tx,
                wake: wake.clone(),
            }));
            let endpoint = Endpoint {
                id,
                consumers: BTreeMap::new(),
                cursors: HashMap::new(),
                last_incident: 0,
                polled: poller::Plan::default(),
                plan: None,
                snapshots: rx,
                wake,
                task,
            };
            state.endpoints.insert(key.clone(), endpoint);
        }
        state.consumers.insert(consumer.clone(), key.clone());
        let endpoint = state.endpoints.get_mut(&key).expect("inserted above");
        // A queue not polled yet, a shorter interval or worker events: poll now rather than at the
        // old interval (a new poller polls at once anyway).
        let polled = &endpoint.polled;
        if !fresh
            && (interest.queues.iter().any(|(_, q)| !polled.queues.contains(q))
                || polled.interval.is_none_or(|p| interest.interval < p)
                || (interest.worker_events && !polled.worker_events))
        {
            endpoint.wake.notify_one();
        }
        for (tq, _) in &interest.queues {
            endpoint.cursors.entry(tq.clone()).or_insert(endpoint.last_incident);
        }
        let requeued = endpoint.consumers.get(&consumer).is_some_and(|r| r.interest.queues != interest.queues);
        match endpoint.consumers.get_mut(&consumer) {
            // A renewal: the plan stands.
            Some(r) if r.interest == interest => r.renewed = Instant::now(),
            _ => {
                endpoint.plan = None;
                endpoint.consumers.insert(consumer, Registration { interest, renewed: Instant::now() });
            }
        }
        if requeued {
            // Its queues changed: forget the cursors of TaskQueues nobody reads any more.
            endpoint.sync_cursors();
        }
        Ok((key, endpoint.snapshots.clone()))
    }

    /// Renews the registrations of `consumers` on `key` (they still want what they asked for).
    pub fn renew<'a>(&self, key: &EndpointKey, consumers: impl IntoIterator<Item = &'a Consumer>) {
        let mut state = self.shared.state();
        if let Some(endpoint) = state.endpoints.get_mut(key) {
            let now = Instant::now();
            for c in consumers {
                if let Some(r) = endpoint.consumers.get_mut(c) {
                    r.renewed = now;
                }
            }
        }
    }

    /// Removes `consumer`; its endpoint closes when nobody else uses it.
    pub fn deregister(&self, consumer: &Consumer) {
        let mut state = self.shared.state();
        self.leave(&mut state, consumer);
    }

    fn leave(&self, state: &mut State, consumer: &Consumer) {
        let Some(key) = state.consumers.remove(consumer) else { return };
        let Some(endpoint) = state.endpoints.get_mut(&key) else { return };
        endpoint.consumers.remove(consumer);
        endpoint.plan = None;
        endpoint.sync_cursors();
        if endpoint.consumers.is_empty() {
            close(state, &key);
        }
    }

    /// Drops registrations not renewed within their [`lease`] before `now`, closing endpoints left
    /// without consumers. The pollers call this before every poll; public for tests.
    pub fn expire(&self, now: Instant) {
        let mut state = self.shared.state();
        expire(&mut state, now);
    }

    /// The snapshots of the endpoint `key`, when it has a poller.
    pub fn snapshots(&self, key: &EndpointKey) -> Option<Snapshots> {
        self.shared.state().endpoints.get(key).map(|e| e.snapshots.clone())
    }

    /// The incidents of `snapshot` that `tq`'s reconcile has not reported yet, and marks them
    /// reported: the caller publishes one Event per returned incident. Each incident is returned
    /// once per TaskQueue, whichever consumer's poll saw it.
    pub fn unreported(
        &self,
        key: &EndpointKey,
        tq: &QueueRef,
        queue: &str,
        snapshot: &Snapshot,
    ) -> Vec<(HeldIncident, usize)> {
        let mut state = self.shared.state();
        let Some(cursor) = state.endpoints.get_mut(key).and_then(|e| e.cursors.get_mut(tq)) else {
            return Vec::new();
        };
        let reported = *cursor;
        *cursor = reported.max(snapshot.last_incident);
        let concerns = |i: &&HeldIncident| i.finding.queue.as_deref().is_none_or(|q| q == queue);
        snapshot
            .incidents
            .iter()
            .filter(concerns)
            .filter(|i| i.id() > reported)
            .map(|i| (i.clone(), i.since(reported)))
            .collect()
    }

    /// Reconcile requests for TaskQueues in `namespace` (all with None) whose endpoint published
    /// something their status should show; for `Controller::reconcile_on`.
    pub fn task_queue_triggers(&self, namespace: Option<&str>) -> impl Stream<Item = ObjectRef<TaskQueue>> + use<> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let trigger = Trigger { namespace: namespace.map(str::to_owned), sender };
        self.shared.triggers.lock().unwrap_or_else(|e| e.into_inner()).push(trigger);
        futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|tq| (tq, r)) })
    }

    /// Changes whenever a snapshot is published on any endpoint (the autoscaler waits on it).
    pub fn published(&self) -> watch::Receiver<u64> {
        self.shared.published.subscribe()
    }

    /// Whether `consumer` is registered on `key` (false once its lease ran out).
    pub fn is_registered(&self, consumer: &Consumer, key: &EndpointKey) -> bool {
        self.shared.state().consumers.get(consumer) == Some(key)
    }

    /// Endpoints with a poller.
    pub fn endpoint_count(&self) -> usize {
        self.shared.state().endpoints.len()
    }

    /// Consumers registered on any endpoint.
    pub fn consumer_count(&self) -> usize {
        self.shared.state().consumers.len()
    }

    /// Whether the poller of `key` is running (false once closed).
    pub fn is_polling(&self, key: &EndpointKey) -> bool {
        self.shared.state().endpoints.get(key).is_some_and(|e| !e.task.is_finished())
    }
}

/// Drops expired registrations; closes endpoints left without consumers.
fn expire(state: &mut State, now: Instant) {
    let mut empty = Vec::new();
    let mut gone = Vec::new();
    for (key, endpoint) in &mut state.endpoints {
        gone.extend(endpoint.expire(now));
        if endpoint.consumers.is_empty() {
            empty.push(key.clone());
        }
    }
    for c in gone {
        state.consumers.remove(&c);
    }
    for key in empty {
        close(state, &key);
    }
}

/// Stops the poller of `key` and forgets it: its Broker (the connection) and its worker-event
/// subscription are dropped with the task.
fn close(state: &mut State, key: &EndpointKey) {
    if let Some(endpoint) = state.endpoints.remove(key) {
        endpoint.task.abort();
        state.consumers.retain(|_, k| k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_broker::{Finding, Reason, Severity};
    use k8s_openapi::jiff::Timestamp;

    fn task_queue(name: &str) -> TaskQueue {
        let yaml = format!(
            "apiVersion: celery-operator.dev/v1alpha1\nkind: TaskQueue\nmetadata: {{name: {name}, namespace: prod}}\n\
             spec: {{broker: {{url: 'redis://127.0.0.1:1/0'}}}}\n"
        );
        serde_saphyr::from_str(&yaml).expect("fixture parses")
    }

    /// A snapshot of `key`'s endpoint holding the incidents latched from `findings`.
    fn snapshot(incidents: &mut snapshot::Incidents, findings: Vec<Finding>) -> Snapshot {
        let mut findings = findings;
        let now = Instant::now();
        incidents.latch(&mut findings, Timestamp::now(), now);
        Snapshot {
            poller: 1,
            seq: 1,
            endpoint: "redis://127.0.0.1:1/0".into(),
            started: now,
            at: Timestamp::now(),
            took: Duration::ZERO,
            queues: Default::default(),
            probe: Err(ProbeError::Timeout { endpoint: "redis://127.0.0.1:1/0".into(), after: Duration::ZERO }),
            incidents: incidents.held(),
            last_incident: incidents.last_id(),
            workers: None,
            latency: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn each_task_queue_reports_an_incident_once_and_only_those_after_it_joined() {
        let brokers = Brokers::new(Arc::new(Metrics::new()));
        let (a, b) = (task_queue("a"), task_queue("b"));
        let resolved = ResolvedBroker::url("redis://127.0.0.1:1/0");
        let (key, _) = brokers
            .register(Consumer::TaskQueue(QueueRef::of(&a)), &a.spec.broker, &resolved, Interest::task_queue(&a))
            .unwrap();
        let mut incidents = snapshot::Incidents::default();
        let evicted = Finding::new(Reason::KeysEvicted, Severity::Critical, "Redis evicted 3 keys");
        let seen = snapshot(&mut incidents, vec![evicted.clone()]);
        // As the poller does when it publishes.
        brokers.shared.state().endpoints.get_mut(&key).unwrap().last_incident = seen.last_incident;

        let first = brokers.unreported(&key, &QueueRef::of(&a), "a", &seen);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].0.finding.reason, first[0].1), (Reason::KeysEvicted, 1));
        assert!(brokers.unreported(&key, &QueueRef::of(&a), "a", &seen).is_empty(), "reported once");

        // A TaskQueue joining afterwards sees the incident held in status, but no Event of it.
        brokers
            .register(Consumer::TaskQueue(QueueRef::of(&b)), &b.spec.broker, &resolved, Interest::task_queue(&b))
            .unwrap();
        assert!(brokers.unreported(&key, &QueueRef::of(&b), "b", &seen).is_empty());
        assert_eq!(seen.view_for("b").unwrap_err().metric_label(), "timeout");

        // Two more evictions before the next reconcile: one Event saying how many.
        incidents.latch(&mut vec![evicted.clone()], Timestamp::now(), Instant::now());
        let again = snapshot(&mut incidents, vec![evicted]);
        brokers.shared.state().endpoints.get_mut(&key).unwrap().last_incident = again.last_incident;
        let both = brokers.unreported(&key, &QueueRef::of(&b), "b", &again);
        assert_eq!(both.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![2]);
        assert_eq!(brokers.unreported(&key, &QueueRef::of(&a), "a", &again)[0].1, 2);
    }
}
