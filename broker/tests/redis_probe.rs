//! The Redis probe against real redis-server processes, with tasks published and consumed by real
//! Celery: its counts must equal kombu's own.

mod common;

use std::time::Duration;

use celery_broker::{Broker, BrokerConfig, ProbeError, Reason, SafetyMode, Severity, TransportOptions, audit};
use common::{kombu_transport, poll, publish, send_blocking, start_worker, write_app};
use e2e_harness::RedisServer;

fn config(url: &str, transport: &TransportOptions) -> BrokerConfig {
    BrokerConfig { transport: transport.clone(), ..BrokerConfig::new(url) }
}

#[tokio::test]
async fn ready_counts_equal_kombus_own_with_priorities_prefixes_and_custom_steps() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let custom_steps =
        TransportOptions { priority_steps: (0..=9).collect(), separator: ":".into(), ..TransportOptions::default() };
    let cases = [
        ("kombu defaults", TransportOptions::default()),
        ("global_keyprefix", TransportOptions { global_keyprefix: "tenant-a:".into(), ..TransportOptions::default() }),
        ("ten priority steps, custom separator", custom_steps),
    ];
    // Several priorities per queue, so several lists per queue, plus a queue nobody published to.
    let plan = [
        ("emails", 0, 3),
        ("emails", 3, 2),
        ("emails", 5, 4),
        ("emails", 9, 1),
        ("reports", 1, 2),
        ("reports", 8, 5),
        ("celery", 0, 1),
    ];
    let queues = ["emails", "reports", "celery", "idle"];
    for (name, options) in cases {
        let redis = RedisServer::start().unwrap();
        let kombu = publish(app.path(), &redis.url(), &kombu_transport(&options), &plan, &queues);
        let lists_of_emails = kombu.lists.keys().filter(|k| k.contains("emails")).count();
        assert!(lists_of_emails >= 3, "{name}: priorities spread over lists {:?}", kombu.lists);
        assert!(kombu.lists.keys().all(|k| k.starts_with(&options.global_keyprefix)), "{name}: {:?}", kombu.lists);

        let broker = Broker::new(config(&redis.url(), &options)).unwrap();
        let seen = broker.probe(&queues).await.unwrap();
        for queue in queues {
            assert_eq!(
                seen.queues[queue].ready, kombu.sizes[queue],
                "{name}: queue {queue}, kombu saw {:?}",
                kombu.sizes
            );
        }
        assert_eq!(seen.queues["emails"].ready, 10, "{name}");
        assert_eq!(seen.queues["idle"].ready, 0, "{name}");
    }
}

#[tokio::test]
async fn a_probe_with_the_wrong_layout_misses_what_kombu_counts() {
    // The point of honouring transport options: without the prefix the same data reads empty.
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let prefixed = TransportOptions { global_keyprefix: "app1:".into(), ..TransportOptions::default() };
    publish(app.path(), &redis.url(), &kombu_transport(&prefixed), &[("q", 0, 4)], &["q"]);
    let wrong = Broker::new(config(&redis.url(), &TransportOptions::default())).unwrap();
    assert_eq!(wrong.probe(&["q"]).await.unwrap().queues["q"].ready, 0);
    let right = Broker::new(config(&redis.url(), &prefixed)).unwrap();
    assert_eq!(right.probe(&["q"]).await.unwrap().queues["q"].ready, 4);
}

