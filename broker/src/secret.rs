//! Broker URLs carry passwords; they must never reach logs, errors, Debug output or metrics.
//!
//! The redactor shows what it can read as a URL with its credentials masked, and nothing of what it
//! cannot: a Secret's value that is not a URL may be the password itself (a Secret holding only the
//! password) or hide it anywhere (`redis//:pw@host`, a missing colon), so it is masked whole.

use std::fmt;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

const MASK: &str = "***";

/// Query parameters whose values are credentials (`?password=…`, `?sentinel_password=…`, tokens).
fn is_secret_param(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "secret", "token"].iter().any(|s| key.contains(s))
}

/// How the redactor reads one `;`-separated part of a broker URL (kombu's failover and Sentinel
/// lists are `;`-joined).
enum Reading {
    /// Nothing there (an empty part): nothing to hide.
    Empty,
    /// A URL with an authority (`scheme://…`), so credentials can only be in its user info and
    /// its query.
    Url(Url),
    /// Anything else, and why it is not read as a URL. Never shown.
    Opaque(String),
}

fn read(part: &str) -> Reading {
    let text = part.trim();
    if text.is_empty() {
        return Reading::Empty;
    }
    // The URL parser drops tabs and newlines silently: the text a library might echo would then
    // differ from the password the parser saw.
    if text.chars().any(char::is_control) {
        return Reading::Opaque("it contains control characters".into());
    }
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(e) => return Reading::Opaque(format!("not a URL: {e}")),
    };
    let authority =
        text.get(..url.scheme().len() + 3).is_some_and(|s| s.eq_ignore_ascii_case(&format!("{}://", url.scheme())));
    if !authority {
        // Not even the scheme is quoted: a bare `password:rest` parses with the password as scheme.
        return Reading::Opaque("no // after the scheme".into());
    }
    // An `@` after the authority means the user info was cut short: `redis:///:pw@host/0` (a
    // third slash) or a password with a raw `/`, `?` or `#` and no colon before it
    // (`redis://hun?ter2@host`) put the rest of it in the path, query or fragment.
    if [Some(url.path()), url.query(), url.fragment()].into_iter().flatten().any(|s| s.contains('@')) {
        return Reading::Opaque("an @ after the host (a password with a raw /, ? or #?)".into());
    }
    // A host name of something other than a host name's characters is a query or a password
    // that lost its delimiter (`redis://hostpassword=pw`, a missing `/?`).
    if let Some(url::Host::Domain(name)) = url.host()
        && !name.chars().all(|c| c.is_ascii_alphanumeric() || ".-_%".contains(c))
    {
        return Reading::Opaque("the host name holds characters other than letters, digits and .-_%".into());
    }
    // A broker URL's path is a database number, a vhost or a socket path; anything else there
    // (`redis://host/0password=pw`, a missing `?`) may be anything.
    if !url.path().chars().all(|c| c.is_ascii_alphanumeric() || "/._-~%+".contains(c)) {
        return Reading::Opaque("the path holds characters other than letters, digits and /._-~%+".into());
    }
    Reading::Url(url)
}

/// `url` with its user info (user name and password) and credential-like query values replaced
/// by `***`; the scheme, host, port, path and other parameters are kept so the endpoint stays
/// recognisable. Kombu's `;`-joined lists (failover URLs, Sentinels) are redacted URL by URL.
///
/// When any part does not read as a URL with an authority and plausible host and path, the
/// whole value is `***`. The user name is masked too: `redis://hun:ter2@host` may be a password
/// typed without its leading colon, and `redis://hunter2@host` is one as often as it is a user
/// name. Doubtful query parameters (a name that is no plain identifier, a credential name without
/// a value or running on past the credential word, a value holding `=`) are `***` whole, and the
/// fragment is dropped.
pub fn redact_url(url: &str) -> String {
    match read_all(url) {
        Err(_) => MASK.to_owned(),
        Ok(parts) => parts
            .iter()
            .zip(url.split(';'))
            .map(|(parsed, text)| parsed.as_ref().map_or_else(|| text.to_owned(), redact_one))
            .collect::<Vec<_>>()
            .join(";"),
    }
}

