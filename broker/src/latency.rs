//! Queue latency: how long the oldest waiting task of a queue has waited, with no app hook.
//!
//! Celery messages carry no publish time, so the probe cannot read an age off a message. What it
//! can read cheaply is *which* message is at the head of each queue, and the [`LatencyTracker`]
//! remembers when it first saw messages:
//!
//! - **Redis.** Kombu `LPUSH`es new messages and workers pop from the right, so each priority list
//!   is in arrival order with the oldest at index -1. Every probe reports the delivery tag (a UUID
//!   per publish, kept when kombu restores a message) of the newest message (index 0); the tracker
//!   keeps these as *markers*: "this message was newest at time t, so it arrived by t". The probe
//!   looks for the oldest markers while it walks the list from the head (`waiting.lua`, the same
//!   bounded walk that counts scheduled tasks), and reports where it found them and which message
//!   is the first one due (no ETA, or its ETA passed). A message older than or equal to a marker
//!   arrived no later than the marker was first seen newest, so its age is known to within one
//!   poll interval, as a lower bound. Messages put back by a warm shutdown go to the head
//!   (`RPUSH`): they were published before everything behind them, so the bound still holds.
//! - **RabbitMQ.** The management API's cumulative `message_stats.publish` and `messages_ready`
//!   give the head's place in the arrival sequence (`published - ready + 1`); the tracker keeps the
//!   publish counter's history and finds the poll at which that message had arrived. Accurate to
//!   one poll plus the management statistics interval (5 s by default). Not exact for priority
//!   queues (`x-max-priority`) or after requeues, which reorder the queue.
//! - **Publish timestamps.** When the app stamps messages — Judoscale's convention, a
//!   `before_task_publish` handler setting `properties["published_at"] = time.time()` (Redis), or
//!   the AMQP `timestamp` property (`head_message_timestamp` of a classic RabbitMQ queue) — the age
//!   is read from the head message directly. Clocks of app and operator must agree.
//!
//! A scheduled task waits from its ETA, not from its publish: its age counts from
//! `max(arrival, eta)`, and a task not yet due is not waiting at all.
//!
//! The tracker is plain state driven by probe results and a clock (Unix seconds), owned by
//! whatever polls the broker: call [`LatencyTracker::hints`] before a probe, pass them to
//! [`Broker::probe_with`](crate::Broker::probe_with), and feed the result to
//! [`LatencyTracker::observe`].

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::observation::BrokerObservation;

/// Characters of a delivery tag the probe compares (a UUID prefix: 48 bits, so a false match
/// among the few thousand messages one probe walks is vanishingly unlikely).
pub const MARKER_LEN: usize = 12;
/// Markers passed to the probe per list (the oldest ones: those that can be at the head).
pub const HINTS_PER_LIST: usize = 32;
/// Markers remembered per list; past this, older ones are thinned (every other one goes), so
/// resolution degrades gracefully for very old backlogs.
pub const MARKERS_PER_LIST: usize = 256;
/// Publish-counter samples remembered per RabbitMQ queue (thinned like markers).
pub const COUNTER_SAMPLES: usize = 512;

/// What the probe saw at the head of one queue, for the tracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HeadSample {
    /// Redis: one entry per priority list, in `priority_steps` order.
    Lists(Vec<ListHead>),
    /// RabbitMQ: management API counters.
    Counters(ArrivalCounters),
}

/// One Redis priority list, walked from the head (oldest end).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListHead {
    /// `LLEN`.
    pub len: u64,
    /// Messages walked from the head (at most `len`; fewer past the probe's scan limit).
    pub scanned: u64,
    /// The first walked message that is due (no ETA, or ETA passed).
    pub first_due: Option<HeadMessage>,
    /// Tag prefix of the newest message (index 0).
    pub newest: Option<String>,
    /// Markers from the hints found during the walk.
    pub markers: Vec<MarkerHit>,
}

/// A message at a known place in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeadMessage {
    /// 0 for the head (index -1), 1 for the next, …
    pub position: u64,
    /// Delivery tag prefix ([`MARKER_LEN`] characters).
    pub tag: String,
    /// Its ETA, Unix milliseconds.
    pub eta_ms: Option<i64>,
    /// `properties.published_at` (or a `published_at` header), Unix milliseconds.
    pub published_ms: Option<i64>,
}

