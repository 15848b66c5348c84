//! Containers as local process groups: environment, volumes, argv, probes and signals.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::RunnerConfig;
use crate::apiserver::ApiServer;

/// The `pod-template-hash` of a pod template: stable for equal templates, whatever the key order.
pub fn template_hash(template: &Value) -> String {
    fn canonical(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, String> = m.iter().map(|(k, v)| (k, canonical(v))).collect();
                let parts: Vec<String> = sorted.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", parts.join(","))
            }
            Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
            other => other.to_string(),
        }
    }
    let mut hasher = std::hash::DefaultHasher::new();
    canonical(template).hash(&mut hasher);
    let mut n = hasher.finish();
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// Everything needed to start (and restart) one container of one pod.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub log: PathBuf,
    /// Mount path -> host directory, to rewrite probe commands the same way as argv.
    pub mounts: Vec<(String, PathBuf)>,
}

/// Why a container cannot be started yet (kubelet's CreateContainerConfigError and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub reason: &'static str,
    pub message: String,
}

impl ConfigError {
    fn config(message: String) -> Self {
        ConfigError { reason: "CreateContainerConfigError", message }
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn secret_data(server: &ApiServer, ns: &str, name: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let secret = server
        .get("v1", "Secret", Some(ns), name)
        .ok()
        .flatten()
        .ok_or_else(|| ConfigError::config(format!("secret \"{name}\" not found")))?;
    let mut out = BTreeMap::new();
    if let Some(data) = secret.get("data").and_then(Value::as_object) {
        for (k, v) in data {
            let raw =
                base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap_or_default();
            out.insert(k.clone(), String::from_utf8_lossy(&raw).into_owned());
        }
    }
    Ok(out)
}

fn config_map_data(server: &ApiServer, ns: &str, name: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let cm = server
        .get("v1", "ConfigMap", Some(ns), name)
        .ok()
        .flatten()
        .ok_or_else(|| ConfigError::config(format!("configmap \"{name}\" not found")))?;
    Ok(cm
        .get("data")
        .and_then(Value::as_object)
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default())
}

/// Kubernetes `$(VAR)` expansion: known variables are substituted, `$$` escapes, unknown stay.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_ref(pod: &Value, path: &str, node: &str) -> String {
    match path {
        "metadata.name" => str_at(pod, "/metadata/name").unwrap_or_default().to_string(),
        "metadata.namespace" => str_at(pod, "/metadata/namespace").unwrap_or_default().to_string(),
        "metadata.uid" => str_at(pod, "/metadata/uid").unwrap_or_default().to_string(),
        "spec.nodeName" => node.to_string(),
        "spec.serviceAccountName" => str_at(pod, "/spec/serviceAccountName").unwrap_or("default").to_string(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
        other => {
            // metadata.labels['key'] / metadata.annotations['key']
            let lookup = |prefix: &str, field: &str| {
                other
                    .strip_prefix(prefix)
                    .and_then(|k| k.strip_suffix("']"))
                    .and_then(|k| pod.pointer(&format!("/metadata/{field}")).and_then(|m| m.get(k)))
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            lookup("metadata.labels['", "labels")
                .or_else(|| lookup("metadata.annotations['", "annotations"))
                .unwrap_or_default()
        }
    }
}

/// The container's environment, resolved as kubelet does (envFrom first, then env in order).
pub fn container_env(
    server: &ApiServer,
    pod: &Value,
    container: &Value,
    node: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = str_at(pod, "/metadata/namespace").unwrap_or("default");
    let mut env: Vec<(String, String)> = Vec::new();
    for source in container.get("envFrom").and_then(Value::as_array).into_iter().flatten() {
        let prefix = source.get("prefix").and_then(Value::as_str).unwrap_or_default();
        let optional = |r: &Value| r.get("optional").and_then(Value::as_bool) == Some(true);
        let data = if let Some(r) = source.get("secretRef") {
            secret_data(server, ns, str_at(r, "/name").unwrap_or_default())
                .or_else(|e| if optional(r) { Ok(BTreeMap::new()) } else { Err(e) })?
        } else if let Some(r) = source.get("configMapRef") {
            config_map_data(server, ns, str_at(r, "/name").unwrap_or_default())
                .or_else(|e| if optional(r) { Ok(BTreeMap::new()) } else { Err(e) })?
        } else {
            BTreeMap::new()
        };
        env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for var in container.get("env").and_then(Value::as_array).into_iter().flatten() {
        let name = var.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let value = if let Some(v) = var.get("value").and_then(Value::as_str) {
            expand(v, &env)
        } else if let Some(from) = var.get("valueFrom") {
            value_from(server, pod, ns, from, node)?
        } else {
            String::new()
        };
        env.push((name, value));
    }
    Ok(env)
}

fn value_from(server: &ApiServer, pod: &Value, ns: &str, from: &Value, node: &str) -> Result<String, ConfigError> {
    let key_of = |r: &Value, kind: &str, data: Result<BTreeMap<String, String>, ConfigError>| {
        let optional = r.get("optional").and_then(Value::as_bool) == Some(true);
        let name = str_at(r, "/name").unwrap_or_default();
        let key = str_at(r, "/key").unwrap_or_default();
        match data {
            Ok(d) => match d.get(key) {
                Some(v) => Ok(v.clone()),
                None if optional => Ok(String::new()),
                None => Err(ConfigError::config(format!("couldn't find key {key} in {kind} {ns}/{name}"))),
            },
            Err(_) if optional => Ok(String::new()),
            Err(e) => Err(e),
        }
    };
    if let Some(r) = from.get("secretKeyRef") {
        return key_of(r, "Secret", secret_data(server, ns, str_at(r, "/name").unwrap_or_default()));
    }
    if let Some(r) = from.get("configMapKeyRef") {
        return key_of(r, "ConfigMap", config_map_data(server, ns, str_at(r, "/name").unwrap_or_default()));
    }
    if let Some(path) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
        return Ok(field_ref(pod, path, node));
    }
    Ok(String::new())
}

/// Create the pod's volume directories (emptyDir, secret and configMap contents) and return the
/// container's mounts as (mountPath, host path). A `persistentVolumeClaim` volume is one directory
/// per namespace and claim name, next to the pods' directories, that outlives every pod mounting it
/// (the claim object itself is not looked up: the double does not serve PersistentVolumeClaims).
pub fn prepare_volumes(
    server: &ApiServer,
    pod: &Value,
    container: &Value,
    pod_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, ConfigError> {
    let ns = str_at(pod, "/metadata/namespace").unwrap_or("default");
    let volumes = pod.pointer("/spec/volumes").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut mounts = Vec::new();
    for mount in container.get("volumeMounts").and_then(Value::as_array).into_iter().flatten() {
        let name = mount.get("name").and_then(Value::as_str).unwrap_or_default();
        let mount_path = mount.get("mountPath").and_then(Value::as_str).unwrap_or_default();
        let sub = mount.get("subPath").and_then(Value::as_str).unwrap_or_default();
        let volume = volumes.iter().find(|v| v.get("name").and_then(Value::as_str) == Some(name));
        let host = match volume.and_then(|v| str_at(v, "/persistentVolumeClaim/claimName")) {
            // `_` cannot start a pod name, so no pod directory is ever called that.
            Some(claim) => pod_dir.parent().unwrap_or(pod_dir).join("_claims").join(claim),
            None => pod_dir.join("volumes").join(name),
        };
        std::fs::create_dir_all(&host).map_err(|e| ConfigError::config(format!("volume {name}: {e}")))?;
        let files = match volume {
            Some(v) if v.get("secret").is_some() => {
                Some(secret_data(server, ns, str_at(v, "/secret/secretName").unwrap_or_default())?)
            }
            Some(v) if v.get("configMap").is_some() => {
                Some(config_map_data(server, ns, str_at(v, "/configMap/name").unwrap_or_default())?)
            }
            _ => None,
        };
        for (file, content) in files.into_iter().flatten() {
            std::fs::write(host.join(&file), content)
                .map_err(|e| ConfigError::config(format!("volume {name}: {e}")))?;
        }
        let host = if sub.is_empty() { host } else { host.join(sub) };
        mounts.push((mount_path.trim_end_matches('/').to_string(), host));
    }
    // Longest mount paths first, so /var/run/celery-beat wins over /var/run/celery.
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    Ok(mounts)
}

/// Rewrite absolute mount paths inside a string (`/var/run/celery/x`, `--schedule=/var/run/...`).
pub fn remap(s: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, host) in mounts {
        if mount.is_empty() {
            continue;
        }
        let mut out = String::new();
        let mut rest = s;
        let mut changed = false;
        while let Some(i) = rest.find(mount.as_str()) {
            let before_ok = i == 0 || matches!(rest.as_bytes()[i - 1], b'=' | b':' | b' ' | b',');
            let end = i + mount.len();
            let after_ok = end == rest.len() || rest.as_bytes()[end] == b'/';
            out.push_str(&rest[..i]);
            if before_ok && after_ok {
                out.push_str(&host.display().to_string());
                changed = true;
            } else {
                out.push_str(mount);
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        if changed {
            return out;
        }
    }
    s.to_string()
}

fn resolve_program(name: &str, search: &[PathBuf]) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    search.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

pub fn search_path(config: &RunnerConfig) -> Vec<PathBuf> {
    let mut dirs = config.path.clone();
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    dirs
}

/// Work out how to start one container of `pod` (its pod directory is `pod_dir`).
pub fn plan(
    server: &ApiServer,
    config: &RunnerConfig,
    pod: &Value,
    container: &Value,
    pod_dir: &Path,
) -> Result<Launch, ConfigError> {
    let name = container.get("name").and_then(Value::as_str).unwrap_or("main");
    let pod_name = str_at(pod, "/metadata/name").unwrap_or_default();
    let mounts = prepare_volumes(server, pod, container, pod_dir)?;
    let mut env: Vec<(String, String)> = config.env.clone();
    env.push(("HOSTNAME".into(), pod_name.to_string()));
    env.push(("HOME".into(), pod_dir.display().to_string()));
    let search = search_path(config);
    env.push((
        "PATH".into(),
        std::env::join_paths(&search).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
    ));
    if mounts.iter().any(|(m, _)| m == "/tmp") {
        let tmp = mounts.iter().find(|(m, _)| m == "/tmp").map(|(_, h)| h.display().to_string()).unwrap_or_default();
        env.push(("TMPDIR".into(), tmp));
    }
    for (k, v) in container_env(server, pod, container, &config.node_name)? {
        env.push((k, remap(&v, &mounts)));
    }
    let image = container.get("image").and_then(Value::as_str).unwrap_or_default();
    let strings = |key: &str| -> Vec<String> {
        container
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let mut argv = strings("command");
    if argv.is_empty() {
        argv = config.entrypoints.get(image).cloned().unwrap_or_default();
    }
    argv.extend(strings("args"));
    let argv: Vec<String> = argv.iter().map(|a| remap(&expand(a, &env), &mounts)).collect();
    let Some((first, rest)) = argv.split_first() else {
        return Err(ConfigError {
            reason: "RunContainerError",
            message: format!("container {name} has no command and image {image:?} no known entrypoint"),
        });
    };
    let program = resolve_program(first, &search).ok_or_else(|| ConfigError {
        reason: "RunContainerError",
        message: format!("exec: {first:?}: executable file not found in $PATH"),
    })?;
    let workdir = container
        .get("workingDir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| pod_dir.to_path_buf());
    Ok(Launch { program, args: rest.to_vec(), env, workdir, log: pod_dir.join(format!("{name}.log")), mounts })
}

/// Start a planned container in its own process group, output appended to its log file.
pub fn spawn(launch: &Launch) -> std::io::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&launch.log)?;
    let err = log.try_clone()?;
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&launch.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If the test process
    // dies without unwinding (killed by a timeout), the container's main process dies with it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Send a signal to one process (a container's main process).
pub fn signal(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) on a process we started; no memory is touched.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Send a signal to a whole process group.
pub fn signal_group(pgid: u32, signal: i32) {
    let Ok(pgid) = i32::try_from(pgid) else { return };
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory is touched.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Probe verdicts, shared between a container's probe task and the runner.
#[derive(Debug, Default)]
pub struct ProbeState {
    pub ready: AtomicBool,
    pub liveness_failed: AtomicBool,
}

/// Run one probe (`exec` with the container's environment, or a TCP connect for `tcpSocket` /
/// `httpGet`); true on success.
async fn probe_once(probe: &Value, launch: &Launch) -> bool {
    let timeout = Duration::from_secs(probe.get("timeoutSeconds").and_then(Value::as_u64).unwrap_or(1).max(1));
    if let Some(cmd) = probe.pointer("/exec/command").and_then(Value::as_array) {
        let argv: Vec<String> =
            cmd.iter().filter_map(Value::as_str).map(|a| remap(&expand(a, &launch.env), &launch.mounts)).collect();
        let Some((first, rest)) = argv.split_first() else { return false };
        let path: Vec<PathBuf> = launch
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, p)| std::env::split_paths(p).collect())
            .unwrap_or_default();
        let Some(program) = resolve_program(first, &path) else { return false };
        let mut c = tokio::process::Command::new(program);
        c.args(rest)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&launch.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        return matches!(tokio::time::timeout(timeout, c.status()).await, Ok(Ok(s)) if s.success());
    }
    let port = probe.pointer("/tcpSocket/port").or_else(|| probe.pointer("/httpGet/port")).and_then(Value::as_u64);
    match port {
        Some(port) => matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port as u16))).await,
            Ok(Ok(_))
        ),
        None => true,
    }
}

/// Probe a started container until aborted, updating `state` with kubelet's thresholds.
pub async fn probe_loop(
    readiness: Option<Value>,
    liveness: Option<Value>,
    launch: Launch,
    period: Option<Duration>,
    state: Arc<ProbeState>,
) {
    let period_of = |p: &Value| {
        period
            .unwrap_or_else(|| Duration::from_secs(p.get("periodSeconds").and_then(Value::as_u64).unwrap_or(10).max(1)))
    };
    let threshold = |p: &Value, key: &str, default: u64| p.get(key).and_then(Value::as_u64).unwrap_or(default).max(1);
    if readiness.is_none() {
        state.ready.store(true, Ordering::SeqCst);
    }
    let tick = [readiness.as_ref(), liveness.as_ref()].into_iter().flatten().map(period_of).min();
    let Some(tick) = tick else { return };
    let (mut ready_ok, mut ready_bad, mut live_bad) = (0u64, 0u64, 0u64);
    loop {
        tokio::time::sleep(tick).await;
        if let Some(p) = &readiness {
            if probe_once(p, &launch).await {
                ready_ok += 1;
                ready_bad = 0;
                if ready_ok >= threshold(p, "successThreshold", 1) {
                    state.ready.store(true, Ordering::SeqCst);
                }
            } else {
                ready_bad += 1;
                ready_ok = 0;
                if ready_bad >= threshold(p, "failureThreshold", 3) {
                    state.ready.store(false, Ordering::SeqCst);
                }
            }
        }
        if let Some(p) = &liveness {
            if probe_once(p, &launch).await {
                live_bad = 0;
            } else {
                live_bad += 1;
                if live_bad >= threshold(p, "failureThreshold", 3) {
                    state.liveness_failed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dollar_paren_variables_expand_like_kubelet() {
        let env = vec![("POD_NAME".to_string(), "mail-abc".to_string())];
        assert_eq!(expand("mail@$(POD_NAME)", &env), "mail@mail-abc");
        assert_eq!(expand("$(MISSING)-$$(POD_NAME)", &env), "$(MISSING)-$(POD_NAME)");
    }

    #[test]
    fn mount_paths_are_rewritten_only_at_path_boundaries() {
        let mounts = vec![
            ("/var/run/celery-beat".to_string(), PathBuf::from("/p/beat")),
            ("/tmp".to_string(), PathBuf::from("/p/tmp")),
        ];
        assert_eq!(remap("/var/run/celery-beat/schedule", &mounts), "/p/beat/schedule");
        assert_eq!(remap("--schedule=/var/run/celery-beat/s", &mounts), "--schedule=/p/beat/s");
        assert_eq!(remap("/tmp", &mounts), "/p/tmp");
        assert_eq!(remap("/var/tmpfile", &mounts), "/var/tmpfile");
    }

    #[test]
    fn a_claimed_volume_is_one_directory_per_claim_that_outlives_the_pods() {
        let server = crate::ApiServer::new();
        let root = tempfile::tempdir().unwrap();
        let pod = json!({"metadata": {"namespace": "ns"}, "spec": {"volumes": [
            {"name": "schedule", "persistentVolumeClaim": {"claimName": "beat-schedule"}},
            {"name": "scratch", "emptyDir": {}},
        ]}});
        let container = json!({"volumeMounts": [
            {"name": "schedule", "mountPath": "/var/run/celery-beat"},
            {"name": "scratch", "mountPath": "/scratch"},
        ]});
        let mounts = |pod_name: &str| {
            let m = prepare_volumes(&server, &pod, &container, &root.path().join("ns").join(pod_name)).unwrap();
            m.into_iter().collect::<std::collections::BTreeMap<_, _>>()
        };
        let (old, new) = (mounts("beat-1"), mounts("beat-2"));
        assert_eq!(old["/var/run/celery-beat"], root.path().join("ns/_claims/beat-schedule"));
        assert_eq!(old["/var/run/celery-beat"], new["/var/run/celery-beat"]);
        assert_ne!(old["/scratch"], new["/scratch"]);
    }

    #[test]
    fn template_hashes_ignore_key_order() {
        let a = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "w"}]}});
        let b = json!({"spec": {"containers": [{"name": "w"}]}, "metadata": {"labels": {"b": "2", "a": "1"}}});
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_ne!(template_hash(&a), template_hash(&json!({})));
        assert_eq!(template_hash(&a).len(), 10);
    }
}
