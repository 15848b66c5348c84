//! Fleet benchmark (issue #10): the operator at 1 … 5,000 TaskQueue + autoscaled WorkerPool pairs on
//! one Redis, against the e2e control-plane double with simulated pods.
//!
//! ```text
//! cargo bench -p celery-operator --bench fleet                  # 1, 100 and 1,000 pools
//! cargo bench -p celery-operator --bench fleet -- 1000 5000     # or any sizes
//! ```
//!
//! For each size: one TaskQueue and one autoscaled pool per queue (min 0, max 3, targetPerReplica 1,
//! pollIntervalSeconds 1), created straight in the double's store; then, once every worker
//! Deployment exists (it prints how long that took) and nothing has been stored for 10 s:
//! - **steady** (`BENCH_STEADY` seconds, default 60): the operator's RSS (`VmRSS`, and the peak
//!   `VmHWM` of the whole run), its CPU (user + system time over the window, in millicores) and the
//!   API requests it made per second (the double's request log; open watches count once);
//! - **burst**: 3 messages pushed to 50 queues in one pipeline; for each of the 50 pools, the time
//!   until its worker Deployment's `spec.replicas` leaves 0 (seen through the double's change
//!   notifications). p50, p99 and max.
//!
//! The operator binary is the bench profile's (release) build, or `BENCH_OPERATOR` (say, a script
//! that runs it under a profiler). Results are written up in README.md.

use std::collections::HashMap;
use std::time::Duration;

use celery_e2e::ApiServer;
use celery_e2e::stack::{Pods, Stack, StackConfig};
use serde_json::json;
use tokio::time::Instant;

#[path = "autoscale/kombu.rs"]
mod kombu;

use kombu::kombu_message;

const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");
/// Deadline for anything the benchmark waits for.
const DEADLINE: Duration = Duration::from_secs(900);
/// Pools that get work at the same moment.
const BURST: usize = 50;

