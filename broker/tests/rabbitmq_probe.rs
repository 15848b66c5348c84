//! The RabbitMQ probe against a real private RabbitMQ node (management plugin on), with tasks
//! published and consumed by real Celery. The node is shared by the tests of this binary; every
//! test uses its own queue names.

mod common;

use std::time::Duration;

use celery_broker::{Broker, BrokerConfig, BrokerObservation, ProbeError, Reason, SafetyMode, Severity};
use common::{poll, publish, send_blocking, start_worker, write_app};
use e2e_harness::python;
use e2e_harness::{RabbitServer, RedisServer};

fn rabbit() -> &'static RabbitServer {
    RabbitServer::shared().expect("private RabbitMQ node")
}

fn with_management(rabbit: &RabbitServer, amqp_url: String) -> BrokerConfig {
    BrokerConfig { management_url: Some(rabbit.management_url().into()), ..BrokerConfig::new(amqp_url) }
}

/// `GET` on the management API as the test's own ground truth.
async fn management_status(rabbit: &RabbitServer, path: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}{path}", rabbit.management_port()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .status()
}

/// Declares a durable queue with `arguments` (JSON) through kombu, as an application would.
fn declare(amqp_url: &str, queue: &str, arguments: &str) {
    let code = r#"
import json, os
from kombu import Connection
with Connection(os.environ["URL"]) as conn:
    conn.default_channel.queue_declare(
        queue=os.environ["QUEUE"], durable=True, auto_delete=False,
        arguments=json.loads(os.environ["ARGS"]))
"#;
    python::run_script(code, &[("URL", amqp_url), ("QUEUE", queue), ("ARGS", arguments)]).unwrap();
}

fn reasons_for(seen: &BrokerObservation, queue: &str) -> Vec<Reason> {
    seen.findings.iter().filter(|f| f.queue.as_deref() == Some(queue)).map(|f| f.reason).collect()
}

#[tokio::test]
async fn ready_consumers_and_unacked_match_rabbitmq() {
    let rabbit = rabbit();
    let control = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let url = rabbit.amqp_url();
    let (idle, busy) = ("rq-ready-idle", "rq-ready-busy");

    let kombu = publish(app.path(), &url, "{}", &[(idle, 0, 5), (idle, 7, 2)], &[idle]);
    assert_eq!(kombu.sizes[idle], 7);

    let control_url = control.url();
    let env = vec![("BROKER", url.as_str()), ("CONTROL", control_url.as_str())];
    let worker = start_worker(app.path(), &env, busy, 2);
    send_blocking(app.path(), &env, busy, 4);

    let broker = Broker::new(with_management(rabbit, url.clone())).unwrap();
    // One task runs (acked at start), two are prefetched (unacked), one waits.
    let seen = poll("the worker to hold 2 prefetched tasks", Duration::from_secs(30), || async {
        let seen = broker.probe(&[idle, busy]).await.unwrap();
        let b = &seen.queues[busy];
        if b.consumers == Some(1) && b.ready == 1 && b.unacked == Some(2) { Ok(seen) } else { Err(seen.queues) }
    })
    .await;
    let idle_seen = &seen.queues[idle];
    assert_eq!(idle_seen.ready, kombu.sizes[idle]);
    assert_eq!(idle_seen.consumers, Some(0));
    assert_eq!(idle_seen.unacked, Some(0));
    assert!(seen.findings.is_empty(), "{:?}", seen.findings);
    assert!(seen.info.version.as_deref().is_some_and(|v| v.starts_with("3.")));

    // Without the management API: the same real-time counts, unacked unknown.
    let plain = Broker::new(BrokerConfig::new(url)).unwrap();
    let seen = plain.probe(&[idle, busy]).await.unwrap();
    assert_eq!(seen.queues[idle].ready, 7);
    assert_eq!(seen.queues[busy].consumers, Some(1));
    assert_eq!(seen.queues[busy].unacked, None);

    control.cli(&["LPUSH", "release", "1", "1", "1", "1"]).unwrap();
    drop(worker);
}

#[tokio::test]
async fn a_missing_queue_is_reported_and_not_created() {
    let rabbit = rabbit();
    let url = rabbit.amqp_url();
    let (missing, present) = ("rq-missing-nowhere", "rq-missing-present");
    declare(&url, present, "{}");
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    publish(app.path(), &url, "{}", &[(present, 0, 3)], &[present]);

    let broker = Broker::new(with_management(rabbit, url)).unwrap();
    // The missing queue first: its 404 closes the channel, the next queue is still read.
    let seen = broker.probe(&[missing, present, missing]).await.unwrap();
    assert_eq!(seen.queues[present].ready, 3);
    assert_eq!(seen.queues[missing].ready, 0);
    assert_eq!(seen.queues[missing].consumers, Some(0));
    // Asked twice, reported once.
    assert_eq!(reasons_for(&seen, missing), vec![Reason::QueueMissing]);
    assert!(seen.is_unsafe());
    // The probe keeps working on the same connection afterwards.
    assert_eq!(broker.probe(&[present]).await.unwrap().queues[present].ready, 3);

    let path = format!("/api/queues/%2F/{missing}");
    assert_eq!(management_status(rabbit, &path).await, reqwest::StatusCode::NOT_FOUND);
    let path = format!("/api/queues/%2F/{present}");
    assert_eq!(management_status(rabbit, &path).await, reqwest::StatusCode::OK);
}

