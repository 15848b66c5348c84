//! Helpers of the real-Celery end-to-end scenarios (`autoscale_e2e.rs`, `scheduled_e2e.rs`,
//! `rabbitmq_e2e.rs`): the operator binary against the control-plane double, whose pod runner runs
//! real Celery workers of the example app, a real Redis (broker and result backend) and, for some,
//! a private RabbitMQ node.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_e2e::stack::{Stack, StackConfig, StackError, TaskResult, examples_dir};
use celery_operator::autoscale::scaler::FIELD_MANAGER;
use e2e_harness::RabbitServer;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::time::Instant;

pub const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");
/// Generous: CI has 2 cores and runs tests in parallel, and every worker is a Python process.
pub const DEADLINE: Duration = Duration::from_secs(180);
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Starts a stack with real Celery pods and the example's Redis TaskQueues, or `None` (with a
/// NOTICE) where the scenarios cannot run: against a real cluster (`E2E_KUBECONFIG`; `needs` says
/// what of the double they need) and without the Celery venv.
pub async fn start(needs: &str) -> Option<Stack> {
    if std::env::var_os("E2E_KUBECONFIG").is_some() {
        eprintln!("NOTICE: skipping: these scenarios need {needs}");
        return None;
    }
    match Stack::start(StackConfig::with_operator(OPERATOR)).await {
        Ok(stack) => {
            stack.apply_file(examples_dir().join("redis-queues.yaml")).await.expect("queues apply");
            Some(stack)
        }
        Err(StackError::Runner(e)) => {
            eprintln!("NOTICE: skipping the scenario: {e}");
            None
        }
        Err(e) => panic!("the e2e stack did not start: {e}"),
    }
}

/// The private RabbitMQ node shared by the test binary's tests, or `None` (with a NOTICE) where
/// it cannot start.
pub fn rabbit_node() -> Option<&'static RabbitServer> {
    match RabbitServer::shared() {
        Ok(rabbit) => Some(rabbit),
        Err(e) => {
            eprintln!("NOTICE: skipping: no private RabbitMQ node: {e}");
            None
        }
    }
}

/// Prints the end of the operator's log when a test fails, to see what the autoscaler decided.
pub struct LogOnPanic(pub std::path::PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- operator log (last 60 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Polls `check` (every 100 ms) until it returns `Some`, failing after [`DEADLINE`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_every(Duration::from_millis(100), what, check).await
}

/// [`eventually`], polling every `every`.
pub async fn eventually_every<T, F, Fut>(every: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Task ids sent, and the Unix times just before the first and after the last send.
#[derive(Debug, serde::Deserialize)]
pub struct Sent {
    pub ids: Vec<String>,
    pub before: f64,
    pub after: f64,
}

/// Every change of a projection of one object (or of a set of objects), recorded from a watch so
/// that no intermediate value is missed, with when it was seen: by the monotonic clock, and by the
/// wall clock (to compare with task ETAs, which are wall-clock times).
pub struct Recorder<T> {
    seen: Arc<Mutex<Vec<(Instant, f64, T)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<T: Clone + PartialEq + Send + 'static> Recorder<T> {
    pub fn start<K>(api: Api<K>, config: watcher::Config, project: impl Fn(&K) -> T + Send + 'static) -> Self
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let seen: Arc<Mutex<Vec<(Instant, f64, T)>>> = Arc::default();
        let out = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, config).default_backoff().applied_objects().boxed();
            while let Some(item) = stream.next().await {
                let Ok(obj) = item else { continue };
                let value = project(&obj);
                let mut seen = out.lock().unwrap();
                if seen.last().is_none_or(|(_, _, last)| *last != value) {
                    seen.push((Instant::now(), unix_now(), value));
                }
            }
        });
        Recorder { seen, task }
    }

    /// Every value with the Unix time it was seen.
    pub fn all(&self) -> Vec<(f64, T)> {
        self.seen.lock().unwrap().iter().map(|(_, at, v)| (*at, v.clone())).collect()
    }

    pub fn values(&self) -> Vec<T> {
        self.seen.lock().unwrap().iter().map(|(_, _, v)| v.clone()).collect()
    }

    /// The values seen at or after `t`.
    pub fn since(&self, t: Instant) -> Vec<(Instant, T)> {
        self.seen.lock().unwrap().iter().filter(|(at, _, _)| *at >= t).map(|(at, _, v)| (*at, v.clone())).collect()
    }

    pub fn last(&self) -> Option<T> {
        self.seen.lock().unwrap().last().map(|(_, _, v)| v.clone())
    }
}

impl<T> Drop for Recorder<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records every `spec.replicas` of the pool's worker Deployment.
pub fn record_replicas(stack: &Stack, pool: &str) -> Recorder<i32> {
    let api: Api<Deployment> = Api::namespaced(stack.client(), stack.namespace());
    let config = watcher::Config::default().fields(&format!("metadata.name={pool}-worker"));
    Recorder::start(api, config, |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1))
}

