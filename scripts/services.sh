#!/usr/bin/env bash
# Make the servers the test suite needs available on 127.0.0.1: reuse whatever already
# listens on a port, install (apt) and start the rest, and stop only what we started.
#   scripts/services.sh start|stop [NAME...]|status|vhost VHOST...
#   SERVICES_STARTED_FILE=F ... start   appends the names this run started to F
# Env: REDIS_PORT RABBITMQ_PORT ZOOKEEPER_PORT ETCD_PORT ETCD_PEER_PORT POSTGRES_PORT MARIADB_PORT,
#      STATE_DIR (default build/services), SERVICES_TIMEOUT (seconds, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/apt.sh
mkdir -p "${STATE_DIR:=build/services}"
STATE_DIR=$(cd "$STATE_DIR" && pwd)   # absolute: written into configs and the record
RECORD=$STATE_DIR/started             # "name pid" for each server THIS script started
DEADLINE=${SERVICES_TIMEOUT:-60}
SERVICES=(redis rabbitmq zookeeper etcd mariadb)
declare -A PORT=([redis]=${REDIS_PORT:-6379} [rabbitmq]=${RABBITMQ_PORT:-5672}
  [zookeeper]=${ZOOKEEPER_PORT:-2181} [etcd]=${ETCD_PORT:-2379} [mariadb]=${MARIADB_PORT:-3306})
declare -A PKG=([redis]=redis-server [rabbitmq]=rabbitmq-server [zookeeper]=zookeeper [etcd]=etcd-server
  [mariadb]=mariadb-server)
# What the recorded pid's command line must contain, so a recycled pid is never killed.
declare -A CMD=([redis]=redis-server [rabbitmq]=rabbitmq-server [zookeeper]=ZooKeeperServerMain [etcd]='etcd --name'
  [mariadb]=mariadbd)
PG_PORT=${POSTGRES_PORT:-5432}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-2380}
EPMD_PORT=${ERL_EPMD_PORT:-4369}
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

die() { echo "services.sh: $*" >&2; exit 1; }
# Alive and not a zombie (PID 1 here may be slow to reap orphans).
alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
listening() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
# Send raw bytes to a port; succeed once the reply contains the expected text.
ask() {
  python3 - "$@" 2>/dev/null <<'EOF'
import socket, sys
port, payload, want = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode()
s = socket.create_connection(("127.0.0.1", port), timeout=2)
s.sendall(payload)
data = b""
while want not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.exit(0 if want in data else 1)
EOF
}

recorded_pid() { [ -f "$RECORD" ] && awk -v n="$1" '$1 == n {print $2}' "$RECORD" || true; }
record() { unrecord "$1"; echo "$1 $2" >>"$RECORD"; }
unrecord() { [ -f "$RECORD" ] && sed -i "/^$1 /d" "$RECORD" || true; }
# True when the recorded pid is alive and still is the server we started.
owned() {
  local pid cmd; pid=$(recorded_pid "$1")   # (no pipe into grep -q: SIGPIPE + pipefail)
  [ -n "$pid" ] && alive "$pid" && cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline") && [[ $cmd == *"${CMD[$1]}"* ]]
}
# Own session (setsid) so servers outlive this shell and its process group; cwd in
# STATE_DIR so crash dumps (erl_crash.dump, hs_err_*.log) stay out of the repo.
spawn() {
  local name=$1; shift
  (cd "$STATE_DIR" && exec setsid "$@" >"$STATE_DIR/$name.log" 2>&1 </dev/null) &
  record "$name" $!
}

# RabbitMQ run as root straight from /usr/lib (the /usr/sbin wrapper su's to rabbitmq) with
# its own HOME (cookie), config and plugin files, so /etc/rabbitmq cannot move the port.
RMQ_DIR=$STATE_DIR/rabbitmq
RMQ_ENV=(HOME="$RMQ_DIR/home" RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  RABBITMQ_NODE_PORT="${PORT[rabbitmq]}" RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia" RABBITMQ_LOG_BASE="$RMQ_DIR/log"
  RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/none.env" RABBITMQ_CONFIG_FILE="$RMQ_DIR/none.conf"
  RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/none.config" RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
  ERL_EPMD_ADDRESS=127.0.0.1 "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}")
