//! The autoscaler's real-Celery scenarios on RabbitMQ (issue 11, item 5 and "Must show"): the
//! operator binary against the control-plane double, whose pod runner runs real Celery workers of
//! the example app, and a private rabbitmq-server (free ports, temp dir; one node per test binary,
//! a vhost per scenario, and a node of its own for the outage). Each scenario runs on a classic
//! queue and on a quorum queue (`CELERY_EXAMPLE_QUORUM_QUEUES`: a topic exchange of the queue's
//! name, so Celery ≥ 5.5 sends countdown tasks and retries through native delayed delivery) where
//! the queue type changes what the broker shows. Results go to the stack's Redis (db 1); every
//! Deployment `spec.replicas` is recorded by a watch, and the workers' logs (kept by the runner)
//! tell which task ran where and how often.
//!
//! What the autoscaler can read on RabbitMQ (DESIGN §6b): ready counts in real time (passive
//! declare), unacked counts from the management API (lagging by its statistics interval, 0.5 s on
//! the harness's node), worker heartbeats from the `celeryev` exchange, and native delayed
//! delivery's level queues. It cannot read a queued message's ETA without consuming it.
//!
//! Skipped (with a NOTICE) against a real cluster, without the Celery venv, or without
//! rabbitmq-server.

mod common;

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use celery_e2e::stack::Stack;
use celery_operator::autoscale::scaler::FIELD_MANAGER;
use common::e2e::*;
use e2e_harness::RabbitServer;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The two queue types every scenario runs on, as `(suffix, quorum)`.
const QUEUE_TYPES: [(&str, bool); 2] = [("classic", false), ("quorum", true)];

// ------------------------------------------------------------------------------------ helpers

/// One RabbitMQ-backed pool of a scenario: its vhost, TaskQueue and WorkerPool all named `name`,
/// consuming the queue `name`.
struct RabbitPool {
    name: String,
    quorum: bool,
    /// The AMQP URL of the vhost (a secret in real life; here guest/guest on loopback).
    url: String,
    management: String,
}

impl RabbitPool {
    /// Creates the vhost (`prepare` runs then, before the operator looks at it), then the Secret,
    /// the TaskQueue and an autoscaled WorkerPool of the example app on queue `name`: `threads`
    /// pool of `concurrency`, 1 s polls, `autoscaling` as given; `acks_late` sets the app's
    /// `CELERY_ACKS_LATE` and `autoscaling.acksLate`.
    async fn create(
        stack: &Stack,
        rabbit: &RabbitServer,
        name: &str,
        quorum: bool,
        concurrency: u32,
        mut autoscaling: Value,
        acks_late: bool,
    ) -> Self {
        rabbit.add_vhost(name).unwrap();
        let pool = Self {
            name: name.to_string(),
            quorum,
            url: rabbit.amqp_url_for_vhost(name),
            management: rabbit.management_url(),
        };
        pool.apply(stack, concurrency, &mut autoscaling, acks_late).await;
        pool
    }

