//! One watch per kind per watched scope, shared by the controllers and the autoscaler.
//!
//! [`Stores::start`] opens one watch each on WorkerPools, TaskQueues, the operator's Deployments,
//! Secret metadata, HorizontalPodAutoscalers and (when served) KEDA ScaledObjects. Each watch fills
//! a [`Store`] and hands every change, deletions and what a re-list found gone included, to its
//! subscribers (the controllers' triggers). Each watch backs off on its own, so an error or a 410
//! on one never pauses the others. Objects are slimmed before they are stored: no managedFields
//! (half of a typical object) except the autoscaler's entry on Deployments, which
//! [`crate::replicas`] needs; Secrets keep no annotations (kubectl's last-applied-configuration
//! would hold their data).
//!
//! HPAs and ScaledObjects are optional: when the API server does not serve them or refuses us
//! (404/403), the autoscaler goes on without conflict detection for them and says so
//! ([`ApiHealth`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::Lookup;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::controller::scoped;
use crate::crd::{TaskQueue, WorkerPool};
use crate::labels;
use crate::metrics::Metrics;

/// The API server ends each watch after this many seconds and the watcher opens the next from the
/// last resourceVersion. It must stay below the client's read timeout
/// ([`crate::client::REQUEST_TIMEOUT`]): a quiet watch (no events, no bookmark) would otherwise be
/// cut by the client as a hung request.
pub const WATCH_TIMEOUT_SECONDS: u32 = 45;

/// One watched kind: its store, and the changes for whoever subscribes.
pub struct Watched<K: Lookup + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    fanout: Arc<Fanout<K>>,
    changes: Changes,
}

impl<K: Lookup + Clone + 'static> Clone for Watched<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), fanout: self.fanout.clone(), changes: self.changes.clone() }
    }
}

/// Counts the changes a watch wrote into its store (each applied or deleted object, each
/// re-list), so a reader can tell in one load whether anything changed since it last looked.
#[derive(Clone, Debug, Default)]
pub struct Changes(Arc<std::sync::atomic::AtomicU64>);

impl Changes {
    /// Changes so far; a different number than last time means the store changed in between.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

impl<K: Lookup + Clone + Send + Sync + 'static> Watched<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    /// The cache.
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// The store's change count (counted after each change is in the store).
    pub fn changes(&self) -> Changes {
        self.changes.clone()
    }

    /// Every object in the store now, then every change from here on (the last known object of a
    /// deleted one included). Never ends while the watch runs; never yields an error.
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        let mut subscribers = self.fanout.subscribers.lock().expect("fanout lock");
        for obj in self.store.state() {
            let _ = tx.unbounded_send(obj);
        }
        subscribers.push(tx);
        rx
    }
}

struct Fanout<K> {
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Arc<K>>>>,
}

impl<K> Default for Fanout<K> {
    fn default() -> Self {
        Self { subscribers: Mutex::default() }
    }
}

impl<K> Fanout<K> {
    fn send(&self, obj: &Arc<K>) {
        self.subscribers.lock().expect("fanout lock").retain(|s| s.unbounded_send(obj.clone()).is_ok());
    }
}

/// Whether an optional API (HPAs, ScaledObjects) can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// No answer yet.
    Pending,
    /// Listed and watched.
    Ready,
    /// Not served (404) or not allowed (403): the API server's message, with the resource named.
    Unavailable(String),
}

/// The availability of one optional API, shared by its watch and its readers.
#[derive(Clone, Debug)]
pub struct ApiHealth {
    resource: &'static str,
    state: Arc<RwLock<Availability>>,
    metrics: Arc<Metrics>,
}

impl ApiHealth {
    fn new(resource: &'static str, metrics: Arc<Metrics>) -> Self {
        metrics.optional_api_unavailable(resource, false);
        Self { resource, state: Arc::new(RwLock::new(Availability::Pending)), metrics }
    }

    /// The state now.
    pub fn get(&self) -> Availability {
        self.state.read().expect("api health lock").clone()
    }