rmqctl() { env "${RMQ_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmqctl -q -n rabbit@localhost "$@"; }

# Data is wiped on each start: test servers should begin empty.
start_redis() {
  rm -rf "$STATE_DIR/redis"; mkdir -p "$STATE_DIR/redis"
  spawn redis redis-server --bind 127.0.0.1 --port "${PORT[redis]}" --save '' --appendonly no --dir "$STATE_DIR/redis"
}
start_rabbitmq() {
  rm -rf "$RMQ_DIR/mnesia" "$RMQ_DIR/log"; mkdir -p "$RMQ_DIR/home" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
  echo '[].' >"$RMQ_DIR/enabled_plugins"
  listening "$EPMD_PORT" || record epmd 0   # rabbit will start epmd: then it is ours to kill
  spawn rabbitmq env "${RMQ_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server
}
start_zookeeper() {
  local d=$STATE_DIR/zookeeper; rm -rf "$d"; mkdir -p "$d/data"
  printf '%s\n' tickTime=2000 "dataDir=$d/data" "clientPort=${PORT[zookeeper]}" clientPortAddress=127.0.0.1 \
    admin.enableServer=false 4lw.commands.whitelist=ruok,srvr,mntr forceSync=no maxClientCnxns=0 >"$d/zoo.cfg"
  # admin server off (Jetty would take 8080); -Xmx because the default heap is RAM/4;
  # log4j jars + /etc/zookeeper/conf so the log is not silent.
  spawn zookeeper java -Xmx256m -Dzookeeper.root.logger=INFO,CONSOLE \
    -cp /etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar \
    org.apache.zookeeper.server.ZooKeeperServerMain "$d/zoo.cfg"
}
start_etcd() {
  local c=http://127.0.0.1:${PORT[etcd]} p=http://127.0.0.1:$ETCD_PEER_PORT
  rm -rf "$STATE_DIR/etcd"
  # env -u: etcd reads ETCD_* variables as flags and warns about ours.
  spawn etcd env -u ETCD_PORT -u ETCD_PEER_PORT etcd --name services --logger zap --data-dir "$STATE_DIR/etcd" --listen-client-urls "$c" --advertise-client-urls "$c" \
    --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --initial-cluster "services=$p"
}
# MariaDB from its own data directory (not /etc/mysql, not systemd), running as root
# (--user=root), root without a password (the tests connect as root@127.0.0.1 over TCP).
MARIADB_DIR=$STATE_DIR/mariadb
MARIADB_CLIENT=(--no-defaults --socket="$MARIADB_DIR/mysqld.sock" -uroot)
start_mariadb() {
  rm -rf "$MARIADB_DIR"; mkdir -p "$MARIADB_DIR/data"
  mariadb-install-db --no-defaults --user=root --datadir="$MARIADB_DIR/data" \
    --auth-root-authentication-method=normal --skip-test-db >"$MARIADB_DIR/install.log" 2>&1 ||
    { tail -n 20 "$MARIADB_DIR/install.log" >&2; die "mariadb-install-db failed (log: $MARIADB_DIR/install.log)"; }
  spawn mariadb /usr/sbin/mariadbd --no-defaults --user=root --datadir="$MARIADB_DIR/data" \
    --socket="$MARIADB_DIR/mysqld.sock" --pid-file="$MARIADB_DIR/mysqld.pid" --bind-address=127.0.0.1 \
    --port="${PORT[mariadb]}" --skip-name-resolve --skip-log-bin --innodb-flush-log-at-trx-commit=2
}

ready_redis() { ask "${PORT[redis]}" $'PING\r\n' '+PONG'; }
ready_zookeeper() { ask "${PORT[zookeeper]}" ruok imok; }
ready_etcd() { ask "${PORT[etcd]}" $'GET /health HTTP/1.0\r\n\r\n' '"health":"true"'; }
# Ready once root can log in over TCP: the install made root@localhost only.
ready_mariadb() {
  mariadb-admin "${MARIADB_CLIENT[@]}" ping >/dev/null 2>&1 &&
    mariadb "${MARIADB_CLIENT[@]}" -e "CREATE USER IF NOT EXISTS root@'127.0.0.1';
      GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION; CREATE DATABASE IF NOT EXISTS test;" 2>/dev/null
}
ready_rabbitmq() { timeout 20 env "${RMQ_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmqctl -q -n rabbit@localhost await_startup >/dev/null 2>&1; }

wait_ready() {
  local name=$1 pid end=$((SECONDS + DEADLINE)); pid=$(recorded_pid "$1")
  until "ready_$name"; do
    if ! alive "$pid" || ((SECONDS >= end)); then
      echo "services.sh: $name did not come up on 127.0.0.1:${PORT[$name]} within ${DEADLINE}s; log tail:" >&2
      tail -n 25 "$STATE_DIR/$name.log" >&2 || true
      [ "$name" = rabbitmq ] && tail -n 10 "$RMQ_DIR/log/rabbit@localhost.log" >&2 2>/dev/null || true
      stop_one "$name" >/dev/null; [ "$name" = rabbitmq ] && stop_one epmd >/dev/null
      die "$name failed: it needs Debian package ${PKG[$name]} (apt-get install ${PKG[$name]}); see the log above (port in use?)"
    fi
    sleep 0.2
  done
}

# kill, wait, then kill -9 the whole session after a deadline.
stop_one() {
  local name=$1 pid i; pid=$(recorded_pid "$name")
  if [ "$name" = epmd ]; then
    # epmd itself refuses -kill while any Erlang node is still registered with it.
    [ -n "$pid" ] && { epmd -kill >/dev/null 2>&1 && echo "stopped epmd" || true; }
  elif owned "$name"; then
    [ "$name" = rabbitmq ] && { timeout 60 rmqctl stop >/dev/null 2>&1 || true; }
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.2; done
    alive "$pid" && { kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true; }
    echo "stopped $name (pid $pid)"
  fi
  unrecord "$name"
}

start_postgres() {
  if ! listening "$PG_PORT"; then
    apt_installed postgresql || apt_install --no-install-recommends postgresql
    local ver; ver=$(ls /etc/postgresql 2>/dev/null | head -1) || true
    [ -n "$ver" ] && $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start >>"$STATE_DIR/postgresql.log" 2>&1 || true
    local end=$((SECONDS + DEADLINE))
    until listening "$PG_PORT"; do
      ((SECONDS < end)) || { tail -n 20 "$STATE_DIR/postgresql.log" >&2 || true
        die "postgresql is not listening on 127.0.0.1:$PG_PORT (install 'postgresql', then: pg_ctlcluster --skip-systemctl-redirect VERSION main start)"; }
      sleep 0.5
    done
    echo "started postgresql $ver/main on 127.0.0.1:$PG_PORT (system cluster: stop leaves it running)"
  else
    echo "reusing postgresql on 127.0.0.1:$PG_PORT"
  fi
}

cmd_start() {
  local name missing=() todo=()
  for name in "${SERVICES[@]}"; do
    listening "${PORT[$name]}" || apt_installed "${PKG[$name]}" || missing+=("${PKG[$name]}")
  done
  ((${#missing[@]} == 0)) || apt_install --no-install-recommends "${missing[@]}"   # one apt run
  for name in "${SERVICES[@]}"; do   # re-check: a package's postinst may have started it
    if listening "${PORT[$name]}"; then
      owned "$name" && echo "reusing $name on 127.0.0.1:${PORT[$name]} (started earlier by services.sh)" && continue
      unrecord "$name"   # a stale record must not let stop touch someone else's server
      echo "reusing $name on 127.0.0.1:${PORT[$name]}"
    else
      "start_$name"; todo+=("$name")   # start all first, then wait: they boot in parallel
    fi
  done
  for name in "${todo[@]}"; do
    wait_ready "$name"
    echo "started $name on 127.0.0.1:${PORT[$name]} (pid $(recorded_pid "$name"), log $STATE_DIR/$name.log)"
    # The caller's own list, so that its `stop NAME...` leaves servers that an
    # earlier, still running invocation started alone.
    [ -z "${SERVICES_STARTED_FILE:-}" ] || echo "$name" >>"$SERVICES_STARTED_FILE"
  done
  start_postgres
}

cmd_stop() {   # stop [NAME...]: the named servers (default: every one services.sh started)
  local name names=("$@")
  if ((${#names[@]} == 0)); then
    for name in "${SERVICES[@]}" epmd; do stop_one "$name"; done   # epmd after rabbitmq
    rm -f "$RECORD"
    return
  fi
  for name in "${names[@]}"; do
    stop_one "$name"; [ "$name" = rabbitmq ] && stop_one epmd
  done
  return 0
}

cmd_status() {
  local name state; SERVICES+=(postgresql); PORT[postgresql]=$PG_PORT
  for name in "${SERVICES[@]}"; do
    listening "${PORT[$name]}" && state=listening || state="not listening"
    if [ "$name" != postgresql ] && owned "$name"; then
      echo "$name 127.0.0.1:${PORT[$name]}: $state, started by services.sh (pid $(recorded_pid "$name"))"
    else
      echo "$name 127.0.0.1:${PORT[$name]}: $state, not started by services.sh"
    fi
  done
}

# RabbitMQ virtual hosts for runs that share the server at the same time (guest may
# use them); an existing one is kept. Ours is driven with its own cookie, a shared
# one with Debian's rabbitmqctl.
cmd_vhost() {
  local ctl name
  if owned rabbitmq; then ctl=(rmqctl); else
    command -v rabbitmqctl >/dev/null || die "vhost: rabbitmqctl not found (apt-get install rabbitmq-server)"
    ctl=($SUDO rabbitmqctl -q)
  fi
  for name in "$@"; do
    "${ctl[@]}" add_vhost "$name" >/dev/null 2>&1 || true   # "already exists" is fine
    "${ctl[@]}" set_permissions -p "$name" guest '.*' '.*' '.*' >/dev/null ||
      die "vhost: could not create RabbitMQ vhost $name for guest"
  done
}

case "${1:-}" in
  start) cmd_start ;;
  stop) shift; cmd_stop "$@" ;;
  status) cmd_status ;;
  vhost) shift; cmd_vhost "$@" ;;
  *) die "usage: $0 start|stop [NAME...]|status|vhost VHOST..." ;;
esac
