//! Part `mixed` of the autoscale benchmark (issue #11): one mixed workload — a steady trickle,
//! bursts, and tasks retried with backoff — run by real Celery workers under three policies, one
//! after the other on one stack: the operator's depth rule, the operator's latency target, and the
//! KEDA-equivalent controller ([`KedaHpa`] driven by [`drive`]).
//!
//! Per run: p95 queue latency (send → start of execution; for a retried task, its final attempt's
//! ETA → start), drain time (last send → every task done) and replica-seconds (∫ spec.replicas dt).
//! Knobs (environment): `BENCH_MIX_SECONDS` (workload length, default 120), `BENCH_MIX_TRICKLE_EVERY`
//! (seconds between trickle tasks, default 1), `BENCH_MIX_BURSTS` (default 2) ×
//! `BENCH_MIX_BURST_TASKS` (default 100), `BENCH_MIX_RETRYING` (tasks that fail 3 times before they
//! succeed, default 20), `BENCH_MIX_TARGET_LATENCY` (default 20 s) and
//! `BENCH_MIX_LATENCY_TARGET_PER_REPLICA` (the latency pool's depth rule, default 1000: out of the
//! way), `BENCH_MIX_POLICIES` (comma-separated subset of `depth,latency,keda`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_e2e::stack::Pods;
use kube::Api;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    Bench, Clock, DEADLINE, KedaHpa, KedaPolicy, Model, ScaleSubresource, Timeline, autoscaling, drive, env_number,
    replica_seconds, secs, show_steps, steps,
};

/// Worker processes per replica and the most replicas any policy may run.
const CONCURRENCY: u32 = 2;
const MAX_REPLICAS: u32 = 10;
/// How long every task runs (the example app's `sleep`, and `recovering` once it succeeds).
const TASK_SECONDS: f64 = 1.0;
/// Failed attempts of each retried task before it succeeds: retries after 5, 10 and 20 s.
const RETRY_FAILURES: u32 = 3;
/// The operator pools' scale-down window: the CRD's default.
const STABILIZATION: u32 = 60;

/// The workload, from the environment.
#[derive(Clone, Debug)]
struct Workload {
    seconds: f64,
    trickle_every: f64,
    bursts: usize,
    burst_tasks: usize,
    retrying: usize,
}

impl Workload {
    fn from_env() -> Workload {
        let float = |name: &str, default: f64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Workload {
            seconds: float("BENCH_MIX_SECONDS", 120.0),
            trickle_every: float("BENCH_MIX_TRICKLE_EVERY", 1.0).max(0.05),
            bursts: env_number("BENCH_MIX_BURSTS", 2),
            burst_tasks: env_number("BENCH_MIX_BURST_TASKS", 100),
            retrying: env_number("BENCH_MIX_RETRYING", 20),
        }
    }

    /// (offset from the start, kind, task, args), in the order sent: the trickle over the whole
    /// workload, bursts at its k/n points (the last one at its end, so the drain time is the last
    /// burst's), retried tasks spread over its first half.
    fn schedule(&self) -> Vec<(f64, &'static str, &'static str, Value)> {
        let mut out = Vec::new();
        let mut i = 0;
        while (i as f64) * self.trickle_every < self.seconds {
            out.push(((i as f64) * self.trickle_every, "trickle", "celery_example.sleep", json!([TASK_SECONDS])));
            i += 1;
        }
        for k in 1..=self.bursts {
            let at = self.seconds * k as f64 / self.bursts as f64;
            for _ in 0..self.burst_tasks {
                out.push((at, "burst", "celery_example.sleep", json!([TASK_SECONDS])));
            }
        }
        for k in 0..self.retrying {
            let at = self.seconds / 2.0 * k as f64 / self.retrying as f64;
            out.push((at, "retry", "celery_example.recovering", json!([RETRY_FAILURES, TASK_SECONDS])));
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Depth,
    Latency,
    Keda,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Depth => "depth",
            Policy::Latency => "latency",
            Policy::Keda => "keda",
        }
    }
}

/// Sends the schedule to one queue at its offsets from `BENCH_START` (epoch seconds) and prints
/// `[id, kind, sent]` per task.
const SEND: &str = r#"
import json, os, time
from celery_example.app import app
schedule = json.loads(os.environ["BENCH_SCHEDULE"])
start, queue = float(os.environ["BENCH_START"]), os.environ["BENCH_QUEUE"]
out = []
for offset, kind, name, args in schedule:
    delay = start + offset - time.time()
    if delay > 0:
        time.sleep(delay)
    sent = time.time()
    out.append([app.send_task(name, args=args, queue=queue).id, kind, sent])
