//! The pod runner turns Deployments into real local processes and keeps Pods and Deployment status
//! honest. Generic behaviour uses `sh`; the last test runs real Celery workers from the venv.

use std::time::Duration;

use celery_e2e::{ApiServer, PodRunner, RunnerConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, WatchEvent, WatchParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

/// Poll `check` (re-evaluated on every stored change, at least every 50 ms) until it returns Some.
async fn eventually<T>(server: &ApiServer, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let mut changes = server.changes();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
    }
}

fn deployment(name: &str, replicas: i64, script: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "main", "image": "shell", "command": ["sh", "-c", script]}],
                },
            },
        },
    })
}

/// Trap SIGTERM, say so, and exit; otherwise idle.
const POLITE: &str = "trap 'echo got-sigterm; exit 0' TERM; echo started; while true; do sleep 0.05; done";

fn pods(server: &ApiServer, app: &str) -> Vec<Value> {
    server
        .list("v1", "Pod", Some("default"))
        .unwrap()
        .into_iter()
        .filter(|p| p["metadata"]["labels"]["app"] == app)
        .collect()
}

fn ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn deployment_status(server: &ApiServer, name: &str) -> Value {
    server.get("apps/v1", "Deployment", Some("default"), name).unwrap().unwrap()["status"].clone()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[tokio::test]
async fn deployments_become_running_processes_with_ready_pods_and_status() {
    let server = ApiServer::new();
    let runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    server.create(deployment("web", 3, POLITE)).unwrap();
    let running = eventually(&server, "3 ready pods", || {
        let ps = pods(&server, "web");
        (ps.len() == 3 && ps.iter().all(ready)).then_some(ps)
    })
    .await;
    for p in &running {
        let name = p["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("web-"), "{name}");
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "Deployment");
        assert_eq!(p["status"]["phase"], "Running");
        let pids = runner.pids("default", name);
        assert_eq!(pids.len(), 1);
        assert!(alive(pids[0]));
    }
    let status = eventually(&server, "deployment status", || {
        let s = deployment_status(&server, "web");
        (s["readyReplicas"] == 3).then_some(s)
    })
    .await;
    assert_eq!((status["replicas"].as_i64(), status["updatedReplicas"].as_i64()), (Some(3), Some(3)));
    assert_eq!(status["observedGeneration"], 1);
    let available = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Available").unwrap();
    assert_eq!(available["status"], "True");
}

#[tokio::test]
async fn scale_in_removes_the_lowest_deletion_cost_first_with_sigterm() {
    let server = ApiServer::new();
    let runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    server.create(deployment("w", 3, POLITE)).unwrap();
    let running = eventually(&server, "3 ready pods", || {
        let ps = pods(&server, "w");
        (ps.len() == 3 && ps.iter().all(ready)).then_some(ps)
    })
    .await;
    let names: Vec<String> = running.iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_string()).collect();
    // names[1] is busy (highest cost), names[0] next; names[2] is idle and cheapest.
    for (name, cost) in [(&names[0], "10"), (&names[1], "100"), (&names[2], "-5")] {
        let mut pod = server.get("v1", "Pod", Some("default"), name).unwrap().unwrap();
        pod["metadata"]["annotations"] = json!({"controller.kubernetes.io/pod-deletion-cost": cost});
        server.put(pod).unwrap();
    }
    let mut d = server.get("apps/v1", "Deployment", Some("default"), "w").unwrap().unwrap();
    d["spec"]["replicas"] = json!(1);
    server.put(d).unwrap();
    let left = eventually(&server, "one pod left", || {
        let ps = pods(&server, "w");
        (ps.len() == 1).then_some(ps)
    })
    .await;
    assert_eq!(left[0]["metadata"]["name"], names[1].as_str());
    for gone in [&names[0], &names[2]] {
        let log = runner.pod_log("default", gone).unwrap();
        assert!(log.contains("got-sigterm"), "{gone} was not stopped with SIGTERM: {log}");
    }
}

