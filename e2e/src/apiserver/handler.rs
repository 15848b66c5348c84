//! HTTP front: path routing, query parameters, content negotiation, watch streaming, the request
//! log and fault injection. State changes happen in `write` / `store` under one lock.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use base64::Engine;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use super::ApiServer;
use super::discovery;
use super::log::{FaultEffect, RequestRecord, Verb};
use super::meta;
use super::openapi;
use super::patch::{self, PatchKind};
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Delivery, WatchFilter};
use super::table::{self, IncludeObject};
use super::write::{self, DeleteOpts, FieldValidation, PatchRequest, Propagation, WriteOpts};

const MAX_BODY: usize = 64 << 20;
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;

/// A resource request path, split into its parts.
#[derive(Debug, Clone)]
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Version,
    Healthy,
    CoreVersions,
    Groups,
    Group(String),
    GroupVersion(String, String),
    Resource(Target),
    OpenApiRoot,
    OpenApiGroupVersion(String, String),
    Unknown,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Route::Version,
        ["healthz" | "readyz" | "livez", ..] => Route::Healthy,
        ["api"] => Route::CoreVersions,
        ["api", v] => Route::GroupVersion(String::new(), v.to_string()),
        ["api", v, rest @ ..] => target("", v, rest),
        ["apis"] => Route::Groups,
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::GroupVersion(g.to_string(), v.to_string()),
        ["apis", g, v, rest @ ..] => target(g, v, rest),
        ["openapi", "v3"] => Route::OpenApiRoot,
        ["openapi", "v3", "api", v] => Route::OpenApiGroupVersion(String::new(), v.to_string()),
        ["openapi", "v3", "apis", g, v] => Route::OpenApiGroupVersion(g.to_string(), v.to_string()),
        _ => Route::Unknown,
    }
}

