//! Scheduled tasks and queue latency on a real private RabbitMQ node, with real Celery: native
//! delayed delivery for quorum queues, and the age of the oldest waiting task from the management
//! API's counters. The node is shared by this binary's tests; each test has its own vhost.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_broker::latency::{HeadSample, LatencyBasis};
use celery_broker::{Broker, BrokerConfig, BrokerObservation, LatencyTracker, Reason, Severity};
use common::{poll, pop_one, send_noop};
use e2e_harness::RabbitServer;
use e2e_harness::python::CeleryWorker;

fn rabbit() -> &'static RabbitServer {
    RabbitServer::shared().expect("private RabbitMQ node")
}

/// A Celery app whose queue `$QUEUE` is a quorum queue on the topic exchange `$QUEUE-x` (what
/// native delayed delivery needs), or a plain classic queue when `$QUORUM` is empty.
const APP_PY: &str = r#"
import os
from celery import Celery
from kombu import Exchange, Queue

app = Celery("rtasks", broker=os.environ["BROKER"])
app.conf.broker_connection_retry_on_startup = True
name = os.environ["QUEUE"]
if os.environ.get("QUORUM"):
    app.conf.task_queues = [Queue(name, Exchange(name + "-x", type="topic"), routing_key=name,
                                  queue_arguments={"x-queue-type": "quorum"})]
else:
    app.conf.task_queues = [Queue(name)]

@app.task(name="tasks.noop")
def noop():
    pass
"#;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn send(app: &Path, env: &[(&str, &str)], count: u32, countdown: u32) -> (f64, f64) {
    let queue = env.iter().find(|(k, _)| *k == "QUEUE").map(|(_, v)| *v).expect("QUEUE in env");
    send_noop(app, "rtasks", env, queue, count, countdown)
}

/// A vhost of its own, the app written to a temp dir, and a probe with the management API.
fn setup(vhost: &str) -> (tempfile::TempDir, String, Broker) {
    let rabbit = rabbit();
    rabbit.add_vhost(vhost).unwrap();
    let app = tempfile::tempdir().unwrap();
    std::fs::write(app.path().join("rtasks.py"), APP_PY).unwrap();
    let url = rabbit.amqp_url_for_vhost(vhost);
    let config =
        BrokerConfig { management_url: Some(rabbit.management_url().into()), ..BrokerConfig::new(url.clone()) };
    (app, url, Broker::new(config).unwrap())
}

#[tokio::test]
async fn native_delayed_delivery_levels_count_as_scheduled_for_their_only_target_queue() {
    let queue = "dd-quorum";
    let (app, url, broker) = setup("delayed");
    let env = [("BROKER", url.as_str()), ("QUEUE", queue), ("QUORUM", "1")];
    // The worker declares the queue, the 28 level queues and the delivery bindings.
    let args = ["-A", "rtasks", "worker", "-Q", queue, "-c", "1", "-l", "INFO", "--without-mingle", "--without-gossip"];
    let mut worker = CeleryWorker::spawn(app.path(), &args, &env).unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(90)).unwrap();
    assert!(worker.log().contains("Global QoS is disabled"), "{}", worker.log());

    send(app.path(), &env, 5, 300);
    send(app.path(), &env, 1, 100_000);
    let seen = poll("the level queues to show 6 delayed tasks", Duration::from_secs(60), || async {
        let seen = broker.probe(&[queue]).await.unwrap();
        let delayed = seen.info.delayed_delivery.as_ref().map_or(0, |d| d.total());
        if delayed == 6 && seen.queues[queue].scheduled.is_some() { Ok(seen) } else { Err(seen.info) }
    })
    .await;
    let delayed = seen.info.delayed_delivery.as_ref().unwrap();
    // countdown 300 = 0b100101100: level 8 first; 100000 ≥ 2^16: level 16.
    assert_eq!((delayed.levels[8], delayed.levels[16]), (5, 1), "{delayed:?}");
    assert_eq!(delayed.targets.as_deref(), Some(&[queue.to_owned()][..]));
    let q = &seen.queues[queue];
    let s = q.scheduled.as_ref().unwrap();
    assert_eq!((s.delayed, s.exact, q.ready), (6, false, 0), "{q:?}");
    // Level 8 comes due within 512 s (an upper bound), level 16 within 2^17 s.
    assert_eq!(s.due.due_within(Duration::from_secs(300)), 0);
    assert_eq!(s.due.due_within(Duration::from_secs(600)), 5);
    let finding = seen.findings.iter().find(|f| f.reason == Reason::QuorumQueueStaticPrefetch).unwrap();
    assert_eq!((finding.severity, finding.queue.as_deref()), (Severity::Info, Some(queue)));
    assert!(finding.message.contains("native delayed-delivery"), "{}", finding.message);
    assert!(!seen.is_unsafe(), "{:?}", seen.findings);
    // An audit of every queue lists the task queue, not the 28 level queues Celery declared.
    assert_eq!(broker.discover().await.unwrap(), vec![queue.to_owned()]);
    drop(worker);
}

