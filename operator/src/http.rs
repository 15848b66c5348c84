//! `/metrics`, `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// A component failing for longer than this makes `/readyz` fail: a watch error that the next
/// retry repairs is normal life on a busy API server, one that lasts is not.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// Shared with the HTTP handlers.
#[derive(Clone)]
pub struct Health {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    /// Components (e.g. `watch WorkerPool`) failing now: since when, and the latest reason.
    failing: Arc<Mutex<BTreeMap<String, (Instant, String)>>>,
}

impl Health {
    /// Not ready until [`Health::set_ready`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, ready: Arc::default(), failing: Arc::default() }
    }

    /// Ready once the API server answered and the controllers started.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Records that `component` failed (again); the reason must carry no secret.
    pub fn failing(&self, component: &str, reason: impl Into<String>) {
        let mut failing = self.failing.lock().expect("health lock");
        let reason = reason.into();
        failing.entry(component.to_string()).and_modify(|e| e.1 = reason.clone()).or_insert((Instant::now(), reason));
    }

    /// Records that `component` works again.
    pub fn recovered(&self, component: &str) {
        let mut failing = self.failing.lock().expect("health lock");
        if failing.remove(component).is_some() {
            tracing::info!(component, "recovered");
        }
    }

    /// `Ok` when ready, else why not (for `/readyz`).
    pub fn readiness(&self, now: Instant) -> Result<(), String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        let failing = self.failing.lock().expect("health lock");
        let stalled: Vec<String> = failing
            .iter()
            .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= STALL_AFTER)
            .map(|(c, (since, reason))| format!("{c} failing for {}s: {reason}", now.duration_since(*since).as_secs()))
            .collect();
        if stalled.is_empty() { Ok(()) } else { Err(stalled.join("\n")) }
    }
}

/// The router, separate from the listener so tests can call it without a socket.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                match h.readiness(Instant::now()) {
                    Ok(()) => (StatusCode::OK, "ready".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
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

    #[test]
    fn a_component_failing_longer_than_the_stall_time_makes_readyz_say_which_and_why() {
        let health = Health::new(Arc::new(Metrics::new()));
        health.set_ready(true);
        let t0 = Instant::now();
        health.failing("watch WorkerPool", "LIST WorkerPool */*: HTTP 403 Forbidden");
        assert_eq!(health.readiness(t0), Ok(()), "a fresh failure is retried before readiness fails");
        let later = t0 + STALL_AFTER + Duration::from_secs(1);
        let why = health.readiness(later).unwrap_err();
        assert!(why.starts_with("watch WorkerPool failing for 3"), "{why}");
        assert!(why.ends_with("HTTP 403 Forbidden"), "{why}");
        health.failing("watch WorkerPool", "timed out");
        assert!(health.readiness(later).unwrap_err().ends_with("timed out"), "the latest reason, the first time");
        health.recovered("watch WorkerPool");
        assert_eq!(health.readiness(later), Ok(()));
    }
}
