//! Pins the control-plane double's semantics through a real `kube::Client`: each test is a
//! behaviour a real API server has and an operator relies on.

use std::time::Duration;

use celery_e2e::{ApiServer, Fault, RequestMatch, Verb};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// Generous upper bound for things that happen "soon"; tests poll, never sleep.
const DEADLINE: Duration = Duration::from_secs(10);

fn server() -> ApiServer {
    let server = ApiServer::new();
    assert_eq!(server.load_crds_from_dir(FIXTURES).unwrap(), 2);
    server
}

fn pools(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("celery-operator.dev", "v1alpha1", "WorkerPool");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "workerpools");
    Api::namespaced_with(client, "default", &ar)
}

fn pool(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})).unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "worker", "image": "worker:1.0"}]},
            },
        },
    }))
    .unwrap()
}

fn api_error(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv(obj: &impl kube::Resource) -> String {
    obj.meta().resource_version.clone().unwrap()
}

async fn next_event<K>(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> WatchEvent<K> {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("a watch event before the deadline")
        .expect("the watch stream is open")
        .expect("a decodable event")
}

fn describe<K: kube::Resource>(e: &WatchEvent<K>) -> (String, String) {
    match e {
        WatchEvent::Added(o) => ("ADDED".into(), o.meta().name.clone().unwrap()),
        WatchEvent::Modified(o) => ("MODIFIED".into(), o.meta().name.clone().unwrap()),
        WatchEvent::Deleted(o) => ("DELETED".into(), o.meta().name.clone().unwrap()),
        WatchEvent::Bookmark(b) => ("BOOKMARK".into(), b.metadata.resource_version.clone()),
        WatchEvent::Error(s) => ("ERROR".into(), s.code.to_string()),
    }
}

#[tokio::test]
async fn watch_resumes_after_a_resource_version_in_order() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let pp = PostParams::default();
    let a = cms.create(&pp, &cm("a", json!({}))).await.unwrap();
    let start = rv(&a);
    cms.create(&pp, &cm("b", json!({}))).await.unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "v2"}}))).await.unwrap();
    cms.delete("b", &DeleteParams::default()).await.unwrap();

    let mut stream = cms.watch(&WatchParams::default().disable_bookmarks(), &start).await.unwrap().boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next_event(&mut stream).await));
    }
    assert_eq!(
        seen,
        vec![
            ("ADDED".to_string(), "b".to_string()),
            ("MODIFIED".to_string(), "a".to_string()),
            ("DELETED".to_string(), "b".to_string()),
        ]
    );
    // Live events follow the replayed ones on the same stream.
    cms.create(&pp, &cm("c", json!({}))).await.unwrap();
    assert_eq!(describe(&next_event(&mut stream).await), ("ADDED".to_string(), "c".to_string()));
}

/// The double in-process and served over HTTP (kept alive by the returned `ServedApi`): semantics
/// that depend on how a reply is framed (streams, errors inside streams) are pinned on both.
async fn both_transports(server: &ApiServer) -> (celery_e2e::ServedApi, [(&'static str, kube::Client); 2]) {
    let served = server.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let http = served.client().await.unwrap();
    (served, [("in-process", server.client()), ("http", http)])
}

/// As kube-apiserver's watch cache answers: HTTP 200, one ERROR event carrying a 410 `Expired`
/// Status ("too old resource version: requested (oldest)"), then the end of the stream.
#[tokio::test]
async fn watch_from_a_compacted_resource_version_gets_410_gone() {
    let server = server();
    let (_served, clients) = both_transports(&server).await;
    for (transport, client) in clients {
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        let a = cms.create(&PostParams::default(), &cm(&format!("a-{transport}"), json!({}))).await.unwrap();
        cms.create(&PostParams::default(), &cm(&format!("b-{transport}"), json!({}))).await.unwrap();
        server.compact();
        let mut stream = cms.watch(&WatchParams::default(), &rv(&a)).await.unwrap().boxed();
        match next_event(&mut stream).await {
            WatchEvent::Error(status) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"), "{transport}");
                assert!(status.message.starts_with("too old resource version: "), "{transport}: {status:?}");
            }
            other => panic!("{transport}: expected 410 Gone, got {:?}", describe(&other)),
        }
        let end = tokio::time::timeout(DEADLINE, stream.next()).await.expect("the stream ends after the error");
        assert!(end.is_none(), "{transport}: more after the ERROR event");
    }
}

/// The raw reply to a watch from a compacted resourceVersion over HTTP: a 200 with a chunked
/// body (as every watch reply), not a connection the server closes mid-reply.
#[tokio::test]
async fn an_expired_watch_is_a_well_formed_http_reply() {
    let server = server();
    let served = server.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    server.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})).unwrap();
    server.compact();
    let path = "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=1";
    let (head, body) = raw_get(served.addr, path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked") && !head.contains("content-length"), "{head}");
    let event: Value = serde_json::from_str(body.lines().next().unwrap_or_default()).expect("one JSON event");
    assert_eq!(event["type"], "ERROR");
    assert_eq!((event["object"]["code"].clone(), event["object"]["reason"].clone()), (json!(410), json!("Expired")));
}

