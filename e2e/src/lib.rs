//! End-to-end test support for celery-operator without a cluster.
//!
//! - [`apiserver`]: the control-plane double, a stateful fake Kubernetes API server
//!   ([`ApiServer`]) usable in-process through a `kube::Client` or over HTTP for `kubectl`.
//! - [`runner`]: the pod runner ([`PodRunner`]), Deployment controller and kubelet with real local
//!   processes (Celery workers from the venv).
//! - [`stack`]: everything at once ([`Stack`]): the double served over HTTP, the runner, a private
//!   Redis and the operator binary, or a real cluster with `E2E_KUBECONFIG`.
//! - [`admission`]: CRD schema + CEL admission as a plain function, for CRD tests.
//!
//! See `e2e/README.md` for how the double differs from a real API server.

pub mod admission;
pub mod apiserver;
pub mod demo;
pub mod runner;
pub mod stack;

pub use apiserver::{ApiError, ApiServer, Fault, FaultEffect, Observer, RequestMatch, RequestRecord, ServedApi, Verb};
pub use runner::{PodRunner, RunnerConfig};
pub use stack::{Stack, StackConfig};
