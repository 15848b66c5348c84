//! The harness starts real processes, reports their addresses, and cleans them up.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use e2e_harness::{RabbitServer, RedisServer, python, wait_until};

fn gone(pid: u32) -> bool {
    // A killed child may linger as a zombie until reaped; either way it no longer runs.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

fn redis_pid(redis: &RedisServer) -> u32 {
    let info = redis.cli(&["INFO", "server"]).unwrap();
    let line = info.lines().find(|l| l.starts_with("process_id:")).unwrap();
    line.trim_start_matches("process_id:").trim().parse().unwrap()
}

#[test]
fn redis_restarts_on_the_same_port_after_a_kill() {
    let mut redis = RedisServer::start().unwrap();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    redis.cli(&["SET", "k", "v"]).unwrap();
    let first = redis_pid(&redis);

    redis.kill();
    assert!(redis.cli(&["PING"]).is_err() || !redis.cli(&["PING"]).unwrap().contains("PONG"));
    assert!(gone(first));

    redis.restart().unwrap();
    assert_eq!(redis.cli(&["PING"]).unwrap().trim(), "PONG");
    // No persistence by default: the restart lost the key.
    assert_eq!(redis.cli(&["EXISTS", "k"]).unwrap().trim(), "0");
}

#[test]
fn redis_is_killed_when_dropped() {
    let redis = RedisServer::start().unwrap();
    let pid = redis_pid(&redis);
    let dir = redis.dir().to_owned();
    drop(redis);
    wait_until("redis-server to go away", Duration::from_secs(10), || gone(pid).then_some(())).unwrap();
    assert!(!dir.exists());
}

#[test]
fn redis_takes_extra_config_lines_and_a_password() {
    let redis = RedisServer::builder()
        .password("hunter2")
        .config("maxmemory 10mb")
        .config("maxmemory-policy allkeys-lru")
        .start()
        .unwrap();
    assert_eq!(redis.url(), format!("redis://:hunter2@127.0.0.1:{}/0", redis.port()));
    let policy = redis.cli(&["CONFIG", "GET", "maxmemory-policy"]).unwrap();
    assert!(policy.contains("allkeys-lru"), "{policy}");
    let raw =
        std::process::Command::new("redis-cli").args(["-p", &redis.port().to_string(), "GET", "x"]).output().unwrap();
    assert!(String::from_utf8_lossy(&raw.stdout).contains("NOAUTH"));
}

#[test]
fn redis_serves_tls_with_a_generated_ca() {
    let redis = RedisServer::builder().tls().start().unwrap();
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    assert!(redis.ca_cert_path().is_some_and(Path::exists));
    assert_eq!(redis.cli(&["PING"]).unwrap().trim(), "PONG");
    // Plain TCP clients get nothing useful from a TLS-only server.
    let plain =
        std::process::Command::new("redis-cli").args(["-p", &redis.port().to_string(), "PING"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("PONG"));
}

#[test]
fn shared_rabbit_node_accepts_amqp_and_management_connections() {
    let rabbit = RabbitServer::shared().unwrap();
    assert!(std::ptr::eq(rabbit, RabbitServer::shared().unwrap()));
    TcpStream::connect(("127.0.0.1", rabbit.amqp_port())).unwrap();
    TcpStream::connect(("127.0.0.1", rabbit.management_port())).unwrap();
    assert!(rabbit.amqp_url().ends_with("/%2F"));
    rabbit.add_vhost("harness test").unwrap();
    assert!(rabbit.ctl(&["list_vhosts"]).unwrap().contains("harness test"));
    assert!(rabbit.amqp_url_for_vhost("harness test").ends_with("/harness%20test"));
}

#[test]
fn venv_runs_real_celery() {
    let out = python::run_script(
        "import os, celery, kombu; print(celery.__version__, os.environ['GREETING'])",
        &[("GREETING", "hi")],
    )
    .unwrap();
    assert!(out.starts_with("5."), "{out}");
    assert!(out.trim_end().ends_with("hi"));
    let err = python::run_script("raise SystemExit('boom')", &[]).unwrap_err();
    assert!(err.to_string().contains("boom"));
}

#[test]
fn celery_worker_consumes_from_a_private_redis_and_dies_with_its_pool() {
    let redis = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    std::fs::write(
        app.path().join("tasks.py"),
        "import os\nfrom celery import Celery\napp = Celery('tasks', broker=os.environ['BROKER'])\n\
         @app.task\ndef add(x, y):\n    return x + y\n",
    )
    .unwrap();
    let env = [("BROKER", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut worker = python::CeleryWorker::spawn(
        app.path(),
        &["-A", "tasks", "worker", "-c", "2", "-l", "INFO", "--without-mingle", "--without-gossip"],
        &env,
    )
    .unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(60)).unwrap();
    let pid = worker.pid();
    drop(worker);
    wait_until("the worker to go away", Duration::from_secs(10), || gone(pid).then_some(())).unwrap();
    // The prefork children went with it: nobody is connected to the broker any more.
    wait_until("the pool to disconnect", Duration::from_secs(10), || {
        let clients = redis.cli(&["CLIENT", "LIST"]).unwrap();
        (clients.lines().count() == 1).then_some(())
    })
    .unwrap();
}

#[test]
fn sentinel_monitors_a_private_master() {
    let master = RedisServer::start().unwrap();
    let sentinel = RedisServer::builder().sentinel("mymaster", &master).start().unwrap();
    assert_eq!(sentinel.url(), format!("sentinel://127.0.0.1:{}/0", sentinel.port()));
    let addr = sentinel.cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"]).unwrap();
    assert_eq!(addr.lines().collect::<Vec<_>>(), ["127.0.0.1", &master.port().to_string()]);
}
