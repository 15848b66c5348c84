//! TaskQueue reconcile: validate the spec, resolve the broker URL (from its Secret when referenced)
//! without ever logging it, register the queue with its endpoint's poller, and map the latest
//! snapshot of the endpoint to status, conditions, metrics and Events — writing status only when
//! something meaningful changed. The reconcile never probes: the poller does, for every consumer
//! of the endpoint at once, and triggers this reconcile when a snapshot changes what the status
//! shows, and once per [`STATUS_INTERVAL`] (see [`crate::brokers`]).

use std::sync::Arc;
use std::time::Duration;

use celery_broker::SecretUrl;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::{Blocked, Context, Result, display_name, reconciled};
use crate::api::Named;
use crate::broker_config::{self, ResolvedBroker};
use crate::brokers::{Consumer, HeldIncident, Interest, QueueRef, Snapshot, Snapshots};
use crate::conditions::{self, Wanted};
use crate::crd::{SecretKeyRef, TaskQueue, TaskQueueStatus, WorkerPool};
use crate::probe;
use crate::validate::FieldError;

/// How often a TaskQueue's status is refreshed from its broker's snapshots.
pub const STATUS_INTERVAL: Duration = crate::brokers::TASK_QUEUE_INTERVAL;
/// Reconciles are triggered by the poller; this requeue only backs the triggers up.
pub const BACKSTOP_INTERVAL: Duration = Duration::from_secs(30);
/// Depth-only changes are written at most this often: status is not a time series.
pub const DEPTH_WRITE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a reconcile waits, beyond the probe timeout, for a first snapshot of its queue.
const FIRST_SNAPSHOT_MARGIN: Duration = Duration::from_secs(5);

/// Reconciles one TaskQueue.
#[instrument(skip_all, fields(queue = %display_name(&*tq)))]
pub async fn reconcile(tq: Arc<TaskQueue>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer("TaskQueue");
    let mut new = tq.status.clone().unwrap_or_default();
    let observed = match resolve(&tq, &ctx).await? {
        Err(blocked) => {
            // Nothing to poll for this queue until the user changes something.
            ctx.brokers.deregister(&Consumer::TaskQueue(QueueRef::of(&tq)));
            write_status(&tq, &ctx, new, blocked.conditions(), &[]).await?;
            reconciled(&*tq, &ctx);
            return Ok(Action::await_change());
        }
        Ok(resolved) => observe_queue(&tq, &ctx, &resolved, &mut new).await,
    };
    let Some(Observed { conditions, incidents }) = observed else {
        // No snapshot yet: the poller triggers this reconcile when its first one is published.
        return Ok(Action::requeue(STATUS_INTERVAL));
    };
    write_status(&tq, &ctx, new, conditions, &incidents).await?;
    reconciled(&*tq, &ctx);
    Ok(Action::requeue(BACKSTOP_INTERVAL))
}

/// What a snapshot means for the TaskQueue.
struct Observed {
    conditions: Vec<Wanted>,
    /// Incidents this TaskQueue has not reported yet, each with its number of occurrences.
    incidents: Vec<(HeldIncident, usize)>,
}

