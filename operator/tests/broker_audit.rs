//! The broker audit gives the same verdict from `check-broker` and from a TaskQueue (its
//! BrokerSafe condition, written by the reconciler against the control-plane double), against real
//! brokers: a private RabbitMQ node with the management API, redis-server (plain, volatile-lru,
//! Sentinel-fronted), and tasks published by real Celery.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

mod common;

use celery_e2e::ApiServer;
use celery_operator::crd::TaskQueue;
use celery_operator::metrics::Metrics;
use celery_operator::reconcile::{Context, taskqueue};
use common::create_in_prod;
use e2e_harness::python::{self, CeleryWorker};
use e2e_harness::{RabbitServer, RedisServer};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use serde_json::{Value, json};

// === Helpers: the CLI, the reconciler, real Celery ===

fn check_broker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_celery-operator"));
    cmd.arg("check-broker").args(args).env_remove("CELERY_BROKER_URL").env_remove("CELERY_BROKER_MANAGEMENT_URL");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("the binary runs")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// What check-broker's JSON says of each queue: the worst warning-or-worse finding, as the
/// BrokerSafe condition would name it (`None`: safe).
fn cli_verdicts(report: &Value) -> BTreeMap<String, Option<String>> {
    let broker = &report["brokers"][0];
    let rank = |s: &str| ["info", "warning", "critical"].iter().position(|x| *x == s).unwrap();
    broker["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            let name = q["name"].as_str().unwrap();
            let worst = broker["findings"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["queue"].is_null() || f["queue"] == name)
                .filter(|f| f["severity"] != "info")
                .max_by_key(|f| rank(f["severity"].as_str().unwrap()))
                .map(|f| f["reason"].as_str().unwrap().to_owned());
            (name.to_owned(), worst)
        })
        .collect()
}

struct Operator {
    api: ApiServer,
    client: kube::Client,
    ctx: Arc<Context>,
}

fn operator() -> Operator {
    let api = ApiServer::new();
    api.load_crds_from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")).expect("CRDs load");
    let client = api.client();
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::new()), Some("test".into())));
    Operator { api, client, ctx }
}

impl Operator {
    async fn secret(&self, name: &str, data: Value) {
        create_in_prod::<Secret>(&self.client, json!({"metadata": {"name": name}, "stringData": data})).await;
    }

    /// Reconciles the TaskQueue once and returns its status conditions.
    async fn reconcile(&self, name: &str) -> (TaskQueue, Vec<Condition>) {
        let api = Api::<TaskQueue>::namespaced(self.client.clone(), "prod");
        let tq = Arc::new(api.get(name).await.unwrap());
        // Boxed: unboxed, clippy's layout queries on this test's futures overflow the depth limit.
        Box::pin(taskqueue::reconcile(tq, self.ctx.clone())).await.expect("reconciled");
        let tq = api.get(name).await.unwrap();
        let conditions = tq.status.clone().unwrap_or_default().conditions;
        (tq, conditions)
    }

    /// The BrokerSafe verdict of a TaskQueue: `None` when True, else its reason.
    async fn broker_safe(&self, name: &str) -> Option<String> {
        let (_, conditions) = self.reconcile(name).await;
        let reachable = conditions.iter().find(|c| c.type_ == "BrokerReachable").expect("BrokerReachable");
        assert_eq!(reachable.status, "True", "{name}: {}", reachable.message);
        let safe = conditions.iter().find(|c| c.type_ == "BrokerSafe").expect("BrokerSafe");
        (safe.status == "False").then(|| safe.reason.clone())
    }
}

const APP_PY: &str = r#"
import json, os
from celery import Celery
from kombu import Exchange, Queue

app = Celery("app", broker=os.environ["BROKER"])
app.conf.broker_transport_options = json.loads(os.environ.get("TRANSPORT", "{}"))
if os.environ["BROKER"].startswith("amqp"):
    # The script exits without closing its connection: wait for RabbitMQ to confirm each publish.
    app.conf.broker_transport_options.setdefault("confirm_publish", True)
