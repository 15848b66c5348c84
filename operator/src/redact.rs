//! Broker URLs hold passwords: this type keeps them out of logs, status, events and errors.

use std::fmt;

/// A parsed broker URL. Debug and Display show it with credentials removed.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(url::Url);

/// Why a string is not a usable broker URL. Never includes the string itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a URL at all.
    #[error("is not a URL (expected redis://, rediss://, amqp:// or amqps://)")]
    Malformed,
    /// A scheme the operator cannot probe.
    #[error("has scheme \"{0}\"; supported: redis, rediss, amqp, amqps")]
    Scheme(String),
}

impl BrokerUrl {
    /// Parses and checks the scheme.
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        let url = url::Url::parse(raw).map_err(|_| UrlError::Malformed)?;
        match url.scheme() {
            "redis" | "rediss" | "amqp" | "amqps" => Ok(Self(url)),
            other => Err(UrlError::Scheme(other.to_string())),
        }
    }

    /// redis or rabbitmq.
    pub fn kind(&self) -> &'static str {
        if self.0.scheme().starts_with("redis") { "redis" } else { "rabbitmq" }
    }

    /// The URL with user and password removed.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        let _ = url.set_password(None);
        let _ = url.set_username("");
        url.to_string()
    }

    /// The full URL, credentials included: only for connecting.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({})", self.redacted())
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show() {
        let url = BrokerUrl::parse("redis://admin:s3cret@redis:6379/0").unwrap();
        for shown in [url.redacted(), format!("{url}"), format!("{url:?}")] {
            assert!(!shown.contains("s3cret") && !shown.contains("admin"), "{shown}");
        }
        assert_eq!(url.redacted(), "redis://redis:6379/0");
        assert_eq!(url.kind(), "redis");
    }

    #[test]
    fn errors_do_not_echo_the_input() {
        let e = BrokerUrl::parse("http://u:s3cret@x").unwrap_err();
        assert!(!e.to_string().contains("s3cret"));
        assert!(matches!(BrokerUrl::parse("not a url s3cret"), Err(UrlError::Malformed)));
    }
}
