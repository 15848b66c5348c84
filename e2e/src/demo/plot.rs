//! The demo's plot as a self-contained SVG: backlog and in-flight above, replicas, ready and desired
//! below (pod counts drawn as steps, since they change at an instant), scale events as dashed lines.
//! Hand-written rather than through a plotting crate: it is a few lines of SVG, the series need step
//! shapes, and tests can check the geometry.

use std::fmt::Write as _;

use super::timeline::{Sample, ScaleEvent};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 545.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 930.0;
/// Top panel (messages): top and bottom pixel rows.
const TOP_PANEL: (f64, f64) = (58.0, 258.0);
/// Bottom panel (pods).
const BOTTOM_PANEL: (f64, f64) = (300.0, 490.0);

/// Room above the highest value, for the scale events' labels.
const HEADROOM: f64 = 1.1;

/// One series: which sample field, how it is drawn.
struct Series {
    class: &'static str,
    label: &'static str,
    color: &'static str,
    width: f64,
    dash: Option<&'static str>,
    step: bool,
    value: fn(&Sample) -> Option<f64>,
}

const MESSAGES: [Series; 2] = [
    Series {
        class: "backlog",
        label: "backlog (waiting)",
        color: "#1f77b4",
        width: 2.5,
        dash: None,
        step: false,
        value: |s| s.backlog.map(|v| v as f64),
    },
    Series {
        class: "in-flight",
        label: "in flight",
        color: "#ff7f0e",
        width: 1.5,
        dash: None,
        step: false,
        value: |s| s.in_flight.map(|v| v as f64),
    },
];

const PODS: [Series; 3] = [
    Series {
        class: "replicas",
        label: "replicas (pods)",
        color: "#2ca02c",
        width: 2.5,
        dash: None,
        step: true,
        value: |s| Some(f64::from(s.replicas)),
    },
    Series {
        class: "ready",
        label: "ready",
        color: "#9467bd",
        width: 1.5,
        dash: None,
        step: true,
        value: |s| Some(f64::from(s.ready)),
    },
    Series {
        class: "desired",
        label: "desired",
        color: "#d62728",
        width: 1.5,
        dash: Some("6 4"),
        step: true,
        value: |s| s.desired.map(f64::from),
    },
];

/// A linear map from data to pixels.
#[derive(Clone, Copy, Debug)]
struct Scale {
    lo: f64,
    hi: f64,
    px_lo: f64,
    px_hi: f64,
}

impl Scale {
    fn map(&self, v: f64) -> f64 {
        self.px_lo + (v - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)
    }
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(10.0 * magnitude);
    if step < 1.0 && span >= 1.0 { 1.0 } else { step }
}

