//! RabbitMQ rules over a queue object of the management API (`GET /api/queues/{vhost}/{name}`):
//! settings under which RabbitMQ discards tasks without telling anyone.
//!
//! RabbitMQ 4.x cannot run where this is built (Debian ships 3.10.8), so its rules — the quorum
//! `delivery-limit` default of 20, `-1` meaning unlimited — are kept pure, over the management
//! API's JSON, and tested with 4.x-shaped queue objects; the 3.x behaviour is also tested against
//! a real node.
//!
//! A setting can come from the queue's `x-` arguments or from its effective policy
//! (`effective_policy_definition`, which merges policy and operator policy). For the numeric limits
//! RabbitMQ enforces the lower of the two; for `overflow` and the dead-letter exchange the queue
//! argument wins.

use serde_json::Value;

use super::{Finding, Reason, Severity};

/// Quorum queues get `delivery-limit` 20 by default since RabbitMQ 4.0.
const QUORUM_DEFAULT_DELIVERY_LIMIT: i64 = 20;

/// Celery's own queues (event receivers `celeryev.<uuid>`, remote-control mailboxes
/// `<worker>.<control exchange>.pidbox` and replies `<uuid>.reply.<control exchange>.pidbox`) are
/// transient by design and carry TTLs, expiry and exclusivity on purpose; they hold no tasks.
pub fn is_celery_internal_queue(name: &str) -> bool {
    name.starts_with("celeryev.") || name.ends_with(".pidbox")
}

struct Settings<'a> {
    arguments: Option<&'a serde_json::Map<String, Value>>,
    policy: Option<&'a serde_json::Map<String, Value>>,
}

impl Settings<'_> {
    fn argument(&self, key: &str) -> Option<&Value> {
        self.arguments?.get(&format!("x-{key}")).filter(|v| !v.is_null())
    }

    fn policy_value(&self, key: &str) -> Option<&Value> {
        self.policy?.get(key).filter(|v| !v.is_null())
    }

    /// The value RabbitMQ enforces for a numeric limit: the lower of argument and policy.
    fn limit(&self, key: &str) -> Option<i64> {
        let values = [self.argument(key), self.policy_value(key)];
        values.into_iter().flatten().filter_map(Value::as_i64).min()
    }

    /// The value of a setting where the queue argument takes precedence over the policy.
    fn text(&self, key: &str) -> Option<&str> {
        self.argument(key).or_else(|| self.policy_value(key)).and_then(Value::as_str)
    }

    fn has_dead_letter_exchange(&self) -> bool {
        self.text("dead-letter-exchange").is_some()
    }
}

