//! celery-operator: a Kubernetes operator and autoscaler for Celery worker fleets.

pub mod conditions;
pub mod controller;
pub mod autoscale;
pub mod crd;
pub mod deployment;
pub mod http;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod redact;
pub mod render;
pub mod validate;
