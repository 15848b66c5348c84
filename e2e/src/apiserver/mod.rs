//! The control-plane double: a stateful fake Kubernetes API server.
//!
//! One [`ApiServer`] holds the state; [`ApiServer::client`] talks to it in-process (no socket)
//! and [`ApiServer::serve`] exposes the same router over HTTP with a kubeconfig for `kubectl`.

mod builtin;
mod discovery;
mod handler;
pub mod log;
mod managed;
pub(crate) mod meta;
mod openapi;
mod patch;
pub mod resources;
pub mod selector;
pub mod status;
mod store;
mod table;
mod write;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

pub use log::{Fault, FaultEffect, RequestMatch, RequestRecord, Verb};
pub use resources::ResourceType;
pub use status::ApiError;
pub use write::FieldValidation;

use resources::TypeKey;
use store::Store;
use write::{Policy, WriteOpts};

/// Field manager used by the direct-access helpers ([`ApiServer::put`] and friends).
pub const DIRECT_MANAGER: &str = "celery-e2e";

/// Errors of the direct (non-HTTP) API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no served kind {kind} in {api_version}")]
    UnknownKind { api_version: String, kind: String },
    #[error("encoding the object: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where `pods/log` reads from: (namespace, pod, container) -> text. Set by the pod runner.
pub type LogSource = Arc<dyn Fn(&str, &str, Option<&str>) -> Option<String> + Send + Sync>;

struct Inner {
    store: Mutex<Store>,
    log_source: Mutex<Option<LogSource>>,
    policy: Mutex<Policy>,
    log: Mutex<Vec<RequestRecord>>,
    /// Resource requests received and not yet answered (a watch counts until its stream starts).
    in_flight: AtomicUsize,
    faults: Mutex<log::Faults>,
    bookmark_interval: Mutex<Duration>,
    ticker_started: AtomicBool,
}

/// The fake API server. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("resource_version", &self.resource_version()).finish_non_exhaustive()
    }
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

/// Default number of events retained for watch resume (older resourceVersions get 410 Gone).
pub const DEFAULT_HISTORY: usize = 10_000;

