//! `celery-operator render`: the Deployments the operator would create from TaskQueue and WorkerPool
//! YAML, offline, for GitOps review and CI diffs. Same validation and builders as the reconciler.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kube::ResourceExt;
use serde_json::Value;

use crate::crd::{TaskQueue, WorkerPool};
use crate::deployment;
use crate::reconcile::workerpool::{beat_holder, resolve_inputs};
use crate::validate::{self, FieldError};

/// A problem in the input, naming the file, the object and the field.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {object}: {message}")]
pub struct RenderError {
    /// File (and document index) the object came from.
    pub source_name: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

struct Loaded<T> {
    source_name: String,
    object: T,
}

/// Reads every `.yaml`/`.yml` file under `paths` (files or directories, sorted) and renders the
/// Deployments. Documents of other kinds are skipped. All problems are reported, not just the first.
pub fn render_paths(paths: &[PathBuf]) -> Result<String, Vec<RenderError>> {
    let mut files = Vec::new();
    for path in paths {
        collect_yaml(path, &mut files).map_err(|e| vec![io_error(path, e)])?;
    }
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| vec![io_error(&file, e)])?;
        docs.push((file.display().to_string(), text));
    }
    render_documents(&docs)
}

fn io_error(path: &Path, e: std::io::Error) -> RenderError {
    RenderError { source_name: path.display().to_string(), object: "-".into(), message: e.to_string() }
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

/// Renders from in-memory `(source name, YAML text)` pairs.
pub fn render_documents(sources: &[(String, String)]) -> Result<String, Vec<RenderError>> {
    let mut errors = Vec::new();
    let mut queues: Vec<Loaded<TaskQueue>> = Vec::new();
    let mut pools: Vec<Loaded<WorkerPool>> = Vec::new();
    for (name, text) in sources {
        let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(docs) => docs,
            Err(e) => {
                errors.push(RenderError {
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
                "TaskQueue" => parse::<TaskQueue>(doc).and_then(|q| {
                    accept(validate::check_task_queue(&q))?;
                    queues.push(Loaded { source_name: source_name.clone(), object: q });
                    Ok(())
                }),
                "WorkerPool" => parse::<WorkerPool>(doc).and_then(|p| {
                    accept(validate::check_worker_pool(&p))?;
                    pools.push(Loaded { source_name: source_name.clone(), object: p });
                    Ok(())
                }),
                _ => Ok(()),
            };
            if let Err(message) = problem {
                errors.push(RenderError { source_name, object: label, message });
            }
        }
    }
    let all_pools: Vec<WorkerPool> = pools.iter().map(|p| p.object.clone()).collect();
    let mut out = String::new();
    for Loaded { source_name, object: pool } in &pools {
        let ns = pool.namespace();
        let found: Vec<Option<TaskQueue>> = pool
            .spec
            .queues
            .iter()
            .map(|name| {
                queues
                    .iter()
                    .find(|q| q.object.name_any() == *name && q.object.namespace() == ns)
                    .map(|q| q.object.clone())
            })
            .collect();
        let inputs = match resolve_inputs(pool, &found) {
            Ok(inputs) => inputs,
            Err(blocked) => {
                errors.push(RenderError {
                    source_name: source_name.clone(),
                    object: format!("WorkerPool {}", pool.name_any()),
                    message: blocked.message,
                });
                continue;
            }
        };
        let header =
            format!("# Source: {source_name} WorkerPool {}/{}\n", ns.as_deref().unwrap_or("default"), pool.name_any());
        push_yaml(&mut out, &header, &deployment::worker_deployment(pool, &inputs));
        if pool.spec.beat.enabled {
            match beat_holder(pool, &all_pools) {
                None => push_yaml(&mut out, &header, &deployment::beat_deployment(pool, &inputs)),
                Some(holder) => {
                    let _ = writeln!(
                        out,
                        "# WorkerPool {} runs no beat: WorkerPool {holder} holds beat for app {}",
                        pool.name_any(),
                        pool.spec.app
                    );
                }
            }
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

fn accept(errors: Vec<FieldError>) -> Result<(), String> {
    if errors.is_empty() { Ok(()) } else { Err(validate::describe(&errors)) }
}

/// Parses a document into a resource, defaulting the namespace as kubectl would.
fn parse<K: serde::de::DeserializeOwned + kube::Resource>(mut doc: Value) -> Result<K, String> {
    if doc.pointer("/metadata/namespace").is_none()
        && let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.insert("namespace".into(), "default".into());
    }
    serde_json::from_value(doc).map_err(|e| format!("does not match the schema: {e}"))
}

fn push_yaml<T: serde::Serialize>(out: &mut String, header: &str, object: &T) {
    out.push_str("---\n");
    out.push_str(header);
    out.push_str(&serde_saphyr::to_string(object).expect("objects serialize to YAML"));
}
