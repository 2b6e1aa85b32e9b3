#!/usr/bin/env bash
# A private test network on this machine: a 3-node ZooKeeper ensemble, a 3-node etcd
# cluster, a Redis primary + replica with three Sentinels, and two client "hosts", each
# in its own network namespace, for the Jepsen-style suite in tests/cluster/.
#   scripts/cluster.sh start|stop|status
#   scripts/cluster.sh node-start|node-kill NODE    (the nemesis restarts what it killed)
#
# Network: one bridge (cadv-br0) in the root namespace holding 10.77.0.1/24; each node
# and client is a namespace (cadv-<node>) joined to it by a veth pair, its address
# fixed below. The bridge has no other port and IP forwarding is not touched, so no
# packet of this network ever leaves the machine. The root namespace reaches every
# node (the nemesis asks ZooKeeper/etcd who leads), and clients reach the shared
# PostgreSQL (127.0.0.1:5432 in the root namespace) and the shared Redis (the beat
# runs' broker) through socat relays on 10.77.0.1:15432 and :16379 only.
# Debian packages only; whatever is missing is installed.
# Idempotent: `start` twice starts nothing twice; `stop` removes all it made.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/apt.sh
STATE=${CLUSTER_DIR:-$PWD/build/cluster}
PREFIX=cadv-
BRIDGE=${PREFIX}br0
NET=10.77.0
RELAY_PORT=15432        # -> PostgreSQL 127.0.0.1:5432 (the fenced store, beat's schedule)
BROKER_RELAY_PORT=16379 # -> Redis 127.0.0.1:6379 (the broker of the beat runs)
ZK_NODES=(zk1 zk2 zk3)
ETCD_NODES=(etcd1 etcd2 etcd3)
REDIS_NODES=(redis1 redis2 redis3)   # primary, replica, and a Sentinel-only host
CLIENTS=(c1 c2)
declare -A ADDR=([zk1]=11 [zk2]=12 [zk3]=13 [etcd1]=21 [etcd2]=22 [etcd3]=23
  [redis1]=41 [redis2]=42 [redis3]=43 [c1]=31 [c2]=32)
ALL=("${ZK_NODES[@]}" "${ETCD_NODES[@]}" "${REDIS_NODES[@]}" "${CLIENTS[@]}")
ZK_TICK_MS=1000   # sessions of 2 s to 20 s
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

die() { echo "cluster.sh: $*" >&2; exit 1; }
ip_of() { echo "$NET.${ADDR[$1]}"; }
ns() { echo "$PREFIX$1"; }
in_ns() { local node=$1; shift; $SUDO ip netns exec "$(ns "$node")" "$@"; }
alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

need_packages() { apt_ensure_packages iproute2 zookeeper etcd-server redis-server socat; }

# -- network -------------------------------------------------------------------
net_up() {
  local why
  if ! why=$($SUDO ip netns add "${PREFIX}probe" 2>&1); then
    die "cannot create network namespaces (ip netns add: $why); this needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and a kernel with network namespaces"
  fi
  $SUDO ip netns del "${PREFIX}probe"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    $SUDO ip link add "$BRIDGE" type bridge
    $SUDO ip addr add "$NET.1/24" dev "$BRIDGE"
  fi
  $SUDO ip link set "$BRIDGE" up
  local node
  for node in "${ALL[@]}"; do
    [ -e "/run/netns/$(ns "$node")" ] && continue
    $SUDO ip netns add "$(ns "$node")"
    # veth: "cadv-<node>" stays in the root namespace on the bridge, "eth0" moves in.
    $SUDO ip link add "$(ns "$node")" type veth peer name eth0 netns "$(ns "$node")"
    $SUDO ip link set "$(ns "$node")" master "$BRIDGE" up
    in_ns "$node" ip link set lo up
    in_ns "$node" ip addr add "$(ip_of "$node")/24" dev eth0
    in_ns "$node" ip link set eth0 up
  done
}

net_down() {
  local name
  for name in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
    $SUDO ip netns del "$name"   # deletes its veth pair too
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && $SUDO ip link del "$BRIDGE"
  return 0
}