/// The level queues' depths are read in real time, not from the management statistics, which for
/// quorum queues (the levels' default type) refresh only on the queue's 5 s tick: tasks with
/// `countdown=8` wait in level 3 (seen there by a probe) and run, and the very next probe counts
/// none of them as delayed (the statistics still listed them in the level for up to a tick, and the
/// autoscaler counted them twice once they had reached their queue).
#[tokio::test]
async fn native_delayed_delivery_levels_are_read_in_real_time() {
    let queue = "dd-live";
    let (app, url, broker) = setup("delayed-live");
    let env = [("BROKER", url.as_str()), ("QUEUE", queue), ("QUORUM", "1")];
    let args = ["-A", "rtasks", "worker", "-Q", queue, "-c", "1", "-l", "INFO", "--without-mingle", "--without-gossip"];
    let mut worker = CeleryWorker::spawn(app.path(), &args, &env).unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(90)).unwrap();

    send(app.path(), &env, 4, 8);
    poll("the 4 tasks in level 3", Duration::from_secs(60), || async {
        let seen = broker.probe(&[queue]).await.unwrap();
        let levels = seen.info.delayed_delivery.map(|d| d.levels).unwrap_or_default();
        if levels.get(3) == Some(&4) { Ok(()) } else { Err(levels) }
    })
    .await;
    poll("the 4 tasks to run", Duration::from_secs(60), || async {
        let done = worker.log().matches("succeeded in").count();
        if done == 4 { Ok(()) } else { Err(done) }
    })
    .await;
    let seen = broker.probe(&[queue]).await.unwrap();
    let delayed = seen.info.delayed_delivery.as_ref().expect("the level queues are listed");
    assert_eq!(delayed.total(), 0, "tasks that already ran still counted as delayed: {delayed:?}");
    assert_eq!(seen.queues[queue].scheduled.as_ref().map_or(0, |s| s.total()), 0, "{:?}", seen.queues[queue]);
    drop(worker);
}

/// One probe and tracker update.
struct Sample {
    at: f64,
    /// The statistics' `message_stats.publish` and `messages_ready`.
    published: u64,
    ready: u64,
    latency: Option<(f64, LatencyBasis)>,
}

async fn sample(broker: &Broker, tracker: &mut LatencyTracker, queue: &str) -> Sample {
    let at = now();
    let seen: BrokerObservation = broker.probe_with(&[queue], &tracker.hints()).await.unwrap();
    tracker.observe(at, &seen);
    let (published, ready) = match &seen.queues[queue].head {
        Some(HeadSample::Counters(c)) => (c.published, c.ready),
        _ => (0, 0),
    };
    let latency = tracker.latency(queue).map(|l| (l.oldest_wait.as_secs_f64(), l.basis));
    Sample { at, published, ready, latency }
}

#[tokio::test]
async fn the_oldest_waiting_tasks_age_follows_the_publish_counter_within_a_poll_and_a_statistics_interval() {
    let queue = "lat-classic";
    let (app, url, broker) = setup("latency");
    let env = [("BROKER", url.as_str()), ("QUEUE", queue)];
    // Declare the queue (a first task), then wait until the statistics know it.
    send(app.path(), &env, 1, 0);
    poll("publish statistics for the queue", Duration::from_secs(60), || async {
        let seen = broker.probe(&[queue]).await.unwrap();
        match &seen.queues[queue].head {
            Some(HeadSample::Counters(c)) if c.published == 1 => Ok(()),
            other => Err(other.clone()),
        }
    })
    .await;
    pop_one(&url, queue);
    let mut tracker = LatencyTracker::new();

    // Sends, in arrival order: (n-th message published to the queue, send window, poll before).
    struct Sent {
        number: u64,
        window: (f64, f64),
        poll_before: f64,
        counted_at: Option<f64>,
    }
    let mut last_poll = now();
    let mut sent: Vec<Sent> = Vec::new();
    let mut number = 1;
    for (round, sends, pops) in [(0, 1, 0), (1, 1, 0), (2, 2, 0), (3, 0, 1), (4, 0, 1)] {
        for _ in 0..sends {
            number += 1;
            let window = send(app.path(), &env, 1, 0);
            sent.push(Sent { number, window, poll_before: last_poll, counted_at: None });
        }
        for _ in 0..pops {
            pop_one(&url, queue);
            sent.remove(0);
        }
        let until = now() + 2.5;
        let mut checked = 0;
        while now() < until || checked == 0 {
            assert!(now() < until + 60.0, "round {round}: the statistics never caught up with the queue");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Sample { at, published, ready, latency } = sample(&broker, &mut tracker, queue).await;
            for s in sent.iter_mut().filter(|s| s.counted_at.is_none() && published >= s.number) {
                s.counted_at = Some(at);
            }
            last_poll = at;
            let oldest = &sent[0];
            // Until the statistics show every send and consumption, they describe an older queue.
            let caught_up = published == number && ready == sent.len() as u64;
            let (Some(counted_at), true) = (oldest.counted_at, caught_up) else { continue };
            let (age, basis) = latency.expect("a task is waiting");
            checked += 1;
            assert_eq!(basis, LatencyBasis::Sighting, "round {round}");
            let (truth_min, truth_max) = (at - oldest.window.1, at - oldest.window.0);
            // The head's arrival is placed at the first poll whose statistics counted it: after
            // the send by one poll interval plus the statistics interval at most.
            let within = counted_at - oldest.poll_before;
            assert!(age <= truth_max + 0.5, "round {round}: reported {age:.2} s, truth at most {truth_max:.2} s");
            assert!(
                truth_min - age <= within,
                "round {round}: reported {age:.2} s, truth at least {truth_min:.2} s, poll + statistics interval {within:.2} s"
            );
        }
    }
}