#[tokio::test]
async fn queues_that_silently_drop_tasks_are_flagged() {
    let rabbit = rabbit();
    let url = rabbit.amqp_url();
    let (drop_head, dead_lettered, by_policy, plain) =
        ("rq-drop-head", "rq-drop-dlx", "rq-drop-ttl-policy", "rq-drop-plain");
    declare(&url, drop_head, r#"{"x-max-length": 10}"#);
    declare(&url, dead_lettered, r#"{"x-max-length": 10, "x-dead-letter-exchange": "dlx"}"#);
    declare(&url, by_policy, "{}");
    declare(&url, plain, "{}");
    rabbit
        .ctl(&["set_policy", "drop-ttl", "^rq-drop-ttl-", r#"{"message-ttl": 60000}"#, "--apply-to", "queues"])
        .unwrap();

    let broker = Broker::new(with_management(rabbit, url.clone())).unwrap();
    let queues = [drop_head, dead_lettered, by_policy, plain];
    let seen = poll("the policy to take effect", Duration::from_secs(30), || async {
        let seen = broker.probe(&queues).await.unwrap();
        if reasons_for(&seen, by_policy).is_empty() { Err(seen.findings) } else { Ok(seen) }
    })
    .await;
    assert_eq!(reasons_for(&seen, drop_head), vec![Reason::MaxLengthDropHead]);
    assert_eq!(reasons_for(&seen, by_policy), vec![Reason::MessageTtlWithoutDlx]);
    assert_eq!(reasons_for(&seen, dead_lettered), vec![]);
    assert_eq!(reasons_for(&seen, plain), vec![]);
    let message = &seen.findings.iter().find(|f| f.queue.as_deref() == Some(drop_head)).unwrap();
    assert!(message.message.contains("max-length 10"), "{}", message.message);

    let off = BrokerConfig { safety: SafetyMode::Off, ..with_management(rabbit, url) };
    let seen = Broker::new(off).unwrap().probe(&queues).await.unwrap();
    assert!(seen.findings.is_empty(), "{:?}", seen.findings);
}

#[tokio::test]
async fn vhosts_are_kept_apart_in_amqp_and_management_paths() {
    let rabbit = rabbit();
    let vhost = "team/a b";
    rabbit.add_vhost(vhost).unwrap();
    let in_vhost = rabbit.amqp_url_for_vhost(vhost);
    let queue = "rq-vhost-q";
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    publish(app.path(), &in_vhost, "{}", &[(queue, 0, 2)], &[queue]);
    publish(app.path(), &rabbit.amqp_url(), "{}", &[(queue, 0, 5)], &[queue]);

    let broker = Broker::new(with_management(rabbit, in_vhost)).unwrap();
    // Found by the management API under the encoded vhost path, else unacked stays unknown.
    let seen = poll("management statistics of the queue", Duration::from_secs(30), || async {
        let seen = broker.probe(&[queue]).await.unwrap();
        if seen.queues[queue].unacked == Some(0) { Ok(seen) } else { Err(seen) }
    })
    .await;
    assert_eq!(seen.queues[queue].ready, 2);
    assert!(seen.findings.is_empty(), "{:?}", seen.findings);
    let default = Broker::new(BrokerConfig::new(rabbit.amqp_url())).unwrap();
    assert_eq!(default.probe(&[queue]).await.unwrap().queues[queue].ready, 5);
}

#[tokio::test]
async fn rabbitmq_errors_never_carry_the_password() {
    let rabbit = rabbit();
    let wrong = format!("amqp://guest:n0t-the-pw@127.0.0.1:{}/%2F", rabbit.amqp_port());
    let err = Broker::new(BrokerConfig::new(wrong)).unwrap().probe(&["celery"]).await.unwrap_err();
    assert!(matches!(err, ProbeError::Connect { .. }), "{err:?}");
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains("n0t-the-pw"), "{shown}");

    // A management API that refuses the credentials degrades to a finding, password-free.
    let queue = "rq-err-q";
    declare(&rabbit.amqp_url(), queue, "{}");
    let config = BrokerConfig {
        management_url: Some(format!("http://guest:m4nagement-pw@127.0.0.1:{}", rabbit.management_port()).into()),
        ..BrokerConfig::new(rabbit.amqp_url())
    };
    let seen = Broker::new(config).unwrap().probe(&[queue]).await.unwrap();
    let finding = seen.findings.iter().find(|f| f.reason == Reason::ManagementUnavailable).expect("management finding");
    assert!(finding.message.contains("401"), "{}", finding.message);
    assert!(!finding.message.contains("m4nagement-pw"), "{}", finding.message);
    assert_eq!(seen.queues[queue].unacked, None);
}

#[tokio::test]
async fn amqps_is_probed_with_a_custom_ca() {
    let rabbit = rabbit();
    let queue = "rq-tls-q";
    declare(&rabbit.amqp_url(), queue, "{}");
    let ca = std::fs::read_to_string(rabbit.ca_cert_path()).unwrap();
    let trusted = BrokerConfig { ca_cert_pem: Some(ca), ..BrokerConfig::new(rabbit.amqps_url()) };
    let seen = Broker::new(trusted).unwrap().probe(&[queue]).await.unwrap();
    assert_eq!(seen.queues[queue].consumers, Some(0));

    // The public web PKI does not vouch for the test CA.
    let untrusted = Broker::new(BrokerConfig::new(rabbit.amqps_url())).unwrap();
    let err = untrusted.probe(&[queue]).await.unwrap_err();
    assert!(matches!(err, ProbeError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn an_exclusive_celery_mailbox_is_a_finding_and_the_other_queues_are_still_read() {
    let rabbit = rabbit();
    let control = RedisServer::start().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let url = rabbit.amqp_url();
    let (tasks, missing) = ("rq-mailbox-tasks", "rq-mailbox-missing");
    publish(app.path(), &url, "{}", &[(tasks, 0, 3)], &[tasks]);
    // A real worker owns its remote-control mailbox exclusively (Celery's control_queue_exclusive).
    let control_url = control.url();
    let env = [("BROKER", url.as_str()), ("CONTROL", control_url.as_str())];
    let args = ["-A", "tasks", "worker", "-Q", "rq-mailbox-other", "-c", "1", "-n", "mailbox@probe", "-l", "INFO"];
    let mut worker = python::CeleryWorker::spawn(app.path(), &args, &env).unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(60)).unwrap();
    let mailbox = "mailbox@probe.celery.pidbox";

    let broker = Broker::new(with_management(rabbit, url)).unwrap();
    // The mailbox first: RESOURCE_LOCKED closes the channel, the next queues are still read.
    let seen = broker.probe(&[mailbox, tasks, missing]).await.expect("a locked queue does not fail the probe");
    assert_eq!(seen.queues[tasks].ready, 3);
    assert_eq!(reasons_for(&seen, missing), vec![Reason::QueueMissing]);
    let locked: Vec<_> = seen.findings.iter().filter(|f| f.queue.as_deref() == Some(mailbox)).collect();
    assert_eq!(locked.len(), 1, "{:?}", seen.findings);
    assert_eq!((locked[0].reason, locked[0].severity), (Reason::QueueExclusive, Severity::Info));
    // Celery's own mailbox is no reason to call the broker unsafe; the missing queue is.
    assert!(seen.findings.iter().filter(|f| f.queue.as_deref() != Some(missing)).all(|f| f.severity == Severity::Info));

    // Discovery lists the task queues, not Celery's mailboxes and event queues.
    let discovered = poll("the management API to list the queues", Duration::from_secs(30), || async {
        let found = broker.discover().await.unwrap();
        if found.iter().any(|q| q == tasks) && found.iter().any(|q| q == "rq-mailbox-other") {
            Ok(found)
        } else {
            Err(found)
        }
    })
    .await;
    assert!(discovered.iter().all(|q| !q.ends_with(".pidbox") && !q.starts_with("celeryev.")), "{discovered:?}");
    drop(worker);
}

#[tokio::test]
async fn without_the_management_api_the_drop_policies_are_reported_unchecked() {
    let rabbit = rabbit();
    let url = rabbit.amqp_url();
    let queue = "rq-unchecked-q";
    declare(&url, queue, r#"{"x-max-length": 10}"#);
    let seen = Broker::new(BrokerConfig::new(url.clone())).unwrap().probe(&[queue]).await.unwrap();
    let reasons: Vec<Reason> = seen.findings.iter().map(|f| f.reason).collect();
    assert_eq!(reasons, vec![Reason::ManagementUnavailable]);
    assert!(seen.is_unsafe(), "an unchecked broker is not called safe");
    // AMQP cannot list queues: discovery needs the management API.
    let err = Broker::new(BrokerConfig::new(url)).unwrap().discover().await.unwrap_err();
    assert!(matches!(err, ProbeError::Management { .. }), "{err:?}");
}
