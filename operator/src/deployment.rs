//! WorkerPool → Deployments: pure functions from a validated spec to the objects the operator applies.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{SecretKeyRef, WorkerPool};
use crate::labels;

/// The worker image's entrypoint: runs Celery in-process with the probe hooks installed.
pub const ENTRYPOINT: &str = "celery-entrypoint";
/// The worker image's probe command (reads heartbeat files; never imports the app or touches the broker).
pub const PROBE_COMMAND: &str = "celery-probe";
/// Where the worker writes its heartbeat and readiness files (an emptyDir).
pub const PROBE_DIR: &str = "/var/run/celery";
/// Where beat keeps its schedule file (the root filesystem is read-only): an emptyDir, or the pool's
/// `beat.scheduleClaimName`. With RedBeat (the default on Redis brokers) only the entrypoint's
/// marker and lock files are there.
pub const BEAT_SCHEDULE_DIR: &str = "/var/run/celery-beat";
/// The worker image's group (`worker-image/Dockerfile`): a claimed schedule volume is made writable
/// for it with fsGroup.
pub const IMAGE_GROUP_ID: i64 = 10001;
/// Environment variables the operator sets; the pool's template.env may not override them.
pub const RESERVED_ENV: [&str; 4] = ["CELERY_BROKER_URL", "POD_NAME", "POD_NAMESPACE", "CELERY_PROBE_DIR"];

/// Grace period when neither the spec nor a time limit says otherwise (Kubernetes' own default).
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// Margin added to the task time limit so a SIGTERM'd worker can finish its task and exit warmly.
const SHUTDOWN_MARGIN_SECONDS: i64 = 30;

/// How worker and beat pods get the broker URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerUrlSource {
    /// A URL without credentials, passed as a plain value.
    Literal(String),
    /// A Secret key, passed by reference so the URL never appears in the Deployment.
    Secret(SecretKeyRef),
}

/// Everything the builders need beyond the pool itself, resolved from the pool's TaskQueues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInputs {
    /// Celery queue names to consume, in spec order.
    pub queue_names: Vec<String>,
    /// The broker the queues live on.
    pub broker: BrokerUrlSource,
    /// Worker replicas to apply, or None when another field manager (the autoscaler) owns them.
    pub replicas: Option<i32>,
}

/// The `celery worker` command line (after the entrypoint).
pub fn worker_args(pool: &WorkerPool, queue_names: &[String]) -> Vec<String> {
    let spec = &pool.spec;
    let w = &spec.worker;
    let pool_name = pool.meta().name.as_deref().unwrap_or_default();
    let mut flags: Vec<(&str, String)> = vec![
        ("-A", spec.app.clone()),
        ("worker", String::new()),
        ("-Q", queue_names.join(",")),
        ("-c", spec.concurrency.to_string()),
        ("-P", spec.pool.as_arg().to_string()),
        ("--prefetch-multiplier", w.prefetch_multiplier.to_string()),
        ("--max-tasks-per-child", w.max_tasks_per_child.to_string()),
    ];
    let optional = [
        ("--max-memory-per-child", w.max_memory_per_child_kib),
        ("--time-limit", w.time_limit_seconds),
        ("--soft-time-limit", w.soft_time_limit_seconds),
    ];
    flags.extend(optional.into_iter().filter_map(|(flag, value)| Some((flag, value?.to_string()))));
    // Mingle and gossip make every worker talk to every other, at startup and forever after:
    // costly at fleet size and useless when the operator, not the workers, manages the fleet.
    flags.extend([("--without-mingle", String::new()), ("--without-gossip", String::new())]);
    flags.extend([("-n", format!("{pool_name}@$(POD_NAME)")), ("--loglevel", "INFO".to_string())]);
    let mut args = vec!["celery".to_string()];
    for (flag, value) in flags {
        args.push(flag.to_string());
        if !value.is_empty() {
            args.push(value);
        }
    }
    args.extend(w.extra_args.iter().cloned());
    args
}

