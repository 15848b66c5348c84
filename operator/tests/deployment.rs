//! Spec → Deployment, as table tests over representative pools.

use celery_operator::crd::{SecretKeyRef, WorkerPool};
use celery_operator::deployment::{
    BEAT_REDBEAT_PREFIX_ENV, BrokerUrlSource, PoolInputs, beat_args, beat_deployment, beat_lock_name,
    beat_redbeat_key_prefix, termination_grace_period, worker_args, worker_deployment,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;

fn pool(spec_yaml: &str) -> WorkerPool {
    let doc = format!(
        "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: mail, namespace: prod, uid: 0d1e-uid}}\nspec:\n{}",
        spec_yaml.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    serde_saphyr::from_str(&doc).expect("fixture parses")
}

fn inputs(replicas: Option<i32>) -> PoolInputs {
    PoolInputs {
        queue_names: vec!["emails".into(), "celery".into()],
        broker: BrokerUrlSource::Secret(SecretKeyRef { name: "redis".into(), key: "url".into() }),
        replicas,
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

const MINIMAL: &str = "app: proj.celery_app\nimage: reg/proj:1\nqueues: [emails, default]\n";

#[test]
fn worker_args_for_representative_specs() {
    let cases = [
        (
            MINIMAL.to_string(),
            "celery -A proj.celery_app worker -Q emails,celery -c 1 -P prefork --prefetch-multiplier 1 \
             --max-tasks-per-child 1000 --without-mingle --without-gossip -n mail@$(POD_NAME) --loglevel INFO",
        ),
        (
            format!(
                "{MINIMAL}concurrency: 8\npool: threads\nworker: {{prefetchMultiplier: 4, maxTasksPerChild: 50}}\n"
            ),
            "celery -A proj.celery_app worker -Q emails,celery -c 8 -P threads --prefetch-multiplier 4 \
             --max-tasks-per-child 50 --without-mingle --without-gossip -n mail@$(POD_NAME) --loglevel INFO",
        ),
        (
            format!(
                "{MINIMAL}worker: {{maxMemoryPerChildKiB: 200000, softTimeLimitSeconds: 50, timeLimitSeconds: 60, extraArgs: ['-Ofair', '-E']}}\n"
            ),
            "celery -A proj.celery_app worker -Q emails,celery -c 1 -P prefork --prefetch-multiplier 1 \
             --max-tasks-per-child 1000 --max-memory-per-child 200000 --time-limit 60 --soft-time-limit 50 \
             --without-mingle --without-gossip -n mail@$(POD_NAME) --loglevel INFO -Ofair -E",
        ),
        (
            format!("{MINIMAL}pool: solo\n"),
            "celery -A proj.celery_app worker -Q emails,celery -c 1 -P solo --prefetch-multiplier 1 \
             --max-tasks-per-child 1000 --without-mingle --without-gossip -n mail@$(POD_NAME) --loglevel INFO",
        ),
    ];
    for (spec, expected) in cases {
        let p = pool(&spec);
        assert_eq!(worker_args(&p, &inputs(None).queue_names), words(expected), "spec:\n{spec}");
    }
}

#[test]
fn beat_args_with_and_without_scheduler() {
    let p = pool(&format!("{MINIMAL}beat: {{enabled: true}}\n"));
    assert_eq!(
        beat_args(&p),
        words("celery -A proj.celery_app beat --schedule /var/run/celery-beat/celerybeat-schedule --loglevel INFO")
    );
    let p = pool(&format!("{MINIMAL}beat: {{enabled: true, scheduler: redbeat.RedBeatScheduler}}\n"));
    assert_eq!(beat_args(&p).last().map(String::as_str), Some("redbeat.RedBeatScheduler"));
}

#[test]
fn defaults_are_production_safe() {
    let p = pool(MINIMAL);
    assert_eq!(p.spec.concurrency, 1);
    assert_eq!(p.spec.worker.prefetch_multiplier, 1);
    assert_eq!(p.spec.worker.max_tasks_per_child, 1000);
    assert_eq!(p.spec.replicas, 1);
    assert!(!p.spec.beat.enabled);
}

#[test]
fn grace_period_derives_from_time_limits() {
    let cases = [
        ("", 30),
        ("worker: {timeLimitSeconds: 600}\n", 630),
        ("worker: {softTimeLimitSeconds: 100}\n", 130),
        ("worker: {timeLimitSeconds: 5}\n", 35),
        ("worker: {timeLimitSeconds: 600}\nterminationGracePeriodSeconds: 10\n", 10),
    ];
    for (extra, expected) in cases {
        let p = pool(&format!("{MINIMAL}{extra}"));
        assert_eq!(termination_grace_period(&p), expected, "{extra}");
        let d = worker_deployment(&p, &inputs(Some(1)));
        assert_eq!(pod_spec(&d).termination_grace_period_seconds, Some(expected));
    }
}

fn pod_spec(d: &Deployment) -> &k8s_openapi::api::core::v1::PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn container(d: &Deployment) -> &Container {
    &pod_spec(d).containers[0]
}

fn all_args(d: &Deployment) -> Vec<String> {
    let c = container(d);
    c.command.iter().chain(c.args.iter()).flatten().cloned().collect()
}

#[test]
fn worker_deployment_has_labels_owner_and_no_beat_flag() {
    let p = pool(&format!("{MINIMAL}beat: {{enabled: true}}\n"));
    let d = worker_deployment(&p, &inputs(Some(3)));
    assert_eq!(d.metadata.name.as_deref(), Some("mail-worker"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("prod"));
    let labels = d.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["app.kubernetes.io/name"], "celery");
    assert_eq!(labels["app.kubernetes.io/instance"], "mail");
    assert_eq!(labels["app.kubernetes.io/component"], "worker");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "celery-operator");
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("WorkerPool", "mail", Some(true)));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    for forbidden in ["-B", "--beat", "--purge", "beat"] {
        assert!(!all_args(&d).iter().any(|a| a == forbidden), "{forbidden} in {:?}", all_args(&d));
    }
    let c = container(&d);
    assert_eq!(c.command.as_deref(), Some(&["celery-entrypoint".to_string()][..]));
    let probe =
        |p: &Option<k8s_openapi::api::core::v1::Probe>| p.as_ref().unwrap().exec.as_ref().unwrap().command.clone();
    assert_eq!(probe(&c.liveness_probe), Some(vec!["celery-probe".into(), "liveness".into()]));
    assert_eq!(probe(&c.readiness_probe), Some(vec!["celery-probe".into(), "readiness".into()]));
}

#[test]
fn replicas_are_left_out_when_the_autoscaler_owns_them() {
    let d = worker_deployment(&pool(MINIMAL), &inputs(None));
    assert_eq!(d.spec.unwrap().replicas, None);
}

#[test]
fn broker_url_reaches_pods_by_secret_reference_or_plain_value() {
    let d = worker_deployment(&pool(MINIMAL), &inputs(Some(1)));
    let env = container(&d).env.clone().unwrap();
    let broker = env.iter().find(|e| e.name == "CELERY_BROKER_URL").unwrap();
    assert_eq!(broker.value, None);
    let secret = broker.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((secret.name.as_str(), secret.key.as_str()), ("redis", "url"));

    let plain = PoolInputs { broker: BrokerUrlSource::Literal("redis://redis:6379/0".into()), ..inputs(Some(1)) };
    let d = worker_deployment(&pool(MINIMAL), &plain);
    let env = container(&d).env.clone().unwrap();
    assert_eq!(
        env.iter().find(|e| e.name == "CELERY_BROKER_URL").unwrap().value.as_deref(),
        Some("redis://redis:6379/0")
    );
}

#[test]
fn template_overrides_are_merged_and_cannot_replace_operator_settings() {
    let spec = format!(
        "{MINIMAL}template:
  labels: {{team: mail, app.kubernetes.io/instance: hijack}}
  annotations: {{prometheus.io/scrape: 'true'}}
  resources: {{requests: {{cpu: '2', memory: 1Gi}}}}
  env: [{{name: FEATURE, value: 'on'}}, {{name: CELERY_BROKER_URL, value: 'redis://elsewhere'}}]
  envFrom: [{{configMapRef: {{name: settings}}}}]
  volumes: [{{name: certs, secret: {{secretName: certs}}}}]
  volumeMounts: [{{name: certs, mountPath: /certs}}]
  nodeSelector: {{pool: celery}}
  tolerations: [{{key: dedicated, operator: Exists}}]
  affinity: {{podAntiAffinity: {{preferredDuringSchedulingIgnoredDuringExecution: []}}}}
  serviceAccountName: mail-sa
  imagePullSecrets: [{{name: regcred}}]
  imagePullPolicy: Always
  priorityClassName: batch
  securityContext: {{runAsUser: 1000, runAsNonRoot: true}}
"
    );
    let d = worker_deployment(&pool(&spec), &inputs(Some(1)));
    let template = &d.spec.as_ref().unwrap().template;
    let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels["team"], "mail");
    assert_eq!(labels["app.kubernetes.io/instance"], "mail", "operator labels win");
    assert_eq!(template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()["prometheus.io/scrape"], "true");
    let pod = pod_spec(&d);
    let c = container(&d);
    assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0, "2");
    let env = c.env.as_ref().unwrap();
    assert!(env.iter().any(|e| e.name == "FEATURE"));
    assert_eq!(env.iter().filter(|e| e.name == "CELERY_BROKER_URL").count(), 1, "operator env wins");
    assert!(env.iter().find(|e| e.name == "CELERY_BROKER_URL").unwrap().value_from.is_some());
    assert_eq!(c.env_from.as_ref().unwrap().len(), 1);
    assert!(pod.volumes.as_ref().unwrap().iter().any(|v| v.name == "certs"));
    assert!(c.volume_mounts.as_ref().unwrap().iter().any(|m| m.mount_path == "/certs"));
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "celery");
    assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    assert!(pod.affinity.is_some());
    assert_eq!(pod.service_account_name.as_deref(), Some("mail-sa"));
    assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("batch"));
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_user, Some(1000));
}

