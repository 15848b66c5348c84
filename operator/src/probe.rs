//! The pure mapping from what a poll of the broker saw (a [`Snapshot`](crate::brokers::Snapshot)'s
//! view of one queue) to TaskQueue status and conditions. Polling itself is in
//! [`brokers`](crate::brokers).

use celery_broker::{BrokerObservation, ProbeError, Severity};

use crate::conditions::{Wanted, kind};
use crate::crd::{BrokerSummary, SafetyCheck};

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
            None => {
                // Incidents below Warning (a policy the operator fixed) still show until they age out.
                let recent: Vec<&str> = observation
                    .findings
                    .iter()
                    .filter(|f| crate::brokers::is_incident(f.reason) && f.queue.as_deref().is_none_or(|q| q == queue))
                    .map(|f| f.message.as_str())
                    .collect();
                let safe = "the broker cannot silently drop this queue's tasks";
                match recent.is_empty() {
                    true => Wanted::yes(kind::BROKER_SAFE, "NoFindings", safe),
                    false => {
                        Wanted::yes(kind::BROKER_SAFE, "NoFindings", format!("{safe}; recently: {}", recent.join("; ")))
                    }
                }
            }
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
