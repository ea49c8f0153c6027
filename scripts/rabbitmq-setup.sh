#!/usr/bin/env bash
# Makes the local RabbitMQ node ready for stomp-gateway: node running, the
# STOMP, Web-STOMP and management plugins enabled, and the AMQP (5672),
# STOMP (61613), Web-STOMP (15674) and management (15672) ports accepting
# connections. Safe to run repeatedly.
set -euo pipefail

AMQP_PORT="${RABBITMQ_AMQP_PORT:-5672}"
STOMP_PORT="${RABBITMQ_STOMP_PORT:-61613}"
MGMT_PORT="${RABBITMQ_MANAGEMENT_PORT:-15672}"
WEB_STOMP_PORT="${RABBITMQ_WEB_STOMP_PORT:-15674}"
WAIT_SECS="${RABBITMQ_WAIT_SECS:-60}"

log() { printf 'rabbitmq-setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl not found on PATH (install rabbitmq-server)"
command -v rabbitmq-plugins >/dev/null 2>&1 || die "rabbitmq-plugins not found on PATH"

if ! rabbitmqctl status >/dev/null 2>&1; then
  log "node not running; starting it with rabbitmq-server -detached"
  command -v rabbitmq-server >/dev/null 2>&1 || die "rabbitmq-server not found on PATH"
  rabbitmq-server -detached
  deadline=$((SECONDS + WAIT_SECS))
  until rabbitmqctl await_startup --timeout 10 >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "RabbitMQ did not start within ${WAIT_SECS}s (see /var/log/rabbitmq/)"
    fi
    sleep 1
  done
  log "node started"
fi

# Enabling an already enabled plugin is a no-op.
rabbitmq-plugins enable rabbitmq_stomp rabbitmq_web_stomp rabbitmq_management >/dev/null

wait_port() {
  local port="$1" what="$2" deadline=$((SECONDS + WAIT_SECS))
  until (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      die "${what} on 127.0.0.1:${port} is not accepting connections after ${WAIT_SECS}s"
    fi
    sleep 0.5
  done
}

wait_port "$AMQP_PORT" "RabbitMQ AMQP (the gateway's control plane)"
wait_port "$STOMP_PORT" "RabbitMQ STOMP plugin"
wait_port "$MGMT_PORT" "RabbitMQ management API"
wait_port "$WEB_STOMP_PORT" "RabbitMQ Web-STOMP plugin (the load generator's tests compare against it)"
log "ready: AMQP on 127.0.0.1:${AMQP_PORT}, STOMP on ${STOMP_PORT}, Web-STOMP on ${WEB_STOMP_PORT}, management API on ${MGMT_PORT}"
