//! The autoscaler loop: per broker endpoint, poll at the smallest `pollIntervalSeconds` of the
//! pools on it (one probe = one round trip for all their queues), decide for every pool, and apply
//! the worker Deployment's `spec.replicas` by server-side apply under [`FIELD_MANAGER`] only when
//! it changes.
//!
//! Everything it reads comes from watch caches (pools, TaskQueues, worker Deployments, HPAs, KEDA
//! ScaledObjects when KEDA is installed), so a poll costs the broker round trip and nothing else on
//! the API server unless something changes. Brokers are polled concurrently: a slow or unreachable
//! broker (probes are bounded by their timeout) never delays the pools on another one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use celery_broker::Broker;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::decide::{self, Decision, Policy, Probe, ScalerState};
use super::demand;
use super::plan::{self, Activity, Conflict, ScalerStatus};
use crate::conditions::{self, Wanted, kind};
use crate::controller::scoped;
use crate::crd::{TaskQueue, WorkerPool};
use crate::labels;
use crate::reconcile::{Context, display_name};

/// Field manager of the worker Deployment's `spec.replicas` and the autoscaler's status fields.
pub const FIELD_MANAGER: &str = "celery-operator-autoscaler";
/// How often the loop looks for brokers due for a poll.
const TICK: Duration = Duration::from_millis(100);
/// Backlog/in-flight-only status changes are written at most this often (metrics carry every poll).
pub const STATUS_NUMBERS_INTERVAL: Duration = Duration::from_secs(5);
/// Scale Events per pool at most this often; changes in between are summarised in the next one.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(30);
/// Broker URLs (from Secrets) are re-read at least this often, to follow rotations.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// Watch caches the loop reads.
#[derive(Clone)]
struct Caches {
    pools: Store<WorkerPool>,
    queues: Store<TaskQueue>,
    deployments: Store<Deployment>,
    hpas: Store<HorizontalPodAutoscaler>,
    scaled_objects: Option<Store<DynamicObject>>,
}

/// Keeps a watch stream running in the background until dropped.
struct Watches(JoinSet<()>);

impl Watches {
    fn watch<K>(&mut self, api: Api<K>, config: watcher::Config) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        self.watch_with(api, config, reflector::store::Writer::default())
    }

    fn watch_with<K>(&mut self, api: Api<K>, config: watcher::Config, writer: reflector::store::Writer<K>) -> Store<K>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
    {
        let reader = writer.as_reader();
        let stream = watcher(api, config).default_backoff().reflect(writer).applied_objects();
        self.0.spawn(stream.for_each(|_| async {}));
        reader
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

/// Runs the autoscaler for one namespace (or all) until `shutdown`.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: impl std::future::Future<Output = ()>) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let mut watches = Watches(JoinSet::new());
    let managed = watcher::Config::default().labels(&labels::managed_selector());
    let caches = Caches {
        pools: watches.watch(scoped::<WorkerPool>(client.clone(), ns), watcher::Config::default()),
        queues: watches.watch(scoped::<TaskQueue>(client.clone(), ns), watcher::Config::default()),
        deployments: watches.watch(scoped::<Deployment>(client.clone(), ns), managed),
        hpas: watches.watch(scoped::<HorizontalPodAutoscaler>(client.clone(), ns), watcher::Config::default()),
        scaled_objects: match keda_scaled_objects(&client).await {
            None => None,
            Some(resource) => {
                let api: Api<DynamicObject> = match ns {
                    Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                    None => Api::all_with(client.clone(), &resource),
                };
                Some(watches.watch_with(api, watcher::Config::default(), reflector::store::Writer::new(resource)))
            }
        },
    };
    let mut scaler = Scaler {
        ctx,
        caches,
        pools: HashMap::new(),
        brokers: HashMap::new(),
        resolved: HashMap::new(),
        valid: HashMap::new(),
    };
    tokio::pin!(shutdown);
    let ready = async {
        let c = &scaler.caches;
        let _ = tokio::join!(
            c.pools.wait_until_ready(),
            c.queues.wait_until_ready(),
            c.deployments.wait_until_ready(),
            c.hpas.wait_until_ready()
        );
        if let Some(so) = &c.scaled_objects {
            let _ = so.wait_until_ready().await;
        }
    };
    tokio::select! {
        _ = &mut shutdown => return,
        _ = ready => {}
    }
    info!(namespace = ns.unwrap_or("<all>"), "autoscaler started");
    let mut polls: JoinSet<(usize, Vec<Member>)> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => scaler.start_due_polls(&mut polls).await,
            Some(done) = polls.join_next() => match done {
                Ok((broker, members)) => scaler.finished(broker, members),
                Err(e) => warn!(error = %e, "autoscaler poll task failed"),
            },
        }
    }
    polls.abort_all();
}

