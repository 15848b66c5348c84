//! End-to-end scenarios: the real operator binary, real Celery workers and a real Redis, against the
//! control-plane double with the pod runner (`celery_e2e::stack::Stack`), or against a real cluster
//! when `E2E_KUBECONFIG` is set (see e2e/README.md). Checks that need the local runner (processes,
//! the double's request log) become API-level checks on a cluster; each scenario says where.

use std::collections::BTreeMap;
use std::time::Duration;

use celery_e2e::stack::{self, DEADLINE, Pods, Stack, StackConfig, StackError, examples_dir};
use celery_operator::reconcile::taskqueue::DEPTH_WRITE_INTERVAL;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams};
use serde_json::{Value, json};

const OPERATOR: &str = env!("CARGO_BIN_EXE_celery-operator");

/// Starts a stack, or `None` (with a NOTICE) when the Celery venv cannot be built here (no PyPI).
async fn start(config: StackConfig) -> Option<Stack> {
    match Stack::start(config).await {
        Ok(stack) => Some(stack),
        Err(StackError::Runner(e)) => {
            eprintln!("NOTICE: skipping the scenario: {e}");
            None
        }
        Err(e) => panic!("the e2e stack did not start: {e}"),
    }
}

fn config(pods: Pods) -> StackConfig {
    StackConfig { pods, ..StackConfig::with_operator(OPERATOR) }
}

/// Polls `check` (every 50 ms) until it returns `Some`, failing after [`DEADLINE`] with `what`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An object of the stack's namespace as JSON, by apiVersion/kind/name.
async fn get(stack: &Stack, api_version: &str, kind: &str, name: &str) -> Option<Value> {
    let (resource, _) = stack.resource_of(&json!({"apiVersion": api_version, "kind": kind})).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &resource);
    api.get_opt(name).await.unwrap().map(|o| serde_json::to_value(o).unwrap())
}

async fn pool(stack: &Stack, name: &str) -> Option<Value> {
    get(stack, "celery-operator.dev/v1alpha1", "WorkerPool", name).await
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

fn is_true(obj: &Value, type_: &str) -> bool {
    condition(obj, type_).is_some_and(|c| c["status"] == "True")
}

fn deployments(stack: &Stack) -> Api<Deployment> {
    Api::namespaced(stack.client(), stack.namespace())
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn selector(pool: &str, component: &str) -> String {
    format!("app.kubernetes.io/name=celery,app.kubernetes.io/instance={pool},app.kubernetes.io/component={component}")
}

/// Ready pods of a pool's component that are not terminating.
async fn ready_pods(stack: &Stack, pool: &str, component: &str) -> Vec<Pod> {
    let pods = stack.pods(&selector(pool, component)).await.unwrap();
    pods.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p)).collect()
}

/// The examples' Secret and TaskQueues (emails, default → Celery queue `celery`) on the stack's Redis.
async fn apply_queues(stack: &Stack) {
    stack.apply_file(examples_dir().join("redis-queues.yaml")).await.expect("queues apply");
}

