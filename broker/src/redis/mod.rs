//! The Redis probe: ONE pipelined round trip per poll for all queues of an endpoint.
//!
//! The pipeline holds, in order:
//! 1. `LLEN` of every priority list of every queue (kombu's `_size`, see [`crate::kombu`]);
//! 2. `EVALSHA` of `unacked.lua`, which walks the shared `unacked` hash *server-side* and returns
//!    only counts per (exchange, routing key), the orphaned share (older than the visibility
//!    timeout), and the binding sets of the exchanges it saw;
//! 3. `INFO server|memory|persistence|stats` for the safety checks.
//!
//! Trade-off of step 2: the unacked hash holds whole task messages (often kilobytes each), so
//! downloading it (`HGETALL`/`HVALS`) every poll would cost O(unacked × message size) bandwidth and
//! client CPU. The script costs the server O(unacked) CPU instead — about 4 µs per 1.5 KB entry,
//! measured in BENCHMARKS-broker.md — and returns a few hundred bytes. Lua blocks Redis while it
//! runs, so the scan stops after `unacked_scan_limit` entries (default 2,000, ~7 ms) and larger
//! hashes are estimated from that sample (HSCAN order follows the hash of the random delivery
//! tags, not the queue), reported with an `UnackedSampled` finding. A client-side cache of tag →
//! queue would avoid re-reading values but needs every tag each poll and a second round trip for
//! new ones; sampling keeps one round trip.
//!
//! Extra round trips happen only on the first poll after a server restart (`NOSCRIPT`: the script
//! is loaded and re-run), when `INFO` lacks the eviction policy (`CONFIG GET` fallback), and in Fix
//! mode when the policy is being fixed.

pub(crate) mod connect;
mod discover;
mod expiry;
mod info;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, RedisResult, Script, Value};
use tokio::sync::Mutex as AsyncMutex;

use crate::kombu::{TransportOptions, UnackedGroup, attribute_unacked};
use crate::observation::{BrokerInfo, BrokerObservation, QueueObservation};
use crate::safety::{
    Finding, QueueFailure, Reason, SafetyMode, Severity, queue_failure_finding, queue_ttl_finding, redis_findings,
};
use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};

const UNACKED_SCRIPT: &str = include_str!("unacked.lua");

#[derive(Default)]
struct History {
    /// `evicted_keys` at the previous probe.
    evicted_keys: Option<u64>,
    /// The policy a Fix attempt failed for, and why; not retried while the policy stays the same.
    fix_failure: Option<(String, String)>,
}

pub(crate) struct RedisBroker {
    url: SecretUrl,
    target: connect::Target,
    connection: AsyncMutex<Option<ConnectionManager>>,
    options: TransportOptions,
    safety: SafetyMode,
    timeout: Duration,
    unacked_scan_limit: u64,
    script: Script,
    history: Mutex<History>,
    expiry: Mutex<expiry::ExpiryCheck>,
}

/// The script's reply: `(hlen, examined, groups, bindings)`.
type UnackedReply = (u64, u64, Vec<(String, String, u64, u64)>, Vec<(String, Vec<String>)>);