#[tokio::test]
async fn unacked_messages_are_attributed_to_the_queue_a_worker_prefetched_from() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let options = TransportOptions { global_keyprefix: "svc:".into(), ..TransportOptions::default() };
    let transport = kombu_transport(&options);
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", transport.as_str())];
    // 10 blocking tasks for `emails` (served by a worker), 3 for `reports` (nobody serves it).
    send_blocking(app.path(), &env, "emails", 10);
    send_blocking(app.path(), &env, "reports", 3);
    let worker = start_worker(app.path(), &env, "emails", 4);

    let broker = Broker::new(config(&url, &options)).unwrap();
    let queues = ["emails", "reports"];
    // One task runs (acked at start: acks_late is off) while the worker holds 4 prefetched.
    let seen = poll("the worker to hold 4 prefetched tasks", Duration::from_secs(30), || async {
        let seen = broker.probe(&queues).await.unwrap();
        let emails = &seen.queues["emails"];
        if emails.unacked == Some(4) && emails.ready == 5 { Ok(seen) } else { Err(seen.queues) }
    })
    .await;
    assert_eq!(seen.queues["emails"].orphaned_unacked, Some(0));
    assert_eq!(seen.queues["reports"].ready, 3);
    assert_eq!(seen.queues["reports"].unacked, Some(0));
    // Ground truth: kombu's hash holds exactly those 4, under the prefix.
    assert_eq!(redis.cli(&["HLEN", "svc:unacked"]).unwrap().trim(), "4");

    // With a visibility timeout of zero every held message counts as orphaned.
    let impatient = TransportOptions { visibility_timeout: Duration::ZERO, ..options.clone() };
    let orphaned = Broker::new(config(&url, &impatient)).unwrap();
    let seen = orphaned.probe(&queues).await.unwrap();
    assert_eq!(seen.queues["emails"].orphaned_unacked, Some(4));

    // Let everything run: the worker drains `emails` and its unacked entries.
    redis.cli(&["LPUSH", "release", "1", "1", "1", "1", "1", "1", "1", "1", "1", "1"]).unwrap();
    poll("emails to drain", Duration::from_secs(30), || async {
        let seen = broker.probe(&queues).await.unwrap();
        let emails = seen.queues["emails"].clone();
        if emails.ready == 0 && emails.unacked == Some(0) { Ok(()) } else { Err(emails) }
    })
    .await;
    drop(worker);
}

#[tokio::test]
async fn a_large_unacked_hash_is_estimated_from_a_sample_past_the_scan_limit() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    publish(app.path(), &url, "{}", &[("a", 0, 300), ("b", 0, 300)], &["a", "b"]);
    // A kombu consumer takes 150 from each queue without acking and dies: 300 unacked entries,
    // enough for Redis to store the hash as a real hash table (paged HSCAN).
    let take = r#"
import os
from kombu import Connection
conn = Connection(os.environ["URL"])
ch = conn.default_channel
for queue in ("a", "b"):
    for _ in range(150):
        assert ch.basic_get(queue, no_ack=False) is not None
os._exit(0)
"#;
    e2e_harness::python::run_script(take, &[("URL", &url)]).unwrap();
    assert_eq!(redis.cli(&["HLEN", "unacked"]).unwrap().trim(), "300");

    let exact = Broker::new(BrokerConfig::new(url.clone())).unwrap();
    let seen = exact.probe(&["a", "b"]).await.unwrap();
    assert_eq!((seen.queues["a"].unacked, seen.queues["b"].unacked), (Some(150), Some(150)));
    assert_eq!((seen.queues["a"].ready, seen.queues["b"].ready), (150, 150));
    assert!(seen.findings.iter().all(|f| f.reason != Reason::UnackedSampled));

    let sampling = BrokerConfig { unacked_scan_limit: 60, ..BrokerConfig::new(url) };
    let seen = Broker::new(sampling).unwrap().probe(&["a", "b"]).await.unwrap();
    assert!(seen.findings.iter().any(|f| f.reason == Reason::UnackedSampled));
    let (a, b) = (seen.queues["a"].unacked.unwrap(), seen.queues["b"].unacked.unwrap());
    // Scaled to the whole hash; each share is an estimate from a sample of ~60.
    assert!((270..=300).contains(&(a + b)), "{a} + {b}");
    assert!((60..=240).contains(&a), "{a}");
}

#[tokio::test]
async fn allkeys_eviction_with_a_memory_limit_is_unsafe_and_noeviction_is_safe() {
    let lru = RedisServer::builder().config("maxmemory 10mb").config("maxmemory-policy allkeys-lru").start().unwrap();
    let seen = Broker::new(BrokerConfig::new(lru.url())).unwrap().probe(&["celery"]).await.unwrap();
    assert_eq!(seen.info.eviction_policy.as_deref(), Some("allkeys-lru"));
    assert_eq!(seen.info.maxmemory_bytes, Some(10 << 20));
    let finding = seen.findings.iter().find(|f| f.reason == Reason::EvictionPolicyUnsafe).expect("eviction finding");
    assert_eq!(finding.severity, Severity::Critical);
    assert!(finding.message.contains("allkeys-lru") && finding.message.contains("noeviction"));
    assert!(seen.is_unsafe());

    let safe = RedisServer::builder().config("maxmemory 10mb").config("maxmemory-policy noeviction").start().unwrap();
    let seen = Broker::new(BrokerConfig::new(safe.url())).unwrap().probe(&["celery"]).await.unwrap();
    assert_eq!(seen.info.eviction_policy.as_deref(), Some("noeviction"));
    assert!(!seen.is_unsafe(), "{:?}", seen.findings);

    // Off reports nothing, whatever the policy.
    let off = BrokerConfig { safety: SafetyMode::Off, ..BrokerConfig::new(lru.url()) };
    let seen = Broker::new(off).unwrap().probe(&["celery"]).await.unwrap();
    assert!(seen.findings.is_empty(), "{:?}", seen.findings);
}