/// What a pod looked like at one moment: name, pod-deletion-cost, whether it was being deleted.
pub type PodState = (String, Option<String>, bool);

/// Records every change of the pool's worker pods' deletion cost and termination.
pub fn record_pods(stack: &Stack, pool: &str) -> Recorder<PodState> {
    let api: Api<Pod> = Api::namespaced(stack.client(), stack.namespace());
    let config = watcher::Config::default().labels(&worker_selector(pool));
    Recorder::start(api, config, |p: &Pod| {
        let cost = p.metadata.annotations.as_ref().and_then(|a| a.get(POD_DELETION_COST).cloned());
        (p.metadata.name.clone().unwrap_or_default(), cost, p.metadata.deletion_timestamp.is_some())
    })
}

pub fn worker_selector(pool: &str) -> String {
    format!("app.kubernetes.io/name=celery,app.kubernetes.io/instance={pool},app.kubernetes.io/component=worker")
}

/// Moves up and down in a sequence of replica counts.
pub fn steps(values: &[i32]) -> (usize, usize) {
    let ups = values.windows(2).filter(|w| w[1] > w[0]).count();
    let downs = values.windows(2).filter(|w| w[1] < w[0]).count();
    (ups, downs)
}

pub async fn replicas(stack: &Stack, pool: &str) -> Option<i32> {
    let api: Api<Deployment> = Api::namespaced(stack.client(), stack.namespace());
    api.get_opt(&format!("{pool}-worker")).await.unwrap().and_then(|d| d.spec?.replicas)
}

pub async fn worker_pods(stack: &Stack, pool: &str) -> Vec<Pod> {
    stack.pods(&worker_selector(pool)).await.unwrap()
}

pub async fn pool_object(stack: &Stack, name: &str) -> Value {
    let (resource, _) =
        stack.resource_of(&json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool"})).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &resource);
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

/// The pool's status, as the API holds it.
pub async fn pool_status(stack: &Stack, name: &str) -> Value {
    pool_object(stack, name).await["status"].clone()
}

/// `(status, reason, message)` of a condition of the pool.
pub async fn condition(stack: &Stack, pool: &str, type_: &str) -> Option<(String, String, String)> {
    let p = pool_object(stack, pool).await;
    let c = p["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
    let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((text("status"), text("reason"), text("message")))
}

/// Successful writes by the autoscaler's field manager to `resource` (`subresource`) since the
/// request log was last cleared.
pub fn autoscaler_writes(stack: &Stack, resource: &str, subresource: Option<&str>) -> usize {
    let server = stack.server().expect("the double");
    server
        .writes()
        .iter()
        .filter(|r| r.field_manager.as_deref() == Some(FIELD_MANAGER) && r.is_successful_write())
        .filter(|r| r.resource == resource && r.subresource.as_deref() == subresource)
        .count()
}

/// A metric's value, retrying while the operator's endpoint does not answer or lacks the series.
pub async fn metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    eventually(&format!("metric {name} {labels:?}"), || stack.metric(name, labels)).await
}

/// Broker polls the autoscaler has decided on so far (one decision-latency sample per poll).
pub async fn polls(stack: &Stack) -> u64 {
    metric(stack, "celery_operator_autoscaler_decision_seconds_count", &[]).await as u64
}

/// Lets `windows` stabilization windows of `window` seconds pass, counted by the operator's own
/// polls (at least one per second) as well as by the clock.
pub async fn stabilization_windows(stack: &Stack, windows: u64, window: u64) {
    let span = Duration::from_secs(windows * window);
    let since = Instant::now();
    let polled = polls(stack).await;
    eventually("stabilization windows of autoscaler polls", || async {
        let polls_now = polls(stack).await;
        (since.elapsed() >= span && polls_now >= polled + span.as_secs()).then_some(())
    })
    .await;
}

/// How often one task id was delivered to and completed by the pool's workers, and by which pods.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Runs {
    pub received: u32,
    pub succeeded: u32,
    /// Pods that received it, in log order per pod.
    pub received_on: Vec<String>,
    /// Pods that completed it.
    pub pods: BTreeSet<String>,
}

/// [`Runs`] of every task id seen in the logs of every pod the runner ever ran for `pool`
/// (`Task <name>[<id>] received` / `... succeeded in`).
pub fn runs_by_task(stack: &Stack, pool: &str) -> BTreeMap<String, Runs> {
    let mut runs: BTreeMap<String, Runs> = BTreeMap::new();
    for (pod, log) in worker_logs(stack, pool) {
        for line in log.lines() {
            let Some((_, rest)) = line.split_once("Task celery_example.") else { continue };
            let Some((_, rest)) = rest.split_once('[') else { continue };
            let Some((id, what)) = rest.split_once(']') else { continue };
            let entry = runs.entry(id.to_string()).or_default();
            if what.starts_with(" received") {
                entry.received += 1;
                entry.received_on.push(pod.clone());
            } else if what.starts_with(" succeeded in") {
                entry.succeeded += 1;
                entry.pods.insert(pod.clone());
            }
        }
    }
    runs
}

/// `(pod, log)` of every worker pod of `pool` the runner ran, terminated ones included.
pub fn worker_logs(stack: &Stack, pool: &str) -> Vec<(String, String)> {
    let runner = stack.runner().expect("the pod runner");
    let dir = runner.pods_dir().join(stack.namespace());
    let prefix = format!("{pool}-worker-");
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix)
            && let Some(log) = runner.pod_log(stack.namespace(), &name)
        {
            logs.push((name, log));
        }
    }
    logs
}

