//! The kinds the double serves: built-in kinds from one table, custom kinds from CRD objects.

use std::sync::Arc;

use serde_json::Value;

use crate::admission::CompiledVersion;

/// Where the scale subresource finds replicas and the selector (JSON paths like `.spec.replicas`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    /// For CRDs a path to a string selector; for Deployments `.spec.selector` (a LabelSelector).
    pub label_selector: Option<String>,
}

/// One printer column of a CRD version (`additionalPrinterColumns`).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// Everything the double knows about one served resource (`deployments.apps`, `workerpools.celery-operator.dev`).
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    /// Served versions; the first is the storage version.
    pub versions: Vec<String>,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub scale: Option<ScalePaths>,
    /// Whether `metadata.generation` is maintained.
    pub generation: bool,
    /// Set for custom resources: the CRD name and per-version schema/printer columns.
    pub custom: Option<CustomInfo>,
}

#[derive(Debug, Clone)]
pub struct CustomInfo {
    pub crd_name: String,
    pub crd: Value,
    pub versions: Vec<(String, Arc<CompiledVersion>)>,
    pub printer_columns: Vec<(String, Vec<PrinterColumn>)>,
}

impl ResourceType {
    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.to_string(),
            versions: vec![version.to_string()],
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: kind.to_lowercase(),
            short_names: Vec::new(),
            categories: Vec::new(),
            namespaced,
            status_subresource: false,
            scale: None,
            generation: false,
            custom: None,
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    fn with_generation(mut self) -> Self {
        self.generation = true;
        self
    }

    fn all_category(mut self) -> Self {
        self.categories = vec!["all".to_string()];
        self
    }

    /// `deployments.apps`, or `pods` for the core group: the name used in error messages.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// `Deployment.apps` style, used in 422 messages (`WorkerPool.celery-operator.dev "x" is invalid`).
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() { self.kind.clone() } else { format!("{}.{}", self.kind, self.group) }
    }

    pub fn storage_version(&self) -> &str {
        &self.versions[0]
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() { version.to_string() } else { format!("{}/{}", self.group, version) }
    }

    pub fn key(&self) -> TypeKey {
        TypeKey { group: self.group.clone(), plural: self.plural.clone() }
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }

    pub fn compiled_version(&self, version: &str) -> Option<Arc<CompiledVersion>> {
        let custom = self.custom.as_ref()?;
        custom.versions.iter().find(|(v, _)| v == version).or_else(|| custom.versions.first()).map(|(_, c)| c.clone())
    }

    pub fn printer_columns(&self, version: &str) -> Option<&[PrinterColumn]> {
        let custom = self.custom.as_ref()?;
        custom.printer_columns.iter().find(|(v, _)| v == version).map(|(_, c)| c.as_slice())
    }

    pub fn subresources(&self) -> Vec<&'static str> {
        let mut subs = Vec::new();
        if self.status_subresource {
            subs.push("status");
        }
        if self.scale.is_some() {
            subs.push("scale");
        }
        if self.has_log() {
            subs.push("log");
        }
        subs
    }

    /// Pods serve `pods/log` (from the pod runner's log files).
    pub fn has_log(&self) -> bool {
        self.group.is_empty() && self.kind == "Pod"
    }
}

/// Identity of a resource type in the store (versions share storage).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TypeKey {
    pub group: String,
    pub plural: String,
}