async fn observe_queue(
    tq: &TaskQueue,
    ctx: &Context,
    resolved: &ResolvedBroker,
    status: &mut TaskQueueStatus,
) -> Option<Observed> {
    let spec = &tq.spec.broker;
    let me = QueueRef::of(tq);
    let registered = ctx.brokers.register(Consumer::TaskQueue(me.clone()), spec, resolved, Interest::task_queue(tq));
    let (key, snapshots) = match registered {
        Ok(registered) => registered,
        Err(e) => {
            let error = FieldError::new("spec.broker", e.to_string());
            let conditions = Blocked::new("InvalidBrokerUrl", &[error]).conditions();
            return Some(Observed { conditions, incidents: Vec::new() });
        }
    };
    let queue = tq.queue_name();
    let timeout = broker_config::broker_config(spec, resolved).timeout + FIRST_SNAPSHOT_MARGIN;
    let snapshot = first_snapshot(snapshots, queue, timeout).await?;
    let incidents = ctx.brokers.unreported(&key, &me, queue, &snapshot);
    let conditions = match snapshot.view_for(queue) {
        Err(e) => probe::unreachable(e),
        Ok(mut observation) => {
            judge_expiry(tq, ctx, &mut observation).await;
            let latency = snapshot.latency.get(queue).copied();
            let report = probe::report(&observation, queue, snapshot.endpoint.clone(), spec.safety_check, latency);
            ctx.metrics.queue_observed(&me.labels(), report.ready, report.unacked, observation.is_unsafe());
            ctx.metrics.queue_demand(&me.labels(), report.latency, report.scheduled);
            // Depth and memory move all the time under load: they are written at most every
            // DEPTH_WRITE_INTERVAL, while condition and configuration changes are written at once.
            let mut broker = report.broker.clone();
            let previous_memory = status.broker.as_ref().and_then(|b| b.used_memory_bytes);
            // Used memory alone never triggers a write: it drifts on every live Redis, and an idle
            // queue would otherwise rewrite its status every interval forever. It is refreshed
            // whenever the depth is written.
            let changed = report.moving() != probe::QueueReport::moving_in(status);
            let last_written = status.last_probe_time.as_ref().map(|t| t.0);
            let due =
                last_written.is_none_or(|t| Timestamp::now().duration_since(t).unsigned_abs() >= DEPTH_WRITE_INTERVAL);
            if changed && due {
                report.write_numbers(status);
                status.last_probe_time = Some(Time(snapshot.at));
            } else {
                broker.used_memory_bytes = previous_memory;
            }
            status.broker = Some(broker);
            report.conditions
        }
    };
    Some(Observed { conditions, incidents })
}

/// The latest snapshot that polled `queue`, waiting up to `timeout` for the first one (a queue
/// just registered is polled at once).
async fn first_snapshot(mut snapshots: Snapshots, queue: &str, timeout: Duration) -> Option<Arc<Snapshot>> {
    let wait = snapshots.wait_for(|s| s.as_ref().is_some_and(|s| s.covers(queue)));
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(snapshot)) => snapshot.clone(),
        // The poller closed (the endpoint was dropped meanwhile) or is slow: the next trigger.
        _ => None,
    }
}

/// An expiring queue is critical when a pool consuming it can scale to zero; the pools are read
/// only when the queue expires.
async fn judge_expiry(tq: &TaskQueue, ctx: &Context, observation: &mut celery_broker::BrokerObservation) {
    if !observation.findings.iter().any(|f| f.reason == celery_broker::Reason::QueueExpires) {
        return;
    }
    let pools: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &tq.namespace().unwrap_or_default());
    match pools.list(&Default::default()).await {
        Ok(pools) => broker_config::judge_expiry_with_pools(&mut observation.findings, tq, &pools.items),
        Err(e) => tracing::debug!(error = %e, "cannot list WorkerPools; expiring queue judged without them"),
    }
}

/// The broker URL, management URL and CA from the spec or the referenced Secrets, or why not.
pub(crate) async fn resolve(tq: &TaskQueue, ctx: &Context) -> Result<Result<ResolvedBroker, Blocked>> {
    let errors = ctx.validations.task_queue(tq);
    if !errors.is_empty() {
        return Ok(Err(Blocked::new("InvalidSpec", &errors)));
    }
    let broker = &tq.spec.broker;
    let url = match (&broker.url, &broker.url_from) {
        (Some(url), _) => SecretUrl::new(url.clone()),
        (None, Some(from)) => match secret_value(tq, ctx, &from.secret_key_ref, "spec.broker.urlFrom").await? {
            Ok(value) => SecretUrl::new(value),
            Err(blocked) => return Ok(Err(blocked)),
        },
        (None, None) => unreachable!("the CEL rule requires url or urlFrom"),
    };
    let management = match &broker.management_url_from {
        None => None,
        Some(from) => match secret_value(tq, ctx, &from.secret_key_ref, "spec.broker.managementUrlFrom").await? {
            Ok(value) => Some(SecretUrl::new(value)),
            Err(blocked) => return Ok(Err(blocked)),
        },
    };
    let ca_cert_pem = match broker.tls.as_ref().and_then(|tls| tls.ca_from.as_ref()) {
        None => None,
        Some(from) => match secret_value(tq, ctx, &from.secret_key_ref, "spec.broker.tls.caFrom").await? {
            Ok(value) => Some(value),
            Err(blocked) => return Ok(Err(blocked)),
        },
    };
    Ok(Ok(ResolvedBroker { url, management_url: management, ca_cert_pem }))
}

