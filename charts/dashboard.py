#!/usr/bin/env python3
"""Writes the Grafana dashboard (charts/celery-operator/files/dashboards/celery-operator.json) from the
panel list below: a panel is one line, and its layout, ids, data source and legend settings follow.

    python3 charts/dashboard.py          # after changing PANELS; charts/tests fail while the JSON is stale

Every query is run against a live operator scraped by a real Prometheus (operator/tests/monitoring.rs):
a panel may only show metrics the operator exports (operator/src/metrics.rs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "celery-operator" / "files" / "dashboards" / "celery-operator.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24  # Grafana's grid
NS = '{namespace=~"$namespace"}'
QUEUE = "{{namespace}}/{{taskqueue}}"
POOL = "{{namespace}}/{{workerpool}}"


def _targets(queries: tuple) -> list[dict]:
    targets = []
    for i, query in enumerate(queries):
        expr, legend = query if isinstance(query, tuple) else (query, None)
        target = {"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": expr}
        if legend:
            target["legendFormat"] = legend
        targets.append(target)
    return targets


def stat(title: str, description: str, *queries, alarm_from: float | None = None, alarm: str = "red", below: bool = False):
    """A single number; with `alarm_from` its background turns `alarm` from that value up (or below it)."""
    defaults: dict = {"unit": "short"}
    options = {"colorMode": "value", "graphMode": "area", "reduceOptions": {"calcs": ["lastNotNull"]}}
    if alarm_from is not None:
        steps = [{"color": "green", "value": None}, {"color": alarm, "value": alarm_from}]
        if below:
            steps = [{"color": alarm, "value": None}, {"color": "green", "value": alarm_from}]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
        options = {"colorMode": "background", "graphMode": "none", "reduceOptions": {"calcs": ["lastNotNull"]}}
    return "stat", 4, {"title": title, "description": description,
                       "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
                       "targets": _targets(queries)}


def timeseries(title: str, unit: str, description: str, *queries, bars: bool = False):
    """Lines (or bars) over time with a table legend of last and max values."""
    defaults: dict = {"unit": unit, "min": 0}
    if bars:
        defaults["custom"] = {"drawStyle": "bars", "fillOpacity": 80}
    options = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return "timeseries", 8, {"title": title, "description": description,
                             "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
                             "targets": _targets(queries)}


def safety_timeline(title: str, description: str, *queries):
    """0/1 per series as red Unsafe / green Safe bands."""
    defaults = {
        "mappings": [{"type": "value", "options": {"0": {"text": "Unsafe", "color": "red", "index": 0},
                                                   "1": {"text": "Safe", "color": "green", "index": 1}}}],
        "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]},
    }
    options = {"showValue": "never", "mergeValues": True, "legend": {"displayMode": "list", "placement": "bottom"}}
    return "state-timeline", 8, {"title": title, "description": description,
                                 "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
                                 "targets": _targets(queries)}


def quantiles(metric: str, by: str, legend: str, selector: str = "") -> tuple:
    """p99 and p50 of a histogram over 5 minutes."""
    return tuple(
        (f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{selector}[5m])))",
         f"p{round(q * 100)}{' ' + legend if legend else ''}")
        for q in (0.99, 0.5)
    )


# One row per line of panels, each row split evenly across the dashboard's width.
ROWS = [
    [
        stat("Unsafe brokers", "TaskQueues whose broker can silently lose tasks (celery_operator_broker_safe == 0): an allkeys-* Redis eviction policy, or a RabbitMQ queue that drops or expires messages without a dead-letter exchange. See the TaskQueue's BrokerSafe condition for the reason.",
             f"count(celery_operator_broker_safe{NS} == 0) or vector(0)", alarm_from=1),
        stat("Keys evicted (1h)", "Keys the broker's Redis evicted in the last hour (celery_operator_broker_incidents_total, reason KeysEvicted), counted once per TaskQueue on that Redis: each may have been a queue of tasks. The TaskQueue's BrokerSafe condition and a Warning Event say when.",
             'sum(increase(celery_operator_broker_incidents_total{namespace=~"$namespace", reason="KeysEvicted"}[1h])) or vector(0)', alarm_from=1),
        stat("Total backlog", "Ready messages waiting in all watched queues, all priorities.",
             f"sum(celery_operator_queue_ready{NS})"),
        stat("Total in flight", "Tasks reserved or running on workers, all pools.",
             f"sum(celery_operator_pool_in_flight{NS})"),
        stat("Reconcile errors (5m)", "Failed reconciles over the last five minutes, all kinds.",
             "sum(increase(celery_operator_reconcile_errors_total[5m])) or vector(0)", alarm_from=1, alarm="orange"),
        stat("Leading replicas", "Operator replicas that reconcile right now (celery_operator_leader): 1 is healthy, 0 means nothing reconciles or autoscales (alert CeleryOperatorNoLeader).",
             "sum(celery_operator_leader)", alarm_from=1, below=True),
        stat("Optional APIs not watched", "HPA or KEDA ScaledObject APIs the operator cannot watch (not served, or forbidden: celery_operator_optional_api_unavailable). Pools are still scaled, without detecting another autoscaler on them; their ScalingActive reason is ScalerConflictUnchecked.",
             "sum(celery_operator_optional_api_unavailable) or vector(0)", alarm_from=1, alarm="orange"),
    ],
    [
        timeseries("Backlog (ready messages)", "short", "Messages waiting per TaskQueue, summed over Celery's priority lists (Redis) or read by passive declare (RabbitMQ).",
                   (f"sum by (namespace, taskqueue) (celery_operator_queue_ready{NS})", QUEUE)),
        timeseries("Unacked (prefetched or running)", "short", "Messages delivered to workers but not yet acknowledged, per TaskQueue.",
                   (f"sum by (namespace, taskqueue) (celery_operator_queue_unacked{NS})", QUEUE)),
    ],
    [
        timeseries("Queue latency (oldest waiting task)", "s", "How long the oldest due task in each TaskQueue has waited (celery_operator_queue_latency_seconds; 0 when none waits), known to within one probe interval without an app hook. Scheduled tasks (countdown, eta, retries) count from their ETA. Alert CeleryQueueLatencyHigh above 5 minutes; an autoscaled pool with spec.autoscaling.targetLatencySeconds scales to keep it under its target.",
                   (f"max by (namespace, taskqueue) (celery_operator_queue_latency_seconds{NS})", QUEUE)),
        timeseries("Scheduled tasks (ETA in the future)", "short", "Tasks sent with countdown or eta, and retries waiting out their countdown, per TaskQueue: on the queue, held by workers until due, or in RabbitMQ's delayed-delivery queues. The autoscaler counts them only once they come due within the pool's lead time.",
                   (f"sum by (namespace, taskqueue) (celery_operator_queue_scheduled{NS})", QUEUE)),
    ],
    [
        timeseries("Backlog and in flight per WorkerPool", "short", "What the autoscaler sizes each pool for: messages waiting in the pool's queues, and tasks its workers hold (unacked messages attributed to its queues plus active tasks from worker heartbeats).",
                   (f"sum by (namespace, workerpool) (celery_operator_pool_backlog{NS})", POOL + " backlog"),
                   (f"sum by (namespace, workerpool) (celery_operator_pool_in_flight{NS})", POOL + " in flight")),
        timeseries("Desired vs actual replicas", "short", "What the autoscaler asked for against the worker Deployment's replicas. A lasting gap means pods cannot be scheduled or started.",
                   (f"sum by (namespace, workerpool) (celery_operator_pool_desired_replicas{NS})", POOL + " desired"),
                   (f"sum by (namespace, workerpool) (celery_operator_pool_current_replicas{NS})", POOL + " actual")),
    ],
    [
        timeseries("Scale events", "short", "Replica changes the autoscaler made in each 5 minutes, by pool and direction. Ups and downs in turn mean the pool flaps: lengthen spec.autoscaling.scaleDownStabilizationSeconds.",
                   (f"sum by (namespace, workerpool, direction) (increase(celery_operator_autoscaler_scale_events_total{NS}[5m]))", POOL + " {{direction}}"),
                   bars=True),
        timeseries("Autoscaler decision latency", "s", "From the start of a broker poll to its decisions applied (replicas patched when they changed), p99 and p50 over 5 minutes. Above the pools' pollIntervalSeconds, the autoscaler falls behind.",
                   *quantiles("celery_operator_autoscaler_decision_seconds", "", "")),
    ],
    [
        timeseries("Broker probe latency", "s", "Time to read queue depth from the broker (one pipeline per broker per poll). p50 and p99 over 5 minutes.",
                   *quantiles("celery_operator_probe_duration_seconds", "namespace, taskqueue", QUEUE, NS)),
        timeseries("Broker probe errors", "ops", "Failed broker probes per second, by TaskQueue and error (alert CeleryBrokerUnreachable when nearly all fail). The TaskQueue's BrokerReachable condition has the message.",
                   (f"sum by (namespace, taskqueue, error) (rate(celery_operator_probe_errors_total{NS}[5m]))", QUEUE + " {{error}}")),
    ],
    [
        timeseries("Pools held back", "short", "Autoscaled pools the autoscaler cannot size as it wants: held at maxReplicas or minReplicas (ScalingLimited=True, by reason; alert CeleryPoolAtMaxReplicas after 30 min at max), or not scaled at all because an HPA or ScaledObject targets them (ScalingActive=False, alert CeleryScalerConflict).",
                   ('sum by (namespace, workerpool, reason) (celery_operator_pool_condition{namespace=~"$namespace", type="ScalingLimited", status="True"})', POOL + " {{reason}}"),
                   ('sum by (namespace, workerpool, reason) (celery_operator_pool_condition{namespace=~"$namespace", type="ScalingActive", status="False"})', POOL + " {{reason}}")),
        stat("Events dropped (1h)", "Kubernetes Events the operator could not publish even after three retries (celery_operator_events_dropped_total): the API server refused them for over 20 s. The conditions in status still say what the Events would have.",
             "sum(increase(celery_operator_events_dropped_total[1h])) or vector(0)", alarm_from=1, alarm="orange"),
        stat("Events waiting for a retry", "Kubernetes Events that failed to publish and are retried in the background (celery_operator_events_retrying; 1 s, 4 s, 16 s, then dropped and counted). Non-zero for more than a minute: the API server refuses Events.",
             "sum(celery_operator_events_retrying)", alarm_from=1, alarm="orange"),
    ],
    [
        safety_timeline("Broker safety", "celery_operator_broker_safe per TaskQueue: 1 safe, 0 unsafe (tasks can be lost silently).",
                        (f"min by (namespace, taskqueue) (celery_operator_broker_safe{NS})", QUEUE)),
        timeseries("Reconciles and errors", "ops", "Reconciles per second by kind (TaskQueue, WorkerPool), and failed reconciles by kind and error.",
                   ("sum by (kind) (rate(celery_operator_reconcile_total[5m]))", "{{kind}}"),
                   ("sum by (kind, error) (rate(celery_operator_reconcile_errors_total[5m]))", "{{kind}} {{error}} errors")),
        timeseries("Reconcile duration", "s", "p99 and p50 reconcile time by kind (TaskQueue, WorkerPool).",
                   *quantiles("celery_operator_reconcile_duration_seconds", "kind", "{{kind}}")),
    ],
]


def dashboard() -> dict:
    panels, y = [], 0
    for row in ROWS:
        # As even as the grid allows: the first panels get the columns left over.
        widths = [WIDTH // len(row) + (i < WIDTH % len(row)) for i in range(len(row))]
        height = max(h for _, h, _ in row)
        for i, (kind, _, panel) in enumerate(row):
            grid = {"x": sum(widths[:i]), "y": y, "w": widths[i], "h": height}
            panels.append({"type": kind, "title": panel["title"], "description": panel["description"],
                           "datasource": DATASOURCE, "gridPos": grid,
                           **{k: panel[k] for k in ("fieldConfig", "options", "targets")},
                           "id": len(panels) + 1})
        y += height
    return {
        "uid": "celery-operator",
        "title": "Celery operator",
        "description": "Queue backlog, in-flight tasks, autoscaling and broker safety for Celery fleets run by celery-operator.",
        "tags": ["celery", "celery-operator"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
            {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(celery_operator_queue_ready, namespace)", "refId": "namespace"},
             "definition": "label_values(celery_operator_queue_ready, namespace)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "sort": 1, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT}", file=sys.stderr)
