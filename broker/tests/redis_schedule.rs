//! Scheduled (ETA/countdown) tasks and queue latency on a real redis-server, with tasks sent and
//! held by real Celery: the probe must count what Celery will do, not every message Redis holds.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_broker::latency::{HeadSample, LatencyBasis};
use celery_broker::{Broker, BrokerConfig, LatencyTracker, Reason, Severity, TransportOptions};
use common::{kombu_transport, poll, pop_one, send_blocking, send_noop, start_worker, write_app};
use e2e_harness::RedisServer;
use e2e_harness::python::run_script;

fn send(app: &Path, env: &[(&str, &str)], queue: &str, count: u32, countdown: u32) -> (f64, f64) {
    send_noop(app, "tasks", env, queue, count, countdown)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn held_eta_tasks_are_scheduled_and_a_warm_shutdown_puts_them_back_as_scheduled_not_waiting() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let transport = kombu_transport(&TransportOptions::default());
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", transport.as_str())];
    let (before, after) = send(app.path(), &env, "emails", 20, 3600);
    send_blocking(app.path(), &env, "emails", 3);
    // Before any worker: all 23 wait on the list, 20 of them scheduled.
    let broker = Broker::new(BrokerConfig::new(url.clone())).unwrap();
    let seen = broker.probe(&["emails"]).await.unwrap();
    let q = &seen.queues["emails"];
    let s = q.scheduled.as_ref().unwrap();
    assert_eq!((q.ready, q.waiting, s.listed, s.held, s.exact), (23, Some(3), 20, 0, true), "{q:?}");

    // One worker, one process, prefetch 1: it runs one blocking task, reserves the next and holds
    // every ETA task (Celery raises its prefetch by one per ETA task).
    let worker = start_worker(app.path(), &env, "emails", 1);
    // Settled means the first blocking task started (acked: off the list and out of unacked) and
    // the next was reserved in its place: 1 left on the list. Before it starts, the worker also
    // holds 21 (20 ETA + the first blocking task, not yet acked) with 2 on the list.
    let seen = poll("the worker to hold the 20 ETA tasks and run one", Duration::from_secs(60), || async {
        let seen = broker.probe(&["emails"]).await.unwrap();
        let q = &seen.queues["emails"];
        let held = q.scheduled.as_ref().map_or(0, |s| s.held);
        if held == 20 && q.unacked == Some(21) && q.ready == 1 { Ok(seen) } else { Err(seen.queues) }
    })
    .await;
    let q = &seen.queues["emails"];
    let s = q.scheduled.as_ref().unwrap();
    assert_eq!((q.ready, q.waiting, q.reserved_due, s.listed, s.exact), (1, Some(1), Some(1), 0, true), "{q:?}");
    // Due in an hour: none within 30 minutes, all within the hour.
    assert_eq!(s.due.due_within(Duration::from_secs(1800)), 0);
    assert_eq!(s.due.due_within(Duration::from_secs(3600)), 20);
    let farthest = s.farthest_eta.unwrap() as f64;
    assert!((before + 3600.0..=after + 3601.0).contains(&farthest), "{before} {after} {farthest}");
    // The default visibility timeout (1 h) outlives none of them... just: delivered within a
    // second of being due in 3600 s, they are due before 3600 s after delivery.
    assert_eq!(s.beyond_visibility_timeout, 0);

    // Let the blocking tasks finish, then stop the worker warmly: kombu RPUSHes what it held back
    // to the head of the list. They are still scheduled, not backlog.
    redis.cli(&["LPUSH", "release", "1", "1", "1"]).unwrap();
    poll("the blocking tasks to finish", Duration::from_secs(60), || async {
        let q = broker.probe(&["emails"]).await.unwrap().queues["emails"].clone();
        if q.reserved_due == Some(0) && q.ready == 0 { Ok(()) } else { Err(q) }
    })
    .await;
    worker.terminate(Duration::from_secs(60)).unwrap();
    let seen = broker.probe(&["emails"]).await.unwrap();
    let q = &seen.queues["emails"];
    let s = q.scheduled.as_ref().unwrap();
    assert_eq!((q.ready, q.waiting, q.unacked, s.listed, s.held), (20, Some(0), Some(0), 20, 0), "{q:?}");
    // Nothing due is waiting, so there is no latency to report.
    let mut tracker = LatencyTracker::new();
    tracker.observe(now(), &seen);
    assert_eq!(tracker.latency("emails"), None);
}