    /// Plural resource name, e.g. `horizontalpodautoscalers`.
    pub fn resource(&self) -> &'static str {
        self.resource
    }

    fn set(&self, new: Availability) {
        let mut state = self.state.write().expect("api health lock");
        if *state == new {
            return;
        }
        match &new {
            Availability::Unavailable(why) => {
                warn!(resource = self.resource, reason = %why, "cannot watch an optional API; the autoscaler runs without conflict detection for it");
                self.metrics.optional_api_unavailable(self.resource, true);
            }
            Availability::Ready if matches!(*state, Availability::Unavailable(_)) => {
                info!(resource = self.resource, "optional API watched again; conflict detection for it is back");
                self.metrics.optional_api_unavailable(self.resource, false);
            }
            _ => {}
        }
        *state = new;
    }

    fn failed(&self, error: &watcher::Error) {
        let api_error = match error {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some((s.code, s.message.clone())),
            watcher::Error::WatchError(s) => Some((s.code, s.message.clone())),
            _ => None,
        };
        match api_error {
            Some((403, message)) => self.set(Availability::Unavailable(format!(
                "list/watch of {} was refused (403 Forbidden: {message}); grant the operator list and watch on it",
                self.resource
            ))),
            Some((404, _)) => {
                self.set(Availability::Unavailable(format!("the API server does not serve {} (404)", self.resource)))
            }
            _ => {}
        }
    }
}

/// How every watch of the process is doing, for `/readyz`: a required watch failing for a while
/// makes the operator not ready; an optional API that cannot be watched is explained.
#[derive(Clone, Debug, Default)]
pub struct WatchHealth(Arc<Mutex<std::collections::BTreeMap<String, WatchState>>>);

#[derive(Clone, Debug, Default)]
struct WatchState {
    optional: bool,
    /// When the errors in a row began, and the last one.
    failing: Option<(tokio::time::Instant, String)>,
}

impl WatchHealth {
    pub(crate) fn ok(&self, watch: &str) {
        if let Some(state) = self.0.lock().expect("watch health lock").get_mut(watch) {
            state.failing = None;
        }
    }

    pub(crate) fn failed(&self, watch: &str, optional: bool, error: &watcher::Error) {
        let mut all = self.0.lock().expect("watch health lock");
        let state = all.entry(watch.to_string()).or_default();
        state.optional = optional;
        let since = state.failing.as_ref().map_or_else(tokio::time::Instant::now, |(since, _)| *since);
        state.failing = Some((since, error.to_string()));
    }

    /// Required watches that have failed without a success for longer than `grace`, each as
    /// `watch of <scope>/<resource> failing for <n> s: <last error>`.
    pub fn failing_longer_than(&self, grace: std::time::Duration) -> Vec<String> {
        let all = self.0.lock().expect("watch health lock");
        all.iter()
            .filter(|(_, s)| !s.optional)
            .filter_map(|(watch, s)| s.failing.as_ref().map(|(since, error)| (watch, since.elapsed(), error)))
            .filter(|(_, for_, _)| *for_ >= grace)
            .map(|(watch, for_, error)| format!("watch of {watch} failing for {} s: {error}", for_.as_secs()))
            .collect()
    }

    /// Optional APIs that cannot be watched, each with the reason.
    pub fn optional_unavailable(&self) -> Vec<String> {
        let all = self.0.lock().expect("watch health lock");
        all.iter()
            .filter(|(_, s)| s.optional)
            .filter_map(|(watch, s)| s.failing.as_ref().map(|(_, error)| format!("{watch}: {error}")))
            .collect()
    }
}

/// Index of WorkerPools by (namespace, app) for those enabling beat, and by (namespace, queue),
/// kept in step with the pool store, so finding the beat holder or the pools of a TaskQueue costs
/// the size of the answer, not of the fleet.
#[derive(Clone, Default)]
pub struct PoolIndex(Arc<RwLock<PoolIndexInner>>);

#[derive(Default)]
struct PoolIndexInner {
    beat: HashMap<(String, String), BTreeSet<String>>,
    queues: HashMap<(String, String), BTreeSet<String>>,
    /// What each pool is indexed under: (namespace, name) → (beat app, queues).
    entries: HashMap<(String, String), (Option<String>, Vec<String>)>,
}

impl PoolIndexInner {
    fn remove(&mut self, ns: &str, name: &str) {
        let Some((app, queues)) = self.entries.remove(&(ns.to_string(), name.to_string())) else { return };
        let drop_from = |map: &mut HashMap<(String, String), BTreeSet<String>>, key: String| {
            let key = (ns.to_string(), key);
            if let Some(set) = map.get_mut(&key) {
                set.remove(name);
                if set.is_empty() {
                    map.remove(&key);
                }
            }
        };
        if let Some(app) = app {
            drop_from(&mut self.beat, app);
        }
        for q in queues {
            drop_from(&mut self.queues, q);
        }
    }