/// A fixed-size pool (no autoscaling) of the example app.
fn fixed_pool(name: &str, queues: &[&str], replicas: i32, beat: bool) -> String {
    json!({
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": name},
        "spec": {"app": "celery_example.app", "image": "ghcr.io/celery-operator/worker-example:0.1.0",
            "queues": queues, "concurrency": 1, "replicas": replicas, "beat": {"enabled": beat}},
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------

/// examples/ (the Redis ones) → worker and beat Deployments; the pods run real Celery workers that
/// consume real tasks sent to both queues, and beat's ticks reach them. The broker password stays
/// in Secrets and pods' environments: it is in no other object, no Event, no operator or pod log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_run_celery_workers_that_consume_both_queues() {
    let Some(stack) = start(config(Pods::Celery)).await else { return };
    apply_queues(&stack).await;
    // As written: autoscaled 0..20. Before the autoscaler runs, the Deployment has Kubernetes'
    // default of one replica; with it, the backlog below scales the pool up from zero.
    stack.apply_file(examples_dir().join("mail-pool.yaml")).await.expect("pool applies");
    let api = deployments(&stack);
    for name in ["mail-worker", "mail-beat"] {
        eventually(&format!("Deployment {name}"), || async { api.get_opt(name).await.unwrap() }).await;
    }

    let tasks = [
        ("celery_example.sleep", json!([0]), "emails"),
        ("celery_example.sleep", json!([0]), "celery"),
        ("celery_example.add", json!([2, 3]), "emails"),
        ("celery_example.add", json!([40, 2]), "celery"),
    ];
    let ids = stack.send_tasks(&tasks).await.expect("tasks sent");
    let results = stack.wait_results(&ids, DEADLINE).await.expect("every task finishes");
    assert!(results.iter().all(|r| r.state == "SUCCESS"), "{results:?}");
    assert_eq!((results[2].result.clone(), results[3].result.clone()), (json!(5), json!(42)));

    // The workers that ran them are the pool's pods: named after them, and (with the runner) in
    // the process group of one of their containers.
    let workers = stack.pods(&selector("mail", "worker")).await.unwrap();
    let names: Vec<String> = workers.iter().filter_map(|p| p.metadata.name.clone()).collect();
    for r in &results[..2] {
        let host = r.hostname().expect("sleep reports its worker");
        assert!(names.iter().any(|n| host == format!("mail@{n}")), "{host} is not one of {names:?}");
        if let Some(runner) = stack.runner() {
            let pod = host.trim_start_matches("mail@");
            let leaders = runner.pids(stack.namespace(), pod);
            let group = stack::process_group(r.pid().unwrap());
            assert!(group.is_some_and(|g| leaders.contains(&g)), "pid {:?} is not in pod {pod}'s processes", r.pid());
        }
    }

    // Beat runs and its periodic tick (to the `celery` queue, every 5 s) is executed by a worker.
    let pods: Api<Pod> = Api::namespaced(stack.client(), stack.namespace());
    eventually("a worker to run beat's tick", || async {
        for name in
            stack.pods(&selector("mail", "worker")).await.unwrap().iter().filter_map(|p| p.metadata.name.clone())
        {
            let log = pods.logs(&name, &LogParams::default()).await.unwrap_or_default();
            if log.contains("celery_example.tick") && log.contains("succeeded") {
                return Some(());
            }
        }
        None
    })
    .await;
    assert_eq!(ready_pods(&stack, "mail", "beat").await.len(), 1);

    // Secrets flow by reference only.
    let password = stack.broker_password();
    assert!(!password.is_empty());
    assert!(!stack.operator_log().contains(&password), "the operator logged the broker password");
    let mut leaks = Vec::new();
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("v1", "Pod"),
        ("v1", "Event"),
        ("events.k8s.io/v1", "Event"),
        ("celery-operator.dev/v1alpha1", "WorkerPool"),
        ("celery-operator.dev/v1alpha1", "TaskQueue"),
    ] {
        let (resource, _) = stack.resource_of(&json!({"apiVersion": api_version, "kind": kind})).await.unwrap();
        let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &resource);
        for obj in api.list(&ListParams::default()).await.unwrap() {
            if serde_json::to_string(&obj).unwrap().contains(&password) {
                leaks.push(format!("{kind} {}", obj.metadata.name.unwrap_or_default()));
            }
        }
    }
    for name in
        stack.pods("app.kubernetes.io/instance=mail").await.unwrap().iter().filter_map(|p| p.metadata.name.clone())
    {
        if pods.logs(&name, &LogParams::default()).await.unwrap_or_default().contains(&password) {
            leaks.push(format!("log of pod {name}"));
        }
    }
    assert!(leaks.is_empty(), "the broker password leaked into: {leaks:?}");
}

/// A stack running pool `clock` with beat and no workers; samplers of its beat schedulers and of
/// its beat processes, both started before the pool was applied; the first scheduler.
async fn beat_stack() -> Option<(Stack, stack::Sampler, stack::Sampler, Vec<String>)> {
    let stack = start(config(Pods::Celery)).await?;
    let schedulers = stack.sample_beat("clock");
    let processes = stack.sample_beat_processes("clock");
    apply_queues(&stack).await;
    // No workers: these scenarios are about beat only (and leave the CPU to it).
    stack.apply_yaml(&fixed_pool("clock", &["default"], 0, true)).await.expect("pool applies");
    let first = eventually("one running beat scheduler", || async {
        let report = schedulers.report();
        (report.last == 1).then(|| report.changes.last().unwrap().1.clone())
    })
    .await;
    // A scale-in removes unready pods first: until the scheduler's pod is Ready, a hand scale may
    // remove it rather than the new, waiting ones (as a ReplicaSet would). Start from a Ready beat.
    eventually("the beat pod to be Ready", || async {
        let pods = stack.pods(&selector("clock", "beat")).await.unwrap();
        (pods.len() == 1 && pods.iter().all(pod_ready)).then_some(())
    })
    .await;
    Some((stack, schedulers, processes, first))
}