/// The `celery beat` command line (after the entrypoint).
pub fn beat_args(pool: &WorkerPool) -> Vec<String> {
    let mut args: Vec<String> = [
        "celery",
        "-A",
        &pool.spec.app,
        "beat",
        "--schedule",
        &format!("{BEAT_SCHEDULE_DIR}/celerybeat-schedule"),
        "--loglevel",
        "INFO",
    ]
    .map(String::from)
    .to_vec();
    if let Some(scheduler) = &pool.spec.beat.scheduler {
        args.extend(["-S".to_string(), scheduler.clone()]);
    }
    args
}

/// Grace period for warm shutdown: the spec's value, else the task time limit plus a margin, at
/// least Kubernetes' default of 30 s.
pub fn termination_grace_period(pool: &WorkerPool) -> i64 {
    if let Some(seconds) = pool.spec.termination_grace_period_seconds {
        return seconds;
    }
    let w = &pool.spec.worker;
    w.time_limit_seconds
        .or(w.soft_time_limit_seconds)
        .map_or(DEFAULT_GRACE_SECONDS, |limit| limit + SHUTDOWN_MARGIN_SECONDS)
        .max(DEFAULT_GRACE_SECONDS)
}

/// Labels selecting the pods of one component of a pool.
pub fn selector_labels(pool: &WorkerPool, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME_KEY.to_string(), labels::APP_NAME.to_string()),
        (labels::INSTANCE_KEY.to_string(), pool.meta().name.clone().unwrap_or_default()),
        (labels::COMPONENT_KEY.to_string(), component.to_string()),
    ])
}

/// The label selector string of the worker pods (status.selector, for the scale subresource).
pub fn worker_selector(pool: &WorkerPool) -> String {
    selector_labels(pool, labels::WORKER).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn object_labels(pool: &WorkerPool, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pool, component);
    labels.insert(labels::MANAGED_BY_KEY.to_string(), labels::MANAGER.to_string());
    labels
}

/// The worker Deployment `<pool>-worker`.
pub fn worker_deployment(pool: &WorkerPool, inputs: &PoolInputs) -> Deployment {
    let mut container = base_container(pool, "worker", worker_args(pool, &inputs.queue_names), &inputs.broker);
    container.liveness_probe = Some(exec_probe("liveness", 10, 3));
    container.readiness_probe = Some(exec_probe("readiness", 5, 1));
    let mut pod = base_pod(pool, container);
    pod.termination_grace_period_seconds = Some(termination_grace_period(pool));
    let strategy = DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        // Never dip below the wanted capacity while a new image rolls out.
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::String("25%".into())),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    };
    deployment(pool, labels::WORKER, pool.worker_deployment_name(), inputs.replicas, strategy, pod)
}

/// The environment variable naming the beat singleton lock the worker image's entrypoint takes on
/// the broker before it starts `celery beat`.
pub const BEAT_LOCK_ENV: &str = "CELERY_BEAT_LOCK";

/// The beat lock's name: one beat per Celery app per namespace (the same rule as `BeatConflict`).
/// A Redis key, or a RabbitMQ queue name, on the pool's broker.
pub fn beat_lock_name(namespace: &str, app: &str) -> String {
    format!("celery-operator:beat:{namespace}:{app}")
}

/// The environment variable that asks the worker image's entrypoint to keep beat's schedule (each
/// entry's last run) in the broker's Redis with RedBeat, under this key prefix. Set when the pool
/// chooses neither `beat.scheduler` nor `beat.scheduleClaimName`; the entrypoint falls back to
/// Celery's schedule file (and says why) on a RabbitMQ or Sentinel broker, when the app configures
/// its own `beat_scheduler`, or in an image without celery-redbeat.
pub const BEAT_REDBEAT_PREFIX_ENV: &str = "CELERY_BEAT_REDBEAT_KEY_PREFIX";