#[tokio::test]
async fn the_policy_is_read_from_info_when_config_is_renamed_away() {
    let managed = RedisServer::builder()
        .config("maxmemory 10mb")
        .config("maxmemory-policy allkeys-lru")
        .config("rename-command CONFIG \"\"")
        .start()
        .unwrap();
    assert!(managed.cli(&["CONFIG", "GET", "maxmemory-policy"]).unwrap().contains("unknown command"));
    let seen = Broker::new(BrokerConfig::new(managed.url())).unwrap().probe(&["celery"]).await.unwrap();
    assert_eq!(seen.info.eviction_policy.as_deref(), Some("allkeys-lru"));
    assert!(seen.findings.iter().any(|f| f.reason == Reason::EvictionPolicyUnsafe));

    // Fix mode cannot fix it there, and says so instead of failing the probe.
    let fix = BrokerConfig { safety: SafetyMode::Fix, ..BrokerConfig::new(managed.url()) };
    let broker = Broker::new(fix).unwrap();
    for _ in 0..2 {
        let seen = broker.probe(&["celery"]).await.unwrap();
        let reasons: Vec<Reason> = seen.findings.iter().map(|f| f.reason).collect();
        assert!(reasons.contains(&Reason::EvictionPolicyUnsafe), "{reasons:?}");
        assert!(reasons.contains(&Reason::EvictionPolicyFixFailed), "{reasons:?}");
    }
}

#[tokio::test]
async fn fix_mode_switches_the_policy_to_noeviction() {
    let redis = RedisServer::builder().config("maxmemory 10mb").config("maxmemory-policy allkeys-lru").start().unwrap();
    let fix = BrokerConfig { safety: SafetyMode::Fix, ..BrokerConfig::new(redis.url()) };
    let broker = Broker::new(fix).unwrap();
    let seen = broker.probe(&["celery"]).await.unwrap();
    let reasons: Vec<Reason> = seen.findings.iter().map(|f| f.reason).collect();
    assert_eq!(reasons, vec![Reason::EvictionPolicyFixed]);
    assert!(!seen.is_unsafe());
    assert_eq!(redis.cli(&["CONFIG", "GET", "maxmemory-policy"]).unwrap().lines().nth(1), Some("noeviction"));
    let again = broker.probe(&["celery"]).await.unwrap();
    assert!(again.findings.is_empty(), "{:?}", again.findings);
}

#[tokio::test]
async fn keys_evicted_between_probes_are_reported_as_task_loss() {
    let redis =
        RedisServer::builder().config("maxmemory 3mb").config("maxmemory-policy allkeys-random").start().unwrap();
    let broker = Broker::new(BrokerConfig::new(redis.url())).unwrap();
    let before = broker.probe(&["celery"]).await.unwrap();
    assert!(!before.findings.iter().any(|f| f.reason == Reason::KeysEvicted));
    // Fill Redis past maxmemory so it evicts.
    let fill = "import os, redis\nr = redis.Redis.from_url(os.environ['URL'])\n\
                p = r.pipeline(transaction=False)\n[p.set(f'k{i}', 'x' * 10240) for i in range(1000)]\np.execute()\n";
    e2e_harness::python::run_script(fill, &[("URL", &redis.url())]).unwrap();
    let after = broker.probe(&["celery"]).await.unwrap();
    let evicted = after.findings.iter().find(|f| f.reason == Reason::KeysEvicted).expect("evictions reported");
    assert_eq!(evicted.severity, Severity::Critical);
    assert!(after.info.evicted_keys.unwrap() > 0);
}

