//! Redis rules: eviction policy, memory pressure, evictions, failing persistence, expiring queues.

use super::{Finding, Reason, Severity};
use crate::observation::BrokerInfo;

/// Used memory at or above this share of `maxmemory` raises `MemoryPressure`.
pub const MEMORY_PRESSURE_PERCENT: u64 = 80;

/// Findings for a Redis broker. `evicted_before` is `evicted_keys` from the previous probe of the
/// same server (`None` on the first probe).
pub fn redis_findings(info: &BrokerInfo, evicted_before: Option<u64>) -> Vec<Finding> {
    let maxmemory = info.maxmemory_bytes.unwrap_or(0);
    let mut findings = Vec::new();
    findings.extend(eviction_policy(info.eviction_policy.as_deref(), maxmemory));
    if let (Some(used), true) = (info.used_memory_bytes, maxmemory > 0) {
        let percent = used.saturating_mul(100) / maxmemory;
        if percent >= MEMORY_PRESSURE_PERCENT {
            findings.push(Finding::new(
                Reason::MemoryPressure,
                Severity::Warning,
                format!(
                    "Redis uses {used} of {maxmemory} bytes of maxmemory ({percent} %): when full it \
                     refuses new tasks (noeviction) or evicts them (allkeys-*); raise maxmemory or \
                     drain the queues"
                ),
            ));
        }
    }
    findings.extend(evictions(info.evicted_keys, evicted_before));
    if info.persistence_ok == Some(false) {
        findings.push(Finding::new(
            Reason::PersistenceFailing,
            Severity::Warning,
            "the last Redis RDB save or AOF write failed: with stop-writes-on-bgsave-error (the \
             default) Redis refuses new tasks; check disk space and the Redis log",
        ));
    }
    findings
}

fn eviction_policy(policy: Option<&str>, maxmemory: u64) -> Option<Finding> {
    let Some(policy) = policy else {
        return Some(Finding::new(
            Reason::EvictionPolicyUnknown,
            Severity::Info,
            "could not read maxmemory-policy (neither INFO memory nor CONFIG GET reported it); make \
             sure it is noeviction",
        ));
    };
    if policy.starts_with("volatile-") {
        // Only keys with a TTL are evicted, and kombu's queue lists (unless the queue expires),
        // unacked hash and binding sets have none: for them this is noeviction.
        return Some(Finding::new(
            Reason::EvictionPolicyVolatile,
            Severity::Info,
            format!(
                "maxmemory-policy is {policy}: when memory is full Redis evicts keys with a TTL first \
                 (expiring queues, Celery results, locks) and then refuses new tasks like \
                 noeviction; prefer noeviction, never give a queue an expiry on this Redis, and \
                 alert at {MEMORY_PRESSURE_PERCENT} % of maxmemory"
            ),
        ));
    }
    if !policy.starts_with("allkeys-") {
        // noeviction refuses writes when full: publishers get an error, nothing is lost silently.
        return None;
    }
    Some(if maxmemory == 0 {
        Finding::new(
            Reason::EvictionPolicyUnsafe,
            Severity::Info,
            format!(
                "maxmemory-policy is {policy} but maxmemory is 0 (no limit), so nothing is evicted \
                 today; set maxmemory-policy noeviction before setting a memory limit"
            ),
        )
    } else {
        Finding::new(
            Reason::EvictionPolicyUnsafe,
            Severity::Critical,
            format!(
                "maxmemory-policy is {policy}: Redis may silently evict queued tasks, unacked \
                 messages and kombu's binding tables when memory is full; set maxmemory-policy \
                 noeviction and alert at {MEMORY_PRESSURE_PERCENT} % of maxmemory"
            ),
        )
    })
}

/// The finding for a Redis queue whose lists carry a TTL (kombu `Queue(expires=…)` / `x-expires`
/// PEXPIREs every priority list of the queue on each publish). Under a `volatile-*` policy with a
/// memory limit those lists are also the first candidates for eviction. The message carries no
/// remaining TTL: it would change on every probe and rewrite the TaskQueue's condition each time.
pub fn queue_ttl_finding(queue: &str, info: &BrokerInfo) -> Finding {
    let policy = info.eviction_policy.as_deref().unwrap_or_default();
    let evictable = policy.starts_with("volatile-") && info.maxmemory_bytes.unwrap_or(0) > 0;
    let expiry = format!(
        "queue {queue} expires: its Redis lists have a TTL (kombu Queue(expires=…)/x-expires), so \
         Redis deletes them with every waiting task once no task has been published for that long \
         (kombu refreshes the TTL on publish and basic_get, not when a worker consumes with BRPOP)"
    );
    if evictable {
        Finding::new(
            Reason::QueueExpires,
            Severity::Critical,
            format!(
                "{expiry}; and under maxmemory-policy {policy} keys with a TTL are evicted first when \
                 memory is full, so its tasks can vanish at any time: remove expires from the queue \
                 declaration and set maxmemory-policy noeviction"
            ),
        )
    } else {
        Finding::new(
            Reason::QueueExpires,
            Severity::Warning,
            format!("{expiry}: remove expires from the queue declaration (Celery task_queues)"),
        )
    }
    .for_queue(queue)
}

