//! Worker events from real Celery workers on real redis-server / rabbitmq-server processes: who is
//! alive, how many tasks each runs, offline on warm shutdown, resubscription after a restart.
//!
//! Workers run `tasks.block` (waits on the Redis list `release` of a control Redis), so a test
//! holds exactly N tasks running and releases them when it chooses; nothing waits on a clock.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use celery_broker::events::{WorkerEvents, WorkerState, redis_channels};
use celery_broker::{BrokerConfig, TransportOptions};
use common::{kombu_transport, poll, send_blocking, write_app};
use e2e_harness::python::CeleryWorker;
use e2e_harness::{RabbitServer, RedisServer};

const DEADLINE: Duration = Duration::from_secs(90);

/// A worker named `hostname` as the operator starts one (`-n`, `--without-mingle --without-gossip`,
/// heartbeats left on), consuming `queue` with `concurrency` processes; returned once it consumes.
fn start_worker(app: &Path, env: &[(&str, &str)], hostname: &str, queue: &str, concurrency: u32) -> CeleryWorker {
    let concurrency = concurrency.to_string();
    let args = [
        "-A",
        "tasks",
        "worker",
        "-n",
        hostname,
        "-Q",
        queue,
        "-c",
        &concurrency,
        "--prefetch-multiplier",
        "1",
        "-l",
        "INFO",
        "--without-mingle",
        "--without-gossip",
    ];
    let mut worker = CeleryWorker::spawn(app, &args, env).unwrap();
    worker.wait_for_log("ready.", DEADLINE).unwrap();
    worker
}

/// Lets `n` running `tasks.block` tasks finish.
fn release(control: &RedisServer, n: usize) {
    let mut args = vec!["RPUSH", "release"];
    args.extend(std::iter::repeat_n("1", n));
    control.cli(&args).unwrap();
}

/// Waits until `hostname`'s remembered state satisfies `check`, and returns it.
async fn wait_for(
    events: &WorkerEvents,
    hostname: &str,
    what: &str,
    check: impl Fn(&WorkerState) -> bool,
) -> WorkerState {
    let what = format!("{hostname}: {what}");
    poll(&what, DEADLINE, || async {
        let workers = events.workers();
        workers.iter().find(|w| w.hostname == hostname && check(w)).cloned().ok_or((workers, events.stats()))
    })
    .await
}

async fn wait_subscribed(events: &WorkerEvents, subscriptions: u64) {
    poll("the subscription", DEADLINE, || async {
        let stats = events.stats();
        (events.is_subscribed() && stats.subscriptions >= subscriptions)
            .then_some(())
            .ok_or((stats, events.last_error()))
    })
    .await;
}

fn is_alive(events: &WorkerEvents, hostname: &str) -> bool {
    events.alive().iter().any(|w| w.hostname == hostname)
}

/// Subscribers of each channel, from Redis itself.
fn subscribers(redis: &RedisServer, channels: &[String]) -> Vec<u64> {
    let mut args = vec!["PUBSUB", "NUMSUB"];
    args.extend(channels.iter().map(String::as_str));
    let out = redis.cli(&args).unwrap();
    out.lines().skip(1).step_by(2).map(|n| n.trim().parse().unwrap()).collect()
}