impl ApiServer {
    /// An empty server with the built-in kinds and the `default` and `kube-system` namespaces.
    pub fn new() -> Self {
        let mut store = Store::new(DEFAULT_HISTORY);
        for t in resources::builtin_types() {
            store.types.insert(t.key(), Arc::new(t));
        }
        let server = ApiServer {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                log_source: Mutex::new(None),
                policy: Mutex::new(Policy::default()),
                log: Mutex::new(Vec::new()),
                in_flight: AtomicUsize::new(0),
                faults: Mutex::new(log::Faults::default()),
                bookmark_interval: Mutex::new(Duration::from_secs(5)),
                ticker_started: AtomicBool::new(false),
            }),
        };
        for ns in ["default", "kube-system"] {
            server
                .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("namespaces are valid");
        }
        server
    }

    // ------------------------------------------------------------------ CRDs

    /// Register a CRD (a `serde_json::Value` or a `CustomResourceDefinition`), as `kubectl apply` would.
    pub fn add_crd<T: Serialize>(&self, crd: &T) -> Result<Value, Error> {
        let mut crd = serde_json::to_value(crd)?;
        crd["apiVersion"] = json!("apiextensions.k8s.io/v1");
        crd["kind"] = json!("CustomResourceDefinition");
        self.put(crd)
    }

    /// Register every CRD in the `*.yaml` / `*.yml` / `*.json` files of `dir` (multi-document
    /// YAML allowed; documents that are not CRDs are skipped). Returns how many were added.
    pub fn load_crds_from_dir(&self, dir: impl AsRef<Path>) -> Result<usize, Error> {
        let dir = dir.as_ref();
        let io = |source| Error::Io { path: dir.to_path_buf(), source };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
            .collect();
        paths.sort();
        let mut added = 0;
        for path in paths {
            for doc in read_documents(&path)? {
                if doc.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition") {
                    self.add_crd(&doc)?;
                    added += 1;
                }
            }
        }
        Ok(added)
    }

    // ------------------------------------------------------------------ clients

    /// A `kube::Client` talking to this server in-process (default namespace `default`).
    /// Must be called inside a Tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.router(), "default")
    }

    fn router(&self) -> axum::Router {
        let server = self.clone();
        axum::Router::new().fallback(move |req: axum::extract::Request| handler::handle(server.clone(), req))
    }

    /// Serve the same API over plain HTTP on `addr` (use `127.0.0.1:0` for a free port) and
    /// write a kubeconfig pointing at it. The server stops when the returned value is dropped.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<ServedApi> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let dir = tempfile::tempdir()?;
        let kubeconfig_path = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig_path, kubeconfig(addr))?;
        let router = self.router();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!(error = %e, "control-plane double stopped serving");
            }
        });
        Ok(ServedApi { addr, kubeconfig_path, _dir: dir, task })
    }

    // ------------------------------------------------------------------ request log

    /// Every resource request so far, oldest first (discovery requests are not recorded).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.log.lock().expect("log lock").clone()
    }

    pub fn clear_requests(&self) {
        self.inner.log.lock().expect("log lock").clear();
    }

    /// Write requests (create/update/patch/delete/deletecollection) that succeeded, not dry-run.
    /// A write the server found to be a no-op still counts here; compare
    /// [`ApiServer::resource_version`] to see whether anything was stored.
    pub fn writes(&self) -> Vec<RequestRecord> {
        self.requests().into_iter().filter(RequestRecord::is_successful_write).collect()
    }

    pub fn write_count(&self) -> usize {
        self.writes().len()
    }

    /// How many resource requests the log holds (cheaper than `requests().len()`).
    pub fn request_count(&self) -> usize {
        self.inner.log.lock().expect("log lock").len()
    }

    /// Resource requests received and not answered yet (delayed by a latency fault, say); a watch
    /// counts until its stream starts. With [`ApiServer::request_count`] this tells when a client
    /// has gone quiet.
    pub fn requests_in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Counts a request as in flight until the guard drops.
    fn in_flight(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.inner.clone())
    }

    fn log(&self, record: RequestRecord) {
        self.inner.log.lock().expect("log lock").push(record);
    }

    // ------------------------------------------------------------------ faults

    /// Add a fault injection rule, e.g.
    /// `Fault::error(500).on(RequestMatch::writes().resource("deployments")).times(3)`.
    pub fn inject(&self, fault: Fault) {
        self.inner.faults.lock().expect("faults lock").add(fault);
    }

    pub fn clear_faults(&self) {
        self.inner.faults.lock().expect("faults lock").clear();
    }

    /// Seed the random source of probabilistic faults (deterministic by default).
    pub fn seed_faults(&self, seed: u64) {
        self.inner.faults.lock().expect("faults lock").reseed(seed);
    }

    /// Close every open watch stream; returns how many were open.
    pub fn drop_watches(&self) -> usize {
        self.with_store(|s| s.drop_watches())
    }

    /// Close the open watches of one resource, by plural name (`"taskqueues"`), so that only
    /// that kind's watchers must re-watch (after [`ApiServer::compact`]: get 410 Gone). Returns
    /// how many were open.
    pub fn drop_watches_of(&self, plural: &str) -> usize {
        self.with_store(|s| s.drop_watches_of(plural))
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.with_store(|s| s.open_watches())
    }

    // ------------------------------------------------------------------ watch history

    /// The current (global) resourceVersion; it moves only when something is stored.
    pub fn resource_version(&self) -> u64 {
        self.with_store(|s| s.resource_version())
    }

    /// Forget the event history: watches from any earlier resourceVersion get 410 Gone.
    pub fn compact(&self) {
        self.with_store(|s| s.compact());
    }

    /// How many events to retain for watch resume (default [`DEFAULT_HISTORY`]).
    pub fn set_history_limit(&self, events: usize) {
        self.with_store(|s| s.set_history_limit(events));
    }

    /// How often BOOKMARK events go to watches that allow them (default 5 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.inner.bookmark_interval.lock().expect("interval lock") = every;
    }

    /// Send a BOOKMARK to every watch that allows them, now.
    pub fn send_bookmarks(&self) {
        self.with_store(|s| s.bookmark_all());
    }

    fn ensure_bookmark_ticker(&self) {
        if self.inner.ticker_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(inner) => *inner.bookmark_interval.lock().expect("interval lock"),
                    None => return,
                };
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(inner) => inner.store.lock().expect("store lock").bookmark_all(),
                    None => return,
                }
            }
        });
    }

    /// Serve `pods/log` from this source (the pod runner installs one; `None` removes it).
    pub fn set_log_source(&self, source: Option<LogSource>) {
        *self.inner.log_source.lock().expect("log source lock") = source;
    }

    fn pod_log(&self, namespace: &str, pod: &str, container: Option<&str>) -> Option<String> {
        let source = self.inner.log_source.lock().expect("log source lock").clone()?;
        source(namespace, pod, container)
    }

    // ------------------------------------------------------------------ behaviour switches

    /// Make pod deletion graceful (deletionTimestamp, then removal by whoever plays kubelet).
    /// The pod runner turns this on; without a kubelet pods are removed at once.
    pub fn set_graceful_pod_deletion(&self, graceful: bool) {
        self.inner.policy.lock().expect("policy lock").graceful_pods = graceful;
    }

    /// Run the garbage collector now (it also runs after every delete). Returns objects deleted.
    pub fn collect_garbage(&self) -> usize {
        let policy = self.inner.policy.lock().expect("policy lock").clone();
        self.with_store(|s| write::collect_garbage(s, &policy))
    }

    // ------------------------------------------------------------------ direct state access

    /// Get an object by `apiVersion`, kind, namespace (`None` for cluster-scoped) and name.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, Error> {
        let rt = self.resolve(api_version, kind)?;
        Ok(self.with_store(|s| s.get(&rt.key(), namespace.unwrap_or_default(), name).cloned()))
    }

    /// List objects of a kind, in one namespace or all (`None`).
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Result<Vec<Value>, Error> {
        let rt = self.resolve(api_version, kind)?;
        Ok(self.with_store(|s| s.list(&rt.key(), namespace).cloned().collect()))
    }

    /// Create an object through admission (defaults, validation) as manager [`DIRECT_MANAGER`].
    pub fn create(&self, obj: Value) -> Result<Value, Error> {
        let rt = self.resolve_object(&obj)?;
        let ns = meta::namespace_of(&obj).to_string();
        let ns = if rt.namespaced && ns.is_empty() { "default".to_string() } else { ns };
        let opts = direct_opts(None);
        Ok(self.write(|s, p| write::create(s, p, &rt, &ns, obj, &opts))?.object)
    }

    /// Create or replace an object including its status, through admission, ignoring
    /// resourceVersion preconditions. Use it to play a controller the test does not run.
    pub fn put(&self, mut obj: Value) -> Result<Value, Error> {
        let rt = self.resolve_object(&obj)?;
        let ns = meta::namespace_of(&obj).to_string();
        let ns = if rt.namespaced && ns.is_empty() { "default".to_string() } else { ns };
        let name = meta::name_of(&obj).to_string();
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let exists = self.with_store(|s| s.get(&rt.key(), &ns, &name).is_some());
        if !exists {
            let status = obj.get("status").cloned();
            let created = self.write(|s, p| write::create(s, p, &rt, &ns, obj, &direct_opts(None)))?.object;
            return match status.filter(|_| rt.status_subresource) {
                Some(status) => self.write_status(&rt, &ns, &name, status),
                None => Ok(created),
            };
        }
        let status = obj.get("status").cloned();
        let updated = self.write(|s, p| write::update(s, p, &rt, &ns, &name, obj, &direct_opts(None)))?.object;
        match status.filter(|_| rt.status_subresource) {
            Some(status) => self.write_status(&rt, &ns, &name, status),
            None => Ok(updated),
        }
    }

    fn write_status(&self, rt: &ResourceType, ns: &str, name: &str, status: Value) -> Result<Value, Error> {
        let current =
            self.with_store(|s| s.get(&rt.key(), ns, name).cloned()).ok_or_else(|| ApiError::not_found(rt, name))?;
        let mut obj = current;
        obj["status"] = status;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let opts = direct_opts(Some("status"));
        Ok(self.write(|s, p| write::update(s, p, rt, ns, name, obj, &opts))?.object)
    }

    /// Merge-patch the `.status` of an object (as its controller would).
    pub fn patch_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value, Error> {
        let rt = self.resolve(api_version, kind)?;
        let body = serde_json::to_vec(&json!({"status": status}))?;
        let req = write::PatchRequest { kind: patch::PatchKind::Merge, body: &body, force: false };
        let sub = if rt.status_subresource { Some("status") } else { None };
        let opts = direct_opts(sub);
        Ok(self.write(|s, p| write::patch(s, p, &rt, namespace.unwrap_or_default(), name, &req, &opts))?.object)
    }

    /// Delete an object (background propagation). Returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Result<bool, Error> {
        let rt = self.resolve(api_version, kind)?;
        let opts = write::DeleteOpts::default();
        existed(self.write(|s, p| write::delete(s, p, &rt, namespace.unwrap_or_default(), name, &opts)))
    }

    /// Delete at once, skipping graceful deletion (grace period 0), as kubelet does once a pod's
    /// containers are gone. Finalizers still hold the object. Returns whether it existed.
    pub fn force_delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, Error> {
        let rt = self.resolve(api_version, kind)?;
        let opts = write::DeleteOpts { grace_period_seconds: Some(0), ..Default::default() };
        let ns = namespace.unwrap_or_default();
        let result = self.write(|s, p| {
            if s.get(&rt.key(), ns, name).is_some_and(|o| o.pointer("/metadata/deletionTimestamp").is_some()) {
                return write::finish_deletion(s, p, &rt, ns, name);
            }
            write::delete(s, p, &rt, ns, name, &opts).map(|_| ())
        });
        existed(result)
    }

    /// Replace the whole `.status` of an object (its status subresource when it has one).
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value, Error> {
        let rt = self.resolve(api_version, kind)?;
        self.write_status(&rt, namespace.unwrap_or_default(), name, status)
    }

    /// Wakes whenever anything is stored; the value is the latest resourceVersion.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.with_store(|s| s.subscribe())
    }

    /// Every change of a kind (in `namespace`, or all namespaces) from now on, in order and none
    /// missed, for a test that must see transient states ([`ApiServer::changes`] only wakes, and
    /// wakes once for several changes). Not a client's watch: never logged, never closed by
    /// [`ApiServer::drop_watches`], not counted by [`ApiServer::open_watches`].
    pub fn observe(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Result<Observer, Error> {
        let rt = self.resolve(api_version, kind)?;
        let filter = store::WatchFilter { namespace: namespace.map(String::from), ..Default::default() };
        Ok(Observer { rx: self.with_store(|s| s.observe(&rt.key(), filter)) })
    }

    /// The served kinds (built-in and from CRDs).
    pub fn resource_types(&self) -> Vec<ResourceType> {
        self.with_store(|s| s.types.values().map(|t| (**t).clone()).collect())
    }

    // ------------------------------------------------------------------ internals

    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.inner.store.lock().expect("store lock"))
    }

    fn with_types<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &ResourceType>) -> R) -> R {
        self.with_store(|s| f(&mut s.types.values().map(|t| t.as_ref())))
    }

    fn write<R>(&self, f: impl FnOnce(&mut Store, &Policy) -> Result<R, ApiError>) -> Result<R, ApiError> {
        let policy = self.inner.policy.lock().expect("policy lock").clone();
        self.with_store(|s| f(s, &policy))
    }

    fn find_type(&self, group: &str, plural: &str) -> Option<Arc<ResourceType>> {
        let key = TypeKey { group: group.to_string(), plural: plural.to_string() };
        self.with_store(|s| s.types.get(&key).cloned())
    }

    fn resolve(&self, api_version: &str, kind: &str) -> Result<Arc<ResourceType>, Error> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.with_store(|s| s.types.values().find(|t| t.group == group && t.kind == kind && t.serves(version)).cloned())
            .ok_or_else(|| Error::UnknownKind { api_version: api_version.to_string(), kind: kind.to_string() })
    }

    fn resolve_object(&self, obj: &Value) -> Result<Arc<ResourceType>, Error> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        self.resolve(api_version, kind)
    }
}

