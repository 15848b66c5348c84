//! The autoscaler loop: every autoscaled pool registers its queues and `pollIntervalSeconds` with
//! its broker endpoint's poller ([`crate::brokers`]), which polls at the smallest interval of
//! everything on the endpoint (one probe = one round trip for all queues of all pools and
//! TaskQueues on it). On each new snapshot of an endpoint the loop decides for every pool on it,
//! and applies the worker Deployment's `spec.replicas` by server-side apply under
//! [`FIELD_MANAGER`] only when it changes. The loop never probes: a TaskQueue and the pools reading
//! it see the same snapshot, so no finding is consumed by one and missed by the other, and a
//! failed poll counts in the probe-error metric whoever it was for.
//!
//! Everything it reads comes from the scope's shared watch caches ([`crate::cache::Stores`]: pools,
//! TaskQueues, worker Deployments, HPAs, KEDA ScaledObjects when KEDA is installed), so a poll costs
//! the broker round trip and nothing else on the API server unless something changes. Brokers are
//! polled concurrently: a slow or unreachable broker (probes are bounded by their timeout) never
//! delays the pools on another one. The pools of one poll are decided concurrently (at most
//! [`IN_FLIGHT`] at once), every replica write before any Event or status write, so a burst that
//! wakes many pools reacts as fast as one.
//!
//! When HPAs or ScaledObjects cannot be watched (not served, or 403), pools are still scaled; their
//! ScalingActive condition says conflict detection is off, and the cache logs it once and sets
//! `celery_operator_optional_api_unavailable`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::decide::{self, Decision, Policy, Probe, ScalerState};
use super::demand;
use super::plan::{self, Activity, Conflict, ScalerStatus};
use crate::api::Named;
use crate::broker_config::{EndpointKey, ResolvedBroker};
use crate::brokers::{Consumer, Interest, QueueRef, Snapshot};
use crate::cache::{ApiHealth, Availability, Stores};
use crate::conditions::{self, Status, Wanted, kind};
use crate::crd::{BrokerSpec, TaskQueue, WorkerPool};
use crate::reconcile::{Context, display_name};
use crate::status;

/// Field manager of the worker Deployment's `spec.replicas` and the autoscaler's status fields.
pub use crate::labels::AUTOSCALER_FIELD_MANAGER as FIELD_MANAGER;
/// Decisions (and their writes) of one poll in flight at once.
pub const IN_FLIGHT: usize = 32;
/// How long the autoscaler waits at start for the optional APIs to answer before it scales
/// without conflict detection for those that have not.
const OPTIONAL_API_WAIT: Duration = Duration::from_secs(5);
/// How often the loop looks at the pools (new snapshots wake it at once).
const TICK: Duration = Duration::from_millis(100);
/// Backlog/in-flight-only status changes are written at most this often (metrics carry every poll).
pub const STATUS_NUMBERS_INTERVAL: Duration = Duration::from_secs(5);
/// Scale Events per pool at most this often; changes in between are summarised in the next one.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(30);
/// Broker URLs (from Secrets) are re-read at least this often, to follow rotations.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// Pools are grouped by endpoint again at least this often even when no pool or TaskQueue
/// changed: to re-resolve brokers (see [`RESOLVE_INTERVAL`]), retry a broker that could not be
/// resolved and renew a registration that lapsed.
const REGROUP_INTERVAL: Duration = Duration::from_secs(15);
/// After a grouping that took `t`, the next one (for a change) waits at least `t` times this: while
/// a fleet starts, pools and TaskQueues change all the time, and grouping on every tick took more
/// than half the operator's CPU at 5,000 pools. Grouping thus takes at most 1/20 of a core, and a
/// change reaches the autoscaler within a tick or two at 1,000 pools (a grouping takes a few ms).
const REGROUP_SPACING: u32 = 20;

