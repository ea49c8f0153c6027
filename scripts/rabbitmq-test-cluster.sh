#!/usr/bin/env bash
# A throwaway two-node RabbitMQ cluster for the disruptive end-to-end tests
# (tests/tests/cluster.rs: broker restart, failover). It runs next to, and
# independently of, the main node (rabbit@localhost on 5672/61613/15672/15674),
# which it never touches.
#
#   scripts/rabbitmq-test-cluster.sh start    # start both nodes, cluster them, wait for STOMP
#   scripts/rabbitmq-test-cluster.sh status   # exit 0 when both run and are clustered
#   scripts/rabbitmq-test-cluster.sh stop     # stop both nodes, delete their data
#
# Both commands are idempotent. The nodes (the tests use the same defaults):
#
#   node               AMQP   STOMP   Erlang distribution
#   sgw-a@localhost    5681   61681   25681
#   sgw-b@localhost    5682   61682   25682
#
# sgw-b joins sgw-a's cluster. Only the rabbitmq_stomp plugin is enabled (no
# management or Web-STOMP, whose ports the main node uses); user guest/guest,
# vhost "/", everything on 127.0.0.1. Each node has its own config, enabled
# plugins, data (mnesia), log and pid files under $SGW_TEST_CLUSTER_DIR
# (default /tmp/sgw-test-cluster/<node>/; `stop` deletes it). Node logs:
# $SGW_TEST_CLUSTER_DIR/<node>/log/.
#
# The nodes run as the user that owns the main node's Erlang cookie
# (/var/lib/rabbitmq/.erlang.cookie, normally `rabbitmq`), started the same way
# as the main node (`rabbitmq-server -detached`), so `rabbitmqctl -n
# sgw-a@localhost ...` reaches them. Run this script as root or as that user.
# They are kept lean for a small machine: one Erlang scheduler each (+S 1:1).
# Their open-file limit is raised to the hard limit (`ulimit -Hn`).
#
# Environment: SGW_TEST_CLUSTER_DIR, RABBITMQ_WAIT_SECS (default 90),
# SGW_RABBITMQ_USER (default: owner of the cookie).
set -euo pipefail

DIR="${SGW_TEST_CLUSTER_DIR:-/tmp/sgw-test-cluster}"
WAIT_SECS="${RABBITMQ_WAIT_SECS:-90}"
COOKIE_HOME=/var/lib/rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin

# name amqp-port stomp-port dist-port
NODES=(
  "sgw-a@localhost 5681 61681 25681"
  "sgw-b@localhost 5682 61682 25682"
)
NODE_A="sgw-a@localhost"
NODE_B="sgw-b@localhost"