/// Ticks for a count axis from 0: `0, step, …` up to the first tick at or above `max` (at least 1).
fn count_ticks(max: f64) -> Vec<f64> {
    let max = max.max(1.0);
    let step = nice_step(max, 5.0).max(1.0);
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// Ticks inside `[lo, hi]` for the time axis.
fn time_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let step = nice_step(hi - lo, 10.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Pixel points of one series; a sample without a value breaks the line. Step series hold each
/// value until the next sample's time.
fn polylines(samples: &[Sample], series: &Series, x: Scale, y: Scale) -> Vec<Vec<(f64, f64)>> {
    let mut lines = vec![];
    let mut current: Vec<(f64, f64)> = vec![];
    for s in samples {
        match (series.value)(s) {
            Some(v) => {
                if series.step
                    && let Some(&(_, prev)) = current.last()
                {
                    current.push((x.map(s.t), prev));
                }
                current.push((x.map(s.t), y.map(v)));
            }
            None if !current.is_empty() => lines.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn fmt_tick(v: f64) -> String {
    if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// Draws one panel: frame, horizontal grid with labels, the series and a legend.
fn panel(out: &mut String, series: &[Series], samples: &[Sample], x: Scale, rows: (f64, f64), axis_label: &str) {
    let max = samples.iter().flat_map(|s| series.iter().filter_map(|ser| (ser.value)(s))).fold(0.0, f64::max);
    let ticks = count_ticks(max * HEADROOM);
    let y = Scale { lo: 0.0, hi: *ticks.last().unwrap_or(&1.0), px_lo: rows.1, px_hi: rows.0 };
    for t in &ticks {
        let py = y.map(*t);
        let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="#e5e5e5"/>"##);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            py + 4.0,
            fmt_tick(*t)
        );
    }
    let (mid, left) = ((rows.0 + rows.1) / 2.0, LEFT - 48.0);
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 {left} {mid:.1})">{}</text>"#,
        escape(axis_label)
    );
    for ser in series {
        let dash = ser.dash.map(|d| format!(r#" stroke-dasharray="{d}""#)).unwrap_or_default();
        for line in polylines(samples, ser, x, y) {
            let points: Vec<String> = line.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect();
            let _ = writeln!(
                out,
                r#"<polyline class="{}" points="{}" fill="none" stroke="{}" stroke-width="{}"{dash} stroke-linejoin="round"/>"#,
                ser.class,
                points.join(" "),
                ser.color,
                ser.width
            );
        }
    }
    // Legend: one row above the panel, ending at its right edge (about 6.5 px per character).
    let widths: Vec<f64> = series.iter().map(|ser| 40.0 + 6.5 * ser.label.chars().count() as f64).collect();
    let mut lx = RIGHT - widths.iter().sum::<f64>();
    let ly = rows.0 - 8.0;
    for (ser, width) in series.iter().zip(widths) {
        let dash = ser.dash.map(|d| format!(r#" stroke-dasharray="{d}""#)).unwrap_or_default();
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="{}"{dash}/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 24.0,
            ly - 4.0,
            ser.color,
            ser.width,
            lx + 30.0,
            escape(ser.label)
        );
        lx += width;
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        rows.0,
        RIGHT - LEFT,
        rows.1 - rows.0
    );
}

/// The plot of a demo run as an SVG document. `samples` must be in time order; `title` and the
/// events' reasons are escaped.
pub fn render_svg(title: &str, samples: &[Sample], events: &[ScaleEvent]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#, escape(title));

    let lo = samples.first().map_or(0.0, |s| s.t);
    let hi = samples.last().map_or(1.0, |s| s.t).max(lo + 1.0);
    let x = Scale { lo, hi, px_lo: LEFT, px_hi: RIGHT };

    for t in time_ticks(lo, hi) {
        let px = x.map(t);
        for rows in [TOP_PANEL, BOTTOM_PANEL] {
            let _ = writeln!(
                out,
                r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#f0f0f0"/>"##,
                rows.0, rows.1
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            BOTTOM_PANEL.1 + 18.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the burst was enqueued</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM_PANEL.1 + 40.0
    );

    if !samples.is_empty() && lo <= 0.0 && 0.0 <= hi {
        let px = x.map(0.0);
        let _ = writeln!(
            out,
            r##"<g class="burst"><line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#1f77b4" stroke-dasharray="1 3"/><text x="{px:.1}" y="{:.1}" fill="#1f77b4" text-anchor="middle">burst</text></g>"##,
            TOP_PANEL.0,
            BOTTOM_PANEL.1,
            TOP_PANEL.0 - 8.0,
        );
    }
    panel(&mut out, &MESSAGES, samples, x, TOP_PANEL, "messages");
    panel(&mut out, &PODS, samples, x, BOTTOM_PANEL, "worker pods");

    // Labels of events closer than this (px) to the previous one go one line lower.
    const LABEL_GAP: f64 = 36.0;
    let mut previous: Option<(f64, f64)> = None;
    for e in events {
        let px = x.map(e.t.clamp(lo, hi));
        let to = e.desired.map_or_else(|| "?".to_owned(), |d| d.to_string());
        // The label goes right of the line, or left of it near the right edge.
        let (label_x, anchor) = if px + 40.0 > RIGHT { (px - 3.0, "end") } else { (px + 3.0, "start") };
        let label_y = match previous {
            Some((prev_x, prev_y)) if (px - prev_x).abs() < LABEL_GAP => prev_y + 14.0,
            _ => TOP_PANEL.0 + 14.0,
        };
        previous = Some((px, label_y));
        let _ = writeln!(
            out,
            r##"<g class="scale-event"><title>{}</title><line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#555" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" fill="#555" text-anchor="{anchor}">→{}</text></g>"##,
            escape(&format!("{:.1} s: scale to {to}: {}", e.t, e.reason)),
            TOP_PANEL.0,
            BOTTOM_PANEL.1,
            label_x,
            label_y,
            escape(&to)
        );
    }
    if samples.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="16">no samples</text>"#,
            (LEFT + RIGHT) / 2.0,
            (TOP_PANEL.0 + TOP_PANEL.1) / 2.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, backlog: Option<i64>, replicas: i32, ready: i32, desired: Option<i32>) -> Sample {
        Sample { t, backlog, in_flight: backlog.map(|_| 0), desired, replicas, ready }
    }

    /// The `points` of every polyline of one class, as numbers.
    fn lines(svg: &str, class: &str) -> Vec<Vec<(f64, f64)>> {
        let needle = format!(r#"<polyline class="{class}" points=""#);
        svg.match_indices(&needle)
            .map(|(i, _)| {
                let rest = &svg[i + needle.len()..];
                rest[..rest.find('"').unwrap()]
                    .split(' ')
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// Every element is closed, in order: the document is well-formed as far as tags go.
    fn assert_well_formed(svg: &str) {
        let mut open: Vec<&str> = vec![];
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let end = rest[i..].find('>').expect("unterminated tag") + i;
            let tag = &rest[i + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap());
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
    }

    #[test]
    fn nice_ticks_cover_the_data() {
        assert_eq!(count_ticks(400.0), [0.0, 100.0, 200.0, 300.0, 400.0]);
        assert_eq!(count_ticks(401.0), [0.0, 100.0, 200.0, 300.0, 400.0, 500.0]);
        assert_eq!(count_ticks(7.0), [0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(count_ticks(20.0), [0.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(count_ticks(0.0), [0.0, 1.0], "an all-zero series still gets an axis");
        assert_eq!(count_ticks(3.0), [0.0, 1.0, 2.0, 3.0], "pods are counted in whole steps");
        assert_eq!(time_ticks(-3.2, 61.0), [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        assert_eq!(time_ticks(0.0, 2.0), [0.0, 1.0, 2.0]);
    }

    #[test]
    fn series_are_placed_on_their_axes() {
        let samples = [s(0.0, Some(400), 0, 0, Some(0)), s(10.0, Some(0), 20, 20, Some(20))];
        let svg = render_svg("demo", &samples, &[]);
        assert_well_formed(&svg);
        // The axes run to the next nice tick above the peak plus headroom: 0..500 messages, 0..25 pods.
        let y_top = |v: f64, top: f64| TOP_PANEL.1 - v / top * (TOP_PANEL.1 - TOP_PANEL.0);
        let y_bottom = |v: f64, top: f64| BOTTOM_PANEL.1 - v / top * (BOTTOM_PANEL.1 - BOTTOM_PANEL.0);
        // Backlog 400 at t=0 is at the panel's left edge, 0 at the end on its bottom-right corner.
        assert_eq!(lines(&svg, "backlog"), [vec![(LEFT, y_top(400.0, 500.0)), (RIGHT, TOP_PANEL.1)]]);
        assert!(svg.contains(r#"text-anchor="end">500</text>"#) && svg.contains(r#"text-anchor="end">25</text>"#));
        // Replicas are a step: held at 0 until t=10, then 20.
        assert_eq!(
            lines(&svg, "replicas"),
            [vec![(LEFT, BOTTOM_PANEL.1), (RIGHT, BOTTOM_PANEL.1), (RIGHT, y_bottom(20.0, 25.0))]]
        );
        assert!(svg.contains(">backlog (waiting)</text>") && svg.contains(">replicas (pods)</text>"));
    }

    #[test]
    fn missing_values_break_the_line_instead_of_drawing_zero() {
        let samples = [
            s(0.0, Some(10), 1, 1, None),
            s(1.0, None, 1, 1, None),
            s(2.0, Some(5), 1, 1, Some(1)),
            s(3.0, Some(0), 1, 1, Some(1)),
        ];
        let svg = render_svg("gaps", &samples, &[]);
        let backlog = lines(&svg, "backlog");
        assert_eq!(backlog.len(), 2);
        assert_eq!((backlog[0].len(), backlog[1].len()), (1, 2));
        // desired was never reported for the first two samples: its line starts at t=2.
        let desired = lines(&svg, "desired");
        assert_eq!(desired.len(), 1);
        let x2 = Scale { lo: 0.0, hi: 3.0, px_lo: LEFT, px_hi: RIGHT }.map(2.0);
        assert!((desired[0][0].0 - x2).abs() < 0.05, "{desired:?}");
    }

    #[test]
    fn events_are_marked_and_text_is_escaped() {
        let samples = [s(0.0, Some(1), 0, 0, Some(0)), s(4.0, Some(0), 1, 1, Some(1))];
        let events = [ScaleEvent { t: 1.0, desired: Some(1), reason: r#"backlog <1> & "x" > 0"#.into() }];
        let svg = render_svg("a <b> & c", &samples, &events);
        assert_well_formed(&svg);
        assert!(svg.contains(">a &lt;b&gt; &amp; c</text>"));
        assert!(svg.contains("<title>1.0 s: scale to 1: backlog &lt;1&gt; &amp; &quot;x&quot; &gt; 0</title>"));
        let x = format!(r#"x1="{:.1}""#, LEFT + (RIGHT - LEFT) / 4.0);
        assert!(svg.contains(r#"<g class="scale-event"><title>"#) && svg.contains(&x), "{svg}");
        assert!(svg.contains(r#"text-anchor="start">→1</text>"#));
        // At the right edge the label goes left of its line, inside the plot.
        let late = [ScaleEvent { t: 4.0, desired: Some(0), reason: "down".into() }];
        let svg = render_svg("late", &samples, &late);
        assert!(
            svg.contains(&format!(
                r##"x="{:.1}" y="{:.1}" fill="#555" text-anchor="end">→0</text>"##,
                RIGHT - 3.0,
                TOP_PANEL.0 + 14.0
            )),
            "{svg}"
        );
        // Two events close together: the second label goes one line lower instead of overlapping.
        let close = [
            ScaleEvent { t: 3.9, desired: Some(15), reason: "down".into() },
            ScaleEvent { t: 4.0, desired: Some(0), reason: "down".into() },
            ScaleEvent { t: 1.0, desired: Some(20), reason: "far from the others".into() },
        ];
        let svg = render_svg("close", &samples, &close);
        let label_y = |to: &str| -> f64 {
            let end = svg.find(&format!(">→{to}</text>")).unwrap();
            let tag = &svg[svg[..end].rfind("<text").unwrap()..end];
            let y = &tag[tag.find(" y=\"").unwrap() + 4..];
            y[..y.find('"').unwrap()].parse().unwrap()
        };
        assert_eq!(label_y("15"), TOP_PANEL.0 + 14.0);
        assert_eq!(label_y("0"), TOP_PANEL.0 + 28.0);
        assert_eq!(label_y("20"), TOP_PANEL.0 + 14.0);
    }

    #[test]
    fn no_samples_still_make_a_document() {
        let svg = render_svg("empty", &[], &[]);
        assert_well_formed(&svg);
        assert!(svg.contains(">no samples</text>"));
        assert!(lines(&svg, "backlog").is_empty());
    }
}
