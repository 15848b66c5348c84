//! The whole e2e stack in one call: the control-plane double served over HTTP with `crds/`, the
//! pod runner with real Celery workers, a password-protected Redis and the operator binary as a
//! child process — or, when `E2E_KUBECONFIG` is set, a real cluster instead of the double and the
//! runner.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_e2e::stack::StackError> {
//! use celery_e2e::stack::{Stack, StackConfig, examples_dir};
//! let stack = Stack::start(StackConfig::with_operator("target/debug/celery-operator")).await?;
//! stack.apply_file(examples_dir().join("redis-queues.yaml")).await?;
//! let ids = stack.send_tasks(&[("celery_example.add", serde_json::json!([2, 3]), "emails")]).await?;
//! let results = stack.wait_results(&ids, std::time::Duration::from_secs(120)).await?;
//! # Ok(()) }
//! ```
//!
//! Everything is torn down when the `Stack` is dropped, also when a test panics: the operator gets
//! SIGKILL (use [`Stack::stop_operator`] for a graceful SIGTERM), the runner kills its pods, Redis is
//! killed and, in cluster mode, the test's namespace is deleted. Child processes also die with the
//! test binary when it is killed without unwinding (`PR_SET_PDEATHSIG`).
//!
//! # Real-cluster mode
//!
//! With `E2E_KUBECONFIG=<path>` the stack uses that cluster: `crds/` are applied, a namespace
//! `e2e-<pid>-<n>` is created per stack (deleted on drop), the operator still runs locally (with
//! `KUBECONFIG` and `--watch-namespaces <ns>`), pods run `E2E_WORKER_IMAGE` (every applied
//! WorkerPool's image is rewritten to it), and the broker is the Redis of `E2E_REDIS_URL`, which
//! must be reachable both from the pods and from this machine (tasks are sent and results read from
//! here); each stack uses (and first empties) its own two databases of it
//! ([`CLUSTER_REDIS_DATABASES`]), so that concurrent scenarios do not consume each other's tasks.
//! There is no [`Stack::server`] (no request log) and no [`Stack::runner`] (no process-level view):
//! callers fall back to API-level checks, e.g. [`Stack::sample_beat`] counts Ready beat pods
//! instead of processes holding the beat schedule open.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Scope};
use serde_json::{Value, json};

use crate::{ApiServer, PodRunner, RunnerConfig, ServedApi};

/// Field manager of everything the stack applies.
pub const FIELD_MANAGER: &str = "celery-e2e-stack";
/// Secret (in the stack's namespace) holding the Celery result backend URL under key `url`.
pub const RESULTS_SECRET: &str = "e2e-results";
/// Generous deadline for things that take a moment under load (2 cores, tests in parallel).
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A change applied to every document before [`Stack::apply_yaml`] sends it.
pub type Rewrite = Arc<dyn Fn(&mut Value) + Send + Sync>;

/// Why the stack (or one of its helpers) failed. Never carries the broker password.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Harness(#[from] e2e_harness::HarnessError),
    #[error(transparent)]
    Runner(#[from] crate::runner::RunnerError),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the operator {0}")]
    Operator(String),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

pub type Result<T, E = StackError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// The workspace root (holds `crds/`, `examples/`, `worker-image/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `<workspace>/examples`.
pub fn examples_dir() -> PathBuf {
    workspace_root().join("examples")
}

/// Which kubelet plays the pods (double mode only; a real cluster runs its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pods {
    /// No runner: Deployments stay as written.
    None,
    /// Pods become ready at once, no processes (fast, for API-only scenarios).
    Simulated,
    /// Real Celery processes from the harness venv ([`RunnerConfig::celery`]).
    #[default]
    Celery,
}

/// What to bring up. `StackConfig::default()` has no operator; see [`StackConfig::with_operator`].
#[derive(Clone)]
pub struct StackConfig {
    /// The operator binary (`env!("CARGO_BIN_EXE_celery-operator")` in operator tests,
    /// `target/debug/celery-operator` from elsewhere); `None`: no operator.
    pub operator_bin: Option<PathBuf>,
    /// Extra arguments appended after `run --leader-election false --metrics-addr 127.0.0.1:PORT
    /// --watch-namespaces NS`.
    pub operator_args: Vec<String>,
    /// Extra environment for the operator (e.g. `RUST_LOG`).
    pub operator_env: Vec<(String, String)>,
    /// Start the operator in [`Stack::start`] (else call [`Stack::start_operator`]).
    pub start_operator: bool,
    /// The kubelet in double mode.
    pub pods: Pods,
    /// Password of the test Redis (it ends up only in Secrets).
    pub redis_password: String,
    /// Applied to every document after the stack's own rewrites (see [`Stack::rewrite`]).
    pub rewrites: Vec<Rewrite>,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            operator_bin: None,
            operator_args: Vec::new(),
            operator_env: Vec::new(),
            start_operator: true,
            pods: Pods::default(),
            redis_password: format!("e2e-pw-{:016x}", fastrand::u64(..)),
            rewrites: Vec::new(),
        }
    }
}

