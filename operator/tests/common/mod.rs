//! Helpers shared by the operator's integration tests.

use std::time::Duration;

/// Polls `check` until it holds, failing with `what` after a generous deadline (no fixed sleeps).
pub async fn poll<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached within the deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
