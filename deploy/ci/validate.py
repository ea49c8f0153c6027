#!/usr/bin/env python3
"""Offline checks of the deployment assets, run by scripts/validate-deploy.sh
(which fetches the tools and renders the manifests first). Each subcommand
prints what it checked and exits non-zero on the first class of failure.

  validate.py k8s KUBE_VERSION FILE...     rendered manifests vs the Kubernetes schemas
  validate.py values SCHEMA FILE...        values files vs values.schema.json
  validate.py configs OUT_DIR FILE...      gateway.toml of each ConfigMap -> OUT_DIR/<n>.toml
  validate.py compose COMPOSE SCHEMA       the compose file vs the compose-spec schema, plus references
  validate.py prometheus PROM_YML RULES OUT  prometheus.yml structure; OUT: a copy runnable by promtool
  validate.py dashboard JSON BUILDER OUT   dashboard is up to date; its queries -> OUT (a rules file for promtool)
  validate.py metric-names EXPOSITION SRC FILE...  every stomp_gateway_* name in FILE is exposed
  validate.py dockerfile DOCKERFILE TEST_SH  the Dockerfile's build command is the tests' one
"""
import json
import os
import re
import subprocess
import sys

import yaml
from importlib.metadata import version as pkg_version

# Kinds that come from CRDs: not in the Kubernetes OpenAPI schemas. Each gets
# a structural check (below) instead of a schema validation.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {"required": ["selector", "endpoints"]},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {"required": ["groups"]},
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): {"required": ["replicas", "rabbitmq"]},
    ("rabbitmq.com/v1beta1", "Exchange"): {"required": ["name", "type", "rabbitmqClusterReference"]},
    ("rabbitmq.com/v1beta1", "Queue"): {"required": ["name", "rabbitmqClusterReference"]},
    ("rabbitmq.com/v1beta1", "Binding"): {"required": ["source", "destination", "destinationType", "rabbitmqClusterReference"]},
}


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def check_crd(d, where):
    spec = d.get("spec") or {}
    key = (d.get("apiVersion"), d.get("kind"))
    for field in CRD_KINDS[key]["required"]:
        if field not in spec:
            fail(f"{where}: {d['kind']} {d['metadata'].get('name')}: spec.{field} missing")
    if d["kind"] == "RabbitmqCluster":
        plugins = spec["rabbitmq"].get("additionalPlugins", [])
        if "rabbitmq_stomp" not in plugins:
            fail(f"{where}: RabbitmqCluster without rabbitmq_stomp")
    if d["kind"] == "PrometheusRule":
        for g in spec["groups"]:
            for r in g["rules"]:
                if not ("alert" in r or "record" in r) or "expr" not in r:
                    fail(f"{where}: PrometheusRule rule without alert/record or expr: {r}")
    if d["kind"] == "ServiceMonitor":
        for e in spec["endpoints"]:
            if "port" not in e:
                fail(f"{where}: ServiceMonitor endpoint without port")