/// The whole life of a worker as the autoscaler sees it: online and idle, N tasks running,
/// idle again, offline after a warm shutdown.
async fn watch_a_worker_run_tasks(
    events: &WorkerEvents,
    app: &Path,
    env: &[(&str, &str)],
    control: &RedisServer,
    hostname: &str,
    queue: &str,
    tasks: u32,
) {
    let worker = start_worker(app, env, hostname, queue, tasks);
    let idle = wait_for(events, hostname, "online and idle", |w| w.online && w.active == 0).await;
    assert_eq!(idle.freq, Duration::from_secs(2), "Celery's default heartbeat interval");
    assert!(is_alive(events, hostname));

    send_blocking(app, env, queue, tasks);
    let busy = wait_for(events, hostname, "all tasks running", |w| w.active == tasks).await;
    assert!(busy.online && busy.processed >= u64::from(tasks), "{busy:?}");

    release(control, tasks as usize);
    let done = wait_for(events, hostname, "idle again", |w| w.active == 0 && w.processed == u64::from(tasks)).await;
    assert!(done.online);

    worker.terminate(DEADLINE).unwrap();
    // Announced offline (a worker that merely went silent would stay `online` until it ages out).
    wait_for(events, hostname, "offline", |w| !w.online).await;
    assert!(!is_alive(events, hostname), "{:?}", events.alive());
    assert_eq!(events.stats().malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_is_seen_running_tasks_then_offline() {
    let redis = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", "{}")];

    let events = WorkerEvents::start(&BrokerConfig::new(url.as_str())).unwrap();
    wait_subscribed(&events, 1).await;
    let channels = redis_channels("", 0);
    assert_eq!(subscribers(&redis, &channels), [1, 1, 1], "{channels:?}");

    watch_a_worker_run_tasks(&events, app.path(), &env, &redis, "pool@pod-a", "ev-plain", 3).await;

    // Dropping it ends the subscription.
    drop(events);
    poll("the subscription to end", DEADLINE, || async {
        let counts = subscribers(&redis, &channels);
        (counts == [0, 0, 0]).then_some(()).ok_or(counts)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_global_keyprefix_password_and_db_are_honoured() {
    let password = "ev-s3cret-pw";
    let redis = RedisServer::builder().password(password).start().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let control = redis.url();
    let url = control.replace("/0", "/5");
    let options = TransportOptions { global_keyprefix: "tenant-a:".into(), ..TransportOptions::default() };
    let transport = kombu_transport(&options);
    let env = [("BROKER", url.as_str()), ("CONTROL", control.as_str()), ("TRANSPORT", transport.as_str())];

    // A wrong password: never subscribed, and the reason shown without the password.
    let wrong = BrokerConfig::new(url.replace(password, "wrong-pw-42"));
    let refused = WorkerEvents::start(&wrong).unwrap();
    let error = poll("an error", DEADLINE, || async { refused.last_error().ok_or(()) }).await;
    assert!(!error.contains("wrong-pw-42") && !error.contains(password), "{error}");
    assert!(!refused.is_subscribed());
    assert!(!refused.endpoint().contains("wrong-pw-42"));

    let events = WorkerEvents::start(&BrokerConfig { transport: options, ..BrokerConfig::new(url.as_str()) }).unwrap();
    wait_subscribed(&events, 1).await;
    // Exactly the channels Celery publishes on for this prefix and db (the worker below proves it).
    let channels = redis_channels("tenant-a:", 5);
    assert_eq!(channels[1], "tenant-a:/5.celeryev/worker.heartbeat");
    assert_eq!(subscribers(&redis, &channels), [1, 1, 1]);

    watch_a_worker_run_tasks(&events, app.path(), &env, &redis, "pool@pod-prefixed", "ev-prefixed", 2).await;
    assert!(refused.workers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_resume_after_a_redis_restart() {
    let mut redis = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", "{}")];
    let hostname = "pool@pod-restart";

    let events = WorkerEvents::start(&BrokerConfig::new(url.as_str())).unwrap();
    wait_subscribed(&events, 1).await;
    let _worker = start_worker(app.path(), &env, hostname, "ev-restart", 1);
    wait_for(&events, hostname, "online", |w| w.online).await;

    redis.kill();
    poll("the subscription to notice the outage", DEADLINE, || async {
        (!events.is_subscribed()).then_some(()).ok_or(events.stats())
    })
    .await;
    redis.restart().unwrap();
    wait_subscribed(&events, 2).await;
    let resubscribed = Instant::now();
    // The worker reconnects too; its heartbeats are heard again on the new subscription. Its
    // consumer restart may first deliver the worker-offline it buffered while the broker was down,
    // then worker-online and heartbeats: wait for it to be heard online.
    let seen =
        wait_for(&events, hostname, "heard online after the restart", |w| w.last_seen > resubscribed && w.online).await;
    assert!(seen.online && is_alive(&events, hostname), "{seen:?}");
    assert!(events.last_error().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_worker_heartbeats_carry_active_counts() {
    let rabbit = RabbitServer::shared().expect("private RabbitMQ node");
    let control = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let url = rabbit.amqp_url();
    let control_url = control.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", control_url.as_str()), ("TRANSPORT", "{}")];
    let management = |path: String| async move {
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", rabbit.management_port()))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap();
        response.json::<serde_json::Value>().await.unwrap()
    };
    let our_queues = || async {
        let queues = management("/api/queues/%2F?columns=name,exclusive,auto_delete,arguments".into()).await;
        let ours: Vec<serde_json::Value> = queues
            .as_array()
            .unwrap()
            .iter()
            .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with("amq.gen-")))
            .cloned()
            .collect();
        ours
    };

    // Started before any worker: the exchange does not exist yet and is declared as Celery does.
    let events = WorkerEvents::start(&BrokerConfig::new(url.as_str())).unwrap();
    wait_subscribed(&events, 1).await;
    let exchange = management("/api/exchanges/%2F/celeryev".into()).await;
    assert_eq!((exchange["type"].as_str(), exchange["durable"].as_bool()), (Some("topic"), Some(true)), "{exchange}");
    let queue =
        poll("the events queue in the management API", DEADLINE, || async { our_queues().await.pop().ok_or(()) }).await;
    assert_eq!(queue["exclusive"], true, "{queue}");
    assert_eq!(queue["arguments"]["x-message-ttl"], 10_000, "{queue}");

    // Celery declares the same exchange without complaint, and its events reach us.
    watch_a_worker_run_tasks(&events, app.path(), &env, &control, "pool@rabbit-pod", "ev-rabbit", 2).await;

    drop(events);
    poll("the events queue to go away", DEADLINE, || async {
        let left = our_queues().await;
        left.is_empty().then_some(()).ok_or(left)
    })
    .await;
}
