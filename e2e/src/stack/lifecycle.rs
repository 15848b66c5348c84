//! Bringing a stack up (the double, runner and Redis locally, or a real cluster) and tearing it
//! down again, also when a test panics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use serde_json::{Value, json};

use super::apply::parse_yaml;
use super::{DEADLINE, Local, RESULTS_SECRET, Result, Rewrite, Stack, StackError, io, workspace_root};
use crate::{ApiServer, PodRunner, RunnerConfig};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_backend_is_db_1_of_the_broker() {
        assert_eq!(with_db("redis://:pw@127.0.0.1:7000/0", 1).unwrap(), "redis://:pw@127.0.0.1:7000/1");
    }
}
