//! Worker events: which Celery workers are alive and how many tasks each is running, from the
//! events every worker publishes on the broker.
//!
//! ```no_run
//! # async fn example() -> Result<(), celery_broker::ProbeError> {
//! use celery_broker::BrokerConfig;
//! use celery_broker::events::WorkerEvents;
//!
//! let events = WorkerEvents::start(&BrokerConfig::new("redis://:secret@redis:6379/0"))?;
//! // … later, on every autoscaling pass:
//! for worker in events.alive() {
//!     println!("{} runs {} tasks", worker.hostname, worker.active);
//! }
//! # Ok(()) }
//! ```
//!
//! # Worker events
//!
//! A Celery worker sends `worker-online` when it starts, `worker-heartbeat` every 2 s (`freq`) and
//! `worker-offline` on a warm shutdown. It does so without `-E` and with `--without-mingle
//! --without-gossip`; only `--without-heartbeat` turns heartbeats off. Each event is a JSON object
//! with `hostname` (the `-n` name, `pool@<POD_NAME>` for pods the operator runs), `active` (tasks
//! executing right now), `processed` (tasks started since the worker started), `freq`, `timestamp`
//! and `type`. Seen with Celery 5.7:
//!
//! - **Redis**: pub/sub channels `{global_keyprefix}/{db}.celeryev/worker.online`,
//!   `….heartbeat` and `….offline` (e.g. `tenant-a:/3.celeryev/worker.heartbeat` for
//!   `redis://…/3` with `global_keyprefix: "tenant-a:"`). Each message is a kombu envelope: JSON
//!   with `body` (the event, base64 when `properties.body_encoding` is `base64`), `content-type`
//!   (`application/json`), `headers` and `properties`. [`WorkerEvents`] opens one dedicated
//!   connection per endpoint and `SUBSCRIBE`s to exactly those three channels (db from the URL,
//!   prefix from [`TransportOptions`](crate::TransportOptions)); it `PING`s every 10 s so a
//!   silently dead connection is noticed.
//! - **RabbitMQ**: topic exchange `celeryev` (Celery declares it durable, not auto-delete, no
//!   arguments), routing keys `worker.online`/`worker.heartbeat`/`worker.offline`, body the JSON
//!   event itself with content type `application/json`. [`WorkerEvents`] declares the exchange
//!   passively (and, only if it does not exist yet, exactly as Celery does, so it never meets
//!   `PRECONDITION_FAILED`), declares a server-named exclusive auto-delete queue with
//!   `x-message-ttl` 10 s (so it cannot grow if the subscriber stalls), binds it with `worker.#`
//!   and consumes without acks. AMQP heartbeats detect a dead connection.
//!
//! A worker is **alive** while it was heard from within `max(3 × freq, 6 s)` (Celery's own
//! monitors use a similar window) and has not announced `worker-offline`. Times are this
//! process's receipt times, so worker clock skew does not matter. Workers offline or silent for
//! 10 minutes are forgotten, and at most 10,000 are remembered, so memory stays bounded. Messages
//! that are not worker events of a known type (task events under `-E`, custom `worker-*`
//! events) are counted as ignored; malformed ones (not JSON, another serializer such as pickle,
//! bad base64, missing `hostname` or `active`) as malformed — never a panic. See [`EventStats`].
//!
//! The subscription runs in a background Tokio task that reconnects with backoff (0.25 s doubling
//! to 5 s) after a broker outage; [`WorkerEvents::is_subscribed`] is false meanwhile, and the
//! workers it knew age out of [`WorkerEvents::alive`] after their window. Errors are logged and
//! kept in [`WorkerEvents::last_error`] with the URL's password removed.
//!
//! Caveats for the autoscaler:
//! - `active` is sampled when the heartbeat is sent, so it lags by up to `freq` (2 s).
//! - `active` counts every executing task. With `acks_late` those are *also* in the broker's
//!   unacked count; add `active` to in-flight only where running tasks are invisible in the broker
//!   (`acks_late` off), or take the larger of the two.
//! - Not supported: a renamed event exchange (Celery's `event_exchange` setting), kombu's
//!   non-default `fanout_prefix`/`fanout_patterns` Redis transport options, and event serializers
//!   other than JSON (`event_serializer`); such messages count as malformed or are never seen.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};

