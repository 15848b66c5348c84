//! celery-operator: a Kubernetes operator and autoscaler for Celery worker fleets.

pub mod api;
pub mod autoscale;
pub mod broker_config;
pub mod brokers;
pub mod cache;
pub mod check_broker;
pub mod client;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod deployment;
pub mod events;
pub mod http;
pub mod labels;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod probe;
pub mod reconcile;
pub mod render;
pub mod replicas;
pub mod secrets;
pub mod status;
pub mod validate;
