//! The autoscaler end to end with real Celery (issue #5, "Must show"): the operator binary, the
//! control-plane double with the pod runner running real Celery workers from the harness venv, and a
//! real password-protected Redis (`celery_e2e::stack::Stack`). Every Deployment `spec.replicas`
//! value is recorded by a watch, the double's request log tells who wrote what, and the workers'
//! logs (kept by the runner after their pods are gone) tell which task ran where and how often.
//!
//! These scenarios need the runner's process view and the double's request log, so they are
//! skipped (with a NOTICE) against a real cluster (`E2E_KUBECONFIG`) and when the Celery venv
//! cannot be built (no PyPI).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use celery_e2e::stack::{Stack, TaskResult};
use celery_operator::autoscale::scaler::FIELD_MANAGER;
use common::e2e::*;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::time::Instant;

// ------------------------------------------------------------------------------------ helpers

/// Polls `check` (every 50 ms) until it returns `Some`, failing after [`DEADLINE`] with `what`.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_every(Duration::from_millis(50), what, check).await
}

/// An autoscaled WorkerPool of the example app on the `emails` TaskQueue, `threads` pool (one
/// process per worker: CI has 2 cores). `acks_late` sets both the app's `CELERY_ACKS_LATE` and
/// `autoscaling.acksLate`.
fn pool_yaml(name: &str, concurrency: u32, mut autoscaling: Value, acks_late: bool) -> String {
    autoscaling["acksLate"] = json!(acks_late);
    autoscaling["pollIntervalSeconds"] = json!(1);
    let env = if acks_late { json!([{"name": "CELERY_ACKS_LATE", "value": "1"}]) } else { json!([]) };
    json!({
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": name},
        "spec": {"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
            "queues": ["emails"], "concurrency": concurrency, "pool": "threads",
            "autoscaling": autoscaling, "template": {"env": env}},
    })
    .to_string()
}

/// Builds bursts of real Celery task messages of the example app without sending them: Celery
/// produces each message as usual, but kombu's per-message `LPUSH` is captured. Input: a list of
/// bursts, each a list of `[task name, args, queue]`; output per burst: the task ids and the
/// `[list key, [message, ...]]` pushes that deliver it.
const PREPARE_BURSTS: &str = r#"
import json, os
from collections import defaultdict
import kombu.transport.redis as kombu_redis
from celery_example.app import app

pending = None
def collect(self, queue, message, **kwargs):
    pri = self._get_message_priority(message, reverse=False)
    pending[self._q_for_pri(queue, pri)].append(kombu_redis.dumps(message))
kombu_redis.Channel._put = collect

out = []
for tasks in json.loads(os.environ["E2E_BURSTS"]):
    pending = defaultdict(list)
    ids = [app.send_task(name, args=args, queue=queue).id for name, args, queue in tasks]
    out.append({"ids": ids, "pushes": list(pending.items())})
print(json.dumps(out))
"#;

/// Celery task messages ready to be pushed to Redis at once.
#[derive(Debug, serde::Deserialize)]
struct Burst {
    ids: Vec<String>,
    pushes: Vec<(String, Vec<String>)>,
}

/// Prepares bursts of `(task name, args, queue)` (see [`PREPARE_BURSTS`]).
async fn prepare_bursts(stack: &Stack, bursts: &[Vec<(&str, Value, &str)>]) -> Vec<Burst> {
    let docs: Vec<Value> = bursts
        .iter()
        .map(|tasks| tasks.iter().map(|(name, args, queue)| json!([name, args, queue])).collect())
        .collect();
    let out = stack.python(PREPARE_BURSTS, &[("E2E_BURSTS", &Value::Array(docs).to_string())]).await.unwrap();
    let prepared: Vec<Burst> = serde_json::from_str(out.trim()).unwrap();
    for (burst, tasks) in prepared.iter().zip(bursts) {
        assert_eq!(burst.ids.len(), tasks.len());
    }
    prepared
}

