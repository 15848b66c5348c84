//! Defaulting and the validation that matters for operators, for built-in kinds.
//! Only the defaults a client can observe in practice are applied (see e2e/README.md).

use base64::Engine;
use serde_json::{Map, Value, json};

use super::resources::ResourceType;
use super::selector::LabelSelector;
use crate::admission::FieldError;

pub fn admit(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) -> Result<(), Vec<FieldError>> {
    let creating = old.is_none();
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("apps", "Deployment") => {
            deployment(obj)?;
            immutable(obj, old, "/spec/selector", "spec.selector")
        }
        ("", "Secret" | "ConfigMap") => {
            if rt.kind == "Secret" {
                secret(obj);
            }
            let locked = old.is_some_and(|o| o.get("immutable") == Some(&json!(true)));
            if locked {
                for (pointer, field) in [("/data", "data"), ("/binaryData", "binaryData"), ("/immutable", "immutable")]
                {
                    immutable(obj, old, pointer, field)?;
                }
            }
            Ok(())
        }
        ("", "Pod") => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
            if creating && obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            require_containers(obj.get("spec"), "spec")
        }
        ("", "Namespace") => {
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Refuse a change of a field the real server treats as immutable.
fn immutable(obj: &Value, old: Option<&Value>, pointer: &str, field: &str) -> Result<(), Vec<FieldError>> {
    match old {
        Some(old) if old.pointer(pointer) != obj.pointer(pointer) => {
            let value = obj.pointer(pointer).cloned().unwrap_or(Value::Null);
            Err(vec![FieldError::invalid(field, &value, "field is immutable")])
        }
        _ => Ok(()),
    }
}

fn deployment(obj: &mut Value) -> Result<(), Vec<FieldError>> {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(vec![FieldError::required("spec.selector"), FieldError::required("spec.template")]);
    };
    spec.entry("replicas").or_insert(json!(1));
    spec.entry("revisionHistoryLimit").or_insert(json!(10));
    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
    let strategy = spec.entry("strategy").or_insert_with(|| json!({}));
    if let Some(s) = strategy.as_object_mut() {
        let ty = s.entry("type").or_insert(json!("RollingUpdate")).clone();
        if ty == "RollingUpdate" {
            let ru = s.entry("rollingUpdate").or_insert_with(|| json!({}));
            if let Some(ru) = ru.as_object_mut() {
                ru.entry("maxUnavailable").or_insert(json!("25%"));
                ru.entry("maxSurge").or_insert(json!("25%"));
            }
        }
    }
    if let Some(pod_spec) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        default_pod_spec(pod_spec);
    }

    let mut errors = Vec::new();
    let spec = &obj["spec"];
    match spec.get("selector") {
        None => errors.push(FieldError::required("spec.selector")),
        Some(sel) => match LabelSelector::from_object(sel) {
            Ok(s) if s.is_empty() => {
                errors.push(FieldError::invalid("spec.selector", sel, "empty selector is invalid for deployment"))
            }
            Ok(s) => {
                let labels = spec.pointer("/template/metadata/labels").and_then(Value::as_object);
                if !s.matches_labels(labels) {
                    errors.push(FieldError::invalid(
                        "spec.template.metadata.labels",
                        &json!(labels),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            Err(e) => errors.push(FieldError::invalid("spec.selector", sel, &e)),
        },
    }
    if spec.pointer("/strategy/type") == Some(&json!("Recreate")) && spec.pointer("/strategy/rollingUpdate").is_some() {
        errors.push(FieldError {
            field: "spec.strategy.rollingUpdate".into(),
            message: "Forbidden: may not be specified when strategy `type` is 'Recreate'".into(),
            reason: "FieldValueForbidden".into(),
        });
    }
    if spec.get("replicas").and_then(Value::as_i64).is_some_and(|r| r < 0) {
        errors.push(FieldError::invalid("spec.replicas", &spec["replicas"], "must be greater than or equal to 0"));
    }
    match spec.get("template") {
        None => errors.push(FieldError::required("spec.template")),
        Some(t) => {
            if let Err(e) = require_containers(t.get("spec"), "spec.template.spec") {
                errors.extend(e);
            }
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

fn require_containers(pod_spec: Option<&Value>, path: &str) -> Result<(), Vec<FieldError>> {
    let containers = pod_spec.and_then(|s| s.get("containers")).and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        return Err(vec![FieldError::required(format!("{path}.containers"))]);
    };
    let mut errors = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        if c.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            errors.push(FieldError::required(format!("{path}.containers[{i}].name")));
        }
        if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
            errors.push(FieldError::required(format!("{path}.containers[{i}].image")));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

fn default_pod_spec(spec: &mut Value) {
    let Some(s) = spec.as_object_mut() else { return };
    s.entry("restartPolicy").or_insert(json!("Always"));
    s.entry("terminationGracePeriodSeconds").or_insert(json!(30));
    s.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    s.entry("schedulerName").or_insert(json!("default-scheduler"));
    s.entry("securityContext").or_insert(json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
            cs.iter_mut().filter_map(Value::as_object_mut).for_each(default_container);
        }
    }
    if let Some(volumes) = s.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in volumes.iter_mut() {
            for source in ["secret", "configMap"] {
                if let Some(src) = v.get_mut(source).and_then(Value::as_object_mut) {
                    src.entry("defaultMode").or_insert(json!(420));
                }
            }
        }
    }
}

fn default_probe(probe: &mut Value) {
    let Some(p) = probe.as_object_mut() else { return };
    p.entry("timeoutSeconds").or_insert(json!(1));
    p.entry("periodSeconds").or_insert(json!(10));
    p.entry("successThreshold").or_insert(json!(1));
    p.entry("failureThreshold").or_insert(json!(3));
}

fn default_container(c: &mut Map<String, Value>) {
    c.entry("terminationMessagePath").or_insert(json!("/dev/termination-log"));
    c.entry("terminationMessagePolicy").or_insert(json!("File"));
    c.entry("resources").or_insert(json!({}));
    let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or_default();
    let pinned_tag = last.contains(':') && !last.ends_with(":latest");
    let policy = if pinned_tag || image.contains('@') { "IfNotPresent" } else { "Always" };
    c.entry("imagePullPolicy").or_insert(json!(policy));
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe) {
            default_probe(p);
        }
    }
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.entry("protocol").or_insert(json!("TCP"));
        }
    }
    if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
        for e in env.iter_mut() {
            if let Some(field_ref) = e.pointer_mut("/valueFrom/fieldRef").and_then(Value::as_object_mut) {
                field_ref.entry("apiVersion").or_insert(json!("v1"));
            }
        }
    }
}

