//! Admission of custom resources as a real API server does it, usable without a server:
//! prune unknown fields, drop non-nullable nulls, apply schema defaults, validate the structural
//! schema (types, enums, bounds, lengths, patterns, required, item counts, cheap formats) and the
//! CEL rules (`x-kubernetes-validations`, including transition rules against the old object).
//!
//! ```
//! # use serde_json::json;
//! let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
//!   "metadata": {"name": "widgets.example.com"},
//!   "spec": {"group": "example.com", "scope": "Namespaced",
//!     "names": {"kind": "Widget", "plural": "widgets"},
//!     "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
//!       "type": "object", "properties": {"spec": {"type": "object", "properties": {
//!         "size": {"type": "integer", "minimum": 1, "default": 3}}}}}}}]}});
//! let obj = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}});
//! let admitted = celery_e2e::admission::validate(&crd, &obj, None).unwrap();
//! assert_eq!(admitted["spec"]["size"], 3);
//! let bad = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 0}});
//! let errors = celery_e2e::admission::validate(&crd, &bad, None).unwrap_err();
//! assert_eq!(errors[0].field, "spec.size");
//! ```

use std::fmt;

use kube::core::cel::{RootContext, ValidationError as CelError, Validator as CelValidator};
use serde_json::{Map, Value};

