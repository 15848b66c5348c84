//! Field ownership (`metadata.managedFields`, FieldsV1) and server-side apply.
//!
//! Ownership is tracked per leaf field. Maps are walked; lists whose field name has a known merge
//! key (`containers` by `name`, `conditions` by `type`, see [`list_merge_key`]) are associative
//! (elements `k:{"name":"x"}`), `finalizers` is a set (`v:"x"`), every other list is atomic.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::patch::list_merge_key;

/// One step of a FieldsV1 path: `f:name`, `k:{"name":"x"}`, `v:"x"` or `.` (the element itself).
pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole object (resources without a status subresource).
    All,
    /// Everything except `.status` (main resource of a kind with a status subresource).
    NoStatus,
    /// Only `.status` (the status subresource).
    StatusOnly,
}

const SET_FIELDS: &[&str] = &["finalizers"];
const UNTRACKED_META: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl Entry {
    fn same_slot(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.as_deref() == subresource
    }
}

/// A conflict reported by apply: the other manager and the field it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub field: String,
}

pub fn read_entries(obj: Option<&Value>) -> Vec<Entry> {
    let Some(list) = obj.and_then(|o| o.pointer("/metadata/managedFields")).and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .map(|e| Entry {
            manager: str_of(e, "manager"),
            operation: str_of(e, "operation"),
            api_version: str_of(e, "apiVersion"),
            time: str_of(e, "time"),
            subresource: e.get("subresource").and_then(Value::as_str).map(String::from),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

pub fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                v["subresource"] = json!(sub);
            }
            v
        })
        .collect();
    let meta = super::meta::metadata_mut(obj);
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// The part of `obj` that a write in `scope` owns, without server-managed metadata.
pub fn tracked(obj: &Value, scope: Scope) -> Value {
    let Some(map) = obj.as_object() else {
        return json!({});
    };
    let mut out = Map::new();
    for (k, v) in map {
        let keep = match scope {
            Scope::StatusOnly => k == "status",
            Scope::NoStatus => k != "status",
            Scope::All => true,
        };
        if !keep || k == "apiVersion" || k == "kind" {
            continue;
        }
        if k == "metadata" {
            let meta: Map<String, Value> = v
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(mk, _)| !UNTRACKED_META.contains(&mk.as_str()))
                        .map(|(mk, mv)| (mk.clone(), mv.clone()))
                        .collect()
                })
                .unwrap_or_default();
            if !meta.is_empty() {
                out.insert(k.clone(), Value::Object(meta));
            }
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    Value::Object(out)
}

/// All leaf paths of a (tracked) value.
pub fn field_set(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(map) = v.as_object() {
        for (k, child) in map {
            walk(child, vec![format!("f:{k}")], k, &mut out);
        }
    }
    out
}

fn walk(v: &Value, prefix: Path, field: &str, out: &mut FieldSet) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                walk(child, extend(&prefix, format!("f:{k}")), k, out);
            }
        }
        Value::Array(items) if SET_FIELDS.contains(&field) && items.iter().all(|i| !i.is_object()) => {
            for item in items {
                out.insert(extend(&prefix, format!("v:{item}")));
            }
        }
        Value::Array(items) if is_associative(field, items) => {
            let key = list_merge_key(field).unwrap_or_default();
            for item in items {
                let elem = extend(&prefix, element_step(key, item));
                out.insert(extend(&elem, ".".to_string()));
                if let Some(map) = item.as_object() {
                    for (k, child) in map {
                        walk(child, extend(&elem, format!("f:{k}")), k, out);
                    }
                }
            }
        }
        _ => {
            out.insert(prefix);
        }
    }
}

fn is_associative(field: &str, items: &[Value]) -> bool {
    list_merge_key(field).is_some_and(|key| items.iter().all(|i| i.get(key).is_some()))
}

fn element_step(key: &str, item: &Value) -> String {
    let id = item.get(key).cloned().unwrap_or(Value::Null);
    format!("k:{}", json!({ key: id }))
}

