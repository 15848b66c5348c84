//! The two control loops: kubelet (pods <-> processes) and the Deployment controller
//! (Deployments -> pods, Deployment status). One task runs both on every stored change and tick.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::RunnerConfig;
use super::process::{self, ConfigError, Launch, ProbeState};
use crate::apiserver::ApiServer;
use crate::apiserver::meta;
use crate::apiserver::selector::LabelSelector;

const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
const HASH_LABEL: &str = "pod-template-hash";

type PodKey = (String, String);

struct Container {
    name: String,
    launch: Option<Launch>,
    child: Option<tokio::process::Child>,
    pid: Option<u32>,
    restarts: i64,
    started_at: Option<String>,
    last_exit: Option<Value>,
    restart_at: Option<Instant>,
    probes: Option<(Arc<ProbeState>, tokio::task::JoinHandle<()>)>,
    /// Running without a process ([`RunnerConfig::simulate`]).
    simulated: bool,
}

impl Container {
    fn new(name: String) -> Self {
        Container {
            name,
            launch: None,
            child: None,
            pid: None,
            restarts: 0,
            started_at: None,
            last_exit: None,
            restart_at: None,
            probes: None,
            simulated: false,
        }
    }

    fn ready(&self) -> bool {
        self.simulated
            || (self.child.is_some() && self.probes.as_ref().is_some_and(|(s, _)| s.ready.load(Ordering::SeqCst)))
    }

    fn running(&self) -> bool {
        self.simulated || self.child.is_some()
    }

    fn stop_probes(&mut self) {
        if let Some((_, task)) = self.probes.take() {
            task.abort();
        }
    }
}

struct Pod {
    uid: String,
    containers: Vec<Container>,
    config_error: Option<ConfigError>,
    terminating: Option<(Instant, bool)>,
    finished: Option<&'static str>,
}

pub struct Shared {
    server: ApiServer,
    config: RunnerConfig,
    pub dir: tempfile::TempDir,
    pods: Mutex<HashMap<PodKey, Pod>>,
    logs: Mutex<HashMap<PodKey, Vec<PathBuf>>>,
}

impl Shared {
    pub fn new(server: ApiServer, config: RunnerConfig, dir: tempfile::TempDir) -> Self {
        Shared { server, config, dir, pods: Mutex::new(HashMap::new()), logs: Mutex::new(HashMap::new()) }
    }

    /// A pod's output (one container's, or all of them concatenated).
    pub fn log(&self, ns: &str, pod: &str, container: Option<&str>) -> Option<String> {
        let logs = self.logs.lock().expect("logs lock");
        let files = logs.get(&(ns.to_string(), pod.to_string()))?;
        let wanted = container.map(|c| format!("{c}.log"));
        let texts: Vec<String> = files
            .iter()
            .filter(|f| wanted.as_deref().is_none_or(|w| f.file_name().is_some_and(|n| n == w)))
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect();
        Some(texts.join(""))
    }

    pub fn server(&self) -> &ApiServer {
        &self.server
    }

    pub fn pids(&self, ns: &str, pod: &str) -> Vec<u32> {
        let pods = self.pods.lock().expect("pods lock");
        pods.get(&(ns.to_string(), pod.to_string()))
            .map(|p| p.containers.iter().filter(|c| c.child.is_some()).filter_map(|c| c.pid).collect())
            .unwrap_or_default()
    }

    pub fn kill_all(&self) {
        let mut pods = self.pods.lock().expect("pods lock");
        for pod in pods.values_mut() {
            for c in pod.containers.iter_mut() {
                c.stop_probes();
                if let (Some(pid), Some(_)) = (c.pid, c.child.as_ref()) {
                    process::signal_group(pid, libc::SIGKILL);
                }
            }
        }
    }

