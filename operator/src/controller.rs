//! Wires the reconcilers to the shared watches ([`crate::cache`]): WorkerPools own their
//! Deployments and follow their TaskQueues; TaskQueues follow the Secrets they reference; the
//! autoscaler runs beside them on the same caches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::Controller;
use kube::runtime::controller::Config;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info};

use crate::cache::Stores;
use crate::crd::{TaskQueue, WorkerPool};
use crate::leader::{self, LeaseOptions, Shutdown};
use crate::reconcile::{self, Context, Scoped};

/// WorkerPool reconciles running at once. Unbounded (kube's default), a fleet's start-up ran one
/// reconcile per pool at once, each with a request in flight on its own HTTP/1.1 connection: 1,000
/// pools opened ~2,700 connections, whose buffers and tasks (~30 KiB each) stayed in the client's
/// pool, idle, for 90 s. A few dozen keep the API server as busy.
pub const POOL_CONCURRENCY: u16 = 16;
/// TaskQueue reconciles running at once. More than pools: a new TaskQueue's reconcile waits (no
/// request in flight) for the first poll of its queue, and the poller polls the queues registered
/// meanwhile together.
pub const QUEUE_CONCURRENCY: u16 = 64;

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

/// Runs the WorkerPool and TaskQueue controllers and the autoscaler for one namespace (or all)
/// until `shutdown` fires, on one set of watches ([`Stores`]) they share.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let scope = namespace.as_deref().unwrap_or("<all>");
    info!(namespace = scope, "starting controllers");
    let stores = Stores::start(&ctx, namespace.as_deref()).await;
    tokio::select! {
        _ = shutdown.clone() => return,
        _ = stores.wait_until_ready() => {}
    }
    info!(namespace = scope, "watch caches ready");
    tokio::join!(
        run_pools(ctx.clone(), stores.clone(), shutdown.clone()),
        run_queues(ctx.clone(), namespace.as_deref(), stores.clone(), shutdown.clone()),
        crate::autoscale::scaler::run(ctx, stores, shutdown)
    );
}

/// A mapper filter: passes an object that is new, whose generation changed since it last passed,
/// or which is gone from `store` (deleted), and holds back status-only changes.
fn spec_changes<K>(store: Store<K>) -> impl Fn(&K) -> bool + Send + Sync + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    type Seen = (Option<String>, Option<i64>);
    let seen: Mutex<HashMap<ObjectRef<K>, Seen>> = Mutex::default();
    move |obj| {
        let key = ObjectRef::from_obj(obj);
        let mut seen = seen.lock().expect("generation map lock");
        if store.get(&key).is_none() {
            seen.remove(&key);
            return true;
        }
        let now = (obj.meta().uid.clone(), obj.meta().generation);
        seen.insert(key, now.clone()) != Some(now)
    }
}

async fn run_pools(
    ctx: Arc<Context>,
    stores: Stores,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let by_queue = stores.index.clone();
    let queue_changed = spec_changes(stores.queues.store().clone());
    let by_beat = stores.clone();
    let pool_changed = spec_changes(stores.pools.store().clone());
    Controller::for_shared_stream(stores.pools.subscribe(), stores.pools.store().clone())
        .owns_shared_stream(stores.deployments.subscribe())
        // A TaskQueue appearing, changing or disappearing affects every pool that lists it.
        .watches_shared_stream(stores.queues.subscribe(), move |tq: Arc<TaskQueue>| {
            let ns = tq.namespace().unwrap_or_default();
            let pools = if queue_changed(&tq) { by_queue.pools_with_queue(&ns, &tq.name_any()) } else { Vec::new() };
            pools.into_iter().map(move |name| ObjectRef::new(&name).within(&ns)).collect::<Vec<_>>()
        })
        // A pool enabling, disabling or dropping beat changes who may run beat for its app.
        .watches_shared_stream(stores.pools.subscribe(), move |changed: Arc<WorkerPool>| {
            if !pool_changed(&changed) {
                return Vec::new();
            }
            let ns = changed.namespace().unwrap_or_default();
            by_beat
                .beat_pools(&ns, &changed.spec.app)
                .iter()
                .filter(|p| p.uid() != changed.uid())
                .map(|p| ObjectRef::from_obj(&**p))
                .collect::<Vec<_>>()
        })
        .with_config(Config::default().concurrency(POOL_CONCURRENCY))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::workerpool::reconcile, reconcile::error_policy, Arc::new(Scoped { ctx, stores }))
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
    stores: Stores,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let queues = stores.queues.store().clone();
    // The broker pollers ask for a reconcile when a snapshot changes what the status shows.
    let polled = ctx.brokers.task_queue_triggers(ns);
    Controller::for_shared_stream(stores.queues.subscribe(), queues.clone())
        .reconcile_on(polled)
        // Only Secret metadata is watched: enough to notice a referenced Secret appear or change,
        // without holding every Secret's data in memory.
        .watches_shared_stream(stores.secrets.subscribe(), move |secret: Arc<PartialObjectMeta<Secret>>| {
            let name = secret.name_any();
            queues
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
        .with_config(Config::default().concurrency(QUEUE_CONCURRENCY))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::taskqueue::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Ok((obj, _)) = result {
                debug!(queue = %obj, "reconciled");
            }
        })
        .await;
}