if os.environ.get("EXPIRES"):
    q = os.environ["Q"]
    app.conf.task_queues = [Queue(q, Exchange(q), routing_key=q, expires=float(os.environ["EXPIRES"]))]

@app.task(name="app.noop")
def noop():
    pass
"#;

/// Publishes one task per priority in `priorities` to `queue` with real Celery and returns kombu's
/// own count of the queue (`ch._size` on Redis, a passive declare on AMQP).
fn celery_publish(app_dir: &Path, env: &[(&str, &str)], queue: &str, priorities: &[u8]) -> u64 {
    std::fs::write(app_dir.join("app.py"), APP_PY).unwrap();
    let code = "import json, os, sys\nsys.path.insert(0, os.environ['APP_DIR'])\nfrom app import app\n\
                for p in json.loads(os.environ['PRIORITIES']):\n    app.send_task('app.noop', queue=os.environ['Q'], priority=p)\n\
                with app.connection_for_write() as c:\n    ch = c.default_channel\n    q = os.environ['Q']\n    \
                print(ch._size(q) if c.transport.driver_type == 'redis' else ch.queue_declare(q, passive=True).message_count)\n";
    let dir = app_dir.to_string_lossy();
    let priorities = serde_json::to_string(priorities).unwrap();
    let mut env = env.to_vec();
    env.extend([("APP_DIR", dir.as_ref()), ("Q", queue), ("PRIORITIES", priorities.as_str())]);
    python::run_script(code, &env).unwrap().trim().parse().unwrap()
}

// === RabbitMQ ===

/// Each case: queue name, declaration arguments, policy definition (or null), and the verdict both
/// must give (the BrokerSafe reason, or null for safe).
const RABBIT_CASES: &str = r#"[
    ["ba-plain", {}, null, null],
    ["ba-arg-maxlen", {"x-max-length": 10}, null, "MaxLengthDropHead"],
    ["ba-arg-reject", {"x-max-length": 10, "x-overflow": "reject-publish"}, null, "MaxLengthRejectPublish"],
    ["ba-arg-ttl", {"x-message-ttl": 60000}, null, "MessageTtlWithoutDlx"],
    ["ba-arg-limit", {"x-queue-type": "quorum", "x-delivery-limit": 5}, null, "DeliveryLimitWithoutDlx"],
    ["ba-arg-expires", {"x-expires": 600000}, null, "QueueExpires"],
    ["ba-pol-maxlen", {}, {"max-length": 10}, "MaxLengthDropHead"],
    ["ba-pol-ttl", {}, {"message-ttl": 60000}, "MessageTtlWithoutDlx"],
    ["ba-pol-limit", {"x-queue-type": "quorum"}, {"delivery-limit": 5}, "DeliveryLimitWithoutDlx"],
    ["ba-pol-expires", {}, {"expires": 600000}, "QueueExpires"]
]"#;

type Case = (String, Value, Value, Option<String>);

/// The cases, and each again with a dead-letter exchange (`-dlx`, by argument or by policy as the
/// setting itself): then safe, except expiry (a deleted queue's messages are not dead-lettered).
fn rabbit_cases() -> Vec<Case> {
    let cases: Vec<Case> = serde_json::from_str(RABBIT_CASES).expect("the case table parses");
    let dead_lettered = cases.iter().filter(|(name, ..)| name != "ba-plain" && name != "ba-arg-reject").map(
        |(name, args, policy, verdict)| {
            let (mut args, mut policy) = (args.clone(), policy.clone());
            match policy.as_object_mut() {
                Some(definition) => definition.insert("dead-letter-exchange".into(), json!("ba-dlx")),
                None => args.as_object_mut().unwrap().insert("x-dead-letter-exchange".into(), json!("ba-dlx")),
            };
            let verdict = verdict.clone().filter(|v| v == "QueueExpires");
            (format!("{name}-dlx"), args, policy, verdict)
        },
    );
    let dead_lettered: Vec<Case> = dead_lettered.collect();
    cases.into_iter().chain(dead_lettered).collect()
}