/// A hinted marker the probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarkerHit {
    pub tag: String,
    /// Position from the head.
    pub position: u64,
}

/// RabbitMQ management counters of one queue, from one consistent statistics snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArrivalCounters {
    /// `message_stats.publish`: messages routed to the queue since it was created (or the
    /// statistics were reset).
    pub published: u64,
    /// `messages_ready` from the same snapshot.
    pub ready: u64,
    /// `head_message_timestamp` (Unix seconds) when the head message carries an AMQP timestamp.
    pub head_timestamp: Option<i64>,
}

impl ArrivalCounters {
    /// From a management API queue object with `message_stats.publish`, `messages_ready` and
    /// `head_message_timestamp`; `None` without publish statistics (none yet, or statistics
    /// disabled).
    pub fn from_management(queue: &serde_json::Value) -> Option<Self> {
        Some(Self {
            published: queue["message_stats"]["publish"].as_u64()?,
            ready: queue["messages_ready"].as_u64()?,
            head_timestamp: queue["head_message_timestamp"].as_i64(),
        })
    }
}

/// What the probe should look for: per queue, per priority list (in `priority_steps` order), the
/// tag prefixes of the oldest markers, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeHints {
    pub markers: HashMap<String, Vec<Vec<String>>>,
}

impl ProbeHints {
    /// The markers of `queue`'s list `index`, if any.
    pub fn for_list(&self, queue: &str, index: usize) -> &[String] {
        self.markers.get(queue).and_then(|lists| lists.get(index)).map_or(&[], Vec::as_slice)
    }
}

/// How a reported latency is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyBasis {
    /// Read from a publish timestamp on the message.
    Timestamp,
    /// From the tracker's sightings: a lower bound within one poll interval of the truth
    /// (RabbitMQ: plus the management statistics interval).
    Sighting,
    /// The oldest message predates everything the tracker has seen (it just started): the age is
    /// at least this.
    AtLeast,
    /// The probe's walk could not place the oldest message among the tracker's markers (a burst
    /// longer than the walk was consumed between two polls): the newest marker's age stands in,
    /// which may be above or below the truth, by at most the time that marker was newest plus one
    /// poll interval.
    Estimate,
}

/// The age of a queue's oldest waiting (due) task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub oldest_wait: Duration,
    pub basis: LatencyBasis,
}

#[derive(Debug, Clone)]
struct Marker {
    tag: String,
    /// When it was first seen newest: it had arrived by then.
    first_newest: f64,
    /// When it was last seen newest: anything newer arrived after this.
    last_newest: f64,
}

#[derive(Debug, Default, Clone)]
struct ListTrack {
    /// Oldest first; only markers not known to have left the list.
    markers: VecDeque<Marker>,
    /// When the first due message started waiting, as last computed, and how it is known: stands
    /// in when a poll does not walk the list (more non-empty lists than the probe walks).
    since: Option<(f64, LatencyBasis)>,
}

#[derive(Debug, Default, Clone)]
struct CounterTrack {
    /// `(poll time, published)` whenever the counter moved, oldest first.
    history: VecDeque<(f64, u64)>,
}

#[derive(Debug, Default, Clone)]
struct QueueTrack {
    lists: Vec<ListTrack>,
    counters: CounterTrack,
    latency: Option<Latency>,
}

/// Remembers, per queue, when messages were first seen, and derives the age of the oldest
/// waiting one. See the module documentation.
#[derive(Debug, Default, Clone)]
pub struct LatencyTracker {
    queues: HashMap<String, QueueTrack>,
}

