//! `celery-operator check-broker`: the operator's broker audit, run once from a terminal or a CI
//! job, against a broker URL with flags or against TaskQueue YAML files — judged exactly as the
//! operator judges them: the configuration comes from the same [`broker_config`] function and the
//! TaskQueue schema (with its CEL rules) validates the flags too.
//!
//! Exit codes: 0 safe, 1 unsafe (a warning or critical finding), 2 a broker could not be probed,
//! 64 a usage error (bad flags or input). With several brokers the worst wins: 2 over 1 over 0.
//! `--output json` prints one document in the versioned schema of `docs/broker-safety.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use celery_broker::latency::LatencyBasis;
use celery_broker::{
    AuditReport, BrokerConfig, BrokerInfo, BrokerObservation, Finding, LatencyTracker, ProbeError, Scheduled,
    SecretUrl, Severity,
};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use serde::Serialize;
use serde_json::json;

use crate::broker_config::{EndpointKey, ResolvedBroker, broker_config, can_scale_to_zero, judge_expiry_with_pools};
use crate::crd::{SafetyCheck, TaskQueue, ValueFrom, WorkerPool};
use crate::manifests::{self, Manifests};
use crate::probe::{self, QueueReport};
use crate::validate;

/// The `apiVersion` of the JSON output; bumped on any incompatible change.
pub const JSON_SCHEMA_VERSION: &str = "celery-operator.dev/check-broker/v1";

/// Exit codes, for CI gates.
pub mod exit {
    /// Every broker was probed and nothing can silently lose tasks.
    pub const SAFE: u8 = 0;
    /// A finding of warning or critical severity.
    pub const UNSAFE: u8 = 1;
    /// A broker could not be probed (unreachable, refused, timed out).
    pub const UNREACHABLE: u8 = 2;
    /// Bad flags or input (BSD `EX_USAGE`).
    pub const USAGE: u8 = 64;
}

/// How `check-broker` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A table and findings for people.
    #[default]
    Text,
    /// One JSON document (schema celery-operator.dev/check-broker/v1).
    Json,
}

