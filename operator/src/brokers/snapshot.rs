//! What one poll of one broker endpoint saw, as published to every consumer of the endpoint, and
//! the incidents the poller latched from it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_broker::events::WorkerState;
use celery_broker::latency::Latency;
use celery_broker::{BrokerObservation, Finding, ProbeError, Reason};
use k8s_openapi::jiff::Timestamp;

/// How long an incident stays in the snapshot (and so in the BrokerSafe condition of the
/// TaskQueues on the endpoint) after it last happened. Its Event and metric are emitted once; the
/// condition keeps it visible for a while, whichever poll saw it.
pub const INCIDENT_HOLD: Duration = Duration::from_secs(600);
/// At most this many occurrence ids are remembered per held incident (for "N times" in Events).
const OCCURRENCES_KEPT: usize = 64;

/// Findings that report something that *happened* between two probes rather than a state the
/// broker is in: they show in exactly one probe (the broker or the probe keeps the history), so
/// whoever consumes that probe must not be the only one to hear of them.
pub fn is_incident(reason: Reason) -> bool {
    matches!(reason, Reason::KeysEvicted | Reason::EvictionPolicyFixed)
}

/// One poll of one endpoint, published to every consumer of the endpoint.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Tells this endpoint's poller from an earlier or later one for the same endpoint (a poller
    /// closed and started again counts its polls from 1 again).
    pub poller: u64,
    /// Increases by one with every poll of the endpoint by this poller.
    pub seq: u64,
    /// The broker URL with its password redacted.
    pub endpoint: String,
    /// When the probe started.
    pub started: Instant,
    /// When the probe started, as a timestamp (for messages).
    pub at: Timestamp,
    /// How long the probe took.
    pub took: Duration,
    /// Every Celery queue asked for in this poll (shared by the polls of an unchanged plan).
    pub queues: Arc<BTreeSet<String>>,
    /// The observation, without incident findings (they are in `incidents`), or why the probe
    /// failed (the error text carries no password).
    pub probe: Result<Arc<BrokerObservation>, ProbeError>,
    /// Incidents seen within [`INCIDENT_HOLD`], the latest per reason.
    pub incidents: Vec<HeldIncident>,
    /// The highest incident id so far (0: none yet).
    pub last_incident: u64,
    /// Live workers heard from the endpoint's worker events, once the subscription has been up
    /// long enough to have heard every live worker; `None` before that, while it is down, and
    /// when no consumer asked for worker events.
    pub workers: Option<Arc<Vec<WorkerState>>>,
    /// The age of the oldest waiting task per queue, where the endpoint's latency tracker knows it.
    pub latency: BTreeMap<String, Latency>,
}

impl Snapshot {
    /// Whether this poll asked for `queue` (its result, or the probe's error, concerns it).
    pub fn covers(&self, queue: &str) -> bool {
        self.queues.contains(queue)
    }

    /// Whether this poll asked for every queue in `queues`.
    pub fn covers_all<Q: AsRef<str>>(&self, queues: &[Q]) -> bool {
        queues.iter().all(|q| self.covers(q.as_ref()))
    }

    /// The observation, when the probe succeeded.
    pub fn observation(&self) -> Option<&BrokerObservation> {
        self.probe.as_ref().ok().map(|o| &**o)
    }

    /// Tasks running per worker hostname, from heartbeats (see [`workers`](Self::workers)).
    pub fn activity(&self) -> Option<std::collections::HashMap<String, u32>> {
        self.workers.as_ref().map(|w| w.iter().map(|w| (w.hostname.clone(), w.active)).collect())
    }

    /// What this snapshot tells about one queue: its own entry, the findings about it or about
    /// the whole broker, and the held incidents (their messages dated); or why the probe failed.
    pub fn view_for(&self, queue: &str) -> Result<BrokerObservation, &ProbeError> {
        let observation = self.probe.as_ref()?;
        let concerns = |f: &Finding| f.queue.as_deref().is_none_or(|q| q == queue);
        let mut findings: Vec<Finding> = observation.findings.iter().filter(|f| concerns(f)).cloned().collect();
        findings.extend(self.incidents.iter().filter(|i| concerns(&i.finding)).map(HeldIncident::dated));
        Ok(BrokerObservation {
            queues: observation.queues.get(queue).map(|q| (queue.to_owned(), q.clone())).into_iter().collect(),
            info: observation.info.clone(),
            findings,
        })
    }
}

