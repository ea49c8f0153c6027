#!/usr/bin/env bash
# Benchmarks stomp-gateway against RabbitMQ's own Web-STOMP endpoint with
# identical traffic (stomp-load), then writes docs/benchmarks.md and
# docs/benchmarks-latency.svg.
#
# Steps:
#   1. cargo build --release -p stomp-gateway -p stomp-load
#   2. raise this shell's open-file limit (the generator and gateway inherit it)
#   3. RabbitMQ: by default the benchmark's own node, sgw-bench@localhost
#      (scripts/rabbitmq-bench-node.sh: AMQP 5691, STOMP 61691, Web-STOMP
#      15691, management 15692, open-file limit raised), started if it is not
#      running and stopped again at the end if this script started it. The
#      main node (rabbit@localhost) is not touched. With --main-node, the old
#      behaviour: the main node, restarted with a raised open-file limit
#      (rabbitmqctl stop; ulimit -n 65536; rabbitmq-server -detached as user
#      rabbitmq through setpriv, not su, whose PAM limits would put the soft
#      limit back to 1024) unless --no-restart. DISRUPTIVE: the restart cuts
#      every other user of the main node (tests running on this machine).
#   4. for each case, R rounds over the targets (A B C A B C ...); before
#      every gateway run a fresh gateway with that target's configuration is
#      started on free ports (and stopped after it), sampling CPU and RSS of
#      the gateway and of RabbitMQ's beam.smp; after every run, wait until
#      RabbitMQ's connection and queue counts are back to where they were at
#      the start (at most 180 s), so no run pays for the last one's cleanup
#   5. stomp-load report: medians over rounds -> markdown table with targets,
#      SVG latency plot
#
# Usage: bench/compare.sh [--quick] [--rounds N] [--out DIR] [--cases LIST]
#                         [--targets LIST] [--main-node] [--no-restart]
#                         [--no-build] [--direct-only]
#
#   --quick        1 round, tiny sizes, results and report in a temp dir (not
#                  docs/): for CI and dry runs
#   --rounds N     rounds per case and target (default 3; medians)
#   --out DIR      where the run JSON goes (default target/bench/<UTC time>)
#   --markdown F   where the report goes (default docs/benchmarks.md; with
#                  --quick, in the results directory); the SVG goes next to it
#   --cases LIST   comma list of: throughput,latency,fanout,connect-storm,idle,
#                  fanout-wide (10,000 subscribers on one topic),
#                  idle-subscribed (idle sessions each holding one subscription
#                  to the same topic),
#                  paced (the paced search: the highest rate 10 1:1 topic
#                  pairs sustain with no backlog growth)
#   --targets LIST comma list of (default: shared,per-session,direct):
#                    shared       the gateway in relay mode, [fanout] all
#                                 "shared" (one AMQP queue per pod, local
#                                 fan-out)
#                    per-session  the gateway in relay mode, [fanout] all
#                                 "per-session" (one STOMP connection to
#                                 RabbitMQ per browser)
#                    gateway      alias of per-session (older reports)
#                    embedded     the gateway with broker.mode = "embedded"
#                                 (no RabbitMQ behind it)
#                    direct       RabbitMQ Web-STOMP
#   --main-node    use the main RabbitMQ node (see step 3; disruptive)
#   --no-restart   with --main-node: keep it running as it is (its limit may
#                  be too low)
#   --no-build     use existing binaries (STOMP_LOAD_BIN / GATEWAY_BIN or
#                  target/release)
#   --direct-only  only run against Web-STOMP (no gateway)
#
# Environment: WEB_STOMP_URL, RABBITMQ_STOMP_ADDR, RABBITMQ_AMQP_URL (default:
# the bench node's ws://127.0.0.1:15691/ws, 127.0.0.1:61691,
# amqp://guest:guest@127.0.0.1:5691/%2f; with --main-node the main node's
# 15674, 61613, 5672), SOURCE_IPS (127.0.0.2-127.0.0.50), PAUSE_SECS (pause
# between runs), STOMP_LOAD_BIN, GATEWAY_BIN, CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
INVOCATION="bench/compare.sh $*"

