//! From what the broker and the workers show to the [`Observation`] the decision reads: which
//! tasks are due, which are scheduled and when they come due, how long the oldest one waited, and
//! how fast one replica works. Pure helpers; the loop that polls owns the state they need
//! ([`Throughput`], a [`LatencyTracker`](celery_broker::LatencyTracker) per endpoint) and feeds them.
//!
//! What each broker can tell (DESIGN §6b, checked with Celery/kombu 5.7):
//!
//! | | Redis | RabbitMQ |
//! | --- | --- | --- |
//! | scheduled on the queue | walked from the head (bounded) | not readable (needs consuming) |
//! | scheduled, held by workers | exact (unacked entries' ETA) | bounded: in flight beyond the workers' prefetch windows ([`due_limit`]) |
//! | scheduled, native delayed delivery | — | level queues, for their only target queue; due time bounded above |
//! | oldest task's wait | head markers, to one poll | publish counter, to one poll + statistics interval |

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use celery_broker::BrokerObservation;
use celery_broker::events::WorkerState;

use super::decide::{Observation, Policy};

/// Lead time until a pod start-up was seen.
pub const DEFAULT_LEAD_TIME: Duration = Duration::from_secs(30);
/// Recent pod start-ups the default lead time looks at.
pub const STARTUPS_CONSIDERED: usize = 10;

/// How far ahead scheduled tasks count as demand: `leadTimeSeconds`, else the longest of the
/// pool's last [`STARTUPS_CONSIDERED`] pod start-ups (creation to Ready, most recent last), else
/// [`DEFAULT_LEAD_TIME`]. The longest, so replicas are up in time even when a start-up is slow.
pub fn lead_time(policy: &Policy, startups: &[Duration]) -> Duration {
    policy
        .lead_time
        .unwrap_or_else(|| startups.iter().rev().take(STARTUPS_CONSIDERED).max().copied().unwrap_or(DEFAULT_LEAD_TIME))
}

/// The most due tasks the pool's workers can hold unacknowledged, for brokers that cannot tell
/// held ETA tasks from prefetched ones (RabbitMQ): every running task, plus a full prefetch
/// window (`concurrency × prefetch_multiplier`) for each worker whose processes are all busy — a
/// worker with an idle process would start a reserved task at once. Celery's prefetch limit
/// counts due tasks only (it is raised by one per held ETA task), so anything beyond this is
/// scheduled. `None` without heartbeats.
pub fn due_limit(workers: &[WorkerState], concurrency: u32, prefetch_multiplier: u32) -> Option<u64> {
    if workers.is_empty() {
        return None;
    }
    let window = u64::from(concurrency) * u64::from(prefetch_multiplier);
    Some(workers.iter().fold(0u64, |sum, w| {
        let saturated = w.active >= concurrency;
        sum.saturating_add(u64::from(w.active)).saturating_add(if saturated { window } else { 0 })
    }))
}

/// What the loop knows besides the broker probe, for [`observe_demand`].
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// Tasks the pool's workers run (heartbeats' `active`), when heartbeats are heard.
    pub running: Option<u64>,
    /// The app acknowledges late (`acksLate`): running tasks are already unacknowledged.
    pub acks_late: bool,
    /// From [`lead_time`].
    pub lead_time: Duration,
    /// From [`due_limit`]; used only for queues whose broker cannot split in-flight messages.
    pub due_limit: Option<u64>,
    /// The age of the oldest waiting task per queue, from the endpoint's latency tracker.
    pub oldest_wait: HashMap<String, Duration>,
    /// From [`Throughput::per_replica`].
    pub per_replica_rate: Option<f64>,
}

