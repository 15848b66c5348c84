//! Scheduled tasks through the operator with real Celery on Redis and on a private RabbitMQ node
//! (issue 11, "Must show"): tasks
//! sent with `countdown`, and retries of `autoretry_for` + `retry_backoff`, are delivered to a
//! worker at once and held by it until due (on Redis in kombu's `unacked` hash). The autoscaler
//! must size a pool for the work that is due, not for every message the broker holds: a pool
//! holding only future tasks keeps `max(minReplicas, 1)` replicas, and tasks coming due are sized
//! for by the time they are due (`leadTimeSeconds`).
//!
//! The operator binary runs against the control-plane double, whose pod runner runs real Celery
//! workers of the example app (`worker-image/src/celery_example`) from the harness venv, and a
//! real password-protected Redis. Every Deployment `spec.replicas` value is recorded by a watch.
//! Skipped (with a NOTICE) against a real cluster and when the Celery venv cannot be built.

mod common;

use std::collections::BTreeSet;

use celery_e2e::stack::Stack;
use common::e2e::*;
use kube::api::{Api, DynamicObject};
use serde_json::{Value, json};

/// `scaleDownStabilizationSeconds` of the pools: short, so three windows pass quickly.
const STABILIZATION: u64 = 5;

// ------------------------------------------------------------------------------------ helpers

/// An autoscaled WorkerPool of the example app on the `emails` TaskQueue: `threads` pool of
/// concurrency 2, targetPerReplica 4, minReplicas 0, maxReplicas 10, 1 s polls and a short
/// stabilization window; `extra` adds autoscaling fields.
fn pool_yaml(name: &str, extra: Value) -> String {
    let mut autoscaling = json!({
        "minReplicas": 0, "maxReplicas": 10, "targetPerReplica": 4, "pollIntervalSeconds": 1,
        "scaleDownStabilizationSeconds": STABILIZATION,
    });
    for (k, v) in extra.as_object().unwrap() {
        autoscaling[k] = v.clone();
    }
    json!({
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": name},
        "spec": {"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
            "queues": ["emails"], "concurrency": 2, "pool": "threads", "autoscaling": autoscaling},
    })
    .to_string()
}

/// Lets three stabilization windows pass, counted by the operator's own polls (at least one per
/// second per window second) as well as by the clock.
async fn three_stabilization_windows(stack: &Stack) {
    stabilization_windows(stack, 3, STABILIZATION).await;
}

/// Sends `(task name, args, countdown)` to the `emails` queue; returns the ids and the Unix times
/// just before the first and after the last send (each ETA lies between them plus its countdown).
const SEND_LATER: &str = r#"
import json, os, time
from celery_example.app import app
before = time.time()
ids = [app.send_task(name, args=args, queue="emails", countdown=countdown).id
       for name, args, countdown in json.loads(os.environ["E2E_TASKS"])]
print(json.dumps({"ids": ids, "before": before, "after": time.time()}))
"#;