impl StackConfig {
    /// The default stack with the operator binary at `operator_bin`.
    pub fn with_operator(operator_bin: impl Into<PathBuf>) -> Self {
        StackConfig { operator_bin: Some(operator_bin.into()), ..Default::default() }
    }

    /// Adds a rewrite (applied in order, after the stack's own).
    pub fn rewrite(mut self, f: impl Fn(&mut Value) + Send + Sync + 'static) -> Self {
        self.rewrites.push(Arc::new(f));
        self
    }
}

impl std::fmt::Debug for StackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackConfig")
            .field("operator_bin", &self.operator_bin)
            .field("operator_args", &self.operator_args)
            .field("pods", &self.pods)
            .field("rewrites", &self.rewrites.len())
            .finish_non_exhaustive()
    }
}

/// Double mode: everything local.
struct Local {
    // Field order is drop order: the runner stops its pods before the API goes away.
    runner: Option<Arc<PodRunner>>,
    served: ServedApi,
    server: ApiServer,
    redis: e2e_harness::RedisServer,
}

struct Operator {
    child: tokio::process::Child,
}

/// A running e2e stack; see the module docs.
pub struct Stack {
    operator: Option<Operator>,
    local: Option<Local>,
    client: kube::Client,
    namespace: String,
    /// Namespace to delete on drop (cluster mode).
    owned_namespace: bool,
    kubeconfig_path: PathBuf,
    broker_url: String,
    result_backend_url: String,
    worker_image: Option<String>,
    metrics_addr: SocketAddr,
    config: StackConfig,
    resources: Mutex<HashMap<String, (ApiResource, bool)>>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("namespace", &self.namespace)
            .field("cluster", &self.is_cluster())
            .field("kubeconfig_path", &self.kubeconfig_path)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// Databases of the `E2E_REDIS_URL` Redis the stacks of one test binary cycle through (Redis'
/// default `databases 16`): stack n uses `2 * (n % 8)` for the broker and the next for results.
pub const CLUSTER_REDIS_DATABASES: usize = 16;

impl Stack {
    /// Brings everything up. Must be called inside a multi-threaded Tokio runtime (the operator
    /// and the runner's processes are tied to the runtime's threads).
    pub async fn start(config: StackConfig) -> Result<Stack> {
        let dir = tempfile::Builder::new().prefix("celery-e2e-stack-").tempdir().map_err(io("create stack dir"))?;
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", e2e_harness::free_port()).parse().expect("socket addr");
        let mut stack = match std::env::var_os("E2E_KUBECONFIG") {
            Some(path) => Self::start_cluster(PathBuf::from(path), config, dir, metrics_addr).await?,
            None => Self::start_local(config, dir, metrics_addr).await?,
        };
        let results = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": RESULTS_SECRET},
            "stringData": {"url": stack.result_backend_url}});
        stack.apply_docs(vec![results], &|_| {}).await?;
        if stack.config.start_operator && stack.config.operator_bin.is_some() {
            stack.start_operator().await?;
        }
        Ok(stack)
    }

    async fn start_local(config: StackConfig, dir: tempfile::TempDir, metrics_addr: SocketAddr) -> Result<Stack> {
        let password = config.redis_password.clone();
        let pods = config.pods;
        let (redis, runner_config) = tokio::task::spawn_blocking(move || {
            let redis = e2e_harness::RedisServer::builder().password(password).start();
            let runner = match pods {
                Pods::Celery => Some(RunnerConfig::celery()),
                Pods::Simulated => Some(Ok(RunnerConfig::simulated())),
                Pods::None => None,
            };
            (redis, runner)
        })
        .await
        .expect("setup thread");
        let redis = redis?;
        let server = ApiServer::new();
        server
            .load_crds_from_dir(workspace_root().join("crds"))
            .map_err(|e| StackError::Invalid(format!("loading crds/: {e}")))?;
        let runner = runner_config.transpose()?.map(|c| PodRunner::start(&server, c)).transpose()?.map(Arc::new);
        let served = server.serve("127.0.0.1:0".parse().expect("addr")).await.map_err(io("serve the double"))?;
        let client = served.client().await.map_err(|e| StackError::Invalid(format!("client for the double: {e}")))?;
        let broker_url = redis.url();
        Ok(Stack {
            operator: None,
            client,
            namespace: "default".into(),
            owned_namespace: false,
            kubeconfig_path: served.kubeconfig_path.clone(),
            result_backend_url: with_db(&broker_url, 1)?,
            broker_url,
            worker_image: None,
            metrics_addr,
            config,
            resources: Mutex::default(),
            dir,
            local: Some(Local { runner, served, server, redis }),
        })
    }

    async fn start_cluster(
        kubeconfig_path: PathBuf,
        config: StackConfig,
        dir: tempfile::TempDir,
        metrics_addr: SocketAddr,
    ) -> Result<Stack> {
        let need = |name: &str| {
            std::env::var(name)
                .map_err(|_| StackError::Invalid(format!("E2E_KUBECONFIG is set, so {name} must be too")))
        };
        let shared_url = need("E2E_REDIS_URL")?;
        let worker_image = need("E2E_WORKER_IMAGE")?;
        let client = client_from(&kubeconfig_path).await?;
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let namespace = format!("e2e-{}-{n}", std::process::id());
        // Stacks running at the same time share the Redis: each gets its own pair of databases
        // (queue names, the unacked hash and worker events are per database), emptied first.
        let db = 2 * (n % (CLUSTER_REDIS_DATABASES / 2));
        let broker_url = with_db(&shared_url, db)?;
        let result_backend_url = with_db(&shared_url, db + 1)?;
        let flush =
            "import os, redis\nfor u in os.environ['E2E_FLUSH'].split(' '): redis.Redis.from_url(u).flushdb()\n";
        let urls = format!("{broker_url} {result_backend_url}");
        tokio::task::spawn_blocking(move || e2e_harness::python::run_script(flush, &[("E2E_FLUSH", &urls)]))
            .await
            .expect("flush thread")
            .map_err(|_| StackError::Invalid("could not empty the E2E_REDIS_URL databases of this stack".into()))?;
        let stack = Stack {
            operator: None,
            local: None,
            client,
            namespace: namespace.clone(),
            owned_namespace: true,
            kubeconfig_path,
            result_backend_url,
            broker_url,
            worker_image: Some(worker_image),
            metrics_addr,
            config,
            resources: Mutex::default(),
            dir,
        };
        let mut docs = Vec::new();
        for entry in std::fs::read_dir(workspace_root().join("crds")).map_err(io("read crds/"))? {
            let path = entry.map_err(io("read crds/"))?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                docs.extend(parse_yaml(&std::fs::read_to_string(&path).map_err(io("read a CRD"))?)?);
            }
        }
        docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}));
        stack.apply_docs(docs, &|_| {}).await?;
        // A new CRD is served a moment after it is created.
        let deadline = Instant::now() + DEADLINE;
        for kind in ["WorkerPool", "TaskQueue"] {
            while stack.resource_of(&json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": kind})).await.is_err()
            {
                if Instant::now() > deadline {
                    return Err(StackError::Timeout { what: format!("the {kind} CRD to be served"), after: DEADLINE });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(stack)
    }

    // ------------------------------------------------------------------ parts

    /// A kube client for the double (over HTTP) or the cluster.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The namespace everything is applied to (`default` on the double).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Kubeconfig for kubectl and the operator.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// Whether this stack runs against a real cluster (`E2E_KUBECONFIG`).
    pub fn is_cluster(&self) -> bool {
        self.local.is_none()
    }

    /// The control-plane double (request log, faults, direct state); `None` on a real cluster.
    pub fn server(&self) -> Option<&ApiServer> {
        self.local.as_ref().map(|l| &l.server)
    }

    /// The double's HTTP endpoint (`url()`, `kubeconfig_path`); `None` on a real cluster.
    pub fn served(&self) -> Option<&ServedApi> {
        self.local.as_ref().map(|l| &l.served)
    }

    /// The pod runner; `None` on a real cluster or with [`Pods::None`].
    pub fn runner(&self) -> Option<&Arc<PodRunner>> {
        self.local.as_ref().and_then(|l| l.runner.as_ref())
    }

    /// The private Redis; `None` on a real cluster.
    pub fn redis(&self) -> Option<&e2e_harness::RedisServer> {
        self.local.as_ref().map(|l| &l.redis)
    }

    /// The broker URL, password included: a secret, never print it.
    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// The broker's password, for asserting that it leaks nowhere (empty when the URL has none).
    pub fn broker_password(&self) -> String {
        url::Url::parse(&self.broker_url).ok().and_then(|u| u.password().map(String::from)).unwrap_or_default()
    }

    /// The Celery result backend (db 1 of the broker's Redis), also a secret.
    pub fn result_backend_url(&self) -> &str {
        &self.result_backend_url
    }

    // ------------------------------------------------------------------ operator

    /// Starts the operator (`run --leader-election false --metrics-addr … --watch-namespaces …`
    /// plus [`StackConfig::operator_args`]) with its output appended to [`Stack::operator_log`], and
    /// waits until its metrics endpoint answers. Call it from async code on the runtime (not from
    /// `spawn_blocking`): the child dies with the thread that started it.
    pub async fn start_operator(&mut self) -> Result<()> {
        if self.operator.is_some() {
            return Err(StackError::Operator("is already running".into()));
        }
        let bin =
            self.config.operator_bin.clone().ok_or_else(|| StackError::Operator("binary not configured".into()))?;
        let log_path = self.operator_log_path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("operator log"))?;
        let err = log.try_clone().map_err(io("operator log"))?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(["run", "--leader-election", "false", "--metrics-addr"])
            .arg(self.metrics_addr.to_string())
            .args(["--watch-namespaces", &self.namespace])
            .args(&self.config.operator_args)
            .env("KUBECONFIG", &self.kubeconfig_path)
            .envs(self.config.operator_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If the test
        // process dies without unwinding, the operator dies with it.
        unsafe {
            cmd.as_std_mut().pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io(format!("start {}", bin.display())))?;
        self.operator = Some(Operator { child });
        let addr = self.metrics_addr;
        let deadline = Instant::now() + DEADLINE;
        loop {
            if http_get(addr, "/healthz").is_ok() {
                return Ok(());
            }
            if let Some(status) = self.operator.as_mut().and_then(|o| o.child.try_wait().ok().flatten()) {
                self.operator = None;
                return Err(StackError::Operator(format!("exited ({status}) at start:\n{}", self.operator_log())));
            }
            if Instant::now() > deadline {
                return Err(StackError::Timeout { what: "the operator's /healthz".into(), after: DEADLINE });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM to the operator, then waits (up to [`DEADLINE`], then SIGKILL) for it to exit.
    pub async fn stop_operator(&mut self) -> Result<ExitStatus> {
        let mut op = self.operator.take().ok_or_else(|| StackError::Operator("is not running".into()))?;
        if let Some(pid) = op.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on the pid of our own unreaped child; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(DEADLINE, op.child.wait()).await {
            Ok(status) => status.map_err(io("wait for the operator")),
            Err(_) => {
                let _ = op.child.kill().await;
                Err(StackError::Timeout { what: "the operator to exit after SIGTERM".into(), after: DEADLINE })
            }
        }
    }

    /// Whether the operator process is running (reaps it if it exited).
    pub fn operator_running(&mut self) -> bool {
        match self.operator.as_mut() {
            Some(op) => op.child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Where the operator's stdout and stderr go (appended across restarts).
    pub fn operator_log_path(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }

    /// Everything the operator printed so far (all runs).
    pub fn operator_log(&self) -> String {
        std::fs::read_to_string(self.operator_log_path()).unwrap_or_default()
    }

    /// `127.0.0.1:PORT` of the operator's `/metrics`, `/healthz`, `/readyz`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let addr = self.metrics_addr;
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await.expect("metrics thread")
    }

    /// The sum of the samples of metric `name` whose labels include every `labels` pair; `None`
    /// when no such sample exists (or the operator does not answer).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics().await.ok()?, name, labels)
    }

    // ------------------------------------------------------------------ applying

    /// The stack's own rewrites, applied to every document before the caller's:
    /// - every `redis://` / `rediss://` value in a Secret's `stringData` becomes the stack's broker
    ///   URL (so the examples' `redis://:change-me@redis:6379/0` points at the test Redis);
    /// - every WorkerPool gets `CELERY_RESULT_BACKEND` from the [`RESULTS_SECRET`] Secret in its
    ///   template env (unless it sets it), so task results can be read back;
    /// - in cluster mode every WorkerPool's image becomes `E2E_WORKER_IMAGE`.
    pub fn rewrite(&self, doc: &mut Value) {
        match doc["kind"].as_str() {
            Some("Secret") => {
                if let Some(data) = doc.get_mut("stringData").and_then(Value::as_object_mut) {
                    for value in data.values_mut() {
                        if value.as_str().is_some_and(|v| v.starts_with("redis://") || v.starts_with("rediss://")) {
                            *value = Value::String(self.broker_url.clone());
                        }
                    }
                }
            }
            Some("WorkerPool") => {
                let spec = &mut doc["spec"];
                if let Some(image) = &self.worker_image {
                    spec["image"] = json!(image);
                }
                if !spec["template"].is_object() {
                    spec["template"] = json!({});
                }
                let template = &mut spec["template"];
                if !template["env"].is_array() {
                    template["env"] = json!([]);
                }
                let env = template["env"].as_array_mut().expect("env is a list");
                if !env.iter().any(|e| e["name"] == "CELERY_RESULT_BACKEND") {
                    env.push(json!({"name": "CELERY_RESULT_BACKEND",
                        "valueFrom": {"secretKeyRef": {"name": RESULTS_SECRET, "key": "url"}}}));
                }
            }
            _ => {}
        }
    }

    /// Applies every document of a multi-document YAML string with server-side apply (field
    /// manager [`FIELD_MANAGER`], force), after [`Stack::rewrite`] and the configured rewrites.
    /// Namespaced objects without a namespace go to [`Stack::namespace`]. Returns the objects as
    /// stored. Stops at the first document the API refuses (its error carries the API's message).
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<Value>> {
        self.apply_yaml_with(yaml, |_| {}).await
    }

    /// [`Stack::apply_yaml`] with one more rewrite for this call only (applied last).
    pub async fn apply_yaml_with(&self, yaml: &str, f: impl Fn(&mut Value)) -> Result<Vec<Value>> {
        let mut docs = parse_yaml(yaml)?;
        for doc in &mut docs {
            self.rewrite(doc);
            for r in &self.config.rewrites {
                r(doc);
            }
        }
        self.apply_docs(docs, &f).await
    }

    /// [`Stack::apply_yaml`] of a file.
    pub async fn apply_file(&self, path: impl AsRef<Path>) -> Result<Vec<Value>> {
        self.apply_file_with(path, |_| {}).await
    }

    /// [`Stack::apply_yaml_with`] of a file.
    pub async fn apply_file_with(&self, path: impl AsRef<Path>, f: impl Fn(&mut Value)) -> Result<Vec<Value>> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(io(format!("read {}", path.display())))?;
        self.apply_yaml_with(&text, f).await
    }

    async fn apply_docs(&self, docs: Vec<Value>, f: &dyn Fn(&mut Value)) -> Result<Vec<Value>> {
        let mut applied = Vec::with_capacity(docs.len());
        for mut doc in docs {
            f(&mut doc);
            let (resource, namespaced) = self.resource_of(&doc).await?;
            let name = doc["metadata"]["name"]
                .as_str()
                .ok_or_else(|| StackError::Invalid(format!("a {} without metadata.name", resource.kind)))?
                .to_string();
            let api: Api<DynamicObject> = if namespaced {
                let ns = doc["metadata"]["namespace"].as_str().unwrap_or(&self.namespace).to_string();
                doc["metadata"]["namespace"] = json!(ns);
                Api::namespaced_with(self.client.clone(), &ns, &resource)
            } else {
                Api::all_with(self.client.clone(), &resource)
            };
            let stored = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&doc)).await?;
            applied.push(serde_json::to_value(stored).map_err(|e| StackError::Invalid(e.to_string()))?);
        }
        Ok(applied)
    }

    /// The API resource of a document's apiVersion/kind, by discovery (cached), and whether it
    /// is namespaced.
    pub async fn resource_of(&self, doc: &Value) -> Result<(ApiResource, bool)> {
        let (Some(api_version), Some(kind)) = (doc["apiVersion"].as_str(), doc["kind"].as_str()) else {
            return Err(StackError::Invalid("a document without apiVersion or kind".into()));
        };
        let key = format!("{api_version}/{kind}");
        if let Some(found) = self.resources.lock().expect("resources lock").get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk).await?;
        let found = (resource, caps.scope == Scope::Namespaced);
        self.resources.lock().expect("resources lock").insert(key, found.clone());
        Ok(found)
    }

    /// Pods in the stack's namespace matching a label selector.
    pub async fn pods(&self, selector: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(pods.list(&ListParams::default().labels(selector)).await?.items)
    }

    // ------------------------------------------------------------------ Celery

    /// Environment for a Celery client of the stack: broker, result backend, and the example app
    /// importable.
    pub fn celery_env(&self) -> Vec<(String, String)> {
        vec![
            ("CELERY_BROKER_URL".into(), self.broker_url.clone()),
            ("CELERY_RESULT_BACKEND".into(), self.result_backend_url.clone()),
            ("PYTHONPATH".into(), workspace_root().join("worker-image/src").display().to_string()),
        ]
    }

    /// Runs a Python snippet in the harness venv with [`Stack::celery_env`] (plus `env`) and
    /// returns its stdout.
    pub async fn python(&self, code: &str, env: &[(&str, &str)]) -> Result<String> {
        let mut all = self.celery_env();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let code = code.to_string();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            e2e_harness::python::run_script(&code, &env)
        })
        .await
        .expect("python thread")
        .map_err(Into::into)
    }

    /// Sends real Celery tasks of the example app — `(task name, args, queue)` — and returns their
    /// ids in order.
    pub async fn send_tasks(&self, tasks: &[(&str, Value, &str)]) -> Result<Vec<String>> {
        let tasks: Vec<Value> = tasks.iter().map(|(name, args, queue)| json!([name, args, queue])).collect();
        let out = self.python(SEND_TASKS, &[("E2E_TASKS", &Value::Array(tasks).to_string())]).await?;
        serde_json::from_str(out.trim()).map_err(|e| StackError::Invalid(format!("send_tasks output {out:?}: {e}")))
    }

    /// Waits (polling the result backend, up to `timeout`) until every task finished, and returns
    /// them in order. Fails on timeout, listing the states.
    pub async fn wait_results(&self, ids: &[String], timeout: Duration) -> Result<Vec<TaskResult>> {
        let out = self
            .python(
                WAIT_RESULTS,
                &[("E2E_TASK_IDS", &json!(ids).to_string()), ("E2E_TIMEOUT", &timeout.as_secs_f64().to_string())],
            )
            .await?;
        let results: Vec<TaskResult> = serde_json::from_str(out.trim())
            .map_err(|e| StackError::Invalid(format!("wait_results output {out:?}: {e}")))?;
        if results.iter().all(TaskResult::finished) {
            Ok(results)
        } else {
            let states: Vec<&str> = results.iter().map(|r| r.state.as_str()).collect();
            Err(StackError::Timeout { what: format!("task results (states {states:?})"), after: timeout })
        }
    }

    // ------------------------------------------------------------------ observing

    /// Samples, until [`Sampler::finish`], how many beat SCHEDULERS of `pool` run. With the pod
    /// runner: processes of the pool's beat pods (argv has `beat` and a path under the pods'
    /// directory) that hold the beat schedule file (`celerybeat-schedule*` in that pod's
    /// directory) open, from `/proc` every 5 ms. A beat runs its scheduler exactly while it holds
    /// the schedule open (the worker image's entrypoint keeps it open from `beat_init` until the
    /// scheduler has stopped, whatever dbm backend the shelve uses); a beat entrypoint waiting for
    /// the beat lock has none open and is not counted. On a real cluster: Ready beat pods (beat is
    /// ready from `beat_init` on), listed every 50 ms. [`Stack::sample_beat_processes`] counts
    /// every beat process instead.
    pub fn sample_beat(&self, pool: &str) -> Sampler {
        match self.runner() {
            Some(runner) => {
                let pods_dir = format!("{}/{}/{pool}-beat-", runner.pods_dir().display(), self.namespace);
                Sampler::processes_where(Duration::from_millis(5), move |pid, argv| {
                    is_beat_argv(argv, &pods_dir)
                        && open_files(pid).iter().any(|f| {
                            f.to_str().is_some_and(|p| p.starts_with(&pods_dir))
                                && f.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with("celerybeat-schedule"))
                        })
                })
            }
            None => Sampler::ready_pods(Api::namespaced(self.client.clone(), &self.namespace), beat_selector(pool)),
        }
    }

    /// Samples every beat PROCESS of `pool`, scheduling or waiting for the beat lock: with the pod
    /// runner, processes whose argv has `beat` and a path under the pool's beat pods' directory
    /// (every 25 ms); on a real cluster, beat pods with a running container (every 50 ms).
    pub fn sample_beat_processes(&self, pool: &str) -> Sampler {
        match self.runner() {
            Some(runner) => {
                let pods_dir = format!("{}/{}/{pool}-beat-", runner.pods_dir().display(), self.namespace);
                // Coarser than the schedulers' sampler: two /proc scans every 5 ms cost a 2-core
                // machine running scenarios in parallel more than this context is worth.
                Sampler::processes(Duration::from_millis(25), move |argv| is_beat_argv(argv, &pods_dir))
            }
            None => Sampler::pods(Api::namespaced(self.client.clone(), &self.namespace), beat_selector(pool)),
        }
    }

    /// Deletes the stack in order: operator (SIGTERM), runner (SIGTERM to pods, SIGKILL after
    /// `grace`), then everything else as on drop.
    pub async fn shutdown(mut self, grace: Duration) {
        if self.operator.is_some() {
            let _ = self.stop_operator().await;
        }
        if let Some(runner) = self.local.as_mut().and_then(|l| l.runner.take())
            && let Ok(runner) = Arc::try_unwrap(runner)
        {
            runner.shutdown(grace).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.operator_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- operator log, last {} lines ({}) ---", tail.len(), self.operator_log_path().display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        // The operator first, so that it does not react to the rest going away.
        if let Some(mut op) = self.operator.take() {
            let _ = op.child.start_kill();
        }
        if self.owned_namespace {
            let kubeconfig = self.kubeconfig_path.clone();
            let namespace = self.namespace.clone();
            // Drop cannot await; a thread with its own runtime deletes the namespace.
            let deleted = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                rt.block_on(async {
                    let client = client_from(&kubeconfig).await.ok()?;
                    Api::<Namespace>::all(client).delete(&namespace, &Default::default()).await.ok()
                })
            })
            .join();
            if !matches!(deleted, Ok(Some(_))) {
                eprintln!("WARNING: could not delete e2e namespace {}", self.namespace);
            }
        }
    }
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| StackError::Invalid(format!("reading {}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .map_err(|e| StackError::Invalid(format!("kubeconfig {}: {e}", kubeconfig.display())))?;
    Ok(kube::Client::try_from(config)?)
}

/// `url` with its path set to `/<db>` (Redis database number).
fn with_db(url: &str, db: usize) -> Result<String> {
    let mut parsed = url::Url::parse(url).map_err(|_| StackError::Invalid("the broker URL does not parse".into()))?;
    parsed.set_path(&format!("/{db}"));
    Ok(parsed.to_string())
}

fn parse_yaml(yaml: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| StackError::Invalid(format!("invalid YAML: {e}")))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// A blocking `GET` over HTTP/1.1 (no client dependency for one endpoint); the body on 2xx.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io("connect to the operator"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("set read timeout"))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(io("send request"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io("read response"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let ok = head.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    if ok { Ok(body.to_string()) } else { Err(StackError::Operator(format!("answered GET {path}: {head}"))) }
}