impl RedisBroker {
    pub(crate) fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
        Ok(Self {
            target: connect::target(
                &config.url,
                config.ca_cert_pem.as_deref(),
                config.transport.master_name.as_deref(),
            )?,
            url: config.url.clone(),
            connection: AsyncMutex::new(None),
            options: config.transport.clone(),
            safety: config.safety,
            timeout: config.timeout,
            unacked_scan_limit: config.unacked_scan_limit,
            script: Script::new(UNACKED_SCRIPT),
            history: Mutex::default(),
            expiry: Mutex::default(),
        })
    }

    pub(crate) fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// The endpoint's connection manager. Behind Sentinel the master is resolved when the manager
    /// is created, and again after a connection error (a failover moves it).
    async fn connection(&self) -> Result<ConnectionManager, ProbeError> {
        let mut slot = self.connection.lock().await;
        if let Some(manager) = slot.as_ref() {
            return Ok(manager.clone());
        }
        let client = self.target.client().await.map_err(|e| self.error(&e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| ProbeError::connect(&self.url, e))?;
        *slot = Some(manager.clone());
        Ok(manager)
    }

    fn error(&self, e: &RedisError) -> ProbeError {
        if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            ProbeError::connect(&self.url, e)
        } else {
            ProbeError::broker(&self.url, e)
        }
    }

    pub(crate) async fn probe(&self, queues: &[&str]) -> Result<BrokerObservation, ProbeError> {
        let result = tokio::time::timeout(self.timeout, self.probe_once(queues))
            .await
            .unwrap_or_else(|_| Err(ProbeError::timeout(&self.url, self.timeout)));
        if let Err(ProbeError::Connect { .. } | ProbeError::Timeout { .. }) = &result {
            *self.connection.lock().await = None;
        }
        result
    }

    async fn probe_once(&self, queues: &[&str]) -> Result<BrokerObservation, ProbeError> {
        let mut con = self.connection().await?;
        let orphaned_before = now_secs() - self.options.visibility_timeout.as_secs_f64();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.options.unacked_key())
            .key(self.options.unacked_index_key())
            .arg(format!("{orphaned_before:.6}"))
            .arg(self.unacked_scan_limit)
            .arg(self.options.binding_key(""));

        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for queue in queues {
            for key in self.options.priority_keys(queue) {
                pipe.cmd("LLEN").arg(key);
            }
        }
        let now = std::time::Instant::now();
        let expiry_due = if self.safety == SafetyMode::Off {
            Vec::new()
        } else {
            self.expiry.lock().expect("expiry lock").due(queues, now)
        };
        expiry::add_ttl_commands(&mut pipe, &self.options, &expiry_due);
        pipe.invoke_script(&invocation);
        for section in info::SECTIONS {
            pipe.cmd("INFO").arg(section);
        }
        let replies: Vec<RedisResult<Value>> = pipe.query_async(&mut con).await.map_err(|e| self.error(&e))?;

        let mut replies = replies.into_iter();
        let ready = self.ready_counts(&mut replies, queues.len())?;
        let expiry = expiry::queue_expiry(&mut replies, self.options.priority_steps.len(), expiry_due.len());
        self.expiry.lock().expect("expiry lock").record(&expiry_due, expiry, now);
        let script_reply = match replies.next().expect("the script's reply") {
            Err(e) if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) => {
                invocation.invoke_async::<Value>(&mut con).await
            }
            other => other,
        };
        let info_replies: Vec<String> =
            replies.filter_map(|r| r.ok().and_then(|v| ::redis::from_redis_value(v).ok())).collect();

        let mut findings = Vec::new();
        let unacked = self.unacked(script_reply, queues, &mut findings);
        let mut info = info::broker_info(info_replies.iter().map(String::as_str));
        if info.eviction_policy.is_none() {
            self.read_policy_from_config(&mut con, &mut info).await;
        }
        if self.safety != SafetyMode::Off {
            findings.extend(self.safety_findings(&mut con, &mut info).await);
        }
        if self.safety != SafetyMode::Off {
            let expiry = self.expiry.lock().expect("expiry lock");
            findings.extend(queues.iter().filter(|q| expiry.is_expiring(q)).map(|q| queue_ttl_finding(q, &info)));
        }
        for (queue, ready) in queues.iter().zip(&ready) {
            if let Err(failure) = ready {
                findings.push(queue_failure_finding(queue, failure));
            }
        }
        let queues = queues
            .iter()
            .zip(ready)
            .map(|(queue, ready)| {
                let ready = ready.unwrap_or_default();
                let (unacked, orphaned) =
                    unacked.as_ref().and_then(|m| m.get(*queue)).map_or((None, None), |&(u, o)| (Some(u), Some(o)));
                let observation = QueueObservation { ready, unacked, orphaned_unacked: orphaned, consumers: None };
                ((*queue).to_owned(), observation)
            })
            .collect();
        Ok(BrokerObservation { queues, info, findings })
    }

    /// Sums the `LLEN` replies of each queue's priority lists, in queue order. An error that
    /// concerns one queue's keys (a key of another type, an ACL key pattern) fails only that queue;
    /// any other error fails the probe.
    fn ready_counts(
        &self,
        replies: &mut impl Iterator<Item = RedisResult<Value>>,
        queues: usize,
    ) -> Result<Vec<Result<u64, QueueFailure>>, ProbeError> {
        let steps = self.options.priority_steps.len();
        (0..queues)
            .map(|_| {
                let lists: Vec<RedisResult<Value>> = replies.by_ref().take(steps).collect();
                let mut sum = 0u64;
                for reply in lists {
                    let value = match reply {
                        Ok(value) => value,
                        Err(e) => match queue_failure(&e, &self.url) {
                            Some(failure) => return Ok(Err(failure)),
                            None => return Err(self.error(&e)),
                        },
                    };
                    sum += ::redis::from_redis_value::<u64>(value).map_err(|e| ProbeError::broker(&self.url, e))?;
                }
                Ok(Ok(sum))
            })
            .collect()
    }

    /// Per-queue `(unacked, orphaned)` from the script's reply; `None` (with a finding) when the
    /// script could not run.
    fn unacked(
        &self,
        reply: RedisResult<Value>,
        queues: &[&str],
        findings: &mut Vec<Finding>,
    ) -> Option<BTreeMap<String, (u64, u64)>> {
        let parsed = reply.and_then(|v| ::redis::from_redis_value::<UnackedReply>(v).map_err(RedisError::from));
        let (total, examined, groups, bindings) = match parsed {
            Ok(reply) => reply,
            Err(e) => {
                findings.push(Finding::new(
                    Reason::UnackedUnavailable,
                    Severity::Info,
                    format!(
                        "cannot count unacked (prefetched or running) messages: {}; scaling sees \
                         only waiting tasks — allow EVALSHA for the operator's Redis user",
                        self.url.scrub(&e.to_string())
                    ),
                ));
                return None;
            }
        };
        let scale = |n: u64| {
            if examined < total && examined > 0 { n * total / examined } else { n }
        };
        if examined < total {
            findings.push(Finding::new(
                Reason::UnackedSampled,
                Severity::Info,
                format!(
                    "the unacked hash holds {total} messages, more than unackedScanLimit {}: \
                     per-queue unacked counts are estimated from a sample of {examined}",
                    self.unacked_scan_limit
                ),
            ));
        }
        let groups: Vec<UnackedGroup> = groups
            .into_iter()
            .map(|(exchange, routing_key, count, orphaned)| UnackedGroup {
                exchange,
                routing_key,
                count: scale(count),
                orphaned: scale(orphaned),
            })
            .collect();
        let bindings: HashMap<String, Vec<String>> = bindings.into_iter().collect();
        Some(attribute_unacked(&groups, &bindings, &self.options, queues))
    }

    /// Fills the eviction policy and maxmemory from `CONFIG GET` when `INFO` lacked them.
    async fn read_policy_from_config(&self, con: &mut ConnectionManager, info: &mut BrokerInfo) {
        let reply: RedisResult<(HashMap<String, String>, HashMap<String, String>)> = ::redis::pipe()
            .cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory")
            .query_async(con)
            .await;
        if let Ok((policy, maxmemory)) = reply {
            info.eviction_policy = policy.get("maxmemory-policy").cloned();
            info.maxmemory_bytes = maxmemory.get("maxmemory").and_then(|v| v.parse().ok());
        }
    }

    async fn safety_findings(&self, con: &mut ConnectionManager, info: &mut BrokerInfo) -> Vec<Finding> {
        let evicted_before = {
            let mut history = self.history.lock().expect("history lock");
            std::mem::replace(&mut history.evicted_keys, info.evicted_keys)
        };
        let mut findings = redis_findings(info, evicted_before);
        let unsafe_policy =
            findings.iter().any(|f| f.reason == Reason::EvictionPolicyUnsafe && f.severity == Severity::Critical);
        if self.safety == SafetyMode::Fix && unsafe_policy {
            let policy = info.eviction_policy.clone().unwrap_or_default();
            match self.fix_policy(con, &policy).await {
                Ok(()) => {
                    findings.retain(|f| f.reason != Reason::EvictionPolicyUnsafe);
                    findings.push(Finding::new(
                        Reason::EvictionPolicyFixed,
                        Severity::Info,
                        format!(
                            "switched maxmemory-policy from {policy} to noeviction with CONFIG SET; \
                             this does not survive a Redis restart: also set it in redis.conf or \
                             your provider's parameter group"
                        ),
                    ));
                    info.eviction_policy = Some("noeviction".to_owned());
                }
                Err(why) => findings.push(Finding::new(
                    Reason::EvictionPolicyFixFailed,
                    Severity::Warning,
                    format!(
                        "could not switch maxmemory-policy from {policy} to noeviction: {why}; \
                         change it in redis.conf or your provider's settings"
                    ),
                )),
            }
        }
        findings
    }

    /// `CONFIG SET maxmemory-policy noeviction`, verified with `CONFIG GET`. Tried once per
    /// observed policy: a refusal (CONFIG renamed, ACL) is remembered, not retried every poll.
    async fn fix_policy(&self, con: &mut ConnectionManager, policy: &str) -> Result<(), String> {
        if let Some((failed_for, why)) = &self.history.lock().expect("history lock").fix_failure
            && failed_for == policy
        {
            return Err(why.clone());
        }
        let result: RedisResult<HashMap<String, String>> = async {
            ::redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query_async::<()>(con).await?;
            ::redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query_async(con).await
        }
        .await;
        let outcome = match result {
            Ok(now) if now.get("maxmemory-policy").map(String::as_str) == Some("noeviction") => Ok(()),
            Ok(now) => Err(format!("CONFIG GET still reports {now:?}")),
            Err(e) => Err(format!("CONFIG SET refused ({})", self.url.scrub(&e.to_string()))),
        };
        if let Err(why) = &outcome {
            self.history.lock().expect("history lock").fix_failure = Some((policy.to_owned(), why.clone()));
        }
        outcome
    }
}

/// The per-queue failure a command error stands for, or `None` when it is not about the queue's
/// keys.
fn queue_failure(e: &RedisError, url: &SecretUrl) -> Option<QueueFailure> {
    let detail = url.scrub(&e.to_string());
    match e.code() {
        Some("NOPERM") => Some(QueueFailure::Forbidden(detail)),
        Some("WRONGTYPE") => Some(QueueFailure::Unreadable(detail)),
        _ => None,
    }
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