/// The pool's [`Observation`] from its queues in one probe. Extends the plain sum of ready and
/// unacknowledged messages with what the broker told about scheduled tasks; where it told nothing,
/// the observation is the plain one.
pub fn observe_demand(queues: &[String], observation: &BrokerObservation, context: &Context) -> Observation {
    let mut seen = Observation::default();
    let mut split_unknown = false;
    let mut credited_delayed = false;
    for q in queues {
        let Some(o) = observation.queues.get(q) else { continue };
        seen.backlog = seen.backlog.saturating_add(o.ready);
        seen.in_flight = seen.in_flight.saturating_add(o.unacked.unwrap_or(0));
        if let Some(waiting) = o.waiting {
            seen.backlog_scheduled = seen.backlog_scheduled.saturating_add(o.ready.saturating_sub(waiting));
        }
        if o.unacked.is_some_and(|n| n > 0) && o.reserved_due.is_none() {
            split_unknown = true;
        }
        if let Some(s) = &o.scheduled {
            seen.in_flight_scheduled = seen.in_flight_scheduled.saturating_add(s.held);
            seen.due_soon = seen.due_soon.saturating_add(s.due.due_within(context.lead_time));
            seen.scheduled = seen.scheduled.saturating_add(s.total());
            credited_delayed |= s.delayed > 0;
        }
        if let Some(&wait) = context.oldest_wait.get(q) {
            seen.oldest_wait = Some(seen.oldest_wait.map_or(wait, |w| w.max(wait)));
        }
    }
    // Native delayed delivery shared by several queues, all of them this pool's: its work too.
    if let Some(delayed) = observation.info.delayed_delivery.as_ref().filter(|_| !credited_delayed)
        && let Some(targets) = delayed.targets.as_deref().filter(|t| t.len() > 1)
        && targets.iter().all(|t| queues.contains(t))
        && let Some(s) = celery_broker::schedule::delayed_for_queues(targets, delayed)
    {
        seen.due_soon = seen.due_soon.saturating_add(s.due.due_within(context.lead_time));
        seen.scheduled = seen.scheduled.saturating_add(s.total());
    }
    // Late-acked tasks stay unacknowledged while they run: already counted — unless the broker's
    // count lags behind (RabbitMQ's management statistics; those of quorum queues refresh only
    // every 5 s: seen scaling a pool in while the tasks it ran were still unacknowledged), so the
    // workers' own count is a floor. Otherwise the broker forgot them when they started, and only
    // the workers' heartbeats know them.
    if let Some(running) = context.running {
        seen.in_flight =
            if context.acks_late { seen.in_flight.max(running) } else { seen.in_flight.saturating_add(running) };
    }
    if split_unknown {
        seen.in_flight_due_limit = context.due_limit;
    }
    seen.per_replica_rate = context.per_replica_rate;
    seen
}

/// Measures how many tasks one replica completes per second, from the workers' heartbeats
/// (`processed` counts tasks started since the worker started; heartbeats come every 2 s).
///
/// Only intervals during which the pool had due tasks waiting count — then every worker had work
/// and its rate is its capacity, not the arrival rate — and the per-worker rates are smoothed
/// (exponentially, weight [`Throughput::SMOOTHING`] per sample) so one slow task does not swing
/// the latency rule. A worker that restarted (`processed` went back) starts over.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    /// Per worker: its last heartbeat's receipt time and `processed`.
    last: HashMap<String, (Instant, u64)>,
    /// Whether due tasks were waiting at the previous observation.
    busy_before: bool,
    rate: Option<f64>,
}

impl Throughput {
    /// Weight of a new sample in the smoothed rate.
    pub const SMOOTHING: f64 = 0.2;

    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in the pool's workers as heard now; `busy` says whether due tasks were waiting.
    pub fn observe(&mut self, workers: &[WorkerState], busy: bool) {
        let counts = self.busy_before && busy;
        let mut next = HashMap::with_capacity(workers.len());
        for w in workers {
            if let Some(&(seen, processed)) = self.last.get(&w.hostname)
                && w.last_seen > seen
                && w.processed >= processed
                && counts
            {
                let rate = (w.processed - processed) as f64 / (w.last_seen - seen).as_secs_f64();
                self.rate = Some(self.rate.map_or(rate, |r| r + Self::SMOOTHING * (rate - r)));
            }
            next.insert(w.hostname.clone(), (w.last_seen, w.processed));
        }
        self.last = next;
        self.busy_before = busy;
    }