/// What the loop remembers per pool between polls.
struct PoolState {
    uid: String,
    scaler: ScalerState<Instant>,
    /// The status last written by the autoscaler, and when.
    written: Option<(ScalerStatus, Instant)>,
    /// Conditions as last written (for transition times and Events).
    conditions: Vec<Condition>,
    last_event: Option<Instant>,
    suppressed_events: u32,
    last_scale: Option<(String, String)>,
    /// The replicas last applied, and the Deployment's resourceVersion before that write: while
    /// the watch cache still shows that version, the applied count is the current one.
    applied: Option<(Option<String>, u32)>,
    /// Per-replica rate and pod start-ups, for the demand.
    demand: demand::PoolMemory,
}

impl PoolState {
    fn new(pool: &WorkerPool) -> Self {
        let status = pool.status.clone().unwrap_or_default();
        let last_scale = status.last_scale_time.as_ref().map(|t| t.0.to_string()).zip(status.last_scale_reason);
        Self {
            uid: pool.uid().unwrap_or_default(),
            scaler: ScalerState::new(),
            written: None,
            conditions: status
                .conditions
                .into_iter()
                .filter(|c| c.type_ == kind::SCALING_ACTIVE || c.type_ == kind::SCALING_LIMITED)
                .collect(),
            last_event: None,
            suppressed_events: 0,
            last_scale,
            applied: None,
            demand: demand::PoolMemory::new(),
        }
    }
}

/// A pool taking part in one poll of its broker.
struct Member {
    key: String,
    pool: Arc<WorkerPool>,
    policy: Policy,
    queues: Vec<String>,
    state: PoolState,
}

/// An autoscaled pool found on a broker, before its state is taken for a poll.
struct Candidate {
    key: String,
    pool: Arc<WorkerPool>,
    policy: Policy,
    queues: Vec<String>,
}

/// Poll schedule of one broker endpoint.
struct BrokerSchedule {
    last_poll: Option<Instant>,
    busy: bool,
}

/// A TaskQueue's broker as last resolved.
struct Resolved {
    resource_version: Option<String>,
    at: Instant,
    broker: Option<Arc<Broker>>,
}

struct Scaler {
    ctx: Arc<Context>,
    caches: Caches,
    /// Pools under autoscaling, by `namespace/name`; taken out while their broker is being polled.
    pools: HashMap<String, Option<PoolState>>,
    brokers: HashMap<usize, BrokerSchedule>,
    resolved: HashMap<String, Resolved>,
    /// Whether each pool's spec passed validation, by resourceVersion (CEL is not free; the
    /// reconciler reports what is wrong).
    valid: HashMap<String, (Option<String>, bool)>,
}

impl Scaler {
    /// Starts a poll for every broker whose interval has elapsed and which is not being polled.
    async fn start_due_polls(&mut self, polls: &mut JoinSet<(usize, Vec<Member>)>) {
        let now = Instant::now();
        let mut groups: HashMap<usize, (Arc<Broker>, Vec<Candidate>)> = HashMap::new();
        let mut seen = HashSet::new();
        for pool in self.caches.pools.state() {
            let Some(policy) = Policy::from_spec(&pool.spec) else { continue };
            let key = display_name(&*pool);
            if pool.meta().deletion_timestamp.is_some() || !self.is_valid(&key, &pool) {
                continue;
            }
            seen.insert(key.clone());
            let Some((broker, queues)) = self.target(&pool).await else { continue };
            let id = Arc::as_ptr(&broker) as usize;
            groups.entry(id).or_insert_with(|| (broker, Vec::new())).1.push(Candidate { key, pool, policy, queues });
        }
        self.forget_pools_not_in(&seen).await;
        for (id, (broker, members)) in groups {
            let interval = members.iter().map(|m| m.policy.poll_interval).min().unwrap_or(Duration::from_secs(1));
            let schedule = self.brokers.entry(id).or_insert(BrokerSchedule { last_poll: None, busy: false });
            if schedule.busy || schedule.last_poll.is_some_and(|t| t + interval > now) {
                continue;
            }
            // Take each pool's state out for the poll; a pool already out (its broker changed while a
            // poll of the old one runs) waits for the next round.
            let mut taken = Vec::new();
            for Candidate { key, pool, policy, queues } in members {
                let slot = self.pools.entry(key.clone()).or_insert_with(|| Some(PoolState::new(&pool)));
                let Some(mut state) = slot.take() else { continue };
                if state.uid != pool.uid().unwrap_or_default() {
                    state = PoolState::new(&pool);
                }
                taken.push(Member { key, pool, policy, queues, state });
            }
            if taken.is_empty() {
                continue;
            }
            schedule.busy = true;
            schedule.last_poll = Some(now);
            let poll = Poll { ctx: self.ctx.clone(), caches: self.caches.clone(), broker };
            polls.spawn(async move { (id, poll.run(taken).await) });
        }
    }