/// `kubectl scale deploy clock-beat --replicas N`.
async fn scale_beat(stack: &Stack, replicas: i32) {
    let api = deployments(stack);
    // The double answers a scale patch with 409 when the Deployment changed between its read and
    // its write (the runner writes status); a real API server retries such a patch itself.
    eventually("the scale patch to go through", || async {
        let scale = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        match api.patch_scale("clock-beat", &PatchParams::default(), &scale).await {
            Ok(_) => Some(()),
            Err(kube::Error::Api(status)) if status.code == 409 => None,
            Err(e) => panic!("scale subresource: {e}"),
        }
    })
    .await;
}

/// Waits until the operator has set the beat Deployment back to 1 and a single beat pod is left.
async fn beat_back_to_one(stack: &Stack) {
    let api = deployments(stack);
    eventually("the operator to scale beat back to 1", || async {
        let d = api.get("clock-beat").await.unwrap();
        (d.spec.unwrap().replicas == Some(1)).then_some(())
    })
    .await;
    eventually("a single beat pod", || async {
        let pods = stack.pods(&selector("clock", "beat")).await.unwrap();
        (pods.len() == 1 && pods.iter().all(pod_ready)).then_some(())
    })
    .await;
}

async fn pod_log(stack: &Stack, pod: &Pod) -> String {
    let pods: Api<Pod> = Api::namespaced(stack.client(), stack.namespace());
    pods.logs(pod.metadata.name.as_deref().unwrap(), &LogParams::default()).await.unwrap_or_default()
}

/// Beat under hand scaling and a rollout, observed at the process level: one sampler counts the
/// pool's beat schedulers (processes holding the beat schedule open) every 5 ms for the whole
/// scenario. Scaled to 3 by hand, the beat Deployment goes back to 1 and the first scheduler is
/// still the only one; then a template change rolls it (Recreate: the old beat releases the beat
/// lock on SIGTERM, the new one takes it), and beat comes back as a new process with the new
/// environment. At no sample do two schedulers run. On a real cluster the sampler counts Ready
/// beat pods instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_returns_to_one_after_hand_scaling_and_never_doubles_in_a_rollout() {
    let Some((stack, sampler, processes, first)) = beat_stack().await else { return };
    scale_beat(&stack, 3).await;
    beat_back_to_one(&stack).await;
    eventually("one beat process after the hand scale", || async { (processes.report().last == 1).then_some(()) })
        .await;
    let scaled = sampler.report();
    assert_eq!(scaled.changes.last().unwrap().1, first, "the hand scale replaced the scheduler: {scaled:?}");

    let old_pod = stack.pods(&selector("clock", "beat")).await.unwrap().remove(0);
    let rollout = fixed_pool("clock", &["default"], 0, true);
    stack
        .apply_yaml_with(&rollout, |doc| {
            doc["spec"]["template"]["env"].as_array_mut().unwrap().push(json!({"name": "E2E_ROLLOUT", "value": "2"}));
        })
        .await
        .expect("pool changes");
    let rolled = eventually("a beat of the new template", || async {
        let pods = stack.pods(&selector("clock", "beat")).await.unwrap();
        let new_template = pods.iter().all(|p| {
            p.spec.as_ref().unwrap().containers[0].env.iter().flatten().any(|e| e.name == "E2E_ROLLOUT") && pod_ready(p)
        });
        let report = sampler.report();
        let alive = report.changes.last().unwrap().1.clone();
        // With the runner: the live scheduler itself has the new environment.
        let new_process = stack.runner().is_none_or(|_| {
            alive.iter().all(|pid| stack::process_env(pid.parse().unwrap()).contains_key("E2E_ROLLOUT"))
        });
        (pods.len() == 1 && new_template && report.last == 1 && new_process).then_some(alive)
    })
    .await;
    // Recreate: the old beat gave the lock back on SIGTERM, so the new one never had to wait.
    let new_pod = stack.pods(&selector("clock", "beat")).await.unwrap().remove(0);
    let new_log = pod_log(&stack, &new_pod).await;
    assert!(new_log.contains("acquired beat lock") && !new_log.contains("waiting for beat lock"), "{new_log}");
    if let Some(runner) = stack.runner() {
        let old_log = runner.pod_log(stack.namespace(), old_pod.metadata.name.as_deref().unwrap()).unwrap_or_default();
        assert!(old_log.contains("released beat lock"), "{old_log}");
    }
    let report = sampler.finish().await;
    let processes = processes.finish().await;
    assert!(report.max_simultaneous <= 1, "two beat schedulers ran at once: {:?}", report.changes);
    assert_eq!(report.last, 1, "beat did not come back: {:?}", report.changes);
    assert_ne!(first, rolled, "the rollout did not replace beat");
    assert!(report.samples >= 10, "the sampler barely ran: {report:?}");
    eprintln!(
        "beat schedulers: {} samples, longest gap {:?}, at most {} at once, changes {:?}; beat processes: at most {} \
         at once",
        report.samples, report.max_gap, report.max_simultaneous, report.changes, processes.max_simultaneous
    );
}