// The Redis probe's URL handling (TLS options, CA, Sentinel), shared rather than copied.
use crate::redis::connect as redis_connect;

/// Celery's event exchange (`event_exchange` setting, default `celeryev`).
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The routing keys of the worker events this module reads.
pub const WORKER_ROUTING_KEYS: [&str; 3] = ["worker.online", "worker.heartbeat", "worker.offline"];
/// The shortest time a worker counts as alive after it was last heard from.
pub const MIN_ALIVE_WINDOW: Duration = Duration::from_secs(6);
/// Workers offline or silent this long are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// At most this many workers are remembered per endpoint.
pub const MAX_WORKERS: usize = 10_000;

/// Celery's default heartbeat interval, used when an event carries no usable `freq`.
const DEFAULT_FREQ: Duration = Duration::from_secs(2);
const MIN_FREQ: Duration = Duration::from_millis(100);
const MAX_FREQ: Duration = Duration::from_secs(3600);
const PRUNE_EVERY: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// `x-message-ttl` of the RabbitMQ subscription queue, in milliseconds.
const QUEUE_MESSAGE_TTL_MS: i32 = 10_000;
const NOT_FOUND: u16 = 404;

/// What a worker event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEventKind {
    Online,
    Heartbeat,
    Offline,
}

/// One worker event, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEvent {
    pub kind: WorkerEventKind,
    pub hostname: String,
    /// Tasks executing when the event was sent (0 when a `worker-offline` omits it).
    pub active: u32,
    /// Tasks the worker started since it started.
    pub processed: u64,
    /// The worker's heartbeat interval (2 s unless the worker is configured otherwise), clamped
    /// to 0.1 s – 1 h.
    pub freq: Duration,
}

/// Why a message could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON object")]
    NotJson,
    #[error("unsupported content type {0} (only application/json events are read)")]
    ContentType(String),
    #[error("body is not valid base64")]
    Base64,
    #[error("field {0} is missing or has the wrong type")]
    Field(&'static str),
}

/// Parses a message from a Redis events channel: kombu's JSON envelope around the event.
/// `Ok(None)` for a well-formed event that is not a worker event this module tracks.
pub fn parse_redis_message(payload: &[u8]) -> Result<Option<WorkerEvent>, EventError> {
    let envelope: Value = serde_json::from_slice(payload).map_err(|_| EventError::NotJson)?;
    let envelope = envelope.as_object().ok_or(EventError::NotJson)?;
    let body = envelope.get("body").and_then(Value::as_str).ok_or(EventError::Field("body"))?;
    let encoding = envelope.get("properties").and_then(|p| p.get("body_encoding")).and_then(Value::as_str);
    let body = match encoding {
        Some("base64") => decode_base64(body).ok_or(EventError::Base64)?,
        _ => body.as_bytes().to_vec(),
    };
    parse_event_body(&body, envelope.get("content-type").and_then(Value::as_str))
}

/// Parses an event body (the AMQP message body, or the decoded body of a Redis envelope) with its
/// content type. `Ok(None)` for a well-formed event that is not a worker event this module tracks.
pub fn parse_event_body(body: &[u8], content_type: Option<&str>) -> Result<Option<WorkerEvent>, EventError> {
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(EventError::ContentType(content_type.chars().take(64).collect()));
        }
    }
    let event: Value = serde_json::from_slice(body).map_err(|_| EventError::NotJson)?;
    let event = event.as_object().ok_or(EventError::NotJson)?;
    let kind = match event.get("type").and_then(Value::as_str).ok_or(EventError::Field("type"))? {
        "worker-online" => WorkerEventKind::Online,
        "worker-heartbeat" => WorkerEventKind::Heartbeat,
        "worker-offline" => WorkerEventKind::Offline,
        _ => return Ok(None),
    };
    let hostname = event.get("hostname").and_then(Value::as_str).filter(|h| !h.is_empty());
    let hostname = hostname.ok_or(EventError::Field("hostname"))?.to_owned();
    let active = match (event.get("active").map(Value::as_u64), kind) {
        (Some(Some(n)), _) => u32::try_from(n).unwrap_or(u32::MAX),
        (None, WorkerEventKind::Offline) => 0,
        _ => return Err(EventError::Field("active")),
    };
    let processed = event.get("processed").and_then(Value::as_u64).unwrap_or(0);
    let freq = event
        .get("freq")
        .and_then(Value::as_f64)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .filter(|freq| !freq.is_zero())
        .map_or(DEFAULT_FREQ, |freq| freq.clamp(MIN_FREQ, MAX_FREQ));
    Ok(Some(WorkerEvent { kind, hostname, active, processed, freq }))
}

