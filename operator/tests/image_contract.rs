//! The worker and beat pods the operator generates run the worker base image the way it is built
//! (`worker-image/Dockerfile`) and smoke-tested (`images/test.sh`): as the image's numeric user,
//! with a read-only root filesystem and an emptyDir at every path the entrypoint, Celery and beat
//! write to. A change to one side that the other does not follow fails here, not in a cluster.

use std::collections::BTreeSet;
use std::path::Path;

use celery_operator::crd::{SecretKeyRef, WorkerPool};
use celery_operator::deployment::{
    BEAT_SCHEDULE_DIR, BrokerUrlSource, ENTRYPOINT, PROBE_DIR, PoolInputs, beat_deployment, worker_deployment,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodSpec;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The Dockerfile's instructions, continuation lines joined: (instruction, arguments).
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(i, rest)| (i.to_uppercase(), rest.trim().to_string()))
        .collect()
}

/// What the worker image promises: its user, its probe directory and the directories it creates
/// for that user.
struct WorkerImage {
    uid: i64,
    gid: i64,
    probe_dir: String,
    user_dirs: BTreeSet<String>,
    entrypoint: String,
}

fn worker_image() -> WorkerImage {
    let steps = instructions(&repo_file("worker-image/Dockerfile"));
    let last = |name: &str| steps.iter().rev().find(|(i, _)| i == name).map(|(_, a)| a.clone());
    let user = last("USER").expect("USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let probe_dir = steps
        .iter()
        .filter(|(i, _)| i == "ENV")
        .flat_map(|(_, a)| a.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find_map(|kv| kv.strip_prefix("CELERY_PROBE_DIR=").map(str::to_string))
        .expect("ENV CELERY_PROBE_DIR");
    // `install -d -o celery -g celery -m 0755 DIR...` in a RUN step.
    let user_dirs = steps
        .iter()
        .filter(|(i, _)| i == "RUN")
        .flat_map(|(_, a)| a.split("&&").map(str::trim).map(str::to_string).collect::<Vec<_>>())
        .filter(|cmd| cmd.starts_with("install -d"))
        .flat_map(|cmd| cmd.split_whitespace().filter(|w| w.starts_with('/')).map(str::to_string).collect::<Vec<_>>())
        .collect();
    let entrypoint: Vec<String> = serde_json::from_str(&last("ENTRYPOINT").expect("ENTRYPOINT")).expect("exec form");
    WorkerImage {
        uid: uid.parse().expect("numeric uid, so the kubelet can check runAsNonRoot"),
        gid: gid.parse().expect("numeric gid"),
        probe_dir,
        user_dirs,
        entrypoint: entrypoint.join(" "),
    }
}

fn pool(beat: bool) -> WorkerPool {
    let doc = format!(
        "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: mail, namespace: prod, uid: u1}}\n\
         spec: {{app: proj.celery_app, image: reg/proj:1, queues: [emails], beat: {{enabled: {beat}}}}}\n"
    );
    serde_saphyr::from_str(&doc).expect("fixture parses")
}

fn generated() -> [(&'static str, Deployment); 2] {
    let inputs = PoolInputs {
        queue_names: vec!["emails".into()],
        broker: BrokerUrlSource::Secret(SecretKeyRef { name: "redis".into(), key: "url".into() }),
        replicas: Some(1),
    };
    [("worker", worker_deployment(&pool(false), &inputs)), ("beat", beat_deployment(&pool(true), &inputs))]
}

fn pod(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec")
}

/// Mount paths of the pod's emptyDir volumes in its one container.
fn empty_dir_mounts(pod: &PodSpec) -> BTreeSet<String> {
    let empty: BTreeSet<&str> =
        pod.volumes.iter().flatten().filter(|v| v.empty_dir.is_some()).map(|v| v.name.as_str()).collect();
    pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| empty.contains(m.name.as_str()) && m.read_only != Some(true))
        .map(|m| m.mount_path.clone())
        .collect()
}

#[test]
fn pods_run_as_the_worker_images_user_with_a_read_only_root() {
    let image = worker_image();
    assert!(image.uid > 0 && image.gid > 0, "the image must not run as root");
    for (what, d) in generated() {
        let pod = pod(&d);
        let pod_security = pod.security_context.as_ref().expect("pod securityContext");
        let container = &pod.containers[0];
        let security = container.security_context.as_ref().expect("container securityContext");
        assert_eq!(pod_security.run_as_non_root, Some(true), "{what}");
        // No user of its own: the image's USER runs (tested by images/test.sh); one that differs
        // would not own the directories the image creates.
        for uid in [pod_security.run_as_user, security.run_as_user].into_iter().flatten() {
            assert_eq!(uid, image.uid, "{what} runs as {uid}, the image as {}", image.uid);
        }
        for gid in [pod_security.run_as_group, security.run_as_group].into_iter().flatten() {
            assert_eq!(gid, image.gid, "{what}");
        }
        assert_eq!(security.read_only_root_filesystem, Some(true), "{what}");
        assert_eq!(container.command.as_deref(), Some(&[ENTRYPOINT.to_string()][..]), "{what}");
        assert_eq!(image.entrypoint, ENTRYPOINT);
    }
}

#[test]
fn every_path_the_image_writes_is_an_empty_dir_in_the_pods() {
    let image = worker_image();
    assert_eq!(image.probe_dir, PROBE_DIR, "the image's CELERY_PROBE_DIR and the pods' differ");
    // The image creates the probe and schedule directories for its user, so a plain
    // `docker run --read-only --tmpfs ...` works as the pods do.
    for dir in [PROBE_DIR, BEAT_SCHEDULE_DIR] {
        assert!(image.user_dirs.contains(dir), "worker-image/Dockerfile does not create {dir}: {:?}", image.user_dirs);
    }
    for (what, d) in generated() {
        let pod = pod(&d);
        let env = pod.containers[0].env.iter().flatten().find(|e| e.name == "CELERY_PROBE_DIR").expect("env");
        assert_eq!(env.value.as_deref(), Some(PROBE_DIR), "{what}");
        let mounts = empty_dir_mounts(pod);
        // Probe files, Python's and Celery's temporary files; beat's schedule.
        let mut writes = vec![PROBE_DIR, "/tmp"];
        if what == "beat" {
            writes.push(BEAT_SCHEDULE_DIR);
        }
        for path in writes {
            assert!(mounts.contains(path), "{what} writes {path}, but it is no writable emptyDir: {mounts:?}");
        }
    }
}

#[test]
fn the_image_smoke_test_mounts_exactly_the_worker_pods_writable_paths() {
    // images/test.sh runs the worker image with `--read-only` and a tmpfs per emptyDir of the
    // worker pod, without `--user`: what it proves is what the pods get.
    let script = repo_file("images/test.sh").replace("\\\n", " ");
    let restricted =
        script.lines().find(|l| l.starts_with("restricted=(")).expect("restricted=(...) in images/test.sh");
    for flag in ["--read-only ", "--read-only-tmpfs=false", "--cap-drop ALL", "no-new-privileges"] {
        assert!(restricted.contains(flag), "images/test.sh runs containers without {flag}: {restricted}");
    }
    let run = script.lines().find(|l| l.contains("--name smoke-worker")).expect("the worker container's podman run");
    assert!(run.contains("\"${restricted[@]}\""), "{run}");
    assert!(!run.contains("--user"), "the pods run as the image's USER: {run}");
    let tmpfs: BTreeSet<String> = run
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--tmpfs")
        .map(|w| w[1].split(':').next().unwrap_or_default().to_string())
        .collect();
    let [(_, worker), _] = generated();
    assert_eq!(tmpfs, empty_dir_mounts(pod(&worker)), "images/test.sh's tmpfs mounts and the worker pod's emptyDirs");
}
