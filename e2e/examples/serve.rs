//! Serve the control-plane double with the project's CRDs for manual `kubectl` use:
//! `cargo run -p celery-e2e --example serve` prints the kubeconfig path and runs until Ctrl-C.

use celery_e2e::ApiServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = ApiServer::new();
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
    let n = server.load_crds_from_dir(crds)?;
    let served = server.serve("127.0.0.1:0".parse()?).await?;
    println!("loaded {n} CRDs; serving {}", served.url());
    println!("export KUBECONFIG={}", served.kubeconfig_path.display());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