fn target(group: &str, version: &str, rest: &[&str]) -> Route {
    let (namespace, rest) = match rest {
        ["namespaces", ns, next, more @ ..] if !matches!(*next, "status" | "finalize") => {
            (Some(ns.to_string()), [&[*next][..], more].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [p] => (p, None, None),
        [p, n] => (p, Some(n.to_string()), None),
        [p, n, s] => (p, Some(n.to_string()), Some(s.to_string())),
        _ => return Route::Unknown,
    };
    Route::Resource(Target {
        group: group.to_string(),
        version: version.to_string(),
        plural: plural.to_string(),
        namespace,
        name,
        subresource,
    })
}

type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect()
}

fn flag(q: &Query, key: &str) -> bool {
    matches!(q.get(key).map(String::as_str), Some("true" | "1"))
}

pub async fn handle(server: ApiServer, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let query = parse_query(parts.uri.query());
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1").to_string();
    let reply = match route(parts.uri.path()) {
        Route::Resource(t) => return resource(server, parts.method, parts.headers, body, t, query).await,
        Route::Version => Ok(discovery::version()),
        Route::Healthy => return text(StatusCode::OK, "ok"),
        Route::CoreVersions => Ok(discovery::core_versions(&host)),
        Route::Groups => Ok(server.with_types(|t| discovery::group_list(t))),
        Route::Group(g) => {
            server.with_types(|t| discovery::group(t, &g)).ok_or_else(|| ApiError::not_found_path(parts.uri.path()))
        }
        Route::GroupVersion(g, v) => server
            .with_types(|t| discovery::resource_list(t, &g, &v))
            .ok_or_else(|| ApiError::not_found_path(parts.uri.path())),
        Route::OpenApiRoot => {
            let generation = server.resource_version();
            Ok(server.with_types(|t| openapi::root(t, generation)))
        }
        Route::OpenApiGroupVersion(g, v) => server
            .with_types(|t| openapi::group_version(t, &g, &v))
            .ok_or_else(|| ApiError::not_found_path(parts.uri.path())),
        Route::Unknown => Err(ApiError::not_found_path(parts.uri.path())),
    };
    match reply {
        Ok(v) => json_response(StatusCode::OK, &v, &[]),
        Err(e) => error_response(&e),
    }
}

fn text(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r
}

fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for w in warnings {
        if let Ok(h) = HeaderValue::from_str(&format!("299 - {}", serde_json::to_string(w).unwrap_or_default())) {
            r.headers_mut().append(header::WARNING, h);
        }
    }
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(code, &e.to_status(), &[]);
    if e.code == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn injected_error(code: u16) -> ApiError {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    ApiError::new(code, reason, format!("injected fault: the double answered {code}"))
}

fn verb_of(method: &Method, t: &Target, q: &Query) -> Option<Verb> {
    Some(match (method.as_str(), t.name.is_some()) {
        ("GET", true) => Verb::Get,
        ("GET", false) if flag(q, "watch") => Verb::Watch,
        ("GET", false) => Verb::List,
        ("POST", false) => Verb::Create,
        ("PUT", true) => Verb::Update,
        ("PATCH", true) => Verb::Patch,
        ("DELETE", true) => Verb::Delete,
        ("DELETE", false) => Verb::DeleteCollection,
        _ => return None,
    })
}

/// Everything one resource request needs besides the store.
struct Call {
    rt: Arc<ResourceType>,
    t: Target,
    verb: Verb,
    query: Query,
    headers: HeaderMap,
    body: Bytes,
}

impl Call {
    fn ns(&self) -> &str {
        self.t.namespace.as_deref().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.t.name.as_deref().unwrap_or_default()
    }

    fn accept(&self) -> &str {
        self.headers.get(header::ACCEPT).and_then(|h| h.to_str().ok()).unwrap_or_default()
    }

    fn write_opts(&self) -> WriteOpts {
        let ua = self.headers.get(header::USER_AGENT).and_then(|h| h.to_str().ok()).unwrap_or("unknown");
        WriteOpts {
            field_manager: self.query.get("fieldManager").cloned(),
            subresource: self.t.subresource.clone(),
            dry_run: self.query.get("dryRun").is_some_and(|v| v == "All"),
            field_validation: match self.query.get("fieldValidation").map(String::as_str) {
                Some("Strict") => FieldValidation::Strict,
                Some("Ignore") => FieldValidation::Ignore,
                _ => FieldValidation::Warn,
            },
            default_manager: ua.split('/').next().unwrap_or("unknown").to_string(),
        }
    }

    fn render(&self, obj: &Value) -> Value {
        let mut o = obj.clone();
        o["apiVersion"] = json!(self.rt.api_version(&self.t.version));
        if wants_metadata_only(self.accept()) {
            return partial_metadata(&o);
        }
        o
    }

    fn parse_body(&self) -> Result<Value, ApiError> {
        let ct = self.headers.get(header::CONTENT_TYPE).and_then(|h| h.to_str().ok()).unwrap_or_default();
        if ct.contains("protobuf") || ct.contains("cbor") {
            return Err(ApiError::unsupported_media_type(format!(
                "the control-plane double decodes JSON and YAML bodies only, not {ct:?} (imperative `kubectl create <kind>` sends protobuf: use `kubectl apply -f`)"
            )));
        }
        serde_json::from_slice(&self.body)
            .or_else(|_| {
                std::str::from_utf8(&self.body)
                    .map_err(|e| e.to_string())
                    .and_then(|s| serde_saphyr::from_str::<Value>(s).map_err(|e| e.to_string()))
            })
            .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
    }
}

enum Reply {
    Json(StatusCode, Value, Vec<String>),
    Stream(Body),
    Text(String),
}

async fn resource(
    server: ApiServer,
    method: Method,
    headers: HeaderMap,
    body: Body,
    t: Target,
    query: Query,
) -> Response<Body> {
    let _in_flight = server.in_flight();
    let Some(verb) = verb_of(&method, &t, &query) else {
        return error_response(&ApiError::method_not_allowed(format!("{method} is not supported here")));
    };
    let mut record = RequestRecord {
        verb,
        group: t.group.clone(),
        version: t.version.clone(),
        resource: t.plural.clone(),
        subresource: t.subresource.clone(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        field_manager: query.get("fieldManager").cloned(),
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
        status: 0,
        injected: false,
    };
    let effects = server.inner.faults.lock().expect("faults lock").effects_for(&record);
    for effect in effects {
        match effect {
            FaultEffect::Latency(d) => tokio::time::sleep(d).await,
            FaultEffect::Error(code) => {
                record.status = code;
                record.injected = true;
                server.log(record);
                return error_response(&injected_error(code));
            }
        }
    }
    let result = match axum::body::to_bytes(body, MAX_BODY).await {
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
        Ok(bytes) => match lookup(&server, &t) {
            Err(e) => Err(e),
            Ok(rt) => {
                let call = Call { rt, t, verb, query, headers, body: bytes };
                execute(&server, &call)
            }
        },
    };
    let response = match result {
        Ok(Reply::Json(code, v, warnings)) => {
            record.status = code.as_u16();
            json_response(code, &v, &warnings)
        }
        Ok(Reply::Text(text)) => {
            record.status = 200;
            let mut r = Response::new(Body::from(text));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        Ok(Reply::Stream(body)) => {
            record.status = 200;
            // No framing headers: hyper chunks a body of unknown length itself, and refuses a
            // reply that claims `transfer-encoding: chunked` beside a known length.
            let mut r = Response::new(body);
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => {
            record.status = e.code;
            error_response(&e)
        }
    };
    server.log(record);
    response
}

fn lookup(server: &ApiServer, t: &Target) -> Result<Arc<ResourceType>, ApiError> {
    let path_err = || ApiError::not_found_path(&t.plural);
    let rt = server.find_type(&t.group, &t.plural).ok_or_else(path_err)?;
    if !rt.serves(&t.version) {
        return Err(path_err());
    }
    if t.namespace.is_some() && !rt.namespaced {
        return Err(path_err());
    }
    match t.subresource.as_deref() {
        None => {}
        Some("status") if rt.status_subresource => {}
        Some("scale") if rt.scale.is_some() => {}
        Some("log") if rt.has_log() => {}
        Some(_) => return Err(path_err()),
    }
    Ok(rt)
}

fn execute(server: &ApiServer, c: &Call) -> Result<Reply, ApiError> {
    if c.rt.namespaced && c.t.namespace.is_none() && !matches!(c.verb, Verb::List | Verb::Watch) {
        return Err(ApiError::not_found_path(&c.t.plural));
    }
    let ok = |v: Value| Ok(Reply::Json(StatusCode::OK, v, Vec::new()));
    match c.verb {
        Verb::Get => {
            let obj = server.with_store(|s| s.get(&c.rt.key(), c.ns(), c.name()).cloned());
            let obj = obj.ok_or_else(|| ApiError::not_found(&c.rt, c.name()))?;
            if c.t.subresource.as_deref() == Some("scale") {
                return ok(scale_of(&c.rt, &obj));
            }
            if c.t.subresource.as_deref() == Some("log") {
                let container = c.query.get("container").map(String::as_str);
                let text = server.pod_log(c.ns(), c.name(), container).ok_or_else(|| {
                    ApiError::bad_request(format!("no logs for pod {:?}: no pod runner ran it", c.name()))
                })?;
                return Ok(Reply::Text(tail(&text, c.query.get("tailLines").and_then(|n| n.parse().ok()))));
            }
            if table::wants_table(c.accept()) {
                let include = IncludeObject::parse(c.query.get("includeObject").map(String::as_str));
                let list_meta = json!({"resourceVersion": meta::rv_of(&obj)});
                return ok(table::table(&c.rt, &c.t.version, &[c.render(&obj)], include, list_meta));
            }
            ok(c.render(&obj))
        }
        Verb::List => list(server, c),
        Verb::Watch => watch(server, c),
        Verb::Create => {
            if c.t.subresource.is_some() {
                return Err(ApiError::method_not_allowed("create is not supported on subresources"));
            }
            let body = c.parse_body()?;
            let written = server.write(|s, p| write::create(s, p, &c.rt, c.ns(), body, &c.write_opts()))?;
            Ok(Reply::Json(StatusCode::CREATED, c.render(&written.object), written.warnings))
        }
        Verb::Update => {
            let body = c.parse_body()?;
            if c.t.subresource.as_deref() == Some("scale") {
                let replicas = body.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0);
                let rv = meta::rv_of(&body).to_string();
                let written = server
                    .write(|s, p| write::write_scale(s, p, &c.rt, c.ns(), c.name(), replicas, &rv, &c.write_opts()))?;
                return ok(scale_of(&c.rt, &written.object));
            }
            let written = server.write(|s, p| write::update(s, p, &c.rt, c.ns(), c.name(), body, &c.write_opts()))?;
            Ok(Reply::Json(StatusCode::OK, c.render(&written.object), written.warnings))
        }
        Verb::Patch => patch(server, c),
        Verb::Delete => {
            let opts = delete_opts(c)?;
            let deleted = server.write(|s, p| write::delete(s, p, &c.rt, c.ns(), c.name(), &opts))?;
            let v = deleted.into_response(&c.rt);
            ok(if v.get("kind") == Some(&json!("Status")) { v } else { c.render(&v) })
        }
        Verb::DeleteCollection => {
            let opts = delete_opts(c)?;
            let (labels, fields) = selectors(c)?;
            let ns = c.t.namespace.clone();
            let items = server.write(|s, p| {
                let names: Vec<(String, String)> = s
                    .list(&c.rt.key(), ns.as_deref())
                    .filter(|o| labels.matches(o) && fields.matches(o))
                    .map(|o| (meta::namespace_of(o).to_string(), meta::name_of(o).to_string()))
                    .collect();
                let mut items = Vec::new();
                for (ns, name) in names {
                    if let Ok(d) = write::delete(s, p, &c.rt, &ns, &name, &opts) {
                        items.push(match d {
                            write::Deleted::Pending(o) | write::Deleted::Gone(o) => o,
                        });
                    }
                }
                Ok(items)
            })?;
            let items: Vec<Value> = items.iter().map(|o| c.render(o)).collect();
            ok(
                json!({"apiVersion": c.rt.api_version(&c.t.version), "kind": format!("{}List", c.rt.kind), "metadata": {}, "items": items}),
            )
        }
    }
}

fn patch(server: &ApiServer, c: &Call) -> Result<Reply, ApiError> {
    let ct = c.headers.get(header::CONTENT_TYPE).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
        ApiError::unsupported_media_type(format!("the body of the request was in an unknown format - {ct:?}"))
    })?;
    if c.t.subresource.as_deref() == Some("scale") {
        // Read, patch and write in one step under the store's lock, as the API server's patch retry
        // loop makes it: a concurrent write to the object is no conflict unless the client's patch
        // itself names a resourceVersion.
        let written = server.write(|s, p| {
            let obj =
                s.get(&c.rt.key(), c.ns(), c.name()).cloned().ok_or_else(|| ApiError::not_found(&c.rt, c.name()))?;
            let current = scale_of(&c.rt, &obj);
            let (patched, sent_rv) = match kind {
                PatchKind::Apply | PatchKind::Merge => {
                    let body = c.parse_body()?;
                    let mut merged = current.clone();
                    json_patch::merge(&mut merged, &body);
                    (merged, meta::rv_of(&body).to_string())
                }
                other => {
                    let mut unversioned = current.clone();
                    unversioned["metadata"].as_object_mut().map(|m| m.remove("resourceVersion"));
                    let patched = patch::apply_patch(other, &unversioned, &c.body)?;
                    let rv = meta::rv_of(&patched).to_string();
                    (patched, rv)
                }
            };
            let replicas = patched.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0);
            write::write_scale(s, p, &c.rt, c.ns(), c.name(), replicas, &sent_rv, &c.write_opts())
        })?;
        return Ok(Reply::Json(StatusCode::OK, scale_of(&c.rt, &written.object), Vec::new()));
    }
    let req = PatchRequest { kind, body: &c.body, force: flag(&c.query, "force") };
    let written = server.write(|s, p| write::patch(s, p, &c.rt, c.ns(), c.name(), &req, &c.write_opts()))?;
    let code = if written.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(Reply::Json(code, c.render(&written.object), written.warnings))
}