log() { printf '[compare %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

QUICK=0
ROUNDS=""
OUT=""
MARKDOWN=""
RESTART=1
MAIN_NODE=0
BUILD=1
TARGETS=(shared per-session direct)
CASES="throughput,latency,fanout,connect-storm,idle"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --cases) CASES="${2:?--cases needs a list}"; shift ;;
    --no-restart) RESTART=0 ;;
    --main-node) MAIN_NODE=1 ;;
    --markdown) MARKDOWN="${2:?--markdown needs a file}"; shift ;;
    --no-build) BUILD=0 ;;
    --direct-only) TARGETS=(direct) ;;
    --targets) IFS=',' read -r -a TARGETS <<<"${2:?--targets needs a list}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
  shift
done

# "gateway" is the old name of per-session.
HAVE_GW=0
for i in "${!TARGETS[@]}"; do
  case "${TARGETS[$i]}" in
    gateway) TARGETS[i]=per-session; HAVE_GW=1 ;;
    shared | per-session | embedded) HAVE_GW=1 ;;
    direct) ;;
    *) die "--targets: unknown target ${TARGETS[$i]}" ;;
  esac
done
is_gateway() { [[ "$1" != direct ]]; }

BENCH_NODE=sgw-bench@localhost
if ((MAIN_NODE)); then
  RMQ_NODE=""
  WEB_STOMP_URL="${WEB_STOMP_URL:-ws://127.0.0.1:15674/ws}"
  STOMP_ADDR="${RABBITMQ_STOMP_ADDR:-127.0.0.1:61613}"
  AMQP_URL="${RABBITMQ_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
else
  RMQ_NODE="$BENCH_NODE"
  WEB_STOMP_URL="${WEB_STOMP_URL:-ws://127.0.0.1:15691/ws}"
  STOMP_ADDR="${RABBITMQ_STOMP_ADDR:-127.0.0.1:61691}"
  AMQP_URL="${RABBITMQ_AMQP_URL:-amqp://guest:guest@127.0.0.1:5691/%2f}"
fi
# rabbitmqctl against the node the runs use.
rmqctl() {
  if [[ -n "$RMQ_NODE" ]]; then
    rabbitmqctl -n "$RMQ_NODE" "$@"
  else
    rabbitmqctl "$@"
  fi
}
SOURCE_IPS="${SOURCE_IPS:-127.0.0.2-127.0.0.50}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if ((QUICK)); then
  ROUNDS="${ROUNDS:-1}"
  RESTART=0 # only ever applies to --main-node
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/stomp-bench.XXXXXX")}"
  MARKDOWN="${MARKDOWN:-$OUT/benchmarks.md}"
  PAUSE_SECS="${PAUSE_SECS:-1}"
else
  ROUNDS="${ROUNDS:-3}"
  OUT="${OUT:-$TARGET_DIR/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
  MARKDOWN="${MARKDOWN:-docs/benchmarks.md}"
  PAUSE_SECS="${PAUSE_SECS:-5}"
fi
SVG="$(dirname "$MARKDOWN")/benchmarks-latency.svg"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
mkdir -p "$OUT/runs" "$OUT/logs"
log "results: $OUT (report: $MARKDOWN)"

# ---- 1. build ---------------------------------------------------------------
if ((BUILD)); then
  if ((HAVE_GW)); then
    log "building release binaries: cargo build --release -p stomp-gateway -p stomp-load"
    cargo build --release -p stomp-gateway -p stomp-load
  else
    log "building release binary: cargo build --release -p stomp-load"
    cargo build --release -p stomp-load
  fi
fi
LOAD="${STOMP_LOAD_BIN:-$TARGET_DIR/release/stomp-load}"
GATEWAY="${GATEWAY_BIN:-$TARGET_DIR/release/stomp-gateway}"
[[ -x "$LOAD" ]] || die "no stomp-load binary at $LOAD"

# ---- 2. our own file-descriptor limit ----------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open-file limit for stomp-load and the gateway: $(ulimit -n)"

