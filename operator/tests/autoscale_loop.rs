//! The autoscaler loop against the control-plane double and a real Redis: the operator's
//! controllers run in-process, the pod runner simulates pods (no processes), and the backlog is
//! made of real list entries in kombu's key layout. Real Celery workers scaling under load are in
//! the e2e scenarios; these tests pin the loop's contract: one step up, the window down, status and
//! conditions, holding on broker failure, backing off for another autoscaler, and no writes when
//! nothing changes.

mod common;
use common::poll;

use std::path::Path;
use std::sync::Arc;

use celery_e2e::{ApiServer, Fault, PodRunner, RequestMatch, RunnerConfig, Verb};
use celery_operator::autoscale::scaler::FIELD_MANAGER;
use celery_operator::controller::run_all;
use celery_operator::leader::shutdown_when;
use celery_operator::metrics::Metrics;
use celery_operator::reconcile::Context;
use e2e_harness::RedisServer;
use serde_json::{Value, json};

const CRD: &str = "celery-operator.dev/v1alpha1";

struct Env {
    api: ApiServer,
    redis: RedisServer,
    metrics: Arc<Metrics>,
    /// What the operator's `/readyz` answers.
    health: celery_operator::http::Health,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: Option<tokio::task::JoinHandle<kube_lease_manager::Result<()>>>,
    _runner: PodRunner,
}

impl Env {
    async fn start() -> Env {
        Self::start_with(|_| {}).await
    }

