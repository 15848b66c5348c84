//! `meta.k8s.io/v1` Table responses (what `kubectl get` asks for): CRD printer columns evaluated
//! with JSONPath, and a default column set for built-in kinds.

use jsonpath_rust::JsonPath;
use serde_json::{Value, json};

use super::meta;
use super::resources::{PrinterColumn, ResourceType};

/// `includeObject` query parameter of Table requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Whether an Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

struct Column {
    name: &'static str,
    type_: &'static str,
    format: &'static str,
    priority: i64,
    cell: fn(&Value) -> Value,
}

/// Build a Table for `objects` (already rendered for `version`).
pub fn table(rt: &ResourceType, version: &str, objects: &[Value], include: IncludeObject, list_meta: Value) -> Value {
    let (definitions, rows): (Vec<Value>, Vec<Vec<Value>>) = match rt.printer_columns(version) {
        Some(cols) if !cols.is_empty() => custom_columns(cols, objects),
        Some(_) => builtin_columns(&[name_column(), age_column()], objects),
        None => builtin_columns(&columns_for(rt), objects),
    };
    let rows: Vec<Value> = rows
        .into_iter()
        .zip(objects)
        .map(|(cells, obj)| {
            let mut row = json!({"cells": cells});
            match include {
                IncludeObject::None => {}
                IncludeObject::Object => row["object"] = obj.clone(),
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj.get("metadata").cloned().unwrap_or_default(),
                    })
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

fn definition(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn custom_columns(cols: &[PrinterColumn], objects: &[Value]) -> (Vec<Value>, Vec<Vec<Value>>) {
    let mut defs = vec![definition("Name", "string", "name", "Name must be unique within a namespace.", 0)];
    defs.extend(cols.iter().map(|c| definition(&c.name, &c.type_, &c.format, &c.description, c.priority)));
    let rows = objects
        .iter()
        .map(|obj| {
            let mut cells = vec![json!(meta::name_of(obj))];
            cells.extend(cols.iter().map(|c| custom_cell(c, obj)));
            cells
        })
        .collect();
    (defs, rows)
}

/// Evaluate a printer column's JSONPath (`.status.conditions[?(@.type=="Ready")].status`).
pub fn eval_json_path<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let path = path.trim();
    let expr = if path.starts_with('$') { path.to_string() } else { format!("${path}") };
    obj.query(&expr).unwrap_or_default()
}

fn custom_cell(col: &PrinterColumn, obj: &Value) -> Value {
    let Some(value) = eval_json_path(obj, &col.json_path).into_iter().next() else {
        return Value::Null;
    };
    match col.type_.as_str() {
        "date" => match value.as_str().and_then(meta::parse_time) {
            Some(t) => json!(meta::human_duration(meta::now_seconds() - t)),
            None => json!("<invalid>"),
        },
        "integer" => value.as_i64().map(|i| json!(i)).unwrap_or(Value::Null),
        "number" => value.as_f64().map(|f| json!(f)).unwrap_or(Value::Null),
        "boolean" => value.as_bool().map(|b| json!(b)).unwrap_or(Value::Null),
        _ => match value {
            Value::String(s) => json!(s),
            other => json!(other.to_string()),
        },
    }
}

fn builtin_columns(cols: &[Column], objects: &[Value]) -> (Vec<Value>, Vec<Vec<Value>>) {
    let defs = cols.iter().map(|c| definition(c.name, c.type_, c.format, "", c.priority)).collect();
    let rows = objects.iter().map(|o| cols.iter().map(|c| (c.cell)(o)).collect()).collect();
    (defs, rows)
}

fn col(name: &'static str, type_: &'static str, cell: fn(&Value) -> Value) -> Column {
    Column { name, type_, format: "", priority: 0, cell }
}

fn wide(mut c: Column) -> Column {
    c.priority = 1;
    c
}

fn name_column() -> Column {
    Column { name: "Name", type_: "string", format: "name", priority: 0, cell: |o| json!(meta::name_of(o)) }
}

fn age_column() -> Column {
    col("Age", "string", |o| {
        let created = o.pointer("/metadata/creationTimestamp").and_then(Value::as_str).and_then(meta::parse_time);
        match created {
            Some(t) => json!(meta::human_duration(meta::now_seconds() - t)),
            None => json!("<unknown>"),
        }
    })
}

fn int_at(o: &Value, pointer: &str) -> i64 {
    o.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn str_at(o: &Value, pointer: &str) -> Value {
    json!(o.pointer(pointer).and_then(Value::as_str).unwrap_or_default())
}

fn count_at(o: &Value, pointer: &str) -> Value {
    json!(o.pointer(pointer).and_then(Value::as_object).map_or(0, |m| m.len()))
}

fn columns_for(rt: &ResourceType) -> Vec<Column> {
    let mut cols = vec![name_column()];
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("apps", "Deployment") => {
            cols.push(col("Ready", "string", |o| {
                json!(format!("{}/{}", int_at(o, "/status/readyReplicas"), int_at(o, "/spec/replicas")))
            }));
            cols.push(col("Up-to-date", "integer", |o| json!(int_at(o, "/status/updatedReplicas"))));
            cols.push(col("Available", "integer", |o| json!(int_at(o, "/status/availableReplicas"))));
            cols.push(age_column());
            cols.push(wide(col("Containers", "string", |o| join_containers(o, "name"))));
            cols.push(wide(col("Images", "string", |o| join_containers(o, "image"))));
        }
        ("", "Pod") => {
            cols.push(col("Ready", "string", |o| {
                let statuses = o.pointer("/status/containerStatuses").and_then(Value::as_array);
                let ready = statuses.map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
                let total = o.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
                json!(format!("{ready}/{total}"))
            }));
            cols.push(col("Status", "string", |o| {
                if o.pointer("/metadata/deletionTimestamp").is_some() {
                    json!("Terminating")
                } else {
                    str_at(o, "/status/phase")
                }
            }));
            cols.push(col("Restarts", "string", |o| {
                let statuses = o.pointer("/status/containerStatuses").and_then(Value::as_array);
                json!(statuses.map_or(0, |s| s.iter().map(|c| c["restartCount"].as_i64().unwrap_or(0)).sum::<i64>()))
            }));
            cols.push(age_column());
            cols.push(wide(col("IP", "string", |o| str_at(o, "/status/podIP"))));
            cols.push(wide(col("Node", "string", |o| str_at(o, "/spec/nodeName"))));
        }
        ("", "Secret") => {
            cols.push(col("Type", "string", |o| str_at(o, "/type")));
            cols.push(col("Data", "string", |o| count_at(o, "/data")));
            cols.push(age_column());
        }
        ("", "ConfigMap") => {
            cols.push(col("Data", "string", |o| count_at(o, "/data")));
            cols.push(age_column());
        }
        ("", "Namespace") => {
            cols.push(col("Status", "string", |o| str_at(o, "/status/phase")));
            cols.push(age_column());
        }
        ("coordination.k8s.io", "Lease") => {
            cols.push(col("Holder", "string", |o| str_at(o, "/spec/holderIdentity")));
            cols.push(age_column());
        }
        (_, "Event") => {
            cols.push(col("Type", "string", |o| str_at(o, "/type")));
            cols.push(col("Reason", "string", |o| str_at(o, "/reason")));
            cols.push(col("Object", "string", |o| {
                let regarding = o.get("involvedObject").or_else(|| o.get("regarding")).cloned().unwrap_or_default();
                json!(format!(
                    "{}/{}",
                    regarding["kind"].as_str().unwrap_or_default().to_lowercase(),
                    regarding["name"].as_str().unwrap_or_default()
                ))
            }));
            cols.push(col("Message", "string", |o| {
                o.get("message").or_else(|| o.get("note")).cloned().unwrap_or(json!(""))
            }));
            cols.push(age_column());
        }
        ("autoscaling", "HorizontalPodAutoscaler") => {
            cols.push(col("Reference", "string", |o| {
                json!(format!(
                    "{}/{}",
                    str_at(o, "/spec/scaleTargetRef/kind").as_str().unwrap_or_default(),
                    str_at(o, "/spec/scaleTargetRef/name").as_str().unwrap_or_default()
                ))
            }));
            cols.push(col("MinPods", "integer", |o| json!(int_at(o, "/spec/minReplicas"))));
            cols.push(col("MaxPods", "integer", |o| json!(int_at(o, "/spec/maxReplicas"))));
            cols.push(col("Replicas", "integer", |o| json!(int_at(o, "/status/currentReplicas"))));
            cols.push(age_column());
        }
        ("apiextensions.k8s.io", _) => {
            cols.push(col("Created At", "date", |o| str_at(o, "/metadata/creationTimestamp")));
        }
        _ => cols.push(age_column()),
    }
    cols
}

fn join_containers(o: &Value, field: &str) -> Value {
    let names: Vec<&str> = o
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().filter_map(|c| c.get(field).and_then(Value::as_str)).collect())
        .unwrap_or_default();
    json!(names.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_filters_select_condition_status() {
        let obj = json!({"status": {"conditions": [{"type": "Scaling", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        let found = eval_json_path(&obj, r#".status.conditions[?(@.type=="Ready")].status"#);
        assert_eq!(found, vec![&json!("True")]);
        assert!(eval_json_path(&obj, ".spec.replicas").is_empty());
    }

    #[test]
    fn table_accept_header_is_recognised() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
