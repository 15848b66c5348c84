//! Every status write: server-side apply of one writer's half under its field manager.
//!
//! WorkerPool status has two writers, each owning its fields: the reconciler
//! ([`labels::FIELD_MANAGER`]: observedGeneration, replicas, readyReplicas, selector,
//! desiredReplicas of fixed pools, Ready/Reconciling/Stalled/BeatSingleton) and the autoscaler
//! ([`labels::AUTOSCALER_FIELD_MANAGER`]: desiredReplicas of autoscaled pools, backlog, inFlight,
//! lastScale*, ScalingActive/ScalingLimited). Applying a half with a field left out gives that
//! field up; applying an empty half gives up all of them.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::labels;

/// Which half of a status is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The reconciler's half.
    Reconciler,
    /// The autoscaler's half.
    Autoscaler,
}

impl Writer {
    /// The field manager of this half.
    pub fn field_manager(self) -> &'static str {
        match self {
            Writer::Reconciler => labels::FIELD_MANAGER,
            Writer::Autoscaler => labels::AUTOSCALER_FIELD_MANAGER,
        }
    }
}

/// Applies `status` (this writer's fields, all of them) to `obj`'s status subresource.
pub async fn apply<K>(client: &kube::Client, obj: &K, writer: Writer, status: &impl Serialize) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name, "namespace": obj.namespace() },
        "status": status,
    });
    api.patch_status(&name, &PatchParams::apply(writer.field_manager()).force(), &Patch::Apply(&body)).await
}