/// The strict form of hand scaling: the operator is down (so nothing reverts the scale), the beat
/// Deployment is scaled to 3, and three beat processes run for as long as it takes the first beat
/// to send another periodic task; the two new ones wait for the beat lock
/// (`celery-operator:beat:<namespace>:<app>`, logged), are not Ready and never start Celery's beat
/// service. Once the operator is back it scales beat to 1, the waiting pods go, and the first
/// scheduler was the only one all along. Sampled from `/proc` every 5 ms: processes holding the
/// beat schedule open (schedulers) and beat processes (on a real cluster: Ready beat pods and beat
/// pods with a running container).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_never_doubles_under_hand_scaling() {
    let Some((mut stack, schedulers, processes, first)) = beat_stack().await else { return };
    stack.stop_operator().await.expect("the operator stops on SIGTERM");
    let lock = format!("waiting for beat lock celery-operator:beat:{}:celery_example.app held by", stack.namespace());
    scale_beat(&stack, 3).await;
    let (scheduler, waiters) = eventually("three beat pods, two of them waiting for the beat lock", || async {
        let pods = stack.pods(&selector("clock", "beat")).await.unwrap();
        let (ready, not_ready): (Vec<Pod>, Vec<Pod>) = pods.into_iter().partition(pod_ready);
        if ready.len() != 1 || not_ready.len() != 2 || processes.report().last != 3 {
            return None;
        }
        for pod in &not_ready {
            if !pod_log(&stack, pod).await.contains(&lock) {
                return None;
            }
        }
        Some((ready.into_iter().next().unwrap(), not_ready))
    })
    .await;
    // Give the waiters time to misbehave, measured in the scheduler's own work: it sends tick
    // (every 5 s) at least once more while they wait.
    let sent = |log: &str| log.matches("Scheduler: Sending due task tick").count();
    let before = sent(&pod_log(&stack, &scheduler).await);
    eventually("the scheduler to send another tick", || async {
        (sent(&pod_log(&stack, &scheduler).await) > before).then_some(())
    })
    .await;
    for pod in &waiters {
        let log = pod_log(&stack, pod).await;
        assert!(!log.contains("beat: Starting"), "a waiting beat started Celery's beat service:\n{log}");
    }
    assert_eq!(processes.report().last, 3, "a waiting beat exited: {:?}", processes.report().changes);

    stack.start_operator().await.expect("the operator starts again");
    beat_back_to_one(&stack).await;
    eventually("one beat process", || async { (processes.report().last == 1).then_some(()) }).await;
    let report = schedulers.finish().await;
    let processes = processes.finish().await;
    assert_eq!(processes.max_simultaneous, 3, "the hand scale did not run three beats: {:?}", processes.changes);
    assert!(report.max_simultaneous <= 1, "two beat schedulers ran at once: {:?}", report.changes);
    let only: Vec<Vec<String>> =
        report.changes.iter().map(|(_, alive)| alive.clone()).filter(|a| !a.is_empty()).collect();
    assert!(only.iter().all(|alive| *alive == first), "the scheduler changed: {:?}", report.changes);
    eprintln!(
        "hand scale with the operator down: {} beat processes at once, {} scheduler(s); {} samples, longest gap {:?}",
        processes.max_simultaneous, report.max_simultaneous, report.samples, report.max_gap
    );
}

