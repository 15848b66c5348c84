//! Shared by the integration tests: real Celery publishing, kombu's own counts, async polling.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use celery_broker::TransportOptions;
use e2e_harness::python::{self, CeleryWorker};

/// A Celery app module: `tasks.block` waits on the Redis list `release` (in `CONTROL`, a plain
/// Redis URL) so a worker can be held mid-task; `tasks.noop` does nothing. `DECLARE` (JSON
/// `[[queue, exchange, routing_key, expires_seconds_or_null], ...]`) sets `task_queues`.
pub const TASKS_PY: &str = r#"
import json, os
from celery import Celery
from kombu import Exchange, Queue

app = Celery("tasks", broker=os.environ["BROKER"])
app.conf.broker_transport_options = json.loads(os.environ.get("TRANSPORT", "{}"))
app.conf.broker_connection_retry_on_startup = True
if os.environ.get("DECLARE"):
    app.conf.task_queues = [Queue(q, Exchange(ex), routing_key=rk, expires=expires)
                            for q, ex, rk, expires in json.loads(os.environ["DECLARE"])]

@app.task(name="tasks.block")
def block():
    import redis
    redis.Redis.from_url(os.environ["CONTROL"]).blpop("release", timeout=120)

@app.task(name="tasks.noop")
def noop():
    pass
"#;

/// Python run after a test script imports its app: its sends wait for the broker's publisher
/// confirms (py-amqp; the Redis transport ignores the option). The scripts exit without closing
/// their connection, and RabbitMQ drops publishes it has not processed when a client goes away
/// like that: under load, 4 of 5 `countdown` tasks never reached the delayed-delivery queues (and
/// ~9 % of 9,000 publishes from 18 such processes were lost in a scratch run; none with confirms).
const CONFIRM_SENDS: &str =
    "app.conf.broker_transport_options = {**app.conf.broker_transport_options, 'confirm_publish': True}\n";

/// Publishes with real Celery (`plan`: queue, priority, count) and returns kombu's own ready count
/// of every queue in `queues` — `ch._size(queue)` on `app.connection_for_write().default_channel`
/// for Redis, a passive `queue_declare` for AMQP.
const PUBLISH_PY: &str = r#"
import json, os, sys
sys.path.insert(0, os.environ["APP_DIR"])
from tasks import app
"#;

/// The rest of [`PUBLISH_PY`], run after [`CONFIRM_SENDS`].
const PUBLISH_PY_SENDS: &str = r#"
for queue, priority, count in json.loads(os.environ["PLAN"]):
    for _ in range(count):
        app.send_task("tasks.noop", queue=queue, priority=priority)

with app.connection_for_write() as conn:
    ch = conn.default_channel
    queues = json.loads(os.environ["QUEUES"])
    if conn.transport.driver_type == "redis":
        sizes = {q: ch._size(q) for q in queues}
        lists = {k.decode("latin-1"): ch.client.llen(k) for k in ch.client.keys("*")
                 if ch.client.type(k) == b"list"}
    else:
        sizes = {q: ch.queue_declare(q, passive=True).message_count for q in queues}
        lists = {}
print(json.dumps({"sizes": sizes, "lists": lists}))
"#;

/// Kombu's `broker_transport_options` for `options`, as JSON.
pub fn kombu_transport(options: &TransportOptions) -> String {
    serde_json::json!({
        "global_keyprefix": options.global_keyprefix,
        "priority_steps": options.priority_steps,
        "sep": options.separator,
        "visibility_timeout": options.visibility_timeout.as_secs(),
    })
    .to_string()
}

/// Writes the Celery app into `dir`.
pub fn write_app(dir: &Path) {
    std::fs::write(dir.join("tasks.py"), TASKS_PY).unwrap();
}

/// What kombu sees after a publish: its own count per queue, and every Redis list with its length
/// (raw key names, prefix included).
pub struct KombuView {
    pub sizes: BTreeMap<String, u64>,
    pub lists: BTreeMap<String, u64>,
}