/// Sum of the samples of `name` (exact metric name) whose label set includes every pair.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric != name || !labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\""))) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

const SEND_TASKS: &str = r#"
import json, os
from celery_example.app import app
ids = []
for name, args, queue in json.loads(os.environ["E2E_TASKS"]):
    ids.append(app.send_task(name, args=args, queue=queue).id)
print(json.dumps(ids))
"#;

const WAIT_RESULTS: &str = r#"
import json, os, time
from celery.result import AsyncResult
from celery_example.app import app
results = [AsyncResult(i, app=app) for i in json.loads(os.environ["E2E_TASK_IDS"])]
deadline = time.monotonic() + float(os.environ["E2E_TIMEOUT"])
while not all(r.ready() for r in results) and time.monotonic() < deadline:
    time.sleep(0.1)
out = []
for r in results:
    value = r.result if r.ready() else None
    if isinstance(value, BaseException):
        value = repr(value)
    out.append({"id": r.id, "state": r.state, "result": value})
print(json.dumps(out))
"#;

/// A Celery task's outcome as the result backend holds it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct TaskResult {
    pub id: String,
    /// `SUCCESS`, `FAILURE`, `PENDING`, `STARTED`, ...
    pub state: String,
    /// The return value (or the exception's repr on failure).
    pub result: Value,
}