/// Declares the exchanges, queues and policies over the management API, and waits until every
/// policy shows on its queue.
fn declare_rabbit_cases(rabbit: &RabbitServer, cases: &[Case]) {
    let spec: Vec<Value> = cases.iter().map(|(name, args, policy, _)| json!([name, args, policy])).collect();
    let code = r#"
import base64, json, os, time, urllib.request
base = os.environ["BASE"]
auth = "Basic " + base64.b64encode(b"guest:guest").decode()
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": auth, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return r.read()
call("PUT", "/api/exchanges/%2F/ba-dlx", {"type": "fanout", "durable": True})
call("PUT", "/api/queues/%2F/ba-dead-letters", {"durable": True})
call("POST", "/api/bindings/%2F/e/ba-dlx/q/ba-dead-letters", {"routing_key": ""})
for name, args, policy in json.loads(os.environ["SPEC"]):
    call("PUT", "/api/queues/%2F/" + name, {"durable": True, "auto_delete": False, "arguments": args})
    if policy is not None:
        call("PUT", "/api/policies/%2F/" + name, {"pattern": "^" + name + "$", "definition": policy, "apply-to": "queues"})
wanted = {name for name, _, policy in json.loads(os.environ["SPEC"]) if policy is not None}
deadline = time.time() + 60
while True:
    queues = json.loads(call("GET", "/api/queues/%2F?columns=name,policy"))
    if wanted <= {q["name"] for q in queues if q.get("policy")}:
        break
    assert time.time() < deadline, "policies not applied"
    time.sleep(0.2)
"#;
    let base = format!("http://127.0.0.1:{}", rabbit.management_port());
    python::run_script(code, &[("BASE", &base), ("SPEC", &serde_json::to_string(&spec).unwrap())]).unwrap();
}

#[tokio::test]
async fn every_silent_drop_setting_gets_the_same_verdict_from_the_cli_and_a_task_queue() {
    let rabbit = RabbitServer::shared().expect("private RabbitMQ node");
    let cases = rabbit_cases();
    declare_rabbit_cases(rabbit, &cases);
    let (amqp, management) = (rabbit.amqp_url(), rabbit.management_url());
    let expected: BTreeMap<String, Option<String>> =
        cases.iter().map(|(name, _, _, verdict)| (name.clone(), verdict.clone())).collect();

    // The CLI, naming no queue: every queue of the vhost is discovered and judged.
    let out = check_broker(&["--management-url", &management, "-o", "json"], &[("CELERY_BROKER_URL", &amqp)]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let mut from_cli = cli_verdicts(&json_of(&out));
    from_cli.retain(|queue, _| expected.contains_key(queue));
    assert_eq!(from_cli, expected);

    // Each queue as a TaskQueue: the reconciler's BrokerSafe condition.
    let op = operator();
    op.secret("rabbit", json!({"url": amqp, "management": management})).await;
    for (name, ..) in &cases {
        create_in_prod::<TaskQueue>(
            &op.client,
            json!({"metadata": {"name": name}, "spec": {"broker": {
                "urlFrom": {"secretKeyRef": {"name": "rabbit", "key": "url"}},
                "managementUrlFrom": {"secretKeyRef": {"name": "rabbit", "key": "management"}},
            }}}),
        )
        .await;
    }
    let mut from_task_queues = BTreeMap::new();
    for (name, ..) in &cases {
        from_task_queues.insert(name.clone(), op.broker_safe(name).await);
    }
    assert_eq!(from_task_queues, expected);

    // A pool that can scale to zero makes an expiring queue critical, seen from both sides.
    let pool = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": "expiring", "namespace": "prod"},
        "spec": {"app": "proj.app", "image": "reg/proj:1", "queues": ["ba-arg-expires"],
                 "autoscaling": {"minReplicas": 0, "maxReplicas": 3}}});
    create_in_prod::<celery_operator::crd::WorkerPool>(&op.client, pool.clone()).await;
    assert_eq!(op.broker_safe("ba-arg-expires").await.as_deref(), Some("QueueExpiresWhileScaledToZero"));
    let dir = tempfile::tempdir().unwrap();
    let pool_file = dir.path().join("pool.yaml");
    std::fs::write(&pool_file, serde_json::to_string(&pool).unwrap()).unwrap();
    let args =
        ["-q", "ba-arg-expires", "--management-url", &management, "-f", pool_file.to_str().unwrap(), "-o", "json"];
    let out = check_broker(&args, &[("CELERY_BROKER_URL", &amqp)]);
    let verdicts = cli_verdicts(&json_of(&out));
    assert_eq!(verdicts["ba-arg-expires"].as_deref(), Some("QueueExpiresWhileScaledToZero"));
}

