//! The autoscaler's pure helpers around [`decide`](super::decide): who else scales a pool, which
//! pods should go first on a scale-in, what a pool asks of its broker, and the status and
//! conditions the autoscaler owns.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::ResourceExt;
use kube::core::DynamicObject;

use super::decide::{Decision, Limit, Observation, Reason, Rule};
use crate::conditions::{Wanted, kind};
use crate::crd::WorkerPool;

/// The annotation the ReplicaSet controller reads to pick which pods to delete on a scale-in
/// (lowest cost first).
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Another autoscaler targeting the pool's worker Deployment (or the pool itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `HorizontalPodAutoscaler` or `ScaledObject`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
}

impl Conflict {
    /// Message of the `ScalingActive=False/ScalerConflict` condition.
    pub fn message(&self, pool: &WorkerPool) -> String {
        format!(
            "{} \"{}\" also scales Deployment {}; the operator does not scale this pool while it exists (two \
             autoscalers would fight over spec.replicas). Delete the {} or remove spec.autoscaling and let \
             it drive the pool through the scale subresource.",
            self.kind,
            self.name,
            pool.worker_deployment_name(),
            self.kind
        )
    }
}

/// Whether a scale target reference (`kind`, `name`, optional `apiVersion`) points at the pool's
/// worker Deployment or at the pool.
fn targets(pool: &WorkerPool, kind: &str, name: &str, api_version: Option<&str>) -> bool {
    let group = api_version.and_then(|v| v.split_once('/')).map(|(g, _)| g);
    match kind {
        "Deployment" => name == pool.worker_deployment_name() && group.is_none_or(|g| g == "apps"),
        "WorkerPool" => name == pool.name_any() && group.is_none_or(|g| g == "celery-operator.dev"),
        _ => false,
    }
}

/// The first HPA or KEDA ScaledObject in the pool's namespace that targets its worker Deployment
/// or the pool. `scaled_objects` are `keda.sh/v1alpha1` ScaledObjects (`spec.scaleTargetRef.kind`
/// defaults to Deployment).
pub fn find_conflict(
    pool: &WorkerPool,
    hpas: &[std::sync::Arc<HorizontalPodAutoscaler>],
    scaled_objects: &[std::sync::Arc<DynamicObject>],
) -> Option<Conflict> {
    let ns = pool.namespace();
    let hpa = hpas.iter().filter(|h| h.namespace() == ns).find(|h| {
        h.spec.as_ref().is_some_and(|s| {
            let t = &s.scale_target_ref;
            targets(pool, &t.kind, &t.name, t.api_version.as_deref())
        })
    });
    if let Some(h) = hpa {
        return Some(Conflict { kind: "HorizontalPodAutoscaler", name: h.name_any() });
    }
    scaled_objects
        .iter()
        .filter(|o| o.namespace() == ns)
        .find(|o| {
            let t = &o.data["spec"]["scaleTargetRef"];
            let kind = t["kind"].as_str().unwrap_or("Deployment");
            t["name"].as_str().is_some_and(|name| targets(pool, kind, name, t["apiVersion"].as_str()))
        })
        .map(|o| Conflict { kind: "ScaledObject", name: o.name_any() })
}

/// The endpoint's live workers, from heartbeats.
pub type Activity = Vec<celery_broker::events::WorkerState>;

/// The pod a worker hostname belongs to: workers run as `<pool>@<pod name>`.
pub fn pod_of_worker<'a>(pool: &str, hostname: &'a str) -> Option<&'a str> {
    hostname.strip_prefix(pool)?.strip_prefix('@')
}

/// Tasks running in the pool's workers, by pod name.
pub fn active_by_pod(pool: &str, activity: &[celery_broker::events::WorkerState]) -> BTreeMap<String, u32> {
    activity.iter().filter_map(|w| Some((pod_of_worker(pool, &w.hostname)?.to_string(), w.active))).collect()
}

/// Deletion costs to set before a scale-in, as (pod, cost): each pod with a heartbeat costs the
/// tasks it is running, so idle workers are removed first and busy ones keep their tasks. Pods
/// whose annotation already says so, and pods without heartbeats (starting; the ReplicaSet removes
/// unready pods first anyway), are left alone.
pub fn deletion_costs(pods: &[(String, Option<String>)], active: &BTreeMap<String, u32>) -> Vec<(String, i32)> {
    pods.iter()
        .filter_map(|(pod, current)| {
            let cost = i32::try_from(*active.get(pod)?).unwrap_or(i32::MAX);
            (current.as_deref() != Some(cost.to_string().as_str())).then(|| (pod.clone(), cost))
        })
        .collect()
}

/// The part of a WorkerPool's status the autoscaler owns (written by server-side apply under its
/// own field manager).
#[derive(Clone, Debug, PartialEq)]
pub struct ScalerStatus {
    /// Replicas decided.
    pub desired: Option<u32>,
    /// Messages waiting.
    pub backlog: Option<u64>,
    /// Tasks being worked on.
    pub in_flight: Option<u64>,
    /// When and why the replicas last changed (RFC 3339, message).
    pub last_scale: Option<(String, String)>,
    /// ScalingActive and ScalingLimited.
    pub conditions: Vec<Wanted>,
    /// What the demand was made of, when the broker answered.
    pub demand: Option<DemandStatus>,
}