#[tokio::test]
async fn tls_redis_is_probed_with_a_custom_ca() {
    let redis = RedisServer::builder().tls().start().unwrap();
    let ca_path = redis.ca_cert_path().unwrap().to_owned();
    let ca = std::fs::read_to_string(&ca_path).unwrap();

    let with_ca = BrokerConfig { ca_cert_pem: Some(ca), ..BrokerConfig::new(redis.url()) };
    let seen = Broker::new(with_ca).unwrap().probe(&["celery"]).await.unwrap();
    assert_eq!(seen.info.version.as_deref().map(|v| v.starts_with('7')), Some(true));

    // Celery's own URL form names the CA file.
    let celery_form = format!("{}?ssl_cert_reqs=required&ssl_ca_certs={}", redis.url(), ca_path.display());
    Broker::new(BrokerConfig::new(celery_form)).unwrap().probe(&["celery"]).await.unwrap();

    // Without the CA the server is not trusted…
    let untrusted = Broker::new(BrokerConfig::new(redis.url())).unwrap();
    let err = untrusted.probe(&["celery"]).await.unwrap_err();
    assert!(matches!(err, ProbeError::Connect { .. } | ProbeError::Broker { .. }), "{err}");
    // …unless the user opted out of verification, as kombu allows.
    let insecure = format!("{}?ssl_cert_reqs=none", redis.url());
    Broker::new(BrokerConfig::new(insecure)).unwrap().probe(&["celery"]).await.unwrap();
}

#[tokio::test]
async fn errors_never_carry_the_password() {
    let redis = RedisServer::builder().password("s3cr3t-pw").start().unwrap();
    let wrong = format!("redis://:wr0ng-pw@127.0.0.1:{}/0", redis.port());
    let err = Broker::new(BrokerConfig::new(wrong.clone())).unwrap().probe(&["celery"]).await.unwrap_err();
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains("wr0ng-pw"), "{shown}");
    assert!(shown.contains("127.0.0.1"), "{shown}");

    let unreachable = format!("redis://user:s3cr3t-pw@127.0.0.1:{}/0", e2e_harness::free_port());
    let err = Broker::new(BrokerConfig::new(unreachable)).unwrap().probe(&["celery"]).await.unwrap_err();
    assert_eq!(err.metric_label(), "connect");
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");

    // The right password works, and nothing in the observation or report shows it.
    let report = audit(BrokerConfig::new(redis.url()), &["celery"]).await.unwrap();
    let shown = format!("{report} | {report:?} | {}", serde_json::to_string(&report).unwrap());
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    assert!(shown.contains(":***@127.0.0.1"), "{shown}");
}

#[tokio::test]
async fn a_user_without_scripting_still_gets_ready_counts() {
    let redis = RedisServer::builder().config("user limited on >pw ~* &* +@all -@scripting").start().unwrap();
    let url = format!("redis://limited:pw@127.0.0.1:{}/0", redis.port());
    redis.cli(&["LPUSH", "celery", "m1", "m2"]).unwrap();
    let broker = Broker::new(BrokerConfig::new(url)).unwrap();
    // The first poll learns that the scripts fail; later ones read the lengths in the pipeline.
    for _ in 0..2 {
        let seen = broker.probe(&["celery"]).await.unwrap();
        assert_eq!(seen.queues["celery"].ready, 2);
        assert_eq!((seen.queues["celery"].unacked, seen.queues["celery"].waiting), (None, None));
        let reasons: Vec<Reason> = seen.findings.iter().map(|f| f.reason).collect();
        assert!(reasons.contains(&Reason::UnackedUnavailable), "{reasons:?}");
        assert!(reasons.contains(&Reason::ListScanUnavailable), "{reasons:?}");
    }
}

#[tokio::test]
async fn the_probe_recovers_after_redis_restarts() {
    let mut redis = RedisServer::start().unwrap();
    let broker = Broker::new(BrokerConfig::new(redis.url())).unwrap();
    redis.cli(&["LPUSH", "celery", "m"]).unwrap();
    assert_eq!(broker.probe(&["celery"]).await.unwrap().queues["celery"].ready, 1);
    redis.kill();
    assert!(broker.probe(&["celery"]).await.is_err());
    redis.restart().unwrap();
    // The script cache is empty after a restart (NOSCRIPT is handled) and the data is gone.
    poll("the probe to reconnect", Duration::from_secs(20), || async {
        broker.probe(&["celery"]).await.map(|seen| seen.queues["celery"].ready)
    })
    .await;
    let seen = broker.probe(&["celery"]).await.unwrap();
    assert_eq!(seen.queues["celery"].ready, 0);
    assert_eq!(seen.queues["celery"].unacked, Some(0));
}