fn delete_opts(c: &Call) -> Result<DeleteOpts, ApiError> {
    let body: Value = if c.body.is_empty() { json!({}) } else { c.parse_body()? };
    let propagation = body
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or(c.query.get("propagationPolicy").map(String::as_str))
        .map(|p| match p {
            "Foreground" => Ok(Propagation::Foreground),
            "Orphan" => Ok(Propagation::Orphan),
            "Background" => Ok(Propagation::Background),
            other => Err(ApiError::bad_request(format!("unknown propagationPolicy {other:?}"))),
        })
        .transpose()?;
    let orphan_legacy = body.get("orphanDependents").and_then(Value::as_bool) == Some(true);
    let dry_run = body.get("dryRun").and_then(Value::as_array).is_some_and(|d| d.iter().any(|v| v == "All"))
        || c.query.get("dryRun").is_some_and(|v| v == "All");
    Ok(DeleteOpts {
        propagation: if orphan_legacy { Some(Propagation::Orphan) } else { propagation },
        uid: body.pointer("/preconditions/uid").and_then(Value::as_str).map(String::from),
        resource_version: body.pointer("/preconditions/resourceVersion").and_then(Value::as_str).map(String::from),
        grace_period_seconds: body
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| c.query.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
        dry_run,
    })
}