/// Standard base64 (as Python's `base64.b64encode` writes it), padding optional.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            bits |= value(c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// The Redis channels Celery publishes worker events on, for kombu's default `fanout_prefix` and
/// `fanout_patterns`.
pub fn redis_channels(global_keyprefix: &str, db: i64) -> Vec<String> {
    WORKER_ROUTING_KEYS.iter().map(|key| format!("{global_keyprefix}/{db}.{EVENT_EXCHANGE}/{key}")).collect()
}

/// One worker's latest state from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerState {
    /// The worker's node name (`-n`), e.g. `pool@pod-name`.
    pub hostname: String,
    /// Tasks executing at its last event.
    pub active: u32,
    pub processed: u64,
    pub freq: Duration,
    /// When its last event arrived here.
    pub last_seen: Instant,
    /// False once it announced `worker-offline` (until it announces itself again).
    pub online: bool,
}

impl WorkerState {
    /// Heard from within `max(3 × freq, 6 s)` before `now` and not announced offline.
    pub fn is_alive_at(&self, now: Instant) -> bool {
        self.online && now.saturating_duration_since(self.last_seen) <= (self.freq * 3).max(MIN_ALIVE_WINDOW)
    }
}

/// Counters of what the subscription received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Worker events applied.
    pub events: u64,
    /// Well-formed messages that are not worker events (e.g. task events under `-E`).
    pub ignored: u64,
    /// Messages that could not be parsed.
    pub malformed: u64,
    /// Events from new workers dropped because [`MAX_WORKERS`] were remembered.
    pub dropped: u64,
    /// Times the subscription was established (1 + reconnections).
    pub subscriptions: u64,
}

/// The remembered workers: pure state, driven by events and a clock.
#[derive(Debug, Default)]
struct Registry {
    workers: HashMap<String, WorkerState>,
    last_prune: Option<Instant>,
}

impl Registry {
    /// Applies `event` received at `now`; false when it was dropped because the registry is full.
    fn apply(&mut self, event: WorkerEvent, now: Instant) -> bool {
        if self.last_prune.is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY) {
            self.prune(now);
        }
        if !self.workers.contains_key(&event.hostname) && self.workers.len() >= MAX_WORKERS {
            self.prune(now);
            self.workers.retain(|_, w| w.is_alive_at(now));
            if self.workers.len() >= MAX_WORKERS {
                return false;
            }
        }
        let state = WorkerState {
            online: event.kind != WorkerEventKind::Offline,
            hostname: event.hostname,
            active: event.active,
            processed: event.processed,
            freq: event.freq,
            last_seen: now,
        };
        self.workers.insert(state.hostname.clone(), state);
        true
    }

    fn prune(&mut self, now: Instant) {
        self.workers.retain(|_, w| now.saturating_duration_since(w.last_seen) < FORGET_AFTER);
        self.last_prune = Some(now);
    }

    fn sorted(&self, keep: impl Fn(&WorkerState) -> bool) -> Vec<WorkerState> {
        let mut out: Vec<WorkerState> = self.workers.values().filter(|w| keep(w)).cloned().collect();
        out.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        out
    }

    fn alive(&self, now: Instant) -> Vec<WorkerState> {
        self.sorted(|w| w.is_alive_at(now))
    }

    fn remembered(&self, now: Instant) -> Vec<WorkerState> {
        self.sorted(|w| now.saturating_duration_since(w.last_seen) < FORGET_AFTER)
    }
}

/// State shared between [`WorkerEvents`] and its background task.
#[derive(Default)]
struct Shared {
    registry: Mutex<Registry>,
    subscribed: AtomicBool,
    last_error: Mutex<Option<String>>,
    events: AtomicU64,
    ignored: AtomicU64,
    malformed: AtomicU64,
    dropped: AtomicU64,
    subscriptions: AtomicU64,
}