# ---- 3. RabbitMQ --------------------------------------------------------------
wait_port() {
  local port="$1" what="$2" deadline=$((SECONDS + 120))
  until (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; do
    ((SECONDS < deadline)) || die "$what on 127.0.0.1:$port is not accepting connections"
    sleep 0.5
  done
}

beam_pid() {
  local pid
  pid="$(rmqctl eval 'os:getpid().' 2>/dev/null | tr -dc '0-9')" || true
  if [[ -z "$pid" && -z "$RMQ_NODE" ]]; then
    pid="$(pgrep -o beam.smp || true)"
  fi
  [[ -n "$pid" ]] || die "cannot find RabbitMQ's beam.smp process"
  echo "$pid"
}

beam_nofile() { awk '/Max open files/ {print $4 " (hard " $5 ")"}' "/proc/$1/limits" 2>/dev/null || echo unknown; }

BENCH_NODE_STARTED=0
stop_bench_node() {
  if ((BENCH_NODE_STARTED)); then
    log "stopping the bench node $BENCH_NODE (scripts/rabbitmq-bench-node.sh stop)"
    scripts/rabbitmq-bench-node.sh stop || log "WARNING: could not stop $BENCH_NODE"
    BENCH_NODE_STARTED=0
  fi
}
if ((!MAIN_NODE)); then
  if scripts/rabbitmq-bench-node.sh status 2>/dev/null; then
    log "using the running bench node $BENCH_NODE (left running at the end)"
  else
    log "starting the bench node $BENCH_NODE (scripts/rabbitmq-bench-node.sh start); the main node is not touched"
    BENCH_NODE_STARTED=1
    trap stop_bench_node EXIT
    scripts/rabbitmq-bench-node.sh start
  fi
  BEAM="$(beam_pid)"
  log "RabbitMQ node $BENCH_NODE: beam.smp pid $BEAM, open-file limit $(beam_nofile "$BEAM")"
  RESTART_NOTE="RabbitMQ ran as the benchmark's own node $BENCH_NODE (scripts/rabbitmq-bench-node.sh: its own data directory and ports), started with a raised open-file limit because RabbitMQ's default soft limit of 1024 caps it at about 830 connections; beam.smp's limit during the runs: $(beam_nofile "$BEAM"). The main node was not touched."
elif ((RESTART)); then
  log "Restarting RabbitMQ with a raised open-file limit. Why: the node's default soft limit of"
  log "1024 file descriptors caps it at about 830 connections, and these scenarios need"
  log "thousands (connect storm 2,000, idle density 5,000; every gateway session also"
  log "costs RabbitMQ one STOMP connection). This interrupts anything else using the node."
  rabbitmqctl stop
  (
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    if [[ "$(id -u)" == 0 ]] && id rabbitmq >/dev/null 2>&1 && command -v setpriv >/dev/null; then
      # Debian's wrapper switches to user rabbitmq with su, whose PAM limits
      # put the soft limit back to 1024; setpriv changes user without PAM, so
      # the raised limit reaches beam.smp.
      log "starting RabbitMQ: ulimit -n $(ulimit -n); setpriv --reuid=rabbitmq ... rabbitmq-server -detached"
      (cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq setpriv --reuid=rabbitmq --regid=rabbitmq \
        --init-groups rabbitmq-server -detached)
    else
      log "starting RabbitMQ: ulimit -n $(ulimit -n); rabbitmq-server -detached"
      rabbitmq-server -detached
    fi
  )
  deadline=$((SECONDS + 120))
  until rabbitmqctl await_startup --timeout 10 >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "RabbitMQ did not start within 120 s (see /var/log/rabbitmq/)"
    sleep 1
  done
  wait_port 61613 "RabbitMQ STOMP"
  wait_port 15674 "RabbitMQ Web-STOMP"
  BEAM="$(beam_pid)"
  log "RabbitMQ is up (beam.smp pid $BEAM), open-file limit $(beam_nofile "$BEAM")"
  soft="$(awk '/Max open files/ {print $4}' "/proc/$BEAM/limits" 2>/dev/null || echo 0)"
  if [[ "$soft" =~ ^[0-9]+$ ]] && ((soft < 12000)); then
    log "WARNING: RabbitMQ's open-file limit is still $soft; the idle-density case (5,000 sessions)"
    log "will hit it. Raise the hard limit of this shell (or /etc/security/limits.d for user rabbitmq)."
  fi
  RESTART_NOTE="RabbitMQ was restarted before the runs (rabbitmqctl stop; ulimit -n 65536, or the hard limit if lower; rabbitmq-server -detached, started with setpriv so that su's PAM limits do not reset it) because its default soft limit of 1024 file descriptors caps it at about 830 connections; beam.smp's limit during the runs: $(beam_nofile "$BEAM")."
else
  wait_port 15674 "RabbitMQ Web-STOMP"
  BEAM="$(beam_pid)"
  log "not restarting RabbitMQ; beam.smp pid $BEAM, open-file limit $(beam_nofile "$BEAM")"
  RESTART_NOTE="RabbitMQ was not restarted; beam.smp's open-file limit during the runs: $(beam_nofile "$BEAM")."
fi
RABBIT_VERSION="$(rmqctl version 2>/dev/null || echo unknown)"

# RabbitMQ's connection and queue counts ("C Q"), for waiting out a run's
# cleanup: closing 10,000 connections and deleting their queues takes
# RabbitMQ tens of seconds, and a run started meanwhile pays for it.
rabbit_counts() {
  rmqctl -q eval '{length(rabbit_connection_tracking:list()), length(rabbit_amqqueue:list())}.' 2>/dev/null |
    tr -c '0-9\n' ' ' | awk '{print $1, $2}'
}
read -r BASE_CONNS BASE_QUEUES <<<"$(rabbit_counts)"
BASE_CONNS="${BASE_CONNS:-0}"
BASE_QUEUES="${BASE_QUEUES:-0}"
wait_rabbit_quiet() {
  local c q deadline=$((SECONDS + 180))
  while read -r c q <<<"$(rabbit_counts)"; [[ -n "$c" && -n "$q" ]]; do
    ((c <= BASE_CONNS + 5 && q <= BASE_QUEUES + 5)) && return 0
    if ((SECONDS >= deadline)); then
      log "WARNING: RabbitMQ still has $c connections and $q queues (at start: $BASE_CONNS, $BASE_QUEUES); going on"
      return 0
    fi
    sleep 2
  done
}

# ---- 4. the gateway -----------------------------------------------------------
GW_PID=""
GW_URL=""
GW_NOTES=()
[[ -x "$GATEWAY" ]] || ((!HAVE_GW)) || die "no stomp-gateway binary at $GATEWAY"

# The [broker] mode and [fanout] paths of a gateway target.
target_mode() { if [[ "$1" == embedded ]]; then echo embedded; else echo relay; fi; }
target_fanout() {
  case "$1" in
    shared) echo shared ;;
    per-session) echo per-session ;;
    *) echo "" ;;
  esac
}

