//! The Redis probe: ONE pipelined round trip per poll for all queues of an endpoint.
//!
//! The pipeline holds, in order:
//! 1. `LLEN` of every priority list of the queues the waiting script cannot read (see below), and
//!    `PTTL` of every list of the queues whose expiry is due to be re-read ([`expiry`]);
//! 2. `EVALSHA` of `unacked.lua`, which walks the shared `unacked` hash *server-side* and returns
//!    only counts per (exchange, routing key), the orphaned share (older than the visibility
//!    timeout), the scheduled share (ETA in the future: held by a worker until due) with when it
//!    comes due, and the binding sets of the exchanges it saw;
//! 3. `EVALSHA` of `waiting.lua`, which takes the `LLEN` of every priority list of the other
//!    queues (kombu's `_size`, see [`crate::kombu`]) and walks each list from the head (bounded by
//!    `list_scan_limit`): scheduled messages on the lists, the first due message and the latency
//!    tracker's markers ([`crate::latency`]);
//! 4. `INFO server|memory|persistence|stats` for the safety checks.
//!
//! The `LLEN`s run inside the script rather than as thousands of pipelined commands: that is
//! cheaper than before the walk existed (BENCHMARKS-broker.md). A script fails as a whole, though
//! (one queue's key forbidden by an ACL pattern or of another type; scripting not permitted), while
//! a queue the probe cannot read must fail alone: [`lengths`] remembers which queues' `LLEN`s go as
//! commands in step 1 instead, so ready counts never depend on the script and the probe stays one
//! round trip once it has learnt that.
//!
//! Both scripts read a message's ETA (Celery protocol 2 header, ISO 8601), delivery tag and
//! publish stamp with plain substring searches (`eta.lua`, prepended to each); task bodies never
//! leave Redis.
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
//! Extra round trips happen only on the first poll after a server restart (`NOSCRIPT`: the scripts
//! are loaded and re-run), on the poll that first finds the waiting script failing (the `LLEN`s of
//! its queues, to tell which queue failed), when `INFO` lacks the eviction policy (`CONFIG GET`
//! fallback), and in Fix mode when the policy is being fixed.

pub(crate) mod connect;
mod discover;
mod expiry;
mod info;
mod lengths;
mod waiting;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, RedisResult, Script, Value};
use tokio::sync::Mutex as AsyncMutex;

use crate::kombu::{TransportOptions, UnackedGroup, attribute_unacked};
use crate::latency::{MARKER_LEN, ProbeHints};
use crate::observation::{BrokerInfo, BrokerObservation, QueueObservation};
use crate::safety::{
    Finding, QueueFailure, Reason, SafetyMode, Severity, queue_failure_finding, queue_ttl_finding, redis_findings,
};
use crate::schedule::{DUE_BUCKET_EDGES, scheduled_findings};
use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};
use waiting::{HeldReport, ListReport, QueueLists};

const UNACKED_SCRIPT: &str = concat!(include_str!("eta.lua"), include_str!("unacked.lua"));
const WAITING_SCRIPT: &str = concat!(include_str!("eta.lua"), include_str!("waiting.lua"));

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
    list_scan_limit: u64,
    script: Script,
    waiting_script: Script,
    history: Mutex<History>,
    expiry: Mutex<expiry::ExpiryCheck>,
    lengths: Mutex<lengths::LengthReads>,
    /// Probes so far: rotates which lists' heads are walked when there are more non-empty lists
    /// than `list_scan_limit`.
    polls: std::sync::atomic::AtomicU64,
}

/// The unacked script's reply: `(hlen, examined, groups, bindings)`; a group is `exchange,
/// routing_key, count, orphaned` followed by the scheduled columns ([`waiting::held_report`]).
type UnackedReply = (u64, u64, Vec<Vec<Value>>, Vec<(String, Vec<String>)>);