impl Shared {
    fn handle(&self, parsed: Result<Option<WorkerEvent>, EventError>) {
        match parsed {
            Ok(Some(event)) => {
                let applied = self.registry.lock().unwrap_or_else(|e| e.into_inner()).apply(event, Instant::now());
                let counter = if applied { &self.events } else { &self.dropped };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {
                self.ignored.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if self.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e, "ignoring a malformed Celery event (further ones are only counted)");
                }
            }
        }
    }

    fn set_subscribed(&self) {
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        self.subscribed.store(true, Ordering::SeqCst);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The live worker events of one broker endpoint. Subscribes once per endpoint; a background Tokio
/// task keeps the subscription alive (reconnecting with backoff after a broker outage, never
/// logging the password) until this is dropped.
pub struct WorkerEvents {
    shared: Arc<Shared>,
    endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WorkerEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerEvents")
            .field("endpoint", &self.endpoint)
            .field("subscribed", &self.is_subscribed())
            .finish_non_exhaustive()
    }
}

enum Source {
    Redis(RedisSource),
    Amqp(AmqpSource),
}

impl WorkerEvents {
    /// Starts the subscription for this endpoint (the same [`BrokerConfig`] as
    /// [`Broker::new`](crate::Broker::new): its URL, `global_keyprefix`, TLS and CA settings, and
    /// `timeout` as the bound on connecting and on each `PING`). Validates the URL and spawns the
    /// task; no I/O here. Fails on an invalid URL or outside a Tokio runtime.
    pub fn start(config: &BrokerConfig) -> Result<Self, ProbeError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ProbeError::broker(&config.url, "WorkerEvents::start needs a Tokio runtime"))?;
        let source = if crate::rabbitmq::is_amqp_url(&config.url) {
            Source::Amqp(AmqpSource::new(config)?)
        } else {
            Source::Redis(RedisSource::new(config)?)
        };
        let shared = Arc::new(Shared::default());
        let endpoint = config.url.redacted();
        let task = runtime.spawn(run(source, endpoint.clone(), shared.clone()));
        Ok(Self { shared, endpoint, task })
    }

    /// Workers alive now (see [`WorkerState::is_alive_at`]), sorted by hostname.
    pub fn alive(&self) -> Vec<WorkerState> {
        self.shared.registry().alive(Instant::now())
    }

    /// Every remembered worker, alive or not (offline ones with `online == false`), sorted by
    /// hostname.
    pub fn workers(&self) -> Vec<WorkerState> {
        self.shared.registry().remembered(Instant::now())
    }

    /// Whether the subscription is established (false while connecting or reconnecting).
    pub fn is_subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::SeqCst)
    }

    /// Why the last connection attempt or subscription failed, password removed; `None` until
    /// one fails.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stats(&self) -> EventStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let shared = &self.shared;
        EventStats {
            events: load(&shared.events),
            ignored: load(&shared.ignored),
            malformed: load(&shared.malformed),
            dropped: load(&shared.dropped),
            subscriptions: load(&shared.subscriptions),
        }
    }

    /// The broker URL with its password redacted.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for WorkerEvents {
    /// Stops the background task; its connection closes with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The background task: one session after another, with backoff between failures.
async fn run(source: Source, endpoint: String, shared: Arc<Shared>) {
    let mut backoff = BACKOFF_START;
    let mut quiet = false;
    loop {
        let Err(error) = match &source {
            Source::Redis(redis) => redis.session(&shared).await,
            Source::Amqp(amqp) => amqp.session(&shared).await,
        };
        if shared.subscribed.swap(false, Ordering::SeqCst) {
            tracing::warn!(%endpoint, %error, "lost the Celery worker events subscription; reconnecting");
            backoff = BACKOFF_START;
            quiet = false;
        } else if quiet {
            tracing::debug!(%endpoint, %error, "cannot subscribe to Celery worker events yet");
        } else {
            tracing::warn!(%endpoint, %error, "cannot subscribe to Celery worker events; retrying with backoff");
            quiet = true;
        }
        *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `future` bounded by `timeout`, its error a connection error about `url` (secrets scrubbed).
async fn bounded<T, E: Display>(
    url: &SecretUrl,
    timeout: Duration,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, ProbeError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => result.map_err(|e| ProbeError::connect(url, e)),
        Err(_) => Err(ProbeError::timeout(url, timeout)),
    }
}

struct RedisSource {
    url: SecretUrl,
    target: redis_connect::Target,
    prefix: String,
    timeout: Duration,
}

impl RedisSource {
    fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
        let target =
            redis_connect::target(&config.url, config.ca_cert_pem.as_deref(), config.transport.master_name.as_deref())?;
        Ok(Self {
            url: config.url.clone(),
            target,
            prefix: config.transport.global_keyprefix.clone(),
            timeout: config.timeout,
        })
    }

    /// Connects, subscribes and reads events until the connection fails.
    async fn session(&self, shared: &Shared) -> Result<Infallible, ProbeError> {
        let (url, timeout) = (&self.url, self.timeout);
        // Behind Sentinel this asks for the current master.
        let client = bounded(url, timeout, self.target.client()).await?;
        let channels = redis_channels(&self.prefix, client.get_connection_info().redis_settings().db());
        let (mut sink, mut stream) = bounded(url, timeout, client.get_async_pubsub()).await?.split();
        bounded(url, timeout, sink.subscribe(&channels)).await?;
        shared.set_subscribed();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => shared.handle(parse_redis_message(message.get_payload_bytes())),
                    None => return Err(ProbeError::connect(url, "the subscription's connection closed")),
                },
                _ = ping.tick() => {
                    bounded(url, timeout, sink.ping::<::redis::Value>()).await?;
                }
            }
        }
    }
}

