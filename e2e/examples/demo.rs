//! The live demo behind `make demo`: the operator against the control-plane double, with a real
//! Redis and real Celery workers run by the pod runner. It applies the Redis examples, waits for the
//! `mail` pool to settle, enqueues a burst of real `celery_example.sleep` tasks on the `emails` and
//! `celery` queues, prints a timeline once per second (backlog, in flight, desired, replicas, ready,
//! and the autoscaler's scale events), waits for the queue to drain and the pool to return to
//! `minReplicas`, writes an SVG plot, checks every task's result and tears everything down.
//!
//! ```text
//! cargo build -p celery-operator
//! cargo run -p celery-e2e --example demo -- [--hold] [--tasks N] [--stabilization SECONDS]
//!     [--deadline SECONDS] [--operator PATH] [--out DIR] [--rabbitmq]
//! ```
//!
//! `--hold` keeps everything running at the end (for `kubectl`) until Ctrl-C. Ctrl-C at any time
//! tears down. `--rabbitmq` puts the queues on a private RabbitMQ node (with the management API)
//! instead of Redis; Redis then only holds task results. Not a test: CI builds it (clippy `--all-targets`) but never runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use celery_e2e::demo::{self, Sample, ScaleEvents};
use celery_e2e::stack::{Pods, Stack, StackConfig, examples_dir, workspace_root};
use celery_e2e::{PodRunner, RunnerConfig};
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

const POOL: &str = "mail";
const WORKER_DEPLOYMENT: &str = "mail-worker";
/// The queues of the `mail` pool (the `default` TaskQueue is Celery's `celery` queue).
const QUEUES: [&str; 2] = ["emails", "celery"];
const USAGE: &str = "usage: demo [--hold] [--tasks N] [--stabilization SECONDS] [--deadline SECONDS] \
                     [--operator PATH] [--out DIR] [--rabbitmq]";

struct Args {
    hold: bool,
    tasks: usize,
    stabilization: u64,
    deadline: Duration,
    operator: PathBuf,
    out: PathBuf,
    /// Queues on a private RabbitMQ node instead of Redis.
    rabbitmq: bool,
}

/// The workspace root without `..` components, for readable paths.
fn root() -> PathBuf {
    let root = workspace_root();
    root.canonicalize().unwrap_or(root)
}

