//! The binary's subcommands as a user runs them.

use std::process::Command;

mod common;

fn operator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_celery-operator")).args(args).output().expect("binary runs")
}

#[test]
fn check_broker_fails_on_an_evicting_redis_and_passes_on_a_safe_one() {
    let evicting = e2e_harness::RedisServer::builder()
        .config("maxmemory 64mb")
        .config("maxmemory-policy allkeys-lru")
        .password("pw-9f3k")
        .start()
        .unwrap();
    let out = operator(&["check-broker", &evicting.url(), "--queue", "emails"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("EvictionPolicyUnsafe") && stdout.contains("emails"), "{stdout}");
    assert!(!stdout.contains("pw-9f3k"), "password printed: {stdout}");

    let out = operator(&["check-broker", &evicting.url(), "--queue", "emails", "--fix"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = operator(&["check-broker", &evicting.url()]);
    assert_eq!(out.status.code(), Some(0), "after --fix the policy is noeviction");
}

#[test]
fn check_broker_exits_2_when_the_broker_cannot_be_reached() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = operator(&["check-broker", &format!("redis://:pw-77x@127.0.0.1:{port}/0")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("pw-77x"), "password printed: {stderr}");
}

#[test]
fn render_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pool.yaml");
    std::fs::write(
        &file,
        "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: p}\nspec: {app: a, image: i, queues: [q], worker: {extraArgs: ['-B']}}\n",
    )
    .unwrap();
    let out = operator(&["render", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("WorkerPool p: spec.worker.extraArgs: extraArgs may not set"), "{stderr}");
}

fn operator_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_celery-operator"));
    cmd.args(args).env_remove("CELERY_BROKER_URL").env_remove("CELERY_BROKER_MANAGEMENT_URL");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("binary runs")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_broker_exit_codes_tell_safe_unsafe_unreachable_and_usage_apart() {
    let safe = e2e_harness::RedisServer::builder().config("maxmemory 64mb").start().unwrap();
    let out = operator_with_env(&["check-broker", "-q", "emails"], &[("CELERY_BROKER_URL", &safe.url())]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("Verdict: safe"), "{}", stdout(&out));

    let usage = [
        vec!["check-broker", "--no-such-flag"],
        vec!["check-broker"],
        vec!["check-broker", "redis://127.0.0.1:1/0", "--priority-steps", "0,3,3"],
        vec!["check-broker", "redis://127.0.0.1:1/0", "--priority-steps", "0,300"],
        vec!["check-broker", "sentinel://127.0.0.1:1/0"],
        vec!["check-broker", "redis://127.0.0.1:1/0", "--output", "xml"],
        vec!["check-broker", "-f", "/nonexistent/taskqueues.yaml"],
    ];
    for args in usage {
        let out = operator_with_env(&args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error:"), "{args:?}: {}", stderr(&out));
    }
    let out = operator_with_env(&["check-broker", "redis://127.0.0.1:1/0", "--priority-steps", "0,3,3"], &[]);
    assert!(stderr(&out).contains("--priority-steps: prioritySteps must not repeat a value"), "{}", stderr(&out));
    // Help is not an error.
    assert_eq!(operator_with_env(&["check-broker", "--help"], &[]).status.code(), Some(0));
}

#[test]
fn check_broker_json_output_follows_the_documented_schema() {
    let evicting = e2e_harness::RedisServer::builder()
        .config("maxmemory 64mb")
        .config("maxmemory-policy allkeys-lru")
        .password("pw-json-3k")
        .start()
        .unwrap();
    evicting.cli(&["LPUSH", "emails", "t1", "t2"]).unwrap();
    let out =
        operator_with_env(&["check-broker", "-q", "emails", "-o", "json"], &[("CELERY_BROKER_URL", &evicting.url())]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stdout(&out).contains("pw-json-3k"), "password printed: {}", stdout(&out));
    let report = common::check_broker_json(&out);
    assert_eq!(report["apiVersion"], "celery-operator.dev/check-broker/v1");
    assert_eq!((report["verdict"].as_str(), report["exitCode"].as_u64()), (Some("unsafe"), Some(1)));
    let broker = &report["brokers"][0];
    assert_eq!(broker["broker"]["evictionPolicy"], "allkeys-lru");
    assert_eq!(broker["queues"][0]["name"], "emails");
    assert_eq!(broker["queues"][0]["ready"], 2);
    let finding = &broker["findings"][0];
    assert_eq!(
        (finding["reason"].as_str(), finding["severity"].as_str()),
        (Some("EvictionPolicyUnsafe"), Some("critical"))
    );
    assert!(finding["docs"].as_str().unwrap().ends_with("docs/broker-safety.md#evictionpolicyunsafe"));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = format!("redis://:pw-json-3k@127.0.0.1:{port}/0");
    let out = operator_with_env(&["check-broker", &down, "-o", "json"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!stdout(&out).contains("pw-json-3k"), "password printed: {}", stdout(&out));
    let report = common::check_broker_json(&out);
    assert_eq!(report["verdict"], "unreachable");
    assert_eq!(report["brokers"][0]["error"]["kind"], "connect");
    assert!(report["brokers"][0]["broker"].is_null());
}

const QUEUES_YAML: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: app-redis, namespace: prod}
stringData: {url: "URL"}
---
apiVersion: celery-operator.dev/v1alpha1
kind: TaskQueue
metadata: {name: emails, namespace: prod}
spec:
  queueName: mail
  broker:
    urlFrom: {secretKeyRef: {name: app-redis, key: url}}
    transportOptions: {globalKeyPrefix: "app:", prioritySteps: [0, 5], separator: ":"}
---
apiVersion: celery-operator.dev/v1alpha1
kind: TaskQueue
metadata: {name: reports, namespace: prod}
spec:
  broker:
    urlFrom: {secretKeyRef: {name: app-redis, key: url}}
    transportOptions: {globalKeyPrefix: "app:", prioritySteps: [0, 5], separator: ":"}
---
apiVersion: celery-operator.dev/v1alpha1
kind: WorkerPool
metadata: {name: mail, namespace: prod}
spec: {app: proj.app, image: reg/proj:1, queues: [emails], autoscaling: {minReplicas: 0, maxReplicas: 4}}
"#;

#[test]
fn check_broker_reads_task_queue_yaml_as_the_operator_would() {
    let redis = e2e_harness::RedisServer::builder().password("pw-yaml-7q").start().unwrap();
    // kombu's layout for prefix "app:", steps [0, 5] and separator ":".
    redis.cli(&["LPUSH", "app:mail", "a", "b"]).unwrap();
    redis.cli(&["LPUSH", "app:mail:5", "c"]).unwrap();
    redis.cli(&["LPUSH", "app:reports", "d"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queues.yaml");
    std::fs::write(&file, QUEUES_YAML.replace("URL", &redis.url())).unwrap();
    let file = file.to_str().unwrap();

    let out = operator_with_env(&["check-broker", "-f", file, "-o", "json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let report = common::check_broker_json(&out);
    let broker = &report["brokers"][0];
    assert_eq!(broker["taskQueues"], serde_json::json!(["prod/emails", "prod/reports"]));
    let ready: Vec<(String, u64)> = broker["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["name"].as_str().unwrap().to_owned(), q["ready"].as_u64().unwrap()))
        .collect();
    assert_eq!(ready, vec![("mail".to_owned(), 3), ("reports".to_owned(), 1)]);
    assert!(!stdout(&out).contains("pw-yaml-7q"));

    // The queue starts expiring, and pool `mail` consuming it can scale to zero: critical.
    redis.cli(&["PEXPIRE", "app:mail", "600000"]).unwrap();
    let out = operator_with_env(&["check-broker", "-f", file], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("CRITICAL QueueExpiresWhileScaledToZero"), "{}", stdout(&out));
    assert!(stdout(&out).contains("TaskQueues: prod/emails, prod/reports"), "{}", stdout(&out));

    // Without the Secret in the files the URL must be supplied, and the error says how.
    let only_queues: String = QUEUES_YAML.split("---").skip(1).collect::<Vec<_>>().join("---");
    std::fs::write(dir.path().join("queues.yaml"), &only_queues).unwrap();
    let out = operator_with_env(&["check-broker", "-f", file], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("TaskQueue prod/emails: spec.broker.urlFrom references Secret \"app-redis\" key \"url\""),
        "{}",
        stderr(&out)
    );
    let out = operator_with_env(&["check-broker", "-f", file], &[("CELERY_BROKER_URL", &redis.url())]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(!format!("{}{}", stdout(&out), stderr(&out)).contains("pw-yaml-7q"));

    // The YAML decides layout and queues; flags that say otherwise are refused.
    let out = operator_with_env(&["check-broker", "-f", file, "-q", "other", "--separator", "."], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--queue, --separator cannot be combined with TaskQueue files"), "{}", stderr(&out));
    // Invalid TaskQueues are refused as the API server would, naming file, object and field.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: celery-operator.dev/v1alpha1\nkind: TaskQueue\nmetadata: {name: bad}\nspec: {broker: {url: 'redis://:pw@r:6379/0'}}\n",
    )
    .unwrap();
    let out = operator_with_env(&["check-broker", "-f", dir.path().join("bad.yaml").to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("TaskQueue bad: spec.broker.url: url must not contain a user or password"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_broker_reads_referenced_secrets_from_the_cluster() {
    let redis = e2e_harness::RedisServer::builder().password("pw-cluster-5t").start().unwrap();
    redis.cli(&["LPUSH", "app:mail", "a", "b"]).unwrap();
    let api = celery_e2e::ApiServer::new();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app-redis", "namespace": "prod"}, "stringData": {"url": redis.url()}}))
    .unwrap();
    kube::Api::namespaced(api.client(), "prod").create(&Default::default(), &secret).await.unwrap();
    let served = api.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let kubeconfig = served.kubeconfig_path.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queues.yaml");
    let only_queues: String = QUEUES_YAML.split("---").skip(1).collect::<Vec<_>>().join("---");
    std::fs::write(&file, only_queues).unwrap();
    let file = file.to_str().unwrap().to_owned();

    let run = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            operator_with_env(&args, &[("KUBECONFIG", &kubeconfig)])
        })
    };
    let out = run(vec!["check-broker".into(), "-f".into(), file, "--from-cluster".into(), "-o".into(), "json".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(common::check_broker_json(&out)["brokers"][0]["queues"][0]["ready"], 2);
    assert!(!stdout(&out).contains("pw-cluster-5t"));

    let target = "secret/prod/app-redis:url";
    let args = ["check-broker", target, "-q", "mail", "--global-keyprefix", "app:", "-o", "json"];
    let out = run(args.iter().map(|a| a.to_string()).collect()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(common::check_broker_json(&out)["brokers"][0]["queues"][0]["ready"], 2);

    let out = run(vec!["check-broker".into(), "secret/prod/app-redis:nokey".into()]).await.unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("Secret prod/app-redis has no key \"nokey\""), "{}", stderr(&out));
    assert!(!stderr(&out).contains("pw-cluster-5t"));
}

/// `celery-operator crd | head` closes the pipe before the CRDs are written: the command ends
/// quietly with success instead of panicking on the broken pipe.
#[test]
fn crd_output_into_a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_celery-operator"))
        .arg("crd")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    drop(child.stdout.take()); // the reader goes away at once
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
