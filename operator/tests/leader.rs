//! Two operator instances against one control-plane double: only the Lease holder reconciles (and
//! says so in `celery_operator_leader`), and when it dies without releasing, the other takes over
//! once the lease expires.

mod common;
use common::poll;

use std::path::Path;
use std::sync::Arc;

use celery_e2e::ApiServer;
use celery_operator::controller::run_all;
use celery_operator::crd::{TaskQueue, WorkerPool};
use celery_operator::leader::{LeaseOptions, Shutdown, shutdown_when};
use celery_operator::metrics::Metrics;
use celery_operator::reconcile::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

fn never() -> Shutdown {
    shutdown_when(futures::future::pending())
}

fn instance(client: &Client, identity: &str) -> (Arc<Metrics>, tokio::task::JoinHandle<()>) {
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context::new(client.clone(), metrics.clone(), Some(identity.into())));
    let lease = LeaseOptions {
        name: "celery-operator".into(),
        namespace: "prod".into(),
        identity: identity.into(),
        duration_seconds: 3,
        grace_seconds: 1,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(async move {
        run_all(ctx, vec![Some("prod".into())], Some(lease), never()).await.expect("leader election runs");
    });
    (metrics, task)
}

fn reconciles(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("celery_operator_reconcile_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `celery_operator_leader`: 1 while the replica leads.
fn leading(metrics: &Metrics) -> bool {
    metrics.encode().lines().any(|l| l == "celery_operator_leader 1")
}

async fn create_pool(client: &Client, name: &str) {
    let pool: WorkerPool = serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"app": "proj.app", "image": "reg/proj:1", "queues": ["emails"]}}))
    .unwrap();
    Api::<WorkerPool>::namespaced(client.clone(), "prod").create(&PostParams::default(), &pool).await.unwrap();
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let api = ApiServer::new();
    api.load_crds_from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")).unwrap();
    let client = api.client();
    let queue: TaskQueue = serde_json::from_value(json!({"metadata": {"name": "emails"},
        "spec": {"broker": {"url": "redis://redis:6379/0"}}}))
    .unwrap();
    Api::<TaskQueue>::namespaced(client.clone(), "prod").create(&PostParams::default(), &queue).await.unwrap();

    let (a_metrics, a) = instance(&client, "operator-a");
    let leases = Api::<Lease>::namespaced(client.clone(), "prod");
    let holder = || async { leases.get_opt("celery-operator").await.unwrap().and_then(|l| l.spec?.holder_identity) };
    poll("a holds the lease", || async { holder().await.as_deref() == Some("operator-a") }).await;
    let (b_metrics, b) = instance(&client, "operator-b");

    create_pool(&client, "first").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), "prod");
    poll("leader creates the Deployment", || async { deployments.get_opt("first-worker").await.unwrap().is_some() })
        .await;
    assert!(reconciles(&a_metrics) > 0);
    assert_eq!(reconciles(&b_metrics), 0, "the standby must not reconcile");
    assert!(leading(&a_metrics) && !leading(&b_metrics), "only the holder reports celery_operator_leader 1");

    // The leader dies without releasing the lease (no graceful shutdown).
    a.abort();
    let _ = a.await;
    let killed = std::time::Instant::now();
    poll("b takes over", || async { holder().await.as_deref() == Some("operator-b") }).await;
    eprintln!("handover after the leader was killed: {:?} (lease duration 3 s)", killed.elapsed());
    create_pool(&client, "second").await;
    poll("new leader reconciles", || async { deployments.get_opt("second-worker").await.unwrap().is_some() }).await;
    assert!(reconciles(&b_metrics) > 0);
    assert!(leading(&b_metrics));
    b.abort();
}