# -- processes: one pid file per node, checked against its command line ------------
pidfile() { echo "$STATE/$1.pid"; }
running() {
  local pid; pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
  alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}
# Own session (setsid) so a node outlives this shell; `ip netns exec` execs the server,
# so the recorded pid is the server's own.
spawn() {
  local name=$1 node=$2; shift 2
  mkdir -p "$STATE/$name"
  (cd "$STATE/$name" && exec setsid ip netns exec "$(ns "$node")" "$@" \
    >>"$STATE/$name.log" 2>&1 </dev/null) &
  echo $! >"$(pidfile "$name")"
}
marker() {  # what the command line of each kind of process contains
  case $1 in
    zk*) echo "QuorumPeerMain" ;; etcd*) echo "etcd --name" ;;
    sentinel*) echo "redis-server.*sentinel" ;; redis*) echo "redis-server" ;;
    relay) echo "socat TCP-LISTEN:$RELAY_PORT" ;;
    broker-relay) echo "socat TCP-LISTEN:$BROKER_RELAY_PORT" ;;
  esac
}

zk_config() {
  local node=$1 dir=$STATE/$1 peer
  mkdir -p "$dir/data"
  echo "${node#zk}" >"$dir/data/myid"
  {
    echo "tickTime=$ZK_TICK_MS"
    echo "initLimit=10"
    echo "syncLimit=2"
    echo "dataDir=$dir/data"
    echo "clientPort=2181"
    echo "clientPortAddress=$(ip_of "$node")"
    echo "admin.enableServer=false"
    echo "4lw.commands.whitelist=ruok,srvr,mntr,stat"
    echo "forceSync=no"
    echo "maxSessionTimeout=20000"
    for peer in "${ZK_NODES[@]}"; do
      echo "server.${peer#zk}=$(ip_of "$peer"):2888:3888"
    done
  } >"$dir/zoo.cfg"
}

etcd_cluster() {
  local peer out=()
  for peer in "${ETCD_NODES[@]}"; do out+=("$peer=http://$(ip_of "$peer"):2380"); done
  (IFS=,; echo "${out[*]}")
}

redis_config() {
  local node=$1 dir=$STATE/$1
  mkdir -p "$dir"
  {
    echo "bind $(ip_of "$node")"
    echo "port 6379"
    echo "save \"\""
    echo "appendonly no"
    echo "dir $dir"
    echo "protected-mode no"
    if [ "$node" = redis2 ]; then echo "replicaof $(ip_of redis1) 6379"; fi
  } >"$dir/redis.conf"
}

sentinel_config() {
  local node=$1 dir=$STATE/sentinel-$1
  mkdir -p "$dir"
  # Sentinel rewrites its file: written only once, so a restart keeps what it learnt.
  [ -f "$dir/sentinel.conf" ] && return
  {
    echo "bind $(ip_of "$node")"
    echo "port 26379"
    echo "dir $dir"
    echo "protected-mode no"
    echo "sentinel monitor cadv $(ip_of redis1) 6379 2"
    echo "sentinel down-after-milliseconds cadv 2000"
    echo "sentinel failover-timeout cadv 6000"
    echo "sentinel parallel-syncs cadv 1"
  } >"$dir/sentinel.conf"
}

node_start() {
  local name=$1 node=${1#sentinel-}
  running "$name" "$(marker "$name")" && return 0
  case $name in
    zk*)
      zk_config "$name"
      spawn "$name" "$node" java -Xmx256m -Xms64m -XX:+UseSerialGC \
        -Dzookeeper.root.logger=INFO,CONSOLE \
        -cp /etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$STATE/$name/zoo.cfg" ;;
    etcd*)
      mkdir -p "$STATE/$name"
      spawn "$name" "$node" etcd --name "$name" --data-dir "$STATE/$name/data" \
        --listen-client-urls "http://$(ip_of "$node"):2379" \
        --advertise-client-urls "http://$(ip_of "$node"):2379" \
        --listen-peer-urls "http://$(ip_of "$node"):2380" \
        --initial-advertise-peer-urls "http://$(ip_of "$node"):2380" \
        --initial-cluster "$(etcd_cluster)" --initial-cluster-state new \
        --initial-cluster-token cadv-jepsen ;;
    sentinel-*)
      sentinel_config "$node"
      spawn "$name" "$node" redis-server "$STATE/$name/sentinel.conf" --sentinel ;;
    redis*)
      redis_config "$name"
      spawn "$name" "$node" redis-server "$STATE/$name/redis.conf" ;;
    *) die "unknown node $name" ;;
  esac
}