/// What the unacked script told, per queue.
struct Unacked {
    /// `(unacked, orphaned)`.
    counts: BTreeMap<String, (u64, u64)>,
    /// Scheduled tasks held by workers.
    held: BTreeMap<String, HeldReport>,
    /// False when the hash was sampled.
    exact: bool,
}

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
            list_scan_limit: config.list_scan_limit,
            script: Script::new(UNACKED_SCRIPT),
            waiting_script: Script::new(WAITING_SCRIPT),
            history: Mutex::default(),
            expiry: Mutex::default(),
            lengths: Mutex::default(),
            polls: std::sync::atomic::AtomicU64::new(0),
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

    pub(crate) async fn probe(&self, queues: &[&str], hints: &ProbeHints) -> Result<BrokerObservation, ProbeError> {
        let result = tokio::time::timeout(self.timeout, self.probe_once(queues, hints))
            .await
            .unwrap_or_else(|_| Err(ProbeError::timeout(&self.url, self.timeout)));
        if let Err(ProbeError::Connect { .. } | ProbeError::Timeout { .. }) = &result {
            *self.connection.lock().await = None;
        }
        result
    }

    async fn probe_once(&self, queues: &[&str], hints: &ProbeHints) -> Result<BrokerObservation, ProbeError> {
        let mut con = self.connection().await?;
        let now = now_secs();
        let visibility = self.options.visibility_timeout.as_secs_f64();
        let edges = DUE_BUCKET_EDGES.map(|e| e.to_string()).join(" ");
        let orphaned_before = now - visibility;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.options.unacked_key())
            .key(self.options.unacked_index_key())
            .arg(format!("{orphaned_before:.6}"))
            .arg(self.unacked_scan_limit)
            .arg(self.options.binding_key(""))
            .arg(format!("{now:.6}"))
            .arg(format!("{visibility:.3}"))
            .arg(&edges);
        let plan = self.lengths.lock().expect("lengths lock").plan(queues);
        let steps = self.options.priority_steps.len();
        let mut walk = self.waiting_script.prepare_invoke();
        walk.arg(format!("{now:.6}"))
            .arg(format!("{visibility:.3}"))
            .arg(&edges)
            .arg(self.list_scan_limit)
            .arg(MARKER_LEN)
            .arg(
                self.polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(self.list_scan_limit)
                    % (1 << 32),
            );
        let scripted_keys = plan.scripted.iter().flat_map(|&q| self.options.priority_keys(queues[q]));
        for (i, key) in scripted_keys.enumerate() {
            walk.key(key);
            let markers = hints.for_list(queues[plan.scripted[i / steps]], i % steps);
            if !markers.is_empty() {
                // Sparse: `<1-based key index> <marker> <marker> …`.
                walk.arg(format!("{} {}", i + 1, markers.join(" ")));
            }
        }

        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        let counted: Vec<&str> = plan.counted.iter().map(|&q| queues[q]).collect();
        add_llen_commands(&mut pipe, &self.options, &counted);
        let started = std::time::Instant::now();
        let expiry_due = if self.safety == SafetyMode::Off {
            Vec::new()
        } else {
            self.expiry.lock().expect("expiry lock").due(queues, started)
        };
        expiry::add_ttl_commands(&mut pipe, &self.options, &expiry_due);
        pipe.invoke_script(&invocation);
        pipe.invoke_script(&walk);
        for section in info::SECTIONS {
            pipe.cmd("INFO").arg(section);
        }
        let replies: Vec<RedisResult<Value>> = pipe.query_async(&mut con).await.map_err(|e| self.error(&e))?;

        let mut replies = replies.into_iter();
        // What each queue's lists hold (`None`: not read yet).
        let mut ready: Vec<Option<Result<u64, QueueFailure>>> = vec![None; queues.len()];
        for (&q, read) in plan.counted.iter().zip(self.ready_counts(&mut replies, counted.len())?) {
            ready[q] = Some(read);
        }
        let expiry = expiry::queue_expiry(&mut replies, steps, expiry_due.len());
        self.expiry.lock().expect("expiry lock").record(&expiry_due, expiry, started);
        let script_reply =
            rerun_if_unloaded(replies.next().expect("the unacked script's reply"), &invocation, &mut con).await;
        let walk_reply = rerun_if_unloaded(replies.next().expect("the waiting script's reply"), &walk, &mut con).await;
        let info_replies: Vec<String> =
            replies.filter_map(|r| r.ok().and_then(|v| ::redis::from_redis_value(v).ok())).collect();

        let mut findings = Vec::new();
        let unacked = self.unacked(script_reply, queues, &mut findings);
        let walked = self.list_reports(walk_reply, plan.scripted.len());
        let mut lists: Vec<Option<&[ListReport]>> = vec![None; queues.len()];
        match &walked {
            Ok(reports) => {
                for (&q, reports) in plan.scripted.iter().zip(reports.chunks(steps)) {
                    lists[q] = Some(reports);
                    ready[q] = Some(Ok(QueueLists(reports).len()));
                }
            }
            Err(_) => {
                // The script's queues not counted in the pipeline: one more round trip, which also
                // tells which queue made the script fail.
                let unread: Vec<usize> = plan.scripted.iter().copied().filter(|&q| ready[q].is_none()).collect();
                if !unread.is_empty() {
                    let unread_queues: Vec<&str> = unread.iter().map(|&q| queues[q]).collect();
                    let mut pipe = ::redis::pipe();
                    pipe.ignore_errors();
                    add_llen_commands(&mut pipe, &self.options, &unread_queues);
                    let replies: Vec<RedisResult<Value>> =
                        pipe.query_async(&mut con).await.map_err(|e| self.error(&e))?;
                    let counts = self.ready_counts(&mut replies.into_iter(), unread.len())?;
                    for (q, read) in unread.into_iter().zip(counts) {
                        ready[q] = Some(read);
                    }
                }
            }
        }
        let script_failing = self.lengths.lock().expect("lengths lock").record(queues, &plan, &ready, walked.is_ok());
        match &walked {
            Ok(reports) if reports.iter().any(|r| r.head.scanned < r.head.len) => {
                findings.push(self.list_scan_sampled());
            }
            Err(why) if script_failing => findings.push(list_scan_unavailable(why)),
            _ => {}
        }

        let mut info = info::broker_info(info_replies.iter().map(String::as_str));
        if info.eviction_policy.is_none() {
            self.read_policy_from_config(&mut con, &mut info).await;
        }
        if self.safety != SafetyMode::Off {
            findings.extend(self.safety_findings(&mut con, &mut info).await);
            let expiry = self.expiry.lock().expect("expiry lock");
            findings.extend(queues.iter().filter(|q| expiry.is_expiring(q)).map(|q| queue_ttl_finding(q, &info)));
        }
        let queues: BTreeMap<String, QueueObservation> = queues
            .iter()
            .zip(ready)
            .zip(lists)
            .map(|((queue, ready), lists)| {
                let ready = match ready.expect("every queue's lists were read") {
                    Ok(ready) => ready,
                    Err(failure) => {
                        findings.push(queue_failure_finding(queue, &failure));
                        0
                    }
                };
                let lists = lists.map(QueueLists);
                let observation = queue_observation(queue, ready, unacked.as_ref(), lists.as_ref());
                ((*queue).to_owned(), observation)
            })
            .collect();
        if self.safety != SafetyMode::Off {
            findings.extend(scheduled_findings(&queues, now, self.options.visibility_timeout));
        }
        Ok(BrokerObservation { queues, info, findings })
    }

    /// Sums the `LLEN` replies of each queue's priority lists ([`add_llen_commands`]), in queue
    /// order. An error that concerns one queue's keys (a key of another type, an ACL key pattern)
    /// fails only that queue; any other error fails the probe.
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

    /// The waiting script's per-list reports for `queues` queues, in key order, or why there are
    /// none (scrubbed).
    fn list_reports(&self, reply: RedisResult<Value>, queues: usize) -> Result<Vec<ListReport>, String> {
        let expected = queues * self.options.priority_steps.len();
        match reply {
            Ok(value) => waiting::list_reports(&value)
                .filter(|r| r.len() == expected)
                .ok_or_else(|| "the list script's reply was malformed".to_owned()),
            Err(e) => Err(self.url.scrub(&e.to_string())),
        }
    }

    fn list_scan_sampled(&self) -> Finding {
        Finding::new(
            Reason::ListScanSampled,
            Severity::Info,
            format!(
                "the probe walks at most listScanLimit {} waiting messages per poll, and the queues hold                  more (or more non-empty lists, whose heads are then walked in turn): scheduled (ETA)                  tasks past the walked part count as waiting",
                self.list_scan_limit
            ),
        )
    }

    /// Per-queue counts from the unacked script's reply; `None` (with a finding) when the script
    /// could not run.
    fn unacked(&self, reply: RedisResult<Value>, queues: &[&str], findings: &mut Vec<Finding>) -> Option<Unacked> {
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
        let parsed: Option<Vec<(UnackedGroup, HeldReport)>> = groups
            .iter()
            .map(|columns| {
                let (exchange, routing_key, count, orphaned): (String, String, u64, u64) =
                    ::redis::from_redis_value_ref(&Value::Array(columns.get(..4)?.to_vec())).ok()?;
                let group = UnackedGroup { exchange, routing_key, count: scale(count), orphaned: scale(orphaned) };
                let held = waiting::held_report(columns.get(4..)?)?;
                let held = HeldReport {
                    scheduled: scale(held.scheduled),
                    beyond_visibility: scale(held.beyond_visibility),
                    due: held.due.map_counts(scale),
                    ..held
                };
                Some((group, held))
            })
            .collect();
        let Some(parsed) = parsed else {
            findings.push(Finding::new(
                Reason::UnackedUnavailable,
                Severity::Info,
                "cannot count unacked (prefetched or running) messages: the unacked script's reply was \
                 malformed; scaling sees only waiting tasks",
            ));
            return None;
        };
        let bindings: HashMap<String, Vec<String>> = bindings.into_iter().collect();
        let (groups, held): (Vec<UnackedGroup>, Vec<HeldReport>) = parsed.into_iter().unzip();
        let counts = attribute_unacked(&groups, &bindings, &self.options, queues);
        Some(Unacked { counts, held: self.attribute_held(&groups, &held, &bindings, queues), exact: examined >= total })
    }

    /// Credits each group's scheduled tasks to the queues kombu routes it to (the routing of
    /// [`attribute_unacked`], asked one group at a time).
    fn attribute_held(
        &self,
        groups: &[UnackedGroup],
        held: &[HeldReport],
        bindings: &HashMap<String, Vec<String>>,
        queues: &[&str],
    ) -> BTreeMap<String, HeldReport> {
        let mut out: BTreeMap<String, HeldReport> = BTreeMap::new();
        for (group, report) in groups.iter().zip(held).filter(|(_, r)| r.scheduled > 0) {
            let probe = UnackedGroup { count: 1, orphaned: 0, ..group.clone() };
            let routed = attribute_unacked(std::slice::from_ref(&probe), bindings, &self.options, queues);
            for queue in routed.into_iter().filter(|(_, (n, _))| *n > 0).map(|(q, _)| q) {
                let entry = out.entry(queue).or_default();
                entry.scheduled += report.scheduled;
                entry.beyond_visibility += report.beyond_visibility;
                entry.farthest = entry.farthest.max(report.farthest);
                entry.due.merge(&report.due);
            }
        }
        out
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

/// Appends one `LLEN` per priority list of every queue, in queue order (kombu's `_size`).
fn add_llen_commands(pipe: &mut ::redis::Pipeline, options: &TransportOptions, queues: &[&str]) {
    for queue in queues {
        for key in options.priority_keys(queue) {
            pipe.cmd("LLEN").arg(key);
        }
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

fn list_scan_unavailable(why: &str) -> Finding {
    Finding::new(
        Reason::ListScanUnavailable,
        Severity::Info,
        format!(
            "cannot read the ETAs of waiting messages: {why}; scheduled tasks on the lists count as \
             waiting and queue latency is unknown — allow EVALSHA for the operator's Redis user"
        ),
    )
}

/// A script's reply, or its reply after loading it when the server did not know it (first poll
/// after a restart: `NOSCRIPT`).
async fn rerun_if_unloaded(
    reply: RedisResult<Value>,
    invocation: &::redis::ScriptInvocation<'_>,
    con: &mut ConnectionManager,
) -> RedisResult<Value> {
    match reply {
        Err(e) if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) => {
            invocation.invoke_async::<Value>(con).await
        }
        other => other,
    }
}

/// One queue's observation from its `LLEN`s, the unacked script and the waiting script.
fn queue_observation(
    queue: &str,
    ready: u64,
    unacked: Option<&Unacked>,
    lists: Option<&QueueLists<'_>>,
) -> QueueObservation {
    let (count, orphaned) =
        unacked.and_then(|u| u.counts.get(queue)).map_or((None, None), |&(u, o)| (Some(u), Some(o)));
    let held = unacked.map(|u| u.held.get(queue).cloned().unwrap_or_default());
    let scheduled = (lists.is_some() || unacked.is_some())
        .then(|| waiting::scheduled(lists, held.as_ref(), unacked.is_some_and(|u| u.exact)));
    let listed = scheduled.as_ref().map_or(0, |s| s.listed);
    QueueObservation {
        ready,
        unacked: count,
        orphaned_unacked: orphaned,
        consumers: None,
        waiting: lists.map(|l| l.len().saturating_sub(listed)),
        reserved_due: count.map(|n| n.saturating_sub(held.as_ref().map_or(0, |h| h.scheduled))),
        scheduled,
        head: lists.map(QueueLists::head),
    }
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
