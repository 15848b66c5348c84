//! A one-shot, human-readable broker check (`celery-operator check-broker`).

use std::fmt;

use crate::observation::{BrokerInfo, BrokerKind, BrokerObservation};
use crate::safety::{Finding, Reason, Severity};
use crate::{Broker, BrokerConfig, ProbeError};

/// The outcome of [`audit`]: what one probe saw, printable for a terminal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditReport {
    /// The broker URL, redacted.
    pub endpoint: String,
    pub observation: BrokerObservation,
}

impl AuditReport {
    /// Whether any finding is a warning or worse; the CLI exits non-zero then.
    pub fn is_unsafe(&self) -> bool {
        self.observation.is_unsafe()
    }
}

/// Probes `queues` on the broker once, with the safety checks of `config.safety`; with no queue
/// named, every queue [`Broker::discover`] finds. Queues that cannot be read or listed are
/// findings; only a broker that cannot be probed at all is an error.
pub async fn audit(config: BrokerConfig, queues: &[&str]) -> Result<AuditReport, ProbeError> {
    let broker = Broker::new(config)?;
    let mut extra = Vec::new();
    let discovered = if queues.is_empty() {
        match broker.discover().await {
            Ok(found) => {
                if found.is_empty() {
                    extra.push(Finding::new(
                        Reason::NoQueuesFound,
                        Severity::Info,
                        "no Celery queue found on the broker: nothing has declared one yet, or the \
                         vhost (RabbitMQ), global key prefix or separator (Redis) is not the app's",
                    ));
                }
                found
            }
            Err(ProbeError::Management { detail, .. }) => {
                extra.push(Finding::new(
                    Reason::QueueDiscoveryUnavailable,
                    Severity::Warning,
                    format!("cannot list the broker's queues ({detail}): name the queues to check"),
                ));
                Vec::new()
            }
            Err(e) => return Err(e),
        }
    } else {
        Vec::new()
    };
    let queues: Vec<&str> =
        if queues.is_empty() { discovered.iter().map(String::as_str).collect() } else { queues.to_vec() };
    let mut observation = broker.probe(&queues).await?;
    observation.findings.extend(extra);
    Ok(AuditReport { endpoint: broker.endpoint(), observation })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn write_redis_info(f: &mut fmt::Formatter<'_>, info: &BrokerInfo) -> fmt::Result {
    writeln!(f, "  eviction policy: {}", or_dash(info.eviction_policy.as_deref()))?;
    let memory = match (info.used_memory_bytes, info.maxmemory_bytes) {
        (Some(used), Some(0)) => format!("{} used, no maxmemory limit", mib(used)),
        (Some(used), Some(max)) => {
            format!("{} used of {} maxmemory ({} %)", mib(used), mib(max), used.saturating_mul(100) / max)
        }
        (Some(used), None) => format!("{} used", mib(used)),
        (None, _) => "-".to_owned(),
    };
    writeln!(f, "  memory:          {memory}")?;
    writeln!(f, "  evicted keys:    {}", or_dash(info.evicted_keys))?;
    let aof = match info.aof_enabled {
        Some(true) => "AOF on",
        Some(false) => "AOF off",
        None => "AOF unknown",
    };
    let last = match info.persistence_ok {
        Some(true) => "last save ok",
        Some(false) => "last save FAILED",
        None => "last save unknown",
    };
    writeln!(f, "  persistence:     {aof}, {last}")
}

/// The part of [`AuditReport`]'s text above the queue table: [`AuditReport::header`].
struct Header<'a>(&'a AuditReport);

/// The part of [`AuditReport`]'s text below the queue table: [`AuditReport::footer`].
struct Footer<'a>(&'a AuditReport);

