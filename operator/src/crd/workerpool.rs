use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// CEL regex matching an argument that sets a reserved flag (long forms with or without `=value`,
/// short forms with or without a glued value).
const RESERVED_FLAG_REGEX: &str = "^(-[AQXcPn].*|-[BD]|--(app|queues|exclude-queues|concurrency|pool|hostname|beat|detach|purge|discard|prefetch-multiplier|max-tasks-per-child|max-memory-per-child|time-limit|soft-time-limit)(=.*)?)$";

/// A fleet of Celery workers consuming TaskQueues, reconciled into the Deployment `<name>-worker`
/// and, when beat is enabled, the single-replica Deployment `<name>-beat`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "celery-operator.dev",
    version = "v1alpha1",
    kind = "WorkerPool",
    namespaced,
    status = "WorkerPoolStatus",
    shortname = "wp",
    category = "celery",
    derive = "PartialEq",
    doc = "A fleet of Celery workers consuming TaskQueues, with an optional singleton beat.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog"),
    printcolumn(name = "Rule", type_ = "string", json_path = ".status.scalingRule", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolSpec {
    /// The Celery application, as passed to `celery -A`: a module path, optionally with
    /// `:attribute` (e.g. `myproject.celery_app` or `proj.tasks:app`).
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?$"
        )
    )]
    pub app: String,

    /// Container image holding the app, built FROM the celery-operator worker base image (its
    /// `celery-entrypoint` and `celery-probe` commands are used).
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Names of TaskQueues in this namespace whose queues the workers consume (`-Q`). All must use
    /// the same broker.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(q, self.exists_one(x, x == q))").message("queues must not list a TaskQueue twice").reason(Reason::FieldValueDuplicate),
        validation = Rule::new("self.all(q, q.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$') && size(q) <= 253)").message("queues must be TaskQueue names (lowercase DNS subdomains)")
    )]
    pub queues: Vec<String>,

    /// Worker processes/threads per pod (`-c`). Always passed explicitly: Celery's own default is
    /// the node's CPU count, which ignores the pod's CPU limit. Default 1.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: i32,

    /// Execution pool (`-P`): prefork, threads, gevent, eventlet or solo. Default prefork.
    #[serde(default)]
    pub pool: ExecutionPool,

    /// Worker tuning with production-safe defaults.
    #[serde(default)]
    pub worker: WorkerSettings,

    /// Worker replicas when autoscaling is not configured; the scale subresource
    /// (`kubectl scale workerpool`) sets it. Ignored while autoscaling is set. Default 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 10_000))]
    pub replicas: i32,

    /// Scale workers from the broker's queue depth. When absent, spec.replicas is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// The Celery beat scheduler, run as a separate single-replica Deployment (never `-B`).
    #[serde(default)]
    pub beat: BeatSpec,

    /// Pod overrides merged into the generated worker and beat pods.
    #[serde(default)]
    pub template: PodOverrides,

    /// Grace period for warm shutdown. Default: timeLimitSeconds (or softTimeLimitSeconds) plus 30 s,
    /// at least 30 s, so a SIGTERM'd worker can finish the task it is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86_400))]
    pub termination_grace_period_seconds: Option<i64>,
}

fn default_concurrency() -> i32 {
    1
}
fn default_replicas() -> i32 {
    1
}

/// Celery worker execution pool.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionPool {
    /// Processes (the default; what CPU-bound tasks need).
    #[default]
    Prefork,
    /// Threads.
    Threads,
    /// gevent green threads (the image must have gevent).
    Gevent,
    /// eventlet green threads (the image must have eventlet).
    Eventlet,
    /// One task at a time in the main process.
    Solo,
}

impl ExecutionPool {
    /// The `-P` argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Prefork => "prefork",
            Self::Threads => "threads",
            Self::Gevent => "gevent",
            Self::Eventlet => "eventlet",
            Self::Solo => "solo",
        }
    }
}

