//! Autoscaler benchmarks (issue #5): the operator against a KEDA-equivalent policy.
//!
//! ```text
//! cargo bench -p celery-operator --bench autoscale                 # all four parts
//! cargo bench -p celery-operator --bench autoscale -- latency      # or: ramp, burst, mixed
//! ```
//!
//! Everything runs on this machine: the operator binary (release build) against the e2e
//! control-plane double over loopback HTTP, a private redis-server, and either simulated pods
//! (`latency`, `ramp`) or real Celery workers from the harness venv (`burst`). Results are written
//! up in BENCHMARKS-autoscaler.md.
//!
//! 1. `latency`: enqueue → the worker Deployment's `spec.replicas` changes, at pollIntervalSeconds 1,
//!    over `BENCH_TRIALS` (default 100) trials from zero and as many warm ones (min 1). Each trial
//!    pushes a backlog at a random phase relative to the poll, sees the change through the double's
//!    change notifications, then drains and waits for the scale-down (stabilization 0).
//! 2. `ramp`: 0 → 100 replicas, the time and the number of replica writes, over `BENCH_RAMP_TRIALS`
//!    (default 20) trials; the HPA's default ramp is computed by the KEDA-equivalent controller below.
//! 3. `burst`: `BENCH_BURST_TASKS` (default 400) tasks sleeping 1 s, with real Celery workers, first
//!    under the operator, then (same burst, same machine, one after the other) under the
//!    KEDA-equivalent controller driving a second pool through the WorkerPool scale subresource.
//!    The operator's pool uses the CRD's default scale-down window of 60 s
//!    (`BENCH_STABILIZATION=<seconds>` to change it, e.g. 300 to match the HPA's).
//!    `BENCH_KEDA_TAIL_CAP=<seconds>` stops measuring the KEDA run that long after the burst and
//!    computes the rest of its scale-down from the model instead.
//!
//! 4. `mixed` (issue #11, in `autoscale/mixed.rs`): a mixed workload (trickle, bursts, retries with
//!    backoff) with real Celery workers under the operator's depth rule, its latency target and the
//!    KEDA-equivalent controller: p95 queue latency, drain time and replica-seconds per run.
//!
//! The KEDA-equivalent controller ([`KedaHpa`] driven by [`drive`]) models a ScaledObject with
//! KEDA's and the HPA's defaults: KEDA polls the queue every 30 s and owns 0 ↔ 1 (activation above
//! the activation threshold, back to zero after the 300 s cooldown); the HPA syncs every 15 s,
//! wants ceil(metric / target) (AverageValue, 10 % tolerance), limits scale-up to max(+4 pods,
//! +100 %) per 15 s and scales down to the highest recommendation of the last 300 s. The same code
//! runs in virtual time (the computed ramps and latencies) and in real time (the burst).

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_e2e::ApiServer;
use celery_e2e::stack::{Pods, Stack, StackConfig};
use celery_operator::autoscale::scaler::FIELD_MANAGER;
use celery_operator::crd::WorkerPool;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

/// Python (the example app's client) that waits, up to `BENCH_TIMEOUT` seconds, until every task
/// of `BENCH_IDS` has a result; leaves the ids in `ids` and those without one in `pending`. The
/// start of scripts that then read the results (a macro, so `concat!` can take it).
macro_rules! wait_ready_py {
    () => {
        r#"
import json, os, time
from celery.result import AsyncResult
from celery_example.app import app
ids = json.loads(os.environ["BENCH_IDS"])
deadline = time.monotonic() + float(os.environ["BENCH_TIMEOUT"])
pending = list(ids)
while pending and time.monotonic() < deadline:
    pending = [i for i in pending if not AsyncResult(i, app=app).ready()]
    if pending:
        time.sleep(0.2)
"#
    };
}

#[path = "autoscale/kombu.rs"]
mod kombu;
#[path = "autoscale/mixed.rs"]
mod mixed;

use kombu::kombu_message;

const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");
/// Deadline for anything the benchmark waits for (scale-downs after the KEDA model's 300 s included).
const DEADLINE: Duration = Duration::from_secs(900);

fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with '-' selects parts.
    let mut parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if parts.is_empty() {
        parts = ["latency", "ramp", "burst", "mixed"].map(String::from).to_vec();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        for part in &parts {
            match part.as_str() {
                "latency" => latency(env_number("BENCH_TRIALS", 100)).await,
                "ramp" => ramp(env_number("BENCH_RAMP_TRIALS", 20)).await,
                "burst" => {
                    let cap = std::env::var("BENCH_KEDA_TAIL_CAP").ok().and_then(|s| s.parse().ok());
                    burst(env_number("BENCH_BURST_TASKS", 400), cap.map(Duration::from_secs)).await;
                }
                "mixed" => mixed::mixed().await,
                other => eprintln!("unknown part {other:?}: use latency, ramp, burst or mixed"),
            }
            println!("\n(load average at the end of {part}: {})", load_average());
        }
    });
}

