//! `metav1.Status` failures, shaped like the real server's so clients classify them correctly.

use serde_json::{Value, json};

use super::resources::ResourceType;
use crate::admission::FieldError;

/// A failed request: HTTP code, `reason`, message and optional `details`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError { code, reason: reason.to_string(), message: message.into(), details: None }
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", rt.qualified_name())).with_details(rt, name)
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", rt.qualified_name()))
            .with_details(rt, name)
    }

    /// Optimistic-concurrency failure on a stale `metadata.resourceVersion`.
    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                rt.qualified_name()
            ),
        )
        .with_details(rt, name)
    }

    pub fn invalid(rt: &ResourceType, name: &str, causes: &[FieldError]) -> Self {
        let summary = match causes {
            [one] => one.to_string(),
            many => format!("[{}]", many.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let mut err =
            ApiError::new(422, "Invalid", format!("{} \"{name}\" is invalid: {summary}", rt.qualified_kind()));
        err.details = Some(json!({
            "name": name,
            "group": rt.group,
            "kind": rt.kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
        }));
        err
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        ApiError::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        ApiError::new(415, "UnsupportedMediaType", message)
    }

    pub fn not_found_path(path: &str) -> Self {
        ApiError::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "InternalError", message)
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Success Status for deletions of objects that are gone at once.
pub fn deleted_status(rt: &ResourceType, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": uid},
    })
}