/// Messages waiting in a queue of the stack's broker (nobody consumes it).
async fn queue_length(stack: &Stack, queue: &str) -> usize {
    let client = redis::Client::open(stack.broker_url()).unwrap();
    let patient = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(30)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let mut conn = client.get_multiplexed_async_connection_with_config(&patient).await.unwrap();
    redis::cmd("LLEN").arg(queue).query_async(&mut conn).await.unwrap()
}

fn minute(t: Timestamp) -> i64 {
    t.as_second().div_euclid(60)
}

/// Beat keeps its schedule across a Recreate rollout on the pool's claim (`beat.scheduleClaimName`).
/// The example app's crontab entry (`minutely`, sent at the start of every minute to a queue no
/// worker consumes) falls due while the rollout has no beat running: the new pod needs a Secret
/// that is only created after the minute began (as a slow image pull or volume attach would hold
/// it). The new beat sends that minute as soon as it starts, once; a beat starting from a fresh
/// schedule would skip it. Sends are counted at the broker. Runner only: it plays the claim as a
/// directory shared by the pods; a cluster would need a storage class the scenario cannot assume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_sends_the_minute_due_during_a_rollout_once() {
    minute_due_during_a_rollout(Some("clock-beat-schedule")).await;
}

/// The same rollout with neither `beat.scheduler` nor `beat.scheduleClaimName` (the default): each
/// beat pod has a fresh emptyDir, and the schedule outlives the pod in the broker's Redis, kept by
/// RedBeat under the pool's prefix `celery-operator:redbeat:<namespace>:clock:`. Runner only, like
/// the claimed variant (not tried on a cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_sends_the_minute_due_during_a_rollout_once_by_default_on_redis() {
    minute_due_during_a_rollout(None).await;
}

async fn minute_due_during_a_rollout(claim: Option<&str>) {
    let Some(stack) = start(config(Pods::Celery)).await else { return };
    if stack.runner().is_none() {
        eprintln!("NOTICE: skipping the beat rollout scenario on a cluster");
        return;
    }
    apply_queues(&stack).await;
    let pool = fixed_pool("clock", &["default"], 0, true);
    let configure = |doc: &mut Value| {
        if let Some(claim) = claim {
            doc["spec"]["beat"]["scheduleClaimName"] = json!(claim);
        }
        let env = doc["spec"]["template"]["env"].as_array_mut().unwrap();
        env.push(json!({"name": "CELERY_EXAMPLE_MINUTELY_QUEUE", "value": "minutely"}));
        env.push(json!({"name": "CELERY_EXAMPLE_TICK_SECONDS", "value": "1"}));
    };
    stack.apply_yaml_with(&pool, configure).await.expect("pool applies");
    let old = eventually("a Ready beat pod", || async { ready_pods(&stack, "clock", "beat").await.pop() }).await;
    let old_name = old.metadata.name.clone().unwrap();

    stack
        .apply_yaml_with(&pool, |doc| {
            configure(doc);
            let gate = json!({"secretKeyRef": {"name": "rollout-gate", "key": "open"}});
            doc["spec"]["template"]["env"].as_array_mut().unwrap().push(json!({"name": "E2E_GATE", "valueFrom": gate}));
        })
        .await
        .expect("pool changes");
    // Recreate: the old pod (and its process) is gone before the new one is created.
    eventually("the old beat to stop and the new pod to wait for its Secret", || async {
        let pods = stack.pods(&selector("clock", "beat")).await.unwrap();
        (pods.len() == 1 && pods[0].metadata.name.as_deref() != Some(old_name.as_str()) && !pod_ready(&pods[0]))
            .then_some(())
    })
    .await;
    let stopped = Timestamp::now();
    let sent_by_old = queue_length(&stack, "minutely").await;
    eventually("the next minute", || async { (minute(Timestamp::now()) > minute(stopped)).then_some(()) }).await;

    let gate = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rollout-gate"},
        "stringData": {"open": "yes"}});
    stack.apply_yaml(&gate.to_string()).await.expect("secret applies");
    let new =
        eventually("the new beat pod to be Ready", || async { ready_pods(&stack, "clock", "beat").await.pop() }).await;
    eventually("the new beat to send the minute that came during the rollout", || async {
        (queue_length(&stack, "minutely").await > sent_by_old).then_some(())
    })
    .await;
    let seen = Timestamp::now();
    assert_eq!(
        minute(seen),
        minute(stopped) + 1,
        "the minute due during the rollout was not sent when the new beat started"
    );
    // Its first scheduler pass is over once it sends the interval tick a second time.
    let log = eventually("the new beat to tick twice", || async {
        let log = pod_log(&stack, &new).await;
        (log.matches("Scheduler: Sending due task tick").count() >= 2).then_some(log)
    })
    .await;
    if minute(Timestamp::now()) == minute(seen) {
        assert_eq!(queue_length(&stack, "minutely").await, sent_by_old + 1, "the minute was sent twice:\n{log}");
        assert_eq!(log.matches("Sending due task minutely").count(), 1, "{log}");
    }
    assert!(log.contains("acquired beat lock"), "{log}");
    let redbeat = format!("keys celery-operator:redbeat:{}:clock:*", stack.namespace());
    match claim {
        None => assert!(log.contains("beat: schedule kept in Redis by RedBeat") && log.contains(&redbeat), "{log}"),
        Some(_) => assert!(!log.contains("RedBeat"), "a claimed schedule stays Celery's file:\n{log}"),
    }
}

