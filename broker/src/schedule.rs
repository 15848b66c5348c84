//! Scheduled tasks: Celery tasks with an ETA (`countdown`, `eta`, every `self.retry(countdown=…)`
//! and `autoretry_for` with `retry_backoff`) that the broker holds but no worker will run before
//! their time. Checked with Celery/kombu 5.7:
//!
//! - Protocol 2 messages carry the ETA as the header `eta`, an ISO 8601 string
//!   (`2026-12-01T16:00:15.276429+00:00` from `countdown`; a string passed as `eta=` goes through
//!   unchanged, e.g. `2030-01-01T00:00:00Z`). Without an ETA the header is `null`.
//! - A worker takes an ETA task off the queue at once and holds it until due, raising its prefetch
//!   limit by one for each (`consumer.qos.increment_eventually()` in `celery/worker/strategy.py`,
//!   capped only by `worker_eta_task_limit`). On Redis it sits in kombu's `unacked` hash the whole
//!   time; a warm shutdown `RPUSH`es every held message back to the head of its list.
//! - On RabbitMQ a held task is an unacknowledged message, indistinguishable from a prefetched one
//!   in the management API. With quorum queues Celery ≥ 5.5 uses native delayed delivery instead
//!   (see [`delayed_level_bound`]).
//!
//! The probe reports when scheduled tasks come due as a [`DueHistogram`] (fixed buckets of
//! "seconds from now"), so each pool can apply its own lead time without another probe.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::observation::{DelayedDelivery, QueueObservation};
use crate::safety::{Finding, Reason, Severity};

/// Upper edges, in seconds from now, of the [`DueHistogram`] buckets. Fine-grained where lead
/// times live (pod start-ups of seconds to minutes), coarse beyond; a last bucket holds the rest.
pub const DUE_BUCKET_EDGES: [u32; 32] = [
    1, 2, 3, 5, 7, 10, 15, 20, 25, 30, 40, 50, 60, 75, 90, 120, 150, 180, 240, 300, 450, 600, 900, 1200, 1800, 2700,
    3600, 5400, 7200, 14_400, 28_800, 86_400,
];

/// How many scheduled tasks come due when: bucket `i` counts tasks due more than
/// `DUE_BUCKET_EDGES[i - 1]` and at most `DUE_BUCKET_EDGES[i]` seconds from the probe (bucket 0:
/// within the first edge); the last bucket counts everything further ahead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueHistogram {
    /// `DUE_BUCKET_EDGES.len() + 1` counts once anything was added; empty means all zero.
    counts: Vec<u64>,
}

impl DueHistogram {
    /// The bucket of a task due `seconds` from now (negative or zero: the first).
    pub fn bucket_of(seconds: f64) -> usize {
        DUE_BUCKET_EDGES.iter().position(|&edge| seconds <= f64::from(edge)).unwrap_or(DUE_BUCKET_EDGES.len())
    }

    /// Adds `n` tasks to bucket `index` (indices past the last bucket land in the last).
    pub fn add_to_bucket(&mut self, index: usize, n: u64) {
        if n == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; DUE_BUCKET_EDGES.len() + 1];
        }
        let last = self.counts.len() - 1;
        let slot = &mut self.counts[index.min(last)];
        *slot = slot.saturating_add(n);
    }

    /// Adds `n` tasks due `seconds` from now.
    pub fn add(&mut self, seconds: f64, n: u64) {
        self.add_to_bucket(Self::bucket_of(seconds), n);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Self) {
        for (i, &n) in other.counts.iter().enumerate() {
            self.add_to_bucket(i, n);
        }
    }

    /// Every count passed through `f` (e.g. scaled up from a sample).
    pub fn map_counts(&self, f: impl Fn(u64) -> u64) -> Self {
        Self { counts: self.counts.iter().map(|&n| f(n)).collect() }
    }

    /// All tasks counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |sum, &n| sum.saturating_add(n))
    }

    /// Tasks due within `lead` from the probe, with `lead` rounded up to the next bucket edge
    /// (so a task due a little after the lead may count: sizing early, never late).
    pub fn due_within(&self, lead: Duration) -> u64 {
        let buckets = Self::bucket_of(lead.as_secs_f64()) + 1;
        self.counts.iter().take(buckets).fold(0u64, |sum, &n| sum.saturating_add(n))
    }

    /// `(upper edge in seconds, count)` of every non-empty bucket; `None` edge for the last.
    pub fn buckets(&self) -> impl Iterator<Item = (Option<u32>, u64)> + '_ {
        self.counts.iter().enumerate().filter(|&(_, &n)| n > 0).map(|(i, &n)| (DUE_BUCKET_EDGES.get(i).copied(), n))
    }
}