#[test]
fn pods_meet_restricted_pod_security_by_default() {
    for d in [
        worker_deployment(&pool(MINIMAL), &inputs(Some(1))),
        beat_deployment(&pool(&format!("{MINIMAL}beat: {{enabled: true}}\n")), &inputs(None)),
    ] {
        let pod = pod_spec(&d).security_context.clone().unwrap();
        assert_eq!(pod.run_as_non_root, Some(true));
        assert_eq!(pod.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = container(&d).security_context.clone().unwrap();
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(c.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    }
}

#[test]
fn beat_deployment_is_a_recreate_singleton_with_a_writable_schedule() {
    let p = pool(&format!("{MINIMAL}beat: {{enabled: true}}\nautoscaling: {{maxReplicas: 5}}\n"));
    // Whatever the worker replica source says, beat is always exactly one.
    for replicas in [None, Some(0), Some(7)] {
        let d = beat_deployment(&p, &inputs(replicas));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("mail-beat"));
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.strategy.as_ref().unwrap().type_.as_deref(), Some("Recreate"));
        assert!(spec.strategy.as_ref().unwrap().rolling_update.is_none());
        assert_eq!(d.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"], "beat");
        let mount = container(&d)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == "/var/run/celery-beat")
            .expect("schedule dir mounted")
            .clone();
        let volume = pod_spec(&d).volumes.as_ref().unwrap().iter().find(|v| v.name == mount.name).unwrap().clone();
        assert!(volume.empty_dir.is_some());
        assert!(mount.read_only != Some(true));
        assert!(!all_args(&d).iter().any(|a| a == "-B" || a == "--beat" || a == "worker"));
    }
}

