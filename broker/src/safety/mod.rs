//! Broker safety checks: settings under which a broker silently loses Celery tasks. The rules are
//! pure functions over what a probe read (Redis `INFO`, RabbitMQ management-API JSON).

mod queues;
mod rabbitmq;
mod redis;

use serde::{Deserialize, Serialize};

pub use queues::{QueueFailure, escalate_expiring_queues, queue_failure_finding};
pub use rabbitmq::{is_celery_internal_queue, rabbitmq_queue_findings};
pub use redis::{MEMORY_PRESSURE_PERCENT, queue_ttl_finding, redis_findings};

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

/// Declares [`Reason`] and its catalog in one place: the enum, the stable names, and the one-line
/// summaries, brokers and severities that `docs/broker-safety.md` lists (a test fails when the page
/// and this list drift apart).
macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $name:ident => ($brokers:literal, $severity:literal),)+) => {
        /// A stable, machine-readable reason (CamelCase, used as condition reason, metric label and
        /// in `check-broker --output json`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum Reason {
            $($(#[doc = $doc])+ $name,)+
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Self::$name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$name => stringify!($name),)+
                }
            }

            /// One line on what the finding means (the doc comment above).
            pub fn summary(self) -> &'static str {
                match self {
                    $(Self::$name => concat!($($doc),+).trim_ascii(),)+
                }
            }

            /// Where `docs/broker-safety.md` explains it: why it loses tasks and how to fix it.
            pub fn docs_url(self) -> String {
                format!(
                    "{}/blob/main/docs/broker-safety.md#{}",
                    env!("CARGO_PKG_REPOSITORY"),
                    self.as_str().to_ascii_lowercase()
                )
            }

            /// The brokers it applies to, as the docs' table shows them.
            pub fn brokers(self) -> &'static str {
                match self {
                    $(Self::$name => $brokers,)+
                }
            }

            /// The severities it is reported with, as the docs' table shows them.
            pub fn severities(self) -> &'static str {
                match self {
                    $(Self::$name => $severity,)+
                }
            }
        }
    };
}

reasons! {
    /// Redis `maxmemory-policy` is `allkeys-*`: queued tasks, unacked messages and kombu's binding
    /// tables can be evicted.
    EvictionPolicyUnsafe => ("Redis", "Critical (Info without maxmemory)"),
    /// Redis `maxmemory-policy` is `volatile-*`: at maxmemory publishes fail, and keys with a TTL
    /// (expiring queues, results, locks) are evicted first.
    EvictionPolicyVolatile => ("Redis", "Info"),
    /// Fix mode switched Redis to `noeviction`.
    EvictionPolicyFixed => ("Redis", "Info"),
    /// Fix mode could not switch the policy (CONFIG disabled or refused).
    EvictionPolicyFixFailed => ("Redis", "Warning"),
    /// Neither `INFO memory` nor `CONFIG GET` told the eviction policy.
    EvictionPolicyUnknown => ("Redis", "Info"),
    /// Redis used memory is at or above 80 % of `maxmemory`.
    MemoryPressure => ("Redis", "Warning"),
    /// Redis `evicted_keys` is non-zero or grew since the last probe.
    KeysEvicted => ("Redis", "Critical (Warning on a first probe)"),
    /// The last RDB save or AOF write failed; Redis may refuse writes.
    PersistenceFailing => ("Redis", "Warning"),
    /// The unacked hash was too large to scan; per-queue unacked counts are estimated from a sample.
    UnackedSampled => ("Redis", "Info"),
    /// Unacked messages could not be read (e.g. scripting not permitted); counts are unknown.
    UnackedUnavailable => ("Redis", "Info"),
    /// RabbitMQ `max-length`/`max-length-bytes` with overflow `drop-head` and no dead-letter exchange.
    MaxLengthDropHead => ("RabbitMQ", "Critical"),
    /// RabbitMQ `max-length` with overflow `reject-publish`: lost unless publishers use confirms.
    MaxLengthRejectPublish => ("RabbitMQ", "Warning"),
    /// RabbitMQ `message-ttl` without a dead-letter exchange.
    MessageTtlWithoutDlx => ("RabbitMQ", "Critical"),
    /// RabbitMQ quorum queue `delivery-limit` (default 20 since 4.0) without a dead-letter exchange.
    DeliveryLimitWithoutDlx => ("RabbitMQ", "Critical"),
    /// The queue expires (RabbitMQ `expires`, kombu `Queue(expires=…)` on Redis): it vanishes with
    /// its tasks after a period without use.
    QueueExpires => ("Redis, RabbitMQ", "Warning (Critical on Redis under volatile-* with maxmemory)"),
    /// The queue expires and a WorkerPool consuming it can scale to zero, leaving it unused.
    QueueExpiresWhileScaledToZero => ("Redis, RabbitMQ", "Critical"),
    /// The queue does not exist on the broker (RabbitMQ; it is not created by the probe).
    QueueMissing => ("RabbitMQ", "Warning"),
    /// The queue is exclusive to another connection (RabbitMQ `RESOURCE_LOCKED`); its depth cannot be
    /// read, and it is deleted with that connection.
    QueueExclusive => ("RabbitMQ", "Warning (Info for Celery's own pidbox queues)"),
    /// The broker refused to let the probe read the queue (RabbitMQ `ACCESS_REFUSED`, Redis `NOPERM`).
    QueueForbidden => ("Redis, RabbitMQ", "Warning"),
    /// The queue could not be read for another reason (e.g. a Redis key of the wrong type).
    QueueUnreadable => ("Redis, RabbitMQ", "Warning"),
    /// No queue was named and the broker's queues could not be listed.
    QueueDiscoveryUnavailable => ("Redis, RabbitMQ", "Warning"),
    /// No queue was named and none was found on the broker (nothing declared one, or the key prefix
    /// or vhost is not the app's).
    NoQueuesFound => ("Redis, RabbitMQ", "Info"),
    /// The RabbitMQ management API is not configured or could not be read: no unacked counts, no
    /// policy checks.
    ManagementUnavailable => ("RabbitMQ", "Warning"),
    /// Tasks are scheduled (ETA/countdown) further ahead than the Redis `visibility_timeout`: kombu
    /// restores them to the queue while a worker holds them, so each runs more than once.
    EtaBeyondVisibilityTimeout => ("Redis", "Warning"),
    /// The Redis lists hold more waiting messages (or more non-empty lists) than the probe walks per
    /// poll: scheduled tasks past the walk count as waiting.
    ListScanSampled => ("Redis", "Info"),
    /// The ETAs of waiting Redis messages could not be read (e.g. scripting not permitted):
    /// scheduled tasks on the lists count as waiting and queue latency is unknown.
    ListScanUnavailable => ("Redis", "Info"),
    /// A RabbitMQ quorum queue: Celery gives its workers a static prefetch count (no global QoS), so
    /// held ETA tasks occupy prefetch slots.
    QuorumQueueStaticPrefetch => ("RabbitMQ", "Info"),
}

/// The table of every finding that `docs/broker-safety.md` carries between its
/// `<!-- findings-table -->` markers (a test fails when they differ).
pub fn findings_table() -> String {
    let mut out = String::from("| Finding | Broker | Severity | What it means |\n| --- | --- | --- | --- |\n");
    for reason in Reason::ALL {
        let name = reason.as_str();
        out.push_str(&format!(
            "| [`{name}`](#{}) | {} | {} | {} |\n",
            name.to_ascii_lowercase(),
            reason.brokers(),
            reason.severities(),
            reason.summary()
        ));
    }
    out
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