pub fn publish(app_dir: &Path, broker: &str, transport: &str, plan: &[(&str, u8, u32)], queues: &[&str]) -> KombuView {
    let plan = serde_json::to_string(plan).unwrap();
    let queues = serde_json::to_string(queues).unwrap();
    let out = python::run_script(
        &format!("{PUBLISH_PY}{CONFIRM_SENDS}{PUBLISH_PY_SENDS}"),
        &[
            ("APP_DIR", &app_dir.to_string_lossy()),
            ("BROKER", broker),
            ("TRANSPORT", transport),
            ("PLAN", &plan),
            ("QUEUES", &queues),
        ],
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let map =
        |v: &serde_json::Value| v.as_object().unwrap().iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap())).collect();
    KombuView { sizes: map(&json["sizes"]), lists: map(&json["lists"]) }
}

/// Sends `count` `tasks.block` tasks to `queue` with real Celery (`env` names BROKER, TRANSPORT, and
/// optionally EXCHANGE and ROUTING_KEY to publish through a named exchange, and DECLARE).
pub fn send_blocking(app_dir: &Path, env: &[(&str, &str)], queue: &str, count: u32) {
    let code = "import os, sys\nsys.path.insert(0, os.environ['APP_DIR'])\nfrom tasks import app\n";
    let code = format!(
        "{code}{CONFIRM_SENDS}\
                [app.send_task('tasks.block', queue=os.environ['Q'], exchange=os.environ.get('EXCHANGE'), \
                routing_key=os.environ.get('ROUTING_KEY')) for _ in range(int(os.environ['N']))]\n"
    );
    let (dir, n) = (app_dir.to_string_lossy(), count.to_string());
    let mut env = env.to_vec();
    env.extend([("APP_DIR", dir.as_ref()), ("Q", queue), ("N", n.as_str())]);
    python::run_script(&code, &env).unwrap();
}

/// Sends `count` `tasks.noop` to `queue` with `countdown` seconds (0: none) through real Celery,
/// with the app of module `module` in `app_dir` (`env` names its broker); returns the Unix times
/// just before and just after the sends.
pub fn send_noop(
    app_dir: &Path,
    module: &str,
    env: &[(&str, &str)],
    queue: &str,
    count: u32,
    countdown: u32,
) -> (f64, f64) {
    let code = "import importlib, os, sys, time\nsys.path.insert(0, os.environ['APP_DIR'])\n\
                app = importlib.import_module(os.environ['MODULE']).app\n";
    let code = format!(
        "{code}{CONFIRM_SENDS}c = int(os.environ['COUNTDOWN']) or None\nbefore = time.time()\n\
                [app.send_task('tasks.noop', queue=os.environ['Q'], countdown=c) for _ in range(int(os.environ['N']))]\n\
                print(before, time.time())\n"
    );
    let (dir, n, c) = (app_dir.to_string_lossy(), count.to_string(), countdown.to_string());
    let mut env = env.to_vec();
    env.extend([
        ("APP_DIR", dir.as_ref()),
        ("MODULE", module),
        ("Q", queue),
        ("N", n.as_str()),
        ("COUNTDOWN", c.as_str()),
    ]);
    let out = python::run_script(&code, &env).unwrap();
    let times: Vec<f64> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    (times[0], times[1])
}

/// Takes the message at the head of `queue` off the broker at `url`, as a kombu consumer does.
pub fn pop_one(url: &str, queue: &str) {
    let code = "import os\nfrom kombu import Connection\n\
                with Connection(os.environ['URL']) as c:\n    m = c.default_channel.basic_get(os.environ['Q'], no_ack=True)\n    assert m is not None\n";
    python::run_script(code, &[("URL", url), ("Q", queue)]).unwrap();
}

/// A real Celery worker consuming `queue` with one process and `--prefetch-multiplier prefetch`
/// (`env` names BROKER, CONTROL and TRANSPORT), returned once it consumes.
pub fn start_worker(app_dir: &Path, env: &[(&str, &str)], queue: &str, prefetch: u32) -> CeleryWorker {
    let prefetch = prefetch.to_string();
    let args = [
        "-A",
        "tasks",
        "worker",
        "-Q",
        queue,
        "-c",
        "1",
        "--prefetch-multiplier",
        &prefetch,
        "-l",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ];
    let mut worker = CeleryWorker::spawn(app_dir, &args, env).unwrap();
    worker.wait_for_log("ready.", Duration::from_secs(60)).unwrap();
    worker
}

/// Polls `check` until it yields `Some`, panicking with `what` and the last value seen after
/// `timeout`. Never a fixed sleep: it returns as soon as the condition holds.
pub async fn poll<T, D: std::fmt::Debug, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, D>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; last: {last:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