/// Watch caches the loop reads (views of the scope's shared [`Stores`]).
#[derive(Clone)]
struct Caches {
    pools: Store<WorkerPool>,
    queues: Store<TaskQueue>,
    deployments: Store<Deployment>,
    hpas: Store<HorizontalPodAutoscaler>,
    scaled_objects: Option<Store<DynamicObject>>,
    /// Counts changes seen by the pool and TaskQueue watches.
    pools_changes: crate::cache::Changes,
    queues_changes: crate::cache::Changes,
    /// Whether HPAs and ScaledObjects can be watched.
    optional: Vec<ApiHealth>,
}

impl Caches {
    fn new(stores: &Stores) -> Self {
        Self {
            pools: stores.pools.store().clone(),
            queues: stores.queues.store().clone(),
            deployments: stores.deployments.store().clone(),
            hpas: stores.hpas.store().clone(),
            scaled_objects: stores.scaled_objects.as_ref().map(|(w, _)| w.store().clone()),
            pools_changes: stores.pools.changes(),
            queues_changes: stores.queues.changes(),
            optional: std::iter::once(stores.hpa_health.clone())
                .chain(stores.scaled_objects.iter().map(|(_, h)| h.clone()))
                .collect(),
        }
    }

    /// Why conflict detection is (partly) off, when an optional API cannot be watched.
    fn unchecked(&self) -> Option<String> {
        let why: Vec<String> = self
            .optional
            .iter()
            .filter_map(|h| match h.get() {
                Availability::Ready => None,
                Availability::Pending => Some(format!("{} not listed yet", h.resource())),
                Availability::Unavailable(why) => Some(why),
            })
            .collect();
        (!why.is_empty()).then(|| {
            format!("conflicts with other autoscalers on this pool's workers are not checked: {}", why.join("; "))
        })
    }
}

/// Runs the autoscaler on one scope's shared watch caches until `shutdown`.
pub async fn run(ctx: Arc<Context>, stores: Stores, shutdown: impl std::future::Future<Output = ()>) {
    let caches = Caches::new(&stores);
    let mut scaler = Scaler {
        ctx,
        caches,
        pools: HashMap::new(),
        endpoints: HashMap::new(),
        registered: HashMap::new(),
        resolved: HashMap::new(),
        valid: HashMap::new(),
        groups: HashMap::new(),
        grouped: None,
    };
    tokio::pin!(shutdown);
    // The required caches are ready (the controllers wait for them); HPAs and ScaledObjects are
    // optional: a refused or missing API must not keep pools from scaling.
    let ready = async {
        stores.wait_until_ready().await;
        stores.wait_for_optional(OPTIONAL_API_WAIT).await;
    };
    tokio::select! {
        _ = &mut shutdown => return,
        _ = ready => {}
    }
    match scaler.caches.unchecked() {
        None => info!("autoscaler started"),
        Some(why) => warn!(reason = %why, "autoscaler started without conflict detection"),
    }
    let mut polls: JoinSet<(EndpointKey, Vec<Member>)> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut published = scaler.ctx.brokers.published();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => scaler.start_due_polls(&mut polls).await,
            Ok(()) = published.changed() => scaler.start_due_polls(&mut polls).await,
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
    /// What this poll still has to send once every pool's replicas are out.
    outbox: Outbox,
}

/// Writes a poll holds back until every member's replica write is out: Events, then status.
#[derive(Default)]
struct Outbox {
    events: Vec<(EventType, &'static str, String)>,
    status: Option<ScalerStatus>,
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
            outbox: Outbox::default(),
        }
    }
}

/// A pool taking part in one decision round of its broker endpoint.
struct Member {
    c: Arc<Candidate>,
    state: PoolState,
}

/// An autoscaled pool found on an endpoint, before its state is taken for a decision round. Kept
/// between rounds (see [`Scaler::regroup`]): rebuilt only when pools or TaskQueues change.
struct Candidate {
    key: String,
    consumer: Consumer,
    pool: Arc<WorkerPool>,
    policy: Policy,
    queues: Vec<String>,
}