    async fn apply(&self, stack: &Stack, concurrency: u32, autoscaling: &mut Value, acks_late: bool) {
        let name = &self.name;
        autoscaling["acksLate"] = json!(acks_late);
        autoscaling["pollIntervalSeconds"] = json!(1);
        let mut env = vec![];
        if acks_late {
            env.push(json!({"name": "CELERY_ACKS_LATE", "value": "1"}));
        }
        if self.quorum {
            env.push(json!({"name": "CELERY_EXAMPLE_QUORUM_QUEUES", "value": name}));
            env.push(json!({"name": "CELERY_EXAMPLE_DEFAULT_QUEUE", "value": name}));
        }
        let secret = format!("rabbit-{name}");
        let docs = [
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret},
                   "stringData": {"url": self.url, "management": self.management}}),
            json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue", "metadata": {"name": name},
                   "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": secret, "key": "url"}},
                                       "managementUrlFrom": {"secretKeyRef": {"name": secret, "key": "management"}}}}}),
            json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": name},
                   "spec": {"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
                            "queues": [name], "concurrency": concurrency, "pool": "threads",
                            "autoscaling": autoscaling, "template": {"env": env}}}),
        ];
        for doc in docs {
            stack.apply_yaml(&doc.to_string()).await.expect("the pool applies");
        }
    }

    /// Environment of a Celery client of this pool's vhost and queue type.
    fn env(&self) -> Vec<(&str, &str)> {
        let quorum = if self.quorum { self.name.as_str() } else { "" };
        vec![
            ("CELERY_BROKER_URL", self.url.as_str()),
            ("CELERY_EXAMPLE_QUORUM_QUEUES", quorum),
            ("CELERY_EXAMPLE_DEFAULT_QUEUE", quorum),
        ]
    }

    /// Sends `(task name, args, countdown)` to the pool's queue with publisher confirms; returns
    /// the ids and the Unix times just before the first and after the last send.
    async fn send(&self, stack: &Stack, tasks: &[(&str, Value, Option<u64>)]) -> Sent {
        const SEND: &str = r#"
import json, os, time
from celery_example.app import app
app.conf.broker_transport_options = {"confirm_publish": True}
queue = os.environ["E2E_QUEUE"]
tasks = json.loads(os.environ["E2E_TASKS"])
with app.producer_or_acquire() as producer:
    before = time.time()
    ids = [app.send_task(name, args=args, queue=queue, countdown=countdown, producer=producer).id
           for name, args, countdown in tasks]
    after = time.time()
print(json.dumps({"ids": ids, "before": before, "after": after}))
"#;
        let docs: Vec<Value> = tasks.iter().map(|(name, args, countdown)| json!([name, args, countdown])).collect();
        let docs = Value::Array(docs).to_string();
        let mut env = self.env();
        env.extend([("E2E_QUEUE", self.name.as_str()), ("E2E_TASKS", docs.as_str())]);
        let out = stack.python(SEND, &env).await.unwrap();
        serde_json::from_str(out.trim()).unwrap()
    }

    fn label(&self) -> &'static str {
        if self.quorum { "quorum" } else { "classic" }
    }
}

/// Declares native delayed delivery on the pool's vhost and binds its quorum queue to it, exactly
/// as a Celery worker's `DelayedDelivery` bootstep does on start-up — what a vhost where the
/// pool's workers once ran holds, so a pool at zero can be sent countdown tasks.
async fn declare_native_delayed_delivery(stack: &Stack, pool: &RabbitPool) {
    const DECLARE: &str = r#"
import os
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange, declare_native_delayed_delivery_exchanges_and_queues)
from celery_example.app import app
with app.connection_for_write() as connection:
    declare_native_delayed_delivery_exchanges_and_queues(connection, "quorum")
    queue = app.amqp.queues[os.environ["E2E_QUEUE"]]
    queue.bind(connection).declare()
    bind_queue_to_native_delayed_delivery_exchange(connection, queue)
"#;
    let mut env = pool.env();
    env.push(("E2E_QUEUE", pool.name.as_str()));
    stack.python(DECLARE, &env).await.unwrap();
}

// ----------------------------------------------------------------------------------- scenarios

