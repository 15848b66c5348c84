//! The generated CRDs refuse bad TaskQueues and WorkerPools the way an API server would: the
//! structural schema (types, ranges, enums, patterns) and the CEL rules, evaluated locally by the
//! control-plane double's admission code. Every example is accepted.

use std::path::Path;

use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn crd(plural: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(format!("crds/{plural}.yaml"))).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap().into_iter().find(|d| !d.is_null()).unwrap()
}

fn pool(spec: Value) -> Value {
    json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
           "metadata": {"name": "mail", "namespace": "default"}, "spec": spec})
}

fn queue(spec: Value) -> Value {
    json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue",
           "metadata": {"name": "emails", "namespace": "default"}, "spec": spec})
}

fn base_pool() -> Value {
    json!({"app": "proj.celery_app", "image": "reg/proj:1", "queues": ["emails"]})
}

fn with(mut base: Value, path: &str, value: Value) -> Value {
    let mut target = &mut base;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        target = target.as_object_mut().unwrap().entry(part.to_string()).or_insert(json!({}));
    }
    target[parts[parts.len() - 1]] = value;
    base
}

fn base_queue() -> Value {
    json!({"broker": {"urlFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}})
}

/// (what is wrong, document, field the error must name, words the message must contain)
fn invalid_documents() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    vec![
        (
            "min above max",
            pool(with(base_pool(), "autoscaling", json!({"minReplicas": 5, "maxReplicas": 2}))),
            "spec.autoscaling",
            "minReplicas must be less than or equal to maxReplicas",
        ),
        (
            "fallback outside bounds",
            pool(with(base_pool(), "autoscaling", json!({"maxReplicas": 2, "fallbackReplicas": 9}))),
            "spec.autoscaling",
            "fallbackReplicas must lie between",
        ),
        (
            "latency target shorter than a poll",
            pool(with(
                base_pool(),
                "autoscaling",
                json!({"maxReplicas": 5, "pollIntervalSeconds": 10, "targetLatencySeconds": 5}),
            )),
            "spec.autoscaling",
            "targetLatencySeconds must be at least pollIntervalSeconds",
        ),
        (
            "zero latency target",
            pool(with(base_pool(), "autoscaling", json!({"maxReplicas": 5, "targetLatencySeconds": 0}))),
            "spec.autoscaling.targetLatencySeconds",
            "should be greater than or equal to 1",
        ),
        (
            "negative lead time",
            pool(with(base_pool(), "autoscaling", json!({"maxReplicas": 5, "leadTimeSeconds": -1}))),
            "spec.autoscaling.leadTimeSeconds",
            "should be greater than or equal to 0",
        ),
        (
            "soft limit not below hard limit",
            pool(with(base_pool(), "worker", json!({"softTimeLimitSeconds": 60, "timeLimitSeconds": 60}))),
            "spec.worker",
            "softTimeLimitSeconds must be less than timeLimitSeconds",
        ),
        (
            "-B in extraArgs",
            pool(with(base_pool(), "worker", json!({"extraArgs": ["-B"]}))),
            "spec.worker.extraArgs",
            "beat runs as its own Deployment",
        ),
        (
            "--purge in extraArgs",
            pool(with(base_pool(), "worker", json!({"extraArgs": ["--purge"]}))),
            "spec.worker.extraArgs",
            "--purge",
        ),
        (
            "-Q in extraArgs",
            pool(with(base_pool(), "worker", json!({"extraArgs": ["-Q", "other"]}))),
            "spec.worker.extraArgs",
            "-Q/--queues",
        ),
        (
            "--concurrency= in extraArgs",
            pool(with(base_pool(), "worker", json!({"extraArgs": ["--concurrency=9"]}))),
            "spec.worker.extraArgs",
            "-c/--concurrency",
        ),
        (
            "-A in extraArgs",
            pool(with(base_pool(), "worker", json!({"extraArgs": ["-A", "other.app"]}))),
            "spec.worker.extraArgs",
            "-A/--app",
        ),
        (
            "duplicate queue",
            pool(with(base_pool(), "queues", json!(["emails", "emails"]))),
            "spec.queues",
            "must not list a TaskQueue twice",
        ),
        ("no queues", pool(with(base_pool(), "queues", json!([]))), "spec.queues", ""),
        (
            "queue name not a DNS name",
            pool(with(base_pool(), "queues", json!(["Emails_Q"]))),
            "spec.queues",
            "lowercase DNS",
        ),
        (
            "unknown execution pool",
            pool(with(base_pool(), "pool", json!("multiprocessing"))),
            "spec.pool",
            "Unsupported value",
        ),
        (
            "zero concurrency",
            pool(with(base_pool(), "concurrency", json!(0))),
            "spec.concurrency",
            "greater than or equal to 1",
        ),
        (
            "negative replicas",
            pool(with(base_pool(), "replicas", json!(-1))),
            "spec.replicas",
            "greater than or equal to 0",
        ),
        (
            "app not a module path",
            pool(with(base_pool(), "app", json!("my app; rm -rf /"))),
            "spec.app",
            "should match",
        ),
        (
            "schedule claim not an object name",
            pool(with(base_pool(), "beat", json!({"enabled": true, "scheduleClaimName": "Beat_Schedule"}))),
            "spec.beat.scheduleClaimName",
            "should match",
        ),
        ("missing image", pool(json!({"app": "a", "queues": ["emails"]})), "spec.image", "Required"),
        (
            "max replicas zero",
            pool(with(base_pool(), "autoscaling", json!({"maxReplicas": 0}))),
            "spec.autoscaling.maxReplicas",
            "greater than or equal to 1",
        ),
        (
            "poll interval zero",
            pool(with(base_pool(), "autoscaling", json!({"maxReplicas": 3, "pollIntervalSeconds": 0}))),
            "spec.autoscaling.pollIntervalSeconds",
            "greater than or equal to 1",
        ),
        ("concurrency as string", pool(with(base_pool(), "concurrency", json!("four"))), "spec.concurrency", "integer"),
        (
            "password in plain url",
            queue(json!({"broker": {"url": "redis://:hunter2@redis:6379/0"}})),
            "spec.broker.url",
            "must not contain a user or password",
        ),
        (
            "both url and urlFrom",
            queue(with(base_queue(), "broker.url", json!("redis://redis:6379/0"))),
            "spec.broker",
            "exactly one of url or urlFrom",
        ),
        (
            "neither url nor urlFrom",
            queue(json!({"broker": {"safetyCheck": "Warn"}})),
            "spec.broker",
            "exactly one of url or urlFrom",
        ),
        ("unsupported scheme", queue(json!({"broker": {"url": "sqs://queue"}})), "spec.broker.url", "should match"),
        (
            "password in a later sentinel of the list",
            queue(json!({"broker": {"url": "sentinel://s1:26379;sentinel://:hunter2@s2:26379/0",
                                    "transportOptions": {"masterName": "mymaster"}}})),
            "spec.broker.url",
            "must not contain a user or password",
        ),
        (
            "sentinel without a master name",
            queue(json!({"broker": {"url": "sentinel://s1:26379;sentinel://s2:26379/0"}})),
            "spec.broker",
            "a sentinel:// url needs transportOptions.masterName",
        ),
        (
            "unknown safety mode",
            queue(with(base_queue(), "broker.safetyCheck", json!("Ignore"))),
            "spec.broker.safetyCheck",
            "Unsupported value",
        ),
        (
            "priority step out of range",
            queue(with(base_queue(), "broker.transportOptions", json!({"prioritySteps": [0, 300]}))),
            "spec.broker.transportOptions.prioritySteps",
            "integers from 0 to 255",
        ),
        (
            "repeated priority step",
            queue(with(base_queue(), "broker.transportOptions", json!({"prioritySteps": [0, 3, 3]}))),
            "spec.broker.transportOptions.prioritySteps",
            "must not repeat",
        ),
        (
            "secret name not a DNS name",
            queue(json!({"broker": {"urlFrom": {"secretKeyRef": {"name": "Bad_Name", "key": "url"}}}})),
            "spec.broker.urlFrom.secretKeyRef.name",
            "should match",
        ),
        (
            "queue name with spaces",
            queue(with(base_queue(), "queueName", json!("my queue"))),
            "spec.queueName",
            "should match",
        ),
    ]
}

fn admit(doc: &Value) -> Result<Value, Vec<celery_e2e::admission::FieldError>> {
    let plural = if doc["kind"] == "WorkerPool" { "workerpools" } else { "taskqueues" };
    celery_e2e::admission::validate(&crd(plural), doc, None)
}

#[test]
fn invalid_documents_are_refused_naming_the_field() {
    let cases = invalid_documents();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for (what, doc, field, words) in cases {
        match admit(&doc) {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(errors) => {
                let hit = errors.iter().any(|e| e.field == field && e.message.contains(words));
                if !hit {
                    failures.push(format!("{what}: expected {field} / {words:?}, got {errors:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_operator_refuses_the_same_cel_violations_offline() {
    // render and the reconciler evaluate the CEL rules without an API server; they must agree.
    for (what, doc, field, words) in invalid_documents() {
        let is_cel = words.contains("must") || words.contains("exactly one") || words.contains("beat runs");
        if !is_cel {
            continue;
        }
        let errors = if doc["kind"] == "WorkerPool" {
            celery_operator::validate::check_worker_pool(&serde_json::from_value(doc).unwrap())
        } else {
            celery_operator::validate::check_task_queue(&serde_json::from_value(doc).unwrap())
        };
        assert!(errors.iter().any(|e| e.field == field && e.message.contains(words)), "{what}: {errors:?}");
    }
}

#[test]
fn every_example_is_accepted() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            if doc["apiVersion"].as_str().is_some_and(|v| v.starts_with("celery-operator.dev/")) {
                let doc = with(doc, "metadata.namespace", json!("default"));
                admit(&doc).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                seen += 1;
            }
        }
    }
    assert!(seen >= 5, "examples hold TaskQueues and WorkerPools");
}

#[test]
fn defaults_are_applied_by_the_schema() {
    let admitted = admit(&pool(base_pool())).unwrap();
    assert_eq!(admitted["spec"]["concurrency"], 1);
    assert_eq!(admitted["spec"]["worker"]["prefetchMultiplier"], 1);
    assert_eq!(admitted["spec"]["replicas"], 1);
    let admitted = admit(&queue(base_queue())).unwrap();
    assert_eq!(admitted["spec"]["broker"]["safetyCheck"], "Warn");
    assert_eq!(admitted["spec"]["broker"]["transportOptions"]["prioritySteps"], json!([0, 3, 6, 9]));
}

#[test]
fn a_sentinel_url_with_its_master_name_and_a_ca_secret_are_accepted() {
    let doc = queue(json!({"broker": {
        "url": "sentinel://s1:26379;sentinel://s2:26379/0",
        "transportOptions": {"masterName": "mymaster"},
        "tls": {"caFrom": {"secretKeyRef": {"name": "redis-ca", "key": "ca.crt"}}},
    }}));
    let admitted = admit(&doc).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(admitted["spec"]["broker"]["transportOptions"]["masterName"], "mymaster");
}