impl LatencyTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the next probe should look for.
    pub fn hints(&self) -> ProbeHints {
        let markers = self
            .queues
            .iter()
            .filter(|(_, q)| q.lists.iter().any(|l| !l.markers.is_empty()))
            .map(|(name, q)| {
                let lists = q
                    .lists
                    .iter()
                    .map(|l| l.markers.iter().take(HINTS_PER_LIST).map(|m| m.tag.clone()).collect())
                    .collect();
                (name.clone(), lists)
            })
            .collect();
        ProbeHints { markers }
    }

    /// Takes in one probe result, made at `now` (Unix seconds) with the hints of
    /// [`hints`](Self::hints) called just before. Queues the probe did not report are forgotten.
    pub fn observe(&mut self, now: f64, observation: &BrokerObservation) {
        self.queues.retain(|name, _| observation.queues.get(name).is_some_and(|q| q.head.is_some()));
        for (name, queue) in &observation.queues {
            let Some(head) = &queue.head else { continue };
            let track = self.queues.entry(name.clone()).or_default();
            track.latency = match head {
                HeadSample::Lists(lists) => {
                    track.lists.resize_with(lists.len(), ListTrack::default);
                    let ages = track.lists.iter_mut().zip(lists).filter_map(|(t, l)| t.observe(now, l));
                    ages.max_by(|a, b| a.oldest_wait.cmp(&b.oldest_wait))
                }
                HeadSample::Counters(counters) => track.counters.observe(now, counters),
            };
        }
    }

    /// The age of `queue`'s oldest waiting task at the last [`observe`](Self::observe); `None`
    /// when nothing due is waiting (or the queue was not probed).
    pub fn latency(&self, queue: &str) -> Option<Latency> {
        self.queues.get(queue).and_then(|q| q.latency)
    }
}

fn ms_to_secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn age(now: f64, since: f64) -> Duration {
    Duration::try_from_secs_f64((now - since).max(0.0)).unwrap_or(Duration::MAX)
}

impl ListTrack {
    fn observe(&mut self, now: f64, seen: &ListHead) -> Option<Latency> {
        if seen.len == 0 {
            self.markers.clear();
            self.since = None;
            return None;
        }
        if seen.scanned == 0 {
            // Not walked this time: nothing is known to have left; the last estimate ages.
            return self.since.map(|(since, basis)| Latency { oldest_wait: age(now, since), basis });
        }
        let passed = self.markers.len().min(HINTS_PER_LIST);
        let found: HashMap<&str, u64> = seen.markers.iter().map(|h| (h.tag.as_str(), h.position)).collect();
        let oldest_hit = self.markers.iter().take(passed).position(|m| found.contains_key(m.tag.as_str()));
        // Everything older than the oldest marker still present has left the list (FIFO); with no
        // marker found in a walk that covered the whole list, every marker passed has.
        let whole_list_seen = seen.scanned >= seen.len;
        let gone = match oldest_hit {
            Some(i) => i,
            None if whole_list_seen => passed,
            None => 0,
        };
        self.markers.drain(..gone);

        let passed = passed - gone;
        let located = oldest_hit.is_some() || whole_list_seen;

        let latency = seen.first_due.as_ref().map(|message| {
            let eta = message.eta_ms.map(ms_to_secs).filter(|&eta| eta <= now);
            if let Some(published) = message.published_ms.map(ms_to_secs) {
                let since = eta.map_or(published, |eta| eta.max(published));
                return Latency { oldest_wait: age(now, since), basis: LatencyBasis::Timestamp };
            }
            let (arrived_by, basis) = self.arrived_by(now, message, &found, passed, located);
            let since = eta.map_or(arrived_by, |eta| eta.max(arrived_by));
            Latency { oldest_wait: age(now, since), basis }
        });
        self.since = latency.map(|l| (now - l.oldest_wait.as_secs_f64(), l.basis));

        if let Some(newest) = &seen.newest {
            match self.markers.back_mut() {
                Some(last) if &last.tag == newest => last.last_newest = now,
                _ => self.markers.push_back(Marker { tag: newest.clone(), first_newest: now, last_newest: now }),
            }
        }
        thin(&mut self.markers, MARKERS_PER_LIST);
        latency
    }