/// The 1/5/15-minute load averages: the benchmarks share 2 cores with whatever else runs.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ================================================================================= statistics

/// A uniformly distributed number in [0, 1).
fn random_unit() -> f64 {
    let bits = RandomState::new().hash_one(std::time::Instant::now()) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// Order statistics of a set of durations (nearest-rank percentiles).
#[derive(Clone, Copy, Debug)]
struct Summary {
    n: usize,
    min: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

impl Summary {
    fn of(mut values: Vec<Duration>) -> Summary {
        assert!(!values.is_empty(), "no samples");
        values.sort();
        let rank = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        let total: Duration = values.iter().sum();
        Summary {
            n: values.len(),
            min: values[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: values[values.len() - 1],
            mean: total / values.len() as u32,
        }
    }

    /// A markdown table row: `| label | n | min | p50 | p99 | max | mean |`.
    fn row(&self, label: &str) -> String {
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} |",
            self.n,
            secs(self.min),
            secs(self.p50),
            secs(self.p99),
            secs(self.max),
            secs(self.mean)
        )
    }
}

const SUMMARY_HEADER: &str = "| | n | min | p50 | p99 | max | mean |\n|---|---:|---:|---:|---:|---:|---:|";

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(10) { format!("{:.3} s", d.as_secs_f64()) } else { format!("{:.1} s", d.as_secs_f64()) }
}

// ================================================================================= replicas over time

/// What a worker Deployment asks for and has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Replicas {
    /// `spec.replicas`: what the autoscaler (or the reconciler, for a fixed pool) wrote.
    spec: u32,
    /// `status.readyReplicas`.
    ready: u32,
    /// `status.replicas`: pods that exist, terminating ones included.
    pods: u32,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    replicas: Replicas,
}