/// Every `;`-separated part of a broker URL as a URL (`None`: an empty part), or why some part
/// is not one. Then the value is masked whole, not part by part: a `;` inside a mistyped password
/// splits the password itself, and a piece of it may even read as a URL (`redis://hun;ter2@h`).
fn read_all(value: &str) -> Result<Vec<Option<Url>>, String> {
    let parts: Vec<&str> = value.split(';').collect();
    let count = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| match read(part) {
            Reading::Empty => Ok(None),
            Reading::Url(url) => Ok(Some(url)),
            Reading::Opaque(why) if count == 1 => Err(why),
            Reading::Opaque(why) => Err(format!("part {} of {count} (separated by ;): {why}", i + 1)),
        })
        .collect()
}

fn redact_one(parsed: &Url) -> String {
    let mut out = parsed.clone();
    // Setting credentials only fails for URLs that cannot have any, which have none to hide.
    if !parsed.username().is_empty() {
        let _ = out.set_username(MASK);
    }
    if parsed.password().is_some() {
        let _ = out.set_password(Some(MASK));
    }
    out.set_fragment(None);
    if parsed.query_pairs().any(|(k, v)| hides_value(&k, &v) || hides_pair(&k, &v)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                if hides_pair(&k, &v) {
                    (MASK.into(), String::new())
                } else if hides_value(&k, &v) {
                    (k.into_owned(), MASK.into())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        out.query_pairs_mut().clear().extend_pairs(pairs);
    }
    out.to_string()
}

/// A query parameter shown as `name=***`.
fn hides_value(key: &str, value: &str) -> bool {
    is_secret_param(key) && !value.is_empty()
}

/// A query parameter shown as `***`: its name is no plain identifier (a typo may have merged a
/// value into it), it is named like a credential but has no value or goes on after the
/// credential word (`?passwordhunter2`, `?passwordhun=ter2`: a missing `=`, or a raw `=` in the
/// password), or its value holds an `=` (a missing `&` merged the next parameter into it).
fn hides_pair(key: &str, value: &str) -> bool {
    let identifier = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    let lower = key.to_ascii_lowercase();
    let ends_credential = ["pass", "passwd", "password", "secret", "token"].iter().any(|w| lower.ends_with(w));
    let odd_credential = is_secret_param(key) && (value.is_empty() || !ends_credential);
    !identifier || odd_credential || value.contains('=')
}

/// `application/x-www-form-urlencoded` decoding of one query key or value.
fn form_decode(s: &str) -> String {
    decode(&s.replace('+', " "))
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// What [`redact_one`] masks in a readable URL, as a library may echo it: as written and
/// percent-decoded.
fn credentials(url: &Url) -> Vec<String> {
    let mut found = Vec::new();
    for info in [url.username()].into_iter().chain(url.password()) {
        found.extend([info.to_owned(), decode(info)]);
    }
    if let Some(fragment) = url.fragment() {
        found.extend([fragment.to_owned(), decode(fragment)]);
    }
    // Raw pairs too: `query_pairs` decodes `+` to a space, a library may quote the text as written.
    for raw in url.query().unwrap_or_default().split('&') {
        let (key, value) = raw.split_once('=').unwrap_or((raw, ""));
        let (decoded_key, decoded_value) = (form_decode(key), form_decode(value));
        if hides_pair(&decoded_key, &decoded_value) {
            found.extend([raw.to_owned(), form_decode(raw)]);
        } else if hides_value(&decoded_key, &decoded_value) {
            found.extend([value.to_owned(), decoded_value]);
        }
    }
    found
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

    /// The URL with its password replaced by `***` (see [`redact_url`]).
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// Why the value is not shown at all: some `;`-separated part of it does not read as a URL
    /// with an authority. `None` when every part does. Never quotes the value.
    pub(crate) fn unreadable(&self) -> Option<String> {
        read_all(&self.0).err()
    }

    /// The secrets inside the URL, so that text from libraries that might echo them can be
    /// scrubbed: what [`redact_url`] masks (user info, credential-like query values, doubtful
    /// parameters, the fragment; all of the value and each `;`-separated part when it does not
    /// read as URLs), as written and decoded, longest first.
    pub(crate) fn secrets(&self) -> Vec<String> {
        let mut found: Vec<String> = match read_all(&self.0) {
            Ok(parts) => parts.iter().flatten().flat_map(credentials).collect(),
            Err(_) => std::iter::once(self.0.as_str())
                .chain(self.0.split(';'))
                .flat_map(|text| [text.to_owned(), text.trim().to_owned(), decode(text.trim())])
                .collect(),
        };
        found.retain(|s| !s.is_empty());
        // Longest first: a secret inside another must not break the longer one's replacement.
        found.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        found.dedup();
        found
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
                "rediss://***:***@redis.example.com:6380/2?ssl_cert_reqs=required",
            ),
            ("amqp://guest:guest@rabbit:5672//", "amqp://***:***@rabbit:5672//"),
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
            ("redis+socket:///run/redis.sock?virtual_host=2", "redis+socket:///run/redis.sock?virtual_host=2"),
            ("redis://redis/0?password=s3cret&db=1", "redis://redis/0?password=***&db=1"),
            ("amqp://a:pw1@h1//;amqp://b:pw2@h2//", "amqp://***:***@h1//;amqp://***:***@h2//"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input}");
        }
    }

    #[test]
    fn what_does_not_read_as_a_url_is_masked_whole() {
        let cases = [
            ("hunter2", "***"),
            ("not a url :s3cret@host", "***"),
            ("redis//:s3cret@redis:6379/0", "***"),
            ("redis//redis:6379/0?password=s3cret", "***"),
            ("redis:/:s3cret@redis/0", "***"),
            ("redis::s3cret@redis/0", "***"),
            ("redis:///:s3cret@redis/0", "***"),
            ("redis://redis/0password=s3cret", "***"),
            ("redis://:s3c\nret@redis/0", "***"),
            ("redis://:s3cret@redis:notaport/0", "***"),
            ("amqp://a:pw1@h1//;pw2", "***"),
            ("redis://hun;ter2@redis/0", "***"),
            ("redis://:s3cret@redis/0;", "redis://:***@redis/0;"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input:?}");
        }
        assert_eq!(SecretUrl::new("hunter2").unreadable().as_deref(), Some("not a URL: relative URL without a base"));
        assert_eq!(
            SecretUrl::new("redis://h/0;s3cret").unreadable().as_deref(),
            Some("part 2 of 2 (separated by ;): not a URL: relative URL without a base")
        );
        assert_eq!(SecretUrl::new("redis://h/0").unreadable(), None);
    }

    #[test]
    fn user_names_fragments_and_doubtful_parameters_are_masked() {
        let cases = [
            ("redis://hun:ter2@redis:6379/0", "redis://***:***@redis:6379/0"),
            ("redis://redis/0?pass word=s3cret&db=1", "redis://redis/0?***=&db=1"),
            ("redis://s3cret@redis:6379/0", "redis://***@redis:6379/0"),
            ("amqp://user@rabbit/vh", "amqp://***@rabbit/vh"),
            ("redis://redis/0#s3cret", "redis://redis/0"),
            ("redis://redis/0?passwords3cret&db=1", "redis://redis/0?***=&db=1"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input}");
            assert!(!SecretUrl::new(input).scrub(input).contains("s3cret"), "{input}");
        }
    }

    #[test]
    fn percent_encoded_passwords_are_hidden_in_both_forms() {
        let url = SecretUrl::new("redis://:p%40ss%3Aw0rd@redis:6379/0");
        assert_eq!(url.redacted(), "redis://:***@redis:6379/0");
        assert_eq!(url.scrub("auth p@ss:w0rd failed, raw p%40ss%3Aw0rd"), "auth *** failed, raw ***");
        let query = SecretUrl::new("redis://redis/0?password=a+b%21");
        assert_eq!(query.scrub("a+b%21 or a b!"), "*** or ***");
    }

    #[test]
    fn an_unreadable_value_is_scrubbed_whole_from_library_messages() {
        let url = SecretUrl::new("  hunter2 ");
        assert_eq!(url.scrub("Invalid URL: 'hunter2'"), "Invalid URL: '***'");
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