log() { printf 'rabbitmq-test-cluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl not found on PATH (install rabbitmq-server)"
[[ -x "$RMQ_BIN/rabbitmq-server" ]] || die "$RMQ_BIN/rabbitmq-server not found"

RMQ_USER="${SGW_RABBITMQ_USER:-$(stat -c %U "$COOKIE_HOME/.erlang.cookie" 2>/dev/null || echo rabbitmq)}"
if [[ "$(id -u)" != 0 && "$(id -un)" != "$RMQ_USER" ]]; then
  die "run as root or as $RMQ_USER (the nodes must share the main node's Erlang cookie)"
fi

ctl() { rabbitmqctl "$@"; }

# Runs a command as $RMQ_USER with the main node's home (and so its cookie).
as_rmq() {
  if [[ "$(id -un)" == "$RMQ_USER" ]]; then
    (cd / && env HOME="$COOKIE_HOME" "$@")
  else
    (cd / && runuser -u "$RMQ_USER" -- env HOME="$COOKIE_HOME" "$@")
  fi
}

node_reachable() { ctl -n "$1" -q status >/dev/null 2>&1; }

app_running() {
  [[ "$(ctl -n "$1" -q eval 'rabbit:is_running().' 2>/dev/null)" == "true" ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port="$1" what="$2" deadline=$((SECONDS + WAIT_SECS))
  until port_open "$port"; do
    ((SECONDS < deadline)) || die "$what on 127.0.0.1:$port is not accepting connections after ${WAIT_SECS}s"
    sleep 0.5
  done
}

wait_app() {
  local node="$1" deadline=$((SECONDS + WAIT_SECS))
  until app_running "$node"; do
    ((SECONDS < deadline)) || die "$node did not start within ${WAIT_SECS}s (log: $DIR/$node/log/)"
    sleep 1
  done
}

# Writes the per-node files: the env file the rabbitmq-server scripts read
# instead of /etc/rabbitmq/rabbitmq-env.conf, the config and enabled plugins.
write_node_files() {
  local name="$1" amqp="$2" stomp="$3" dist="$4" d="$DIR/$1"
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/rabbitmq-env.conf" <<EOF
NODENAME=$name
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$amqp
DIST_PORT=$dist
CONFIG_FILE=$d/rabbitmq.conf
ADVANCED_CONFIG_FILE=$d/advanced.config
ENABLED_PLUGINS_FILE=$d/enabled_plugins
MNESIA_BASE=$d/mnesia
LOG_BASE=$d/log
PID_FILE=$d/pid
SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$amqp
stomp.listeners.tcp.1 = 127.0.0.1:$stomp
log.console = false
log.file.level = info
vm_memory_high_watermark.relative = 0.2
disk_free_limit.absolute = 50MB
EOF
  echo '[rabbitmq_stomp].' >"$d/enabled_plugins"
  chown -R "$RMQ_USER:" "$d"
}

start_node() {
  local name="$1" amqp="$2" stomp="$3" dist="$4"
  if node_reachable "$name"; then
    if ! app_running "$name"; then
      log "$name is up but its application is stopped: start_app"
      ctl -n "$name" -q start_app >/dev/null
    else
      log "$name already running"
    fi
    return
  fi
  if port_open "$amqp" || port_open "$stomp" || port_open "$dist"; then
    die "a port of $name ($amqp/$stomp/$dist) is taken by another process"
  fi
  write_node_files "$@"
  log "starting $name (AMQP $amqp, STOMP $stomp)"
  # Raise the open-file limit to the hard limit in the node's own shell
  # (runuser's PAM session resets the soft limit, often to 1024).
  as_rmq RABBITMQ_CONF_ENV_FILE="$DIR/$name/rabbitmq-env.conf" \
    sh -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; exec "$@"' sh \
    "$RMQ_BIN/rabbitmq-server" -detached
}

# $NODE_B knows $NODE_A as a cluster member (`all`), or sees it running too.
clustered() {
  local which="${1:-all}"
  [[ "$(ctl -n "$NODE_B" -q eval "lists:member('$NODE_A', rabbit_mnesia:cluster_nodes($which))." 2>/dev/null)" == "true" ]]
}

cmd_start() {
  mkdir -p "$DIR"
  chmod 755 "$DIR"
  local n
  for n in "${NODES[@]}"; do
    # shellcheck disable=SC2086
    start_node $n
  done
  wait_app "$NODE_A"
  wait_app "$NODE_B"
  if ! clustered; then
    log "joining $NODE_B to $NODE_A"
    ctl -n "$NODE_B" -q stop_app >/dev/null
    ctl -n "$NODE_B" -q join_cluster "$NODE_A" >/dev/null
    ctl -n "$NODE_B" -q start_app >/dev/null
    wait_app "$NODE_B"
    clustered || die "$NODE_B did not join $NODE_A"
  fi
  for n in "${NODES[@]}"; do
    # shellcheck disable=SC2086
    set -- $n
    wait_port "$2" "AMQP of $1"
    wait_port "$3" "STOMP of $1"
  done
  log "ready: $NODE_A (AMQP 5681, STOMP 61681) + $NODE_B (AMQP 5682, STOMP 61682), clustered"
}

cmd_stop() {
  local n name pid
  # B first, then A, so the disc node that stops last is the first to boot.
  for name in "$NODE_B" "$NODE_A"; do
    if node_reachable "$name"; then
      log "stopping $name"
      ctl -n "$name" -q stop >/dev/null 2>&1 || true
    fi
    if [[ -f "$DIR/$name/pid" ]]; then
      pid="$(cat "$DIR/$name/pid" 2>/dev/null || true)"
      local deadline=$((SECONDS + 30))
      while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
          log "$name (pid $pid) did not stop; killing it"
          kill -9 "$pid" 2>/dev/null || true
          break
        fi
        sleep 0.5
      done
    fi
  done
  for n in "${NODES[@]}"; do
    # shellcheck disable=SC2086
    set -- $n
    if port_open "$2" || port_open "$3"; then
      die "$1's ports are still open after stop"
    fi
  done
  rm -rf "$DIR"
  log "stopped; removed $DIR"
}

cmd_status() {
  local ok=0 n
  for n in "${NODES[@]}"; do
    # shellcheck disable=SC2086
    set -- $n
    if node_reachable "$1" && app_running "$1" && port_open "$3"; then
      log "$1 running (AMQP $2, STOMP $3)"
    elif node_reachable "$1"; then
      log "$1 node up, application or STOMP listener down"
      ok=1
    else
      log "$1 not running"
      ok=1
    fi
  done
  if ((ok == 0)); then
    if clustered running; then
      log "$NODE_B is clustered with $NODE_A"
    else
      log "$NODE_B is NOT clustered with $NODE_A"
      ok=1
    fi
  fi
  return "$ok"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