async fn send_later(stack: &Stack, tasks: &[(&str, Value, Option<u64>)]) -> Sent {
    let docs: Vec<Value> = tasks.iter().map(|(name, args, countdown)| json!([name, args, countdown])).collect();
    let out = stack.python(SEND_LATER, &[("E2E_TASKS", &Value::Array(docs).to_string())]).await.unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

/// Task ids of the messages the broker holds for the `emails` queue: on its list, or in kombu's
/// `unacked` hash (delivered to a worker, not acknowledged).
async fn held_task_ids(stack: &Stack) -> BTreeSet<String> {
    let mut conn = redis_db(stack, 0).await;
    let listed: Vec<String> = redis::cmd("LRANGE").arg("emails").arg(0).arg(-1).query_async(&mut conn).await.unwrap();
    let unacked: Vec<String> = redis::cmd("HVALS").arg("unacked").query_async(&mut conn).await.unwrap();
    let id_of = |message: &str| -> Option<String> {
        let v: Value = serde_json::from_str(message).ok()?;
        // unacked entries are `[message, exchange, routing key]`.
        let message = if v.is_array() { v[0].clone() } else { v };
        message["headers"]["id"].as_str().map(str::to_string)
    };
    listed.iter().chain(&unacked).filter_map(|m| id_of(m)).collect()
}

// ----------------------------------------------------------------------------------- scenarios

/// 200 tasks sent with `countdown=3600` to an autoscaled pool (targetPerReplica 4, minReplicas 0,
/// maxReplicas 10): while they sit on the list the pool stays at zero; a due task wakes it to one
/// replica, whose worker takes all 200 and holds them until due. Counted as in flight they would
/// ask for 50 replicas (capped at 10) for an hour; sized for due work, the pool keeps one replica
/// (someone must hold them) over three stabilization windows, and no task is lost or run early.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_scheduled_an_hour_ahead_keep_the_pool_at_one_replica() {
    let Some(stack) = start("the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    stack.apply_yaml(&pool_yaml("later", json!({}))).await.unwrap();
    let replicas = record_replicas(&stack, "later");

    let later: Vec<(&str, Value, Option<u64>)> =
        (0..200).map(|_| ("celery_example.tick", json!([]), Some(3600))).collect();
    let sent = send_later(&stack, &later).await;
    eventually("the pool's status to count 200 scheduled tasks", || async {
        let s = pool_status(&stack, "later").await;
        (s["scheduled"] == 200).then_some(())
    })
    .await;
    assert!(replicas.values().iter().all(|&r| r == 0), "tasks an hour away woke the pool: {:?}", replicas.all());

    // A due task wakes the pool; its worker also takes the 200 and holds them.
    let due = send_later(&stack, &[("celery_example.add", json!([2, 3]), None)]).await;
    let results = stack.wait_results(&due.ids, DEADLINE).await.expect("the due task runs");
    assert_eq!(results[0].result, json!(5));
    eventually("the 200 to be held by the worker, and the pool to say Scheduled", || async {
        let s = pool_status(&stack, "later").await;
        let mut conn = redis_db(&stack, 0).await;
        let unacked: u64 = redis::cmd("HLEN").arg("unacked").query_async(&mut conn).await.unwrap();
        (unacked == 200 && s["scalingRule"] == "Scheduled" && s["scheduled"] == 200).then_some(())
    })
    .await;

    three_stabilization_windows(&stack).await;
    let values = replicas.values();
    assert!(values.iter().all(|&r| r <= 1), "replicas went above max(minReplicas, 1): {values:?}");
    assert_eq!(replicas.last(), Some(1), "the pool holding the scheduled tasks keeps one replica: {values:?}");
    let status = pool_status(&stack, "later").await;
    assert_eq!((status["desiredReplicas"].clone(), status["due"].clone()), (json!(1), json!(0)), "{status}");

    // None lost, none run early.
    let held = held_task_ids(&stack).await;
    let missing: Vec<&String> = sent.ids.iter().filter(|id| !held.contains(*id)).collect();
    assert!(missing.is_empty(), "{} scheduled tasks are no longer in Redis: {missing:?}", missing.len());
    let ran: Vec<Option<String>> = states(&stack, &sent.ids).await.into_iter().filter(Option::is_some).collect();
    assert!(ran.is_empty(), "tasks scheduled an hour ahead ran: {ran:?}");
    // The TaskQueue reports them too.
    let tq = stack.resource_of(&json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue"})).await;
    let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &tq.unwrap().0);
    eventually("the TaskQueue's status to count the 200 scheduled tasks", || async {
        let q = serde_json::to_value(api.get("emails").await.unwrap()).unwrap();
        (q["status"]["scheduled"] == 200 && q["status"]["latencySeconds"] == 0).then_some(())
    })
    .await;
}

/// Tasks sent with `countdown=20` to a pool at zero with `leadTimeSeconds: 10`: the pool does not
/// wake when they arrive (they are not due), scales to ceil(8 / 4) = 2 replicas when they come due
/// within the lead time — by their due time at the latest — and they run within the pool's
/// `targetLatencySeconds` of their ETA.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_due_in_twenty_seconds_are_sized_for_by_their_due_time() {
    let Some(stack) = start("the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    const LEAD: f64 = 10.0;
    const COUNTDOWN: u64 = 20;
    const TARGET_LATENCY: f64 = 10.0;
    stack
        .apply_yaml(&pool_yaml(
            "soon",
            json!({"leadTimeSeconds": LEAD as u64, "targetLatencySeconds": TARGET_LATENCY as u64}),
        ))
        .await
        .unwrap();
    let replicas = record_replicas(&stack, "soon");
    // The pool is created at minReplicas 0 and the autoscaler has looked at it.
    eventually("the autoscaler to decide for the pool", || async {
        (pool_status(&stack, "soon").await["desiredReplicas"] == 0).then_some(())
    })
    .await;

    let tasks: Vec<(&str, Value, Option<u64>)> =
        (0..8).map(|_| ("celery_example.tick", json!([]), Some(COUNTDOWN))).collect();
    let sent = send_later(&stack, &tasks).await;
    let (earliest_eta, latest_eta) = (sent.before + COUNTDOWN as f64, sent.after + COUNTDOWN as f64);
    let results = stack.wait_results(&sent.ids, DEADLINE).await.expect("the tasks run");

    let seen = replicas.all();
    let woke = seen.iter().find(|&&(_, r)| r > 0).map(|&(at, _)| at).expect("the pool scaled up");
    let sized = seen.iter().find(|&&(_, r)| r >= 2).map(|&(at, _)| at).expect("the pool reached 2 replicas");
    // Not woken by tasks 20 s away (the lead time is 10 s; due times are read in buckets, so
    // allow a few seconds of earliness), and sized by the time they were due.
    assert!(
        woke >= earliest_eta - LEAD - 5.0,
        "the pool woke {:.1} s before the tasks were due, more than the lead time: {seen:?}",
        earliest_eta - woke
    );
    assert!(
        sized <= latest_eta,
        "the pool reached 2 replicas {:.1} s after the tasks were due: {seen:?}",
        sized - latest_eta
    );
    assert!(seen.iter().all(|&(_, r)| r <= 2), "more replicas than 8 tasks need: {seen:?}");
    let worst = results.iter().filter_map(|r| r.result["at"].as_f64()).fold(f64::MIN, f64::max) - latest_eta;
    eprintln!(
        "woke {:.1} s and reached 2 replicas {:.1} s before the ETA; last task ran {worst:.1} s after it",
        earliest_eta - woke,
        latest_eta - sized
    );
    for r in &results {
        assert_eq!(r.state, "SUCCESS", "{r:?}");
        let ran = r.result["at"].as_f64().expect("tick reports when it ran");
        assert!(ran >= earliest_eta, "a task ran {:.1} s before its ETA: {r:?}", earliest_eta - ran);
        assert!(
            ran - latest_eta <= TARGET_LATENCY,
            "a task ran {:.1} s after its ETA, more than targetLatencySeconds: {r:?}",
            ran - latest_eta
        );
    }
}

/// Tasks failing with `autoretry_for` + `retry_backoff` (the example app's `flaky`: retries after
/// 120 s, 240 s, …): the pool scales up for their first run, and once every one of them waits for
/// its retry — held by the workers, or put back on the list by a scale-in — it shrinks to one
/// replica and stays there while they back off, instead of holding a replica per four retries.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_backing_off_between_retries_keep_the_pool_small() {
    let Some(stack) = start("the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    stack.apply_yaml(&pool_yaml("retrying", json!({"leadTimeSeconds": 5}))).await.unwrap();
    let replicas = record_replicas(&stack, "retrying");

    let tasks: Vec<(&str, Value, Option<u64>)> = (0..12).map(|_| ("celery_example.flaky", json!([]), None)).collect();
    let sent = send_later(&stack, &tasks).await;
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

    three_stabilization_windows(&stack).await;
    let after: Vec<i32> = replicas.values().split_off(settled - 1);
    assert!(after.iter().all(|&r| r == 1), "the pool left one replica while the retries backed off: {after:?}");
    let status = pool_status(&stack, "retrying").await;
    assert_eq!(
        (status["scalingRule"].clone(), status["scheduled"].clone()),
        (json!("Scheduled"), json!(12)),
        "{status}"
    );
    assert!(
        unix_now() < first_retry_due - 5.0,
        "inconclusive: the retries came due (within the lead time) before the observation ended"
    );
    // The pool did scale up for the first run: the retries, not a lack of work, kept it small.
    assert!(replicas.values().iter().any(|&r| r >= 2), "{:?}", replicas.all());
    let held = held_task_ids(&stack).await;
    assert!(sent.ids.iter().all(|id| held.contains(id)), "a retry is missing from Redis");
}

/// A task waiting in a queue nobody consumes: the TaskQueue's latency metric and status report
/// its age, never more than the truth and behind it by at most one TaskQueue probe interval
/// (when the metric was last set) plus one (when the tracker first saw the message) — with no
/// publish stamp, only the probe's sightings.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_tasks_age_reaches_the_taskqueue_metric_and_status() {
    let Some(stack) = start("the pod runner").await else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    /// How often the endpoint's poller polls a queue no autoscaled pool needs sooner
    /// (`brokers::TASK_QUEUE_INTERVAL`).
    const PROBE: f64 = 10.0;
    const SEND: &str = r#"
import json, time
from celery_example.app import app
before = time.time()
app.send_task("celery_example.add", args=[1, 2], queue="celery")
print(json.dumps({"ids": [], "before": before, "after": time.time()}))
"#;
    let out = stack.python(SEND, &[]).await.unwrap();
    let sent: Sent = serde_json::from_str(out.trim()).unwrap();
    let labels = [("namespace", stack.namespace()), ("taskqueue", "default")];
    let (latency, at) = eventually("the latency metric to pass 15 s", || async {
        let m = stack.metric("celery_operator_queue_latency_seconds", &labels).await?;
        (m >= 15.0).then_some((m, unix_now()))
    })
    .await;
    let truth = at - sent.before;
    assert!(latency <= truth + 0.5, "reported {latency:.1} s, more than the {truth:.1} s the task waited");
    assert!(
        latency >= (at - sent.after) - 2.0 * PROBE - 1.0,
        "reported {latency:.1} s, more than two probe intervals behind the {truth:.1} s the task waited"
    );
    eprintln!("latency metric {latency:.1} s, truth {truth:.1} s");
    let tq = stack.resource_of(&json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue"})).await;
    let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &tq.unwrap().0);
    eventually("the TaskQueue's status to report the wait", || async {
        let q = serde_json::to_value(api.get("default").await.unwrap()).unwrap();
        let status = &q["status"];
        (status["latencySeconds"].as_i64().is_some_and(|l| l >= 1) && status["waiting"] == 1).then_some(())
    })
    .await;
}