/// The built-in kinds. Adding a kind is one line here.
pub fn builtin_types() -> Vec<ResourceType> {
    let b = ResourceType::builtin;
    vec![
        b("", "v1", "Namespace", "namespaces", false).short(&["ns"]).with_status(),
        b("", "v1", "Pod", "pods", true).short(&["po"]).with_status().all_category(),
        b("", "v1", "Secret", "secrets", true),
        b("", "v1", "ConfigMap", "configmaps", true).short(&["cm"]),
        b("", "v1", "Event", "events", true).short(&["ev"]),
        b("", "v1", "ServiceAccount", "serviceaccounts", true).short(&["sa"]),
        b("", "v1", "Service", "services", true).short(&["svc"]).with_status().all_category(),
        deployment(),
        b("events.k8s.io", "v1", "Event", "events", true).short(&["ev"]),
        b("coordination.k8s.io", "v1", "Lease", "leases", true),
        b("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", true)
            .short(&["hpa"])
            .with_status()
            .with_generation()
            .all_category(),
        b("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true)
            .short(&["pdb"])
            .with_status()
            .with_generation(),
        b("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", false)
            .short(&["crd", "crds"])
            .with_status()
            .with_generation(),
    ]
}

fn deployment() -> ResourceType {
    let mut d = ResourceType::builtin("apps", "v1", "Deployment", "deployments", true)
        .short(&["deploy"])
        .with_status()
        .with_generation()
        .all_category();
    d.scale = Some(ScalePaths {
        spec_replicas: ".spec.replicas".to_string(),
        status_replicas: ".status.replicas".to_string(),
        label_selector: Some(".spec.selector".to_string()),
    });
    d
}

/// Build the resource type a CRD object declares. Errors name the offending CRD field.
pub fn from_crd(crd: &Value) -> Result<ResourceType, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let group = str_at(spec, "group").ok_or("spec.group: Required value")?;
    let names = spec.get("names").ok_or("spec.names: Required value")?;
    let kind = str_at(names, "kind").ok_or("spec.names.kind: Required value")?;
    let plural = str_at(names, "plural").ok_or("spec.names.plural: Required value")?;
    let singular = str_at(names, "singular").unwrap_or(&kind.to_lowercase()).to_string();
    let expected_name = format!("{plural}.{group}");
    let crd_name = crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if crd_name != expected_name {
        return Err(format!(
            "metadata.name: Invalid value: \"{crd_name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let namespaced = match str_at(spec, "scope") {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => {
            return Err(format!(
                "spec.scope: Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""
            ));
        }
    };
    let list = |v: &Value, key: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let raw_versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or("spec.versions: Required value")?;
    // The storage version goes first; then the other served versions in declaration order.
    let mut ordered: Vec<&Value> =
        raw_versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).collect();
    if ordered.len() != 1 {
        return Err("spec.versions: Invalid value: must have exactly one version marked as storage version".into());
    }
    ordered.extend(raw_versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) != Some(true)));
    let mut versions = Vec::new();
    let mut compiled = Vec::new();
    let mut printer_columns = Vec::new();
    let mut status_subresource = false;
    let mut scale = None;
    for (i, v) in ordered.into_iter().enumerate() {
        let name = str_at(v, "name").ok_or("spec.versions[].name: Required value")?;
        let served = v.get("served").and_then(Value::as_bool).unwrap_or(false);
        if !served && i > 0 {
            continue;
        }
        let schema = v
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        let cv = CompiledVersion::compile(&schema)
            .map_err(|e| format!("spec.versions[{i}].schema.openAPIV3Schema: Invalid value: {e}"))?;
        versions.push(name.to_string());
        compiled.push((name.to_string(), Arc::new(cv)));
        printer_columns.push((name.to_string(), parse_printer_columns(v)));
        if i == 0 {
            let subs = v.get("subresources");
            status_subresource = subs.and_then(|s| s.get("status")).is_some();
            scale = subs.and_then(|s| s.get("scale")).map(|s| ScalePaths {
                spec_replicas: str_at(s, "specReplicasPath").unwrap_or(".spec.replicas").to_string(),
                status_replicas: str_at(s, "statusReplicasPath").unwrap_or(".status.replicas").to_string(),
                label_selector: str_at(s, "labelSelectorPath").map(String::from),
            });
        }
    }
    Ok(ResourceType {
        group: group.to_string(),
        versions,
        kind: kind.to_string(),
        plural: plural.to_string(),
        singular,
        short_names: list(names, "shortNames"),
        categories: list(names, "categories"),
        namespaced,
        status_subresource,
        scale,
        generation: true,
        custom: Some(CustomInfo { crd_name: expected_name, crd: crd.clone(), versions: compiled, printer_columns }),
    })
}

fn parse_printer_columns(version: &Value) -> Vec<PrinterColumn> {
    let Some(cols) = version.get("additionalPrinterColumns").and_then(Value::as_array) else {
        return Vec::new();
    };
    cols.iter()
        .filter_map(|c| {
            Some(PrinterColumn {
                name: str_at(c, "name")?.to_string(),
                type_: str_at(c, "type").unwrap_or("string").to_string(),
                format: str_at(c, "format").unwrap_or_default().to_string(),
                description: str_at(c, "description").unwrap_or_default().to_string(),
                priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                json_path: str_at(c, "jsonPath")?.to_string(),
            })
        })
        .collect()
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}