# Writes $OUT/gateway-<target>.toml for the ports in $PORT / $ADMIN.
write_config() {
  local target="$1" config="$OUT/gateway-$1.toml" fanout
  fanout="$(target_fanout "$target")"
  cat >"$config" <<EOF
# stomp-gateway configuration used by bench/compare.sh (target $target)
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
max_connections = 20000
# One load generator stands for many browsers: no per-address limits.
max_connections_per_ip = 0
max_new_connections_per_ip_per_sec = 0

[session]
# Client-leg heart-beats the gateway offers; each scenario picks its own in
# CONNECT (0,0 for throughput, fan-out and storms; 10000,10000 for idle).
# outbound_buffer_bytes is left at its default.
heartbeat_send_ms = 10000
heartbeat_receive_ms = 10000
# The open-loop publisher measures the most one session can push: no
# per-session SEND rate limit.
max_sends_per_sec = 0

[broker]
mode = "$(target_mode "$target")"
addresses = ["$STOMP_ADDR"]

[amqp]
url = "$AMQP_URL"
EOF
  if [[ -n "$fanout" && "${NO_FANOUT_SECTION:-0}" != 1 ]]; then
    cat >>"$config" <<EOF

[fanout]
topic = "$fanout"
exchange = "$fanout"
user = "$fanout"
EOF
  fi
  cat >>"$config" <<EOF

[log]
filter = "warn"
EOF
  echo "$config"
}

# Starts a fresh gateway for `target` (stopping any other first).
start_gateway() {
  local target="$1" config
  stop_gateway
  PORT="$("$LOAD" free-port)"
  ADMIN="$("$LOAD" free-port)"
  while [[ "$ADMIN" == "$PORT" ]]; do ADMIN="$("$LOAD" free-port)"; done
  config="$(write_config "$target")"
  if ! "$GATEWAY" --config "$config" --check-config >"$OUT/logs/check-config.log" 2>&1; then
    if [[ "$target" == per-session ]] && grep -q 'fanout' "$OUT/logs/check-config.log"; then
      # A gateway from before the shared fan-out path: per-session is its
      # only relay path, and it does not know the [fanout] section.
      log "this gateway build has no [fanout] section; per-session runs without it"
      GW_NOTES+=("The gateway build predates the [fanout] section; per-session ran in relay mode without it (its only relay path).")
      NO_FANOUT_SECTION=1
      config="$(write_config "$target")"
    else
      cat "$OUT/logs/check-config.log" >&2
      die "the gateway rejects the $target configuration $config"
    fi
  fi
  "$GATEWAY" --config "$config" >>"$OUT/logs/gateway.log" 2>&1 &
  GW_PID=$!
  GW_URL="ws://127.0.0.1:$PORT/ws"
  local deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/readyz" 2>/dev/null; do
    kill -0 "$GW_PID" 2>/dev/null || {
      tail -n 20 "$OUT/logs/gateway.log" >&2
      die "the gateway exited during startup"
    }
    ((SECONDS < deadline)) || die "the gateway was not ready within 30 s"
    sleep 0.2
  done
  log "gateway ($target) ready: pid $GW_PID, $GW_URL"
}

