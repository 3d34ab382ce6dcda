#!/usr/bin/env bash
# Start, stop or check an odibi-actor cluster: the coordinator on this machine, one
# odibi-worker per line of workers/hosts, started over ssh. Run with --help for details.
set -euo pipefail

PROG=launch_cluster.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

usage() {
  cat <<EOF
Usage: $PROG start|stop|status|--help

Starts the odibi-actor coordinator on this machine and an odibi-worker over ssh on
every host listed in the hosts file, stops them, or reports their health. Each action is
idempotent: start leaves running processes alone, stop on a stopped cluster is fine.

  start   start the coordinator (unless running), then a worker per hosts line (unless
          running there); a worker that exits within ODIBI_START_WAIT seconds is
          reported FAILED with the tail of its log. Exit 1 if anything is not up.
  stop    SIGTERM every worker (they hand back queued work and finish running steps),
          SIGKILL those still alive after ODIBI_STOP_TIMEOUT seconds, then the
          coordinator likewise. Exit 1 only if a host could not be reached.
  status  per host: running (pid), stopped or unreachable; and the coordinator.
          Exit 0 if the coordinator and every worker are running, 1 otherwise.
          When the coordinator runs, it is also asked which workers registered
          ('odibi status --json'); that is informational only.

Hosts file (like Spark's conf/workers): one host per line, optionally followed by a slot
count, which becomes the worker's --nthreads. '#' starts a comment; blank lines are
ignored. Hosts may be written user@host or ssh://[user@]host[:port] (a -p in ODIBI_SSH
overrides that port). A host listed twice gets two workers. Workers are named HOST-N, N
counting that host's lines from 1.

    # host            slots
    10.0.0.11         8
    odibi@10.0.0.12   4
    10.0.0.13

Pid and log files live in the state directory on each machine: coordinator.pid/.log
here, worker-NAME.pid/.log on the worker hosts (the previous log is kept as .log.1).

Environment (defaults in brackets):
  ODIBI_HOSTS             hosts file [$REPO_DIR/workers/hosts]
  ODIBI_COORDINATOR       address workers connect to, e.g. tcp://10.0.0.5:5555
                          [tcp://127.0.0.1:5555]
  ODIBI_LISTEN            address the coordinator binds [\$ODIBI_COORDINATOR]
  ODIBI_CLIENT_LISTEN     the coordinator's --client-listen address [none]
  ODIBI_STATE_DIR         absolute path (or ~/...) of the pid/log directory, on this
                          machine and on every worker host [~/.odibi/cluster]
  ODIBI_SSH               ssh command [ssh -o BatchMode=yes -o ConnectTimeout=5]
                          e.g. "ssh -o BatchMode=yes -o ConnectTimeout=5 -p 2222 -i key"
  ODIBI_COORDINATOR_CMD   command that runs the coordinator [odibi-coordinator]
  ODIBI_COORDINATOR_ARGS  extra coordinator flags, e.g.
                          "--curve-secret ~/.odibi/keys/server.key_secret
                           --authorized-keys ~/.odibi/authorized_keys" [none]
  ODIBI_REMOTE_WORKER     command that runs odibi-worker on the worker hosts; ssh
                          sessions have a minimal PATH, so give an absolute path such as
                          /opt/odibi/venv/bin/odibi-worker [odibi-worker]
  ODIBI_WORKER_ARGS       extra worker flags, e.g. "--curve-secret
                          ~/.odibi/keys/worker.key_secret --server-key
                          ~/.odibi/keys/server.key" [none]
  ODIBI_START_WAIT        seconds a new process must stay alive to count as started [2]
  ODIBI_STOP_TIMEOUT      seconds between SIGTERM and SIGKILL on stop [60]
  ODIBI_CLI               the odibi command, used by status [odibi]
  ODIBI_CLI_ARGS          extra 'odibi status' flags, e.g. the client's curve keys
                          "--curve-secret ~/.odibi/keys/admin.key_secret --server-key
                           ~/.odibi/keys/server.key" [none]

ODIBI_SSH is shell text (quotes work) run here. The *_CMD, *_WORKER and *_ARGS values are
shell text run by sh on the machine concerned (so ~ and \$HOME expand there); commands may
start with VAR=value assignments.

Exit status: 0 all well, 1 some process is not up (or a host unreachable), 2 usage or
configuration error (missing hosts file, malformed line, no hosts).
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

# --- configuration ---------------------------------------------------------------------

HOSTS_FILE=${ODIBI_HOSTS:-$REPO_DIR/workers/hosts}
COORDINATOR=${ODIBI_COORDINATOR:-tcp://127.0.0.1:5555}
LISTEN=${ODIBI_LISTEN:-$COORDINATOR}
CLIENT_LISTEN=${ODIBI_CLIENT_LISTEN:-}
STATE_DIR=${ODIBI_STATE_DIR:-}
SSH_TEXT=${ODIBI_SSH:-ssh -o BatchMode=yes -o ConnectTimeout=5}
REMOTE_WORKER=${ODIBI_REMOTE_WORKER:-odibi-worker}
COORDINATOR_CMD=${ODIBI_COORDINATOR_CMD:-odibi-coordinator}
COORDINATOR_ARGS=${ODIBI_COORDINATOR_ARGS:-}
WORKER_ARGS=${ODIBI_WORKER_ARGS:-}
START_WAIT=${ODIBI_START_WAIT:-2}
STOP_TIMEOUT=${ODIBI_STOP_TIMEOUT:-60}
ODIBI_CLI=${ODIBI_CLI:-odibi}
ODIBI_CLI_ARGS=${ODIBI_CLI_ARGS:-}

SSH_CMD=()

check_config() {
  [[ $START_WAIT =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "ODIBI_START_WAIT='$START_WAIT' is not a number of seconds"
  [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "ODIBI_STOP_TIMEOUT='$STOP_TIMEOUT' is not a whole number of seconds"
  # Shell text like the other commands, so quoted options work: -o "ProxyCommand=...".
  eval "SSH_CMD=($SSH_TEXT)" || die "cannot parse ODIBI_SSH: $SSH_TEXT"
  [ "${#SSH_CMD[@]}" -gt 0 ] || die "ODIBI_SSH is empty"
  # shellcheck disable=SC2088  # a literal ~ is meant here
  case $STATE_DIR in
    '' | /* | '~' | '~/'*) ;;
    *) die "ODIBI_STATE_DIR='$STATE_DIR' must be an absolute path or start with ~/" ;;
  esac
}

# Quote a string for a POSIX shell.
q() {
  local s=${1//\'/\'\\\'\'}
  printf "'%s'" "$s"
}

# The state directory as sh text, expanded by the shell of the machine it runs on.
# shellcheck disable=SC2016,SC2088  # $HOME and ~ are meant literally here
state_expr() {
  case $STATE_DIR in
    '') printf '%s' '"$HOME/.odibi/cluster"' ;;
    '~') printf '%s' '"$HOME"' ;;
    '~/'*) printf '"$HOME"/%s' "$(q "${STATE_DIR#\~/}")" ;;
    *) q "$STATE_DIR" ;;
  esac
}

# --- hosts file ------------------------------------------------------------------------

HOSTS=()  # as written (ssh destination)
SLOTS=()  # slot count, or empty
NAMES=()  # worker name HOST-N
HOST_W=9  # report column widths
NAME_W=11

parse_hosts() {
  [ -e "$HOSTS_FILE" ] || die "hosts file $HOSTS_FILE not found (set ODIBI_HOSTS, or list your worker hosts in workers/hosts)"
  if ! [ -f "$HOSTS_FILE" ] || ! [ -r "$HOSTS_FILE" ]; then die "cannot read hosts file $HOSTS_FILE"; fi
  local line lineno=0 host slots extra bare
  declare -A count=()
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    line=${line//$'\r'/}
    host='' slots='' extra=''
    read -r host slots extra <<<"$line" || true
    [ -n "$host" ] || continue
    if [ -n "$extra" ]; then
      die "$HOSTS_FILE:$lineno: expected 'host [slots]', got '$line'"
    fi
    if [ -n "$slots" ] && ! [[ $slots =~ ^[1-9][0-9]{0,3}$ ]]; then
      die "$HOSTS_FILE:$lineno: slot count '$slots' is not a positive whole number"
    fi
    if [[ $host == -* ]] || ! [[ $host =~ ^[A-Za-z0-9._@:%/+-]+$ ]]; then
      die "$HOSTS_FILE:$lineno: '$host' is not a host name"
    fi
    bare=${host#ssh://}
    bare=${bare##*@}
    if [[ $host == ssh://* ]]; then bare=${bare%:*}; fi
    bare=${bare//[\/:%]/_}
    [ -n "$bare" ] || die "$HOSTS_FILE:$lineno: '$host' is not a host name"
    count[$bare]=$((${count[$bare]:-0} + 1))
    HOSTS+=("$host")
    SLOTS+=("$slots")
    NAMES+=("$bare-${count[$bare]}")
    if [ "${#host}" -gt "$HOST_W" ]; then HOST_W=${#host}; fi
    if [ "${#NAMES[-1]}" -gt "$NAME_W" ]; then NAME_W=${#NAMES[-1]}; fi
  done <"$HOSTS_FILE"
  [ "${#HOSTS[@]}" -gt 0 ] || die "hosts file $HOSTS_FILE lists no hosts (every line is blank or a comment)"
}

# --- the sh scripts run on each machine (locally for the coordinator) -------------------

sh_library() {
  cat <<'EOF'
starttime() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
running() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -d /proc/self ] || return 0
  case $(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) in
    Z | X | '') return 1 ;;
  esac
}
# Prints the pid recorded in pid file $1 if that very process still runs (same start time).
alive() {
  [ -f "$1" ] || return 1
  a_pid=$(sed -n 1p "$1")
  a_start=$(sed -n 2p "$1")
  case $a_pid in '' | *[!0-9]*) return 1 ;; esac
  running "$a_pid" || return 1
  if [ -n "$a_start" ] && [ "$(starttime "$a_pid")" != "$a_start" ]; then return 1; fi
  echo "$a_pid"
}
tick() { sleep 0.2 2>/dev/null || sleep 1; }
tail_log() { [ -f "$logf" ] && tail -n "$1" "$logf" | sed 's/^/    | /'; }

do_start() {
  if pid=$(alive "$pidf"); then echo "@@ running $pid $logf"; return; fi
  [ -f "$logf" ] && mv -f "$logf" "$logf.1"
  if command -v setsid >/dev/null 2>&1; then
    nohup setsid sh -c "$cmdline" >"$logf" 2>&1 </dev/null &
  else
    nohup sh -c "$cmdline" >"$logf" 2>&1 </dev/null &
  fi
  pid=$!
  printf '%s\n%s\n' "$pid" "$(starttime "$pid")" >"$pidf"
  sleep "$start_wait"
  if running "$pid"; then echo "@@ started $pid $logf"; return; fi
  wait "$pid"
  rc=$?
  rm -f "$pidf"
  echo "@@ failed - $logf"
  echo "exited at once with status $rc; last lines of $logf:"
  tail_log 20
}

do_stop() {
  if ! pid=$(alive "$pidf"); then
    rm -f "$pidf"
    echo "@@ notrunning - $logf"
    return
  fi
  kill -TERM "$pid" 2>/dev/null
  deadline=$(($(date +%s) + stop_timeout))
  while running "$pid"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null
      tick
      rm -f "$pidf"
      echo "@@ killed $pid $logf"
      return
    fi
    tick
  done
  rm -f "$pidf"
  echo "@@ stopped $pid $logf"
}

do_status() {
  if pid=$(alive "$pidf"); then
    echo "@@ running $pid $logf"
  elif [ -f "$pidf" ]; then
    echo "@@ died - $logf"
    echo "exited unexpectedly; last lines of $logf:"
    tail_log 5
  else
    echo "@@ stopped - $logf"
  fi
}

if ! mkdir -p "$state" 2>/dev/null; then
  echo "@@ failed - -"
  echo "cannot create the state directory $state"
  exit 0
fi
pidf=$state/$base.pid
logf=$state/$base.log
EOF
}

# make_script ACTION BASE CMDLINE > file: a self-contained sh script for one process.
make_script() {
  printf 'state=%s\n' "$(state_expr)"
  printf 'base=%s\n' "$(q "$2")"
  printf 'cmdline=%s\n' "$(q "$3")"
  printf 'start_wait=%s\nstop_timeout=%s\n' "$START_WAIT" "$STOP_TIMEOUT"
  sh_library
  printf 'do_%s\n' "$1"
}

worker_cmdline() {
  local i=$1 line
  line="exec env $REMOTE_WORKER $(q "$COORDINATOR") --name $(q "${NAMES[i]}")"
  if [ -n "${SLOTS[i]}" ]; then line+=" --nthreads ${SLOTS[i]}"; fi
  if [ -n "$WORKER_ARGS" ]; then line+=" $WORKER_ARGS"; fi
  printf '%s' "$line"
}

coordinator_cmdline() {
  local line
  line="exec env $COORDINATOR_CMD --listen $(q "$LISTEN")"
  if [ -n "$CLIENT_LISTEN" ]; then line+=" --client-listen $(q "$CLIENT_LISTEN")"; fi
  if [ -n "$COORDINATOR_ARGS" ]; then line+=" $COORDINATOR_ARGS"; fi
  printf '%s' "$line"
}

# --- running them ----------------------------------------------------------------------

TMP=''

# run_coordinator ACTION: runs the script locally, leaves $TMP/c.{out,err,rc}.
run_coordinator() {
  make_script "$1" coordinator "$(coordinator_cmdline)" >"$TMP/c.sh"
  local rc=0
  sh -s <"$TMP/c.sh" >"$TMP/c.out" 2>"$TMP/c.err" || rc=$?
  echo "$rc" >"$TMP/c.rc"
}

# run_workers ACTION: one ssh per hosts line, all at once; leaves $TMP/I.{out,err,rc}.
run_workers() {
  local i
  for i in "${!HOSTS[@]}"; do
    make_script "$1" "worker-${NAMES[i]}" "$(worker_cmdline "$i")" >"$TMP/$i.sh"
    (
      rc=0
      "${SSH_CMD[@]}" "${HOSTS[i]}" sh -s <"$TMP/$i.sh" >"$TMP/$i.out" 2>"$TMP/$i.err" || rc=$?
      echo "$rc" >"$TMP/$i.rc"
    ) &
  done
  wait
}

# Reads $TMP/KEY.out: sets R_STATE (marker word, or "unreachable"/"error"), R_PID, R_LOG,
# R_MORE (the lines after the marker) and R_WHY (why ssh or sh failed).
R_STATE='' R_PID='' R_LOG='' R_MORE='' R_WHY=''
result() {
  local key=$1 marker rc
  R_STATE='' R_PID='' R_LOG='' R_MORE='' R_WHY=''
  rc=$(cat "$TMP/$key.rc" 2>/dev/null || echo 255)
  marker=$(grep -m1 '^@@ ' "$TMP/$key.out" 2>/dev/null || true)
  if [ -n "$marker" ]; then
    read -r _ R_STATE R_PID R_LOG <<<"$marker"
    R_MORE=$(awk 'seen { print } /^@@ / { seen = 1 }' "$TMP/$key.out")
    return
  fi
  R_WHY=$(grep -v '^[[:space:]]*$' "$TMP/$key.err" 2>/dev/null | tail -n 3 | paste -sd ' ' -) || true
  if [ "$rc" = 255 ]; then
    R_STATE=unreachable
    R_WHY=${R_WHY:-ssh failed}
  else
    R_STATE=error
    R_WHY="remote sh failed (exit $rc)${R_WHY:+: $R_WHY}"
  fi
}

row() { printf '%-*s  %-*s  %-15s  %s\n' "$HOST_W" "$1" "$NAME_W" "$2" "$3" "$4"; }
more() { if [ -n "$R_MORE" ]; then printf '%s\n' "$R_MORE" | sed 's/^/    /'; fi; }
header() { row HOST PROCESS STATE DETAIL; }

slots_text() {
  case ${SLOTS[$1]} in
    '') ;;
    1) printf ', 1 slot' ;;
    *) printf ', %s slots' "${SLOTS[$1]}" ;;
  esac
}

cmd_start() {
  local ok=0 i
  header
  run_coordinator start
  result c
  case $R_STATE in
    started) row "(local)" coordinator started "pid $R_PID, listening on $LISTEN, log $R_LOG" ;;
    running) row "(local)" coordinator "already running" "pid $R_PID, log $R_LOG" ;;
    *)
      row "(local)" coordinator FAILED "${R_WHY:-could not start $COORDINATOR_CMD}"
      more
      echo "$PROG: the coordinator did not start; not starting workers" >&2
      return 1
      ;;
  esac
  run_workers start
  for i in "${!HOSTS[@]}"; do
    result "$i"
    case $R_STATE in
      started) row "${HOSTS[i]}" "${NAMES[i]}" started "pid $R_PID$(slots_text "$i"), log $R_LOG" ;;
      running) row "${HOSTS[i]}" "${NAMES[i]}" "already running" "pid $R_PID, log $R_LOG" ;;
      unreachable) ok=1 && row "${HOSTS[i]}" "${NAMES[i]}" FAILED "unreachable: $R_WHY" ;;
      failed) ok=1 && row "${HOSTS[i]}" "${NAMES[i]}" FAILED "worker did not start" && more ;;
      *) ok=1 && row "${HOSTS[i]}" "${NAMES[i]}" FAILED "$R_WHY" ;;
    esac
  done
  return "$ok"
}

stop_row() {
  local host=$1 name=$2
  case $R_STATE in
    stopped) row "$host" "$name" stopped "pid $R_PID" ;;
    killed) row "$host" "$name" killed "pid $R_PID ignored SIGTERM for ${STOP_TIMEOUT}s; sent SIGKILL" ;;
    notrunning) row "$host" "$name" "not running" "" ;;
    unreachable) row "$host" "$name" FAILED "unreachable: $R_WHY" && return 1 ;;
    failed) row "$host" "$name" FAILED "" && more && return 1 ;;
    *) row "$host" "$name" FAILED "$R_WHY" && return 1 ;;
  esac
}

cmd_stop() {
  local ok=0 i
  header
  run_workers stop
  for i in "${!HOSTS[@]}"; do
    result "$i"
    stop_row "${HOSTS[i]}" "${NAMES[i]}" || ok=1
  done
  run_coordinator stop
  result c
  stop_row "(local)" coordinator || ok=1
  return "$ok"
}

status_row() {
  local host=$1 name=$2 detail
  case $R_STATE in
    running)
      detail="pid $R_PID"
      if [ -n "$REGISTERED" ] && [ "$name" != coordinator ]; then
        if grep -qxF "$name" <<<"$REGISTERED"; then
          detail+=", registered"
        else
          detail+=", not registered with the coordinator (yet?)"
        fi
      fi
      row "$host" "$name" running "$detail"
      ;;
    stopped) row "$host" "$name" stopped "" && return 1 ;;
    died) row "$host" "$name" stopped "" && more && return 1 ;;
    unreachable) row "$host" "$name" unreachable "$R_WHY" && return 1 ;;
    failed) row "$host" "$name" unknown "" && more && return 1 ;;
    *) row "$host" "$name" unknown "$R_WHY" && return 1 ;;
  esac
}

# The coordinator's client address: --client-listen, else the --listen port + 1.
client_address() {
  if [ -n "$CLIENT_LISTEN" ]; then
    printf '%s' "$CLIENT_LISTEN"
  elif [[ $LISTEN =~ ^tcp://(.+):([0-9]+)$ ]]; then
    local host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
    case $host in '*' | 0.0.0.0) host=127.0.0.1 ;; '[::]') host='[::1]' ;; esac
    printf 'tcp://%s:%s' "$host" "$((port + 1))"
  fi
}

# Asks the coordinator which workers it knows (odibi status --json), best effort: sets
# REGISTERED (one name a line) and STATUS_NOTE; never fails.
REGISTERED='' STATUS_NOTE=''
query_coordinator() {
  local addr line rc=0 limit=()
  addr=$(client_address)
  [ -n "$addr" ] || return 0
  line="exec env $ODIBI_CLI status --address $(q "$addr") --json"
  if [ -n "$ODIBI_CLI_ARGS" ]; then line+=" $ODIBI_CLI_ARGS"; fi
  if command -v timeout >/dev/null 2>&1; then limit=(timeout 20); fi
  "${limit[@]}" sh -c "$line" </dev/null >"$TMP/odibi-status.json" 2>"$TMP/odibi-status.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    STATUS_NOTE="(odibi status --address $addr failed, exit $rc: $(tail -n 1 "$TMP/odibi-status.err"))"
    return 0
  fi
  REGISTERED=$(sed -n 's/^ *"name": "\(.*\)",\{0,1\}$/\1/p' "$TMP/odibi-status.json")
  local n
  n=$(grep -c . <<<"$REGISTERED" || true)
  STATUS_NOTE="the coordinator at $addr reports $n registered workers (odibi status)"
  # An empty list still proves the query worked: mark it with a line no worker has.
  REGISTERED=${REGISTERED:-$'\n'}
}

cmd_status() {
  local ok=0 up=0 i
  run_coordinator status
  run_workers status
  result c
  if [ "$R_STATE" = running ]; then query_coordinator; fi
  header
  status_row "(local)" coordinator || ok=1
  for i in "${!HOSTS[@]}"; do
    result "$i"
    if status_row "${HOSTS[i]}" "${NAMES[i]}"; then up=$((up + 1)); else ok=1; fi
  done
  echo "$up of ${#HOSTS[@]} workers running"
  if [ -n "$STATUS_NOTE" ]; then echo "$STATUS_NOTE"; fi
  return "$ok"
}

main() {
  case ${1:-} in
    -h | --help | help)
      usage
      return 0
      ;;
    start | stop | status) ;;
    '') usage >&2 && die "missing action: start, stop or status" ;;
    *) usage >&2 && die "unknown action '$1': use start, stop or status" ;;
  esac
  [ "$#" -eq 1 ] || die "$1 takes no arguments (configure with ODIBI_* environment variables; see --help)"
  check_config
  parse_hosts
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/odibi-cluster.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  "cmd_$1"
}

main "$@"
