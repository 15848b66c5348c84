//! The write verbs — create, update, patch, apply, delete — and what every write goes through:
//! subresource projection, server-managed metadata, admission, generation, field ownership,
//! no-op detection, finalizers and ownerReference garbage collection.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};

use super::builtin;
use super::managed::{self, Apply, Scope};
use super::meta::{self, metadata_mut};
use super::patch::{self, PatchKind};
use super::resources::{self, ResourceType};
use super::status::{ApiError, deleted_status};
use super::store::Store;

/// `fieldValidation` query parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

/// Options common to all writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    pub field_manager: Option<String>,
    /// `Some("status")` for the status subresource.
    pub subresource: Option<String>,
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    /// Manager name used when `field_manager` is absent (from the User-Agent, as the real server does).
    pub default_manager: String,
}

impl WriteOpts {
    fn manager(&self) -> &str {
        self.field_manager.as_deref().unwrap_or(&self.default_manager)
    }
}

/// A successful write: the stored object and any `Warning` headers.
#[derive(Debug, Clone)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    pub propagation: Option<Propagation>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub grace_period_seconds: Option<i64>,
    pub dry_run: bool,
}

/// The double's behaviour switches that writes consult.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Pods are deleted gracefully (deletionTimestamp first) because a pod runner plays kubelet.
    pub graceful_pods: bool,
}

fn scope(rt: &ResourceType, subresource: Option<&str>) -> Scope {
    match (subresource, rt.status_subresource) {
        (Some("status"), _) => Scope::StatusOnly,
        (_, true) => Scope::NoStatus,
        (_, false) => Scope::All,
    }
}

pub fn create(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    mut body: Value,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the body of the request must be an object"));
    }
    let meta = metadata_mut(&mut body);
    let mut name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
    if name.is_empty() {
        let prefix = meta.get("generateName").and_then(Value::as_str).unwrap_or_default().to_string();
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                rt,
                "",
                &[crate::admission::FieldError {
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                    reason: "FieldValueRequired".into(),
                }],
            ));
        }
        name = loop {
            let candidate = format!("{prefix}{}", meta::random_suffix());
            if store.get(&rt.key(), ns, &candidate).is_none() {
                break candidate;
            }
        };
        meta.insert("name".into(), json!(name));
    }
    if let Some(body_ns) = meta.get("namespace").and_then(Value::as_str)
        && rt.namespaced
        && body_ns != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if store.get(&rt.key(), ns, &name).is_some() {
        return Err(ApiError::already_exists(rt, &name));
    }
    let manager = opts.manager().to_string();
    commit(store, policy, rt, ns, &name, None, body, opts, Ownership::Update(&manager))
}

pub fn update(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    body: Value,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    let body_name = meta::name_of(&body);
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let old = store.get(&rt.key(), ns, name).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
    let sent_rv = meta::rv_of(&body);
    if !sent_rv.is_empty() && sent_rv != meta::rv_of(&old) {
        return Err(ApiError::conflict(rt, name));
    }
    let manager = opts.manager().to_string();
    commit(store, policy, rt, ns, name, Some(&old), body, opts, Ownership::Update(&manager))
}

pub struct PatchRequest<'a> {
    pub kind: PatchKind,
    pub body: &'a [u8],
    pub force: bool,
}

pub fn patch(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    req: &PatchRequest<'_>,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    let old = store.get(&rt.key(), ns, name).cloned();
    if req.kind == PatchKind::Apply {
        return apply(store, policy, rt, ns, name, old.as_ref(), req, opts);
    }
    let old = old.ok_or_else(|| ApiError::not_found(rt, name))?;
    if req.kind == PatchKind::Strategic && rt.custom.is_some() {
        return Err(ApiError::unsupported_media_type(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        ));
    }
    let patched = patch::apply_patch(req.kind, &old, req.body)?;
    if meta::rv_of(&patched) != meta::rv_of(&old) && !meta::rv_of(&patched).is_empty() {
        return Err(ApiError::conflict(rt, name));
    }
    let manager = opts.manager().to_string();
    commit(store, policy, rt, ns, name, Some(&old), patched, opts, Ownership::Update(&manager))
}

