//! Serve the control-plane double with the project's CRDs for manual `kubectl` use:
//!
//! ```text
//! cargo run -p celery-e2e --example serve [-- none|simulate|shell|celery]
//! ```
//!
//! prints an `export KUBECONFIG=...` line and runs until Ctrl-C. The argument picks the pod runner:
//! `none` (default: Deployments stay as written), `simulate` (pods become ready without processes),
//! `shell` (containers run as local processes from the host PATH) or `celery` (the Celery venv and
//! the worker image's entrypoint).

use celery_e2e::{ApiServer, PodRunner, RunnerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "none".to_string());
    let server = ApiServer::new();
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
    let n = server.load_crds_from_dir(crds)?;
    let config = match mode.as_str() {
        "none" => None,
        "simulate" => Some(RunnerConfig::simulated()),
        "shell" => Some(RunnerConfig::default()),
        "celery" => Some(tokio::task::spawn_blocking(RunnerConfig::celery).await??),
        other => return Err(format!("unknown runner mode {other:?}: none, simulate, shell or celery").into()),
    };
    let _runner = config.map(|c| PodRunner::start(&server, c)).transpose()?;
    let served = server.serve("127.0.0.1:0".parse()?).await?;
    println!("loaded {n} CRDs; pod runner: {mode}; serving {}", served.url());
    println!("export KUBECONFIG={}", served.kubeconfig_path.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
