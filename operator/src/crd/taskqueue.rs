use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A Celery queue on one broker. The operator probes the broker for this queue's depth and checks
/// that the broker cannot silently drop its tasks; WorkerPools list TaskQueues by name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "celery-operator.dev",
    version = "v1alpha1",
    kind = "TaskQueue",
    namespaced,
    status = "TaskQueueStatus",
    shortname = "tq",
    category = "celery",
    derive = "PartialEq",
    doc = "A Celery queue on one broker, probed for depth and broker safety.",
    printcolumn(name = "Queue", type_ = "string", json_path = ".spec.queueName", priority = "1"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(name = "Unacked", type_ = "integer", json_path = ".status.unacked"),
    printcolumn(name = "Latency", type_ = "integer", json_path = ".status.latencySeconds"),
    printcolumn(name = "Scheduled", type_ = "integer", json_path = ".status.scheduled", priority = "1"),
    printcolumn(
        name = "Broker-Safe",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"BrokerSafe\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TaskQueueSpec {
    /// Name of the Celery queue (what `celery worker -Q` and task routing use). Defaults to
    /// metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9_.:@-]+$"))]
    pub queue_name: Option<String>,

    /// The broker that holds this queue.
    pub broker: BrokerSpec,
}

/// Where the queue lives and how Celery lays it out there.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlFrom)").message("exactly one of url or urlFrom must be set").reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.url) || !self.url.startsWith('sentinel://') || has(self.transportOptions.masterName)").message("a sentinel:// url needs transportOptions.masterName (Celery's master_name transport option)").reason(Reason::FieldValueRequired))]
pub struct BrokerSpec {
    /// Broker URL without credentials, e.g. `redis://redis:6379/0`, `amqp://rabbitmq:5672/vhost` or
    /// Celery's Sentinel form `sentinel://s1:26379;sentinel://s2:26379/0` (with
    /// transportOptions.masterName). Schemes: redis, rediss, sentinel, amqp, amqps. A URL carrying a
    /// user or password is refused: put it in a Secret and use urlFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^(redis|rediss|sentinel|amqp|amqps)://"))]
    #[x_kube(validation = Rule::new("!self.matches('://[^/?#;]*@')").message("url must not contain a user or password: store the URL in a Secret and reference it with urlFrom.secretKeyRef").reason(Reason::FieldValueForbidden))]
    pub url: Option<String>,

    /// Broker URL read from a Secret key (the only way to pass credentials). The operator never logs
    /// it, and worker pods receive it as the CELERY_BROKER_URL environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<ValueFrom>,

    /// Mirror of Celery's `broker_transport_options` for the Redis transport: must match what the
    /// Celery app uses, or the operator reads the wrong keys.
    #[serde(default)]
    pub transport_options: TransportOptions,

    /// RabbitMQ management API URL (http or https, credentials included) read from a Secret. Adds
    /// unacknowledged counts and queue policy checks to what AMQP alone can see; without it the
    /// policies that silently drop tasks cannot be checked (BrokerSafe reports that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_url_from: Option<ValueFrom>,

    /// TLS settings for rediss://, amqps:// and an https:// management API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BrokerTls>,

    /// What to do when the broker can silently drop tasks (a Redis eviction policy that can evict
    /// queue keys, a RabbitMQ queue that drops messages without a dead-letter exchange):
    /// Warn (condition, Warning Event and metric), Fix (also switch Redis to noeviction where
    /// allowed), Off.
    #[serde(default)]
    pub safety_check: SafetyCheck,
}

/// How to trust the broker's TLS certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct BrokerTls {
    /// PEM CA certificate(s) to trust instead of the system roots, read from a Secret key (e.g. the
    /// `ca.crt` of a cert-manager Certificate). For Redis, `?ssl_ca_certs=` in the URL names a file
    /// inside the operator's pod instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_from: Option<ValueFrom>,
}

