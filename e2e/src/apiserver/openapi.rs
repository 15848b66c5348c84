//! A minimal OpenAPI v3 surface: enough for `kubectl apply` to detect server-side field
//! validation (PATCH operations with a `fieldValidation` parameter, tagged with their GVK) and for
//! `kubectl explain` on custom resources (the CRD schemas as components).

use serde_json::{Map, Value, json};

use super::resources::ResourceType;

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// `GET /openapi/v3`: the group-versions and where their documents live.
pub fn root<'a>(types: impl Iterator<Item = &'a ResourceType>, generation: u64) -> Value {
    let mut paths = Map::new();
    for t in types {
        for v in &t.versions {
            let p = gv_path(&t.group, v);
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={generation:016X}")}));
        }
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/apis/{group}/{version}` (or `api/v1`).
pub fn group_version<'a>(types: impl Iterator<Item = &'a ResourceType>, group: &str, version: &str) -> Option<Value> {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in types.filter(|t| t.group == group && t.serves(version)) {
        let gvk = json!({"group": group, "version": version, "kind": t.kind});
        let prefix = format!("/{}", gv_path(group, version));
        let item = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        let params: Vec<Value> = ["dryRun", "fieldManager", "fieldValidation", "force"]
            .iter()
            .map(|p| json!({"name": p, "in": "query", "schema": {"type": if *p == "force" { "boolean" } else { "string" }}, "uniqueItems": true}))
            .collect();
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", t.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        paths.insert(item, json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}));
        let schema = t
            .custom
            .as_ref()
            .and_then(|c| c.crd.get("spec"))
            .and_then(|s| s.get("versions"))
            .and_then(Value::as_array)
            .and_then(|vs| vs.iter().find(|v| v.get("name").and_then(Value::as_str) == Some(version)))
            .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        let mut schema = schema;
        schema["x-kubernetes-group-version-kind"] = json!([gvk]);
        let reversed_group: Vec<&str> = group.split('.').rev().collect();
        let name = if group.is_empty() {
            format!("io.k8s.api.core.{version}.{}", t.kind)
        } else {
            format!("{}.{version}.{}", reversed_group.join("."), t.kind)
        };
        schemas.insert(name, schema);
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": super::discovery::GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