/// Every change of one Deployment's replica counts, recorded from the double's change
/// notifications (no polling): the double wakes the recorder on every stored change, and the
/// recorder keeps the ones that changed this Deployment's counts, with the time it saw them.
struct Timeline {
    log: Arc<Mutex<Vec<Sample>>>,
    wake: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read_replicas(server: &ApiServer, namespace: &str, deployment: &str) -> Option<Replicas> {
    let d = server.get("apps/v1", "Deployment", Some(namespace), deployment).ok()??;
    let count = |v: &Value| v.as_u64().map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    Some(Replicas {
        spec: count(&d["spec"]["replicas"]),
        ready: count(&d["status"]["readyReplicas"]),
        pods: count(&d["status"]["replicas"]),
    })
}

impl Timeline {
    fn record(server: &ApiServer, namespace: &str, deployment: &str) -> Timeline {
        let (server, namespace, deployment) = (server.clone(), namespace.to_string(), deployment.to_string());
        let log = Arc::new(Mutex::new(Vec::<Sample>::new()));
        let (tx, wake) = watch::channel(0);
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                let mut changes = server.changes();
                loop {
                    changes.borrow_and_update();
                    if let Some(replicas) = read_replicas(&server, &namespace, &deployment) {
                        let mut log = log.lock().expect("timeline lock");
                        if log.last().is_none_or(|s| s.replicas != replicas) {
                            log.push(Sample { at: Instant::now(), replicas });
                            tx.send_replace(log.len());
                        }
                    }
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        Timeline { log, wake, task }
    }

    /// The first sample at or after `from` that satisfies `pred`.
    fn first(&self, from: Instant, pred: &impl Fn(Replicas) -> bool) -> Option<Sample> {
        self.log.lock().expect("timeline lock").iter().find(|s| s.at >= from && pred(s.replicas)).copied()
    }

    /// Waits for the first sample at or after `from` that satisfies `pred`; `None` after `deadline`.
    async fn wait(&mut self, from: Instant, deadline: Instant, pred: impl Fn(Replicas) -> bool) -> Option<Sample> {
        loop {
            self.wake.borrow_and_update();
            if let Some(s) = self.first(from, &pred) {
                return Some(s);
            }
            match tokio::time::timeout_at(deadline, self.wake.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// [`Timeline::wait`], panicking with `what` after [`DEADLINE`].
    async fn until(&mut self, what: &str, from: Instant, pred: impl Fn(Replicas) -> bool) -> Sample {
        let found = self.wait(from, Instant::now() + DEADLINE, pred).await;
        found.unwrap_or_else(|| panic!("timed out after {DEADLINE:?} waiting for {what}"))
    }

    /// Waits until the Deployment rests at `replicas` (asked for and running, nothing terminating).
    async fn settle(&mut self, what: &str, replicas: u32) {
        let at = Replicas { spec: replicas, ready: replicas, pods: replicas };
        // Samples are stamped under the lock, so one not yet in the log is stamped after `from`.
        let from = Instant::now();
        let last = self.log.lock().expect("timeline lock").last().map(|s| s.replicas);
        if last != Some(at) {
            self.until(what, from, |r| r == at).await;
        }
    }

    /// The replica counts in force from `from` on: the one at `from` (stamped `from`), then every
    /// change after it.
    fn since(&self, from: Instant) -> Vec<Sample> {
        let log = self.log.lock().expect("timeline lock");
        let before = log.iter().rev().find(|s| s.at < from).map(|s| Sample { at: from, replicas: s.replicas });
        before.into_iter().chain(log.iter().filter(|s| s.at >= from).copied()).collect()
    }
}

/// ∫ spec.replicas dt over `steps` (time, replicas from then on), up to `end`.
fn replica_seconds(steps: &[(Duration, u32)], end: Duration) -> f64 {
    steps
        .iter()
        .enumerate()
        .map(|(i, &(at, n))| {
            let until = steps.get(i + 1).map_or(end, |s| s.0).min(end);
            until.saturating_sub(at).as_secs_f64() * f64::from(n)
        })
        .sum()
}

/// A timeline's spec.replicas changes as (time since `t0`, replicas).
fn steps(samples: &[Sample], t0: Instant) -> Vec<(Duration, u32)> {
    let mut out: Vec<(Duration, u32)> = Vec::new();
    for s in samples {
        if out.last().is_none_or(|l| l.1 != s.replicas.spec) {
            out.push((s.at.saturating_duration_since(t0), s.replicas.spec));
        }
    }
    out
}

fn show_steps(steps: &[(Duration, u32)]) -> String {
    steps.iter().map(|(at, n)| format!("{n} @ {:.1} s", at.as_secs_f64())).collect::<Vec<_>>().join(" → ")
}

// ================================================================================= the stack

/// The e2e stack (operator binary, double over HTTP, Redis, pod runner) plus what the parts share.
struct Bench {
    stack: Stack,
}

impl Bench {
    async fn start(pods: Pods) -> Bench {
        assert!(std::env::var_os("E2E_KUBECONFIG").is_none(), "the benchmarks run against the double only");
        let stack = Stack::start(StackConfig { pods, ..StackConfig::with_operator(OPERATOR) })
            .await
            .unwrap_or_else(|e| panic!("the e2e stack did not start: {e}"));
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bench-redis"},
            "stringData": {"url": "redis://:rewritten@redis:6379/0"}});
        stack.apply_yaml(&secret.to_string()).await.expect("Secret applies");
        Bench { stack }
    }

    fn server(&self) -> &ApiServer {
        self.stack.server().expect("the double")
    }

    /// A TaskQueue of the same name on the stack's Redis.
    async fn queue(&self, name: &str) {
        let tq = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue", "metadata": {"name": name},
            "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": "bench-redis", "key": "url"}}}}});
        self.stack.apply_yaml(&tq.to_string()).await.expect("TaskQueue applies");
    }

    /// A pool of the example app on `queue`: autoscaled when `autoscaling` is given, else fixed at 0
    /// replicas (for the KEDA-equivalent controller to scale). Returns its worker Deployment's
    /// timeline once the Deployment rests at the pool's minimum.
    async fn pool(&self, name: &str, queue: &str, concurrency: u32, autoscaling: Option<Value>) -> Timeline {
        let min = autoscaling.as_ref().map_or(0, |a| a["minReplicas"].as_u64().unwrap_or(0) as u32);
        let mut spec = json!({"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
            "queues": [queue], "concurrency": concurrency, "replicas": 0});
        if let Some(a) = autoscaling {
            spec["autoscaling"] = a;
        }
        let pool = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": name}, "spec": spec});
        self.stack.apply_yaml(&pool.to_string()).await.expect("WorkerPool applies");
        let mut timeline = Timeline::record(self.server(), self.stack.namespace(), &format!("{name}-worker"));
        timeline.settle(&format!("pool {name} at {min} replicas"), min).await;
        timeline
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.stack.broker_url()).expect("broker URL");
        client.get_multiplexed_async_connection().await.expect("connect to the stack's Redis")
    }

    /// Autoscaler writes of `spec.replicas` (server-side applies on the Deployment) since the
    /// request log was last cleared.
    fn autoscaler_writes(&self, deployment: &str) -> usize {
        self.server()
            .writes()
            .iter()
            .filter(|r| r.field_manager.as_deref() == Some(FIELD_MANAGER))
            .filter(|r| r.resource == "deployments" && r.subresource.is_none() && r.name.as_deref() == Some(deployment))
            .count()
    }
}

async fn push(redis: &mut redis::aio::MultiplexedConnection, queue: &str, n: usize) {
    let messages: Vec<String> = (0..n).map(|i| kombu_message(queue, i)).collect();
    let _: u64 = redis::cmd("LPUSH").arg(queue).arg(messages).query_async(redis).await.expect("LPUSH");
}

async fn clear(redis: &mut redis::aio::MultiplexedConnection, queue: &str) {
    let _: u64 = redis::cmd("DEL").arg(queue).query_async(redis).await.expect("DEL");
}

