use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use celery_operator::{controller, crd, http, metrics::Metrics, reconcile::Context, render};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

/// Kubernetes operator and autoscaler for Celery worker fleets.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against the cluster of the current kubeconfig or service account.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions (or write one file per CRD into --out-dir).
    Crd {
        /// Write `<plural>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Print the Deployments the operator would create from TaskQueue/WorkerPool YAML files or
    /// directories, offline. Exits non-zero, naming object and field, on invalid input.
    Render {
        /// YAML files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch, comma-separated; empty watches all.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',', default_value = "")]
    watch_namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd { out_dir } => print_crds(out_dir),
        Command::Render { paths } => match render::render_paths(&paths) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in errors {
                    eprintln!("error: {e}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            init_tracing(args.log_format);
            match run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %e, "operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn print_crds(out_dir: Option<PathBuf>) -> ExitCode {
    for crd in crd::all_crds() {
        let yaml = crd::crd_yaml(&crd);
        match &out_dir {
            None => print!("{yaml}"),
            Some(dir) => {
                let path = dir.join(crd::crd_file_name(&crd));
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let health = http::Health::new(metrics.clone());
    tokio::spawn(http::serve(args.metrics_addr, health.clone()));
    let version = client.apiserver_version().await?;
    info!(server = %version.git_version, "connected to the API server");

    let ctx = Arc::new(Context::new(client, metrics, std::env::var("POD_NAME").ok()));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let namespaces: Vec<Option<String>> = match args.watch_namespaces.iter().filter(|n| !n.is_empty()).count() {
        0 => vec![None],
        _ => args.watch_namespaces.into_iter().filter(|n| !n.is_empty()).map(Some).collect(),
    };
    health.set_ready(true);
    futures::future::join_all(namespaces.into_iter().map(|ns| controller::run(ctx.clone(), ns, shutdown.clone())))
        .await;
    info!("controllers stopped");
    Ok(())
}