/// Zero-loss scale cycles on RabbitMQ, classic and quorum queue: a pool with `acks_late` goes
/// through [`CYCLES`] up/down cycles between 0 and up to 3 replicas (stabilization 1 s), a burst of
/// 6 tasks of mixed length sent as soon as the previous one has scaled the pool back to 0, so new
/// workers start while old ones still shut down. Every task has a SUCCESS result, and the logs of
/// every worker pod that ran show each task executed exactly once (a redelivery of a message a
/// stopping worker had reserved but not started is counted, printed and allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_acks_late_loses_no_task_over_scale_cycles() {
    const CYCLES: usize = 5;
    let Some(stack) = start("the pod runner and the double's request log").await else { return };
    let Some(rabbit) = rabbit_node() else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    for (suffix, quorum) in QUEUE_TYPES {
        let name = format!("cycles-{suffix}");
        let replicas_seen = record_replicas(&stack, &name);
        let autoscaling = json!({"minReplicas": 0, "maxReplicas": 3, "scaleDownStabilizationSeconds": 1});
        let pool = RabbitPool::create(&stack, rabbit, &name, quorum, 2, autoscaling, true).await;
        eventually("the pool at 0", || async { (replicas(&stack, &name).await == Some(0)).then_some(()) }).await;

        let durations = [0.05, 0.2, 0.5, 0.1, 0.8, 0.2];
        let burst: Vec<(&str, Value, Option<u64>)> =
            durations.iter().map(|d| ("celery_example.sleep", json!([d]), None)).collect();
        let started = Instant::now();
        let (mut sent, mut absorbed) = (Vec::new(), 0);
        // Spare bursts: one sent while the last cycle's workers still run can be done by them
        // before the next poll, without a cycle.
        while steps(&replicas_seen.values()).0 < CYCLES && sent.len() < CYCLES + 10 {
            let mark = replicas_seen.values().len();
            let ids = pool.send(&stack, &burst).await.ids;
            let scaled = eventually(&format!("{name} burst {}: a scale-up, or its tasks done", sent.len()), || async {
                if replicas_seen.values().len() > mark {
                    return Some(true);
                }
                all_succeeded(&stack, &ids).await.then_some(false)
            })
            .await;
            absorbed += usize::from(!scaled);
            sent.push(ids);
            eventually(&format!("{name}: back to 0"), || async { (replicas_seen.last() == Some(0)).then_some(()) })
                .await;
        }
        let took = started.elapsed();
        eventually("the last workers to exit", || async { worker_pods(&stack, &name).await.is_empty().then_some(()) })
            .await;

        let ids: Vec<String> = sent.iter().flatten().cloned().collect();
        let results = wait_results(&stack, &ids).await;
        assert_eq!(results.len(), sent.len() * durations.len());
        let runs = runs_by_task(&stack, &name);
        let never_ran: Vec<&String> = ids.iter().filter(|id| runs.get(*id).is_none_or(|r| r.succeeded == 0)).collect();
        let twice: Vec<(&String, &Runs)> =
            ids.iter().filter_map(|id| Some((id, runs.get(id)?))).filter(|(_, r)| r.succeeded > 1).collect();
        let redelivered: Vec<(&String, &Runs)> =
            ids.iter().filter_map(|id| Some((id, runs.get(id)?))).filter(|(_, r)| r.received > 1).collect();
        let values = replicas_seen.values();
        let (ups, downs) = steps(&values);
        eprintln!(
            "{} cycles: {ups} up and {downs} down in {:.1}s, {} bursts ({absorbed} done without a scale-up), {} \
             tasks, {} worker pods; replicas {values:?}; lost {}; executed twice {}; delivered more than once {}",
            pool.label(),
            took.as_secs_f64(),
            sent.len(),
            ids.len(),
            worker_logs(&stack, &name).len(),
            never_ran.len(),
            twice.len(),
            redelivered.len()
        );
        for (id, r) in &redelivered {
            eprintln!("  redelivered {id}: received on {:?}, run on {:?}", r.received_on, r.pods);
        }
        assert!(ups >= CYCLES && downs >= CYCLES, "{name}: {values:?}");
        assert!(never_ran.is_empty(), "{name}: tasks with a result but no execution in any worker log: {never_ran:?}");
        assert!(twice.is_empty(), "{name}: tasks executed more than once: {twice:?}");
    }
}

