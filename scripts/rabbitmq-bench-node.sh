#!/usr/bin/env bash
# A RabbitMQ node of the benchmark's own (bench/compare.sh), so that the runs
# that need thousands of connections never restart or fill the main node
# (rabbit@localhost on 5672/61613/15672/15674), which this script never touches.
#
#   scripts/rabbitmq-bench-node.sh start    # start the node, wait for every listener
#   scripts/rabbitmq-bench-node.sh status   # exit 0 when it runs with every listener up
#   scripts/rabbitmq-bench-node.sh stop     # stop it, delete its data
#
# All three are idempotent. The node, everything on 127.0.0.1:
#
#   node                 AMQP   STOMP   Web-STOMP (ws://…/ws)   management   distribution
#   sgw-bench@localhost  5691   61691   15691                   15692        25691
#
# Plugins: rabbitmq_management, rabbitmq_stomp, rabbitmq_web_stomp. User
# guest/guest (loopback only, RabbitMQ's default), vhost "/". Config, enabled
# plugins, data (mnesia), logs and pid file live under $SGW_BENCH_NODE_DIR
# (default /tmp/sgw-bench-node/; `stop` deletes it; logs in its log/).
#
# Open files: the node is started with a raised limit (soft = hard =
# $SGW_BENCH_NOFILE, default 65536; as root the hard limit is raised first,
# which needs CAP_SYS_RESOURCE; without it the shell's hard limit is used)
# because RabbitMQ's usual 1024 stops it at about 830 connections, and the
# 10,000-subscriber runs need one connection per subscriber on the
# per-session and direct paths. As root it switches to the user that owns the
# main node's Erlang cookie (normally `rabbitmq`) with setpriv, not su or
# runuser, whose PAM session would put the soft limit back to 1024; so
# `rabbitmqctl -n sgw-bench@localhost …` reaches it. Run this script as root
# or as that user.
#
# Environment: SGW_BENCH_NODE_DIR, SGW_BENCH_NOFILE, RABBITMQ_WAIT_SECS
# (default 90), SGW_RABBITMQ_USER (default: owner of the cookie).
set -euo pipefail

DIR="${SGW_BENCH_NODE_DIR:-/tmp/sgw-bench-node}"
NOFILE="${SGW_BENCH_NOFILE:-65536}"
WAIT_SECS="${RABBITMQ_WAIT_SECS:-90}"
COOKIE_HOME=/var/lib/rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin

NODE=sgw-bench@localhost
AMQP_PORT=5691
STOMP_PORT=61691
WEB_STOMP_PORT=15691
MGMT_PORT=15692
DIST_PORT=25691
PORTS=("$AMQP_PORT" "$STOMP_PORT" "$WEB_STOMP_PORT" "$MGMT_PORT")