def cmd_k8s(version, files):
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError, SchemaNotFoundError, InvalidSchemaError

    counts = {}
    crds = {}
    for path in files:
        names = set()
        for d in docs(path):
            kind, name = d.get("kind"), (d.get("metadata") or {}).get("name")
            where = f"{os.path.basename(path)}: {kind}/{name}"
            if (kind, name) in names:
                fail(f"{where}: defined twice")
            names.add((kind, name))
            if (d.get("apiVersion"), kind) in CRD_KINDS:
                check_crd(d, where)
                crds[kind] = crds.get(kind, 0) + 1
                continue
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except ValidationError as e:
                fail(f"{where}: {e.message} at {'/'.join(str(p) for p in e.path)}")
            except (SchemaNotFoundError, InvalidSchemaError) as e:
                fail(f"{where}: no schema: {e}")
            counts[kind] = counts.get(kind, 0) + 1
        check_references(path)
    print(f"  kubernetes-validate {pkg_version('kubernetes-validate')} "
          f"(schemas of Kubernetes {version}, strict): {sum(counts.values())} objects valid: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if crds:
        print("  CRD objects, structural check only (no CRD schema offline): "
              + ", ".join(f"{k} {v}" for k, v in sorted(crds.items())))


def check_references(path):
    """Within one rendered set: every ConfigMap/Secret/ServiceAccount a
    Deployment names exists (or is a documented external one), every
    Service/HPA/PDB selects or targets a Deployment of the set."""
    ds = docs(path)
    by_kind = {}
    for d in ds:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    external_secrets = {"rabbitmq-default-user", "stomp-gateway-secrets", "stomp-gateway-credentials"}
    deployments = by_kind.get("Deployment", {})
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        sel = dep["spec"]["selector"]["matchLabels"]
        if not all(pod["metadata"]["labels"].get(k) == v for k, v in sel.items()):
            fail(f"{path}: Deployment {name}: selector does not match the pod labels")
        spec = pod["spec"]
        sa = spec.get("serviceAccountName")
        if sa and sa not in by_kind.get("ServiceAccount", {}):
            fail(f"{path}: Deployment {name}: ServiceAccount {sa} not defined")
        for v in spec.get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                fail(f"{path}: Deployment {name}: ConfigMap {v['configMap']['name']} not defined")
            if "secret" in v:
                s = v["secret"]["secretName"]
                if s not in by_kind.get("Secret", {}) and s not in external_secrets:
                    fail(f"{path}: Deployment {name}: Secret {s} not defined")
        for c in spec["containers"]:
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                p = c.get(probe, {}).get("httpGet")
                if p and isinstance(p["port"], str) and p["port"] not in ports:
                    fail(f"{path}: {name}: {probe} port {p['port']} is not a container port")
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] not in by_kind.get("Secret", {}) and ref["name"] not in external_secrets:
                    fail(f"{path}: {name}: env {e['name']}: Secret {ref['name']} not defined")
                if e["name"].startswith("GATEWAY__") and e["name"] != e["name"].upper():
                    fail(f"{path}: {name}: env {e['name']} is not upper case")
    pods = [dep["spec"]["template"]["metadata"]["labels"] for dep in deployments.values()]
    for kind in ("Service", "PodDisruptionBudget"):
        for name, d in by_kind.get(kind, {}).items():
            sel = d["spec"].get("selector", {})
            sel = sel.get("matchLabels", sel)
            if not any(all(p.get(k) == v for k, v in sel.items()) for p in pods):
                fail(f"{path}: {kind} {name} selects no Deployment's pods")
            if kind == "Service":
                for port in d["spec"]["ports"]:
                    tp = port.get("targetPort")
                    if isinstance(tp, str) and not any(
                        tp in {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
                        for dep in deployments.values()):
                        fail(f"{path}: Service {name}: targetPort {tp} is no container port")
    for name, d in by_kind.get("HorizontalPodAutoscaler", {}).items():
        if d["spec"]["scaleTargetRef"]["name"] not in deployments:
            fail(f"{path}: HPA {name} targets a Deployment not in the set")
    for name, d in by_kind.get("Ingress", {}).items():
        for r in d["spec"]["rules"]:
            for p in r["http"]["paths"]:
                if p["backend"]["service"]["name"] not in by_kind.get("Service", {}):
                    fail(f"{path}: Ingress {name}: backend Service not in the set")
    for name, d in by_kind.get("ServiceMonitor", {}).items():
        sel = d["spec"]["selector"]["matchLabels"]
        if not any(all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
                   for s in by_kind.get("Service", {}).values()):
            fail(f"{path}: ServiceMonitor {name} selects no Service")


def cmd_values(schema_path, files):
    import jsonschema
    schema = json.load(open(schema_path))
    jsonschema.Draft7Validator.check_schema(schema)
    v = jsonschema.Draft7Validator(schema)
    base = yaml.safe_load(open(files[0]))
    for path in files:
        data = yaml.safe_load(open(path))
        merged = deep_merge(base, data) if path != files[0] else data
        errors = sorted(v.iter_errors(merged), key=lambda e: list(e.path))
        if errors:
            fail(f"{path}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors))
        print(f"  {os.path.relpath(path)} (merged over values.yaml) is valid against values.schema.json (jsonschema {pkg_version('jsonschema')}, draft 7)")


def deep_merge(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, val in b.items():
            out[k] = deep_merge(a.get(k), val) if k in a else val
        return out
    return b


def cmd_configs(out_dir, files):
    n = 0
    for path in files:
        for d in docs(path):
            if d["kind"] == "ConfigMap" and "gateway.toml" in (d.get("data") or {}):
                n += 1
                out = os.path.join(out_dir, f"{os.path.basename(path).rsplit('.', 1)[0]}.toml")
                with open(out, "w") as f:
                    f.write(d["data"]["gateway.toml"])
                print(out)
    if n == 0:
        fail("no gateway.toml ConfigMap found")


def cmd_compose(path, schema_path):
    import jsonschema
    root = os.path.dirname(os.path.abspath(path))
    data = yaml.safe_load(open(path))
    schema = json.load(open(schema_path))
    # The 2021 compose-spec schema predates the top-level `name`.
    top = dict(data)
    top.pop("name", None)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(top))
    if errors:
        fail("compose: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors))
    services = data["services"]
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            if dep not in services:
                fail(f"compose: {name} depends on unknown service {dep}")
        for vol in s.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                if not os.path.exists(os.path.join(root, src)):
                    fail(f"compose: {name}: volume source {src} does not exist")
            elif src not in data.get("volumes", {}):
                fail(f"compose: {name}: named volume {src} not declared")
        if "build" in s:
            ctx = os.path.join(root, s["build"]["context"])
            if not os.path.isfile(os.path.join(ctx, s["build"]["dockerfile"])):
                fail(f"compose: {name}: Dockerfile not found")
    gw = services["gateway"]
    if gw.get("deploy", {}).get("replicas") != 3:
        fail("compose: the gateway must run 3 replicas")
    env = gw["environment"]
    if env.get("GATEWAY__BROKER__MODE") != "relay":
        fail("compose: the gateway must set broker.mode = relay")
    plugins = open(os.path.join(root, "rabbitmq/enabled_plugins")).read()
    if not re.fullmatch(r"\s*\[[a-z_,\s]*\]\.\s*", plugins) or "rabbitmq_stomp" not in plugins \
            or "rabbitmq_management" not in plugins:
        fail("compose: enabled_plugins must be an Erlang list with rabbitmq_stomp and rabbitmq_management")
    # The gateway's environment, for --check-config by the caller.
    with open(os.environ.get("COMPOSE_ENV_OUT", "/dev/null"), "w") as f:
        for k, v in env.items():
            f.write(f"{k}={v}\n")
    print(f"  compose file valid against the compose-spec schema; {len(services)} services, "
          "references (volumes, build, depends_on) resolve, gateway x3 in relay mode, enabled_plugins parses")


def cmd_prometheus(path, rules, out):
    data = yaml.safe_load(open(path))
    jobs = {j["job_name"]: j for j in data["scrape_configs"]}
    gw = jobs.get("stomp-gateway")
    if not gw or gw.get("metrics_path", "/metrics") != "/metrics":
        fail("prometheus: no stomp-gateway job scraping /metrics")
    sd = gw.get("dns_sd_configs", [{}])[0]
    if sd.get("port") != 9090:
        fail("prometheus: the gateway job must scrape the admin port 9090")
    data["rule_files"] = [os.path.abspath(rules)]
    with open(out, "w") as f:
        yaml.safe_dump(data, f)
    print(f"  prometheus.yml: jobs {', '.join(jobs)}; gateway job scrapes admin port 9090")


def grafana_exprs(dash):
    for p in dash["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("definition")
        if q and q.startswith("label_values("):
            yield f"variable {v['name']}", q


def cmd_dashboard(path, builder, out):
    current = open(path).read()
    fresh = subprocess.run([sys.executable, "-c",
                            f"import runpy, json; m = runpy.run_path({builder!r}); print(json.dumps(m['build'](), indent=2))"],
                           check=True, capture_output=True, text=True).stdout
    if current != fresh:
        fail(f"{path} is not what {builder} writes: run it")
    dash = json.loads(current)
    rules = []
    for i, (title, expr) in enumerate(grafana_exprs(dash)):
        if expr.startswith("label_values("):
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr)
            if not m:
                fail(f"dashboard variable query not understood: {expr}")
            expr = m.group(1)
        e = expr.replace("$__rate_interval", "5m").replace("$pod", ".*")
        if "$" in e:
            fail(f"dashboard panel {title!r}: unknown variable in {expr}")
        rules.append({"record": f"dashboard:q{i}", "expr": e})
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    print(f"  dashboard: {len(dash['panels'])} panels, {len(rules)} queries (checked as PromQL by promtool next)")


def cmd_metric_names(exposition, source_dir, files):
    """Every stomp_gateway_* name in `files` is in the exposition of a fresh
    gateway, or (a labelled series that appears with its first event) is
    registered by the gateway's source under `source_dir`."""
    from prometheus_client.parser import text_string_to_metric_families
    names = set()
    for fam in text_string_to_metric_families(open(exposition).read()):
        for s in fam.samples:
            names.add(s.name)
        names.add(fam.name)
    if not any(n.startswith("stomp_gateway_") for n in names):
        fail("no stomp_gateway_ metric in the exposition")
    literals = set()
    for dirpath, _, filenames in os.walk(source_dir):
        for fn in filenames:
            if fn.endswith(".rs"):
                literals |= set(re.findall(r'"([a-z][a-z0-9_]*)"', open(os.path.join(dirpath, fn)).read()))
    missing, used, from_source = {}, set(), set()
    for path in files:
        text = open(path).read()
        for n in set(re.findall(r"\bstomp_gateway_[a-z0-9_]+\b", text)):
            used.add(n)
            if n in names:
                continue
            base = re.sub(r"_(bucket|count|sum)$", "", n)[len("stomp_gateway_"):]
            if base in literals:
                from_source.add(n)
                continue
            missing.setdefault(n, []).append(os.path.relpath(path))
    if missing:
        fail("names the gateway does not expose: " + "; ".join(f"{n} ({', '.join(w)})" for n, w in sorted(missing.items())))
    print(f"  {len(used)} metric names used by {len(files)} files: {len(used) - len(from_source)} in a fresh "
          f"gateway's exposition (parsed by prometheus_client: {len(names)} sample names)"
          + (f", {len(from_source)} registered in the source and exported from their first event: "
             + ", ".join(sorted(from_source)) if from_source else ""))


def cmd_dockerfile(path, test_sh):
    import dockerfile
    cmds = dockerfile.parse_file(path)
    froms = [c for c in cmds if c.cmd == "FROM"]
    if len(froms) < 2:
        fail("Dockerfile: not multi-stage")
    runs = [c for c in cmds if c.cmd == "RUN" and "cargo build" in c.value[0]]
    if len(runs) != 1:
        fail("Dockerfile: expected one RUN with cargo build")
    build = re.search(r"cargo build[^&;|]*", runs[0].value[0]).group(0).strip()
    tests = open(test_sh).read()
    m = re.search(r"^cargo build[^\n#]*", tests, re.M)
    if not m:
        fail(f"{test_sh}: no cargo build line")
    test_cmd = m.group(0).strip()
    # Same command: the test build's arguments, plus only --locked and --profile.
    extra = build.split()
    for a in test_cmd.split():
        if a not in extra:
            fail(f"Dockerfile build `{build}` lacks `{a}` of `{test_cmd}`")
        extra.remove(a)
    rest = [a for a in extra if a not in ("--locked", "--profile") and not a.strip('"').startswith("${CARGO_PROFILE")]
    if rest:
        fail(f"Dockerfile build `{build}` adds {rest} to the tests' `{test_cmd}`")
    final = cmds[cmds.index(froms[-1]):]
    user = [c for c in final if c.cmd == "USER"]
    if not user or user[-1].value[0].split(":")[0] in ("root", "0"):
        fail("Dockerfile: the final stage must run as a non-root USER")
    exposed = {p for c in final if c.cmd == "EXPOSE" for p in c.value}
    if not {"8080", "9090"} <= exposed:
        fail("Dockerfile: must EXPOSE 8080 and 9090")
    hc = [c for c in final if c.cmd == "HEALTHCHECK"]
    if not hc or "healthz" not in " ".join(hc[0].value) and "healthz" not in hc[0].original:
        fail("Dockerfile: HEALTHCHECK on /healthz missing")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                if not os.path.exists(os.path.join(root, src)):
                    fail(f"Dockerfile: COPY source {src} does not exist")
    print(f"  Dockerfile (parsed with BuildKit's parser): {len(froms)} stages, build `{build}` = tests' "
          f"`{test_cmd}` + --locked --profile; USER {user[-1].value[0]}; EXPOSE {' '.join(sorted(exposed))}; HEALTHCHECK")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "k8s": lambda: cmd_k8s(args[0], args[1:]),
        "values": lambda: cmd_values(args[0], args[1:]),
        "configs": lambda: cmd_configs(args[0], args[1:]),
        "compose": lambda: cmd_compose(args[0], args[1]),
        "prometheus": lambda: cmd_prometheus(args[0], args[1], args[2]),
        "dashboard": lambda: cmd_dashboard(args[0], args[1], args[2]),
        "metric-names": lambda: cmd_metric_names(args[0], args[1], args[2:]),
        "dockerfile": lambda: cmd_dockerfile(args[0], args[1]),
    }[cmd]()
