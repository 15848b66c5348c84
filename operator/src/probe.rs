//! Broker probing for TaskQueues: one shared [`Broker`] (one connection) per endpoint, and the pure
//! mapping from what a probe saw to TaskQueue status and conditions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use celery_broker::events::WorkerEvents;
use celery_broker::latency::Latency;
use celery_broker::{Broker, BrokerConfig, BrokerObservation, LatencyTracker, ProbeError, ProbeHints, Severity};

use crate::autoscale::plan::Activity;
use crate::broker_config::{EndpointKey, ResolvedBroker, broker_config};
use crate::conditions::{Wanted, kind};
use crate::crd::{BrokerSpec, BrokerSummary, SafetyCheck, TaskQueueStatus};

/// Brokers by endpoint, shared by every TaskQueue on the same endpoint so they share a connection.
#[derive(Default)]
pub struct Brokers {
    by_endpoint: Mutex<HashMap<EndpointKey, Arc<Broker>>>,
    /// Worker-event subscriptions, by the address of the endpoint's [`Broker`]; started by the
    /// autoscaler on first use, one per endpoint.
    events: Mutex<HashMap<usize, Subscription>>,
    /// Queue latency trackers, by the address of the endpoint's [`Broker`] (see [`Self::probe`]).
    latencies: Mutex<HashMap<usize, QueueLatencies>>,
}

/// One endpoint's worker-event subscription.
struct Subscription {
    /// Keeps the Broker alive so its address is never reused by another endpoint.
    _broker: Arc<Broker>,
    /// The endpoint's configuration, to start the subscription with.
    config: BrokerConfig,
    events: Option<WorkerEvents>,
    /// Since when the subscription has been up without a break.
    up_since: Option<Instant>,
}

/// How long a fresh subscription listens before its view of the fleet is trusted: workers send a
/// heartbeat every 2 s, so after this every live worker has been heard.
const EVENTS_WARM_UP: Duration = Duration::from_secs(5);

impl Brokers {
    /// The broker for this endpoint, created on first use (no network I/O here).
    pub fn get(&self, spec: &BrokerSpec, resolved: &ResolvedBroker) -> Result<Arc<Broker>, ProbeError> {
        let key = EndpointKey::new(spec, resolved);
        let mut brokers = self.by_endpoint.lock().expect("broker map lock");
        if let Some(broker) = brokers.get(&key) {
            return Ok(broker.clone());
        }
        let config = broker_config(spec, resolved);
        let broker = Arc::new(Broker::new(config.clone())?);
        // The subscription starts with the broker, lazily: only pools that autoscale ask for it.
        let subscription = Subscription { _broker: broker.clone(), config, events: None, up_since: None };
        self.events.lock().expect("events map lock").insert(Arc::as_ptr(&broker) as usize, subscription);
        brokers.insert(key, broker.clone());
        Ok(broker)
    }

    /// Tasks running per worker hostname on this broker, from worker heartbeats (the subscription
    /// starts on the first call). `None` until the subscription has been up for a few heartbeats,
    /// and while it is down: nothing is then known about running tasks.
    pub fn activity(&self, broker: &Arc<Broker>) -> Option<Activity> {
        let id = Arc::as_ptr(broker) as usize;
        let mut subscriptions = self.events.lock().expect("events map lock");
        let sub = subscriptions.get_mut(&id)?;
        if sub.events.is_none() {
            match WorkerEvents::start(&sub.config) {
                Ok(events) => sub.events = Some(events),
                Err(e) => {
                    tracing::warn!(broker = %broker.endpoint(), error = %e, "cannot subscribe to worker events");
                    return None;
                }
            }
        }
        let events = sub.events.as_ref()?;
        if !events.is_subscribed() {
            sub.up_since = None;
            return None;
        }
        let up_since = *sub.up_since.get_or_insert_with(Instant::now);
        if up_since.elapsed() < EVENTS_WARM_UP {
            return None;
        }
        Some(events.alive())
    }

