//! A broker password in a Secret that is not a URL leaks nowhere: not into the TaskQueue's or the
//! WorkerPool's status, not into Events, not into the operator's log (at debug level) or metrics.
//! The two reported cases: a Secret holding only the password, and a URL missing the colon after
//! its scheme (`redis//host:6379/0?password=…`). Black-box: the real operator binary against the
//! served double; the checks read only what a user can read.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use celery_e2e::stack::{DEADLINE, Pods, Stack, StackConfig, StackError};
use kube::api::{Api, DynamicObject, ListParams};
use serde_json::{Value, json};

const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");

async fn start() -> Stack {
    let config = StackConfig {
        pods: Pods::Simulated,
        operator_env: vec![("RUST_LOG".into(), "debug".into())],
        ..StackConfig::with_operator(OPERATOR)
    };
    match Stack::start(config).await {
        Ok(stack) => stack,
        Err(e @ StackError::Runner(_)) => panic!("the simulated runner needs nothing external: {e}"),
        Err(e) => panic!("the e2e stack did not start: {e}"),
    }
}

/// A Secret holding `value` under `url`, a TaskQueue reading it, and an autoscaled pool on that
/// queue (so the autoscaler resolves the URL too).
fn objects(value: &str) -> String {
    let docs = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "broker"},
            "stringData": {"url": value}}),
        json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue", "metadata": {"name": "jobs"},
            "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}}}}),
        json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "jobs"},
            "spec": {"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
                "queues": ["jobs"], "autoscaling": {"enabled": true, "minReplicas": 0, "maxReplicas": 3,
                "pollIntervalSeconds": 1}}}),
    ];
    docs.iter().map(Value::to_string).collect::<Vec<_>>().join("\n---\n")
}

async fn list(stack: &Stack, api_version: &str, kind: &str) -> Vec<Value> {
    let (resource, _) = stack.resource_of(&json!({"apiVersion": api_version, "kind": kind})).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &resource);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| serde_json::to_value(o).unwrap())
        .collect()
}

/// Events (both APIs) about the object named `name`.
async fn events_about(stack: &Stack, name: &str) -> Vec<Value> {
    let mut events = list(stack, "events.k8s.io/v1", "Event").await;
    events.retain(|e| e["regarding"]["name"] == name);
    let mut core = list(stack, "v1", "Event").await;
    core.retain(|e| e["involvedObject"]["name"] == name);
    events.extend(core);
    events
}

fn ready_false(obj: &Value) -> bool {
    let current = obj["status"]["observedGeneration"] == obj["metadata"]["generation"];
    let conditions = obj["status"]["conditions"].as_array().cloned().unwrap_or_default();
    current && conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "False")
}

/// Waits until the TaskQueue is reported not Ready and a Warning Event about it exists, then
/// checks that none of `forms` of the password shows in any TaskQueue, WorkerPool or Event, in the
/// operator's log or in its metrics. Returns the TaskQueue's Ready message.
async fn assert_nothing_leaks(stack: &Stack, forms: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let message = loop {
        let queue = list(stack, "celery-operator.dev/v1alpha1", "TaskQueue").await.pop();
        let warned = events_about(stack, "jobs").await.iter().any(|e| e["type"] == "Warning");
        if let Some(q) = queue.filter(|q| ready_false(q) && warned) {
            let ready = q["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").cloned();
            break ready.unwrap()["message"].as_str().unwrap_or_default().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "the TaskQueue was never reported not Ready with a Warning");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut shown: Vec<(String, String)> = Vec::new();
    for (api_version, kind) in [
        ("celery-operator.dev/v1alpha1", "TaskQueue"),
        ("celery-operator.dev/v1alpha1", "WorkerPool"),
        ("events.k8s.io/v1", "Event"),
        ("v1", "Event"),
    ] {
        for obj in list(stack, api_version, kind).await {
            shown.push((format!("{kind} {}", obj["metadata"]["name"]), obj.to_string()));
        }
    }
    shown.push(("the operator's log".into(), stack.operator_log()));
    shown.push(("the operator's metrics".into(), stack.metrics().await.expect("metrics answer")));
    let leaks: Vec<&String> =
        shown.iter().filter(|(_, text)| forms.iter().any(|f| text.contains(f))).map(|(what, _)| what).collect();
    assert!(leaks.is_empty(), "the password leaked into {leaks:?}");
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_holding_only_the_password_leaks_nowhere() {
    let stack = start().await;
    let password = format!("hunter2-{:016x}", RandomState::new().hash_one(1));
    stack.apply_yaml(&objects(&password)).await.expect("objects apply");
    let message = assert_nothing_leaks(&stack, &[&password]).await;
    assert!(message.contains("not a URL"), "the condition does not say what is wrong: {message}");
    eprintln!("Ready: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_url_missing_its_colon_leaks_nowhere() {
    let stack = start().await;
    let secret = format!("hunter2!{:016x}", RandomState::new().hash_one(2));
    let encoded = secret.replace('!', "%21");
    let port = stack.redis().expect("a local Redis").port();
    stack.apply_yaml(&objects(&format!("redis//127.0.0.1:{port}/0?password={encoded}"))).await.expect("objects apply");
    let message = assert_nothing_leaks(&stack, &[&secret, &encoded]).await;
    assert!(message.contains("not a URL"), "the condition does not say what is wrong: {message}");
    eprintln!("Ready: {message}");
}
