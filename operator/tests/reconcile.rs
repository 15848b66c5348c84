//! Reconciles against the project's control-plane double (e2e/): a stateful in-process API server
//! that validates our CRDs, tracks resourceVersions, generations and server-side-apply field
//! ownership, garbage-collects owned objects and logs every request, so "writes nothing" is a fact
//! we can count. (kube-fake-client is built on kube 4 and a tower-test verifier scripts requests
//! instead of holding state; neither could show a no-op reconcile or a GC.)

mod common;
use common::poll;

use std::path::Path;
use std::sync::Arc;

use celery_e2e::{ApiServer, Verb};
use celery_operator::cache::Stores;
use celery_operator::crd::{TaskQueue, WorkerPool};
use celery_operator::metrics::Metrics;
use celery_operator::reconcile::{Context, Scoped, taskqueue, workerpool};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Client};
use serde_json::{Value, json};

struct Harness {
    api: ApiServer,
    client: Client,
    ctx: Arc<Context>,
    /// The WorkerPool reconciler's context: `ctx` and the watch caches of namespace prod.
    scope: Arc<Scoped>,
}

async fn harness() -> Harness {
    let api = ApiServer::new();
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    api.load_crds_from_dir(crds).expect("CRDs load");
    let client = api.client();
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::new()), Some("test".into())));
    let stores = Stores::start(&ctx, Some("prod")).await;
    stores.wait_until_ready().await;
    let scope = Arc::new(Scoped { ctx: ctx.clone(), stores });
    Harness { api, client, ctx, scope }
}

/// `(name, resourceVersion)` of every object of a kind in prod, sorted.
fn versions<'a>(objects: impl IntoIterator<Item = &'a kube::api::ObjectMeta>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = objects
        .into_iter()
        .map(|m| (m.name.clone().unwrap_or_default(), m.resource_version.clone().unwrap_or_default()))
        .collect();
    v.sort();
    v
}

impl Harness {
    async fn create<K>(&self, doc: Value) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        common::create_in_prod(&self.client, doc).await
    }

    async fn pool(&self, name: &str) -> Arc<WorkerPool> {
        Arc::new(Api::<WorkerPool>::namespaced(self.client.clone(), "prod").get(name).await.unwrap())
    }

    async fn queue(&self, name: &str) -> Arc<TaskQueue> {
        Arc::new(Api::<TaskQueue>::namespaced(self.client.clone(), "prod").get(name).await.unwrap())
    }

    async fn deployment(&self, name: &str) -> Option<Deployment> {
        Api::<Deployment>::namespaced(self.client.clone(), "prod").get_opt(name).await.unwrap()
    }

    /// Waits until the watch caches hold what the double holds (pools, TaskQueues, Deployments),
    /// as a controller's reconcile would find them.
    async fn caught_up(&self) {
        let stores = &self.scope.stores;
        let stored = |api_version: &str, kind: &str| {
            let objects = self.api.list(api_version, kind, Some("prod")).unwrap();
            let metas: Vec<kube::api::ObjectMeta> =
                objects.into_iter().map(|o| serde_json::from_value(o["metadata"].clone()).unwrap()).collect();
            versions(&metas)
        };
        poll("the watch caches to catch up", || async {
            stored("celery-operator.dev/v1alpha1", "WorkerPool")
                == versions(stores.pools.store().state().iter().map(|p| &p.metadata))
                && stored("celery-operator.dev/v1alpha1", "TaskQueue")
                    == versions(stores.queues.store().state().iter().map(|q| &q.metadata))
                && stored("apps/v1", "Deployment")
                    == versions(stores.deployments.store().state().iter().map(|d| &d.metadata))
        })
        .await;
    }

    async fn reconcile_pool(&self, name: &str) -> Action {
        self.caught_up().await;
        // From the cache, as the controller hands it over (a GET here would be in the request log).
        let pool = self.scope.stores.pool("prod", name).expect("the pool is cached");
        workerpool::reconcile(pool, self.scope.clone()).await.expect("reconcile succeeds")
    }

    async fn reconcile_queue(&self, name: &str) -> Action {
        taskqueue::reconcile(self.queue(name).await, self.ctx.clone()).await.expect("reconcile succeeds")
    }

    async fn seed_queue(&self, name: &str) {
        self.create::<Secret>(
            json!({"metadata": {"name": "redis"}, "stringData": {"url": "redis://:s3cret@redis:6379/0"}}),
        )
        .await;
        self.create::<TaskQueue>(json!({"metadata": {"name": name},
            "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}}}))
            .await;
    }
}

fn pool_doc(name: &str, extra: Value) -> Value {
    let mut spec = json!({"app": "proj.celery_app", "image": "reg/proj:1", "queues": ["emails"], "concurrency": 4});
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    json!({"metadata": {"name": name}, "spec": spec})
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} condition in {conditions:?}"))
}

fn args(d: &Deployment) -> Vec<String> {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].args.clone().unwrap()
}