/// An autoscaling spec at pollIntervalSeconds 1.
fn autoscaling(min: u32, max: u32, target: Option<u32>, stabilization: u32) -> Value {
    let mut a = json!({"minReplicas": min, "maxReplicas": max, "pollIntervalSeconds": 1,
        "scaleDownStabilizationSeconds": stabilization});
    if let Some(t) = target {
        a["targetPerReplica"] = json!(t);
    }
    a
}

// ================================================================================= the KEDA-equivalent policy

/// A KEDA ScaledObject and the HPA it creates, with their defaults.
#[derive(Clone, Debug)]
struct KedaPolicy {
    /// ScaledObject `pollingInterval` (30 s): KEDA's own loop, which owns activation (0 → 1) and
    /// deactivation (→ 0).
    polling_interval: Duration,
    /// ScaledObject `cooldownPeriod` (300 s): inactive this long before KEDA scales to zero.
    cooldown: Duration,
    /// `minReplicaCount` (0) and `maxReplicaCount` (KEDA's default is 100).
    min: u32,
    max: u32,
    /// The trigger's target per replica (the Redis list scaler's `listLength`, AverageValue).
    target: u64,
    /// `activationListLength` (0).
    activation: u64,
    /// `useCachedMetrics` (KEDA's default: false): the HPA's metric requests read the queue at
    /// each HPA sync. With true the HPA sees the value of KEDA's last 30 s poll.
    cached_metrics: bool,
    /// kube-controller-manager `--horizontal-pod-autoscaler-sync-period` (15 s).
    sync_period: Duration,
    /// `--horizontal-pod-autoscaler-tolerance` (0.1).
    tolerance: f64,
    /// `behavior.scaleDown.stabilizationWindowSeconds` (300 s).
    down_window: Duration,
    /// `behavior.scaleUp`: policies Pods 4 and Percent 100 per 15 s, selectPolicy Max.
    up_pods: u32,
    up_percent: u32,
    up_period: Duration,
}

impl KedaPolicy {
    fn defaults(target: u64, max: u32) -> KedaPolicy {
        KedaPolicy {
            polling_interval: Duration::from_secs(30),
            cooldown: Duration::from_secs(300),
            min: 0,
            max,
            target,
            activation: 0,
            cached_metrics: false,
            sync_period: Duration::from_secs(15),
            tolerance: 0.1,
            down_window: Duration::from_secs(300),
            up_pods: 4,
            up_percent: 100,
            up_period: Duration::from_secs(15),
        }
    }
}

/// What KEDA and the HPA remember between their loops. Times are durations since an arbitrary
/// origin (the burst, in the real-time runs).
#[derive(Clone, Debug, Default)]
struct KedaHpa {
    /// The queue length KEDA last polled.
    polled: Option<u64>,
    last_active: Option<Duration>,
    /// The HPA's recommendations (before stabilization) and its scale-up events.
    recommendations: Vec<(Duration, u32)>,
    up_events: Vec<(Duration, u32)>,
}

impl KedaHpa {
    /// KEDA's polling loop: activation from zero, scale to zero after the cooldown.
    fn keda_poll(&mut self, p: &KedaPolicy, now: Duration, queue_length: u64, current: u32) -> Option<u32> {
        self.polled = Some(queue_length);
        let active = queue_length > p.activation;
        if active {
            self.last_active = Some(now);
        }
        if active && current == 0 {
            return Some(p.min.max(1));
        }
        let cooled = self.last_active.is_none_or(|t| t + p.cooldown < now);
        (!active && p.min == 0 && current > 0 && cooled).then_some(0)
    }

    /// One HPA sync (autoscaling/v2, external metric with an AverageValue target).
    fn hpa_sync(&mut self, p: &KedaPolicy, now: Duration, metric: u64, current: u32) -> Option<u32> {
        if current == 0 {
            // "scaling is disabled since the replica count of the target is zero": KEDA owns 0 ↔ 1.
            return None;
        }
        let ratio = metric as f64 / (p.target as f64 * f64::from(current));
        let wanted = if (ratio - 1.0).abs() <= p.tolerance {
            current
        } else {
            u32::try_from(metric.div_ceil(p.target)).unwrap_or(u32::MAX)
        };
        // Stabilization: up with a 0 s window (the recommendation itself), down to the highest
        // recommendation of the window.
        self.recommendations.retain(|&(at, _)| at + p.down_window > now);
        let highest = self.recommendations.iter().map(|r| r.1).fold(wanted, u32::max);
        self.recommendations.push((now, wanted));
        let mut to = current.max(wanted).min(highest);
        // Rate limit of scale-up: from the replicas at the start of the period, the larger of the
        // two policies. (The default scale-down policy, 100 % per 15 s, limits nothing.)
        self.up_events.retain(|&(at, _)| at + p.up_period > now);
        if to > current {
            let added: u32 = self.up_events.iter().map(|e| e.1).sum();
            let start = current.saturating_sub(added);
            let by_percent = (f64::from(start) * (1.0 + f64::from(p.up_percent) / 100.0)).ceil() as u32;
            to = to.min((start + p.up_pods).max(by_percent)).max(current);
        }
        let to = to.clamp(p.min.max(1), p.max);
        if to > current {
            self.up_events.push((now, to - current));
        }
        (to != current).then_some(to)
    }
}

