//! Spec checks that run without an API server: the CRDs' own CEL rules, evaluated locally, so that
//! `celery-operator render` and the reconciler refuse exactly what the API server refuses.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

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

/// [`check_task_queue`] results by uid and generation. A TaskQueue is reconciled every status
/// interval (its broker numbers move), but its spec only changes with its generation, and CEL is
/// not free: at a thousand TaskQueues, evaluating the rules on every reconcile was a large part of
/// the operator's steady CPU.
#[derive(Debug, Default)]
pub struct Memo {
    /// By uid: the generation checked and what the check said.
    task_queues: Mutex<HashMap<String, Checked>>,
}

/// The generation of a TaskQueue that was checked, and the result.
type Checked = (Option<i64>, Vec<FieldError>);

impl Memo {
    /// What [`check_task_queue`] says of `tq`, evaluated once per generation.
    pub fn task_queue(&self, tq: &TaskQueue) -> Vec<FieldError> {
        let key =
            tq.metadata.uid.clone().unwrap_or_else(|| format!("{:?}/{:?}", tq.metadata.namespace, tq.metadata.name));
        let generation = tq.metadata.generation;
        let mut memo = self.task_queues.lock().expect("validation memo lock");
        if let Some((seen, errors)) = memo.get(&key)
            && *seen == generation
            && generation.is_some()
        {
            return errors.clone();
        }
        let errors = check_task_queue(tq);
        memo.insert(key, (generation, errors.clone()));
        errors
    }
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

    #[test]
    fn a_task_queues_rules_are_evaluated_once_per_generation() {
        let queue = |generation: i64, url: &str| -> TaskQueue {
            serde_saphyr::from_str(&format!(
                "apiVersion: celery-operator.dev/v1alpha1\nkind: TaskQueue\nmetadata: {{name: q, namespace: d, uid: u1, generation: {generation}}}\nspec:\n  broker: {{url: '{url}'}}\n"
            ))
            .expect("test fixture parses")
        };
        let memo = Memo::default();
        let leaking = queue(1, "redis://:hunter2@redis:6379/0");
        assert_eq!(memo.task_queue(&leaking), check_task_queue(&leaking), "the first call evaluates the rules");
        assert!(!memo.task_queue(&leaking).is_empty(), "a password in the URL is refused");
        // The same generation with another spec cannot happen on a server; the memo answers from
        // memory, which proves it does not evaluate again.
        let same_generation = queue(1, "redis://redis:6379/0");
        assert!(!memo.task_queue(&same_generation).is_empty(), "answered from the memo");
        assert!(memo.task_queue(&queue(2, "redis://redis:6379/0")).is_empty(), "a new generation is evaluated");
    }
}