impl TaskResult {
    fn finished(&self) -> bool {
        matches!(self.state.as_str(), "SUCCESS" | "FAILURE" | "REVOKED")
    }

    /// The worker hostname the example app's `sleep`/`hold`/`tick` tasks report.
    pub fn hostname(&self) -> Option<&str> {
        self.result["hostname"].as_str()
    }

    /// The process id the example app's `sleep`/`hold`/`tick` tasks report.
    pub fn pid(&self) -> Option<u32> {
        self.result["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleReport {
    /// Samples taken.
    pub samples: u64,
    /// The most instances alive in one sample.
    pub max_simultaneous: usize,
    /// Instances alive in the last sample.
    pub last: usize,
    /// Every distinct instance seen (pids, or pod names on a cluster).
    pub distinct: BTreeSet<String>,
    /// Each change of the alive set: (time since start, instances alive).
    pub changes: Vec<(Duration, Vec<String>)>,
    /// The longest time between two samples (what a shorter-lived instance could slip through).
    pub max_gap: Duration,
    last_at: Duration,
}

impl SampleReport {
    /// The most instances alive at once from `since` (a [`Sampler::elapsed`] mark) on, counting
    /// the set that was alive at that moment.
    pub fn max_simultaneous_since(&self, since: Duration) -> usize {
        let first = self.changes.iter().rposition(|(at, _)| *at <= since).unwrap_or(0);
        self.changes[first..].iter().map(|(_, alive)| alive.len()).max().unwrap_or(0)
    }

    fn record(&mut self, start: Instant, alive: Vec<String>) {
        let now = start.elapsed();
        if self.samples > 0 {
            self.max_gap = self.max_gap.max(now - self.last_at);
        }
        self.last_at = now;
        self.samples += 1;
        self.max_simultaneous = self.max_simultaneous.max(alive.len());
        self.last = alive.len();
        if self.changes.last().is_none_or(|(_, prev)| *prev != alive) {
            self.distinct.extend(alive.iter().cloned());
            self.changes.push((now, alive));
        }
    }
}

/// Samples a set of live instances in the background until [`Sampler::finish`].
pub struct Sampler {
    started: Instant,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<SampleReport>>,
    task: Option<SamplerTask>,
}

enum SamplerTask {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("report", &self.report()).finish_non_exhaustive()
    }
}

impl Sampler {
    /// Scans `/proc` every `every` for processes (not zombies) whose argv satisfies `matches`.
    pub fn processes(every: Duration, matches: impl Fn(&[String]) -> bool + Send + 'static) -> Sampler {
        Sampler::processes_where(every, move |_, argv| matches(argv))
    }

