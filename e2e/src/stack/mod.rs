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

mod apply;
mod celery;
mod lifecycle;
mod operator;
mod sampler;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::discovery::ApiResource;
use serde_json::Value;

pub use celery::TaskResult;
pub use lifecycle::{CLUSTER_REDIS_DATABASES, Pods, StackConfig};
pub use operator::metric_value;
pub use sampler::{
    SampleReport, Sampler, is_alive, is_zombie, matching_processes, matching_processes_where, open_files, process_env,
    process_group, processes_in_groups,
};

use crate::{ApiServer, PodRunner, ServedApi};

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

/// Double mode: everything local.
struct Local {
    // Field order is drop order: the runner stops its pods before the API goes away.
    runner: Option<Arc<PodRunner>>,
    served: ServedApi,
    server: ApiServer,
    redis: e2e_harness::RedisServer,
}

/// A running e2e stack; see the module docs.
pub struct Stack {
    operator: Option<operator::Operator>,
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

impl Stack {
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
}