/// A vhost of its own on the private RabbitMQ node, with a Secret, a TaskQueue and an autoscaled
/// pool named `queue` on it (see [`pool_yaml`]; `quorum`: a quorum queue on a topic exchange, so
/// countdown tasks go through native delayed delivery). Returns the AMQP and management URLs.
async fn rabbit_pool(
    stack: &Stack,
    rabbit: &e2e_harness::RabbitServer,
    vhost: &str,
    queue: &str,
    quorum: bool,
    autoscaling: Value,
) -> (String, String) {
    rabbit.add_vhost(vhost).unwrap();
    let (url, management) = (rabbit.amqp_url_for_vhost(vhost), rabbit.management_url());
    let mut pool: Value = serde_json::from_str(&pool_yaml(queue, autoscaling)).unwrap();
    pool["spec"]["queues"] = json!([queue]);
    if quorum {
        pool["spec"]["template"] = json!({"env": [{"name": "CELERY_EXAMPLE_QUORUM_QUEUES", "value": queue}]});
    }
    let docs = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("rabbit-{queue}")},
               "stringData": {"url": url, "management": management}}),
        json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue", "metadata": {"name": queue},
               "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": format!("rabbit-{queue}"), "key": "url"}},
                                   "managementUrlFrom": {"secretKeyRef": {"name": format!("rabbit-{queue}"), "key": "management"}}}}}),
        pool,
    ];
    for doc in docs {
        stack.apply_yaml(&doc.to_string()).await.unwrap();
    }
    (url, management)
}

