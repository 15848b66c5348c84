//! What one probe of one broker saw.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::latency::HeadSample;
use crate::safety::{Finding, Severity};
use crate::schedule::Scheduled;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Redis,
    Rabbitmq,
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Redis => "redis",
            Self::Rabbitmq => "rabbitmq",
        })
    }
}

/// One Celery queue's depth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueObservation {
    /// Messages waiting to be delivered, all priorities summed.
    pub ready: u64,
    /// Delivered to a consumer and not yet acknowledged (prefetched, or running with `acks_late`);
    /// `None` when the broker cannot tell (RabbitMQ without the management API).
    pub unacked: Option<u64>,
    /// Of `unacked`, delivered longer than the visibility timeout ago: a live Redis consumer will
    /// restore them to the queue. Redis only.
    pub orphaned_unacked: Option<u64>,
    /// Consumers attached to the queue. RabbitMQ only.
    pub consumers: Option<u32>,
    /// Of `ready`, messages due now (no ETA, or an ETA that has passed): what a worker would start
    /// at once. Redis: `ready` minus the scheduled messages found on the lists (a list longer than
    /// the scan limit counts its unscanned part as waiting). `None` where the broker cannot tell:
    /// on RabbitMQ a ready message's ETA cannot be read without consuming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u64>,
    /// Of `unacked`, messages that are due: prefetched by a worker and not started yet, or running
    /// with `acks_late`. Redis only (`unacked` minus the scheduled tasks workers hold); on RabbitMQ
    /// held ETA tasks and prefetched ones look alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_due: Option<u64>,
    /// Tasks whose ETA is still in the future, wherever the broker holds them; `None` when it
    /// cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<Scheduled>,
    /// Which messages are at the head of the queue, for a
    /// [`LatencyTracker`](crate::latency::LatencyTracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadSample>,
}

/// Broker-wide facts the safety checks and the TaskQueue status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerInfo {
    pub kind: BrokerKind,
    pub version: Option<String>,
    /// Redis `maxmemory-policy`.
    pub eviction_policy: Option<String>,
    /// Redis `maxmemory`; 0 means no limit.
    pub maxmemory_bytes: Option<u64>,
    pub used_memory_bytes: Option<u64>,
    /// Redis `evicted_keys` since the server started.
    pub evicted_keys: Option<u64>,
    /// Redis `aof_enabled`.
    pub aof_enabled: Option<bool>,
    /// Redis `rdb_last_bgsave_status` (and `aof_last_write_status` when AOF is on) are `ok`.
    pub persistence_ok: Option<bool>,
    /// RabbitMQ: Celery's native delayed-delivery queues on the vhost, when there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed_delivery: Option<DelayedDelivery>,
}

/// Celery's native delayed delivery on a RabbitMQ vhost (quorum queues, Celery ≥ 5.5): scheduled
/// tasks wait in the level queues `celery_delayed_0` … `celery_delayed_27`, shared by every queue
/// of the vhost, invisible in their target queue until due. See
/// [`delayed_level_bound`](crate::schedule::delayed_level_bound) for what a level tells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DelayedDelivery {
    /// Messages waiting in each level queue (index = level).
    pub levels: Vec<u64>,
    /// The queues the exchange `celery_delayed_delivery` routes to, read from its bindings (and
    /// theirs); `None` when the bindings could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<String>>,
}

impl DelayedDelivery {
    /// Messages in all levels.
    pub fn total(&self) -> u64 {
        self.levels.iter().fold(0u64, |sum, &n| sum.saturating_add(n))
    }
}

impl BrokerInfo {
    pub fn new(kind: BrokerKind) -> Self {
        Self {
            kind,
            version: None,
            eviction_policy: None,
            maxmemory_bytes: None,
            used_memory_bytes: None,
            evicted_keys: None,
            aof_enabled: None,
            persistence_ok: None,
            delayed_delivery: None,
        }
    }
}

/// The result of one probe: every requested queue (missing ones read as empty and carry a
/// `QueueMissing` finding), broker facts, and safety findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerObservation {
    pub queues: BTreeMap<String, QueueObservation>,
    pub info: BrokerInfo,
    pub findings: Vec<Finding>,
}

impl BrokerObservation {
    /// Whether any finding is a warning or worse (the `BrokerSafe=False` condition).
    pub fn is_unsafe(&self) -> bool {
        self.findings.iter().any(|f| f.severity >= Severity::Warning)
    }

    /// The most severe finding, for a condition's reason and message.
    pub fn worst_finding(&self) -> Option<&Finding> {
        self.findings.iter().max_by_key(|f| f.severity)
    }
}