/// A queue's scheduled tasks: ETA still in the future when the probe looked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scheduled {
    /// On the queue's lists, waiting for a worker to take them and hold them (Redis; e.g. put back
    /// by a worker's warm shutdown). Part of `ready`, but not due.
    pub listed: u64,
    /// Held by workers until due (Redis: kombu's `unacked` hash). Part of `unacked`.
    pub held: u64,
    /// In RabbitMQ's native delayed-delivery queues, bound for this queue (the only queue those
    /// queues deliver to; see [`delayed_level_bound`]).
    pub delayed: u64,
    /// When they come due.
    pub due: DueHistogram,
    /// The farthest ETA, in Unix seconds (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub farthest_eta: Option<i64>,
    /// Of them, tasks that will still be unacknowledged when kombu's `visibility_timeout` restores
    /// them to the queue (Redis): each runs more than once.
    pub beyond_visibility_timeout: u64,
    /// False when some were left uncounted (a list longer than the scan limit; they count as
    /// waiting instead) or only bounded (RabbitMQ delayed delivery: see [`delayed_level_bound`]).
    pub exact: bool,
}

impl Scheduled {
    /// Every scheduled task counted.
    pub fn total(&self) -> u64 {
        self.listed.saturating_add(self.held).saturating_add(self.delayed)
    }
}

/// Native delayed delivery (Celery ≥ 5.5 with quorum queues, `kombu/transport/native_delayed_delivery.py`):
/// a task with a countdown of `c` whole seconds is published to the topic exchange
/// `celery_delayed_27` with routing key `b27.b26.….b0.<routing key>` (the 28 bits of `c`). Level
/// queue `celery_delayed_L` has `x-message-ttl` 2^L s and dead-letters to level `L - 1` (level 0
/// to the exchange `celery_delayed_delivery`, bound to the target queue's exchange with
/// `#.<routing key>`); a message enters only the levels of its set bits. So a message waiting in
/// level `L` has less than 2^L s left there plus at most 2^L − 1 s in lower levels: it comes due
/// within 2^(L+1) seconds — an upper bound, with no lower bound (it may be about to leave). The
/// management API lists level queues' depths but not their messages' routing keys (reading those
/// would mean consuming them), so the target queue is known only from the exchange's bindings.
///
/// Returns the bound in seconds for level `L`, `None` past the 28 levels Celery declares.
pub fn delayed_level_bound(level: u32) -> Option<u64> {
    (level < DELAYED_LEVELS).then(|| 1u64 << (level + 1))
}

/// The delayed messages of native delayed delivery as scheduled tasks of `queues`, when every
/// queue the delivery exchange routes to is among them (the level queues do not say which queue a
/// message is for; reading a message's routing key would mean consuming it), else `None`. Each
/// level counts at its upper bound ([`delayed_level_bound`]), so sizing ahead for them is never
/// early, and may be late by up to that bound.
pub fn delayed_for_queues<S: AsRef<str>>(queues: &[S], delayed: &DelayedDelivery) -> Option<Scheduled> {
    let targets = delayed.targets.as_deref().filter(|t| !t.is_empty())?;
    if !targets.iter().all(|t| queues.iter().any(|q| q.as_ref() == t)) {
        return None;
    }
    let mut due = DueHistogram::default();
    for (level, &n) in delayed.levels.iter().enumerate() {
        if let Some(bound) = u32::try_from(level).ok().and_then(delayed_level_bound) {
            due.add(bound as f64, n);
        }
    }
    Some(Scheduled { delayed: delayed.total(), due, exact: false, ..Scheduled::default() })
}

/// Levels of native delayed delivery (`MAX_NUMBER_OF_BITS_TO_USE`).
pub const DELAYED_LEVELS: u32 = 28;

/// The level of a native delayed-delivery queue name (`celery_delayed_<L>`, or
/// `<prefix>_celery_delayed_<L>` as kombu names them with a prefix).
pub fn delayed_level_of(queue: &str) -> Option<u32> {
    let (head, level) = queue.rsplit_once('_')?;
    if !(head == "celery_delayed" || head.ends_with("_celery_delayed")) {
        return None;
    }
    if level.is_empty() || !level.bytes().all(|b| b.is_ascii_digit()) || (level.len() > 1 && level.starts_with('0')) {
        return None;
    }
    level.parse().ok().filter(|&l| l < DELAYED_LEVELS)
}