/// The operator binary of the same build as this demo (`<target>/<profile>/celery-operator`, next
/// to `examples/`), so a custom `CARGO_TARGET_DIR` works; else `target/debug/celery-operator`.
fn default_operator() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("celery-operator")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| root().join("target/debug/celery-operator"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        hold: false,
        tasks: 400,
        stabilization: 15,
        deadline: Duration::from_secs(150),
        operator: default_operator(),
        out: root().join("target/demo"),
        rabbitmq: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--hold" => args.hold = true,
            "--rabbitmq" => args.rabbitmq = true,
            "--tasks" => args.tasks = value()?.parse().map_err(|e| format!("--tasks: {e}"))?,
            "--stabilization" => args.stabilization = value()?.parse().map_err(|e| format!("--stabilization: {e}"))?,
            "--deadline" => {
                args.deadline = Duration::from_secs(value()?.parse().map_err(|e| format!("--deadline: {e}"))?)
            }
            "--operator" => args.operator = value()?.into(),
            "--out" => args.out = value()?.into(),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.tasks == 0 {
        return Err("--tasks must be at least 1".into());
    }
    Ok(args)
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How a run ended, short of an error.
enum Outcome {
    /// Drained and back at min.
    Done,
    /// The deadline passed first (message says what was missing).
    Incomplete(String),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e == USAGE => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !args.operator.exists() {
        eprintln!(
            "the operator binary {} does not exist: run `cargo build -p celery-operator` first (`make demo` does)",
            args.operator.display()
        );
        return ExitCode::FAILURE;
    }

    let rabbit = if args.rabbitmq {
        println!("Starting a private RabbitMQ node (with the management API)...");
        match tokio::task::spawn_blocking(e2e_harness::RabbitServer::start).await {
            Ok(Ok(rabbit)) => Some(rabbit),
            Ok(Err(e)) => {
                eprintln!("could not start RabbitMQ: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("could not start RabbitMQ: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let broker = rabbit.as_ref().map(|r| Rabbit {
        url: r.amqp_url(),
        management: r.management_url(),
        ui: format!("http://127.0.0.1:{}", r.management_port()),
    });
    println!("Starting a private Redis, the control-plane double, the pod runner (real Celery workers from");
    println!("the harness venv: the first run creates it from PyPI) and the operator...");
    let started = Instant::now();
    let up = async {
        // The pod runner is started here rather than by the stack so that probes run at the periods
        // the operator's pods declare (readiness 5 s, liveness 10 s), as kubelet would: the tests'
        // 200 ms periods would make 20 workers' `celery-probe` processes eat both cores.
        let mut runner_config = tokio::task::spawn_blocking(RunnerConfig::celery).await??;
        runner_config.probe_period = None;
        let mut config = StackConfig::with_operator(&args.operator);
        config.pods = Pods::None;
        config.operator_env.push(("RUST_LOG".into(), "info,kube=warn".into()));
        let stack = Stack::start(config).await?;
        let runner = match stack.server() {
            Some(server) => Some(PodRunner::start(server, runner_config)?),
            None => None, // a real cluster (E2E_KUBECONFIG) runs its own pods
        };
        Ok::<_, Error>((stack, runner))
    };
    let (mut stack, runner) = tokio::select! {
        s = up => match s {
            Ok(s) => s,
            Err(e) => {
                eprintln!("could not start the stack: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted while starting; everything started so far is stopped");
            return ExitCode::from(130);
        }
    };
    println!("  up in {:.1} s; operator log: {}", started.elapsed().as_secs_f64(), stack.operator_log_path().display());

    let outcome = tokio::select! {
        r = run(&stack, &args, broker.as_ref()) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted");
            Err("interrupted".into())
        }
    };
    let interrupted = matches!(&outcome, Err(e) if e.to_string() == "interrupted");

    let mut code = match &outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Incomplete(why)) => {
            eprintln!("\nThe demo did not finish: {why}");
            eprintln!("Operator log: {}", stack.operator_log_path().display());
            ExitCode::FAILURE
        }
        Err(_) if interrupted => ExitCode::from(130),
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            eprintln!("Operator log: {}", stack.operator_log_path().display());
            ExitCode::FAILURE
        }
    };

    if args.hold && !interrupted {
        println!("\nHolding (--hold): everything keeps running. Try");
        println!("  {}", kubectl_line(&stack));
        println!("The example app's beat sends a `tick` task to the celery queue every 5 s: each one wakes the");
        println!("pool from 0 to 1 replica, and it goes back to 0 after the stabilization window.");
        println!("Press Ctrl-C to tear down.");
        let _ = tokio::signal::ctrl_c().await;
        code = ExitCode::SUCCESS;
    }

    println!("Tearing down: operator (SIGTERM), workers (warm shutdown), Redis, the double...");
    let teardown = async {
        let _ = stack.stop_operator().await;
        if let Some(runner) = runner {
            runner.shutdown(Duration::from_secs(10)).await;
        }
        stack.shutdown(Duration::from_secs(10)).await;
        drop(rabbit);
    };
    tokio::select! {
        _ = teardown => println!("done."),
        _ = tokio::signal::ctrl_c() => println!("interrupted again: killing everything."),
    }
    code
}

fn kubectl_line(stack: &Stack) -> String {
    format!("kubectl --kubeconfig {} get workerpools,taskqueues,deploy,pods", stack.kubeconfig_path().display())
}

/// The RabbitMQ node the queues are on (`--rabbitmq`).
struct Rabbit {
    url: String,
    management: String,
    /// The management UI without credentials, to print.
    ui: String,
}

async fn run(stack: &Stack, args: &Args, rabbit: Option<&Rabbit>) -> Result<Outcome, Error> {
    let stabilization = args.stabilization;
    match rabbit {
        None => {
            stack.apply_file(examples_dir().join("redis-queues.yaml")).await?;
        }
        Some(rabbit) => {
            // The Redis examples' Secret and TaskQueues, pointed at RabbitMQ with its management API.
            let (url, management) = (rabbit.url.clone(), rabbit.management.clone());
            stack
                .apply_file_with(examples_dir().join("redis-queues.yaml"), move |doc| {
                    if doc["kind"] == "Secret" {
                        doc["stringData"] = json!({"url": url, "management": management});
                    }
                    if doc["kind"] == "TaskQueue" {
                        let from = doc["spec"]["broker"]["urlFrom"]["secretKeyRef"]["name"].clone();
                        doc["spec"]["broker"]["managementUrlFrom"] =
                            json!({"secretKeyRef": {"name": from, "key": "management"}});
                    }
                })
                .await?;
        }
    }
    stack
        .apply_file_with(examples_dir().join("mail-pool.yaml"), move |doc| {
            if doc["kind"] == "WorkerPool" {
                doc["spec"]["autoscaling"]["scaleDownStabilizationSeconds"] = json!(stabilization);
            }
        })
        .await?;
    println!("\nApplied examples/redis-queues.yaml (Secret celery-redis pointed at the private Redis, TaskQueues");
    println!("emails and default) and examples/mail-pool.yaml (WorkerPool mail), with one change for the demo:");
    println!(
        "  spec.autoscaling.scaleDownStabilizationSeconds: 60 -> {stabilization} (so the scale-down shows sooner)."
    );
    match rabbit {
        None => println!("(examples/rabbitmq-reports.yaml is left out: the demo starts no RabbitMQ.)"),
        Some(r) => println!(
            "With --rabbitmq the Secret celery-redis holds the private RabbitMQ node's AMQP URL and management API\n\
             (TaskQueues get managementUrlFrom): the queues live on RabbitMQ, task results on Redis. Management UI:\n  {}",
            r.ui
        ),
    }
    println!("\nWhile the demo runs, in another terminal:");
    println!("  {}", kubectl_line(stack));

    let pools = pools(stack).await?;
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        stack.client(),
        stack.namespace(),
        &stack.resource_of(&json!({"apiVersion": "apps/v1", "kind": "Deployment"})).await?.0,
    );
    let observe = async |t: f64| -> Result<(Value, Sample), Error> {
        let pool = serde_json::to_value(pools.get(POOL).await?)?;
        let deployment = match deployments.get_opt(WORKER_DEPLOYMENT).await? {
            Some(d) => Some(serde_json::to_value(d)?),
            None => None,
        };
        let mut sample = Sample::from_objects(t, &pool, deployment.as_ref());
        if let Ok(metrics) = stack.metrics().await {
            sample = sample.with_metrics(&metrics, stack.namespace(), POOL);
        }
        Ok((pool, sample))
    };

    // Settle: the autoscaler reports the pool idle at minReplicas with every pod ready.
    println!("\nWaiting for the pool to settle at minReplicas (the autoscaler reports it idle)...");
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    let (min, before) = loop {
        let (pool, sample) = observe(0.0).await?;
        let min = pool["spec"]["autoscaling"]["minReplicas"].as_i64().unwrap_or(0) as i32;
        if sample.idle() && sample.desired == Some(min) && sample.replicas == min && sample.ready == min {
            break (min, pool);
        }
        if Instant::now() > settle_deadline {
            return Ok(Outcome::Incomplete(format!(
                "the pool did not settle within 120 s (last seen: {}); is the autoscaler running?",
                demo::format_row(&sample).split_whitespace().collect::<Vec<_>>().join(" ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("  settled: minReplicas {min}, backlog 0, nothing in flight.");
    print_kubectl(stack).await;

    // The burst: deterministic durations between 0.5 and 1.0 s, alternating between the queues.
    let mut rng = fastrand::Rng::with_seed(4);
    let durations: Vec<f64> = (0..args.tasks).map(|_| 0.5 + f64::from(rng.u8(0..=50)) / 100.0).collect();
    let work: f64 = durations.iter().sum();
    let tasks: Vec<Value> = durations.iter().enumerate().map(|(i, d)| json!([d, QUEUES[i % QUEUES.len()]])).collect();
    let tasks = Value::Array(tasks).to_string();
    let amqp = rabbit.map(|r| r.url.clone()).unwrap_or_default();
    let mut burst_env = vec![("DEMO_TASKS", tasks.as_str())];
    if rabbit.is_some() {
        burst_env.push(("CELERY_BROKER_URL", amqp.as_str()));
    }
    let send_burst = if rabbit.is_some() { SEND_BURST_AMQP } else { SEND_BURST };
    println!(
        "\nEnqueuing {} celery_example.sleep tasks (0.5-1.0 s each, {work:.0} s of work) on queues {} at t = 0.",
        args.tasks,
        QUEUES.join(" and ")
    );
    println!("Timeline, one row per second: backlog, in flight and desired from the operator's /metrics (set on");
    println!("every poll), replicas and ready from the worker Deployment; `>>` lines are the autoscaler's");
    println!("status.lastScaleReason as it changes.\n");
    println!("{}", demo::header());

    // Two samples before the burst show the pool at rest; t = 0 is when the burst starts.
    let start = tokio::time::Instant::now();
    let t0 = start.into_std() + Duration::from_secs(2);
    let t0_unix = (std::time::SystemTime::now() + Duration::from_secs(2))
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut landed: Option<f64> = None;
    let since = move |at: Instant| {
        at.saturating_duration_since(t0).as_secs_f64() - t0.saturating_duration_since(at).as_secs_f64()
    };
    // Scale events come from a watch on the pool, so that two scales between samples both show.
    let (event_tx, mut event_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut events = ScaleEvents::starting_from(&before);
    let watch_config = watcher::Config::default().fields(&format!("metadata.name={POOL}"));
    let watch_stream = watcher(pools.clone(), watch_config).default_backoff().applied_objects();
    let watch = tokio::spawn(async move {
        futures::pin_mut!(watch_stream);
        while let Some(item) = watch_stream.next().await {
            if let Some(e) = item
                .ok()
                .and_then(|pool| serde_json::to_value(pool).ok())
                .and_then(|pool| events.observe(since(Instant::now()), &pool))
            {
                let _ = event_tx.send(e);
            }
        }
    });
    let mut samples: Vec<Sample> = Vec::new();
    let mut scale_events = Vec::new();
    let mut timeline = vec![demo::header()];
    let mut sending = None;
    let mut ids: Option<Vec<String>> = None;
    let mut ticker = tokio::time::interval_at(start, Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end_deadline = t0 + args.deadline;
    let outcome = loop {
        ticker.tick().await;
        let now = Instant::now();
        if now >= t0 && sending.is_none() && ids.is_none() {
            sending = Some(Box::pin(stack.python(send_burst, &burst_env)));
        }
        // Poll the sender without blocking the timeline: it runs in a Python process.
        if let Some(send) = sending.as_mut()
            && let Some(out) = futures::FutureExt::now_or_never(send.as_mut())
        {
            let out: Value = serde_json::from_str(out?.trim())?;
            let sent: Vec<String> = serde_json::from_value(out["ids"].clone())?;
            // When the burst landed in Redis, on the timeline's clock (both clocks are this host's).
            let at = out["written_at"].as_f64().map_or_else(|| since(Instant::now()), |w| w - t0_unix);
            landed = Some(at);
            let line = if rabbit.is_some() {
                format!(
                    "{:>7}  >> burst: {} tasks sent by Celery to RabbitMQ with publisher confirms in {:.2} s",
                    format!("{at:.1}s"),
                    sent.len(),
                    out["write_seconds"].as_f64().unwrap_or(f64::NAN),
                )
            } else {
                format!(
                    "{:>7}  >> burst: {} tasks built by Celery in {:.2} s, written to Redis in one round trip ({:.0} ms)",
                    format!("{at:.1}s"),
                    sent.len(),
                    out["build_seconds"].as_f64().unwrap_or(f64::NAN),
                    out["write_seconds"].as_f64().unwrap_or(f64::NAN) * 1000.0,
                )
            };
            println!("{line}");
            timeline.push(line);
            ids = Some(sent);
            sending = None;
        }
        while let Ok(e) = event_rx.try_recv() {
            let line = demo::format_event(&e);
            println!("{line}");
            timeline.push(line);
            scale_events.push(e);
        }
        let (_, sample) = observe(since(now)).await?;
        let row = demo::format_row(&sample);
        println!("{row}");
        timeline.push(row);
        samples.push(sample);
        let summary = demo::summarize(&samples, &scale_events, min);
        // Stop at the return to min: the example app's beat sends a `tick` task to the celery
        // queue every 5 s, and the first one to arrive wakes the pool again (see --hold).
        if ids.is_some() && summary.back_to_min.is_some() {
            break Outcome::Done;
        }
        if now > end_deadline {
            let missing = if summary.drained.is_none() { "drain the queue" } else { "return to minReplicas" };
            break Outcome::Incomplete(format!(
                "the pool did not {missing} within {} s of the burst (see the timeline above)",
                args.deadline.as_secs()
            ));
        }
    };
    watch.abort();
    // A burst still being sent at the deadline would be cancelled by this drop; the summary says so.
    drop(sending);

    let summary = demo::summarize(&samples, &scale_events, min);
    let mut summary_text = summary.to_string();
    let first_up = scale_events.iter().find(|e| e.desired.is_some_and(|d| d > min));
    if let (Some(landed), Some(up)) = (landed, first_up) {
        summary_text += &format!(
            "\nreaction:         {:.1} s from the burst landing in the broker to the scale-up in the pool's status",
            up.t - landed
        );
    }
    println!("\n{summary_text}");
    std::fs::create_dir_all(&args.out)?;
    let svg_path = args.out.join("demo.svg");
    let title = format!(
        "make demo: {} Celery tasks on the mail pool (minReplicas {min}, targetPerReplica = concurrency 4)",
        args.tasks
    );
    std::fs::write(&svg_path, demo::render_svg(&title, &samples, &scale_events))?;
    let timeline_path = args.out.join("timeline.txt");
    std::fs::write(&timeline_path, format!("{}\n\n{summary_text}\n", timeline.join("\n")))?;
    let csv_path = args.out.join("samples.csv");
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    let rows: Vec<String> = samples
        .iter()
        .map(|s| {
            let desired = opt(s.desired.map(i64::from));
            format!("{:.2},{},{},{desired},{},{}", s.t, opt(s.backlog), opt(s.in_flight), s.replicas, s.ready)
        })
        .collect();
    std::fs::write(&csv_path, format!("t,backlog,in_flight,desired,replicas,ready\n{}\n", rows.join("\n")))?;
    println!("\nPlot:     {}", svg_path.display());
    println!("Timeline: {}", timeline_path.display());
    println!("Samples:  {}", csv_path.display());

    if let Some(ids) = &ids {
        match stack.wait_results(ids, Duration::from_secs(60)).await {
            Ok(results) => {
                let ok = results.iter().filter(|r| r.state == "SUCCESS").count();
                let mut hosts: Vec<&str> = results.iter().filter_map(|r| r.hostname()).collect();
                hosts.sort_unstable();
                hosts.dedup();
                println!("Results:  {ok}/{} tasks SUCCESS, run by {} worker pods", results.len(), hosts.len());
                if ok != results.len() {
                    return Ok(Outcome::Incomplete(format!("{} tasks did not succeed", results.len() - ok)));
                }
            }
            Err(e) => return Ok(Outcome::Incomplete(format!("not every task has a result: {e}"))),
        }
    }
    Ok(outcome)
}

/// Sends the burst with real Celery (`send_task` of `celery_example.sleep`), inside a kombu
/// publish batch: the messages are built one by one and written to Redis in one pipelined round
/// trip when the batch closes, so the whole burst lands at once, as from many producers. Sent one
/// at a time from one Python process on a busy 2-core machine it would trickle in over seconds
/// while the new workers boot, and the autoscaler would (rightly) follow it in several steps.
const SEND_BURST: &str = r#"
import json, os, time
from celery_example.app import app
tasks = json.loads(os.environ["DEMO_TASKS"])
ids = []
with app.producer_or_acquire() as producer:
    started = time.monotonic()
    with producer.batch(max_size=2 * len(tasks) + 16) as batch:
        for seconds, queue in tasks:
            ids.append(app.send_task("celery_example.sleep", args=[seconds], queue=queue, producer=producer).id)
        built = time.monotonic()
    written = time.monotonic()
    written_at = time.time()
print(json.dumps({"ids": ids, "build_seconds": built - started, "write_seconds": written - built,
                  "written_at": written_at}))
"#;

/// The burst on RabbitMQ: plain Celery sends, each confirmed by the broker (AMQP has no batch).
const SEND_BURST_AMQP: &str = r#"
import json, os, time
from celery_example.app import app
app.conf.broker_transport_options = {"confirm_publish": True}
tasks = json.loads(os.environ["DEMO_TASKS"])
started = time.monotonic()
ids = [app.send_task("celery_example.sleep", args=[seconds], queue=queue).id for seconds, queue in tasks]
print(json.dumps({"ids": ids, "build_seconds": 0.0, "write_seconds": time.monotonic() - started,
                  "written_at": time.time()}))
"#;

async fn pools(stack: &Stack) -> Result<Api<DynamicObject>, Error> {
    let (resource, _) =
        stack.resource_of(&json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool"})).await?;
    Ok(Api::namespaced_with(stack.client(), stack.namespace(), &resource))
}

/// Shows once what `kubectl get` prints against the double (when kubectl is installed).
async fn print_kubectl(stack: &Stack) {
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(stack.kubeconfig_path())
        .args(["get", "workerpools,taskqueues,deploy,pods"])
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => {
            println!("\n$ kubectl get workerpools,taskqueues,deploy,pods");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(out) => println!("\n(kubectl get failed: {})", String::from_utf8_lossy(&out.stderr).trim()),
        Err(_) => println!("\n(kubectl is not installed; skipping the kubectl view)"),
    }
}