#[tokio::test]
async fn processes_ignoring_sigterm_are_killed_after_the_grace_period() {
    let server = ApiServer::new();
    let runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    let mut d = deployment("stubborn", 1, "trap '' TERM; echo started; while true; do sleep 0.05; done");
    d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(1);
    server.create(d).unwrap();
    let pod = eventually(&server, "a running pod", || pods(&server, "stubborn").into_iter().find(ready)).await;
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let pid = runner.pids("default", &name)[0];
    assert!(server.delete("v1", "Pod", Some("default"), &name).unwrap());
    let terminating = server.get("v1", "Pod", Some("default"), &name).unwrap();
    assert!(terminating.is_some_and(|p| p["metadata"]["deletionTimestamp"].is_string()), "deletion is graceful");
    eventually(&server, "the pod object to go", || {
        server.get("v1", "Pod", Some("default"), &name).unwrap().is_none().then_some(())
    })
    .await;
    assert!(!alive(pid), "the process survived its pod");
    // The Deployment replaces it.
    eventually(&server, "a replacement", || pods(&server, "stubborn").into_iter().find(ready)).await;
}

#[tokio::test]
async fn environment_comes_from_secrets_field_refs_and_dollar_expansion() {
    let server = ApiServer::new();
    let runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    server
        .create(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "broker", "namespace": "default"},
            "stringData": {"url": "redis://:pw@127.0.0.1:1/0"}}))
        .unwrap();
    let mut d =
        deployment("env", 1, "echo \"url=$BROKER pod=$POD_NAME arg=$0 dir=$RUN\"; touch \"$RUN/marker\"; sleep 60");
    let container = &mut d["spec"]["template"]["spec"]["containers"][0];
    container["args"] = json!(["worker@$(POD_NAME)"]);
    container["env"] = json!([
        {"name": "BROKER", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RUN", "value": "/var/run/celery"},
    ]);
    container["volumeMounts"] = json!([{"name": "run", "mountPath": "/var/run/celery"}]);
    d["spec"]["template"]["spec"]["volumes"] = json!([{"name": "run", "emptyDir": {}}]);
    server.create(d).unwrap();
    let pod = eventually(&server, "a running pod", || pods(&server, "env").into_iter().find(ready)).await;
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let log =
        eventually(&server, "the greeting", || runner.pod_log("default", &name).filter(|l| l.contains("url="))).await;
    assert!(log.contains("url=redis://:pw@127.0.0.1:1/0"), "{log}");
    assert!(log.contains(&format!("pod={name}")), "{log}");
    assert!(log.contains(&format!("arg=worker@{name}")), "{log}");
    assert!(!log.contains("dir=/var/run/celery"), "mount paths are rewritten to the pod directory: {log}");
    let marker = runner.pods_dir().join("default").join(&name).join("volumes/run/marker");
    eventually(&server, "the emptyDir file", || marker.exists().then_some(())).await;
}

#[tokio::test]
async fn readiness_follows_the_exec_probe_and_crashes_restart() {
    let server = ApiServer::new();
    let _runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    let flag = tempfile::tempdir().unwrap();
    let flag_file = flag.path().join("ready");
    let mut d = deployment("probed", 1, POLITE);
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] =
        json!({"exec": {"command": ["test", "-f", flag_file.to_str().unwrap()]}, "failureThreshold": 1});
    server.create(d).unwrap();
    let pod = eventually(&server, "a running pod", || {
        pods(&server, "probed").into_iter().find(|p| p["status"]["phase"] == "Running")
    })
    .await;
    assert!(!ready(&pod));
    assert!(deployment_status(&server, "probed").get("readyReplicas").is_none());
    std::fs::write(&flag_file, "").unwrap();
    eventually(&server, "readiness", || pods(&server, "probed").into_iter().find(ready)).await;
    eventually(&server, "readyReplicas", || (deployment_status(&server, "probed")["readyReplicas"] == 1).then_some(()))
        .await;

    server.create(deployment("crashy", 1, "echo boom; exit 3")).unwrap();
    let crashed = eventually(&server, "a restart", || {
        pods(&server, "crashy")
            .into_iter()
            .find(|p| p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1))
    })
    .await;
    assert_eq!(crashed["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 3);
}

/// Watch pods of `app` and record, after every event, (old-template pods, new-template pods, ready)
/// among the pods that are not terminating, and the number of terminating pods.
async fn record_rollout(server: &ApiServer, app: &str) -> tokio::task::JoinHandle<Vec<(usize, usize, usize, usize)>> {
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let selector = format!("app={app}");
    let initial = pods.list(&kube::api::ListParams::default().labels(&selector)).await.unwrap();
    let wp = WatchParams::default().labels(&selector).disable_bookmarks();
    let mut stream = pods.watch(&wp, initial.metadata.resource_version.as_deref().unwrap()).await.unwrap().boxed();
    let server = server.clone();
    let app = app.to_string();
    tokio::spawn(async move {
        let mut live: std::collections::BTreeMap<String, Pod> =
            initial.items.into_iter().map(|p| (p.metadata.name.clone().unwrap(), p)).collect();
        let mut seen = Vec::new();
        while let Ok(Some(Ok(event))) = tokio::time::timeout(DEADLINE, stream.next()).await {
            match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    live.insert(p.metadata.name.clone().unwrap(), p);
                }
                WatchEvent::Deleted(p) => {
                    live.remove(p.metadata.name.as_ref().unwrap());
                }
                _ => continue,
            }
            let template =
                server.get("apps/v1", "Deployment", Some("default"), &app).unwrap().unwrap()["spec"]["template"]
                    .clone();
            let hash = celery_e2e::runner::template_hash(&template);
            // Terminating pods count neither against maxSurge nor as capacity, as on a real cluster.
            let active: Vec<&Pod> = live.values().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
            let new =
                active.iter().filter(|p| p.metadata.labels.as_ref().unwrap()["pod-template-hash"] == hash).count();
            let ready = active
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .count();
            seen.push((active.len() - new, new, ready, live.len() - active.len()));
            if new == 2 && active.len() == 2 && ready == 2 {
                break;
            }
        }
        seen
    })
}