    /// Tasks per second one replica completes, once measured.
    pub fn per_replica(&self) -> Option<f64> {
        self.rate
    }
}

/// What the autoscaler remembers per pool for [`observe_demand`] between polls: the per-replica
/// rate and the pool's recent pod start-ups (for the default [`lead_time`]).
#[derive(Clone, Debug, Default)]
pub struct PoolMemory {
    /// Per-replica rate from heartbeats.
    pub throughput: Throughput,
    /// Recent start-ups, most recent last (at most [`STARTUPS_CONSIDERED`]).
    startups: VecDeque<Duration>,
    /// A scale-up whose pods are not all ready yet: when it was applied, and to how many.
    starting: Option<(Instant, u32)>,
}

impl PoolMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pool was just scaled from `from` to `to` replicas at `now`. A scale-up starts timing a
    /// start-up (a newer one replaces a pending one: its pods were asked for later); a scale-down
    /// abandons it (the ready count no longer tells when the new pods came up).
    pub fn scaled(&mut self, now: Instant, from: u32, to: u32) {
        self.starting = (to > from).then_some((now, to));
    }

    /// Takes in the worker Deployment's ready replicas at `now`: once a pending scale-up has all
    /// its pods ready, its duration (decision to ready, as the autoscaler saw it) is a start-up.
    pub fn observe_ready(&mut self, now: Instant, ready: u32) {
        if let Some((since, to)) = self.starting
            && ready >= to
        {
            self.starting = None;
            if self.startups.len() == STARTUPS_CONSIDERED {
                self.startups.pop_front();
            }
            self.startups.push_back(now.saturating_duration_since(since));
        }
    }

    /// Start-ups seen, most recent last.
    pub fn startups(&self) -> Vec<Duration> {
        self.startups.iter().copied().collect()
    }
}