/// The latest occurrence of one kind of incident on an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldIncident {
    /// The latest occurrence's finding.
    pub finding: Finding,
    /// When the poll that saw the latest occurrence started.
    pub at: Timestamp,
    /// Ids of the occurrences still held (the latest last; at most a few dozen).
    pub ids: Vec<u64>,
    /// When it last happened (for the hold).
    last: Instant,
}

impl HeldIncident {
    /// The id of the latest occurrence.
    pub fn id(&self) -> u64 {
        self.ids.last().copied().unwrap_or_default()
    }

    /// Occurrences with an id above `cursor`.
    pub fn since(&self, cursor: u64) -> usize {
        self.ids.iter().filter(|&&id| id > cursor).count()
    }

    /// The finding, its message saying when it happened (an incident is news about a moment).
    pub fn dated(&self) -> Finding {
        let mut finding = self.finding.clone();
        finding.message = format!("at {}: {}", self.at.strftime("%Y-%m-%dT%H:%M:%SZ"), finding.message);
        finding
    }
}

/// Incidents of one endpoint: numbered in the order they happened, the latest per reason held for
/// [`INCIDENT_HOLD`].
#[derive(Debug, Default)]
pub struct Incidents {
    last_id: u64,
    held: BTreeMap<Reason, HeldIncident>,
}

impl Incidents {
    /// Moves the incident findings out of `findings` and latches them; returns the new ones.
    pub fn latch(&mut self, findings: &mut Vec<Finding>, at: Timestamp, now: Instant) -> Vec<HeldIncident> {
        let mut new = Vec::new();
        findings.retain(|f| {
            if !is_incident(f.reason) {
                return true;
            }
            self.last_id += 1;
            let id = self.last_id;
            let held = self.held.entry(f.reason).or_insert_with(|| HeldIncident {
                finding: f.clone(),
                at,
                ids: Vec::new(),
                last: now,
            });
            held.finding = f.clone();
            held.at = at;
            held.last = now;
            held.ids.push(id);
            if held.ids.len() > OCCURRENCES_KEPT {
                held.ids.remove(0);
            }
            new.push(held.clone());
            false
        });
        new
    }

    /// Forgets incidents that last happened more than [`INCIDENT_HOLD`] before `now`.
    pub fn expire(&mut self, now: Instant) {
        self.held.retain(|_, h| now.saturating_duration_since(h.last) < INCIDENT_HOLD);
    }

    /// The held incidents, by reason.
    pub fn held(&self) -> Vec<HeldIncident> {
        self.held.values().cloned().collect()
    }

    /// The highest id handed out.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_broker::Severity;

    fn evicted(n: u32) -> Finding {
        Finding::new(Reason::KeysEvicted, Severity::Critical, format!("Redis evicted {n} keys since the last probe"))
    }

    #[test]
    fn incidents_leave_the_findings_numbered_and_held_per_reason() {
        let mut incidents = Incidents::default();
        let now = Instant::now();
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let unsafe_policy = Finding::new(Reason::EvictionPolicyUnsafe, Severity::Critical, "allkeys-lru");
        let mut findings = vec![unsafe_policy.clone(), evicted(3)];
        let new = incidents.latch(&mut findings, at, now);
        assert_eq!(findings, vec![unsafe_policy.clone()], "the state finding stays, the incident moves out");
        assert_eq!((new.len(), new[0].id()), (1, 1));

        let mut findings = vec![unsafe_policy, evicted(5)];
        incidents.latch(&mut findings, at, now);
        let held = incidents.held();
        assert_eq!(held.len(), 1, "one held incident per reason");
        assert_eq!(held[0].ids, vec![1, 2]);
        assert_eq!((held[0].since(0), held[0].since(1), held[0].since(2)), (2, 1, 0));
        assert!(held[0].dated().message.starts_with("at 2027-01-15T08:00:00Z: Redis evicted 5 keys"));
        assert_eq!(incidents.last_id(), 2);

        incidents.expire(now + INCIDENT_HOLD);
        assert!(incidents.held().is_empty());
        assert_eq!(incidents.last_id(), 2, "ids are never reused");
    }

    #[test]
    fn only_findings_about_something_that_happened_are_incidents() {
        let incidents: Vec<Reason> = Reason::ALL.iter().copied().filter(|r| is_incident(*r)).collect();
        assert_eq!(incidents, vec![Reason::EvictionPolicyFixed, Reason::KeysEvicted]);
    }
}
