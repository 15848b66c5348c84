//! Applying YAML to the stack's API (the double or the cluster) with the stack's rewrites, and
//! reading objects back.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Scope};
use serde_json::{Value, json};

use super::{FIELD_MANAGER, RESULTS_SECRET, Result, Stack, StackError, io};

impl Stack {
    /// The stack's own rewrites, applied to every document before the caller's:
    /// - every `redis://` / `rediss://` value in a Secret's `stringData` becomes the stack's broker
    ///   URL (so the examples' `redis://:change-me@redis:6379/0` points at the test Redis);
    /// - every WorkerPool gets `CELERY_RESULT_BACKEND` from the [`RESULTS_SECRET`] Secret in its
    ///   template env (unless it sets it), so task results can be read back;
    /// - in cluster mode every WorkerPool's image becomes `E2E_WORKER_IMAGE`.
    pub fn rewrite(&self, doc: &mut Value) {
        match doc["kind"].as_str() {
            Some("Secret") => {
                if let Some(data) = doc.get_mut("stringData").and_then(Value::as_object_mut) {
                    for value in data.values_mut() {
                        if value.as_str().is_some_and(|v| v.starts_with("redis://") || v.starts_with("rediss://")) {
                            *value = Value::String(self.broker_url.clone());
                        }
                    }
                }
            }
            Some("WorkerPool") => {
                let spec = &mut doc["spec"];
                if let Some(image) = &self.worker_image {
                    spec["image"] = json!(image);
                }
                if !spec["template"].is_object() {
                    spec["template"] = json!({});
                }
                let template = &mut spec["template"];
                if !template["env"].is_array() {
                    template["env"] = json!([]);
                }
                let env = template["env"].as_array_mut().expect("env is a list");
                if !env.iter().any(|e| e["name"] == "CELERY_RESULT_BACKEND") {
                    env.push(json!({"name": "CELERY_RESULT_BACKEND",
                        "valueFrom": {"secretKeyRef": {"name": RESULTS_SECRET, "key": "url"}}}));
                }
            }
            _ => {}
        }
    }

    /// Applies every document of a multi-document YAML string with server-side apply (field
    /// manager [`FIELD_MANAGER`], force), after [`Stack::rewrite`] and the configured rewrites.
    /// Namespaced objects without a namespace go to [`Stack::namespace`]. Returns the objects as
    /// stored. Stops at the first document the API refuses (its error carries the API's message).
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<Value>> {
        self.apply_yaml_with(yaml, |_| {}).await
    }

    /// [`Stack::apply_yaml`] with one more rewrite for this call only (applied last).
    pub async fn apply_yaml_with(&self, yaml: &str, f: impl Fn(&mut Value)) -> Result<Vec<Value>> {
        let mut docs = parse_yaml(yaml)?;
        for doc in &mut docs {
            self.rewrite(doc);
            for r in &self.config.rewrites {
                r(doc);
            }
        }
        self.apply_docs(docs, &f).await
    }

    /// [`Stack::apply_yaml`] of a file.
    pub async fn apply_file(&self, path: impl AsRef<Path>) -> Result<Vec<Value>> {
        self.apply_file_with(path, |_| {}).await
    }

    /// [`Stack::apply_yaml_with`] of a file.
    pub async fn apply_file_with(&self, path: impl AsRef<Path>, f: impl Fn(&mut Value)) -> Result<Vec<Value>> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(io(format!("read {}", path.display())))?;
        self.apply_yaml_with(&text, f).await
    }

    pub(super) async fn apply_docs(&self, docs: Vec<Value>, f: &dyn Fn(&mut Value)) -> Result<Vec<Value>> {
        let mut applied = Vec::with_capacity(docs.len());
        for mut doc in docs {
            f(&mut doc);
            let (resource, namespaced) = self.resource_of(&doc).await?;
            let name = doc["metadata"]["name"]
                .as_str()
                .ok_or_else(|| StackError::Invalid(format!("a {} without metadata.name", resource.kind)))?
                .to_string();
            let api: Api<DynamicObject> = if namespaced {
                let ns = doc["metadata"]["namespace"].as_str().unwrap_or(&self.namespace).to_string();
                doc["metadata"]["namespace"] = json!(ns);
                Api::namespaced_with(self.client.clone(), &ns, &resource)
            } else {
                Api::all_with(self.client.clone(), &resource)
            };
            let stored = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&doc)).await?;
            applied.push(serde_json::to_value(stored).map_err(|e| StackError::Invalid(e.to_string()))?);
        }
        Ok(applied)
    }

    /// The API resource of a document's apiVersion/kind, by discovery (cached), and whether it
    /// is namespaced.
    pub async fn resource_of(&self, doc: &Value) -> Result<(ApiResource, bool)> {
        let (Some(api_version), Some(kind)) = (doc["apiVersion"].as_str(), doc["kind"].as_str()) else {
            return Err(StackError::Invalid("a document without apiVersion or kind".into()));
        };
        let key = format!("{api_version}/{kind}");
        if let Some(found) = self.resources.lock().expect("resources lock").get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk).await?;
        let found = (resource, caps.scope == Scope::Namespaced);
        self.resources.lock().expect("resources lock").insert(key, found.clone());
        Ok(found)
    }

    /// Pods in the stack's namespace matching a label selector.
    pub async fn pods(&self, selector: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(pods.list(&ListParams::default().labels(selector)).await?.items)
    }
}

pub(super) fn parse_yaml(yaml: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| StackError::Invalid(format!("invalid YAML: {e}")))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}