    /// Probes `queues` on `broker`, with the hints the latency trackers of those queues need, and
    /// feeds the result to them (every caller that probes an endpoint should come through here, so
    /// each queue's tracker sees every probe of it; [`Self::latency`] then reads the age).
    pub async fn probe(&self, broker: &Arc<Broker>, queues: &[&str]) -> Result<BrokerObservation, ProbeError> {
        let id = Arc::as_ptr(broker) as usize;
        let (hints, generations) =
            self.latencies.lock().expect("latency map lock").entry(id).or_default().hints(queues);
        let observation = broker.probe_with(queues, &hints).await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut latencies = self.latencies.lock().expect("latency map lock");
        let book = latencies.entry(id).or_default();
        book.observe(now, &observation, &generations);
        book.forget_idle(Instant::now());
        Ok(observation)
    }

    /// The age of `queue`'s oldest waiting task on `broker` as of the last [`Self::probe`] of it:
    /// `Some(ZERO)` when nothing due waits, `None` when the probe cannot tell (RabbitMQ without
    /// publish statistics, a Redis walk turned off) or the queue was not probed through here.
    pub fn latency(&self, broker: &Arc<Broker>, queue: &str) -> Option<Latency> {
        let id = Arc::as_ptr(broker) as usize;
        self.latencies.lock().expect("latency map lock").get(&id)?.latency(queue)
    }
}

/// One endpoint's queue latency trackers, one [`LatencyTracker`] per queue, so that probes of
/// different sets of queues (a TaskQueue's own, an autoscaler poll's) all feed the same queue's
/// tracker. A probe whose queue was observed by another probe between taking the hints and
/// returning is not fed to it: the tracker expects its own hints back.
#[derive(Default)]
pub struct QueueLatencies {
    queues: HashMap<String, QueueTrack>,
}

struct QueueTrack {
    tracker: LatencyTracker,
    /// Observations taken in; compared against the hints' to drop a probe overtaken by another.
    generation: u64,
    /// Whether the last probe reported the head of the queue (latency is known).
    tracked: bool,
    last_probe: Instant,
}

/// A queue's tracker is dropped when no probe has looked at it for this long.
const LATENCY_IDLE: Duration = Duration::from_secs(600);

impl QueueLatencies {
    /// The hints for a probe of `queues`, and the trackers' generations to hand back to
    /// [`Self::observe`].
    pub fn hints(&mut self, queues: &[&str]) -> (ProbeHints, HashMap<String, u64>) {
        let mut hints = ProbeHints::default();
        let mut generations = HashMap::with_capacity(queues.len());
        for q in queues {
            let Some(track) = self.queues.get(*q) else { continue };
            hints.markers.extend(track.tracker.hints().markers);
            generations.insert((*q).to_string(), track.generation);
        }
        (hints, generations)
    }

    /// Takes in a probe made at `now` (Unix seconds) with the hints of [`Self::hints`].
    pub fn observe(&mut self, now: f64, observation: &BrokerObservation, generations: &HashMap<String, u64>) {
        for (name, queue) in &observation.queues {
            let track = self.queues.entry(name.clone()).or_insert_with(|| QueueTrack {
                tracker: LatencyTracker::new(),
                generation: 0,
                tracked: false,
                last_probe: Instant::now(),
            });
            if generations.get(name).copied().unwrap_or(0) != track.generation {
                continue;
            }
            let one = BrokerObservation {
                queues: [(name.clone(), queue.clone())].into(),
                info: observation.info.clone(),
                findings: Vec::new(),
            };
            track.tracker.observe(now, &one);
            track.generation += 1;
            track.tracked = queue.head.is_some();
            track.last_probe = Instant::now();
        }
    }

    /// See [`Brokers::latency`].
    pub fn latency(&self, queue: &str) -> Option<Latency> {
        let track = self.queues.get(queue).filter(|t| t.tracked)?;
        Some(
            track.tracker.latency(queue).unwrap_or(Latency {
                oldest_wait: Duration::ZERO,
                basis: celery_broker::latency::LatencyBasis::Sighting,
            }),
        )
    }

    /// Drops the trackers of queues no probe has looked at for [`LATENCY_IDLE`].
    fn forget_idle(&mut self, now: Instant) {
        self.queues.retain(|_, t| now.saturating_duration_since(t.last_probe) < LATENCY_IDLE);
    }
}