    /// Starts with `before` applied to the double before the operator's first request.
    async fn start_with(before: impl FnOnce(&ApiServer)) -> Env {
        let redis = RedisServer::builder().start().unwrap();
        let api = ApiServer::new();
        api.load_crds_from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")).unwrap();
        api.add_crd(&common::keda_scaled_object_crd()).unwrap();
        before(&api);
        let runner = PodRunner::start(&api, RunnerConfig::simulated()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(Context::new(api.client(), metrics.clone(), Some("test".into())));
        let health = celery_operator::http::Health::new(metrics.clone())
            .with_watches(ctx.watches.clone(), celery_operator::http::WATCH_GRACE);
        health.set_ready(true);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = shutdown_when(async move {
            let _ = stopped.await;
        });
        let operator = tokio::spawn(run_all(ctx, vec![Some("prod".into())], None, shutdown));
        Env { api, redis, metrics, health, stop: Some(stop), operator: Some(operator), _runner: runner }
    }

    fn create(&self, kind: &str, api_version: &str, mut doc: Value) {
        doc["apiVersion"] = api_version.into();
        doc["kind"] = kind.into();
        doc["metadata"]["namespace"] = "prod".into();
        self.api.create(doc).unwrap();
    }

    fn queue(&self, name: &str) {
        self.create(
            "TaskQueue",
            CRD,
            json!({"metadata": {"name": name}, "spec": {"broker": {"url": self.redis.url()}}}),
        );
    }

    fn pool(&self, name: &str, queue: &str, autoscaling: Value) {
        self.create(
            "WorkerPool",
            CRD,
            json!({"metadata": {"name": name},
                   "spec": {"app": "a.app", "image": "i", "queues": [queue], "autoscaling": autoscaling}}),
        );
    }

    fn get(&self, api_version: &str, kind: &str, name: &str) -> Option<Value> {
        self.api.get(api_version, kind, Some("prod"), name).unwrap()
    }

    fn replicas(&self, deployment: &str) -> Option<i64> {
        self.get("apps/v1", "Deployment", deployment)?["spec"]["replicas"].as_i64()
    }

    fn status(&self, pool: &str) -> Value {
        self.get(CRD, "WorkerPool", pool).map(|p| p["status"].clone()).unwrap_or_default()
    }

    fn condition(&self, pool: &str, type_: &str) -> Option<(String, String)> {
        let status = self.status(pool);
        let c = status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
        Some((c["status"].as_str()?.to_string(), c["reason"].as_str()?.to_string()))
    }

    /// Successful writes by the autoscaler's field manager to a resource since the log was cleared.
    fn autoscaler_writes(&self, resource: &str, subresource: Option<&str>) -> usize {
        self.api
            .writes()
            .iter()
            .filter(|r| r.field_manager.as_deref() == Some(FIELD_MANAGER))
            .filter(|r| r.resource == resource && r.subresource.as_deref() == subresource)
            .filter(|r| r.is_successful_write())
            .count()
    }

    async fn push(&self, queue: &str, n: usize) {
        let client = redis::Client::open(self.redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection_with_config(&patient()).await.unwrap();
        let items: Vec<String> = (0..n).map(|i| format!("{{\"task\": {i}}}")).collect();
        let _: i64 = redis::cmd("LPUSH").arg(queue).arg(items).query_async(&mut conn).await.unwrap();
    }

    async fn drain(&self, queue: &str) {
        let client = redis::Client::open(self.redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection_with_config(&patient()).await.unwrap();
        let _: i64 = redis::cmd("DEL").arg(queue).query_async(&mut conn).await.unwrap();
    }

    /// Broker polls decided so far (every poll records one decision latency sample).
    fn polls(&self) -> u64 {
        let text = self.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix("celery_operator_autoscaler_decision_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `/readyz`: status code and body.
    async fn readyz(&self) -> (u16, String) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let request = axum::http::Request::get("/readyz").body(axum::body::Body::empty()).unwrap();
        let response = celery_operator::http::router(self.health.clone()).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.operator.take().unwrap().await.unwrap().unwrap();
    }
}

fn policy(min: i64, max: i64, stabilization: i64) -> Value {
    json!({"minReplicas": min, "maxReplicas": max, "targetPerReplica": 2, "pollIntervalSeconds": 1,
           "scaleDownStabilizationSeconds": stabilization})
}

#[tokio::test]
async fn a_backlog_scales_from_zero_in_one_step_and_back_after_the_window() {
    let env = Env::start().await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(0, 10, 2));
    // Created at minReplicas, not at Kubernetes' default of one.
    poll("the worker Deployment exists at 0 replicas", || async { env.replicas("auto-worker") == Some(0) }).await;
    poll("the autoscaler has decided", || async { env.status("auto")["desiredReplicas"] == 0 }).await;
    env.api.clear_requests();

    env.push("jobs", 7).await;
    poll("scaled to ceil(7 / 2) = 4", || async { env.replicas("auto-worker") == Some(4) }).await;
    assert_eq!(env.autoscaler_writes("deployments", None), 1, "0 → 4 in one step, one write");
    poll("status shows the decision", || async {
        let s = env.status("auto");
        s["desiredReplicas"] == 4 && s["backlog"] == 7 && s["inFlight"] == 0
    })
    .await;
    let status = env.status("auto");
    assert!(status["lastScaleTime"].is_string(), "{status}");
    assert_eq!(status["lastScaleReason"], "scaled from 0 to 4: backlog 7 and 0 in flight need 4 replicas");
    assert_eq!(env.condition("auto", "ScalingActive"), Some(("True".into(), "ScalingFromQueueDepth".into())));
    assert_eq!(env.condition("auto", "ScalingLimited"), Some(("False".into(), "DesiredWithinRange".into())));
    // The reconciler's conditions survive beside the autoscaler's (each applies only its own).
    poll("Ready is kept beside the scaling conditions", || async { env.condition("auto", "Ready").is_some() }).await;

    env.drain("jobs").await;
    poll("back to minReplicas after the window", || async { env.replicas("auto-worker") == Some(0) }).await;
    assert_eq!(env.autoscaler_writes("deployments", None), 2, "4 → 0 in one step too");
    poll("status says why", || async {
        env.status("auto")["lastScaleReason"].as_str().is_some_and(|r| r.starts_with("scaled from 4 to 0"))
    })
    .await;
    let events = env.api.list("events.k8s.io/v1", "Event", Some("prod")).unwrap();
    assert!(events.iter().any(|e| e["reason"] == "ScaledUp"), "a ScaledUp event: {events:?}");
    env.stop().await;
}

#[tokio::test]
async fn the_bounds_hold_and_say_so() {
    let env = Env::start().await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(1, 3, 0));
    poll("at minReplicas", || async { env.replicas("auto-worker") == Some(1) }).await;
    env.push("jobs", 100).await;
    poll("held at maxReplicas", || async { env.replicas("auto-worker") == Some(3) }).await;
    poll("ScalingLimited says so", || async {
        env.condition("auto", "ScalingLimited") == Some(("True".into(), "TooManyReplicas".into()))
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn nothing_is_written_while_nothing_changes() {
    let env = Env::start().await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(0, 10, 0));
    env.push("jobs", 3).await;
    poll("scaled", || async { env.replicas("auto-worker") == Some(2) }).await;
    poll("ready", || async { env.status("auto")["readyReplicas"] == 2 && env.status("auto")["backlog"] == 3 }).await;
    env.api.clear_requests();
    let before = env.polls();
    poll("five more polls", || async { env.polls() >= before + 5 }).await;
    let writes: Vec<_> = env
        .api
        .writes()
        .into_iter()
        .filter(|r| r.is_successful_write() && r.resource != "events" && r.resource != "leases")
        .map(|r| format!("{:?} {}/{:?} {:?}", r.verb, r.resource, r.subresource, r.name))
        .collect();
    assert!(writes.is_empty(), "steady polls wrote: {writes:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_broker_outage_holds_the_replicas_and_recovers() {
    let mut env = Env::start().await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(0, 10, 0));
    env.push("jobs", 6).await;
    poll("scaled to 3", || async { env.replicas("auto-worker") == Some(3) }).await;
    env.redis.kill();
    poll("ScalingActive=False/BrokerUnreachable", || async {
        env.condition("auto", "ScalingActive") == Some(("False".into(), "BrokerUnreachable".into()))
    })
    .await;
    env.api.clear_requests();
    let polls = env.polls();
    poll("more failed polls", || async { env.polls() >= polls + 3 }).await;
    assert_eq!(env.replicas("auto-worker"), Some(3), "a failed probe never scales down");
    assert_eq!(env.autoscaler_writes("workerpools", Some("status")), 0, "an outage is written once, not per poll");
    env.redis.restart().unwrap();
    poll("scaling again", || async {
        env.condition("auto", "ScalingActive") == Some(("True".into(), "ScalingFromQueueDepth".into()))
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn an_hpa_on_the_worker_deployment_stops_the_autoscaler_for_that_pool_only() {
    let env = Env::start().await;
    env.queue("jobs");
    env.queue("other");
    env.pool("auto", "jobs", policy(0, 10, 0));
    env.pool("control", "other", policy(0, 10, 0));
    poll("both exist", || async {
        env.replicas("auto-worker") == Some(0) && env.replicas("control-worker") == Some(0)
    })
    .await;
    env.create(
        "HorizontalPodAutoscaler",
        "autoscaling/v2",
        json!({"metadata": {"name": "cpu"}, "spec": {"maxReplicas": 5,
               "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "auto-worker"}}}),
    );
    poll("ScalerConflict", || async {
        env.condition("auto", "ScalingActive") == Some(("False".into(), "ScalerConflict".into()))
    })
    .await;
    let message = env.status("auto")["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ScalingActive")
        .unwrap()["message"]
        .clone();
    assert!(message.as_str().unwrap().contains("HorizontalPodAutoscaler \"cpu\""), "{message}");
    env.push("jobs", 6).await;
    env.push("other", 6).await;
    // Both queues are on one broker, polled together: once the control pool scaled, the poll that
    // saw the conflicting pool's backlog has happened too.
    poll("the control pool scales", || async { env.replicas("control-worker") == Some(3) }).await;
    let polls = env.polls();
    poll("another poll", || async { env.polls() > polls }).await;
    assert_eq!(env.replicas("auto-worker"), Some(0), "the autoscaler does not fight the HPA");
    env.api.delete("autoscaling/v2", "HorizontalPodAutoscaler", Some("prod"), "cpu").unwrap();
    poll("scaled once the HPA is gone", || async { env.replicas("auto-worker") == Some(3) }).await;
    env.stop().await;
}

#[tokio::test]
async fn without_autoscaling_the_scale_subresource_sets_the_replicas() {
    let env = Env::start().await;
    env.queue("jobs");
    env.create(
        "WorkerPool",
        CRD,
        json!({"metadata": {"name": "fixed"}, "spec": {"app": "a.app", "image": "i", "queues": ["jobs"], "replicas": 1}}),
    );
    poll("one replica", || async { env.replicas("fixed-worker") == Some(1) }).await;
    let client = env.api.client();
    let pools: kube::Api<celery_operator::crd::WorkerPool> = kube::Api::namespaced(client, "prod");
    pools
        .patch_scale(
            "fixed",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    poll("the Deployment follows the scale subresource", || async { env.replicas("fixed-worker") == Some(4) }).await;
    poll("status reports it", || async {
        let s = env.status("fixed");
        s["desiredReplicas"] == 4 && s["replicas"] == 4
    })
    .await;
    assert_eq!(env.autoscaler_writes("deployments", None), 0, "the autoscaler leaves fixed pools alone");
    env.stop().await;
}

#[tokio::test]
async fn a_keda_scaled_object_on_the_pool_is_a_conflict_too() {
    let env = Env::start().await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(0, 10, 0));
    poll("the Deployment exists", || async { env.replicas("auto-worker") == Some(0) }).await;
    env.create(
        "ScaledObject",
        "keda.sh/v1alpha1",
        json!({"metadata": {"name": "jobs-scaler"}, "spec": {"scaleTargetRef": {"name": "auto-worker"}}}),
    );
    poll("ScalerConflict", || async {
        env.condition("auto", "ScalingActive") == Some(("False".into(), "ScalerConflict".into()))
    })
    .await;
    env.stop().await;
}

/// The HPA API refused (`code` 403) or not served (404): the autoscaler still scales, and says on
/// ScalingActive (reason ScalerConflictUnchecked, the API named), in a metric and on `/readyz`
/// that it cannot see another autoscaler on the pool.
async fn scales_without_the_hpa_api(code: u16) {
    let hpas = RequestMatch::any().resource("horizontalpodautoscalers");
    let env = Env::start_with(|api| api.inject(Fault::error(code).on(hpas))).await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(0, 10, 0));
    poll("the Deployment exists", || async { env.replicas("auto-worker") == Some(0) }).await;
    env.push("jobs", 6).await;
    poll("scaled to ceil(6 / 2) = 3", || async { env.replicas("auto-worker") == Some(3) }).await;
    poll("ScalingActive says conflicts are not checked", || async {
        env.condition("auto", "ScalingActive") == Some(("True".into(), "ScalerConflictUnchecked".into()))
    })
    .await;
    let status = env.status("auto");
    let active = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "ScalingActive").unwrap();
    let message = active["message"].as_str().unwrap();
    assert!(message.contains("horizontalpodautoscalers") && message.contains(&code.to_string()), "{message}");
    let metric = "celery_operator_optional_api_unavailable{resource=\"horizontalpodautoscalers\"} 1";
    assert!(env.metrics.encode().contains(metric), "{}", env.metrics.encode());
    assert!(env.api.requests().iter().any(|r| r.resource == "horizontalpodautoscalers" && r.injected));
    let (status, body) = env.readyz().await;
    assert_eq!(status, 200, "a missing optional API is no reason to be unready: {body}");
    assert!(body.contains("without conflict detection for prod/horizontalpodautoscalers"), "{body}");
    env.stop().await;
}

#[tokio::test]
async fn a_forbidden_hpa_api_disables_only_conflict_detection() {
    scales_without_the_hpa_api(403).await;
}

#[tokio::test]
async fn an_hpa_api_not_served_disables_only_conflict_detection() {
    scales_without_the_hpa_api(404).await;
}

/// Each kind the operator reads is watched once per scope, shared by the controllers and the
/// autoscaler (it was three watches of WorkerPools, three of TaskQueues and two of Deployments).
#[tokio::test]
async fn one_open_watch_per_kind() {
    let env = Env::start().await;
    env.queue("jobs");
    env.pool("auto", "jobs", policy(1, 3, 0));
    poll("the pool is scaled and reported", || async {
        env.replicas("auto-worker") == Some(1) && env.condition("auto", "ScalingActive").is_some()
    })
    .await;
    let mut watches: std::collections::BTreeMap<String, usize> = Default::default();
    for r in env.api.requests().iter().filter(|r| r.verb == Verb::Watch) {
        *watches.entry(r.resource.clone()).or_default() += 1;
    }
    let kinds = ["deployments", "horizontalpodautoscalers", "scaledobjects", "secrets", "taskqueues", "workerpools"];
    let expected: std::collections::BTreeMap<String, usize> = kinds.iter().map(|k| (k.to_string(), 1)).collect();
    assert_eq!(watches, expected, "watch requests by resource");
    assert_eq!(env.api.open_watches(), kinds.len(), "open watches");
    env.stop().await;
}

/// 200 autoscaled pools (on 20 TaskQueues of one Redis) with no work: once converged, a poll of
/// their broker costs the broker round trip and nothing on the API server: over several poll
/// intervals, not one request but the watches' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_fleet_of_200_pools_makes_no_api_request_per_poll() {
    let env = Env::start().await;
    for q in 0..20 {
        env.queue(&format!("jobs-{q}"));
    }
    for p in 0..200 {
        env.pool(&format!("pool-{p}"), &format!("jobs-{}", p % 20), policy(1, 5, 0));
    }
    poll("every pool at minReplicas, rolled out and decided", || async {
        let pools = env.api.list(CRD, "WorkerPool", Some("prod")).unwrap();
        pools.len() == 200
            && pools.iter().all(|p| {
                let s = &p["status"];
                s["desiredReplicas"] == 1
                    && s["readyReplicas"] == 1
                    && s["backlog"] == 0
                    && s["observedGeneration"] == p["metadata"]["generation"]
            })
    })
    .await;
    // Converged: nothing in flight and nothing sent for a second (what a reconcile under way
    // still sends belongs to convergence).
    let (mut seen, mut since) = (env.api.request_count(), tokio::time::Instant::now());
    poll("the operator goes quiet", || {
        let count = env.api.request_count();
        if count != seen || env.api.requests_in_flight() > 0 {
            (seen, since) = (count, tokio::time::Instant::now());
        }
        let quiet = since.elapsed() >= std::time::Duration::from_secs(1);
        async move { quiet }
    })
    .await;
    let mark = env.api.request_count();
    let polls = env.polls();
    poll("five more polls of the broker", || async { env.polls() >= polls + 5 }).await;
    let sent: Vec<String> = env
        .api
        .requests()
        .into_iter()
        .skip(mark)
        .filter(|r| r.verb != Verb::Watch)
        .map(|r| format!("{} {}/{:?} {:?} -> {}", r.verb.as_str(), r.resource, r.subresource, r.name, r.status))
        .collect();
    assert!(sent.is_empty(), "a steady fleet sent requests during 5 polls: {sent:?}");
    env.stop().await;
}

/// 50 pools get work at the same moment: the poll that sees it writes every pool's replicas before
/// any pool's Event or status, so the last pool is not kept waiting behind the others' bookkeeping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_50_pools_writes_every_replica_count_before_any_event_or_status() {
    let env = Env::start().await;
    env.queue("burst");
    for p in 0..50 {
        env.pool(&format!("pool-{p}"), "burst", policy(0, 10, 0));
    }
    poll("every pool decided at zero", || async {
        let pools = env.api.list(CRD, "WorkerPool", Some("prod")).unwrap();
        pools.len() == 50 && pools.iter().all(|p| p["status"]["desiredReplicas"] == 0)
    })
    .await;
    let mark = env.api.request_count();
    env.push("burst", 7).await;
    poll("every pool scaled to ceil(7 / 2) = 4 and reporting it", || async {
        (0..50).all(|p| {
            env.replicas(&format!("pool-{p}-worker")) == Some(4)
                && env.status(&format!("pool-{p}"))["desiredReplicas"] == 4
        })
    })
    .await;
    let requests: Vec<_> = env.api.requests().into_iter().skip(mark).collect();
    let scaled: Vec<usize> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.resource == "deployments" && r.field_manager.as_deref() == Some(FIELD_MANAGER))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(scaled.len(), 50, "one replica write per pool");
    // Polls of one broker never overlap, so every autoscaler status write after the burst poll's
    // first replica write is that poll's. (The reconciler writes its own status and Events when
    // the Deployments change, at any moment; the autoscaler's status follows its Events.)
    let after = requests
        .iter()
        .enumerate()
        .skip(scaled[0])
        .find(|(_, r)| {
            r.resource == "workerpools"
                && r.subresource.as_deref() == Some("status")
                && r.field_manager.as_deref() == Some(FIELD_MANAGER)
        })
        .map(|(i, _)| i)
        .expect("the autoscaler wrote status");
    assert!(
        scaled.iter().all(|&i| i < after),
        "a status write (request {after}) went out before replica writes {scaled:?}"
    );
    env.stop().await;
}

/// A Redis client that tolerates a loaded machine (the default response timeout is 0.5 s).
fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(Some(std::time::Duration::from_secs(30)))
}
