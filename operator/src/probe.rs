//! The pure mapping from what a poll of the broker saw (a [`Snapshot`](crate::brokers::Snapshot)'s
//! view of one queue) to TaskQueue status and conditions. Polling itself is in
//! [`brokers`](crate::brokers).

use std::time::Duration;

use celery_broker::latency::Latency;
use celery_broker::{BrokerObservation, ProbeError, Severity};

use crate::conditions::{Wanted, kind};
use crate::crd::{BrokerSummary, SafetyCheck, TaskQueueStatus};

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
/// queue's from the endpoint's latency tracker ([`Snapshot::latency`](crate::brokers::Snapshot)).
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
    // The tracker reports no age when nothing due waits; where the probe saw the queue's head, that
    // is a wait of 0 (without a head, e.g. a Redis walk turned off, the wait is unknown).
    let latency = latency.map(|l| l.oldest_wait).or_else(|| seen.head.is_some().then_some(Duration::ZERO));
    let info = &observation.info;
    QueueReport {
        ready: seen.ready as i64,
        unacked: seen.unacked.map(|u| u as i64),
        consumers: seen.consumers.map(i64::from),
        waiting: seen.waiting.map(saturating_i64),
        scheduled: seen.scheduled.as_ref().map(|s| saturating_i64(s.total())),
        latency_seconds: latency.map(|l| saturating_i64(l.as_secs())),
        latency,
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
    use celery_broker::latency::{HeadSample, LatencyBasis, ListHead};
    use celery_broker::{BrokerInfo, BrokerKind, QueueObservation, Scheduled};

    fn observation(walked: bool) -> BrokerObservation {
        let head = walked.then(|| HeadSample::Lists(vec![ListHead { len: 5, scanned: 5, ..ListHead::default() }]));
        let queue = QueueObservation {
            ready: 5,
            waiting: Some(3),
            scheduled: Some(Scheduled { listed: 2, held: 7, ..Scheduled::default() }),
            head,
            ..QueueObservation::default()
        };
        BrokerObservation {
            queues: [("a".to_string(), queue)].into(),
            info: BrokerInfo::new(BrokerKind::Redis),
            findings: Vec::new(),
        }
    }

    #[test]
    fn the_report_carries_scheduled_tasks_and_latency() {
        let latency = Latency { oldest_wait: Duration::from_millis(4200), basis: LatencyBasis::Sighting };
        let report = report(&observation(true), "a", "redis://r:6379/0".into(), SafetyCheck::Warn, Some(latency));
        assert_eq!((report.waiting, report.scheduled, report.latency_seconds), (Some(3), Some(9), Some(4)));
        let mut status = TaskQueueStatus::default();
        assert_ne!(report.moving(), QueueReport::moving_in(&status));
        report.write_numbers(&mut status);
        assert_eq!(report.moving(), QueueReport::moving_in(&status));
        assert_eq!((status.ready, status.latency_seconds), (Some(5), Some(4)));
    }

    #[test]
    fn no_age_is_zero_where_the_head_was_seen_and_unknown_where_not() {
        let seen = report(&observation(true), "a", "e".into(), SafetyCheck::Warn, None);
        assert_eq!(seen.latency, Some(Duration::ZERO));
        let unseen = report(&observation(false), "a", "e".into(), SafetyCheck::Warn, None);
        assert_eq!(unseen.latency, None);
    }
}
