//! Every API call the operator makes, recorded from the control-plane double's request log while
//! the real controllers (with leader election) run through the reconcile paths. The result is
//! checked in as charts/tests/rbac-observed.json; the chart's tests assert its RBAC rules grant
//! exactly these permissions — nothing missing, nothing extra.

mod common;
use common::poll;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use celery_e2e::ApiServer;
use celery_operator::controller::run_all;
use celery_operator::leader::{LeaseOptions, shutdown_when};
use celery_operator::metrics::Metrics;
use celery_operator::reconcile::Context;
use serde_json::{Value, json};

/// Creates an object through the double's direct state access: not an API request, so the
/// request log holds the operator's calls only.
fn create(api: &ApiServer, kind: &str, api_version: &str, mut doc: Value) {
    doc["apiVersion"] = api_version.into();
    doc["kind"] = kind.into();
    doc["metadata"]["namespace"] = "prod".into();
    api.create(doc).unwrap();
}

fn exists(api: &ApiServer, kind: &str, name: &str) -> bool {
    api.get("apps/v1", kind, Some("prod"), name).unwrap().is_some()
}

#[tokio::test]
async fn the_operators_api_calls_match_the_checked_in_rbac_set() {
    let redis = e2e_harness::RedisServer::start().unwrap();
    let api = ApiServer::new();
    api.load_crds_from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")).unwrap();
    // KEDA installed: the autoscaler watches ScaledObjects for conflicts.
    api.add_crd(&common::keda_scaled_object_crd()).unwrap();
    let ctx = Arc::new(Context::new(api.client(), Arc::new(Metrics::new()), Some("rbac".into())));
    let lease = LeaseOptions {
        name: "celery-operator".into(),
        namespace: "prod".into(),
        identity: "rbac".into(),
        duration_seconds: 5,
        grace_seconds: 1,
        metrics: ctx.metrics.clone(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = shutdown_when(async move {
        let _ = stopped.await;
    });
    let operator = tokio::spawn(run_all(ctx, vec![Some("prod".into())], Some(lease), shutdown));

    // Every reconcile path: a queue whose Secret appears later, pools with beat and a conflict, a
    // pool whose queue is missing, beat scaled by hand, a beat pool deleted.
    const CRD: &str = "celery-operator.dev/v1alpha1";
    create(
        &api,
        "TaskQueue",
        CRD,
        json!({"metadata": {"name": "emails"},
        "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}}}),
    );
    let pool = |name: &str, queue: &str| {
        json!({"metadata": {"name": name},
        "spec": {"app": "a.app", "image": "i", "queues": [queue], "beat": {"enabled": true}}})
    };
    create(&api, "WorkerPool", CRD, pool("mail", "emails"));
    create(&api, "WorkerPool", CRD, pool("other", "emails"));
    create(
        &api,
        "WorkerPool",
        CRD,
        json!({"metadata": {"name": "lost"}, "spec": {"app": "a.app", "image": "i", "queues": ["nope"]}}),
    );
    create(&api, "Secret", "v1", json!({"metadata": {"name": "redis"}, "stringData": {"url": redis.url()}}));
    poll("beat runs", || async { exists(&api, "Deployment", "mail-beat") }).await;
    let mut beat = api.get("apps/v1", "Deployment", Some("prod"), "mail-beat").unwrap().unwrap();
    beat["spec"]["replicas"] = 2.into();
    api.put(beat).unwrap();
    api.delete(CRD, "WorkerPool", Some("prod"), "mail").unwrap();
    api.collect_garbage();
    poll("the other pool takes beat over", || async { exists(&api, "Deployment", "other-beat") }).await;
    // The pool gives beat up: the operator deletes its beat Deployment.
    let mut other = api.get(CRD, "WorkerPool", Some("prod"), "other").unwrap().unwrap();
    other["spec"]["beat"]["enabled"] = false.into();
    api.put(other).unwrap();
    poll("beat removed", || async { !exists(&api, "Deployment", "other-beat") }).await;
    // The same warning twice: the event recorder patches the first event into a series.
    for _ in 0..2 {
        create(&api, "TaskQueue", CRD, json!({"metadata": {"name": "nope"}, "spec": {"broker": {"url": redis.url()}}}));
        poll("the lost pool recovers", || async { exists(&api, "Deployment", "lost-worker") }).await;
        api.delete(CRD, "TaskQueue", Some("prod"), "nope").unwrap();
        poll("the lost pool stalls again", || async {
            let p = api.get(CRD, "WorkerPool", Some("prod"), "lost").unwrap().unwrap();
            p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Stalled"))
        })
        .await;
        api.delete("apps/v1", "Deployment", Some("prod"), "lost-worker").unwrap();
    }
    // The autoscaler: a backlog scales an autoscaled pool up; once the backlog is gone, a worker
    // heartbeat (published as a Celery worker would) marks one pod busy, and the scale-in first
    // sets pod deletion costs. An HPA on another pool is watched for conflicts.
    create(
        &api,
        "WorkerPool",
        CRD,
        json!({"metadata": {"name": "auto"}, "spec": {"app": "a.app", "image": "i", "queues": ["emails"],
               "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "targetPerReplica": 1,
                               "scaleDownStabilizationSeconds": 0}}}),
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .unwrap();
    let _: i64 = redis::cmd("LPUSH").arg("emails").arg(&["a", "b", "c"]).query_async(&mut conn).await.unwrap();
    poll("the autoscaler scales up", || async {
        api.get("apps/v1", "Deployment", Some("prod"), "auto-worker")
            .unwrap()
            .is_some_and(|d| d["spec"]["replicas"] == 3)
    })
    .await;
    create(
        &api,
        "Pod",
        "v1",
        json!({"metadata": {"name": "auto-worker-1", "labels": {"app.kubernetes.io/name": "celery",
               "app.kubernetes.io/instance": "auto", "app.kubernetes.io/component": "worker"}},
               "spec": {"containers": [{"name": "worker", "image": "i"}]}}),
    );
    let heartbeat = json!({"hostname": "auto@auto-worker-1", "active": 1, "processed": 1, "freq": 2.0,
                           "timestamp": 0.0, "type": "worker-heartbeat"});
    let envelope = json!({"body": heartbeat.to_string(), "content-type": "application/json",
                          "properties": {}})
    .to_string();
    let publisher = tokio::spawn(async move {
        loop {
            let _: Result<i64, _> =
                redis::cmd("PUBLISH").arg("/0.celeryev/worker.heartbeat").arg(&envelope).query_async(&mut conn).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    poll("the heartbeat is counted as in flight", || async {
        api.get(CRD, "WorkerPool", Some("prod"), "auto").unwrap().is_some_and(|p| p["status"]["inFlight"] == 1)
    })
    .await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL").arg("emails").query_async(&mut conn).await.unwrap();
    poll("the busy pod is marked before the scale-in", || async {
        api.get("v1", "Pod", Some("prod"), "auto-worker-1")
            .unwrap()
            .is_some_and(|p| p["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == "1")
    })
    .await;
    poll("scaled in to the one busy worker", || async {
        api.get("apps/v1", "Deployment", Some("prod"), "auto-worker")
            .unwrap()
            .is_some_and(|d| d["spec"]["replicas"] == 1)
    })
    .await;
    publisher.abort();
    poll("the queue is probed", || async {
        let tq = api.get(CRD, "TaskQueue", Some("prod"), "emails").unwrap().unwrap();
        tq["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "BrokerReachable"))
    })
    .await;
    stop.send(()).unwrap();
    operator.await.unwrap().unwrap();

    let observed: BTreeSet<(String, String, String)> = api
        .requests()
        .into_iter()
        .map(|r| {
            let resource = match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            };
            (r.group.clone(), resource, r.verb.as_str().to_string())
        })
        .collect();

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tests/rbac-observed.json");
    let rendered = serde_json::to_string_pretty(
        &observed.iter().map(|(g, r, v)| json!({"apiGroup": g, "resource": r, "verb": v})).collect::<Vec<_>>(),
    )
    .unwrap()
        + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == rendered,
        "the operator's API calls changed: rerun with UPDATE_GOLDEN=1, review charts/tests/rbac-observed.json \
         and update charts/celery-operator/templates/_rbac-rules.tpl to match. Observed:\n{rendered}"
    );
}

/// A Redis client that tolerates a loaded machine (the default response timeout is 0.5 s).
fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(Some(std::time::Duration::from_secs(30)))
}
