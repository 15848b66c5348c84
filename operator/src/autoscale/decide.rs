//! The autoscaler's decision: how many worker replicas a pool should run, given one broker probe.
//!
//! A pure function of (policy, carried state, current replicas, probe, time) so every rule of
//! DESIGN §6 can be pinned down by table and property tests; the loop around it does the I/O
//! (probing the broker, reading and patching the Deployment, writing status).
//!
//! The rules, in the order they apply:
//! - demand is the work Celery will do soon, not every message the broker holds (DESIGN §6b).
//!   *Due work* is the waiting tasks that are due, plus the in-flight tasks that are due (reserved
//!   or running), plus the scheduled tasks (ETA/countdown) that come due within the lead time, so
//!   workers are up when they come due. Scheduled tasks further ahead are not demand: a worker holds them (Celery
//!   raises its prefetch limit for each), and a warm shutdown only puts them back on the list;
//! - the depth rule: ceil(due work / targetPerReplica);
//! - the latency rule, with `targetLatencySeconds`: once the oldest waiting task has waited longer
//!   than the target, enough replicas to work off the due tasks within the target at the
//!   per-replica rate measured from heartbeats. The larger of the two rules wins, and the decision
//!   says which ([`Rule`]);
//! - a pool that holds only scheduled tasks keeps one replica (and never more, whatever their
//!   number): someone must hold them, and scaling in would only move them back to the list;
//! - a pool at zero wakes only when the due waiting work (including scheduled tasks coming due)
//!   exceeds `activationThreshold` (with no workers nothing is in flight, and stale unacked entries
//!   must not wake it);
//! - up: at once, in one step, to the demand;
//! - down: only to the highest demand seen within the stabilization window (as the HPA's
//!   scale-down stabilization), so a pool shrinks only after demand stayed lower for the whole
//!   window. Never to zero while anything is in flight, which the formula already guarantees: any
//!   in-flight task makes the demand at least one;
//! - a failed probe never scales down: it holds. After [`FAILURES_BEFORE_FALLBACK`] failures in a row
//!   `fallbackReplicas` is used when set, and a success resets the count;
//! - the result always lies within [minReplicas, maxReplicas], even when that means leaving the
//!   current count at once because the user just changed the bounds: the bounds are the user's
//!   latest word, and holding a count outside them would leave the pool out of spec indefinitely.
//!
//! Time is an input: any monotonic `Copy + Ord` type to which a [`Duration`] can be added
//! (`std::time::Instant`, `tokio::time::Instant`, or a `Duration` since an arbitrary epoch in tests).

use std::collections::VecDeque;
use std::fmt;
use std::ops::Add;
use std::time::Duration;

use crate::crd::WorkerPoolSpec;

/// Failed probes in a row after which `fallbackReplicas` applies. Three polls tell a broken broker
/// from a single dropped connection without leaving the pool blind for long (3 s at the default
/// 1 s poll interval).
pub const FAILURES_BEFORE_FALLBACK: u32 = 3;

/// What one successful broker probe saw for a pool's queues. The first two fields are all the
/// broker can always tell; the others refine them where it can, and default to "nothing known"
/// (which gives the plain depth rule of `ceil((backlog + in flight) / targetPerReplica)`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observation {
    /// Messages waiting to be delivered (ready), summed over the pool's queues.
    pub backlog: u64,
    /// Messages delivered but not yet acknowledged: tasks reserved or running on workers.
    pub in_flight: u64,
    /// Of `backlog`, messages whose ETA is still in the future (on Redis, e.g. put back on the
    /// list by a worker's warm shutdown). Not due, so not demand.
    pub backlog_scheduled: u64,
    /// Of `in_flight`, tasks workers hold until a future ETA. Not due, so not demand.
    pub in_flight_scheduled: u64,
    /// The most of the rest of `in_flight` that can be due work, where the broker cannot tell held
    /// ETA tasks from prefetched ones (RabbitMQ): the tasks the pool's workers run plus the full
    /// prefetch windows of the saturated ones (Celery's prefetch limit counts only due tasks; a
    /// worker with an idle process would start a reserved task at once). In-flight tasks beyond it
    /// are taken as scheduled. `None`: no such bound.
    pub in_flight_due_limit: Option<u64>,
    /// Scheduled tasks (wherever they are) that come due within the pool's lead time.
    pub due_soon: u64,
    /// All scheduled tasks known, `due_soon` included.
    pub scheduled: u64,
    /// How long the oldest waiting due task has waited (the largest over the pool's queues).
    pub oldest_wait: Option<Duration>,
    /// Tasks one replica works off per second, measured from heartbeats while the pool was busy.
    pub per_replica_rate: Option<f64>,
}

impl Observation {
    /// Waiting tasks that are due.
    pub fn waiting_due(&self) -> u64 {
        self.backlog.saturating_sub(self.backlog_scheduled)
    }

    /// In-flight tasks that are due (reserved or running), within [`Self::in_flight_due_limit`].
    pub fn in_flight_due(&self) -> u64 {
        let due = self.in_flight.saturating_sub(self.in_flight_scheduled);
        self.in_flight_due_limit.map_or(due, |limit| due.min(limit))
    }

    /// Scheduled tasks known: `scheduled`, or the in-flight tasks beyond the due limit if more.
    pub fn scheduled_known(&self) -> u64 {
        let beyond_limit = self.in_flight.saturating_sub(self.in_flight_scheduled).saturating_sub(self.in_flight_due());
        self.scheduled.max(beyond_limit)
    }
}

/// The outcome of one poll of the broker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Probe {
    /// The broker answered.
    Ok(Observation),
    /// The broker could not be read; nothing is known about the queues.
    Failed,
}