/// One rejected field, as in a 422 Status `details.causes[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.autoscaling.maxReplicas` or `spec.queues[1]`.
    pub field: String,
    /// The message without the field, e.g. `Invalid value: 0: spec.x in body should be greater than or equal to 1`.
    pub message: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueTypeInvalid`, ...
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.field, self.message) }
    }
}

impl FieldError {
    fn new(field: impl Into<String>, reason: &str, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into(), reason: reason.to_string() }
    }

    pub(crate) fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        let field = field.into();
        let message = format!("Invalid value: {}: {detail}", render_value(value));
        FieldError::new(field, "FieldValueInvalid", message)
    }

    pub(crate) fn required(field: impl Into<String>) -> Self {
        FieldError::new(field, "FieldValueRequired", "Required value")
    }
}

/// The outcome of admitting one object.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The pruned and defaulted object.
    pub object: Value,
    /// Fields that were pruned because the schema does not declare them (dotted paths).
    pub unknown_fields: Vec<String>,
}

/// Validate `obj` (and `old` for an update) against the CRD object `crd`, returning the object
/// as the API server would store it (pruned and defaulted) or every field error.
pub fn validate(crd: &Value, obj: &Value, old: Option<&Value>) -> Result<Value, Vec<FieldError>> {
    let rt =
        crate::apiserver::resources::from_crd(crd).map_err(|e| vec![FieldError::new("", "FieldValueInvalid", e)])?;
    let version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .and_then(|av| av.rsplit('/').next())
        .unwrap_or_else(|| rt.storage_version())
        .to_string();
    let compiled = rt
        .compiled_version(&version)
        .ok_or_else(|| vec![FieldError::new("apiVersion", "FieldValueNotSupported", "version not served")])?;
    let ctx = RootContext { api_version: rt.api_version(&version), api_group: rt.group.clone(), kind: rt.kind.clone() };
    compiled.admit(obj, old, &ctx).map(|a| a.object)
}

/// One CRD version's schema, compiled once when the CRD is registered.
pub struct CompiledVersion {
    schema: Value,
    structural: jsonschema::Validator,
    /// Building a CEL context registers every extension function: do it once per schema.
    cel: std::sync::Mutex<CelValidator>,
}

impl fmt::Debug for CompiledVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledVersion").finish_non_exhaustive()
    }
}

impl CompiledVersion {
    /// Compile a version's `openAPIV3Schema`; errors describe a schema the real server would refuse.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        let cel = kube::core::cel::compile_schema(schema);
        if let Some(err) = cel.compilation_errors().first() {
            return Err(err.to_string());
        }
        let mut json_schema = to_json_schema(schema);
        if let Some(props) = json_schema.get_mut("properties").and_then(Value::as_object_mut) {
            // ObjectMeta is validated by the server itself, never by the CRD schema.
            props.insert("metadata".into(), serde_json::json!({"type": "object"}));
        }
        let structural = jsonschema::options()
            .should_validate_formats(true)
            .should_ignore_unknown_formats(true)
            .build(&json_schema)
            .map_err(|e| e.to_string())?;
        Ok(CompiledVersion { schema: schema.clone(), structural, cel: std::sync::Mutex::new(CelValidator::new()) })
    }

    /// Prune, default and validate `obj`; `old` enables CEL transition rules.
    pub fn admit(&self, obj: &Value, old: Option<&Value>, ctx: &RootContext) -> Result<Admitted, Vec<FieldError>> {
        let mut object = obj.clone();
        let mut unknown_fields = Vec::new();
        if let Some(map) = object.as_object_mut() {
            prune_root(&self.schema, map, &mut unknown_fields);
        }
        let object = kube::core::cel::apply_defaults(&self.schema, &object);
        let mut errors: Vec<FieldError> = self.structural.iter_errors(&object).map(|e| structural_error(&e)).collect();
        if errors.is_empty() {
            // CEL rules run only on structurally valid objects, as on a real server.
            let old_pruned = old.map(|o| {
                let mut o = o.clone();
                if let Some(map) = o.as_object_mut() {
                    prune_root(&self.schema, map, &mut Vec::new());
                }
                o
            });
            let cel = self.cel.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(cel_errors) = cel.validate_with_context(&self.schema, &object, old_pruned.as_ref(), Some(ctx)) {
                errors.extend(cel_errors.iter().map(|e| cel_error(e, &object)));
            }
        }
        if errors.is_empty() { Ok(Admitted { object, unknown_fields }) } else { Err(errors) }
    }
}

// ---------------------------------------------------------------- pruning

fn prune_root(schema: &Value, obj: &mut Map<String, Value>, unknown: &mut Vec<String>) {
    let keep = ["apiVersion", "kind", "metadata"];
    prune_object(schema, obj, "", &keep, unknown);
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if flag(schema, "x-kubernetes-int-or-string") {
        return;
    }
    match value {
        Value::Object(map) => {
            let keep: &[&str] =
                if flag(schema, "x-kubernetes-embedded-resource") { &["apiVersion", "kind", "metadata"] } else { &[] };
            prune_object(schema, map, path, keep, unknown)
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(item_schema, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

fn prune_object(schema: &Value, map: &mut Map<String, Value>, path: &str, keep: &[&str], unknown: &mut Vec<String>) {
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        let child_schema = props.and_then(|p| p.get(&key)).or(additional);
        match child_schema {
            Some(child_schema) => {
                let is_null = map.get(&key).is_some_and(Value::is_null);
                if is_null && !flag(child_schema, "nullable") {
                    map.remove(&key);
                } else if let Some(child) = map.get_mut(&key) {
                    prune_value(child_schema, child, &child_path, unknown);
                }
            }
            None if keep.contains(&key.as_str()) || preserve => {}
            None => {
                map.remove(&key);
                unknown.push(child_path);
            }
        }
    }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool) == Some(true)
}

// ---------------------------------------------------------------- schema translation

/// Formats the real server checks that `jsonschema` checks the same way; others are dropped.
const CHECKED_FORMATS: &[&str] = &["date-time", "date", "uuid", "ipv4", "ipv6"];

/// Translate a Kubernetes structural schema into plain JSON Schema.
fn to_json_schema(schema: &Value) -> Value {
    let Some(map) = schema.as_object() else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        match key.as_str() {
            "properties" => {
                let props = value
                    .as_object()
                    .map(|p| p.iter().map(|(k, v)| (k.clone(), to_json_schema(v))).collect())
                    .unwrap_or_default();
                out.insert(key.clone(), Value::Object(props));
            }
            "items" | "not" => {
                out.insert(key.clone(), to_json_schema(value));
            }
            "additionalProperties" if value.is_object() => {
                out.insert(key.clone(), to_json_schema(value));
            }
            "allOf" | "anyOf" | "oneOf" => {
                let branches = value.as_array().map(|b| b.iter().map(to_json_schema).collect()).unwrap_or_default();
                out.insert(key.clone(), Value::Array(branches));
            }
            "format" => {
                if value.as_str().is_some_and(|f| CHECKED_FORMATS.contains(&f)) {
                    out.insert(key.clone(), value.clone());
                }
            }
            "default" | "nullable" | "description" | "example" | "externalDocs" => {}
            k if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        out.remove("type");
        out.insert("type".into(), serde_json::json!(["integer", "string"]));
    }
    if flag(schema, "nullable") {
        if let Some(Value::String(t)) = out.get("type").cloned() {
            out.insert("type".into(), serde_json::json!([t, "null"]));
        }
        if let Some(Value::Array(options)) = out.get_mut("enum") {
            options.push(Value::Null);
        }
    }
    Value::Object(out)
}

// ---------------------------------------------------------------- error messages

fn structural_error(e: &jsonschema::ValidationError<'_>) -> FieldError {
    use jsonschema::error::ValidationErrorKind as K;
    let path = dotted_path(e.instance_path().as_str());
    let value = e.instance().as_ref().clone();
    let body = |detail: String| FieldError::invalid(path.clone(), &value, &format!("{path} in body {detail}"));
    match e.kind() {
        K::Required { property } => {
            let prop = property.as_str().unwrap_or_default();
            let field = if path.is_empty() { prop.to_string() } else { format!("{path}.{prop}") };
            FieldError::required(field)
        }
        K::Enum { options } => {
            let supported: Vec<String> =
                options.as_array().map(|o| o.iter().map(render_value).collect()).unwrap_or_default();
            let message =
                format!("Unsupported value: {}: supported values: {}", render_value(&value), supported.join(", "));
            FieldError::new(path, "FieldValueNotSupported", message)
        }
        K::Type { kind } => {
            let expected = match kind {
                jsonschema::error::TypeKind::Single(t) => t.to_string(),
                jsonschema::error::TypeKind::Multiple(ts) => {
                    ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
                }
            };
            let actual = json_type(&value);
            let message =
                format!("Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\"");
            FieldError::new(path, "FieldValueTypeInvalid", message)
        }
        K::Minimum { limit } => body(format!("should be greater than or equal to {limit}")),
        K::Maximum { limit } => body(format!("should be less than or equal to {limit}")),
        K::ExclusiveMinimum { limit } => body(format!("should be greater than {limit}")),
        K::ExclusiveMaximum { limit } => body(format!("should be less than {limit}")),
        K::MinLength { limit } => body(format!("should be at least {limit} chars long")),
        K::MaxLength { limit } => {
            FieldError::new(path, "FieldValueTooLong", format!("Too long: may not be more than {limit} bytes"))
        }
        K::Pattern { pattern } => body(format!("should match '{pattern}'")),
        K::MinItems { limit } => body(format!("should have at least {limit} items")),
        K::MaxItems { limit } => FieldError::new(
            path,
            "FieldValueTooMany",
            format!("Too many: {}: must have at most {limit} items", array_len(&value)),
        ),
        K::MinProperties { limit } => body(format!("should have at least {limit} properties")),
        K::MaxProperties { limit } => FieldError::new(
            path,
            "FieldValueTooMany",
            format!("Too many: {}: must have at most {limit} items", array_len(&value)),
        ),
        K::Format { format } => body(format!("must be of type {format}")),
        K::UniqueItems => {
            FieldError::new(path, "FieldValueDuplicate", format!("Duplicate value: {}", render_value(&value)))
        }
        _ => body(e.to_string()),
    }
}

fn array_len(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    }
}

fn cel_error(e: &CelError, object: &Value) -> FieldError {
    let field = e.field_path.trim_start_matches('.').to_string();
    let value = lookup_dotted(object, &field);
    let type_name = value.map(json_type).unwrap_or("object");
    let reason = e.reason.clone().unwrap_or_else(|| "FieldValueInvalid".to_string());
    let message = match reason.as_str() {
        "FieldValueForbidden" => format!("Forbidden: {}", e.message),
        "FieldValueRequired" => format!("Required value: {}", e.message),
        "FieldValueDuplicate" => format!("Duplicate value: \"{type_name}\": {}", e.message),
        _ => format!("Invalid value: \"{type_name}\": {}", e.message),
    };
    FieldError::new(field, &reason, message)
}

/// `/spec/queues/1` -> `spec.queues[1]`.
fn dotted_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

fn lookup_dotted<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(obj);
    }
    let mut cur = obj;
    for part in path.split('.') {
        let (name, index) = match part.find('[') {
            Some(i) => (&part[..i], part[i + 1..].trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        cur = cur.get(name)?;
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Values print as Go's field errors print them: strings quoted, objects by type name.
fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_paths_render_indices_in_brackets() {
        assert_eq!(dotted_path("/spec/queues/1/name"), "spec.queues[1].name");
        assert_eq!(dotted_path(""), "");
    }

    #[test]
    fn pruning_drops_unknown_fields_and_non_nullable_nulls() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "a": {"type": "string"}, "b": {"type": "string", "nullable": true},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}});
        let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n"}, "junk": 1,
            "spec": {"a": null, "b": null, "c": 1, "free": {"anything": true}}});
        let mut unknown = Vec::new();
        prune_root(&schema, obj.as_object_mut().unwrap(), &mut unknown);
        assert_eq!(obj["spec"], json!({"b": null, "free": {"anything": true}}));
        assert_eq!(unknown, vec!["junk".to_string(), "spec.c".to_string()]);
        assert!(obj.get("metadata").is_some());
    }
}
