//! TaskQueue reconcile: validate the spec, resolve the broker URL (from its Secret when referenced)
//! without ever logging it, probe the broker for this queue's depth and safety, and write status
//! only when something meaningful changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_broker::SecretUrl;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::{Blocked, Context, Result, display_name, reconciled};
use crate::broker_config::{self, ResolvedBroker};
use crate::conditions::{self, Wanted};
use crate::crd::{SecretKeyRef, TaskQueue, TaskQueueStatus, WorkerPool};
use crate::probe;
use crate::validate::{self, FieldError};

/// How often a TaskQueue's broker is probed for status.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Depth-only changes are written at most this often: status is not a time series.
pub const DEPTH_WRITE_INTERVAL: Duration = Duration::from_secs(30);

/// Reconciles one TaskQueue.
#[instrument(skip_all, fields(queue = %display_name(&*tq)))]
pub async fn reconcile(tq: Arc<TaskQueue>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer("TaskQueue");
    let mut new = tq.status.clone().unwrap_or_default();
    let wanted = match resolve(&tq, &ctx).await? {
        Err(blocked) => {
            write_status(&tq, &ctx, new, blocked.conditions()).await?;
            reconciled(&*tq, &ctx);
            return Ok(Action::await_change());
        }
        Ok(resolved) => probe_queue(&tq, &ctx, &resolved, &mut new).await,
    };
    write_status(&tq, &ctx, new, wanted).await?;
    reconciled(&*tq, &ctx);
    Ok(Action::requeue(PROBE_INTERVAL))
}

async fn probe_queue(
    tq: &TaskQueue,
    ctx: &Context,
    resolved: &ResolvedBroker,
    status: &mut TaskQueueStatus,
) -> Vec<Wanted> {
    let spec = &tq.spec.broker;
    let broker = match ctx.brokers.get(spec, resolved) {
        Ok(broker) => broker,
        Err(e) => {
            let error = FieldError::new("spec.broker", e.to_string());
            return Blocked::new("InvalidBrokerUrl", &[error]).conditions();
        }
    };
    let labels = [tq.namespace().unwrap_or_default(), tq.name_any()];
    let started = Instant::now();
    let result = ctx.brokers.probe(&broker, &[tq.queue_name()]).await;
    ctx.metrics.probe_finished(&labels, started.elapsed(), result.as_ref().err().map(|e| e.metric_label()));
    match result {
        Err(e) => probe::unreachable(&e),
        Ok(mut observation) => {
            judge_expiry(tq, ctx, &mut observation).await;
            let latency = ctx.brokers.latency(&broker, tq.queue_name());
            let report = probe::report(&observation, tq.queue_name(), broker.endpoint(), spec.safety_check, latency);
            ctx.metrics.queue_observed(&labels, report.ready, report.unacked, observation.is_unsafe());
            ctx.metrics.queue_demand(&labels, report.latency, report.scheduled);
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
                status.last_probe_time = Some(Time(Timestamp::now()));
            } else {
                broker.used_memory_bytes = previous_memory;
            }
            status.broker = Some(broker);
            report.conditions
        }
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
    let errors = validate::check_task_queue(tq);
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
    let Some(secret) = secrets.get_opt(&r.name).await? else {
        let message = format!("Secret \"{}\" not found in namespace \"{ns}\"", r.name);
        return Ok(Err(Blocked::new(
            "SecretNotFound",
            &[FieldError::new(format!("{field}.secretKeyRef.name"), message)],
        )));
    };
    let data = secret.data.unwrap_or_default();
    let value = data
        .get(&r.key)
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .or_else(|| secret.string_data.unwrap_or_default().get(&r.key).map(|v| v.trim().to_string()));
    Ok(value.ok_or_else(|| {
        let keys: Vec<&String> = data.keys().collect();
        let message = format!("Secret \"{}\" has no key \"{}\" (it has: {keys:?})", r.name, r.key);
        Blocked::new("SecretKeyNotFound", &[FieldError::new(format!("{field}.secretKeyRef.key"), message)])
    }))
}

async fn write_status(tq: &TaskQueue, ctx: &Context, mut new: TaskQueueStatus, wanted: Vec<Wanted>) -> Result<()> {
    let old = tq.status.clone().unwrap_or_default();
    let generation = tq.meta().generation;
    new.observed_generation = generation;
    new.conditions = conditions::merge(&old.conditions, &wanted, generation, Timestamp::now());
    if new == old {
        return Ok(());
    }
    let api: Api<TaskQueue> = Api::namespaced(ctx.client.clone(), &tq.namespace().unwrap_or_default());
    api.patch_status(&tq.name_any(), &PatchParams::default(), &Patch::Merge(&json!({ "status": new }))).await?;
    ctx.publish_transitions(&tq.object_ref(&()), &old.conditions, &new.conditions).await;
    Ok(())
}
