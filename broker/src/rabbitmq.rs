//! The RabbitMQ probe: passive `queue.declare` over AMQP for real-time ready and consumer counts,
//! plus (optionally) the management API for unacked counts, queue type, arguments and policies.
//!
//! A passive declare that fails for one queue fails with a channel error, which closes the channel:
//! 404 NOT_FOUND (the probe never declares a queue actively — mismatched arguments would raise
//! PRECONDITION_FAILED, and creating queues is the application's business), 405 RESOURCE_LOCKED (an
//! exclusive queue of another connection, such as a Celery worker's pidbox) or 403 ACCESS_REFUSED.
//! The probe reports a finding on that queue and continues with the next queue on a fresh channel;
//! only connection-level errors fail the probe. The management API's statistics lag by its
//! collection interval (5 s by default), so it is used only for what AMQP cannot tell, and for the
//! depth of queues AMQP may not read.

pub(crate) mod connect;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::latency::{ArrivalCounters, HeadSample};
use crate::native_delay;
use crate::observation::{BrokerInfo, BrokerKind, BrokerObservation, DelayedDelivery, QueueObservation};
use crate::safety::{
    Finding, QueueFailure, Reason, SafetyMode, Severity, is_celery_internal_queue, queue_failure_finding,
    rabbitmq_queue_findings,
};
use crate::schedule::delayed_level_of;
use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};

const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;
const QUEUE_COLUMNS: &str = "name,type,arguments,policy,effective_policy_definition,messages_ready,\
                             messages_unacknowledged,consumers,messages,message_stats.publish,head_message_timestamp";
/// How long the queues native delayed delivery reaches (read from bindings) are reused.
const DELAYED_TARGETS_TTL: Duration = Duration::from_secs(30);

/// What a passive declare told about one queue.
enum Declared {
    Found { ready: u64, consumers: u32 },
    Missing,
    Failed(QueueFailure),
}

pub(crate) struct RabbitBroker {
    url: SecretUrl,
    target: connect::Target,
    vhost: String,
    management: Option<Management>,
    connection: Mutex<Option<Arc<Connection>>>,
    safety: SafetyMode,
    timeout: Duration,
    /// The queues `celery_delayed_delivery` reaches, and when they were read.
    delayed_targets: Mutex<Option<(Instant, Option<Vec<String>>)>>,
}

struct Management {
    url: SecretUrl,
    /// Scheme, host, port and any path prefix, without credentials or trailing slash.
    base: String,
    user: String,
    password: String,
    client: reqwest::Client,
}

/// Whether `url` names an AMQP broker (`amqp://`, `amqps://`, Celery's `pyamqp://`).
pub(crate) fn is_amqp_url(url: &SecretUrl) -> bool {
    let scheme = url.expose().split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    matches!(scheme.as_deref(), Some("amqp" | "amqps" | "pyamqp"))
}