#[tokio::test]
async fn tasks_scheduled_past_the_visibility_timeout_are_a_warning_naming_the_queue_and_farthest_eta() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let options = TransportOptions { visibility_timeout: Duration::from_secs(60), ..TransportOptions::default() };
    let transport = kombu_transport(&options);
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", transport.as_str())];
    let (_, after) = send(app.path(), &env, "reports", 1, 600);
    send(app.path(), &env, "reports", 2, 30);
    let broker = Broker::new(BrokerConfig { transport: options.clone(), ..BrokerConfig::new(url.clone()) }).unwrap();

    let check = |seen: &celery_broker::BrokerObservation, where_: &str| {
        let finding = seen
            .findings
            .iter()
            .find(|f| f.reason == Reason::EtaBeyondVisibilityTimeout)
            .unwrap_or_else(|| panic!("{where_}: no visibility finding in {:?}", seen.findings));
        assert_eq!((finding.severity, finding.queue.as_deref()), (Severity::Warning, Some("reports")));
        assert!(finding.message.contains("1 task(s)") && finding.message.contains("(60 s)"), "{}", finding.message);
        let farthest = seen.queues["reports"].scheduled.as_ref().unwrap().farthest_eta.unwrap();
        assert!((farthest as f64) <= after + 601.0, "{farthest}");
        assert!(finding.message.contains(&celery_broker::schedule::format_unix(farthest)), "{}", finding.message);
        assert!(seen.is_unsafe());
    };
    // On the list, due in 10 minutes with a 1-minute visibility timeout.
    check(&broker.probe(&["reports"]).await.unwrap(), "listed");

    // Held by a worker: the same task, now in the unacked hash with its delivery time.
    let _worker = start_worker(app.path(), &env, "reports", 1);
    let seen = poll("the worker to hold the ETA tasks", Duration::from_secs(60), || async {
        let seen = broker.probe(&["reports"]).await.unwrap();
        let held = seen.queues["reports"].scheduled.as_ref().map_or(0, |s| s.held);
        if held == 3 { Ok(seen) } else { Err(seen.queues) }
    })
    .await;
    check(&seen, "held");
    assert_eq!(seen.queues["reports"].scheduled.as_ref().unwrap().beyond_visibility_timeout, 1);
}

#[tokio::test]
async fn past_the_list_scan_limit_scheduled_messages_count_as_waiting_and_say_so() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", "{}")];
    // Oldest first: 5 due, then 30 scheduled. A walk of 10 from the head sees 5 + 5.
    send(app.path(), &env, "bulk", 5, 0);
    send(app.path(), &env, "bulk", 30, 900);
    let config = BrokerConfig { list_scan_limit: 10, ..BrokerConfig::new(url.clone()) };
    let seen = Broker::new(config).unwrap().probe(&["bulk"]).await.unwrap();
    let q = &seen.queues["bulk"];
    let s = q.scheduled.as_ref().unwrap();
    assert_eq!((q.ready, q.waiting, s.listed, s.exact), (35, Some(30), 5, false), "{q:?}");
    assert!(seen.findings.iter().any(|f| f.reason == Reason::ListScanSampled), "{:?}", seen.findings);
    // With the default limit everything is walked.
    let seen = Broker::new(BrokerConfig::new(url.clone())).unwrap().probe(&["bulk"]).await.unwrap();
    let q = &seen.queues["bulk"];
    assert_eq!((q.waiting, q.scheduled.as_ref().unwrap().listed), (Some(5), 30));
    assert!(seen.findings.iter().all(|f| f.reason != Reason::ListScanSampled));
    // 0 turns the walk off: lengths only, everything counts as waiting, no head for latency.
    let off = BrokerConfig { list_scan_limit: 0, ..BrokerConfig::new(url) };
    let seen = Broker::new(off).unwrap().probe(&["bulk"]).await.unwrap();
    let q = &seen.queues["bulk"];
    assert_eq!((q.ready, q.waiting, q.scheduled.as_ref().unwrap().listed), (35, Some(35), 0));
    let mut tracker = LatencyTracker::new();
    tracker.observe(now(), &seen);
    assert_eq!(tracker.latency("bulk"), None);
}