print(json.dumps(out))
"#;

/// Waits for every task's result and prints `{id: [state, started, eta, done]}` (epoch seconds;
/// `eta` is the final attempt's ETA for a retried task).
const COLLECT: &str = concat!(
    wait_ready_py!(),
    r#"from datetime import datetime, timezone
def epoch(d):
    if d is None:
        return None
    if isinstance(d, str):
        d = datetime.fromisoformat(d)
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp()
out = {}
for i in ids:
    r = AsyncResult(i, app=app)
    value = r.result if r.successful() else {"error": repr(r.result)}
    out[i] = [r.state, value.get("started"), epoch(value.get("eta")), epoch(r.date_done) if r.ready() else None,
              value.get("error"), value.get("hostname")]
print(json.dumps(out))
"#
);

/// One policy's run.
#[derive(Debug)]
struct Outcome {
    policy: Policy,
    /// Queue latency per executed task (kind, seconds).
    latencies: Vec<(&'static str, f64)>,
    /// Last send → last task done.
    drain: Duration,
    /// ∫ spec.replicas dt from the start to every task done, and to back at 0 replicas.
    replica_seconds_work: f64,
    replica_seconds_total: f64,
    /// Start → back at 0 replicas (computed from the model past the workload for KEDA).
    back_to_zero: Duration,
    peak: u32,
    failed: usize,
    tasks: usize,
    steps: Vec<(Duration, u32)>,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

impl Outcome {
    fn of_kind(&self, kind: Option<&str>) -> Vec<f64> {
        self.latencies.iter().filter(|l| kind.is_none_or(|k| l.0 == k)).map(|l| l.1).collect()
    }
}

pub(crate) async fn mixed() {
    let workload = Workload::from_env();
    let target_latency = env_number("BENCH_MIX_TARGET_LATENCY", 20) as u32;
    let latency_per_replica = env_number("BENCH_MIX_LATENCY_TARGET_PER_REPLICA", 1000) as u32;
    let policies: Vec<Policy> = std::env::var("BENCH_MIX_POLICIES")
        .unwrap_or_else(|_| "depth,latency,keda".into())
        .split(',')
        .filter_map(|p| [Policy::Depth, Policy::Latency, Policy::Keda].into_iter().find(|q| q.name() == p.trim()))
        .collect();
    let schedule = workload.schedule();
    println!("\n## 4. Mixed workload: trickle, bursts and retries with backoff, real Celery workers\n");
    println!(
        "{} s of workload: a trickle of sleep({TASK_SECONDS} s) every {} s, {} burst(s) of {} × sleep({TASK_SECONDS} s), \
         {} tasks failing {RETRY_FAILURES} times (retried after 5, 10, 20 s) in the first half; {} tasks in all. \
         Pools: concurrency {CONCURRENCY}, prefetch 1, minReplicas 0, maxReplicas {MAX_REPLICAS}. \
         Operator pools: pollIntervalSeconds 1, scaleDownStabilizationSeconds {STABILIZATION}; depth: targetPerReplica \
         {CONCURRENCY}; latency: targetLatencySeconds {target_latency}, targetPerReplica {latency_per_replica}. \
         KEDA-equivalent: listLength {CONCURRENCY}, defaults otherwise.\n",
        workload.seconds,
        workload.trickle_every,
        workload.bursts,
        workload.burst_tasks,
        workload.retrying,
        schedule.len()
    );
    let bench = Bench::start(Pods::Celery).await;
    let mut outcomes = Vec::new();
    for policy in policies {
        let queue = format!("mix-{}", policy.name());
        bench.queue(&queue).await;
        let scaling = match policy {
            Policy::Depth => Some(autoscaling(0, MAX_REPLICAS, None, STABILIZATION)),
            Policy::Latency => {
                let mut a = autoscaling(0, MAX_REPLICAS, Some(latency_per_replica), STABILIZATION);
                a["targetLatencySeconds"] = json!(target_latency);
                Some(a)
            }
            Policy::Keda => None,
        };
        let mut timeline = bench.pool(&queue, &queue, CONCURRENCY, scaling).await;
        let outcome = run(&bench, &mut timeline, policy, &queue, &schedule).await;
        eprintln!("{}: {outcome:?}", policy.name());
        println!("{} spec.replicas: {}", policy.name(), show_steps(&outcome.steps));
        if policy != Policy::Keda {
            // Which rule decided each scaling: the operator logs every change with its reason.
            let log = bench.stack.operator_log();
            for line in log.lines().filter(|l| l.contains("scaled") && l.contains(&format!("/{queue}"))) {
                println!("    {line}");
            }
        }
        if policy == Policy::Keda {
            let pools: Api<celery_operator::crd::WorkerPool> =
                Api::namespaced(bench.stack.client(), bench.stack.namespace());
            let patch = kube::api::Patch::Merge(json!({"spec": {"replicas": 0}}));
            let params = kube::api::PatchParams { field_manager: Some("keda-equivalent".into()), ..Default::default() };
            pools.patch_scale(&queue, &params, &patch).await.expect("scale the KEDA pool to 0");
        }
        timeline.settle(&format!("{queue}: every pod gone"), 0).await;
        println!("(load average after {}: {})", policy.name(), super::load_average());
        outcomes.push(outcome);
    }

    println!(
        "\n| policy | p95 queue latency | p50 | max | drain (last send → all done) | replica-seconds, start → all done | replica-seconds, start → back at 0 | peak replicas | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let label = |p: Policy| match p {
        Policy::Depth => format!("operator, depth rule (targetPerReplica {CONCURRENCY})"),
        Policy::Latency => format!(
            "operator, latency target (targetLatencySeconds {target_latency}, targetPerReplica {latency_per_replica})"
        ),
        Policy::Keda => format!("KEDA-equivalent (listLength {CONCURRENCY}, defaults)"),
    };
    for o in &outcomes {
        let all = o.of_kind(None);
        println!(
            "| {} | {:.1} s | {:.1} s | {:.1} s | {} | {:.0} | {:.0} (at 0 after {}) | {} | {} of {} |",
            label(o.policy),
            percentile(&all, 0.95),
            percentile(&all, 0.50),
            percentile(&all, 1.0),
            secs(o.drain),
            o.replica_seconds_work,
            o.replica_seconds_total,
            secs(o.back_to_zero),
            o.peak,
            o.failed,
            o.tasks
        );
    }
    println!("\nQueue latency by kind (p50 / p95 / max, seconds):\n");
    println!("| policy | trickle | burst | retry (final attempt, from its ETA) |\n|---|---:|---:|---:|");
    for o in &outcomes {
        let cell = |kind: &str| {
            let v = o.of_kind(Some(kind));
            format!(
                "{:.1} / {:.1} / {:.1} (n {})",
                percentile(&v, 0.5),
                percentile(&v, 0.95),
                percentile(&v, 1.0),
                v.len()
            )
        };
        println!("| {} | {} | {} | {} |", label(o.policy), cell("trickle"), cell("burst"), cell("retry"));
    }
    bench.stack.shutdown(Duration::from_secs(10)).await;
}

async fn run(
    bench: &Bench,
    timeline: &mut Timeline,
    policy: Policy,
    queue: &str,
    schedule: &[(f64, &'static str, &'static str, Value)],
) -> Outcome {
    // The sender starts 2 s from now (Python's start-up); time 0 of every measurement.
    let lead = Duration::from_secs(2);
    let start_wall = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64() + lead.as_secs_f64();
    let t0 = Instant::now() + lead;
    let done = Arc::new(AtomicBool::new(false));
    let sched: Vec<Value> = schedule.iter().map(|(at, kind, name, args)| json!([at, kind, name, args])).collect();

    let measure = {
        let done = done.clone();
        async move {
            let env = [
                ("BENCH_SCHEDULE", Value::Array(sched).to_string()),
                ("BENCH_START", start_wall.to_string()),
                ("BENCH_QUEUE", queue.to_string()),
            ];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let out = bench.stack.python(SEND, &env).await.expect("workload sent");
            let sent: Vec<(String, String, f64)> = serde_json::from_str(out.trim()).expect("SEND output");
            let ids: Vec<&str> = sent.iter().map(|s| s.0.as_str()).collect();
            let env = [("BENCH_IDS", json!(ids).to_string()), ("BENCH_TIMEOUT", DEADLINE.as_secs().to_string())];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let out = bench.stack.python(COLLECT, &env).await.expect("results read");
            let results: serde_json::Map<String, Value> = serde_json::from_str(out.trim()).expect("COLLECT output");
            done.store(true, Ordering::SeqCst);
            (sent, results, Instant::now())
        }
    };

    let ((sent, results, done_at), keda) = match policy {
        Policy::Keda => {
            let p = KedaPolicy::defaults(u64::from(CONCURRENCY), MAX_REPLICAS);
            // Both loops at their mean phase relative to the start.
            let mut clock = Clock { next_poll: p.polling_interval / 2, next_sync: p.sync_period / 2 };
            let mut state = KedaHpa { polled: Some(0), ..KedaHpa::default() };
            let mut plant = ScaleSubresource {
                pools: Api::namespaced(bench.stack.client(), bench.stack.namespace()),
                name: queue.into(),
                redis: bench.redis().await,
                queue: queue.into(),
                origin: t0,
            };
            let stop = |_: Duration, _: &[(Duration, u32)], _: u32| done.load(Ordering::SeqCst);
            let (measured, _) = tokio::join!(measure, drive(&p, &mut state, &mut plant, &mut clock, stop));
            (measured, Some((p, state, clock)))
        }
        _ => (measure.await, None),
    };

    // Latencies: send → start; a retried task's final attempt: its ETA → start.
    let mut latencies = Vec::new();
    let (mut failed, mut last_done) = (0, 0.0_f64);
    for (id, kind, sent_at) in &sent {
        let r = &results[id];
        let (state, started, eta, finished) = (r[0].as_str(), r[1].as_f64(), r[2].as_f64(), r[3].as_f64());
        last_done = last_done.max(finished.unwrap_or(0.0));
        if state != Some("SUCCESS") {
            println!("    not successful: {kind} task {id} sent at {sent_at:.3}: {r}");
            failed += 1;
            continue;
        }
        let kind: &'static str = match kind.as_str() {
            "trickle" => "trickle",
            "burst" => "burst",
            _ => "retry",
        };
        if let Some(started) = started {
            let from = if kind == "retry" { eta.unwrap_or(*sent_at) } else { *sent_at };
            latencies.push((kind, (started - from).max(0.0)));
        }
    }
    let last_sent = sent.iter().map(|s| s.2).fold(0.0, f64::max);
    let drain = Duration::from_secs_f64((last_done - last_sent).max(0.0));
    let work_end = done_at.saturating_duration_since(t0);

    // Back at 0: measured for the operator; for KEDA, computed from the model once every task is done
    // (300 s stabilization + 300 s cooldown would triple the run).
    let (mut all_steps, back_to_zero) = match keda {
        None => {
            let back = until_rests_at_zero(timeline).await;
            (steps(&timeline.since(t0), t0), back.saturating_duration_since(t0))
        }
        Some((p, mut state, mut clock)) => {
            let mut measured = steps(&timeline.since(t0), t0);
            let current = measured.last().map_or(0, |s| s.1);
            let mut model = Model { now: work_end, replicas: current, backlog: 0 };
            let rest = drive(&p, &mut state, &mut model, &mut clock, |_, _, current| current == 0).await;
            let end = rest.last().map_or(work_end, |w| w.0);
            measured.retain(|s| s.0 <= work_end);
            measured.extend(rest);
            (measured, end)
        }
    };
    all_steps.retain(|s| s.0 <= back_to_zero);
    Outcome {
        policy,
        latencies,
        drain,
        replica_seconds_work: replica_seconds(&all_steps, work_end),
        replica_seconds_total: replica_seconds(&all_steps, back_to_zero),
        back_to_zero,
        peak: all_steps.iter().map(|s| s.1).max().unwrap_or(0),
        failed,
        tasks: sent.len(),
        steps: all_steps,
    }
}

/// Waits until the Deployment's spec.replicas is 0 and returns when it became 0.
async fn until_rests_at_zero(timeline: &mut Timeline) -> Instant {
    let last = timeline.log.lock().expect("timeline lock").last().copied();
    match last {
        Some(s) if s.replicas.spec == 0 => s.at,
        _ => timeline.until("spec.replicas back at 0", Instant::now(), |r| r.spec == 0).await.at,
    }
}
