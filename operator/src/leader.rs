//! Leader election with a coordination.k8s.io Lease (kube-lease-manager): several operator replicas
//! may run; only the one holding the Lease reconciles. Losing the Lease stops the controllers at
//! once; a graceful shutdown releases it so a standby takes over without waiting for expiry.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::Shared;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// Name of the Lease object.
    pub name: String,
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Seconds a holder's claim lasts without renewal: the longest a failover takes.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
    /// Where this replica says whether it leads (`celery_operator_leader`).
    pub metrics: Arc<Metrics>,
}

/// A future that completes once, cloneable: the shutdown signal handed to every controller.
pub type Shutdown = Shared<std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>>;

/// A shutdown signal that fires when `signal` completes.
pub fn shutdown_when(signal: impl Future<Output = ()> + Send + Sync + 'static) -> Shutdown {
    (Box::pin(signal) as std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>).shared()
}

/// Runs `work` while this replica holds the Lease, until `shutdown` completes. `work` receives a
/// signal that fires when leadership is lost or the process shuts down, and must return then.
pub async fn run_while_leader<W, F>(
    client: Client,
    options: LeaseOptions,
    shutdown: Shutdown,
    work: W,
) -> kube_lease_manager::Result<()>
where
    W: Fn(Shutdown) -> F,
    F: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, &options.name)
        .with_namespace(&options.namespace)
        .with_identity(&options.identity)
        .with_duration(options.duration_seconds)
        .with_grace(options.grace_seconds)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    loop {
        // Wait to become the leader, or to be told to stop.
        tokio::select! {
            _ = shutdown.clone() => break,
            changed = leading.wait_for(|is_leader| *is_leader) => if changed.is_err() { break },
        }
        info!(identity = %options.identity, lease = %options.name, "acquired the lease: reconciling");
        options.metrics.set_leader(true);
        let mut lost = leading.clone();
        let stop = shutdown.clone();
        let signal = shutdown_when(async move {
            tokio::select! {
                _ = stop => {},
                _ = lost.wait_for(|is_leader| !*is_leader) => {},
            }
        });
        work(signal).await;
        options.metrics.set_leader(false);
        if shutdown.clone().now_or_never().is_some() {
            break;
        }
        warn!(identity = %options.identity, "lost the lease: stopped reconciling");
    }
    // Closing the channel makes the manager release the Lease, so a standby need not wait for it
    // to expire.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => info!("released the lease"),
        Ok(Ok(Err(e))) => warn!(error = %e, "could not release the lease"),
        _ => warn!("lease manager did not stop in time"),
    }
    Ok(())
}