#[tokio::test]
async fn sentinel_urls_resolve_the_master_with_its_password() {
    let master = RedisServer::builder().password("m4ster-pw").start().unwrap();
    let sentinel = RedisServer::builder()
        .sentinel("celery-master", &master)
        .config("sentinel auth-pass celery-master m4ster-pw")
        .start()
        .unwrap();
    master.cli(&["LPUSH", "emails", "a", "b", "c"]).unwrap();
    // Celery's form: several Sentinels joined by `;`, the master's password in the URL; the first
    // one is down and skipped.
    let url = format!(
        "sentinel://:m4ster-pw@127.0.0.1:{};sentinel://:m4ster-pw@127.0.0.1:{}/0",
        e2e_harness::free_port(),
        sentinel.port()
    );
    let options = TransportOptions { master_name: Some("celery-master".into()), ..TransportOptions::default() };
    let broker = Broker::new(config(&url, &options)).unwrap();
    assert!(!broker.endpoint().contains("m4ster-pw"), "{}", broker.endpoint());
    let seen = broker.probe(&["emails"]).await.unwrap();
    assert_eq!(seen.queues["emails"].ready, 3);
    assert_eq!(seen.queues["emails"].unacked, Some(0));

    // The master moves (as after a failover): the probe fails once, then asks the Sentinel again.
    drop(master);
    let moved = RedisServer::builder().password("m4ster-pw").start().unwrap();
    moved.cli(&["LPUSH", "emails", "z"]).unwrap();
    let port = moved.port().to_string();
    sentinel.cli(&["SENTINEL", "REMOVE", "celery-master"]).unwrap();
    sentinel.cli(&["SENTINEL", "MONITOR", "celery-master", "127.0.0.1", &port, "1"]).unwrap();
    sentinel.cli(&["SENTINEL", "SET", "celery-master", "auth-pass", "m4ster-pw"]).unwrap();
    poll("the probe to follow the master", Duration::from_secs(20), || async {
        match broker.probe(&["emails"]).await {
            Ok(seen) if seen.queues["emails"].ready == 1 => Ok(()),
            other => Err(other.map(|seen| seen.queues)),
        }
    })
    .await;

    let err = Broker::new(config(&url, &TransportOptions::default())).unwrap_err();
    assert!(err.to_string().contains("master_name"), "{err}");
    assert!(!format!("{err:?}").contains("m4ster-pw"));
}

#[tokio::test]
async fn custom_steps_and_separator_count_as_kombu_and_unacked_follow_a_named_exchange() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let options = TransportOptions { priority_steps: vec![0, 5], separator: ":".into(), ..TransportOptions::default() };
    let transport = kombu_transport(&options);
    // Priorities 0..=9 over two lists: 0-4 in `reports`, 5-9 in `reports:5`.
    let plan = [("reports", 0, 2), ("reports", 3, 1), ("reports", 5, 4), ("reports", 9, 2)];
    let kombu = publish(app.path(), &url, &transport, &plan, &["reports"]);
    assert_eq!(kombu.sizes["reports"], 9);
    assert_eq!(kombu.lists.get("reports:5"), Some(&6), "{:?}", kombu.lists);
    let broker = Broker::new(config(&url, &options)).unwrap();
    assert_eq!(broker.probe(&["reports"]).await.unwrap().queues["reports"].ready, 9);
    // Kombu's defaults read the same keys wrong: 3 of 9.
    let defaults = Broker::new(config(&url, &TransportOptions::default())).unwrap();
    assert_eq!(defaults.probe(&["reports"]).await.unwrap().queues["reports"].ready, 3);

    // Tasks published through exchange `jobs` with routing key `jobs.work`, bound to queue `jobs`:
    // the unacked entries name the exchange, and only the binding table (members joined with the
    // separator) says which queue they came from.
    let declare = r#"[["jobs", "jobs", "jobs.work", null]]"#;
    let env = [
        ("BROKER", url.as_str()),
        ("CONTROL", url.as_str()),
        ("TRANSPORT", transport.as_str()),
        ("DECLARE", declare),
        ("EXCHANGE", "jobs"),
        ("ROUTING_KEY", "jobs.work"),
    ];
    send_blocking(app.path(), &env, "jobs", 6);
    let worker = start_worker(app.path(), &env, "jobs", 3);
    let seen = poll("the worker to hold 3 prefetched tasks", Duration::from_secs(60), || async {
        let seen = broker.probe(&["jobs"]).await.unwrap();
        let jobs = &seen.queues["jobs"];
        if jobs.unacked == Some(3) && jobs.ready == 2 { Ok(seen) } else { Err(seen.queues) }
    })
    .await;
    assert!(seen.findings.is_empty(), "{:?}", seen.findings);
    let members = redis.cli(&["SMEMBERS", "_kombu.binding.jobs"]).unwrap();
    assert!(members.contains("jobs.work::jobs"), "{members}");
    // With the default separator the same entries are credited to no queue.
    assert_eq!(defaults.probe(&["jobs"]).await.unwrap().queues["jobs"].unacked, Some(0));
    redis.cli(&["LPUSH", "release", "1", "1", "1", "1", "1", "1"]).unwrap();
    drop(worker);
}

