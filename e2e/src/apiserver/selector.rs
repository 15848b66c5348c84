//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!exists`) and field selectors.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` query parameter; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_terms(input) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_requirement(term)?);
        }
        Ok(LabelSelector(reqs))
    }

    /// Build from a `metav1.LabelSelector` object (`matchLabels` + `matchExpressions`).
    pub fn from_object(sel: &Value) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if let Some(labels) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in labels {
                reqs.push(Requirement::Eq(k.clone(), v.as_str().unwrap_or_default().to_string()));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e.get("key").and_then(Value::as_str).ok_or("matchExpressions[].key is required")?;
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|v| v.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                let req = match e.get("operator").and_then(Value::as_str) {
                    Some("In") => Requirement::In(key.into(), values),
                    Some("NotIn") => Requirement::NotIn(key.into(), values),
                    Some("Exists") => Requirement::Exists(key.into()),
                    Some("DoesNotExist") => Requirement::NotExists(key.into()),
                    other => return Err(format!("{other:?} is not a valid label selector operator")),
                };
                reqs.push(req);
            }
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches_labels(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.matches_labels(obj.pointer("/metadata/labels").and_then(Value::as_object))
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::Eq(k, v) => format!("{k}={v}"),
                Requirement::NotEq(k, v) => format!("{k}!={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::NotExists(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Split on commas that are not inside `(...)`.
fn split_terms(input: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&input[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(valid_key(key.trim())?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEq(valid_key(k.trim())?, v.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Eq(valid_key(k.trim())?, v.trim().to_string()));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, rest)) = term.split_once(op) {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("unable to parse requirement: {term:?}: values must be in parentheses"))?;
            let values = inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
            let key = valid_key(k.trim())?;
            return Ok(if notin { Requirement::NotIn(key, values) } else { Requirement::In(key, values) });
        }
    }
    Ok(Requirement::Exists(valid_key(term)?))
}

fn valid_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok { Ok(key.to_string()) } else { Err(format!("unable to parse requirement: invalid label key {key:?}")) }
}

/// A parsed `fieldSelector`: `path=value` / `path!=value` terms over dotted JSON paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in input.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            terms.push((path.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, value)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            let actual = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn set_based_and_equality_requirements_combine() {
        let sel = LabelSelector::parse("app in (web, worker),tier!=db,managed,!legacy").unwrap();
        assert!(sel.matches(&obj(json!({"app": "web", "managed": "yes"}))));
        assert!(!sel.matches(&obj(json!({"app": "web"}))));
        assert!(!sel.matches(&obj(json!({"app": "web", "managed": "", "legacy": "1"}))));
        assert!(!sel.matches(&obj(json!({"app": "api", "managed": ""}))));
        assert!(!sel.matches(&obj(json!({"app": "web", "managed": "", "tier": "db"}))));
    }

    #[test]
    fn notin_matches_missing_labels() {
        let sel = LabelSelector::parse("env notin (prod)").unwrap();
        assert!(sel.matches(&obj(json!({}))));
        assert!(!sel.matches(&obj(json!({"env": "prod"}))));
    }

    #[test]
    fn label_selector_objects_round_trip_to_strings() {
        let sel = LabelSelector::from_object(&json!({"matchLabels": {"a": "b"},
            "matchExpressions": [{"key": "c", "operator": "In", "values": ["d", "e"]}]}))
        .unwrap();
        assert_eq!(sel.to_string(), "a=b,c in (d,e)");
        assert_eq!(LabelSelector::parse(&sel.to_string()).unwrap(), sel);
    }

    #[test]
    fn field_selectors_match_name_and_namespace() {
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=a,metadata.namespace!=other").unwrap().matches(&o));
        assert!(!FieldSelector::parse("metadata.name=b").unwrap().matches(&o));
    }
}
