//! From a Celery broker URL to a lapin connection, shared by the RabbitMQ probe and the worker
//! events subscription: kombu's reading of the URL (Celery's `pyamqp://`, the vhost), the CA to
//! trust for `amqps://`, and the bound on connecting.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::secret::SecretUrl;
use crate::{BrokerConfig, ProbeError};

const NOT_FOUND: u16 = 404;

/// Where an endpoint's AMQP connections go.
pub(crate) struct Target {
    url: SecretUrl,
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    timeout: Duration,
}

impl Target {
    /// Parses the URL (no I/O); `config.ca_cert_pem` replaces the system roots for `amqps://` and
    /// `config.timeout` bounds [`Target::connect`].
    pub(crate) fn new(config: &BrokerConfig) -> Result<Self, ProbeError> {
        let url = &config.url;
        // Celery's `pyamqp://` is plain AMQP 0-9-1.
        let text = url.expose().replacen("pyamqp://", "amqp://", 1);
        let mut uri: AMQPUri = text.parse().map_err(|e: String| ProbeError::invalid_url(url, e))?;
        uri.vhost = vhost_of(&uri);
        let tls = OwnedTLSConfig { identity: None, cert_chain: config.ca_cert_pem.clone() };
        Ok(Self { url: url.clone(), uri, tls, timeout: config.timeout })
    }

    /// The parsed URL, vhost as kombu reads it.
    pub(crate) fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    /// Opens a connection that shows as `name` in RabbitMQ's connection list.
    pub(crate) async fn connect(&self, name: &str) -> Result<Connection, ProbeError> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let builder = lapin::ConnectionBuilder::new()
            .map_err(|e| ProbeError::connect(&self.url, e))?
            .with_uri(self.uri.clone())
            .with_properties(properties)
            .with_tls_config(self.tls.clone());
        match tokio::time::timeout(self.timeout, builder.connect()).await {
            Ok(connected) => connected.map_err(|e| ProbeError::connect(&self.url, e)),
            Err(_) => Err(ProbeError::timeout(&self.url, self.timeout)),
        }
    }
}

/// Kombu's reading of the AMQP URL path: `amqp://h`, `amqp://h/` and `amqp://h//` all mean vhost
/// `/`; otherwise the percent-decoded path after the first `/`.
fn vhost_of(uri: &AMQPUri) -> String {
    if uri.vhost.is_empty() { "/".to_owned() } else { uri.vhost.clone() }
}

/// Whether a passive declare failed because the queue or exchange does not exist (channel error
/// 404 NOT_FOUND, which also closes the channel).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhosts_are_read_the_way_kombu_reads_them() {
        let cases = [
            ("amqp://h", "/"),
            ("amqp://h/", "/"),
            ("amqp://h//", "/"),
            ("amqp://h/%2F", "/"),
            ("amqp://h/prod", "prod"),
            ("amqp://h/team%2Fa", "team/a"),
            ("pyamqp://h/prod", "prod"),
        ];
        for (url, expected) in cases {
            let target = Target::new(&BrokerConfig::new(url)).unwrap();
            assert_eq!(target.uri().vhost, expected, "{url}");
        }
    }
}
