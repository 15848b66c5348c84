//! RabbitMQ: Celery's native delayed delivery and the quorum-queue prefetch rule, read from the
//! management API. Pure functions over its JSON.
//!
//! Checked with Celery 5.7 / kombu 5.7 against RabbitMQ 3.10 (`celery/worker/consumer/delayed_delivery.py`,
//! `celery/worker/consumer/tasks.py`, `kombu/transport/native_delayed_delivery.py`):
//!
//! - A worker whose app declares any quorum queue (`x-queue-type: quorum` among `task_queues`,
//!   consumed or not) turns global QoS off ("Global QoS is disabled. Prefetch count is now
//!   static."). RabbitMQ applies a per-consumer prefetch change only to consumers created after it,
//!   so the worker's prefetch stays at concurrency × multiplier: Celery's `--autoscale` and
//!   prefetch reduction change nothing, and an ETA task the worker holds takes a prefetch slot
//!   until due. Seen: 5 tasks with `countdown=3600` on a classic queue of such a worker (`-c 2`,
//!   prefetch 1) → 2 unacknowledged, 3 ready and the worker idle; without the quorum queue the
//!   same worker held all 5 (channel `global_prefetch_count` 2 + 5).
//! - The same worker declares 28 level queues `celery_delayed_0` … `_27` (quorum by default,
//!   `broker_native_delayed_delivery_queue_type`) and binds each topic exchange of its queues to
//!   the exchange `celery_delayed_delivery` with `#.<routing key>`. A task with a countdown to a
//!   queue on a topic exchange waits in the level queues (`countdown=300` → level 8,
//!   `countdown=100000` → level 16); on a direct exchange Celery logs a warning and the worker
//!   holds it instead.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::observation::DelayedDelivery;
use crate::safety::{Finding, Reason, Severity, is_celery_internal_queue};
use crate::schedule::{DELAYED_LEVELS, Scheduled, delayed_for_queues, delayed_level_of};

/// The exchange the last level dead-letters to (Celery 5.7 uses no prefix).
pub const DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

/// The level queues' depths from a vhost's queue listing (name → management queue object), or
/// `None` when the vhost has none.
pub fn delayed_levels<'a>(queues: impl IntoIterator<Item = (&'a String, &'a Value)>) -> Option<Vec<u64>> {
    let mut levels = vec![0u64; DELAYED_LEVELS as usize];
    let mut any = false;
    for (name, queue) in queues {
        if let Some(level) = delayed_level_of(name) {
            any = true;
            let n = queue["messages"].as_u64().or_else(|| queue["messages_ready"].as_u64()).unwrap_or(0);
            levels[level as usize] = levels[level as usize].saturating_add(n);
        }
    }
    any.then_some(levels)
}

/// The queues `celery_delayed_delivery` delivers to, from the bindings of the delivery exchange
/// (`/api/exchanges/{vhost}/celery_delayed_delivery/bindings/source`) and of the exchanges it
/// binds (`exchanges`: exchange name → its own `bindings/source` list).
pub fn delivery_targets(delivery: &Value, exchanges: &BTreeMap<String, Value>) -> Vec<String> {
    let mut targets = BTreeSet::new();
    for binding in delivery.as_array().into_iter().flatten() {
        let Some(destination) = binding["destination"].as_str() else { continue };
        match binding["destination_type"].as_str() {
            Some("queue") => {
                targets.insert(destination.to_owned());
            }
            Some("exchange") => {
                let routing_key = binding["routing_key"].as_str().unwrap_or_default();
                let next = exchanges.get(destination).and_then(Value::as_array).into_iter().flatten();
                // The exchange also holds the queue's ordinary binding; only `#.<routing key>`
                // ones carry delayed messages on, but both name the same queues.
                targets.extend(
                    next.filter(|b| b["destination_type"] == "queue" && b["routing_key"] == routing_key)
                        .filter_map(|b| b["destination"].as_str().map(str::to_owned)),
                );
            }
            _ => {}
        }
    }
    targets.into_iter().collect()
}

/// The exchanges `celery_delayed_delivery` binds to (whose bindings [`delivery_targets`] needs).
pub fn bound_exchanges(delivery: &Value) -> Vec<String> {
    let names = delivery.as_array().into_iter().flatten().filter(|b| b["destination_type"] == "exchange");
    names.filter_map(|b| b["destination"].as_str().map(str::to_owned)).collect::<BTreeSet<_>>().into_iter().collect()
}

/// `queue`'s share of the delayed messages: all of them when it is the only queue the delivery
/// exchange routes to (see [`delayed_for_queues`]).
pub fn delayed_for(queue: &str, delayed: &DelayedDelivery) -> Option<Scheduled> {
    delayed_for_queues(&[queue], delayed)
}

