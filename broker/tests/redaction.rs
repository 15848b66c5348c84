//! A planted password never shows, whatever the broker URL looks like: generated URL-like strings
//! (valid, malformed, missing colons or slashes, percent-encoded, IPv6, `?password=`, unicode,
//! `;`-joined lists, a bare password) go through every way this crate shows a URL or an error
//! about one — `redact_url`, `SecretUrl`'s `Display`/`Debug`/serde, `Broker::new`'s errors and
//! endpoint, and the errors of a probe of a closed port — and the password's marker appears in
//! none of them.
//!
//! Every planted password starts with the marker `ZQX`, and nothing else in a generated string
//! (or in a message about it) contains `zqx` in any case, so "the marker is not in the output" is stronger than
//! "the password is not in the output": it also catches a leak of the password's beginning, and
//! of its percent-encoded or decoded form.

use celery_broker::{Broker, BrokerConfig, ProbeError, SecretUrl, redact_url};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;

const MARKER: &str = "zqx";
/// Generated cases of the main property.
const CASES: u32 = 4096;

/// A password: the marker, then letters, digits, URL delimiters, `%`, space and non-ASCII.
fn password() -> impl Strategy<Value = String> {
    let tail = prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select("abcdefghijklmnoprstuvwyABCDEFGHIJKLMNOPRSTUVWY0123456789".chars().collect::<Vec<_>>()),
            2 => prop::sample::select("!$&'()*+,;=~._-@:/?#%[] ".chars().collect::<Vec<_>>()),
            1 => prop::sample::select(vec!['ä', 'é', 'ß', '密', '码', '🔑']),
        ],
        4..16,
    );
    tail.prop_map(|chars| format!("ZQX{}", chars.into_iter().collect::<String>()))
}

/// How the password is written into the URL: as it is, or percent-encoded (the correct way).
fn written(pw: &str, encoded: bool) -> String {
    if encoded { utf8_percent_encode(pw, NON_ALPHANUMERIC).to_string() } else { pw.to_owned() }
}

fn scheme() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "redis",
        "rediss",
        "REDIS",
        "amqp",
        "amqps",
        "pyamqp",
        "sentinel",
        "redis+socket",
        "http",
    ])
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["redis", "rabbit", "localhost", "redis.example.com", "my-redis.ns.svc"])
            .prop_map(String::from),
        (1u8..=254, 0u8..=255).prop_map(|(a, b)| format!("10.{a}.{b}.1")),
        prop::sample::select(vec!["[::1]", "[fd00::6]", "[2001:db8::1]", "[::1", "::1"]).prop_map(String::from),
        Just("rédis.exemple".to_owned()),
        Just(String::new()),
    ]
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), Just(":6379".to_owned()), Just(":5672".to_owned()), Just(":26379".to_owned())]
}

fn path() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", "/", "/0", "/15", "//", "/vhost", "/run/redis.sock"]).prop_map(String::from)
}

fn other_params() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", "ssl_cert_reqs=required", "db=1", "virtual_host=2", "heartbeat=10"])
        .prop_map(String::from)
}

fn secret_key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["password", "sentinel_password", "PASSWORD", "token", "secret"])
}