/// Worker options, each mapped to a `celery worker` flag.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.softTimeLimitSeconds) || !has(self.timeLimitSeconds) || self.softTimeLimitSeconds < self.timeLimitSeconds").message("softTimeLimitSeconds must be less than timeLimitSeconds").reason(Reason::FieldValueInvalid))]
pub struct WorkerSettings {
    /// `--prefetch-multiplier`: messages reserved per process. Default 1, so long tasks do not pin
    /// queued work to one busy worker.
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 1000))]
    pub prefetch_multiplier: i32,

    /// `--max-tasks-per-child`: recycle a pool process after this many tasks (leak containment).
    /// Default 1000.
    #[serde(default = "default_max_tasks_per_child")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_tasks_per_child: i32,

    /// `--max-memory-per-child` in KiB: recycle a pool process above this resident memory.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "maxMemoryPerChildKiB")]
    #[schemars(range(min = 1))]
    pub max_memory_per_child_kib: Option<i64>,

    /// `--soft-time-limit` in seconds: raises SoftTimeLimitExceeded inside the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub soft_time_limit_seconds: Option<i64>,

    /// `--time-limit` in seconds: the pool process running the task is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub time_limit_seconds: Option<i64>,

    /// Further `celery worker` arguments, appended as given. Flags the operator sets itself are
    /// refused: -A/--app, -Q/--queues, -X/--exclude-queues, -c/--concurrency, -P/--pool,
    /// -n/--hostname, -B/--beat, -D/--detach, --purge/--discard, --prefetch-multiplier,
    /// --max-tasks-per-child, --max-memory-per-child, --time-limit, --soft-time-limit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(
        merge_strategy = ListMerge::Atomic,
        validation = Rule::new(format!("self.all(a, !a.matches('{RESERVED_FLAG_REGEX}'))")).message("extraArgs may not set -A/--app, -Q/--queues, -X/--exclude-queues, -c/--concurrency, -P/--pool, -n/--hostname, -B/--beat, -D/--detach, --purge/--discard, --prefetch-multiplier, --max-tasks-per-child, --max-memory-per-child, --time-limit or --soft-time-limit: the operator sets them from the spec (beat runs as its own Deployment)").reason(Reason::FieldValueForbidden)
    )]
    pub extra_args: Vec<String>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            prefetch_multiplier: default_prefetch(),
            max_tasks_per_child: default_max_tasks_per_child(),
            max_memory_per_child_kib: None,
            soft_time_limit_seconds: None,
            time_limit_seconds: None,
            extra_args: Vec::new(),
        }
    }
}

fn default_prefetch() -> i32 {
    1
}
fn default_max_tasks_per_child() -> i32 {
    1000
}

/// Queue-depth autoscaling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be less than or equal to maxReplicas").reason(Reason::FieldValueInvalid),
    validation = Rule::new("!has(self.fallbackReplicas) || (self.fallbackReplicas >= self.minReplicas && self.fallbackReplicas <= self.maxReplicas)").message("fallbackReplicas must lie between minReplicas and maxReplicas").reason(Reason::FieldValueInvalid),
    validation = Rule::new("!has(self.targetLatencySeconds) || !has(self.pollIntervalSeconds) || self.targetLatencySeconds >= self.pollIntervalSeconds").message("targetLatencySeconds must be at least pollIntervalSeconds: the age of the oldest task is known to within one poll").reason(Reason::FieldValueInvalid)
)]
pub struct AutoscalingSpec {
    /// Fewest worker replicas. 0 lets an idle pool scale to zero. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10_000))]
    pub min_replicas: i32,

    /// Most worker replicas.
    #[schemars(range(min = 1, max = 10_000))]
    pub max_replicas: i32,

    /// Due tasks one replica is sized for: tasks waiting, reserved or running, plus scheduled tasks
    /// (ETA, countdown, retries with a countdown) coming due within leadTimeSeconds. Scheduled tasks
    /// further ahead do not count: a worker holds them until due. Default: spec.concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub target_per_replica: Option<i32>,

    /// The longest the oldest waiting task should wait, in seconds. When it has waited longer, the
    /// pool is sized to work off the due tasks within this time at the rate one replica was
    /// measured to complete them (from worker heartbeats), if that asks for more replicas than
    /// targetPerReplica does. The age is measured by the operator (no app change needed) to within
    /// one poll. Unset: size by queue depth alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub target_latency_seconds: Option<i32>,

    /// How many seconds ahead scheduled tasks count as demand, so replicas are running when they come
    /// due. Default: the time this pool's pods were seen to take from creation to Ready (30 s until
    /// one was seen). 0 counts scheduled tasks only once they are due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86_400))]
    pub lead_time_seconds: Option<i32>,

    /// Scale up from zero only when the due waiting tasks (including scheduled tasks coming due within
    /// leadTimeSeconds) exceed this. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_threshold: i64,

    /// Seconds between broker probes. Default 1.
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub poll_interval_seconds: i32,

    /// Scale down only after the desired count stayed lower for this long; the highest desired
    /// count seen in the window is used. Default 60.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,

    /// Whether the app acknowledges tasks late (Celery's `task_acks_late`). Late-acked tasks stay
    /// unacknowledged in the broker while they run, so the broker already counts them as in flight.
    /// Otherwise running tasks are invisible in the broker and the autoscaler counts them from the
    /// workers' heartbeat events. Default false (Celery's default).
    #[serde(default)]
    pub acks_late: bool,

