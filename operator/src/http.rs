//! `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared with the HTTP handlers.
#[derive(Clone)]
pub struct Health {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Not ready until [`Health::set_ready`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, ready: Arc::default() }
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
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
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
}
