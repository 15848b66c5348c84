//! Samples of a WorkerPool over time, the printed timeline and a run's summary.

use std::fmt;

use serde_json::Value;

use crate::stack::metric_value;

/// One observation of the pool, taken once per second while the demo runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the burst of tasks was enqueued (negative before it).
    pub t: f64,
    /// Messages waiting in the pool's queues (WorkerPool `status.backlog`), if reported yet.
    pub backlog: Option<i64>,
    /// Messages being worked on (WorkerPool `status.inFlight`), if reported yet.
    pub in_flight: Option<i64>,
    /// The autoscaler's decision (WorkerPool `status.desiredReplicas`), if reported yet.
    pub desired: Option<i32>,
    /// Worker pods that exist (the worker Deployment's `status.replicas`).
    pub replicas: i32,
    /// Worker pods that are ready (the worker Deployment's `status.readyReplicas`).
    pub ready: i32,
}

impl Sample {
    /// Reads a sample from a WorkerPool and its worker Deployment (absent before the operator
    /// created it). Pod counts come from the Deployment, which is fresher than the pool's mirror of
    /// them; the pool's own `status.replicas`/`readyReplicas` are used when there is no Deployment.
    pub fn from_objects(t: f64, pool: &Value, deployment: Option<&Value>) -> Sample {
        let status = &pool["status"];
        let int = |v: &Value| v.as_i64();
        let (replicas, ready) = match deployment {
            Some(d) => (&d["status"]["replicas"], &d["status"]["readyReplicas"]),
            None => (&status["replicas"], &status["readyReplicas"]),
        };
        Sample {
            t,
            backlog: int(&status["backlog"]),
            in_flight: int(&status["inFlight"]),
            desired: int(&status["desiredReplicas"]).map(|v| v as i32),
            replicas: int(replicas).unwrap_or(0) as i32,
            ready: int(ready).unwrap_or(0) as i32,
        }
    }

    /// Takes backlog, in flight and desired from the operator's `/metrics` text where it has them
    /// for `namespace`/`pool`: the autoscaler sets those gauges on every poll, while it writes the
    /// numbers to status at most every few seconds (status is not a time series).
    pub fn with_metrics(mut self, metrics: &str, namespace: &str, pool: &str) -> Sample {
        let labels = [("namespace", namespace), ("workerpool", pool)];
        let gauge = |name: &str| metric_value(metrics, name, &labels).map(|v| v as i64);
        self.backlog = gauge("celery_operator_pool_backlog").or(self.backlog);
        self.in_flight = gauge("celery_operator_pool_in_flight").or(self.in_flight);
        self.desired = gauge("celery_operator_pool_desired_replicas").map(|v| v as i32).or(self.desired);
        self
    }

    /// Nothing waiting and nothing running, as far as the autoscaler has reported.
    pub fn idle(&self) -> bool {
        self.backlog == Some(0) && self.in_flight == Some(0)
    }
}

/// A change of the pool's `status.lastScaleTime`/`lastScaleReason`, seen at `t`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleEvent {
    pub t: f64,
    /// `status.desiredReplicas` in the same observation.
    pub desired: Option<i32>,
    pub reason: String,
}

/// Turns successive observations of a WorkerPool into [`ScaleEvent`]s: one each time the autoscaler
/// records a new scale (a new `lastScaleTime`, or a new `lastScaleReason`).
#[derive(Clone, Debug)]
pub struct ScaleEvents {
    last: (Option<String>, Option<String>),
}

impl ScaleEvents {
    /// Starts from `pool` as it is now: the scale it already records is not reported again.
    pub fn starting_from(pool: &Value) -> ScaleEvents {
        ScaleEvents { last: Self::key(pool) }
    }

    fn key(pool: &Value) -> (Option<String>, Option<String>) {
        let s = |v: &Value| v.as_str().map(str::to_owned);
        (s(&pool["status"]["lastScaleTime"]), s(&pool["status"]["lastScaleReason"]))
    }

    /// The event `pool` shows at `t`, if it records a scale not seen before.
    pub fn observe(&mut self, t: f64, pool: &Value) -> Option<ScaleEvent> {
        let key = Self::key(pool);
        if key == self.last || key == (None, None) {
            return None;
        }
        self.last = key;
        let reason = self.last.1.clone().unwrap_or_else(|| "(no reason recorded)".to_owned());
        let desired = pool["status"]["desiredReplicas"].as_i64().map(|v| v as i32);
        Some(ScaleEvent { t, desired, reason })
    }
}