/// Bursts on RabbitMQ, classic and quorum queues: 30 tasks of 1 s wake a pool at zero
/// (targetPerReplica 10 → 3 replicas), every task runs once and succeeds, and the pool returns to
/// zero once they are done. The autoscaler reads RabbitMQ through the management API, whose
/// counts lag by up to its statistics interval (5 s).
#[tokio::test(flavor = "multi_thread")]
async fn on_rabbitmq_a_burst_wakes_the_pool_from_zero_and_it_returns_to_zero() {
    let Some(stack) = start("the pod runner").await else { return };
    let Some(rabbit) = rabbit_node() else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    for (queue, quorum) in [("burst-classic", false), ("burst-quorum", true)] {
        let (url, _) = rabbit_pool(&stack, rabbit, queue, queue, quorum, json!({"targetPerReplica": 10})).await;
        let replicas = record_replicas(&stack, queue);
        eventually("the pool to sit at zero", || async {
            (pool_status(&stack, queue).await["desiredReplicas"] == 0).then_some(())
        })
        .await;
        let quorum_env = if quorum { queue } else { "" };
        let env =
            [("CELERY_BROKER_URL", url.as_str()), ("CELERY_EXAMPLE_QUORUM_QUEUES", quorum_env), ("E2E_QUEUE", queue)];
        const SEND: &str = r#"
import json, os
from celery_example.app import app
app.conf.broker_transport_options = {"confirm_publish": True}
ids = [app.send_task("celery_example.sleep", args=[1], queue=os.environ["E2E_QUEUE"]).id for _ in range(30)]
print(json.dumps(ids))
"#;
        let out = stack.python(SEND, &env).await.unwrap();
        let ids: Vec<String> = serde_json::from_str(out.trim()).unwrap();
        let results = stack.wait_results(&ids, DEADLINE).await.expect("every task runs");
        assert!(results.iter().all(|r| r.state == "SUCCESS"), "{queue}: {results:?}");
        eventually("the pool to return to zero", || async { (replicas.last() == Some(0)).then_some(()) }).await;
        let values = replicas.values();
        assert!(values.iter().any(|&r| r >= 2), "{queue}: the burst did not scale the pool: {values:?}");
        assert!(values.iter().all(|&r| r <= 3), "{queue}: more than ceil(30 / 10) replicas: {values:?}");
    }
}