/// The flags of `check-broker`. Broker URLs may come from the environment so that they stay out of
/// shell history and process listings; their values are never printed.
#[derive(clap::Args, Debug, Default)]
pub struct CheckBrokerArgs {
    /// A broker URL (redis://, rediss://, sentinel://, amqp://, amqps://), or
    /// `secret/[NAMESPACE/]NAME:KEY` to read it from a Secret with the current kubeconfig. Omit it
    /// to use --broker-url / CELERY_BROKER_URL, or --file.
    pub target: Option<String>,
    /// TaskQueue YAML files or directories (WorkerPools and Secrets in them are used too): audits
    /// every TaskQueue's broker as the operator would. With a URL instead, WorkerPool files tell
    /// which queues a pool can leave without consumers.
    #[arg(long = "file", short = 'f')]
    pub files: Vec<PathBuf>,
    /// Celery queue to report (repeatable); default: every queue found on the broker.
    #[arg(long = "queue", short = 'q')]
    pub queues: Vec<String>,
    /// The broker URL: instead of TARGET, or for TaskQueues whose urlFrom Secret is not at hand.
    #[arg(long, env = "CELERY_BROKER_URL", hide_env_values = true)]
    pub broker_url: Option<String>,
    /// RabbitMQ management API URL (http[s]://user:pass@host:15672): policies, queue arguments,
    /// unacked counts. For TaskQueues, the value of their managementUrlFrom.
    #[arg(long, env = "CELERY_BROKER_MANAGEMENT_URL", hide_env_values = true)]
    pub management_url: Option<String>,
    /// PEM file of the CA to trust for rediss://, amqps:// and https://. For TaskQueues, the value of
    /// their tls.caFrom.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Read the Secrets TaskQueues reference (urlFrom, managementUrlFrom, tls.caFrom) from the
    /// cluster of the current kubeconfig.
    #[arg(long)]
    pub from_cluster: bool,
    /// Namespace of YAML objects that name none.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// kombu priority_steps, comma-separated (Redis). Default 0,3,6,9.
    #[arg(long, value_delimiter = ',')]
    pub priority_steps: Option<Vec<i32>>,
    /// kombu sep between a queue name and its priority (Redis). Default "\x06\x16".
    #[arg(long)]
    pub separator: Option<String>,
    /// kombu global_keyprefix (Redis).
    #[arg(long)]
    pub global_keyprefix: Option<String>,
    /// kombu master_name: the Sentinel master, for sentinel:// URLs.
    #[arg(long)]
    pub master_name: Option<String>,
    /// kombu visibility_timeout in seconds (Redis); older unacked messages count as orphaned.
    #[arg(long)]
    pub visibility_timeout: Option<i64>,
    /// Switch an unsafe Redis eviction policy to noeviction where CONFIG SET is allowed.
    #[arg(long)]
    pub fix: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Bad flags or input: printed, exit 64.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One broker endpoint to audit.
pub struct Endpoint {
    pub config: BrokerConfig,
    /// Queues to report; empty: every queue found.
    pub queues: Vec<String>,
    /// The TaskQueues that use this endpoint (YAML mode).
    pub task_queues: Vec<TaskQueue>,
}

/// What auditing one endpoint gave.
pub struct Outcome {
    /// The broker URL, redacted.
    pub endpoint: String,
    /// `namespace/name` of the TaskQueues on it (YAML mode).
    pub task_queues: Vec<String>,
    pub result: Result<AuditReport, ProbeError>,
    /// Every queue of the report, as the operator would write it into TaskQueue status (empty when
    /// the probe failed).
    pub queues: Vec<QueueRow>,
}

impl Outcome {
    fn exit_code(&self) -> u8 {
        match &self.result {
            Err(_) => exit::UNREACHABLE,
            Ok(report) if report.is_unsafe() => exit::UNSAFE,
            Ok(_) => exit::SAFE,
        }
    }
}

/// The exit code for a set of outcomes: unreachable over unsafe over safe.
pub fn exit_code(outcomes: &[Outcome]) -> u8 {
    let codes: Vec<u8> = outcomes.iter().map(Outcome::exit_code).collect();
    [exit::UNREACHABLE, exit::UNSAFE].into_iter().find(|c| codes.contains(c)).unwrap_or(exit::SAFE)
}

/// Runs the command: prints the report and returns the exit code.
pub async fn run(args: CheckBrokerArgs) -> u8 {
    let output = args.output;
    let (endpoints, pools) = match plan(args).await {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let mut outcomes = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        outcomes.push(audit_endpoint(endpoint, &pools).await);
    }
    // An invalid URL or CA inside a Secret is bad input, not an unreachable broker.
    if let Some(e) = outcomes.iter().find_map(|o| o.result.as_ref().err().filter(|e| is_input_error(e))) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    match output {
        OutputFormat::Text => {
            print!("{}", render_text(&outcomes));
            for e in outcomes.iter().filter_map(|o| o.result.as_ref().err()) {
                eprintln!("error: {e}");
            }
        }
        OutputFormat::Json => {
            println!("{}", render_json(&outcomes))
        }
    }
    exit_code(&outcomes)
}

fn is_input_error(e: &ProbeError) -> bool {
    matches!(e, ProbeError::InvalidUrl { .. } | ProbeError::CaCertificate { .. })
}

/// The pools that judge expiring queues, and how they name queues.
pub enum Pools {
    /// None given.
    None,
    /// WorkerPools next to TaskQueues: they name TaskQueues.
    ForTaskQueues(Vec<WorkerPool>),
    /// WorkerPools next to a URL: their queue names are taken as Celery queue names (a TaskQueue's
    /// queueName defaults to its name).
    ForCeleryQueues(Vec<WorkerPool>),
}

async fn audit_endpoint(endpoint: Endpoint, pools: &Pools) -> Outcome {
    let names =
        endpoint.task_queues.iter().map(|tq| format!("{}/{}", tq.namespace().unwrap_or_default(), tq.name_any()));
    let task_queues = names.collect();
    let endpoint_text = endpoint.config.url.redacted();
    let queues: Vec<&str> = endpoint.queues.iter().map(String::as_str).collect();
    let mut result = celery_broker::audit(endpoint.config, &queues).await;
    if let Ok(report) = &mut result {
        let findings = &mut report.observation.findings;
        match pools {
            Pools::None => {}
            Pools::ForTaskQueues(pools) => {
                for tq in &endpoint.task_queues {
                    judge_expiry_with_pools(findings, tq, pools);
                }
            }
            Pools::ForCeleryQueues(pools) => celery_broker::safety::escalate_expiring_queues(findings, |queue| {
                let consuming = pools.iter().filter(|p| p.spec.queues.iter().any(|q| q == queue));
                consuming.filter(|p| can_scale_to_zero(p)).map(|p| p.name_any()).collect()
            }),
        }
    }
    let queues = result.as_ref().map(|r| queue_rows(&r.observation, &r.endpoint, unix_now())).unwrap_or_default();
    Outcome { endpoint: result.as_ref().map_or(endpoint_text, |r| r.endpoint.clone()), task_queues, result, queues }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

// === Per-queue numbers: the operator's mapping of one poll ===

/// What one probe can tell of the age of a queue's oldest waiting (due) task. The operator ages
/// it across polls (a message first seen at one poll has waited at least since then); a one-shot
/// run is the operator's first poll, where that tells nothing yet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OneShotLatency {
    /// Read from the publish timestamp the app stamps on its messages (a `before_task_publish`
    /// handler setting `properties["published_at"]` on Redis, the AMQP `timestamp` property on a
    /// classic RabbitMQ queue): what the operator reports too.
    Stamped(Duration),
    /// No due task waits: a wait of 0.
    NothingWaiting,
    /// Not known from one probe; the reason.
    Unknown(&'static str),
}

/// Why the latency of a queue with waiting tasks is unknown to one probe.
pub const LATENCY_UNSTAMPED: &str = "the oldest waiting task carries no publish timestamp: one probe cannot \
     tell how long it has waited (the operator ages it across its polls)";
/// Why the latency is unknown where the probe did not see the queue's head.
pub const LATENCY_HEAD_UNREAD: &str = "the probe did not read the head of the queue (Redis: the list walk \
     failed; RabbitMQ: no management API, or no publish statistics for the queue yet)";

/// One queue as `check-broker` reports it.
#[derive(Clone, Debug)]
pub struct QueueRow {
    pub name: String,
    /// The numbers the operator writes into a TaskQueue's status for this queue (ready, unacked,
    /// consumers, waiting, scheduled, latencySeconds), from the operator's own mapping.
    pub status: QueueReport,
    /// Of unacked, delivered longer than the visibility timeout ago (Redis).
    pub orphaned_unacked: Option<u64>,
    /// Of unacked, tasks that are due: prefetched and not started, or running with `acks_late`
    /// (Redis; RabbitMQ cannot tell them from held scheduled tasks).
    pub reserved_due: Option<u64>,
    /// Where the scheduled tasks are and when they come due.
    pub scheduled: Option<Scheduled>,
    pub latency: OneShotLatency,
}

/// Every queue of one probe, mapped as the operator maps a poll of it: the observation goes
/// through a latency tracker (fresh, as at the operator's first poll) and [`probe::report`], the
/// function that writes TaskQueue status. `now` is the probe's time, Unix seconds.
pub fn queue_rows(observation: &BrokerObservation, endpoint: &str, now: f64) -> Vec<QueueRow> {
    let mut tracker = LatencyTracker::new();
    tracker.observe(now, observation);
    let rows = observation.queues.iter().map(|(name, seen)| {
        let tracked = tracker.latency(name);
        let status = probe::report(observation, name, endpoint.to_owned(), SafetyCheck::Warn, tracked);
        let latency = match (tracked, status.latency) {
            (Some(l), _) if l.basis == LatencyBasis::Timestamp => OneShotLatency::Stamped(l.oldest_wait),
            (Some(_), _) => OneShotLatency::Unknown(LATENCY_UNSTAMPED),
            (None, Some(_)) => OneShotLatency::NothingWaiting,
            // Nothing ready at all: nothing waits, whether or not the head was read.
            (None, None) if seen.ready == 0 => OneShotLatency::NothingWaiting,
            (None, None) => OneShotLatency::Unknown(LATENCY_HEAD_UNREAD),
        };
        QueueRow {
            name: name.clone(),
            orphaned_unacked: seen.orphaned_unacked,
            reserved_due: seen.reserved_due,
            scheduled: seen.scheduled.clone(),
            latency,
            status,
        }
    });
    rows.collect()
}

impl QueueRow {
    /// Whole seconds, as in TaskQueue status; `None` when unknown.
    pub fn latency_seconds(&self) -> Option<i64> {
        match self.latency {
            OneShotLatency::Stamped(_) => self.status.latency_seconds,
            OneShotLatency::NothingWaiting => Some(0),
            OneShotLatency::Unknown(_) => None,
        }
    }
}

// === Planning: from flags and files to endpoints ===

/// The endpoints to audit and the pools to judge expiring queues with.
pub async fn plan(args: CheckBrokerArgs) -> Result<(Vec<Endpoint>, Pools), UsageError> {
    let manifests =
        if args.files.is_empty() { Manifests::default() } else { load_manifests(&args.files, &args.namespace)? };
    if manifests.task_queues.is_empty() {
        if !args.files.is_empty() && manifests.worker_pools.is_empty() {
            return Err(UsageError("no TaskQueue or WorkerPool found in the --file paths".into()));
        }
        let pools = if manifests.worker_pools.is_empty() {
            Pools::None
        } else {
            Pools::ForCeleryQueues(manifests.worker_pools.into_iter().map(|p| p.object).collect())
        };
        return Ok((vec![endpoint_from_flags(&args).await?], pools));
    }
    refuse_flags_the_yaml_says(&args)?;
    let endpoints = endpoints_from_task_queues(&args, &manifests).await?;
    let pools = manifests.worker_pools.into_iter().map(|p| p.object).collect();
    Ok((endpoints, Pools::ForTaskQueues(pools)))
}

fn load_manifests(paths: &[PathBuf], namespace: &str) -> Result<Manifests, UsageError> {
    let sources = manifests::read_paths(paths).map_err(|e| UsageError(e.to_string()))?;
    let (found, errors) = manifests::parse_documents(&sources, namespace);
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(UsageError(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")))
    }
}

/// With TaskQueue files the YAML decides the layout and the queues: flags saying otherwise would
/// audit something the operator never sees.
fn refuse_flags_the_yaml_says(args: &CheckBrokerArgs) -> Result<(), UsageError> {
    let given = [
        ("TARGET", args.target.is_some()),
        ("--queue", !args.queues.is_empty()),
        ("--priority-steps", args.priority_steps.is_some()),
        ("--separator", args.separator.is_some()),
        ("--global-keyprefix", args.global_keyprefix.is_some()),
        ("--master-name", args.master_name.is_some()),
        ("--visibility-timeout", args.visibility_timeout.is_some()),
        ("--fix", args.fix),
    ];
    let clashing: Vec<&str> = given.iter().filter(|(_, set)| *set).map(|(flag, _)| *flag).collect();
    if clashing.is_empty() {
        Ok(())
    } else {
        Err(UsageError(format!(
            "{} cannot be combined with TaskQueue files: the TaskQueues say which broker, queues and \
             transport options to use (use --broker-url for a URL kept in a Secret)",
            clashing.join(", ")
        )))
    }
}

/// The CLI's flags as a TaskQueue broker section, validated by the TaskQueue schema and CEL rules.
fn spec_from_flags(args: &CheckBrokerArgs) -> Result<crate::crd::BrokerSpec, UsageError> {
    let mut transport = serde_json::Map::new();
    let mut put = |key: &str, value: serde_json::Value| {
        transport.insert(key.into(), value);
    };
    if let Some(steps) = &args.priority_steps {
        put("prioritySteps", json!(steps));
    }
    if let Some(separator) = &args.separator {
        put("separator", json!(separator));
    }
    if let Some(prefix) = &args.global_keyprefix {
        put("globalKeyPrefix", json!(prefix));
    }
    if let Some(name) = &args.master_name {
        put("masterName", json!(name));
    }
    if let Some(seconds) = args.visibility_timeout {
        put("visibilityTimeoutSeconds", json!(seconds));
    }
    let safety = if args.fix { "Fix" } else { "Warn" };
    let doc = json!({
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": "check-broker", "namespace": "default"},
        // The URL stays out of the document: it may carry credentials, which a TaskQueue may not.
        "spec": {"broker": {
            "urlFrom": {"secretKeyRef": {"name": "check-broker", "key": "url"}},
            "transportOptions": transport,
            "safetyCheck": safety,
        }},
    });
    let tq: TaskQueue = serde_json::from_value(doc).map_err(|e| UsageError(format!("invalid flags: {e}")))?;
    let errors = validate::check_task_queue(&tq);
    if errors.is_empty() {
        return Ok(tq.spec.broker);
    }
    let flag_of = |field: &str| {
        let name = field.rsplit('.').next().unwrap_or(field);
        match name {
            "prioritySteps" => "--priority-steps",
            "separator" => "--separator",
            "globalKeyPrefix" => "--global-keyprefix",
            "masterName" => "--master-name",
            "visibilityTimeoutSeconds" => "--visibility-timeout",
            _ => name,
        }
        .to_owned()
    };
    let described: Vec<String> = errors.iter().map(|e| format!("{}: {}", flag_of(&e.field), e.message)).collect();
    Err(UsageError(described.join("; ")))
}

async fn endpoint_from_flags(args: &CheckBrokerArgs) -> Result<Endpoint, UsageError> {
    let url = match (&args.target, &args.broker_url) {
        (Some(target), _) => match target.strip_prefix("secret/") {
            Some(reference) => cluster_secret_ref(reference).await?,
            None => target.clone(),
        },
        (None, Some(url)) => url.clone(),
        (None, None) => {
            return Err(UsageError(
                "no broker given: pass a URL, set CELERY_BROKER_URL or --broker-url, or give TaskQueue \
                 files with --file"
                    .into(),
            ));
        }
    };
    let spec = spec_from_flags(args)?;
    if url.starts_with("sentinel://") && spec.transport_options.master_name.is_none() {
        return Err(UsageError("a sentinel:// URL needs --master-name (Celery's master_name)".into()));
    }
    let resolved = ResolvedBroker {
        url: SecretUrl::new(url),
        management_url: args.management_url.clone().map(SecretUrl::new),
        ca_cert_pem: args.ca_cert.as_ref().map(read_ca).transpose()?,
    };
    Ok(Endpoint { config: broker_config(&spec, &resolved), queues: args.queues.clone(), task_queues: Vec::new() })
}

fn read_ca(path: &PathBuf) -> Result<String, UsageError> {
    std::fs::read_to_string(path).map_err(|e| UsageError(format!("--ca-cert {}: {e}", path.display())))
}

/// Where the values of a TaskQueue's Secret references come from, in this order: the flag or
/// environment variable, a Secret in the given files, the cluster (with --from-cluster).
struct SecretSources<'a> {
    args: &'a CheckBrokerArgs,
    secrets: &'a [Secret],
    client: Option<kube::Client>,
}

impl SecretSources<'_> {
    async fn value(
        &mut self,
        tq: &TaskQueue,
        field: &str,
        from: &ValueFrom,
        flag: (&str, Option<String>),
    ) -> Result<String, UsageError> {
        if let Some(value) = flag.1 {
            return Ok(value);
        }
        let namespace = tq.namespace().unwrap_or_default();
        let reference = &from.secret_key_ref;
        let in_files = self
            .secrets
            .iter()
            .find(|s| s.namespace().as_deref() == Some(&namespace) && s.name_any() == reference.name);
        if let Some(secret) = in_files {
            return secret_key(secret, &reference.key).ok_or_else(|| {
                UsageError(format!("Secret {namespace}/{} has no key {:?}", reference.name, reference.key))
            });
        }
        if self.args.from_cluster {
            let client = match &self.client {
                Some(client) => client.clone(),
                None => {
                    let client = cluster_client().await?;
                    self.client = Some(client.clone());
                    client
                }
            };
            return read_cluster_secret(&client, &namespace, &reference.name, &reference.key).await;
        }
        Err(UsageError(format!(
            "TaskQueue {namespace}/{}: {field} references Secret {:?} key {:?}, which is not in the given \
             files: pass {}, or --from-cluster to read it with the current kubeconfig",
            tq.name_any(),
            reference.name,
            reference.key,
            flag.0
        )))
    }
}

async fn endpoints_from_task_queues(
    args: &CheckBrokerArgs,
    manifests: &Manifests,
) -> Result<Vec<Endpoint>, UsageError> {
    let mut sources = SecretSources { args, secrets: &manifests.secrets, client: None };
    // Grouped by everything that makes an endpoint, like the operator's shared clients.
    let mut by_endpoint: BTreeMap<EndpointKey, Endpoint> = BTreeMap::new();
    for loaded in &manifests.task_queues {
        let tq = &loaded.object;
        let broker = &tq.spec.broker;
        let url = match (&broker.url, &broker.url_from) {
            (Some(url), _) => url.clone(),
            (None, Some(from)) => {
                let flag = ("--broker-url or CELERY_BROKER_URL", args.broker_url.clone());
                sources.value(tq, "spec.broker.urlFrom", from, flag).await?
            }
            (None, None) => unreachable!("the CEL rule requires url or urlFrom"),
        };
        let management_url = match &broker.management_url_from {
            Some(from) => {
                let flag = ("--management-url or CELERY_BROKER_MANAGEMENT_URL", args.management_url.clone());
                Some(sources.value(tq, "spec.broker.managementUrlFrom", from, flag).await?)
            }
            None => None,
        };
        let ca_cert_pem = match broker.tls.as_ref().and_then(|t| t.ca_from.as_ref()) {
            Some(from) => {
                let flag = ("--ca-cert", args.ca_cert.as_ref().map(read_ca).transpose()?);
                Some(sources.value(tq, "spec.broker.tls.caFrom", from, flag).await?)
            }
            None => None,
        };
        let resolved = ResolvedBroker {
            url: SecretUrl::new(url),
            management_url: management_url.map(SecretUrl::new),
            ca_cert_pem,
        };
        let config = broker_config(broker, &resolved);
        let key = EndpointKey::new(broker, &resolved);
        let endpoint =
            by_endpoint.entry(key).or_insert_with(|| Endpoint { config, queues: Vec::new(), task_queues: Vec::new() });
        endpoint.queues.push(tq.queue_name().to_owned());
        endpoint.task_queues.push(tq.clone());
    }
    Ok(by_endpoint.into_values().collect())
}

fn secret_key(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref().and_then(|d| d.get(key)).map(|v| String::from_utf8_lossy(&v.0).into_owned());
    let string_data = || secret.string_data.as_ref().and_then(|d| d.get(key)).cloned();
    data.or_else(string_data).map(|v| v.trim().to_owned())
}

async fn cluster_client() -> Result<kube::Client, UsageError> {
    kube::Client::try_default().await.map_err(|e| UsageError(format!("cannot reach the cluster: {e}")))
}

/// Reads `[NAMESPACE/]NAME:KEY` from a Secret of the current kubeconfig's cluster.
async fn cluster_secret_ref(reference: &str) -> Result<String, UsageError> {
    let (path, key) =
        reference.split_once(':').ok_or_else(|| UsageError("expected secret/[NAMESPACE/]NAME:KEY".into()))?;
    let client = cluster_client().await?;
    let (namespace, name) = match path.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name),
        None => (client.default_namespace().to_owned(), path),
    };
    read_cluster_secret(&client, &namespace, name, key).await
}

