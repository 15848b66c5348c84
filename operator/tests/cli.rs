//! The binary's subcommands as a user runs them.

use std::process::Command;

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
