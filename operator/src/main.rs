use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use celery_operator::check_broker::{self, CheckBrokerArgs};
use celery_operator::leader::{LeaseOptions, Shutdown, shutdown_when};
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
    /// Audit brokers once, as the operator would: every way they can silently lose tasks, queue
    /// depths, broker facts. From a URL and flags, or from TaskQueue YAML files (--file). Exits 0
    /// safe, 1 unsafe, 2 unreachable, 64 usage error, so it can gate a CI pipeline.
    CheckBroker(CheckBrokerArgs),
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
    /// Elect a leader through a Lease so several replicas can run with one active.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "celery-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a leader's claim lasts without renewal: the longest a failover takes.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
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

fn main() -> ExitCode {
    allocator::configure();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's allocator, tuned for a long-running process whose memory comes in bursts (a fleet's
/// start-up, a re-list): by default it gives each thread that allocates its own arena (up to 8 per
/// core) and hands freed memory back to the kernel only from the top of the main heap, so the
/// resident size stays at the burst's peak. Two arenas and a periodic `malloc_trim` return it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod allocator {
    use std::time::Duration;

    /// How often freed memory is handed back to the kernel.
    const TRIM_INTERVAL: Duration = Duration::from_secs(10);

    /// Before any thread starts.
    pub fn configure() {
        // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }

    /// Runs forever: `malloc_trim` every [`TRIM_INTERVAL`] (a walk over the free lists, well
    /// under a millisecond for this process).
    pub async fn trim_periodically() {
        let mut every = tokio::time::interval(TRIM_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // SAFETY: malloc_trim only releases free memory; it is thread-safe.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod allocator {
    pub fn configure() {}
    pub async fn trim_periodically() {}
}

async fn async_main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and --version are not errors; anything else is a usage error (64, not clap's 2,
            // which check-broker uses for an unreachable broker).
            return if e.use_stderr() { ExitCode::from(check_broker::exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
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
        Command::CheckBroker(args) => ExitCode::from(check_broker::run(args).await),
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
            // `celery-operator crd | head` closes the pipe early: that is the reader's choice, not an
            // error (print! would panic on the broken pipe).
            None => {
                use std::io::Write;
                match std::io::stdout().lock().write_all(yaml.as_bytes()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: cannot write to stdout: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
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
    let client = celery_operator::client::client().await?;
    let metrics = Arc::new(Metrics::new());
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("{}-{}", hostname(), std::process::id()));
    let ctx = Arc::new(Context::new(client, metrics.clone(), Some(identity.clone())));
    let health = http::Health::new(metrics.clone()).with_watches(ctx.watches.clone(), http::WATCH_GRACE);
    tokio::spawn(http::serve(args.metrics_addr, health.clone()));
    tokio::spawn(allocator::trim_periodically());
    let version = ctx.client.apiserver_version().await?;
    info!(server = %version.git_version, "connected to the API server");

    let mut namespaces: Vec<Option<String>> =
        args.watch_namespaces.into_iter().filter(|n| !n.is_empty()).map(Some).collect();
    if namespaces.is_empty() {
        namespaces.push(None); // all namespaces
    }
    let lease = args.leader_election.then(|| LeaseOptions {
        name: args.lease_name,
        namespace: args.lease_namespace,
        identity,
        duration_seconds: args.lease_duration_seconds,
        grace_seconds: (args.lease_duration_seconds / 3).max(1),
        metrics: metrics.clone(),
    });
    if lease.is_none() {
        metrics.set_leader(true); // the only replica: it always reconciles
    }
    // Every replica serves /metrics and is ready; only the leader reconciles.
    health.set_ready(true);
    controller::run_all(ctx, namespaces, lease, termination()).await?;
    info!("controllers stopped");
    Ok(())
}

/// Completes on SIGTERM (what the kubelet sends) or SIGINT.
fn termination() -> Shutdown {
    let signal = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        info!("shutting down");
    };
    shutdown_when(signal)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "celery-operator".into())
}
