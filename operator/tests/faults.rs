//! The fault suite: the real operator binary against the served control-plane double while the
//! double injects API faults — write failures, 429 storms, dropped watches and compaction, read
//! latency, failing autoscaler writes, a failed replica handoff, SIGKILL. Pods are simulated (the
//! runner makes them Ready at once; real Celery adds nothing here), each scenario has its own
//! Redis, double and operator.
//!
//! Every scenario ends the same way: converged before [`DEADLINE`] (every pool's Deployments as
//! its spec says, rolled out, pods as many as replicas, pool and TaskQueue status current and
//! matching the Deployments, no object too many), worker replicas never below what the pool had,
//! then [`STEADY`] of watching with zero write attempts and no hot loop. Each prints one line of
//! figures: requests per second during the fault and once steady, write attempts, injected
//! failures, and how long convergence took after the fault.
//!
//! The test changes the world through the double's direct state access (not HTTP), so the request
//! log holds the operator's requests only and the faults hit only the operator.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_e2e::stack::{DEADLINE, Pods, Stack, StackConfig, examples_dir};
use celery_e2e::{ApiServer, Fault, RequestMatch, RequestRecord, Verb};
use serde_json::{Value, json};
use tokio::time::Instant;

const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");
const NS: &str = "default";
/// The autoscaler's field manager, spelled out: the faults must keep matching it wherever the
/// operator's code keeps the constant (and each scenario checks that its fault did fire).
const AUTOSCALER: &str = "celery-operator-autoscaler";
/// How long a converged operator is watched for writes and request rate: one TaskQueue probe
/// interval (10 s) and a second, so a periodic writer cannot hide between two windows.
const STEADY: Duration = Duration::from_secs(11);
/// More requests per second than this, over a fault or a steady window, is a hot loop (an idle
/// operator makes well under one; bringing up three pools is about 150 requests; a loop that
/// retries without backoff makes thousands).
const HOT_LOOP: f64 = 50.0;
/// How long a fault lasts at least, so that its request rate is a rate and not one burst of work.
const FAULT: Duration = Duration::from_secs(8);
/// How long a converged operator must send nothing (and have nothing in flight) before its steady
/// state is measured: what a reconcile already under way still sends (the Event after the status
/// it reports) belongs to convergence.
const QUIET: Duration = Duration::from_secs(1);

// ================================================================================ the world

/// A WorkerPool as the scenarios write it.
#[derive(Clone, Debug)]
struct Pool {
    name: &'static str,
    queues: &'static [&'static str],
    /// Fixed pools: spec.replicas. Autoscaled pools: the count the autoscaler must settle at.
    replicas: i32,
    concurrency: i32,
    beat: bool,
    autoscaling: Option<Value>,
}

impl Pool {
    fn fixed(name: &'static str, replicas: i32) -> Self {
        Pool { name, queues: &["emails"], replicas, concurrency: 1, beat: false, autoscaling: None }
    }

    fn with_beat(mut self) -> Self {
        self.beat = true;
        self
    }

    /// Autoscaled between `min` and `max` on `emails` (acksLate: the broker's count is the whole
    /// count, no worker heartbeats needed), 10 tasks per replica, polled every second.
    fn autoscaled(name: &'static str, min: i32, max: i32) -> Self {
        let autoscaling = json!({"minReplicas": min, "maxReplicas": max, "targetPerReplica": 10,
            "pollIntervalSeconds": 1, "scaleDownStabilizationSeconds": 0, "acksLate": true});
        Pool { name, queues: &["emails"], replicas: min, concurrency: 1, beat: false, autoscaling: Some(autoscaling) }
    }

    fn spec(&self) -> Value {
        let mut spec = json!({"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
            "queues": self.queues, "concurrency": self.concurrency, "beat": {"enabled": self.beat}});
        match &self.autoscaling {
            Some(autoscaling) => spec["autoscaling"] = autoscaling.clone(),
            None => spec["replicas"] = json!(self.replicas),
        }
        spec
    }

    fn worker(&self) -> String {
        format!("{}-worker", self.name)
    }

    fn beat_name(&self) -> String {
        format!("{}-beat", self.name)
    }
}