/// Idle-first scale-in on RabbitMQ, classic and quorum queue: acks_late, concurrency 1, prefetch
/// 1. Three `hold` tasks scale the pool from 1 to 3, one per worker. Two are released; the one
/// kept busy is on the newest pod (the one the ReplicaSet controller would remove first without
/// deletion costs). The autoscaler marks it with pod-deletion-cost 1 (from its heartbeats) and the
/// idle ones with 0 before it scales in to 1: the idle pods go, the busy one never terminates, and
/// its task completes there, in the same process, delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_scale_in_removes_idle_workers_and_the_busy_one_finishes() {
    let Some(stack) = start("the pod runner and the double's request log").await else { return };
    let Some(rabbit) = rabbit_node() else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    for (suffix, quorum) in QUEUE_TYPES {
        let name = format!("keep-{suffix}");
        let name = name.as_str();
        let replicas_seen = record_replicas(&stack, name);
        let pods_seen = record_pods(&stack, name);
        let autoscaling = json!({"minReplicas": 1, "maxReplicas": 3, "targetPerReplica": 1,
            "scaleDownStabilizationSeconds": 5});
        let pool = RabbitPool::create(&stack, rabbit, name, quorum, 1, autoscaling, true).await;
        eventually("the pool at 1 replica", || async { (replicas(&stack, name).await == Some(1)).then_some(()) }).await;

        let tag = format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
        let names: Vec<String> = ["a", "b", "c"].iter().map(|n| format!("{tag}-{n}")).collect();
        let tasks: Vec<(&str, Value, Option<u64>)> =
            names.iter().map(|n| ("celery_example.hold", json!([n, 600]), None)).collect();
        let ids = pool.send(&stack, &tasks).await.ids;
        let started = wait_started(&stack, &ids).await;
        let host_of = |i: usize| started[i].1["hostname"].as_str().unwrap().to_string();
        let hosts: BTreeSet<String> = (0..3).map(host_of).collect();
        assert_eq!(hosts.len(), 3, "{name}: each hold task runs on its own worker: {started:?}");

        let pods = worker_pods(&stack, name).await;
        assert_eq!(pods.len(), 3);
        let rank = |p: &Pod| {
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            (created, p.metadata.name.clone().unwrap_or_default())
        };
        let newest = pods.iter().max_by_key(|p| rank(p)).unwrap();
        let busy_pod = newest.metadata.name.clone().unwrap();
        let busy_uid = newest.metadata.uid.clone();
        let busy = (0..3).find(|&i| pod_of(name, &host_of(i)) == busy_pod).expect("a hold task on the newest pod");
        let busy_pid = started[busy].1["pid"].clone();
        let idle: Vec<usize> = (0..3).filter(|&i| i != busy).collect();
        let idle_pods: BTreeSet<String> = idle.iter().map(|&i| pod_of(name, &host_of(i)).to_string()).collect();

        stack.server().unwrap().clear_requests();
        release(&stack, &idle.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>()).await;
        let idle_ids: Vec<String> = idle.iter().map(|&i| ids[i].clone()).collect();
        wait_results(&stack, &idle_ids).await;
        eventually("the scale-in to 1", || async { (replicas(&stack, name).await == Some(1)).then_some(()) }).await;
        let left = eventually("the idle pods to go", || async {
            let pods = worker_pods(&stack, name).await;
            (pods.len() == 1).then(|| pods.into_iter().next().unwrap())
        })
        .await;

        let history = pods_seen.values();
        let cost_of =
            |pod: &str| history.iter().rev().find(|(n, c, _)| n == pod && c.is_some()).and_then(|s| s.1.clone());
        let values = replicas_seen.values();
        eprintln!(
            "{} scale-in: replicas {values:?}; busy pod {busy_pod} (newest), idle pods {idle_pods:?}; costs: busy \
             {:?}, idle {:?}",
            pool.label(),
            cost_of(&busy_pod),
            idle_pods.iter().map(|p| cost_of(p)).collect::<Vec<_>>()
        );
        // Up to 3 (in one step, or two when a poll fell between the three publishes), then only down.
        let top = values.iter().position(|&r| r == 3).unwrap_or_else(|| panic!("{name}: never at 3: {values:?}"));
        assert_eq!(steps(&values[top..]).0, 0, "{name}: only down after reaching 3: {values:?}");
        assert_eq!(values.last(), Some(&1), "{name}: {values:?}");
        assert_eq!(left.metadata.name.as_deref(), Some(busy_pod.as_str()), "{name}: the busy pod must survive");
        assert_eq!(left.metadata.uid, busy_uid, "the same pod object");
        assert!(left.metadata.deletion_timestamp.is_none());
        assert!(
            !history.iter().any(|(n, _, deleting)| *n == busy_pod && *deleting),
            "{name}: the busy pod was never asked to terminate"
        );
        assert_eq!(cost_of(&busy_pod).as_deref(), Some("1"), "{name}: busy pod's deletion cost");
        for pod in &idle_pods {
            assert_eq!(cost_of(pod).as_deref(), Some("0"), "{name}: idle pod {pod}'s deletion cost");
            assert!(history.iter().any(|(n, _, deleting)| n == pod && *deleting), "idle pod {pod} was removed");
        }
        let writes = stack.server().unwrap().writes();
        let first_scale = writes.iter().position(|w| {
            w.resource == "deployments" && w.field_manager.as_deref() == Some(FIELD_MANAGER) && w.is_successful_write()
        });
        let first_cost = writes.iter().position(|w| w.resource == "pods" && w.verb.as_str() == "patch");
        assert!(
            matches!((first_cost, first_scale), (Some(c), Some(s)) if c < s),
            "{name}: deletion costs must be set before the Deployment is scaled in: {writes:?}"
        );

        release(&stack, &[names[busy].as_str()]).await;
        let done = wait_results(&stack, &ids[busy..=busy]).await;
        let r = &done[0];
        assert_eq!(r.result["released"], true, "the hold task ran to its release: {r:?}");
        assert_eq!(r.hostname(), Some(format!("{name}@{busy_pod}").as_str()));
        assert_eq!(r.result["pid"], busy_pid, "finished by the process that started it");
        let run = runs_by_task(&stack, name).get(&ids[busy]).cloned().unwrap_or_default();
        assert_eq!((run.received, run.succeeded), (1, 1), "{name}: delivered and run exactly once: {run:?}");
        assert_eq!(run.pods, BTreeSet::from([busy_pod.clone()]));
    }
}