#[tokio::test]
async fn create_applies_worker_and_beat_deployments_and_reports_status() {
    let h = harness().await;
    h.seed_queue("emails").await;
    h.create::<WorkerPool>(pool_doc("mail", json!({"replicas": 3, "beat": {"enabled": true}}))).await;
    h.reconcile_pool("mail").await;

    let worker = h.deployment("mail-worker").await.expect("worker Deployment created");
    assert_eq!(worker.spec.as_ref().unwrap().replicas, Some(3));
    assert!(args(&worker).windows(2).any(|w| w == ["-c", "4"]));
    let owner = &worker.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("WorkerPool", "mail"));
    let beat = h.deployment("mail-beat").await.expect("beat Deployment created");
    assert_eq!(beat.spec.as_ref().unwrap().replicas, Some(1));

    let applied =
        h.api.requests().into_iter().filter(|r| r.is_successful_write() && r.resource == "deployments").count();
    assert_eq!(applied, 2);
    assert!(
        h.api
            .requests()
            .iter()
            .filter(|r| r.resource == "deployments" && r.is_successful_write())
            .all(|r| r.field_manager.as_deref() == Some("celery-operator"))
    );

    let status = h.pool("mail").await.status.clone().expect("status written");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.desired_replicas, Some(3));
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/component=worker,app.kubernetes.io/instance=mail,app.kubernetes.io/name=celery")
    );
    assert_eq!(condition(&status.conditions, "BeatSingleton").status, "True");
    // No pods run in this test, so the pool is still rolling out.
    assert_eq!(condition(&status.conditions, "Ready").status, "False");
    assert_eq!(condition(&status.conditions, "Reconciling").status, "True");
}

#[tokio::test]
async fn a_no_op_reconcile_writes_nothing() {
    let h = harness().await;
    h.seed_queue("emails").await;
    h.create::<WorkerPool>(pool_doc("mail", json!({"beat": {"enabled": true}}))).await;
    h.reconcile_pool("mail").await;
    let before = h.api.write_count();
    for _ in 0..3 {
        h.reconcile_pool("mail").await;
    }
    let writes: Vec<_> = h.api.writes().into_iter().skip(before).collect();
    assert!(writes.is_empty(), "unexpected writes: {writes:?}");
}

#[tokio::test]
async fn a_spec_change_updates_the_deployment_and_observed_generation() {
    let h = harness().await;
    h.seed_queue("emails").await;
    h.create::<WorkerPool>(pool_doc("mail", json!({}))).await;
    h.reconcile_pool("mail").await;
    let pools = Api::<WorkerPool>::namespaced(h.client.clone(), "prod");
    pools.patch("mail", &PatchParams::default(), &Patch::Merge(json!({"spec": {"concurrency": 8}}))).await.unwrap();
    h.reconcile_pool("mail").await;
    let worker = h.deployment("mail-worker").await.unwrap();
    assert!(args(&worker).windows(2).any(|w| w == ["-c", "8"]), "{:?}", args(&worker));
    let pool = h.pool("mail").await;
    assert_eq!(pool.metadata.generation, Some(2));
    assert_eq!(pool.status.as_ref().unwrap().observed_generation, Some(2));
}

#[tokio::test]
async fn beat_scaled_by_hand_goes_back_to_one() {
    let h = harness().await;
    h.seed_queue("emails").await;
    h.create::<WorkerPool>(pool_doc("mail", json!({"beat": {"enabled": true}}))).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = celery_operator::leader::shutdown_when(async move {
        let _ = stopped.await;
    });
    let controller = tokio::spawn(celery_operator::controller::run(h.ctx.clone(), Some("prod".into()), shutdown));

    let deployments = Api::<Deployment>::namespaced(h.client.clone(), "prod");
    let replicas = |d: Option<Deployment>| d.and_then(|d| d.spec).and_then(|s| s.replicas);
    poll("beat at one replica", || async { replicas(deployments.get_opt("mail-beat").await.unwrap()) == Some(1) })
        .await;

    let scale = json!({"spec": {"replicas": 3}});
    deployments.patch_scale("mail-beat", &PatchParams::default(), &Patch::Merge(&scale)).await.unwrap();
    poll("beat at one replica", || async { replicas(deployments.get_opt("mail-beat").await.unwrap()) == Some(1) })
        .await;

    stop.send(()).unwrap();
    controller.await.unwrap();
}

