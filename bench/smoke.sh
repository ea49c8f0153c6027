#!/usr/bin/env bash
# Smoke test for the load generator: 2 seconds of 1 publisher -> 1 subscriber
# at 200 msg/s against the STOMP-over-WebSocket URL given as $1 (stomp-gateway
# or RabbitMQ Web-STOMP). Prints stomp-load's JSON summary and exits non-zero
# if nothing was delivered, any message was lost, or any session failed.
#
#   bench/smoke.sh ws://127.0.0.1:15674/ws
#
# STOMP_LOAD_BIN may point at a prebuilt stomp-load; otherwise it is built
# with cargo (debug profile).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

URL="${1:?usage: bench/smoke.sh ws://HOST:PORT/ws}"

if [[ -n "${STOMP_LOAD_BIN:-}" ]]; then
  load=("$STOMP_LOAD_BIN")
else
  cargo build --quiet -p stomp-load
  load=(cargo run --quiet -p stomp-load --)
fi

# --strict: exit status 2 when delivered == 0, loss > 0, a session failed or
# an error was seen (the JSON's "check" says which).
if "${load[@]}" throughput --url "$URL" \
  --publishers 1 --subscribers 1 --rate 200 \
  --warmup 0 --duration 2 --drain-max 5 --progress 1 \
  --strict; then
  echo "smoke: ok ($URL)" >&2
else
  status=$?
  echo "smoke: FAILED ($URL), exit status $status" >&2
  exit "$status"
fi