/// Scheme, host, port, path, another parameter, the password and whether it is percent-encoded.
type Parts = (&'static str, String, String, String, String, String, bool);

/// Where the generated URLs point.
#[derive(Clone, Copy)]
enum Endpoint {
    /// Anywhere (never contacted).
    Anywhere,
    /// `127.0.0.1` or `[::1]`, always with the port [`PORT`] (the probe test replaces it with a
    /// closed one: nothing may reach the machine's brokers on the standard ports).
    Local,
}

const PORT: &str = "PORT";

fn parts(at: Endpoint) -> BoxedStrategy<Parts> {
    match at {
        Endpoint::Anywhere => (scheme(), host(), port(), path(), other_params(), password(), any::<bool>()).boxed(),
        Endpoint::Local => {
            let host = prop::sample::select(vec!["127.0.0.1", "[::1]"]).prop_map(String::from);
            (scheme(), host, Just(format!(":{PORT}")), path(), other_params(), password(), any::<bool>()).boxed()
        }
    }
}

/// A URL-like string with the password planted in it (in the user info, in a credential query
/// parameter, or as the whole value), and the password.
fn single(at: Endpoint) -> impl Strategy<Value = (String, String)> {
    let in_userinfo = (parts(at), prop::sample::select(vec!["", "celery", "default"])).prop_map(
        |((scheme, host, port, path, params, pw, encoded), user)| {
            let query = if params.is_empty() { String::new() } else { format!("?{params}") };
            (format!("{scheme}://{user}:{}@{host}{port}{path}{query}", written(&pw, encoded)), pw)
        },
    );
    let in_query = (parts(at), secret_key(), any::<bool>()).prop_map(
        |((scheme, host, port, path, params, pw, encoded), key, first)| {
            let secret = format!("{key}={}", written(&pw, encoded));
            let query = match (params.is_empty(), first) {
                (true, _) => secret,
                (false, true) => format!("{secret}&{params}"),
                (false, false) => format!("{params}&{secret}"),
            };
            (format!("{scheme}://{host}{port}{path}?{query}"), pw)
        },
    );
    let bare = password().prop_map(|pw| (pw.clone(), pw));
    prop_oneof![4 => in_userinfo, 3 => in_query, 1 => bare]
}

/// [`single`], or it in one of kombu's failover lists beside a URL without secrets.
fn planted(at: Endpoint) -> impl Strategy<Value = (String, String)> {
    let other = match at {
        Endpoint::Anywhere => "redis://redis-b:6379/0".to_owned(),
        Endpoint::Local => format!("redis://127.0.0.1:{PORT}/0"),
    };
    prop_oneof![
        4 => single(at),
        1 => (single(at), any::<bool>()).prop_map(move |((url, pw), first)| {
            (if first { format!("{url};{other}") } else { format!("{other};{url}") }, pw)
        }),
    ]
}

/// Typing mistakes: a character of URL syntax dropped, doubled or misplaced.
#[derive(Debug, Clone, Copy)]
enum Mistake {
    DropSchemeColon,
    DropSlash,
    ExtraSlash,
    DropPasswordColon,
    DropAt,
    DropQuestionMark,
    DropEquals,
    DropAmpersand,
    Newline,
    Space,
}

impl Mistake {
    fn apply(self, url: &str, at: usize) -> String {
        let remove_nth = |pattern: &str| -> String {
            let found: Vec<usize> = url.match_indices(pattern).map(|(i, _)| i).collect();
            match found.get(at % found.len().max(1)) {
                Some(&i) => format!("{}{}", &url[..i], &url[i + pattern.len()..]),
                None => url.to_owned(),
            }
        };
        match self {
            Self::DropSchemeColon => url.replacen("://", "//", 1),
            Self::DropSlash => url.replacen("://", ":/", 1),
            Self::ExtraSlash => url.replacen("://", ":///", 1),
            Self::DropPasswordColon => match url.find("://") {
                Some(start) => {
                    let rest = &url[start + 3..];
                    match rest.find(':') {
                        Some(i) => format!("{}{}", &url[..start + 3 + i], &rest[i + 1..]),
                        None => url.to_owned(),
                    }
                }
                None => url.to_owned(),
            },
            Self::DropAt => remove_nth("@"),
            Self::DropQuestionMark => remove_nth("?"),
            Self::DropEquals => remove_nth("="),
            Self::DropAmpersand => remove_nth("&"),
            Self::Newline | Self::Space => {
                let chars: Vec<char> = url.chars().collect();
                let i = at % (chars.len() + 1);
                let c = if matches!(self, Self::Newline) { '\n' } else { ' ' };
                chars[..i].iter().chain([c].iter()).chain(chars[i..].iter()).collect()
            }
        }
    }
}

fn mistake() -> impl Strategy<Value = Mistake> {
    prop::sample::select(vec![
        Mistake::DropSchemeColon,
        Mistake::DropSlash,
        Mistake::ExtraSlash,
        Mistake::DropPasswordColon,
        Mistake::DropAt,
        Mistake::DropQuestionMark,
        Mistake::DropEquals,
        Mistake::DropAmpersand,
        Mistake::Newline,
        Mistake::Space,
    ])
}

/// A planted URL as typed: right, or with one mistake. (Two mistakes can put the password
/// anywhere, even in the host, where no redactor can tell it from a host name.)
fn url_like(at: Endpoint) -> impl Strategy<Value = (String, String)> {
    (planted(at), prop::option::of((mistake(), any::<usize>()))).prop_map(|((url, pw), mistake)| match mistake {
        Some((m, at)) => (m.apply(&url, at), pw),
        None => (url, pw),
    })
}

/// Everything this crate shows about `url` without network I/O.
fn shown(url: &str) -> Vec<String> {
    let secret = SecretUrl::new(url);
    let mut shown = vec![
        redact_url(url),
        secret.redacted(),
        format!("{secret}"),
        format!("{secret:?}"),
        serde_json::to_string(&secret).expect("serializes"),
    ];
    let mut config = BrokerConfig::new(url);
    // Far enough into `sentinel://` parsing to reach the URL's own problems.
    config.transport.master_name = Some("mymaster".into());
    shown.extend(outcome(Broker::new(config)));
    // As a RabbitMQ management URL beside a valid AMQP one.
    let mut config = BrokerConfig::new("amqp://guest:guest@rabbit:5672//");
    config.management_url = Some(SecretUrl::new(url));
    shown.extend(outcome(Broker::new(config)));
    shown
}

fn outcome(result: Result<Broker, ProbeError>) -> Vec<String> {
    match result {
        Ok(broker) => vec![broker.endpoint(), format!("{broker:?}")],
        Err(e) => vec![e.to_string(), format!("{e:?}"), e.metric_label().to_owned()],
    }
}

fn assert_hidden(url: &str, pw: &str, shown: &[String]) -> Result<(), TestCaseError> {
    for text in shown {
        prop_assert!(!text.to_lowercase().contains(MARKER), "the password {pw:?} of {url:?} shows in {text:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn a_planted_password_shows_in_no_redaction_and_no_error((url, pw) in url_like(Endpoint::Anywhere)) {
        assert_hidden(&url, &pw, &shown(&url))?;
    }
}

proptest! {
    // Each case probes a closed port: a few dozen cover the connect errors.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn probe_errors_never_show_the_password((url, pw) in url_like(Endpoint::Local)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let local = url.replace(PORT, &closed_port().to_string());
        let mut config = BrokerConfig::new(local.as_str());
        config.timeout = std::time::Duration::from_secs(2);
        let shown = match Broker::new(config) {
            Err(e) => vec![e.to_string(), format!("{e:?}")],
            // Probed only when every part names the closed port: a URL a mistake left without
            // host or port would go to a default (the machine's own broker on 6379 or 5672).
            Ok(broker) if names_only_the_closed_port(&local) => match runtime.block_on(broker.probe(&["celery"])) {
                Ok(seen) => vec![format!("{seen:?}")],
                Err(e) => vec![e.to_string(), format!("{e:?}"), broker.endpoint()],
            },
            Ok(broker) => vec![broker.endpoint()],
        };
        assert_hidden(&local, &pw, &shown)?;
    }
}

/// Whether every `;`-separated part of `url` is a URL with a loopback host and an explicit port,
/// the one [`closed_port`] gave.
fn names_only_the_closed_port(url: &str) -> bool {
    url.split(';').all(|part| {
        url::Url::parse(part.trim()).is_ok_and(|u| {
            matches!(u.host_str(), Some("127.0.0.1" | "[::1]"))
                && u.port().is_some_and(|p| part.contains(&format!(":{p}")))
        })
    })
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[test]
fn the_two_reported_leaks_are_masked_with_a_reason_that_quotes_nothing() {
    for url in ["hunter2-ZQX", "redis//redis:6379/0?password=hunter2-ZQX"] {
        let err = Broker::new(BrokerConfig::new(url)).expect_err("not a URL");
        let message = err.to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.starts_with("invalid broker URL ***: not a URL: relative URL without a base;"), "{message}");
        assert!(message.contains("not shown because it may be or contain the password"), "{message}");
    }
}