stop_gateway() {
  [[ -n "$GW_PID" ]] || return 0
  kill -TERM "$GW_PID" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$GW_PID" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "gateway did not exit after SIGTERM; killing it"
      kill -KILL "$GW_PID" 2>/dev/null || true
    fi
    sleep 0.2
  done
  wait "$GW_PID" 2>/dev/null || true
  GW_PID=""
}
cleanup() {
  stop_gateway
  stop_bench_node
}
trap cleanup EXIT

# ---- 5. the cases -------------------------------------------------------------
# case -> stomp-load arguments, full and quick.
declare -A FULL QUICK_ARGS
FULL[throughput]="throughput --publishers 1 --subscribers 1 --size 100 --rate 0 --warmup 2 --duration 10 --drain-max 30"
FULL[latency]="throughput --publishers 1 --subscribers 1 --size 100 --rate 2000 --warmup 2 --duration 10"
FULL[fanout]="fanout --subscribers 500 --rate 20 --size 100 --warmup 2 --duration 10 --concurrency 50 --source-ips $SOURCE_IPS"
FULL[connect-storm]="connect-storm --sessions 2000 --concurrency 50 --source-ips $SOURCE_IPS"
FULL[idle]="idle --sessions 5000 --concurrency 100 --hold 30 --heart-beat 10000,10000 --source-ips $SOURCE_IPS"
# Heart-beats as stomp.js sends them by default: setting up 10,000 sessions
# takes RabbitMQ minutes, and Web-STOMP closes a WebSocket that has been
# silent for 60 s, which took the first subscribers out of earlier runs.
FULL[fanout-wide]="fanout --subscribers 10000 --rate 10 --size 100 --warmup 5 --duration 20 --concurrency 100 --drain-max 60 --heart-beat 10000,10000 --rabbitmq-counts --source-ips $SOURCE_IPS"
FULL[idle-subscribed]="idle --sessions 5000 --concurrency 100 --hold 30 --heart-beat 10000,10000 --subscribe /topic/idle.room --rabbitmq-counts --source-ips $SOURCE_IPS"
FULL[paced]="paced-search --pairs 10 --size 100 --start 2000 --max-rate 100000 --warmup 2 --duration 10 --drain-idle 1 --drain-max 5 --precision 0.05 --max-steps 10"
# Quick mode stays light on a shared machine: even "throughput" is paced.
QUICK_ARGS[throughput]="throughput --publishers 1 --subscribers 1 --size 100 --rate 1000 --warmup 0.5 --duration 2"
QUICK_ARGS[latency]="throughput --publishers 1 --subscribers 1 --size 100 --rate 200 --warmup 0.5 --duration 2"
QUICK_ARGS[fanout]="fanout --subscribers 10 --rate 20 --size 100 --warmup 0.5 --duration 2"
QUICK_ARGS[connect-storm]="connect-storm --sessions 50 --concurrency 10 --source-ips $SOURCE_IPS"
QUICK_ARGS[idle]="idle --sessions 50 --concurrency 10 --hold 3 --settle 1 --heart-beat 10000,10000 --source-ips $SOURCE_IPS"
QUICK_ARGS[fanout-wide]="fanout --subscribers 100 --rate 10 --size 100 --warmup 0.5 --duration 2 --rabbitmq-counts --source-ips $SOURCE_IPS"
QUICK_ARGS[idle-subscribed]="idle --sessions 50 --concurrency 10 --hold 3 --settle 1 --heart-beat 10000,10000 --subscribe /topic/idle.room --rabbitmq-counts --source-ips $SOURCE_IPS"
QUICK_ARGS[paced]="paced-search --pairs 2 --size 100 --start 200 --max-rate 400 --warmup 0.5 --duration 2 --drain-idle 0.5 --drain-max 2 --max-steps 2 --pause 0.5"

