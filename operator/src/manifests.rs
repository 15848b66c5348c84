//! TaskQueues, WorkerPools and Secrets read from YAML files, offline, validated with the CRDs' own
//! CEL rules — what `render` and `check-broker --file` start from, so a GitOps repository is read
//! exactly as the API server would admit it.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use serde_json::Value;

use crate::crd::{TaskQueue, WorkerPool};
use crate::validate::{self, FieldError};

/// A problem in the input, naming the file, the object and the field.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {object}: {message}")]
pub struct ManifestError {
    /// File (and document index) the object came from.
    pub source_name: String,
    /// `Kind name`, or `-` for a whole file.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

/// An object and the file (and document index) it came from.
#[derive(Clone, Debug)]
pub struct Loaded<T> {
    pub source_name: String,
    pub object: T,
}

/// The objects of interest found in a set of YAML documents; other kinds are skipped.
#[derive(Default, Debug)]
pub struct Manifests {
    pub task_queues: Vec<Loaded<TaskQueue>>,
    pub worker_pools: Vec<Loaded<WorkerPool>>,
    /// Secrets (e.g. a local or decrypted copy), looked up by `check-broker` for `urlFrom`.
    pub secrets: Vec<Secret>,
}

/// Reads every `.yaml`/`.yml` file under `paths` (files or directories, sorted) as
/// `(file name, text)` pairs.
pub fn read_paths(paths: &[PathBuf]) -> Result<Vec<(String, String)>, ManifestError> {
    let mut files = Vec::new();
    for path in paths {
        collect_yaml(path, &mut files).map_err(|e| io_error(path, e))?;
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|e| io_error(&file, e))?;
            Ok((file.display().to_string(), text))
        })
        .collect()
}

fn io_error(path: &Path, e: std::io::Error) -> ManifestError {
    ManifestError { source_name: path.display().to_string(), object: "-".into(), message: e.to_string() }
}

fn collect_yaml(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        entries.sort();
        for entry in entries {
            collect_yaml(&entry, out)?;
        }
    } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") || !path.exists() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Parses and validates `(source name, YAML text)` pairs. Objects without a namespace get
/// `default_namespace`, as `kubectl apply -n` would. Every problem is reported, not just the first.
pub fn parse_documents(sources: &[(String, String)], default_namespace: &str) -> (Manifests, Vec<ManifestError>) {
    let mut errors = Vec::new();
    let mut found = Manifests::default();
    for (name, text) in sources {
        let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(docs) => docs,
            Err(e) => {
                errors.push(ManifestError {
                    source_name: name.clone(),
                    object: "-".into(),
                    message: format!("not valid YAML: {e}"),
                });
                continue;
            }
        };
        for (i, doc) in docs.into_iter().enumerate().filter(|(_, d)| !d.is_null()) {
            let source_name = format!("{name}#{i}");
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
            let label =
                format!("{kind} {}", doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<unnamed>"));
            let problem = match kind.as_str() {
                "TaskQueue" => parse::<TaskQueue>(doc, default_namespace).and_then(|q| {
                    accept(validate::check_task_queue(&q))?;
                    found.task_queues.push(Loaded { source_name: source_name.clone(), object: q });
                    Ok(())
                }),
                "WorkerPool" => parse::<WorkerPool>(doc, default_namespace).and_then(|p| {
                    accept(validate::check_worker_pool(&p))?;
                    found.worker_pools.push(Loaded { source_name: source_name.clone(), object: p });
                    Ok(())
                }),
                "Secret" => parse::<Secret>(doc, default_namespace).map(|s| found.secrets.push(s)),
                _ => Ok(()),
            };
            if let Err(message) = problem {
                errors.push(ManifestError { source_name, object: label, message });
            }
        }
    }
    (found, errors)
}

fn accept(errors: Vec<FieldError>) -> Result<(), String> {
    if errors.is_empty() { Ok(()) } else { Err(validate::describe(&errors)) }
}

/// Parses a document into a resource, defaulting the namespace as kubectl would.
fn parse<K: serde::de::DeserializeOwned>(mut doc: Value, default_namespace: &str) -> Result<K, String> {
    if doc.pointer("/metadata/namespace").is_none()
        && let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.insert("namespace".into(), default_namespace.into());
    }
    serde_json::from_value(doc).map_err(|e| format!("does not match the schema: {e}"))
}