/// `QuorumQueueStaticPrefetch` for a probed quorum queue (management queue object): Info, since
/// no task is lost, but it explains why prefetch-based knobs do nothing. `delayed_targets` are the
/// queues native delayed delivery reaches, when known: a quorum queue outside them gets its ETA
/// tasks held by workers, in prefetch slots.
pub fn quorum_findings(queue: &Value, delayed_targets: Option<&[String]>) -> Option<Finding> {
    let name = queue["name"].as_str()?;
    if is_celery_internal_queue(name) || delayed_level_of(name).is_some() || queue["type"] != "quorum" {
        return None;
    }
    let eta = match delayed_targets {
        Some(targets) if targets.iter().any(|t| t == name) => {
            "ETA/countdown tasks wait in Celery's native delayed-delivery queues until due".to_owned()
        }
        Some(_) => "ETA/countdown tasks for it do not go through native delayed delivery (its exchange is \
                    not bound to celery_delayed_delivery: Celery supports only topic exchanges there), so \
                    a worker holds each one in a prefetch slot until due, taking no other work in that slot"
            .to_owned(),
        None => "ETA/countdown tasks wait in native delayed-delivery queues only when the queue's exchange \
                 is a topic exchange; otherwise each occupies a prefetch slot of a worker until due"
            .to_owned(),
    };
    let message = format!(
        "queue {name} is a quorum queue: Celery disables global QoS for workers whose app declares a \
         quorum queue, so their prefetch count is static (concurrency × prefetch multiplier) — \
         Celery's --autoscale and prefetch reduction do nothing for them; {eta}"
    );
    Some(Finding::new(Reason::QuorumQueueStaticPrefetch, Severity::Info, message).for_queue(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn level_depths_come_from_the_vhost_listing() {
        let queues: BTreeMap<String, Value> = [
            ("celery_delayed_8", json!({"messages": 5})),
            ("celery_delayed_16", json!({"messages": 1})),
            ("celery_delayed_0", json!({"messages": 0})),
            ("emails", json!({"messages": 40})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let levels = delayed_levels(&queues).unwrap();
        assert_eq!((levels[8], levels[16], levels.iter().sum::<u64>()), (5, 1, 6));
        let plain: BTreeMap<String, Value> = [("emails".to_owned(), json!({"messages": 3}))].into();
        assert_eq!(delayed_levels(&plain), None);
    }

    #[test]
    fn targets_follow_the_delivery_exchange_through_topic_exchanges() {
        // As Celery 5.7 binds a quorum queue on topic exchange quorum_x with routing key quorum_q.
        let delivery = json!([
            {"source": "celery_delayed_delivery", "destination": "quorum_x", "destination_type": "exchange", "routing_key": "#.quorum_q"}
        ]);
        let exchanges = BTreeMap::from([(
            "quorum_x".to_owned(),
            json!([
                {"destination": "quorum_q", "destination_type": "queue", "routing_key": "#.quorum_q"},
                {"destination": "quorum_q", "destination_type": "queue", "routing_key": "quorum_q"},
                {"destination": "other", "destination_type": "queue", "routing_key": "other"}
            ]),
        )]);
        assert_eq!(bound_exchanges(&delivery), vec!["quorum_x".to_owned()]);
        assert_eq!(delivery_targets(&delivery, &exchanges), vec!["quorum_q".to_owned()]);
        assert!(delivery_targets(&json!([]), &exchanges).is_empty());
    }

    #[test]
    fn delayed_messages_are_credited_only_to_a_sole_target_at_their_upper_bound() {
        let mut levels = vec![0; 28];
        levels[8] = 5;
        levels[3] = 2;
        let delayed = DelayedDelivery { levels, targets: Some(vec!["q".into()]) };
        let s = delayed_for("q", &delayed).unwrap();
        assert_eq!((s.delayed, s.exact), (7, false));
        // Level 3 is due within 16 s, level 8 within 512 s.
        assert_eq!(s.due.due_within(std::time::Duration::from_secs(15)), 0);
        assert_eq!(s.due.due_within(std::time::Duration::from_secs(16)), 2);
        assert_eq!(s.due.due_within(std::time::Duration::from_secs(600)), 7);
        assert_eq!(delayed_for("other", &delayed), None);
        let shared = DelayedDelivery { targets: Some(vec!["a".into(), "q".into()]), ..delayed.clone() };
        assert_eq!(delayed_for("q", &shared), None);
        assert_eq!(delayed_for("q", &DelayedDelivery { targets: None, ..delayed }), None);
    }

    #[test]
    fn quorum_queues_get_an_info_finding_that_says_where_eta_tasks_wait() {
        let quorum = json!({"name": "q", "type": "quorum"});
        let bound = quorum_findings(&quorum, Some(&["q".to_owned()])).unwrap();
        assert_eq!((bound.reason, bound.severity), (Reason::QuorumQueueStaticPrefetch, Severity::Info));
        assert!(bound.message.contains("--autoscale") && bound.message.contains("native delayed-delivery"));
        let unbound = quorum_findings(&quorum, Some(&[])).unwrap();
        assert!(unbound.message.contains("prefetch slot"), "{}", unbound.message);
        assert_eq!(quorum_findings(&json!({"name": "c", "type": "classic"}), None), None);
        assert_eq!(quorum_findings(&json!({"name": "celery_delayed_3", "type": "quorum"}), None), None);
    }
}
