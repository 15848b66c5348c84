//! Spec checks that run without an API server: the CRDs' own CEL rules, evaluated locally, so that
//! `celery-operator render` and the reconciler refuse exactly what the API server refuses.

use std::fmt;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde::Serialize;

use crate::crd::{TaskQueue, WorkerPool};

/// A problem with one field of a custom resource, phrased for the user who wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.autoscaling`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Joins field errors into one message for a condition or an error.
pub fn describe(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn compiled<K: CustomResourceExt>(cell: &'static OnceLock<CompiledSchema>) -> &'static CompiledSchema {
    cell.get_or_init(|| {
        let crd = K::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("derived CRDs carry an openAPIV3Schema");
        compile_schema(&serde_json::to_value(schema).expect("a schema serializes"))
    })
}

fn check_cel<K: CustomResourceExt + Serialize>(obj: &K, schema: &CompiledSchema) -> Vec<FieldError> {
    let value = match serde_json::to_value(obj) {
        Ok(value) => value,
        Err(e) => return vec![FieldError::new("", format!("cannot be serialized: {e}"))],
    };
    match Validator::new().validate_compiled(schema, &value, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| FieldError::new(e.field_path.clone(), e.message.clone())).collect(),
    }
}

/// Checks a WorkerPool against the CEL rules of its CRD.
pub fn check_worker_pool(pool: &WorkerPool) -> Vec<FieldError> {
    static SCHEMA: OnceLock<CompiledSchema> = OnceLock::new();
    check_cel(pool, compiled::<WorkerPool>(&SCHEMA))
}

/// Checks a TaskQueue against the CEL rules of its CRD.
pub fn check_task_queue(queue: &TaskQueue) -> Vec<FieldError> {
    static SCHEMA: OnceLock<CompiledSchema> = OnceLock::new();
    check_cel(queue, compiled::<TaskQueue>(&SCHEMA))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> WorkerPool {
        serde_saphyr::from_str(yaml).expect("test fixture parses")
    }

    const BASE: &str = "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: mail, namespace: default}\nspec:\n  app: proj.celery_app\n  image: example/proj:1\n  queues: [emails]\n";

    #[test]
    fn a_minimal_pool_passes() {
        assert_eq!(check_worker_pool(&pool(BASE)), vec![]);
    }

    #[test]
    fn min_above_max_is_refused_with_the_field() {
        let p = pool(&format!("{BASE}  autoscaling: {{minReplicas: 5, maxReplicas: 2}}\n"));
        let errors = check_worker_pool(&p);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.autoscaling");
        assert!(errors[0].message.contains("minReplicas must be less than or equal to maxReplicas"));
    }

    #[test]
    fn beat_flag_in_extra_args_is_refused() {
        for arg in ["-B", "--beat", "--purge", "-Qother", "--queues=x", "-c4", "--concurrency", "-A", "-P", "-n"] {
            let p = pool(&format!("{BASE}  worker: {{extraArgs: ['{arg}']}}\n"));
            let errors = check_worker_pool(&p);
            assert_eq!(errors.len(), 1, "{arg}: {errors:?}");
            assert_eq!(errors[0].field, "spec.worker.extraArgs", "{arg}");
        }
    }

    #[test]
    fn harmless_extra_args_pass() {
        let p = pool(&format!(
            "{BASE}  worker: {{extraArgs: ['-Ofair', '-E', '--loglevel=DEBUG', '--without-heartbeat']}}\n"
        ));
        assert_eq!(check_worker_pool(&p), vec![]);
    }
}
