//! Wires the reconcilers to watches: WorkerPools own their Deployments and follow their TaskQueues;
//! TaskQueues follow the Secrets they reference; the autoscaler runs beside them.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::runtime::{Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info};

use crate::crd::{TaskQueue, WorkerPool};
use crate::labels;
use crate::leader::{self, LeaseOptions, Shutdown};
use crate::reconcile::{self, Context};

/// An Api for one namespace, or for all namespaces when `namespace` is None.
pub(crate) fn scoped<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// Runs the controllers for every namespace in `namespaces` (None = all namespaces) until
/// `shutdown`; with `lease`, only while this replica holds the Lease.
pub async fn run_all(
    ctx: Arc<Context>,
    namespaces: Vec<Option<String>>,
    lease: Option<LeaseOptions>,
    shutdown: Shutdown,
) -> kube_lease_manager::Result<()> {
    let work = |signal: Shutdown| {
        let runs = namespaces.iter().map(|ns| run(ctx.clone(), ns.clone(), signal.clone())).collect::<Vec<_>>();
        async move {
            futures::future::join_all(runs).await;
        }
    };
    match lease {
        Some(lease) => leader::run_while_leader(ctx.client.clone(), lease, shutdown, work).await,
        None => {
            work(shutdown).await;
            Ok(())
        }
    }
}

/// Runs the WorkerPool and TaskQueue controllers for one namespace (or all) until `shutdown` fires.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    info!(namespace = namespace.as_deref().unwrap_or("<all>"), "starting controllers");
    tokio::join!(
        run_pools(ctx.clone(), namespace.as_deref(), shutdown.clone()),
        run_queues(ctx.clone(), namespace.as_deref(), shutdown.clone()),
        crate::autoscale::scaler::run(ctx, namespace.clone(), shutdown)
    );
}

async fn run_pools(
    ctx: Arc<Context>,
    ns: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let pools: Api<WorkerPool> = scoped(client.clone(), ns);
    let controller = Controller::new(pools.clone(), watcher::Config::default());
    let store = controller.store();
    let by_queue = store.clone();
    let by_beat = store;
    controller
        .owns(scoped::<Deployment>(client.clone(), ns), watcher::Config::default().labels(&labels::managed_selector()))
        // A TaskQueue appearing, changing or disappearing affects every pool that lists it.
        .watches(scoped::<TaskQueue>(client, ns), watcher::Config::default(), move |tq| {
            let name = tq.name_any();
            by_queue
                .state()
                .into_iter()
                .filter(|p| p.namespace() == tq.namespace() && p.spec.queues.contains(&name))
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        // A pool enabling, disabling or dropping beat changes who may run beat for its app.
        .watches(pools, watcher::Config::default(), move |changed| {
            by_beat
                .state()
                .into_iter()
                .filter(|p| {
                    p.namespace() == changed.namespace()
                        && p.spec.beat.enabled
                        && p.spec.app == changed.spec.app
                        && p.uid() != changed.uid()
                })
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile::workerpool::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Ok((obj, _)) = result {
                debug!(pool = %obj, "reconciled");
            }
        })
        .await;
}

async fn run_queues(
    ctx: Arc<Context>,
    ns: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let controller = Controller::new(scoped::<TaskQueue>(client.clone(), ns), watcher::Config::default());
    let store = controller.store();
    // Only Secret metadata is watched: enough to notice a referenced Secret appear or change,
    // without holding every Secret's data in memory.
    let secrets =
        watcher::watcher(scoped::<PartialObjectMeta<Secret>>(client, ns), watcher::Config::default()).touched_objects();
    // The broker pollers ask for a reconcile when a snapshot changes what the status shows.
    let polled = ctx.brokers.task_queue_triggers(ns);
    controller
        .reconcile_on(polled)
        .watches_stream(secrets, move |secret| {
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|tq| {
                    let b = &tq.spec.broker;
                    tq.namespace() == secret.namespace()
                        && [&b.url_from, &b.management_url_from]
                            .into_iter()
                            .flatten()
                            .any(|from| from.secret_key_ref.name == name)
                })
                .map(|tq| ObjectRef::from_obj(&*tq))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile::taskqueue::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Ok((obj, _)) = result {
                debug!(queue = %obj, "reconciled");
            }
        })
        .await;
}