fn change_template(server: &ApiServer, name: &str) {
    let mut d = server.get("apps/v1", "Deployment", Some("default"), name).unwrap().unwrap();
    d["spec"]["template"]["metadata"]["annotations"] = json!({"rollout": "2"});
    server.put(d).unwrap();
}

#[tokio::test]
async fn recreate_never_runs_old_and_new_pods_together() {
    let server = ApiServer::new();
    let _runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    let mut d = deployment("beat", 2, POLITE);
    d["spec"]["strategy"] = json!({"type": "Recreate"});
    server.create(d).unwrap();
    eventually(&server, "2 ready pods", || {
        (pods(&server, "beat").iter().filter(|p| ready(p)).count() == 2).then_some(())
    })
    .await;
    let recorder = record_rollout(&server, "beat").await;
    change_template(&server, "beat");
    let seen = recorder.await.unwrap();
    assert!(seen.last().is_some_and(|s| s.1 == 2 && s.2 == 2), "rollout did not finish: {seen:?}");
    // Terminating pods are all old ones here: no new pod may exist while any old one still runs.
    assert!(
        seen.iter().all(|(old, new, _, terminating)| *new == 0 || old + terminating == 0),
        "old and new overlapped: {seen:?}"
    );
}

#[tokio::test]
async fn rolling_update_with_no_unavailability_keeps_capacity() {
    let server = ApiServer::new();
    let _runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    let mut d = deployment("workers", 2, POLITE);
    d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    server.create(d).unwrap();
    eventually(&server, "2 ready pods", || {
        (pods(&server, "workers").iter().filter(|p| ready(p)).count() == 2).then_some(())
    })
    .await;
    let recorder = record_rollout(&server, "workers").await;
    change_template(&server, "workers");
    let seen = recorder.await.unwrap();
    assert!(seen.last().is_some_and(|s| s.1 == 2 && s.2 == 2), "rollout did not finish: {seen:?}");
    assert!(seen.iter().all(|(_, _, ready, _)| *ready >= 2), "capacity dropped during the rollout: {seen:?}");
    assert!(seen.iter().all(|(old, new, _, _)| old + new <= 3), "surged past maxSurge: {seen:?}");
}