fn evictions(now: Option<u64>, before: Option<u64>) -> Option<Finding> {
    let now = now?;
    match before {
        // A restart resets the counter; only growth counts.
        Some(before) if now > before => Some(Finding::new(
            Reason::KeysEvicted,
            Severity::Critical,
            format!(
                "Redis evicted {} keys since the last probe: queued tasks may have been lost; set \
                 maxmemory-policy noeviction",
                now - before
            ),
        )),
        None if now > 0 => Some(Finding::new(
            Reason::KeysEvicted,
            Severity::Warning,
            format!(
                "Redis has evicted {now} keys since it started: queued tasks may have been lost; \
                 set maxmemory-policy noeviction"
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::BrokerKind;

    fn info(policy: &str, maxmemory: u64, used: u64, evicted: u64) -> BrokerInfo {
        BrokerInfo {
            eviction_policy: Some(policy.into()),
            maxmemory_bytes: Some(maxmemory),
            used_memory_bytes: Some(used),
            evicted_keys: Some(evicted),
            aof_enabled: Some(false),
            persistence_ok: Some(true),
            ..BrokerInfo::new(BrokerKind::Redis)
        }
    }

    fn reasons(findings: &[Finding]) -> Vec<(Reason, Severity)> {
        findings.iter().map(|f| (f.reason, f.severity)).collect()
    }

    #[test]
    fn eviction_policies_are_judged_by_what_they_can_evict() {
        use Reason::*;
        use Severity::*;
        type Case<'a> = (&'a str, u64, &'a [(Reason, Severity)]);
        let cases: &[Case<'_>] = &[
            ("noeviction", 10 << 20, &[]),
            ("volatile-lru", 10 << 20, &[(EvictionPolicyVolatile, Info)]),
            ("volatile-ttl", 0, &[(EvictionPolicyVolatile, Info)]),
            ("allkeys-lru", 10 << 20, &[(EvictionPolicyUnsafe, Critical)]),
            ("allkeys-lfu", 10 << 20, &[(EvictionPolicyUnsafe, Critical)]),
            ("allkeys-random", 1, &[(EvictionPolicyUnsafe, Critical)]),
            ("allkeys-lru", 0, &[(EvictionPolicyUnsafe, Info)]),
        ];
        for (policy, maxmemory, expected) in cases {
            let found = redis_findings(&info(policy, *maxmemory, 0, 0), Some(0));
            assert_eq!(reasons(&found), *expected, "{policy} maxmemory={maxmemory}");
        }
        let found = redis_findings(&info("allkeys-lru", 1 << 20, 0, 0), None);
        assert!(found[0].message.contains("allkeys-lru") && found[0].message.contains("noeviction"));
    }

    #[test]
    fn memory_pressure_starts_at_eighty_percent_of_maxmemory() {
        let at = |used| reasons(&redis_findings(&info("noeviction", 1000, used, 0), Some(0)));
        assert_eq!(at(799), vec![]);
        assert_eq!(at(800), vec![(Reason::MemoryPressure, Severity::Warning)]);
        assert_eq!(at(1200), vec![(Reason::MemoryPressure, Severity::Warning)]);
        // No limit, no pressure.
        let unlimited = redis_findings(&info("noeviction", 0, u64::MAX, 0), Some(0));
        assert_eq!(reasons(&unlimited), vec![]);
    }

    #[test]
    fn evictions_count_when_they_grow_between_probes() {
        let probe = |evicted, before| reasons(&redis_findings(&info("noeviction", 0, 0, evicted), before));
        assert_eq!(probe(5, Some(5)), vec![]);
        assert_eq!(probe(7, Some(5)), vec![(Reason::KeysEvicted, Severity::Critical)]);
        // The server restarted: the counter went down, nothing new.
        assert_eq!(probe(0, Some(5)), vec![]);
        assert_eq!(probe(3, None), vec![(Reason::KeysEvicted, Severity::Warning)]);
        assert_eq!(probe(0, None), vec![]);
    }

    #[test]
    fn failing_persistence_and_unknown_policy_are_reported() {
        let mut failing = info("noeviction", 0, 0, 0);
        failing.persistence_ok = Some(false);
        assert_eq!(reasons(&redis_findings(&failing, Some(0))), vec![(Reason::PersistenceFailing, Severity::Warning)]);
        let mut unknown = info("noeviction", 0, 0, 0);
        unknown.eviction_policy = None;
        assert_eq!(reasons(&redis_findings(&unknown, Some(0))), vec![(Reason::EvictionPolicyUnknown, Severity::Info)]);
    }

    #[test]
    fn an_expiring_queue_is_critical_only_where_its_lists_are_evictable() {
        let cases = [
            ("noeviction", 10 << 20, Severity::Warning),
            ("volatile-lru", 0, Severity::Warning),
            ("volatile-lru", 10 << 20, Severity::Critical),
            ("volatile-ttl", 1, Severity::Critical),
            // allkeys-* is critical on its own (EvictionPolicyUnsafe).
            ("allkeys-lru", 10 << 20, Severity::Warning),
        ];
        for (policy, maxmemory, expected) in cases {
            let finding = queue_ttl_finding("emails", &info(policy, maxmemory, 0, 0));
            assert_eq!((finding.reason, finding.severity), (Reason::QueueExpires, expected), "{policy} {maxmemory}");
            assert_eq!(finding.queue.as_deref(), Some("emails"));
            assert!(finding.message.contains("queue emails expires"), "{}", finding.message);
        }
    }
}