/// Depth fields and conditions for one queue from a successful probe.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueReport {
    /// Waiting messages.
    pub ready: i64,
    /// Unacknowledged messages, when the broker can tell.
    pub unacked: Option<i64>,
    /// Consumers (RabbitMQ).
    pub consumers: Option<i64>,
    /// Of `ready`, tasks due now (Redis; RabbitMQ cannot tell without consuming).
    pub waiting: Option<i64>,
    /// Tasks whose ETA is still in the future (on the queue, held by workers, or in RabbitMQ's
    /// delayed-delivery queues for this queue alone), when the broker can tell.
    pub scheduled: Option<i64>,
    /// Whole seconds the oldest waiting due task has waited (0 when none waits), when known.
    pub latency_seconds: Option<i64>,
    /// The same, unrounded, for the metric.
    pub latency: Option<Duration>,
    /// Broker facts for status.
    pub broker: BrokerSummary,
    /// BrokerReachable, BrokerSafe (unless checks are off) and Ready.
    pub conditions: Vec<Wanted>,
}

/// Maps a probe of the broker to the status of `queue` (a Celery queue name); `latency` is the
/// queue's from [`Brokers::latency`].
pub fn report(
    observation: &BrokerObservation,
    queue: &str,
    endpoint: String,
    safety: SafetyCheck,
    latency: Option<Latency>,
) -> QueueReport {
    let seen = observation.queues.get(queue).cloned().unwrap_or_default();
    let relevant: Vec<_> = observation
        .findings
        .iter()
        .filter(|f| f.queue.as_deref().is_none_or(|q| q == queue) && f.severity >= Severity::Warning)
        .collect();
    let mut conditions =
        vec![Wanted::yes(kind::BROKER_REACHABLE, "Probed", format!("{} answered", observation.info.kind))];
    if safety != SafetyCheck::Off {
        conditions.push(match relevant.iter().max_by_key(|f| f.severity) {
            None => Wanted::yes(kind::BROKER_SAFE, "NoFindings", "the broker cannot silently drop this queue's tasks"),
            Some(worst) => {
                let message = relevant.iter().map(|f| f.message.as_str()).collect::<Vec<_>>().join("; ");
                Wanted::no(kind::BROKER_SAFE, &worst.reason.to_string(), message)
            }
        });
    }
    let missing = relevant.iter().find(|f| f.reason == celery_broker::Reason::QueueMissing);
    conditions.insert(
        0,
        match missing {
            Some(f) => Wanted::no(kind::READY, "QueueMissing", f.message.clone()),
            None => Wanted::yes(kind::READY, "Probed", format!("{} ready, broker reachable", seen.ready)),
        },
    );
    let info = &observation.info;
    QueueReport {
        ready: seen.ready as i64,
        unacked: seen.unacked.map(|u| u as i64),
        consumers: seen.consumers.map(i64::from),
        waiting: seen.waiting.map(saturating_i64),
        scheduled: seen.scheduled.as_ref().map(|s| saturating_i64(s.total())),
        latency_seconds: latency.map(|l| saturating_i64(l.oldest_wait.as_secs())),
        latency: latency.map(|l| l.oldest_wait),
        broker: BrokerSummary {
            kind: info.kind.to_string(),
            endpoint: Some(endpoint),
            eviction_policy: info.eviction_policy.clone(),
            maxmemory_bytes: info.maxmemory_bytes.map(|b| b as i64),
            used_memory_bytes: info.used_memory_bytes.map(|b| b as i64),
        },
        conditions,
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The status numbers that move with the load, as one value to compare.
pub type Moving = (Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);

impl QueueReport {
    /// The numbers this report would write.
    pub fn moving(&self) -> Moving {
        (Some(self.ready), self.unacked, self.consumers, self.waiting, self.scheduled, self.latency_seconds)
    }

    /// The numbers `status` holds.
    pub fn moving_in(status: &TaskQueueStatus) -> Moving {
        (status.ready, status.unacked, status.consumers, status.waiting, status.scheduled, status.latency_seconds)
    }

    /// Writes the numbers into `status`.
    pub fn write_numbers(&self, status: &mut TaskQueueStatus) {
        status.ready = Some(self.ready);
        status.unacked = self.unacked;
        status.consumers = self.consumers;
        status.waiting = self.waiting;
        status.scheduled = self.scheduled;
        status.latency_seconds = self.latency_seconds;
    }
}

/// Conditions after a failed probe: never a crash, and the error text carries no password.
pub fn unreachable(error: &ProbeError) -> Vec<Wanted> {
    vec![
        Wanted::no(kind::READY, "BrokerUnreachable", error.to_string()),
        Wanted::no(kind::BROKER_REACHABLE, "BrokerUnreachable", error.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_broker::latency::{HeadSample, ListHead};
    use celery_broker::{BrokerInfo, BrokerKind, QueueObservation, Scheduled};

    fn observation(queues: &[(&str, u64, bool)]) -> BrokerObservation {
        BrokerObservation {
            queues: queues
                .iter()
                .map(|&(name, ready, walked)| {
                    let head = walked.then(|| {
                        HeadSample::Lists(vec![ListHead {
                            len: ready,
                            scanned: ready,
                            newest: (ready > 0).then(|| format!("{name}-{ready:08}")),
                            ..ListHead::default()
                        }])
                    });
                    (name.to_string(), QueueObservation { ready, head, ..QueueObservation::default() })
                })
                .collect(),
            info: BrokerInfo::new(BrokerKind::Redis),
            findings: Vec::new(),
        }
    }

    #[test]
    fn probes_of_different_queue_sets_feed_each_queues_own_tracker() {
        let mut book = QueueLatencies::default();
        let (_, generations) = book.hints(&["a", "b"]);
        book.observe(1000.0, &observation(&[("a", 0, true), ("b", 0, false)]), &generations);
        // Walked and empty: nothing waits. Not walked: unknown.
        assert_eq!(book.latency("a").map(|l| l.oldest_wait), Some(Duration::ZERO));
        assert_eq!(book.latency("b"), None);
        assert_eq!(book.latency("never-probed"), None);
        // A probe of `a` alone keeps `b`'s tracker.
        let (_, generations) = book.hints(&["a"]);
        book.observe(1001.0, &observation(&[("a", 0, true)]), &generations);
        assert!(book.queues.contains_key("b"));
    }

    #[test]
    fn a_probe_overtaken_by_another_is_not_fed_to_the_tracker() {
        let mut book = QueueLatencies::default();
        let (_, first) = book.hints(&["a"]);
        book.observe(1000.0, &observation(&[("a", 0, true)]), &first);
        let (_, slow) = book.hints(&["a"]);
        let (_, fast) = book.hints(&["a"]);
        book.observe(1001.0, &observation(&[("a", 0, true)]), &fast);
        let generation = book.queues["a"].generation;
        book.observe(1002.0, &observation(&[("a", 0, true)]), &slow);
        assert_eq!(book.queues["a"].generation, generation, "the slow probe's result was dropped");
    }

    #[test]
    fn the_report_carries_scheduled_tasks_and_latency() {
        let mut seen = observation(&[("a", 5, true)]);
        let q = seen.queues.get_mut("a").unwrap();
        q.waiting = Some(3);
        q.scheduled = Some(Scheduled { listed: 2, held: 7, ..Scheduled::default() });
        let latency =
            Latency { oldest_wait: Duration::from_millis(4200), basis: celery_broker::latency::LatencyBasis::Sighting };
        let report = report(&seen, "a", "redis://r:6379/0".into(), SafetyCheck::Warn, Some(latency));
        assert_eq!((report.waiting, report.scheduled, report.latency_seconds), (Some(3), Some(9), Some(4)));
        let mut status = TaskQueueStatus::default();
        assert_ne!(report.moving(), QueueReport::moving_in(&status));
        report.write_numbers(&mut status);
        assert_eq!(report.moving(), QueueReport::moving_in(&status));
        assert_eq!((status.ready, status.latency_seconds), (Some(5), Some(4)));
    }
}