/// The autoscaling settings of one WorkerPool, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Fewest replicas (`minReplicas`); 0 allows scale to zero.
    pub min: u32,
    /// Most replicas (`maxReplicas`). Wins over `min` if the two ever disagree.
    pub max: u32,
    /// Tasks one replica is sized for (`targetPerReplica`, default `concurrency`); at least 1.
    pub target_per_replica: u64,
    /// A pool at zero wakes only when the backlog exceeds this (`activationThreshold`).
    pub activation_threshold: u64,
    /// How long demand must stay lower before scaling down (`scaleDownStabilizationSeconds`).
    pub stabilization: Duration,
    /// Replicas to run after repeated probe failures (`fallbackReplicas`); `None` holds instead.
    pub fallback: Option<u32>,
    /// Failed probes in a row before `fallback` applies.
    pub failures_before_fallback: u32,
    /// Time between probes (`pollIntervalSeconds`), for the loop that calls [`decide`].
    pub poll_interval: Duration,
    /// `targetLatencySeconds`: the longest the oldest task should wait; `None` turns the latency
    /// rule off.
    pub target_latency: Option<Duration>,
    /// `leadTimeSeconds`: how far ahead scheduled tasks count as demand; `None` means the pool's
    /// observed pod start-up (see [`super::demand::lead_time`]). Used by the loop that builds the
    /// [`Observation`], not by [`decide`] itself.
    pub lead_time: Option<Duration>,
}

impl Policy {
    /// The policy of a pool, or `None` when it has no `autoscaling` (spec.replicas rules then).
    ///
    /// The CRD schema and CEL rules already keep values in range; out-of-range values (an API
    /// server without CEL, a hand-built spec) are pulled into range rather than rejected, with
    /// `maxReplicas` winning over `minReplicas` so the pool never grows past what the user allowed.
    pub fn from_spec(spec: &WorkerPoolSpec) -> Option<Self> {
        let a = spec.autoscaling.as_ref()?;
        let max = non_negative(a.max_replicas.into());
        let target = a.target_per_replica.unwrap_or(spec.concurrency);
        Some(Self {
            min: non_negative(a.min_replicas.into()).min(max),
            max,
            target_per_replica: u64::from(non_negative(target.into()).max(1)),
            activation_threshold: a.activation_threshold.max(0).unsigned_abs(),
            stabilization: Duration::from_secs(non_negative(a.scale_down_stabilization_seconds.into()).into()),
            fallback: a.fallback_replicas.map(|f| non_negative(f.into())),
            failures_before_fallback: FAILURES_BEFORE_FALLBACK,
            poll_interval: Duration::from_secs(non_negative(a.poll_interval_seconds.into()).max(1).into()),
            target_latency: a.target_latency_seconds.map(|s| Duration::from_secs(non_negative(s.into()).max(1).into())),
            lead_time: a.lead_time_seconds.map(|s| Duration::from_secs(non_negative(s.into()).into())),
        })
    }

    /// `n` pulled into [min, max]; `max` wins if the two disagree (`Ord::clamp` would panic).
    fn bound(&self, n: u32) -> u32 {
        n.max(self.min).min(self.max)
    }

    /// The bound `n` runs into, if any.
    fn limit(&self, n: u32) -> Option<Limit> {
        if n > self.max {
            Some(Limit::AtMax)
        } else if n < self.min {
            Some(Limit::AtMin)
        } else {
            None
        }
    }

    /// Replicas the observation asks for on its own, before stabilization and bounds, and the
    /// rule that asked.
    fn demand(&self, current: u32, seen: &Observation) -> Demand {
        let waiting = seen.waiting_due();
        let in_flight = seen.in_flight_due();
        let due_soon = seen.due_soon;
        let of = |desired: u32, rule: Rule| Demand { waiting, in_flight, due_soon, desired, rule };
        if current == 0 && waiting.saturating_add(due_soon) <= self.activation_threshold {
            return of(0, Rule::Depth { due_soon });
        }
        let tasks = waiting.saturating_add(in_flight).saturating_add(due_soon);
        let depth = replicas(tasks.div_ceil(self.target_per_replica.max(1)));
        match self.latency_demand(waiting.saturating_add(in_flight), seen) {
            Some((desired, rule)) if desired > depth => of(desired, rule),
            _ if depth == 0 && current > 0 && seen.scheduled_known() > 0 => {
                of(1, Rule::Scheduled { scheduled: seen.scheduled_known() })
            }
            _ => of(depth, Rule::Depth { due_soon }),
        }
    }

    /// The latency rule: replicas enough to work off `tasks` before the oldest of them has waited
    /// `targetLatencySeconds`, at the measured per-replica rate. The time left is the target minus
    /// the oldest task's wait, but never less than a quarter of the target: a backlog already late
    /// is worked off fast rather than asking for an unbounded pool. It acts from the first poll that
    /// sees a backlog, not once the target is already missed (which kept the oldest wait near twice
    /// the target in the mixed-workload benchmark).
    fn latency_demand(&self, tasks: u64, seen: &Observation) -> Option<(u32, Rule)> {
        let target = self.target_latency?;
        let oldest_wait = seen.oldest_wait?;
        let rate = seen.per_replica_rate.filter(|r| r.is_finite() && *r > 0.0)?;
        if tasks == 0 {
            return None;
        }
        let within = target.saturating_sub(oldest_wait).max(target / 4).max(Duration::from_millis(1));
        let needed = (tasks as f64 / (rate * within.as_secs_f64())).ceil();
        let desired = if needed >= f64::from(u32::MAX) { u32::MAX } else { needed as u32 };
        let per_replica_milli = (rate * 1000.0).round().min(u64::MAX as f64) as u64;
        Some((desired, Rule::Latency { oldest_wait, target, within, per_replica_milli }))
    }
}

