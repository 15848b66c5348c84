//! The table of workers heard from and when each counts as alive. No I/O, so the liveness window
//! and the memory bounds are tested without a broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{WorkerEvent, WorkerEventKind};

/// The shortest time a worker counts as alive after it was last heard from.
pub const MIN_ALIVE_WINDOW: Duration = Duration::from_secs(6);
/// Workers offline or silent this long are forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// At most this many workers are remembered per endpoint.
pub const MAX_WORKERS: usize = 10_000;

const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// One worker's latest state from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerState {
    /// The worker's node name (`-n`), e.g. `pool@pod-name`.
    pub hostname: String,
    /// Tasks executing at its last event.
    pub active: u32,
    pub processed: u64,
    pub freq: Duration,
    /// When its last event arrived here.
    pub last_seen: Instant,
    /// False once it announced `worker-offline` (until it announces itself again).
    pub online: bool,
}

impl WorkerState {
    /// Heard from within `max(3 × freq, 6 s)` before `now` and not announced offline.
    pub fn is_alive_at(&self, now: Instant) -> bool {
        self.online && now.saturating_duration_since(self.last_seen) <= (self.freq * 3).max(MIN_ALIVE_WINDOW)
    }
}

/// The remembered workers: pure state, driven by events and a clock.
#[derive(Debug, Default)]
pub(super) struct Registry {
    workers: HashMap<String, WorkerState>,
    last_prune: Option<Instant>,
}

impl Registry {
    /// Applies `event` received at `now`; false when it was dropped because the registry is full.
    pub(super) fn apply(&mut self, event: WorkerEvent, now: Instant) -> bool {
        if self.last_prune.is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY) {
            self.prune(now);
        }
        if !self.workers.contains_key(&event.hostname) && self.workers.len() >= MAX_WORKERS {
            self.prune(now);
            self.workers.retain(|_, w| w.is_alive_at(now));
            if self.workers.len() >= MAX_WORKERS {
                return false;
            }
        }
        let state = WorkerState {
            online: event.kind != WorkerEventKind::Offline,
            hostname: event.hostname,
            active: event.active,
            processed: event.processed,
            freq: event.freq,
            last_seen: now,
        };
        self.workers.insert(state.hostname.clone(), state);
        true
    }

    fn prune(&mut self, now: Instant) {
        self.workers.retain(|_, w| now.saturating_duration_since(w.last_seen) < FORGET_AFTER);
        self.last_prune = Some(now);
    }

    fn sorted(&self, keep: impl Fn(&WorkerState) -> bool) -> Vec<WorkerState> {
        let mut out: Vec<WorkerState> = self.workers.values().filter(|w| keep(w)).cloned().collect();
        out.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        out
    }

    pub(super) fn alive(&self, now: Instant) -> Vec<WorkerState> {
        self.sorted(|w| w.is_alive_at(now))
    }

    pub(super) fn remembered(&self, now: Instant) -> Vec<WorkerState> {
        self.sorted(|w| now.saturating_duration_since(w.last_seen) < FORGET_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(hostname: &str, active: u32, freq: f64) -> WorkerEvent {
        let freq = Duration::from_secs_f64(freq);
        WorkerEvent { kind: WorkerEventKind::Heartbeat, hostname: hostname.into(), active, processed: 0, freq }
    }

    #[test]
    fn alive_means_heard_within_three_heartbeats_or_six_seconds() {
        let t0 = Instant::now();
        let secs = Duration::from_secs_f64;
        let mut registry = Registry::default();
        registry.apply(heartbeat("fast@a", 1, 1.0), t0);
        registry.apply(heartbeat("normal@b", 2, 2.0), t0);
        registry.apply(heartbeat("slow@c", 3, 10.0), t0);
        let names = |at: Instant| registry.alive(at).into_iter().map(|w| w.hostname).collect::<Vec<_>>();
        assert_eq!(names(t0 + secs(5.9)), ["fast@a", "normal@b", "slow@c"]);
        assert_eq!(names(t0 + secs(6.1)), ["slow@c"]);
        assert_eq!(names(t0 + secs(29.9)), ["slow@c"]);
        assert!(names(t0 + secs(30.1)).is_empty());
        // Silent workers are still remembered (not alive) until FORGET_AFTER.
        assert_eq!(registry.remembered(t0 + secs(31.0)).len(), 3);
    }

    #[test]
    fn the_latest_event_wins_and_offline_workers_are_not_alive() {
        let t0 = Instant::now();
        let mut registry = Registry::default();
        registry.apply(heartbeat("w@a", 3, 2.0), t0);
        registry.apply(heartbeat("w@a", 1, 2.0), t0 + Duration::from_secs(2));
        let alive = registry.alive(t0 + Duration::from_secs(3));
        assert_eq!((alive.len(), alive[0].active), (1, 1));

        let offline = WorkerEvent { kind: WorkerEventKind::Offline, ..heartbeat("w@a", 0, 2.0) };
        registry.apply(offline, t0 + Duration::from_secs(4));
        assert!(registry.alive(t0 + Duration::from_secs(4)).is_empty());
        let remembered = registry.remembered(t0 + Duration::from_secs(4));
        assert_eq!((remembered.len(), remembered[0].online), (1, false));

        // The same hostname coming back (a restarted container) is alive again.
        registry.apply(heartbeat("w@a", 0, 2.0), t0 + Duration::from_secs(5));
        assert_eq!(registry.alive(t0 + Duration::from_secs(5)).len(), 1);
    }

    #[test]
    fn memory_stays_bounded() {
        let t0 = Instant::now();
        let mut registry = Registry::default();
        registry.apply(heartbeat("old@a", 0, 2.0), t0);
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        registry.apply(heartbeat("new@b", 0, 2.0), later);
        assert_eq!(registry.workers.keys().collect::<Vec<_>>(), ["new@b"], "forgotten after FORGET_AFTER");

        // A flood of hostnames: alive ones are kept up to MAX_WORKERS, further new ones dropped…
        let mut registry = Registry::default();
        for i in 0..MAX_WORKERS {
            assert!(registry.apply(heartbeat(&format!("w@{i}"), 0, 2.0), t0));
        }
        assert!(!registry.apply(heartbeat("one-too-many@x", 0, 2.0), t0));
        assert!(registry.apply(heartbeat("w@0", 5, 2.0), t0), "known workers still update");
        // …until the silent ones stop being alive and make room.
        assert!(registry.apply(heartbeat("next@y", 0, 2.0), t0 + Duration::from_secs(7)));
        assert_eq!(registry.workers.len(), 1);
    }
}