    /// Whether the pool's spec validates (cached per resourceVersion).
    fn is_valid(&mut self, key: &str, pool: &WorkerPool) -> bool {
        let rv = pool.resource_version();
        if let Some((seen, valid)) = self.valid.get(key)
            && *seen == rv
        {
            return *valid;
        }
        let valid = crate::validate::check_worker_pool(pool).is_empty();
        self.valid.insert(key.to_string(), (rv, valid));
        valid
    }

    /// Puts the polled pools' state back.
    fn finished(&mut self, broker: usize, members: Vec<Member>) {
        if let Some(s) = self.brokers.get_mut(&broker) {
            s.busy = false;
        }
        for m in members {
            if let Some(slot) = self.pools.get_mut(&m.key) {
                *slot = Some(m.state);
            }
        }
    }

    /// Drops the state of pools that are gone or no longer autoscaled, and clears what the
    /// autoscaler wrote into the status of those that remain.
    async fn forget_pools_not_in(&mut self, seen: &HashSet<String>) {
        let gone: Vec<String> = self.pools.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for key in gone {
            // A pool whose state is out (being polled) is forgotten after the poll returns it.
            if self.pools.get(&key).is_some_and(Option::is_none) {
                continue;
            }
            let state = self.pools.remove(&key).flatten();
            self.valid.remove(&key);
            let (ns, name) = key.split_once('/').unwrap_or_default();
            self.ctx.metrics.forget_pool(&[ns, name]);
            let still_there = self.caches.pools.get(&ObjectRef::new(name).within(ns));
            if let (Some(pool), Some(_)) = (still_there, state) {
                // Autoscaling was switched off: give up our status fields (the reconciler owns
                // desiredReplicas from now on).
                let api: Api<WorkerPool> = Api::namespaced(self.ctx.client.clone(), ns);
                let body = status_body(&pool, json!({}));
                if let Err(e) = api.patch_status(name, &apply_params(), &Patch::Apply(&body)).await {
                    warn!(pool = %key, error = %e, "could not clear the autoscaler's status fields");
                }
            }
        }
    }

    /// The pool's broker and Celery queue names, when its TaskQueues exist and share one broker.
    async fn target(&mut self, pool: &WorkerPool) -> Option<(Arc<Broker>, Vec<String>)> {
        let ns = pool.namespace().unwrap_or_default();
        let mut broker: Option<Arc<Broker>> = None;
        let mut queues = Vec::with_capacity(pool.spec.queues.len());
        for name in &pool.spec.queues {
            let tq = self.caches.queues.get(&ObjectRef::new(name).within(&ns))?;
            let b = self.resolve(&tq).await?;
            if broker.as_ref().is_some_and(|first| !Arc::ptr_eq(first, &b)) {
                // Queues on different brokers: the reconciler reports it; nothing to scale.
                return None;
            }
            broker = Some(b);
            queues.push(tq.queue_name().to_string());
        }
        Some((broker?, queues))
    }

    /// The TaskQueue's broker client, re-resolved when the TaskQueue changed or its URL (which may
    /// come from a Secret) was last read more than RESOLVE_INTERVAL ago.
    async fn resolve(&mut self, tq: &TaskQueue) -> Option<Arc<Broker>> {
        let key = display_name(tq);
        let rv = tq.resource_version();
        if let Some(r) = self.resolved.get(&key)
            && r.resource_version == rv
            && r.at.elapsed() < RESOLVE_INTERVAL
        {
            return r.broker.clone();
        }
        let broker = match crate::reconcile::taskqueue::resolve(tq, &self.ctx).await {
            Ok(Ok(resolved)) => self.ctx.brokers.get(&tq.spec.broker, &resolved).ok(),
            // Blocked (reported on the TaskQueue by its reconciler) or an API error: retry later.
            Ok(Err(_)) => None,
            Err(e) => {
                debug!(queue = %key, error = %e, "could not resolve the broker");
                None
            }
        };
        self.resolved.insert(key, Resolved { resource_version: rv, at: Instant::now(), broker: broker.clone() });
        broker
    }
}