#[tokio::test]
async fn with_more_non_empty_lists_than_the_limit_the_walk_takes_their_heads_in_turn() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", "{}")];
    let queues = ["q0", "q1", "q2", "q3", "q4"];
    for q in queues {
        send(app.path(), &env, q, 1, 0);
    }
    let broker = Broker::new(BrokerConfig { list_scan_limit: 3, ..BrokerConfig::new(url) }).unwrap();
    let mut walked = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let seen = broker.probe(&queues).await.unwrap();
        let heads: Vec<&str> = queues
            .iter()
            .filter(|q| match &seen.queues[**q].head {
                Some(HeadSample::Lists(lists)) => lists.iter().any(|l| l.scanned > 0),
                _ => false,
            })
            .copied()
            .collect();
        // Never more than the limit, and the lengths are always all there.
        assert_eq!(heads.len(), 3, "{heads:?}");
        assert!(queues.iter().all(|q| seen.queues[*q].ready == 1));
        assert!(seen.findings.iter().any(|f| f.reason == Reason::ListScanSampled));
        walked.extend(heads);
    }
    assert_eq!(walked.len(), 5, "two polls cover every list: {walked:?}");
}

/// One probe and tracker update; returns (probe start, reported latency in seconds, basis).
async fn sample(broker: &Broker, tracker: &mut LatencyTracker, queue: &str) -> (f64, Option<(f64, LatencyBasis)>) {
    let at = now();
    let seen = broker.probe_with(&[queue], &tracker.hints()).await.unwrap();
    tracker.observe(at, &seen);
    (at, tracker.latency(queue).map(|l| (l.oldest_wait.as_secs_f64(), l.basis)))
}

#[tokio::test]
async fn the_oldest_waiting_tasks_age_matches_when_it_was_sent_within_one_poll() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", "{}")];
    let broker = Broker::new(BrokerConfig::new(url.clone())).unwrap();
    let mut tracker = LatencyTracker::new();
    let poll_every = Duration::from_millis(500);

    // Each send remembers its time window and the polls just before and after it. A report must
    // never exceed the true age (beyond the probe's own round trip), and may fall short of it by at
    // most the gap between those two polls: one poll interval.
    struct Sent {
        window: (f64, f64),
        poll_before: f64,
        poll_after: Option<f64>,
    }
    let mut last_poll = sample(&broker, &mut tracker, "q").await.0;
    let mut sent: Vec<Sent> = Vec::new();
    // A; B; C1 and C2 within one poll interval; then A and B are consumed, so B and then C1 (never
    // seen as the newest message: the tracker knows it only by C2) become the oldest.
    for (round, sends, pops) in [(0, 1, 0), (1, 1, 0), (2, 2, 0), (3, 0, 1), (4, 0, 1)] {
        for _ in 0..sends {
            let window = send(app.path(), &env, "q", 1, 0);
            sent.push(Sent { window, poll_before: last_poll, poll_after: None });
        }
        for _ in 0..pops {
            pop_one(&url, "q");
            sent.remove(0);
        }
        let until = now() + 2.0;
        while now() < until {
            tokio::time::sleep(poll_every).await;
            let (at, reported) = sample(&broker, &mut tracker, "q").await;
            for s in sent.iter_mut().filter(|s| s.poll_after.is_none()) {
                s.poll_after = Some(at);
            }
            let oldest = &sent[0];
            let (age, basis) = reported.expect("a task is waiting");
            assert_eq!(basis, LatencyBasis::Sighting, "round {round}");
            let (truth_min, truth_max) = (at - oldest.window.1, at - oldest.window.0);
            let interval = oldest.poll_after.unwrap() - oldest.poll_before;
            let round_trip = 0.5;
            assert!(
                age <= truth_max + round_trip,
                "round {round}: reported {age:.2} s, truth at most {truth_max:.2} s"
            );
            assert!(
                truth_min - age <= interval,
                "round {round}: reported {age:.2} s, truth at least {truth_min:.2} s, poll interval {interval:.2} s"
            );
            last_poll = at;
        }
    }
    // Drain: nothing waits, so no latency.
    for _ in 0..sent.len() {
        pop_one(&url, "q");
    }
    assert_eq!(sample(&broker, &mut tracker, "q").await.1, None);
}