/// The status fields that tell what the pool's demand was made of and which rule decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemandStatus {
    /// `Depth`, `Latency` or `Scheduled` ([`Rule::kind`]).
    pub rule: &'static str,
    /// Due work: waiting and in-flight tasks that are due, plus scheduled ones coming due within
    /// the lead time.
    pub due: u64,
    /// Scheduled tasks known (ETA in the future), wherever the broker holds them.
    pub scheduled: u64,
}

impl DemandStatus {
    /// From one observation and the rule that decided. Values that drift by themselves (the
    /// oldest task's wait, the lead time as start-ups are measured) stay out: status is not
    /// rewritten for them alone (the TaskQueue reports the wait).
    pub fn new(seen: &Observation, rule: &Rule) -> Self {
        Self {
            rule: rule.kind(),
            due: seen.waiting_due().saturating_add(seen.in_flight_due()).saturating_add(seen.due_soon),
            scheduled: seen.scheduled_known(),
        }
    }

    /// The status fields (`scalingRule`, `due`, `scheduled`), for the autoscaler's status apply.
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("scalingRule".into(), self.rule.into());
        fields.insert("due".into(), self.due.into());
        fields.insert("scheduled".into(), self.scheduled.into());
        fields
    }
}

impl ScalerStatus {
    /// Whether only the fast-moving numbers differ (written at a slower pace).
    pub fn differs_only_in_numbers(&self, other: &Self) -> bool {
        self.desired == other.desired && self.last_scale == other.last_scale && self.conditions == other.conditions
    }

    /// The demand fields for the status apply (none when the broker could not be read).
    pub fn demand_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        self.demand.as_ref().map(DemandStatus::fields).unwrap_or_default()
    }
}

/// ScalingActive and ScalingLimited after a decision.
pub fn decision_conditions(decision: &Decision, queues: &[String], endpoint: &str) -> Vec<Wanted> {
    let active = match decision.reason {
        // The failure count stays out of the message: a condition that changes on every failed poll
        // would rewrite status on every poll of an outage.
        Reason::ProbeFailed { .. } => Wanted::no(
            kind::SCALING_ACTIVE,
            "BrokerUnreachable",
            format!("the broker {endpoint} cannot be read; holding the current replicas"),
        ),
        Reason::Fallback { .. } => Wanted::no(
            kind::SCALING_ACTIVE,
            "Fallback",
            format!("the broker {endpoint} could not be read repeatedly; running fallbackReplicas"),
        ),
        _ => Wanted::yes(
            kind::SCALING_ACTIVE,
            "ScalingFromQueueDepth",
            format!("scaling from the depth of queue(s) {} on {endpoint}", queues.join(", ")),
        ),
    };
    let limited = match decision.limited {
        Some(limit) => Wanted::yes(
            kind::SCALING_LIMITED,
            limit.condition_reason(),
            format!(
                "{} replicas wanted, {limit} ({})",
                decision.raw_desired,
                match limit {
                    Limit::AtMax => "raise spec.autoscaling.maxReplicas to allow more",
                    Limit::AtMin => "spec.autoscaling.minReplicas",
                },
                limit = decision.replicas
            ),
        ),
        None => Wanted::no(kind::SCALING_LIMITED, "DesiredWithinRange", "the desired count is within the bounds"),
    };
    vec![active, limited]
}

