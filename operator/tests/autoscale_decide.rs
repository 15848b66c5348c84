//! Properties of the autoscaler's decision function over arbitrary policies and probe histories,
//! and how a WorkerPool spec becomes a policy.

use std::time::Duration;

use celery_operator::autoscale::decide::{
    Decision, FAILURES_BEFORE_FALLBACK, Limit, Observation, Policy, Probe, Reason, Rule, ScalerState, decide,
};
use celery_operator::crd::WorkerPoolSpec;
use proptest::prelude::*;

fn policies() -> impl Strategy<Value = Policy> {
    let latency = proptest::option::of((1u64..=120).prop_map(Duration::from_secs));
    (0u32..=5, 1u32..=20, 1u64..=8, 0u64..=10, 0u64..=20, proptest::option::of(0u32..=30), 1u32..=4, latency).prop_map(
        |(min, span, target, threshold, stabilization, fallback, failures, target_latency)| Policy {
            min,
            max: min + span,
            target_per_replica: target,
            activation_threshold: threshold,
            stabilization: Duration::from_secs(5 * stabilization),
            fallback,
            failures_before_fallback: failures,
            poll_interval: Duration::from_secs(1),
            target_latency,
            lead_time: None,
        },
    )
}

/// What only the depth of the queues says (what every broker can tell).
fn plain(backlog: u64, in_flight: u64) -> Observation {
    Observation { backlog, in_flight, ..Observation::default() }
}

/// Observations with scheduled tasks on the lists and held by workers, RabbitMQ-style due limits,
/// latency and measured rates.
fn observations() -> impl Strategy<Value = Observation> {
    let counts = (0u64..=200, 0u64..=200, 0u64..=50, 0u64..=50, 0u64..=60, 0u64..=300);
    let refinements = (
        proptest::option::of(0u64..=30),
        proptest::option::of((0u64..=600).prop_map(Duration::from_secs)),
        proptest::option::of(0.05f64..=20.0),
    );
    (counts, refinements).prop_map(|((backlog, listed, in_flight, held, due_soon, far), (limit, oldest_wait, rate))| {
        Observation {
            backlog: backlog + listed,
            in_flight: in_flight + held,
            backlog_scheduled: listed,
            in_flight_scheduled: held,
            in_flight_due_limit: limit,
            due_soon,
            scheduled: listed + held + due_soon + far,
            oldest_wait,
            per_replica_rate: rate,
        }
    })
}

fn probes() -> impl Strategy<Value = Probe> {
    prop_oneof![
        2 => (0u64..=200, 0u64..=50).prop_map(|(backlog, in_flight)| Probe::Ok(plain(backlog, in_flight))),
        2 => observations().prop_map(Probe::Ok),
        1 => Just(Probe::Failed),
    ]
}

/// Only scheduled tasks that are not due within the lead time: on the lists, held by workers, or
/// (RabbitMQ) in-flight messages beyond what the workers' prefetch windows can hold.
fn only_future_scheduled() -> impl Strategy<Value = Probe> {
    prop_oneof![
        4 => (0u64..=400, 0u64..=400, 0u64..=400, proptest::option::of(0u64..=400), 0u64..=3).prop_map(
            |(listed, held, far, beyond_limit, waited)| {
                Probe::Ok(Observation {
                    backlog: listed,
                    backlog_scheduled: listed,
                    in_flight: held + beyond_limit.unwrap_or(0),
                    in_flight_scheduled: held,
                    in_flight_due_limit: beyond_limit.map(|_| 0),
                    scheduled: listed + held + far,
                    // Nothing due waits; a stale age must not matter either.
                    oldest_wait: Some(Duration::from_secs(waited * 1000)),
                    per_replica_rate: Some(1.0),
                    ..Observation::default()
                })
            }
        ),
        1 => Just(Probe::Failed),
    ]
}

