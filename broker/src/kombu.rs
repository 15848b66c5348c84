//! Kombu's Redis key layout — the one place that knows it. Verified against
//! `kombu/transport/redis.py` (kombu 5.7):
//!
//! - `_q_for_pri(queue, pri)`: a message of priority step `p` waits in list `queue` when `p == 0`,
//!   else in `queue + sep + str(p)`; `_size(queue)` sums `LLEN` over `priority_steps`.
//! - `global_keyprefix` is prepended to every key kombu touches (`LLEN`, `HSET`, `ZADD`, `SADD`, …).
//! - Ack emulation: delivered-but-unacked messages sit in the hash `unacked` (delivery tag →
//!   JSON `[message, exchange, routing_key]`) and the sorted set `unacked_index` (delivery tag →
//!   delivery time in seconds), shared by all queues.
//! - Bindings: set `_kombu.binding.<exchange>` with members `routing_key + sep + pattern + sep +
//!   queue`; `pattern` is empty for direct exchanges and a regex derived from the routing key for
//!   topic exchanges.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Kombu's defaults: `priority_steps`, `sep` and `visibility_timeout` of the Redis transport.
pub const DEFAULT_PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
pub const DEFAULT_SEPARATOR: &str = "\x06\x16";
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3600);

const UNACKED: &str = "unacked";
const UNACKED_INDEX: &str = "unacked_index";
const BINDING_PREFIX: &str = "_kombu.binding.";

/// The subset of Celery's `broker_transport_options` that decides where kombu keeps messages (and,
/// for `sentinel://` URLs, which master to ask the Sentinels for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TransportOptions {
    /// Prepended to every Redis key kombu uses (`global_keyprefix`); default empty.
    pub global_keyprefix: String,
    /// Priority lists per queue (`priority_steps`); default `[0, 3, 6, 9]`.
    pub priority_steps: Vec<u8>,
    /// Joins a queue name and a priority step (`sep`); default `"\x06\x16"`.
    pub separator: String,
    /// After this long an unacked message is restored to its queue by a live consumer
    /// (`visibility_timeout`); default one hour.
    #[serde(with = "seconds")]
    pub visibility_timeout: Duration,
    /// The Sentinel master name (`master_name`); required with `sentinel://` URLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            global_keyprefix: String::new(),
            priority_steps: DEFAULT_PRIORITY_STEPS.to_vec(),
            separator: DEFAULT_SEPARATOR.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            master_name: None,
        }
    }
}

mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

impl TransportOptions {
    /// The Redis lists holding `queue`'s ready messages, one per priority step, prefix included.
    pub fn priority_keys(&self, queue: &str) -> Vec<String> {
        self.priority_steps.iter().map(|&step| self.priority_key(queue, step)).collect()
    }

    fn priority_key(&self, queue: &str, step: u8) -> String {
        let prefix = &self.global_keyprefix;
        if step == 0 { format!("{prefix}{queue}") } else { format!("{prefix}{queue}{}{step}", self.separator) }
    }

    /// The hash of unacked messages (delivery tag → `[message, exchange, routing_key]`).
    pub fn unacked_key(&self) -> String {
        format!("{}{UNACKED}", self.global_keyprefix)
    }

    /// The sorted set of unacked delivery tags scored by delivery time (seconds since the epoch).
    pub fn unacked_index_key(&self) -> String {
        format!("{}{UNACKED_INDEX}", self.global_keyprefix)
    }

    /// The set of bindings of `exchange`.
    pub fn binding_key(&self, exchange: &str) -> String {
        format!("{}{BINDING_PREFIX}{exchange}", self.global_keyprefix)
    }

    /// Parses a member of a binding set into `(routing_key, pattern, queue)`.
    pub fn parse_binding<'a>(&self, member: &'a str) -> Option<Binding<'a>> {
        let mut parts = member.splitn(3, self.separator.as_str());
        Some(Binding { routing_key: parts.next()?, is_topic: !parts.next()?.is_empty(), queue: parts.next()? })
    }
}

/// One member of `_kombu.binding.<exchange>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    pub routing_key: &'a str,
    /// Kombu stores a regex only for topic exchanges; direct (and fanout) bindings have none.
    pub is_topic: bool,
    pub queue: &'a str,
}

impl Binding<'_> {
    /// Whether a message published with `routing_key` reaches this binding's queue.
    pub fn routes(&self, routing_key: &str) -> bool {
        if self.is_topic { topic_matches(self.routing_key, routing_key) } else { self.routing_key == routing_key }
    }
}

