//! The controllers: WorkerPool → Deployments, TaskQueue → broker checks. Each reconcile follows
//! dereference → validate → build (pure) → apply (only what changed) → status (only when changed).

pub mod apply;
pub mod taskqueue;
pub mod workerpool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::{Event, EventType, Recorder, Reporter};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use crate::conditions;
use crate::metrics::Metrics;

/// Shared by every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on the reconciled objects.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// How the watches are doing (for `/readyz`).
    pub watches: crate::cache::WatchHealth,
    /// Referenced Secrets, read once per resourceVersion.
    pub secrets: crate::secrets::SecretCache,
    /// Spec validation (CEL) results, once per generation.
    pub validations: crate::validate::Memo,
    /// One poller per broker endpoint, shared by the TaskQueues and the autoscaler.
    pub brokers: crate::brokers::Brokers,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for one operator instance.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: crate::labels::MANAGER.into(), instance };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            brokers: crate::brokers::Brokers::new(metrics.clone()),
            metrics,
            watches: Default::default(),
            secrets: Default::default(),
            validations: Default::default(),
            failures: Mutex::default(),
        }
    }

    fn backoff(&self, key: String) -> Duration {
        let mut failures = self.failures.lock().expect("failure map lock");
        let n = failures.entry(key).or_default();
        *n = n.saturating_add(1);
        // 1 s, 2 s, 4 s … capped at 5 minutes.
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failure map lock").remove(key);
    }

    /// Publishes an Event for each condition that changed; failures to publish are logged, never fatal.
    pub async fn publish_transitions(
        &self,
        reference: &ObjectReference,
        old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        new: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) {
        for c in conditions::transitions(old, new) {
            // Reconciling=True is progress, not news; Ready is reported through its reason.
            if c.type_ == conditions::kind::RECONCILING {
                continue;
            }
            let type_ = if conditions::is_warning(c) { EventType::Warning } else { EventType::Normal };
            self.publish(reference, type_, &c.reason, &c.message, &c.type_).await;
        }
    }

    /// Publishes one Event.
    pub async fn publish(&self, reference: &ObjectReference, type_: EventType, reason: &str, note: &str, action: &str) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note.into()), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            // An Event that fails (the API server is briefly unavailable, a 429) is retried in the
            // background with backoff, so the reconcile is not held up and the Event is not lost;
            // one that still fails is logged and counted.
            warn!(error = %crate::api::describe(&e), reason, "could not publish event; retrying");
            let (recorder, reference, metrics) = (self.recorder.clone(), reference.clone(), self.metrics.clone());
            let reason = event.reason.clone();
            metrics.event_retrying(true);
            tokio::spawn(async move {
                let mut published = false;
                for delay in EVENT_RETRIES {
                    tokio::time::sleep(delay).await;
                    match recorder.publish(&event, &reference).await {
                        Ok(()) => {
                            published = true;
                            break;
                        }
                        Err(e) => warn!(error = %crate::api::describe(&e), reason, "could not publish event"),
                    }
                }
                if !published {
                    metrics.event_dropped(&reason);
                }
                metrics.event_retrying(false);
            });
        }
    }
}

/// Delays before each retry of an Event that could not be published.
const EVENT_RETRIES: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(4), Duration::from_secs(16)];
impl AsRef<Context> for Context {
    fn as_ref(&self) -> &Context {
        self
    }
}

/// What the WorkerPool reconciler runs with: the shared context and the watch caches of the
/// scope (namespace, or all) the pool is in.
pub struct Scoped {
    /// Shared by every reconcile.
    pub ctx: Arc<Context>,
    /// The scope's watch caches: the reconciler reads them instead of the API.
    pub stores: crate::cache::Stores,
}

impl AsRef<Context> for Scoped {
    fn as_ref(&self) -> &Context {
        &self.ctx
    }
}

/// Transient failures: the reconcile is retried with backoff. Mistakes in the user's spec are not
/// errors: they become conditions and the reconcile waits for a change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request; says which (verb, kind, object, status code).
    #[error("{0}")]
    Api(#[from] crate::api::ApiError),
    /// The API server refused or failed a request the code did not name (prefer [`Error::Api`]).
    #[error("Kubernetes API request failed: {}", crate::api::describe(.0))]
    Kube(#[from] kube::Error),
    /// An object could not be converted (a bug, not a user error).
    #[error("cannot serialize object: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// Label of the `celery_operator_reconcile_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Api(e) if e.code().is_some() => "api",
            Self::Api(_) => "client",
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "client",
            Self::Serialize(_) => "serialize",
        }
    }
}

/// Why an object cannot be reconciled until the user changes something: becomes Ready=False and
/// Stalled=True with this reason and message, and the reconcile waits for a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// CamelCase reason for the Stalled and Ready conditions.
    pub reason: &'static str,
    /// Message naming the field and what is allowed.
    pub message: String,
}

impl Blocked {
    /// Blocked by these field errors.
    pub fn new(reason: &'static str, errors: &[crate::validate::FieldError]) -> Self {
        Self { reason, message: crate::validate::describe(errors) }
    }

    /// The Ready=False and Stalled=True conditions that say so.
    pub fn conditions(&self) -> Vec<conditions::Wanted> {
        use conditions::{Wanted, kind};
        vec![
            Wanted::no(kind::READY, self.reason, self.message.clone()),
            Wanted::yes(kind::STALLED, self.reason, self.message.clone()),
        ]
    }
}

/// Result of a reconcile.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Requeue with exponential backoff per object, and count the error.
pub fn error_policy<K, C>(obj: Arc<K>, error: &Error, ctx: Arc<C>) -> Action
where
    K: Resource<DynamicType = ()>,
    C: AsRef<Context>,
{
    let ctx: &Context = (*ctx).as_ref();
    let key = ObjectRef::from_obj(&*obj).to_string();
    ctx.metrics.reconcile_failure(K::kind(&()).as_ref(), error.metric_label());
    let delay = ctx.backoff(key.clone());
    warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Marks the object as reconciled successfully (resets its backoff).
pub fn reconciled<K: Resource<DynamicType = ()>>(obj: &K, ctx: &Context) {
    ctx.succeeded(&ObjectRef::from_obj(obj).to_string());
}

/// How often a healthy object is reconciled again to repair drift nobody told us about.
pub const RESYNC: Duration = Duration::from_secs(300);

/// `namespace/name` of an object, for logs and messages.
pub fn display_name<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}
