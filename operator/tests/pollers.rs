//! One poller per broker endpoint (issue #10, item 1): TaskQueues and autoscaled pools on one
//! real redis-server read the same snapshots. The operator's controllers run in-process against
//! the control-plane double (pods simulated); the broker is a private redis-server.
//!
//! - an eviction seen by a poll made for the autoscaler still reaches the TaskQueue's status, one
//!   Warning Event and the incident metric, exactly once;
//! - 20 TaskQueues and 10 pools on one endpoint cost one probe (one pipelined round trip) per poll,
//!   counted by Redis itself;
//! - a failed poll counts in the probe-error metric and sets the pools' conditions;
//! - an endpoint nobody references any more is closed, its connection and worker-event
//!   subscription with it (a rotated Secret leaves nothing behind).

mod common;
use common::poll;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_e2e::{ApiServer, PodRunner, RunnerConfig};
use celery_operator::broker_config::ResolvedBroker;
use celery_operator::brokers::{Brokers, Consumer, Interest, QueueRef};
use celery_operator::controller::run_all;
use celery_operator::crd::TaskQueue;
use celery_operator::leader::shutdown_when;
use celery_operator::metrics::Metrics;
use celery_operator::reconcile::Context;
use e2e_harness::RedisServer;
use serde_json::{Value, json};

const CRD: &str = "celery-operator.dev/v1alpha1";

struct Env {
    api: ApiServer,
    redis: RedisServer,
    metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: Option<tokio::task::JoinHandle<kube_lease_manager::Result<()>>>,
    _runner: PodRunner,
}

impl Env {
    async fn start(redis: RedisServer) -> Env {
        let api = ApiServer::new();
        api.load_crds_from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")).unwrap();
        let runner = PodRunner::start(&api, RunnerConfig::simulated()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(Context::new(api.client(), metrics.clone(), Some("test".into())));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = shutdown_when(async move {
            let _ = stopped.await;
        });
        let operator = tokio::spawn(run_all(ctx, vec![Some("prod".into())], None, shutdown));
        Env { api, redis, metrics, stop: Some(stop), operator: Some(operator), _runner: runner }
    }

    fn create(&self, kind: &str, mut doc: Value) {
        doc["apiVersion"] = CRD.into();
        doc["kind"] = kind.into();
        doc["metadata"]["namespace"] = "prod".into();
        self.api.create(doc).unwrap();
    }

    fn queue(&self, name: &str) {
        self.create("TaskQueue", json!({"metadata": {"name": name}, "spec": {"broker": {"url": self.redis.url()}}}));
    }

    /// A TaskQueue whose URL (with its password) is in a Secret, as the CRD requires.
    fn queue_from_secret(&self, name: &str) {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "redis", "namespace": "prod"}, "stringData": {"url": self.redis.url()}});
        self.api.create(secret).unwrap();
        let from = json!({"secretKeyRef": {"name": "redis", "key": "url"}});
        self.create("TaskQueue", json!({"metadata": {"name": name}, "spec": {"broker": {"urlFrom": from}}}));
    }

    fn pool(&self, name: &str, queues: &[&str]) {
        let autoscaling = json!({"minReplicas": 0, "maxReplicas": 10, "targetPerReplica": 2,
                                 "pollIntervalSeconds": 1, "scaleDownStabilizationSeconds": 0});
        self.create(
            "WorkerPool",
            json!({"metadata": {"name": name},
                   "spec": {"app": "a.app", "image": "i", "queues": queues, "autoscaling": autoscaling}}),
        );
    }

    fn object(&self, kind: &str, name: &str) -> Value {
        self.api.get(CRD, kind, Some("prod"), name).unwrap().unwrap_or_default()
    }

    /// `(status, reason, message)` of a condition of a TaskQueue or WorkerPool.
    fn condition(&self, kind: &str, name: &str, type_: &str) -> Option<(String, String, String)> {
        let object = self.object(kind, name);
        let c = object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
        Some((c["status"].as_str()?.into(), c["reason"].as_str()?.into(), c["message"].as_str()?.into()))
    }

    fn condition_is(&self, kind: &str, name: &str, type_: &str, status: &str, reason: &str) -> bool {
        self.condition(kind, name, type_).is_some_and(|(s, r, _)| s == status && r == reason)
    }

    /// The value of the metric sample `name{labels}` (labels as Prometheus prints them, sorted).
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let prefix = format!("{name}{{{labels}}} ");
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0.0)
    }

    /// Polls of the endpoint so far: every poll records the probe duration of every TaskQueue on it.
    fn polls_of(&self, queue: &str) -> f64 {
        let labels = format!("namespace=\"prod\",taskqueue=\"{queue}\"");
        self.metric("celery_operator_probe_duration_seconds_count", &labels)
    }

    /// Autoscaler decision rounds so far (one per snapshot decided on).
    fn decision_rounds(&self) -> f64 {
        self.metric_plain("celery_operator_autoscaler_decision_seconds_count")
    }

    fn metric_plain(&self, name: &str) -> f64 {
        let prefix = format!("{name} ");
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0.0)
    }

    fn events(&self, name: &str, reason: &str) -> Vec<Value> {
        let events = self.api.list("events.k8s.io/v1", "Event", Some("prod")).unwrap();
        events.into_iter().filter(|e| e["reason"] == reason && e["regarding"]["name"] == name).collect()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.operator.take().unwrap().await.unwrap().unwrap();
    }
}