fn replicas(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// What one observation asks for.
#[derive(Clone, Copy, Debug)]
struct Demand {
    /// Waiting tasks that are due.
    waiting: u64,
    /// In-flight tasks that are due.
    in_flight: u64,
    /// Scheduled tasks coming due within the lead time.
    due_soon: u64,
    desired: u32,
    rule: Rule,
}

/// Which rule set a demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Due work over `targetPerReplica` (waiting, in flight, and `due_soon` scheduled tasks coming
    /// due within the lead time).
    Depth {
        /// Scheduled tasks counted because they come due within the lead time.
        due_soon: u64,
    },
    /// The oldest task waited longer than `targetLatencySeconds`: replicas enough to work off the
    /// due tasks within it.
    Latency {
        /// How long the oldest task has waited.
        oldest_wait: Duration,
        /// `targetLatencySeconds`.
        target: Duration,
        /// The time the backlog is sized to be worked off in.
        within: Duration,
        /// Measured tasks per second per replica, in thousandths.
        per_replica_milli: u64,
    },
    /// Nothing is due, but the pool holds scheduled tasks: one replica keeps holding them.
    Scheduled {
        /// Scheduled tasks known.
        scheduled: u64,
    },
}

impl Rule {
    /// The rule's name in CamelCase, for status and metrics: `Depth`, `Latency` or `Scheduled`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Depth { .. } => "Depth",
            Self::Latency { .. } => "Latency",
            Self::Scheduled { .. } => "Scheduled",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Depth { due_soon: 0 } => f.write_str("sized for the due tasks"),
            Self::Depth { due_soon } => {
                write!(f, "sized for the due tasks, {due_soon} of them scheduled and coming due within the lead time")
            }
            Self::Latency { oldest_wait, target, within, per_replica_milli } => write!(
                f,
                "the oldest task has waited {} s of the {} s latency target: sized to work off the backlog within \
                 {} s at {:.2} tasks/s per replica",
                oldest_wait.as_secs(),
                target.as_secs(),
                within.as_secs(),
                per_replica_milli as f64 / 1000.0
            ),
            Self::Scheduled { scheduled } => {
                write!(f, "nothing is due; one replica holds the {scheduled} scheduled task(s) until they are")
            }
        }
    }
}

fn non_negative(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// What the autoscaler remembers between polls of one pool.
///
/// Lost when the operator restarts or leadership moves; the first decision afterwards therefore
/// treats the current replica count as just desired, so a new leader scales down only after a full
/// stabilization window instead of at once on its first observation.
#[derive(Clone, Debug)]
pub struct ScalerState<T> {
    /// Demands seen within the stabilization window that can still be its maximum: oldest (and
    /// highest) first, each strictly lower and later than the one before. An entry at or below a
    /// later one can never be the maximum again, so it is dropped; this keeps the window small
    /// (at most one entry per distinct demand) and its maximum at the front.
    window: VecDeque<(T, u32)>,
    /// Whether the window holds anything from this process (see the type's documentation).
    primed: bool,
    consecutive_failures: u32,
    last_scale: Option<(T, Reason)>,
}

impl<T> Default for ScalerState<T> {
    fn default() -> Self {
        Self { window: VecDeque::new(), primed: false, consecutive_failures: 0, last_scale: None }
    }
}

impl<T: Copy + Ord + Add<Duration, Output = T>> ScalerState<T> {
    /// State for a pool the autoscaler has not yet decided for.
    pub fn new() -> Self {
        Self::default()
    }

    /// Failed probes since the last successful one.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// When and why the replica count was last changed (for status `lastScaleTime`/`lastScaleReason`).
    pub fn last_scale(&self) -> Option<&(T, Reason)> {
        self.last_scale.as_ref()
    }

    /// Adds a demand seen at `now` and forgets what left the window; returns the window's highest.
    fn remember(&mut self, stabilization: Duration, now: T, desired: u32) -> u32 {
        while self.window.back().is_some_and(|&(_, d)| d <= desired) {
            self.window.pop_back();
        }
        self.window.push_back((now, desired));
        // Expired entries sit at the front (oldest); the newest entry never expires here.
        while self.window.len() > 1 && self.window.front().is_some_and(|&(at, _)| at + stabilization <= now) {
            self.window.pop_front();
        }
        self.window.front().map_or(desired, |&(_, d)| d)
    }
}

/// A bound the replica count was held at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Demand was below `minReplicas`.
    AtMin,
    /// Demand was above `maxReplicas`.
    AtMax,
}

impl Limit {
    /// Reason of the `ScalingLimited=True` condition (the HPA's words).
    pub fn condition_reason(self) -> &'static str {
        match self {
            Self::AtMin => "TooFewReplicas",
            Self::AtMax => "TooManyReplicas",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AtMin => "held at minReplicas",
            Self::AtMax => "held at maxReplicas",
        })
    }
}