/// A GET over a plain TCP connection (HTTP/1.1, `Connection: close`): the response head and the
/// de-chunked body.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut raw)).await.expect("the reply ends").unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, mut rest) = text.split_once("\r\n\r\n").expect("a response head");
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return (head.to_owned(), rest.to_owned());
    }
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    (head.to_owned(), body)
}

/// A list at an exact resourceVersion that was compacted is 410 Expired, as on a real server (one
/// in the future is 504 "Too large resource version"); a list with `resourceVersion` alone (not
/// older than) is served from the latest state.
#[tokio::test]
async fn a_list_at_an_exact_compacted_resource_version_gets_410_gone() {
    let server = server();
    let (served, clients) = both_transports(&server).await;
    for (transport, client) in clients {
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        let a = cms.create(&PostParams::default(), &cm(&format!("a-{transport}"), json!({}))).await.unwrap();
        cms.create(&PostParams::default(), &cm(&format!("b-{transport}"), json!({}))).await.unwrap();
        server.compact();
        let exact = ListParams::default().at(&rv(&a)).matching(kube::api::VersionMatch::Exact);
        let status = api_error(cms.list(&exact).await.expect_err("the version is gone"));
        assert_eq!((status.code, status.reason.as_str()), (410, "Expired"), "{transport}: {status:?}");
        assert_eq!(status.message, "The resourceVersion for the provided list is too old.");
        // The legacy form of an exact list: a limit and a resourceVersion other than "0".
        let legacy = ListParams::default().at(&rv(&a)).limit(10);
        assert_eq!(api_error(cms.list(&legacy).await.expect_err("the version is gone")).code, 410, "{transport}");
        let not_older = ListParams::default().at(&rv(&a)).matching(kube::api::VersionMatch::NotOlderThan);
        let listed = cms.list(&not_older).await.unwrap();
        assert!(listed.items.iter().any(|c| c.metadata.name.as_deref() == Some(&format!("a-{transport}"))));
    }
    // A version from the future is 504, which kube's HTTP client retries for minutes (as it should
    // against a real server that is catching up): read raw.
    let future = server.resource_version() + 100;
    let path = format!("/api/v1/namespaces/default/configmaps?resourceVersion={future}&resourceVersionMatch=Exact");
    let (head, body) = raw_get(served.addr, &path).await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(body.contains("Too large resource version"), "{body}");
}

#[tokio::test]
async fn a_bounded_history_expires_old_resource_versions() {
    let server = server();
    server.set_history_limit(3);
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("n{i}"), json!({}))).await.unwrap();
    }
    let mut stream = cms.watch(&WatchParams::default(), &rv(&first)).await.unwrap().boxed();
    assert_eq!(describe(&next_event(&mut stream).await).0, "ERROR");
}

/// Poll `check` until it holds or the deadline passes.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// kube's `watcher` re-watches after its watch is dropped, gets the 410 for its compacted
/// resourceVersion, re-lists and goes on: in-process and over HTTP.
#[tokio::test]
async fn kube_runtime_watcher_recovers_from_dropped_watches_and_compaction() {
    let server = server();
    // No BOOKMARK may move the watcher's resourceVersion past the compaction.
    server.set_bookmark_interval(Duration::from_secs(3600));
    let (_served, clients) = both_transports(&server).await;
    for (transport, client) in clients {
        server.clear_requests();
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        let label = json!({"transport": transport.replace('-', "")});
        let selector = format!("transport={}", label["transport"].as_str().unwrap());
        cms.create(&PostParams::default(), &cm(&format!("before-{transport}"), label.clone())).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let events = watcher(cms.clone(), watcher::Config::default().labels(&selector));
        let consumer = tokio::spawn(events.for_each(move |event| {
            let seen = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o.metadata.name.unwrap(),
                Ok(_) => return futures::future::ready(()),
                Err(watcher::Error::WatchError(status)) => format!("watch error {}", status.code),
                Err(e) => format!("{e}"),
            };
            let _ = tx.send(seen);
            futures::future::ready(())
        }));
        let first = tokio::time::timeout(DEADLINE, rx.recv()).await.unwrap();
        assert_eq!(first, Some(format!("before-{transport}")));
        eventually("the watcher's watch to open", || server.open_watches() == 1).await;
        // A write the watcher does not see, then compaction: its resourceVersion is now too old.
        cms.create(&PostParams::default(), &cm(&format!("unseen-{transport}"), json!({}))).await.unwrap();
        server.compact();
        assert_eq!(server.drop_watches(), 1);
        cms.create(&PostParams::default(), &cm(&format!("after-{transport}"), label)).await.unwrap();
        let seen = tokio::time::timeout(DEADLINE, async {
            let mut seen = Vec::new();
            while let Some(item) = rx.recv().await {
                let done = item == format!("after-{transport}");
                seen.push(item);
                if done {
                    break;
                }
            }
            seen
        })
        .await
        .unwrap_or_else(|_| panic!("{transport}: the watcher did not recover"));
        // The ERROR event first; then the re-list (`before` again, and `after` if it was there
        // by then) or the watch (`after`).
        assert_eq!(seen.first().map(String::as_str), Some("watch error 410"), "{transport}: {seen:?}");
        // The 410 made it list again, once, instead of retrying the stale version.
        let lists = server.requests().iter().filter(|r| r.verb == Verb::List && r.resource == "configmaps").count();
        assert_eq!(lists, 2, "{transport}");
        consumer.abort();
        eventually("the aborted watcher's watch to close", || server.open_watches() == 0).await;
    }
}

