//! The chart's Grafana dashboard and alerts against a live operator scraped by a real Prometheus
//! (issue #13): every query of every panel, the dashboard's variable, and every alert expression
//! returns series, and Prometheus evaluates every alert rule without error to pending or firing.
//! The queries are read from `charts/celery-operator/files/`, so a new panel or alert is checked
//! without touching this test; a panel querying a metric the operator does not export fails here.
//!
//! The scenario makes every alert's condition true: an operator (leader election off) with a
//! standby replica beside it (leader election on, the Lease held by someone else), a private Redis
//! with an `allkeys-lru` policy and a growing backlog, a TaskQueue on a closed port, a pool pinned
//! at its maxReplicas, a pool that scales up, a pool whose Deployment writes fail, and a pool an HPA
//! also targets.
//! The no-leader alert is checked last, after the operator is stopped and only the standby runs.
//!
//! Prometheus is Debian's `prometheus` (skipped with a NOTICE when it is not on PATH; `.ci/run`
//! installs it), in its own temp dir on a free port, scraping every second with `honor_labels` as
//! the chart's ServiceMonitor does, and with target labels (`namespace`, `pod`) that collide with
//! the operator's own `namespace` label the way a Kubernetes scrape's do.

mod common;
use common::poll;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use celery_e2e::stack::{Pods, Stack, StackConfig};
use celery_e2e::{Fault, RequestMatch};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");
/// Generous: CI has 2 cores and runs test binaries in parallel.
const DEADLINE: Duration = Duration::from_secs(240);
/// Alerts whose condition needs the operator gone: checked once only the standby runs.
const WITHOUT_A_LEADER: [&str; 1] = ["CeleryOperatorNoLeader"];
/// The namespace the operator pods run in, as a Kubernetes scrape labels their series.
const OPERATOR_NAMESPACE: &str = "celery-system";

fn chart_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/celery-operator").join(path)
}

/// A PromQL query and where it comes from, for failure messages.
#[derive(Clone, Debug)]
struct Query {
    source: String,
    expr: String,
}

/// Every query of the dashboard, with its variables at their "All" values.
fn dashboard_queries() -> Vec<Query> {
    let text = std::fs::read_to_string(chart_file("files/dashboards/celery-operator.json")).expect("dashboard JSON");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let all = |expr: &str| expr.replace("$namespace", ".*");
    let mut queries = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().expect("templating list") {
        let Some(definition) = variable["definition"].as_str() else { continue };
        // label_values(metric, label): the metric must have series carrying the label.
        let inner = definition.strip_prefix("label_values(").and_then(|d| d.strip_suffix(')')).expect("label_values");
        let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        queries.push(Query {
            source: format!("variable ${}", variable["name"].as_str().unwrap_or_default()),
            expr: format!("count by ({}) ({})", label.trim(), metric.trim()),
        });
    }
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(Query {
                source: format!("panel {:?} {}", panel["title"].as_str().unwrap_or_default(), target["refId"]),
                expr: all(target["expr"].as_str().expect("expr")),
            });
        }
    }
    assert!(queries.len() > 10, "the dashboard lost its panels? {queries:?}");
    queries
}

/// Every alert of the chart's rule file: (name, expression).
fn alerts() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(rule_file()).expect("rule file");
    let rules: Value = serde_saphyr::from_str(&text).expect("rule file is YAML");
    let alerts: Vec<(String, String)> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| (r["alert"].as_str().expect("alert").to_string(), r["expr"].as_str().expect("expr").to_string()))
        .collect();
    for name in WITHOUT_A_LEADER {
        assert!(alerts.iter().any(|(a, _)| a == name), "{name} is not in the rule file any more");
    }
    alerts
}

fn rule_file() -> PathBuf {
    chart_file("files/alerts/celery-operator.rules.yaml")
}

// ------------------------------------------------------------------------------------ Prometheus