async fn read_cluster_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<String, UsageError> {
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = secrets.get(name).await.map_err(|e| UsageError(format!("Secret {namespace}/{name}: {e}")))?;
    secret_key(&secret, key).ok_or_else(|| UsageError(format!("Secret {namespace}/{name} has no key {key:?}")))
}

// === Output ===

/// The text report: one block per broker, then the overall verdict when there are several.
pub fn render_text(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    for outcome in outcomes {
        if !outcome.task_queues.is_empty() {
            out.push_str(&format!("TaskQueues: {}\n", outcome.task_queues.join(", ")));
        }
        match &outcome.result {
            Ok(report) => {
                out.push_str(&report.header().to_string());
                out.push_str(&queue_table(&outcome.queues, &report.observation.info));
                out.push_str(report.footer().to_string().trim_end());
            }
            Err(e) => {
                out.push_str(&format!("Broker {}\n  cannot be probed: {e}\nVerdict: UNREACHABLE", outcome.endpoint))
            }
        }
        out.push_str("\n\n");
    }
    if outcomes.len() > 1 {
        out.push_str(&format!("Overall: {} ({} brokers)\n", verdict(exit_code(outcomes)), outcomes.len()));
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The queue table: the TaskQueue status numbers and what else the probe split them into, with a
/// note for every latency it cannot tell and for native delayed delivery shared by several queues.
fn queue_table(rows: &[QueueRow], info: &BrokerInfo) -> String {
    const HEADERS: [&str; 8] =
        ["READY", "WAITING", "SCHEDULED", "UNACKED", "RESERVED-DUE", "ORPHANED", "CONSUMERS", "LATENCY"];
    let name_width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(5);
    let line = |name: &str, cells: &[String]| {
        let mut line = format!("  {name:<name_width$}");
        for (cell, header) in cells.iter().zip(HEADERS) {
            line.push_str(&format!("  {cell:>width$}", width = header.len().max(9)));
        }
        line.push('\n');
        line
    };
    let mut out = String::from("Queues:\n");
    out.push_str(&line("QUEUE", &HEADERS.map(str::to_owned)));
    let mut unknown = Vec::new();
    for r in rows {
        let s = &r.status;
        let latency = match r.latency {
            OneShotLatency::Unknown(reason) => {
                if !unknown.contains(&reason) {
                    unknown.push(reason);
                }
                "?".to_owned()
            }
            _ => or_dash(r.latency_seconds().map(|l| format!("{l}s"))),
        };
        let cells = [
            s.ready.to_string(),
            or_dash(s.waiting),
            or_dash(s.scheduled),
            or_dash(s.unacked),
            or_dash(r.reserved_due),
            or_dash(r.orphaned_unacked),
            or_dash(s.consumers),
            latency,
        ];
        out.push_str(&line(&r.name, &cells));
    }
    for reason in unknown {
        out.push_str(&format!("  LATENCY ?: {reason}\n"));
    }
    if let Some(delayed) = info.delayed_delivery.as_ref().filter(|d| d.total() > 0) {
        let targets = match delayed.targets.as_deref() {
            Some([only]) => format!("all for queue {only} (counted as SCHEDULED there)"),
            Some(targets) if !targets.is_empty() => format!("for queues {}", targets.join(", ")),
            _ => "for queues the bindings do not tell".to_owned(),
        };
        out.push_str(&format!(
            "  native delayed delivery: {} task(s) waiting in the celery_delayed_* queues, {targets}\n",
            delayed.total()
        ));
    }
    out
}

fn verdict(code: u8) -> &'static str {
    match code {
        exit::SAFE => "safe",
        exit::UNSAFE => "unsafe",
        _ => "unreachable",
    }
}

/// `check-broker --output json`, schema [`JSON_SCHEMA_VERSION`] (documented in
/// `docs/broker-safety.md`, pinned by `docs/check-broker.schema.json`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonReport<'a> {
    api_version: &'static str,
    verdict: &'static str,
    exit_code: u8,
    brokers: Vec<JsonBroker<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonBroker<'a> {
    endpoint: &'a str,
    task_queues: &'a [String],
    verdict: &'static str,
    error: Option<JsonError>,
    broker: Option<JsonBrokerInfo<'a>>,
    queues: Vec<JsonQueue<'a>>,
    findings: Vec<JsonFinding<'a>>,
}