struct AmqpSource {
    url: SecretUrl,
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    timeout: Duration,
}

impl AmqpSource {
    fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
        let url = &config.url;
        let text = url.expose().replacen("pyamqp://", "amqp://", 1);
        let mut uri: AMQPUri = text.parse().map_err(|e: String| ProbeError::invalid_url(url, e))?;
        // Kombu reads `amqp://h`, `amqp://h/` and `amqp://h//` as vhost `/`.
        if uri.vhost.is_empty() {
            uri.vhost = "/".to_owned();
        }
        let tls = OwnedTLSConfig { identity: None, cert_chain: config.ca_cert_pem.clone() };
        Ok(Self { url: url.clone(), uri, tls, timeout: config.timeout })
    }

    async fn session(&self, shared: &Shared) -> Result<Infallible, ProbeError> {
        let properties = ConnectionProperties::default().with_connection_name("celery-operator worker events".into());
        let builder = lapin::ConnectionBuilder::new()
            .map_err(|e| ProbeError::connect(&self.url, e))?
            .with_uri(self.uri.clone())
            .with_properties(properties)
            .with_tls_config(self.tls.clone());
        let connection = bounded(&self.url, self.timeout, builder.connect()).await?;
        let result = self.consume(&connection, shared).await;
        let _ = tokio::time::timeout(self.timeout, connection.close(200, "worker events done".into())).await;
        result
    }

    async fn channel(&self, connection: &Connection) -> Result<Channel, ProbeError> {
        bounded(&self.url, self.timeout, connection.create_channel()).await
    }

    async fn consume(&self, connection: &Connection, shared: &Shared) -> Result<Infallible, ProbeError> {
        let (url, timeout) = (&self.url, self.timeout);
        let mut channel = self.channel(connection).await?;
        let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
        let declared =
            channel.exchange_declare(EVENT_EXCHANGE.into(), ExchangeKind::Topic, passive, FieldTable::default());
        match tokio::time::timeout(timeout, declared).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_not_found(&e) => {
                // No worker has started on this vhost yet: declare it exactly as Celery does
                // (`Exchange('celeryev', type='topic')`: durable, not auto-delete, no arguments).
                channel = self.channel(connection).await?;
                let celerys = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
                let declare = channel.exchange_declare(
                    EVENT_EXCHANGE.into(),
                    ExchangeKind::Topic,
                    celerys,
                    FieldTable::default(),
                );
                bounded(url, timeout, declare).await?;
            }
            Ok(Err(e)) => return Err(ProbeError::broker(url, e)),
            Err(_) => return Err(ProbeError::timeout(url, timeout)),
        }
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(QUEUE_MESSAGE_TTL_MS));
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = bounded(url, timeout, channel.queue_declare("".into(), options, arguments)).await?;
        let bind = channel.queue_bind(
            queue.name().clone(),
            EVENT_EXCHANGE.into(),
            "worker.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        bounded(url, timeout, bind).await?;
        let options = BasicConsumeOptions { no_ack: true, exclusive: true, ..BasicConsumeOptions::default() };
        let consume = channel.basic_consume(
            queue.name().clone(),
            "celery-operator-worker-events".into(),
            options,
            FieldTable::default(),
        );
        let mut consumer = bounded(url, timeout, consume).await?;
        shared.set_subscribed();
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.map_err(|e| ProbeError::connect(url, e))?;
            let content_type = delivery.properties.content_type().as_ref().map(|t| t.as_str());
            shared.handle(parse_event_body(&delivery.data, content_type));
        }
        Err(ProbeError::connect(url, "the broker cancelled the events consumer"))
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `worker-heartbeat` exactly as Celery 5.7 published it on Redis (db 3,
    /// `global_keyprefix: "pfx:"`, channel `pfx:/3.celeryev/worker.heartbeat`), two tasks running.
    const REDIS_HEARTBEAT: &str = r#"{"body": "eyJob3N0bmFtZSI6ICJwb29sQHBvZEEiLCAidXRjb2Zmc2V0IjogMC4wLCAicGlkIjogMTEwNjMsICJjbG9jayI6IDMsICJmcmVxIjogMi4wLCAiYWN0aXZlIjogMiwgInByb2Nlc3NlZCI6IDIsICJsb2FkYXZnIjogWzEuNCwgMC43NiwgMC4zMV0sICJzd19pZGVudCI6ICJweS1jZWxlcnkiLCAic3dfdmVyIjogIjUuNy4wIiwgInN3X3N5cyI6ICJMaW51eCIsICJ0aW1lc3RhbXAiOiAxNzk1MjQzOTgzLjk3NzcxMzgsICJ0eXBlIjogIndvcmtlci1oZWFydGJlYXQifQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"hostname": "pool@podA"}, "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "abafdfe7-9974-4764-8dd0-1d93c41b8297"}}"#;

    /// A `worker-offline` body as Celery 5.7 published it on RabbitMQ.
    const AMQP_OFFLINE: &str = r#"{"hostname": "pool@podR", "utcoffset": 0.0, "pid": 16167, "clock": 4, "freq": 2.0, "active": 0, "processed": 0, "loadavg": [2.04, 1.25, 0.56], "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux", "timestamp": 1795244111.0, "type": "worker-offline"}"#;

    fn envelope(body: &str, content_type: &str) -> String {
        let encoded = encode_base64(body.as_bytes());
        serde_json::json!({
            "body": encoded,
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {},
            "properties": {"body_encoding": "base64"},
        })
        .to_string()
    }

    fn encode_base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
            }
        }
        out
    }

    fn heartbeat(hostname: &str, active: u32, freq: f64) -> WorkerEvent {
        let body =
            serde_json::json!({"type": "worker-heartbeat", "hostname": hostname, "active": active, "freq": freq});
        parse_event_body(body.to_string().as_bytes(), Some("application/json")).unwrap().unwrap()
    }

    #[test]
    fn a_real_redis_heartbeat_parses() {
        let event = parse_redis_message(REDIS_HEARTBEAT.as_bytes()).unwrap().unwrap();
        assert_eq!(
            event,
            WorkerEvent {
                kind: WorkerEventKind::Heartbeat,
                hostname: "pool@podA".into(),
                active: 2,
                processed: 2,
                freq: Duration::from_secs(2),
            }
        );
    }

    #[test]
    fn online_and_offline_parse_from_both_brokers() {
        let offline = parse_event_body(AMQP_OFFLINE.as_bytes(), Some("application/json")).unwrap().unwrap();
        assert_eq!(
            (offline.kind, offline.hostname.as_str(), offline.active),
            (WorkerEventKind::Offline, "pool@podR", 0)
        );

        let online = r#"{"type": "worker-online", "hostname": "p@x", "active": 0, "processed": 7, "freq": 5.0}"#;
        let parsed = parse_redis_message(envelope(online, "application/json").as_bytes()).unwrap().unwrap();
        assert_eq!(parsed.kind, WorkerEventKind::Online);
        assert_eq!((parsed.processed, parsed.freq), (7, Duration::from_secs(5)));

        // An offline event without `active` still says the worker left.
        let bare = parse_event_body(br#"{"type": "worker-offline", "hostname": "p@x"}"#, None).unwrap().unwrap();
        assert_eq!((bare.kind, bare.active), (WorkerEventKind::Offline, 0));
        // A body without base64 encoding is taken as it is.
        let plain = serde_json::json!({"body": online, "content-type": "application/json", "properties": {}});
        assert!(parse_redis_message(plain.to_string().as_bytes()).unwrap().is_some());
    }

    #[test]
    fn other_event_types_are_ignored_not_errors() {
        for kind in ["task-succeeded", "task-received", "worker-custom"] {
            let body = format!(r#"{{"type": "{kind}", "hostname": "p@x", "uuid": "1"}}"#);
            assert_eq!(parse_event_body(body.as_bytes(), Some("application/json")), Ok(None), "{kind}");
        }
    }

    #[test]
    fn garbage_and_missing_fields_are_errors() {
        let cases: [(&[u8], Option<&str>, EventError); 9] = [
            (b"not json", None, EventError::NotJson),
            (b"[1, 2]", None, EventError::NotJson),
            (br#"{"hostname": "p@x", "active": 1}"#, None, EventError::Field("type")),
            (br#"{"type": "worker-heartbeat", "active": 1}"#, None, EventError::Field("hostname")),
            (br#"{"type": "worker-heartbeat", "hostname": "", "active": 1}"#, None, EventError::Field("hostname")),
            (br#"{"type": "worker-heartbeat", "hostname": "p@x"}"#, None, EventError::Field("active")),
            (br#"{"type": "worker-online", "hostname": "p@x", "active": -1}"#, None, EventError::Field("active")),
            (br#"{"type": "worker-heartbeat", "hostname": "p@x", "active": "2"}"#, None, EventError::Field("active")),
            (
                b"\x80\x04\x95",
                Some("application/x-python-serialize"),
                EventError::ContentType("application/x-python-serialize".into()),
            ),
        ];
        for (body, content_type, expected) in cases {
            assert_eq!(parse_event_body(body, content_type), Err(expected), "{}", String::from_utf8_lossy(body));
        }
        let bad_envelopes: [(&str, EventError); 4] = [
            ("garbage", EventError::NotJson),
            (r#"{"content-type": "application/json"}"#, EventError::Field("body")),
            (r#"{"body": "!!!", "properties": {"body_encoding": "base64"}}"#, EventError::Base64),
            (r#"{"body": "bm90IGpzb24=", "properties": {"body_encoding": "base64"}}"#, EventError::NotJson),
        ];
        for (payload, expected) in bad_envelopes {
            assert_eq!(parse_redis_message(payload.as_bytes()), Err(expected), "{payload}");
        }
    }

    #[test]
    fn no_truncation_or_corruption_of_a_real_message_panics() {
        let real = REDIS_HEARTBEAT.as_bytes();
        for end in 0..real.len() {
            let _ = parse_redis_message(&real[..end]);
        }
        for i in 0..real.len() {
            let mut corrupted = real.to_vec();
            corrupted[i] ^= 0x55;
            let _ = parse_redis_message(&corrupted);
        }
    }

    #[test]
    fn freq_is_clamped_and_defaulted_without_panicking() {
        let cases = [
            (2.0, Duration::from_secs(2)),
            (0.0, DEFAULT_FREQ),
            (-1.0, DEFAULT_FREQ),
            (1e300, DEFAULT_FREQ),
            (0.001, MIN_FREQ),
            (1e6, MAX_FREQ),
        ];
        for (freq, expected) in cases {
            assert_eq!(heartbeat("p@x", 0, freq).freq, expected, "{freq}");
        }
        let no_freq = parse_event_body(br#"{"type": "worker-heartbeat", "hostname": "p@x", "active": 0}"#, None);
        assert_eq!(no_freq.unwrap().unwrap().freq, DEFAULT_FREQ);
    }

    #[test]
    fn base64_decodes_like_python() {
        for text in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "{\"a\": \u{e9}}"] {
            let encoded = encode_base64(text.as_bytes());
            assert_eq!(decode_base64(&encoded).as_deref(), Some(text.as_bytes()), "{encoded}");
            assert_eq!(decode_base64(encoded.trim_end_matches('=')).as_deref(), Some(text.as_bytes()));
        }
        assert_eq!(decode_base64("Zm9v YmFy"), None);
        assert_eq!(decode_base64("Zm9vY"), None);
        assert_eq!(decode_base64("Zm9-"), None);
    }

    #[test]
    fn redis_channels_carry_prefix_and_db() {
        assert_eq!(
            redis_channels("", 0),
            ["/0.celeryev/worker.online", "/0.celeryev/worker.heartbeat", "/0.celeryev/worker.offline"]
        );
        assert_eq!(redis_channels("tenant-a:", 3)[1], "tenant-a:/3.celeryev/worker.heartbeat");
    }

    #[test]
    fn alive_means_heard_within_three_heartbeats_or_six_seconds() {
        let t0 = Instant::now();
        let secs = Duration::from_secs_f64;
        let mut registry = Registry::default();
        registry.apply(heartbeat("fast@a", 1, 1.0), t0);
        registry.apply(heartbeat("normal@b", 2, 2.0), t0);
        registry.apply(heartbeat("slow@c", 3, 10.0), t0);
        let names = |at: Instant| registry.alive(at).into_iter().map(|w| w.hostname).collect::<Vec<_>>();
        assert_eq!(names(t0 + secs(5.9)), ["fast@a", "normal@b", "slow@c"]);
        assert_eq!(names(t0 + secs(6.1)), ["slow@c"]);
        assert_eq!(names(t0 + secs(29.9)), ["slow@c"]);
        assert!(names(t0 + secs(30.1)).is_empty());
        // Silent workers are still remembered (not alive) until FORGET_AFTER.
        assert_eq!(registry.remembered(t0 + secs(31.0)).len(), 3);
    }

    #[test]
    fn the_latest_event_wins_and_offline_workers_are_not_alive() {
        let t0 = Instant::now();
        let mut registry = Registry::default();
        registry.apply(heartbeat("w@a", 3, 2.0), t0);
        registry.apply(heartbeat("w@a", 1, 2.0), t0 + Duration::from_secs(2));
        let alive = registry.alive(t0 + Duration::from_secs(3));
        assert_eq!((alive.len(), alive[0].active), (1, 1));

        let offline = WorkerEvent { kind: WorkerEventKind::Offline, ..heartbeat("w@a", 0, 2.0) };
        registry.apply(offline, t0 + Duration::from_secs(4));
        assert!(registry.alive(t0 + Duration::from_secs(4)).is_empty());
        let remembered = registry.remembered(t0 + Duration::from_secs(4));
        assert_eq!((remembered.len(), remembered[0].online), (1, false));

        // The same hostname coming back (a restarted container) is alive again.
        registry.apply(heartbeat("w@a", 0, 2.0), t0 + Duration::from_secs(5));
        assert_eq!(registry.alive(t0 + Duration::from_secs(5)).len(), 1);
    }

    #[test]
    fn memory_stays_bounded() {
        let t0 = Instant::now();
        let mut registry = Registry::default();
        registry.apply(heartbeat("old@a", 0, 2.0), t0);
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        registry.apply(heartbeat("new@b", 0, 2.0), later);
        assert_eq!(registry.workers.keys().collect::<Vec<_>>(), ["new@b"], "forgotten after FORGET_AFTER");

        // A flood of hostnames: alive ones are kept up to MAX_WORKERS, further new ones dropped…
        let mut registry = Registry::default();
        for i in 0..MAX_WORKERS {
            assert!(registry.apply(heartbeat(&format!("w@{i}"), 0, 2.0), t0));
        }
        assert!(!registry.apply(heartbeat("one-too-many@x", 0, 2.0), t0));
        assert!(registry.apply(heartbeat("w@0", 5, 2.0), t0), "known workers still update");
        // …until the silent ones stop being alive and make room.
        assert!(registry.apply(heartbeat("next@y", 0, 2.0), t0 + Duration::from_secs(7)));
        assert_eq!(registry.workers.len(), 1);
    }

    #[tokio::test]
    async fn start_refuses_bad_urls_without_showing_the_password() {
        for url in ["redis://:hunter2@h/notadb", "amqp://u:hunter2@h:notaport/", "ftp://u:hunter2@h/"] {
            let err = WorkerEvents::start(&BrokerConfig::new(url)).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
        }
    }

    #[test]
    fn start_outside_a_runtime_is_an_error_not_a_panic() {
        let err = WorkerEvents::start(&BrokerConfig::new("redis://:hunter2@localhost/0")).unwrap_err();
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
        assert!(!err.to_string().contains("hunter2"));
    }
}
