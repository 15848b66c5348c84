//! Celery broker probes: queue depth read straight from Redis (kombu's layout) or RabbitMQ, and
//! broker safety checks. No Kubernetes in here.
//!
//! ```no_run
//! # async fn example() -> Result<(), celery_broker::ProbeError> {
//! use celery_broker::{Broker, BrokerConfig};
//!
//! let broker = Broker::new(BrokerConfig::new("redis://:secret@redis:6379/0"))?;
//! let seen = broker.probe(&["emails", "celery"]).await?;
//! let emails = &seen.queues["emails"];
//! println!("{} waiting, {:?} in flight", emails.ready, emails.unacked);
//! for finding in &seen.findings {
//!     println!("{finding}");
//! }
//! # Ok(()) }
//! ```
//!
//! One [`Broker`] per endpoint holds one connection (a Redis `ConnectionManager`, one AMQP
//! connection) shared by every probe; create it once and probe all of the endpoint's queues in one
//! call. For Redis that is one pipelined round trip: every priority list's `LLEN`, a server-side
//! script that counts the shared unacked hash per queue, and `INFO` for the safety checks (design
//! and trade-offs in `src/redis/mod.rs`, numbers in `BENCHMARKS-broker.md`). For RabbitMQ it is a
//! passive `queue.declare` per queue plus, optionally, the management API.

mod audit;
mod error;
pub mod events;
pub mod kombu;
pub mod latency;
mod native_delay;
mod observation;
mod rabbitmq;
mod redis;
pub mod safety;
pub mod schedule;
mod secret;

use std::time::Duration;

pub use audit::{AuditReport, audit};
pub use error::ProbeError;
pub use kombu::TransportOptions;
pub use latency::{LatencyTracker, ProbeHints};
pub use observation::{BrokerInfo, BrokerKind, BrokerObservation, DelayedDelivery, QueueObservation};
pub use safety::{Finding, QueueFailure, Reason, SafetyMode, Severity};
pub use schedule::{DueHistogram, Scheduled};
pub use secret::{SecretUrl, redact_url};

/// Default bound on one probe (connect + round trip).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default largest Redis unacked hash scanned in full (about 7 ms of Redis time); larger ones are
/// sampled.
pub const DEFAULT_UNACKED_SCAN_LIMIT: u64 = 2_000;
/// Default number of waiting Redis messages the probe walks per poll (all lists together) to
/// find scheduled tasks on the lists and the oldest due one (BENCHMARKS-broker.md).
pub const DEFAULT_LIST_SCAN_LIMIT: u64 = 1_000;

/// How to reach and judge one broker endpoint.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `redis://`, `rediss://`, `redis+socket://`, `amqp://`, `amqps://` or `pyamqp://`, as in
    /// Celery's `broker_url`.
    pub url: SecretUrl,
    /// Kombu's Redis transport options (ignored for RabbitMQ).
    pub transport: TransportOptions,
    /// RabbitMQ management API root, e.g. `http://user:pass@rabbit:15672`; without credentials
    /// the AMQP ones are used.
    pub management_url: Option<SecretUrl>,
    /// PEM CA certificate(s) to trust for `rediss://`, `amqps://` and an `https://` management API,
    /// instead of the system roots. For Redis, `?ssl_ca_certs=/path` in the URL works too.
    pub ca_cert_pem: Option<String>,
    pub safety: SafetyMode,
    /// Bound on one probe.
    pub timeout: Duration,
    /// Redis: unacked hashes larger than this are estimated from a sample of this many entries
    /// (the scan runs inside Redis, about 4 µs per entry, and blocks it while it runs).
    pub unacked_scan_limit: u64,
    /// Redis: waiting messages walked per probe, all lists together, from each list's head (shared
    /// out so short lists are walked whole; every non-empty list gets at least one). Scheduled
    /// tasks past the walk count as waiting. 0 turns the walk off: no scheduled tasks on the lists
    /// and no queue latency, for fleets where its per-list cost (a few µs of Redis time per
    /// non-empty list, BENCHMARKS-broker.md) matters.
    pub list_scan_limit: u64,
}

