//! From a Celery broker URL to a `redis::Client` — directly, honouring kombu's TLS query options,
//! or through Redis Sentinel.

use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{Client, ConnectionAddr, RedisResult, TlsCertificates};
use tokio::sync::Mutex;

use crate::ProbeError;
use crate::secret::SecretUrl;

/// Where the probe's connections go.
pub(crate) enum Target {
    Direct(Client),
    /// `sentinel://` URLs: the master is asked of the Sentinels whenever a connection is made.
    Sentinel(Mutex<SentinelClient>),
}

impl Target {
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        match self {
            Self::Direct(client) => Ok(client.clone()),
            Self::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }
}

/// The target for `url`: Sentinel for Celery's `sentinel://h1:26379;sentinel://h2:26379/0` form
/// (credentials and db of the URL are the master's; `master_name` is required), else [`client`].
pub(crate) fn target(
    url: &SecretUrl,
    ca_cert_pem: Option<&str>,
    master_name: Option<&str>,
) -> Result<Target, ProbeError> {
    if !url.expose().starts_with("sentinel://") {
        return client(url, ca_cert_pem).map(Target::Direct);
    }
    let master_name = master_name
        .ok_or_else(|| ProbeError::invalid_url(url, "sentinel:// needs the master_name transport option"))?;
    let mut sentinels = Vec::new();
    let (mut user, mut password, mut db) = (None, None, 0);
    for part in url.expose().split(';') {
        let parsed = url::Url::parse(part.trim()).map_err(|e| ProbeError::invalid_url(url, e))?;
        let host = parsed.host_str().ok_or_else(|| ProbeError::invalid_url(url, "a Sentinel without a host"))?;
        sentinels.push(ConnectionAddr::Tcp(host.to_owned(), parsed.port().unwrap_or(26379)));
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        if password.is_none() && parsed.password().is_some() {
            user = Some(decode(parsed.username())).filter(|u| !u.is_empty());
            password = parsed.password().map(decode);
        }
        if let Ok(n) = parsed.path().trim_matches('/').parse() {
            db = n;
        }
    }
    let mut builder = SentinelClientBuilder::new(sentinels, master_name, SentinelServerType::Master)
        .map_err(|e| ProbeError::invalid_url(url, e))?
        .set_client_to_redis_db(db);
    if let Some(user) = user {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = password {
        builder = builder.set_client_to_redis_password(password);
    }
    let sentinel = builder.build().map_err(|e| ProbeError::invalid_url(url, e))?;
    Ok(Target::Sentinel(Mutex::new(sentinel)))
}

/// Builds the client for `url`. Accepts Celery's forms: `redis://`, `rediss://` (TLS) and
/// `redis+socket://` / `socket://` / `unix://` (a Unix socket path, db from `?db=N` or
/// `?virtual_host=N`). For `rediss://`:
/// - `ssl_cert_reqs=none` (or `CERT_NONE`) skips certificate verification, as kombu does;
/// - `ssl_ca_certs=/path/ca.pem`, or `ca_cert_pem` (which wins), is the CA to trust instead of the
///   system roots.
///
/// Client certificates (`ssl_certfile`/`ssl_keyfile`) are not supported and are refused.
pub(crate) fn client(url: &SecretUrl, ca_cert_pem: Option<&str>) -> Result<Client, ProbeError> {
    let mut parsed = url::Url::parse(url.expose()).map_err(|e| ProbeError::invalid_url(url, e))?;
    let mut insecure = false;
    let mut ca = ca_cert_pem.map(|pem| pem.as_bytes().to_vec());
    let mut kept = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "ssl_cert_reqs" => {
                insecure = matches!(value.to_ascii_lowercase().as_str(), "none" | "cert_none");
            }
            "ssl_ca_certs" if ca.is_none() => {
                let pem = std::fs::read(value.as_ref())
                    .map_err(|e| ProbeError::CaCertificate { detail: format!("ssl_ca_certs {value}: {e}") })?;
                ca = Some(pem);
            }
            "ssl_certfile" | "ssl_keyfile" => {
                return Err(ProbeError::invalid_url(
                    url,
                    "client certificates (ssl_certfile/ssl_keyfile) are not supported",
                ));
            }
            "ssl_ca_certs" | "ssl_check_hostname" => {}
            "virtual_host" => kept.push(("db".to_owned(), value.into_owned())),
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let scheme = match parsed.scheme() {
        "redis" | "rediss" | "unix" | "redis+unix" => parsed.scheme().to_owned(),
        "socket" | "redis+socket" => "redis+unix".to_owned(),
        other => {
            return Err(ProbeError::invalid_url(
                url,
                format!("unsupported scheme {other}://; expected redis, rediss, redis+socket, amqp or amqps"),
            ));
        }
    };
    let mut text = parsed.as_str().replacen(parsed.scheme(), &scheme, 1);
    let tls = scheme == "rediss";
    if tls && insecure {
        text.push_str("#insecure");
    }
    let built = match ca {
        Some(root_cert) if tls => {
            Client::build_with_tls(text.as_str(), TlsCertificates { client_tls: None, root_cert: Some(root_cert) })
        }
        _ => Client::open(text.as_str()),
    };
    built.map_err(|e| ProbeError::invalid_url(url, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_redis_urls_are_accepted() {
        for url in [
            "redis://localhost:6379/0",
            "redis://:pw@localhost/3",
            "rediss://user:pw@redis.example.com:6380/0?ssl_cert_reqs=required",
            "rediss://redis.example.com:6380/0?ssl_cert_reqs=CERT_NONE",
            "redis+socket:///run/redis.sock?virtual_host=2",
        ] {
            client(&SecretUrl::new(url), None).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn bad_urls_are_refused_without_showing_the_password() {
        for url in [
            "amqp://guest:hunter2@localhost//",
            "rediss://:hunter2@h/0?ssl_certfile=/c.pem",
            "redis://:hunter2@h/notadb",
            "rediss://:hunter2@h/0?ssl_ca_certs=/nonexistent/ca.pem",
        ] {
            let err = client(&SecretUrl::new(url), None).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }
}