fn extend(prefix: &Path, step: String) -> Path {
    let mut p = prefix.clone();
    p.push(step);
    p
}

pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for step in path {
            node = node
                .entry(step.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("FieldsV1 nodes are objects");
        }
    }
    Value::Object(root)
}

pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn rec(v: &Value, prefix: &Path, out: &mut FieldSet) {
        let Some(map) = v.as_object() else { return };
        for (k, child) in map {
            let path = extend(prefix, k.clone());
            if k == "." || child.as_object().is_none_or(Map::is_empty) {
                out.insert(path);
            } else {
                rec(child, &path, out);
            }
        }
    }
    let mut out = FieldSet::new();
    rec(v, &Vec::new(), &mut out);
    out
}

/// The value at a FieldsV1 path.
pub fn get_path<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = step_into(cur, step)?;
    }
    Some(cur)
}

fn step_into<'a>(cur: &'a Value, step: &str) -> Option<&'a Value> {
    if step == "." {
        return Some(cur);
    }
    if let Some(name) = step.strip_prefix("f:") {
        return cur.get(name);
    }
    let items = cur.as_array()?;
    let pos = position(items, step)?;
    items.get(pos)
}

fn position(items: &[Value], step: &str) -> Option<usize> {
    if let Some(key) = step.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        return items.iter().position(|i| key.iter().all(|(k, v)| i.get(k) == Some(v)));
    }
    if let Some(val) = step.strip_prefix("v:") {
        let val: Value = serde_json::from_str(val).ok()?;
        return items.iter().position(|i| *i == val);
    }
    None
}

/// Remove the field or element at `path`, then any maps left empty by the removal that nobody owns.
fn remove_path(obj: &mut Value, path: &[String], owned_elsewhere: &FieldSet) {
    let (last, parent_path) = match path {
        [parent @ .., elem, dot] if dot == "." => (elem.as_str(), parent),
        [parent @ .., last] => (last.as_str(), parent),
        [] => return,
    };
    let Some(parent) = get_path_mut(obj, parent_path) else { return };
    match last.strip_prefix("f:") {
        Some(name) => {
            if let Some(m) = parent.as_object_mut() {
                m.remove(name);
            }
        }
        None => {
            if let Some(items) = parent.as_array_mut()
                && let Some(i) = position(items, last)
            {
                items.remove(i);
            }
        }
    }
    // Prune maps emptied by this removal, innermost first, unless someone owns them as a value.
    for depth in (1..=parent_path.len()).rev() {
        let prefix = &parent_path[..depth];
        if owned_elsewhere.contains(&prefix.to_vec()) || !prefix.last().is_some_and(|s| s.starts_with("f:")) {
            break;
        }
        let empty = get_path(obj, prefix).is_some_and(|v| v.as_object().is_some_and(Map::is_empty));
        if !empty {
            break;
        }
        if let Some(m) = get_path_mut(obj, &prefix[..depth - 1]).and_then(Value::as_object_mut) {
            m.remove(&prefix[depth - 1][2..]);
        }
    }
}

fn get_path_mut<'a>(obj: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = obj;
    for step in path {
        if step == "." {
            continue;
        }
        if let Some(name) = step.strip_prefix("f:") {
            cur = cur.get_mut(name)?;
        } else {
            let items = cur.as_array_mut()?;
            let pos = position(items, step)?;
            cur = items.get_mut(pos)?;
        }
    }
    Some(cur)
}