fn selectors(c: &Call) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(c.query.get("labelSelector").map(String::as_str).unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(c.query.get("fieldSelector").map(String::as_str).unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

/// Continue tokens carry the list's resourceVersion and the last key returned.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let raw = json!({"rv": rv, "ns": ns, "name": name}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let bad = || ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v["rv"].as_u64().ok_or_else(bad)?,
        v["ns"].as_str().unwrap_or_default().to_string(),
        v["name"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The resourceVersion a list must be served at exactly, as kube-apiserver reads its parameters:
/// `resourceVersionMatch=Exact`, or (the legacy form) a `limit` with a resourceVersion other than
/// "0" and no match. `None`: the latest state will do.
fn exact_version(q: &Query) -> Result<Option<u64>, ApiError> {
    let rv = q.get("resourceVersion").map(String::as_str).filter(|v| !v.is_empty());
    let limited = q.get("limit").and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l > 0);
    let exact = match (q.get("resourceVersionMatch").map(String::as_str).unwrap_or_default(), rv) {
        ("Exact", Some(rv)) => Some(rv),
        ("", Some(rv)) if limited && rv != "0" => Some(rv),
        _ => None,
    };
    exact.map(|rv| rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))).transpose()
}

fn list(server: &ApiServer, c: &Call) -> Result<Reply, ApiError> {
    let (labels, fields) = selectors(c)?;
    let limit: usize = c.query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let start = c.query.get("continue").filter(|s| !s.is_empty()).map(|t| decode_continue(t)).transpose()?;
    let exact = if start.is_none() { exact_version(&c.query)? } else { None };
    let (items, rv, more) = server.with_store(|s| {
        if let Some(rv) = exact {
            if rv < s.oldest_resumable() {
                return Err(ApiError::gone("The resourceVersion for the provided list is too old."));
            }
            if rv > s.resource_version() {
                let current = s.resource_version();
                let message = format!("Too large resource version: {rv}, current: {current}");
                return Err(ApiError::new(504, "Timeout", message));
            }
        }
        let list_rv = match &start {
            Some((rv, _, _)) if *rv < s.oldest_resumable() => {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            Some((rv, _, _)) => *rv,
            None => s.resource_version(),
        };
        let ns = c.t.namespace.as_deref();
        let mut matching = s
            .list(&c.rt.key(), ns)
            .filter(|o| {
                start.as_ref().is_none_or(|(_, sns, sname)| {
                    (meta::namespace_of(o), meta::name_of(o)) > (sns.as_str(), sname.as_str())
                })
            })
            .filter(|o| labels.matches(o) && fields.matches(o));
        let items: Vec<Value> = matching.by_ref().take(limit).cloned().collect();
        let remaining = matching.count();
        Ok((items, list_rv, remaining))
    })?;
    let mut list_meta = json!({"resourceVersion": rv.to_string()});
    if more > 0
        && let Some(last) = items.last()
    {
        list_meta["continue"] = json!(encode_continue(rv, meta::namespace_of(last), meta::name_of(last)));
        list_meta["remainingItemCount"] = json!(more);
    }
    let rendered: Vec<Value> = items.iter().map(|o| c.render(o)).collect();
    if table::wants_table(c.accept()) {
        let include = IncludeObject::parse(c.query.get("includeObject").map(String::as_str));
        return Ok(Reply::Json(
            StatusCode::OK,
            table::table(&c.rt, &c.t.version, &rendered, include, list_meta),
            Vec::new(),
        ));
    }
    let (api_version, kind) = if wants_metadata_only(c.accept()) {
        ("meta.k8s.io/v1".to_string(), "PartialObjectMetadataList".to_string())
    } else {
        (c.rt.api_version(&c.t.version), format!("{}List", c.rt.kind))
    };
    let list = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": list_meta,
        "items": rendered,
    });
    Ok(Reply::Json(StatusCode::OK, list, Vec::new()))
}