#[tokio::test]
async fn bookmarks_carry_the_current_resource_version() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut stream = cms.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    let created = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    assert_eq!(describe(&next_event(&mut stream).await).0, "ADDED");
    server.send_bookmarks();
    assert_eq!(describe(&next_event(&mut stream).await), ("BOOKMARK".to_string(), rv(&created)));
}

#[tokio::test]
async fn watch_timeout_ends_the_stream() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut stream = cms.watch(&WatchParams::default().timeout(1), "0").await.unwrap().boxed();
    let end = tokio::time::timeout(DEADLINE, stream.next()).await.expect("the stream ends at its timeout");
    assert!(end.is_none());
}

#[tokio::test]
async fn labels_moving_out_of_a_watched_selection_appear_as_deletes() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let wp = WatchParams::default().labels("tier=web").disable_bookmarks();
    let mut stream = cms.watch(&wp, "0").await.unwrap().boxed();
    cms.create(&PostParams::default(), &cm("a", json!({"tier": "web"}))).await.unwrap();
    cms.create(&PostParams::default(), &cm("b", json!({"tier": "db"}))).await.unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"tier": "db"}}})))
        .await
        .unwrap();
    assert_eq!(describe(&next_event(&mut stream).await), ("ADDED".to_string(), "a".to_string()));
    assert_eq!(describe(&next_event(&mut stream).await), ("DELETED".to_string(), "a".to_string()));
}

#[tokio::test]
async fn update_with_a_stale_resource_version_conflicts() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let created = cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let mut first = created.clone();
    first.data = Some([("k".to_string(), "first".to_string())].into());
    cms.replace("a", &PostParams::default(), &first).await.unwrap();
    let mut stale = created;
    stale.data = Some([("k".to_string(), "stale".to_string())].into());
    let err = api_error(cms.replace("a", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(err.message.contains("the object has been modified"), "{}", err.message);
    assert_eq!(cms.get("a").await.unwrap().data.unwrap()["k"], "first");
}

#[tokio::test]
async fn create_conflicts_with_an_existing_name_and_generate_name_picks_a_free_one() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let err = api_error(cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
    let generated: ConfigMap = serde_json::from_value(json!({"metadata": {"generateName": "job-"}})).unwrap();
    let made = cms.create(&PostParams::default(), &generated).await.unwrap();
    let name = made.metadata.name.unwrap();
    assert!(name.starts_with("job-") && name.len() == 9, "{name}");
}

#[tokio::test]
async fn server_side_apply_tracks_ownership_and_conflicts_without_force() {
    let server = server();
    let deploys: Api<Deployment> = Api::default_namespaced(server.client());
    let operator = PatchParams::apply("celery-operator");
    deploys.patch("w", &operator, &Patch::Apply(deployment("w", 2))).await.unwrap();

    // Another manager wants a different replica count: conflict naming the owner and the field.
    let mut scaled = deployment("w", 5);
    scaled.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].image = Some("worker:1.0".into());
    let err = api_error(deploys.patch("w", &PatchParams::apply("hand"), &Patch::Apply(&scaled)).await.unwrap_err());
    assert_eq!(err.code, 409);
    assert!(err.message.contains("conflict with \"celery-operator\""), "{}", err.message);
    assert!(err.message.contains(".spec.replicas"), "{}", err.message);
    let causes = err.details.unwrap().causes;
    assert!(causes.iter().any(|c| c.field == ".spec.replicas" && c.reason == "FieldManagerConflict"));

    // With force the field changes owner, and the operator's next apply without force conflicts.
    deploys.patch("w", &PatchParams::apply("hand").force(), &Patch::Apply(&scaled)).await.unwrap();
    assert_eq!(deploys.get("w").await.unwrap().spec.unwrap().replicas, Some(5));
    let err = api_error(deploys.patch("w", &operator, &Patch::Apply(deployment("w", 2))).await.unwrap_err());
    assert!(err.message.contains("conflict with \"hand\""), "{}", err.message);
    deploys.patch("w", &operator.clone().force(), &Patch::Apply(deployment("w", 2))).await.unwrap();
    let live = deploys.get("w").await.unwrap();
    assert_eq!(live.spec.unwrap().replicas, Some(2));
    let managers: Vec<String> = live.metadata.managed_fields.unwrap().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.contains(&"celery-operator".to_string()), "{managers:?}");
}