/// A field of `INFO` (e.g. `evicted_keys`, `used_memory`), or a `cmdstat_<command>` `calls` count.
fn info_number(redis: &RedisServer, section: &str, field: &str) -> u64 {
    let info = redis.cli(&["INFO", section]).unwrap();
    for line in info.lines() {
        let Some(value) = line.strip_prefix(&format!("{field}:")) else { continue };
        let value = value.trim();
        // cmdstat lines: calls=N,usec=…
        let value = value.strip_prefix("calls=").map_or(value, |v| v.split(',').next().unwrap());
        return value.parse().unwrap();
    }
    0
}

/// A Redis client that tolerates a loaded machine (the default response timeout is 0.5 s).
async fn connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    let client = redis::Client::open(redis.url()).unwrap();
    client.get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

#[tokio::test]
async fn a_key_evicted_while_the_autoscaler_polls_reaches_taskqueue_status_event_and_metric() {
    const LIMIT: &str = "67108864"; // 64 MiB
    let redis = RedisServer::builder()
        .config(format!("maxmemory {LIMIT}"))
        .config("maxmemory-policy allkeys-lru")
        .start()
        .unwrap();
    let env = Env::start(redis).await;
    env.queue("jobs");
    env.pool("auto", &["jobs"]);
    poll("the TaskQueue reports the unsafe policy", || async {
        env.condition_is("TaskQueue", "jobs", "BrokerSafe", "False", "EvictionPolicyUnsafe")
    })
    .await;
    let rounds = env.decision_rounds();
    poll("the autoscaler decides from the snapshots", || async { env.decision_rounds() >= rounds + 2.0 }).await;
    assert_eq!(info_number(&env.redis, "stats", "evicted_keys"), 0);

    // Memory pressure: 3 MB of keys, then maxmemory 1 MB below what Redis uses. Redis evicts
    // before the next command (the PING); the limit goes back up in the same pipeline, which Redis
    // runs without interleaving other clients' commands: the keys are evicted in one step, so
    // exactly one poll sees them go, whichever consumer's interval it served.
    let mut con = connection(&env.redis).await;
    let value = "x".repeat(100 * 1024);
    for i in 0..30 {
        let _: () = redis::cmd("SET").arg(format!("filler:{i}")).arg(&value).query_async(&mut con).await.unwrap();
    }
    let used = info_number(&env.redis, "memory", "used_memory");
    let low = used - (1 << 20);
    let _: () = redis::pipe()
        .cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(low)
        .ignore()
        .cmd("PING")
        .ignore()
        .cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(LIMIT)
        .ignore()
        .query_async(&mut con)
        .await
        .unwrap();
    let evicted = info_number(&env.redis, "stats", "evicted_keys");
    assert!(evicted > 0, "Redis evicted nothing");

    let incidents = "namespace=\"prod\",reason=\"KeysEvicted\",taskqueue=\"jobs\"";
    poll("the incident metric counts it", || async {
        env.metric("celery_operator_broker_incidents_total", incidents) >= 1.0
    })
    .await;
    poll("a KeysEvicted Warning Event on the TaskQueue", || async { !env.events("jobs", "KeysEvicted").is_empty() })
        .await;
    poll("BrokerSafe says keys were evicted", || async {
        env.condition_is("TaskQueue", "jobs", "BrokerSafe", "False", "KeysEvicted")
    })
    .await;
    let (_, _, message) = env.condition("TaskQueue", "jobs", "BrokerSafe").unwrap();
    assert!(message.contains(&format!("Redis evicted {evicted} keys since the last probe")), "{message}");
    assert!(message.contains("allkeys-lru"), "the standing finding stays beside the incident: {message}");

    // Later polls (for the pool, every second) and TaskQueue reconciles change nothing: once.
    let (rounds, reconciles) =
        (env.decision_rounds(), env.metric("celery_operator_reconcile_total", "kind=\"TaskQueue\""));
    poll("more polls and a TaskQueue reconcile", || async {
        env.decision_rounds() >= rounds + 3.0
            && env.metric("celery_operator_reconcile_total", "kind=\"TaskQueue\"") >= reconciles + 1.0
    })
    .await;
    assert_eq!(env.metric("celery_operator_broker_incidents_total", incidents), 1.0);
    let events = env.events("jobs", "KeysEvicted");
    assert_eq!(events.len(), 1, "one Event per incident: {events:?}");
    assert_eq!(events[0]["type"], "Warning");
    assert!(events[0]["series"].is_null(), "not repeated as a series: {:?}", events[0]);
    assert!(events[0]["note"].as_str().unwrap().contains(&format!("Redis evicted {evicted} keys")), "{:?}", events[0]);
    assert!(
        env.condition_is("TaskQueue", "jobs", "BrokerSafe", "False", "KeysEvicted"),
        "the condition holds the incident for a while"
    );
    env.stop().await;
}