#[tokio::test]
async fn a_second_beat_for_the_same_app_is_refused() {
    let h = harness().await;
    h.seed_queue("emails").await;
    h.create::<WorkerPool>(pool_doc("first", json!({"beat": {"enabled": true}}))).await;
    h.create::<WorkerPool>(pool_doc("second", json!({"beat": {"enabled": true}}))).await;
    h.reconcile_pool("first").await;
    h.reconcile_pool("second").await;

    assert!(h.deployment("first-beat").await.is_some());
    assert!(h.deployment("second-beat").await.is_none(), "no second beat may run");
    assert!(h.deployment("second-worker").await.is_some(), "the pool's workers still run");
    let status = h.pool("second").await.status.clone().unwrap();
    let beat = condition(&status.conditions, "BeatSingleton");
    assert_eq!((beat.status.as_str(), beat.reason.as_str()), ("False", "BeatConflict"));
    assert!(beat.message.contains("WorkerPool \"first\" holds beat for app \"proj.celery_app\""), "{}", beat.message);

    let events = Api::<Event>::namespaced(h.client.clone(), "prod").list(&ListParams::default()).await.unwrap();
    let warning =
        events.items.iter().find(|e| e.reason.as_deref() == Some("BeatConflict")).expect("a BeatConflict event");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert_eq!(warning.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("second"));

    // The holder goes away: the second pool takes beat over.
    Api::<WorkerPool>::namespaced(h.client.clone(), "prod").delete("first", &DeleteParams::default()).await.unwrap();
    h.reconcile_pool("second").await;
    assert!(h.deployment("second-beat").await.is_some());
}

#[tokio::test]
async fn a_missing_queue_stalls_the_pool_with_the_field_named() {
    let h = harness().await;
    h.create::<WorkerPool>(pool_doc("mail", json!({}))).await;
    let action = h.reconcile_pool("mail").await;
    assert_eq!(action, Action::await_change());
    assert!(h.deployment("mail-worker").await.is_none());
    let status = h.pool("mail").await.status.clone().unwrap();
    let ready = condition(&status.conditions, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "QueueNotFound"));
    assert!(
        ready.message.starts_with("spec.queues[0]: TaskQueue \"emails\" not found in namespace \"prod\""),
        "{}",
        ready.message
    );
    assert_eq!(condition(&status.conditions, "Stalled").status, "True");

    // Creating the queue lets the next reconcile through.
    h.seed_queue("emails").await;
    h.reconcile_pool("mail").await;
    assert!(h.deployment("mail-worker").await.is_some());
    let status = h.pool("mail").await.status.clone().unwrap();
    assert!(status.conditions.iter().all(|c| c.type_ != "Stalled"));
}