impl RabbitBroker {
    pub(crate) fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
        let url = &config.url;
        let target = connect::Target::new(config)?;
        let vhost = target.uri().vhost.clone();
        let management =
            config.management_url.as_ref().map(|m| Management::new(m, target.uri(), config)).transpose()?;
        Ok(Self {
            url: url.clone(),
            target,
            vhost,
            management,
            connection: Mutex::new(None),
            safety: config.safety,
            timeout: config.timeout,
            delayed_targets: Mutex::new(None),
        })
    }

    pub(crate) fn url(&self) -> &SecretUrl {
        &self.url
    }

    pub(crate) async fn probe(&self, queues: &[&str]) -> Result<BrokerObservation, ProbeError> {
        let amqp = async {
            tokio::time::timeout(self.timeout, self.declare_passively(queues))
                .await
                .map_err(|_| ProbeError::timeout(&self.url, self.timeout))?
        };
        let management = async {
            match &self.management {
                Some(m) => Some(m.read(&self.vhost, self.timeout).await),
                None => None,
            }
        };
        let (declared, management) = futures::join!(amqp, management);
        let declared = declared?;

        let mut findings = Vec::new();
        let mut info = BrokerInfo::new(BrokerKind::Rabbitmq);
        let mut details: HashMap<String, Value> = HashMap::new();
        match management {
            Some(Ok((version, listed))) => {
                info.version = version;
                details = listed;
            }
            Some(Err(e)) => findings.push(Finding::new(
                Reason::ManagementUnavailable,
                Severity::Warning,
                format!("{e}; unacked counts and queue policies are unknown"),
            )),
            None if self.safety != SafetyMode::Off => findings.push(Finding::new(
                Reason::ManagementUnavailable,
                Severity::Warning,
                "no management API configured: queue arguments and policies that silently drop tasks \
                 (max-length, message-ttl, delivery-limit, expires) were not checked and unacked \
                 counts are unknown; give the management URL (TaskQueue managementUrlFrom, \
                 check-broker --management-url)",
            )),
            None => {}
        }
        let major = info.version.as_deref().and_then(major_version);
        self.refresh_delayed_levels(&mut details).await;
        if let (Some(levels), Some(management)) = (native_delay::delayed_levels(&details), &self.management) {
            let targets = self.delayed_targets(management).await;
            info.delayed_delivery = Some(DelayedDelivery { levels, targets });
        }
        let delayed_targets = info.delayed_delivery.as_ref().and_then(|d| d.targets.clone());
        let mut observed = BTreeMap::new();
        for (queue, declared) in queues.iter().zip(declared) {
            let detail = details.get(*queue);
            let number = |key: &str| detail.and_then(|d| d[key].as_u64());
            let seen = match declared {
                // Unacked is unknown until the management statistics include the queue (one
                // collection interval after it was declared).
                Declared::Found { ready, consumers } => QueueObservation {
                    ready,
                    unacked: number("messages_unacknowledged"),
                    consumers: Some(consumers),
                    ..QueueObservation::default()
                },
                Declared::Missing => {
                    findings.push(self.missing(queue));
                    QueueObservation { unacked: Some(0), consumers: Some(0), ..QueueObservation::default() }
                }
                // The management API may still know the depth (it lists exclusive queues too).
                Declared::Failed(failure) => {
                    findings.push(queue_failure_finding(queue, &failure));
                    QueueObservation {
                        ready: number("messages_ready").unwrap_or_default(),
                        unacked: number("messages_unacknowledged"),
                        consumers: number("consumers").and_then(|c| u32::try_from(c).ok()),
                        ..QueueObservation::default()
                    }
                }
            };
            if let (Some(detail), true) = (detail, self.safety != SafetyMode::Off) {
                findings.extend(rabbitmq_queue_findings(detail, major));
                findings.extend(native_delay::quorum_findings(detail, delayed_targets.as_deref()));
            }
            // Native delayed delivery's levels credited to the queue, and the publish counters the
            // latency tracker reads (from the management listing, so also for queues AMQP may not
            // read).
            let scheduled = info.delayed_delivery.as_ref().and_then(|d| native_delay::delayed_for(queue, d));
            let head = detail.and_then(ArrivalCounters::from_management).map(HeadSample::Counters);
            observed.insert((*queue).to_owned(), QueueObservation { scheduled, head, ..seen });
        }
        Ok(BrokerObservation { queues: observed, info, findings })
    }

    /// Replaces the management API's depths of native delayed delivery's level queues in `details`
    /// with real-time ones from passive declares. The statistics of quorum queues (the levels'
    /// default type) refresh only on the queue's tick, every 5 s: seen on RabbitMQ 3.10, a task
    /// with `countdown=20` was still listed in level 4 five seconds after it had moved to level 2,
    /// and in level 2 after it had reached its queue, where it was then counted twice — and tasks
    /// coming due within a lead time of seconds were sized for only after they were due. The
    /// levels are read after the task queues, so a message moving on between the two reads is
    /// missed for one probe rather than counted twice. On failure the statistics stay.
    async fn refresh_delayed_levels(&self, details: &mut HashMap<String, Value>) {
        let levels: Vec<&str> = details.keys().map(String::as_str).filter(|q| delayed_level_of(q).is_some()).collect();
        if levels.is_empty() {
            return;
        }
        let Ok(Ok(declared)) = tokio::time::timeout(self.timeout, self.declare_passively(&levels)).await else {
            return;
        };
        let depths: Vec<(String, u64)> = levels
            .iter()
            .zip(declared)
            .filter_map(|(q, d)| match d {
                Declared::Found { ready, .. } => Some(((*q).to_owned(), ready)),
                _ => None,
            })
            .collect();
        for (queue, depth) in depths {
            if let Some(Value::Object(detail)) = details.get_mut(&queue) {
                detail.insert("messages".into(), depth.into());
                detail.insert("messages_ready".into(), depth.into());
            }
        }
    }

    fn missing(&self, queue: &str) -> Finding {
        Finding::new(
            Reason::QueueMissing,
            Severity::Warning,
            format!(
                "queue {queue} does not exist in vhost {}: nothing buffers its tasks, and publishers \
                 that do not declare it lose them as unroutable; check the queue name and vhost, or \
                 start a worker that declares it",
                self.vhost
            ),
        )
        .for_queue(queue)
    }

    /// The queues native delayed delivery reaches, re-read from the bindings at most every
    /// [`DELAYED_TARGETS_TTL`] once some were found; `None` when they cannot be read.
    async fn delayed_targets(&self, management: &Management) -> Option<Vec<String>> {
        let mut cached = self.delayed_targets.lock().await;
        if let Some((at, targets)) = cached.as_ref()
            && at.elapsed() < DELAYED_TARGETS_TTL
        {
            return targets.clone();
        }
        let targets = management.delayed_targets(&self.vhost).await.ok();
        // A worker declares the level queues first and binds its queues to the delivery exchange
        // after: a read in between finds no target. Cached, it hid the delayed tasks for 30 s (a
        // pool whose retries all waited there was scaled to zero instead of one); read it again.
        if targets.as_ref().is_some_and(|t| !t.is_empty()) {
            *cached = Some((Instant::now(), targets.clone()));
        }
        targets
    }

    /// What a passive declare tells of each queue. A channel error concerns only its queue: the
    /// next queue is read on a fresh channel.
    async fn declare_passively(&self, queues: &[&str]) -> Result<Vec<Declared>, ProbeError> {
        let connection = self.connection().await?;
        let mut channel = self.channel(&connection).await?;
        let mut out = Vec::with_capacity(queues.len());
        for queue in queues {
            let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            match channel.queue_declare((*queue).into(), options, FieldTable::default()).await {
                Ok(q) => {
                    out.push(Declared::Found { ready: u64::from(q.message_count()), consumers: q.consumer_count() })
                }
                Err(e) if e.is_amqp_soft_error() => {
                    out.push(self.declared_after(&e));
                    channel = self.channel(&connection).await?;
                }
                Err(e) => {
                    *self.connection.lock().await = None;
                    return Err(ProbeError::broker(&self.url, e));
                }
            }
        }
        let _ = channel.close(200, "probe done".into()).await;
        Ok(out)
    }

    /// What a channel error on a passive declare says about its queue.
    fn declared_after(&self, e: &lapin::Error) -> Declared {
        let code = match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id(),
            _ => 0,
        };
        let detail = self.url.scrub(&e.to_string());
        match code {
            NOT_FOUND => Declared::Missing,
            RESOURCE_LOCKED => Declared::Failed(QueueFailure::Exclusive),
            ACCESS_REFUSED => Declared::Failed(QueueFailure::Forbidden(detail)),
            _ => Declared::Failed(QueueFailure::Unreadable(detail)),
        }
    }

    /// The vhost's queues by name, from the management API, without Celery's own (events,
    /// mailboxes, and the native delayed-delivery levels, which only dead-letter to the task
    /// queues); an error when no management API is configured (AMQP cannot list queues).
    pub(crate) async fn discover(&self) -> Result<Vec<String>, ProbeError> {
        let Some(management) = &self.management else {
            return Err(ProbeError::Management {
                endpoint: self.url.redacted(),
                detail: "no management API configured, and AMQP cannot list queues".into(),
            });
        };
        let (_, queues) = management.read(&self.vhost, self.timeout).await?;
        let own = |q: &str| is_celery_internal_queue(q) || delayed_level_of(q).is_some();
        let mut names: Vec<String> = queues.into_keys().filter(|q| !own(q)).collect();
        names.sort();
        Ok(names)
    }

    async fn channel(&self, connection: &Connection) -> Result<Channel, ProbeError> {
        connection.create_channel().await.map_err(|e| ProbeError::broker(&self.url, e))
    }

    /// The endpoint's one AMQP connection, reopened when it was lost.
    async fn connection(&self) -> Result<Arc<Connection>, ProbeError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.target.connect("celery-operator probe").await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