FAILED=0
run_case() {
  local case="$1" target="$2" round="$3" url args name status=0
  if ((QUICK)); then args="${QUICK_ARGS[$case]:-}"; else args="${FULL[$case]:-}"; fi
  [[ -n "$args" ]] || die "unknown case $case"
  if is_gateway "$target"; then
    # A fresh gateway process for every run: the target's configuration,
    # and RSS growth not hidden by memory kept from earlier runs.
    start_gateway "$target"
    url="$GW_URL"
  else
    stop_gateway
    url="$WEB_STOMP_URL"
  fi
  local measure=(--measure-pid "rabbitmq=$BEAM")
  [[ -n "$GW_PID" ]] && measure+=(--measure-pid "gateway=$GW_PID")
  local node=()
  [[ -n "$RMQ_NODE" ]] && node=(--rabbitmq-node "$RMQ_NODE")
  name="$case.$target.r$round"
  log "round $round/$ROUNDS: $case -> $target ($url)"
  # shellcheck disable=SC2086 # $args is a word list on purpose
  "$LOAD" $args --url "$url" "${measure[@]}" "${node[@]}" --progress 5 \
    --tag "case=$case" --tag "target=$target" --tag "round=$round" \
    >"$OUT/runs/$name.json.tmp" 2> >(tee "$OUT/logs/$name.log" >&2) || status=$?
  if ((status == 0)) && [[ -s "$OUT/runs/$name.json.tmp" ]]; then
    mv "$OUT/runs/$name.json.tmp" "$OUT/runs/$name.json"
    if ! jq -e '.check.ok' "$OUT/runs/$name.json" >/dev/null 2>&1; then
      log "  checks failed: $(jq -c '.check.failures' "$OUT/runs/$name.json" 2>/dev/null || echo '?')"
    fi
  else
    FAILED=$((FAILED + 1))
    log "  FAILED with status $status (log: $OUT/logs/$name.log)"
  fi
  stop_gateway
  wait_rabbit_quiet
  sleep "$PAUSE_SECS"
}

IFS=',' read -r -a CASE_LIST <<<"$CASES"
for case in "${CASE_LIST[@]}"; do
  for ((round = 1; round <= ROUNDS; round++)); do
    for target in "${TARGETS[@]}"; do
      run_case "$case" "$target" "$round"
    done
  done
  # Let RabbitMQ finish closing connections and deleting queues.
  ((QUICK)) || sleep 10
done
stop_gateway

# ---- 6. the report ------------------------------------------------------------
notes=(
  --note "$RESTART_NOTE"
  --note "Rounds: $ROUNDS per case and target, targets in the order ${TARGETS[*]}; figures are medians."
  --note "Connect storms, idle density and fan-out spread client sockets over source addresses $SOURCE_IPS to stay clear of the ephemeral-port limit."
)
if ((HAVE_GW)); then
  notes+=(--note "A fresh gateway process was started for every gateway run (shared and per-session: broker.mode = \"relay\" with [fanout] all \"shared\" or all \"per-session\"; embedded: broker.mode = \"embedded\"), so its RSS growth is measured from a fresh process; RabbitMQ was not restarted between runs (its allocators keep memory, so its per-session figure is a lower bound).")
fi
for n in "${GW_NOTES[@]}"; do notes+=(--note "$n"); done
((QUICK)) && notes+=(--note "Quick mode (--quick): tiny sizes and paced throughput; not a benchmark, only a check that the pipeline works.")
((FAILED)) && notes+=(--note "$FAILED run(s) failed and are missing from the medians; see $OUT/logs.")
gw_config=()
for t in shared per-session embedded; do
  [[ -f "$OUT/gateway-$t.toml" ]] && gw_config+=(--gateway-config "$OUT/gateway-$t.toml")
done
"$LOAD" report --runs "$OUT/runs" --markdown "$MARKDOWN" --svg "$SVG" \
  --rabbitmq-version "$RABBIT_VERSION" --invocation "$INVOCATION" \
  "${gw_config[@]}" "${notes[@]}"
# The hand-written reading of the figures (what holds across runs, what is
# noise, what would close a gap) goes with every full report. If the figures
# change materially, update bench/analysis.md in the same change.
if ((!QUICK)) && [[ "$MARKDOWN" == docs/benchmarks.md && -f bench/analysis.md ]]; then
  cat bench/analysis.md >>"$MARKDOWN"
fi
log "done: $MARKDOWN, $SVG; run JSON in $OUT/runs"
((FAILED == 0)) || exit 1
