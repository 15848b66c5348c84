//! Kubernetes API errors that name the call: verb, kind, `namespace/name` and the HTTP status.
//!
//! kube's own error says what the server answered ("NotFound") but not what was asked, so a log
//! line "reconcile failed … NotFound" cannot be acted on. Every API call of the operator goes
//! through [`Named::named`], which turns a `kube::Error` into an [`ApiError`] such as
//! `GET Deployment shop/mail-worker: HTTP 404 NotFound: deployments.apps "mail-worker" not found`.

use std::fmt;

/// A failed Kubernetes API call and what it was.
#[derive(Debug, thiserror::Error)]
#[error("{verb} {kind} {object}: {}", describe(.source))]
pub struct ApiError {
    /// HTTP verb or kube operation: GET, LIST, PATCH, DELETE, APPLY, APPLY status…
    pub verb: &'static str,
    /// The object's kind.
    pub kind: &'static str,
    /// `namespace/name`, or `namespace/*` for collections.
    pub object: String,
    /// What kube returned.
    #[source]
    pub source: kube::Error,
}

impl ApiError {
    /// The HTTP status code the API server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match &self.source {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        }
    }

    /// Whether the server said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
}

/// `HTTP <code> <reason>: <message>` for an answer from the API server; kube's text otherwise
/// (connection refused, timeout, a body that did not parse).
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let mut out = format!("HTTP {}", s.code);
            if !s.reason.is_empty() {
                out.push(' ');
                out.push_str(&s.reason);
            }
            if !s.message.is_empty() {
                out.push_str(": ");
                out.push_str(&s.message);
            }
            out
        }
        other => other.to_string(),
    }
}

/// Names the call that produced a `kube::Error`.
pub trait Named<T> {
    /// Attaches verb, kind and object to the error, if any.
    fn named(self, verb: &'static str, kind: &'static str, object: impl fmt::Display) -> Result<T, ApiError>;
}

impl<T> Named<T> for Result<T, kube::Error> {
    fn named(self, verb: &'static str, kind: &'static str, object: impl fmt::Display) -> Result<T, ApiError> {
        self.map_err(|source| ApiError { verb, kind, object: object.to_string(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, message: &str) -> kube::Error {
        let mut s = kube::core::Status::failure(message, reason);
        s.code = code;
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn an_api_error_names_verb_kind_object_and_status_code() {
        let e: Result<(), _> = Err(status(404, "NotFound", "deployments.apps \"mail-worker\" not found"));
        let e = e.named("GET", "Deployment", "shop/mail-worker").unwrap_err();
        assert_eq!(
            e.to_string(),
            "GET Deployment shop/mail-worker: HTTP 404 NotFound: deployments.apps \"mail-worker\" not found"
        );
        assert_eq!(e.code(), Some(404));
        assert!(e.is_not_found());
    }

    #[test]
    fn a_client_side_error_keeps_kubes_text_and_has_no_code() {
        let e: Result<(), _> = Err(kube::Error::LinesCodecMaxLineLengthExceeded);
        let e = e.named("LIST", "Pod", "shop/*").unwrap_err();
        assert!(e.to_string().starts_with("LIST Pod shop/*: "), "{e}");
        assert_eq!(e.code(), None);
    }
}