#[tokio::test]
async fn a_celery_mailbox_named_with_q_is_a_finding_on_that_queue_not_an_abort() {
    let rabbit = RabbitServer::shared().expect("private RabbitMQ node");
    let app = tempfile::tempdir().unwrap();
    let amqp = rabbit.amqp_url();
    let env = [("BROKER", amqp.as_str())];
    assert_eq!(celery_publish(app.path(), &env, "ba-mailbox-tasks", &[0, 0]), 2);
    let args = ["-A", "app", "worker", "-Q", "ba-mailbox-tasks", "-c", "1", "-n", "ba-mailbox@probe", "-l", "INFO"];
    let mut worker = CeleryWorker::spawn(app.path(), &args, &env).unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(90)).unwrap();
    let mailbox = "ba-mailbox@probe.celery.pidbox";

    let out = check_broker(&["-q", mailbox, "-q", "ba-mailbox-tasks", "-o", "json"], &[("CELERY_BROKER_URL", &amqp)]);
    // Not 2: the broker answered. Unsafe only because no management API was given to check policies.
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json_of(&out);
    let findings = report["brokers"][0]["findings"].as_array().unwrap();
    let on_mailbox: Vec<_> = findings.iter().filter(|f| f["queue"] == mailbox).collect();
    assert_eq!(on_mailbox.len(), 1, "{findings:?}");
    assert_eq!(
        (on_mailbox[0]["reason"].as_str(), on_mailbox[0]["severity"].as_str()),
        (Some("QueueExclusive"), Some("info"))
    );
    let reasons: Vec<&str> = findings.iter().filter_map(|f| f["reason"].as_str()).collect();
    assert_eq!(reasons.iter().filter(|r| **r != "QueueExclusive").collect::<Vec<_>>(), vec![&"ManagementUnavailable"]);
    let tasks =
        report["brokers"][0]["queues"].as_array().unwrap().iter().find(|q| q["name"] == "ba-mailbox-tasks").cloned();
    assert_eq!(tasks.expect("the task queue is still read")["consumers"], 1);
    drop(worker);
}

// === Redis ===

#[tokio::test]
async fn custom_priority_steps_and_separator_count_as_kombu_counts_from_the_cli_and_a_task_queue() {
    let redis = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    let url = redis.url();
    let transport = r#"{"priority_steps": [0, 5], "sep": ":"}"#;
    let kombu = celery_publish(
        app.path(),
        &[("BROKER", &url), ("TRANSPORT", transport)],
        "reports",
        &[0, 2, 4, 5, 5, 7, 9, 9, 9],
    );
    assert_eq!(kombu, 9);

    let out = check_broker(&[&url, "--priority-steps", "0,5", "--separator", ":", "-o", "json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json_of(&out);
    let queues = &report["brokers"][0]["queues"];
    assert_eq!(queues.as_array().unwrap().len(), 1, "discovered from kombu's bindings: {queues}");
    assert_eq!((queues[0]["name"].as_str(), queues[0]["ready"].as_u64()), (Some("reports"), Some(kombu)));
    // What the CLI counted before it had these options.
    let out = check_broker(&[&url, "-q", "reports", "-o", "json"], &[]);
    assert_eq!(json_of(&out)["brokers"][0]["queues"][0]["ready"], 3);

    let task_queue = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue",
        "metadata": {"name": "reports", "namespace": "prod"},
        "spec": {"broker": {"url": url, "transportOptions": {"prioritySteps": [0, 5], "separator": ":"}}}});
    let op = operator();
    create_in_prod::<TaskQueue>(&op.client, task_queue.clone()).await;
    let (tq, _) = op.reconcile("reports").await;
    assert_eq!(tq.status.unwrap().ready, Some(kombu as i64));
    // The same TaskQueue as a file in a GitOps repository.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reports.yaml");
    std::fs::write(&file, serde_json::to_string(&task_queue).unwrap()).unwrap();
    let out = check_broker(&["-f", file.to_str().unwrap(), "-o", "json"], &[]);
    assert_eq!(json_of(&out)["brokers"][0]["queues"][0]["ready"].as_u64(), Some(kombu));
}