struct Prometheus {
    _child: Child,
    addr: SocketAddr,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` scraping `targets` (address, pod name) every second with the chart's rules.
    async fn start(bin: &Path, targets: &[(SocketAddr, &str)]) -> Prometheus {
        let dir = tempfile::Builder::new().prefix("monitoring-prometheus-").tempdir().expect("temp dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", e2e_harness::free_port()).parse().expect("address");
        let static_configs: Vec<Value> = targets
            .iter()
            .map(|(target, pod)| {
                json!({"targets": [target.to_string()], "labels": {"namespace": OPERATOR_NAMESPACE, "pod": pod}})
            })
            .collect();
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rule_file()],
            // honor_labels: as the chart's ServiceMonitor (honorLabels: true).
            "scrape_configs": [{"job_name": "celery-operator", "honor_labels": true, "static_configs": static_configs}],
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.to_string()).expect("write prometheus.yml"); // JSON is YAML
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { _child: child, addr, http: reqwest::Client::new(), _dir: dir };
        let ready = format!("http://{addr}/-/ready");
        poll("Prometheus to be ready", || async {
            prometheus.http.get(&ready).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        prometheus
    }

    /// The result of an instant query, or Prometheus' error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = url::Url::parse_with_params(&format!("http://{}/api/v1/query", self.addr), [("query", expr)])
            .expect("query URL");
        let body: Value = self.get(url.as_str()).await?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(match body["data"]["resultType"].as_str() {
            Some("vector" | "matrix") => body["data"]["result"].as_array().cloned().unwrap_or_default(),
            _ => vec![body["data"]["result"].clone()],
        })
    }

    /// The loaded alerting rules: name → (state, health, last error).
    async fn rules(&self) -> Result<Vec<(String, String, String, String)>, String> {
        let body = self.get(&format!("http://{}/api/v1/rules?type=alert", self.addr)).await?;
        Ok(body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                (s("name"), s("state"), s("health"), s("lastError"))
            })
            .collect())
    }

    async fn get(&self, url: &str) -> Result<Value, String> {
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        response.json().await.map_err(|e| e.to_string())
    }
}

// ------------------------------------------------------------------------------------ helpers

/// The queries that return no series (with Prometheus' error, if any), and alerts of `names` that
/// Prometheus does not hold pending or firing (or evaluates with an error).
async fn what_is_missing(prometheus: &Prometheus, queries: &[Query], names: &[String]) -> Vec<String> {
    let mut missing = Vec::new();
    for q in queries {
        match prometheus.query(&q.expr).await {
            Ok(series) if !series.is_empty() => {}
            Ok(_) => missing.push(format!("{}: no series for {}", q.source, q.expr)),
            Err(e) => missing.push(format!("{}: {e} for {}", q.source, q.expr)),
        }
    }
    match prometheus.rules().await {
        Ok(rules) => {
            for name in names {
                match rules.iter().find(|r| &r.0 == name) {
                    Some((_, state, health, error)) if health == "err" => {
                        missing.push(format!("alert {name}: evaluation failed ({state}): {error}"))
                    }
                    Some((_, state, _, _)) if state == "pending" || state == "firing" => {}
                    Some((_, state, _, _)) => missing.push(format!("alert {name} is {state}")),
                    None => missing.push(format!("alert {name} is not loaded by Prometheus")),
                }
            }
        }
        Err(e) => missing.push(format!("/api/v1/rules: {e}")),
    }
    missing
}

/// Waits until every query returns series and every alert in `names` is pending or firing;
/// on timeout, fails listing what is still missing and the operator's log.
async fn until_everything_answers(stack: &Stack, prometheus: &Prometheus, queries: &[Query], names: &[String]) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let missing = what_is_missing(prometheus, queries, names).await;
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let log = stack.operator_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            panic!(
                "after {DEADLINE:?} still missing:\n  {}\n--- operator log (last 40 lines) ---\n{}",
                missing.join("\n  "),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn prometheus_binary() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("prometheus")).find(|p| p.is_file())
}

/// A second operator replica with leader election on. The Lease is held by someone else, so it
/// stays a standby: `celery_operator_leader 0`, and no queue or pool gauges.
async fn start_standby(stack: &Stack, lease: &str, log: &Path) -> (Child, SocketAddr) {
    stack
        .apply_yaml(
            &json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": lease},
                "spec": {"holderIdentity": "a-replica-elsewhere", "leaseDurationSeconds": 3600,
                    "acquireTime": Timestamp::now().to_string(), "renewTime": Timestamp::now().to_string()}})
            .to_string(),
        )
        .await
        .expect("the Lease applies");
    let addr: SocketAddr = format!("127.0.0.1:{}", e2e_harness::free_port()).parse().expect("address");
    let log = std::fs::File::create(log).expect("standby log");
    let child = Command::new(OPERATOR)
        .args(["run", "--leader-election", "true", "--lease-name", lease, "--lease-namespace", stack.namespace()])
        .args(["--watch-namespaces", stack.namespace(), "--metrics-addr", &addr.to_string()])
        .env("KUBECONFIG", stack.kubeconfig_path())
        .env("POD_NAME", "celery-operator-standby")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("standby log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the standby operator");
    (child, addr)
}

async fn redis(stack: &Stack) -> redis::aio::MultiplexedConnection {
    redis::Client::open(stack.broker_url())
        .expect("broker URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the stack's Redis")
}

fn pool(name: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["app"] = "celery_example.app".into();
    spec["image"] = "ghcr.io/celery-operator/worker-example:0.1.0".into();
    spec["queues"] = json!(["work"]);
    json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": name}, "spec": spec})
}

// ------------------------------------------------------------------------------------ the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_expression_returns_series_from_a_live_operator() {
    let Some(prometheus_bin) = prometheus_binary() else {
        eprintln!("NOTICE: skipping: no `prometheus` on PATH (Debian: apt-get install prometheus)");
        return;
    };
    if std::env::var_os("E2E_KUBECONFIG").is_some() {
        eprintln!("NOTICE: skipping: this scenario injects API faults into the control-plane double");
        return;
    }
    let queries = dashboard_queries();
    let alerts = alerts();

    let config = StackConfig { pods: Pods::Simulated, ..StackConfig::with_operator(OPERATOR) };
    let mut stack = Stack::start(config).await.expect("the e2e stack starts");
    let logs = tempfile::Builder::new().prefix("monitoring-").tempdir().expect("temp dir");
    let (_standby, standby_addr) =
        start_standby(&stack, "celery-operator-monitoring", &logs.path().join("standby.log")).await;

    // Scraping from the start, so Prometheus sees counters rise (a counter first scraped at its
    // final value has no rate).
    let prometheus = Prometheus::start(
        &prometheus_bin,
        &[(stack.metrics_addr(), "celery-operator-0"), (standby_addr, "celery-operator-standby")],
    )
    .await;
    // The broker: waiting tasks, and an eviction policy that can drop them (BrokerSafe=False).
    // The oldest carries a publish stamp (the `before_task_publish` convention the latency probe
    // reads) of an hour ago, so the queue's latency is over CeleryQueueLatencyHigh's 5 minutes.
    let mut redis = redis(&stack).await;
    let an_hour_ago = Timestamp::now().as_second() - 3600;
    // Written as Python's json.dumps writes kombu's messages (the probe looks for `"key": `).
    let stamped = format!(
        r#"{{"body": "", "headers": {{"eta": null}}, "properties": {{"published_at": {an_hour_ago}, "delivery_tag": "0b5e7c1e-0000-4000-8000-000000000001"}}}}"#
    );
    let _: () = redis::cmd("LPUSH")
        .arg("work")
        .arg(&[stamped.as_str(), "task-1", "task-2", "task-3", "task-4"])
        .query_async(&mut redis)
        .await
        .expect("LPUSH");
    for (setting, value) in [("maxmemory", "1gb"), ("maxmemory-policy", "allkeys-lru")] {
        let _: () =
            redis::cmd("CONFIG").arg(&["SET", setting, value]).query_async(&mut redis).await.expect("CONFIG SET");
    }
    let closed_port = e2e_harness::free_port();
    stack
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: broker}}\nstringData: {{url: 'redis://:x@redis:6379/0'}}\n---\n\
             apiVersion: celery-operator.dev/v1alpha1\nkind: TaskQueue\nmetadata: {{name: work}}\n\
             spec: {{broker: {{urlFrom: {{secretKeyRef: {{name: broker, key: url}}}}}}}}\n---\n\
             apiVersion: celery-operator.dev/v1alpha1\nkind: TaskQueue\nmetadata: {{name: lost}}\n\
             spec: {{broker: {{url: 'redis://127.0.0.1:{closed_port}/0'}}}}\n"
        ))
        .await
        .expect("the TaskQueues apply");
    // Reconcile errors: every write of one pool's Deployment fails (retried with backoff, so the
    // error count keeps rising while Prometheus scrapes).
    let server = stack.server().expect("the double");
    server.inject(Fault::error(500).on(RequestMatch::writes().resource("deployments").name("flaky-worker")));
    let pools = [
        // Pinned at maxReplicas from the start while its backlog grows: CeleryPoolSaturated.
        pool("capped", json!({"autoscaling": {"minReplicas": 1, "maxReplicas": 1}})),
        // Scales up from zero: scale events.
        pool("burst", json!({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}})),
        pool("flaky", json!({"replicas": 1})),
        // An HPA targets its Deployment too: ScalingActive=False/ScalerConflict.
        pool("contested", json!({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}})),
    ];
    for doc in pools {
        stack.apply_yaml(&doc.to_string()).await.expect("the pool applies");
    }
    let hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "contested"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "contested-worker"},
            "minReplicas": 1, "maxReplicas": 3}});
    stack.apply_yaml(&hpa.to_string()).await.expect("the HPA applies");

    // Nobody consumes (simulated pods): the backlog keeps growing, one task a second.
    let mut feeder = redis.clone();
    let feeding = tokio::spawn(async move {
        for n in 5.. {
            let _: Result<(), _> =
                redis::cmd("LPUSH").arg("work").arg(format!("task-{n}")).query_async(&mut feeder).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    let leading: Vec<String> =
        alerts.iter().map(|(name, _)| name.clone()).filter(|n| !WITHOUT_A_LEADER.contains(&n.as_str())).collect();
    let mut checked = queries.clone();
    checked.extend(
        alerts
            .iter()
            .filter(|(name, _)| leading.contains(name))
            .map(|(name, expr)| Query { source: format!("alert {name}"), expr: expr.clone() }),
    );
    until_everything_answers(&stack, &prometheus, &checked, &leading).await;

    // Only the standby is left: nobody leads.
    let status = stack.stop_operator().await.expect("the operator stops");
    assert!(status.success(), "the operator exited with {status}");
    let unled: Vec<String> = WITHOUT_A_LEADER.iter().map(|s| s.to_string()).collect();
    let checked: Vec<Query> = alerts
        .iter()
        .filter(|(name, _)| unled.contains(name))
        .map(|(name, expr)| Query { source: format!("alert {name}"), expr: expr.clone() })
        .collect();
    until_everything_answers(&stack, &prometheus, &checked, &unled).await;
    feeding.abort();
    eprintln!("{} dashboard queries and {} alerts returned series", queries.len(), alerts.len());
}