const COLUMNS: [(&str, usize); 6] =
    [("time", 7), ("backlog", 8), ("in flight", 10), ("desired", 8), ("replicas", 9), ("ready", 6)];

/// The timeline's column header; [`format_row`] lines up under it.
pub fn header() -> String {
    COLUMNS.iter().map(|(name, width)| format!("{name:>width$}")).collect()
}

/// One timeline line: `   12.0s     340        16       20        20    11`; `-` where the
/// autoscaler has not reported a value yet.
pub fn format_row(s: &Sample) -> String {
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let cells = [
        format!("{:.1}s", s.t),
        opt(s.backlog),
        opt(s.in_flight),
        opt(s.desired.map(i64::from)),
        s.replicas.to_string(),
        s.ready.to_string(),
    ];
    cells.iter().zip(COLUMNS).map(|(cell, (_, width))| format!("{cell:>width$}")).collect()
}

/// A scale event, printed between timeline rows: `   3.0s  ↕ scale to 20: <reason>`.
pub fn format_event(e: &ScaleEvent) -> String {
    let to = e.desired.map_or_else(|| "?".to_owned(), |d| d.to_string());
    let time = format!("{:.1}s", e.t);
    format!("{time:>width$}  >> scale to {to}: {}", e.reason, width = COLUMNS[0].1)
}

/// What a run showed, computed from its samples (t = 0 is the enqueue of the burst).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// First sample at or after the burst whose `desired` exceeds the last one before it.
    pub first_scale_up: Option<f64>,
    /// How many times `desired` went up between the burst and its peak (1 = one step).
    pub scale_up_steps: usize,
    pub peak_desired: Option<i32>,
    pub peak_replicas: i32,
    pub peak_ready: i32,
    pub peak_backlog: Option<i64>,
    /// First sample after the burst with nothing waiting and nothing in flight.
    pub drained: Option<f64>,
    /// First sample after `drained` with desired and replicas both back at `min`.
    pub back_to_min: Option<f64>,
    /// Σ replicas × seconds over the samples from the burst on (each sample's count held until the next).
    pub replica_seconds: f64,
}