/// The RabbitMQ node of the stack's pool is stopped (`rabbitmqctl stop_app`: listeners and
/// management API down, the node's data kept) while two real workers each run a `hold` task and
/// two more wait (acks_late, concurrency 1, prefetch 1, targetPerReplica 1, maxReplicas 2). The
/// tasks are released, and the running ones finish during the outage (their results go to
/// Redis), so a readable broker would soon scale the pool down; the autoscaler cannot probe, so
/// it holds the replicas for three stabilization windows, says so (ScalingActive=False,
/// BrokerUnreachable) and writes no Deployment. The node is started again: ScalingActive turns
/// True, the pool scales to 0 from fresh observations, and tasks sent after the restart scale it
/// up and run. A node of its own: the shared one must not go away under other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_an_outage_holds_replicas_and_scaling_recovers_after_restart() {
    const WINDOW: u64 = 5;
    let Some(stack) = start("the pod runner and the double's request log").await else { return };
    let rabbit = match tokio::task::spawn_blocking(RabbitServer::start).await.unwrap() {
        Ok(rabbit) => rabbit,
        Err(e) => {
            eprintln!("NOTICE: skipping: no private RabbitMQ node: {e}");
            return;
        }
    };
    let _log = LogOnPanic(stack.operator_log_path());
    let name = "outage";
    let replicas_seen = record_replicas(&stack, name);
    let autoscaling = json!({"minReplicas": 0, "maxReplicas": 2, "targetPerReplica": 1,
        "scaleDownStabilizationSeconds": WINDOW});
    let pool = RabbitPool::create(&stack, &rabbit, name, false, 1, autoscaling, true).await;
    eventually("the pool at 0", || async { (replicas(&stack, name).await == Some(0)).then_some(()) }).await;

    // Two tasks running and two waiting (ready: counted in real time): demand at least 2 until
    // the outage, whatever the management statistics lag. With early acks a worker would take a
    // waiting task into its buffer as soon as it acked the running one.
    let tag = format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
    let names: Vec<String> = (0..4).map(|i| format!("{tag}-{i}")).collect();
    let tasks: Vec<(&str, Value, Option<u64>)> =
        names.iter().map(|n| ("celery_example.hold", json!([n, 600]), None)).collect();
    let ids = pool.send(&stack, &tasks).await.ids;
    let running = eventually("two tasks running on 2 replicas", || async {
        let states = states(&stack, &ids).await;
        let running: Vec<String> = ids
            .iter()
            .zip(&states)
            .filter(|(_, s)| s.as_deref() == Some("STARTED"))
            .map(|(id, _)| id.clone())
            .collect();
        (running.len() == 2 && replicas_seen.last() == Some(2)).then_some(running)
    })
    .await;

    let ctl = |args: &'static [&'static str]| {
        let rabbit = &rabbit;
        move || rabbit.ctl(args).map(|_| ()).unwrap()
    };
    tokio::task::block_in_place(ctl(&["stop_app"]));
    let stopped_at = Instant::now();
    let condition_down = eventually("ScalingActive=False/BrokerUnreachable", || async {
        let c = condition(&stack, name, "ScalingActive").await?;
        (c.0 == "False" && c.1 == "BrokerUnreachable").then_some(c)
    })
    .await;
    stack.server().unwrap().clear_requests();
    let held = replicas_seen.last().unwrap();
    let changes_at = replicas_seen.values().len();
    // The work is done while the broker is away (the late acks fail; RabbitMQ requeued the
    // messages when the connections closed, so the tasks run once more after the restart).
    release(&stack, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
    wait_results(&stack, &running).await;
    let polls_at_hold = polls(&stack).await;
    eventually("three stabilization windows of polls during the outage", || async {
        (polls(&stack).await >= polls_at_hold + 3 * WINDOW).then_some(())
    })
    .await;
    let held_for = stopped_at.elapsed();
    let condition_late = condition(&stack, name, "ScalingActive").await.unwrap();
    assert_eq!(held, 2, "{:?}", replicas_seen.values());
    assert_eq!(replicas_seen.values().len(), changes_at, "replicas changed during the outage");
    assert_eq!(replicas(&stack, name).await, Some(held), "replicas held during the outage");
    assert_eq!(autoscaler_writes(&stack, "deployments", None), 0, "no Deployment write during the outage");
    assert_eq!(pool_status(&stack, name).await["desiredReplicas"], held);
    assert_eq!(worker_pods(&stack, name).await.len(), held as usize, "the workers stay up during the outage");
    assert_eq!((condition_late.0.as_str(), condition_late.1.as_str()), ("False", "BrokerUnreachable"));
    let desired = stack.metric("celery_operator_pool_desired_replicas", &[("workerpool", name)]).await;
    assert_eq!(desired, Some(f64::from(held)), "the desired-replicas gauge holds too");
    for (what, text) in [("condition", &condition_down.2), ("log", &stack.operator_log())] {
        assert!(!text.contains("guest:guest"), "the operator's {what} leaks the broker credentials");
    }

    tokio::task::block_in_place(ctl(&["start_app"]));
    let back_at = Instant::now();
    eventually("ScalingActive=True again", || async {
        condition(&stack, name, "ScalingActive").await.filter(|c| c.0 == "True").map(|_| ())
    })
    .await;
    let recovered_in = back_at.elapsed();
    eventually("the pool to scale to 0 from fresh observations", || async {
        (replicas(&stack, name).await == Some(0)).then_some(())
    })
    .await;
    eventually("the scaled-in workers to be gone", || async {
        worker_pods(&stack, name).await.is_empty().then_some(())
    })
    .await;
    // None of the four held tasks was lost.
    wait_results(&stack, &ids).await;
    let tasks: Vec<(&str, Value, Option<u64>)> = (0..4).map(|i| ("celery_example.add", json!([i, 2]), None)).collect();
    let ids = pool.send(&stack, &tasks).await.ids;
    let sums: Vec<Value> = wait_results(&stack, &ids).await.into_iter().map(|r| r.result).collect();
    assert_eq!(sums, vec![json!(2), json!(3), json!(4), json!(5)]);
    let values = replicas_seen.values();
    eprintln!(
        "rabbitmq outage: replicas {values:?}; held at {held} for {:.1}s after stop_app; condition {:?}; \
         ScalingActive True {:.1}s after start_app",
        held_for.as_secs_f64(),
        condition_late.2,
        recovered_in.as_secs_f64()
    );
    let after_restart = &values[changes_at - 1..];
    assert!(steps(after_restart).0 >= 1 && after_restart.contains(&0), "scaled down then up again: {values:?}");
}