    /// Replicas to run after repeated broker probe failures. When absent, the current count is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10_000))]
    pub fallback_replicas: Option<i32>,
}

fn default_poll_interval() -> i32 {
    1
}
fn default_stabilization() -> i32 {
    60
}

/// Celery beat, the periodic task scheduler: at most one per app in a namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BeatSpec {
    /// Run `celery beat` as the Deployment `<pool>-beat`: one replica, Recreate strategy, so two
    /// beats never run at once, not even during a rollout. Default false.
    #[serde(default)]
    pub enabled: bool,

    /// Scheduler class (`beat -S`), e.g. `django_celery_beat.schedulers:DatabaseScheduler`, or
    /// `celery.beat:PersistentScheduler` for Celery's file scheduler. Default (with neither this
    /// nor scheduleClaimName): on a Redis broker the worker image's entrypoint runs RedBeat with
    /// the schedule in the broker's Redis under `celery-operator:redbeat:<namespace>:<pool>:`
    /// (after the broker's global_keyprefix), RedBeat's own lock off behind the beat lock, so
    /// beat remembers when each entry last ran across rollouts and restarts; unless the app
    /// configures its own beat_scheduler. On a RabbitMQ or Sentinel broker, or in an image
    /// without celery-redbeat: Celery's file scheduler on an emptyDir, which every new beat pod
    /// starts from nothing (see scheduleClaimName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_.:]*$"))]
    pub scheduler: Option<String>,

    /// Name of a PersistentVolumeClaim in the pool's namespace that holds beat's schedule file, so
    /// Celery's file scheduler remembers when each entry last ran across rollouts, restarts and
    /// rescheduling: an entry that fell due while no beat ran (a Recreate rollout, a node drain) is
    /// sent once when the next beat pod starts, and nothing is sent twice. ReadWriteOnce is enough
    /// (one beat pod, Recreate) and a few MiB hold thousands of entries; the beat pod gets
    /// fsGroup 10001 (the worker image's group) unless template.securityContext is set. Set, it
    /// keeps Celery's file scheduler (no RedBeat default). Unset: the schedule is kept in the
    /// broker's Redis by RedBeat (see scheduler), or, on a RabbitMQ broker, in a file on an
    /// emptyDir that every new beat pod starts from nothing. Not needed with a scheduler that
    /// keeps its own state (RedBeat, django-celery-beat in a database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub schedule_claim_name: Option<String>,
}

/// Pod settings merged into the generated worker and beat pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra pod labels (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Container resources. Set a CPU request matching spec.concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra container environment variables (the operator's own variables win on conflict).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub env: Vec<EnvVar>,
    /// Extra container environment sources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub env_from: Vec<EnvFromSource>,
    /// Extra pod volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub volumes: Vec<Volume>,
    /// Extra container volume mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub volume_mounts: Vec<VolumeMount>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub tolerations: Vec<Toleration>,
    /// Affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Service account the pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Image pull policy: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: Option<String>,
    /// Pod security context; replaces the restricted default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Container security context; replaces the restricted default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    /// Priority class of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// Observed state of a WorkerPool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods (from the worker Deployment).
    #[serde(default)]
    pub replicas: i32,
    /// Ready worker pods.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas the operator wants (spec.replicas, or the autoscaler's decision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Label selector of the worker pods (for the scale subresource and HPAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Messages waiting in the pool's queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Messages being worked on (unacknowledged, plus active tasks from heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// Which autoscaling rule set the last desired count: Depth (due tasks over
    /// targetPerReplica), Latency (targetLatencySeconds) or Scheduled (nothing due; one replica
    /// holds the scheduled tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_rule: Option<String>,
    /// Due work the autoscaler sized for: waiting and in-flight tasks that are due, plus
    /// scheduled ones coming due within the lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<i64>,
    /// Tasks scheduled for later (ETA in the future) in the pool's queues, where the broker can
    /// tell; not demand until they come due within the lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<i64>,
    /// When the autoscaler last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the autoscaler last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// Ready, Reconciling, Stalled, BeatSingleton, ScalingActive, ScalingLimited, BrokerSafe.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl WorkerPool {
    /// Name of the worker Deployment.
    pub fn worker_deployment_name(&self) -> String {
        format!("{}-worker", self.metadata.name.as_deref().unwrap_or_default())
    }

    /// Name of the beat Deployment.
    pub fn beat_deployment_name(&self) -> String {
        format!("{}-beat", self.metadata.name.as_deref().unwrap_or_default())
    }
}