    pub async fn terminate_all(&self, grace: Duration) {
        let mut children = Vec::new();
        {
            let mut pods = self.pods.lock().expect("pods lock");
            for pod in pods.values_mut() {
                for c in pod.containers.iter_mut() {
                    c.stop_probes();
                    if let (Some(pid), Some(child)) = (c.pid, c.child.take()) {
                        process::signal_group(pid, libc::SIGTERM);
                        children.push((pid, child));
                    }
                }
            }
        }
        for (pid, mut child) in children {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                process::signal_group(pid, libc::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }

    fn pod_dir(&self, key: &PodKey) -> PathBuf {
        self.dir.path().join(&key.0).join(&key.1)
    }
}

/// The runner task: reconcile on every stored change and on every tick, until stopped.
pub async fn run(shared: Arc<Shared>, mut changes: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
    loop {
        reconcile(&shared);
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(shared.config.tick) => {}
            _ = stop.changed() => return,
        }
    }
}

fn reconcile(shared: &Shared) {
    let server = &shared.server;
    let pods = server.list("v1", "Pod", None).unwrap_or_default();
    kubelet(shared, &pods);
    let pods = server.list("v1", "Pod", None).unwrap_or_default();
    for deployment in server.list("apps/v1", "Deployment", None).unwrap_or_default() {
        if let Err(e) = sync_deployment(shared, &deployment, &pods) {
            tracing::warn!(deployment = meta::name_of(&deployment), error = %e, "pod runner could not sync a deployment");
        }
    }
}

// ---------------------------------------------------------------- kubelet

fn key_of(obj: &Value) -> PodKey {
    (meta::namespace_of(obj).to_string(), meta::name_of(obj).to_string())
}

fn kubelet(shared: &Shared, pods: &[Value]) {
    let mut state = shared.pods.lock().expect("pods lock");
    let live: HashMap<PodKey, &Value> = pods.iter().map(|p| (key_of(p), p)).collect();
    // Pods removed from the store by someone else (force delete): kill their processes.
    let gone: Vec<PodKey> = state.keys().filter(|k| !live.contains_key(*k)).cloned().collect();
    for key in gone {
        if let Some(mut pod) = state.remove(&key) {
            for c in pod.containers.iter_mut() {
                c.stop_probes();
                if let (Some(pid), Some(_)) = (c.pid, c.child.as_ref()) {
                    process::signal_group(pid, libc::SIGKILL);
                }
            }
        }
    }
    for (key, obj) in live {
        let uid = meta::uid_of(obj).to_string();
        if state.get(&key).is_some_and(|p| p.uid != uid) {
            state.remove(&key);
        }
        let pod = state.entry(key.clone()).or_insert_with(|| Pod {
            uid,
            containers: containers_of(obj).into_iter().map(|c| Container::new(name_of_container(&c))).collect(),
            config_error: None,
            terminating: None,
            finished: None,
        });
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            if terminate(obj, pod) {
                let _ = shared.server.force_delete("v1", "Pod", Some(&key.0), &key.1);
                state.remove(&key);
            }
            continue;
        }
        run_containers(shared, &key, obj, pod);
        let status = pod_status(obj, pod);
        if obj.get("status") != Some(&status) {
            let _ = shared.server.set_status("v1", "Pod", Some(&key.0), &key.1, status);
        }
    }
}