#[tokio::test]
async fn a_missing_secret_is_reported_then_the_real_broker_is_probed_and_the_password_never_shows() {
    let redis = e2e_harness::RedisServer::builder().password("s3cret-pw").start().expect("redis-server starts");
    let h = harness().await;
    h.create::<TaskQueue>(json!({"metadata": {"name": "emails"},
        "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}}}))
        .await;
    assert_eq!(h.reconcile_queue("emails").await, Action::await_change());
    let status = h.queue("emails").await.status.clone().unwrap();
    let ready = condition(&status.conditions, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "SecretNotFound"));
    assert_eq!(
        ready.message,
        "spec.broker.urlFrom.secretKeyRef.name: Secret \"redis\" not found in namespace \"prod\""
    );

    h.create::<Secret>(json!({"metadata": {"name": "redis"}, "stringData": {"other": "x"}})).await;
    h.reconcile_queue("emails").await;
    let ready = condition(&h.queue("emails").await.status.clone().unwrap().conditions, "Ready").clone();
    assert_eq!(ready.reason, "SecretKeyNotFound");
    assert!(ready.message.starts_with("spec.broker.urlFrom.secretKeyRef.key:"), "{}", ready.message);

    // Two messages at priority 0 and three at priority 3, in kombu's key layout.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("LPUSH").arg("emails").arg("a").arg("b").query_async(&mut conn).await.unwrap();
    let _: () =
        redis::cmd("LPUSH").arg("emails\x06\x163").arg("c").arg("d").arg("e").query_async(&mut conn).await.unwrap();

    Api::<Secret>::namespaced(h.client.clone(), "prod")
        .patch("redis", &PatchParams::default(), &Patch::Merge(json!({"stringData": {"url": redis.url()}})))
        .await
        .unwrap();
    h.reconcile_queue("emails").await;
    let tq = h.queue("emails").await;
    let status = tq.status.clone().unwrap();
    assert_eq!(condition(&status.conditions, "Ready").status, "True", "{:?}", status.conditions);
    assert_eq!(condition(&status.conditions, "BrokerReachable").status, "True");
    assert_eq!(condition(&status.conditions, "BrokerSafe").status, "True");
    assert_eq!(status.ready, Some(5));
    let broker = status.broker.clone().unwrap();
    assert_eq!(broker.kind, "redis");
    assert_eq!(broker.eviction_policy.as_deref(), Some("noeviction"));

    let events = Api::<Event>::namespaced(h.client.clone(), "prod").list(&ListParams::default()).await.unwrap();
    let everything =
        serde_json::to_string(&*tq).unwrap() + &serde_json::to_string(&events.items).unwrap() + &h.ctx.metrics.encode();
    assert!(!everything.contains("s3cret-pw"), "the password leaked into status, events or metrics");

    // Unchanged depth and conditions: the next probe writes nothing.
    let before = h.api.write_count();
    h.reconcile_queue("emails").await;
    assert_eq!(h.api.write_count(), before);
}

#[tokio::test]
async fn an_evicting_redis_is_reported_as_unsafe_with_a_warning_event() {
    let redis = e2e_harness::RedisServer::builder()
        .config("maxmemory 64mb")
        .config("maxmemory-policy allkeys-lru")
        .start()
        .expect("redis-server starts");
    let h = harness().await;
    h.create::<TaskQueue>(json!({"metadata": {"name": "emails"}, "spec": {"broker": {"url": redis.url()}}})).await;
    h.reconcile_queue("emails").await;
    let status = h.queue("emails").await.status.clone().unwrap();
    let safe = condition(&status.conditions, "BrokerSafe");
    assert_eq!((safe.status.as_str(), safe.reason.as_str()), ("False", "EvictionPolicyUnsafe"));
    assert!(safe.message.contains("allkeys-lru"), "{}", safe.message);
    let events = Api::<Event>::namespaced(h.client.clone(), "prod").list(&ListParams::default()).await.unwrap();
    let warning = events.items.iter().find(|e| e.reason.as_deref() == Some("EvictionPolicyUnsafe")).expect("an event");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(h.ctx.metrics.encode().contains("celery_operator_broker_safe{namespace=\"prod\",taskqueue=\"emails\"} 0"));
}

#[tokio::test]
async fn deleting_a_pool_removes_its_deployments() {
    let h = harness().await;
    h.seed_queue("emails").await;
    h.create::<WorkerPool>(pool_doc("mail", json!({"beat": {"enabled": true}}))).await;
    h.reconcile_pool("mail").await;
    assert!(h.deployment("mail-worker").await.is_some() && h.deployment("mail-beat").await.is_some());
    Api::<WorkerPool>::namespaced(h.client.clone(), "prod").delete("mail", &DeleteParams::default()).await.unwrap();
    h.api.collect_garbage();
    assert!(h.deployment("mail-worker").await.is_none());
    assert!(h.deployment("mail-beat").await.is_none());
}

/// A reconcile reads the watch caches: finding the beat holder, the TaskQueues and the Deployments
/// lists nothing (it used to list every pool of the namespace), and a reconcile that changes
/// nothing sends no request at all.
#[tokio::test]
async fn a_reconcile_of_one_pool_does_no_list() {
    let h = harness().await;
    h.seed_queue("emails").await;
    for name in ["first", "second", "third"] {
        h.create::<WorkerPool>(pool_doc(name, json!({"beat": {"enabled": true}}))).await;
    }
    h.create::<WorkerPool>(pool_doc("other", json!({"app": "other.app", "beat": {"enabled": true}}))).await;
    h.caught_up().await;
    let mark = h.api.request_count();
    for name in ["first", "second", "third", "other"] {
        h.reconcile_pool(name).await;
    }
    let requests: Vec<_> = h.api.requests().into_iter().skip(mark).filter(|r| r.verb != Verb::Watch).collect();
    assert!(requests.iter().any(|r| r.is_successful_write()), "the pools were not created: {requests:?}");
    let lists: Vec<_> = requests.iter().filter(|r| r.verb == Verb::List).collect();
    assert!(lists.is_empty(), "reconciles listed: {lists:?}");
    assert!(h.deployment("first-beat").await.is_some() && h.deployment("other-beat").await.is_some());
    assert!(h.deployment("second-beat").await.is_none() && h.deployment("third-beat").await.is_none());

    let mark = h.api.request_count();
    h.reconcile_pool("second").await;
    let sent: Vec<_> = h.api.requests().into_iter().skip(mark).filter(|r| r.verb != Verb::Watch).collect();
    assert!(sent.is_empty(), "a reconcile with nothing to change sent requests: {sent:?}");
}