/// The workers of pool `pool` among the endpoint's live workers (`<pool>@<pod>` hostnames).
pub fn workers_of(pool: &str, workers: &[WorkerState]) -> Vec<WorkerState> {
    workers.iter().filter(|w| super::plan::pod_of_worker(pool, &w.hostname).is_some()).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_broker::schedule::DueHistogram;
    use celery_broker::{BrokerInfo, BrokerKind, DelayedDelivery, QueueObservation, Scheduled};
    use std::collections::BTreeMap;

    fn worker(host: &str, active: u32, processed: u64, at: Instant) -> WorkerState {
        WorkerState {
            hostname: host.into(),
            active,
            processed,
            freq: Duration::from_secs(2),
            last_seen: at,
            online: true,
        }
    }

    fn policy(lead: Option<u64>) -> Policy {
        let spec: crate::crd::WorkerPoolSpec = serde_json::from_value(serde_json::json!({
            "app": "a", "image": "i", "queues": ["q"], "autoscaling": {"maxReplicas": 5}
        }))
        .unwrap();
        Policy { lead_time: lead.map(Duration::from_secs), ..Policy::from_spec(&spec).unwrap() }
    }

    #[test]
    fn the_lead_time_is_the_override_or_the_slowest_recent_start_up() {
        let s = Duration::from_secs;
        assert_eq!(lead_time(&policy(Some(5)), &[s(90)]), s(5));
        assert_eq!(lead_time(&policy(None), &[]), DEFAULT_LEAD_TIME);
        assert_eq!(lead_time(&policy(None), &[s(12), s(40), s(20)]), s(40));
        // Only the most recent ones: an old slow start-up is forgotten.
        let mut startups = vec![s(300)];
        startups.extend([s(10); STARTUPS_CONSIDERED]);
        assert_eq!(lead_time(&policy(None), &startups), s(10));
    }

    #[test]
    fn the_due_limit_counts_running_tasks_and_the_windows_of_saturated_workers() {
        let now = Instant::now();
        let workers = [worker("p@a", 2, 0, now), worker("p@b", 1, 0, now), worker("p@c", 0, 0, now)];
        // concurrency 2, prefetch 3: a is saturated (2 running + 6 reserved), b and c are not.
        assert_eq!(due_limit(&workers, 2, 3), Some(2 + 6 + 1));
        assert_eq!(due_limit(&[], 2, 3), None);
    }

    fn observation(queues: Vec<(&str, QueueObservation)>, delayed: Option<DelayedDelivery>) -> BrokerObservation {
        let mut info = BrokerInfo::new(BrokerKind::Redis);
        info.delayed_delivery = delayed;
        BrokerObservation {
            queues: queues.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<BTreeMap<_, _>>(),
            info,
            findings: Vec::new(),
        }
    }

    fn due(pairs: &[(f64, u64)]) -> DueHistogram {
        let mut h = DueHistogram::default();
        for &(ahead, n) in pairs {
            h.add(ahead, n);
        }
        h
    }

    #[test]
    fn redis_counts_split_into_due_and_scheduled() {
        let a = QueueObservation {
            ready: 30,
            unacked: Some(25),
            waiting: Some(10),
            reserved_due: Some(5),
            scheduled: Some(Scheduled {
                listed: 20,
                held: 20,
                due: due(&[(10.0, 4), (3000.0, 36)]),
                exact: true,
                ..Scheduled::default()
            }),
            ..QueueObservation::default()
        };
        let context = Context {
            running: Some(3),
            lead_time: Duration::from_secs(20),
            oldest_wait: HashMap::from([("a".into(), Duration::from_secs(7))]),
            due_limit: Some(0),
            ..Context::default()
        };
        let seen = observe_demand(&["a".into(), "absent".into()], &observation(vec![("a", a)], None), &context);
        assert_eq!((seen.backlog, seen.backlog_scheduled, seen.waiting_due()), (30, 20, 10));
        // 25 unacked + 3 running with early acks; 20 of them held for later.
        assert_eq!((seen.in_flight, seen.in_flight_scheduled, seen.in_flight_due()), (28, 20, 8));
        // Redis splits in-flight itself: no prefetch-window bound.
        assert_eq!(seen.in_flight_due_limit, None);
        assert_eq!((seen.due_soon, seen.scheduled), (4, 40));
        assert_eq!(seen.oldest_wait, Some(Duration::from_secs(7)));
    }

    #[test]
    fn rabbitmq_in_flight_is_bounded_by_the_workers_windows_and_delayed_delivery_counts() {
        let q = |ready, unacked| QueueObservation {
            ready,
            unacked: Some(unacked),
            consumers: Some(1),
            ..QueueObservation::default()
        };
        let mut levels = vec![0; 28];
        levels[3] = 4; // due within 16 s
        levels[12] = 9; // due within 8192 s
        let delayed = DelayedDelivery { levels, targets: Some(vec!["a".into(), "b".into()]) };
        let broker = observation(vec![("a", q(2, 200)), ("b", q(0, 0))], Some(delayed));
        let context = Context {
            running: Some(1),
            acks_late: true,
            lead_time: Duration::from_secs(16),
            due_limit: Some(3),
            ..Context::default()
        };
        let seen = observe_demand(&["a".into(), "b".into()], &broker, &context);
        assert_eq!((seen.backlog, seen.in_flight, seen.in_flight_due_limit), (2, 200, Some(3)));
        assert_eq!(seen.in_flight_due(), 3);
        assert_eq!((seen.due_soon, seen.scheduled), (4, 13));
        // A pool consuming only one of the two targets cannot claim the shared delayed tasks.
        let seen = observe_demand(&["a".into()], &broker, &context);
        assert_eq!((seen.due_soon, seen.scheduled), (0, 0));
    }

    #[test]
    fn with_late_acks_running_tasks_are_a_floor_under_a_lagging_unacked_count() {
        let q =
            |unacked| QueueObservation { unacked: Some(unacked), consumers: Some(2), ..QueueObservation::default() };
        let context = Context { running: Some(2), acks_late: true, ..Context::default() };
        // The statistics do not show the two running tasks yet.
        let seen = observe_demand(&["a".into()], &observation(vec![("a", q(0))], None), &context);
        assert_eq!(seen.in_flight, 2);
        // They do: counted once, not twice.
        let seen = observe_demand(&["a".into()], &observation(vec![("a", q(3))], None), &context);
        assert_eq!(seen.in_flight, 3);
        // Early acks: the running tasks have left the broker.
        let early = Context { acks_late: false, ..context };
        let seen = observe_demand(&["a".into()], &observation(vec![("a", q(3))], None), &early);
        assert_eq!(seen.in_flight, 5);
    }

    #[test]
    fn throughput_counts_only_busy_intervals_and_smooths() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Throughput::new();
        t.observe(&[worker("p@a", 2, 100, t0)], true);
        assert_eq!(t.per_replica(), None);
        // 10 tasks in 2 s while busy: 5 tasks/s.
        t.observe(&[worker("p@a", 2, 110, t0 + s(2))], true);
        assert_eq!(t.per_replica(), Some(5.0));
        // Idle: the arrival rate, not capacity; not counted.
        t.observe(&[worker("p@a", 0, 111, t0 + s(4))], false);
        t.observe(&[worker("p@a", 0, 112, t0 + s(6))], false);
        assert_eq!(t.per_replica(), Some(5.0));
        // Busy again: 2 tasks/s, smoothed towards it.
        t.observe(&[worker("p@a", 2, 116, t0 + s(8))], true);
        assert_eq!(t.per_replica(), Some(5.0));
        t.observe(&[worker("p@a", 2, 120, t0 + s(10))], true);
        let rate = t.per_replica().unwrap();
        assert!((rate - (5.0 + 0.2 * (2.0 - 5.0))).abs() < 1e-9, "{rate}");
        // A restarted worker (processed went back) is not a negative rate.
        t.observe(&[worker("p@a", 2, 3, t0 + s(12))], true);
        assert_eq!(t.per_replica(), Some(rate));
        // The same heartbeat seen twice adds nothing.
        t.observe(&[worker("p@a", 2, 3, t0 + s(12))], true);
        assert_eq!(t.per_replica(), Some(rate));
    }

    #[test]
    fn a_start_up_is_timed_from_the_scale_up_to_all_its_pods_ready() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut m = PoolMemory::new();
        m.observe_ready(t0, 3);
        assert!(m.startups().is_empty(), "no scale-up, nothing timed");
        m.scaled(t0, 1, 4);
        m.observe_ready(t0 + s(5), 3);
        assert!(m.startups().is_empty(), "not all ready yet");
        m.observe_ready(t0 + s(12), 4);
        assert_eq!(m.startups(), vec![s(12)]);
        // A scale-down abandons a pending start-up; a later one replaces it.
        m.scaled(t0 + s(20), 4, 6);
        m.scaled(t0 + s(21), 6, 5);
        m.observe_ready(t0 + s(40), 6);
        assert_eq!(m.startups(), vec![s(12)]);
        m.scaled(t0 + s(50), 5, 7);
        m.scaled(t0 + s(53), 7, 9);
        m.observe_ready(t0 + s(60), 9);
        assert_eq!(m.startups(), vec![s(12), s(7)]);
        // Only the last STARTUPS_CONSIDERED are kept.
        for i in 0..STARTUPS_CONSIDERED as u64 {
            m.scaled(t0 + s(100 + i), 0, 1);
            m.observe_ready(t0 + s(101 + i), 1);
        }
        assert_eq!(m.startups(), vec![s(1); STARTUPS_CONSIDERED]);
    }

    #[test]
    fn only_the_pools_own_workers_count() {
        let now = Instant::now();
        let all = [worker("mail@p1", 1, 0, now), worker("mailer@p2", 1, 0, now), worker("celery@x", 1, 0, now)];
        let mine: Vec<String> = workers_of("mail", &all).into_iter().map(|w| w.hostname).collect();
        assert_eq!(mine, vec!["mail@p1".to_string()]);
    }
}
