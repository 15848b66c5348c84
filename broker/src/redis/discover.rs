//! Which Celery queues a Redis broker holds, for an audit that names none: every queue kombu bound
//! to an exchange (`_kombu.binding.<exchange>` sets, members `routing_key + sep + pattern + sep +
//! queue`), which every Celery producer and worker writes when it declares a queue. Celery's own
//! event and remote-control queues are left out.

use std::collections::BTreeSet;

use ::redis::Value;

use super::RedisBroker;
use crate::ProbeError;
use crate::kombu::TransportOptions;
use crate::safety::is_celery_internal_queue;

/// Keys per `SCAN` step: large enough that a small database takes one or two round trips.
const SCAN_COUNT: u32 = 1000;

impl RedisBroker {
    /// The Celery queues bound on this broker, sorted. `SCAN`s the keyspace for binding sets (cost
    /// grows with the number of keys: for one-off audits, not for every poll).
    pub(crate) async fn discover(&self) -> Result<Vec<String>, ProbeError> {
        let mut con = self.connection().await?;
        let pattern = format!("{}*", glob_escape(&self.options.binding_key("")));
        let mut binding_keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut con)
                .await
                .map_err(|e| self.error(&e))?;
            binding_keys.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if binding_keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for key in &binding_keys {
            pipe.cmd("SMEMBERS").arg(key);
        }
        let members: Vec<Value> = pipe.query_async(&mut con).await.map_err(|e| self.error(&e))?;
        let members = members.into_iter().filter_map(|v| ::redis::from_redis_value::<Vec<Vec<u8>>>(v).ok());
        Ok(queues_of_bindings(members.flatten(), &self.options))
    }
}

/// The queue names in binding-set members, without Celery's internal queues, sorted.
fn queues_of_bindings(members: impl IntoIterator<Item = Vec<u8>>, options: &TransportOptions) -> Vec<String> {
    let queues: BTreeSet<String> = members
        .into_iter()
        .filter_map(|member| {
            let member = String::from_utf8_lossy(&member).into_owned();
            options.parse_binding(&member).map(|b| b.queue.to_owned())
        })
        .filter(|queue| !queue.is_empty() && !is_celery_internal_queue(queue))
        .collect();
    queues.into_iter().collect()
}

/// `text` with Redis glob metacharacters escaped, so a key prefix matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_come_from_binding_members_without_celerys_own() {
        let members = [
            "emails\x06\x16\x06\x16emails",
            "tasks.#\x06\x16^tasks\\..*?$\x06\x16bulk",
            "emails\x06\x16\x06\x16emails",
            "\x06\x16\x06\x16celery@worker-1.celery.pidbox",
            "\x06\x16\x06\x16e0b9a8.reply.celery.pidbox",
            "worker.#\x06\x16\x06\x16celeryev.7f3c",
            "no separator here",
        ];
        let members = members.iter().map(|m| m.as_bytes().to_vec());
        assert_eq!(queues_of_bindings(members, &TransportOptions::default()), vec!["bulk", "emails"]);
        let colon = TransportOptions { separator: ":".into(), ..TransportOptions::default() };
        assert_eq!(queues_of_bindings([b"jobs.work::jobs".to_vec()], &colon), vec!["jobs"]);
    }

    #[test]
    fn key_prefixes_are_matched_literally() {
        assert_eq!(glob_escape("app[1]*:_kombu.binding."), "app\\[1\\]\\*:_kombu.binding.");
        assert_eq!(glob_escape("_kombu.binding."), "_kombu.binding.");
    }
}