/// Deleting a pool removes its Deployments (garbage collection through the ownerReference) and its
/// pods, and every process the pods ran (prefork children included) exits. Its TaskQueues stay.
/// On a real cluster the process check is skipped (pods gone is the check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pool_stops_its_workers() {
    let Some(stack) = start(config(Pods::Celery)).await else { return };
    apply_queues(&stack).await;
    stack.apply_yaml(&fixed_pool("doomed", &["emails"], 2, true)).await.expect("pool applies");
    let running = eventually("2 ready workers and beat", || async {
        let workers = ready_pods(&stack, "doomed", "worker").await;
        let beat = ready_pods(&stack, "doomed", "beat").await;
        (workers.len() == 2 && beat.len() == 1).then(|| workers.into_iter().chain(beat).collect::<Vec<_>>())
    })
    .await;
    let groups: Vec<u32> = match stack.runner() {
        Some(runner) => {
            running.iter().flat_map(|p| runner.pids(stack.namespace(), p.metadata.name.as_deref().unwrap())).collect()
        }
        None => Vec::new(),
    };
    let processes = stack::processes_in_groups(&groups);
    if stack.runner().is_some() {
        // Each prefork worker has its main process and one pool child.
        assert!(groups.len() == 3 && processes.len() >= 5, "groups {groups:?}, processes {processes:?}");
    }

    let (resource, _) =
        stack.resource_of(&json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool"})).await.unwrap();
    let pools: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &resource);
    pools.delete("doomed", &DeleteParams::default()).await.expect("pool deleted");

    let api = deployments(&stack);
    eventually("the Deployments to be collected", || async {
        let worker = api.get_opt("doomed-worker").await.unwrap();
        let beat = api.get_opt("doomed-beat").await.unwrap();
        (worker.is_none() && beat.is_none()).then_some(())
    })
    .await;
    eventually("the pods to go", || async {
        stack.pods("app.kubernetes.io/instance=doomed").await.unwrap().is_empty().then_some(())
    })
    .await;
    eventually("every process of the pool to exit", || async {
        stack::processes_in_groups(&groups).is_empty().then_some(())
    })
    .await;
    assert!(processes.iter().all(|p| !stack::is_alive(*p)), "{processes:?}");
    for queue in QUEUES {
        assert!(get(&stack, "celery-operator.dev/v1alpha1", "TaskQueue", queue).await.is_some(), "{queue} was deleted");
    }
}

/// Two invalid pools: a schema violation and a CEL rule violation.
const INVALID_POOLS: &str = r#"
apiVersion: celery-operator.dev/v1alpha1
kind: WorkerPool
metadata:
  name: no-workers
spec:
  app: celery_example.app
  image: ghcr.io/celery-operator/worker-example:0.1.0
  queues: [emails]
  concurrency: 0
---
apiVersion: celery-operator.dev/v1alpha1
kind: WorkerPool
metadata:
  name: embedded-beat
spec:
  app: celery_example.app
  image: ghcr.io/celery-operator/worker-example:0.1.0
  queues: [emails]
  worker:
    extraArgs: ["-B"]
"#;