    fn upsert(&mut self, pool: &WorkerPool) {
        let ns = ResourceExt::namespace(pool).unwrap_or_default();
        let name = pool.name_any();
        self.remove(&ns, &name);
        let app = pool.spec.beat.enabled.then(|| pool.spec.app.clone());
        if let Some(app) = &app {
            self.beat.entry((ns.clone(), app.clone())).or_default().insert(name.clone());
        }
        for q in &pool.spec.queues {
            self.queues.entry((ns.clone(), q.clone())).or_default().insert(name.clone());
        }
        self.entries.insert((ns, name), (app, pool.spec.queues.clone()));
    }
}

impl PoolIndex {
    fn apply(&self, change: Change<'_, WorkerPool>) {
        let mut inner = self.0.write().expect("pool index lock");
        match change {
            Change::Applied(pool) => inner.upsert(pool),
            Change::Deleted(pool) => inner.remove(&ResourceExt::namespace(pool).unwrap_or_default(), &pool.name_any()),
            Change::Relisted(all) => {
                *inner = PoolIndexInner::default();
                for pool in all {
                    inner.upsert(pool);
                }
            }
        }
    }

    /// Names of the pools in `ns` that enable beat for `app`.
    pub fn beat_pools(&self, ns: &str, app: &str) -> Vec<String> {
        let inner = self.0.read().expect("pool index lock");
        inner.beat.get(&(ns.to_string(), app.to_string())).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Names of the pools in `ns` that list TaskQueue `queue`.
    pub fn pools_with_queue(&self, ns: &str, queue: &str) -> Vec<String> {
        let inner = self.0.read().expect("pool index lock");
        inner.queues.get(&(ns.to_string(), queue.to_string())).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

/// A change as the watch loop hands it to an index.
enum Change<'a, K> {
    Applied(&'a K),
    Deleted(&'a K),
    Relisted(&'a [Arc<K>]),
}

/// The watch caches of one scope (a namespace, or all). Cheap to clone; the watches stop when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Stores {
    /// WorkerPools.
    pub pools: Watched<WorkerPool>,
    /// TaskQueues.
    pub queues: Watched<TaskQueue>,
    /// Deployments labelled as the operator's.
    pub deployments: Watched<Deployment>,
    /// Secret metadata only (enough to notice a referenced Secret appear or change).
    pub secrets: Watched<PartialObjectMeta<Secret>>,
    /// HorizontalPodAutoscalers (optional API).
    pub hpas: Watched<HorizontalPodAutoscaler>,
    /// Whether HPAs can be watched.
    pub hpa_health: ApiHealth,
    /// KEDA ScaledObjects, when the API server serves them.
    pub scaled_objects: Option<(Watched<DynamicObject>, ApiHealth)>,
    /// Pools by beat app and by queue.
    pub index: PoolIndex,
    /// The watches: aborted when the last clone is dropped.
    _tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Stores {
    /// Opens the watches of one scope (`None`: all namespaces). They fill in the background; see
    /// [`Stores::wait_until_ready`].
    pub async fn start(ctx: &crate::reconcile::Context, ns: Option<&str>) -> Self {
        let (client, metrics) = (ctx.client.clone(), ctx.metrics.clone());
        let scope = ns.unwrap_or("<all>");
        let watch = |resource: &str| Report { name: format!("{scope}/{resource}"), health: ctx.watches.clone() };
        let mut tasks = JoinSet::new();
        let index = PoolIndex::default();
        let pool_index = index.clone();
        let all = watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS);
        let pools = spawn(
            &mut tasks,
            watcher(scoped::<WorkerPool>(client.clone(), ns), all.clone()),
            (),
            watch("workerpools"),
            None,
            |p: &mut WorkerPool| p.managed_fields_mut().clear(),
            move |change| pool_index.apply(change),
        );
        let queues = spawn(
            &mut tasks,
            watcher(scoped::<TaskQueue>(client.clone(), ns), all.clone()),
            (),
            watch("taskqueues"),
            None,
            |q: &mut TaskQueue| q.managed_fields_mut().clear(),
            |_| {},
        );
        let managed = all.clone().labels(&labels::managed_selector());
        let deployments = spawn(
            &mut tasks,
            watcher(scoped::<Deployment>(client.clone(), ns), managed),
            (),
            watch("deployments"),
            None,
            crate::replicas::slim,
            |_| {},
        );
        let secrets = spawn(
            &mut tasks,
            watcher(scoped::<PartialObjectMeta<Secret>>(client.clone(), ns), all.clone()),
            (),
            watch("secrets"),
            None,
            |s: &mut PartialObjectMeta<Secret>| {
                s.managed_fields_mut().clear();
                s.annotations_mut().clear();
            },
            |_| {},
        );
        ctx.secrets.follow(secrets.store().clone());
        let hpa_health = ApiHealth::new("horizontalpodautoscalers", metrics.clone());
        let hpas = spawn(
            &mut tasks,
            watcher(scoped::<HorizontalPodAutoscaler>(client.clone(), ns), all.clone()),
            (),
            watch("horizontalpodautoscalers"),
            Some(hpa_health.clone()),
            |h: &mut HorizontalPodAutoscaler| {
                h.managed_fields_mut().clear();
                h.status = None;
            },
            |_| {},
        );
        let scaled_objects = match keda_scaled_objects(&client).await {
            None => None,
            Some(resource) => {
                let api: Api<DynamicObject> = match ns {
                    Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                    None => Api::all_with(client.clone(), &resource),
                };
                let health = ApiHealth::new("scaledobjects", metrics);
                let watched = spawn(
                    &mut tasks,
                    watcher(api, all),
                    resource,
                    watch("scaledobjects"),
                    Some(health.clone()),
                    |o: &mut DynamicObject| o.managed_fields_mut().clear(),
                    |_| {},
                );
                Some((watched, health))
            }
        };
        Self {
            pools,
            queues,
            deployments,
            secrets,
            hpas,
            hpa_health,
            scaled_objects,
            index,
            _tasks: Arc::new(Mutex::new(tasks)),
        }
    }

    /// Waits until the stores the reconcilers need (pools, queues, Deployments, Secrets) have
    /// been listed once. The optional APIs are not waited for (see [`Stores::wait_for_optional`]).
    pub async fn wait_until_ready(&self) {
        let _ = tokio::join!(
            self.pools.store.wait_until_ready(),
            self.queues.store.wait_until_ready(),
            self.deployments.store.wait_until_ready(),
            self.secrets.store.wait_until_ready(),
        );
    }

    /// Waits until each optional API has been listed or refused, at most `limit`.
    pub async fn wait_for_optional(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let healths: Vec<&ApiHealth> =
            std::iter::once(&self.hpa_health).chain(self.scaled_objects.iter().map(|(_, h)| h)).collect();
        while healths.iter().any(|h| h.get() == Availability::Pending) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A pool from the cache.
    pub fn pool(&self, ns: &str, name: &str) -> Option<Arc<WorkerPool>> {
        self.pools.store.get(&ObjectRef::new(name).within(ns))
    }

    /// A TaskQueue from the cache.
    pub fn queue(&self, ns: &str, name: &str) -> Option<Arc<TaskQueue>> {
        self.queues.store.get(&ObjectRef::new(name).within(ns))
    }

    /// One of the operator's Deployments from the cache (slimmed: see [`crate::replicas::slim`]).
    pub fn deployment(&self, ns: &str, name: &str) -> Option<Arc<Deployment>> {
        self.deployments.store.get(&ObjectRef::new(name).within(ns))
    }

    /// The pools in `ns` that enable beat for `app`.
    pub fn beat_pools(&self, ns: &str, app: &str) -> Vec<Arc<WorkerPool>> {
        self.index.beat_pools(ns, app).iter().filter_map(|name| self.pool(ns, name)).collect()
    }
}

/// KEDA's ScaledObject, when the API server serves it.
async fn keda_scaled_objects(client: &Client) -> Option<ApiResource> {
    let resources = client.list_api_group_resources("keda.sh/v1alpha1").await.ok()?;
    resources.resources.iter().find(|r| r.kind == "ScaledObject").map(|r| ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: r.kind.clone(),
        plural: r.name.clone(),
    })
}

/// Where a watch reports how it is doing.
struct Report {
    /// `<scope>/<resource>`.
    name: String,
    health: WatchHealth,
}

impl Drop for Report {
    /// A watch that stopped (leadership lost, shutdown) is no longer failing.
    fn drop(&mut self) {
        self.health.0.lock().expect("watch health lock").remove(&self.name);
    }
}

/// Runs one watch in the background: slims each object, writes the store, updates the index,
/// then tells the subscribers. Backs off (client-go's policy) on its own errors only.
fn spawn<K, S>(
    tasks: &mut JoinSet<()>,
    stream: S,
    dyntype: <K as Resource>::DynamicType,
    report: Report,
    health: Option<ApiHealth>,
    mut slim: impl FnMut(&mut K) + Send + 'static,
    mut index: impl FnMut(Change<'_, K>) + Send + 'static,
) -> Watched<K>
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    <K as Resource>::DynamicType: Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = watcher::Result<Event<K>>> + Send + 'static,
{
    let mut writer: Writer<K> = Writer::new(dyntype.clone());
    let store = writer.as_reader();
    let fanout: Arc<Fanout<K>> = Arc::default();
    let changes = Changes::default();
    let watched = Watched { store: store.clone(), fanout: fanout.clone(), changes: changes.clone() };
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream.default_backoff());
        let mut relisted: Option<HashSet<ObjectRef<K>>> = None;
        let key = |o: &K| Lookup::to_object_ref(o, dyntype.clone());
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event.modify(&mut slim),
                Err(e) => {
                    report.health.failed(&report.name, health.is_some(), &e);
                    match &health {
                        Some(h) => {
                            h.failed(&e);
                            debug!(watch = %report.name, error = %e, "watch failed; retrying with backoff");
                        }
                        None => warn!(watch = %report.name, error = %e, "watch failed; retrying with backoff"),
                    }
                    continue;
                }
            };
            report.health.ok(&report.name);
            // Objects a re-list no longer finds were deleted while the watch was down.
            let mut vanished = Vec::new();
            match &event {
                Event::Init => relisted = Some(HashSet::new()),
                Event::InitApply(o) => {
                    relisted.get_or_insert_default().insert(key(o));
                }
                Event::InitDone => {
                    let seen = relisted.take().unwrap_or_default();
                    vanished = store.state().into_iter().filter(|o| !seen.contains(&key(o))).collect();
                }
                Event::Apply(_) | Event::Delete(_) => {}
            }
            writer.apply_watcher_event(&event);
            if matches!(event, Event::Apply(_) | Event::Delete(_) | Event::InitDone) {
                changes.bump();
            }
            match event {
                Event::Apply(o) => {
                    let o = store.get(&key(&o)).unwrap_or_else(|| Arc::new(o));
                    index(Change::Applied(&o));
                    fanout.send(&o);
                }
                Event::Delete(o) => {
                    let o = Arc::new(o);
                    index(Change::Deleted(&o));
                    fanout.send(&o);
                }
                Event::InitDone => {
                    let all = store.state();
                    index(Change::Relisted(&all));
                    for o in all.iter().chain(&vanished) {
                        fanout.send(o);
                    }
                    if let Some(h) = &health {
                        h.set(Availability::Ready);
                    }
                }
                Event::Init | Event::InitApply(_) => {}
            }
        }
    });
    watched
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, app: &str, beat: bool, queues: &[&str]) -> WorkerPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": name, "namespace": "prod"},
            "spec": {"app": app, "image": "i", "queues": queues, "beat": {"enabled": beat}}
        }))
        .unwrap()
    }

    #[test]
    fn the_pool_index_follows_changes_deletes_and_relists() {
        let index = PoolIndex::default();
        index.apply(Change::Applied(&pool("a", "x.app", true, &["emails"])));
        index.apply(Change::Applied(&pool("b", "x.app", true, &["emails", "reports"])));
        index.apply(Change::Applied(&pool("c", "y.app", false, &["reports"])));
        assert_eq!(index.beat_pools("prod", "x.app"), ["a", "b"]);
        assert_eq!(index.pools_with_queue("prod", "reports"), ["b", "c"]);
        assert!(index.beat_pools("other", "x.app").is_empty());

        // b turns beat off and leaves reports; a moves to another app; c is deleted.
        index.apply(Change::Applied(&pool("b", "x.app", false, &["emails"])));
        index.apply(Change::Applied(&pool("a", "z.app", true, &["emails"])));
        index.apply(Change::Deleted(&pool("c", "y.app", false, &["reports"])));
        assert!(index.beat_pools("prod", "x.app").is_empty());
        assert_eq!(index.beat_pools("prod", "z.app"), ["a"]);
        assert!(index.pools_with_queue("prod", "reports").is_empty());
        assert_eq!(index.pools_with_queue("prod", "emails"), ["a", "b"]);

        // A re-list replaces everything.
        index.apply(Change::Relisted(&[Arc::new(pool("d", "x.app", true, &["jobs"]))]));
        assert_eq!(index.beat_pools("prod", "x.app"), ["d"]);
        assert!(index.pools_with_queue("prod", "emails").is_empty());
        assert_eq!(index.pools_with_queue("prod", "jobs"), ["d"]);
    }
}