/// Why a decision came out as it did. Displayed for status `lastScaleReason` and events; the
/// variant name ([`Reason::kind`]) is a low-cardinality label for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Demand is above the current count: up in one step.
    ScaleUp {
        /// Messages waiting.
        backlog: u64,
        /// Messages being worked on.
        in_flight: u64,
        /// Replicas the demand asks for (before bounds).
        desired: u32,
    },
    /// Demand stayed below the current count for the whole stabilization window.
    ScaleDown {
        /// Messages waiting.
        backlog: u64,
        /// Messages being worked on.
        in_flight: u64,
        /// The highest demand within the window (before bounds).
        desired: u32,
    },
    /// Demand matches the current count.
    Steady {
        /// Messages waiting.
        backlog: u64,
        /// Messages being worked on.
        in_flight: u64,
    },
    /// Demand fell, but a demand at least as high as the current count was seen within the
    /// stabilization window.
    Stabilizing {
        /// What the latest observation asks for.
        desired: u32,
        /// The highest demand within the window.
        highest: u32,
    },
    /// The pool is at zero and the backlog does not exceed `activationThreshold`.
    BelowActivation {
        /// Messages waiting.
        backlog: u64,
        /// `activationThreshold`.
        threshold: u64,
    },
    /// The broker probe failed: holding the current count.
    ProbeFailed {
        /// Failed probes in a row.
        consecutive_failures: u32,
    },
    /// The broker probe failed repeatedly: running `fallbackReplicas`.
    Fallback {
        /// Failed probes in a row.
        consecutive_failures: u32,
    },
    /// The current count lies outside [minReplicas, maxReplicas] (the user changed the bounds).
    OutOfBounds(Limit),
}

impl Reason {
    /// The variant's name in CamelCase, e.g. `ScaleUp`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ScaleUp { .. } => "ScaleUp",
            Self::ScaleDown { .. } => "ScaleDown",
            Self::Steady { .. } => "Steady",
            Self::Stabilizing { .. } => "Stabilizing",
            Self::BelowActivation { .. } => "BelowActivation",
            Self::ProbeFailed { .. } => "ProbeFailed",
            Self::Fallback { .. } => "Fallback",
            Self::OutOfBounds(_) => "OutOfBounds",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ScaleUp { backlog, in_flight, desired } => {
                write!(f, "backlog {backlog} and {in_flight} in flight need {desired} replicas")
            }
            Self::ScaleDown { backlog, in_flight, desired } => write!(
                f,
                "demand stayed at or below {desired} replicas for the stabilization window \
                 (backlog {backlog}, {in_flight} in flight)"
            ),
            Self::Steady { backlog, in_flight } => {
                write!(f, "backlog {backlog} and {in_flight} in flight match the current replicas")
            }
            Self::Stabilizing { desired, highest } => write!(
                f,
                "demand fell to {desired} replicas; keeping {highest}, the highest within the \
                 stabilization window"
            ),
            Self::BelowActivation { backlog, threshold } => {
                write!(f, "at zero replicas: backlog {backlog} does not exceed activationThreshold {threshold}")
            }
            Self::ProbeFailed { consecutive_failures } => {
                write!(f, "broker probe failed ({consecutive_failures} in a row); holding the current replicas")
            }
            Self::Fallback { consecutive_failures } => {
                write!(f, "broker probe failed {consecutive_failures} times in a row; running fallbackReplicas")
            }
            Self::OutOfBounds(Limit::AtMin) => f.write_str("current replicas are below minReplicas"),
            Self::OutOfBounds(Limit::AtMax) => f.write_str("current replicas are above maxReplicas"),
        }
    }
}

/// The outcome of one poll. `reason` tells what the demand (or the failure) asked for; `limited`
/// tells whether a bound kept `replicas` from following it. Whether anything changes is
/// `replicas != current`: a pool held at maxReplicas still reports the `ScaleUp` that wants more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to run; always within [min, max].
    pub replicas: u32,
    /// Why.
    pub reason: Reason,
    /// The bound `replicas` was held at, for the `ScalingLimited` condition.
    pub limited: Option<Limit>,
    /// What this poll alone asks for, before stabilization and bounds: the demand of the
    /// observation, `fallbackReplicas` in fallback, or the current count while holding on a failure.
    pub raw_desired: u32,
    /// The rule that set `raw_desired` (`None` when the probe failed).
    pub rule: Option<Rule>,
}

/// Decides the replicas of one pool from one probe taken at `now`.
///
/// `current` is the replica count in force (the worker Deployment's `spec.replicas`); `state`
/// carries the stabilization window and failure count between calls for the same pool. `now`
/// must not go backwards between calls.
pub fn decide<T>(policy: &Policy, state: &mut ScalerState<T>, current: u32, probe: Probe, now: T) -> Decision
where
    T: Copy + Ord + Add<Duration, Output = T>,
{
    if !state.primed {
        state.primed = true;
        state.remember(policy.stabilization, now, current);
    }
    let (proposal, reason, raw_desired, rule) = match probe {
        Probe::Ok(seen) => {
            state.consecutive_failures = 0;
            let demand = policy.demand(current, &seen);
            let highest = state.remember(policy.stabilization, now, demand.desired);
            let (proposal, reason) = propose(policy, current, &demand, highest);
            (proposal, reason, demand.desired, Some(demand.rule))
        }
        Probe::Failed => {
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            let failures = state.consecutive_failures;
            match policy.fallback {
                Some(fallback) if failures >= policy.failures_before_fallback.max(1) => {
                    // Remembered like a demand, so leaving fallback for a lower observed demand
                    // waits out the window: a flapping broker does not flap the pool with it.
                    state.remember(policy.stabilization, now, fallback);
                    (fallback, Reason::Fallback { consecutive_failures: failures }, fallback, None)
                }
                _ => (current, Reason::ProbeFailed { consecutive_failures: failures }, current, None),
            }
        }
    };
    let replicas = policy.bound(proposal);
    let limited = policy.limit(proposal);
    let reason = match limited {
        // The bounds, not the demand, moved the count (or moved it against the demand).
        Some(limit) if !matches!(reason, Reason::Fallback { .. }) && moved_against(current, proposal, replicas) => {
            Reason::OutOfBounds(limit)
        }
        _ => reason,
    };
    if replicas != current {
        state.last_scale = Some((now, reason));
    }
    Decision { replicas, reason, limited, raw_desired, rule }
}