/// Decision rounds of one broker endpoint.
struct EndpointRounds {
    /// The poller and sequence number of the last snapshot decided on.
    decided: (u64, u64),
    busy: bool,
}

/// Where a TaskQueue's broker is, as last resolved.
struct Target {
    key: EndpointKey,
    spec: BrokerSpec,
    resolved: ResolvedBroker,
}

/// A TaskQueue's broker as last resolved.
struct Resolved {
    resource_version: Option<String>,
    at: Instant,
    target: Option<Arc<Target>>,
}

struct Scaler {
    ctx: Arc<Context>,
    caches: Caches,
    /// Pools under autoscaling, by `namespace/name`; taken out while their broker is being polled.
    pools: HashMap<String, Option<PoolState>>,
    endpoints: HashMap<EndpointKey, EndpointRounds>,
    /// What each pool registered with its endpoint's poller.
    registered: HashMap<String, (EndpointKey, Interest)>,
    resolved: HashMap<String, Resolved>,
    /// Whether each pool's spec passed validation, by resourceVersion (CEL is not free; the
    /// reconciler reports what is wrong).
    valid: HashMap<String, (Option<String>, bool)>,
    /// The autoscaled pools by endpoint, as last grouped.
    groups: HashMap<EndpointKey, Vec<Arc<Candidate>>>,
    /// The pool and TaskQueue change counts at the last grouping, when it ended and how long it
    /// took.
    grouped: Option<((u64, u64), Instant, Duration)>,
}

impl Scaler {
    /// Starts a decision round for every endpoint with a snapshot not decided on yet (and no
    /// round running), for the pools whose queues that snapshot polled. The pools are grouped by
    /// endpoint again only when pools or TaskQueues changed, or every [`REGROUP_INTERVAL`]
    /// (re-resolving brokers, renewing lapsed registrations): a tick with nothing new costs a
    /// look at each endpoint, not a walk over every pool.
    async fn start_due_polls(&mut self, polls: &mut JoinSet<(EndpointKey, Vec<Member>)>) {
        let versions = (self.caches.pools_changes.get(), self.caches.queues_changes.get());
        let due = self.grouped.is_none_or(|(seen, done, took)| {
            let since = done.elapsed();
            (seen != versions && since >= took * REGROUP_SPACING) || since >= REGROUP_INTERVAL
        });
        if due {
            let started = Instant::now();
            self.regroup().await;
            self.grouped = Some((versions, Instant::now(), started.elapsed()));
        }
        for (endpoint, members) in &self.groups {
            let rounds =
                self.endpoints.entry(endpoint.clone()).or_insert(EndpointRounds { decided: (0, 0), busy: false });
            if rounds.busy {
                continue;
            }
            let Some(snapshot) = self.ctx.brokers.snapshots(endpoint).and_then(|s| s.borrow().clone()) else {
                continue;
            };
            // A new poller for the endpoint (it closed and started again) counts from 1 again.
            if rounds.decided.0 == snapshot.poller && snapshot.seq <= rounds.decided.1 {
                continue;
            }
            // Take each pool's state out for the round; a pool already out (its broker changed while
            // a round on the old one runs), or whose queues this poll did not read yet (it was just
            // registered: the poller polls again at once), waits for the next round.
            let mut taken = Vec::with_capacity(members.len());
            for c in members {
                if !snapshot.covers_all(&c.queues) {
                    continue;
                }
                let slot = match self.pools.get_mut(&c.key) {
                    Some(slot) => slot,
                    None => self.pools.entry(c.key.clone()).or_insert_with(|| Some(PoolState::new(&c.pool))),
                };
                let Some(mut state) = slot.take() else { continue };
                if c.pool.meta().uid.as_deref().unwrap_or_default() != state.uid {
                    state = PoolState::new(&c.pool);
                }
                taken.push(Member { c: c.clone(), state });
            }
            if taken.is_empty() {
                continue;
            }
            self.ctx.brokers.renew(endpoint, taken.iter().map(|m| &m.c.consumer));
            rounds.busy = true;
            rounds.decided = (snapshot.poller, snapshot.seq);
            let poll = Poll { ctx: self.ctx.clone(), caches: self.caches.clone(), snapshot };
            let endpoint = endpoint.clone();
            polls.spawn(async move { (endpoint, poll.run(taken).await) });
        }
    }

