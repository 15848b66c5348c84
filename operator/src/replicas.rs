//! Who owns `spec.replicas` of a worker Deployment, and every write of it.
//!
//! - A fixed pool: the reconciler applies the pool's `spec.replicas` ([`from_spec`]).
//! - An autoscaled pool: the autoscaler's field manager owns the field ([`apply`]). The reconciler
//!   creates the Deployment at the autoscaler's starting point ([`initial`]) and hands the field
//!   over at once; its later applies leave replicas out. Should the field be left with the
//!   reconciler alone (the handoff write failed, the operator died between the two writes, or
//!   the pool just turned autoscaling on), such an apply would drop it and Kubernetes would reset
//!   the Deployment to one replica. So [`ensure_handoff`] runs before every apply of an autoscaled
//!   pool's worker Deployment and redoes the handoff whenever the live object shows the
//!   autoscaler does not own the field.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use crate::crd::WorkerPool;
use crate::labels::AUTOSCALER_FIELD_MANAGER;

/// The replicas the reconciler applies for a fixed pool (the pool's spec.replicas, what
/// `kubectl scale workerpool` sets); `None` for an autoscaled pool, whose replicas the
/// autoscaler owns.
pub fn from_spec(pool: &WorkerPool) -> Option<i32> {
    pool.spec.autoscaling.is_none().then_some(pool.spec.replicas)
}

/// Replicas an autoscaled pool's new worker Deployment starts with: the last desired count in
/// status (the Deployment was deleted by hand), else minReplicas; `None` without autoscaling.
pub fn initial(pool: &WorkerPool) -> Option<i32> {
    let policy = crate::autoscale::decide::Policy::from_spec(&pool.spec)?;
    let last = pool.status.as_ref().and_then(|s| s.desired_replicas).map(|d| d.max(0).unsigned_abs());
    let n = last.unwrap_or(policy.min).max(policy.min).min(policy.max);
    Some(i32::try_from(n).unwrap_or(i32::MAX))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force()
}

/// Applies a worker Deployment's `spec.replicas` (and nothing else) under the autoscaler's field
/// manager. The Deployment must exist: a partial apply cannot create one.
pub async fn apply(deployments: &Api<Deployment>, name: &str, replicas: u32) -> Result<Deployment, kube::Error> {
    let body = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": { "replicas": replicas },
    });
    deployments.patch(name, &apply_params(), &Patch::Apply(&body)).await
}

/// Whether this managedFields entry is the autoscaler's and covers spec.replicas.
fn is_autoscaler_replicas(entry: &ManagedFieldsEntry) -> bool {
    entry.manager.as_deref() == Some(AUTOSCALER_FIELD_MANAGER)
        && entry.operation.as_deref() == Some("Apply")
        && entry.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").and_then(|s| s.get("f:replicas")).is_some())
}

/// Whether the autoscaler's field manager owns the Deployment's spec.replicas.
pub fn autoscaler_owns(d: &Deployment) -> bool {
    d.managed_fields().iter().any(is_autoscaler_replicas)
}

/// Slims a Deployment for the watch cache: drops every managedFields entry but the one
/// [`autoscaler_owns`] reads (a few bytes, where the reconciler's entry lists the whole template).
pub fn slim(d: &mut Deployment) {
    d.managed_fields_mut().retain(is_autoscaler_replicas);
}

/// Before the reconciler applies an autoscaled pool's existing worker Deployment (`live`, from
/// the cache): makes sure the autoscaler owns spec.replicas, redoing the handoff if not. Returns
/// the object as it stands afterwards.
///
/// The cache may lag a handoff just made, so a missing owner is confirmed with one GET; the
/// handoff then applies the live count, conditional on that resourceVersion, so it can never
/// undo a scale the autoscaler made in between (a conflict fails the reconcile, which retries).
pub async fn ensure_handoff(deployments: &Api<Deployment>, live: Deployment) -> Result<Deployment, kube::Error> {
    if autoscaler_owns(&live) {
        return Ok(live);
    }
    let Some(fresh) = deployments.get_opt(&live.name_any()).await? else { return Ok(live) };
    if autoscaler_owns(&fresh) {
        return Ok(fresh);
    }
    handoff(deployments, &fresh).await
}

/// Right after the reconciler created an autoscaled pool's worker Deployment (with
/// [`initial`] replicas): the autoscaler takes spec.replicas over. If this write fails the
/// reconcile fails and [`ensure_handoff`] redoes it before anything else is applied.
pub async fn hand_over_new(deployments: &Api<Deployment>, created: Deployment) -> Result<Deployment, kube::Error> {
    if autoscaler_owns(&created) {
        return Ok(created);
    }
    handoff(deployments, &created).await
}

async fn handoff(deployments: &Api<Deployment>, live: &Deployment) -> Result<Deployment, kube::Error> {
    let name = live.name_any();
    let replicas = live.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0);
    let body = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "resourceVersion": live.resource_version() },
        "spec": { "replicas": replicas },
    });
    let handed = deployments.patch(&name, &apply_params(), &Patch::Apply(&body)).await?;
    info!(deployment = %name, replicas, "the autoscaler now owns spec.replicas");
    Ok(handed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;

    fn entry(manager: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_autoscalers_replicas_entry_counts_and_survives_slimming() {
        let mut d = Deployment::default();
        d.metadata.managed_fields = Some(vec![
            entry("celery-operator", json!({"f:spec": {"f:replicas": {}, "f:template": {}}})),
            entry(AUTOSCALER_FIELD_MANAGER, json!({"f:metadata": {}})),
        ]);
        assert!(!autoscaler_owns(&d), "the reconciler's ownership is not the autoscaler's");
        d.metadata
            .managed_fields
            .as_mut()
            .unwrap()
            .push(entry(AUTOSCALER_FIELD_MANAGER, json!({"f:spec": {"f:replicas": {}}})));
        assert!(autoscaler_owns(&d));
        slim(&mut d);
        assert_eq!(d.managed_fields().len(), 1);
        assert!(autoscaler_owns(&d));
    }
}
