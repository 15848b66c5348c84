//! From a TaskQueue's broker section to the probe's configuration — the one mapping the operator
//! and `celery-operator check-broker` share, so a broker is judged the same from both — and the
//! WorkerPool facts that change a verdict (pools that can scale to zero).

use std::time::Duration;

use celery_broker::{BrokerConfig, SafetyMode, SecretUrl};
use kube::ResourceExt;

use crate::crd::{BrokerSpec, SafetyCheck, TaskQueue, TransportOptions, WorkerPool};

/// The values a broker section references in Secrets (URL, management URL, CA), once read — from
/// the cluster by the operator, from the cluster, YAML or flags by `check-broker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedBroker {
    pub url: SecretUrl,
    pub management_url: Option<SecretUrl>,
    pub ca_cert_pem: Option<String>,
}

impl ResolvedBroker {
    /// A broker known by its URL alone.
    pub fn url(url: impl Into<SecretUrl>) -> Self {
        Self { url: url.into(), management_url: None, ca_cert_pem: None }
    }
}

/// Everything that makes two TaskQueues share a broker endpoint (and so one client and one probe):
/// the resolved URLs and CA, and the settings that change how the broker is read and judged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    url: String,
    management: Option<String>,
    ca: Option<String>,
    transport: String,
    safety: String,
}

impl EndpointKey {
    pub fn new(spec: &BrokerSpec, resolved: &ResolvedBroker) -> Self {
        Self {
            url: resolved.url.expose().to_owned(),
            management: resolved.management_url.as_ref().map(|m| m.expose().to_owned()),
            ca: resolved.ca_cert_pem.clone(),
            transport: format!("{:?}", spec.transport_options),
            safety: format!("{:?}", spec.safety_check),
        }
    }
}

/// The probe configuration of a TaskQueue's broker. Pure: no I/O, no defaults of its own beyond
/// the CRD's.
pub fn broker_config(spec: &BrokerSpec, resolved: &ResolvedBroker) -> BrokerConfig {
    BrokerConfig {
        management_url: resolved.management_url.clone(),
        ca_cert_pem: resolved.ca_cert_pem.clone(),
        transport: transport_options(&spec.transport_options),
        safety: safety_mode(spec.safety_check),
        ..BrokerConfig::new(resolved.url.clone())
    }
}

/// Kombu's transport options from the CRD's (whose schema already bounds them).
fn transport_options(options: &TransportOptions) -> celery_broker::TransportOptions {
    celery_broker::TransportOptions {
        global_keyprefix: options.global_key_prefix.clone(),
        priority_steps: options.priority_steps.iter().map(|&p| p.clamp(0, 255) as u8).collect(),
        separator: options.separator.clone(),
        visibility_timeout: Duration::from_secs(options.visibility_timeout_seconds.max(1) as u64),
        master_name: options.master_name.clone(),
    }
}

fn safety_mode(check: SafetyCheck) -> SafetyMode {
    match check {
        SafetyCheck::Warn => SafetyMode::Warn,
        SafetyCheck::Fix => SafetyMode::Fix,
        SafetyCheck::Off => SafetyMode::Off,
    }
}

/// Whether a pool can run with no worker at all: autoscaling down to `minReplicas: 0` (the
/// default), or a fixed `replicas: 0`.
pub fn can_scale_to_zero(pool: &WorkerPool) -> bool {
    match &pool.spec.autoscaling {
        Some(autoscaling) => autoscaling.min_replicas == 0,
        None => pool.spec.replicas == 0,
    }
}

/// `namespace/name` of every pool in `pools` that consumes `queue` (a TaskQueue, listed by name in
/// the pool's spec.queues within its namespace) and can scale to zero.
pub fn pools_reaching_zero(queue: &TaskQueue, pools: &[WorkerPool]) -> Vec<String> {
    pools
        .iter()
        .filter(|pool| pool.namespace() == queue.namespace() && pool.spec.queues.iter().any(|q| *q == queue.name_any()))
        .filter(|pool| can_scale_to_zero(pool))
        .map(|pool| format!("{}/{}", pool.namespace().unwrap_or_default(), pool.name_any()))
        .collect()
}