/// RedBeat's key prefix for a pool: one schedule per pool. Namespace and pool names are DNS
/// labels (no `:`), so no pool's prefix is the beginning of another's keys. The broker's
/// `global_keyprefix`, if any, goes in front (the entrypoint adds it).
pub fn beat_redbeat_key_prefix(namespace: &str, pool: &str) -> String {
    format!("celery-operator:redbeat:{namespace}:{pool}:")
}

/// The beat Deployment `<pool>-beat`: exactly one replica, and Recreate, because a RollingUpdate
/// would run the old and the new beat side by side and fire every periodic task twice.
///
/// Both only limit how many beat pods Kubernetes runs, and only once the operator has reverted a
/// hand scale. What guarantees a single scheduler is `CELERY_BEAT_LOCK` ([`beat_lock_name`]):
/// the entrypoint takes that lock on the broker before Celery's beat starts, so extra beat pods
/// wait (alive, not Ready: beat's readiness probe passes from `beat_init` on) instead of
/// scheduling. The pool's template cannot override the lock's name.
///
/// A new beat pod carries on the schedule of the one before: in the broker's Redis by default
/// ([`BEAT_REDBEAT_PREFIX_ENV`]), or in the pool's `beat.scheduleClaimName` (see
/// [`beat_schedule_volume`]), or wherever the pool's `beat.scheduler` keeps it. The template
/// cannot override the prefix either.
pub fn beat_deployment(pool: &WorkerPool, inputs: &PoolInputs) -> Deployment {
    let mut container = base_container(pool, "beat", beat_args(pool), &inputs.broker);
    let namespace = pool.meta().namespace.as_deref().unwrap_or("default");
    let env = container.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != BEAT_LOCK_ENV && e.name != BEAT_REDBEAT_PREFIX_ENV);
    env.push(EnvVar {
        name: BEAT_LOCK_ENV.into(),
        value: Some(beat_lock_name(namespace, &pool.spec.app)),
        value_from: None,
    });
    let beat = &pool.spec.beat;
    if beat.scheduler.is_none() && beat.schedule_claim_name.is_none() {
        let name = pool.meta().name.as_deref().unwrap_or_default();
        env.push(EnvVar {
            name: BEAT_REDBEAT_PREFIX_ENV.into(),
            value: Some(beat_redbeat_key_prefix(namespace, name)),
            value_from: None,
        });
    }
    // Ready from `beat_init` on: a beat waiting for the lock is alive but not Ready.
    container.liveness_probe = Some(exec_probe("liveness", 10, 3));
    container.readiness_probe = Some(exec_probe("readiness", 5, 1));
    container.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
        name: "beat-schedule".into(),
        mount_path: BEAT_SCHEDULE_DIR.into(),
        ..Default::default()
    });
    let mut pod = base_pod(pool, container);
    pod.volumes.get_or_insert_with(Vec::new).push(beat_schedule_volume(pool));
    if pool.spec.beat.schedule_claim_name.is_some() && pool.spec.template.security_context.is_none() {
        // A new volume is usually root's; the image runs as 10001:10001. OnRootMismatch: the
        // kubelet changes ownership once, not on every mount.
        let security = pod.security_context.get_or_insert_with(restricted_pod);
        security.fs_group = Some(IMAGE_GROUP_ID);
        security.fs_group_change_policy = Some("OnRootMismatch".into());
    }
    let strategy = DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None };
    deployment(pool, labels::BEAT, pool.beat_deployment_name(), Some(1), strategy, pod)
}

