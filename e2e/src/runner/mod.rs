//! The pod runner: plays the Deployment controller and the kubelet against an [`ApiServer`], with
//! real local processes instead of containers.
//!
//! - For every Deployment it keeps `spec.replicas` Pod objects (named `<deployment>-<hash>-<xxxxx>`,
//!   labelled with `pod-template-hash`, owned by the Deployment), rolls them on template changes
//!   (`Recreate`, or `RollingUpdate` honouring maxSurge/maxUnavailable), removes pods on scale-in in
//!   the ReplicaSet controller's order (pending before running, not-ready before ready, lowest
//!   `controller.kubernetes.io/pod-deletion-cost` first, then newest), and writes Deployment status
//!   (replicas, updatedReplicas, readyReplicas, availableReplicas, observedGeneration, conditions).
//! - For every Pod it runs each container's `command` + `args` (`$(VAR)` expanded) as a process
//!   group with the container's environment (`value`, `valueFrom` secretKeyRef / configMapKeyRef /
//!   fieldRef, `envFrom`), emptyDir/secret/configMap volumes materialised under a per-pod directory
//!   (absolute mount paths in args and env are rewritten to it), exec/tcp readiness and liveness
//!   probes, restarts with `restartPolicy: Always`, and Pod status. Deleting a pod sends SIGTERM to
//!   its process groups, then SIGKILL after `terminationGracePeriodSeconds`, then removes the object.
//!
//! Commands are looked up in [`RunnerConfig::path`] first; [`RunnerConfig::celery`] points it at the
//! Celery venv with the worker image's `celery-entrypoint` and `celery-probe`.

mod process;
mod workload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::apiserver::ApiServer;

pub use process::template_hash;

/// Why the runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the Celery venv is not available: {0}")]
    Venv(String),
}

/// How the runner turns containers into processes.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Directories searched, before the host's PATH, for container commands.
    pub path: Vec<PathBuf>,
    /// Extra environment for every container (before the container's own env).
    pub env: Vec<(String, String)>,
    /// argv used when a container has no `command` (the image's ENTRYPOINT), by image; the
    /// container's `args` follow it.
    pub entrypoints: HashMap<String, Vec<String>>,
    /// Overrides every probe's `periodSeconds` (tests do not want 5–10 s readiness).
    pub probe_period: Option<Duration>,
    /// Delay before a crashed container is restarted (doubling up to 8x, like CrashLoopBackOff).
    pub restart_backoff: Duration,
    /// How often the runner looks at processes and probes when nothing is stored.
    pub tick: Duration,
    /// `spec.nodeName` given to the pods it runs.
    pub node_name: String,
    /// Start no processes: containers are running and ready at once, deleted pods go at once.
    /// A fast stand-in kubelet for reconcile tests that only need Deployments to become ready.
    pub simulate: bool,
    /// Keeps generated command shims alive as long as the config.
    shims: Option<Arc<tempfile::TempDir>>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            path: Vec::new(),
            env: Vec::new(),
            entrypoints: HashMap::new(),
            probe_period: Some(Duration::from_millis(200)),
            restart_backoff: Duration::from_millis(500),
            tick: Duration::from_millis(100),
            node_name: "celery-e2e-node".to_string(),
            simulate: false,
            shims: None,
        }
    }
}

/// Python snippet that runs a console script of the worker image from its sources.
fn shim(venv_python: &Path, module: &str, name: &str) -> String {
    format!(
        "#!/bin/sh\nexec '{}' -c 'import sys; from {module} import main; sys.argv[0] = \"{name}\"; sys.exit(main())' \"$@\"\n",
        venv_python.display()
    )
}

impl RunnerConfig {
    /// No processes: see [`RunnerConfig::simulate`].
    pub fn simulated() -> Self {
        RunnerConfig { simulate: true, ..Default::default() }
    }

    /// Containers run the worker image's `celery-entrypoint` / `celery-probe` and `celery` from the
    /// Celery venv of `e2e_harness` (created on first use), with `worker-image/src` importable (the
    /// `celery_example` app included) and unbuffered Python output.
    pub fn celery() -> Result<Self, RunnerError> {
        let venv = e2e_harness::python::celery_venv().map_err(|e| RunnerError::Venv(e.to_string()))?;
        let bin = venv.join("bin");
        let worker_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker-image/src");
        let mut config = RunnerConfig { path: vec![bin.clone()], ..Default::default() };
        if !bin.join("celery-entrypoint").exists() {
            let dir =
                tempfile::tempdir().map_err(|source| RunnerError::Io { what: "create shim dir".into(), source })?;
            for (name, module) in
                [("celery-entrypoint", "celery_worker_base.entrypoint"), ("celery-probe", "celery_worker_base.probe")]
            {
                let path = dir.path().join(name);
                std::fs::write(&path, shim(&bin.join("python"), module, name))
                    .map_err(|source| RunnerError::Io { what: format!("write {name} shim"), source })?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|source| RunnerError::Io { what: format!("chmod {name} shim"), source })?;
            }
            config.path.insert(0, dir.path().to_path_buf());
            config.shims = Some(Arc::new(dir));
        }
        config.env.push(("PYTHONPATH".into(), worker_src.display().to_string()));
        config.env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        Ok(config)
    }
}

/// A running pod runner. Dropping it kills every process it started (SIGKILL); use
/// [`PodRunner::shutdown`] for a graceful stop.
pub struct PodRunner {
    shared: Arc<workload::Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PodRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRunner").field("dir", &self.shared.dir.path()).finish_non_exhaustive()
    }
}

impl PodRunner {
    /// Start playing Deployment controller and kubelet for `server` (inside a Tokio runtime).
    /// Turns on graceful pod deletion on the server.
    pub fn start(server: &ApiServer, config: RunnerConfig) -> Result<Self, RunnerError> {
        let dir = tempfile::Builder::new()
            .prefix("celery-e2e-pods-")
            .tempdir()
            .map_err(|source| RunnerError::Io { what: "create the pods directory".into(), source })?;
        server.set_graceful_pod_deletion(true);
        let shared = Arc::new(workload::Shared::new(server.clone(), config, dir));
        let weak = Arc::downgrade(&shared);
        server.set_log_source(Some(Arc::new(move |ns: &str, pod: &str, container: Option<&str>| {
            weak.upgrade()?.log(ns, pod, container)
        })));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(workload::run(shared.clone(), server.changes(), stop_rx));
        Ok(PodRunner { shared, stop, task })
    }

    /// Everything a pod's containers wrote to stdout/stderr so far (also after the pod is gone).
    pub fn pod_log(&self, namespace: &str, pod: &str) -> Option<String> {
        self.shared.log(namespace, pod, None)
    }

    /// Process ids of a pod's running containers.
    pub fn pids(&self, namespace: &str, pod: &str) -> Vec<u32> {
        self.shared.pids(namespace, pod)
    }

    /// The directory holding every pod's volumes and logs.
    pub fn pods_dir(&self) -> &Path {
        self.shared.dir.path()
    }

    /// Stop gracefully: SIGTERM every pod's processes, SIGKILL whatever is left after `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        self.shared.terminate_all(grace).await;
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.shared.server().set_log_source(None);
        let _ = self.stop.send(true);
        self.task.abort();
        self.shared.kill_all();
    }
}