/// Parses a Celery ETA (ISO 8601: `YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z|±HH:MM|±HHMM]`) into Unix
/// seconds. A naive time (no offset) is read as UTC — Celery writes an offset whenever the app is
/// timezone-aware (the default). The same grammar as `unacked.lua` and `waiting.lua`, which parse
/// ETAs inside Redis; this one serves RabbitMQ paths and the tests that pin the two together.
pub fn parse_eta(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !matches!(b.get(10), Some(b'T' | b' ')) {
        return None;
    }
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut fraction = 0.0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        fraction = format!("0.{}", &text[start..i]).parse().ok()?;
    }
    let offset = match &b[i..] {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, m) = match rest {
                [_, _, b':', _, _] => (digits(i + 1, 2)?, digits(i + 4, 2)?),
                [_, _, _, _] => (digits(i + 1, 2)?, digits(i + 3, 2)?),
                [_, _] => (digits(i + 1, 2)?, 0),
                _ => return None,
            };
            let minutes = h * 60 + m;
            if *sign == b'+' { minutes * 60 } else { -minutes * 60 }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(seconds as f64 + fraction)
}

/// The `EtaBeyondVisibilityTimeout` warning for every queue holding tasks scheduled further ahead
/// than kombu's Redis `visibility_timeout`. Checked with Celery 5.7: with `visibility_timeout` 3 s
/// (and the restore sweep every second), a task with `countdown=12` ran four times — kombu puts an
/// unacknowledged message back on its queue once it was delivered longer than the timeout ago,
/// whether or not the worker still holds it for its ETA.
pub fn scheduled_findings(queues: &BTreeMap<String, QueueObservation>, now: f64, visibility: Duration) -> Vec<Finding> {
    queues
        .iter()
        .filter_map(|(name, q)| {
            let s = q.scheduled.as_ref().filter(|s| s.beyond_visibility_timeout > 0)?;
            let farthest = s.farthest_eta.map_or_else(String::new, |eta| {
                let ahead = Duration::from_secs_f64((eta as f64 - now).max(0.0));
                format!(", the farthest due at {} (in {})", format_unix(eta), format_duration(ahead))
            });
            let message = format!(
                "queue {name} holds {n} task(s) scheduled further ahead than the Redis visibility_timeout \
                 ({vt} s){farthest}: kombu puts an unacknowledged message back on its queue once it was \
                 delivered longer than visibility_timeout ago, even while a worker holds it for its ETA, \
                 so each of these tasks will run more than once. Raise visibility_timeout in Celery's \
                 broker_transport_options (and the TaskQueue's) above the longest countdown or ETA the \
                 app uses, or schedule far-future work another way (e.g. celery beat)",
                n = s.beyond_visibility_timeout,
                vt = visibility.as_secs(),
            );
            Some(Finding::new(Reason::EtaBeyondVisibilityTimeout, Severity::Warning, message).for_queue(name))
        })
        .collect()
}