#[tokio::test]
async fn twenty_queues_and_ten_pools_on_one_endpoint_cost_one_round_trip_per_poll() {
    let env = Env::start(RedisServer::start().unwrap()).await;
    let queues: Vec<String> = (0..20).map(|i| format!("q{i}")).collect();
    for q in &queues {
        env.queue(q);
    }
    for p in 0..10 {
        env.pool(&format!("pool{p}"), &[&queues[2 * p], &queues[2 * p + 1]]);
    }
    poll("every TaskQueue has a status from a poll", || async {
        queues.iter().all(|q| env.condition_is("TaskQueue", q, "BrokerReachable", "True", "Probed"))
    })
    .await;
    poll("every pool is decided for", || async {
        (0..10).all(|p| env.condition("WorkerPool", &format!("pool{p}"), "ScalingActive").is_some())
    })
    .await;

    // One probe is one pipeline: two EVALSHAs (unacked counts, the waiting lists' lengths and walk)
    // and the INFO sections. Nothing else on the endpoint calls EVALSHA.
    let polls = env.polls_of("q0");
    let evalsha = info_number(&env.redis, "commandstats", "cmdstat_evalsha");
    poll("ten more polls", || async { env.polls_of("q0") >= polls + 10.0 }).await;
    let evalsha = info_number(&env.redis, "commandstats", "cmdstat_evalsha") - evalsha;
    let polls = env.polls_of("q0") - polls;
    // Every TaskQueue saw every poll: they share it.
    assert_eq!(env.polls_of("q19"), env.polls_of("q0"));
    // The counts are read while the poller runs: at each end of the window one probe may be counted
    // by Redis and not yet by the metric (or the other way round).
    let per_poll = evalsha as f64 / polls;
    eprintln!("{polls} polls, {evalsha} EVALSHA calls: {per_poll:.2} per poll for 20 queues and 10 pools");
    assert!(
        (evalsha as f64 - 2.0 * polls).abs() <= 4.0,
        "{evalsha} EVALSHA calls in {polls} polls: not one probe per poll"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_failed_poll_counts_in_the_probe_error_metric_and_sets_the_pool_conditions() {
    let mut env = Env::start(RedisServer::builder().password("poll-s3cret").start().unwrap()).await;
    env.queue_from_secret("jobs");
    env.pool("auto", &["jobs"]);
    poll("the pool is decided for", || async {
        env.condition_is("WorkerPool", "auto", "ScalingActive", "True", "ScalingFromQueueDepth")
    })
    .await;
    let errors = |env: &Env| {
        env.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("celery_operator_probe_errors_total{") && l.contains("taskqueue=\"jobs\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(errors(&env), 0.0);

    env.redis.kill();
    poll("ScalingActive=False/BrokerUnreachable", || async {
        env.condition_is("WorkerPool", "auto", "ScalingActive", "False", "BrokerUnreachable")
    })
    .await;
    // Every failed poll counts, for every TaskQueue on the endpoint, whoever's interval it served.
    let polls = env.polls_of("jobs");
    poll("failed polls counted", || async { env.polls_of("jobs") >= polls + 2.0 }).await;
    assert!(errors(&env) >= 2.0, "{}", env.metrics.encode());
    poll("the TaskQueue says the broker is unreachable", || async {
        env.condition_is("TaskQueue", "jobs", "BrokerReachable", "False", "BrokerUnreachable")
    })
    .await;
    let (_, _, message) = env.condition("TaskQueue", "jobs", "BrokerReachable").unwrap();
    assert!(message.contains(&format!("127.0.0.1:{}", env.redis.port())), "{message}");
    let events = env.api.list("events.k8s.io/v1", "Event", Some("prod")).unwrap();
    let everything = format!(
        "{}{}{:?}{}",
        env.object("TaskQueue", "jobs"),
        env.object("WorkerPool", "auto"),
        events,
        env.metrics.encode()
    );
    assert!(!everything.contains("poll-s3cret"), "the password leaked into status, events or metrics");
    env.stop().await;
}

/// Clients connected to `redis` as `user` (but for the `redis-cli` asking), from `CLIENT LIST`,
/// and how many of them subscribe.
fn clients_of(redis: &RedisServer, user: &str) -> (usize, usize) {
    let list = redis.cli(&["CLIENT", "LIST"]).unwrap();
    let mine: Vec<&str> = list
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter(|l| l.split(' ').any(|f| f == format!("user={user}")))
        .collect();
    let subscribed = mine.iter().filter(|l| l.split(' ').any(|f| f.starts_with("sub=") && f != "sub=0")).count();
    (mine.len(), subscribed)
}

fn task_queue(name: &str, url: &str) -> TaskQueue {
    serde_json::from_value(json!({"apiVersion": CRD, "kind": "TaskQueue",
        "metadata": {"name": name, "namespace": "prod"}, "spec": {"broker": {"url": url}}}))
    .unwrap()
}

#[tokio::test]
async fn an_endpoint_nobody_references_is_closed_with_its_connection_and_subscription() {
    let redis = RedisServer::builder().user("old", "old-pw").start().unwrap();
    redis.cli(&["ACL", "SETUSER", "new", "on", ">new-pw", "~*", "&*", "+@all"]).unwrap();
    let old_url = redis.url();
    let new_url = old_url.replace("old:old-pw@", "new:new-pw@");
    let brokers = Brokers::new(Arc::new(Metrics::new()));

    // A TaskQueue and an autoscaled pool reading it, both on the old credentials.
    let tq = task_queue("jobs", &old_url);
    let me = Consumer::TaskQueue(QueueRef::of(&tq));
    let pool = Consumer::Pool("prod/auto".into());
    let pool_interest = |tq: &TaskQueue| Interest {
        queues: vec![(QueueRef::of(tq), tq.queue_name().to_owned())],
        interval: Duration::from_secs(1),
        worker_events: true,
    };
    let old = ResolvedBroker::url(old_url.as_str());
    let (old_key, mut snapshots) =
        brokers.register(me.clone(), &tq.spec.broker, &old, Interest::task_queue(&tq)).unwrap();
    brokers.register(pool.clone(), &tq.spec.broker, &old, pool_interest(&tq)).unwrap();
    assert_eq!((brokers.endpoint_count(), brokers.consumer_count()), (1, 2), "one endpoint for both");
    let first = snapshots.wait_for(|s| s.as_ref().is_some_and(|s| s.observation().is_some())).await.unwrap().clone();
    let shown = format!("{first:?} {brokers:?}");
    assert!(!shown.contains("old-pw"), "a snapshot or the registry shows the password: {shown}");
    assert!(shown.contains(&format!("127.0.0.1:{}", redis.port())), "{shown}");
    poll("the probe connection and the worker-event subscription are up", || async {
        clients_of(&redis, "old") == (2, 1)
    })
    .await;

    // The Secret is rotated: both re-register with the new URL, a new endpoint.
    let rotated = task_queue("jobs", &new_url);
    let new = ResolvedBroker::url(new_url.as_str());
    let (new_key, _) =
        brokers.register(me.clone(), &rotated.spec.broker, &new, Interest::task_queue(&rotated)).unwrap();
    assert_ne!(new_key, old_key);
    assert!(brokers.is_polling(&old_key), "the pool still reads the old endpoint");
    brokers.register(pool.clone(), &rotated.spec.broker, &new, pool_interest(&rotated)).unwrap();
    assert!(!brokers.is_polling(&old_key), "the old endpoint's poller is gone");
    assert!(brokers.snapshots(&old_key).is_none());
    assert_eq!((brokers.endpoint_count(), brokers.consumer_count()), (1, 2));
    poll("nothing is left connected with the old credentials", || async { clients_of(&redis, "old") == (0, 0) }).await;
    poll("the new endpoint polls and subscribes", || async { clients_of(&redis, "new") == (2, 1) }).await;
    // The old endpoint's snapshot channel is closed: a reader waiting on it is released.
    let closed = async { while snapshots.changed().await.is_ok() {} };
    tokio::time::timeout(Duration::from_secs(60), closed).await.expect("the old snapshots channel is closed");

    // Consumers that stop renewing expire: nothing left at all.
    brokers.expire(Instant::now() + Duration::from_secs(3600));
    assert_eq!((brokers.endpoint_count(), brokers.consumer_count()), (0, 0));
    assert!(!brokers.is_polling(&new_key));
    poll("nothing is left connected", || async { clients_of(&redis, "new") == (0, 0) }).await;

    // And an explicit deregistration closes an endpoint at once.
    let (key, _) = brokers.register(me.clone(), &tq.spec.broker, &old, Interest::task_queue(&tq)).unwrap();
    assert!(brokers.is_polling(&key));
    brokers.deregister(&me);
    assert_eq!((brokers.endpoint_count(), brokers.consumer_count()), (0, 0));
    assert!(!brokers.is_polling(&key));
}
