//! Rough throughput and latency of the control-plane double (numbers for the README, not tests):
//! `cargo run -p celery-e2e --example bench [--release]`.

use std::time::{Duration, Instant};

use celery_e2e::ApiServer;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, WatchParams,
};
use serde_json::json;

fn per_second(n: usize, d: Duration) -> String {
    format!("{:>8.0}/s ({:.3} ms each)", n as f64 / d.as_secs_f64(), d.as_secs_f64() * 1000.0 / n as f64)
}

async fn creates(label: &str, prefix: &str, cms: &Api<ConfigMap>, n: usize) {
    let start = Instant::now();
    for i in 0..n {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("{prefix}-{i}")}, "data": {"k": "v"}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    println!("{label:<28} {}", per_second(n, start.elapsed()));
}

#[tokio::main]
async fn main() {
    let server = ApiServer::new();
    server.load_crds_from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds")).unwrap();
    let client = server.client();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    creates("create (in-process)", "inproc", &cms, 2000).await;

    let start = Instant::now();
    let mut pages = 0;
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(100);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    println!("{:<28} {} pages of 100 in {:?}", "paginated list of 2000", pages, start.elapsed());

    let deploys: Api<Deployment> = Api::default_namespaced(client.clone());
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"}, "spec": {"replicas": 2,
        "selector": {"matchLabels": {"app": "w"}}, "template": {"metadata": {"labels": {"app": "w"}},
        "spec": {"containers": [{"name": "w", "image": "w:1", "env": [{"name": "A", "value": "1"}]}]}}}});
    let pp = PatchParams::apply("bench").force();
    deploys.patch("w", &pp, &Patch::Apply(&d)).await.unwrap();
    let n = 1000;
    let start = Instant::now();
    for _ in 0..n {
        deploys.patch("w", &pp, &Patch::Apply(&d)).await.unwrap();
    }
    println!("{:<28} {}", "no-op server-side apply", per_second(n, start.elapsed()));

    let gvk = GroupVersionKind::gvk("celery-operator.dev", "v1alpha1", "WorkerPool");
    let pools: Api<DynamicObject> =
        Api::default_namespaced_with(client.clone(), &ApiResource::from_gvk_with_plural(&gvk, "workerpools"));
    let n = 300;
    let start = Instant::now();
    for i in 0..n {
        let pool: DynamicObject =
            serde_json::from_value(json!({"apiVersion": "celery-operator.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": format!("p{i}")}, "spec": {"app": "proj.celery", "image": "img:1", "queues": ["q"]}}))
            .unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
    }
    println!("{:<28} {}", "WorkerPool create (CEL)", per_second(n, start.elapsed()));

    let watched: Api<ConfigMap> = Api::namespaced(client.clone(), "watched");
    let mut stream = watched.watch(&WatchParams::default().disable_bookmarks(), "0").await.unwrap().boxed();
    let n = 300;
    let mut total = Duration::ZERO;
    for i in 0..n {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("w{i}")}})).unwrap();
        let start = Instant::now();
        watched.create(&PostParams::default(), &cm).await.unwrap();
        stream.next().await.unwrap().unwrap();
        total += start.elapsed();
    }
    println!("{:<28} {:.3} ms mean (create + event)", "watch event latency", total.as_secs_f64() * 1000.0 / n as f64);

    let served = server.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let http: Api<ConfigMap> = Api::namespaced(served.client().await.unwrap(), "http");
    creates("create (HTTP)", "http", &http, 500).await;
}
