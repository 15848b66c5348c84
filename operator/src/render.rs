//! `celery-operator render`: the Deployments the operator would create from TaskQueue and WorkerPool
//! YAML, offline, for GitOps review and CI diffs. Same validation and builders as the reconciler.

use std::fmt::Write as _;
use std::path::PathBuf;

use kube::ResourceExt;

use crate::crd::{TaskQueue, WorkerPool};
use crate::deployment;
use crate::manifests::{self, Loaded};
use crate::reconcile::workerpool::{beat_holder, resolve_inputs};

/// A problem in the input, naming the file, the object and the field.
pub use crate::manifests::ManifestError as RenderError;

/// Reads every `.yaml`/`.yml` file under `paths` (files or directories, sorted) and renders the
/// Deployments. Documents of other kinds are skipped. All problems are reported, not just the first.
pub fn render_paths(paths: &[PathBuf]) -> Result<String, Vec<RenderError>> {
    let docs = manifests::read_paths(paths).map_err(|e| vec![e])?;
    render_documents(&docs)
}

/// Renders from in-memory `(source name, YAML text)` pairs.
pub fn render_documents(sources: &[(String, String)]) -> Result<String, Vec<RenderError>> {
    let (found, mut errors) = manifests::parse_documents(sources, "default");
    let (queues, pools) = (found.task_queues, found.worker_pools);
    let all_pools: Vec<WorkerPool> = pools.iter().map(|p| p.object.clone()).collect();
    let mut out = String::new();
    for Loaded { source_name, object: pool } in &pools {
        let ns = pool.namespace();
        let found: Vec<Option<&TaskQueue>> = pool
            .spec
            .queues
            .iter()
            .map(|name| {
                queues.iter().find(|q| q.object.name_any() == *name && q.object.namespace() == ns).map(|q| &q.object)
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

fn push_yaml<T: serde::Serialize>(out: &mut String, header: &str, object: &T) {
    out.push_str("---\n");
    out.push_str(header);
    out.push_str(&serde_saphyr::to_string(object).expect("objects serialize to YAML"));
}