#[tokio::test]
async fn an_expiring_queue_on_a_volatile_lru_redis_is_critical_from_the_cli_and_a_task_queue() {
    let redis =
        RedisServer::builder().config("maxmemory 64mb").config("maxmemory-policy volatile-lru").start().unwrap();
    let app = tempfile::tempdir().unwrap();
    let url = redis.url();
    let published = celery_publish(app.path(), &[("BROKER", &url), ("EXPIRES", "600")], "digest", &[0, 0, 0]);
    assert_eq!(published, 3);

    let out = check_broker(&[&url, "-q", "digest", "-o", "json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let report = json_of(&out);
    let findings: Vec<(&str, &str)> = report["brokers"][0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["reason"].as_str().unwrap(), f["severity"].as_str().unwrap()))
        .collect();
    assert_eq!(findings, vec![("EvictionPolicyVolatile", "info"), ("QueueExpires", "critical")]);

    let op = operator();
    create_in_prod::<TaskQueue>(&op.client, json!({"metadata": {"name": "digest"}, "spec": {"broker": {"url": url}}}))
        .await;
    assert_eq!(op.broker_safe("digest").await.as_deref(), Some("QueueExpires"));
    // The finding is stable from probe to probe (no remaining TTL in it): nothing to rewrite.
    let writes = op.api.write_count();
    assert_eq!(op.broker_safe("digest").await.as_deref(), Some("QueueExpires"));
    assert_eq!(op.api.write_count(), writes);
}

#[tokio::test]
async fn a_sentinel_fronted_redis_is_checked_from_the_cli_and_a_task_queue() {
    let master =
        RedisServer::builder().config("maxmemory 64mb").config("maxmemory-policy allkeys-lru").start().unwrap();
    let sentinel = RedisServer::builder().sentinel("celery-main", &master).start().unwrap();
    master.cli(&["LPUSH", "emails", "a", "b", "c"]).unwrap();
    let url = sentinel.url();

    let out = check_broker(&[&url, "--master-name", "celery-main", "-q", "emails", "-o", "json"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json_of(&out);
    assert_eq!(report["brokers"][0]["queues"][0]["ready"], 3);
    assert_eq!(cli_verdicts(&report)["emails"].as_deref(), Some("EvictionPolicyUnsafe"));

    let op = operator();
    create_in_prod::<TaskQueue>(
        &op.client,
        json!({"metadata": {"name": "emails"}, "spec": {"broker": {
        "url": url, "transportOptions": {"masterName": "celery-main"}}}}),
    )
    .await;
    assert_eq!(op.broker_safe("emails").await.as_deref(), Some("EvictionPolicyUnsafe"));
    let (tq, _) = op.reconcile("emails").await;
    assert_eq!(tq.status.unwrap().ready, Some(3));
}

// === Scheduled tasks, waiting tasks and latency ===

/// Sends `(queue, countdown)` tasks with real Celery (APP_PY's app); with `STAMP` set, a
/// `before_task_publish` handler stamps each message as published 100 s ago (Judoscale's
/// convention, `properties["published_at"]`).
const SEND_TASKS: &str = "import json, os, sys, time\nsys.path.insert(0, os.environ['APP_DIR'])\n\
    from celery.signals import before_task_publish\n\
    @before_task_publish.connect\ndef stamp(properties=None, **_):\n    if os.environ.get('STAMP'):\n        properties['published_at'] = time.time() - 100\n\
    from app import app\n\
    for queue, countdown in json.loads(os.environ['TASKS']):\n    app.send_task('app.noop', queue=queue, countdown=countdown)\n";

fn celery_send(app_dir: &Path, broker: &str, tasks: &[(&str, Option<u64>)], stamp: bool) {
    std::fs::write(app_dir.join("app.py"), APP_PY).unwrap();
    let dir = app_dir.to_string_lossy();
    let tasks = serde_json::to_string(tasks).unwrap();
    let mut env = vec![("APP_DIR", dir.as_ref()), ("BROKER", broker), ("TASKS", tasks.as_str())];
    if stamp {
        env.push(("STAMP", "1"));
    }
    python::run_script(SEND_TASKS, &env).unwrap();
}

/// The queue `name` of check-broker's (first) broker.
fn queue_of<'a>(report: &'a Value, name: &str) -> &'a Value {
    let queues = report["brokers"][0]["queues"].as_array().unwrap();
    queues.iter().find(|q| q["name"] == name).unwrap_or_else(|| panic!("no queue {name} in {report:#}"))
}

/// Runs `check-broker` (its JSON output, validated) until `done` holds of the report, failing
/// with `what` after a generous deadline.
async fn check_broker_until(args: &[&str], env: &[(&str, &str)], what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let report = common::check_broker_json(&check_broker(args, env));
        if done(&report) {
            return report;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached within the deadline: {report:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The cells of queue `name`'s row in check-broker's text table.
fn table_row(text: &str, name: &str) -> Vec<String> {
    let row = text.lines().find(|l| l.split_whitespace().next() == Some(name));
    row.unwrap_or_else(|| panic!("no row for {name} in\n{text}")).split_whitespace().map(str::to_owned).collect()
}

/// Tasks sent with `countdown=3600` next to plain ones, by real Celery on Redis: check-broker tells
/// the waiting from the scheduled ones — on the list, then held by a worker — with the numbers a
/// TaskQueue's status gets for the same queue, the same EtaBeyondVisibilityTimeout finding as its
/// BrokerSafe condition, and the latency one probe can tell: from a publish stamp, else unknown.
#[tokio::test]
async fn scheduled_and_waiting_tasks_are_told_apart_alike_by_the_cli_and_a_task_queue() {
    let redis = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    let url = redis.url();
    let mut tasks = vec![("sched", None); 3];
    tasks.extend([("sched", Some(3600)); 5]);
    celery_send(app.path(), &url, &tasks, false);
    celery_send(app.path(), &url, &[("stamped", None), ("stamped", None)], true);
    let args = [url.as_str(), "-q", "sched", "-q", "stamped", "--visibility-timeout", "600"];
    let json_args = [&args[..], &["-o", "json"]].concat();

    // On the list: 3 waiting, 5 scheduled, all of them ready.
    let out = check_broker(&json_args, &[]);
    assert_eq!(out.status.code(), Some(1), "unsafe: the ETAs lie beyond the visibility timeout");
    let report = common::check_broker_json(&out);
    let sched = queue_of(&report, "sched");
    assert_eq!(
        (&sched["ready"], &sched["waiting"], &sched["scheduled"], &sched["scheduledDetail"]["listed"]),
        (&json!(8), &json!(3), &json!(5), &json!(5)),
        "{sched:#}"
    );
    assert_eq!(sched["scheduledDetail"]["beyondVisibilityTimeout"], 5);
    // No publish stamp: one probe cannot age the oldest waiting task.
    assert!(sched["latencySeconds"].is_null() && sched["latencyUnknownReason"].is_string(), "{sched:#}");
    let stamped = queue_of(&report, "stamped");
    assert_eq!((&stamped["waiting"], &stamped["scheduled"]), (&json!(2), &json!(0)));
    assert_eq!(stamped["latencyBasis"], "publishTimestamp");
    assert!(stamped["latencySeconds"].as_i64().is_some_and(|l| l >= 100), "{stamped:#}");
    let verdicts = cli_verdicts(&report);
    assert_eq!(verdicts["sched"].as_deref(), Some("EtaBeyondVisibilityTimeout"));
    assert_eq!(verdicts["stamped"], None);

    let text = check_broker(&args, &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    let header =
        ["QUEUE", "READY", "WAITING", "SCHEDULED", "UNACKED", "RESERVED-DUE", "ORPHANED", "CONSUMERS", "LATENCY"];
    assert_eq!(table_row(&text, "QUEUE"), header, "{text}");
    assert_eq!(table_row(&text, "sched")[..4], ["sched", "8", "3", "5"], "{text}");
    assert_eq!(table_row(&text, "sched").last().map(String::as_str), Some("?"), "{text}");
    assert!(text.contains("LATENCY ?: the oldest waiting task carries no publish timestamp"), "{text}");
    assert!(text.contains("WARNING EtaBeyondVisibilityTimeout: queue sched holds 5 task(s)"), "{text}");

    // The same queues as TaskQueues: the same numbers in status, the same BrokerSafe verdict.
    let op = operator();
    for queue in ["sched", "stamped"] {
        create_in_prod::<TaskQueue>(
            &op.client,
            json!({"metadata": {"name": queue}, "spec": {"broker": {
                "url": url, "transportOptions": {"visibilityTimeoutSeconds": 600}}}}),
        )
        .await;
    }
    assert_eq!(op.broker_safe("sched").await.as_deref(), Some("EtaBeyondVisibilityTimeout"));
    assert_eq!(op.broker_safe("stamped").await, None);
    let status = op.reconcile("sched").await.0.status.unwrap();
    assert_eq!((status.ready, status.waiting, status.scheduled), (Some(8), Some(3), Some(5)));
    let status = op.reconcile("stamped").await.0.status.unwrap();
    assert_eq!((status.waiting, status.scheduled), (Some(2), Some(0)));
    assert!(status.latency_seconds.is_some_and(|l| l >= 100), "{status:?}");

    // A worker runs the plain tasks and takes the scheduled ones, holding them until due.
    let env = [("BROKER", url.as_str())];
    let worker_args = ["-A", "app", "worker", "-Q", "sched", "-c", "1", "-n", "ba-sched@probe", "-l", "INFO"];
    let _worker = CeleryWorker::spawn(app.path(), &worker_args, &env).unwrap();
    let report = check_broker_until(&json_args, &[], "the worker to take the tasks", |r| {
        let sched = queue_of(r, "sched");
        sched["ready"] == 0 && sched["unacked"] == 5
    })
    .await;
    let sched = queue_of(&report, "sched");
    assert_eq!(
        (&sched["waiting"], &sched["scheduled"], &sched["reservedDue"], &sched["scheduledDetail"]["held"]),
        (&json!(0), &json!(5), &json!(0), &json!(5)),
        "{sched:#}"
    );
    assert_eq!((&sched["latencySeconds"], &sched["latencyBasis"]), (&json!(0), &json!("nothingWaiting")));
    assert_eq!(cli_verdicts(&report)["sched"].as_deref(), Some("EtaBeyondVisibilityTimeout"));
    let text = check_broker(&args, &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(table_row(&text, "sched"), ["sched", "0", "0", "5", "5", "0", "0", "-", "0s"], "{text}");
    // A fresh operator (its first poll is now; the one above would write depths at most every
    // DEPTH_WRITE_INTERVAL) writes the same numbers.
    let op = operator();
    let task_queue = json!({"metadata": {"name": "sched"}, "spec": {"broker": {
        "url": url, "transportOptions": {"visibilityTimeoutSeconds": 600}}}});
    create_in_prod::<TaskQueue>(&op.client, task_queue).await;
    assert_eq!(op.broker_safe("sched").await.as_deref(), Some("EtaBeyondVisibilityTimeout"));
    let status = op.reconcile("sched").await.0.status.unwrap();
    assert_eq!((status.ready, status.unacked, status.waiting, status.scheduled), (Some(0), Some(5), Some(0), Some(5)));
}

/// Declares native delayed delivery on the vhost of `BROKER` as a Celery (>= 5.5) worker does on
/// start-up, with queue `Q` a quorum queue on a topic exchange of its name, then sends one task per
/// `COUNTDOWNS` entry (null: none) to it: those with a countdown go to the delayed-delivery levels.
const SEND_DELAYED: &str = r#"
import json, os
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange, declare_native_delayed_delivery_exchanges_and_queues)
q = os.environ["Q"]
app = Celery("app", broker=os.environ["BROKER"])
app.conf.task_queues = [Queue(q, Exchange(q, type="topic"), routing_key=q, queue_arguments={"x-queue-type": "quorum"})]
app.conf.broker_transport_options = {"confirm_publish": True}
with app.connection_for_write() as connection:
    declare_native_delayed_delivery_exchanges_and_queues(connection, "quorum")
    queue = app.amqp.queues[q]
    queue.bind(connection).declare()
    bind_queue_to_native_delayed_delivery_exchange(connection, queue)
for countdown in json.loads(os.environ["COUNTDOWNS"]):
    app.send_task("app.noop", queue=q, countdown=countdown)
"#;

/// RabbitMQ with a quorum queue: Celery sends countdown tasks through native delayed delivery,
/// where they wait in the level queues, invisible in their queue. check-broker counts them as the
/// queue's scheduled tasks (its only target) as the TaskQueue's status does, and says what RabbitMQ
/// cannot tell: which ready task is due (waiting), and how long one probe says the oldest waited.
#[tokio::test]
async fn delayed_delivery_tasks_are_scheduled_alike_from_the_cli_and_a_task_queue() {
    let rabbit = RabbitServer::shared().expect("private RabbitMQ node");
    let vhost = "ba-delayed";
    rabbit.add_vhost(vhost).unwrap();
    let (amqp, management) = (rabbit.amqp_url_for_vhost(vhost), rabbit.management_url());
    let countdowns = serde_json::to_string(&[None, None, Some(3600), Some(3600), Some(3600), Some(3600)]).unwrap();
    python::run_script(SEND_DELAYED, &[("BROKER", &amqp), ("Q", "rq"), ("COUNTDOWNS", &countdowns)]).unwrap();

    let args = ["-q", "rq", "--management-url", &management];
    let json_args = [&args[..], &["-o", "json"]].concat();
    // The management API's statistics lag the broker by its statistics interval.
    let env = [("CELERY_BROKER_URL", amqp.as_str())];
    let report = check_broker_until(&json_args, &env, "the tasks to be counted", |r| {
        let rq = queue_of(r, "rq");
        rq["ready"] == 2 && rq["scheduled"] == 4
    })
    .await;
    let rq = queue_of(&report, "rq");
    assert_eq!(
        (&rq["waiting"], &rq["reservedDue"], &rq["scheduledDetail"]["delayed"]),
        (&Value::Null, &Value::Null, &json!(4))
    );
    assert!(rq["latencySeconds"].is_null() && rq["latencyUnknownReason"].is_string(), "{rq:#}");
    let delayed = &report["brokers"][0]["broker"]["delayedDelivery"];
    assert_eq!((&delayed["messages"], &delayed["targets"]), (&json!(4), &json!(["rq"])), "{delayed:#}");
    let text = check_broker(&args, &env);
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(table_row(&text, "rq")[..4], ["rq", "2", "-", "4"], "{text}");
    assert!(
        text.contains("native delayed delivery: 4 task(s) waiting in the celery_delayed_* queues, all for queue rq"),
        "{text}"
    );

    let op = operator();
    op.secret("rabbit-delayed", json!({"url": amqp, "management": management})).await;
    create_in_prod::<TaskQueue>(
        &op.client,
        json!({"metadata": {"name": "rq"}, "spec": {"broker": {
            "urlFrom": {"secretKeyRef": {"name": "rabbit-delayed", "key": "url"}},
            "managementUrlFrom": {"secretKeyRef": {"name": "rabbit-delayed", "key": "management"}},
        }}}),
    )
    .await;
    let status = op.reconcile("rq").await.0.status.unwrap();
    assert_eq!((status.ready, status.waiting, status.scheduled), (Some(2), None, Some(4)), "{status:?}");
}