impl AuditReport {
    /// The broker line, and for Redis its policy, memory and persistence, each line ending in a
    /// newline: for callers that print a queue table of their own between it and the [`footer`](Self::footer).
    pub fn header(&self) -> impl fmt::Display + '_ {
        Header(self)
    }

    /// The findings and the verdict (no newline after the verdict).
    pub fn footer(&self) -> impl fmt::Display + '_ {
        Footer(self)
    }
}

impl fmt::Display for Header<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = &self.0.observation.info;
        let version = info.version.as_deref().map(|v| format!(" {v}")).unwrap_or_default();
        writeln!(f, "Broker {} ({}{version})", self.0.endpoint, info.kind)?;
        if info.kind == BrokerKind::Redis {
            write_redis_info(f, info)?;
        }
        Ok(())
    }
}

impl fmt::Display for Footer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let obs = &self.0.observation;
        if obs.findings.is_empty() {
            writeln!(f, "Findings: none")?;
        } else {
            writeln!(f, "Findings:")?;
            for finding in &obs.findings {
                let severity = match finding.severity {
                    Severity::Info => "info",
                    Severity::Warning => "WARNING",
                    Severity::Critical => "CRITICAL",
                };
                writeln!(f, "  {severity} {}: {}", finding.reason, finding.message)?;
            }
        }
        let count = |s| obs.findings.iter().filter(|x| x.severity == s).count();
        let verdict = if self.0.is_unsafe() { "UNSAFE" } else { "safe" };
        write!(f, "Verdict: {verdict} ({} critical, {} warning)", count(Severity::Critical), count(Severity::Warning))
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let obs = &self.observation;
        write!(f, "{}", self.header())?;
        writeln!(f, "Queues:")?;
        let width = obs.queues.keys().map(String::len).max().unwrap_or(0).max(5);
        writeln!(f, "  {:<width$}  {:>9}  {:>9}  {:>9}  {:>9}", "QUEUE", "READY", "UNACKED", "ORPHANED", "CONSUMERS")?;
        for (name, q) in &obs.queues {
            writeln!(
                f,
                "  {name:<width$}  {:>9}  {:>9}  {:>9}  {:>9}",
                q.ready,
                or_dash(q.unacked),
                or_dash(q.orphaned_unacked),
                or_dash(q.consumers)
            )?;
        }
        write!(f, "{}", self.footer())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::QueueObservation;
    use crate::safety::{Finding, Reason};
    use std::collections::BTreeMap;

    #[test]
    fn the_report_shows_policy_memory_queues_findings_and_verdict() {
        let info = BrokerInfo {
            version: Some("7.0.15".into()),
            eviction_policy: Some("allkeys-lru".into()),
            maxmemory_bytes: Some(10 << 20),
            used_memory_bytes: Some(1 << 20),
            evicted_keys: Some(0),
            aof_enabled: Some(false),
            persistence_ok: Some(true),
            ..BrokerInfo::new(BrokerKind::Redis)
        };
        let queue =
            QueueObservation { ready: 12, unacked: Some(4), orphaned_unacked: Some(0), ..QueueObservation::default() };
        let report = AuditReport {
            endpoint: "redis://:***@redis:6379/0".into(),
            observation: BrokerObservation {
                queues: BTreeMap::from([("emails".to_owned(), queue)]),
                info,
                findings: vec![Finding::new(
                    Reason::EvictionPolicyUnsafe,
                    Severity::Critical,
                    "maxmemory-policy is allkeys-lru: set noeviction",
                )],
            },
        };
        let text = report.to_string();
        for expected in [
            "Broker redis://:***@redis:6379/0 (redis 7.0.15)",
            "eviction policy: allkeys-lru",
            "1.0 MiB used of 10.0 MiB maxmemory (10 %)",
            "AOF off, last save ok",
            "emails",
            "CRITICAL EvictionPolicyUnsafe: maxmemory-policy is allkeys-lru",
            "Verdict: UNSAFE (1 critical, 0 warning)",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.lines().any(|l| l.contains("emails") && l.contains("12") && l.contains('4')));
        assert!(report.is_unsafe());
    }
}