/// A plain Redis connection to db `db` of the stack's Redis (the result backend is db 1), with
/// timeouts for a loaded machine (the client's defaults of 1 s to connect and 0.5 s per answer
/// are not).
pub async fn redis_db(stack: &Stack, db: u32) -> redis::aio::MultiplexedConnection {
    let mut url = url::Url::parse(stack.broker_url()).unwrap();
    url.set_path(&format!("/{db}"));
    let client = redis::Client::open(url.as_str()).unwrap();
    let patient = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(30)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client.get_multiplexed_async_connection_with_config(&patient).await.unwrap()
}

/// The result backend's state of each task (`None`: no result stored).
pub async fn states(stack: &Stack, ids: &[String]) -> Vec<Option<String>> {
    let mut conn = redis_db(stack, 1).await;
    let keys: Vec<String> = ids.iter().map(|id| format!("celery-task-meta-{id}")).collect();
    let metas: Vec<Option<String>> = redis::cmd("MGET").arg(keys).query_async(&mut conn).await.unwrap();
    metas
        .into_iter()
        .map(|m| {
            m.and_then(|m| serde_json::from_str::<Value>(&m).ok()).and_then(|m| m["status"].as_str().map(Into::into))
        })
        .collect()
}

/// Whether every task has a SUCCESS result (read straight from the result backend, db 1).
pub async fn all_succeeded(stack: &Stack, ids: &[String]) -> bool {
    states(stack, ids).await.iter().all(|s| s.as_deref() == Some("SUCCESS"))
}

/// Waits for every task's result; fails if one did not succeed.
pub async fn wait_results(stack: &Stack, ids: &[String]) -> Vec<TaskResult> {
    let results = stack.wait_results(ids, DEADLINE).await.expect("every task finishes");
    let failed: Vec<&TaskResult> = results.iter().filter(|r| r.state != "SUCCESS").collect();
    assert!(failed.is_empty(), "tasks failed: {failed:?}");
    results
}

/// Lets the example app's `hold(name)` tasks return (they watch `celery-example:release:<name>`
/// in the result backend, db 1).
pub async fn release(stack: &Stack, names: &[&str]) {
    let mut conn = redis_db(stack, 1).await;
    for name in names {
        let _: () = redis::cmd("SET")
            .arg(format!("celery-example:release:{name}"))
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Waits (inside Python, up to [`DEADLINE`]) until every task is STARTED, and returns
/// `(state, meta)` per id; the STARTED meta of the example app holds the worker's `hostname` and
/// `pid`.
pub async fn wait_started(stack: &Stack, ids: &[String]) -> Vec<(String, Value)> {
    const WAIT_STARTED: &str = r#"
import json, os, time
from celery.result import AsyncResult
from celery_example.app import app
ids = json.loads(os.environ["E2E_TASK_IDS"])
deadline = time.monotonic() + float(os.environ["E2E_TIMEOUT"])
while True:
    results = [AsyncResult(i, app=app) for i in ids]
    if all(r.state == "STARTED" for r in results) or time.monotonic() > deadline:
        break
    time.sleep(0.1)
print(json.dumps([[r.state, r.info if isinstance(r.info, dict) else None] for r in results]))
"#;
    let env = [("E2E_TASK_IDS", json!(ids).to_string()), ("E2E_TIMEOUT", DEADLINE.as_secs().to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = stack.python(WAIT_STARTED, &env).await.unwrap();
    let states: Vec<(String, Value)> = serde_json::from_str(out.trim()).unwrap();
    assert!(states.iter().all(|(s, _)| s == "STARTED"), "tasks did not all start: {states:?}");
    states
}

/// The pod name in a worker hostname `<pool>@<pod>`.
pub fn pod_of<'a>(pool: &str, hostname: &'a str) -> &'a str {
    hostname.strip_prefix(pool).and_then(|h| h.strip_prefix('@')).unwrap_or(hostname)
}

/// Messages in Celery's native delayed-delivery level queues of `vhost` (management API).
pub async fn delayed_messages(management: &str, vhost: &str) -> Option<u64> {
    let url = format!("{management}/api/queues/{}?columns=name,messages", vhost.replace('/', "%2F"));
    let queues: Vec<Value> = reqwest::get(&url).await.ok()?.json().await.ok()?;
    let levels = queues.iter().filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with("celery_delayed_")));
    Some(levels.map(|q| q["messages"].as_u64().unwrap_or(0)).sum())
}