/// Turns the `QueueExpires` findings of `queue` into critical `QueueExpiresWhileScaledToZero` ones
/// where one of `pools` consuming it can scale to zero.
pub fn judge_expiry_with_pools(findings: &mut [celery_broker::Finding], queue: &TaskQueue, pools: &[WorkerPool]) {
    let reaching_zero = pools_reaching_zero(queue, pools);
    celery_broker::safety::escalate_expiring_queues(findings, |name| {
        if name == queue.queue_name() { reaching_zero.clone() } else { Vec::new() }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_broker::{Finding, Reason, Severity};

    fn queue(yaml: &str) -> TaskQueue {
        serde_saphyr::from_str(yaml).expect("fixture parses")
    }

    fn pool(name: &str, extra: &str) -> WorkerPool {
        let yaml = format!(
            "apiVersion: celery-operator.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: {name}, namespace: prod}}\n\
             spec: {{app: a, image: i, queues: [emails]{extra}}}\n"
        );
        serde_saphyr::from_str(&yaml).expect("fixture parses")
    }

    const EMAILS: &str = "apiVersion: celery-operator.dev/v1alpha1\nkind: TaskQueue\n\
        metadata: {name: emails, namespace: prod}\nspec:\n  queueName: mail\n  broker:\n    url: redis://r:6379/0\n";

    #[test]
    fn every_broker_field_reaches_the_probe_configuration() {
        let tq = queue(&format!(
            "{EMAILS}    safetyCheck: Fix\n    transportOptions: {{globalKeyPrefix: 'app:', prioritySteps: [0, 5], \
             separator: ':', visibilityTimeoutSeconds: 60, masterName: mymaster}}\n"
        ));
        let resolved = ResolvedBroker {
            url: "sentinel://:pw@s1:26379/0".into(),
            management_url: Some("http://m:15672".into()),
            ca_cert_pem: Some("PEM".into()),
        };
        let config = broker_config(&tq.spec.broker, &resolved);
        assert_eq!(config.url.expose(), "sentinel://:pw@s1:26379/0");
        assert_eq!(config.management_url.as_ref().map(SecretUrl::expose), Some("http://m:15672"));
        assert_eq!(config.ca_cert_pem.as_deref(), Some("PEM"));
        assert_eq!(config.safety, SafetyMode::Fix);
        let expected = celery_broker::TransportOptions {
            global_keyprefix: "app:".into(),
            priority_steps: vec![0, 5],
            separator: ":".into(),
            visibility_timeout: Duration::from_secs(60),
            master_name: Some("mymaster".into()),
        };
        assert_eq!(config.transport, expected);
        // The CRD's defaults are kombu's.
        let plain = broker_config(&queue(EMAILS).spec.broker, &ResolvedBroker::url("redis://r:6379/0"));
        assert_eq!(plain.transport, celery_broker::TransportOptions::default());
        assert_eq!(plain.safety, SafetyMode::Warn);
    }

    #[test]
    fn pools_that_can_reach_zero_make_an_expiring_queue_critical() {
        let tq = queue(EMAILS);
        let pools = [
            pool("autoscaled", ", autoscaling: {maxReplicas: 5}"),
            pool("floor", ", autoscaling: {minReplicas: 1, maxReplicas: 5}"),
            pool("fixed", ", replicas: 2"),
            pool("parked", ", replicas: 0"),
        ];
        assert_eq!(pools_reaching_zero(&tq, &pools), vec!["prod/autoscaled", "prod/parked"]);
        assert!(pools_reaching_zero(&tq, &pools[1..3]).is_empty());

        let expires = || vec![Finding::new(Reason::QueueExpires, Severity::Warning, "expires").for_queue("mail")];
        let mut findings = expires();
        judge_expiry_with_pools(&mut findings, &tq, &pools);
        assert_eq!(
            (findings[0].reason, findings[0].severity),
            (Reason::QueueExpiresWhileScaledToZero, Severity::Critical)
        );
        let mut findings = expires();
        judge_expiry_with_pools(&mut findings, &tq, &pools[1..3]);
        assert_eq!(findings[0].reason, Reason::QueueExpires);
    }
}
