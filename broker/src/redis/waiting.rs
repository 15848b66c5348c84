//! Reading the replies of `waiting.lua` (the lists, walked from the head) and of the scheduled-task
//! columns of `unacked.lua`, into per-queue counts. Pure: no I/O.

use ::redis::Value;

use crate::latency::{HeadMessage, HeadSample, ListHead, MarkerHit};
use crate::schedule::{DueHistogram, Scheduled};

/// What `waiting.lua` reported for one list.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ListReport {
    pub head: ListHead,
    /// Messages walked whose ETA is in the future.
    pub scheduled: u64,
    /// Of them, due further ahead than the visibility timeout.
    pub beyond_visibility: u64,
    /// Their latest ETA, Unix seconds; 0 when none.
    pub farthest: i64,
    pub due: DueHistogram,
}

/// The scheduled-task columns of one `unacked.lua` group.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct HeldReport {
    pub scheduled: u64,
    pub beyond_visibility: u64,
    pub farthest: i64,
    pub due: DueHistogram,
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn count(v: &Value) -> Option<u64> {
    int(v).and_then(|n| u64::try_from(n).ok())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) => Some(items),
        Value::Nil => Some(&[]),
        _ => None,
    }
}

/// A sparse histogram `{bucket, count, ...}` (0-based buckets).
pub(crate) fn histogram(v: &Value) -> Option<DueHistogram> {
    let items = array(v)?;
    let mut h = DueHistogram::default();
    for pair in items.chunks(2) {
        let [bucket, n] = pair else { return None };
        h.add_to_bucket(usize::try_from(count(bucket)?).ok()?, count(n)?);
    }
    Some(h)
}

/// Columns 5.. of an `unacked.lua` group: `scheduled, beyond_visibility, farthest_eta, histogram`.
pub(crate) fn held_report(columns: &[Value]) -> Option<HeldReport> {
    let [scheduled, beyond, farthest, due] = columns else { return None };
    Some(HeldReport {
        scheduled: count(scheduled)?,
        beyond_visibility: count(beyond)?,
        farthest: int(farthest)?,
        due: histogram(due)?,
    })
}

/// The reply of `waiting.lua` (a line per key): one report per key, in key order; `None` when
/// it is malformed.
pub(crate) fn list_reports(reply: &Value) -> Option<Vec<ListReport>> {
    let text = text(reply)?;
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split('\n').map(list_report).collect()
}

/// `-` is an empty field.
fn present(field: &str) -> Option<&str> {
    (field != "-").then_some(field)
}