/// A reference to a value held in a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ValueFrom {
    /// The Secret (in the TaskQueue's namespace) and the key within it.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Celery's Redis transport options that change where kombu puts messages.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransportOptions {
    /// kombu `global_keyprefix`: prefix of every key kombu writes. Default empty.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub global_key_prefix: String,

    /// kombu `priority_steps`: one Redis list per step. Default [0, 3, 6, 9].
    #[serde(default = "default_priority_steps")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(merge_strategy = ListMerge::Atomic, validation = Rule::new("self.all(p, p >= 0 && p <= 255)").message("prioritySteps must be integers from 0 to 255"), validation = Rule::new("self.all(p, self.exists_one(q, q == p))").message("prioritySteps must not repeat a value"))]
    pub priority_steps: Vec<i32>,

    /// kombu `sep`: separator between the queue name and the priority. Default "\u0006\u0016".
    #[serde(default = "default_separator")]
    #[schemars(length(min = 1, max = 16))]
    pub separator: String,

    /// kombu `visibility_timeout`: unacknowledged messages older than this are redelivered by a live
    /// consumer; the probe reports them as orphaned. Default 3600.
    #[serde(default = "default_visibility_timeout")]
    #[schemars(range(min = 1, max = 2_592_000))]
    pub visibility_timeout_seconds: i64,

    /// kombu `master_name`: the Redis Sentinel master to ask the Sentinels for; required with
    /// sentinel:// URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub master_name: Option<String>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            global_key_prefix: String::new(),
            priority_steps: default_priority_steps(),
            separator: default_separator(),
            visibility_timeout_seconds: default_visibility_timeout(),
            master_name: None,
        }
    }
}

fn default_priority_steps() -> Vec<i32> {
    vec![0, 3, 6, 9]
}
fn default_separator() -> String {
    "\u{6}\u{16}".to_string()
}
fn default_visibility_timeout() -> i64 {
    3600
}

/// Response to a broker configuration that can silently lose tasks.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SafetyCheck {
    /// Report: condition BrokerSafe=False, a Warning Event and the broker_safe metric.
    #[default]
    Warn,
    /// Report, and set Redis maxmemory-policy to noeviction where the broker allows it.
    Fix,
    /// Do not check.
    Off,
}

/// Observed state of a TaskQueue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskQueueStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Messages waiting in the queue, all priorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<i64>,
    /// Messages delivered to workers but not yet acknowledged (prefetched, or running with acks_late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacked: Option<i64>,
    /// Consumers attached to the queue (RabbitMQ only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<i64>,
    /// Of ready, tasks due now: no ETA, or an ETA that has passed (Redis only; on RabbitMQ a
    /// waiting message's ETA cannot be read without consuming it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<i64>,
    /// Tasks scheduled for later (countdown, eta, retries with a countdown): on the queue, held by
    /// workers until due, or in RabbitMQ's delayed-delivery queues when this queue is their only
    /// target. Absent where the broker cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<i64>,
    /// How long the oldest waiting due task has waited, in seconds (0 when none waits); known to
    /// within one probe interval. Absent where the broker cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_seconds: Option<i64>,
    /// When the broker was last probed successfully with a change worth recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
    /// What the operator knows about the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerSummary>,
    /// Ready, BrokerReachable and BrokerSafe, kstatus-style.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A summary of the broker, without credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSummary {
    /// redis or rabbitmq.
    pub kind: String,
    /// The broker URL with any credentials removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Redis maxmemory-policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_policy: Option<String>,
    /// Redis maxmemory (0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxmemory_bytes: Option<i64>,
    /// Redis used_memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_memory_bytes: Option<i64>,
}

impl TaskQueue {
    /// The Celery queue name: spec.queueName, else metadata.name.
    pub fn queue_name(&self) -> &str {
        self.spec.queue_name.as_deref().or(self.metadata.name.as_deref()).unwrap_or_default()
    }
}