fn major_version(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

impl Management {
    fn new(url: &SecretUrl, amqp: &AMQPUri, config: &BrokerConfig) -> Result<Self, ProbeError> {
        let parsed = url::Url::parse(url.expose()).map_err(|e| ProbeError::invalid_url(url, e))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ProbeError::invalid_url(url, "the management URL must be http(s)://"));
        }
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        // Without credentials of its own, the management API is called with the AMQP ones.
        let (user, password) = if parsed.username().is_empty() {
            let info = &amqp.authority.userinfo;
            (info.username.clone(), info.password.clone())
        } else {
            (decode(parsed.username()), decode(parsed.password().unwrap_or_default()))
        };
        let mut base = parsed.clone();
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_query(None);
        let mut builder = reqwest::Client::builder().timeout(config.timeout);
        if let Some(pem) = &config.ca_cert_pem {
            let ca = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| ProbeError::CaCertificate { detail: e.to_string() })?;
            builder = builder.add_root_certificate(ca);
        }
        let client = builder.build().map_err(|e| ProbeError::management(url, e))?;
        Ok(Self { url: url.clone(), base: base.as_str().trim_end_matches('/').to_owned(), user, password, client })
    }

    async fn get(&self, path: &str) -> Result<Value, ProbeError> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| ProbeError::management(&self.url, e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(ProbeError::management(&self.url, format!("GET {path}: HTTP {status}")));
        }
        response.json().await.map_err(|e| ProbeError::management(&self.url, e.without_url()))
    }

    /// The queues the exchange `celery_delayed_delivery` routes to (through the exchanges it binds).
    async fn delayed_targets(&self, vhost: &str) -> Result<Vec<String>, ProbeError> {
        let vhost = utf8_percent_encode(vhost, NON_ALPHANUMERIC).to_string();
        let bindings = |exchange: &str| {
            let exchange = utf8_percent_encode(exchange, NON_ALPHANUMERIC);
            self.get_owned(format!("/api/exchanges/{vhost}/{exchange}/bindings/source"))
        };
        let delivery = bindings(native_delay::DELIVERY_EXCHANGE).await?;
        let names = native_delay::bound_exchanges(&delivery);
        let listed = futures::future::try_join_all(names.iter().map(|name| bindings(name))).await?;
        let exchanges = names.into_iter().zip(listed).collect();
        Ok(native_delay::delivery_targets(&delivery, &exchanges))
    }

    async fn get_owned(&self, path: String) -> Result<Value, ProbeError> {
        self.get(&path).await
    }

    /// The server version and the vhost's queues by name, in two concurrent requests.
    async fn read(
        &self,
        vhost: &str,
        timeout: Duration,
    ) -> Result<(Option<String>, HashMap<String, Value>), ProbeError> {
        let vhost = utf8_percent_encode(vhost, NON_ALPHANUMERIC);
        let overview = self.get("/api/overview?columns=rabbitmq_version");
        let queues_path = format!("/api/queues/{vhost}?columns={QUEUE_COLUMNS}");
        let queues = self.get(&queues_path);
        let both = async { futures::try_join!(overview, queues) };
        let (overview, queues) =
            tokio::time::timeout(timeout, both).await.map_err(|_| ProbeError::timeout(&self.url, timeout))??;
        let version = overview["rabbitmq_version"].as_str().map(str::to_owned);
        let by_name = match queues {
            Value::Array(list) => list.into_iter().filter_map(|q| Some((q["name"].as_str()?.to_owned(), q))).collect(),
            other => {
                return Err(ProbeError::management(&self.url, format!("unexpected reply to {queues_path}: {other}")));
            }
        };
        Ok((version, by_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions_parse() {
        assert_eq!(major_version("3.10.8"), Some(3));
        assert_eq!(major_version("4.1.0"), Some(4));
        assert_eq!(major_version("garbage"), None);
    }
}
