//! Broker probing for TaskQueues: one shared [`Broker`] (one connection) per endpoint, and the pure
//! mapping from what a probe saw to TaskQueue status and conditions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use celery_broker::events::WorkerEvents;
use celery_broker::{Broker, BrokerConfig, BrokerObservation, ProbeError, Severity};

use crate::autoscale::plan::Activity;
use crate::broker_config::{EndpointKey, ResolvedBroker, broker_config};
use crate::conditions::{Wanted, kind};
use crate::crd::{BrokerSpec, BrokerSummary, SafetyCheck};

/// Brokers by endpoint, shared by every TaskQueue on the same endpoint so they share a connection.
#[derive(Default)]
pub struct Brokers {
    by_endpoint: Mutex<HashMap<EndpointKey, Arc<Broker>>>,
    /// Worker-event subscriptions, by the address of the endpoint's [`Broker`]; started by the
    /// autoscaler on first use, one per endpoint.
    events: Mutex<HashMap<usize, Subscription>>,
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
        Some(events.alive().into_iter().map(|w| (w.hostname, w.active)).collect())
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
    /// Broker facts for status.
    pub broker: BrokerSummary,
    /// BrokerReachable, BrokerSafe (unless checks are off) and Ready.
    pub conditions: Vec<Wanted>,
}

/// Maps a probe of the broker to the status of `queue` (a Celery queue name).
pub fn report(observation: &BrokerObservation, queue: &str, endpoint: String, safety: SafetyCheck) -> QueueReport {
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

/// Conditions after a failed probe: never a crash, and the error text carries no password.
pub fn unreachable(error: &ProbeError) -> Vec<Wanted> {
    vec![
        Wanted::no(kind::READY, "BrokerUnreachable", error.to_string()),
        Wanted::no(kind::BROKER_REACHABLE, "BrokerUnreachable", error.to_string()),
    ]
}