/// HPAs and KEDA ScaledObjects as seen at the start of a poll.
struct OtherScalers {
    hpas: Vec<Arc<HorizontalPodAutoscaler>>,
    scaled_objects: Vec<Arc<DynamicObject>>,
}

/// One poll of one broker for the pools on it.
struct Poll {
    ctx: Arc<Context>,
    caches: Caches,
    broker: Arc<Broker>,
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies a worker Deployment's `spec.replicas` (and nothing else) under the autoscaler's field
/// manager. The Deployment must exist: a partial apply cannot create one.
pub async fn apply_replicas(
    deployments: &Api<Deployment>,
    name: &str,
    replicas: u32,
) -> Result<Deployment, kube::Error> {
    let body = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": { "replicas": replicas },
    });
    deployments.patch(name, &apply_params(), &Patch::Apply(&body)).await
}

/// A server-side apply body for the pool's status subresource.
fn status_body(pool: &WorkerPool, status: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": WorkerPool::api_version(&()),
        "kind": WorkerPool::kind(&()),
        "metadata": { "name": pool.name_any(), "namespace": pool.namespace() },
        "status": status,
    })
}

impl Poll {
    async fn run(self, mut members: Vec<Member>) -> Vec<Member> {
        let started = std::time::Instant::now();
        let queues: Vec<&str> = members.iter().flat_map(|m| m.queues.iter().map(String::as_str)).collect();
        let observation = self.ctx.brokers.probe(&self.broker, &queues).await;
        if let Err(e) = &observation {
            debug!(broker = %self.broker.endpoint(), error = %e, "autoscaler probe failed");
        }
        let activity = self.ctx.brokers.activity(&self.broker);
        // One snapshot of the other autoscalers for the whole poll.
        let others = OtherScalers {
            hpas: self.caches.hpas.state(),
            scaled_objects: self.caches.scaled_objects.as_ref().map(Store::state).unwrap_or_default(),
        };
        for member in &mut members {
            if let Err(e) = self.decide_for(member, observation.as_ref().ok(), activity.as_ref(), &others).await {
                warn!(pool = %member.key, error = %e, "autoscaling step failed");
            }
        }
        self.ctx.metrics.decision_latency(started.elapsed());
        members
    }