/// One scenario's stack, the pools it created and the worker replica counts seen so far.
struct Scenario {
    name: &'static str,
    stack: Stack,
    pools: Vec<Pool>,
    /// Lowest worker replicas each pool was given (what its Deployment must never drop under).
    floors: BTreeMap<String, i32>,
    replicas: ReplicaLog,
    /// TaskQueue status.ready each queue must report (when the scenario filled it).
    queue_depths: BTreeMap<&'static str, i64>,
}

impl Scenario {
    /// A stack with simulated pods, the examples' TaskQueues (applied over HTTP before any
    /// fault) Ready, and a replica log running; `None` (with a NOTICE) on a real cluster, which
    /// cannot inject faults.
    async fn start(name: &'static str) -> Option<Scenario> {
        if std::env::var_os("E2E_KUBECONFIG").is_some() {
            eprintln!("NOTICE: {name}: the fault suite needs the control-plane double; skipped on a real cluster");
            return None;
        }
        let config = StackConfig { pods: Pods::Simulated, ..StackConfig::with_operator(OPERATOR) };
        let stack = Stack::start(config).await.unwrap_or_else(|e| panic!("{name}: the stack did not start: {e}"));
        stack.apply_file(examples_dir().join("redis-queues.yaml")).await.expect("queues apply");
        let replicas = ReplicaLog::start(stack.server().expect("the double"));
        let scenario = Scenario {
            name,
            stack,
            pools: Vec::new(),
            floors: BTreeMap::new(),
            replicas,
            queue_depths: BTreeMap::new(),
        };
        scenario.converge("the TaskQueues to be Ready").await;
        Some(scenario)
    }

    fn server(&self) -> &ApiServer {
        self.stack.server().expect("the double")
    }

    /// Creates a pool (directly in the store: no request, no fault).
    fn create(&mut self, pool: Pool) {
        let object = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": pool.name, "namespace": NS}, "spec": pool.spec()});
        self.server().create(object).unwrap_or_else(|e| panic!("{}: create {}: {e}", self.name, pool.name));
        self.floors.insert(pool.worker(), pool.replicas);
        self.pools.push(pool);
    }

    /// Changes a pool's spec (directly in the store).
    fn change(&mut self, name: &str, f: impl FnOnce(&mut Pool)) {
        let pool = self.pools.iter_mut().find(|p| p.name == name).expect("a pool of this scenario");
        f(pool);
        let floor = self.floors.entry(pool.worker()).or_insert(pool.replicas);
        *floor = (*floor).min(pool.replicas);
        let spec = pool.spec();
        let server = self.stack.server().expect("the double");
        let mut object = server.get("celery-operator.dev/v1alpha1", "WorkerPool", Some(NS), name).unwrap().unwrap();
        object["spec"] = spec;
        object.as_object_mut().unwrap().remove("status");
        server.put(object).unwrap_or_else(|e| panic!("{}: change {name}: {e}", self.name));
    }

