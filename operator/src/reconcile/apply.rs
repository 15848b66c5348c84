//! Server-side apply that writes only when the cluster differs from what we want.
//!
//! A no-op reconcile must not write: re-applying an unchanged object costs an API write per
//! reconcile and wakes every watcher of it. So we compare first: the desired object must be
//! contained in the live one (fields the API server added, such as defaults and managedFields, are
//! ignored), and we apply only when it is not.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::info;

use super::Result;

/// Whether every field set in `desired` has the same value in `actual`. Lists must match in length
/// and element by element; maps may have extra keys in `actual`.
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => {
            d.iter().all(|(k, dv)| a.get(k).map_or(is_empty(dv), |av| is_subset(dv, av)))
        }
        (Value::Array(d), Value::Array(a)) => d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| is_subset(dv, av)),
        (d, a) => d == a,
    }
}

/// The API server drops empty maps and lists, so their absence is no difference.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Applies `desired` under `manager` (with force: the operator owns these fields) unless `live`
/// already matches it. Returns the object as it now stands in the cluster.
pub async fn apply_if_changed<K>(api: &Api<K>, desired: &K, live: Option<&K>, manager: &str) -> Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let desired_value = serde_json::to_value(desired)?;
    if let Some(live) = live
        && is_subset(&desired_value, &serde_json::to_value(live)?)
    {
        return Ok(live.clone());
    }
    let name = desired.name_any();
    let mut body = desired_value;
    body["apiVersion"] = K::api_version(&Default::default()).into();
    body["kind"] = K::kind(&Default::default()).into();
    let applied = api.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await?;
    info!(kind = %K::kind(&Default::default()), name, "applied");
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_added_fields_are_no_difference() {
        let desired = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "w", "image": "a"}]}}});
        let live = json!({"metadata": {"uid": "u", "managedFields": []},
            "spec": {"replicas": 2, "progressDeadlineSeconds": 600,
                     "template": {"containers": [{"name": "w", "image": "a", "imagePullPolicy": "IfNotPresent"}]}}});
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn a_changed_value_or_list_length_is_a_difference() {
        let desired = json!({"spec": {"replicas": 1, "args": ["a", "b"]}});
        assert!(!is_subset(&desired, &json!({"spec": {"replicas": 3, "args": ["a", "b"]}})));
        assert!(!is_subset(&desired, &json!({"spec": {"replicas": 1, "args": ["a"]}})));
        assert!(!is_subset(&desired, &json!({"spec": {"args": ["a", "b"]}})));
    }

    #[test]
    fn empty_maps_missing_on_the_server_are_no_difference() {
        assert!(is_subset(&json!({"spec": {"emptyDir": {}}}), &json!({"spec": {}})));
    }
}