    /// Scans `/proc` every `every` for processes (not zombies) for which `matches(pid, argv)`
    /// holds (e.g. with [`open_files`]).
    pub fn processes_where(every: Duration, matches: impl Fn(u32, &[String]) -> bool + Send + 'static) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SampleReport::default()));
        let (stop2, report2) = (stop.clone(), report.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let start = started;
            while !stop2.load(Ordering::Relaxed) {
                let alive = matching_processes_where(&matches).into_iter().map(|p| p.to_string()).collect();
                report2.lock().expect("report lock").record(start, alive);
                std::thread::sleep(every);
            }
        });
        Sampler { started, stop, report, task: Some(SamplerTask::Thread(thread)) }
    }

    /// Lists pods matching `selector` every 50 ms and counts those with a running container.
    pub fn pods(api: Api<Pod>, selector: String) -> Sampler {
        Sampler::pods_where(api, selector, |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        })
    }

    /// Lists pods matching `selector` every 50 ms and counts those with condition `Ready=True`.
    pub fn ready_pods(api: Api<Pod>, selector: String) -> Sampler {
        Sampler::pods_where(api, selector, |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    }

    fn pods_where(api: Api<Pod>, selector: String, counts: fn(&Pod) -> bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SampleReport::default()));
        let (stop2, report2) = (stop.clone(), report.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let start = started;
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(list) = api.list(&ListParams::default().labels(&selector)).await {
                    let alive =
                        list.items.iter().filter(|p| counts(p)).filter_map(|p| p.metadata.name.clone()).collect();
                    report2.lock().expect("report lock").record(start, alive);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler { started, stop, report, task: Some(SamplerTask::Task(task)) }
    }

    /// Time since sampling started: a mark for [`SampleReport::max_simultaneous_since`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What was seen so far.
    pub fn report(&self) -> SampleReport {
        self.report.lock().expect("report lock").clone()
    }

    /// Stops sampling and returns everything seen.
    pub async fn finish(mut self) -> SampleReport {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.take() {
            Some(SamplerTask::Thread(t)) => {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            Some(SamplerTask::Task(t)) => {
                let _ = t.await;
            }
            None => {}
        }
        self.report.lock().expect("report lock").clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Pids of live (non-zombie) processes whose argv satisfies `matches`.
pub fn matching_processes(matches: &dyn Fn(&[String]) -> bool) -> Vec<u32> {
    matching_processes_where(&|_, argv| matches(argv))
}

/// Pids of live (non-zombie) processes for which `matches(pid, argv)` holds.
pub fn matching_processes_where(matches: &dyn Fn(u32, &[String]) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let argv: Vec<String> =
                raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
            !argv.is_empty() && matches(*pid, &argv) && !is_zombie(*pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The files a live process has open (the targets of `/proc/<pid>/fd/*`; sockets and pipes show
/// as `socket:[..]`/`pipe:[..]`); empty when it is gone or not ours to inspect.
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    entries.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).collect()
}

/// A beat container's argv in the runner: `beat` and a path under `pods_dir` (the schedule).
fn is_beat_argv(argv: &[String], pods_dir: &str) -> bool {
    argv.iter().any(|a| a == "beat") && argv.iter().any(|a| a.starts_with(pods_dir))
}

fn beat_selector(pool: &str) -> String {
    format!("app.kubernetes.io/instance={pool},app.kubernetes.io/component=beat,app.kubernetes.io/name=celery")
}

/// Whether a process is gone or a zombie.
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// Whether a process is alive (exists and is not a zombie).
pub fn is_alive(pid: u32) -> bool {
    !is_zombie(pid)
}

/// The process group of a live process.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command: state ppid pgrp ...
    stat.rsplit_once(") ")?.1.split_whitespace().nth(2)?.parse().ok()
}

/// Live processes in any of the given process groups.
pub fn processes_in_groups(groups: &[u32]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_group(*pid).is_some_and(|g| groups.contains(&g)) && is_alive(*pid))
        .collect()
}

/// The environment of a live process (`/proc/<pid>/environ`).
pub fn process_env(pid: u32) -> HashMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_sum_matching_series() {
        let text = "# HELP x\ncelery_operator_reconcile_total{kind=\"WorkerPool\"} 3\n\
                    celery_operator_reconcile_total{kind=\"TaskQueue\"} 2\nother 1\n";
        assert_eq!(metric_value(text, "celery_operator_reconcile_total", &[("kind", "WorkerPool")]), Some(3.0));
        assert_eq!(metric_value(text, "celery_operator_reconcile_total", &[]), Some(5.0));
        assert_eq!(metric_value(text, "celery_operator_reconcile", &[]), None);
    }

    #[test]
    fn result_backend_is_db_1_of_the_broker() {
        assert_eq!(with_db("redis://:pw@127.0.0.1:7000/0", 1).unwrap(), "redis://:pw@127.0.0.1:7000/1");
    }

    #[test]
    fn process_helpers_see_this_process() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(process_group(me).is_some());
        assert!(process_env(me).contains_key("PATH") || std::env::var_os("PATH").is_none());
    }

    #[test]
    fn open_files_show_a_file_this_process_holds_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("celerybeat-schedule.dat");
        let me = std::process::id();
        let holds = || open_files(me).iter().any(|f| f == &path);
        std::fs::write(&path, b"").unwrap();
        assert!(!holds());
        let file = std::fs::File::open(&path).unwrap();
        assert!(holds());
        drop(file);
        assert!(!holds());
        let pods_dir = dir.path().to_str().unwrap();
        assert!(is_beat_argv(&["python".into(), "beat".into(), format!("{pods_dir}/s")], pods_dir));
        assert!(!is_beat_argv(&["python".into(), "worker".into(), format!("{pods_dir}/s")], pods_dir));
    }
}