fn main() {
    let mut sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![1, 100, 1000];
    }
    let steady = Duration::from_secs(std::env::var("BENCH_STEADY").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let rows: Vec<String> = runtime.block_on(async {
        let mut rows = Vec::new();
        for n in sizes {
            let row = fleet(n, steady).await;
            eprintln!("{row}");
            rows.push(row);
        }
        rows
    });
    println!(
        "\n| pools + queues | RSS steady (peak) | CPU steady | API requests/s steady | 50 pools get work: replicas patched p50 / p99 / max | load average |"
    );
    println!("|---:|---:|---:|---:|---|---|");
    for row in rows {
        println!("{row}");
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ") state".
    let at = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    at(11) + at(12)
}

/// `/proc` reports CPU times in USER_HZ ticks, which Linux fixes at 100 per second on every
/// architecture this runs on.
fn ticks_per_second() -> u64 {
    100
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn spec_replicas(server: &ApiServer, ns: &str, deployment: &str) -> Option<u64> {
    let d = server.get("apps/v1", "Deployment", Some(ns), deployment).ok()??;
    d["spec"]["replicas"].as_u64()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fleet(n: usize, steady: Duration) -> String {
    eprintln!("\n== {n} pools + queues");
    // BENCH_OPERATOR: another binary or a wrapper (a profiler running the operator) to start.
    let operator = std::env::var("BENCH_OPERATOR").unwrap_or_else(|_| OPERATOR.to_string());
    let stack = Stack::start(StackConfig { pods: Pods::Simulated, ..StackConfig::with_operator(operator) })
        .await
        .unwrap_or_else(|e| panic!("the e2e stack did not start: {e}"));
    let server = stack.server().expect("the double").clone();
    let ns = stack.namespace().to_string();
    let pid = stack.operator_pid().expect("the operator runs");
    eprintln!("{n}: operator pid {pid}");
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fleet-redis", "namespace": ns},
        "stringData": {"url": stack.broker_url()}});
    server.create(secret).expect("Secret");
    // Followed through an in-process observer: listing (or cloning the request log) every few
    // hundred milliseconds costs the double, in this process, O(fleet) each time, which at 5,000
    // pools slowed the start-up being measured.
    let mut deployments = server.observe("apps/v1", "Deployment", Some(&ns)).expect("observe Deployments");
    let created = Instant::now();
    for i in 0..n {
        let name = format!("fleet-{i}");
        let tq = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"broker": {"urlFrom": {"secretKeyRef": {"name": "fleet-redis", "key": "url"}}}}});
        server.create(tq).expect("TaskQueue");
        let pool = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
                "queues": [name], "concurrency": 1,
                "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "targetPerReplica": 1,
                    "pollIntervalSeconds": 1, "scaleDownStabilizationSeconds": 0}}});
        server.create(pool).expect("WorkerPool");
    }
    eprintln!("{n}: {} objects created in {}", 2 * n, secs(created.elapsed()));
    let mut workers = std::collections::HashSet::new();
    let mut progress = Instant::now();
    while workers.len() < n {
        match tokio::time::timeout_at(created + DEADLINE, deployments.next()).await {
            Ok(Some(("ADDED", d))) => {
                if let Some(name) = d["metadata"]["name"].as_str().filter(|d| d.ends_with("-worker")) {
                    workers.insert(name.to_string());
                }
            }
            Ok(Some(_)) => {}
            _ => panic!("{n}: only {} of the worker Deployments after {DEADLINE:?}", workers.len()),
        }
        if progress.elapsed() >= Duration::from_secs(30) {
            eprintln!("{n}: {} worker Deployments after {}", workers.len(), secs(created.elapsed()));
            progress = Instant::now();
        }
    }
    drop(deployments);
    eprintln!("{n}: all worker Deployments after {}", secs(created.elapsed()));
    // Quiet: nothing stored for 10 s (status writes follow the Deployments).
    let mut last = (server.resource_version(), Instant::now());
    wait_for("a quiet API", || {
        let now = server.resource_version();
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= Duration::from_secs(10)
    })
    .await;
    eprintln!("{n}: quiet after {}", secs(created.elapsed()));

    let (requests0, ticks0, t0) = (server.request_count(), cpu_ticks(pid), Instant::now());
    tokio::time::sleep(steady).await;
    let window = t0.elapsed().as_secs_f64();
    let requests = (server.request_count() - requests0) as f64 / window;
    let millicores = (cpu_ticks(pid) - ticks0) as f64 / ticks_per_second() as f64 / window * 1000.0;
    let (rss, _) = memory_kib(pid);

    // The burst: 3 messages on BURST queues at once.
    let chosen: Vec<usize> = (0..BURST.min(n)).map(|k| k * n / BURST.min(n)).collect();
    let redis = redis::Client::open(stack.broker_url()).expect("broker URL");
    let mut conn = redis.get_multiplexed_async_connection().await.expect("Redis");
    let mut pipe = redis::pipe();
    for &i in &chosen {
        let queue = format!("fleet-{i}");
        let messages: Vec<String> = (0..3).map(|m| kombu_message(&queue, m)).collect();
        pipe.cmd("LPUSH").arg(&queue).arg(messages).ignore();
    }
    let mut changes = server.changes();
    let pushed = Instant::now();
    let _: () = pipe.query_async(&mut conn).await.expect("LPUSH");
    let mut pending: HashMap<String, ()> = chosen.iter().map(|i| (format!("fleet-{i}-worker"), ())).collect();
    let mut took = Vec::with_capacity(chosen.len());
    let deadline = Instant::now() + DEADLINE;
    while !pending.is_empty() {
        changes.borrow_and_update();
        let now = Instant::now();
        pending.retain(|d, _| {
            let up = spec_replicas(&server, &ns, d).is_some_and(|r| r > 0);
            if up {
                took.push(now - pushed);
            }
            !up
        });
        if pending.is_empty() {
            break;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!("{n}: {} pools never scaled up", pending.len()),
        }
    }
    took.sort();
    let (_, peak) = memory_kib(pid);
    let row = format!(
        "| {n} | {:.0} MiB ({:.0} MiB) | {millicores:.0} mCPU | {requests:.1} | {} / {} / {} | {} |",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        secs(percentile(&took, 50.0)),
        secs(percentile(&took, 99.0)),
        secs(*took.last().unwrap_or(&Duration::ZERO)),
        load_average()
    );
    stack.shutdown(Duration::from_secs(5)).await;
    row
}