/// Delivers a burst in one MULTI/EXEC with one `LPUSH key m1 … mn` per queue, so the broker never
/// holds part of it (the autoscaler cannot see half of a burst and take two steps).
async fn push(stack: &Stack, burst: &Burst) {
    let mut conn = redis_db(stack, 0).await;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (key, messages) in &burst.pushes {
        pipe.cmd("LPUSH").arg(key).arg(messages).ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

// ----------------------------------------------------------------------------------- scenarios

/// A burst of 500 tasks lands in Redis at once (one LPUSH) on a pool at minReplicas 0: the
/// autoscaler scales the worker Deployment from 0 straight to ceil(500 / targetPerReplica 100) = 5
/// (maxReplicas 8) with a single write, and every task is executed. As the backlog drains the
/// demand falls and the pool steps down, each step once the 3 s stabilization window has passed,
/// back to minReplicas 0. The whole `spec.replicas` history is recorded by a watch: after the burst
/// it rises once, to 5, and never again; every change is one autoscaler write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_scales_from_zero_in_one_step_drains_and_returns_to_min() {
    let Some(stack) = start("the double's request log and the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    let replicas_seen = record_replicas(&stack, "burst");
    let autoscaling = json!({"minReplicas": 0, "maxReplicas": 8, "targetPerReplica": 100,
        "scaleDownStabilizationSeconds": 3});
    stack.apply_yaml(&pool_yaml("burst", 4, autoscaling, false)).await.expect("pool applies");
    eventually("the pool to be decided at 0 replicas", || async {
        let p = pool_object(&stack, "burst").await;
        (replicas(&stack, "burst").await == Some(0) && p["status"]["desiredReplicas"] == 0).then_some(())
    })
    .await;
    assert!(worker_pods(&stack, "burst").await.is_empty());
    stack.server().unwrap().clear_requests();

    let tasks: Vec<(&str, Value, &str)> = (0..500).map(|_| ("celery_example.sleep", json!([0.2]), "emails")).collect();
    let burst = prepare_bursts(&stack, &[tasks]).await.pop().unwrap();
    let sent_at = Instant::now();
    push(&stack, &burst).await;
    let burst_in_redis = Instant::now();
    let ids = burst.ids;
    eventually("the pool to scale up", || async { (replicas_seen.last() != Some(0)).then_some(()) }).await;
    let first_up = replicas_seen.since(sent_at);
    let results = wait_results(&stack, &ids).await;
    let drained = Instant::now();
    let hosts: BTreeSet<&str> = results.iter().filter_map(TaskResult::hostname).collect();
    eventually("the pool to return to minReplicas 0", || async {
        (replicas(&stack, "burst").await == Some(0)).then_some(())
    })
    .await;
    let back_to_min = Instant::now();
    eventually("the worker pods to go", || async { worker_pods(&stack, "burst").await.is_empty().then_some(()) }).await;

    let changes: Vec<i32> = replicas_seen.since(sent_at).into_iter().map(|(_, v)| v).collect();
    let after_burst: Vec<i32> = std::iter::once(0).chain(changes.iter().copied()).collect();
    eprintln!(
        "burst: replicas after the burst {after_burst:?}; burst sent in {}, 0 -> 5 seen {} after the burst was in \
         Redis; drained (500 results) {} after; back to 0 {} after the drain; {} workers ran tasks; autoscaler \
         Deployment writes {}",
        secs(burst_in_redis - sent_at),
        secs(first_up[0].0.saturating_duration_since(burst_in_redis)),
        secs(drained - burst_in_redis),
        secs(back_to_min - drained),
        hosts.len(),
        autoscaler_writes(&stack, "deployments", None),
    );
    assert_eq!(first_up[0].1, 5, "the first change after the burst must be 0 -> 5 at once: {after_burst:?}");
    assert_eq!(steps(&after_burst).0, 1, "one step up and no other: {after_burst:?}");
    assert_eq!(after_burst.iter().max(), Some(&5), "{after_burst:?}");
    assert_eq!(after_burst.last(), Some(&0), "{after_burst:?}");
    assert_eq!(
        autoscaler_writes(&stack, "deployments", None),
        changes.len(),
        "one autoscaler write per replica change, no others: {after_burst:?}"
    );
    assert!(hosts.len() > 1, "the burst should have been spread over the new workers: {hosts:?}");
    for h in &hosts {
        assert!(h.starts_with("burst@burst-worker-"), "{h} is not a worker of the pool");
    }
    let up = metric(
        &stack,
        "celery_operator_autoscaler_scale_events_total",
        &[("workerpool", "burst"), ("direction", "up")],
    )
    .await;
    assert_eq!(up, 1.0, "one scale-up event counted");
    let pool = [("workerpool", "burst")];
    for gauge in ["celery_operator_pool_desired_replicas", "celery_operator_pool_current_replicas"] {
        eventually(&format!("{gauge} at 0"), || async {
            (stack.metric(gauge, &pool).await == Some(0.0)).then_some(())
        })
        .await;
    }
}

/// A pool with `acks_late` (CELERY_ACKS_LATE=1, autoscaling.acksLate) goes through at least 20
/// up/down cycles between 0 and up to 3 replicas (stabilization 1 s): bursts of 6 tasks of mixed
/// length, each pushed as soon as the previous one has scaled the pool back to 0, so new workers
/// start while the old ones still shut down, and some tasks run on workers being removed. Every
/// task id has a SUCCESS result; each task's deliveries and executions are counted from the logs
/// of every worker pod that ran, and printed; no task may run twice (a redelivery of a message a
/// stopping worker had reserved but not started is counted and printed, and allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_late_loses_no_task_over_20_scale_cycles() {
    const CYCLES: usize = 20;
    let Some(stack) = start("the double's request log and the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    let replicas_seen = record_replicas(&stack, "cycles");
    let autoscaling = json!({"minReplicas": 0, "maxReplicas": 3, "scaleDownStabilizationSeconds": 1});
    stack.apply_yaml(&pool_yaml("cycles", 2, autoscaling, true)).await.expect("pool applies");
    eventually("the pool at 0 replicas", || async { (replicas(&stack, "cycles").await == Some(0)).then_some(()) })
        .await;

    let durations = [0.05, 0.2, 0.5, 0.1, 0.8, 0.2];
    // Spare bursts: one pushed while the workers of the last cycle are still running can be done
    // by them before the next poll (the pool at 0 wakes for a backlog only), without a cycle.
    let bursts: Vec<Vec<(&str, Value, &str)>> = (0..CYCLES + 10)
        .map(|_| durations.iter().map(|d| ("celery_example.sleep", json!([d]), "emails")).collect())
        .collect();
    let mut bursts = prepare_bursts(&stack, &bursts).await;
    let started = Instant::now();
    let (mut sent, mut absorbed) = (0, 0);
    while steps(&replicas_seen.values()).0 < CYCLES && sent < bursts.len() {
        let burst = &bursts[sent];
        sent += 1;
        let mark = replicas_seen.values().len();
        push(&stack, burst).await;
        let scaled = eventually(&format!("burst {sent}: a scale-up, or its tasks done"), || async {
            if replicas_seen.values().len() > mark {
                return Some(true);
            }
            all_succeeded(&stack, &burst.ids).await.then_some(false)
        })
        .await;
        absorbed += usize::from(!scaled);
        // Back at 0 means nothing waits or runs (late acks keep running tasks unacked, in flight).
        eventually(&format!("burst {sent}: back to 0"), || async { (replicas_seen.last() == Some(0)).then_some(()) })
            .await;
    }
    bursts.truncate(sent);
    let ids: Vec<String> = bursts.iter().flat_map(|b| b.ids.iter().cloned()).collect();
    let took = started.elapsed();
    eventually("the last workers to exit", || async { worker_pods(&stack, "cycles").await.is_empty().then_some(()) })
        .await;

    let results = wait_results(&stack, &ids).await;
    assert_eq!(results.len(), sent * durations.len());
    let runs = runs_by_task(&stack, "cycles");
    let never_ran: Vec<&String> = ids.iter().filter(|id| runs.get(*id).is_none_or(|r| r.succeeded == 0)).collect();
    let twice: Vec<(&String, &Runs)> =
        ids.iter().filter_map(|id| Some((id, runs.get(id)?))).filter(|(_, r)| r.succeeded > 1).collect();
    // Tasks run by a worker of the previous cycle: each burst is pushed once the Deployment is back
    // at 0, so such a worker was being removed (or, if the pool came back before the runner acted
    // on the 0, kept).
    let pods_of = |b: &Burst| -> BTreeSet<String> {
        b.ids.iter().filter_map(|id| runs.get(id)).flat_map(|r| r.pods.iter().cloned()).collect()
    };
    let left_over: usize = bursts
        .windows(2)
        .map(|w| {
            let before = pods_of(&w[0]);
            w[1].ids.iter().filter(|id| runs.get(*id).is_some_and(|r| !r.pods.is_disjoint(&before))).count()
        })
        .sum();
    let redelivered: Vec<(&String, &Runs)> =
        ids.iter().filter_map(|id| Some((id, runs.get(id)?))).filter(|(_, r)| r.received > 1).collect();
    let values = replicas_seen.values();
    let (ups, downs) = steps(&values);
    eprintln!(
        "acks_late cycles: {ups} up and {downs} down in {}, {sent} bursts ({absorbed} done by running workers \
         without a scale-up), {} tasks, {} worker pods ran; replicas {values:?}; lost 0 (every id has a SUCCESS result); executed twice {}; delivered more than once {}; \
         run by a worker left over from the previous cycle {left_over}",
        secs(took),
        ids.len(),
        worker_logs(&stack, "cycles").len(),
        twice.len(),
        redelivered.len()
    );
    for (id, r) in &redelivered {
        // Expected: a stopping worker gives back the messages it reserved but did not start.
        eprintln!("  redelivered {id}: received on {:?}, run on {:?}", r.received_on, r.pods);
    }
    assert!(ups >= CYCLES && downs >= CYCLES, "{values:?}");
    assert!(never_ran.is_empty(), "tasks with a result but no execution in any worker log: {never_ran:?}");
    assert!(twice.is_empty(), "tasks executed more than once: {twice:?}");
}

/// Scale-in removes idle workers first while a busy one finishes its task. acks_late, concurrency
/// 1, prefetch 1: three `hold` tasks scale the pool from 1 to 3 and each lands on its own worker.
/// Two are released; the one kept busy is on the pod the ReplicaSet controller would remove first
/// without deletion costs (the newest). The autoscaler scales 3 → 1 (one task in flight keeps one
/// replica): before that it marks the busy pod with pod-deletion-cost 1 and the idle ones with 0,
/// so the idle pods are removed and the busy one stays, never terminating. Released, its task
/// completes there, in the same process, delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_removes_idle_workers_and_the_busy_one_finishes() {
    let Some(stack) = start("the double's request log and the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    let replicas_seen = record_replicas(&stack, "keep");
    let pods_seen = record_pods(&stack, "keep");
    let autoscaling = json!({"minReplicas": 1, "maxReplicas": 3, "targetPerReplica": 1,
        "scaleDownStabilizationSeconds": 5});
    stack.apply_yaml(&pool_yaml("keep", 1, autoscaling, true)).await.expect("pool applies");
    eventually("the pool at 1 replica", || async { (replicas(&stack, "keep").await == Some(1)).then_some(()) }).await;

    let tag = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let names: Vec<String> = ["a", "b", "c"].iter().map(|n| format!("{tag}-{n}")).collect();
    let tasks: Vec<(&str, Value, &str)> =
        names.iter().map(|n| ("celery_example.hold", json!([n, 600]), "emails")).collect();
    let burst = prepare_bursts(&stack, &[tasks]).await.pop().unwrap();
    push(&stack, &burst).await;
    let ids = burst.ids;
    let started = wait_started(&stack, &ids).await;
    let host_of = |i: usize| started[i].1["hostname"].as_str().unwrap().to_string();
    let hosts: BTreeSet<String> = (0..3).map(host_of).collect();
    assert_eq!(hosts.len(), 3, "each hold task runs on its own worker: {started:?}");

    // The pod a scale-in would remove first without costs: the newest (creation time, then name).
    let pods = worker_pods(&stack, "keep").await;
    assert_eq!(pods.len(), 3);
    let rank = |p: &Pod| {
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        (created, p.metadata.name.clone().unwrap_or_default())
    };
    let newest = pods.iter().max_by_key(|p| rank(p)).unwrap();
    let busy_pod = newest.metadata.name.clone().unwrap();
    let busy_uid = newest.metadata.uid.clone();
    let busy = (0..3).find(|&i| pod_of("keep", &host_of(i)) == busy_pod).expect("a hold task on the newest pod");
    let busy_pid = started[busy].1["pid"].clone();
    let idle: Vec<usize> = (0..3).filter(|&i| i != busy).collect();
    let idle_pods: BTreeSet<String> = idle.iter().map(|&i| pod_of("keep", &host_of(i)).to_string()).collect();

    stack.server().unwrap().clear_requests();
    release(&stack, &idle.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>()).await;
    let idle_ids: Vec<String> = idle.iter().map(|&i| ids[i].clone()).collect();
    wait_results(&stack, &idle_ids).await;
    eventually("the scale-in to 1", || async { (replicas(&stack, "keep").await == Some(1)).then_some(()) }).await;
    let left = eventually("the idle pods to go", || async {
        let pods = worker_pods(&stack, "keep").await;
        (pods.len() == 1).then(|| pods.into_iter().next().unwrap())
    })
    .await;

    let history = pods_seen.values();
    let cost_of = |pod: &str| history.iter().rev().find(|(n, c, _)| n == pod && c.is_some()).and_then(|s| s.1.clone());
    eprintln!(
        "scale-in: replicas {:?}; busy pod {busy_pod} (newest), idle pods {idle_pods:?}; costs: busy {:?}, idle {:?}",
        replicas_seen.values(),
        cost_of(&busy_pod),
        idle_pods.iter().map(|p| cost_of(p)).collect::<Vec<_>>()
    );
    // 3 -> 1 in one step, or 3 -> 2 -> 1 when the two released tasks finished either side of a poll.
    let values = replicas_seen.values();
    assert_eq!(values[..2], [1, 3], "1 -> 3 in one step: {values:?}");
    assert_eq!(values.last(), Some(&1), "{values:?}");
    assert_eq!(steps(&values).0, 1, "one step up, then only down: {values:?}");
    assert_eq!(left.metadata.name.as_deref(), Some(busy_pod.as_str()), "the busy pod must survive the scale-in");
    assert_eq!(left.metadata.uid, busy_uid, "the same pod object");
    assert!(left.metadata.deletion_timestamp.is_none());
    assert!(
        !history.iter().any(|(n, _, deleting)| *n == busy_pod && *deleting),
        "the busy pod was never asked to terminate"
    );
    assert_eq!(cost_of(&busy_pod).as_deref(), Some("1"), "busy pod's deletion cost: its running task");
    for pod in &idle_pods {
        assert_eq!(cost_of(pod).as_deref(), Some("0"), "idle pod {pod}'s deletion cost");
        assert!(history.iter().any(|(n, _, deleting)| n == pod && *deleting), "idle pod {pod} was removed");
    }
    // The costs were set before the scale-in: the pod patches come before the Deployment write.
    let writes = stack.server().unwrap().writes();
    let first_scale =
        writes.iter().position(|w| w.resource == "deployments" && w.field_manager.as_deref() == Some(FIELD_MANAGER));
    let first_cost = writes.iter().position(|w| w.resource == "pods" && w.verb.as_str() == "patch");
    assert!(
        matches!((first_cost, first_scale), (Some(c), Some(s)) if c < s),
        "deletion costs must be set before the Deployment is scaled in: {writes:?}"
    );

    release(&stack, &[names[busy].as_str()]).await;
    let done = wait_results(&stack, &ids[busy..=busy]).await;
    let r = &done[0];
    assert_eq!(r.result["released"], true, "the hold task ran to its release, not to its timeout: {r:?}");
    assert_eq!(r.hostname(), Some(format!("keep@{busy_pod}").as_str()));
    assert_eq!(r.result["pid"], busy_pid, "finished by the process that started it");
    let runs = runs_by_task(&stack, "keep");
    let run = runs.get(&ids[busy]).cloned().unwrap_or_default();
    assert_eq!((run.received, run.succeeded), (1, 1), "delivered and run exactly once: {run:?}");
    assert_eq!(run.pods, BTreeSet::from([busy_pod.clone()]));
    assert_eq!(replicas(&stack, "keep").await, Some(1));
}

/// Redis is killed (SIGKILL) while real workers run: the autoscaler cannot probe, so it holds the
/// replicas — for well over the stabilization window, which with a readable, empty broker would
/// have scaled the pool to 0 — and says so (ScalingActive=False/BrokerUnreachable), with no
/// Deployment write. Redis comes back (empty: no persistence); ScalingActive turns True again, the
/// pool scales to 0 from fresh observations, and tasks enqueued after the restart scale it up and
/// are consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_holds_replicas_and_scaling_recovers_after_restart() {
    let Some(stack) = start("the double's request log and the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    let replicas_seen = record_replicas(&stack, "outage");
    let autoscaling = json!({"minReplicas": 0, "maxReplicas": 4, "scaleDownStabilizationSeconds": 5});
    stack.apply_yaml(&pool_yaml("outage", 2, autoscaling, false)).await.expect("pool applies");
    eventually("the pool at 0 replicas", || async { (replicas(&stack, "outage").await == Some(0)).then_some(()) })
        .await;

    let tasks: Vec<(&str, Value, &str)> = (0..8).map(|i| ("celery_example.add", json!([i, 1]), "emails")).collect();
    let burst = prepare_bursts(&stack, &[tasks]).await.pop().unwrap();
    push(&stack, &burst).await;
    eventually("4 replicas", || async { (replicas_seen.last() == Some(4)).then_some(()) }).await;
    wait_results(&stack, &burst.ids).await;

    // Kill Redis while the window still remembers the demand for 4.
    let redis = stack.redis().expect("local Redis");
    let info = redis.cli(&["INFO", "server"]).unwrap();
    let pid = info.lines().find_map(|l| l.trim().strip_prefix("process_id:")).unwrap().trim().to_string();
    let status = std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(status.success());
    let killed_at = Instant::now();
    eventually("Redis to be gone", || async { redis.cli(&["PING"]).is_err().then_some(()) }).await;
    let condition_down = eventually("ScalingActive=False/BrokerUnreachable", || async {
        let c = condition(&stack, "outage", "ScalingActive").await?;
        (c.0 == "False" && c.1 == "BrokerUnreachable").then_some(c)
    })
    .await;
    // From the first failed poll on, nothing may change. What is held is whatever the last good
    // poll left (4, unless the window ran out before the kill on a very slow machine).
    stack.server().unwrap().clear_requests();
    let held = replicas_seen.last().unwrap();
    let changes_at = replicas_seen.values().len();
    let polls_at_hold = polls(&stack).await;
    // Well past the 5 s window: 10 polls at 1 s. A readable, empty broker would have meant 0.
    eventually("10 polls during the outage", || async { (polls(&stack).await >= polls_at_hold + 10).then_some(()) })
        .await;
    let held_for = killed_at.elapsed();
    let outage_polls = polls(&stack).await - polls_at_hold;
    let outage_status_writes = autoscaler_writes(&stack, "workerpools", Some("status"));
    let condition_late = condition(&stack, "outage", "ScalingActive").await.unwrap();
    assert!(held > 0, "the pool had scaled to 0 before the outage: {:?}", replicas_seen.values());
    assert_eq!(replicas_seen.values().len(), changes_at, "replicas changed during the outage");
    assert_eq!(replicas(&stack, "outage").await, Some(held), "replicas held during the outage");
    assert_eq!(autoscaler_writes(&stack, "deployments", None), 0, "no Deployment write during the outage");
    assert_eq!(pool_object(&stack, "outage").await["status"]["desiredReplicas"], held);
    assert_eq!(worker_pods(&stack, "outage").await.len(), held as usize, "the workers stay up while Redis is away");
    assert_eq!((condition_late.0.as_str(), condition_late.1.as_str()), ("False", "BrokerUnreachable"));
    let desired = metric(&stack, "celery_operator_pool_desired_replicas", &[("workerpool", "outage")]).await;
    assert_eq!(desired, f64::from(held), "the desired-replicas gauge holds too");
    assert!(!condition_down.2.contains(&stack.broker_password()), "the condition leaks the password");

    // Redis back on the same port with the same config (and no data).
    let _restarted = RestartedRedis::start(redis);
    eventually("Redis to answer again", || async { redis.cli(&["PING"]).ok().filter(|o| o.contains("PONG")) }).await;
    let back_at = Instant::now();
    eventually("ScalingActive=True again", || async {
        let c = condition(&stack, "outage", "ScalingActive").await?;
        (c.0 == "True").then_some(())
    })
    .await;
    let recovered_in = back_at.elapsed();
    eventually("the pool to scale to 0 from fresh observations", || async {
        (replicas(&stack, "outage").await == Some(0)).then_some(())
    })
    .await;
    // Workers still in their warm shutdown would take the tasks before the next poll and no
    // scale-up would be needed: wait until the pool's pods are gone, so only a scale-up can run them.
    eventually("the scaled-in workers to be gone", || async {
        stack.pods(&worker_selector("outage")).await.ok().filter(|p| p.is_empty()).map(|_| ())
    })
    .await;
    let tasks: Vec<(&str, Value, &str)> = (0..4).map(|i| ("celery_example.add", json!([i, 2]), "emails")).collect();
    let ids = stack.send_tasks(&tasks).await.unwrap();
    let results = wait_results(&stack, &ids).await;
    let sums: Vec<Value> = results.iter().map(|r| r.result.clone()).collect();
    assert_eq!(sums, vec![json!(2), json!(3), json!(4), json!(5)]);
    let values = replicas_seen.values();
    eprintln!(
        "outage: replicas {values:?}; held at {held} for {} after the kill ({outage_polls} polls after the first \
         failure) with {outage_status_writes} status writes by the autoscaler in those polls; condition message \
         first {:?}, then {:?}; ScalingActive True {} after Redis answered",
        secs(held_for),
        condition_down.2,
        condition_late.2,
        secs(recovered_in)
    );
    let after_restart = &values[changes_at - 1..];
    assert!(steps(after_restart).0 >= 1 && after_restart.contains(&0), "scaled down then up again: {values:?}");
}

/// A redis-server started by this test on the stack's Redis port and config after the harness's
/// one was killed (the stack only lends its `RedisServer` by shared reference, so it cannot
/// restart it). Killed when dropped, and also when the test binary dies: a `sh` holds the server
/// and kills it when its stdin (this process's pipe) closes.
struct RestartedRedis {
    sh: std::process::Child,
}

impl RestartedRedis {
    fn start(redis: &e2e_harness::RedisServer) -> Self {
        let conf = redis.dir().join("redis.conf");
        let sh = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"redis-server "$0" >/dev/null 2>&1 & p=$!; read -r _; kill -KILL "$p"; wait "$p""#)
            .arg(conf)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        RestartedRedis { sh }
    }
}

impl Drop for RestartedRedis {
    fn drop(&mut self) {
        drop(self.sh.stdin.take());
        let _ = self.sh.wait();
    }
}