fn containers_of(pod: &Value) -> Vec<Value> {
    pod.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn name_of_container(c: &Value) -> String {
    c.get("name").and_then(Value::as_str).unwrap_or("main").to_string()
}

/// SIGTERM, then SIGKILL after the grace period; true once every process is gone.
fn terminate(obj: &Value, pod: &mut Pod) -> bool {
    let now = Instant::now();
    if pod.terminating.is_none() {
        let grace = obj.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(30);
        for c in pod.containers.iter_mut() {
            c.stop_probes();
            c.restart_at = None;
            c.simulated = false;
            // Like the kubelet: SIGTERM to the container's main process only (Celery's main process
            // then stops consuming and waits for its running tasks: a warm shutdown), SIGKILL to
            // everything in the container once the grace period is over. Signalling the whole
            // group would kill Celery's pool processes mid-task, which no real pod does.
            if let (Some(pid), Some(_)) = (c.pid, c.child.as_ref()) {
                process::signal(pid, libc::SIGTERM);
            }
        }
        pod.terminating = Some((now + Duration::from_secs(grace), false));
    }
    if let Some((deadline, killed)) = pod.terminating.as_mut()
        && now >= *deadline
        && !*killed
    {
        for c in pod.containers.iter() {
            if let (Some(pid), Some(_)) = (c.pid, c.child.as_ref()) {
                process::signal_group(pid, libc::SIGKILL);
            }
        }
        *killed = true;
    }
    for c in pod.containers.iter_mut() {
        if let Some(child) = c.child.as_mut()
            && !matches!(child.try_wait(), Ok(None))
        {
            // The main process is gone: like a container's end, nothing of it survives.
            if let Some(pid) = c.pid {
                process::signal_group(pid, libc::SIGKILL);
            }
            c.child = None;
        }
    }
    pod.containers.iter().all(|c| c.child.is_none())
}

fn run_containers(shared: &Shared, key: &PodKey, obj: &Value, pod: &mut Pod) {
    if pod.finished.is_some() {
        return;
    }
    let restart_policy = obj.pointer("/spec/restartPolicy").and_then(Value::as_str).unwrap_or("Always");
    let specs = containers_of(obj);
    let dir = shared.pod_dir(key);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        pod.config_error = Some(ConfigError { reason: "CreateContainerError", message: e.to_string() });
        return;
    }
    pod.config_error = None;
    let now = Instant::now();
    let mut all_done = true;
    let mut any_failed = false;
    for (c, spec) in pod.containers.iter_mut().zip(specs.iter()) {
        if shared.config.simulate {
            if !c.simulated {
                c.simulated = true;
                c.started_at = Some(meta::now());
            }
            all_done = false;
            continue;
        }
        // Reap an exited process; schedule a restart as restartPolicy says.
        if let Some(child) = c.child.as_mut() {
            let liveness_failed = c.probes.as_ref().is_some_and(|(s, _)| s.liveness_failed.load(Ordering::SeqCst));
            if liveness_failed && let Some(pid) = c.pid {
                process::signal_group(pid, libc::SIGKILL);
            }
            match child.try_wait() {
                Ok(None) => {
                    all_done = false;
                    continue;
                }
                Ok(Some(status)) => {
                    let code = status.code().unwrap_or(137);
                    c.last_exit = Some(json!({"terminated": {
                        "exitCode": code,
                        "reason": if code == 0 { "Completed" } else { "Error" },
                        "startedAt": c.started_at,
                        "finishedAt": meta::now(),
                    }}));
                    c.child = None;
                    c.stop_probes();
                    let restart = restart_policy == "Always" || (restart_policy == "OnFailure" && code != 0);
                    if restart {
                        let factor = 1u32 << c.restarts.clamp(0, 3);
                        c.restart_at = Some(now + shared.config.restart_backoff * factor);
                    } else if code != 0 {
                        any_failed = true;
                    }
                }
                Err(_) => continue,
            }
        }
        let first_start = c.started_at.is_none() && c.restart_at.is_none() && c.last_exit.is_none();
        let due = c.restart_at.is_some_and(|t| now >= t);
        if !(first_start || due) {
            if c.restart_at.is_some() {
                all_done = false;
            }
            continue;
        }
        all_done = false;
        let launch = match process::plan(&shared.server, &shared.config, obj, spec, &dir) {
            Ok(l) => l,
            Err(e) => {
                pod.config_error = Some(e);
                return;
            }
        };
        {
            let mut logs = shared.logs.lock().expect("logs lock");
            let files = logs.entry(key.clone()).or_default();
            if !files.contains(&launch.log) {
                files.push(launch.log.clone());
            }
        }
        match process::spawn(&launch) {
            Ok(child) => {
                if due {
                    c.restarts += 1;
                }
                c.pid = child.id();
                c.child = Some(child);
                c.started_at = Some(meta::now());
                c.restart_at = None;
                let state = Arc::new(ProbeState::default());
                let task = tokio::spawn(process::probe_loop(
                    spec.get("readinessProbe").cloned(),
                    spec.get("livenessProbe").cloned(),
                    launch.clone(),
                    shared.config.probe_period,
                    state.clone(),
                ));
                c.probes = Some((state, task));
                c.launch = Some(launch);
            }
            Err(e) => {
                pod.config_error = Some(ConfigError { reason: "RunContainerError", message: e.to_string() });
                c.restart_at = Some(now + shared.config.restart_backoff);
                return;
            }
        }
    }
    if all_done && pod.containers.iter().all(|c| c.child.is_none() && c.restart_at.is_none() && c.last_exit.is_some()) {
        pod.finished = Some(if any_failed { "Failed" } else { "Succeeded" });
    }
}

fn condition(ty: &str, ok: bool, old: Option<&Value>, now: &str) -> Value {
    let status = if ok { "True" } else { "False" };
    let previous = old
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty));
    let since = match previous {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    json!({"type": ty, "status": status, "lastProbeTime": null, "lastTransitionTime": since})
}

