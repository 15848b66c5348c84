//! Probe errors. Every endpoint in them is redacted and every detail scrubbed of the URL's
//! secrets, so they can be logged, put in conditions and Events as they are.

use std::time::Duration;

use crate::secret::SecretUrl;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("invalid broker URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot read the CA certificate: {detail}")]
    CaCertificate { detail: String },
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("broker {endpoint} failed: {detail}")]
    Broker { endpoint: String, detail: String },
    #[error("broker {endpoint} did not answer within {after:?}")]
    Timeout { endpoint: String, after: Duration },
    #[error("RabbitMQ management API {endpoint}: {detail}")]
    Management { endpoint: String, detail: String },
}

impl ProbeError {
    /// A short, stable label for metrics (`probe_errors_total{kind=…}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidUrl { .. } => "invalid_url",
            Self::CaCertificate { .. } => "ca_certificate",
            Self::Connect { .. } => "connect",
            Self::Broker { .. } => "broker",
            Self::Timeout { .. } => "timeout",
            Self::Management { .. } => "management",
        }
    }

    /// When the value does not read as a URL, the library's `reason` is replaced by ours: a
    /// library may quote any fragment of the text, and any fragment may be the password.
    pub(crate) fn invalid_url(url: &SecretUrl, reason: impl std::fmt::Display) -> Self {
        let reason = match url.unreadable() {
            Some(why) => format!(
                "{why}; the value is not shown because it may be or contain the password (expected a Celery \
                 broker URL such as redis://:PASSWORD@HOST:6379/0 or amqp://USER:PASSWORD@HOST:5672/VHOST)"
            ),
            None => url.scrub(&reason.to_string()),
        };
        Self::InvalidUrl { url: url.redacted(), reason }
    }

    pub(crate) fn connect(url: &SecretUrl, detail: impl std::fmt::Display) -> Self {
        Self::Connect { endpoint: url.redacted(), detail: url.scrub(&detail.to_string()) }
    }

    pub(crate) fn broker(url: &SecretUrl, detail: impl std::fmt::Display) -> Self {
        Self::Broker { endpoint: url.redacted(), detail: url.scrub(&detail.to_string()) }
    }

    pub(crate) fn timeout(url: &SecretUrl, after: Duration) -> Self {
        Self::Timeout { endpoint: url.redacted(), after }
    }

    pub(crate) fn management(url: &SecretUrl, detail: impl std::fmt::Display) -> Self {
        Self::Management { endpoint: url.redacted(), detail: url.scrub(&detail.to_string()) }
    }
}
