#!/usr/bin/env bash
# The whole test suite: unit, codec and end-to-end tests (real stomp-gateway
# binary against the local RabbitMQ), the relay-path suites once more on the
# per-session fan-out path, then the Node @stomp/stompjs and sockjs-client
# compatibility tests (also once more per-session), the demo page in headless
# Chromium, then the cluster tests (several gateways, drain, broker restart,
# failover) with a throwaway two-node RabbitMQ cluster next to the main node
# (scripts/rabbitmq-test-cluster.sh; stopped again on exit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/rabbitmq-setup.sh

# The e2e tests spawn target/debug/stomp-gateway; build it first.
cargo build --workspace --bins
cargo test --workspace
# The suites that exercise relayed destinations once more on the per-session
# fan-out path (E2E_FANOUT=per-session: [fanout] topic/exchange/user =
# "per-session", each session's own STOMP connection instead of the pod's
# shared upstream; tests/src/gateway.rs). Shared-path-only tests skip.
E2E_FANOUT=per-session cargo test --workspace --test relay --test protocol \
  --test security --test control_plane --test chat --test fanout

if [[ -f tests/node/package-lock.json ]]; then
  npm ci --prefix tests/node --no-audit --no-fund
else
  npm install --prefix tests/node --no-audit --no-fund
fi
# The README's client example (examples/node-client), which the Node tests run.
npm ci --prefix examples/node-client --no-audit --no-fund
npm test --prefix tests/node
# The @stomp/stompjs, SockJS and heart-beat tests again on the per-session
# path: gateway-process.js reads E2E_FANOUT; the GATEWAY__FANOUT__* variables
# reach the gateways the other test files configure themselves.
(cd tests/node && E2E_FANOUT=per-session GATEWAY__FANOUT__TOPIC=per-session \
  GATEWAY__FANOUT__EXCHANGE=per-session GATEWAY__FANOUT__USER=per-session \
  node --test --test-reporter=spec test/gateway.test.js test/sockjs.test.js test/heartbeat.test.js)

scripts/validate-deploy.sh   # Helm, kustomize, compose, HAProxy, Prometheus, dashboard (offline)

# The demo page in headless Chromium (tests/browser/): Debian's chromium,
# installed here when missing so a fresh machine works.
if [[ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: chromium is missing; install it: apt-get install -y chromium" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
fi
npm run test:browser --prefix tests/node

# Cluster phase. The tests in tests/tests/cluster.rs are #[ignore]d in the
# run above: they are slow, must run one at a time, and the disruptive ones
# stop and start node sgw-a@localhost of the test cluster (never the main
# node). --nocapture shows their reports (resends, duplicates, timings).
trap 'scripts/rabbitmq-test-cluster.sh stop' EXIT
phase_start=$SECONDS
scripts/rabbitmq-test-cluster.sh start
echo "test.sh: test cluster started in $((SECONDS - phase_start))s" >&2
# --workspace, not -p e2e: the same feature set as the build above, so
# nothing is compiled again (-p e2e unified features differently and
# rebuilt 78 crates, over 3 minutes here).
cargo test --workspace --test cluster -- --ignored --test-threads=1 --nocapture
echo "test.sh: cluster phase took $((SECONDS - phase_start))s (plus the stop)" >&2