/// Merge an applied configuration into the live object: maps recurse, associative lists merge
/// by key, everything else is replaced by the configuration's value.
pub fn merge_config(live: &mut Value, config: &Value, field: &str) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, cv) in c {
                match l.get_mut(k) {
                    Some(lv) => merge_config(lv, cv, k),
                    None => {
                        l.insert(k.clone(), cv.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(c)) if is_associative(field, c) && is_associative(field, l) => {
            let key = list_merge_key(field).unwrap_or_default();
            for item in c {
                match l.iter().position(|x| x.get(key) == item.get(key)) {
                    Some(i) => merge_config(&mut l[i], item, ""),
                    None => l.push(item.clone()),
                }
            }
        }
        (Value::Array(l), Value::Array(c)) if SET_FIELDS.contains(&field) => {
            for item in c {
                if !l.contains(item) {
                    l.push(item.clone());
                }
            }
        }
        (live, config) => *live = config.clone(),
    }
}

/// Parameters of one server-side apply.
pub struct Apply<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub scope: Scope,
    pub subresource: Option<&'a str>,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Server-side apply of `config` onto `live` (an empty object when creating). Returns the merged
/// object with updated `managedFields`, or the conflicts when `force` is false.
pub fn apply(live: &Value, config: &Value, a: &Apply<'_>) -> Result<Value, Vec<Conflict>> {
    let cfg = tracked(config, a.scope);
    let applied = field_set(&cfg);
    let mut entries = read_entries(Some(live));
    let live_tracked = tracked(live, a.scope);

    let mut conflicts = Vec::new();
    for entry in entries.iter_mut().filter(|e| !e.same_slot(a.manager, "Apply", a.subresource)) {
        let mut lost = Vec::new();
        for path in entry.fields.intersection(&applied) {
            if path.last().is_some_and(|s| s == ".") {
                continue;
            }
            if get_path(&live_tracked, path) != get_path(&cfg, path) {
                conflicts.push(Conflict {
                    manager: entry.manager.clone(),
                    api_version: entry.api_version.clone(),
                    field: render_path(path),
                });
                lost.push(path.clone());
            }
        }
        if a.force {
            for p in lost {
                entry.fields.remove(&p);
            }
        }
    }
    if !a.force && !conflicts.is_empty() {
        return Err(conflicts);
    }

    let mut merged = live.clone();
    if !merged.is_object() {
        merged = json!({});
    }
    merge_config(&mut merged, &cfg, "");
    let previous = entries
        .iter()
        .find(|e| e.same_slot(a.manager, "Apply", a.subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: FieldSet = entries
        .iter()
        .filter(|e| !e.same_slot(a.manager, "Apply", a.subresource))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for path in previous.difference(&applied) {
        if !others.contains(path) {
            remove_path(&mut merged, path, &others);
        }
    }
    upsert(&mut entries, a.manager, "Apply", a.subresource, a.api_version, a.now, applied);
    write_entries(&mut merged, &entries);
    Ok(merged)
}

/// Record a non-apply write (create, update, patch) by `manager`: it takes ownership of every
/// field it changed; fields it changed or removed are taken away from all other managers.
pub fn track_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope,
    subresource: Option<&str>,
    api_version: &str,
    now: &str,
) {
    let mut entries = read_entries(old);
    let old_tracked = old.map(|o| tracked(o, scope)).unwrap_or_else(|| json!({}));
    let new_tracked = tracked(new, scope);
    let old_set = field_set(&old_tracked);
    let new_set = field_set(&new_tracked);
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| !old_set.contains(*p) || get_path(&old_tracked, p) != get_path(&new_tracked, p))
        .cloned()
        .collect();
    let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
    for entry in entries.iter_mut() {
        entry.fields.retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    if !changed.is_empty() {
        let mut owned = entries
            .iter()
            .find(|e| e.same_slot(manager, "Update", subresource))
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        owned.extend(changed);
        upsert(&mut entries, manager, "Update", subresource, api_version, now, owned);
    }
    write_entries(new, &entries);
}

fn upsert(
    entries: &mut Vec<Entry>,
    manager: &str,
    operation: &str,
    subresource: Option<&str>,
    api_version: &str,
    now: &str,
    fields: FieldSet,
) {
    match entries.iter_mut().find(|e| e.same_slot(manager, operation, subresource)) {
        Some(e) => {
            if e.fields != fields {
                e.time = now.to_string();
            }
            e.fields = fields;
            e.api_version = api_version.to_string();
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: operation.to_string(),
            api_version: api_version.to_string(),
            time: now.to_string(),
            subresource: subresource.map(String::from),
            fields,
        }),
    }
}

/// `.spec.template.spec.containers[name="worker"].image`, as the real server prints conflicts.
pub fn render_path(path: &[String]) -> String {
    let mut out = String::new();
    for step in path {
        if let Some(name) = step.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = step.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = step.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_as(live: &Value, cfg: Value, manager: &str, force: bool) -> Result<Value, Vec<Conflict>> {
        apply(
            live,
            &cfg,
            &Apply {
                manager,
                force,
                scope: Scope::NoStatus,
                subresource: None,
                api_version: "apps/v1",
                now: "2026-11-21T00:00:00Z",
            },
        )
    }

    #[test]
    fn fields_v1_round_trips() {
        let obj = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"replicas": 1, "template": {"spec": {
            "containers": [{"name": "w", "image": "i", "env": [{"name": "X", "value": "1"}]}]}}}});
        let set = field_set(&obj);
        assert!(set.contains(&vec![
            "f:spec".into(),
            "f:template".into(),
            "f:spec".into(),
            "f:containers".into(),
            r#"k:{"name":"w"}"#.into(),
            "f:env".into(),
            r#"k:{"name":"X"}"#.into(),
            "f:value".into()
        ]));
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
    }

    #[test]
    fn dropping_a_field_from_the_applied_config_removes_it() {
        let live = apply_as(&json!({}), json!({"spec": {"a": 1, "b": {"c": 2}}}), "op", false).unwrap();
        let live = apply_as(&live, json!({"spec": {"a": 1}}), "op", false).unwrap();
        assert_eq!(live["spec"], json!({"a": 1}));
    }

    #[test]
    fn a_field_owned_by_another_manager_with_another_value_conflicts() {
        let live = apply_as(&json!({}), json!({"spec": {"replicas": 1}}), "a", false).unwrap();
        let conflicts = apply_as(&live, json!({"spec": {"replicas": 2}}), "b", false).unwrap_err();
        assert_eq!(
            conflicts,
            vec![Conflict { manager: "a".into(), api_version: "apps/v1".into(), field: ".spec.replicas".into() }]
        );
        // Same value: shared ownership, no conflict; then `a` dropping it keeps the field.
        let live = apply_as(&live, json!({"spec": {"replicas": 1}}), "b", false).unwrap();
        let live = apply_as(&live, json!({"spec": {}}), "a", false).unwrap();
        assert_eq!(live["spec"]["replicas"], 1);
        // Force takes ownership away.
        let live = apply_as(&live, json!({"spec": {"replicas": 3}}), "c", true).unwrap();
        assert_eq!(live["spec"]["replicas"], 3);
        let replicas = vec!["f:spec".to_string(), "f:replicas".to_string()];
        let owners: Vec<String> =
            read_entries(Some(&live)).into_iter().filter(|e| e.fields.contains(&replicas)).map(|e| e.manager).collect();
        assert_eq!(owners, vec!["c".to_string()]);
    }

    #[test]
    fn updates_take_ownership_of_changed_fields() {
        let live = apply_as(&json!({}), json!({"spec": {"replicas": 1, "x": 1}}), "op", false).unwrap();
        let mut updated = live.clone();
        updated["spec"]["replicas"] = json!(5);
        track_update(Some(&live), &mut updated, "hpa", Scope::NoStatus, None, "apps/v1", "t");
        let entries = read_entries(Some(&updated));
        assert_eq!(entries.len(), 2);
        assert!(entries[1].fields.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
        assert!(!entries[0].fields.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
        // The applier dropping replicas from its config no longer removes the field.
        let live = apply_as(&updated, json!({"spec": {"x": 1}}), "op", false).unwrap();
        assert_eq!(live["spec"]["replicas"], 5);
    }

    #[test]
    fn associative_list_elements_merge_and_are_removed_by_key() {
        let cfg = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}});
        let live = apply_as(&json!({}), cfg, "op", false).unwrap();
        let live =
            apply_as(&live, json!({"spec": {"containers": [{"name": "b", "image": "2"}]}}), "op", false).unwrap();
        assert_eq!(live["spec"]["containers"], json!([{"name": "b", "image": "2"}]));
    }
}
