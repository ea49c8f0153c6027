#!/usr/bin/env bash
# The whole test suite: unit, codec and end-to-end tests (real stomp-gateway
# binary against the local RabbitMQ), then the Node @stomp/stompjs
# compatibility test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/rabbitmq-setup.sh

# The e2e tests spawn target/debug/stomp-gateway; build it first.
cargo build --workspace --bins
cargo test --workspace

if [[ -f tests/node/package-lock.json ]]; then
  npm ci --prefix tests/node --no-audit --no-fund
else
  npm install --prefix tests/node --no-audit --no-fund
fi
npm test --prefix tests/node