/// Publishes `count` tasks to `queue`, declared by Celery with `Queue(expires=expires_seconds)`.
fn publish_to_expiring_queue(app_dir: &std::path::Path, url: &str, queue: &str, expires_seconds: u32, count: u32) {
    let declare = format!(r#"[["{queue}", "{queue}", "{queue}", {expires_seconds}]]"#);
    let env = [("BROKER", url), ("CONTROL", url), ("DECLARE", declare.as_str())];
    send_blocking(app_dir, &env, queue, count);
}

#[tokio::test]
async fn an_expiring_queue_is_flagged_and_critical_where_volatile_eviction_takes_it() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    publish_to_expiring_queue(app.path(), &redis.url(), "short-lived", 600, 5);
    assert!(redis.cli(&["PTTL", "short-lived"]).unwrap().trim().parse::<i64>().unwrap() > 0);
    let seen = Broker::new(BrokerConfig::new(redis.url())).unwrap().probe(&["short-lived", "celery"]).await.unwrap();
    assert_eq!(seen.queues["short-lived"].ready, 5);
    let found: Vec<_> = seen.findings.iter().map(|f| (f.reason, f.severity, f.queue.as_deref())).collect();
    assert_eq!(found, vec![(Reason::QueueExpires, Severity::Warning, Some("short-lived"))]);
    // Off checks nothing, not even TTLs.
    let off = BrokerConfig { safety: SafetyMode::Off, ..BrokerConfig::new(redis.url()) };
    assert!(Broker::new(off).unwrap().probe(&["short-lived"]).await.unwrap().findings.is_empty());

    // Under volatile-lru with a memory limit the same lists are the first keys Redis evicts.
    let volatile =
        RedisServer::builder().config("maxmemory 4mb").config("maxmemory-policy volatile-lru").start().unwrap();
    publish_to_expiring_queue(app.path(), &volatile.url(), "short-lived", 600, 5);
    let broker = Broker::new(BrokerConfig::new(volatile.url())).unwrap();
    let seen = broker.probe(&["short-lived"]).await.unwrap();
    let found: Vec<_> = seen.findings.iter().map(|f| (f.reason, f.severity)).collect();
    assert_eq!(
        found,
        vec![(Reason::EvictionPolicyVolatile, Severity::Info), (Reason::QueueExpires, Severity::Critical)]
    );
    // What the finding warns of: fill Redis with keys that have no TTL, and the queue is evicted.
    let fill = "import os, redis\nr = redis.Redis.from_url(os.environ['URL'])\n\
                try:\n    [r.set(f'k{i}', 'x' * 10240) for i in range(1000)]\nexcept redis.exceptions.OutOfMemoryError:\n    pass\n";
    e2e_harness::python::run_script(fill, &[("URL", &volatile.url())]).unwrap();
    let after = broker.probe(&["short-lived"]).await.unwrap();
    assert_eq!(after.queues["short-lived"].ready, 0, "the 5 tasks were evicted");
    assert!(after.findings.iter().any(|f| f.reason == Reason::KeysEvicted), "{:?}", after.findings);
}