/// What the KEDA-equivalent controller reads and scales: a model in virtual time, or a real
/// WorkerPool's scale subresource and Redis list.
trait Plant {
    /// Returns once the plant's clock reads `at`.
    async fn wait_until(&mut self, at: Duration);
    /// LLEN of the queue (what KEDA's Redis list scaler reads).
    async fn queue_length(&mut self) -> u64;
    async fn replicas(&mut self) -> u32;
    async fn scale(&mut self, to: u32);
}

/// When KEDA's poll and the HPA's sync next run.
#[derive(Clone, Copy, Debug)]
struct Clock {
    next_poll: Duration,
    next_sync: Duration,
}

/// Runs KEDA's poll loop and the HPA's sync loop against `plant` until `stop(now, writes so far,
/// current replicas)` holds before an event. Returns the replica writes (time, replicas).
async fn drive(
    p: &KedaPolicy,
    state: &mut KedaHpa,
    plant: &mut impl Plant,
    clock: &mut Clock,
    stop: impl Fn(Duration, &[(Duration, u32)], u32) -> bool,
) -> Vec<(Duration, u32)> {
    let mut writes = Vec::new();
    loop {
        let now = clock.next_poll.min(clock.next_sync);
        plant.wait_until(now).await;
        let mut current = plant.replicas().await;
        if stop(now, &writes, current) {
            return writes;
        }
        if clock.next_poll == now {
            let length = plant.queue_length().await;
            if let Some(to) = state.keda_poll(p, now, length, current) {
                plant.scale(to).await;
                writes.push((now, to));
                current = to;
            }
            clock.next_poll += p.polling_interval;
        }
        if clock.next_sync == now {
            let metric = match (p.cached_metrics, state.polled) {
                (true, Some(polled)) => polled,
                _ => plant.queue_length().await,
            };
            if let Some(to) = state.hpa_sync(p, now, metric, current) {
                plant.scale(to).await;
                writes.push((now, to));
            }
            clock.next_sync += p.sync_period;
        }
    }
}

/// The policy against a model: the queue holds `backlog` throughout, replicas are what was last
/// written, and time jumps from event to event.
struct Model {
    now: Duration,
    replicas: u32,
    backlog: u64,
}

impl Plant for Model {
    async fn wait_until(&mut self, at: Duration) {
        self.now = at;
    }
    async fn queue_length(&mut self) -> u64 {
        self.backlog
    }
    async fn replicas(&mut self) -> u32 {
        self.replicas
    }
    async fn scale(&mut self, to: u32) {
        self.replicas = to;
    }
}

/// The policy against a real WorkerPool (through its scale subresource, as an HPA or KEDA
/// targeting the WorkerPool would) and its real Redis list; time 0 is `origin`.
struct ScaleSubresource {
    pools: Api<WorkerPool>,
    name: String,
    redis: redis::aio::MultiplexedConnection,
    queue: String,
    origin: Instant,
}

impl Plant for ScaleSubresource {
    async fn wait_until(&mut self, at: Duration) {
        tokio::time::sleep_until(self.origin + at).await;
    }
    async fn queue_length(&mut self) -> u64 {
        redis::cmd("LLEN").arg(&self.queue).query_async(&mut self.redis).await.expect("LLEN")
    }
    async fn replicas(&mut self) -> u32 {
        let scale = self.pools.get_scale(&self.name).await.expect("get the WorkerPool's scale");
        scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0).unsigned_abs()
    }
    async fn scale(&mut self, to: u32) {
        let patch = Patch::Merge(json!({"spec": {"replicas": to}}));
        let params = PatchParams { field_manager: Some("keda-equivalent".into()), ..Default::default() };
        self.pools.patch_scale(&self.name, &params, &patch).await.expect("patch the WorkerPool's scale");
    }
}

/// Every (poll phase, sync phase) on a grid of `step`: the first KEDA poll and HPA sync after an
/// event at time 0, uniformly distributed (the two loops are independent of each other and of the
/// workload).
fn phase_grid(p: &KedaPolicy, step: Duration) -> Vec<Clock> {
    let offsets = |period: Duration| {
        let n = (period.as_secs_f64() / step.as_secs_f64()).round() as u32;
        (0..n).map(move |i| step * i + step / 2)
    };
    offsets(p.polling_interval)
        .flat_map(|poll| offsets(p.sync_period).map(move |sync| Clock { next_poll: poll, next_sync: sync }))
        .collect()
}

