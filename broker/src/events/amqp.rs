//! The AMQP source: a server-named, exclusive, auto-delete queue with a message TTL, bound to
//! Celery's `celeryev` topic exchange with `worker.#`, consumed without acks. AMQP heartbeats
//! detect a dead connection.

use std::convert::Infallible;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::{EVENT_EXCHANGE, Shared, bounded, parse_event_body};
// The probe's URL handling (kombu's vhost, TLS and CA), shared rather than copied.
use crate::rabbitmq::connect::{self as amqp_connect, is_not_found};
use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};

/// `x-message-ttl` of the subscription queue, in milliseconds.
const QUEUE_MESSAGE_TTL_MS: i32 = 10_000;

/// Consumes one RabbitMQ endpoint's worker events.
pub(super) struct AmqpSource {
    url: SecretUrl,
    target: amqp_connect::Target,
    timeout: Duration,
}

impl AmqpSource {
    pub(super) fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
        Ok(Self { url: config.url.clone(), target: amqp_connect::Target::new(config)?, timeout: config.timeout })
    }

    pub(super) async fn session(&self, shared: &Shared) -> Result<Infallible, ProbeError> {
        let connection = self.target.connect("celery-operator worker events").await?;
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