    /// The time by which `message` had arrived: when the oldest marker no older than it was first
    /// seen newest. The first `passed` markers were looked for; `located` says the walk placed
    /// them (a marker found, or the whole list walked). A passed marker not found after the
    /// oldest one found is still in the list (FIFO) but past the walk, so newer than the message.
    fn arrived_by(
        &self,
        now: f64,
        message: &HeadMessage,
        found: &HashMap<&str, u64>,
        passed: usize,
        located: bool,
    ) -> (f64, LatencyBasis) {
        if !located {
            // Every marker looked for has left or lies past the walk: the newest one stands in.
            let newest = self.markers.back().map_or(now, |m| m.first_newest);
            return (newest, LatencyBasis::Estimate);
        }
        for (i, marker) in self.markers.iter().enumerate() {
            match found.get(marker.tag.as_str()) {
                Some(&position) if position >= message.position => {
                    return (marker.first_newest, LatencyBasis::Sighting);
                }
                Some(_) => {}
                None if i < passed => return (marker.first_newest, LatencyBasis::Sighting),
                // Not looked for: present, but on an unknown side of the message.
                None => return (marker.first_newest, LatencyBasis::Estimate),
            }
        }
        // Newer than every marker: it arrived after the last poll.
        (now, LatencyBasis::Sighting)
    }
}

impl CounterTrack {
    fn observe(&mut self, now: f64, seen: &ArrivalCounters) -> Option<Latency> {
        if self.history.back().is_some_and(|&(_, published)| seen.published < published) {
            // The counter went back: the queue was re-created or the statistics were reset.
            self.history.clear();
        }
        if self.history.back().is_none_or(|&(_, published)| published != seen.published) {
            self.history.push_back((now, seen.published));
        }
        if seen.ready == 0 {
            return None;
        }
        if let Some(timestamp) = seen.head_timestamp {
            return Some(Latency { oldest_wait: age(now, timestamp as f64), basis: LatencyBasis::Timestamp });
        }
        // The head is message number `published - ready + 1` in arrival order.
        let head = seen.published.saturating_sub(seen.ready) + 1;
        // Samples before the one that saw the head arrive are no longer needed (the head only moves
        // forward), but one is kept as the lower end of its arrival interval.
        while self.history.len() > 1 && self.history.get(1).is_some_and(|&(_, published)| published < head) {
            self.history.pop_front();
        }
        let latency = match self.history.iter().position(|&(_, published)| published >= head) {
            Some(0) => Latency { oldest_wait: age(now, self.history[0].0), basis: LatencyBasis::AtLeast },
            Some(i) => Latency { oldest_wait: age(now, self.history[i].0), basis: LatencyBasis::Sighting },
            None => Latency { oldest_wait: Duration::ZERO, basis: LatencyBasis::Sighting },
        };
        thin(&mut self.history, COUNTER_SAMPLES);
        Some(latency)
    }
}