/// Eight tasks with `countdown=20` to a pool at zero (targetPerReplica 4, `leadTimeSeconds` 10):
/// the pool is sized for them — ceil(8 / 4) = 2 replicas — by the time they come due, and they run
/// after their ETA and within `targetLatencySeconds` of it.
///
/// What is true on each queue type with Celery/kombu 5.7 (checked in `celery/app/base.py`,
/// `send_task`: native delayed delivery is used when the app declares any quorum queue and the
/// target exchange is not direct; there is no `broker_native_delayed_delivery` switch):
/// - **quorum** (topic exchange): the tasks wait in the level queues, invisible in the target
///   queue; the operator counts each level at its upper bound (level 4 for the first 16 s: due
///   within 32 s, then level 2: within 8 s), so the pool does not wake on arrival and is sized
///   once they come due within the lead time — by their due time.
/// - **classic** (Celery's default direct exchange): the tasks are published to the queue at
///   once, and RabbitMQ shows no ETA without consuming them: they are ready messages, so they wake
///   the pool on arrival, and a worker holds them (unacked) until due. Sized by the due time too,
///   but early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_tasks_due_in_twenty_seconds_are_sized_for_by_their_due_time() {
    const LEAD: f64 = 10.0;
    const COUNTDOWN: u64 = 20;
    const TARGET_LATENCY: f64 = 10.0;
    let Some(stack) = start("the pod runner and the double's request log").await else { return };
    let Some(rabbit) = rabbit_node() else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    for (suffix, quorum) in QUEUE_TYPES {
        let name = format!("soon-{suffix}");
        let name = name.as_str();
        rabbit.add_vhost(name).unwrap();
        let pool = RabbitPool {
            name: name.to_string(),
            quorum,
            url: rabbit.amqp_url_for_vhost(name),
            management: rabbit.management_url(),
        };
        if quorum {
            declare_native_delayed_delivery(&stack, &pool).await;
        }
        let mut autoscaling = json!({"minReplicas": 0, "maxReplicas": 10, "targetPerReplica": 4,
            "scaleDownStabilizationSeconds": 5, "leadTimeSeconds": LEAD as u64,
            "targetLatencySeconds": TARGET_LATENCY as u64});
        pool.apply(&stack, 2, &mut autoscaling, false).await;
        let replicas = record_replicas(&stack, name);
        eventually("the autoscaler to decide for the pool", || async {
            (pool_status(&stack, name).await["desiredReplicas"] == 0).then_some(())
        })
        .await;

        let tasks: Vec<(&str, Value, Option<u64>)> =
            (0..8).map(|_| ("celery_example.tick", json!([]), Some(COUNTDOWN))).collect();
        let sent = pool.send(&stack, &tasks).await;
        let (earliest_eta, latest_eta) = (sent.before + COUNTDOWN as f64, sent.after + COUNTDOWN as f64);
        if quorum {
            eventually("the tasks in the level queues, counted as scheduled", || async {
                let s = pool_status(&stack, name).await;
                (delayed_messages(&pool.management, name).await == Some(8) && s["scheduled"] == 8).then_some(())
            })
            .await;
        }
        let results = stack.wait_results(&sent.ids, DEADLINE).await.expect("the tasks run");

        let seen = replicas.all();
        let woke = seen.iter().find(|&&(_, r)| r > 0).map(|&(at, _)| at).expect("the pool scaled up");
        let sized = seen.iter().find(|&&(_, r)| r >= 2).map(|&(at, _)| at).expect("the pool reached 2 replicas");
        let worst = results.iter().filter_map(|r| r.result["at"].as_f64()).fold(f64::MIN, f64::max) - latest_eta;
        eprintln!(
            "{} countdown {COUNTDOWN}: woke {:.1}s and reached 2 replicas {:.1}s before the ETA; last task ran \
             {worst:.1}s after it; replicas {:?}",
            pool.label(),
            earliest_eta - woke,
            latest_eta - sized,
            seen.iter().map(|&(_, r)| r).collect::<Vec<_>>()
        );
        if quorum {
            // Not woken on arrival: only once the level bound is within the lead time (the bound
            // is an upper one, so never earlier than the lead time before the due time).
            assert!(
                woke >= earliest_eta - LEAD,
                "{name}: the pool woke {:.1}s before the tasks were due, more than the lead time: {seen:?}",
                earliest_eta - woke
            );
        } else {
            // Ready messages whose ETA RabbitMQ does not show: they wake the pool on arrival.
            assert!(woke < earliest_eta, "{name}: the pool woke only after the tasks were due: {seen:?}");
        }
        assert!(
            sized <= latest_eta,
            "{name}: the pool reached 2 replicas {:.1}s after the tasks were due: {seen:?}",
            sized - latest_eta
        );
        assert!(seen.iter().all(|&(_, r)| r <= 2), "{name}: more replicas than 8 tasks need: {seen:?}");
        for r in &results {
            assert_eq!(r.state, "SUCCESS", "{r:?}");
            let ran = r.result["at"].as_f64().expect("tick reports when it ran");
            assert!(ran >= earliest_eta, "{name}: a task ran {:.1}s before its ETA: {r:?}", earliest_eta - ran);
            assert!(
                ran - latest_eta <= TARGET_LATENCY,
                "{name}: a task ran {:.1}s after its ETA, more than targetLatencySeconds: {r:?}",
                ran - latest_eta
            );
        }
    }
}

