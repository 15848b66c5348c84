//! The project's generated CRDs (crds/) and examples (examples/) go through the double's
//! admission as they would through a real API server.

use std::path::Path;

use celery_e2e::ApiServer;
use serde_json::json;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn server_with_project_crds() -> Option<ApiServer> {
    let crds = Path::new(ROOT).join("crds");
    let server = ApiServer::new();
    match server.load_crds_from_dir(&crds) {
        Ok(n) if n > 0 => Some(server),
        other => {
            eprintln!("skipping: no CRDs loaded from {}: {other:?}", crds.display());
            None
        }
    }
}

#[test]
fn every_example_is_admitted_by_the_generated_crds() {
    let Some(server) = server_with_project_crds() else { return };
    let examples = Path::new(ROOT).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut admitted = 0;
    for file in files.iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        for doc in celery_e2e::apiserver::read_documents(file).unwrap() {
            let stored = server
                .create(doc.clone())
                .unwrap_or_else(|e| panic!("{} {}: {e}", file.display(), doc["metadata"]["name"]));
            assert_eq!(stored["metadata"]["generation"].as_i64().or(Some(1)), Some(1));
            admitted += 1;
        }
    }
    assert!(admitted > 0);
}

#[test]
fn a_broker_url_with_a_password_is_refused_by_the_crd_rules() {
    let Some(server) = server_with_project_crds() else { return };
    let queue = json!({
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": "leaky", "namespace": "default"},
        "spec": {"broker": {"url": "redis://user:secret@redis:6379/0"}},
    });
    let err = server.create(queue).unwrap_err().to_string();
    assert!(err.contains("422"), "{err}");
    assert!(err.contains("spec.broker.url"), "{err}");
}