/// Polls: seconds since the previous poll (0 allowed: two polls in the same instant) and the probe.
/// Times and windows are multiples of 5 s so polls often land exactly where a window ends.
fn histories() -> impl Strategy<Value = Vec<(u64, Probe)>> {
    proptest::collection::vec(((0u64..=18).prop_map(|n| 5 * n), probes()), 1..60)
}

fn bound(policy: &Policy, n: u32) -> u32 {
    n.clamp(policy.min, policy.max)
}

/// Runs `history` in a closed loop from `start` and returns the state, count and time after it.
fn settle(policy: &Policy, start: u32, history: &[(u64, Probe)]) -> (ScalerState<Duration>, u32, Duration) {
    let mut state = ScalerState::new();
    let mut current = start;
    let mut now = Duration::from_secs(1_000);
    for &(dt, probe) in history {
        now += Duration::from_secs(dt);
        current = decide(policy, &mut state, current, probe, now).replicas;
    }
    (state, current, now)
}

/// Runs `history` in a closed loop (each decision is applied before the next poll), starting at
/// `start` replicas; calls `check(state before the poll, current, probe, now, decision)` per poll.
fn run(
    policy: &Policy,
    start: u32,
    history: &[(u64, Probe)],
    mut check: impl FnMut(&ScalerState<Duration>, u32, Probe, Duration, &Decision),
) {
    let mut state = ScalerState::new();
    let mut current = start;
    let mut now = Duration::from_secs(1_000);
    for &(dt, probe) in history {
        now += Duration::from_secs(dt);
        let before = state.clone();
        let d = decide(policy, &mut state, current, probe, now);
        check(&before, current, probe, now, &d);
        current = d.replicas;
    }
}