fn pod_status(obj: &Value, pod: &Pod) -> Value {
    let old = obj.get("status");
    let now = meta::now();
    let specs = containers_of(obj);
    let mut statuses = Vec::new();
    for (c, spec) in pod.containers.iter().zip(specs.iter()) {
        let ready = c.ready();
        let state = match (c.running(), &pod.config_error, &c.last_exit) {
            (true, _, _) => json!({"running": {"startedAt": c.started_at}}),
            (false, Some(e), _) => json!({"waiting": {"reason": e.reason, "message": e.message}}),
            (false, None, Some(_)) if c.restart_at.is_some() => json!({"waiting": {
                "reason": "CrashLoopBackOff",
                "message": format!("back-off restarting failed container {}", c.name),
            }}),
            (false, None, Some(exit)) => exit.clone(),
            (false, None, None) => json!({"waiting": {"reason": "ContainerCreating"}}),
        };
        let mut status = json!({
            "name": c.name,
            "image": spec.get("image").cloned().unwrap_or(json!("")),
            "imageID": "",
            "containerID": c.pid.map(|p| format!("process://{p}")).unwrap_or_default(),
            "ready": ready,
            "started": c.running(),
            "restartCount": c.restarts,
            "state": state,
        });
        if c.restarts > 0
            && let Some(exit) = &c.last_exit
        {
            status["lastState"] = exit.clone();
        }
        statuses.push(status);
    }
    let all_ready = !pod.containers.is_empty() && pod.containers.iter().all(Container::ready);
    let running = pod.containers.iter().any(|c| c.running() || c.restart_at.is_some());
    let phase = match (pod.finished, running) {
        (Some(done), _) => done,
        (None, true) => "Running",
        (None, false) => "Pending",
    };
    let start = old.and_then(|s| s.get("startTime")).cloned().unwrap_or_else(|| json!(now));
    json!({
        "phase": phase,
        "conditions": [
            condition("PodScheduled", true, old, &now),
            condition("Initialized", true, old, &now),
            condition("ContainersReady", all_ready, old, &now),
            condition("Ready", all_ready, old, &now),
        ],
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": start,
        "qosClass": old.and_then(|s| s.get("qosClass")).cloned().unwrap_or(json!("BestEffort")),
        "containerStatuses": statuses,
    })
}

// ---------------------------------------------------------------- Deployment controller

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn is_active(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(pod.pointer("/status/phase").and_then(Value::as_str), Some("Succeeded" | "Failed"))
}

/// The ReplicaSet controller's deletion order: pending before running, not ready before ready,
/// lower pod-deletion-cost first, more restarts first, then newest first.
fn deletion_rank(pod: &Value) -> (u8, u8, i64, i64, std::cmp::Reverse<String>) {
    let phase = match pod.pointer("/status/phase").and_then(Value::as_str) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    };
    let cost = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(DELETION_COST))
        .and_then(Value::as_str)
        .and_then(|c| c.parse::<i64>().ok())
        .unwrap_or(0);
    let restarts: i64 = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().filter_map(|c| c["restartCount"].as_i64()).sum())
        .unwrap_or(0);
    let created = pod.pointer("/metadata/creationTimestamp").and_then(Value::as_str).unwrap_or_default().to_string();
    // Newest first: the creation timestamp, then the name, in reverse.
    (phase, u8::from(is_ready(pod)), cost, -restarts, std::cmp::Reverse(format!("{created}/{}", meta::name_of(pod))))
}

fn intstr(v: Option<&Value>, total: i64, round_up: bool, default: &str) -> i64 {
    let v = v.cloned().unwrap_or_else(|| json!(default));
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => {
            let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
            let x = pct * total as f64 / 100.0;
            if round_up { x.ceil() as i64 } else { x.floor() as i64 }
        }
        _ => 0,
    }
}