fn list_report(line: &str) -> Option<ListReport> {
    // A list the walk skipped (or an empty one): its length alone.
    if let Ok(len) = line.parse::<u64>() {
        return Some(ListReport { head: ListHead { len, ..ListHead::default() }, ..ListReport::default() });
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let [len, walked, scheduled, beyond, farthest, buckets, first_due, newest, hits] = fields[..] else {
        return None;
    };
    let mut due = DueHistogram::default();
    for pair in present(buckets).into_iter().flat_map(|b| b.split(',')) {
        let (bucket, n) = pair.split_once(':')?;
        due.add_to_bucket(bucket.parse().ok()?, n.parse().ok()?);
    }
    let first_due = match present(first_due) {
        None => None,
        Some(message) => {
            let [position, tag, eta, published] = message.split(':').collect::<Vec<_>>()[..] else {
                return None;
            };
            let optional = |f: &str| present(f).map(str::parse::<i64>).transpose();
            Some(HeadMessage {
                position: position.parse().ok()?,
                tag: tag.to_owned(),
                eta_ms: optional(eta).ok()?,
                published_ms: optional(published).ok()?,
            })
        }
    };
    let markers = present(hits)
        .into_iter()
        .flat_map(|h| h.split(','))
        .map(|hit| {
            let (tag, position) = hit.split_once(':')?;
            Some(MarkerHit { tag: tag.to_owned(), position: position.parse().ok()? })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(ListReport {
        head: ListHead {
            len: len.parse().ok()?,
            scanned: walked.parse().ok()?,
            first_due,
            newest: present(newest).map(str::to_owned),
            markers,
        },
        scheduled: scheduled.parse().ok()?,
        beyond_visibility: beyond.parse().ok()?,
        farthest: farthest.parse().ok()?,
        due,
    })
}

/// One queue's share of the waiting script: its lists' reports.
pub(crate) struct QueueLists<'a>(pub &'a [ListReport]);

impl QueueLists<'_> {
    /// Messages on the lists (as the script counted them).
    pub fn len(&self) -> u64 {
        self.0.iter().map(|l| l.head.len).sum()
    }

    /// Whether every message was walked.
    pub fn complete(&self) -> bool {
        self.0.iter().all(|l| l.head.scanned >= l.head.len)
    }

    /// Scheduled messages on the lists, with their due times.
    pub fn scheduled(&self) -> (u64, u64, i64, DueHistogram) {
        let mut due = DueHistogram::default();
        let (mut n, mut beyond, mut farthest) = (0u64, 0u64, 0i64);
        for list in self.0 {
            n += list.scheduled;
            beyond += list.beyond_visibility;
            farthest = farthest.max(list.farthest);
            due.merge(&list.due);
        }
        (n, beyond, farthest, due)
    }

    pub fn head(&self) -> HeadSample {
        HeadSample::Lists(self.0.iter().map(|l| l.head.clone()).collect())
    }
}

/// A queue's scheduled tasks from its lists and the unacked entries attributed to it.
pub(crate) fn scheduled(lists: Option<&QueueLists<'_>>, held: Option<&HeldReport>, held_exact: bool) -> Scheduled {
    let mut out = Scheduled { exact: held_exact, ..Scheduled::default() };
    if let Some(lists) = lists {
        let (n, beyond, farthest, due) = lists.scheduled();
        out.listed = n;
        out.beyond_visibility_timeout += beyond;
        out.farthest_eta = (farthest > 0).then_some(farthest);
        out.due.merge(&due);
        out.exact &= lists.complete();
    } else {
        out.exact = false;
    }
    if let Some(held) = held {
        out.held = held.scheduled;
        out.beyond_visibility_timeout += held.beyond_visibility;
        if held.farthest > 0 {
            out.farthest_eta = Some(out.farthest_eta.unwrap_or(0).max(held.farthest));
        }
        out.due.merge(&held.due);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_list_report_reads_every_field() {
        let reply = bulk(
            "7 5 2 1 1900000000 3:1,32:1 2:26a77231-7f5:-:1796137585352 517eded3-bd4 aaaaaaaa-aaa:4\n0\n\
             1 1 0 0 0 - 0::1700000000000:- - -\n12",
        );
        let reports = list_reports(&reply).unwrap();
        assert_eq!(reports.len(), 4);
        // Not walked: the length alone.
        assert_eq!((reports[3].head.len, reports[3].head.scanned, reports[3].head.first_due.is_none()), (12, 0, true));
        let first = &reports[0];
        assert_eq!((first.head.len, first.head.scanned, first.scheduled, first.beyond_visibility), (7, 5, 2, 1));
        assert_eq!((first.farthest, first.due.total()), (1_900_000_000, 2));
        assert_eq!(first.due.due_within(std::time::Duration::from_secs(5)), 1);
        assert_eq!(
            first.head.first_due,
            Some(HeadMessage {
                position: 2,
                tag: "26a77231-7f5".into(),
                eta_ms: None,
                published_ms: Some(1_796_137_585_352)
            })
        );
        assert_eq!(first.head.newest.as_deref(), Some("517eded3-bd4"));
        assert_eq!(first.head.markers, vec![MarkerHit { tag: "aaaaaaaa-aaa".into(), position: 4 }]);
        assert_eq!(reports[1].head, ListHead::default());
        // A message without a usable tag, due since its ETA.
        let third = &reports[2].head;
        assert_eq!((third.newest.as_ref(), third.markers.len()), (None, 0));
        let due = third.first_due.as_ref().unwrap();
        assert_eq!((due.tag.as_str(), due.eta_ms, due.published_ms), ("", Some(1_700_000_000_000), None));

        let lists = QueueLists(&reports[..2]);
        assert_eq!((lists.len(), lists.complete()), (7, false));
        let held = HeldReport { scheduled: 3, beyond_visibility: 0, farthest: 1_950_000_000, ..HeldReport::default() };
        let s = scheduled(Some(&lists), Some(&held), true);
        assert_eq!((s.listed, s.held, s.total()), (2, 3, 5));
        assert_eq!((s.farthest_eta, s.beyond_visibility_timeout, s.exact), (Some(1_950_000_000), 1, false));
        assert_eq!(list_reports(&bulk("")), Some(Vec::new()));
    }

    #[test]
    fn malformed_replies_are_rejected_not_misread() {
        assert_eq!(list_reports(&Value::Int(3)), None);
        assert_eq!(list_reports(&bulk("1 1 0")), None);
        assert_eq!(list_reports(&bulk("1 1 0 0 0 x - - -")), None);
        assert_eq!(list_reports(&bulk("1 1 0 0 0 - 0:t - -")), None);
        assert_eq!(histogram(&Value::Array(vec![Value::Int(1)])), None);
        assert_eq!(held_report(&[Value::Int(1)]), None);
    }
}
