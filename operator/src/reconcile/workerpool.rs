//! WorkerPool reconcile: resolve the pool's TaskQueues, decide who runs beat, apply the worker and
//! beat Deployments when they differ, and write status when it changed.
//!
//! Everything is read from the scope's watch caches ([`crate::cache::Stores`]): a reconcile that
//! changes nothing sends no request. The one read that goes to the API server confirms that a
//! worker or beat Deployment missing from the cache is really missing before it is created (the
//! cache may not have seen our own create yet).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use tracing::{info, instrument};

use super::apply::apply_if_changed;
use super::{Blocked, Context, Result, Scoped, display_name, reconciled};
use crate::api::{Named, object};
use crate::cache::Stores;
use crate::conditions::{self, Wanted, kind};
use crate::crd::{TaskQueue, WorkerPool, WorkerPoolStatus};
use crate::deployment::{self, BrokerUrlSource, PoolInputs};
use crate::labels;
use crate::replicas;
use crate::status;
use crate::validate::{self, FieldError};

/// Resolves the pool's TaskQueues (`found[i]` is the TaskQueue named by `spec.queues[i]`, if any)
/// into the builders' inputs. All queues must share one broker.
pub fn resolve_inputs(pool: &WorkerPool, found: &[Option<&TaskQueue>]) -> Result<PoolInputs, Blocked> {
    let ns = pool.namespace().unwrap_or_default();
    let missing: Vec<FieldError> = pool
        .spec
        .queues
        .iter()
        .zip(found)
        .enumerate()
        .filter(|(_, (_, q))| q.is_none())
        .map(|(i, (name, _))| {
            FieldError::new(
                format!("spec.queues[{i}]"),
                format!("TaskQueue \"{name}\" not found in namespace \"{ns}\"; create it or remove it from the list"),
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(Blocked::new("QueueNotFound", &missing));
    }
    let queues: Vec<&TaskQueue> = found.iter().flatten().copied().collect();
    let first = &queues[0].spec.broker;
    if let Some((i, other)) = queues.iter().enumerate().find(|(_, q)| {
        let b = &q.spec.broker;
        (&b.url, &b.url_from) != (&first.url, &first.url_from)
    }) {
        let message = format!(
            "TaskQueue \"{}\" uses a different broker than \"{}\"; a pool's workers connect to one broker, so split the queues into separate pools",
            other.name_any(),
            queues[0].name_any()
        );
        return Err(Blocked::new("QueuesOnDifferentBrokers", &[FieldError::new(format!("spec.queues[{i}]"), message)]));
    }
    let broker = match (&first.url, &first.url_from) {
        (_, Some(from)) => BrokerUrlSource::Secret(from.secret_key_ref.clone()),
        (Some(url), None) => BrokerUrlSource::Literal(url.clone()),
        (None, None) => {
            let field = FieldError::new(
                format!("TaskQueue {}: spec.broker", queues[0].name_any()),
                "exactly one of url or urlFrom must be set",
            );
            return Err(Blocked::new("InvalidQueue", &[field]));
        }
    };
    Ok(PoolInputs {
        queue_names: queues.iter().map(|q| q.queue_name().to_string()).collect(),
        broker,
        replicas: replicas::from_spec(pool),
    })
}

/// If another pool in the namespace already holds beat for the same app, its name. The holder is the
/// oldest such pool (ties broken by name), so every reconcile of every pool agrees on it. `pools`
/// may be every pool, or only those enabling beat for the app (what [`Stores::beat_pools`] finds).
pub fn beat_holder<'a>(pool: &WorkerPool, pools: impl IntoIterator<Item = &'a WorkerPool>) -> Option<String> {
    if !pool.spec.beat.enabled {
        return None;
    }
    let key = |p: &WorkerPool| (p.creation_timestamp().map(|t| t.0), p.name_any());
    pools
        .into_iter()
        .filter(|p| p.spec.beat.enabled && p.spec.app == pool.spec.app && p.uid() != pool.uid())
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .filter(|p| key(p) < key(pool))
        .min_by_key(|p| key(p))
        .map(ResourceExt::name_any)
}

/// Reconciles one WorkerPool.
#[instrument(skip_all, fields(pool = %display_name(&*pool)))]
pub async fn reconcile(pool: Arc<WorkerPool>, scope: Arc<Scoped>) -> Result<Action> {
    let ctx = &*scope.ctx;
    let stores = &scope.stores;
    let _timer = ctx.metrics.reconcile_timer("WorkerPool");
    let ns = pool.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let mut worker = stores.deployment(&ns, &pool.worker_deployment_name()).map(Arc::unwrap_or_clone);

    let mut wanted = Vec::new();
    let action = match plan(&pool, stores) {
        Err(blocked) => {
            wanted = blocked.conditions();
            Action::await_change()
        }
        Ok((mut inputs, holder)) => {
            let live = match worker.take() {
                Some(live) => Some(live),
                None => {
                    let name = pool.worker_deployment_name();
                    deployments.get_opt(&name).await.named("GET", "Deployment", object(&deployments, &name))?
                }
            };
            let autoscaled = pool.spec.autoscaling.is_some();
            let live = match live {
                // Before any apply that leaves replicas out: the autoscaler must own them.
                Some(live) if autoscaled => Some(replicas::ensure_handoff(&deployments, live).await?),
                live => live,
            };
            // An autoscaled pool's new Deployment starts at the autoscaler's starting point rather
            // than Kubernetes' default of one replica, and is handed to the autoscaler at once.
            let created = live.is_none();
            if created && autoscaled {
                inputs.replicas = replicas::initial(&pool);
            }
            let desired = deployment::worker_deployment(&pool, &inputs);
            let mut applied = apply_if_changed(&deployments, &desired, live.as_ref(), labels::FIELD_MANAGER).await?;
            if created && autoscaled {
                applied = replicas::hand_over_new(&deployments, applied).await?;
            }
            let beat = stores.deployment(&ns, &pool.beat_deployment_name()).map(Arc::unwrap_or_clone);
            let beat_condition = reconcile_beat(&pool, &deployments, &inputs, holder, beat).await?;
            wanted.extend(rollout_conditions(&applied));
            worker = Some(applied);
            wanted.extend(beat_condition);
            Action::requeue(super::RESYNC)
        }
    };
    write_status(&pool, ctx, worker.as_ref(), wanted).await?;
    reconciled(&*pool, ctx);
    Ok(action)
}

/// Dereference and validate (from the caches): the inputs to build from and the beat holder, or
/// why we cannot.
fn plan(pool: &WorkerPool, stores: &Stores) -> Result<(PoolInputs, Option<String>), Blocked> {
    let errors = validate::check_worker_pool(pool);
    if !errors.is_empty() {
        return Err(Blocked::new("InvalidSpec", &errors));
    }
    let ns = pool.namespace().unwrap_or_default();
    let found: Vec<Option<Arc<TaskQueue>>> = pool.spec.queues.iter().map(|name| stores.queue(&ns, name)).collect();
    let found: Vec<Option<&TaskQueue>> = found.iter().map(Option::as_deref).collect();
    let inputs = resolve_inputs(pool, &found)?;
    let holder = if pool.spec.beat.enabled {
        let candidates = stores.beat_pools(&ns, &pool.spec.app);
        beat_holder(pool, candidates.iter().map(|p| &**p))
    } else {
        None
    };
    Ok((inputs, holder))
}

/// Applies or removes the beat Deployment; returns the BeatSingleton condition (if beat is enabled).
async fn reconcile_beat(
    pool: &WorkerPool,
    deployments: &Api<Deployment>,
    inputs: &PoolInputs,
    holder: Option<String>,
    live: Option<Deployment>,
) -> Result<Option<Wanted>> {
    let run_here = pool.spec.beat.enabled && holder.is_none();
    if run_here {
        let live = match live {
            Some(live) => Some(live),
            None => {
                let name = pool.beat_deployment_name();
                deployments.get_opt(&name).await.named("GET", "Deployment", object(deployments, &name))?
            }
        };
        let desired = deployment::beat_deployment(pool, inputs);
        apply_if_changed(deployments, &desired, live.as_ref(), labels::FIELD_MANAGER).await?;
    } else if let Some(live) = &live
        && live.owner_references().iter().any(|o| Some(&o.uid) == pool.uid().as_ref())
    {
        let name = live.name_any();
        deployments.delete(&name, &DeleteParams::foreground()).await.named(
            "DELETE",
            "Deployment",
            object(deployments, &name),
        )?;
        info!(deployment = %live.name_any(), "deleted beat Deployment");
    }
    Ok(match (pool.spec.beat.enabled, holder) {
        (false, _) => None,
        (true, None) => Some(Wanted::yes(
            kind::BEAT_SINGLETON,
            "BeatRunning",
            format!(
                "beat runs as Deployment {} with one replica and the Recreate strategy",
                pool.beat_deployment_name()
            ),
        )),
        (true, Some(holder)) => {
            let message = format!(
                "spec.beat.enabled: WorkerPool \"{holder}\" holds beat for app \"{}\" in this namespace (the oldest pool enabling beat for an app runs it, even while it is stalled, so that beat never moves while running); a second beat would fire every periodic task twice, so none is started here. Disable beat on one of the pools.",
                pool.spec.app
            );
            Some(Wanted::no(kind::BEAT_SINGLETON, "BeatConflict", message))
        }
    })
}

/// Ready / Reconciling from the worker Deployment's rollout.
fn rollout_conditions(d: &Deployment) -> Vec<Wanted> {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let current = status.observed_generation >= d.metadata.generation;
    let updated = status.updated_replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    if current && updated >= want && ready >= want && total == want {
        vec![Wanted::yes(kind::READY, "Available", format!("{ready}/{want} workers ready"))]
    } else {
        let message = format!("{ready}/{want} workers ready, {updated} updated, {total} running");
        vec![
            Wanted::no(kind::READY, "RollingOut", message.clone()),
            Wanted::yes(kind::RECONCILING, "RollingOut", message),
        ]
    }
}

/// Condition types the WorkerPool reconciler owns; the autoscaler owns ScalingActive and
/// ScalingLimited. Each writes only its own through server-side apply, so neither overwrites the
/// other's.
const OWN_CONDITIONS: [&str; 4] = [kind::READY, kind::RECONCILING, kind::STALLED, kind::BEAT_SINGLETON];

/// Writes status when it differs from the live status, and publishes Events for transitions.
///
/// Status is shared with the autoscaler (desiredReplicas, backlog, inFlight, lastScale*, its
/// conditions): it is written by server-side apply of this reconciler's fields only.
async fn write_status(
    pool: &WorkerPool,
    ctx: &Context,
    worker: Option<&Deployment>,
    wanted: Vec<Wanted>,
) -> Result<()> {
    let old = pool.status.clone().unwrap_or_default();
    let generation = pool.meta().generation;
    let deployment_status = worker.and_then(|d| d.status.clone()).unwrap_or_default();
    let (theirs, ours): (Vec<_>, Vec<_>) =
        old.conditions.iter().cloned().partition(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()));
    let own = conditions::merge(&ours, &wanted, generation, Timestamp::now());
    let mine = WorkerPoolStatus {
        observed_generation: generation,
        replicas: deployment_status.replicas.unwrap_or(0),
        ready_replicas: deployment_status.ready_replicas.unwrap_or(0),
        desired_replicas: replicas::from_spec(pool),
        selector: Some(deployment::worker_selector(pool)),
        conditions: own.clone(),
        ..Default::default()
    };
    let new = WorkerPoolStatus {
        desired_replicas: mine.desired_replicas.or(old.desired_replicas),
        conditions: own.iter().cloned().chain(theirs).collect(),
        backlog: old.backlog,
        in_flight: old.in_flight,
        last_scale_time: old.last_scale_time.clone(),
        last_scale_reason: old.last_scale_reason.clone(),
        scaling_rule: old.scaling_rule.clone(),
        due: old.due,
        scheduled: old.scheduled,
        ..mine.clone()
    };
    if same_status(&new, &old) {
        return Ok(());
    }
    status::apply(&ctx.client, pool, status::Writer::Reconciler, &mine).await?;
    ctx.publish_transitions(&pool.object_ref(&()), &ours, &own).await;
    Ok(())
}

/// Equal up to the order of conditions (the two writers' conditions interleave on the server).
fn same_status(a: &WorkerPoolStatus, b: &WorkerPoolStatus) -> bool {
    let sorted = |s: &WorkerPoolStatus| {
        let mut s = s.clone();
        s.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
        s
    };
    sorted(a) == sorted(b)
}