/// What the API server must say about each of [`INVALID_POOLS`].
const REFUSALS: [(&str, &[&str]); 2] = [
    ("no-workers", &["spec.concurrency: Invalid value: 0", "should be greater than or equal to 1"]),
    ("embedded-beat", &["spec.worker.extraArgs: Forbidden", "extraArgs may not set -A/--app", "-B/--beat"]),
];

/// Invalid WorkerPools are refused over HTTP with the schema message (concurrency minimum) and the
/// CEL rule's message (extraArgs), through a kube client and through `kubectl apply
/// --server-side` (skipped with a NOTICE when kubectl is not on PATH, as in e2e's conformance
/// tests); nothing is stored and the operator creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pools_are_rejected_with_the_schema_and_cel_messages() {
    let Some(stack) = start(config(Pods::None)).await else { return };
    let docs: Vec<&str> = INVALID_POOLS.split("\n---\n").collect();
    for (doc, (name, wanted)) in docs.iter().zip(REFUSALS) {
        let err = stack.apply_yaml(doc).await.expect_err("the pool is invalid");
        let StackError::Kube(kube::Error::Api(status)) = &err else { panic!("not an API refusal: {err}") };
        assert_eq!(status.code, 422, "{status:?}");
        assert!(
            status.message.contains(&format!("WorkerPool.celery-operator.dev \"{name}\" is invalid")),
            "{status:?}"
        );
        for w in wanted {
            assert!(status.message.contains(w), "{w:?} not in {:?}", status.message);
        }
    }

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), INVALID_POOLS).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(stack.kubeconfig_path())
        .arg("--cache-dir")
        .arg(cache.path())
        .args(["apply", "--server-side", "-n", stack.namespace(), "-f"])
        .arg(file.path())
        .output()
        .await;
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("NOTICE: kubectl not found on PATH; skipping the kubectl half of the scenario");
        }
        Err(e) => panic!("running kubectl: {e}"),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "kubectl accepted the invalid pools");
            for (name, wanted) in REFUSALS {
                assert!(stderr.contains(&format!("\"{name}\" is invalid")), "{name} not refused by kubectl: {stderr}");
                for w in wanted {
                    assert!(stderr.contains(w), "{w:?} not in kubectl's output: {stderr}");
                }
            }
        }
    }
    for (name, _) in REFUSALS {
        assert!(pool(&stack, name).await.is_none(), "the invalid pool {name} was stored");
        assert!(deployments(&stack).get_opt(&format!("{name}-worker")).await.unwrap().is_none());
    }
}

