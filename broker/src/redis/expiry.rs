//! Expiring queues: kombu 5.7's `Queue(expires=…)` / `x-expires` makes kombu `PEXPIRE` every
//! priority list of the queue on each publish (and `basic_get`), so the lists — and every task in
//! them — vanish once nothing was published for that long, and under a `volatile-*` policy they are
//! evictable. Nothing but the lists' own TTLs tells the probe (kombu keeps `expires` in the
//! publishing process), so the probe reads `PTTL` of each list in its one pipeline.
//!
//! Trade-off: a `PTTL` per list adds one command per priority list (4 per queue by default) to a
//! probe that otherwise sends 6, the `LLEN`s running inside the waiting script (measured when they
//! were still commands, the `PTTL`s made a poll of 1,000 queues about 1.7× as long on a loaded
//! 2-core VM), while a queue's expiry is configuration that changes when its publishers are
//! redeployed. So each queue's TTLs are read on its first probe and then at most every
//! [`RECHECK_INTERVAL`], and the verdict is remembered in between. An empty queue has no lists
//! and tells nothing: its last verdict stands.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ::redis::{Pipeline, RedisResult, Value};

use crate::kombu::TransportOptions;

/// How long a queue's expiry verdict is trusted before its TTLs are read again.
pub(super) const RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// What the probe knows of each queue's expiry, and when it last read it.
#[derive(Default)]
pub(super) struct ExpiryCheck {
    queues: HashMap<String, Checked>,
}

struct Checked {
    at: Instant,
    expiring: bool,
}

impl ExpiryCheck {
    /// The queues whose TTLs this probe should read: never read, or read `RECHECK_INTERVAL` ago.
    pub(super) fn due<'a>(&self, queues: &[&'a str], now: Instant) -> Vec<&'a str> {
        let stale = |q: &str| self.queues.get(q).is_none_or(|c| now.duration_since(c.at) >= RECHECK_INTERVAL);
        queues.iter().copied().filter(|q| stale(q)).collect()
    }

    /// Records what the TTLs of `queues` said (`None`: nothing, the last verdict stands).
    pub(super) fn record(&mut self, queues: &[&str], verdicts: Vec<Option<bool>>, now: Instant) {
        for (queue, verdict) in queues.iter().zip(verdicts) {
            let last = self.queues.get(*queue).is_some_and(|c| c.expiring);
            self.queues.insert((*queue).to_owned(), Checked { at: now, expiring: verdict.unwrap_or(last) });
        }
    }

    pub(super) fn is_expiring(&self, queue: &str) -> bool {
        self.queues.get(queue).is_some_and(|c| c.expiring)
    }
}

/// Appends one `PTTL` per priority list of every queue, in queue order.
pub(super) fn add_ttl_commands(pipe: &mut Pipeline, options: &TransportOptions, queues: &[&str]) {
    for queue in queues {
        for key in options.priority_keys(queue) {
            pipe.cmd("PTTL").arg(key);
        }
    }
}

/// Reads the replies of [`add_ttl_commands`]: per queue, `Some(true)` when a list has a TTL,
/// `Some(false)` when lists exist and none has one, `None` when no list exists (an empty queue) or
/// the replies were refused.
pub(super) fn queue_expiry(
    replies: &mut impl Iterator<Item = RedisResult<Value>>,
    steps: usize,
    queues: usize,
) -> Vec<Option<bool>> {
    (0..queues)
        .map(|_| {
            let ttls: Vec<i64> = replies
                .by_ref()
                .take(steps)
                .filter_map(|reply| reply.ok().and_then(|v| ::redis::from_redis_value::<i64>(v).ok()))
                .collect();
            // PTTL: -2 no such list, -1 a list without a TTL, else the milliseconds left.
            if ttls.iter().any(|&ttl| ttl >= 0) {
                Some(true)
            } else if ttls.contains(&-1) {
                Some(false)
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_expires_when_one_of_its_lists_has_a_ttl() {
        let replies = [
            // queue a: no lists; queue b: one list without TTL, one with; queue c: a refused PTTL
            // and a list without TTL.
            Ok(Value::Int(-2)),
            Ok(Value::Int(-2)),
            Ok(Value::Int(-1)),
            Ok(Value::Int(900)),
            Err(::redis::RedisError::from((::redis::ErrorKind::Io, "refused"))),
            Ok(Value::Int(-1)),
        ];
        let mut replies = replies.into_iter();
        assert_eq!(queue_expiry(&mut replies, 2, 1), vec![None]);
        assert_eq!(queue_expiry(&mut replies, 2, 2), vec![Some(true), Some(false)]);
        assert!(replies.next().is_none());
    }

    #[test]
    fn verdicts_are_reread_after_the_interval_and_kept_while_a_queue_is_empty() {
        let mut check = ExpiryCheck::default();
        let start = Instant::now();
        assert_eq!(check.due(&["a", "b"], start), vec!["a", "b"]);
        check.record(&["a", "b"], vec![Some(true), None], start);
        assert!(check.is_expiring("a") && !check.is_expiring("b"));
        // Within the interval only new queues are due.
        assert_eq!(check.due(&["a", "b", "c"], start + Duration::from_secs(1)), vec!["c"]);
        let later = start + RECHECK_INTERVAL;
        assert_eq!(check.due(&["a", "b"], later), vec!["a", "b"]);
        // Drained (no lists): still expiring. Lists without a TTL: no longer.
        check.record(&["a"], vec![None], later);
        assert!(check.is_expiring("a"));
        check.record(&["a"], vec![Some(false)], later);
        assert!(!check.is_expiring("a"));
    }
}