#[tokio::test]
async fn queues_are_discovered_from_kombu_bindings_without_celerys_own() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let redis = RedisServer::start().unwrap();
    let options = TransportOptions { global_keyprefix: "svc:".into(), ..TransportOptions::default() };
    let transport = kombu_transport(&options);
    publish(app.path(), &redis.url(), &transport, &[("emails", 0, 2), ("reports", 9, 1)], &["emails"]);
    // A worker adds its mailbox (celery.pidbox) and event bindings; neither is a task queue.
    let url = redis.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", url.as_str()), ("TRANSPORT", transport.as_str())];
    let args = ["-A", "tasks", "worker", "-Q", "bulk", "-c", "1", "-E", "-l", "INFO"];
    let mut worker = e2e_harness::python::CeleryWorker::spawn(app.path(), &args, &env).unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(60)).unwrap();
    assert!(redis.cli(&["EXISTS", "svc:_kombu.binding.celery.pidbox"]).unwrap().trim() == "1");

    let broker = Broker::new(config(&url, &options)).unwrap();
    assert_eq!(broker.discover().await.unwrap(), vec!["bulk", "emails", "reports"]);
    let report = audit(config(&url, &options), &[]).await.unwrap();
    let ready: Vec<(&str, u64)> = report.observation.queues.iter().map(|(q, o)| (q.as_str(), o.ready)).collect();
    assert_eq!(ready, vec![("bulk", 0), ("emails", 2), ("reports", 1)]);
    // Another prefix sees none of them, and says so.
    let report = audit(BrokerConfig::new(url.clone()), &[]).await.unwrap();
    assert!(report.observation.queues.is_empty());
    assert_eq!(report.observation.findings.iter().map(|f| f.reason).collect::<Vec<_>>(), vec![Reason::NoQueuesFound]);
    drop(worker);
}

#[tokio::test]
async fn a_queue_the_broker_will_not_read_fails_alone() {
    let redis = RedisServer::builder().config("user limited on >pw ~emails* ~unacked* &* +@all").start().unwrap();
    redis.cli(&["LPUSH", "emails", "m1", "m2"]).unwrap();
    redis.cli(&["SET", "clash", "not a list"]).unwrap();
    let limited = format!("redis://limited:pw@127.0.0.1:{}/0", redis.port());
    // The waiting script fails as a whole on a forbidden key: the first poll tells which queue it
    // was, and from the second on the script walks the others (`waiting` is its count).
    let broker = Broker::new(BrokerConfig::new(limited)).unwrap();
    for poll in 0..2 {
        let seen = broker.probe(&["emails", "secret-queue"]).await.unwrap();
        assert_eq!(seen.queues["emails"].ready, 2);
        let forbidden: Vec<_> = seen.findings.iter().filter(|f| f.queue.as_deref() == Some("secret-queue")).collect();
        assert_eq!(forbidden.iter().map(|f| f.reason).collect::<Vec<_>>(), vec![Reason::QueueForbidden]);
        assert!(forbidden[0].message.to_ascii_uppercase().contains("NOPERM"), "{}", forbidden[0].message);
        assert!(!seen.findings.iter().any(|f| f.reason == Reason::ListScanUnavailable), "{:?}", seen.findings);
        assert_eq!(seen.queues["emails"].waiting, (poll > 0).then_some(2), "poll {poll}");
    }

    // A key of another type aborts the script the same way.
    let broker = Broker::new(BrokerConfig::new(redis.url())).unwrap();
    for poll in 0..2 {
        let seen = broker.probe(&["clash", "emails"]).await.unwrap();
        assert_eq!(seen.queues["emails"].ready, 2);
        let clash: Vec<_> =
            seen.findings.iter().filter(|f| f.queue.as_deref() == Some("clash")).map(|f| f.reason).collect();
        assert_eq!(clash, vec![Reason::QueueUnreadable]);
        assert_eq!(seen.queues["emails"].waiting, (poll > 0).then_some(2), "poll {poll}");
    }
    // Once the key is a list again, the script reads it too.
    redis.cli(&["DEL", "clash"]).unwrap();
    redis.cli(&["LPUSH", "clash", "m"]).unwrap();
    for poll in 0..2 {
        let seen = broker.probe(&["clash", "emails"]).await.unwrap();
        assert!(seen.findings.iter().all(|f| f.queue.is_none()), "{:?}", seen.findings);
        assert_eq!(seen.queues["clash"].ready, 1);
        assert_eq!(seen.queues["clash"].waiting, (poll > 0).then_some(1), "poll {poll}");
    }
}