#[allow(clippy::too_many_arguments)]
fn apply(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    old: Option<&Value>,
    req: &PatchRequest<'_>,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    let Some(manager) = opts.field_manager.as_deref() else {
        return Err(ApiError::new(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    };
    let mut config: Value = serde_json::from_slice(req.body)
        .or_else(|_| {
            std::str::from_utf8(req.body)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_saphyr::from_str::<Value>(s).map_err(|e| e.to_string()))
        })
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    let (cfg_api_version, cfg_kind) = (
        config.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string(),
        config.get("kind").and_then(Value::as_str).unwrap_or_default().to_string(),
    );
    if cfg_api_version.is_empty() || cfg_kind.is_empty() {
        return Err(ApiError::bad_request("apiVersion and kind must be set in an apply configuration"));
    }
    if cfg_kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the kind {cfg_kind:?} does not match the resource {}",
            rt.qualified_name()
        )));
    }
    let cfg_name = meta::name_of(&config).to_string();
    if cfg_name.is_empty() {
        metadata_mut(&mut config).insert("name".into(), json!(name));
    } else if cfg_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({cfg_name}) does not match the name on the URL ({name})"
        )));
    }
    let scope = scope(rt, opts.subresource.as_deref());
    if old.is_none() && scope == Scope::StatusOnly {
        return Err(ApiError::not_found(rt, name));
    }
    let base = old
        .cloned()
        .unwrap_or_else(|| json!({"apiVersion": &cfg_api_version, "kind": &cfg_kind, "metadata": {"name": name}}));
    let now = meta::now();
    let merged = managed::apply(
        &base,
        &config,
        &Apply {
            manager,
            force: req.force,
            scope,
            subresource: opts.subresource.as_deref(),
            api_version: &cfg_api_version,
            now: &now,
        },
    )
    .map_err(|conflicts| apply_conflict(rt, name, &conflicts))?;
    commit(store, policy, rt, ns, name, old, merged, opts, Ownership::Precomputed)
}

fn apply_conflict(rt: &ResourceType, name: &str, conflicts: &[managed::Conflict]) -> ApiError {
    let plural = if conflicts.len() == 1 { "conflict" } else { "conflicts" };
    let mut by_manager: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for c in conflicts {
        match by_manager.iter_mut().find(|(m, _, _)| *m == c.manager) {
            Some((_, _, fields)) => fields.push(&c.field),
            None => by_manager.push((&c.manager, &c.api_version, vec![&c.field])),
        }
    }
    let detail: Vec<String> = by_manager
        .iter()
        .map(|(m, av, fields)| {
            if fields.len() == 1 && conflicts.len() == 1 {
                format!("conflict with \"{m}\" using {av}: {}", fields[0])
            } else {
                let list: Vec<String> = fields.iter().map(|f| format!("- {f}")).collect();
                format!("conflicts with \"{m}\" using {av}:\n{}", list.join("\n"))
            }
        })
        .collect();
    let mut err = ApiError::new(
        409,
        "Conflict",
        format!("Apply failed with {} {plural}: {}", conflicts.len(), detail.join("\n")),
    );
    err.details = Some(json!({
        "name": name, "group": rt.group, "kind": rt.plural,
        "causes": conflicts.iter().map(|c| json!({
            "reason": "FieldManagerConflict",
            "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
            "field": c.field,
        })).collect::<Vec<_>>(),
    }));
    err
}

#[allow(clippy::too_many_arguments)]
/// Set the replica count through the scale subresource (`sent_rv` is the Scale's resourceVersion).
pub fn write_scale(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    replicas: i64,
    sent_rv: &str,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    let paths = rt.scale.as_ref().ok_or_else(|| ApiError::not_found_path("scale"))?;
    let old = store.get(&rt.key(), ns, name).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
    if !sent_rv.is_empty() && sent_rv != meta::rv_of(&old) {
        return Err(ApiError::conflict(rt, name));
    }
    let mut obj = old.clone();
    set_dotted(&mut obj, &paths.spec_replicas, json!(replicas));
    let manager = opts.manager().to_string();
    commit(store, policy, rt, ns, name, Some(&old), obj, opts, Ownership::Update(&manager))
}

/// Set a value at a `.a.b.c` path, creating maps on the way.
pub fn set_dotted(obj: &mut Value, path: &str, value: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        if i + 1 == parts.len() {
            cur[*part] = value;
            return;
        }
        cur = cur.as_object_mut().expect("object").entry(part.to_string()).or_insert_with(|| json!({}));
    }
}

enum Ownership<'a> {
    /// A non-apply write by this manager.
    Update(&'a str),
    /// Server-side apply already computed `managedFields`.
    Precomputed,
}

