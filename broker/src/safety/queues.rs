//! Findings about one queue that the probe could not read, and about queues that expire while
//! nothing consumes them. A queue that cannot be read is a finding on that queue; the rest of the
//! probe runs.

use super::{Finding, Reason, Severity, is_celery_internal_queue};

/// Why the broker would not let the probe read one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueFailure {
    /// RabbitMQ 405 `RESOURCE_LOCKED`: exclusive to another connection.
    Exclusive,
    /// RabbitMQ 403 `ACCESS_REFUSED`, Redis `NOPERM`.
    Forbidden(String),
    /// Anything else that concerns only this queue (a Redis key of the wrong type, a RabbitMQ
    /// channel error), with the broker's words.
    Unreadable(String),
}

/// The finding for a queue the probe could not read.
pub fn queue_failure_finding(queue: &str, failure: &QueueFailure) -> Finding {
    let finding = match failure {
        // Celery's remote-control mailbox (`celery@host.celery.pidbox`) is exclusive to its worker
        // by design (control_queue_exclusive, default True since Celery 5.7): not a task queue.
        QueueFailure::Exclusive if is_celery_internal_queue(queue) => Finding::new(
            Reason::QueueExclusive,
            Severity::Info,
            format!(
                "queue {queue} is Celery's remote-control mailbox, exclusive to its worker's \
                 connection: it holds no tasks and its depth cannot be read by anyone else; do not \
                 list it"
            ),
        ),
        QueueFailure::Exclusive => Finding::new(
            Reason::QueueExclusive,
            Severity::Warning,
            format!(
                "queue {queue} is exclusive to another connection (RESOURCE_LOCKED): its depth \
                 cannot be read, and RabbitMQ deletes it with its tasks when that connection closes; \
                 declare task queues non-exclusive"
            ),
        ),
        QueueFailure::Forbidden(detail) => Finding::new(
            Reason::QueueForbidden,
            Severity::Warning,
            format!(
                "the broker refused to let the probe read queue {queue} ({detail}): its depth and \
                 safety are unknown; grant the probe's user access to it (a Redis ACL key pattern \
                 covering its lists; on RabbitMQ, the authorisation backend's rules for the queue)"
            ),
        ),
        QueueFailure::Unreadable(detail) => Finding::new(
            Reason::QueueUnreadable,
            Severity::Warning,
            format!("queue {queue} could not be read ({detail}): its depth and safety are unknown"),
        ),
    };
    finding.for_queue(queue)
}

/// Raises every `QueueExpires` finding to `QueueExpiresWhileScaledToZero` (critical) where a
/// WorkerPool consuming the queue can scale to zero: with no consumer nothing keeps a RabbitMQ
/// queue in use, and on Redis nothing drains the lists before their TTL runs out.
/// `pools_reaching_zero(queue)` names those pools (empty when none can, or none is known).
pub fn escalate_expiring_queues(findings: &mut [Finding], pools_reaching_zero: impl Fn(&str) -> Vec<String>) {
    for finding in findings.iter_mut().filter(|f| f.reason == Reason::QueueExpires) {
        let Some(queue) = finding.queue.clone() else { continue };
        let pools = pools_reaching_zero(&queue);
        if pools.is_empty() {
            continue;
        }
        finding.reason = Reason::QueueExpiresWhileScaledToZero;
        finding.severity = Severity::Critical;
        finding.message = format!(
            "{}; WorkerPool {} consuming it can scale to zero, and then nothing keeps the queue \
             alive: keep minReplicas at 1 or more, or remove expires from the queue",
            finding.message,
            pools.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_mailboxes_are_exclusive_by_design_and_task_queues_are_not() {
        let mailbox = queue_failure_finding("celery@worker-1.celery.pidbox", &QueueFailure::Exclusive);
        assert_eq!((mailbox.reason, mailbox.severity), (Reason::QueueExclusive, Severity::Info));
        let tasks = queue_failure_finding("emails", &QueueFailure::Exclusive);
        assert_eq!((tasks.reason, tasks.severity), (Reason::QueueExclusive, Severity::Warning));
        assert_eq!(tasks.queue.as_deref(), Some("emails"));
        let forbidden = queue_failure_finding("emails", &QueueFailure::Forbidden("ACCESS_REFUSED".into()));
        assert_eq!((forbidden.reason, forbidden.severity), (Reason::QueueForbidden, Severity::Warning));
        assert!(forbidden.message.contains("ACCESS_REFUSED"));
    }

    #[test]
    fn expiring_queues_become_critical_only_where_a_pool_can_reach_zero() {
        let expires = |queue: &str| Finding::new(Reason::QueueExpires, Severity::Warning, "expires").for_queue(queue);
        let mut findings = vec![
            expires("emails"),
            expires("reports"),
            Finding::new(Reason::MemoryPressure, Severity::Warning, "full"),
        ];
        escalate_expiring_queues(&mut findings, |q| if q == "emails" { vec!["mail".into()] } else { vec![] });
        let seen: Vec<_> = findings.iter().map(|f| (f.reason, f.severity, f.queue.as_deref())).collect();
        assert_eq!(
            seen,
            vec![
                (Reason::QueueExpiresWhileScaledToZero, Severity::Critical, Some("emails")),
                (Reason::QueueExpires, Severity::Warning, Some("reports")),
                (Reason::MemoryPressure, Severity::Warning, None),
            ]
        );
        assert!(findings[0].message.contains("WorkerPool mail"), "{}", findings[0].message);
    }
}