/// Where the demand alone would take the pool (HPA-style: up to the fresh demand at once, down
/// only to the highest demand in the window, otherwise stay), with the reason. The reason's
/// backlog and in-flight counts are the due ones.
fn propose(policy: &Policy, current: u32, demand: &Demand, highest: u32) -> (u32, Reason) {
    let &Demand { waiting: backlog, in_flight, due_soon, desired, .. } = demand;
    if desired > current {
        (desired, Reason::ScaleUp { backlog, in_flight, desired })
    } else if highest < current {
        (highest, Reason::ScaleDown { backlog, in_flight, desired: highest })
    } else if desired < current {
        (current, Reason::Stabilizing { desired, highest })
    } else if current == 0 && backlog.saturating_add(in_flight).saturating_add(due_soon) > 0 {
        let backlog = backlog.saturating_add(due_soon);
        (0, Reason::BelowActivation { backlog, threshold: policy.activation_threshold })
    } else {
        (current, Reason::Steady { backlog, in_flight })
    }
}

/// Whether bounding `proposal` to `replicas` changed the count where the proposal did not, or
/// moved it the other way.
fn moved_against(current: u32, proposal: u32, replicas: u32) -> bool {
    replicas != current && proposal.cmp(&current) != replicas.cmp(&current)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn policy() -> Policy {
        Policy {
            min: 0,
            max: 10,
            target_per_replica: 4,
            activation_threshold: 0,
            stabilization: secs(60),
            fallback: None,
            failures_before_fallback: 3,
            poll_interval: secs(1),
            target_latency: None,
            lead_time: None,
        }
    }

    fn seen(backlog: u64, in_flight: u64) -> Probe {
        Probe::Ok(Observation { backlog, in_flight, ..Observation::default() })
    }

    /// A pool whose state has run for a while at `current` with a matching demand, so the seed
    /// entry of a fresh state has left the window.
    fn settled(p: &Policy, current: u32) -> ScalerState<Duration> {
        let mut state = ScalerState::new();
        let tasks = u64::from(current) * p.target_per_replica;
        decide(p, &mut state, current, seen(tasks, 0), secs(0));
        decide(p, &mut state, current, seen(tasks, 0), secs(1000));
        state
    }

    #[test]
    fn demand_is_ceil_of_tasks_over_target_per_replica() {
        let p = policy();
        for (backlog, in_flight, want) in [(1, 0, 1), (4, 0, 1), (5, 0, 2), (3, 4, 2), (8, 8, 4), (0, 9, 3)] {
            let mut state = settled(&p, 1);
            let d = decide(&p, &mut state, 1, seen(backlog, in_flight), secs(1001));
            assert_eq!(d.raw_desired, want, "backlog {backlog}, in flight {in_flight}");
            assert_eq!(d.replicas, want.max(1), "backlog {backlog}, in flight {in_flight}");
        }
    }

    #[test]
    fn scale_up_is_one_step() {
        let p = policy();
        let mut state = settled(&p, 1);
        let d = decide(&p, &mut state, 1, seen(30, 4), secs(1001));
        assert_eq!(d.replicas, 9);
        assert_eq!(d.reason, Reason::ScaleUp { backlog: 30, in_flight: 4, desired: 9 });
        assert_eq!(state.last_scale(), Some(&(secs(1001), d.reason)));
    }

    #[test]
    fn scale_up_ignores_the_window() {
        let p = policy();
        let mut state = settled(&p, 1);
        decide(&p, &mut state, 1, seen(0, 4), secs(1001));
        // One second later, well within the window: up at once.
        assert_eq!(decide(&p, &mut state, 1, seen(20, 0), secs(1002)).replicas, 5);
    }

    #[test]
    fn scale_up_past_max_is_held_at_max() {
        let p = policy();
        let mut state = settled(&p, 2);
        let d = decide(&p, &mut state, 2, seen(400, 0), secs(1001));
        assert_eq!((d.replicas, d.limited, d.raw_desired), (10, Some(Limit::AtMax), 100));
        assert_eq!(d.reason.kind(), "ScaleUp");
    }

    #[test]
    fn scale_down_waits_for_stabilization_window() {
        let p = policy();
        let mut state = settled(&p, 8);
        // Demand drops from 8 to 2 at t=1001; the 8 was last seen at t=1000.
        let d = decide(&p, &mut state, 8, seen(8, 0), secs(1001));
        assert_eq!(d.replicas, 8);
        assert_eq!(d.reason, Reason::Stabilizing { desired: 2, highest: 8 });
        assert_eq!(decide(&p, &mut state, 8, seen(8, 0), secs(1059)).replicas, 8);
        let d = decide(&p, &mut state, 8, seen(8, 0), secs(1060));
        assert_eq!(d.replicas, 2);
        assert_eq!(d.reason, Reason::ScaleDown { backlog: 8, in_flight: 0, desired: 2 });
        assert_eq!(state.last_scale(), Some(&(secs(1060), d.reason)));
    }

    #[test]
    fn scale_down_goes_to_the_highest_demand_within_the_window() {
        let p = policy();
        let mut state = settled(&p, 8);
        decide(&p, &mut state, 8, seen(20, 0), secs(1010)); // 5
        decide(&p, &mut state, 8, seen(12, 0), secs(1020)); // 3
        decide(&p, &mut state, 8, seen(4, 0), secs(1030)); // 1
        // The 8 (t=1000) has left the window; 5 (t=1010) is still in it.
        let d = decide(&p, &mut state, 8, seen(4, 0), secs(1060));
        assert_eq!((d.replicas, d.reason.kind()), (5, "ScaleDown"));
        // Then 3 once the 5 has left, then 1 once the 3 has.
        assert_eq!(decide(&p, &mut state, 5, seen(4, 0), secs(1070)).replicas, 3);
        assert_eq!(decide(&p, &mut state, 3, seen(4, 0), secs(1079)).replicas, 3);
        assert_eq!(decide(&p, &mut state, 3, seen(4, 0), secs(1080)).replicas, 1);
    }

    #[test]
    fn zero_stabilization_scales_down_at_once() {
        let p = Policy { stabilization: Duration::ZERO, ..policy() };
        let mut state = ScalerState::new();
        assert_eq!(decide(&p, &mut state, 8, seen(4, 0), secs(0)).replicas, 1);
    }

    #[test]
    fn a_fresh_state_waits_a_window_before_scaling_down() {
        // After an operator restart nothing is known about the last window.
        let p = policy();
        let mut state = ScalerState::new();
        let d = decide(&p, &mut state, 6, seen(0, 0), secs(500));
        assert_eq!((d.replicas, d.reason), (6, Reason::Stabilizing { desired: 0, highest: 6 }));
        assert_eq!(decide(&p, &mut state, 6, seen(0, 0), secs(559)).replicas, 6);
        assert_eq!(decide(&p, &mut state, 6, seen(0, 0), secs(560)).replicas, 0);
    }

    #[test]
    fn scales_to_zero_when_idle_and_min_is_zero() {
        let p = policy();
        let mut state = settled(&p, 1);
        decide(&p, &mut state, 1, seen(0, 0), secs(1001));
        let d = decide(&p, &mut state, 1, seen(0, 0), secs(1060));
        assert_eq!((d.replicas, d.reason.kind()), (0, "ScaleDown"));
    }

    #[test]
    fn never_to_zero_while_in_flight() {
        let p = policy();
        let mut state = settled(&p, 3);
        for t in 1001..1200 {
            let d = decide(&p, &mut state, 3, seen(0, 1), secs(t));
            assert!(d.replicas >= 1, "went to zero at t={t} with a task in flight");
        }
        assert_eq!(decide(&p, &mut state, 3, seen(0, 1), secs(1200)).replicas, 1);
    }

    #[test]
    fn activation_threshold_from_zero() {
        let p = Policy { activation_threshold: 5, ..policy() };
        let mut state = settled(&p, 0);
        let d = decide(&p, &mut state, 0, seen(5, 0), secs(1001));
        assert_eq!((d.replicas, d.reason), (0, Reason::BelowActivation { backlog: 5, threshold: 5 }));
        let d = decide(&p, &mut state, 0, seen(6, 0), secs(1002));
        assert_eq!((d.replicas, d.reason.kind()), (2, "ScaleUp"));
    }

    #[test]
    fn in_flight_alone_does_not_wake_a_pool_at_zero() {
        let p = policy();
        let mut state = settled(&p, 0);
        let d = decide(&p, &mut state, 0, seen(0, 7), secs(1001));
        assert_eq!((d.replicas, d.reason.kind()), (0, "BelowActivation"));
        // Once awake, in-flight tasks count towards demand.
        assert_eq!(decide(&p, &mut state, 0, seen(1, 7), secs(1002)).replicas, 2);
    }

    #[test]
    fn activation_threshold_does_not_apply_above_zero() {
        let p = Policy { activation_threshold: 100, ..policy() };
        let mut state = settled(&p, 1);
        assert_eq!(decide(&p, &mut state, 1, seen(12, 0), secs(1001)).replicas, 3);
    }

    #[test]
    fn an_idle_pool_at_zero_is_steady() {
        let p = policy();
        let mut state = settled(&p, 0);
        let d = decide(&p, &mut state, 0, seen(0, 0), secs(1001));
        assert_eq!(
            d,
            Decision {
                replicas: 0,
                reason: Reason::Steady { backlog: 0, in_flight: 0 },
                limited: None,
                raw_desired: 0,
                rule: Some(Rule::Depth { due_soon: 0 }),
            }
        );
        assert_eq!(state.last_scale(), None);
    }

    #[test]
    fn probe_failure_never_scales_down() {
        let p = policy();
        let mut state = settled(&p, 7);
        for n in 1..=50 {
            let d = decide(&p, &mut state, 7, Probe::Failed, secs(1000 + u64::from(n)));
            assert_eq!(d.replicas, 7);
            assert_eq!(d.reason, Reason::ProbeFailed { consecutive_failures: n });
        }
        assert_eq!(state.consecutive_failures(), 50);
    }

    #[test]
    fn fallback_after_n_failures() {
        let p = Policy { fallback: Some(4), ..policy() };
        let mut state = settled(&p, 7);
        assert_eq!(decide(&p, &mut state, 7, Probe::Failed, secs(1001)).replicas, 7);
        assert_eq!(decide(&p, &mut state, 7, Probe::Failed, secs(1002)).replicas, 7);
        let d = decide(&p, &mut state, 7, Probe::Failed, secs(1003));
        assert_eq!(
            d,
            Decision {
                replicas: 4,
                reason: Reason::Fallback { consecutive_failures: 3 },
                limited: None,
                raw_desired: 4,
                rule: None,
            }
        );
        assert_eq!(decide(&p, &mut state, 4, Probe::Failed, secs(1004)).replicas, 4);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let p = Policy { fallback: Some(4), ..policy() };
        let mut state = settled(&p, 7);
        decide(&p, &mut state, 7, Probe::Failed, secs(1001));
        decide(&p, &mut state, 7, Probe::Failed, secs(1002));
        decide(&p, &mut state, 7, seen(28, 0), secs(1003));
        assert_eq!(state.consecutive_failures(), 0);
        assert_eq!(decide(&p, &mut state, 7, Probe::Failed, secs(1004)).replicas, 7);
        assert_eq!(decide(&p, &mut state, 7, Probe::Failed, secs(1005)).replicas, 7);
    }

    #[test]
    fn leaving_fallback_for_lower_demand_waits_for_the_window() {
        let p = Policy { fallback: Some(9), ..policy() };
        let mut state = settled(&p, 2);
        for t in 1001..=1003 {
            decide(&p, &mut state, 2, Probe::Failed, secs(t));
        }
        // The broker is back and says 2 replicas are enough; 9 was wanted at t=1003.
        let d = decide(&p, &mut state, 9, seen(8, 0), secs(1004));
        assert_eq!((d.replicas, d.reason.kind()), (9, "Stabilizing"));
        assert_eq!(decide(&p, &mut state, 9, seen(8, 0), secs(1063)).replicas, 2);
    }

    #[test]
    fn fallback_is_held_within_bounds() {
        let p = Policy { fallback: Some(40), ..policy() };
        let mut state = settled(&p, 2);
        let mut d = decide(&p, &mut state, 2, Probe::Failed, secs(1001));
        for t in 1002..=1003 {
            d = decide(&p, &mut state, 2, Probe::Failed, secs(t));
        }
        assert_eq!((d.replicas, d.limited, d.reason.kind()), (10, Some(Limit::AtMax), "Fallback"));
    }

    #[test]
    fn min_replicas_holds_an_idle_pool_up() {
        let p = Policy { min: 2, ..policy() };
        let mut state = settled(&p, 2);
        let d = decide(&p, &mut state, 2, seen(0, 0), secs(1100));
        assert_eq!((d.replicas, d.limited), (2, Some(Limit::AtMin)));
        // The reason tells the demand's story; `limited` tells why the count did not follow it.
        assert_eq!(d.reason, Reason::ScaleDown { backlog: 0, in_flight: 0, desired: 0 });
        assert_eq!(state.last_scale(), None);
    }

    #[test]
    fn current_above_a_lowered_max_is_brought_down_at_once() {
        let p = Policy { max: 5, ..policy() };
        let mut state = settled(&p, 8);
        let d = decide(&p, &mut state, 8, seen(32, 0), secs(1001));
        assert_eq!((d.replicas, d.reason, d.limited), (5, Reason::OutOfBounds(Limit::AtMax), Some(Limit::AtMax)));
        // Even when demand is higher still: the bound, not the demand, moved the count.
        let d = decide(&p, &mut state, 8, seen(80, 0), secs(1002));
        assert_eq!((d.replicas, d.reason), (5, Reason::OutOfBounds(Limit::AtMax)));
    }

    #[test]
    fn current_below_a_raised_min_is_brought_up_at_once() {
        let p = Policy { min: 3, ..policy() };
        let mut state = settled(&p, 1);
        let d = decide(&p, &mut state, 1, seen(0, 0), secs(1001));
        assert_eq!((d.replicas, d.reason), (3, Reason::OutOfBounds(Limit::AtMin)));
        let d = decide(&p, &mut state, 0, Probe::Failed, secs(1002));
        assert_eq!((d.replicas, d.reason), (3, Reason::OutOfBounds(Limit::AtMin)));
    }

    #[test]
    fn huge_backlogs_saturate_instead_of_overflowing() {
        let p = Policy { max: u32::MAX, target_per_replica: 1, ..policy() };
        let mut state = settled(&p, 1);
        let d = decide(&p, &mut state, 1, seen(u64::MAX, u64::MAX), secs(1001));
        assert_eq!(d.replicas, u32::MAX);
    }

    #[test]
    fn the_window_keeps_one_entry_per_distinct_demand() {
        let p = Policy { stabilization: secs(3600), ..policy() };
        let mut state = settled(&p, 10);
        for t in 0..3600 {
            decide(&p, &mut state, 10, seen(t % 40, 0), secs(2000 + t));
        }
        assert!(state.window.len() <= 11, "window grew to {}", state.window.len());
    }

    fn scheduled(seen: Observation) -> Probe {
        Probe::Ok(seen)
    }

    #[test]
    fn held_eta_tasks_keep_one_replica_not_fifty() {
        // 200 tasks with countdown=3600 held by a worker (Redis: every unacked entry has a future
        // ETA). Counted as in flight they asked for 50 replicas of 4 for an hour.
        let p = policy();
        let mut state = settled(&p, 1);
        let held = Observation { in_flight: 200, in_flight_scheduled: 200, scheduled: 200, ..Observation::default() };
        for t in 1001..1200 {
            let d = decide(&p, &mut state, 1, scheduled(held), secs(t));
            assert_eq!((d.replicas, d.raw_desired), (1, 1), "t={t}");
            assert_eq!(d.rule, Some(Rule::Scheduled { scheduled: 200 }));
        }
    }

    #[test]
    fn eta_tasks_put_back_by_a_shutdown_neither_wake_nor_grow_the_pool() {
        let p = Policy { min: 0, ..policy() };
        // Back on the list after a warm shutdown, nothing due: a pool at zero stays there...
        let listed = Observation { backlog: 200, backlog_scheduled: 200, scheduled: 200, ..Observation::default() };
        let mut state = settled(&p, 0);
        let d = decide(&p, &mut state, 0, scheduled(listed), secs(1001));
        assert_eq!((d.replicas, d.reason), (0, Reason::Steady { backlog: 0, in_flight: 0 }));
        // ...and a pool at one keeps one, then picks them up again.
        let mut state = settled(&p, 1);
        assert_eq!(decide(&p, &mut state, 1, scheduled(listed), secs(1001)).replicas, 1);
    }

    #[test]
    fn tasks_coming_due_within_the_lead_time_size_the_pool_before_they_are_due() {
        let p = policy();
        let mut state = settled(&p, 1);
        // 40 tasks with countdown=20 with a lead time of 30 s: they count now.
        let soon = Observation {
            in_flight: 40,
            in_flight_scheduled: 40,
            due_soon: 40,
            scheduled: 40,
            ..Observation::default()
        };
        let d = decide(&p, &mut state, 1, scheduled(soon), secs(1001));
        assert_eq!((d.replicas, d.rule), (10, Some(Rule::Depth { due_soon: 40 })));
        assert_eq!(d.reason, Reason::ScaleUp { backlog: 0, in_flight: 0, desired: 10 });
        // From zero too: coming due counts as waiting for activation.
        let mut state = settled(&p, 0);
        assert_eq!(decide(&p, &mut state, 0, scheduled(soon), secs(1001)).replicas, 10);
    }

    #[test]
    fn rabbitmq_in_flight_beyond_the_prefetch_windows_is_taken_as_scheduled() {
        // RabbitMQ cannot tell held ETA tasks from prefetched ones; workers that run 1 task and are
        // not saturated can hold at most that 1 due task.
        let p = Policy { target_per_replica: 2, ..policy() };
        let mut state = settled(&p, 2);
        let seen = Observation { in_flight: 200, in_flight_due_limit: Some(1), ..Observation::default() };
        let d = decide(&p, &mut state, 2, scheduled(seen), secs(1001));
        assert_eq!((d.raw_desired, d.reason.kind()), (1, "Stabilizing"));
        assert_eq!(seen.scheduled_known(), 199);
        // Nothing due at all: one replica keeps holding them.
        let idle = Observation { in_flight: 200, in_flight_due_limit: Some(0), ..Observation::default() };
        let d = decide(&p, &mut state, 2, scheduled(idle), secs(1100));
        assert_eq!((d.replicas, d.rule), (1, Some(Rule::Scheduled { scheduled: 200 })));
    }

    #[test]
    fn a_task_retrying_with_backoff_keeps_the_pool_small() {
        // autoretry_for + retry_backoff: one task alternates between running and being held with a
        // growing countdown.
        let p = policy();
        let mut state = settled(&p, 1);
        let mut current = 1;
        for (i, t) in (1001..1300).enumerate() {
            let seen = if i % 3 == 0 {
                Observation { in_flight: 1, ..Observation::default() }
            } else {
                Observation { in_flight: 1, in_flight_scheduled: 1, scheduled: 1, ..Observation::default() }
            };
            current = decide(&p, &mut state, current, scheduled(seen), secs(t)).replicas;
            assert_eq!(current, 1, "t={t}");
        }
    }

    #[test]
    fn the_latency_rule_sizes_for_the_time_left_before_the_target() {
        let p = Policy { max: 50, target_per_replica: 100, target_latency: Some(secs(30)), ..policy() };
        let mut state = settled(&p, 1);
        let fresh = Observation {
            backlog: 120,
            oldest_wait: Some(secs(10)),
            per_replica_rate: Some(0.5),
            ..Observation::default()
        };
        // 120 tasks at 0.5 tasks/s per replica within the 20 s left: 12 replicas; depth alone asks
        // for 2. It acts before the target is missed.
        let d = decide(&p, &mut state, 1, scheduled(fresh), secs(1001));
        assert_eq!(d.replicas, 12);
        let rule = d.rule.unwrap();
        assert_eq!(
            rule,
            Rule::Latency { oldest_wait: secs(10), target: secs(30), within: secs(20), per_replica_milli: 500 }
        );
        assert_eq!(
            rule.to_string(),
            "the oldest task has waited 10 s of the 30 s latency target: sized to work off the backlog within 20 s \
             at 0.50 tasks/s per replica"
        );
        assert_eq!(rule.kind(), "Latency");
        // Already late: a quarter of the target (7.5 s): 32 replicas.
        let mut state = settled(&p, 1);
        let late = Observation { oldest_wait: Some(secs(45)), ..fresh };
        let d = decide(&p, &mut state, 1, scheduled(late), secs(1001));
        assert_eq!(d.raw_desired, 32);
        // No backlog age known, or no measured rate: depth decides.
        let unaged = Observation { oldest_wait: None, ..fresh };
        assert_eq!(decide(&p, &mut state, 8, scheduled(unaged), secs(1002)).rule, Some(Rule::Depth { due_soon: 0 }));
        let unmeasured = Observation { per_replica_rate: None, ..fresh };
        assert_eq!(decide(&p, &mut state, 8, scheduled(unmeasured), secs(1003)).raw_desired, 2);
    }

    #[test]
    fn observations_without_refinements_decide_as_before() {
        // What a broker that tells only depth gives: the plain rule, named Depth.
        let p = policy();
        let mut state = settled(&p, 1);
        let d = decide(&p, &mut state, 1, seen(30, 4), secs(1001));
        assert_eq!((d.replicas, d.rule), (9, Some(Rule::Depth { due_soon: 0 })));
        assert_eq!(decide(&p, &mut state, 9, Probe::Failed, secs(1002)).rule, None);
    }

    #[test]
    fn reasons_read_as_explanations() {
        let cases = [
            (Reason::ScaleUp { backlog: 40, in_flight: 4, desired: 11 }, "backlog 40 and 4 in flight need 11 replicas"),
            (
                Reason::BelowActivation { backlog: 3, threshold: 5 },
                "at zero replicas: backlog 3 does not exceed activationThreshold 5",
            ),
            (
                Reason::Fallback { consecutive_failures: 3 },
                "broker probe failed 3 times in a row; running fallbackReplicas",
            ),
            (Reason::OutOfBounds(Limit::AtMax), "current replicas are above maxReplicas"),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
        assert_eq!(Limit::AtMax.condition_reason(), "TooManyReplicas");
    }
}