    /// Groups the autoscaled pools by broker endpoint (registering each with its endpoint's
    /// poller), and forgets the pools that are gone or no longer autoscaled.
    async fn regroup(&mut self) {
        let mut groups: HashMap<EndpointKey, Vec<Arc<Candidate>>> = HashMap::new();
        let mut seen = HashSet::new();
        for pool in self.caches.pools.state() {
            let Some(policy) = Policy::from_spec(&pool.spec) else { continue };
            let key = display_name(&*pool);
            if pool.meta().deletion_timestamp.is_some() || !self.is_valid(&key, &pool) {
                continue;
            }
            seen.insert(key.clone());
            let Some(endpoint) = self.register(&key, &pool, &policy).await else { continue };
            let queues = pool_queue_names(&self.registered[&key].1);
            let consumer = Consumer::Pool(key.clone());
            groups.entry(endpoint).or_default().push(Arc::new(Candidate { key, consumer, pool, policy, queues }));
        }
        self.forget_pools_not_in(&seen).await;
        self.endpoints.retain(|key, rounds| rounds.busy || groups.contains_key(key));
        self.groups = groups;
    }

    /// Registers the pool's interest with its endpoint's poller (again only when it changed) and
    /// returns the endpoint; `None` (and the pool leaves any endpoint) while its TaskQueues are
    /// missing, blocked or on different brokers.
    async fn register(&mut self, key: &str, pool: &WorkerPool, policy: &Policy) -> Option<EndpointKey> {
        let consumer = Consumer::Pool(key.to_owned());
        let Some((target, queues)) = self.target(pool).await else {
            if self.registered.remove(key).is_some() {
                self.ctx.brokers.deregister(&consumer);
            }
            return None;
        };
        let interest = Interest { queues, interval: policy.poll_interval, worker_events: true };
        let current = self.registered.get(key);
        let unchanged = current.is_some_and(|(k, i)| *k == target.key && *i == interest);
        // A registration whose lease ran out (no round for a long time) is made again.
        if unchanged && self.ctx.brokers.is_registered(&consumer, &target.key) {
            return Some(target.key.clone());
        }
        match self.ctx.brokers.register(consumer, &target.spec, &target.resolved, interest.clone()) {
            Ok(_) => {
                self.registered.insert(key.to_owned(), (target.key.clone(), interest));
                Some(target.key.clone())
            }
            Err(e) => {
                debug!(pool = %key, error = %e, "the pool's broker cannot be polled");
                None
            }
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
    fn finished(&mut self, endpoint: EndpointKey, members: Vec<Member>) {
        if let Some(s) = self.endpoints.get_mut(&endpoint) {
            s.busy = false;
        }
        for m in members {
            if let Some(slot) = self.pools.get_mut(&m.c.key) {
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
            if self.registered.remove(&key).is_some() {
                self.ctx.brokers.deregister(&Consumer::Pool(key.clone()));
            }
            let (ns, name) = key.split_once('/').unwrap_or_default();
            self.ctx.metrics.forget_pool(&[ns, name]);
            let still_there = self.caches.pools.get(&ObjectRef::new(name).within(ns));
            if let (Some(pool), Some(_)) = (still_there, state) {
                // Autoscaling was switched off: give up our status fields (the reconciler owns
                // desiredReplicas from now on).
                let cleared = status::apply(&self.ctx.client, &*pool, status::Writer::Autoscaler, &json!({})).await;
                if let Err(e) = cleared {
                    warn!(pool = %key, error = %e, "could not clear the autoscaler's status fields");
                }
            }
        }
    }

    /// The pool's broker endpoint and TaskQueues (with their Celery queue names), when its
    /// TaskQueues exist and share one endpoint.
    async fn target(&mut self, pool: &WorkerPool) -> Option<(Arc<Target>, Vec<(QueueRef, String)>)> {
        let ns = pool.namespace().unwrap_or_default();
        let mut target: Option<Arc<Target>> = None;
        let mut queues = Vec::with_capacity(pool.spec.queues.len());
        for name in &pool.spec.queues {
            let tq = self.caches.queues.get(&ObjectRef::new(name).within(&ns))?;
            let t = self.resolve(&tq).await?;
            if target.as_ref().is_some_and(|first| first.key != t.key) {
                // Queues on different brokers: the reconciler reports it; nothing to scale.
                return None;
            }
            target = Some(t);
            queues.push((QueueRef::of(&tq), tq.queue_name().to_string()));
        }
        Some((target?, queues))
    }

    /// The TaskQueue's broker endpoint, re-resolved when the TaskQueue changed or its URL (which
    /// may come from a Secret) was last read more than RESOLVE_INTERVAL ago.
    async fn resolve(&mut self, tq: &TaskQueue) -> Option<Arc<Target>> {
        let key = display_name(tq);
        let rv = tq.resource_version();
        if let Some(r) = self.resolved.get(&key)
            && r.resource_version == rv
            && r.at.elapsed() < RESOLVE_INTERVAL
        {
            return r.target.clone();
        }
        let target = match crate::reconcile::taskqueue::resolve(tq, &self.ctx).await {
            Ok(Ok(resolved)) => Some(Arc::new(Target {
                key: EndpointKey::new(&tq.spec.broker, &resolved),
                spec: tq.spec.broker.clone(),
                resolved,
            })),
            // Blocked (reported on the TaskQueue by its reconciler) or an API error: retry later.
            Ok(Err(_)) => None,
            Err(e) => {
                debug!(queue = %key, error = %e, "could not resolve the broker");
                None
            }
        };
        self.resolved.insert(key, Resolved { resource_version: rv, at: Instant::now(), target: target.clone() });
        target
    }
}

/// The Celery queue names of a pool's interest.
fn pool_queue_names(interest: &Interest) -> Vec<String> {
    interest.queues.iter().map(|(_, q)| q.clone()).collect()
}

/// HPAs and KEDA ScaledObjects as seen at the start of a poll.
struct OtherScalers {
    hpas: Vec<Arc<HorizontalPodAutoscaler>>,
    scaled_objects: Vec<Arc<DynamicObject>>,
    /// Why conflict detection is (partly) off this poll, if it is.
    unchecked: Option<String>,
}

/// One decision round for the pools on one endpoint, from one snapshot.
struct Poll {
    ctx: Arc<Context>,
    caches: Caches,
    snapshot: Arc<Snapshot>,
}

impl Poll {
    async fn run(self, mut members: Vec<Member>) -> Vec<Member> {
        // The poller probed (and counted a failure in the probe-error metric); a failed probe is
        // Probe::Failed for every pool on the endpoint.
        let observation = self.snapshot.observation();
        let activity: Option<&Activity> = self.snapshot.workers.as_deref();
        // One snapshot of the other autoscalers for the whole poll.
        let others = OtherScalers {
            hpas: self.caches.hpas.state(),
            scaled_objects: self.caches.scaled_objects.as_ref().map(Store::state).unwrap_or_default(),
            unchecked: self.caches.unchecked(),
        };
        // Decide and write replicas for every member (Events and status are held in the outbox)...
        let (this, others) = (&self, &others);
        futures::stream::iter(members.iter_mut())
            .for_each_concurrent(IN_FLIGHT, |member| async move {
                if let Err(e) = this.decide_for(member, observation, activity, others).await {
                    warn!(pool = %member.c.key, error = %e, "autoscaling step failed");
                }
            })
            .await;
        self.ctx.metrics.decision_latency(self.snapshot.started.elapsed());
        // ...then send what they held back.
        futures::stream::iter(members.iter_mut())
            .for_each_concurrent(IN_FLIGHT, |member| async move {
                if let Err(e) = this.deliver(member, others.unchecked.as_deref()).await {
                    warn!(pool = %member.c.key, error = %e, "could not write the autoscaler's status");
                }
            })
            .await;
        members
    }

    async fn decide_for(
        &self,
        m: &mut Member,
        observation: Option<&celery_broker::BrokerObservation>,
        activity: Option<&Activity>,
        others: &OtherScalers,
    ) -> Result<(), crate::api::ApiError> {
        let pool = &*m.c.pool;
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
        let decision = decide::decide(&m.c.policy, &mut m.state.scaler, current, probe, Instant::now());
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
            conditions: plan::decision_conditions(&decision, &m.c.queues, &self.snapshot.endpoint),
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
        let lead_time = demand::lead_time(&m.c.policy, &m.state.demand.startups());
        let observation = observation?;
        let workers = activity.map(|a| demand::workers_of(&m.c.pool.name_any(), a));
        let spec = &m.c.pool.spec;
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
                .c
                .queues
                .iter()
                .filter_map(|q| Some((q.clone(), self.snapshot.latency.get(q)?.oldest_wait)))
                .collect(),
            per_replica_rate: m.state.demand.throughput.per_replica(),
        };
        let seen = demand::observe_demand(&m.c.queues, observation, &context);
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
    ) -> Result<(), crate::api::ApiError> {
        let pool = &*m.c.pool;
        let ns = pool.namespace().unwrap_or_default();
        let to = decision.replicas;
        if to < current
            && let Some(active) = active
            && let Err(e) = self.set_deletion_costs(pool, active).await
        {
            // Scaling in anyway: a worker being stopped finishes its task (warm shutdown within the
            // grace period); the costs only choose which workers stop.
            warn!(pool = %m.c.key, error = %e, "could not set pod deletion costs");
        }
        let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &ns);
        crate::replicas::apply(&deployments, &deployment.name_any(), to).await?;
        m.state.applied = Some((deployment.resource_version(), to));
        let message = plan::scale_message(current, to, &decision.reason);
        info!(pool = %m.c.key, from = current, to, reason = %decision.reason, "scaled");
        self.ctx.metrics.pool_scaled(&[ns.as_str(), &pool.name_any()], to > current);
        m.state.last_scale = Some((Timestamp::now().to_string(), message.clone()));
        self.scale_event(m, to > current, message);
        Ok(())
    }

    /// Annotates the pool's pods with their running task counts so idle workers are removed first.
    async fn set_deletion_costs(
        &self,
        pool: &WorkerPool,
        active: &BTreeMap<String, u32>,
    ) -> Result<(), crate::api::ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &pool.namespace().unwrap_or_default());
        let selector = crate::deployment::worker_selector(pool);
        let listed = pods.list_metadata(&ListParams::default().labels(&selector)).await.named(
            "LIST",
            "Pod",
            crate::api::object(&pods, "*"),
        )?;
        let current: Vec<(String, Option<String>)> = listed
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (p.name_any(), p.annotations().get(plan::POD_DELETION_COST).cloned()))
            .collect();
        for (pod, cost) in plan::deletion_costs(&current, active) {
            let patch = json!({ "metadata": { "annotations": { plan::POD_DELETION_COST: cost.to_string() } } });
            pods.patch(&pod, &PatchParams::default(), &Patch::Merge(&patch)).await.named(
                "PATCH",
                "Pod",
                crate::api::object(&pods, &pod),
            )?;
        }
        Ok(())
    }

    /// A Normal Event for a scale action, at most one per pool per EVENT_INTERVAL (sent after the
    /// poll's replica writes).
    fn scale_event(&self, m: &mut Member, up: bool, message: String) {
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
        m.state.outbox.events.push((EventType::Normal, reason, note));
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
        m.state.outbox.events.push((EventType::Normal, "Scaled", note));
        m.state.last_event = Some(Instant::now());
    }

    /// ScalingActive=False/ScalerConflict; the pool is not scaled while the other autoscaler exists.
    async fn hold_for_conflict(&self, m: &mut Member, conflict: &Conflict) -> Result<(), crate::api::ApiError> {
        let wanted = vec![Wanted::no(kind::SCALING_ACTIVE, "ScalerConflict", conflict.message(&m.c.pool))];
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

    /// Holds the autoscaler's status fields for [`Poll::deliver`], after the poll's replica writes.
    async fn write_status(&self, m: &mut Member, status: ScalerStatus) -> Result<(), crate::api::ApiError> {
        m.state.outbox.status = Some(status);
        Ok(())
    }

    /// Sends what the member's decision held back: its Events, then its status.
    async fn deliver(&self, m: &mut Member, unchecked: Option<&str>) -> Result<(), crate::api::ApiError> {
        let events = std::mem::take(&mut m.state.outbox.events);
        if !events.is_empty() {
            // Built only when there is something to send: most rounds send nothing.
            let reference = m.c.pool.object_ref(&());
            for (type_, reason, note) in events {
                self.ctx.publish(&reference, type_, reason, &note, "Scale").await;
            }
        }
        match m.state.outbox.status.take() {
            Some(mut status) => {
                if let Some(why) = unchecked {
                    note_unchecked(&mut status.conditions, why);
                }
                self.apply_status(m, status).await
            }
            None => Ok(()),
        }
    }

    /// Applies the autoscaler's status fields when they changed (numbers alone at most every
    /// STATUS_NUMBERS_INTERVAL), and publishes Events for condition transitions.
    async fn apply_status(&self, m: &mut Member, status: ScalerStatus) -> Result<(), crate::api::ApiError> {
        let now = Instant::now();
        if let Some((written, at)) = &m.state.written
            && (written == &status || (status.differs_only_in_numbers(written) && *at + STATUS_NUMBERS_INTERVAL > now))
        {
            return Ok(());
        }
        let pool = &*m.c.pool;
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
        status::apply(&self.ctx.client, pool, status::Writer::Autoscaler, &body).await?;
        self.ctx.publish_transitions(&pool.object_ref(&()), &m.state.conditions, &new_conditions).await;
        let ns = pool.namespace().unwrap_or_default();
        self.ctx.metrics.pool_conditions(&[ns.as_str(), &pool.name_any()], &new_conditions);
        m.state.conditions = new_conditions;
        m.state.written = Some((status, now));
        Ok(())
    }
}

/// Reason of ScalingActive=True while HPAs or ScaledObjects cannot be watched: the pool is scaled,
/// but another autoscaler on its workers would go unnoticed.
pub const CONFLICT_UNCHECKED: &str = "ScalerConflictUnchecked";

/// Says on ScalingActive that conflict detection is off, and why: as its reason while it is True
/// (scaling goes on), in its message either way.
fn note_unchecked(wanted: &mut [Wanted], why: &str) {
    for w in wanted.iter_mut().filter(|w| w.type_ == kind::SCALING_ACTIVE) {
        if w.status == Status::True {
            w.reason = CONFLICT_UNCHECKED.into();
        }
        w.message = format!("{}; {why}", w.message);
    }
}

impl Member {
    fn policy_acks_late(&self) -> bool {
        self.c.pool.spec.autoscaling.as_ref().is_some_and(|a| a.acks_late)
    }
}