#[tokio::test]
async fn apply_removes_fields_the_manager_stopped_applying_and_a_no_op_apply_writes_nothing() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let pp = PatchParams::apply("op");
    let cfg = |data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": data});
    cms.patch("a", &pp, &Patch::Apply(cfg(json!({"x": "1", "y": "2"})))).await.unwrap();
    // A field set by someone else survives the operator dropping its own.
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"z": "3"}}))).await.unwrap();
    let after = cms.patch("a", &pp, &Patch::Apply(cfg(json!({"x": "1"})))).await.unwrap();
    let data = after.data.clone().unwrap();
    assert_eq!(data.keys().cloned().collect::<Vec<_>>(), vec!["x".to_string(), "z".to_string()]);

    let before = server.resource_version();
    let again = cms.patch("a", &pp, &Patch::Apply(cfg(json!({"x": "1"})))).await.unwrap();
    assert_eq!(server.resource_version(), before, "a no-op apply must not store anything");
    assert_eq!(rv(&again), rv(&after));
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents_unless_orphaned() {
    let server = server();
    let client = server.client();
    let pools = pools(client.clone());
    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    for name in ["mail", "keep"] {
        let owner =
            pools.create(&PostParams::default(), &pool(name, json!({"app": "a", "queues": ["q"]}))).await.unwrap();
        let owner_ref = json!([{"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool", "name": name,
            "uid": owner.metadata.uid.unwrap(), "controller": true, "blockOwnerDeletion": true}]);
        let mut d = serde_json::to_value(deployment(&format!("{name}-worker"), 1)).unwrap();
        d["metadata"]["ownerReferences"] = owner_ref.clone();
        deploys.create(&PostParams::default(), &serde_json::from_value(d).unwrap()).await.unwrap();
        // A grandchild owned by the Deployment goes too (cascading).
        let dep_uid = deploys.get(&format!("{name}-worker")).await.unwrap().metadata.uid.unwrap();
        let mut c = serde_json::to_value(cm(&format!("{name}-child"), json!({}))).unwrap();
        c["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": format!("{name}-worker"), "uid": dep_uid}]);
        cms.create(&PostParams::default(), &serde_json::from_value(c).unwrap()).await.unwrap();
    }
    pools.delete("mail", &DeleteParams::background()).await.unwrap();
    assert!(deploys.get_opt("mail-worker").await.unwrap().is_none());
    assert!(cms.get_opt("mail-child").await.unwrap().is_none());

    pools.delete("keep", &DeleteParams::orphan()).await.unwrap();
    let orphan = deploys.get("keep-worker").await.unwrap();
    assert!(orphan.metadata.owner_references.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut c = cm("a", json!({}));
    c.metadata.finalizers = Some(vec!["celery-operator.dev/cleanup".into()]);
    cms.create(&PostParams::default(), &c).await.unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let pending = cms.get("a").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert!(cms.get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn label_selectors_support_equality_and_set_operators() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for (name, labels) in [
        ("a", json!({"app": "mail", "tier": "worker"})),
        ("b", json!({"app": "mail", "tier": "beat"})),
        ("c", json!({"app": "web"})),
        ("d", json!({})),
    ] {
        cms.create(&PostParams::default(), &cm(name, labels)).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items.into_iter().map(|c| c.metadata.name.unwrap()).collect()
    };
    let cases = [
        ("app=mail", vec!["a", "b"]),
        ("app==mail,tier!=beat", vec!["a"]),
        ("app in (mail,web)", vec!["a", "b", "c"]),
        ("app notin (mail)", vec!["c", "d"]),
        ("tier", vec!["a", "b"]),
        ("!tier", vec!["c", "d"]),
    ];
    for (selector, expected) in cases {
        let got = names(cms.list(&ListParams::default().labels(selector)).await.unwrap());
        assert_eq!(got, expected, "selector {selector}");
    }
    let by_name = names(cms.list(&ListParams::default().fields("metadata.name=c")).await.unwrap());
    assert_eq!(by_name, vec!["c"]);
}

#[tokio::test]
async fn lists_paginate_with_limit_and_continue() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for i in 0..7 {
        cms.create(&PostParams::default(), &cm(&format!("cm-{i}"), json!({}))).await.unwrap();
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(3);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 3);
        names.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, (0..7).map(|i| format!("cm-{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn deployment_scale_subresource_reads_and_writes_replicas() {
    let server = server();
    let deploys: Api<Deployment> = Api::default_namespaced(server.client());
    deploys.create(&PostParams::default(), &deployment("w", 2)).await.unwrap();
    let scale = deploys.get_scale("w").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=w"));
    let patched = deploys
        .patch_scale("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 7}})))
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().replicas, Some(7));
    let d = deploys.get("w").await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(7));
    assert_eq!(d.metadata.generation, Some(2), "a replica change is a spec change");
}

#[tokio::test]
async fn a_scale_patch_conflicts_only_when_it_names_a_stale_resource_version() {
    let server = server();
    let deploys: Api<Deployment> = Api::default_namespaced(server.client());
    deploys.create(&PostParams::default(), &deployment("w", 2)).await.unwrap();
    let stale = deploys.get_scale("w").await.unwrap().metadata.resource_version.unwrap();
    // Another writer (a controller updating status) moves the object on.
    let mut d = server.get("apps/v1", "Deployment", Some("default"), "w").unwrap().unwrap();
    d["metadata"]["labels"] = json!({"touched": "yes"});
    server.put(d).unwrap();
    // A patch without a resourceVersion applies to the latest object, as on a real API server.
    let patched = deploys
        .patch_scale("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 4}})))
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().replicas, Some(4));
    // One naming the stale version is a 409.
    let stale_patch = json!({"metadata": {"resourceVersion": stale}, "spec": {"replicas": 5}});
    let err =
        api_error(deploys.patch_scale("w", &PatchParams::default(), &Patch::Merge(stale_patch)).await.unwrap_err());
    assert_eq!(err.code, 409);
    assert_eq!(deploys.get("w").await.unwrap().spec.unwrap().replicas, Some(4));
}

#[tokio::test]
async fn custom_resource_scale_subresource_uses_the_crd_paths() {
    let server = server();
    let pools = pools(server.client());
    pools
        .create(&PostParams::default(), &pool("p", json!({"app": "a", "queues": ["q"], "replicas": 2})))
        .await
        .unwrap();
    pools
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2, "selector": "pool=p"}})),
        )
        .await
        .unwrap();
    let scale = pools.get_scale("p").await.unwrap();
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(scale.status.as_ref().unwrap().selector.as_deref(), Some("pool=p"));
    let mut wanted = scale.clone();
    wanted.spec.as_mut().unwrap().replicas = Some(4);
    pools.replace_scale("p", &PostParams::default(), &wanted).await.unwrap();
    assert_eq!(pools.get("p").await.unwrap().data["spec"]["replicas"], 4);
    // The Scale's resourceVersion is a precondition like any other.
    let err = api_error(pools.replace_scale("p", &PostParams::default(), &wanted).await.unwrap_err());
    assert_eq!(err.code, 409);
}