    /// Polls (every 100 ms) until [`converged`] holds; returns how long it took. Fails after
    /// [`DEADLINE`] with the last reason and the operator's log.
    async fn converge(&self, what: &str) -> Duration {
        let started = Instant::now();
        loop {
            match converged(self.server(), &self.pools, &self.queue_depths) {
                Ok(()) => return started.elapsed(),
                Err(why) if started.elapsed() > DEADLINE => panic!(
                    "{}: timed out after {DEADLINE:?} waiting for {what}: {why}\n--- operator log (tail) ---\n{}",
                    self.name,
                    tail(&self.stack.operator_log(), 60)
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until the operator has gone [`QUIET`]: no request in flight, none new for that long,
    /// and no Event from the fault still waiting for its retry (`celery_operator_events_retrying`:
    /// its write is the fault's tail, not steady-state traffic). An operator that never does (a
    /// hot loop) fails here after [`DEADLINE`].
    async fn settle(&self) {
        let server = self.server();
        let started = Instant::now();
        let (mut seen, mut since) = (server.request_count(), Instant::now());
        loop {
            let count = server.request_count();
            let retrying = self.stack.metric("celery_operator_events_retrying", &[]).await.unwrap_or(0.0) > 0.0;
            if count != seen || server.requests_in_flight() > 0 || retrying {
                (seen, since) = (count, Instant::now());
            } else if since.elapsed() >= QUIET {
                return;
            }
            assert!(started.elapsed() < DEADLINE, "{}: the operator never went quiet for {QUIET:?}", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Watches the converged operator, once [settled](Self::settle), for [`STEADY`]: it must
    /// attempt no write, make no more than a trickle of requests, and still be converged at the
    /// end.
    async fn steady(&self) -> Traffic {
        self.settle().await;
        let window = Window::open(self.server());
        // A measurement window, not a synchronisation: what happens in it is the result.
        tokio::time::sleep(STEADY).await;
        let (traffic, requests) = window.close(self.server());
        let writes: Vec<String> = requests.iter().filter(|r| r.verb.is_write()).map(describe).collect();
        assert!(writes.is_empty(), "{}: the converged operator attempted writes: {writes:?}", self.name);
        assert!(
            traffic.rate() <= HOT_LOOP,
            "{}: {:.1} requests/s once steady: {:?}",
            self.name,
            traffic.rate(),
            traffic.kinds
        );
        if let Err(why) = converged(self.server(), &self.pools, &self.queue_depths) {
            panic!("{}: no longer converged after {STEADY:?}: {why}", self.name);
        }
        traffic
    }

    /// Every worker Deployment stayed at or above the lowest replicas its pool was given, once it
    /// got there: replicas are never reset.
    fn assert_replicas_never_reset(&self) {
        let seen = self.replicas.history();
        for (worker, floor) in &self.floors {
            let history = seen.get(worker).cloned().unwrap_or_default();
            let floor = i64::from(*floor);
            let from = history.iter().position(|r| *r >= floor);
            let dropped = from.is_some_and(|i| history[i..].iter().any(|r| *r < floor));
            assert!(!dropped, "{}: {worker} went below {floor} replicas: {history:?}", self.name);
        }
    }

    /// The checks every scenario ends with, and its figures line: `during` the fault, the
    /// `convergence` time after `since`, and the [`Scenario::steady`] window `after`.
    fn finish(self, during: Traffic, convergence: Duration, since: &str, after: Traffic) {
        self.assert_replicas_never_reset();
        assert!(
            during.rate() <= HOT_LOOP,
            "{}: {:.1} requests/s during the fault: {:?}",
            self.name,
            during.rate(),
            during.kinds
        );
        let unpublished = self.stack.operator_log().matches("could not publish event").count();
        eprintln!(
            "FAULTS {}: during the fault {:.1} s, {} requests ({:.1}/s), {} write attempts, {} injected failures | \
             converged {:.1} s after {since} | steady {:.0} s: {} requests ({:.2}/s), {} writes | {} Events not published",
            self.name,
            during.elapsed.as_secs_f64(),
            during.requests,
            during.rate(),
            during.write_attempts,
            during.injected,
            convergence.as_secs_f64(),
            after.elapsed.as_secs_f64(),
            after.requests,
            after.rate(),
            after.write_attempts,
            unpublished,
        );
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn describe(r: &RequestRecord) -> String {
    let name = r.name.as_deref().unwrap_or_default();
    format!("{} {}/{name} {:?} by {:?} -> {}", r.verb.as_str(), r.resource, r.subresource, r.field_manager, r.status)
}

// ================================================================================ checks

fn condition_true(obj: &Value, type_: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == type_ && c["status"] == "True"))
}

fn label<'a>(obj: &'a Value, key: &str) -> &'a str {
    obj["metadata"]["labels"][key].as_str().unwrap_or_default()
}

/// Whether the world is what the pools say, or the first difference found.
fn converged(server: &ApiServer, pools: &[Pool], depths: &BTreeMap<&str, i64>) -> Result<(), String> {
    for queue in server.list("celery-operator.dev/v1alpha1", "TaskQueue", Some(NS)).map_err(|e| e.to_string())? {
        let name = queue["metadata"]["name"].as_str().unwrap_or_default();
        let current = queue["status"]["observedGeneration"] == queue["metadata"]["generation"];
        if !current || !condition_true(&queue, "Ready") {
            return Err(format!("TaskQueue {name} is not Ready: {}", queue["status"]));
        }
        if let Some(depth) = depths.get(name).filter(|d| queue["status"]["ready"] != json!(d)) {
            return Err(format!("TaskQueue {name} reports ready {} (wanted {depth})", queue["status"]["ready"]));
        }
    }
    let deployments = server.list("apps/v1", "Deployment", Some(NS)).map_err(|e| e.to_string())?;
    let mut names: Vec<String> =
        deployments.iter().map(|d| d["metadata"]["name"].as_str().unwrap_or_default().to_owned()).collect();
    names.sort();
    let mut wanted: Vec<String> =
        pools.iter().flat_map(|p| [Some(p.worker()), p.beat.then(|| p.beat_name())]).flatten().collect();
    wanted.sort();
    if names != wanted {
        return Err(format!("Deployments {names:?}, wanted {wanted:?}"));
    }
    let by_name: BTreeMap<&str, &Value> =
        deployments.iter().map(|d| (d["metadata"]["name"].as_str().unwrap_or_default(), d)).collect();
    let pods = server.list("v1", "Pod", Some(NS)).map_err(|e| e.to_string())?;
    for pool in pools {
        let worker = by_name[pool.worker().as_str()];
        rolled_out(worker, pool.replicas, &pods)?;
        let args = worker["spec"]["template"]["spec"]["containers"][0]["args"].as_array().cloned().unwrap_or_default();
        let concurrency = args.windows(2).find(|w| w[0] == "-c").map(|w| w[1].clone());
        if concurrency != Some(json!(pool.concurrency.to_string())) {
            return Err(format!("{} runs -c {concurrency:?}, wanted {}", pool.worker(), pool.concurrency));
        }
        if pool.beat {
            rolled_out(by_name[pool.beat_name().as_str()], 1, &pods)?;
        }
        let object = server
            .get("celery-operator.dev/v1alpha1", "WorkerPool", Some(NS), pool.name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("WorkerPool {} is gone", pool.name))?;
        let status = &object["status"];
        let matches = status["observedGeneration"] == object["metadata"]["generation"]
            && condition_true(&object, "Ready")
            && status["replicas"] == worker["status"]["replicas"]
            && status["readyReplicas"] == worker["status"]["readyReplicas"]
            && (pool.autoscaling.is_none() || status["desiredReplicas"] == json!(pool.replicas));
        if !matches {
            return Err(format!("WorkerPool {} status {status} does not match {}", pool.name, worker["status"]));
        }
    }
    Ok(())
}

/// A Deployment at `replicas`, rolled out (status current and all replicas updated and ready), with
/// exactly that many live pods.
fn rolled_out(d: &Value, replicas: i32, pods: &[Value]) -> Result<(), String> {
    let name = d["metadata"]["name"].as_str().unwrap_or_default();
    let status = &d["status"];
    let want = json!(replicas);
    let done = d["spec"]["replicas"] == want
        && status["observedGeneration"] == d["metadata"]["generation"]
        && [&status["replicas"], &status["updatedReplicas"], &status["readyReplicas"]].iter().all(|v| **v == want);
    if !done {
        return Err(format!("{name}: spec.replicas {} (wanted {replicas}), status {status}", d["spec"]["replicas"]));
    }
    let instance = label(d, "app.kubernetes.io/instance");
    let component = label(d, "app.kubernetes.io/component");
    let live = pods
        .iter()
        .filter(|p| {
            label(p, "app.kubernetes.io/instance") == instance && label(p, "app.kubernetes.io/component") == component
        })
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .count();
    if live != replicas as usize {
        return Err(format!("{name}: {live} live pods, wanted {replicas}"));
    }
    Ok(())
}

// ================================================================================ measuring

/// The double's request log from a point on.
struct Window {
    opened: Instant,
    mark: usize,
}

/// What the operator sent in a window.
#[derive(Clone, Debug, Default)]
struct Traffic {
    elapsed: Duration,
    requests: usize,
    /// Create/update/patch/delete requests, failed (injected) ones included.
    write_attempts: usize,
    injected: usize,
    /// Requests by verb, resource and answer, most frequent first (for failure messages).
    kinds: Vec<(usize, String)>,
}

impl Traffic {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

impl Window {
    fn open(server: &ApiServer) -> Window {
        Window { opened: Instant::now(), mark: server.request_count() }
    }

    fn close(self, server: &ApiServer) -> (Traffic, Vec<RequestRecord>) {
        let requests: Vec<RequestRecord> = server.requests().into_iter().skip(self.mark).collect();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for r in &requests {
            let sub = r.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default();
            *kinds.entry(format!("{} {}{sub} {}", r.verb.as_str(), r.resource, r.status)).or_default() += 1;
        }
        let mut kinds: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
        kinds.sort_by(|a, b| b.cmp(a));
        let traffic = Traffic {
            elapsed: self.opened.elapsed(),
            requests: requests.len(),
            write_attempts: requests.iter().filter(|r| r.verb.is_write()).count(),
            injected: requests.iter().filter(|r| r.injected).count(),
            kinds,
        };
        (traffic, requests)
    }
}

/// Every value each worker Deployment's spec.replicas took, in order (from the double's
/// observer, so no transient value is missed).
struct ReplicaLog {
    seen: Arc<Mutex<BTreeMap<String, Vec<i64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplicaLog {
    fn start(server: &ApiServer) -> ReplicaLog {
        let mut observer = server.observe("apps/v1", "Deployment", Some(NS)).expect("Deployments are served");
        let seen: Arc<Mutex<BTreeMap<String, Vec<i64>>>> = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Some((kind, d)) = observer.next().await {
                let name = d["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let replicas = d["spec"]["replicas"].as_i64();
                if kind == "DELETED" || !name.ends_with("-worker") {
                    continue;
                }
                let mut log = log.lock().unwrap();
                let history = log.entry(name).or_default();
                if let Some(r) = replicas.filter(|r| history.last() != Some(r)) {
                    history.push(r);
                }
            }
        });
        ReplicaLog { seen, task }
    }

    fn history(&self) -> BTreeMap<String, Vec<i64>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ReplicaLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The pool set most scenarios create: a fixed pool, a fixed pool with beat (on the `default`
/// queue) and an autoscaled pool resting at its minimum.
fn three_pools() -> [Pool; 3] {
    let beat = Pool { queues: &["default"], ..Pool::fixed("clock", 1).with_beat() };
    [Pool::fixed("mail", 2), beat, Pool::autoscaled("auto", 2, 4)]
}

/// The changes made under the faults: more mail workers with more concurrency, and a new
/// template for clock (its worker and beat both roll). The autoscaled pool is left as it is: a
/// spec change of an autoscaled pool whose replica handoff failed is its own scenario.
fn change_pools(scenario: &mut Scenario) {
    scenario.change("mail", |p| {
        p.replicas = 3;
        p.concurrency = 2;
    });
    scenario.change("clock", |p| p.concurrency = 3);
}

/// Waits until `at` after `window` opened: the pacing of a scenario's steps within its fault (a
/// measurement schedule, not a synchronisation).
async fn at(window: &Window, at: Duration) {
    if let Some(left) = at.checked_sub(window.opened.elapsed()) {
        tokio::time::sleep(left).await;
    }
}

/// Keeps a fault on until [`FAULT`] has passed since `window` opened, then closes the window.
async fn hold(server: &ApiServer, window: Window) -> (Traffic, Vec<RequestRecord>) {
    at(&window, FAULT).await;
    window.close(server)
}

/// Sets a Deployment's spec.replicas by hand (directly in the store), as `kubectl scale` would.
fn scale_by_hand(server: &ApiServer, name: &str, replicas: i32) {
    let mut d = server.get("apps/v1", "Deployment", Some(NS), name).unwrap().expect("the Deployment exists");
    d["spec"]["replicas"] = json!(replicas);
    d.as_object_mut().unwrap().remove("status");
    server.put(d).expect("hand scale");
}

/// The operator process of `stack`, found by its metrics address among this machine's processes.
fn operator_pid(stack: &Stack) -> u32 {
    let addr = stack.metrics_addr().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"celery-operator"))
                && args.windows(2).any(|w| w[0] == b"--metrics-addr" && w[1] == addr.as_bytes())
        })
        .expect("the operator's process")
}

/// Creates [`three_pools`] as the fault begins and changes them halfway through [`FAULT`];
/// returns the fault's window.
async fn create_then_change(s: &mut Scenario) -> Window {
    let window = Window::open(s.server());
    for pool in three_pools() {
        s.create(pool);
    }
    at(&window, FAULT / 2).await;
    change_pools(s);
    window
}

/// Ends a fault: clears it, waits for convergence, watches the steady operator, checks and
/// prints the figures.
async fn recover(s: Scenario, during: Traffic) {
    s.server().clear_faults();
    let convergence = s.converge("convergence after the fault").await;
    let after = s.steady().await;
    s.finish(during, convergence, "the fault", after);
}

// ================================================================================ scenarios

/// 30 % of the operator's writes fail with 500 for [`FAULT`]: three pools are created at once and
/// two of them changed halfway. Once the failures stop the operator converges, and then writes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_of_writes_failing_delays_but_never_breaks_convergence() {
    let Some(mut s) = Scenario::start("30% of writes fail with 500").await else { return };
    s.server().seed_faults(14);
    s.server().inject(Fault::error(500).on(RequestMatch::writes()).with_probability(0.3));
    let window = create_then_change(&mut s).await;
    let (during, _) = hold(s.server(), window).await;
    assert!(during.injected > 0, "no write failed");
    // Each failure names the call: verb, kind, namespace/name and the status code.
    let log = s.stack.operator_log();
    let ns = s.stack.namespace().to_string();
    let named = log.lines().find(|l| {
        l.contains("reconcile failed")
            && l.contains("HTTP 500")
            && ["APPLY Deployment ", "APPLY status of WorkerPool ", "PATCH status of TaskQueue "]
                .iter()
                .any(|call| l.contains(&format!("{call}{ns}/")))
    });
    assert!(named.is_some(), "no failed reconcile names its call:\n{}", tail(&log, 30));
    recover(s, during).await;
}

/// Every request of the operator answers 429 (with `Retry-After: 1`) for [`FAULT`] while pools
/// are created and changed: the operator waits as asked (about one retry per request in flight
/// per second, not a hot loop) and converges once the storm is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_waited_out_as_retry_after_asks() {
    let Some(mut s) = Scenario::start("429 storm").await else { return };
    s.server().inject(Fault::error(429));
    let window = create_then_change(&mut s).await;
    let (during, _) = hold(s.server(), window).await;
    assert!(during.injected > 0, "nothing was refused");
    recover(s, during).await;
}

/// Every read (get, list, watch) of the operator takes 2 s longer while pools are created and,
/// halfway through [`FAULT`], changed: the operator converges under the latency, slower, without
/// piling up requests, and is steady under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_second_reads_slow_convergence_but_do_not_break_it() {
    let Some(mut s) = Scenario::start("2 s read latency").await else { return };
    let reads = RequestMatch::any().verbs(&[Verb::Get, Verb::List, Verb::Watch]);
    s.server().inject(Fault::latency(Duration::from_secs(2)).on(reads));
    let window = create_then_change(&mut s).await;
    let changed = Instant::now();
    s.converge("the pools under latency").await;
    let convergence = changed.elapsed();
    let (during, _) = hold(s.server(), window).await;
    let after = s.steady().await;
    s.server().clear_faults();
    s.finish(during, convergence, "the changes (latency on, also when steady)", after);
}

/// Every write of the autoscaler fails (Deployment replicas and pool status) for [`FAULT`] while a
/// backlog of 35 tasks arrives for a pool sized at 10 per replica: once the writes go through
/// again the pool scales to 4 and reports it; it never dropped below its minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_arriving_while_autoscaler_writes_fail_is_scaled_for_afterwards() {
    let Some(mut s) = Scenario::start("autoscaler writes fail during a backlog").await else { return };
    s.create(Pool::autoscaled("auto", 1, 4));
    s.converge("the pool at its minimum").await;
    s.server().inject(Fault::error(500).on(RequestMatch::writes().field_manager(AUTOSCALER)));
    let window = Window::open(s.server());
    push_backlog(&s.stack, "emails", 35).await;
    s.queue_depths.insert("emails", 35);
    let (during, _) = hold(s.server(), window).await;
    assert!(during.injected > 0, "the autoscaler attempted no write");
    s.pools[0].replicas = 4;
    recover(s, during).await;
}