/// Keeps at most `max` entries (markers, counter samples) by dropping every other one of the older
/// half (never the oldest): resolution degrades for old entries, which matter least.
fn thin<T>(entries: &mut VecDeque<T>, max: usize) {
    if entries.len() <= max {
        return;
    }
    let half = entries.len() / 2;
    let mut index = 0;
    entries.retain(|_| {
        index += 1;
        index > half || index % 2 == 1
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::observation::{BrokerInfo, BrokerKind, QueueObservation};

    fn observation(queue: &str, head: HeadSample) -> BrokerObservation {
        let q = QueueObservation { head: Some(head), ..QueueObservation::default() };
        BrokerObservation {
            queues: BTreeMap::from([(queue.to_owned(), q)]),
            info: BrokerInfo::new(BrokerKind::Redis),
            findings: Vec::new(),
        }
    }

    /// A list as the probe reports it: `messages` oldest first as (tag, eta seconds), with the
    /// hinted markers located, walking at most `walk` from the head.
    fn list(messages: &[(&str, Option<f64>)], hints: &ProbeHints, walk: usize, now: f64) -> HeadSample {
        let wanted = hints.for_list("q", 0);
        let walked = &messages[..walk.min(messages.len())];
        let first_due = walked.iter().enumerate().find(|(_, (_, eta))| eta.is_none_or(|e| e <= now)).map(
            |(position, (tag, eta))| HeadMessage {
                position: position as u64,
                tag: (*tag).to_owned(),
                eta_ms: eta.map(|e| (e * 1000.0) as i64),
                published_ms: None,
            },
        );
        let markers = walked
            .iter()
            .enumerate()
            .filter(|(_, (tag, _))| wanted.iter().any(|w| w == tag))
            .map(|(position, (tag, _))| MarkerHit { tag: (*tag).to_owned(), position: position as u64 })
            .collect();
        HeadSample::Lists(vec![ListHead {
            len: messages.len() as u64,
            scanned: walked.len() as u64,
            first_due,
            newest: messages.last().map(|(tag, _)| (*tag).to_owned()),
            markers,
        }])
    }

    fn seconds(l: Option<Latency>) -> Option<(f64, LatencyBasis)> {
        l.map(|l| (l.oldest_wait.as_secs_f64(), l.basis))
    }

    /// A list's messages, oldest first: (tag, ETA in Unix seconds).
    type Messages<'a> = Vec<(&'a str, Option<f64>)>;

    /// Feeds `lists` at the given times; returns each latency.
    fn run(steps: &[(f64, Messages<'_>)], walk: usize) -> Vec<Option<(f64, LatencyBasis)>> {
        let mut tracker = LatencyTracker::new();
        steps
            .iter()
            .map(|(now, messages)| {
                let sample = list(messages, &tracker.hints(), walk, *now);
                tracker.observe(*now, &observation("q", sample));
                seconds(tracker.latency("q"))
            })
            .collect()
    }

    #[test]
    fn the_head_is_aged_from_the_poll_that_first_saw_it_newest() {
        let got = run(
            &[
                (100.0, vec![("a", None)]),
                (101.0, vec![("a", None), ("b", None)]),
                (102.0, vec![("a", None), ("b", None), ("c1", None), ("c2", None)]),
                (105.0, vec![("b", None), ("c1", None), ("c2", None)]),
                (107.0, vec![("c1", None), ("c2", None)]),
                (108.0, vec![]),
            ],
            100,
        );
        let s = LatencyBasis::Sighting;
        assert_eq!(
            got,
            vec![
                // First sight: it arrived by now.
                Some((0.0, s)),
                Some((1.0, s)),
                Some((2.0, s)),
                // b was first seen newest at 101.
                Some((4.0, s)),
                // c1 was never newest; it arrived no later than c2, first seen at 102.
                Some((5.0, s)),
                None,
            ]
        );
    }

    #[test]
    fn a_due_eta_task_waits_from_its_eta_and_a_future_one_not_at_all() {
        let got = run(
            &[
                (100.0, vec![("held", Some(150.0)), ("x", None)]),
                (110.0, vec![("held", Some(150.0)), ("x", None)]),
                (160.0, vec![("held", Some(150.0)), ("x", None)]),
                (170.0, vec![("held", Some(500.0))]),
            ],
            100,
        );
        let s = LatencyBasis::Sighting;
        // x is the first due message; once `held` is due it is the head, waiting since its ETA.
        assert_eq!(got, vec![Some((0.0, s)), Some((10.0, s)), Some((10.0, s)), None]);
    }

    #[test]
    fn a_head_past_the_walk_is_a_lower_bound() {
        // Ten messages arrive at once; the walk covers two, and every known marker has gone.
        let burst: Vec<(&str, Option<f64>)> =
            ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "m9"].iter().map(|t| (*t, None)).collect();
        let got = run(&[(100.0, vec![("old", None)]), (101.0, burst.clone()), (104.0, burst[5..].to_vec())], 2);
        // `old` is not in the walk: gone, or past it? The tracker cannot tell and estimates from it.
        assert_eq!(got[1], Some((1.0, LatencyBasis::Estimate)));
        // m9, first seen newest at 101, stands in for m5 (which arrived by then).
        assert_eq!(got[2], Some((3.0, LatencyBasis::Estimate)));
    }

    #[test]
    fn markers_stay_bounded_and_still_age_an_old_head() {
        let mut tracker = LatencyTracker::new();
        let mut messages: Vec<(String, Option<f64>)> = Vec::new();
        for t in 0..2000u32 {
            messages.push((format!("m{t}"), None));
            let view: Vec<(&str, Option<f64>)> = messages.iter().map(|(m, e)| (m.as_str(), *e)).collect();
            let now = 1000.0 + f64::from(t);
            let sample = list(&view, &tracker.hints(), 100, now);
            tracker.observe(now, &observation("q", sample));
        }
        let track = &tracker.queues["q"].lists[0];
        assert!(track.markers.len() <= MARKERS_PER_LIST, "{}", track.markers.len());
        let (age, basis) = seconds(tracker.latency("q")).unwrap();
        assert_eq!((age, basis), (1999.0, LatencyBasis::Sighting));
    }

    #[test]
    fn rabbitmq_counters_place_the_head_in_the_arrival_sequence() {
        let mut tracker = LatencyTracker::new();
        let mut at = |now: f64, published: u64, ready: u64| {
            let counters = ArrivalCounters { published, ready, head_timestamp: None };
            tracker.observe(now, &observation("q", HeadSample::Counters(counters)));
            seconds(tracker.latency("q"))
        };
        let s = LatencyBasis::Sighting;
        // Two published before tracking started: their age is at least the time since then.
        assert_eq!(at(100.0, 2, 2), Some((0.0, LatencyBasis::AtLeast)));
        assert_eq!(at(101.0, 3, 3), Some((1.0, LatencyBasis::AtLeast)));
        assert_eq!(at(102.0, 5, 5), Some((2.0, LatencyBasis::AtLeast)));
        // Three consumed: the head is message 4, first counted at 102.
        assert_eq!(at(106.0, 5, 2), Some((4.0, s)));
        // Message 6 arrives at 107 and everything before it is consumed.
        assert_eq!(at(107.0, 6, 1), Some((0.0, s)));
        assert_eq!(at(110.0, 6, 1), Some((3.0, s)));
        assert_eq!(at(111.0, 6, 0), None);
        // A re-created queue starts its counter again.
        assert_eq!(at(112.0, 1, 1), Some((0.0, LatencyBasis::AtLeast)));
        // A head timestamp wins.
        let counters = ArrivalCounters { published: 1, ready: 1, head_timestamp: Some(50) };
        tracker.observe(113.0, &observation("q", HeadSample::Counters(counters)));
        assert_eq!(seconds(tracker.latency("q")), Some((63.0, LatencyBasis::Timestamp)));
    }

    #[test]
    fn a_list_the_probe_did_not_walk_keeps_ageing_its_last_estimate() {
        let mut tracker = LatencyTracker::new();
        let sample = list(&[("a", None)], &tracker.hints(), 10, 100.0);
        tracker.observe(100.0, &observation("q", sample));
        let sample = list(&[("a", None), ("b", None)], &tracker.hints(), 10, 102.0);
        tracker.observe(102.0, &observation("q", sample));
        assert_eq!(seconds(tracker.latency("q")), Some((2.0, LatencyBasis::Sighting)));
        // Two lists, one walked per poll: the other's head is not read this time.
        let unwalked = HeadSample::Lists(vec![ListHead { len: 2, ..ListHead::default() }]);
        tracker.observe(105.0, &observation("q", unwalked));
        assert_eq!(seconds(tracker.latency("q")), Some((5.0, LatencyBasis::Sighting)));
        // The markers survive: once walked again, `b` is aged from its sighting at 102.
        let sample = list(&[("b", None)], &tracker.hints(), 10, 106.0);
        tracker.observe(106.0, &observation("q", sample));
        assert_eq!(seconds(tracker.latency("q")), Some((4.0, LatencyBasis::Sighting)));
    }

    #[test]
    fn queues_no_longer_probed_are_forgotten() {
        let mut tracker = LatencyTracker::new();
        let sample = list(&[("a", None)], &ProbeHints::default(), 10, 0.0);
        tracker.observe(0.0, &observation("q", sample));
        assert!(tracker.hints().markers.contains_key("q"));
        tracker.observe(1.0, &observation("other", HeadSample::Lists(vec![])));
        assert!(tracker.hints().markers.is_empty());
        assert_eq!(tracker.latency("q"), None);
    }

    #[test]
    fn management_counters_parse_from_a_queue_object() {
        let q =
            serde_json::json!({"messages_ready": 3, "message_stats": {"publish": 9}, "head_message_timestamp": null});
        assert_eq!(
            ArrivalCounters::from_management(&q),
            Some(ArrivalCounters { published: 9, ready: 3, head_timestamp: None })
        );
        assert_eq!(ArrivalCounters::from_management(&serde_json::json!({"messages_ready": 3})), None);
    }
}