#[tokio::test]
async fn status_subresource_separates_spec_and_status_writes() {
    let server = server();
    let pools = pools(server.client());
    let mut p = pool("p", json!({"app": "a", "queues": ["q"]}));
    p.data["status"] = json!({"replicas": 9});
    let created = pools.create(&PostParams::default(), &p).await.unwrap();
    assert!(created.data.get("status").is_none(), "status is dropped on create");

    let with_status = pools
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 3}, "spec": {"concurrency": 99}})),
        )
        .await
        .unwrap();
    assert_eq!(with_status.data["status"]["replicas"], 3);
    assert_eq!(with_status.data["spec"]["concurrency"], 4, "the status subresource ignores spec");

    let main = pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 0}, "spec": {"concurrency": 8}})),
        )
        .await
        .unwrap();
    assert_eq!(main.data["status"]["replicas"], 3, "the main resource ignores status");
    assert_eq!(main.data["spec"]["concurrency"], 8);
}

#[tokio::test]
async fn generation_moves_only_on_spec_changes() {
    let server = server();
    let pools = pools(server.client());
    let created = pools.create(&PostParams::default(), &pool("p", json!({"app": "a", "queues": ["q"]}))).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let pp = PatchParams::default();
    let labelled = pools.patch("p", &pp, &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}))).await.unwrap();
    assert_eq!(labelled.metadata.generation, Some(1), "metadata changes keep the generation");
    let status = pools.patch_status("p", &pp, &Patch::Merge(json!({"status": {"replicas": 1}}))).await.unwrap();
    assert_eq!(status.metadata.generation, Some(1), "status changes keep the generation");
    let spec = pools.patch("p", &pp, &Patch::Merge(json!({"spec": {"concurrency": 2}}))).await.unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
    let same = pools.patch("p", &pp, &Patch::Merge(json!({"spec": {"concurrency": 2}}))).await.unwrap();
    assert_eq!(same.metadata.generation, Some(2));
    assert_eq!(rv(&same), rv(&spec), "a patch that changes nothing is not stored");
}

