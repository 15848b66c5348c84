//! Expiring queues: kombu 5.7's `Queue(expires=…)` / `x-expires` makes kombu `PEXPIRE` every
//! priority list of the queue on each publish (and `basic_get`), so the lists — and every task in
//! them — vanish once nothing was published for that long, and under a `volatile-*` policy they are
//! evictable. Nothing but the lists' own TTLs tells the probe (kombu keeps `expires` in the
//! publishing process), so the probe reads `PTTL` of each list in its one pipeline.

use ::redis::{Pipeline, RedisResult, Value};

use crate::kombu::TransportOptions;

/// Appends one `PTTL` per priority list of every queue, in queue order.
pub(super) fn add_ttl_commands(pipe: &mut Pipeline, options: &TransportOptions, queues: &[&str]) {
    for queue in queues {
        for key in options.priority_keys(queue) {
            pipe.cmd("PTTL").arg(key);
        }
    }
}

/// Reads the replies of [`add_ttl_commands`]: per queue, the smallest remaining TTL in
/// milliseconds among its lists that have one, `None` when none has (a missing list is -2, a list
/// without a TTL -1; a refused `PTTL` tells nothing).
pub(super) fn queue_ttls(
    replies: &mut impl Iterator<Item = RedisResult<Value>>,
    steps: usize,
    queues: usize,
) -> Vec<Option<u64>> {
    (0..queues)
        .map(|_| {
            replies
                .by_ref()
                .take(steps)
                .filter_map(|reply| reply.ok().and_then(|v| ::redis::from_redis_value::<i64>(v).ok()))
                .filter_map(|ttl| u64::try_from(ttl).ok())
                .min()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_ttl_of_a_queues_lists_is_its_expiry() {
        let replies = [
            // queue a: no lists; queue b: one list without TTL, one with 900 ms, one with 500 ms;
            // queue c: a refused PTTL and one list without TTL.
            Ok(Value::Int(-2)),
            Ok(Value::Int(-2)),
            Ok(Value::Int(-1)),
            Ok(Value::Int(900)),
            Ok(Value::Int(500)),
            Ok(Value::Int(-2)),
            Err(::redis::RedisError::from((::redis::ErrorKind::Io, "refused"))),
            Ok(Value::Int(-1)),
        ];
        let mut replies = replies.into_iter();
        assert_eq!(queue_ttls(&mut replies, 2, 1), vec![None]);
        assert_eq!(queue_ttls(&mut replies, 3, 2), vec![Some(500), None]);
        assert!(replies.next().is_none());
    }
}
