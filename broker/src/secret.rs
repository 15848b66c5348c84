//! Broker URLs carry passwords; they must never reach logs, errors, Debug output or metrics.

use std::fmt;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MASK: &str = "***";

/// Query parameters whose values are credentials (`?password=…`, `?sentinel_password=…`, tokens).
fn is_secret_param(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "secret", "token"].iter().any(|s| key.contains(s))
}

/// `url` with its password (and credential-like query values) replaced by `***`; the user name,
/// host, port, path and other parameters are kept so the endpoint stays recognisable. Kombu's
/// `;`-joined lists (failover URLs, Sentinels) are redacted URL by URL.
///
/// A part that does not parse as a URL is redacted from its last `@` backwards, so
/// `"not a url with :pw@host"` never leaks the password either.
pub fn redact_url(url: &str) -> String {
    url.split(';').map(redact_one).collect::<Vec<_>>().join(";")
}

fn redact_one(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}{MASK}{}", &url[..scheme_end + 3], &url[at..])
            }
            (None, Some(at)) => format!("{MASK}{}", &url[at..]),
            _ => url.to_owned(),
        };
    };
    let mut out = parsed.clone();
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have credentials, which have no password either.
        let _ = out.set_password(Some(MASK));
    }
    if parsed.query_pairs().any(|(k, _)| is_secret_param(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) { MASK.into() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        out.query_pairs_mut().clear().extend_pairs(pairs);
    }
    out.to_string()
}

/// A broker URL whose `Debug`, `Display` and serde form never show the password. Use
/// [`expose`](Self::expose) only where the URL is handed to a client library.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// The secrets inside the URL (password, credential-like query values), so that text from
    /// libraries that might echo them can be scrubbed.
    pub(crate) fn secrets(&self) -> Vec<String> {
        self.0
            .split(';')
            .filter_map(|part| url::Url::parse(part).ok())
            .flat_map(|url| {
                // Libraries may echo the password decoded or as written: scrub both.
                let raw = url.password().map(str::to_owned);
                let password = url.password().map(|p| percent_decode_str(p).decode_utf8_lossy().into_owned());
                let params: Vec<String> =
                    url.query_pairs().filter(|(k, _)| is_secret_param(k)).map(|(_, v)| v.into_owned()).collect();
                password.into_iter().chain(raw).chain(params)
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// `text` with every secret of this URL replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        self.secrets().iter().fold(text.to_owned(), |acc, secret| acc.replace(secret.as_str(), MASK))
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Serializes the redacted form: a `SecretUrl` written to a status or a log stays safe.
impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_the_endpoint_and_hides_the_password() {
        let cases = [
            ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
            (
                "rediss://celery:s3cret@redis.example.com:6380/2?ssl_cert_reqs=required",
                "rediss://celery:***@redis.example.com:6380/2?ssl_cert_reqs=required",
            ),
            ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            ("amqp://user@rabbit/vh", "amqp://user@rabbit/vh"),
            ("redis://redis/0?password=s3cret&db=1", "redis://redis/0?password=***&db=1"),
            ("amqp://a:pw1@h1//;amqp://b:pw2@h2//", "amqp://a:***@h1//;amqp://b:***@h2//"),
            ("not a url :s3cret@host", "***@host"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input}");
        }
    }

    #[test]
    fn percent_encoded_passwords_are_hidden_in_both_forms() {
        let url = SecretUrl::new("redis://:p%40ss%3Aw0rd@redis:6379/0");
        assert_eq!(url.redacted(), "redis://:***@redis:6379/0");
        assert_eq!(url.scrub("auth p@ss:w0rd failed, raw p%40ss%3Aw0rd"), "auth *** failed, raw ***");
    }

    #[test]
    fn debug_display_and_serde_never_show_the_password() {
        let url = SecretUrl::new("amqp://celery:hunter2@rabbit:5672/prod");
        for shown in [format!("{url:?}"), format!("{url}"), serde_json::to_string(&url).unwrap()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("rabbit:5672/prod"), "{shown}");
        }
        assert_eq!(url.expose(), "amqp://celery:hunter2@rabbit:5672/prod");
        let back: SecretUrl = serde_json::from_str("\"redis://:x@h/0\"").unwrap();
        assert_eq!(back.expose(), "redis://:x@h/0");
    }
}