#[tokio::test]
async fn invalid_custom_resources_are_rejected_with_field_causes() {
    let server = server();
    let pools = pools(server.client());
    let err = api_error(
        pools
            .create(&PostParams::default(), &pool("bad", json!({"queues": [], "concurrency": 0, "pool": "gevent"})))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(err.message.starts_with("WorkerPool.celery-operator.dev \"bad\" is invalid: ["), "{}", err.message);
    let causes = err.details.unwrap().causes;
    let fields: Vec<(&str, &str)> = causes.iter().map(|c| (c.field.as_str(), c.reason.as_str())).collect();
    for expected in [
        ("spec.app", "FieldValueRequired"),
        ("spec.concurrency", "FieldValueInvalid"),
        ("spec.pool", "FieldValueNotSupported"),
        ("spec.queues", "FieldValueInvalid"),
    ] {
        assert!(fields.contains(&expected), "missing {expected:?} in {fields:?}");
    }
    let concurrency = causes.iter().find(|c| c.field == "spec.concurrency").unwrap();
    assert_eq!(concurrency.message, "Invalid value: 0: spec.concurrency in body should be greater than or equal to 1");
}

#[tokio::test]
async fn cel_rules_and_transition_rules_are_enforced() {
    let server = server();
    let pools = pools(server.client());
    let spec = json!({"app": "a", "queues": ["q"], "autoscaling": {"minReplicas": 5, "maxReplicas": 2}});
    let err = api_error(pools.create(&PostParams::default(), &pool("p", spec)).await.unwrap_err());
    assert_eq!(err.code, 422);
    assert_eq!(
        err.message,
        "WorkerPool.celery-operator.dev \"p\" is invalid: spec.autoscaling: Invalid value: \"object\": minReplicas must not exceed maxReplicas"
    );

    let ok = pool("p", json!({"app": "a", "queues": ["q"], "autoscaling": {"maxReplicas": 2}}));
    let created = pools.create(&PostParams::default(), &ok).await.unwrap();
    assert_eq!(created.data["spec"]["autoscaling"]["minReplicas"], 0, "defaults are applied");
    assert_eq!(created.data["spec"]["pool"], "prefork");

    let err = api_error(
        pools.patch("p", &PatchParams::default(), &Patch::Merge(json!({"spec": {"app": "b"}}))).await.unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert!(err.message.contains("spec.app: Invalid value: \"string\": app is immutable"), "{}", err.message);
}

#[tokio::test]
async fn unknown_fields_are_pruned_or_rejected_under_strict_validation() {
    let server = server();
    let pools = pools(server.client());
    let created = pools
        .create(&PostParams::default(), &pool("p", json!({"app": "a", "queues": ["q"], "bogus": 1, "note": null})))
        .await
        .unwrap();
    assert!(created.data["spec"].get("bogus").is_none());
    assert!(created.data["spec"].get("note").is_some(), "nullable fields keep null");
    let strict = PatchParams::default().validation_strict();
    let err = api_error(pools.patch("p", &strict, &Patch::Merge(json!({"spec": {"bogus": 1}}))).await.unwrap_err());
    assert_eq!(err.code, 400);
    assert!(err.message.contains("unknown field \"spec.bogus\""), "{}", err.message);
}

#[tokio::test]
async fn deployments_are_defaulted_and_validated_like_the_real_server() {
    let server = server();
    let deploys: Api<Deployment> = Api::default_namespaced(server.client());
    let d = deploys.create(&PostParams::default(), &deployment("w", 1)).await.unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(spec.template.spec.unwrap().termination_grace_period_seconds, Some(30));
    // Switching to Recreate while the defaulted rollingUpdate is still there is refused.
    let err = api_error(
        deploys
            .patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"strategy": {"type": "Recreate"}}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert_eq!(err.details.unwrap().causes[0].field, "spec.strategy.rollingUpdate");
}

#[tokio::test]
async fn secrets_merge_string_data_into_data() {
    let server = server();
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    let s: Secret =
        serde_json::from_value(json!({"metadata": {"name": "broker"}, "stringData": {"url": "redis://:pw@r:6379/0"}}))
            .unwrap();
    let stored = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert!(stored.string_data.is_none());
    assert_eq!(stored.data.unwrap()["url"].0, b"redis://:pw@r:6379/0".to_vec());
}

#[tokio::test]
async fn the_request_log_counts_writes_by_manager() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    server.clear_requests();
    cms.get("a").await.unwrap();
    cms.patch(
        "a",
        &PatchParams::apply("op"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "1"}})),
    )
    .await
    .unwrap();
    let _ = cms.get("missing").await;
    let log = server.requests();
    assert_eq!(
        log.iter().map(|r| (r.verb, r.status)).collect::<Vec<_>>(),
        vec![(Verb::Get, 200), (Verb::Patch, 200), (Verb::Get, 404)]
    );
    let writes = server.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].field_manager.as_deref(), Some("op"));
    assert_eq!((writes[0].resource.as_str(), writes[0].name.as_deref()), ("configmaps", Some("a")));
}

#[tokio::test]
async fn injected_faults_fail_the_next_matching_requests() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    server.inject(Fault::error(500).on(RequestMatch::writes().resource("configmaps")).times(2));
    for _ in 0..2 {
        let err = api_error(cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap_err());
        assert_eq!(err.code, 500);
    }
    cms.list(&ListParams::default()).await.expect("reads are not affected");
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.expect("the fault expired");
    assert_eq!(server.requests().iter().filter(|r| r.injected).count(), 2);
}

#[tokio::test]
async fn dropping_the_watches_of_one_resource_leaves_the_others_open() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    let mut cm_stream = cms.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    let mut secret_stream = secrets.watch(&WatchParams::default().disable_bookmarks(), "0").await.unwrap().boxed();
    assert_eq!(server.drop_watches_of("configmaps"), 1);
    let end = tokio::time::timeout(DEADLINE, cm_stream.next()).await.expect("the ConfigMap watch ends");
    assert!(end.is_none());
    assert_eq!(server.open_watches(), 1);
    server.create(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})).unwrap();
    assert_eq!(describe(&next_event(&mut secret_stream).await), ("ADDED".to_string(), "s".to_string()));
}

#[tokio::test]
async fn dropping_watches_ends_open_streams() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut stream = cms.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    assert_eq!(server.drop_watches(), 1);
    let end = tokio::time::timeout(DEADLINE, stream.next()).await.expect("the stream ends");
    assert!(end.is_none());
}

#[tokio::test]
async fn the_served_double_speaks_http_to_kube_clients() {
    let server = server();
    let served = server.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = served.client().await.unwrap();
    let pools = pools(client);
    pools.create(&PostParams::default(), &pool("p", json!({"app": "a", "queues": ["q"]}))).await.unwrap();
    assert_eq!(server.list("celery-operator.dev/v1alpha1", "WorkerPool", Some("default")).unwrap().len(), 1);
}