/// `lastScaleReason` for a change from `from` to `to`.
pub fn scale_message(from: u32, to: u32, reason: &Reason) -> String {
    format!("scaled from {from} to {to}: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::autoscaling::v2::{CrossVersionObjectReference, HorizontalPodAutoscalerSpec};
    use kube::api::ObjectMeta;
    use std::sync::Arc;

    fn pool() -> WorkerPool {
        let mut p: WorkerPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": "mail", "namespace": "prod"},
            "spec": {"app": "a", "image": "i", "queues": ["q"]}
        }))
        .unwrap();
        p.metadata.uid = Some("u".into());
        p
    }

    fn hpa(ns: &str, kind: &str, name: &str, api_version: Option<&str>) -> Arc<HorizontalPodAutoscaler> {
        Arc::new(HorizontalPodAutoscaler {
            metadata: ObjectMeta { name: Some("h".into()), namespace: Some(ns.into()), ..Default::default() },
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    kind: kind.into(),
                    name: name.into(),
                    api_version: api_version.map(Into::into),
                },
                max_replicas: 3,
                ..Default::default()
            }),
            status: None,
        })
    }

    fn scaled_object(ns: &str, target: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                "metadata": {"name": "so", "namespace": ns},
                "spec": {"scaleTargetRef": target}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn an_hpa_on_the_worker_deployment_or_the_pool_conflicts() {
        let p = pool();
        let on_deploy = hpa("prod", "Deployment", "mail-worker", Some("apps/v1"));
        assert_eq!(find_conflict(&p, &[on_deploy], &[]).unwrap().kind, "HorizontalPodAutoscaler");
        let on_pool = hpa("prod", "WorkerPool", "mail", Some("celery-operator.dev/v1alpha1"));
        assert!(find_conflict(&p, &[on_pool], &[]).is_some());
    }

    #[test]
    fn hpas_elsewhere_do_not_conflict() {
        let p = pool();
        let others = [
            hpa("staging", "Deployment", "mail-worker", Some("apps/v1")),
            hpa("prod", "Deployment", "mail-beat", Some("apps/v1")),
            hpa("prod", "StatefulSet", "mail-worker", Some("apps/v1")),
            hpa("prod", "Deployment", "mail-worker", Some("example.com/v1")),
        ];
        assert_eq!(find_conflict(&p, &others, &[]), None);
    }

    #[test]
    fn a_scaled_object_defaults_to_deployment_targets() {
        let p = pool();
        let so = scaled_object("prod", serde_json::json!({"name": "mail-worker"}));
        assert_eq!(find_conflict(&p, &[], &[so]), Some(Conflict { kind: "ScaledObject", name: "so".into() }));
        let other = scaled_object("prod", serde_json::json!({"name": "web"}));
        assert_eq!(find_conflict(&p, &[], &[other]), None);
    }

    #[test]
    fn worker_hostnames_map_to_pods_of_their_pool_only() {
        assert_eq!(pod_of_worker("mail", "mail@mail-worker-abc-x1"), Some("mail-worker-abc-x1"));
        assert_eq!(pod_of_worker("mail", "mailer@mailer-worker-1"), None);
        assert_eq!(pod_of_worker("mail", "celery@host"), None);
        let now = std::time::Instant::now();
        let worker = |hostname: &str, active| celery_broker::events::WorkerState {
            hostname: hostname.into(),
            active,
            processed: 0,
            freq: std::time::Duration::from_secs(2),
            last_seen: now,
            online: true,
        };
        let activity: Activity = vec![worker("mail@p1", 2), worker("mail@p2", 0), worker("web@w1", 5)];
        assert_eq!(active_by_pod("mail", &activity), [("p1".to_string(), 2), ("p2".to_string(), 0)].into());
    }

    #[test]
    fn deletion_costs_rank_busy_pods_above_idle_ones_and_skip_unchanged_and_unknown() {
        let active: BTreeMap<String, u32> = [("busy".into(), 3), ("idle".into(), 0), ("same".into(), 1)].into();
        let pods = vec![
            ("busy".to_string(), None),
            ("idle".to_string(), Some("5".to_string())),
            ("same".to_string(), Some("1".to_string())),
            ("starting".to_string(), None),
        ];
        assert_eq!(deletion_costs(&pods, &active), vec![("busy".to_string(), 3), ("idle".to_string(), 0)]);
    }

    #[test]
    fn conditions_say_why_scaling_is_held_or_limited() {
        let held = Decision {
            replicas: 20,
            reason: Reason::ScaleUp { backlog: 900, in_flight: 0, desired: 225 },
            limited: Some(Limit::AtMax),
            raw_desired: 225,
            rule: None,
        };
        let c = decision_conditions(&held, &["emails".into()], "redis://redis:6379/0");
        assert_eq!((c[0].reason.as_str(), c[1].reason.as_str()), ("ScalingFromQueueDepth", "TooManyReplicas"));
        assert!(c[1].message.contains("225 replicas wanted"), "{}", c[1].message);
        let failed = Decision {
            replicas: 3,
            reason: Reason::ProbeFailed { consecutive_failures: 2 },
            limited: None,
            raw_desired: 3,
            rule: None,
        };
        let c = decision_conditions(&failed, &["emails".into()], "redis://redis:6379/0");
        assert_eq!((c[0].status, c[0].reason.as_str()), (crate::conditions::Status::False, "BrokerUnreachable"));
        assert_eq!(c[1].reason, "DesiredWithinRange");
        let again = Decision { reason: Reason::ProbeFailed { consecutive_failures: 3 }, ..failed };
        assert_eq!(decision_conditions(&again, &["emails".into()], "redis://redis:6379/0"), c, "same condition");
    }

    #[test]
    fn the_demand_status_says_which_rule_decided_and_what_was_due() {
        let seen = Observation {
            backlog: 10,
            backlog_scheduled: 4,
            in_flight: 30,
            in_flight_scheduled: 25,
            due_soon: 2,
            scheduled: 31,
            oldest_wait: Some(std::time::Duration::from_millis(7900)),
            ..Observation::default()
        };
        let status = DemandStatus::new(&seen, &Rule::Depth { due_soon: 2 });
        // 6 waiting + 5 in flight + 2 coming due.
        assert_eq!((status.rule, status.due, status.scheduled), ("Depth", 13, 31));
        let fields = serde_json::Value::Object(status.fields());
        assert_eq!(fields, serde_json::json!({"scalingRule": "Depth", "due": 13, "scheduled": 31}));
        let held = ScalerStatus {
            desired: Some(1),
            backlog: None,
            in_flight: None,
            last_scale: None,
            conditions: Vec::new(),
            demand: None,
        };
        assert!(held.demand_fields().is_empty(), "a failed probe writes no demand fields");
    }
}