/// RabbitMQ with a quorum queue (a private node): Celery ≥ 5.5 sends countdown tasks through
/// native delayed delivery, where they wait in the level queues, invisible in the target queue.
/// 200 tasks with `countdown=3600` on an autoscaled pool with minReplicas 1 (its worker declares
/// the delayed-delivery exchanges and queues): the pool's status counts them as scheduled, its
/// replicas never exceed max(minReplicas, 1) over three stabilization windows, and none is lost
/// or run early.
#[tokio::test(flavor = "multi_thread")]
async fn on_rabbitmq_delayed_tasks_of_a_quorum_queue_keep_the_pool_at_one_replica() {
    let Some(stack) = start("the pod runner").await else { return };
    let Some(rabbit) = rabbit_node() else { return };
    let _log = LogOnPanic(stack.operator_log_path());
    let vhost = "scheduled-e2e";
    let (url, management) = rabbit_pool(&stack, rabbit, vhost, "rq", true, json!({"minReplicas": 1})).await;
    let replicas = record_replicas(&stack, "rq");
    // The worker has declared the level queues (and consumes the quorum queue).
    eventually("the worker to declare native delayed delivery", || async {
        (delayed_messages(&management, vhost).await.is_some_and(|n| n == 0)
            && pool_status(&stack, "rq").await["readyReplicas"] == 1)
            .then_some(())
    })
    .await;

    let quorum = [("CELERY_BROKER_URL", url.as_str()), ("CELERY_EXAMPLE_QUORUM_QUEUES", "rq")];
    const SEND: &str = r#"
import json, time
from celery_example.app import app
before = time.time()
ids = [app.send_task("celery_example.tick", queue="rq", countdown=3600).id for _ in range(200)]
print(json.dumps({"ids": ids, "before": before, "after": time.time()}))
"#;
    let out = stack.python(SEND, &quorum).await.unwrap();
    let sent: Sent = serde_json::from_str(out.trim()).unwrap();
    eventually("the 200 in the level queues, and the pool's status to count them as scheduled", || async {
        let s = pool_status(&stack, "rq").await;
        (delayed_messages(&management, vhost).await == Some(200) && s["scheduled"] == 200).then_some(())
    })
    .await;

    three_stabilization_windows(&stack).await;
    let values = replicas.values();
    assert!(values.iter().all(|&r| r <= 1), "replicas went above max(minReplicas, 1): {values:?}");
    assert_eq!(replicas.last(), Some(1), "{values:?}");
    let status = pool_status(&stack, "rq").await;
    assert_eq!((status["desiredReplicas"].clone(), status["due"].clone()), (json!(1), json!(0)), "{status}");
    assert_eq!(delayed_messages(&management, vhost).await, Some(200), "scheduled tasks were lost or delivered");
    let ran: Vec<Option<String>> = states(&stack, &sent.ids).await.into_iter().filter(Option::is_some).collect();
    assert!(ran.is_empty(), "tasks scheduled an hour ahead ran: {ran:?}");
}