/// The policy in virtual time: from `from` replicas with a constant `backlog` appearing at time 0
/// (the queue was empty before), the writes until the pool runs `to`.
async fn simulate(p: &KedaPolicy, from: u32, backlog: u64, to: u32, mut clock: Clock) -> Vec<(Duration, u32)> {
    let mut model = Model { now: Duration::ZERO, replicas: from, backlog };
    let mut state = KedaHpa { polled: Some(0), ..KedaHpa::default() };
    let limit = Duration::from_secs(3600);
    drive(p, &mut state, &mut model, &mut clock, |now, _, current| current == to || now > limit).await
}

/// The policy over all phases (see [`phase_grid`]).
struct PhaseStats {
    /// Time 0 → the first replica write.
    first: Summary,
    /// Time 0 → the pool runs the target count.
    reached: Summary,
    /// The first write → the target count.
    ramp: Summary,
    /// The distinct numbers of writes it took.
    writes: Vec<usize>,
}

async fn simulate_phases(p: &KedaPolicy, from: u32, backlog: u64, to: u32) -> PhaseStats {
    let (mut first, mut reached, mut ramp, mut writes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for clock in phase_grid(p, Duration::from_millis(250)) {
        let w = simulate(p, from, backlog, to, clock).await;
        let (start, end) = (w.first().expect("the policy scaled").0, w.last().expect("the policy scaled").0);
        first.push(start);
        reached.push(end);
        ramp.push(end - start);
        writes.push(w.len());
    }
    writes.sort_unstable();
    writes.dedup();
    PhaseStats { first: Summary::of(first), reached: Summary::of(reached), ramp: Summary::of(ramp), writes }
}

// ================================================================================= 1. latency

async fn latency(trials: usize) {
    println!("\n## 1. Enqueue → Deployment spec.replicas changed (pollIntervalSeconds 1)\n");
    let bench = Bench::start(Pods::Simulated).await;
    let mut redis = bench.redis().await;
    let mut rows = Vec::new();
    for (label, min) in [("operator, from zero (0 → 3)", 0), ("operator, warm (1 → 3)", 1)] {
        let name = format!("latency-{min}");
        bench.queue(&name).await;
        let mut timeline = bench.pool(&name, &name, 1, Some(autoscaling(min, 10, Some(1), 0))).await;
        let mut took = Vec::with_capacity(trials);
        for trial in 0..trials {
            // A random phase relative to the operator's poll (which follows the last scale-down).
            tokio::time::sleep(Duration::from_secs_f64(random_unit())).await;
            let t0 = Instant::now();
            push(&mut redis, &name, 3).await;
            let up = timeline.until(&format!("trial {trial}: scale-up"), t0, |r| r.spec == 3).await;
            took.push(up.at - t0);
            clear(&mut redis, &name).await;
            timeline.until(&format!("trial {trial}: scale-down"), up.at, |r| r.spec == min).await;
        }
        let summary = Summary::of(took);
        eprintln!("{label}: {summary:?}");
        rows.push(summary.row(label));
    }
    // The same backlog under the KEDA-equivalent policy, over uniformly distributed phases.
    for (label, cached) in [("KEDA defaults", false), ("KEDA, useCachedMetrics", true)] {
        let p = KedaPolicy { cached_metrics: cached, ..KedaPolicy::defaults(1, 10) };
        for (from, what) in [(0, "from zero"), (1, "warm")] {
            let stats = simulate_phases(&p, from, 3, 3).await;
            if from == 0 {
                rows.push(stats.first.row(&format!("{label}, {what}: first write (0 → 1)")));
            }
            rows.push(stats.reached.row(&format!("{label}, {what}: at 3 replicas")));
        }
    }
    println!("{SUMMARY_HEADER}\n{}", rows.join("\n"));
    println!("\nKEDA rows: computed by the KEDA-equivalent policy over a 0.25 s grid of poll/sync phases.");
    bench.stack.shutdown(Duration::from_secs(5)).await;
}

// ================================================================================= 2. ramp

async fn ramp(trials: usize) {
    println!("\n## 2. 0 → 100 replicas\n");
    let bench = Bench::start(Pods::Simulated).await;
    let mut redis = bench.redis().await;
    bench.queue("ramp").await;
    let mut timeline = bench.pool("ramp", "ramp", 1, Some(autoscaling(0, 100, Some(1), 0))).await;
    let (mut to_spec, mut to_ready, mut writes, mut changes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for trial in 0..trials {
        tokio::time::sleep(Duration::from_secs_f64(random_unit())).await;
        bench.server().clear_requests();
        let t0 = Instant::now();
        push(&mut redis, "ramp", 100).await;
        let spec = timeline.until(&format!("trial {trial}: 100 asked for"), t0, |r| r.spec == 100).await;
        let ready = timeline.until(&format!("trial {trial}: 100 ready"), t0, |r| r.ready == 100).await;
        to_spec.push(spec.at - t0);
        to_ready.push(ready.at - t0);
        writes.push(bench.autoscaler_writes("ramp-worker"));
        changes.push(show_steps(&steps(&timeline.since(t0), t0)));
        clear(&mut redis, "ramp").await;
        timeline.settle(&format!("trial {trial}: back to 0"), 0).await;
    }
    println!("{SUMMARY_HEADER}");
    println!("{}", Summary::of(to_spec).row("operator: enqueue → spec.replicas 100"));
    println!("{}", Summary::of(to_ready).row("operator: enqueue → 100 pods ready (simulated pods)"));
    for (label, cached) in [("KEDA defaults", false), ("KEDA, useCachedMetrics", true)] {
        let p = KedaPolicy { cached_metrics: cached, ..KedaPolicy::defaults(1, 100) };
        let stats = simulate_phases(&p, 0, 100, 100).await;
        println!("{}", stats.reached.row(&format!("{label}: enqueue → spec.replicas 100")));
        println!("{}", stats.ramp.row(&format!("{label}: activation (0 → 1) → spec.replicas 100")));
    }
    println!("\noperator replica writes per trial: {writes:?}; spec.replicas per trial: {changes:?}");
    let p = KedaPolicy::defaults(1, 100);
    let keda_writes = simulate_phases(&p, 0, 100, 100).await.writes;
    let mean_phase = Clock { next_poll: p.polling_interval / 2, next_sync: p.sync_period / 2 };
    let w = simulate(&p, 0, 100, 100, mean_phase).await;
    println!("KEDA replica writes (all phases): {keda_writes:?}; at mean phases: {}", show_steps(&w));
    // The model against the documented HPA behaviour: KEDA activates, then +max(4, 100 %) per sync.
    let ramp: Vec<u32> = w.iter().map(|s| s.1).collect();
    assert_eq!(ramp, [1, 5, 10, 20, 40, 80, 100], "the HPA's default scale-up ramp");
    bench.stack.shutdown(Duration::from_secs(5)).await;
}

// ================================================================================= 3. burst

/// Workers per pool and the most replicas either policy may run.
const BURST_CONCURRENCY: u32 = 2;
const BURST_MAX_REPLICAS: u32 = 10;
const BURST_TASK_SECONDS: f64 = 1.0;

/// How one policy handled the burst.
#[derive(Debug)]
struct BurstOutcome {
    /// Sending the burst (one Python process, `send_task` per task).
    sent: Duration,
    first_up: Duration,
    /// Burst start → the last task's result stored (`date_done` of the last one).
    drain: Duration,
    /// Burst start → spec.replicas back at the minimum.
    back_to_min: Duration,
    /// ∫ spec.replicas dt from the burst start to `back_to_min`.
    replica_seconds: f64,
    peak: u32,
    writes: usize,
    failed: usize,
    steps: Vec<(Duration, u32)>,
    /// Measured until here; the rest of the scale-down was computed from the model.
    capped_at: Option<Duration>,
}

const WAIT_DONE: &str = concat!(
    wait_ready_py!(),
    r#"from datetime import timezone
done, failed = [], 0
for i in ids:
    r = AsyncResult(i, app=app)
    if r.ready():
        d = r.date_done
        if d.tzinfo is None:
            d = d.replace(tzinfo=timezone.utc)
        done.append(d.timestamp())
        failed += 0 if r.successful() else 1
print(json.dumps({"pending": len(pending), "failed": failed, "last": max(done, default=0.0)}))
"#
);

/// Sends the burst to `queue` at `t0`, waits for every result and for `timeline`'s Deployment to
/// scale up and come back to zero (until `cap` after `t0`: then the outcome says where it stopped),
/// and measures.
async fn run_burst(
    bench: &Bench,
    timeline: &mut Timeline,
    queue: &str,
    tasks: usize,
    t0: Instant,
    cap: Duration,
) -> BurstOutcome {
    let wall0 = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    let burst: Vec<(&str, Value, &str)> =
        (0..tasks).map(|_| ("celery_example.sleep", json!([BURST_TASK_SECONDS]), queue)).collect();
    let ids = bench.stack.send_tasks(&burst).await.expect("burst sent");
    let sent = t0.elapsed();
    let env = [("BENCH_IDS", json!(ids).to_string()), ("BENCH_TIMEOUT", DEADLINE.as_secs().to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = bench.stack.python(WAIT_DONE, &env).await.expect("results read");
    let done: Value = serde_json::from_str(out.trim()).expect("WAIT_DONE output");
    assert_eq!(done["pending"], 0, "every task finished: {done}");
    let drain = Duration::from_secs_f64(done["last"].as_f64().expect("last") - wall0);
    let up = timeline.until("the first scale-up", t0, |r| r.spec > 0).await;
    let (back_to_min, capped_at) = match timeline.wait(up.at, t0 + cap, |r| r.spec == 0).await {
        Some(back) => (back.at - t0, None),
        None => (cap, Some(cap)),
    };
    let steps = steps(&timeline.since(t0), t0);
    BurstOutcome {
        sent,
        first_up: up.at - t0,
        drain,
        back_to_min,
        replica_seconds: replica_seconds(&steps, back_to_min),
        peak: steps.iter().map(|s| s.1).max().unwrap_or(0),
        writes: 0,
        failed: done["failed"].as_u64().unwrap_or(0) as usize,
        steps: steps.into_iter().filter(|s| s.0 <= back_to_min).collect(),
        capped_at,
    }
}

async fn burst(tasks: usize, tail_cap: Option<Duration>) {
    println!(
        "\n## 3. Burst: {tasks} × sleep({BURST_TASK_SECONDS} s), concurrency {BURST_CONCURRENCY}, max {BURST_MAX_REPLICAS} replicas, real Celery workers\n"
    );
    let bench = Bench::start(Pods::Celery).await;
    let mut redis = bench.redis().await;
    bench.queue("burst-ours").await;
    bench.queue("burst-keda").await;
    // The operator's scale-down window: the CRD's default unless BENCH_STABILIZATION says otherwise.
    let window = u32::try_from(env_number("BENCH_STABILIZATION", 60)).expect("a window in seconds");
    println!("Operator pool: minReplicas 0, scaleDownStabilizationSeconds {window}, pollIntervalSeconds 1.\n");
    let ours_scaling = autoscaling(0, BURST_MAX_REPLICAS, None, window);
    let mut ours_timeline = bench.pool("ours", "burst-ours", BURST_CONCURRENCY, Some(ours_scaling)).await;
    let mut keda_timeline = bench.pool("keda", "burst-keda", BURST_CONCURRENCY, None).await;

    // The operator.
    bench.server().clear_requests();
    let t0 = Instant::now();
    let mut ours = run_burst(&bench, &mut ours_timeline, "burst-ours", tasks, t0, DEADLINE).await;
    ours.writes = bench.autoscaler_writes("ours-worker");
    ours_timeline.settle("ours: every pod gone", 0).await;
    eprintln!("operator: {ours:?}");

    // The KEDA-equivalent controller, with its loops at their mean phases relative to the burst.
    let p = KedaPolicy::defaults(u64::from(BURST_CONCURRENCY), BURST_MAX_REPLICAS);
    let mut clock = Clock { next_poll: p.polling_interval / 2, next_sync: p.sync_period / 2 };
    let mut state = KedaHpa { polled: Some(0), ..KedaHpa::default() };
    let t0 = Instant::now();
    let mut plant = ScaleSubresource {
        pools: Api::namespaced(bench.stack.client(), bench.stack.namespace()),
        name: "keda".into(),
        redis: bench.redis().await,
        queue: "burst-keda".into(),
        origin: t0,
    };
    let cap = tail_cap.unwrap_or(DEADLINE);
    let stop = |now: Duration, writes: &[(Duration, u32)], current: u32| {
        now >= cap || (writes.iter().any(|w| w.1 > 0) && current == 0)
    };
    let (mut keda, mut writes) = tokio::join!(
        run_burst(&bench, &mut keda_timeline, "burst-keda", tasks, t0, cap),
        drive(&p, &mut state, &mut plant, &mut clock, stop)
    );
    if let Some(cap) = keda.capped_at {
        // The queue is empty: the rest of the scale-down follows from the model's state.
        let current = keda.steps.last().map_or(0, |s| s.1);
        let mut model = Model { now: cap, replicas: current, backlog: 0 };
        let rest = drive(&p, &mut state, &mut model, &mut clock, |_, _, current| current == 0).await;
        let end = rest.last().map_or(cap, |w| w.0);
        let mut tail = vec![(cap, current)];
        tail.extend(rest.iter().copied());
        keda.replica_seconds += replica_seconds(&tail, end);
        keda.back_to_min = end;
        keda.steps.extend(rest.iter().copied());
        writes.extend(rest);
    }
    keda.writes = writes.len();
    eprintln!("KEDA-equivalent: {keda:?}");
    clear(&mut redis, "burst-keda").await;

    println!("| | operator | KEDA-equivalent |\n|---|---:|---:|");
    let row = |label: &str, f: &dyn Fn(&BurstOutcome) -> String| println!("| {label} | {} | {} |", f(&ours), f(&keda));
    row("burst sent in", &|o| secs(o.sent));
    row("time to first scale-up", &|o| secs(o.first_up));
    row("drain time (burst start → last result)", &|o| secs(o.drain));
    row("back to min (0) after", &|o| {
        let computed = if o.capped_at.is_some() { " (computed past the cap)" } else { "" };
        format!("{}{computed}", secs(o.back_to_min))
    });
    row("replica-seconds until back to min", &|o| format!("{:.0}", o.replica_seconds));
    row("peak replicas", &|o| o.peak.to_string());
    row("replica writes", &|o| o.writes.to_string());
    row("failed tasks", &|o| o.failed.to_string());
    println!("\noperator spec.replicas: {}", show_steps(&ours.steps));
    println!("KEDA-equivalent spec.replicas: {}", show_steps(&keda.steps));
    if let Some(cap) = keda.capped_at {
        println!("(KEDA run measured for {} s; the rest computed from the model)", cap.as_secs());
    }
    bench.stack.shutdown(Duration::from_secs(10)).await;
}