fn watch(server: &ApiServer, c: &Call) -> Result<Reply, ApiError> {
    let (labels, fields) = selectors(c)?;
    let filter = WatchFilter { namespace: c.t.namespace.clone(), labels, fields };
    let from = match c.query.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?)
        }
    };
    let bookmarks = flag(&c.query, "allowWatchBookmarks");
    let initial_events = flag(&c.query, "sendInitialEvents");
    let timeout = c.query.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let from = if initial_events { None } else { from };
    let opened = server.with_store(|s| s.watch(&c.rt.key(), filter, from, bookmarks, initial_events));
    server.ensure_bookmark_ticker();
    let renderer = WatchRenderer {
        rt: c.rt.clone(),
        version: c.t.version.clone(),
        metadata_only: wants_metadata_only(c.accept()),
        table: table::wants_table(c.accept())
            .then(|| IncludeObject::parse(c.query.get("includeObject").map(String::as_str))),
    };
    let (initial, rx) = match opened {
        Ok(opened) => opened,
        Err(too_old) => {
            let status =
                ApiError::gone(format!("too old resource version: {} ({})", too_old.requested, too_old.oldest));
            // As kube-apiserver's watch cache: 200, one ERROR event, the end. Streamed (chunked)
            // like every watch reply rather than sent with a length.
            let line = line(&json!({"type": "ERROR", "object": status.to_status()}));
            let once = futures::stream::once(async move { Ok::<_, Infallible>(line) });
            return Ok(Reply::Stream(Body::from_stream(once)));
        }
    };
    let live = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) });
    let mut first = true;
    let stream = futures::stream::iter(initial)
        .chain(live)
        .take_until(tokio::time::sleep(Duration::from_secs(timeout)))
        .map(move |d| {
            let bytes = renderer.render(&d, first);
            first = false;
            Ok::<_, Infallible>(bytes)
        });
    Ok(Reply::Stream(Body::from_stream(stream)))
}