fn schedule_volume(d: &Deployment) -> k8s_openapi::api::core::v1::Volume {
    let mount = container(d).volume_mounts.iter().flatten().find(|m| m.mount_path == "/var/run/celery-beat").cloned();
    let mount = mount.expect("schedule dir mounted");
    pod_spec(d).volumes.iter().flatten().find(|v| v.name == mount.name).cloned().expect("schedule volume")
}

#[test]
fn beat_keeps_its_schedule_on_the_named_claim_writable_by_the_image_group() {
    let p = pool(&format!(
        "{MINIMAL}beat: {{enabled: true, scheduleClaimName: mail-beat-schedule}}
"
    ));
    let d = beat_deployment(&p, &inputs(None));
    let volume = schedule_volume(&d);
    assert!(volume.empty_dir.is_none());
    assert_eq!(volume.persistent_volume_claim.map(|c| c.claim_name).as_deref(), Some("mail-beat-schedule"));
    // The schedule file stays where the beat args say; only the volume behind it changes.
    assert!(beat_args(&p).contains(&"/var/run/celery-beat/celerybeat-schedule".to_string()));
    let security = pod_spec(&d).security_context.clone().unwrap();
    assert_eq!((security.fs_group, security.fs_group_change_policy.as_deref()), (Some(10001), Some("OnRootMismatch")));
    assert_eq!(security.run_as_non_root, Some(true), "still the restricted pod");
    // Workers never mount it; without a claim the schedule dies with the pod (emptyDir, no fsGroup).
    let worker = worker_deployment(&p, &inputs(Some(1)));
    assert!(pod_spec(&worker).volumes.iter().flatten().all(|v| v.persistent_volume_claim.is_none()));
    let d = beat_deployment(&pool(&format!("{MINIMAL}beat: {{enabled: true}}\n")), &inputs(None));
    assert!(schedule_volume(&d).empty_dir.is_some());
    assert_eq!(pod_spec(&d).security_context.clone().unwrap().fs_group, None);
    // A pod security context of the user's own is taken as it is.
    let spec = format!(
        "{MINIMAL}beat: {{enabled: true, scheduleClaimName: s}}\ntemplate: {{securityContext: {{runAsUser: 2000}}}}\n"
    );
    let d = beat_deployment(&pool(&spec), &inputs(None));
    assert_eq!(pod_spec(&d).security_context.clone().unwrap().fs_group, None);
}

#[test]
fn beat_lock_name_is_one_per_app_per_namespace() {
    assert_eq!(beat_lock_name("prod", "proj.celery_app"), "celery-operator:beat:prod:proj.celery_app");
    assert_ne!(beat_lock_name("prod", "a"), beat_lock_name("staging", "a"));
    assert_ne!(beat_lock_name("prod", "a"), beat_lock_name("prod", "b"));
}