/// The tail every write goes through.
#[allow(clippy::too_many_arguments)]
fn commit(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    old: Option<&Value>,
    candidate: Value,
    opts: &WriteOpts,
    ownership: Ownership<'_>,
) -> Result<Written, ApiError> {
    let scope = scope(rt, opts.subresource.as_deref());
    let mut obj = project(old, candidate, scope);
    stamp_identity(rt, ns, name, old, &mut obj)?;
    let mut warnings = Vec::new();
    admit(rt, &mut obj, old, opts, &mut warnings)?;
    if rt.generation {
        let generation = match old {
            None => 1,
            Some(old) => {
                let previous = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                if spec_of(rt, old) != spec_of(rt, &obj) { previous + 1 } else { previous }
            }
        };
        metadata_mut(&mut obj).insert("generation".into(), json!(generation));
    }
    if let Ownership::Update(manager) = ownership {
        let api_version = rt.api_version(rt.storage_version());
        managed::track_update(old, &mut obj, manager, scope, opts.subresource.as_deref(), &api_version, &meta::now());
    }
    if let Some(old) = old
        && same_content(old, &obj)
    {
        return Ok(Written { object: old.clone(), created: false, warnings });
    }
    let finalized = obj.pointer("/metadata/deletionTimestamp").is_some()
        && obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_none_or(Vec::is_empty);
    if opts.dry_run {
        return Ok(Written { object: obj, created: old.is_none(), warnings });
    }
    if is_crd_kind(rt) {
        register_crd(store, &mut obj)?;
    }
    let rv = store.next_rv();
    metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
    if finalized {
        remove_object(store, rt, ns, name, obj.clone());
        collect_garbage(store, policy);
    } else {
        store.put(&rt.key(), ns, name, obj.clone(), rv);
    }
    Ok(Written { object: obj, created: old.is_none(), warnings })
}

/// Keep only what this write may change: the main resource never writes `.status` of a kind with
/// a status subresource, and the status subresource writes nothing else.
fn project(old: Option<&Value>, mut candidate: Value, scope: Scope) -> Value {
    match (scope, old) {
        (Scope::StatusOnly, Some(old)) => {
            let mut out = old.clone();
            match candidate.get("status") {
                Some(status) => out["status"] = status.clone(),
                None => {
                    out.as_object_mut().map(|m| m.remove("status"));
                }
            }
            // The status subresource may write managedFields computed by apply.
            if let Some(mf) = candidate.pointer("/metadata/managedFields") {
                metadata_mut(&mut out).insert("managedFields".into(), mf.clone());
            }
            out
        }
        (Scope::NoStatus, Some(old)) => {
            match old.get("status") {
                Some(status) => candidate["status"] = status.clone(),
                None => {
                    candidate.as_object_mut().map(|m| m.remove("status"));
                }
            }
            candidate
        }
        (Scope::NoStatus, None) => {
            candidate.as_object_mut().map(|m| m.remove("status"));
            candidate
        }
        _ => candidate,
    }
}

fn stamp_identity(
    rt: &ResourceType,
    ns: &str,
    name: &str,
    old: Option<&Value>,
    obj: &mut Value,
) -> Result<(), ApiError> {
    if let Err(msg) = meta::validate_name(name) {
        return Err(ApiError::invalid(
            rt,
            name,
            &[crate::admission::FieldError::invalid("metadata.name", &json!(name), &msg)],
        ));
    }
    obj["apiVersion"] = json!(rt.api_version(rt.storage_version()));
    obj["kind"] = json!(rt.kind);
    let meta = metadata_mut(obj);
    meta.insert("name".into(), json!(name));
    if rt.namespaced {
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.remove("namespace");
    }
    meta.remove("resourceVersion");
    meta.remove("selfLink");
    match old {
        Some(old) => {
            for key in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
                match old.pointer(&format!("/metadata/{key}")) {
                    Some(v) => meta.insert(key.into(), v.clone()),
                    None => meta.remove(key),
                };
            }
        }
        None => {
            meta.insert("uid".into(), json!(meta::new_uid()));
            meta.insert("creationTimestamp".into(), json!(meta::now()));
            for key in ["deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
                meta.remove(key);
            }
        }
    }
    Ok(())
}