fn direct_opts(subresource: Option<&str>) -> WriteOpts {
    WriteOpts {
        field_manager: Some(DIRECT_MANAGER.to_string()),
        subresource: subresource.map(String::from),
        default_manager: DIRECT_MANAGER.to_string(),
        ..Default::default()
    }
}

/// Parse every YAML (or JSON) document in a file.
pub fn read_documents(path: &Path) -> Result<Vec<Value>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| Error::Parse { path: path.to_path_buf(), message: e.to_string() })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: celery-e2e
  cluster:
    server: http://{addr}
contexts:
- name: celery-e2e
  context:
    cluster: celery-e2e
    user: celery-e2e
    namespace: default
current-context: celery-e2e
users:
- name: celery-e2e
  user: {{}}
"
    )
}

/// The double served over HTTP. Dropping it stops the listener and removes the kubeconfig.
/// A request in flight ([`ApiServer::requests_in_flight`]) until dropped.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The changes [`ApiServer::observe`] reports.
#[derive(Debug)]
pub struct Observer {
    rx: tokio::sync::mpsc::UnboundedReceiver<store::Delivery>,
}

impl Observer {
    /// The next change: `("ADDED" | "MODIFIED" | "DELETED", object as stored)`; `None` once the
    /// server is gone.
    pub async fn next(&mut self) -> Option<(&'static str, Value)> {
        loop {
            match self.rx.recv().await? {
                store::Delivery::Event(kind, obj) => return Some((kind.as_str(), obj)),
                store::Delivery::Bookmark(..) => {}
            }
        }
    }
}

pub struct ServedApi {
    pub addr: SocketAddr,
    pub kubeconfig_path: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl ServedApi {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube::Client` over real HTTP, configured from the written kubeconfig.
    pub async fn client(&self) -> Result<kube::Client, Box<dyn std::error::Error + Send + Sync>> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig_path)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for ServedApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for ServedApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedApi")
            .field("addr", &self.addr)
            .field("kubeconfig_path", &self.kubeconfig_path)
            .finish_non_exhaustive()
    }
}

/// A delete's outcome as "did it exist": 404 is `false`, not an error.
fn existed<T>(result: Result<T, ApiError>) -> Result<bool, Error> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