/// Tasks failing with `autoretry_for` + `retry_backoff` (the example app's `flaky`: retries after
/// 120 s, 240 s, …), classic and quorum queue: the pool scales up for their first run, and once
/// every one waits for its retry it shrinks to one replica and stays there for three
/// stabilization windows while they back off. On the quorum queue (its app's default queue, see
/// `CELERY_EXAMPLE_DEFAULT_QUEUE`) the retries wait in native delayed delivery's level queues and
/// the pool stays at exactly one replica. On the classic queue the workers hold them (unacked
/// beyond what their heartbeats say they run and prefetch), and what is true is weaker: the
/// scale-in gives the stopped workers' retries back to the queue as ready messages, whose ETA
/// RabbitMQ does not show, so a poll before the remaining worker takes them can size one more
/// replica for a window; the pool never exceeds the first run's size and returns to one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_tasks_backing_off_between_retries_keep_the_pool_small() {
    const WINDOW: u64 = 5;
    let Some(stack) = start("the pod runner and the double's request log").await else { return };
    let Some(rabbit) = rabbit_node() else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    for (suffix, quorum) in QUEUE_TYPES {
        let name = format!("retrying-{suffix}");
        let name = name.as_str();
        let replicas = record_replicas(&stack, name);
        let autoscaling = json!({"minReplicas": 0, "maxReplicas": 10, "targetPerReplica": 4,
            "scaleDownStabilizationSeconds": WINDOW, "leadTimeSeconds": 5});
        let pool = RabbitPool::create(&stack, rabbit, name, quorum, 2, autoscaling, false).await;
        eventually("the pool at 0", || async { (replicas.last() == Some(0)).then_some(()) }).await;

        let tasks: Vec<(&str, Value, Option<u64>)> =
            (0..12).map(|_| ("celery_example.flaky", json!([]), None)).collect();
        let sent = pool.send(&stack, &tasks).await;
        eventually("every task to fail once and wait for its retry", || async {
            states(&stack, &sent.ids).await.iter().all(|s| s.as_deref() == Some("RETRY")).then_some(())
        })
        .await;
        let first_retry_due = sent.before + 120.0;
        eventually("the pool to shrink to one replica while the tasks back off", || async {
            (replicas.last() == Some(1)).then_some(())
        })
        .await;
        let settled = replicas.all().len();

        stabilization_windows(&stack, 3, WINDOW).await;
        let values = replicas.values();
        let after = &values[settled - 1..];
        let status = pool_status(&stack, name).await;
        let delayed = delayed_messages(&pool.management, name).await;
        eprintln!(
            "{} retries: replicas {values:?}; status rule {} scheduled {} due {}; in level queues {delayed:?}",
            pool.label(),
            status["scalingRule"],
            status["scheduled"],
            status["due"]
        );
        let peak = values[..settled].iter().copied().max().unwrap_or_default();
        if quorum {
            assert!(after.iter().all(|&r| r == 1), "{name}: the pool left one replica: {values:?}");
            assert_eq!(status["scalingRule"], "Scheduled", "{name}: {status}");
        } else {
            // A scale-in gives the held retries of the stopped workers back to the queue, where
            // RabbitMQ shows them as ready (no ETA) until the remaining worker takes them: a poll
            // in between sizes for them as waiting, and the pool returns to one replica a window
            // later. Never more than the first run asked for.
            assert!(after.iter().all(|&r| r <= peak), "{name}: more than the first run: {values:?}");
            eventually("the pool back at one replica, holding the retries", || async {
                let s = pool_status(&stack, name).await;
                (replicas.last() == Some(1) && s["scalingRule"] == "Scheduled").then_some(())
            })
            .await;
        }
        assert!(
            unix_now() < first_retry_due - 5.0,
            "inconclusive: the retries came due (within the lead time) before the observation ended"
        );
        assert!(values.iter().any(|&r| r >= 2), "{name}: the first run scaled the pool up: {values:?}");
        if quorum {
            assert_eq!(delayed, Some(12), "{name}: the retries wait in native delayed delivery");
            assert_eq!(status["scheduled"], 12, "{name}: {status}");
        }
        // No retry ran early, and none was lost: each one is still waiting.
        let now = states(&stack, &sent.ids).await;
        assert!(now.iter().all(|s| s.as_deref() == Some("RETRY")), "{name}: {now:?}");
    }
}