/// Broker facts; Redis-only fields are null on RabbitMQ.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonBrokerInfo<'a> {
    kind: String,
    version: Option<&'a str>,
    eviction_policy: Option<&'a str>,
    maxmemory_bytes: Option<u64>,
    used_memory_bytes: Option<u64>,
    evicted_keys: Option<u64>,
    aof_enabled: Option<bool>,
    persistence_ok: Option<bool>,
    delayed_delivery: Option<JsonDelayedDelivery<'a>>,
}

/// RabbitMQ's native delayed delivery on the vhost.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonDelayedDelivery<'a> {
    messages: u64,
    targets: Option<&'a [String]>,
}

impl<'a> From<&'a BrokerInfo> for JsonBrokerInfo<'a> {
    fn from(info: &'a BrokerInfo) -> Self {
        Self {
            kind: info.kind.to_string(),
            version: info.version.as_deref(),
            eviction_policy: info.eviction_policy.as_deref(),
            maxmemory_bytes: info.maxmemory_bytes,
            used_memory_bytes: info.used_memory_bytes,
            evicted_keys: info.evicted_keys,
            aof_enabled: info.aof_enabled,
            persistence_ok: info.persistence_ok,
            delayed_delivery: info
                .delayed_delivery
                .as_ref()
                .map(|d| JsonDelayedDelivery { messages: d.total(), targets: d.targets.as_deref() }),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonError {
    kind: &'static str,
    message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonQueue<'a> {
    name: &'a str,
    ready: i64,
    unacked: Option<i64>,
    orphaned_unacked: Option<u64>,
    consumers: Option<i64>,
    waiting: Option<i64>,
    scheduled: Option<i64>,
    reserved_due: Option<u64>,
    latency_seconds: Option<i64>,
    latency_basis: Option<&'static str>,
    latency_unknown_reason: Option<&'static str>,
    scheduled_detail: Option<JsonScheduled>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonScheduled {
    listed: u64,
    held: u64,
    delayed: u64,
    exact: bool,
    farthest_eta: Option<String>,
    beyond_visibility_timeout: u64,
}

impl<'a> From<&'a QueueRow> for JsonQueue<'a> {
    fn from(r: &'a QueueRow) -> Self {
        let s = &r.status;
        let (latency_basis, latency_unknown_reason) = match r.latency {
            OneShotLatency::Stamped(_) => (Some("publishTimestamp"), None),
            OneShotLatency::NothingWaiting => (Some("nothingWaiting"), None),
            OneShotLatency::Unknown(reason) => (None, Some(reason)),
        };
        Self {
            name: &r.name,
            ready: s.ready,
            unacked: s.unacked,
            orphaned_unacked: r.orphaned_unacked,
            consumers: s.consumers,
            waiting: s.waiting,
            scheduled: s.scheduled,
            reserved_due: r.reserved_due,
            latency_seconds: r.latency_seconds(),
            latency_basis,
            latency_unknown_reason,
            scheduled_detail: r.scheduled.as_ref().map(|d| JsonScheduled {
                listed: d.listed,
                held: d.held,
                delayed: d.delayed,
                exact: d.exact,
                farthest_eta: d.farthest_eta.map(celery_broker::schedule::format_unix),
                beyond_visibility_timeout: d.beyond_visibility_timeout,
            }),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonFinding<'a> {
    reason: &'static str,
    severity: &'static str,
    queue: Option<&'a str>,
    message: &'a str,
    docs: String,
}

fn severity_name(severity: Severity) -> &'static str {
    match severity {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

fn json_finding(f: &Finding) -> JsonFinding<'_> {
    JsonFinding {
        reason: f.reason.as_str(),
        severity: severity_name(f.severity),
        queue: f.queue.as_deref(),
        message: &f.message,
        docs: f.reason.docs_url(),
    }
}

/// The JSON report, pretty-printed.
pub fn render_json(outcomes: &[Outcome]) -> String {
    let brokers = outcomes
        .iter()
        .map(|o| {
            let (error, broker, queues, findings) = match &o.result {
                Err(e) => (Some(JsonError { kind: e.metric_label(), message: e.to_string() }), None, vec![], vec![]),
                Ok(report) => {
                    let obs = &report.observation;
                    let queues = o.queues.iter().map(JsonQueue::from).collect();
                    let info = JsonBrokerInfo::from(&obs.info);
                    (None, Some(info), queues, obs.findings.iter().map(json_finding).collect())
                }
            };
            JsonBroker {
                endpoint: &o.endpoint,
                task_queues: &o.task_queues,
                verdict: verdict(o.exit_code()),
                error,
                broker,
                queues,
                findings,
            }
        })
        .collect();
    let code = exit_code(outcomes);
    let report = JsonReport { api_version: JSON_SCHEMA_VERSION, verdict: verdict(code), exit_code: code, brokers };
    serde_json::to_string_pretty(&report).expect("the report serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_broker::latency::{HeadMessage, HeadSample, ListHead};
    use celery_broker::{BrokerKind, QueueObservation};

    const NOW: f64 = 1_800_000_000.0;

    /// A Redis queue of `ready` messages whose head was walked (`head`), its first due message
    /// stamped as published `stamped_ago` seconds before [`NOW`] when given.
    fn queue(ready: u64, head: bool, stamped_ago: Option<f64>) -> QueueObservation {
        let first_due = (ready > 0).then(|| HeadMessage {
            position: 0,
            tag: "0b5e7c1e0000".into(),
            eta_ms: None,
            published_ms: stamped_ago.map(|ago| ((NOW - ago) * 1000.0) as i64),
        });
        let list = ListHead { len: ready, scanned: ready, first_due, newest: None, markers: Vec::new() };
        QueueObservation {
            ready,
            waiting: Some(ready),
            head: head.then(|| HeadSample::Lists(vec![list])),
            ..QueueObservation::default()
        }
    }

    #[test]
    fn one_probe_tells_a_latency_from_a_publish_stamp_or_from_nothing_waiting_only() {
        let queues = [
            ("stamped", queue(2, true, Some(100.0))),
            ("unstamped", queue(2, true, None)),
            ("empty", queue(0, true, None)),
            ("unread-empty", queue(0, false, None)),
            ("unread", queue(3, false, None)),
        ];
        let observation = BrokerObservation {
            queues: queues.into_iter().map(|(name, q)| (name.to_owned(), q)).collect(),
            info: BrokerInfo::new(BrokerKind::Redis),
            findings: Vec::new(),
        };
        let rows = queue_rows(&observation, "redis://r:6379/0", NOW);
        let got: BTreeMap<&str, (OneShotLatency, Option<i64>)> =
            rows.iter().map(|r| (r.name.as_str(), (r.latency, r.latency_seconds()))).collect();
        assert_eq!(got["stamped"], (OneShotLatency::Stamped(Duration::from_secs(100)), Some(100)));
        assert_eq!(got["unstamped"], (OneShotLatency::Unknown(LATENCY_UNSTAMPED), None));
        assert_eq!(got["empty"], (OneShotLatency::NothingWaiting, Some(0)));
        assert_eq!(got["unread-empty"], (OneShotLatency::NothingWaiting, Some(0)));
        assert_eq!(got["unread"], (OneShotLatency::Unknown(LATENCY_HEAD_UNREAD), None));
        // The status numbers are the operator's: what probe::report writes for the same queue.
        let status = probe::report(&observation, "stamped", "e".into(), SafetyCheck::Warn, None);
        assert_eq!(rows[rows.iter().position(|r| r.name == "stamped").unwrap()].status.waiting, status.waiting);
    }
}