fn admit(
    rt: &ResourceType,
    obj: &mut Value,
    old: Option<&Value>,
    opts: &WriteOpts,
    warnings: &mut Vec<String>,
) -> Result<(), ApiError> {
    let name = meta::name_of(obj).to_string();
    if rt.custom.is_some() {
        let version = rt.storage_version().to_string();
        let compiled =
            rt.compiled_version(&version).ok_or_else(|| ApiError::internal("no schema for the storage version"))?;
        let ctx = kube::core::cel::RootContext {
            api_version: rt.api_version(&version),
            api_group: rt.group.clone(),
            kind: rt.kind.clone(),
        };
        let admitted = compiled.admit(obj, old, &ctx).map_err(|errors| ApiError::invalid(rt, &name, &errors))?;
        unknown_field_policy(&admitted.unknown_fields, opts.field_validation, warnings)?;
        *obj = admitted.object;
        return Ok(());
    }
    builtin::admit(rt, obj, old).map_err(|errors| ApiError::invalid(rt, &name, &errors))
}

fn unknown_field_policy(
    unknown: &[String],
    policy: FieldValidation,
    warnings: &mut Vec<String>,
) -> Result<(), ApiError> {
    if unknown.is_empty() {
        return Ok(());
    }
    match policy {
        FieldValidation::Ignore => Ok(()),
        FieldValidation::Warn => {
            warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")));
            Ok(())
        }
        FieldValidation::Strict => {
            let list: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
            Err(ApiError::bad_request(format!("strict decoding error: {}", list.join(", "))))
        }
    }
}

/// What `metadata.generation` tracks: everything but metadata (and status, when it is a subresource).
fn spec_of(rt: &ResourceType, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        if rt.status_subresource {
            m.remove("status");
        }
    }
    v
}

/// Equal apart from resourceVersion and managedFields timestamps: such a write is not stored.
fn same_content(a: &Value, b: &Value) -> bool {
    fn normalize(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
            if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
                for e in entries.iter_mut().filter_map(Value::as_object_mut) {
                    e.remove("time");
                }
            }
        }
        v
    }
    normalize(a) == normalize(b)
}

fn is_crd_kind(rt: &ResourceType) -> bool {
    rt.group == "apiextensions.k8s.io" && rt.kind == "CustomResourceDefinition"
}

/// Validate a CRD and register (or re-register) the kind it declares; fills in its status.
fn register_crd(store: &mut Store, crd: &mut Value) -> Result<(), ApiError> {
    let crd_type = store
        .types
        .values()
        .find(|t| t.kind == "CustomResourceDefinition")
        .cloned()
        .ok_or_else(|| ApiError::internal("CRD kind missing"))?;
    let name = meta::name_of(crd).to_string();
    let rt = resources::from_crd(crd).map_err(|msg| {
        let (field, message) = msg.split_once(": ").unwrap_or(("spec", msg.as_str()));
        ApiError::invalid(
            &crd_type,
            &name,
            &[crate::admission::FieldError {
                field: field.to_string(),
                message: message.to_string(),
                reason: "FieldValueInvalid".into(),
            }],
        )
    })?;
    let mut status = builtin::crd_status(crd, &rt, &meta::now());
    if let Some(conditions) = crd.pointer("/status/conditions") {
        status["conditions"] = conditions.clone();
    }
    crd["status"] = status;
    store.types.insert(rt.key(), Arc::new(rt));
    Ok(())
}

/// Remove an object for good (no finalizers left), cascading CRD deletion to its objects.
fn remove_object(store: &mut Store, rt: &ResourceType, ns: &str, name: &str, mut last: Value) {
    let rv = store.next_rv();
    metadata_mut(&mut last).insert("resourceVersion".into(), json!(rv.to_string()));
    store.remove(&rt.key(), ns, name, last.clone(), rv);
    if is_crd_kind(rt)
        && let Ok(custom) = resources::from_crd(&last)
    {
        store.types.remove(&custom.key());
        store.drop_type(&custom.key());
    }
}

/// The outcome of DELETE: the object still exists (finalizers, graceful pods) or it is gone.
#[derive(Debug, Clone)]
pub enum Deleted {
    Pending(Value),
    Gone(Value),
}

impl Deleted {
    pub fn into_response(self, rt: &ResourceType) -> Value {
        match self {
            Deleted::Pending(obj) => obj,
            Deleted::Gone(obj) => {
                if rt.custom.is_some() {
                    obj
                } else {
                    deleted_status(rt, meta::name_of(&obj), meta::uid_of(&obj))
                }
            }
        }
    }
}

