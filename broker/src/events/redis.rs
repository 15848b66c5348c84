//! The Redis source: a dedicated pub/sub connection `SUBSCRIBE`d to the three worker-event
//! channels, `PING`ed so a silently dead connection is noticed.

use std::convert::Infallible;
use std::time::Duration;

use futures::StreamExt;

use super::{EVENT_EXCHANGE, Shared, WORKER_ROUTING_KEYS, bounded, parse_redis_message};
// The Redis probe's URL handling (TLS options, CA, Sentinel), shared rather than copied.
use crate::redis::connect as redis_connect;
use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};

const PING_EVERY: Duration = Duration::from_secs(10);

/// The Redis channels Celery publishes worker events on, for kombu's default `fanout_prefix` and
/// `fanout_patterns`.
pub fn redis_channels(global_keyprefix: &str, db: i64) -> Vec<String> {
    WORKER_ROUTING_KEYS.iter().map(|key| format!("{global_keyprefix}/{db}.{EVENT_EXCHANGE}/{key}")).collect()
}

/// Subscribes to one Redis endpoint's worker-event channels.
pub(super) struct RedisSource {
    url: SecretUrl,
    target: redis_connect::Target,
    prefix: String,
    timeout: Duration,
}

impl RedisSource {
    pub(super) fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
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
    pub(super) async fn session(&self, shared: &Shared) -> Result<Infallible, ProbeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_channels_carry_prefix_and_db() {
        assert_eq!(
            redis_channels("", 0),
            ["/0.celeryev/worker.online", "/0.celeryev/worker.heartbeat", "/0.celeryev/worker.offline"]
        );
        assert_eq!(redis_channels("tenant-a:", 3)[1], "tenant-a:/3.celeryev/worker.heartbeat");
    }
}