proptest! {
    #[test]
    fn replicas_always_within_min_and_max(policy in policies(), start in 0u32..=40, history in histories()) {
        run(&policy, start, &history, |_, current, _, now, d| {
            assert!(
                (policy.min..=policy.max).contains(&d.replicas),
                "{} outside [{}, {}] (current {current}, t={now:?}, {})",
                d.replicas, policy.min, policy.max, d.reason
            );
        });
    }

    #[test]
    fn a_failed_probe_never_scales_down(policy in policies(), start in 0u32..=40, history in histories()) {
        let mut failures = 0;
        run(&policy, start, &history, |before, current, probe, _, d| {
            if probe != Probe::Failed {
                failures = 0;
                return;
            }
            failures += 1;
            assert_eq!(before.consecutive_failures() + 1, failures);
            match policy.fallback {
                Some(fallback) if failures >= policy.failures_before_fallback => {
                    assert_eq!(d.replicas, bound(&policy, fallback));
                    assert_eq!(d.reason, Reason::Fallback { consecutive_failures: failures });
                }
                // Holding: only the bounds may move the count.
                _ => assert_eq!(d.replicas, bound(&policy, current), "{}", d.reason),
            }
        });
    }

    #[test]
    fn more_backlog_never_means_fewer_replicas(
        policy in policies(),
        start in 0u32..=40,
        history in histories(),
        backlog in 0u64..=200,
        more in 0u64..=200,
        in_flight in 0u64..=50,
    ) {
        let (state, current, now) = settle(&policy, start, &history);
        let (mut a, mut b) = (state.clone(), state);
        let less = decide(&policy, &mut a, current, Probe::Ok(plain(backlog, in_flight)), now);
        let greater = decide(&policy, &mut b, current, Probe::Ok(plain(backlog + more, in_flight)), now);
        prop_assert!(greater.replicas >= less.replicas, "{greater:?} < {less:?}");
        prop_assert!(greater.raw_desired >= less.raw_desired);
    }

    /// A scale-down goes exactly to the highest demand seen in the last `stabilization` (the
    /// current count standing in for what a fresh state never saw), so nothing wanted within the
    /// window is ever cut.
    #[test]
    fn scale_down_respects_the_stabilization_window(
        policy in policies(),
        start in 0u32..=40,
        history in histories(),
    ) {
        let mut wanted: Vec<(Duration, u32)> = Vec::new();
        run(&policy, start, &history, |_, current, probe, now, d| {
            if wanted.is_empty() {
                wanted.push((now, current));
            }
            let remembered = match (probe, d.reason) {
                (Probe::Ok(_), _) | (Probe::Failed, Reason::Fallback { .. }) => Some(d.raw_desired),
                _ => None,
            };
            wanted.extend(remembered.map(|r| (now, r)));
            if d.replicas >= current || matches!(d.reason, Reason::Fallback { .. } | Reason::OutOfBounds(_)) {
                return;
            }
            // This poll's demand counts even with a zero window.
            let highest = wanted
                .iter()
                .filter(|&&(at, _)| at + policy.stabilization > now)
                .map(|&(_, r)| r)
                .chain(remembered)
                .max()
                .expect("an Ok probe always has a demand");
            assert_eq!(d.replicas, bound(&policy, highest), "{} at t={now:?}, window {wanted:?}", d.reason);
            assert!(matches!(d.reason, Reason::ScaleDown { .. }), "{}", d.reason);
        });
    }

    /// Only this poll's demand (or fallback) raises the count: never stale highs from the window.
    #[test]
    fn scale_up_only_to_what_this_poll_asks_for(policy in policies(), start in 0u32..=40, history in histories()) {
        run(&policy, start, &history, |_, current, _, _, d| {
            assert!(d.replicas <= bound(&policy, current.max(d.raw_desired)), "{current} -> {d:?}");
        });
    }

    /// Whenever demand exceeds the current count, the pool gets all of it (up to max) at once.
    #[test]
    fn scale_up_is_immediate_and_one_step(policy in policies(), start in 0u32..=40, history in histories()) {
        run(&policy, start, &history, |_, current, probe, _, d| {
            if let Probe::Ok(_) = probe
                && d.raw_desired > current
                && current <= policy.max
            {
                assert_eq!(d.replicas, bound(&policy, d.raw_desired), "{}", d.reason);
            }
        });
    }

    #[test]
    fn never_zero_while_tasks_are_in_flight(policy in policies(), start in 1u32..=40, history in histories()) {
        run(&policy, start, &history, |_, current, probe, _, d| {
            if let Probe::Ok(Observation { in_flight: 1.., .. }) = probe
                && current > 0
            {
                assert!(d.replicas >= 1, "{}", d.reason);
            }
        });
    }

    #[test]
    fn limited_names_the_bound_the_count_sits_on(policy in policies(), start in 0u32..=40, history in histories()) {
        run(&policy, start, &history, |_, _, _, _, d| match d.limited {
            Some(Limit::AtMin) => assert_eq!(d.replicas, policy.min),
            Some(Limit::AtMax) => assert_eq!(d.replicas, policy.max),
            None => {}
        });
    }

    /// 200 tasks with countdown=3600 must not pin a pool at max for an hour, and shutdowns that
    /// put held tasks back on the list must not wake it again: with only future scheduled tasks,
    /// however many and wherever they are, a pool never grows past max(minReplicas, 1).
    #[test]
    fn only_future_scheduled_tasks_never_exceed_one_replica_or_min(
        policy in policies().prop_map(|p| Policy { fallback: None, ..p }),
        start in 0u32..=1,
        history in proptest::collection::vec(((0u64..=18).prop_map(|n| 5 * n), only_future_scheduled()), 1..60),
    ) {
        let ceiling = policy.min.max(1);
        run(&policy, start.min(ceiling), &history, |_, current, _, now, d| {
            assert!(d.replicas <= ceiling, "{current} -> {} at t={now:?} ({}, {:?})", d.replicas, d.reason, d.rule);
        });
    }

    /// A pool holding scheduled tasks keeps a replica to hold them: never scaled to zero under them.
    #[test]
    fn a_pool_holding_scheduled_tasks_is_never_scaled_to_zero(
        policy in policies().prop_map(|p| Policy { fallback: None, ..p }),
        history in proptest::collection::vec(((0u64..=18).prop_map(|n| 5 * n), only_future_scheduled()), 1..60),
    ) {
        run(&policy, 1, &history, |_, current, probe, _, d| {
            if current > 0 && probe != Probe::Failed {
                assert!(d.replicas >= 1, "{} ({:?})", d.reason, d.rule);
            }
        });
    }

    /// Tasks that are not due change nothing but the one-replica floor: adding scheduled messages
    /// to the lists or to what workers hold gives the same count, or one replica where the
    /// same observation without them gave none.
    #[test]
    fn tasks_not_yet_due_add_no_replicas(
        policy in policies(),
        start in 0u32..=40,
        history in histories(),
        seen in observations(),
        listed in 0u64..=500,
        held in 0u64..=500,
    ) {
        let (state, current, now) = settle(&policy, start, &history);
        let more = Observation {
            backlog: seen.backlog + listed,
            backlog_scheduled: seen.backlog_scheduled + listed,
            in_flight: seen.in_flight + held,
            in_flight_scheduled: seen.in_flight_scheduled + held,
            scheduled: seen.scheduled + listed + held,
            ..seen
        };
        let without = decide(&policy, &mut state.clone(), current, Probe::Ok(seen), now);
        let with = decide(&policy, &mut state.clone(), current, Probe::Ok(more), now);
        prop_assert!(with.replicas >= without.replicas, "{with:?} < {without:?}");
        prop_assert!(with.replicas <= bound(&policy, without.replicas.max(1)), "{with:?} vs {without:?}");
    }

    /// The latency target only ever adds replicas to what the depth rule asks for.
    #[test]
    fn the_latency_rule_never_goes_below_the_depth_rule(
        policy in policies(),
        target in (1u64..=120).prop_map(Duration::from_secs),
        start in 0u32..=40,
        history in histories(),
        seen in observations(),
    ) {
        let depth_only = Policy { target_latency: None, ..policy.clone() };
        let with_latency = Policy { target_latency: Some(target), ..policy };
        let (state, current, now) = settle(&depth_only, start, &history);
        let depth = decide(&depth_only, &mut state.clone(), current, Probe::Ok(seen), now);
        let latency = decide(&with_latency, &mut state.clone(), current, Probe::Ok(seen), now);
        prop_assert!(latency.raw_desired >= depth.raw_desired, "{latency:?} < {depth:?}");
        prop_assert!(latency.replicas >= depth.replicas, "{latency:?} < {depth:?}");
        if latency.raw_desired > depth.raw_desired {
            prop_assert!(matches!(latency.rule, Some(Rule::Latency { .. })), "{:?}", latency.rule);
        }
    }

    /// When the latency rule decides, the pool it asks for works off the due tasks in the time left
    /// before the oldest reaches the target (at least a quarter of it) at the measured rate, and
    /// one replica fewer would not.
    #[test]
    fn the_latency_rule_sizes_the_pool_to_drain_within_the_target(
        policy in policies().prop_map(|p| Policy { target_latency: Some(Duration::from_secs(30)), ..p }),
        seen in observations(),
    ) {
        let mut state = ScalerState::new();
        let d = decide(&policy, &mut state, 1, Probe::Ok(seen), Duration::from_secs(1_000));
        if let Some(Rule::Latency { oldest_wait, target, within, per_replica_milli }) = d.rule {
            let tasks = (seen.waiting_due() + seen.in_flight_due()) as f64;
            let rate = seen.per_replica_rate.unwrap();
            let drain = |replicas: u32| tasks / (f64::from(replicas) * rate);
            prop_assert!(drain(d.raw_desired) <= within.as_secs_f64() + 1e-9);
            prop_assert!(d.raw_desired == 1 || drain(d.raw_desired - 1) > within.as_secs_f64());
            prop_assert_eq!(per_replica_milli, (rate * 1000.0).round() as u64);
            // The time left before the target, never less than a quarter of it.
            prop_assert_eq!(oldest_wait, seen.oldest_wait.unwrap());
            prop_assert_eq!(within, target.saturating_sub(oldest_wait).max(target / 4));
        }
    }

    /// Scheduled tasks coming due within the lead time count like waiting ones.
    #[test]
    fn more_tasks_coming_due_never_mean_fewer_replicas(
        policy in policies(),
        start in 0u32..=40,
        history in histories(),
        seen in observations(),
        more in 0u64..=200,
    ) {
        let (state, current, now) = settle(&policy, start, &history);
        let sooner = Observation { due_soon: seen.due_soon + more, scheduled: seen.scheduled + more, ..seen };
        let less = decide(&policy, &mut state.clone(), current, Probe::Ok(seen), now);
        let greater = decide(&policy, &mut state.clone(), current, Probe::Ok(sooner), now);
        prop_assert!(greater.replicas >= less.replicas, "{greater:?} < {less:?}");
    }
}