pub fn delete(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
) -> Result<Deleted, ApiError> {
    let old = store.get(&rt.key(), ns, name).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
    if let Some(uid) = &opts.uid
        && uid != meta::uid_of(&old)
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                rt.qualified_name(),
                meta::uid_of(&old)
            ),
        ));
    }
    if let Some(rv) = &opts.resource_version
        && rv != meta::rv_of(&old)
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                rt.qualified_name(),
                meta::rv_of(&old)
            ),
        ));
    }
    if opts.dry_run {
        return Ok(Deleted::Gone(old));
    }
    let propagation = opts.propagation.unwrap_or_default();
    let uid = meta::uid_of(&old).to_string();
    let has_finalizers = old.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
    let graceful_pod = policy.graceful_pods
        && rt.group.is_empty()
        && rt.kind == "Pod"
        && opts.grace_period_seconds != Some(0)
        && old.pointer("/metadata/deletionTimestamp").is_none();
    if propagation == Propagation::Orphan {
        orphan_dependents(store, &uid);
    }
    if propagation == Propagation::Foreground {
        delete_dependents(store, policy, &uid);
    }
    if has_finalizers || graceful_pod {
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(Deleted::Pending(old));
        }
        let mut marked = old.clone();
        let grace = opts.grace_period_seconds.unwrap_or_else(|| {
            old.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(if graceful_pod {
                30
            } else {
                0
            })
        });
        let meta = metadata_mut(&mut marked);
        meta.insert("deletionTimestamp".into(), json!(meta::now()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
        let rv = store.next_rv();
        metadata_mut(&mut marked).insert("resourceVersion".into(), json!(rv.to_string()));
        store.put(&rt.key(), ns, name, marked.clone(), rv);
        return Ok(Deleted::Pending(marked));
    }
    remove_object(store, rt, ns, name, old.clone());
    if propagation == Propagation::Background {
        collect_garbage(store, policy);
    }
    Ok(Deleted::Gone(old))
}

/// Remove an object already marked for deletion if no finalizer holds it (graceful pod deletion end).
pub fn finish_deletion(
    store: &mut Store,
    policy: &Policy,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    let obj = store.get(&rt.key(), ns, name).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
    let held = obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
    if !held {
        remove_object(store, rt, ns, name, obj);
        collect_garbage(store, policy);
    }
    Ok(())
}

fn dependents_of(store: &Store, uid: &str) -> Vec<(Arc<ResourceType>, String, String)> {
    store
        .all_objects()
        .filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid))
        .filter_map(|(k, o)| {
            Some((store.types.get(k)?.clone(), meta::namespace_of(o).to_string(), meta::name_of(o).to_string()))
        })
        .collect()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| refs.iter().filter_map(|r| r.get("uid").and_then(Value::as_str).map(String::from)).collect())
        .unwrap_or_default()
}

fn orphan_dependents(store: &mut Store, uid: &str) {
    for (rt, ns, name) in dependents_of(store, uid) {
        let Some(mut obj) = store.get(&rt.key(), &ns, &name).cloned() else { continue };
        if let Some(refs) = obj.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
        }
        let rv = store.next_rv();
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        store.put(&rt.key(), &ns, &name, obj, rv);
    }
}

fn delete_dependents(store: &mut Store, policy: &Policy, uid: &str) {
    for (rt, ns, name) in dependents_of(store, uid) {
        let opts = DeleteOpts { propagation: Some(Propagation::Foreground), ..Default::default() };
        let _ = delete(store, policy, &rt, &ns, &name, &opts);
    }
}

/// Delete (background) every object whose ownerReferences all point at objects that no longer
/// exist, until nothing changes. The real garbage collector does this asynchronously.
pub fn collect_garbage(store: &mut Store, policy: &Policy) -> usize {
    let mut deleted = 0;
    loop {
        let live: HashSet<&str> = store.all_objects().map(|(_, o)| meta::uid_of(o)).collect();
        let orphans: Vec<(Arc<ResourceType>, String, String)> = store
            .all_objects()
            .filter(|(_, o)| o.pointer("/metadata/deletionTimestamp").is_none())
            .filter(|(_, o)| {
                let owners = owner_uids(o);
                !owners.is_empty() && owners.iter().all(|u| !live.contains(u.as_str()))
            })
            .filter_map(|(k, o)| {
                Some((store.types.get(k)?.clone(), meta::namespace_of(o).to_string(), meta::name_of(o).to_string()))
            })
            .collect();
        if orphans.is_empty() {
            return deleted;
        }
        for (rt, ns, name) in orphans {
            let opts = DeleteOpts { propagation: Some(Propagation::Background), ..Default::default() };
            if delete(store, policy, &rt, &ns, &name, &opts).is_ok() {
                deleted += 1;
            }
        }
    }
}
