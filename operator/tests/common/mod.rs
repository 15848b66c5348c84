//! Helpers shared by the operator's integration tests.

pub mod e2e;

use std::time::Duration;

/// Polls `check` until it holds, failing with `what` after a generous deadline (no fixed sleeps).
#[allow(dead_code)]
pub async fn poll<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached within the deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal KEDA ScaledObject CRD (keda.sh/v1alpha1), so the double serves ScaledObjects as a
/// cluster with KEDA installed does.
#[allow(dead_code)]
pub fn keda_scaled_object_crd() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "scaledobjects.keda.sh"},
        "spec": {
            "group": "keda.sh",
            "scope": "Namespaced",
            "names": {"plural": "scaledobjects", "singular": "scaledobject", "kind": "ScaledObject",
                      "listKind": "ScaledObjectList", "shortNames": ["so"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object",
                                     "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    })
}

/// Creates `doc` (a resource of kind `K`, as JSON) in namespace `prod`, as a user's `kubectl apply`.
#[allow(dead_code)]
pub async fn create_in_prod<K>(client: &kube::Client, doc: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(doc).expect("fixture matches the type");
    kube::Api::<K>::namespaced(client.clone(), "prod").create(&Default::default(), &obj).await.expect("created")
}

/// Parses `celery-operator check-broker -o json` output and validates it against the schema it
/// documents, docs/check-broker.schema.json.
#[allow(dead_code)]
pub fn check_broker_json(out: &std::process::Output) -> serde_json::Value {
    let schema_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/check-broker.schema.json");
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let validator = jsonschema::validator_for(&schema).expect("the documented schema compiles");
    let errors: Vec<String> =
        validator.iter_errors(&report).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "output breaks docs/check-broker.schema.json: {errors:?}\n{report:#}");
    report
}