/// LPUSHes `n` placeholder messages onto a queue's Redis list (only its length matters here).
async fn push_backlog(stack: &Stack, queue: &str, n: usize) {
    let client = redis::Client::open(stack.broker_url()).unwrap();
    let patient = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(30)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let mut conn = client.get_multiplexed_async_connection_with_config(&patient).await.unwrap();
    let messages: Vec<String> = (0..n).map(|i| format!("backlog-{i}")).collect();
    let _: () = redis::cmd("LPUSH").arg(queue).arg(messages).query_async(&mut conn).await.unwrap();
}

/// The write that makes the autoscaler co-own a new worker Deployment's spec.replicas fails once;
/// then the pool's template changes. The Deployment must keep its 3 replicas: if the handoff is
/// never redone, the reconciler's apply without replicas drops the field and Kubernetes resets it
/// to 1, stopping two of three workers mid-task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replica_handoff_is_redone_before_the_next_change() {
    let Some(mut s) = Scenario::start("replica handoff fails once").await else { return };
    let handoff = RequestMatch::writes().resource("deployments").field_manager(AUTOSCALER);
    s.server().inject(Fault::error(500).on(handoff).times(1));
    let window = Window::open(s.server());
    s.create(Pool::autoscaled("auto", 3, 5));
    s.converge("the pool at 3").await;
    assert!(s.server().requests().iter().any(|r| r.injected), "the handoff did not fail");
    s.change("auto", |p| p.concurrency = 2);
    let changed = Instant::now();
    s.converge("the new template to roll out").await;
    let convergence = changed.elapsed();
    let (during, _) = hold(s.server(), window).await;
    let after = s.steady().await;
    s.finish(during, convergence, "the change", after);
}