/// Findings for one queue; `server_major` is RabbitMQ's major version when known (it decides the
/// quorum `delivery-limit` default). Celery-internal queues yield nothing.
pub fn rabbitmq_queue_findings(queue: &Value, server_major: Option<u32>) -> Vec<Finding> {
    let name = queue["name"].as_str().unwrap_or_default();
    if is_celery_internal_queue(name) {
        return Vec::new();
    }
    let settings = Settings {
        arguments: queue["arguments"].as_object(),
        policy: queue["effective_policy_definition"].as_object(),
    };
    let queue_type = queue["type"].as_str().or_else(|| settings.text("queue-type")).unwrap_or("classic");
    let dlx = settings.has_dead_letter_exchange();
    let mut findings = Vec::new();
    let mut add = |reason, severity, message: String| {
        findings.push(Finding::new(reason, severity, message).for_queue(name));
    };

    let max_length = [("max-length", "messages"), ("max-length-bytes", "bytes")]
        .into_iter()
        .find_map(|(key, unit)| settings.limit(key).map(|n| format!("{key} {n} ({unit})")));
    if let Some(max_length) = max_length {
        match settings.text("overflow").unwrap_or("drop-head") {
            "drop-head" if !dlx => add(
                Reason::MaxLengthDropHead,
                Severity::Critical,
                format!(
                    "queue {name} has {max_length} with overflow drop-head and no \
                     dead-letter-exchange: when full RabbitMQ silently discards the oldest tasks; \
                     add a dead-letter-exchange, or use overflow reject-publish with publisher \
                     confirms (broker_transport_options confirm_publish=True), or drop the limit"
                ),
            ),
            "reject-publish" | "reject-publish-dlx" => add(
                Reason::MaxLengthRejectPublish,
                Severity::Warning,
                format!(
                    "queue {name} has {max_length} with overflow reject-publish: when full, new \
                     tasks are refused and lost unless publishers use confirms \
                     (broker_transport_options confirm_publish=True)"
                ),
            ),
            _ => {}
        }
    }
    if let (Some(ttl), false) = (settings.limit("message-ttl"), dlx) {
        add(
            Reason::MessageTtlWithoutDlx,
            Severity::Critical,
            format!(
                "queue {name} has message-ttl {ttl} ms and no dead-letter-exchange: tasks waiting \
                 longer are silently discarded; add a dead-letter-exchange or remove the TTL"
            ),
        );
    }
    if queue_type == "quorum" && !dlx {
        let default = server_major.filter(|&major| major >= 4).map(|_| QUORUM_DEFAULT_DELIVERY_LIMIT);
        // -1 disables the limit (RabbitMQ 4).
        if let Some(limit) = settings.limit("delivery-limit").or(default).filter(|&l| l >= 0) {
            add(
                Reason::DeliveryLimitWithoutDlx,
                Severity::Critical,
                format!(
                    "quorum queue {name} drops a task after {limit} redeliveries (RabbitMQ 4 \
                     defaults to 20) and has no dead-letter-exchange: tasks requeued by crashing or \
                     scaled-in workers are silently discarded; add a dead-letter-exchange or set \
                     delivery-limit -1"
                ),
            );
        }
    }
    if let Some(expires) = settings.limit("expires") {
        add(
            Reason::QueueExpires,
            Severity::Warning,
            format!(
                "queue {name} has expires {expires} ms: RabbitMQ deletes it, with its tasks, after \
                 that long without consumers, e.g. while workers are scaled to zero; remove expires"
            ),
        );
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reasons(queue: Value, major: Option<u32>) -> Vec<(Reason, Severity)> {
        rabbitmq_queue_findings(&queue, major).iter().map(|f| (f.reason, f.severity)).collect()
    }

    fn classic(arguments: Value, policy: Value) -> Value {
        json!({
            "name": "emails", "type": "classic", "vhost": "/",
            "arguments": arguments, "policy": null,
            "effective_policy_definition": policy,
        })
    }

    #[test]
    fn a_plain_celery_queue_is_safe() {
        assert_eq!(reasons(classic(json!({}), json!({})), Some(3)), vec![]);
        // Erlang renders an empty policy as a list.
        assert_eq!(reasons(classic(json!({}), json!([])), Some(3)), vec![]);
        let priority = json!({"x-max-priority": 10});
        assert_eq!(reasons(classic(priority, json!({})), Some(3)), vec![]);
    }

    #[test]
    fn max_length_drops_head_silently_unless_dead_lettered() {
        use Reason::*;
        use Severity::*;
        let cases = [
            (json!({"x-max-length": 100}), json!({}), vec![(MaxLengthDropHead, Critical)]),
            (json!({}), json!({"max-length-bytes": 1000}), vec![(MaxLengthDropHead, Critical)]),
            (json!({"x-max-length": 100, "x-overflow": "drop-head"}), json!({}), vec![(MaxLengthDropHead, Critical)]),
            (json!({"x-max-length": 100, "x-dead-letter-exchange": "dlx"}), json!({}), vec![]),
            (json!({"x-max-length": 100}), json!({"dead-letter-exchange": "dlx"}), vec![]),
            (
                json!({"x-max-length": 100, "x-overflow": "reject-publish"}),
                json!({}),
                vec![(MaxLengthRejectPublish, Warning)],
            ),
            // The queue argument's overflow wins over the policy's.
            (
                json!({"x-max-length": 100, "x-overflow": "reject-publish"}),
                json!({"overflow": "drop-head"}),
                vec![(MaxLengthRejectPublish, Warning)],
            ),
        ];
        for (arguments, policy, expected) in cases {
            let queue = classic(arguments.clone(), policy.clone());
            assert_eq!(reasons(queue, Some(3)), expected, "{arguments} {policy}");
        }
        let found = rabbitmq_queue_findings(&classic(json!({"x-max-length": 5}), json!({})), None);
        assert_eq!(found[0].queue.as_deref(), Some("emails"));
        assert!(found[0].message.contains("max-length 5"), "{}", found[0].message);
    }

    #[test]
    fn the_lower_of_argument_and_policy_limits_is_reported() {
        let queue = classic(json!({"x-max-length": 500}), json!({"max-length": 50}));
        let found = rabbitmq_queue_findings(&queue, Some(3));
        assert!(found[0].message.contains("max-length 50 "), "{}", found[0].message);
    }

    #[test]
    fn message_ttl_without_dead_letter_exchange_discards_tasks() {
        let ttl = classic(json!({"x-message-ttl": 60000}), json!({}));
        assert_eq!(reasons(ttl, Some(3)), vec![(Reason::MessageTtlWithoutDlx, Severity::Critical)]);
        let policy_ttl = classic(json!({}), json!({"message-ttl": 1000}));
        assert_eq!(reasons(policy_ttl, Some(3)), vec![(Reason::MessageTtlWithoutDlx, Severity::Critical)]);
        let dead_lettered = classic(json!({"x-message-ttl": 60000, "x-dead-letter-exchange": ""}), json!({}));
        assert_eq!(reasons(dead_lettered, Some(3)), vec![]);
    }

    fn quorum(arguments: Value, policy: Value) -> Value {
        let mut q = classic(arguments, policy);
        q["type"] = json!("quorum");
        q
    }

    #[test]
    fn quorum_delivery_limit_defaults_to_twenty_from_rabbitmq_four() {
        let limited = vec![(Reason::DeliveryLimitWithoutDlx, Severity::Critical)];
        // RabbitMQ 4: the default limit applies even when nothing is set.
        assert_eq!(reasons(quorum(json!({}), json!({})), Some(4)), limited);
        let found = rabbitmq_queue_findings(&quorum(json!({}), json!({})), Some(4));
        assert!(found[0].message.contains("after 20 redeliveries"));
        // RabbitMQ 3: no default.
        assert_eq!(reasons(quorum(json!({}), json!({})), Some(3)), vec![]);
        assert_eq!(reasons(quorum(json!({}), json!({})), None), vec![]);
        // An explicit limit counts on any version.
        assert_eq!(reasons(quorum(json!({"x-delivery-limit": 5}), json!({})), Some(3)), limited);
        assert_eq!(reasons(quorum(json!({}), json!({"delivery-limit": 3})), None), limited);
        // -1 disables it; a dead-letter exchange catches what it drops.
        assert_eq!(reasons(quorum(json!({"x-delivery-limit": -1}), json!({})), Some(4)), vec![]);
        assert_eq!(reasons(quorum(json!({}), json!({"dead-letter-exchange": "dlx"})), Some(4)), vec![]);
        // Classic queues have no delivery limit.
        assert_eq!(reasons(classic(json!({"x-delivery-limit": 5}), json!({})), Some(4)), vec![]);
    }

    #[test]
    fn expiring_queues_vanish_while_workers_are_scaled_to_zero() {
        assert_eq!(
            reasons(classic(json!({"x-expires": 600000}), json!({})), Some(3)),
            vec![(Reason::QueueExpires, Severity::Warning)]
        );
        assert_eq!(
            reasons(classic(json!({}), json!({"expires": 1000})), Some(3)),
            vec![(Reason::QueueExpires, Severity::Warning)]
        );
    }

    #[test]
    fn celery_internal_queues_are_skipped() {
        for name in ["celeryev.5e1c1a2b-aaaa", "5e1c1a2b-aaaa.reply.celery.pidbox", "celery@worker-1.celery.pidbox"] {
            let mut q = classic(json!({"x-message-ttl": 300000, "x-expires": 10000}), json!({}));
            q["name"] = json!(name);
            assert_eq!(reasons(q, Some(4)), vec![], "{name}");
        }
    }

    /// A quorum queue as RabbitMQ 4.1's `GET /api/queues/{vhost}` lists it (trimmed to the fields
    /// the probe asks for).
    fn rabbitmq_four_quorum_queue(arguments: Value, effective_policy: Value) -> Value {
        json!({
            "arguments": arguments,
            "consumers": 4,
            "effective_policy_definition": effective_policy,
            "messages_ready": 120,
            "messages_unacknowledged": 8,
            "name": "celery",
            "policy": null,
            "type": "quorum",
        })
    }

    #[test]
    fn rabbitmq_four_quorum_queues_drop_after_twenty_deliveries_unless_dead_lettered_or_unlimited() {
        let declared_by_celery = json!({"x-queue-type": "quorum"});
        let limited = vec![(Reason::DeliveryLimitWithoutDlx, Severity::Critical)];
        let default = rabbitmq_four_quorum_queue(declared_by_celery.clone(), json!({}));
        assert_eq!(reasons(default.clone(), Some(4)), limited);
        // The same queue on 3.x has no limit.
        assert_eq!(reasons(default, Some(3)), vec![]);
        // An operator policy's limit merged into the effective policy, dead-lettered by a user policy.
        let merged =
            json!({"delivery-limit": 50, "dead-letter-exchange": "dlx", "dead-letter-strategy": "at-least-once"});
        assert_eq!(reasons(rabbitmq_four_quorum_queue(declared_by_celery.clone(), merged), Some(4)), vec![]);
        // Unlimited, by argument or by policy.
        let unlimited = json!({"x-queue-type": "quorum", "x-delivery-limit": -1});
        assert_eq!(reasons(rabbitmq_four_quorum_queue(unlimited, json!({})), Some(4)), vec![]);
        let by_policy = rabbitmq_four_quorum_queue(declared_by_celery, json!({"delivery-limit": -1}));
        assert_eq!(reasons(by_policy, Some(4)), vec![]);
    }
}