fn spec(json: serde_json::Value) -> WorkerPoolSpec {
    let mut base = serde_json::json!({ "app": "proj.celery_app", "image": "registry/proj:1", "queues": ["default"] });
    base.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
    serde_json::from_value(base).unwrap()
}

#[test]
fn no_policy_without_autoscaling() {
    assert_eq!(Policy::from_spec(&spec(serde_json::json!({ "replicas": 3 }))), None);
}

#[test]
fn policy_defaults_follow_the_crd() {
    let policy = Policy::from_spec(&spec(serde_json::json!({
        "concurrency": 4,
        "autoscaling": { "maxReplicas": 50 }
    })))
    .unwrap();
    assert_eq!(
        policy,
        Policy {
            min: 0,
            max: 50,
            target_per_replica: 4,
            activation_threshold: 0,
            stabilization: Duration::from_secs(60),
            fallback: None,
            failures_before_fallback: FAILURES_BEFORE_FALLBACK,
            poll_interval: Duration::from_secs(1),
            target_latency: None,
            lead_time: None,
        }
    );
}

#[test]
fn policy_takes_every_autoscaling_field() {
    let policy = Policy::from_spec(&spec(serde_json::json!({
        "concurrency": 4,
        "autoscaling": {
            "minReplicas": 2, "maxReplicas": 9, "targetPerReplica": 10, "activationThreshold": 25,
            "pollIntervalSeconds": 5, "scaleDownStabilizationSeconds": 0, "fallbackReplicas": 3
        }
    })))
    .unwrap();
    assert_eq!((policy.min, policy.max, policy.target_per_replica), (2, 9, 10));
    assert_eq!((policy.activation_threshold, policy.stabilization), (25, Duration::ZERO));
    assert_eq!((policy.fallback, policy.poll_interval), (Some(3), Duration::from_secs(5)));
    assert_eq!((policy.target_latency, policy.lead_time), (None, None));
    let policy = Policy::from_spec(&spec(serde_json::json!({
        "autoscaling": { "maxReplicas": 9, "targetLatencySeconds": 30, "leadTimeSeconds": 0 }
    })))
    .unwrap();
    assert_eq!((policy.target_latency, policy.lead_time), (Some(Duration::from_secs(30)), Some(Duration::ZERO)));
}

#[test]
fn policy_from_out_of_range_spec_lets_max_win() {
    // What CEL rejects, should an API server not enforce it.
    let policy = Policy::from_spec(&spec(serde_json::json!({
        "autoscaling": { "minReplicas": 8, "maxReplicas": 3, "targetPerReplica": 0, "activationThreshold": -5 }
    })))
    .unwrap();
    assert_eq!((policy.min, policy.max, policy.target_per_replica, policy.activation_threshold), (3, 3, 1, 0));
}