#[tokio::test]
async fn a_publish_stamp_gives_the_exact_age() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    // Judoscale's convention: a before_task_publish handler stamps properties["published_at"].
    let code = "import os, sys, time\nsys.path.insert(0, os.environ['APP_DIR'])\n\
                from celery.signals import before_task_publish\n\
                @before_task_publish.connect\ndef stamp(properties=None, **_):\n    properties['published_at'] = time.time() - 100\n\
                from tasks import app\napp.send_task('tasks.noop', queue='stamped')\nprint(time.time() - 100)\n";
    let dir = app.path().to_string_lossy().into_owned();
    let out = run_script(code, &[("APP_DIR", &dir), ("BROKER", &url), ("TRANSPORT", "{}")]).unwrap();
    let stamped: f64 = out.trim().parse().unwrap();
    let broker = Broker::new(BrokerConfig::new(url)).unwrap();
    let mut tracker = LatencyTracker::new();
    let (at, reported) = sample(&broker, &mut tracker, "stamped").await;
    let (age, basis) = reported.unwrap();
    assert_eq!(basis, LatencyBasis::Timestamp);
    // The stamp was taken a moment before `stamped`: the age is about 100 s, read off the message.
    assert!((at - stamped - 0.5..=at - stamped + 0.5).contains(&age), "{age} vs {}", at - stamped);
}

#[tokio::test]
async fn etas_parse_the_same_inside_redis_as_in_rust() {
    // The scripts read ETAs with eta.lua; schedule::parse_eta is its Rust mirror.
    let redis = RedisServer::start().unwrap();
    let script = format!(
        "{}\nlocal out = {{}}\nfor i, s in ipairs(ARGV) do local v = parse_eta(s); out[i] = v and string.format('%.6f', v) or '' end\nreturn out",
        include_str!("../src/redis/eta.lua")
    );
    let cases = [
        "2026-12-01T16:00:15.276429+00:00",
        "2030-01-01T00:00:00Z",
        "2030-01-01T01:00:00+01:00",
        "2029-12-31T19:00:00-0500",
        "2029-12-31T19:00:00-05",
        "2030-01-01 00:00:00",
        "2000-02-29T12:00:00.5+00:00",
        "1969-07-20T20:17:40+00:00",
        "not a date",
        "2030-13-01T00:00:00Z",
        "2030-01-01T00:00:00+1",
        "2030-01-01T00:00:00.Z",
        "",
    ];
    let mut con = ::redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let parsed: Vec<String> = ::redis::Script::new(&script).arg(&cases[..]).invoke_async(&mut con).await.unwrap();
    for (text, lua) in cases.iter().zip(parsed) {
        let rust = celery_broker::schedule::parse_eta(text).map(|v| format!("{v:.6}")).unwrap_or_default();
        assert_eq!(lua, rust, "{text:?}");
    }
}
