//! Label keys, annotation keys and field-manager names: one place for each.

/// `app.kubernetes.io/name` of every generated object.
pub const NAME_KEY: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`: the WorkerPool's name.
pub const INSTANCE_KEY: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/component`: worker or beat.
pub const COMPONENT_KEY: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";

/// Value of `app.kubernetes.io/name`.
pub const APP_NAME: &str = "celery";
/// Value of `app.kubernetes.io/managed-by`, also the operator's reporting controller name.
pub const MANAGER: &str = "celery-operator";

/// Field manager of everything the reconciler applies (server-side apply): the Deployments but
/// their autoscaled `spec.replicas`, and the reconciler's half of WorkerPool status.
pub const FIELD_MANAGER: &str = "celery-operator";
/// Field manager of the autoscaler: an autoscaled worker Deployment's `spec.replicas` (see
/// [`crate::replicas`]) and the autoscaler's half of WorkerPool status (see [`crate::status`]).
pub const AUTOSCALER_FIELD_MANAGER: &str = "celery-operator-autoscaler";

/// Component value of worker Deployments.
pub const WORKER: &str = "worker";
/// Component value of beat Deployments.
pub const BEAT: &str = "beat";

/// Label selector that matches every object this operator generates.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_KEY}={MANAGER}")
}