/// The worker Deployment as the operator generates it (entrypoint, probe, env, emptyDirs).
fn celery_worker_deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mail-worker", "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "mail-worker"}},
            "template": {
                "metadata": {"labels": {"app": "mail-worker"}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "worker",
                        "image": "ghcr.io/celery-operator/worker-example:0.1.0",
                        "command": ["celery-entrypoint"],
                        "args": ["celery", "-A", "celery_example.app", "worker", "-Q", "emails", "-c", "1", "-P", "prefork",
                            "--without-mingle", "--without-gossip", "-n", "mail@$(POD_NAME)", "--loglevel", "INFO"],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "celery-broker", "key": "url"}}},
                            {"name": "CELERY_PROBE_DIR", "value": "/var/run/celery"},
                        ],
                        "volumeMounts": [
                            {"name": "celery-run", "mountPath": "/var/run/celery"},
                            {"name": "tmp", "mountPath": "/tmp"},
                        ],
                        "readinessProbe": {"exec": {"command": ["celery-probe", "readiness"]}, "periodSeconds": 5, "failureThreshold": 1},
                    }],
                    "volumes": [{"name": "celery-run", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_workers_run_from_the_worker_image_entrypoint_and_shut_down_warmly() {
    let (redis, config) =
        tokio::task::spawn_blocking(|| (e2e_harness::RedisServer::start(), RunnerConfig::celery())).await.unwrap();
    let redis = redis.expect("a private redis-server");
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("NOTICE: skipping the Celery runner test: {e}");
            return;
        }
    };
    let server = ApiServer::new();
    let runner = PodRunner::start(&server, config).unwrap();
    server
        .create(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "celery-broker", "namespace": "default"},
            "stringData": {"url": redis.url()}}),
        )
        .unwrap();
    server.create(celery_worker_deployment()).unwrap();
    let pod =
        eventually(&server, "a ready Celery worker pod", || pods(&server, "mail-worker").into_iter().find(ready)).await;
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let log = runner.pod_log("default", &name).unwrap();
    assert!(log.contains(&format!("mail@{name}")), "the worker is named after its pod: {log}");

    let worker_src = concat!(env!("CARGO_MANIFEST_DIR"), "/../worker-image/src");
    let url = redis.url();
    tokio::task::spawn_blocking(move || {
        e2e_harness::python::run_script(
            "from celery_example.app import app\napp.send_task('celery_example.add', args=[2, 3], queue='emails')\n",
            &[("PYTHONPATH", worker_src), ("CELERY_BROKER_URL", &url)],
        )
    })
    .await
    .unwrap()
    .expect("the task is sent");
    eventually(&server, "the task to succeed", || {
        runner.pod_log("default", &name).filter(|l| l.contains("celery_example.add") && l.contains("succeeded"))
    })
    .await;

    let pids = runner.pids("default", &name);
    assert!(server.delete("apps/v1", "Deployment", Some("default"), "mail-worker").unwrap());
    eventually(&server, "the worker pod to go", || pods(&server, "mail-worker").is_empty().then_some(())).await;
    assert!(pids.iter().all(|p| !alive(*p)));
    let log = runner.pod_log("default", &name).unwrap();
    assert!(log.to_lowercase().contains("warm shutdown"), "SIGTERM starts Celery's warm shutdown: {log}");
}

#[tokio::test]
async fn a_simulated_kubelet_makes_deployments_ready_without_processes() {
    let server = ApiServer::new();
    let runner = PodRunner::start(&server, RunnerConfig::simulated()).unwrap();
    server.create(deployment("fast", 2, "exit 1")).unwrap();
    eventually(&server, "readyReplicas", || (deployment_status(&server, "fast")["readyReplicas"] == 2).then_some(()))
        .await;
    let names: Vec<String> =
        pods(&server, "fast").iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert!(names.iter().all(|n| runner.pids("default", n).is_empty()));
    let mut d = server.get("apps/v1", "Deployment", Some("default"), "fast").unwrap().unwrap();
    d["spec"]["replicas"] = json!(0);
    server.put(d).unwrap();
    eventually(&server, "no pods", || pods(&server, "fast").is_empty().then_some(())).await;
}

#[tokio::test]
async fn kubectl_logs_reads_the_runner_logs() {
    let server = ApiServer::new();
    let _runner = PodRunner::start(&server, RunnerConfig::default()).unwrap();
    server.create(deployment("talk", 1, "echo hello-from-the-pod; sleep 60")).unwrap();
    let pod = eventually(&server, "a ready pod", || pods(&server, "talk").into_iter().find(ready)).await;
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let pods_api: Api<Pod> = Api::default_namespaced(server.client());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let log = pods_api.logs(&name, &Default::default()).await.unwrap();
        if log.contains("hello-from-the-pod") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no greeting in {log:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
