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
def quantile(q, name, by, direction=None):
    sel = POD + (f',direction="{direction}"' if direction else "")
    return (f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
            f"(rate({name}_bucket{{{sel}}}[$__rate_interval])))")


ROWS = [
    ("Overview", [
        ("Ready pods", "none", "stat", [("ready", f"sum(stomp_gateway_ready{{{POD}}})")], 4),
        ("Open sessions", "none", "stat", [("sessions", f"sum(stomp_gateway_sessions_active{{{POD}}})")], 4),
        ("Open subscriptions", "none", "stat",
         [("subscriptions", f"sum(stomp_gateway_subscriptions_open{{{POD}}})")], 4),
        ("Messages to clients / s", "ops", "stat",
         [("MESSAGE", f'sum(rate(stomp_gateway_frames_sent_total{{{POD},command="MESSAGE"}}[$__rate_interval]))')], 4),
        ("Draining pods", "none", "stat", [("draining", f"sum(stomp_gateway_draining{{{POD}}})")], 4),
        ("Versions", "none", "stat",
         [("{{version}}", f"count by (version) (stomp_gateway_build_info{{{POD}}})")], 4),
    ]),
    ("Sessions", [
        ("Open sessions by pod", "none", "timeseries",
         [("{{pod}}", f"sum by (pod) (stomp_gateway_sessions_active{{{POD}}})")], 8),
        ("Open sessions by transport", "none", "timeseries",
         [("{{transport}}", f"sum by (transport) (stomp_gateway_sessions_open{{{POD}}})")], 8),
        ("Sessions opened / closed per second", "ops", "timeseries",
         [("opened", f"sum(rate(stomp_gateway_sessions_opened_total{{{POD}}}[$__rate_interval]))"),
          ("closed {{reason}}", f"sum by (reason) (rate(stomp_gateway_sessions_closed_total{{{POD}}}[$__rate_interval]))")], 8),
        ("Open subscriptions by path", "none", "timeseries",
         [("{{path}}", f"sum by (path) (stomp_gateway_subscriptions_open{{{POD}}})")], 8),
        ("CONNECT to CONNECTED", "s", "timeseries",
         [("p50", quantile(0.5, "stomp_gateway_stomp_connect_duration_seconds", None)),
          ("p99", quantile(0.99, "stomp_gateway_stomp_connect_duration_seconds", None))], 8),
        ("SockJS sessions opened by transport / s", "ops", "timeseries",
         [("{{transport}}", f"sum by (transport) (rate(stomp_gateway_sockjs_sessions_total{{{POD}}}[$__rate_interval]))")], 8),
    ]),
    ("Messages", [
        ("Frames from clients by command / s", "ops", "timeseries",
         [("{{command}}", f"sum by (command) (rate(stomp_gateway_frames_received_total{{{POD}}}[$__rate_interval]))")], 12),
        ("Frames to clients by command / s", "ops", "timeseries",
         [("{{command}}", f"sum by (command) (rate(stomp_gateway_frames_sent_total{{{POD}}}[$__rate_interval]))")], 12),
        ("Bytes per second by direction", "Bps", "timeseries",
         [("{{direction}}", f"sum by (direction) (rate(stomp_gateway_bytes_total{{{POD}}}[$__rate_interval]))")], 8),
        ("/app publishes per second", "ops", "timeseries",
         [("{{result}}", f"sum by (result) (rate(stomp_gateway_app_publishes_total{{{POD}}}[$__rate_interval]))")], 8),
        ("/app publish confirm latency", "s", "timeseries",
         [("p50", quantile(0.5, "stomp_gateway_app_publish_confirm_duration_seconds", None)),
          ("p99", quantile(0.99, "stomp_gateway_app_publish_confirm_duration_seconds", None))], 8),
    ]),
    ("Latency", [
        ("Relay latency client to broker", "s", "timeseries",
         [("p50", quantile(0.5, "stomp_gateway_relay_latency_seconds", None, "client_to_broker")),
          ("p90", quantile(0.9, "stomp_gateway_relay_latency_seconds", None, "client_to_broker")),
          ("p99", quantile(0.99, "stomp_gateway_relay_latency_seconds", None, "client_to_broker"))], 12),
        ("Relay latency broker to client", "s", "timeseries",
         [("p50", quantile(0.5, "stomp_gateway_relay_latency_seconds", None, "broker_to_client")),
          ("p90", quantile(0.9, "stomp_gateway_relay_latency_seconds", None, "broker_to_client")),
          ("p99", quantile(0.99, "stomp_gateway_relay_latency_seconds", None, "broker_to_client"))], 12),
    ]),
    ("Broker", [
        ("Broker links up", "none", "timeseries",
         [("{{link}}", f"sum by (link) (stomp_gateway_broker_links_up{{{POD}}})")], 8),
        ("Broker reconnects / s", "ops", "timeseries",
         [("{{link}}", f"sum by (link) (rate(stomp_gateway_broker_reconnects_total{{{POD}}}[$__rate_interval]))")], 8),
        ("Broker connect time p99", "s", "timeseries",
         [("{{link}}", quantile(0.99, "stomp_gateway_broker_connect_duration_seconds", "link"))], 8),
        ("Broker connect failures / sessions lost to the broker", "ops", "timeseries",
         [("connect failures", f"sum(rate(stomp_gateway_broker_connect_failures_total{{{POD}}}[$__rate_interval]))"),
          ("broker lost", f'sum(rate(stomp_gateway_sessions_closed_total{{{POD},reason="broker_lost"}}[$__rate_interval]))')], 12),
        ("Topology declarations", "none", "timeseries",
         [("{{kind}} {{result}}", f"sum by (kind, result) (increase(stomp_gateway_topology_declarations_total{{{POD}}}[$__rate_interval]))")], 12),
    ]),
    ("Refusals, limits and slow clients", [
        ("Authentication failures / s", "ops", "timeseries",
         [("{{reason}}", f"sum by (reason) (rate(stomp_gateway_auth_failures_total{{{POD}}}[$__rate_interval]))")], 8),
        ("Authorization denials / s", "ops", "timeseries",
         [("{{command}}", f"sum by (command) (rate(stomp_gateway_auth_denials_total{{{POD}}}[$__rate_interval]))")], 8),
        ("Limit hits / s", "ops", "timeseries",
         [("{{limit}}", f"sum by (limit) (rate(stomp_gateway_limit_hits_total{{{POD}}}[$__rate_interval]))")], 8),
        ("Rejected upgrades by reason", "reqps", "timeseries",
         [("{{reason}}", f"sum by (reason) (rate(stomp_gateway_connections_rejected_total{{{POD}}}[$__rate_interval]))")], 8),
        ("Slow consumers closed / backpressure pauses", "ops", "timeseries",
         [("slow consumers", f"sum(rate(stomp_gateway_slow_consumers_total{{{POD}}}[$__rate_interval]))"),
          ("backpressure pauses", f"sum(rate(stomp_gateway_backpressure_pauses_total{{{POD}}}[$__rate_interval]))")], 12),
        ("SockJS events / s", "ops", "timeseries",
         [("{{event}}", f"sum by (event) (rate(stomp_gateway_sockjs_events_total{{{POD}}}[$__rate_interval]))")], 12),
    ]),
    ("Drain", [
        ("Draining and not-ready pods", "none", "timeseries",
         [("draining {{pod}}", f"stomp_gateway_draining{{{POD}}}"),
          ("not ready {{pod}}", f"1 - stomp_gateway_ready{{{POD}}}")], 12),
        ("Sessions closed by the drain per second", "ops", "timeseries",
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
