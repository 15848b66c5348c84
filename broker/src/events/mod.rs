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

mod amqp;
mod parse;
mod redis;
mod registry;

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::redis::redis_channels;
pub use parse::{EventError, WorkerEvent, WorkerEventKind, parse_event_body, parse_redis_message};
pub use registry::{FORGET_AFTER, MAX_WORKERS, MIN_ALIVE_WINDOW, WorkerState};

use self::redis::RedisSource;
use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};
use amqp::AmqpSource;
use registry::Registry;

/// Celery's event exchange (`event_exchange` setting, default `celeryev`).
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The routing keys of the worker events this module reads.
pub const WORKER_ROUTING_KEYS: [&str; 3] = ["worker.online", "worker.heartbeat", "worker.offline"];

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

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

#[cfg(test)]
mod tests {
    use super::*;

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