    async fn decide_for(
        &self,
        m: &mut Member,
        observation: Option<&celery_broker::BrokerObservation>,
        activity: Option<&Activity>,
        others: &OtherScalers,
    ) -> Result<(), kube::Error> {
        let pool = &*m.pool;
        let ns = pool.namespace().unwrap_or_default();
        let name = pool.name_any();
        if let Some(conflict) = plan::find_conflict(pool, &others.hpas, &others.scaled_objects) {
            return self.hold_for_conflict(m, &conflict).await;
        }
        let Some(deployment) = self.caches.deployments.get(&ObjectRef::new(&pool.worker_deployment_name()).within(&ns))
        else {
            // Not created yet: the reconciler creates it (with minReplicas) and we scale it next poll.
            return Ok(());
        };
        let cached = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0).unsigned_abs();
        let current = match &m.state.applied {
            Some((before, applied)) if *before == deployment.resource_version() => *applied,
            _ => cached,
        };
        let active = activity.map(|a| plan::active_by_pod(&name, a));
        let seen = self.observe_demand(m, &deployment, observation, activity);
        let probe = seen.map_or(Probe::Failed, Probe::Ok);
        let decision = decide::decide(&m.policy, &mut m.state.scaler, current, probe, Instant::now());
        let labels = [ns.as_str(), name.as_str()];
        self.ctx.metrics.pool_decided(
            &labels,
            decision.replicas,
            current,
            seen.map(|s| s.backlog),
            seen.map(|s| s.in_flight),
        );
        if decision.replicas != current {
            self.scale(m, &deployment, current, &decision, active.as_ref()).await?;
            m.state.demand.scaled(std::time::Instant::now(), current, decision.replicas);
        } else {
            self.flush_suppressed_events(m, current).await;
        }
        let status = ScalerStatus {
            desired: Some(decision.replicas),
            backlog: seen.map(|s| s.backlog),
            in_flight: seen.map(|s| s.in_flight),
            last_scale: m.state.last_scale.clone(),
            conditions: plan::decision_conditions(&decision, &m.queues, &self.broker.endpoint()),
            demand: seen.zip(decision.rule).map(|(seen, rule)| plan::DemandStatus::new(&seen, &rule)),
        };
        self.write_status(m, status).await
    }

    /// The pool's demand from one probe (`None` when it failed): due
    /// and scheduled tasks in its queues, what its workers run, how fast they work (measured here
    /// from their heartbeats), and how long its oldest task has waited.
    fn observe_demand(
        &self,
        m: &mut Member,
        deployment: &Deployment,
        observation: Option<&celery_broker::BrokerObservation>,
        activity: Option<&Activity>,
    ) -> Option<decide::Observation> {
        let now = std::time::Instant::now();
        let ready = deployment.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0).max(0).unsigned_abs();
        m.state.demand.observe_ready(now, ready);
        let lead_time = demand::lead_time(&m.policy, &m.state.demand.startups());
        let observation = observation?;
        let workers = activity.map(|a| demand::workers_of(&m.pool.name_any(), a));
        let spec = &m.pool.spec;
        let context = demand::Context {
            running: workers.as_ref().map(|w| w.iter().map(|w| u64::from(w.active)).sum()),
            acks_late: m.policy_acks_late(),
            lead_time,
            due_limit: workers.as_ref().and_then(|w| {
                demand::due_limit(
                    w,
                    spec.concurrency.max(1).unsigned_abs(),
                    spec.worker.prefetch_multiplier.max(1).unsigned_abs(),
                )
            }),
            oldest_wait: m
                .queues
                .iter()
                .filter_map(|q| Some((q.clone(), self.ctx.brokers.latency(&self.broker, q)?.oldest_wait)))
                .collect(),
            per_replica_rate: m.state.demand.throughput.per_replica(),
        };
        let seen = demand::observe_demand(&m.queues, observation, &context);
        if let Some(workers) = &workers {
            m.state.demand.throughput.observe(workers, seen.waiting_due() > 0);
        }
        Some(seen)
    }

    /// Sets deletion costs (on a scale-in) and applies the new replica count.
    async fn scale(
        &self,
        m: &mut Member,
        deployment: &Deployment,
        current: u32,
        decision: &Decision,
        active: Option<&BTreeMap<String, u32>>,
    ) -> Result<(), kube::Error> {
        let pool = &*m.pool;
        let ns = pool.namespace().unwrap_or_default();
        let to = decision.replicas;
        if to < current
            && let Some(active) = active
            && let Err(e) = self.set_deletion_costs(pool, active).await
        {
            // Scaling in anyway: a worker being stopped finishes its task (warm shutdown within the
            // grace period); the costs only choose which workers stop.
            warn!(pool = %m.key, error = %e, "could not set pod deletion costs");
        }
        let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &ns);
        apply_replicas(&deployments, &deployment.name_any(), to).await?;
        m.state.applied = Some((deployment.resource_version(), to));
        let message = plan::scale_message(current, to, &decision.reason);
        info!(pool = %m.key, from = current, to, reason = %decision.reason, "scaled");
        self.ctx.metrics.pool_scaled(&[ns.as_str(), &pool.name_any()], to > current);
        m.state.last_scale = Some((Timestamp::now().to_string(), message.clone()));
        self.scale_event(m, to > current, message).await;
        Ok(())
    }

    /// Annotates the pool's pods with their running task counts so idle workers are removed first.
    async fn set_deletion_costs(&self, pool: &WorkerPool, active: &BTreeMap<String, u32>) -> Result<(), kube::Error> {
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &pool.namespace().unwrap_or_default());
        let selector = crate::deployment::worker_selector(pool);
        let listed = pods.list_metadata(&ListParams::default().labels(&selector)).await?;
        let current: Vec<(String, Option<String>)> = listed
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (p.name_any(), p.annotations().get(plan::POD_DELETION_COST).cloned()))
            .collect();
        for (pod, cost) in plan::deletion_costs(&current, active) {
            let patch = json!({ "metadata": { "annotations": { plan::POD_DELETION_COST: cost.to_string() } } });
            pods.patch(&pod, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        Ok(())
    }

    /// A Normal Event for a scale action, at most one per pool per EVENT_INTERVAL.
    async fn scale_event(&self, m: &mut Member, up: bool, message: String) {
        let now = Instant::now();
        if m.state.last_event.is_some_and(|t| t + EVENT_INTERVAL > now) {
            m.state.suppressed_events += 1;
            return;
        }
        let note = match std::mem::take(&mut m.state.suppressed_events) {
            0 => message,
            n => format!("{message} ({n} earlier change(s) since the last event)"),
        };
        let reason = if up { "ScaledUp" } else { "ScaledDown" };
        self.ctx.publish(&m.pool.object_ref(&()), EventType::Normal, reason, &note, "Scale").await;
        m.state.last_event = Some(now);
    }

    /// Once the event interval has passed, reports scale changes whose Events were held back, so
    /// the last changes of a burst (often the scale-downs) are not left without an Event.
    async fn flush_suppressed_events(&self, m: &mut Member, replicas: u32) {
        let due = m.state.last_event.is_none_or(|t| t + EVENT_INTERVAL <= Instant::now());
        if m.state.suppressed_events == 0 || !due {
            return;
        }
        let n = std::mem::take(&mut m.state.suppressed_events);
        let latest = m.state.last_scale.as_ref().map(|(_, r)| r.clone()).unwrap_or_default();
        let note =
            format!("{n} more scale change(s) since the last event; now at {replicas} replicas (latest: {latest})");
        self.ctx.publish(&m.pool.object_ref(&()), EventType::Normal, "Scaled", &note, "Scale").await;
        m.state.last_event = Some(Instant::now());
    }

    /// ScalingActive=False/ScalerConflict; the pool is not scaled while the other autoscaler exists.
    async fn hold_for_conflict(&self, m: &mut Member, conflict: &Conflict) -> Result<(), kube::Error> {
        let wanted = vec![Wanted::no(kind::SCALING_ACTIVE, "ScalerConflict", conflict.message(&m.pool))];
        // Forget the window: when the conflict ends, decisions start afresh from the current count.
        m.state.scaler = ScalerState::new();
        let status = ScalerStatus {
            desired: None,
            backlog: None,
            in_flight: None,
            last_scale: m.state.last_scale.clone(),
            conditions: wanted,
            demand: None,
        };
        self.write_status(m, status).await
    }

    /// Applies the autoscaler's status fields when they changed (numbers alone at most every
    /// STATUS_NUMBERS_INTERVAL), and publishes Events for condition transitions.
    async fn write_status(&self, m: &mut Member, status: ScalerStatus) -> Result<(), kube::Error> {
        let now = Instant::now();
        if let Some((written, at)) = &m.state.written
            && (written == &status || (status.differs_only_in_numbers(written) && *at + STATUS_NUMBERS_INTERVAL > now))
        {
            return Ok(());
        }
        let pool = &*m.pool;
        let new_conditions =
            conditions::merge(&m.state.conditions, &status.conditions, pool.meta().generation, Timestamp::now());
        let mut body = serde_json::Map::new();
        if let Some(d) = status.desired {
            body.insert("desiredReplicas".into(), json!(d));
        }
        if let Some(b) = status.backlog {
            body.insert("backlog".into(), json!(b));
        }
        if let Some(f) = status.in_flight {
            body.insert("inFlight".into(), json!(f));
        }
        if let Some((time, reason)) = &status.last_scale {
            body.insert("lastScaleTime".into(), json!(time));
            body.insert("lastScaleReason".into(), json!(reason));
        }
        body.extend(status.demand_fields());
        body.insert("conditions".into(), serde_json::to_value(&new_conditions).unwrap_or_default());
        let api: Api<WorkerPool> = Api::namespaced(self.ctx.client.clone(), &pool.namespace().unwrap_or_default());
        api.patch_status(&pool.name_any(), &apply_params(), &Patch::Apply(&status_body(pool, body.into()))).await?;
        self.ctx.publish_transitions(&pool.object_ref(&()), &m.state.conditions, &new_conditions).await;
        let ns = pool.namespace().unwrap_or_default();
        self.ctx.metrics.pool_conditions(&[ns.as_str(), &pool.name_any()], &new_conditions);
        m.state.conditions = new_conditions;
        m.state.written = Some((status, now));
        Ok(())
    }
}

impl Member {
    fn policy_acks_late(&self) -> bool {
        self.pool.spec.autoscaling.as_ref().is_some_and(|a| a.acks_late)
    }
}
