#!/usr/bin/env python3
"""Writes stomp-gateway.json, the Grafana dashboard, from the panel list below.

    python3 deploy/grafana/build-dashboard.py

scripts/validate-deploy.sh checks the JSON is what this script writes, that
every query parses as PromQL (promtool) and names only metrics the gateway
exposes. Queries may use $pod and $__rate_interval (Grafana variables).
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
POD = 'pod=~"$pod"'

# (title, unit, kind, [(legend, expr)], width)
ROWS = [
    ("Overview", [
        ("Ready pods", "none", "stat", [("ready", f"sum(stomp_gateway_ready{{{POD}}})")], 4),
        ("Open sessions", "none", "stat", [("sessions", f"sum(stomp_gateway_sessions_active{{{POD}}})")], 4),
        ("System link up", "none", "stat", [("system", f"sum(stomp_gateway_system_link_up{{{POD}}})")], 4),
        ("AMQP up", "none", "stat", [("amqp", f"sum(stomp_gateway_amqp_up{{{POD}}})")], 4),
        ("Rejected upgrades / s", "reqps", "stat",
         [("rejected", f"sum(rate(stomp_gateway_connections_rejected_total{{{POD}}}[$__rate_interval]))")], 8),
    ]),
    ("Sessions", [
        ("Open sessions by pod", "none", "timeseries",
         [("{{pod}}", f"sum by (pod) (stomp_gateway_sessions_active{{{POD}}})")], 12),
        ("Sessions opened / closed per second", "ops", "timeseries",
         [("opened", f"sum(rate(stomp_gateway_sessions_opened_total{{{POD}}}[$__rate_interval]))"),
          ("closed {{reason}}", f"sum by (reason) (rate(stomp_gateway_sessions_closed_total{{{POD}}}[$__rate_interval]))")], 12),
    ]),
    ("Messages", [
        ("Frames per second by direction", "ops", "timeseries",
         [("{{direction}}", f"sum by (direction) (rate(stomp_gateway_frames_total{{{POD}}}[$__rate_interval]))")], 12),
        ("Bytes per second by direction", "Bps", "timeseries",
         [("{{direction}}", f"sum by (direction) (rate(stomp_gateway_bytes_total{{{POD}}}[$__rate_interval]))")], 12),
        ("/app publishes per second", "ops", "timeseries",
         [("{{result}}", f"sum by (result) (rate(stomp_gateway_app_publishes_total{{{POD}}}[$__rate_interval]))")], 12),
    ]),
    ("Broker", [
        ("Broker links up by pod", "none", "timeseries",
         [("system {{pod}}", f"stomp_gateway_system_link_up{{{POD}}}"),
          ("amqp {{pod}}", f"stomp_gateway_amqp_up{{{POD}}}")], 12),
        ("Broker connect failures / sessions lost to the broker", "ops", "timeseries",
         [("connect failures", f"sum(rate(stomp_gateway_broker_connect_failures_total{{{POD}}}[$__rate_interval]))"),
          ("broker lost", f'sum(rate(stomp_gateway_sessions_closed_total{{{POD},reason="broker_lost"}}[$__rate_interval]))')], 12),
    ]),
    ("Limits and slow clients", [
        ("Rejected upgrades by reason", "reqps", "timeseries",
         [("{{reason}}", f"sum by (reason) (rate(stomp_gateway_connections_rejected_total{{{POD}}}[$__rate_interval]))")], 12),
        ("Backpressure pauses per second", "ops", "timeseries",
         [("pauses", f"sum by (pod) (rate(stomp_gateway_backpressure_pauses_total{{{POD}}}[$__rate_interval]))")], 12),
    ]),
    ("Drain", [
        ("Not ready pods (draining or broker down)", "none", "timeseries",
         [("{{pod}}", f"1 - stomp_gateway_ready{{{POD}}}")], 12),
        ("Sessions closed by shutdown per second", "ops", "timeseries",
         [("{{pod}}", f'sum by (pod) (rate(stomp_gateway_sessions_closed_total{{{POD},reason="shutdown"}}[$__rate_interval]))')], 12),
    ]),
]


def panel(pid, title, unit, kind, targets, x, y, w):
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": 4 if kind == "stat" else 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}
    return p


def build():
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for title, unit, kind, targets, w in row:
            if x + w > 24:
                x, y = 0, y + row_h
                row_h = 0
            p = panel(pid, title, unit, kind, targets, x, y, w)
            panels.append(p)
            pid, x, row_h = pid + 1, x + w, max(row_h, p["gridPos"]["h"])
        y += row_h
    return {
        "uid": "stomp-gateway",
        "title": "stomp-gateway",
        "description": "stomp-gateway: sessions, message rates, latency, broker links, denials and limits, drain (docs/operations.md)",
        "tags": ["stomp-gateway", "stomp", "websocket", "rabbitmq"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            {"name": "pod", "type": "query", "label": "Pod", "datasource": DS,
             "query": {"query": "label_values(stomp_gateway_ready, pod)", "refId": "pods"},
             "definition": "label_values(stomp_gateway_ready, pod)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stomp-gateway.json")
    with open(out, "w") as f:
        json.dump(build(), f, indent=2)
        f.write("\n")