impl BrokerConfig {
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        Self {
            url: url.into(),
            transport: TransportOptions::default(),
            management_url: None,
            ca_cert_pem: None,
            safety: SafetyMode::default(),
            timeout: DEFAULT_TIMEOUT,
            unacked_scan_limit: DEFAULT_UNACKED_SCAN_LIMIT,
            list_scan_limit: DEFAULT_LIST_SCAN_LIMIT,
        }
    }
}

/// A probe of one broker endpoint. Cheap to share (`Arc<Broker>`); connects lazily on the first
/// probe and reconnects after failures.
pub struct Broker {
    inner: Inner,
}

enum Inner {
    Redis(Box<redis::RedisBroker>),
    Rabbitmq(Box<rabbitmq::RabbitBroker>),
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("kind", &self.kind()).field("endpoint", &self.endpoint()).finish()
    }
}

impl Broker {
    /// Validates the URL (and CA) and prepares the client; no network I/O.
    pub fn new(config: BrokerConfig) -> Result<Self, ProbeError> {
        let inner = if rabbitmq::is_amqp_url(&config.url) {
            Inner::Rabbitmq(Box::new(rabbitmq::RabbitBroker::new(&config)?))
        } else {
            Inner::Redis(Box::new(redis::RedisBroker::new(&config)?))
        };
        Ok(Self { inner })
    }

    pub fn kind(&self) -> BrokerKind {
        match self.inner {
            Inner::Redis(_) => BrokerKind::Redis,
            Inner::Rabbitmq(_) => BrokerKind::Rabbitmq,
        }
    }

    /// The broker URL with its password redacted.
    pub fn endpoint(&self) -> String {
        match &self.inner {
            Inner::Redis(b) => b.url().redacted(),
            Inner::Rabbitmq(b) => b.url().redacted(),
        }
    }

    /// The Celery task queues this broker holds, sorted, without Celery's own event,
    /// remote-control and native delayed-delivery queues: kombu's binding sets on Redis (a `SCAN` of the keyspace), the
    /// management API on RabbitMQ (which is required: AMQP cannot list queues). For one-off audits.
    pub async fn discover(&self) -> Result<Vec<String>, ProbeError> {
        match &self.inner {
            Inner::Redis(b) => b.discover().await,
            Inner::Rabbitmq(b) => b.discover().await,
        }
    }

    /// Reads every queue in `queues` (Celery queue names; duplicates are read once) in one go.
    /// A failure of the whole probe (unreachable, timeout, refused) is an error; a queue that cannot
    /// be read (missing, exclusive, forbidden) or an unavailable part (management API, unacked
    /// counts) is a finding, and the rest of the probe runs.
    pub async fn probe<Q: AsRef<str>>(&self, queues: &[Q]) -> Result<BrokerObservation, ProbeError> {
        self.probe_with(queues, &ProbeHints::default()).await
    }

    /// [`probe`](Self::probe), also looking for what a [`LatencyTracker`] asks about (Redis; the
    /// RabbitMQ probe needs no hints).
    pub async fn probe_with<Q: AsRef<str>>(
        &self,
        queues: &[Q],
        hints: &ProbeHints,
    ) -> Result<BrokerObservation, ProbeError> {
        let mut seen = std::collections::HashSet::new();
        let queues: Vec<&str> = queues.iter().map(AsRef::as_ref).filter(|q| seen.insert(*q)).collect();
        // Boxed: the probes' state machines are deep, and callers' futures embed them (a reconciler
        // awaiting a probe hit rustc's query depth limit).
        match &self.inner {
            Inner::Redis(b) => Box::pin(b.probe(&queues, hints)).await,
            Inner::Rabbitmq(b) => Box::pin(b.probe(&queues)).await,
        }
    }
}