/// Summarises a run whose pool has `min` replicas at rest. Scale-ups are counted from `events`
/// (every scale the pool recorded) when there are any after the burst, else from the samples' `desired`,
/// which miss scales that happen between two samples.
pub fn summarize(samples: &[Sample], events: &[ScaleEvent], min: i32) -> Summary {
    let before = samples.iter().rev().find(|s| s.t < 0.0).and_then(|s| s.desired).unwrap_or(min);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= 0.0).collect();
    let events_after: Vec<(f64, i32)> =
        events.iter().filter(|e| e.t >= 0.0).filter_map(|e| Some((e.t, e.desired?))).collect();
    let sampled: Vec<(f64, i32)> = after.iter().filter_map(|s| Some((s.t, s.desired?))).collect();
    let mut summary = Summary {
        peak_desired: sampled.iter().chain(&events_after).map(|&(_, d)| d).max(),
        peak_replicas: after.iter().map(|s| s.replicas).max().unwrap_or(0),
        peak_ready: after.iter().map(|s| s.ready).max().unwrap_or(0),
        peak_backlog: after.iter().filter_map(|s| s.backlog).max(),
        ..Summary::default()
    };
    let desired = if events_after.is_empty() { &sampled } else { &events_after };
    let peak = desired.iter().map(|&(_, d)| d).max();
    let mut last = before;
    for &(t, d) in desired {
        if d > last {
            summary.first_scale_up.get_or_insert(t);
            summary.scale_up_steps += 1;
        }
        last = d;
        if Some(d) == peak {
            break;
        }
    }
    // Drained: idle after the backlog was seen non-empty (an idle sample taken before the autoscaler
    // saw the burst does not count).
    let busy_from = after.iter().position(|s| s.backlog.unwrap_or(0) > 0 || s.in_flight.unwrap_or(0) > 0);
    if let Some(i) = busy_from {
        let drained = after[i..].iter().position(|s| s.idle()).map(|j| i + j);
        summary.drained = drained.map(|j| after[j].t);
        summary.back_to_min =
            drained.and_then(|j| after[j..].iter().find(|s| s.desired == Some(min) && s.replicas == min)).map(|s| s.t);
    }
    summary.replica_seconds = after.windows(2).map(|w| f64::from(w[0].replicas) * (w[1].t - w[0].t)).sum();
    summary
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |v: Option<f64>| v.map_or_else(|| "not seen".to_owned(), |t| format!("{t:.1} s after the burst"));
        let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        writeln!(f, "first scale-up:   {}", secs(self.first_scale_up))?;
        writeln!(
            f,
            "scale-up steps:   {} (to a peak desired of {})",
            self.scale_up_steps,
            opt(self.peak_desired.map(i64::from))
        )?;
        writeln!(f, "peak replicas:    {} ({} ready at most)", self.peak_replicas, self.peak_ready)?;
        writeln!(f, "peak backlog:     {}", opt(self.peak_backlog))?;
        writeln!(f, "queue drained:    {}", secs(self.drained))?;
        writeln!(f, "back to min:      {}", secs(self.back_to_min))?;
        write!(f, "replica-seconds:  {:.0}", self.replica_seconds)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample(t: f64, backlog: i64, in_flight: i64, desired: i32, replicas: i32) -> Sample {
        Sample {
            t,
            backlog: Some(backlog),
            in_flight: Some(in_flight),
            desired: Some(desired),
            replicas,
            ready: replicas,
        }
    }

    #[test]
    fn sample_takes_pod_counts_from_the_deployment_and_the_rest_from_the_pool() {
        let pool = json!({"status": {"backlog": 340, "inFlight": 16, "desiredReplicas": 20, "replicas": 1, "readyReplicas": 1}});
        let deploy = json!({"status": {"replicas": 20, "readyReplicas": 7}});
        let s = Sample::from_objects(3.0, &pool, Some(&deploy));
        assert_eq!(
            s,
            Sample { t: 3.0, backlog: Some(340), in_flight: Some(16), desired: Some(20), replicas: 20, ready: 7 }
        );
        // Without a Deployment, the pool's mirror; a status without the autoscaler's fields reads as unknown.
        let s = Sample::from_objects(0.0, &json!({"status": {"replicas": 2, "readyReplicas": 1}}), None);
        assert_eq!(s, Sample { t: 0.0, backlog: None, in_flight: None, desired: None, replicas: 2, ready: 1 });
        // A Deployment scaled to zero has no status counts at all.
        let s = Sample::from_objects(0.0, &json!({}), Some(&json!({"status": {}})));
        assert_eq!((s.replicas, s.ready), (0, 0));
    }

    #[test]
    fn metrics_take_precedence_over_the_status_numbers_they_carry() {
        let pool = json!({"status": {"backlog": 394, "inFlight": 4, "desiredReplicas": 20}});
        let metrics = "# HELP celery_operator_pool_backlog Messages waiting\n\
            celery_operator_pool_backlog{namespace=\"default\",workerpool=\"mail\"} 120\n\
            celery_operator_pool_backlog{namespace=\"default\",workerpool=\"other\"} 7\n\
            celery_operator_pool_in_flight{namespace=\"default\",workerpool=\"mail\"} 80\n";
        let s = Sample::from_objects(1.0, &pool, None).with_metrics(metrics, "default", "mail");
        // desired has no sample in this text: the status value stays.
        assert_eq!((s.backlog, s.in_flight, s.desired), (Some(120), Some(80), Some(20)));
        // Another namespace's gauges are not this pool's.
        let s = Sample::from_objects(1.0, &pool, None).with_metrics(metrics, "prod", "mail");
        assert_eq!((s.backlog, s.in_flight), (Some(394), Some(4)));
    }

    #[test]
    fn rows_line_up_under_the_header_and_show_unknowns_as_dashes() {
        let h = header();
        let full = format_row(&sample(12.0, 340, 16, 20, 20));
        let unknown = format_row(&Sample { t: -1.5, ..Sample::default() });
        assert_eq!(h.chars().count(), full.chars().count());
        assert_eq!(h.chars().count(), unknown.chars().count());
        // Every value is right-aligned in its column's span, under the column's name.
        let mut end = 0;
        let values = ["12.0s", "340", "16", "20", "20", "20"];
        for ((name, width), value) in COLUMNS.iter().zip(values) {
            end += width;
            assert_eq!(h[end - width..end].trim_start(), *name);
            assert_eq!(full[end - width..end].trim_start(), value, "{h}\n{full}");
            assert!(full[end - width..].starts_with(' '), "columns are separated");
        }
        assert_eq!(full.split_whitespace().collect::<Vec<_>>(), ["12.0s", "340", "16", "20", "20", "20"]);
        assert_eq!(unknown.split_whitespace().collect::<Vec<_>>(), ["-1.5s", "-", "-", "-", "0", "0"]);
    }

    #[test]
    fn scale_events_fire_once_per_new_scale_not_for_the_starting_state() {
        let pool = |time: Option<&str>, reason: Option<&str>, desired: i32| json!({"status": {"lastScaleTime": time, "lastScaleReason": reason, "desiredReplicas": desired}});
        let mut events = ScaleEvents::starting_from(&pool(Some("T0"), Some("earlier"), 1));
        assert_eq!(events.observe(0.0, &pool(Some("T0"), Some("earlier"), 1)), None);
        let up = events.observe(1.0, &pool(Some("T1"), Some("backlog 400"), 20)).unwrap();
        assert_eq!(up, ScaleEvent { t: 1.0, desired: Some(20), reason: "backlog 400".into() });
        assert_eq!(events.observe(2.0, &pool(Some("T1"), Some("backlog 400"), 20)), None);
        // The same reason text at a new time is a new event.
        assert!(events.observe(3.0, &pool(Some("T2"), Some("backlog 400"), 20)).is_some());
        // A pool that never scaled reports nothing.
        let mut events = ScaleEvents::starting_from(&json!({}));
        assert_eq!(events.observe(0.0, &json!({"status": {}})), None);
        assert!(format_event(&up).ends_with(">> scale to 20: backlog 400"));
    }

    #[test]
    fn summary_of_a_one_step_scale_up_and_down() {
        let samples = [
            sample(-1.0, 0, 0, 0, 0),
            sample(0.0, 0, 0, 0, 0), // the autoscaler has not polled since the enqueue
            sample(1.0, 400, 0, 20, 20),
            sample(2.0, 300, 80, 20, 20),
            sample(3.0, 0, 40, 20, 20),
            sample(4.0, 0, 0, 20, 20),
            sample(5.0, 0, 0, 0, 0),
            sample(6.0, 0, 0, 0, 0),
        ];
        let s = summarize(&samples, &[], 0);
        assert_eq!(s.first_scale_up, Some(1.0));
        assert_eq!(s.scale_up_steps, 1);
        assert_eq!((s.peak_desired, s.peak_replicas, s.peak_backlog), (Some(20), 20, Some(400)));
        assert_eq!(s.drained, Some(4.0));
        assert_eq!(s.back_to_min, Some(5.0));
        assert_eq!(s.replica_seconds, 80.0); // 20 replicas from t=1 to t=5
        let text = s.to_string();
        assert!(text.contains("scale-up steps:   1 (to a peak desired of 20)"), "{text}");
        assert!(text.contains("back to min:      5.0 s after the burst"), "{text}");
    }

    #[test]
    fn summary_counts_scale_ups_from_events_when_samples_miss_one() {
        // 0 -> 10 -> 11 within one sample interval: the samples only see 11.
        let samples = [sample(-1.0, 0, 0, 0, 0), sample(2.0, 41, 0, 11, 10), sample(3.0, 41, 0, 11, 11)];
        let event = |t: f64, d: i32| ScaleEvent { t, desired: Some(d), reason: String::new() };
        let s = summarize(&samples, &[event(1.7, 10), event(1.9, 11)], 0);
        assert_eq!((s.first_scale_up, s.scale_up_steps, s.peak_desired), (Some(1.7), 2, Some(11)));
        assert_eq!(summarize(&samples, &[], 0).scale_up_steps, 1);
        // Events before the burst (t < 0) are not part of it.
        let s = summarize(&samples, &[event(-0.5, 1), event(1.7, 11)], 0);
        assert_eq!((s.first_scale_up, s.scale_up_steps), (Some(1.7), 1));
    }

    #[test]
    fn summary_counts_a_staircase_and_a_pool_that_never_returns() {
        let samples = [sample(0.0, 400, 0, 4, 4), sample(1.0, 380, 16, 8, 8), sample(2.0, 100, 32, 16, 16)];
        let s = summarize(&samples, &[], 0);
        assert_eq!((s.first_scale_up, s.scale_up_steps, s.drained, s.back_to_min), (Some(0.0), 3, None, None));
        // Fixed size (no autoscaler yet): nothing reported, nothing claimed.
        let fixed = [Sample { t: 0.0, replicas: 1, ready: 1, ..Sample::default() }];
        let s = summarize(&fixed, &[], 0);
        assert_eq!((s.first_scale_up, s.scale_up_steps, s.peak_desired, s.drained), (None, 0, None, None));
        assert!(s.to_string().contains("first scale-up:   not seen"));
    }
}
