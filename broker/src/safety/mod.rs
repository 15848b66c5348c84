//! Broker safety checks: settings under which a broker silently loses Celery tasks. The rules are
//! pure functions over what a probe read (Redis `INFO`, RabbitMQ management-API JSON).

mod rabbitmq;
mod redis;

use serde::{Deserialize, Serialize};

pub use rabbitmq::{is_celery_internal_queue, rabbitmq_queue_findings};
pub use redis::{MEMORY_PRESSURE_PERCENT, redis_findings};

/// What to do about an unsafe broker (the TaskQueue's `safetyCheck`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SafetyMode {
    /// Report nothing.
    Off,
    /// Report findings (condition `BrokerSafe=False`, Warning Event, metric).
    #[default]
    Warn,
    /// Report, and switch Redis to `maxmemory-policy noeviction` where `CONFIG SET` is allowed.
    Fix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Worth knowing; the broker is still safe.
    Info,
    /// Tasks may be refused or lost under some conditions.
    Warning,
    /// Tasks are, or can silently be, lost.
    Critical,
}

/// A stable, machine-readable reason (CamelCase, used as condition reason and metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// Redis `maxmemory-policy` is `allkeys-*`: queued tasks can be evicted.
    EvictionPolicyUnsafe,
    /// Fix mode switched Redis to `noeviction`.
    EvictionPolicyFixed,
    /// Fix mode could not switch the policy (CONFIG disabled or refused).
    EvictionPolicyFixFailed,
    /// Neither `INFO memory` nor `CONFIG GET` told the eviction policy.
    EvictionPolicyUnknown,
    /// Redis used memory is at or above 80 % of `maxmemory`.
    MemoryPressure,
    /// Redis `evicted_keys` is non-zero or grew since the last probe.
    KeysEvicted,
    /// The last RDB save or AOF write failed; Redis may refuse writes.
    PersistenceFailing,
    /// The unacked hash was too large to scan; per-queue unacked counts are estimated from a sample.
    UnackedSampled,
    /// Unacked messages could not be read (e.g. scripting not permitted); counts are unknown.
    UnackedUnavailable,
    /// RabbitMQ `max-length`/`max-length-bytes` with overflow `drop-head` and no dead-letter exchange.
    MaxLengthDropHead,
    /// RabbitMQ `max-length` with overflow `reject-publish`: lost unless publishers use confirms.
    MaxLengthRejectPublish,
    /// RabbitMQ `message-ttl` without a dead-letter exchange.
    MessageTtlWithoutDlx,
    /// RabbitMQ quorum queue `delivery-limit` (default 20 since 4.0) without a dead-letter exchange.
    DeliveryLimitWithoutDlx,
    /// RabbitMQ `expires`: the queue and its tasks vanish after a period without consumers.
    QueueExpires,
    /// The queue does not exist on the broker (RabbitMQ; it is not created by the probe).
    QueueMissing,
    /// The RabbitMQ management API could not be read: no unacked counts, no policy checks.
    ManagementUnavailable,
    /// Tasks are scheduled (ETA/countdown) further ahead than the Redis `visibility_timeout`: kombu
    /// restores them to the queue while a worker holds them, so each runs more than once.
    EtaBeyondVisibilityTimeout,
    /// A Redis list is longer than the probe walks: scheduled tasks past the walk count as waiting.
    ListScanSampled,
    /// The ETAs of waiting Redis messages could not be read (e.g. scripting not permitted).
    ListScanUnavailable,
    /// A RabbitMQ quorum queue: Celery gives its workers a static prefetch count (no global QoS).
    QuorumQueueStaticPrefetch,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EvictionPolicyUnsafe => "EvictionPolicyUnsafe",
            Self::EvictionPolicyFixed => "EvictionPolicyFixed",
            Self::EvictionPolicyFixFailed => "EvictionPolicyFixFailed",
            Self::EvictionPolicyUnknown => "EvictionPolicyUnknown",
            Self::MemoryPressure => "MemoryPressure",
            Self::KeysEvicted => "KeysEvicted",
            Self::PersistenceFailing => "PersistenceFailing",
            Self::UnackedSampled => "UnackedSampled",
            Self::UnackedUnavailable => "UnackedUnavailable",
            Self::MaxLengthDropHead => "MaxLengthDropHead",
            Self::MaxLengthRejectPublish => "MaxLengthRejectPublish",
            Self::MessageTtlWithoutDlx => "MessageTtlWithoutDlx",
            Self::DeliveryLimitWithoutDlx => "DeliveryLimitWithoutDlx",
            Self::QueueExpires => "QueueExpires",
            Self::QueueMissing => "QueueMissing",
            Self::ManagementUnavailable => "ManagementUnavailable",
            Self::EtaBeyondVisibilityTimeout => "EtaBeyondVisibilityTimeout",
            Self::ListScanSampled => "ListScanSampled",
            Self::ListScanUnavailable => "ListScanUnavailable",
            Self::QuorumQueueStaticPrefetch => "QuorumQueueStaticPrefetch",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem found on a broker, with a message that tells the user what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub reason: Reason,
    pub severity: Severity,
    /// The queue concerned, for per-queue findings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    pub message: String,
}

impl Finding {
    pub fn new(reason: Reason, severity: Severity, message: impl Into<String>) -> Self {
        Self { reason, severity, queue: None, message: message.into() }
    }

    pub fn for_queue(mut self, queue: &str) -> Self {
        self.queue = Some(queue.to_owned());
        self
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:?}] {}: {}", self.severity, self.reason, self.message)
    }
}