/// Kombu's topic matching (`TopicExchange.key_to_pattern`): words split on `.`, `*` matches one
/// non-empty word's characters (`[^.]+`), `#` matches any text, dots included (`.*?`), anchored.
fn topic_matches(binding_key: &str, routing_key: &str) -> bool {
    fn go(pattern: &[u8], text: &[u8]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some((b'#', rest)) => (0..=text.len()).any(|i| go(rest, &text[i..])),
            Some((b'*', rest)) => (1..=text.len()).take_while(|&i| text[i - 1] != b'.').any(|i| go(rest, &text[i..])),
            Some((c, rest)) => text.first() == Some(c) && go(rest, &text[1..]),
        }
    }
    // Only whole words are wildcards: `a*b` is literal, as in kombu.
    let tokens: Vec<u8> = binding_key
        .split('.')
        .map(|word| match word {
            "*" | "#" => word.to_owned(),
            _ => word.replace('*', "\u{1}").replace('#', "\u{2}"),
        })
        .collect::<Vec<_>>()
        .join(".")
        .into_bytes();
    let text = routing_key.replace('*', "\u{1}").replace('#', "\u{2}");
    go(&tokens, text.as_bytes())
}

/// Unacked messages that share an exchange and routing key, as counted by the probe's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnackedGroup {
    pub exchange: String,
    pub routing_key: String,
    pub count: u64,
    /// Of `count`, delivered longer than the visibility timeout ago.
    pub orphaned: u64,
}