/// 30 % of writes fail for [`FAULT`]: pools are created, the operator is killed (SIGKILL) once it
/// has made a few writes, a new one starts while the failures go on, and the pools are changed.
/// It must converge with nothing duplicated and nothing reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_fault_converges_after_restart() {
    let Some(mut s) = Scenario::start("SIGKILL mid-fault").await else { return };
    s.server().seed_faults(41);
    s.server().inject(Fault::error(500).on(RequestMatch::writes()).with_probability(0.3));
    let window = Window::open(s.server());
    for pool in three_pools() {
        s.create(pool);
    }
    let deadline = Instant::now() + DEADLINE;
    while s.server().writes().len() < 4 {
        assert!(Instant::now() < deadline, "the operator made no writes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = operator_pid(&s.stack);
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let status = s.stack.stop_operator().await.expect("the killed operator is reaped");
    assert!(!status.success(), "{status}");
    s.stack.start_operator().await.expect("a new operator starts");
    change_pools(&mut s);
    let (during, _) = hold(s.server(), window).await;
    recover(s, during).await;
}

/// The pacing of the beat scenario's hand scales: a period that meets the 2 s and 5 s faults at
/// every phase.
const HAND_SCALE_EVERY: Duration = Duration::from_millis(1700);

/// Pools up, then for 12 × [`HAND_SCALE_EVERY`] watches are dropped every 2 s and the history
/// compacted every 5 s (so re-watches get 410 Gone) while the beat Deployment is scaled to 3 by
/// hand every [`HAND_SCALE_EVERY`]; each time the operator must set it back to 1. Returns the
/// scenario, the time each revert took and the traffic during the faults.
async fn beat_hand_scaled_under_watch_faults(
    name: &'static str,
) -> Option<(Scenario, Vec<Duration>, Traffic, Duration)> {
    let mut s = Scenario::start(name).await?;
    for pool in three_pools() {
        s.create(pool);
    }
    s.converge("the pools").await;
    let server = s.server().clone();
    let faults = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.tick().await;
        for second in 1u64.. {
            ticks.tick().await;
            if second % 2 == 0 {
                server.drop_watches();
            }
            if second % 5 == 0 {
                server.compact();
            }
        }
    });
    let window = Window::open(s.server());
    let mut reverts = Vec::new();
    for n in 1..=12 {
        at(&window, HAND_SCALE_EVERY * n).await;
        scale_by_hand(s.server(), "clock-beat", 3);
        let scaled = Instant::now();
        loop {
            let d = s.server().get("apps/v1", "Deployment", Some(NS), "clock-beat").unwrap().unwrap();
            if d["spec"]["replicas"] == 1 {
                break;
            }
            assert!(scaled.elapsed() < DEADLINE, "{name}: beat was not scaled back to 1 within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reverts.push(scaled.elapsed());
    }
    faults.abort();
    let (during, _) = window.close(s.server());
    let convergence = s.converge("the pools after the faults").await;
    let mean = reverts.iter().sum::<Duration>() / reverts.len() as u32;
    let max = reverts.iter().max().expect("reverts");
    let each: Vec<String> = reverts.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect();
    eprintln!(
        "FAULTS {name}: beat reverted to 1 in mean {:.2} s, max {:.2} s; each {each:?}",
        mean.as_secs_f64(),
        max.as_secs_f64()
    );
    Some((s, reverts, during, convergence))
}

/// Under dropped watches and 410s, every hand scale of beat is reverted, and the operator ends
/// converged and quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_is_reverted_while_watches_drop_and_history_is_compacted() {
    let Some((s, _, during, convergence)) = beat_hand_scaled_under_watch_faults("watches dropped and compacted").await
    else {
        return;
    };
    let after = s.steady().await;
    s.finish(during, convergence, "the faults", after);
}