fn env_value(d: &Deployment, name: &str) -> Vec<Option<String>> {
    container(d).env.iter().flatten().filter(|e| e.name == name).map(|e| e.value.clone()).collect()
}

#[test]
fn beat_takes_the_broker_lock_of_its_app_and_namespace_and_workers_do_not() {
    let p = pool(&format!("{MINIMAL}beat: {{enabled: true}}\n"));
    let d = beat_deployment(&p, &inputs(None));
    assert_eq!(env_value(&d, "CELERY_BEAT_LOCK"), vec![Some("celery-operator:beat:prod:proj.celery_app".into())]);
    // The broker the lock lives on is the one beat sends to.
    assert!(container(&d).env.iter().flatten().any(|e| e.name == "CELERY_BROKER_URL"));
    assert!(env_value(&worker_deployment(&p, &inputs(Some(1))), "CELERY_BEAT_LOCK").is_empty());
    // A beat waiting for the lock is alive but not Ready; readiness comes with `beat_init`.
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.exec.as_ref()).and_then(|e| e.command.clone()).unwrap_or_default().join(" ")
    };
    assert_eq!(probe(&container(&d).liveness_probe), "celery-probe liveness");
    assert_eq!(probe(&container(&d).readiness_probe), "celery-probe readiness");

    // A template env cannot rename or switch off the lock; its ttl may be tuned.
    let spec = format!(
        "{MINIMAL}beat: {{enabled: true}}\ntemplate:\n  env: [{{name: CELERY_BEAT_LOCK, value: ''}}, \
         {{name: CELERY_BEAT_LOCK_TTL_SECONDS, value: '30'}}]\n"
    );
    let d = beat_deployment(&pool(&spec), &inputs(None));
    assert_eq!(env_value(&d, "CELERY_BEAT_LOCK"), vec![Some("celery-operator:beat:prod:proj.celery_app".into())]);
    assert_eq!(env_value(&d, "CELERY_BEAT_LOCK_TTL_SECONDS"), vec![Some("30".into())]);
}

#[test]
fn beat_keeps_its_schedule_in_the_brokers_redis_unless_the_pool_chose_a_store() {
    // Neither scheduler nor claim: the entrypoint runs RedBeat under the pool's own prefix (it falls
    // back to the file on a RabbitMQ broker); the args stay Celery's defaults, with no -S.
    let p = pool(&format!("{MINIMAL}beat: {{enabled: true}}\n"));
    let d = beat_deployment(&p, &inputs(None));
    assert_eq!(env_value(&d, BEAT_REDBEAT_PREFIX_ENV), vec![Some("celery-operator:redbeat:prod:mail:".into())]);
    assert!(!all_args(&d).iter().any(|a| a == "-S"), "{:?}", all_args(&d));
    assert!(env_value(&worker_deployment(&p, &inputs(Some(1))), BEAT_REDBEAT_PREFIX_ENV).is_empty());
    // A chosen scheduler or a claim for the schedule file: no RedBeat default.
    for beat in [
        "{enabled: true, scheduler: django_celery_beat.schedulers:DatabaseScheduler}",
        "{enabled: true, scheduleClaimName: s}",
    ] {
        let d = beat_deployment(&pool(&format!("{MINIMAL}beat: {beat}\n")), &inputs(None));
        assert!(env_value(&d, BEAT_REDBEAT_PREFIX_ENV).is_empty(), "{beat}");
    }
    // The template cannot move the state to another pool's keys.
    let spec = format!(
        "{MINIMAL}beat: {{enabled: true}}\ntemplate:\n  env: [{{name: {BEAT_REDBEAT_PREFIX_ENV}, value: 'celery-operator:redbeat:prod:other:'}}]\n"
    );
    let d = beat_deployment(&pool(&spec), &inputs(None));
    assert_eq!(env_value(&d, BEAT_REDBEAT_PREFIX_ENV), vec![Some("celery-operator:redbeat:prod:mail:".into())]);
}

#[test]
fn redbeat_prefixes_of_two_pools_never_overlap() {
    // Names are DNS labels (no ':'): no pool's prefix starts another pool's keys.
    let prefixes = [
        beat_redbeat_key_prefix("prod", "mail"),
        beat_redbeat_key_prefix("prod", "mail-2"),
        beat_redbeat_key_prefix("prod-2", "mail"),
        beat_redbeat_key_prefix("staging", "mail"),
    ];
    for (i, a) in prefixes.iter().enumerate() {
        for (j, b) in prefixes.iter().enumerate() {
            assert!(i == j || !b.starts_with(a.as_str()), "{a} is a prefix of {b}");
        }
    }
}
