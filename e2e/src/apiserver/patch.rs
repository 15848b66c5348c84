//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and an approximation of
//! strategic merge patch (merge patch, except that lists with a known merge key merge by key).

use serde_json::{Map, Value};

use super::status::ApiError;

/// The patch flavours, from the request's Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let ct = ct.split(';').next().unwrap_or_default().trim();
        match ct {
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" | "application/apply-patch+cbor" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Merge keys of well-known associative lists, by field name. Used by strategic merge patch and
/// by server-side apply field tracking for every kind (custom resources included).
pub fn list_merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" | "env" | "volumes" | "imagePullSecrets" => "name",
        "hostAliases" => "ip",
        "readinessGates" => "conditionType",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

pub fn apply_patch(kind: PatchKind, target: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let mut doc = target.clone();
    match kind {
        PatchKind::Merge => {
            let patch: Value = parse_json(body)?;
            json_patch::merge(&mut doc, &patch);
        }
        PatchKind::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the JSON patch is invalid: {e}")))?;
            json_patch::patch(&mut doc, &patch).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
        }
        PatchKind::Strategic => {
            let patch: Value = parse_json(body)?;
            strategic_merge(&mut doc, &patch, "");
        }
        PatchKind::Apply => unreachable!("apply patches go through server-side apply"),
    }
    Ok(doc)
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Merge-patch semantics plus: lists under a known merge key merge element-wise by that key,
/// `{"$patch": "delete"}` elements remove by key, and a `$patch: replace` map replaces wholesale.
fn strategic_merge(doc: &mut Value, patch: &Value, field: &str) {
    match (doc, patch) {
        (Value::Object(target), Value::Object(p)) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut replaced = p.clone();
                replaced.remove("$patch");
                *target = replaced;
                return;
            }
            for (key, value) in p {
                if key.starts_with("$setElementOrder/") || key == "$retainKeys" {
                    continue;
                }
                if value.is_null() {
                    target.remove(key);
                    continue;
                }
                match target.get_mut(key) {
                    Some(existing)
                        if existing.is_object() || (existing.is_array() && list_merge_key(key).is_some()) =>
                    {
                        strategic_merge(existing, value, key)
                    }
                    _ => {
                        target.insert(key.clone(), strip_directives(value));
                    }
                }
            }
        }
        (Value::Array(target), Value::Array(p)) => match list_merge_key(field) {
            Some(key) => merge_list_by_key(target, p, key),
            None => *target = p.clone(),
        },
        (doc, patch) => *doc = strip_directives(patch),
    }
}

fn merge_list_by_key(target: &mut Vec<Value>, patch: &[Value], key: &str) {
    for item in patch {
        let Some(id) = item.get(key) else {
            target.push(item.clone());
            continue;
        };
        let pos = target.iter().position(|t| t.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                target.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut target[i], item, ""),
            (None, false) => target.push(strip_directives(item)),
        }
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_and_env_by_name() {
        let doc = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
            {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "X", "$patch": "delete"}]},
            {"name": "c", "image": "c:1"}]}});
        let out = apply_patch(PatchKind::Strategic, &doc, patch.to_string().as_bytes()).unwrap();
        assert_eq!(
            out,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:1", "env": [{"name": "Y", "value": "3"}]},
                {"name": "b", "image": "b:1"},
                {"name": "c", "image": "c:1"}]}})
        );
    }

    #[test]
    fn merge_patch_replaces_lists_and_null_deletes() {
        let doc = json!({"a": [1, 2], "b": {"c": 1, "d": 2}});
        let out = apply_patch(PatchKind::Merge, &doc, br#"{"a": [3], "b": {"c": null}}"#).unwrap();
        assert_eq!(out, json!({"a": [3], "b": {"d": 2}}));
    }

    #[test]
    fn json_patch_test_operation_failure_is_rejected() {
        let doc = json!({"a": 1});
        let err = apply_patch(PatchKind::Json, &doc, br#"[{"op": "test", "path": "/a", "value": 2}]"#).unwrap_err();
        assert_eq!(err.code, 422);
    }
}
