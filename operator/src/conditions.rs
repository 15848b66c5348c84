//! kstatus-compatible conditions: `Ready` always present; `Reconciling` and `Stalled` present only
//! while true ("abnormal-true" polarity); domain conditions beside them. A condition keeps its
//! lastTransitionTime until its status changes, so an unchanged reconcile yields an unchanged status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types.
pub mod kind {
    /// The object is fully reconciled and working.
    pub const READY: &str = "Ready";
    /// The operator is working towards the spec (kstatus).
    pub const RECONCILING: &str = "Reconciling";
    /// The operator cannot make progress without a change from the user (kstatus).
    pub const STALLED: &str = "Stalled";
    /// Beat runs at most once per app and namespace.
    pub const BEAT_SINGLETON: &str = "BeatSingleton";
    /// The broker answered the last probe.
    pub const BROKER_REACHABLE: &str = "BrokerReachable";
    /// The broker cannot silently drop this queue's tasks.
    pub const BROKER_SAFE: &str = "BrokerSafe";
    /// The autoscaler is in control of the worker replicas.
    pub const SCALING_ACTIVE: &str = "ScalingActive";
    /// The desired replica count was clamped to minReplicas or maxReplicas.
    pub const SCALING_LIMITED: &str = "ScalingLimited";
}

/// A condition the reconciler wants, before timestamps and generations are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Condition type.
    pub type_: &'static str,
    /// True, False or Unknown.
    pub status: Status,
    /// CamelCase reason.
    pub reason: String,
    /// Human message, naming the field and what is allowed where the user must act.
    pub message: String,
}

/// Condition status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// "True"
    True,
    /// "False"
    False,
    /// "Unknown"
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl Wanted {
    /// A condition with status True.
    pub fn yes(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, status: Status::True, reason: reason.into(), message: message.into() }
    }
    /// A condition with status False.
    pub fn no(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, status: Status::False, reason: reason.into(), message: message.into() }
    }
    /// A condition with status Unknown.
    pub fn unknown(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, status: Status::Unknown, reason: reason.into(), message: message.into() }
    }
}

/// Builds the new condition list from the wanted conditions, keeping lastTransitionTime of those
/// whose status did not change. Conditions not wanted are dropped. Order follows `wanted`.
pub fn merge(old: &[Condition], wanted: &[Wanted], generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    wanted
        .iter()
        .map(|w| {
            let previous = old.iter().find(|c| c.type_ == w.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == w.status.as_str() => p.last_transition_time.clone(),
                _ => Time(now),
            };
            Condition {
                type_: w.type_.to_string(),
                status: w.status.as_str().to_string(),
                reason: w.reason.clone(),
                message: w.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Conditions of `new` whose status or reason differs from `old` (candidates for an Event).
pub fn transitions<'a>(old: &[Condition], new: &'a [Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|n| {
            old.iter().find(|o| o.type_ == n.type_).is_none_or(|o| o.status != n.status || o.reason != n.reason)
        })
        .collect()
}

/// Whether a condition in this state is bad news (a Warning Event rather than a Normal one).
pub fn is_warning(c: &Condition) -> bool {
    match c.type_.as_str() {
        kind::STALLED => c.status == "True",
        kind::RECONCILING | kind::SCALING_LIMITED => false,
        _ => c.status == "False",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn unchanged_status_keeps_its_transition_time() {
        let first = merge(&[], &[Wanted::yes(kind::READY, "Available", "ok")], Some(1), at(100));
        let second = merge(&first, &[Wanted::yes(kind::READY, "Available", "still ok")], Some(2), at(200));
        assert_eq!(second[0].last_transition_time, Time(at(100)));
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn changed_status_moves_the_transition_time() {
        let first = merge(&[], &[Wanted::yes(kind::READY, "Available", "ok")], Some(1), at(100));
        let second = merge(&first, &[Wanted::no(kind::READY, "QueueNotFound", "gone")], Some(1), at(200));
        assert_eq!(second[0].last_transition_time, Time(at(200)));
        assert_eq!(transitions(&first, &second).len(), 1);
        assert!(is_warning(&second[0]));
    }

    #[test]
    fn same_conditions_are_no_transition() {
        let first = merge(&[], &[Wanted::yes(kind::READY, "Available", "ok")], Some(1), at(100));
        let again = merge(&first, &[Wanted::yes(kind::READY, "Available", "ok")], Some(1), at(300));
        assert_eq!(first, again);
        assert!(transitions(&first, &again).is_empty());
    }

    #[test]
    fn stalled_true_is_a_warning_but_reconciling_is_not() {
        let c = merge(
            &[],
            &[Wanted::yes(kind::STALLED, "InvalidSpec", "x"), Wanted::yes(kind::RECONCILING, "RollingOut", "y")],
            None,
            at(1),
        );
        assert!(is_warning(&c[0]));
        assert!(!is_warning(&c[1]));
    }
}
