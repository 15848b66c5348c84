//! The Kubernetes client the operator runs with: requests that cannot hang.
//!
//! kube's default client has no read timeout (so that exec and port-forward sessions live), which
//! leaves a request the API server never answers hanging forever, and that object's reconcile with
//! it. The operator makes none of those long-lived calls: every request it sends gets a response
//! within [`REQUEST_TIMEOUT`] or fails and is retried by its caller with backoff. Watches end
//! server-side well before ([`crate::cache::WATCH_TIMEOUT_SECONDS`]), so a quiet watch is never cut.

use std::time::Duration;

/// Longest wait for the API server to send anything on a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a connection to the API server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `config` with the operator's timeouts.
pub fn with_timeouts(mut config: kube::Config) -> kube::Config {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(REQUEST_TIMEOUT);
    config.write_timeout = Some(REQUEST_TIMEOUT);
    // Count the read timeout from when a request is sent, not from when its pooled connection
    // went idle.
    config.reset_reader_on_write = true;
    config
}

/// The client for `run`: the current kubeconfig or service account, with [`with_timeouts`].
pub async fn client() -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    kube::Client::try_from(with_timeouts(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_has_a_deadline_and_watches_end_before_it() {
        let config = with_timeouts(kube::Config::new("https://127.0.0.1:6443".parse().unwrap()));
        assert_eq!(config.read_timeout, Some(REQUEST_TIMEOUT));
        assert_eq!(config.connect_timeout, Some(CONNECT_TIMEOUT));
        assert!(config.reset_reader_on_write);
        let watch = Duration::from_secs(u64::from(crate::cache::WATCH_TIMEOUT_SECONDS));
        assert!(watch + Duration::from_secs(10) <= REQUEST_TIMEOUT, "a quiet watch must end before the client cuts it");
    }
}