/// Once everything converged, an operator restart writes nothing: stop it (SIGTERM), start it
/// again, wait until it has finished a reconcile of every object (its
/// `celery_operator_reconcile_duration_seconds_count`), and check that no Deployment, WorkerPool
/// or TaskQueue was written (the double's request log: not even a no-op write was sent) and no
/// resourceVersion moved (the only check on a real cluster).
///
/// Allowed writes: none of Leases (leader election is off here) and none of Events (they go out on
/// condition transitions only, and a restart has none) are expected either; any write is listed in
/// the failure. The one exception is the TaskQueue depth refresh the operator makes at most every
/// `DEPTH_WRITE_INTERVAL` (30 s) whether or not it restarted: a TaskQueue status write is allowed
/// when its previous `lastProbeTime` is at least that old and the write changed neither its
/// conditions nor its observedGeneration (on an idle machine the scenario takes a few seconds and
/// it never happens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_converges_without_writes() {
    let Some(mut stack) = start(config(Pods::Simulated)).await else { return };
    apply_queues(&stack).await;
    stack.apply_yaml(&fixed_pool("steady", &["emails", "default"], 2, true)).await.expect("pool applies");
    eventually("the pool to be Ready with 2 workers", || async {
        let p = pool(&stack, "steady").await?;
        let current = p["status"]["observedGeneration"] == p["metadata"]["generation"];
        (current && is_true(&p, "Ready") && p["status"]["readyReplicas"] == 2).then_some(())
    })
    .await;
    for queue in QUEUES {
        eventually(&format!("TaskQueue {queue} to be Ready"), || async {
            let q = get(&stack, "celery-operator.dev/v1alpha1", "TaskQueue", queue).await?;
            (is_true(&q, "Ready") && is_true(&q, "BrokerReachable")).then_some(())
        })
        .await;
    }

    let status = stack.stop_operator().await.expect("the operator stops on SIGTERM");
    assert!(status.success(), "the operator exited with {status} on SIGTERM:\n{}", stack.operator_log());
    let before = stored(&stack).await;
    if let Some(server) = stack.server() {
        server.clear_requests();
    }
    let restarted_at = Timestamp::now();
    stack.start_operator().await.expect("the operator starts again");
    let kinds = [("WorkerPool", 1.0), ("TaskQueue", QUEUES.len() as f64)];
    eventually("the restarted operator to reconcile every object", || async {
        let text = stack.metrics().await.ok()?;
        let done = |kind: &str| {
            stack::metric_value(&text, "celery_operator_reconcile_duration_seconds_count", &[("kind", kind)])
        };
        kinds.iter().all(|(kind, n)| done(kind).is_some_and(|d| d >= *n)).then_some(())
    })
    .await;

    let after = stored(&stack).await;
    let refreshed: Vec<&str> = QUEUES
        .into_iter()
        .filter(|q| {
            let (old, new) = (&before[&format!("TaskQueue/{q}")], &after[&format!("TaskQueue/{q}")]);
            old["metadata"]["resourceVersion"] != new["metadata"]["resourceVersion"]
                && depth_refresh(old, new, restarted_at)
        })
        .collect();
    let versions = |objs: &BTreeMap<String, Value>| -> Vec<(String, Value)> {
        objs.iter()
            .filter(|(key, _)| !refreshed.iter().any(|q| **key == format!("TaskQueue/{q}")))
            .map(|(key, o)| (key.clone(), o["metadata"]["resourceVersion"].clone()))
            .collect()
    };
    assert_eq!(versions(&after), versions(&before), "a restart changed stored objects");
    if let Some(server) = stack.server() {
        // The log did see the restarted operator: it read the Deployments it owns.
        let reads = server.requests().iter().filter(|r| r.resource == "deployments" && !r.verb.is_write()).count();
        assert!(reads > 0, "no request of the restarted operator was logged");
        let writes: Vec<String> = server
            .writes()
            .iter()
            .filter(|w| {
                let refresh = w.resource == "taskqueues"
                    && w.subresource.as_deref() == Some("status")
                    && refreshed.contains(&w.name.as_deref().unwrap_or_default());
                !refresh
            })
            .map(|w| {
                let name = w.name.as_deref().unwrap_or_default();
                format!("{} {}/{name} {:?} by {:?}", w.verb.as_str(), w.resource, w.subresource, w.field_manager)
            })
            .collect();
        assert!(writes.is_empty(), "the restarted operator wrote: {writes:?}");
    }
    if !refreshed.is_empty() {
        eprintln!("NOTICE: periodic depth refresh of {refreshed:?} during the restart (allowed)");
    }
}

const QUEUES: [&str; 2] = ["emails", "default"];

/// Whether a TaskQueue's change from `old` to `new` is the operator's periodic depth refresh: the
/// previous one was at least `DEPTH_WRITE_INTERVAL` before `restarted_at`, and neither conditions
/// nor observedGeneration changed.
fn depth_refresh(old: &Value, new: &Value, restarted_at: Timestamp) -> bool {
    let last: Option<Timestamp> = old["status"]["lastProbeTime"].as_str().and_then(|t| t.parse().ok());
    let due = last.is_some_and(|t| restarted_at.duration_since(t).unsigned_abs() >= DEPTH_WRITE_INTERVAL);
    due && old["status"]["conditions"] == new["status"]["conditions"]
        && old["status"]["observedGeneration"] == new["status"]["observedGeneration"]
        && old["spec"] == new["spec"]
}

/// Every Deployment, WorkerPool and TaskQueue in the stack's namespace, by `Kind/name`.
async fn stored(stack: &Stack) -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("celery-operator.dev/v1alpha1", "WorkerPool"),
        ("celery-operator.dev/v1alpha1", "TaskQueue"),
    ] {
        let (resource, _) = stack.resource_of(&json!({"apiVersion": api_version, "kind": kind})).await.unwrap();
        let api: Api<DynamicObject> = Api::namespaced_with(stack.client(), stack.namespace(), &resource);
        for obj in api.list(&ListParams::default()).await.unwrap() {
            let key = format!("{kind}/{}", obj.metadata.name.clone().unwrap_or_default());
            objects.insert(key, serde_json::to_value(obj).unwrap());
        }
    }
    objects
}