/// Unix seconds as RFC 3339 UTC, e.g. `2026-12-01T16:00:15Z`.
pub fn format_unix(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A duration in the largest two units, e.g. `2h 5m`, `45s`.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etas_parse_as_celery_writes_them() {
        let cases = [
            ("1970-01-01T00:00:00+00:00", Some(0.0)),
            ("2026-12-01T16:00:15.276429+00:00", Some(1_796_140_815.276_429)),
            ("2030-01-01T00:00:00Z", Some(1_893_456_000.0)),
            ("2030-01-01T01:00:00+01:00", Some(1_893_456_000.0)),
            ("2029-12-31T19:00:00-0500", Some(1_893_456_000.0)),
            ("2030-01-01 00:00:00", Some(1_893_456_000.0)),
            ("2000-02-29T12:00:00.5+00:00", Some(951_825_600.5)),
            ("not a date", None),
            ("2030-13-01T00:00:00Z", None),
            ("2030-01-01T00:00:00+1", None),
            ("2030-01-01T00:00:00.Z", None),
        ];
        for (text, expected) in cases {
            let got = parse_eta(text);
            match (got, expected) {
                (Some(g), Some(e)) => assert!((g - e).abs() < 1e-6, "{text}: {g} != {e}"),
                _ => assert_eq!(got, expected, "{text}"),
            }
        }
    }

    #[test]
    fn unix_times_format_as_rfc3339_and_round_trip_through_parse() {
        for secs in [0i64, 951_825_600, 1_796_140_815, 1_893_456_000, 4_102_444_799] {
            let text = format_unix(secs);
            assert_eq!(parse_eta(&text), Some(secs as f64), "{text}");
        }
        assert_eq!(format_unix(1_893_456_000), "2030-01-01T00:00:00Z");
        assert_eq!(format_duration(Duration::from_secs(7_500)), "2h 5m");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
    }

    #[test]
    fn tasks_beyond_the_visibility_timeout_are_a_warning_naming_queue_and_farthest_eta() {
        let held = Scheduled {
            held: 3,
            beyond_visibility_timeout: 2,
            farthest_eta: Some(1_893_456_000),
            ..Scheduled::default()
        };
        let queues = BTreeMap::from([
            ("reports".to_owned(), QueueObservation { scheduled: Some(held), ..QueueObservation::default() }),
            (
                "emails".to_owned(),
                QueueObservation {
                    scheduled: Some(Scheduled { held: 5, ..Scheduled::default() }),
                    ..QueueObservation::default()
                },
            ),
        ]);
        let findings = scheduled_findings(&queues, 1_893_448_800.0, Duration::from_secs(3600));
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!(
            (f.reason, f.severity, f.queue.as_deref()),
            (Reason::EtaBeyondVisibilityTimeout, Severity::Warning, Some("reports"))
        );
        assert!(f.message.contains("2030-01-01T00:00:00Z (in 2h 0m)"), "{}", f.message);
        assert!(f.message.contains("visibility_timeout (3600 s)"), "{}", f.message);
    }

    #[test]
    fn due_times_fall_into_the_bucket_of_their_upper_edge() {
        assert_eq!(DueHistogram::bucket_of(-5.0), 0);
        assert_eq!(DueHistogram::bucket_of(1.0), 0);
        assert_eq!(DueHistogram::bucket_of(1.5), 1);
        assert_eq!(DueHistogram::bucket_of(30.0), 9);
        assert_eq!(DueHistogram::bucket_of(86_400.0), 31);
        assert_eq!(DueHistogram::bucket_of(86_401.0), 32);
    }

    #[test]
    fn due_within_rounds_the_lead_up_to_a_bucket_edge() {
        let mut h = DueHistogram::default();
        h.add(4.0, 1);
        h.add(20.0, 2);
        h.add(22.0, 3);
        h.add(3600.0, 10);
        h.add(1e9, 5);
        assert_eq!(h.total(), 21);
        assert_eq!(h.due_within(Duration::ZERO), 0);
        assert_eq!(h.due_within(Duration::from_secs(5)), 1);
        assert_eq!(h.due_within(Duration::from_secs(20)), 3);
        // 21 s rounds up to the 25 s edge: the task due at 22 s counts.
        assert_eq!(h.due_within(Duration::from_secs(21)), 6);
        assert_eq!(h.due_within(Duration::from_secs(3600)), 16);
        assert_eq!(h.due_within(Duration::from_secs(u64::MAX / 4)), 21);
        let mut merged = h.clone();
        merged.merge(&h);
        assert_eq!(merged.total(), 42);
        assert_eq!(merged.buckets().next(), Some((Some(5), 2)));
        assert_eq!(DueHistogram::default().due_within(Duration::from_secs(60)), 0);
    }

    #[test]
    fn delayed_level_names_and_bounds_follow_kombu() {
        assert_eq!(delayed_level_of("celery_delayed_0"), Some(0));
        assert_eq!(delayed_level_of("celery_delayed_27"), Some(27));
        assert_eq!(delayed_level_of("app_celery_delayed_8"), Some(8));
        assert_eq!(delayed_level_of("celery_delayed_28"), None);
        assert_eq!(delayed_level_of("celery_delayed_08"), None);
        assert_eq!(delayed_level_of("celery_delayed_delivery"), None);
        assert_eq!(delayed_level_of("mycelery_delayed_3"), None);
        assert_eq!(delayed_level_of("emails"), None);
        // countdown 300 (binary 100101100) first waits in level 8: due within 512 s.
        assert_eq!(delayed_level_bound(8), Some(512));
        assert_eq!(delayed_level_bound(0), Some(2));
        assert_eq!(delayed_level_bound(28), None);
    }
}