/// Run kubectl against the served double; `None` when kubectl is not installed.
async fn kubectl(
    served: &celery_e2e::ServedApi,
    cache: &std::path::Path,
    args: &[&str],
) -> Option<(bool, String, String)> {
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&served.kubeconfig_path)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .await;
    match out {
        Ok(out) => Some((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running kubectl: {e}"),
    }
}

#[tokio::test]
async fn kubectl_applies_crds_and_custom_resources_and_prints_their_columns() {
    let server = ApiServer::new();
    let served = server.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let crds = format!("{FIXTURES}/crds.yaml");
    let Some((ok, _, err)) = kubectl(&served, cache.path(), &["apply", "-f", &crds]).await else {
        eprintln!("NOTICE: kubectl not found on PATH; skipping the kubectl conformance test");
        return;
    };
    assert!(ok, "kubectl apply of the CRDs failed: {err}");
    let (ok, _, err) = kubectl(&served, cache.path(), &["apply", "-f", &crds]).await.unwrap();
    assert!(ok, "re-applying the CRDs failed: {err}");

    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pool.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata:\n  name: mail\nspec:\n  app: proj.celery\n  queues: [emails]\n  replicas: 3\n",
    )
    .unwrap();
    let (ok, out, err) = kubectl(&served, cache.path(), &["apply", "-f", manifest.to_str().unwrap()]).await.unwrap();
    assert!(ok && out.contains("workerpool.celery-operator.dev/mail created"), "{out}{err}");
    server
        .patch_status(
            "celery-operator.dev/v1alpha1",
            "WorkerPool",
            Some("default"),
            "mail",
            json!({"conditions": [{"type": "Ready", "status": "True"}]}),
        )
        .unwrap();

    let (ok, out, err) = kubectl(&served, cache.path(), &["get", "workerpools,deploy"]).await.unwrap();
    assert!(ok, "{err}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, vec!["NAME", "REPLICAS", "READY", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], &["workerpool.celery-operator.dev/mail", "3", "True"]);

    let (ok, out, _) = kubectl(&served, cache.path(), &["get", "wp", "-o", "wide"]).await.unwrap();
    assert!(ok && out.lines().next().unwrap().contains("APP") && out.contains("proj.celery"), "{out}");

    let (ok, _, err) = kubectl(&served, cache.path(), &["scale", "wp/mail", "--replicas=5"]).await.unwrap();
    assert!(ok, "{err}");
    let pool = server.get("celery-operator.dev/v1alpha1", "WorkerPool", Some("default"), "mail").unwrap().unwrap();
    assert_eq!(pool["spec"]["replicas"], 5);

    std::fs::write(&manifest, "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata:\n  name: bad\nspec:\n  app: x\n  queues: []\n").unwrap();
    let (ok, _, err) = kubectl(&served, cache.path(), &["apply", "-f", manifest.to_str().unwrap()]).await.unwrap();
    assert!(!ok && err.contains("is invalid") && err.contains("spec.queues"), "{err}");
}

#[tokio::test]
async fn metadata_only_requests_return_partial_object_metadata() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &cm("a", json!({"x": "y"}))).await.unwrap();
    let meta = cms.get_metadata("a").await.unwrap();
    assert_eq!(meta.metadata.labels.unwrap()["x"], "y");
    let list = cms.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
}

#[tokio::test]
async fn streaming_list_watchers_get_initial_events_then_a_bookmark() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    let mut events = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.try_next().await.unwrap() {
            match event {
                watcher::Event::InitApply(o) => initial.push(o.metadata.name.unwrap()),
                watcher::Event::InitDone => return,
                _ => {}
            }
        }
    })
    .await
    .expect("InitDone before the deadline");
    assert_eq!(initial, vec!["a".to_string()]);
}

#[tokio::test]
async fn watches_stream_over_http_too() {
    let server = server();
    let served = server.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(served.client().await.unwrap());
    let mut stream = cms.watch(&WatchParams::default().disable_bookmarks(), "0").await.unwrap().boxed();
    server.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "over-http"}})).unwrap();
    assert_eq!(describe(&next_event(&mut stream).await), ("ADDED".to_string(), "over-http".to_string()));
}

#[tokio::test]
async fn delete_collection_honours_label_selectors() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for (name, tier) in [("a", "x"), ("b", "x"), ("c", "y")] {
        cms.create(&PostParams::default(), &cm(name, json!({"tier": tier}))).await.unwrap();
    }
    cms.delete_collection(&DeleteParams::default(), &ListParams::default().labels("tier=x")).await.unwrap();
    let left: Vec<String> =
        cms.list(&ListParams::default()).await.unwrap().items.into_iter().map(|c| c.metadata.name.unwrap()).collect();
    assert_eq!(left, vec!["c".to_string()]);
}