/// A revert rides on the Deployment watch alone, so other kinds' failing watches must not delay
/// it. Five times: once the operator's watches are all open, the history is compacted and the
/// WorkerPool and TaskQueue watches alone are dropped (their re-watches get 410 Gone); 0.3 s later
/// beat is scaled to 3 by hand, and it must be back at one pod within 2 s (a revert is one watch
/// event and one apply: 0.02 to 0.4 s on a loaded 2-core machine). With one backoff for all of a
/// controller's watches, each of those errors pauses the Deployment events too, 0.8 s, then 1.6,
/// 3.2 s... for errors in a row: today's reverts took 1.3 to 8.7 s, four of five over 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_reverts_never_wait_for_another_watchs_backoff() {
    let Some(mut s) = Scenario::start("other kinds' watches fail before each hand scale").await else { return };
    for pool in three_pools() {
        s.create(pool);
    }
    s.converge("the pools").await;
    let open = s.server().open_watches();
    let window = Window::open(s.server());
    let mut reverts = Vec::new();
    for _ in 0..5 {
        let deadline = Instant::now() + DEADLINE;
        while s.server().open_watches() < open {
            assert!(Instant::now() < deadline, "the operator did not re-open its {open} watches");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.server().compact();
        for kind in ["workerpools", "taskqueues"] {
            assert!(s.server().drop_watches_of(kind) > 0, "the operator watches no {kind}");
        }
        // Pacing: the re-watches have got their 410 by now on any machine; a revert that still
        // beats the pause only makes the test pass, never fail.
        tokio::time::sleep(Duration::from_millis(300)).await;
        scale_by_hand(s.server(), "clock-beat", 3);
        let scaled = Instant::now();
        s.converge("beat back at one pod").await;
        reverts.push(scaled.elapsed());
    }
    let (during, _) = window.close(s.server());
    let each: Vec<String> = reverts.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect();
    eprintln!("FAULTS {}: beat back at one pod after {each:?} s", s.name);
    let slow: Vec<&String> =
        each.iter().zip(&reverts).filter(|(_, d)| d.as_secs_f64() >= 2.0).map(|(e, _)| e).collect();
    assert!(slow.is_empty(), "reverts that waited for other watches' backoff: {slow:?} of {each:?} s");
    let convergence = s.converge("the pools").await;
    let after = s.steady().await;
    s.finish(during, convergence, "the last revert", after);
}