fn sync_deployment(shared: &Shared, d: &Value, pods: &[Value]) -> Result<(), crate::apiserver::Error> {
    if d.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(());
    }
    let server = &shared.server;
    let ns = meta::namespace_of(d);
    let name = meta::name_of(d);
    let uid = meta::uid_of(d);
    let desired = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0);
    let template = d.pointer("/spec/template").cloned().unwrap_or_default();
    let hash = process::template_hash(&template);
    let selector = d.pointer("/spec/selector").and_then(|s| LabelSelector::from_object(s).ok()).unwrap_or_default();
    let owned: Vec<&Value> = pods
        .iter()
        .filter(|p| meta::namespace_of(p) == ns && selector.matches(p))
        .filter(|p| {
            p.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .collect();
    let active: Vec<&Value> = owned.iter().copied().filter(|p| is_active(p)).collect();
    let is_new = |p: &&Value| {
        p.pointer("/metadata/labels").and_then(|l| l.get(HASH_LABEL)).and_then(Value::as_str) == Some(hash.as_str())
    };
    let new: Vec<&Value> = active.iter().copied().filter(is_new).collect();
    let old: Vec<&Value> = active.iter().copied().filter(|p| !is_new(p)).collect();
    let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
    let surge = intstr(d.pointer("/spec/strategy/rollingUpdate/maxSurge"), desired, true, "25%");
    let unavailable = intstr(d.pointer("/spec/strategy/rollingUpdate/maxUnavailable"), desired, false, "25%");
    let surge = if surge == 0 && unavailable == 0 { 1 } else { surge };

    let mut to_create = 0i64;
    let mut to_delete: Vec<&Value> = Vec::new();
    if recreate {
        if !old.is_empty() {
            to_delete.extend(old.iter().copied());
        } else if !owned
            .iter()
            .any(|p| !is_active(p) && !is_new(p) && p.pointer("/metadata/deletionTimestamp").is_some())
        {
            to_create = desired - new.len() as i64;
        }
    } else {
        let total = (new.len() + old.len()) as i64;
        let max_total = desired + if old.is_empty() { 0 } else { surge };
        if (new.len() as i64) < desired {
            to_create = (desired - new.len() as i64).min(max_total - total).max(0);
        }
        if !old.is_empty() {
            // Unhealthy old pods go first; healthy ones only while availability stays above the floor.
            let mut old_sorted = old.clone();
            old_sorted.sort_by_key(|p| deletion_rank(p));
            let min_available = desired - unavailable;
            let mut ready_total = active.iter().filter(|p| is_ready(p)).count() as i64;
            for p in old_sorted {
                if !is_ready(p) {
                    to_delete.push(p);
                } else if ready_total > min_available {
                    ready_total -= 1;
                    to_delete.push(p);
                }
            }
        }
    }
    if (new.len() as i64) > desired {
        let mut extra = new.clone();
        extra.sort_by_key(|p| deletion_rank(p));
        to_delete.extend(extra.into_iter().take(new.len() - desired as usize));
    }
    if to_create < 0 {
        to_create = 0;
    }
    for p in &to_delete {
        server.delete("v1", "Pod", Some(ns), meta::name_of(p))?;
    }
    for _ in 0..to_create {
        server.create(new_pod(d, &template, &hash, &shared.config.node_name))?;
    }
    let status = deployment_status(d, &active, &new, desired, unavailable, old.is_empty());
    if d.get("status") != Some(&status) {
        server.set_status("apps/v1", "Deployment", Some(ns), name, status)?;
    }
    Ok(())
}

fn new_pod(d: &Value, template: &Value, hash: &str, node: &str) -> Value {
    let name = meta::name_of(d);
    let mut labels = template.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({}));
    labels[HASH_LABEL] = json!(hash);
    let mut metadata = json!({
        "name": format!("{name}-{hash}-{}", meta::random_suffix()),
        "namespace": meta::namespace_of(d),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": meta::uid_of(d),
            "controller": true, "blockOwnerDeletion": true,
        }],
    });
    if let Some(annotations) = template.pointer("/metadata/annotations") {
        metadata["annotations"] = annotations.clone();
    }
    let mut spec = template.get("spec").cloned().unwrap_or_else(|| json!({}));
    spec["nodeName"] = json!(node);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

fn deployment_status(
    d: &Value,
    active: &[&Value],
    new: &[&Value],
    desired: i64,
    max_unavailable: i64,
    rolled_out: bool,
) -> Value {
    let old = d.get("status");
    let now = meta::now();
    let ready = active.iter().filter(|p| is_ready(p)).count() as i64;
    let updated = new.len() as i64;
    let mut status = json!({"observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1))});
    for (key, n) in [
        ("replicas", active.len() as i64),
        ("updatedReplicas", updated),
        ("readyReplicas", ready),
        ("availableReplicas", ready),
        ("unavailableReplicas", (desired - ready).max(0)),
    ] {
        if n > 0 {
            status[key] = json!(n);
        }
    }
    let available = ready >= desired - max_unavailable;
    let complete = rolled_out && updated == desired && ready == desired;
    let cond = |ty: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let previous = old
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == ty));
        let same = previous.is_some_and(|p| p["status"] == status && p["reason"] == reason);
        let since =
            if same { previous.map(|p| p["lastTransitionTime"].clone()).unwrap_or(json!(now)) } else { json!(now) };
        let updated_at =
            if same { previous.map(|p| p["lastUpdateTime"].clone()).unwrap_or(json!(now)) } else { json!(now) };
        json!({"type": ty, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "lastUpdateTime": updated_at})
    };
    let name = meta::name_of(d);
    status["conditions"] = json!([
        cond(
            "Available",
            available,
            if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
            if available {
                "Deployment has minimum availability.".to_string()
            } else {
                "Deployment does not have minimum availability.".to_string()
            },
        ),
        cond(
            "Progressing",
            true,
            if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
            if complete {
                format!("Deployment \"{name}\" has successfully progressed.")
            } else {
                format!("Deployment \"{name}\" is progressing.")
            },
        ),
    ]);
    status
}