/// The volume behind [`BEAT_SCHEDULE_DIR`]: the pool's claim, so Celery's schedule file (each
/// entry's last run) outlives the pod, or else an emptyDir that dies with it.
///
/// Without a claim (and without `beat.scheduler`) the schedule still outlives the pod on a Redis
/// broker: the entrypoint runs RedBeat with its state in the broker ([`BEAT_REDBEAT_PREFIX_ENV`]),
/// and the emptyDir only holds the entrypoint's marker and lock files. On a RabbitMQ broker the
/// file on the emptyDir is all there is; the claim serves both brokers and keeps Celery's default
/// scheduler exactly as on a VM. Only the beat lock's holder opens the file, and the image's file
/// lock keeps the next beat off it until the previous one has gone.
pub fn beat_schedule_volume(pool: &WorkerPool) -> Volume {
    match &pool.spec.beat.schedule_claim_name {
        Some(claim) => Volume {
            name: "beat-schedule".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Default::default()
        },
        None => empty_dir("beat-schedule"),
    }
}

fn deployment(
    pool: &WorkerPool,
    component: &str,
    name: String,
    replicas: Option<i32>,
    strategy: DeploymentStrategy,
    pod: PodSpec,
) -> Deployment {
    let overrides = &pool.spec.template;
    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(object_labels(pool, component));
    Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: pool.meta().namespace.clone(),
            labels: Some(object_labels(pool, component)),
            owner_references: pool.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector { match_labels: Some(selector_labels(pool, component)), ..Default::default() },
            strategy: Some(strategy),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!overrides.annotations.is_empty()).then(|| overrides.annotations.clone()),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn base_container(pool: &WorkerPool, name: &str, args: Vec<String>, broker: &BrokerUrlSource) -> Container {
    let overrides = &pool.spec.template;
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        broker_env(broker),
        EnvVar { name: "CELERY_PROBE_DIR".into(), value: Some(PROBE_DIR.into()), value_from: None },
    ];
    env.extend(overrides.env.iter().filter(|e| !RESERVED_ENV.contains(&e.name.as_str())).cloned());
    let mut mounts = vec![
        VolumeMount { name: "celery-run".into(), mount_path: PROBE_DIR.into(), ..Default::default() },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
    ];
    mounts.extend(overrides.volume_mounts.iter().cloned());
    Container {
        name: name.into(),
        image: Some(pool.spec.image.clone()),
        image_pull_policy: overrides.image_pull_policy.clone(),
        command: Some(vec![ENTRYPOINT.into()]),
        args: Some(args),
        env: Some(env),
        env_from: (!overrides.env_from.is_empty()).then(|| overrides.env_from.clone()),
        resources: overrides.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(overrides.container_security_context.clone().unwrap_or_else(restricted_container)),
        ..Default::default()
    }
}

fn base_pod(pool: &WorkerPool, container: Container) -> PodSpec {
    let o = &pool.spec.template;
    let mut volumes = vec![empty_dir("celery-run"), empty_dir("tmp")];
    volumes.extend(o.volumes.iter().cloned());
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        service_account_name: o.service_account_name.clone(),
        image_pull_secrets: (!o.image_pull_secrets.is_empty()).then(|| o.image_pull_secrets.clone()),
        node_selector: (!o.node_selector.is_empty()).then(|| o.node_selector.clone()),
        tolerations: (!o.tolerations.is_empty()).then(|| o.tolerations.clone()),
        affinity: o.affinity.clone(),
        priority_class_name: o.priority_class_name.clone(),
        security_context: Some(o.security_context.clone().unwrap_or_else(restricted_pod)),
        ..Default::default()
    }
}

/// Pod security that meets Pod Security Standards "restricted".
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

/// Container security that meets Pod Security Standards "restricted".
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..Default::default()
    }
}

fn exec_probe(kind: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        exec: Some(ExecAction { command: Some(vec![PROBE_COMMAND.into(), kind.into()]) }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
            ..Default::default()
        }),
    }
}

fn broker_env(broker: &BrokerUrlSource) -> EnvVar {
    let name = "CELERY_BROKER_URL".to_string();
    match broker {
        BrokerUrlSource::Literal(url) => EnvVar { name, value: Some(url.clone()), value_from: None },
        BrokerUrlSource::Secret(r) => EnvVar {
            name,
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector { name: r.name.clone(), key: r.key.clone(), optional: None }),
                ..Default::default()
            }),
        },
    }
}
