//! Which queues' list lengths the waiting script reads, and which go as plain `LLEN` commands.
//!
//! The waiting script takes the `LLEN` of every list itself (cheaper than thousands of pipelined
//! commands, BENCHMARKS-broker.md), but a script fails as a whole: Redis checks an `EVALSHA`'s keys
//! against the user's ACL key patterns before running it (one forbidden queue: `NOPERM` for all),
//! a key of another type aborts it with `WRONGTYPE`, and a user may not be allowed scripts at all.
//! A queue that cannot be read must fail alone, with its own finding, and the probe must stay one
//! round trip. So the probe remembers what it learnt:
//! - queues whose `LLEN`s failed for that queue alone are read with `LLEN` commands in the same
//!   pipeline (not by the script), until an `LLEN` of theirs succeeds again;
//! - when the script failed and no queue's `LLEN` explains it, every queue's `LLEN`s go in the
//!   pipeline too, and the script is still tried each poll, so it is used again once it runs.
//!
//! Only the poll that first meets such a failure costs a second round trip (the `LLEN`s of the
//! script's queues, to tell which queue failed). Pure: no I/O.

use std::collections::BTreeSet;

use crate::safety::QueueFailure;

/// What the probe learnt about reading list lengths (see the module docs).
#[derive(Debug, Default)]
pub(super) struct LengthReads {
    /// Queues whose lists the script cannot read.
    direct: BTreeSet<String>,
    /// The script failed last time although no queue's `LLEN` did.
    script_failing: bool,
}

/// One poll's split of the queues (indices into the probed queues, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// Queues whose lists go to the waiting script.
    pub scripted: Vec<usize>,
    /// Queues whose lists get `LLEN` commands in the pipeline.
    pub counted: Vec<usize>,
}

impl LengthReads {
    pub fn plan(&self, queues: &[&str]) -> Plan {
        let direct = |q: &str| self.direct.contains(q);
        Plan {
            scripted: (0..queues.len()).filter(|&i| !direct(queues[i])).collect(),
            counted: (0..queues.len()).filter(|&i| self.script_failing || direct(queues[i])).collect(),
        }
    }

    /// Records one poll: `ready[i]` is what the `LLEN`s (or the script) said of queue `i` (`None`:
    /// nothing), `script_ran` whether the waiting script answered. Returns whether the script
    /// fails for a reason of its own: it failed, and either it already did or none of its queues
    /// failing alone explains it.
    pub fn record(
        &mut self,
        queues: &[&str],
        plan: &Plan,
        ready: &[Option<Result<u64, QueueFailure>>],
        script_ran: bool,
    ) -> bool {
        for (queue, read) in queues.iter().zip(ready) {
            match read {
                Some(Err(_)) => {
                    self.direct.insert((*queue).to_owned());
                }
                Some(Ok(_)) => {
                    self.direct.remove(*queue);
                }
                None => {}
            }
        }
        let explained = plan.scripted.iter().any(|&i| matches!(ready[i], Some(Err(_))));
        self.script_failing = !script_ran && (self.script_failing || !explained);
        self.script_failing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUES: [&str; 3] = ["emails", "secret", "reports"];

    fn forbidden() -> Option<Result<u64, QueueFailure>> {
        Some(Err(QueueFailure::Forbidden("NOPERM".into())))
    }

    #[test]
    fn a_queue_that_failed_alone_is_counted_outside_the_script_until_it_reads_again() {
        let mut reads = LengthReads::default();
        let first = reads.plan(&QUEUES);
        assert_eq!(first, Plan { scripted: vec![0, 1, 2], counted: vec![] });
        // The script failed (NOPERM for all); the fallback LLENs show which queue it was.
        let failing_alone = reads.record(&QUEUES, &first, &[Some(Ok(2)), forbidden(), Some(Ok(0))], false);
        assert!(!failing_alone);
        let steady = reads.plan(&QUEUES);
        assert_eq!(steady, Plan { scripted: vec![0, 2], counted: vec![1] });
        // Still forbidden: nothing changes, the script ran for the others.
        assert!(!reads.record(&QUEUES, &steady, &[Some(Ok(2)), forbidden(), Some(Ok(0))], true));
        assert_eq!(reads.plan(&QUEUES), steady);
        // Access granted: its LLEN succeeds, and the script takes it back.
        reads.record(&QUEUES, &steady, &[Some(Ok(2)), Some(Ok(5)), Some(Ok(0))], true);
        assert_eq!(reads.plan(&QUEUES), first);
    }

    #[test]
    fn a_script_failing_on_its_own_puts_every_queue_in_the_pipeline_until_it_runs() {
        let mut reads = LengthReads::default();
        let first = reads.plan(&QUEUES);
        // Scripting not permitted: every fallback LLEN succeeded.
        assert!(reads.record(&QUEUES, &first, &[Some(Ok(1)), Some(Ok(2)), Some(Ok(3))], false));
        let steady = reads.plan(&QUEUES);
        assert_eq!(steady, Plan { scripted: vec![0, 1, 2], counted: vec![0, 1, 2] });
        assert!(reads.record(&QUEUES, &steady, &[Some(Ok(1)), Some(Ok(2)), Some(Ok(3))], false));
        // A queue failing meanwhile is still excluded from the script.
        assert!(reads.record(&QUEUES, &steady, &[Some(Ok(1)), forbidden(), Some(Ok(3))], false));
        assert_eq!(reads.plan(&QUEUES), Plan { scripted: vec![0, 2], counted: vec![0, 1, 2] });
        // Scripting allowed again.
        let plan = reads.plan(&QUEUES);
        assert!(!reads.record(&QUEUES, &plan, &[Some(Ok(1)), forbidden(), Some(Ok(3))], true));
        assert_eq!(reads.plan(&QUEUES), Plan { scripted: vec![0, 2], counted: vec![1] });
    }
}