#[tokio::test]
async fn foreground_deletion_removes_dependents_before_the_owner() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let owner = cms.create(&PostParams::default(), &cm("owner", json!({}))).await.unwrap();
    let mut child = serde_json::to_value(cm("child", json!({}))).unwrap();
    child["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid.unwrap()}]);
    cms.create(&PostParams::default(), &serde_json::from_value(child).unwrap()).await.unwrap();
    let mut stream = cms
        .watch(&WatchParams::default().disable_bookmarks(), &rv(&cms.get("child").await.unwrap()))
        .await
        .unwrap()
        .boxed();
    cms.delete("owner", &DeleteParams::foreground()).await.unwrap();
    assert_eq!(describe(&next_event(&mut stream).await), ("DELETED".to_string(), "child".to_string()));
    assert_eq!(describe(&next_event(&mut stream).await), ("DELETED".to_string(), "owner".to_string()));
}

#[tokio::test]
async fn kube_event_recorder_publishes_events() {
    use k8s_openapi::api::events::v1::Event;
    use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
    let server = server();
    let client = server.client();
    let cm_obj = Api::<ConfigMap>::default_namespaced(client.clone())
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let recorder = Recorder::new(client.clone(), Reporter { controller: "celery-operator".into(), instance: None });
    let reference = kube::Resource::object_ref(&cm_obj, &());
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "BrokerUnsafe".into(),
        note: Some("maxmemory-policy allkeys-lru can evict queues".into()),
        action: "Probe".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    let events: Vec<Event> = Api::<Event>::default_namespaced(client).list(&ListParams::default()).await.unwrap().items;
    assert_eq!(events.len(), 1, "repeats are folded into one event series");
    assert_eq!(events[0].reason.as_deref(), Some("BrokerUnsafe"));
}

#[tokio::test]
async fn status_server_side_apply_owns_status_fields_and_repeats_store_nothing() {
    let server = server();
    let pools = pools(server.client());
    pools.create(&PostParams::default(), &pool("p", json!({"app": "a", "queues": ["q"]}))).await.unwrap();
    let pp = PatchParams::apply("celery-operator").force();
    let status = json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "p"},
        "spec": {"concurrency": 42},
        "status": {"replicas": 2, "conditions": [{"type": "Ready", "status": "True"}]}});
    let applied = pools.patch_status("p", &pp, &Patch::Apply(&status)).await.unwrap();
    assert_eq!(applied.data["status"]["replicas"], 2);
    assert_eq!(applied.data["spec"]["concurrency"], 4, "status apply ignores spec");
    let entry = applied
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("celery-operator"))
        .unwrap();
    assert_eq!(entry.subresource.as_deref(), Some("status"));
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
    let before = server.resource_version();
    pools.patch_status("p", &pp, &Patch::Apply(&status)).await.unwrap();
    assert_eq!(server.resource_version(), before);
}

#[tokio::test]
async fn injected_latency_delays_only_matching_requests() {
    let server = server();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for name in ["slow", "fast"] {
        cms.create(&PostParams::default(), &cm(name, json!({}))).await.unwrap();
    }
    server.inject(Fault::latency(Duration::from_millis(300)).on(RequestMatch::any().verb(Verb::Get).name("slow")));
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
    let slow = {
        let (cms, tx) = (cms.clone(), order_tx.clone());
        tokio::spawn(async move {
            cms.get("slow").await.unwrap();
            tx.send("slow").unwrap();
        })
    };
    // Let the slow request reach its injected delay before the fast one is sent.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    cms.get("fast").await.unwrap();
    order_tx.send("fast").unwrap();
    slow.await.unwrap();
    assert_eq!(order_rx.recv().await, Some("fast"));
    assert_eq!(order_rx.recv().await, Some("slow"));
}

/// `ApiServer::observe` reports every change in order, transient states included, and is not a
/// client watch: `drop_watches` leaves it open and `open_watches` does not count it.
#[tokio::test]
async fn an_observer_sees_every_change_and_outlives_dropped_watches() {
    let server = server();
    let mut observer = server.observe("v1", "ConfigMap", Some("default")).unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &cm("a", json!({}))).await.unwrap();
    assert_eq!((server.open_watches(), server.drop_watches()), (0, 0));
    for value in ["1", "2", "3"] {
        cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": value}}))).await.unwrap();
    }
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (kind, obj) = tokio::time::timeout(DEADLINE, observer.next()).await.unwrap().unwrap();
        seen.push(format!("{kind} {}", obj["data"]["k"].as_str().unwrap_or_default()));
    }
    assert_eq!(seen, ["ADDED v", "MODIFIED 1", "MODIFIED 2", "MODIFIED 3", "DELETED 3"]);
}

/// A request delayed by a latency fault is in flight until answered, and in the log only then.
#[tokio::test]
async fn a_delayed_request_is_in_flight_until_answered() {
    let server = server();
    server.inject(Fault::latency(Duration::from_millis(300)).on(RequestMatch::any().verb(Verb::List)));
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let list = tokio::spawn(async move { cms.list(&ListParams::default()).await.map(|l| l.items.len()) });
    eventually("the list to be in flight", || server.requests_in_flight() == 1).await;
    assert_eq!(server.request_count(), 0);
    assert_eq!(list.await.unwrap().unwrap(), 0);
    assert_eq!((server.requests_in_flight(), server.request_count()), (0, 1));
}