fn line(v: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

struct WatchRenderer {
    rt: Arc<ResourceType>,
    version: String,
    metadata_only: bool,
    table: Option<IncludeObject>,
}

impl WatchRenderer {
    fn render(&self, d: &Delivery, first: bool) -> Bytes {
        let api_version = self.rt.api_version(&self.version);
        let event = match d {
            Delivery::Event(kind, obj) => {
                let mut o = obj.clone();
                o["apiVersion"] = json!(api_version);
                if self.metadata_only {
                    o = partial_metadata(&o);
                }
                if let Some(include) = self.table {
                    let mut t = table::table(
                        &self.rt,
                        &self.version,
                        &[o],
                        include,
                        json!({"resourceVersion": meta::rv_of(obj)}),
                    );
                    if !first {
                        t["columnDefinitions"] = json!([]);
                    }
                    o = t;
                }
                json!({"type": kind.as_str(), "object": o})
            }
            Delivery::Bookmark(rv, initial_end) => {
                let mut metadata = json!({"resourceVersion": rv.to_string()});
                if *initial_end {
                    metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                json!({"type": "BOOKMARK", "object": {"kind": self.rt.kind, "apiVersion": api_version, "metadata": metadata}})
            }
        };
        line(&event)
    }
}

fn tail(text: &str, lines: Option<usize>) -> String {
    match lines {
        Some(n) => {
            let all: Vec<&str> = text.lines().collect();
            let mut out = all[all.len().saturating_sub(n)..].join("\n");
            out.push('\n');
            out
        }
        None => text.to_string(),
    }
}

/// Whether the client asked for `PartialObjectMetadata` (kube's `get_metadata`, metadata watchers).
fn wants_metadata_only(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

fn partial_metadata(obj: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": obj.get("metadata").cloned().unwrap_or_default(),
    })
}

/// The autoscaling/v1 Scale view of an object with a scale subresource.
fn scale_of(rt: &ResourceType, obj: &Value) -> Value {
    let paths = rt.scale.as_ref().expect("scale subresource checked by lookup");
    let at = |p: &str| table::eval_json_path(obj, p).into_iter().next().cloned();
    let selector = paths.label_selector.as_deref().and_then(&at).map(|sel| match sel {
        Value::String(s) => s,
        other => LabelSelector::from_object(&other).map(|s| s.to_string()).unwrap_or_default(),
    });
    let mut status = json!({"replicas": at(&paths.status_replicas).and_then(|v| v.as_i64()).unwrap_or(0)});
    if let Some(sel) = selector {
        status["selector"] = json!(sel);
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta::name_of(obj),
            "namespace": meta::namespace_of(obj),
            "uid": meta::uid_of(obj),
            "resourceVersion": meta::rv_of(obj),
            "creationTimestamp": obj.pointer("/metadata/creationTimestamp").cloned().unwrap_or_default(),
        },
        "spec": {"replicas": at(&paths.spec_replicas).and_then(|v| v.as_i64()).unwrap_or(0)},
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::store::EventType;

    #[test]
    fn namespaced_paths_split_into_parts() {
        let Route::Resource(t) = route("/apis/apps/v1/namespaces/ns1/deployments/web/scale") else { panic!() };
        assert_eq!((t.group.as_str(), t.namespace.as_deref(), t.name.as_deref()), ("apps", Some("ns1"), Some("web")));
        assert_eq!(t.subresource.as_deref(), Some("scale"));
        let Route::Resource(t) = route("/api/v1/namespaces/ns1") else { panic!() };
        assert_eq!((t.plural.as_str(), t.name.as_deref(), t.namespace), ("namespaces", Some("ns1"), None));
        let Route::Resource(t) = route("/api/v1/namespaces/ns1/status") else { panic!() };
        assert_eq!(t.subresource.as_deref(), Some("status"));
        let Route::Resource(t) = route("/api/v1/pods") else { panic!() };
        assert_eq!((t.plural.as_str(), t.namespace), ("pods", None));
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "ns", "b");
        assert_eq!(decode_continue(&token).unwrap(), (42, "ns".to_string(), "b".to_string()));
        assert!(decode_continue("garbage!").is_err());
    }

    #[test]
    fn event_types_render_upper_case() {
        assert_eq!(EventType::Deleted.as_str(), "DELETED");
    }
}
