//! `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::cache::WatchHealth;
use crate::metrics::Metrics;

/// How long a required watch may fail without a success before `/readyz` fails (a 410 re-list or a
/// dropped connection recovers within seconds; client-go's backoff caps at 30 s).
pub const WATCH_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Shared with the HTTP handlers.
#[derive(Clone)]
pub struct Health {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    watches: WatchHealth,
    grace: std::time::Duration,
}

impl Health {
    /// Not ready until [`Health::set_ready`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, ready: Arc::default(), watches: WatchHealth::default(), grace: WATCH_GRACE }
    }

    /// `/readyz` also fails while a watch keeps failing for longer than `grace` (normally
    /// [`WATCH_GRACE`]), and explains an optional API it cannot watch.
    #[must_use]
    pub fn with_watches(mut self, watches: WatchHealth, grace: std::time::Duration) -> Self {
        self.watches = watches;
        self.grace = grace;
        self
    }

    /// Ready once the API server answered and the controllers started.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// The router, separate from the listener so tests can call it without a socket.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if !h.ready.load(Ordering::Relaxed) {
                    return (StatusCode::SERVICE_UNAVAILABLE, "starting".to_string());
                }
                let failing = h.watches.failing_longer_than(h.grace);
                if !failing.is_empty() {
                    return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}", failing.join("; ")));
                }
                let mut body = "ready".to_string();
                for why in h.watches.optional_unavailable() {
                    body.push_str(&format!("\nwithout conflict detection for {why}"));
                }
                (StatusCode::OK, body)
            }),
        )
        .route("/metrics", get(|State(h): State<Health>| async move { h.metrics.encode() }))
        .with_state(health)
}

/// Serves the router until the process exits.
pub async fn serve(addr: SocketAddr, health: Health) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(health)).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(health: &Health, path: &str) -> (StatusCode, String) {
        let response = router(health.clone()).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readyz_fails_until_ready_while_healthz_and_metrics_always_answer() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(metrics.clone());
        assert_eq!(get(&health, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        health.set_ready(true);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::OK);
        drop(metrics.reconcile_timer("TaskQueue"));
        let (status, body) = get(&health, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("celery_operator_reconcile_total{kind=\"TaskQueue\"} 1"), "{body}");
    }

    #[tokio::test]
    async fn readyz_fails_while_a_watch_keeps_failing_and_explains_an_optional_api() {
        let error = kube::runtime::watcher::Error::NoResourceVersion;
        let watches = WatchHealth::default();
        let patient = Health::new(Arc::new(Metrics::new())).with_watches(watches.clone(), WATCH_GRACE);
        let strict = Health::new(Arc::new(Metrics::new())).with_watches(watches.clone(), std::time::Duration::ZERO);
        patient.set_ready(true);
        strict.set_ready(true);
        watches.failed("prod/deployments", false, &error);
        assert_eq!(get(&patient, "/readyz").await, (StatusCode::OK, "ready".into()), "a short failure is no reason");
        let (status, body) = get(&strict, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("not ready: watch of prod/deployments failing for 0 s: no metadata.resourceVersion"),
            "{body}"
        );
        watches.ok("prod/deployments");
        assert_eq!(get(&strict, "/readyz").await.0, StatusCode::OK, "recovered");
        watches.failed("prod/horizontalpodautoscalers", true, &error);
        let (status, body) = get(&strict, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "an optional API is no reason: {body}");
        assert!(body.contains("without conflict detection for prod/horizontalpodautoscalers"), "{body}");
    }
}