/// A Secret key's value, trimmed; errors name the field and never include the value.
async fn secret_value(tq: &TaskQueue, ctx: &Context, r: &SecretKeyRef, field: &str) -> Result<Result<String, Blocked>> {
    let ns = tq.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(secret) = ctx.secrets.get(&secrets, &ns, &r.name).await? else {
        let message = format!("Secret \"{}\" not found in namespace \"{ns}\"", r.name);
        return Ok(Err(Blocked::new(
            "SecretNotFound",
            &[FieldError::new(format!("{field}.secretKeyRef.name"), message)],
        )));
    };
    let data = secret.data.clone().unwrap_or_default();
    let value = data
        .get(&r.key)
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(&r.key)).map(|v| v.trim().to_string()));
    Ok(value.ok_or_else(|| {
        let keys: Vec<&String> = data.keys().collect();
        let message = format!("Secret \"{}\" has no key \"{}\" (it has: {keys:?})", r.name, r.key);
        Blocked::new("SecretKeyNotFound", &[FieldError::new(format!("{field}.secretKeyRef.key"), message)])
    }))
}

async fn write_status(
    tq: &TaskQueue,
    ctx: &Context,
    mut new: TaskQueueStatus,
    wanted: Vec<Wanted>,
    incidents: &[(HeldIncident, usize)],
) -> Result<()> {
    let old = tq.status.clone().unwrap_or_default();
    let generation = tq.meta().generation;
    new.observed_generation = generation;
    new.conditions = conditions::merge(&old.conditions, &wanted, generation, Timestamp::now());
    // One Warning Event per incident, whichever poll saw it — before the status write, as the
    // incidents are already marked reported (a failed write is retried; the Event is not repeated).
    let reference = tq.object_ref(&());
    for (incident, count) in incidents {
        let mut note = incident.dated().message;
        if *count > 1 {
            note.push_str(&format!(" ({count} occurrences since the last report)"));
        }
        let reason = incident.finding.reason.as_str();
        ctx.publish(&reference, EventType::Warning, reason, &note, "BrokerIncident").await;
    }
    if new == old {
        return Ok(());
    }
    let api: Api<TaskQueue> = Api::namespaced(ctx.client.clone(), &tq.namespace().unwrap_or_default());
    let name = tq.name_any();
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": new }))).await.named(
        "PATCH status of",
        "TaskQueue",
        crate::api::object(&api, &name),
    )?;
    // A condition whose reason became an incident just announced is not announced a second time.
    let announced = |c: &&Condition| incidents.iter().any(|(i, _)| i.finding.reason.as_str() == c.reason);
    for c in conditions::transitions(&old.conditions, &new.conditions).iter().filter(|c| !announced(c)) {
        publish_transition(ctx, &reference, c).await;
    }
    Ok(())
}

/// An Event for one condition transition (as [`Context::publish_transitions`] does).
async fn publish_transition(ctx: &Context, reference: &k8s_openapi::api::core::v1::ObjectReference, c: &Condition) {
    if c.type_ == conditions::kind::RECONCILING {
        return;
    }
    let type_ = if conditions::is_warning(c) { EventType::Warning } else { EventType::Normal };
    ctx.publish(reference, type_, &c.reason, &c.message, &c.type_).await;
}
