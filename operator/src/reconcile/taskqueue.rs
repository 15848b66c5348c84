//! TaskQueue reconcile: validate the spec, resolve the broker URL (from its Secret when referenced)
//! without ever logging it, and report what was found in conditions.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::{Blocked, Context, Result, display_name, reconciled};
use crate::conditions::{self, Wanted, kind};
use crate::crd::{BrokerSummary, TaskQueue, TaskQueueStatus};
use crate::redact::{BrokerUrl, UrlError};
use crate::validate::{self, FieldError};

/// Reconciles one TaskQueue.
#[instrument(skip_all, fields(queue = %display_name(&*tq)))]
pub async fn reconcile(tq: Arc<TaskQueue>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer("TaskQueue");
    let (wanted, broker, action) = match resolve_broker_url(&tq, &ctx).await? {
        Err(blocked) => (blocked.conditions(), None, Action::await_change()),
        Ok(url) => {
            let summary =
                BrokerSummary { kind: url.kind().to_string(), endpoint: Some(url.redacted()), ..Default::default() };
            let wanted = vec![Wanted::yes(
                kind::READY,
                "BrokerConfigured",
                format!("queue \"{}\" on {} broker {}", tq.queue_name(), url.kind(), url.redacted()),
            )];
            (wanted, Some(summary), Action::requeue(super::RESYNC))
        }
    };
    write_status(&tq, &ctx, wanted, broker).await?;
    reconciled(&*tq, &ctx);
    Ok(action)
}

/// The broker URL from spec.broker.url or the referenced Secret key, or why it cannot be had.
pub async fn resolve_broker_url(tq: &TaskQueue, ctx: &Context) -> Result<Result<BrokerUrl, Blocked>> {
    let errors = validate::check_task_queue(tq);
    if !errors.is_empty() {
        return Ok(Err(Blocked::new("InvalidSpec", &errors)));
    }
    let broker = &tq.spec.broker;
    let (raw, field, origin) = match (&broker.url, &broker.url_from) {
        (Some(url), _) => (url.clone(), "spec.broker.url", "the URL".to_string()),
        (None, Some(from)) => {
            let r = &from.secret_key_ref;
            let ns = tq.namespace().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let Some(secret) = secrets.get_opt(&r.name).await? else {
                let message = format!("Secret \"{}\" not found in namespace \"{ns}\"", r.name);
                let error = FieldError::new("spec.broker.urlFrom.secretKeyRef.name", message);
                return Ok(Err(Blocked::new("SecretNotFound", &[error])));
            };
            let data = secret.data.unwrap_or_default();
            let string_data = secret.string_data.unwrap_or_default();
            let value = data
                .get(&r.key)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .or_else(|| string_data.get(&r.key).cloned());
            let Some(value) = value else {
                let keys: Vec<&String> = data.keys().collect();
                let message = format!("Secret \"{}\" has no key \"{}\" (it has: {keys:?})", r.name, r.key);
                let error = FieldError::new("spec.broker.urlFrom.secretKeyRef.key", message);
                return Ok(Err(Blocked::new("SecretKeyNotFound", &[error])));
            };
            (value, "spec.broker.urlFrom", format!("the value of Secret \"{}\" key \"{}\"", r.name, r.key))
        }
        (None, None) => unreachable!("the CEL rule requires url or urlFrom"),
    };
    Ok(BrokerUrl::parse(raw.trim())
        .map_err(|e: UrlError| Blocked::new("InvalidBrokerUrl", &[FieldError::new(field, format!("{origin} {e}"))])))
}

async fn write_status(tq: &TaskQueue, ctx: &Context, wanted: Vec<Wanted>, broker: Option<BrokerSummary>) -> Result<()> {
    let old = tq.status.clone().unwrap_or_default();
    let generation = tq.meta().generation;
    let new = TaskQueueStatus {
        observed_generation: generation,
        broker: broker.or(old.broker.clone()),
        conditions: conditions::merge(&old.conditions, &wanted, generation, Timestamp::now()),
        ..old.clone()
    };
    if new == old {
        return Ok(());
    }
    let api: Api<TaskQueue> = Api::namespaced(ctx.client.clone(), &tq.namespace().unwrap_or_default());
    api.patch_status(&tq.name_any(), &PatchParams::default(), &Patch::Merge(&json!({ "status": new }))).await?;
    ctx.publish_transitions(&tq.object_ref(&()), &old.conditions, &new.conditions).await;
    Ok(())
}