node_kill() {
  local pid; pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 0
  if running "$1" "$(marker "$1")"; then
    kill -CONT "$pid" 2>/dev/null || true
    kill -KILL "$pid"
    local i; for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$(pidfile "$1")"
}

relay_start() {  # name port target
  running "$1" "$(marker "$1")" && return 0
  (exec setsid socat "TCP-LISTEN:$2,bind=$NET.1,fork,reuseaddr" "TCP:$3" \
    >>"$STATE/$1.log" 2>&1 </dev/null) &
  echo $! >"$(pidfile "$1")"
}

# -- readiness --------------------------------------------------------------------
ask() {  # node port payload expected: one TCP exchange from the root namespace
  python3 - "$@" 2>/dev/null <<'EOF'
import socket, sys
host, port, payload, want = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
s = socket.create_connection((host, port), timeout=2)
s.sendall(payload)
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
    if want.encode() in data and payload.startswith(b"PING"):
        break
sys.exit(0 if want.encode() in data else 1)
EOF
}
zk_serving() { ask "$(ip_of "$1")" 2181 srvr "Mode: "; }
etcd_healthy() { ask "$(ip_of "$1")" 2379 $'GET /health HTTP/1.0\r\n\r\n' '"health":"true"'; }
redis_up() { ask "$(ip_of "$1")" "${2:-6379}" $'PING\r\n' PONG; }

wait_for() {  # what seconds check args...
  local what=$1 seconds=$2 end; shift 2
  end=$((SECONDS + seconds))
  until "$@"; do
    ((SECONDS < end)) || die "$what not ready after ${seconds}s (logs in $STATE)"
    sleep 0.5
  done
}

all_names() {
  echo "${ZK_NODES[@]} ${ETCD_NODES[@]} ${REDIS_NODES[0]} ${REDIS_NODES[1]}"
  local node; for node in "${REDIS_NODES[@]}"; do echo "sentinel-$node"; done
}

start() {
  need_packages
  mkdir -p "$STATE"
  net_up
  relay_start relay "$RELAY_PORT" 127.0.0.1:5432
  relay_start broker-relay "$BROKER_RELAY_PORT" 127.0.0.1:6379
  local name
  for name in $(all_names); do node_start "$name"; done
  for name in "${ZK_NODES[@]}"; do wait_for "ZooKeeper $name" 60 zk_serving "$name"; done
  for name in "${ETCD_NODES[@]}"; do wait_for "etcd $name" 60 etcd_healthy "$name"; done
  wait_for "Redis primary" 20 redis_up redis1
  wait_for "Redis replica" 20 redis_up redis2
  for name in "${REDIS_NODES[@]}"; do wait_for "Sentinel on $name" 20 redis_up "$name" 26379; done
  echo "cluster.sh: up (state in $STATE)"
}

stop() {
  local name pid
  for name in $(all_names) relay broker-relay; do node_kill "$name"; done
  # Anything else still running inside our namespaces (a client of a test run).
  for name in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
    for pid in $($SUDO ip netns pids "$name" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  net_down
  rm -rf "$STATE"
  echo "cluster.sh: stopped, namespaces and bridge removed"
}

status() {
  local name rc=0
  ip link show "$BRIDGE" >/dev/null 2>&1 && echo "bridge $BRIDGE up" || { echo "bridge $BRIDGE missing"; rc=1; }
  for name in $(all_names) relay broker-relay; do
    if running "$name" "$(marker "$name")"; then
      echo "$name running (pid $(cat "$(pidfile "$name")"))"
    else
      echo "$name DOWN"; rc=1
    fi
  done
  return $rc
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  node-start) node_start "${2:?node name}" ;;
  node-kill) node_kill "${2:?node name}" ;;
  *) die "usage: $0 start|stop|status|node-start NODE|node-kill NODE" ;;
esac