log() { printf 'rabbitmq-bench-node: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl not found on PATH (install rabbitmq-server)"
[[ -x "$RMQ_BIN/rabbitmq-server" ]] || die "$RMQ_BIN/rabbitmq-server not found"

RMQ_USER="${SGW_RABBITMQ_USER:-$(stat -c %U "$COOKIE_HOME/.erlang.cookie" 2>/dev/null || echo rabbitmq)}"
if [[ "$(id -u)" != 0 && "$(id -un)" != "$RMQ_USER" ]]; then
  die "run as root or as $RMQ_USER (the node must share the main node's Erlang cookie)"
fi

ctl() { rabbitmqctl -n "$NODE" "$@"; }
node_reachable() { ctl -q status >/dev/null 2>&1; }
app_running() { [[ "$(ctl -q eval 'rabbit:is_running().' 2>/dev/null)" == "true" ]]; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port="$1" what="$2" deadline=$((SECONDS + WAIT_SECS))
  until port_open "$port"; do
    ((SECONDS < deadline)) || die "$what on 127.0.0.1:$port is not accepting connections after ${WAIT_SECS}s (log: $DIR/log/)"
    sleep 0.5
  done
}

wait_app() {
  local deadline=$((SECONDS + WAIT_SECS))
  until app_running; do
    ((SECONDS < deadline)) || die "$NODE did not start within ${WAIT_SECS}s (log: $DIR/log/)"
    sleep 1
  done
}

# The env file the rabbitmq-server scripts read instead of
# /etc/rabbitmq/rabbitmq-env.conf, the config and the enabled plugins.
write_node_files() {
  mkdir -p "$DIR/mnesia" "$DIR/log"
  chmod 755 "$DIR"
  cat >"$DIR/rabbitmq-env.conf" <<EOF
NODENAME=$NODE
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$AMQP_PORT
DIST_PORT=$DIST_PORT
CONFIG_FILE=$DIR/rabbitmq.conf
ADVANCED_CONFIG_FILE=$DIR/advanced.config
ENABLED_PLUGINS_FILE=$DIR/enabled_plugins
MNESIA_BASE=$DIR/mnesia
LOG_BASE=$DIR/log
PID_FILE=$DIR/pid
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  cat >"$DIR/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
stomp.listeners.tcp.1 = 127.0.0.1:$STOMP_PORT
web_stomp.tcp.ip = 127.0.0.1
web_stomp.tcp.port = $WEB_STOMP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
log.console = false
log.file.level = warning
vm_memory_high_watermark.relative = 0.4
disk_free_limit.absolute = 50MB
EOF
  echo '[rabbitmq_management,rabbitmq_stomp,rabbitmq_web_stomp].' >"$DIR/enabled_plugins"
  chown -R "$RMQ_USER:" "$DIR"
}

cmd_start() {
  if node_reachable; then
    if ! app_running; then
      log "$NODE is up but its application is stopped: start_app"
      ctl -q start_app >/dev/null
    else
      log "$NODE already running"
    fi
  else
    local p
    for p in "${PORTS[@]}" "$DIST_PORT"; do
      port_open "$p" && die "port $p of $NODE is taken by another process"
    done
    write_node_files
    (
      cd /
      # Raising the hard limit needs CAP_SYS_RESOURCE; without it (some
      # containers) the node gets this shell's hard limit.
      if [[ "$(id -u)" == 0 ]]; then
        ulimit -Hn "$NOFILE" 2>/dev/null || log "cannot raise the hard open-file limit to $NOFILE; using $(ulimit -Hn)"
      fi
      ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
      log "starting $NODE (AMQP $AMQP_PORT, STOMP $STOMP_PORT, Web-STOMP $WEB_STOMP_PORT, management $MGMT_PORT), open-file limit $(ulimit -n)"
      if [[ "$(id -un)" == "$RMQ_USER" ]]; then
        env HOME="$COOKIE_HOME" RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" \
          "$RMQ_BIN/rabbitmq-server" -detached
      else
        command -v setpriv >/dev/null 2>&1 || die "setpriv not found (util-linux)"
        setpriv --reuid="$RMQ_USER" --regid="$RMQ_USER" --init-groups \
          env HOME="$COOKIE_HOME" RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" \
          "$RMQ_BIN/rabbitmq-server" -detached
      fi
    )
  fi
  wait_app
  wait_port "$AMQP_PORT" "AMQP of $NODE"
  wait_port "$STOMP_PORT" "STOMP of $NODE"
  wait_port "$WEB_STOMP_PORT" "Web-STOMP of $NODE"
  wait_port "$MGMT_PORT" "management API of $NODE"
  log "ready: $NODE, beam.smp pid $(beam_pid), open-file limit $(beam_nofile)"
}

beam_pid() { ctl -q eval 'os:getpid().' 2>/dev/null | tr -dc '0-9'; }

beam_nofile() {
  local pid
  pid="$(beam_pid)"
  awk '/Max open files/ {print $4 " (hard " $5 ")"}' "/proc/$pid/limits" 2>/dev/null || echo unknown
}

cmd_stop() {
  local pid=""
  [[ -f "$DIR/pid" ]] && pid="$(cat "$DIR/pid" 2>/dev/null || true)"
  if node_reachable; then
    [[ -n "$pid" ]] || pid="$(beam_pid)"
    log "stopping $NODE"
    ctl -q stop >/dev/null 2>&1 || true
  fi
  local deadline=$((SECONDS + 30))
  while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$NODE (pid $pid) did not stop; killing it"
      kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  local p
  for p in "${PORTS[@]}"; do
    port_open "$p" && die "port $p is still open after stopping $NODE"
  done
  rm -rf "$DIR"
  log "stopped; removed $DIR"
}

cmd_status() {
  if ! node_reachable; then
    log "$NODE not running"
    return 1
  fi
  if ! app_running; then
    log "$NODE node up, application stopped"
    return 1
  fi
  local p ok=0
  for p in "${PORTS[@]}"; do
    port_open "$p" || {
      log "$NODE: port $p not accepting connections"
      ok=1
    }
  done
  ((ok == 0)) && log "$NODE running (beam.smp pid $(beam_pid), open-file limit $(beam_nofile))"
  return "$ok"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  pid) beam_pid ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