/// `stringData` is write-only: merged into base64 `data`, as the real server does.
fn secret(obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else { return };
    map.entry("type").or_insert(json!("Opaque"));
    let Some(Value::Object(string_data)) = map.remove("stringData") else { return };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let raw = v.as_str().unwrap_or_default();
            data.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(raw)));
        }
    }
}

/// The status a real server gives an accepted CRD.
pub fn crd_status(crd: &Value, rt: &ResourceType, now: &str) -> Value {
    let mut names = crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
    names["singular"] = json!(rt.singular);
    names["listKind"] = names.get("listKind").cloned().unwrap_or_else(|| json!(format!("{}List", rt.kind)));
    let condition = |ty: &str, reason: &str, message: &str| json!({"type": ty, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    json!({
        "acceptedNames": names,
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": [rt.storage_version()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::builtin_types;

    fn deployment_type() -> ResourceType {
        builtin_types().into_iter().find(|t| t.kind == "Deployment").unwrap()
    }

    fn minimal_deployment() -> Value {
        json!({"spec": {"selector": {"matchLabels": {"app": "w"}},
            "template": {"metadata": {"labels": {"app": "w"}}, "spec": {"containers": [{"name": "w", "image": "img:1"}]}}}})
    }

    #[test]
    fn deployments_get_the_real_defaults() {
        let mut d = minimal_deployment();
        admit(&deployment_type(), &mut d, None).unwrap();
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 30);
    }

    #[test]
    fn recreate_with_leftover_rolling_update_is_forbidden() {
        let mut d = minimal_deployment();
        d["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}});
        let errors = admit(&deployment_type(), &mut d, None).unwrap_err();
        assert_eq!(errors[0].field, "spec.strategy.rollingUpdate");
    }

    #[test]
    fn deployment_selectors_are_immutable() {
        let mut d = minimal_deployment();
        admit(&deployment_type(), &mut d, None).unwrap();
        let old = d.clone();
        d["spec"]["selector"]["matchLabels"]["tier"] = json!("x");
        d["spec"]["template"]["metadata"]["labels"]["tier"] = json!("x");
        let errors = admit(&deployment_type(), &mut d, Some(&old)).unwrap_err();
        assert_eq!(errors[0].field, "spec.selector");
        assert!(errors[0].message.ends_with("field is immutable"), "{}", errors[0].message);
    }

    #[test]
    fn selector_must_match_template_labels() {
        let mut d = minimal_deployment();
        d["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        let errors = admit(&deployment_type(), &mut d, None).unwrap_err();
        assert_eq!(errors[0].field, "spec.template.metadata.labels");
    }
}