/// Per-queue `(unacked, orphaned)` for `queues`, attributing each group the way kombu routes:
/// through the exchange's binding set when it has one, else (default exchange `""`, or a binding set
/// that is gone) to the queue named by the routing key — Celery's default of routing key == queue.
/// A group that matches several queues counts for each of them (kombu does not record which copy
/// was consumed). Fanout exchanges route without the routing key and are not attributed.
pub fn attribute_unacked(
    groups: &[UnackedGroup],
    bindings: &HashMap<String, Vec<String>>,
    options: &TransportOptions,
    queues: &[&str],
) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = queues.iter().map(|q| ((*q).to_owned(), (0, 0))).collect();
    for group in groups {
        let table: Vec<Binding<'_>> = bindings
            .get(&group.exchange)
            .map(|members| members.iter().filter_map(|m| options.parse_binding(m)).collect())
            .unwrap_or_default();
        let mut credit = |queue: &str| {
            if let Some((count, orphaned)) = out.get_mut(queue) {
                *count += group.count;
                *orphaned += group.orphaned;
            }
        };
        if group.exchange.is_empty() || table.is_empty() {
            credit(&group.routing_key);
            continue;
        }
        let mut targets: Vec<&str> = table.iter().filter(|b| b.routes(&group.routing_key)).map(|b| b.queue).collect();
        targets.sort_unstable();
        targets.dedup();
        targets.into_iter().for_each(&mut credit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(prefix: &str, steps: &[u8], sep: &str) -> TransportOptions {
        TransportOptions {
            global_keyprefix: prefix.into(),
            priority_steps: steps.to_vec(),
            separator: sep.into(),
            ..TransportOptions::default()
        }
    }

    #[test]
    fn priority_keys_follow_kombu_q_for_pri() {
        let cases: &[(TransportOptions, &str, &[&str])] = &[
            (
                TransportOptions::default(),
                "celery",
                &["celery", "celery\x06\x163", "celery\x06\x166", "celery\x06\x169"],
            ),
            (
                opts("app1:", &[0, 3, 6, 9], "\x06\x16"),
                "emails",
                &["app1:emails", "app1:emails\x06\x163", "app1:emails\x06\x166", "app1:emails\x06\x169"],
            ),
            (opts("", &[0, 5], ":"), "q", &["q", "q:5"]),
            // Without a 0 step every list carries a suffix (kombu maps priority 0 to a step then).
            (opts("", &[1, 9], "\x06\x16"), "q", &["q\x06\x161", "q\x06\x169"]),
            (opts("", &[0], "\x06\x16"), "q", &["q"]),
            (
                opts("p", &(0..=9).collect::<Vec<_>>(), "\x06\x16"),
                "q",
                &[
                    "pq",
                    "pq\x06\x161",
                    "pq\x06\x162",
                    "pq\x06\x163",
                    "pq\x06\x164",
                    "pq\x06\x165",
                    "pq\x06\x166",
                    "pq\x06\x167",
                    "pq\x06\x168",
                    "pq\x06\x169",
                ],
            ),
        ];
        for (options, queue, expected) in cases {
            assert_eq!(&options.priority_keys(queue), expected, "{options:?}");
        }
    }

    #[test]
    fn shared_keys_carry_the_global_prefix() {
        let o = opts("tenant-a:", &[0], "\x06\x16");
        assert_eq!(o.unacked_key(), "tenant-a:unacked");
        assert_eq!(o.unacked_index_key(), "tenant-a:unacked_index");
        assert_eq!(o.binding_key("celery"), "tenant-a:_kombu.binding.celery");
        let d = TransportOptions::default();
        assert_eq!(
            (d.unacked_key(), d.unacked_index_key(), d.binding_key("emails")),
            ("unacked".into(), "unacked_index".into(), "_kombu.binding.emails".into())
        );
    }

    #[test]
    fn binding_members_parse_into_routing_key_and_queue() {
        let d = TransportOptions::default();
        let direct = d.parse_binding("emails\x06\x16\x06\x16emails").unwrap();
        assert_eq!(direct, Binding { routing_key: "emails", is_topic: false, queue: "emails" });
        let topic = d.parse_binding("tasks.#\x06\x16^tasks\\..*?$\x06\x16bulk").unwrap();
        assert!(topic.is_topic);
        assert_eq!(topic.queue, "bulk");
        assert_eq!(d.parse_binding("no separators"), None);
    }

    #[test]
    fn topic_wildcards_match_like_kombu_regexes() {
        let cases = [
            ("tasks.*", "tasks.email", true),
            ("tasks.*", "tasks.email.send", false),
            ("tasks.*", "tasks.", false),
            ("tasks.#", "tasks.email.send", true),
            // kombu turns `a.#` into `^a\..*?$`: the dot is required, unlike AMQP.
            ("tasks.#", "tasks", false),
            ("#", "anything.at.all", true),
            ("*.email", "bulk.email", true),
            ("a*b", "axb", false),
            ("a*b", "a*b", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (key, rk, expected) in cases {
            assert_eq!(topic_matches(key, rk), expected, "{key} vs {rk}");
        }
    }

    fn group(exchange: &str, rk: &str, count: u64, orphaned: u64) -> UnackedGroup {
        UnackedGroup { exchange: exchange.into(), routing_key: rk.into(), count, orphaned }
    }

    #[test]
    fn unacked_messages_are_credited_to_the_queues_their_exchange_routes_to() {
        let d = TransportOptions::default();
        let bindings = HashMap::from([
            ("emails".to_owned(), vec!["emails\x06\x16\x06\x16emails".to_owned()]),
            (
                "tasks".to_owned(),
                vec![
                    "tasks.#\x06\x16^tasks\\..*?$\x06\x16bulk".to_owned(),
                    "tasks.email\x06\x16\x06\x16emails".to_owned(),
                ],
            ),
            ("celery".to_owned(), vec!["celery\x06\x16\x06\x16celery".to_owned()]),
        ]);
        let groups = [
            group("emails", "emails", 3, 1),
            group("celery", "celery", 2, 0),
            // Default exchange: routing key is the queue.
            group("", "reports", 4, 0),
            // Binding set evicted or never written: fall back to routing key == queue.
            group("lost", "emails", 1, 0),
            // Topic exchange: both the pattern and the direct binding match.
            group("tasks", "tasks.email", 5, 2),
            group("tasks", "tasks.pdf", 7, 0),
            // Routed nowhere we probe.
            group("celery", "other", 9, 9),
        ];
        let got = attribute_unacked(&groups, &bindings, &d, &["emails", "celery", "reports", "bulk"]);
        let expected = BTreeMap::from([
            ("emails".to_owned(), (3 + 1 + 5, 1 + 2)),
            ("celery".to_owned(), (2, 0)),
            ("reports".to_owned(), (4, 0)),
            ("bulk".to_owned(), (5 + 7, 2)),
        ]);
        assert_eq!(got, expected);
    }

    #[test]
    fn transport_options_serde_uses_camel_case_and_kombu_defaults() {
        let parsed: TransportOptions =
            serde_json::from_str(r#"{"globalKeyprefix":"x:","visibilityTimeout":60}"#).unwrap();
        assert_eq!(parsed.global_keyprefix, "x:");
        assert_eq!(parsed.priority_steps, vec![0, 3, 6, 9]);
        assert_eq!(parsed.separator, "\x06\x16");
        assert_eq!(parsed.visibility_timeout, Duration::from_secs(60));
    }
}
