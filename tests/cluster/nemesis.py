"""Faults for the cluster of ``scripts/cluster.sh``: each bounded in time, each healed.

Every fault is a function ``fault(ctx) -> dict`` that injects, sleeps
``ctx.duration`` and heals in a ``finally`` block, so an exception (or Ctrl-C)
never leaves the network cut or a process stopped; :func:`heal_all` also undoes
anything a killed run may have left. It returns what it did and the monotonic
instants it started and healed (the checker measures recovery from ``healed``).

Partitions are blackhole routes (``ip route add blackhole <peer>/32``) added on
*both* sides inside the namespaces: packets between the two sides are dropped
(an established TCP connection hangs, a new one fails at once, like an ICMP
reject). Only addresses of our own namespaces are ever named. Latency is
``tc netem`` on each namespace's ``eth0`` (a ``tbf`` rate limit where the
kernel has no netem). Process faults signal the recorded
pid of the server (``build/cluster/<node>.pid``); a killed node is started again
by ``scripts/cluster.sh node-start`` with its data kept.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import topology
from .topology import NODES, in_ns, ip


@dataclass
class Context:
    backend: str
    duration: float
    rng: random.Random
    #: client name -> pid of its workload process (for ``pause-client``).
    clients: dict[str, int] = field(default_factory=dict)


# -- who leads ---------------------------------------------------------------------

def _ask(host: str, port: int, payload: bytes, timeout: float = 1.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
            if payload.startswith(b"*") and data.endswith(b"\r\n"):
                break
        return data


def leader(backend: str) -> str | None:
    """The node that leads now (ZooKeeper leader, etcd leader, Redis primary)."""
    for node in NODES[backend]:
        try:
            if backend == "zookeeper":
                if b"Mode: leader" in _ask(ip(node), topology.ZK_PORT, b"srvr"):
                    return node
            elif backend == "etcd":
                request = urllib.request.Request(
                    f"http://{ip(node)}:{topology.ETCD_PORT}/v3/maintenance/status", data=b"{}")
                with urllib.request.urlopen(request, timeout=1) as reply:
                    status = json.load(reply)
                if status.get("leader") == status["header"]["member_id"]:
                    return node
            else:
                reply = _ask(ip(node), topology.SENTINEL_PORT,
                             b"*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name\r\n"
                             b"$4\r\ncadv\r\n")
                for name in NODES[backend]:
                    if ip(name).encode() in reply:
                        return name
        except (OSError, ValueError, KeyError):
            continue
    return None


def healthy(backend: str) -> bool:
    """Every node serving and a leader known."""
    try:
        if backend == "zookeeper":
            return all(b"Mode: " in _ask(ip(n), topology.ZK_PORT, b"srvr") for n in NODES[backend])
        if backend == "etcd":
            for node in NODES[backend]:
                with urllib.request.urlopen(f"http://{ip(node)}:{topology.ETCD_PORT}/health",
                                            timeout=1) as reply:
                    if json.load(reply).get("health") != "true":
                        return False
            return leader(backend) is not None
        primary = leader(backend)
        if primary is None:
            return False
        info = _ask(ip(primary), topology.REDIS_PORT, b"*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n")
        return b"role:master" in info and b"connected_slaves:1" in info
    except (OSError, ValueError):
        return False


def wait_healthy(backend: str, timeout: float = 60.0) -> float:
    """Seconds until :func:`healthy`; raises if it never gets there."""
    start = time.monotonic()
    while not healthy(backend):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{backend} cluster not healthy after {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - start


# -- network -------------------------------------------------------------------------

def _routes(side_a: Iterable[str], side_b: Iterable[str], verb: str) -> None:
    side_b = list(side_b)
    for a in side_a:
        for b in side_b:
            in_ns(a, "ip", "route", verb, "blackhole", f"{ip(b)}/32", check=verb == "replace")
            in_ns(b, "ip", "route", verb, "blackhole", f"{ip(a)}/32", check=verb == "replace")


def _partitioned(side_a: list[str], side_b: list[str], ctx: Context) -> dict:
    started = time.monotonic()
    try:
        _routes(side_a, side_b, "replace")
        time.sleep(ctx.duration)
    finally:
        _routes(side_a, side_b, "del")
    return {"detail": f"{'+'.join(side_a)} cut from {'+'.join(side_b)}", "started": started,
            "healed": time.monotonic()}


def _servers(backend: str) -> list[str]:
    """The namespaces that hold the backend's servers (Sentinel hosts for Redis)."""
    return list(NODES[backend])


def partition_client(ctx: Context) -> dict:
    """Client host c1 cut off from every node of the cluster."""
    return _partitioned(["c1"], _servers(ctx.backend), ctx)


def isolate_leader(ctx: Context) -> dict:
    """The leader cut off from the other nodes; clients still reach it."""
    lead = leader(ctx.backend) or NODES[ctx.backend][0]
    return _partitioned([lead], [n for n in _servers(ctx.backend) if n != lead], ctx)


def split(ctx: Context) -> dict:
    """1/2: the leader with client c1 | the two other nodes with client c2 (so each
    side has a client; for Redis, c1 keeps the old primary, c2 finds the new one)."""
    nodes = _servers(ctx.backend)
    minority = leader(ctx.backend) or ctx.rng.choice(nodes)
    return _partitioned([minority, "c1"], [n for n in nodes if n != minority] + ["c2"], ctx)


def latency(ctx: Context) -> dict:
    """Slow links on every node's and client's eth0: ``tc netem`` delay 40 ms +- 20 ms
    where the kernel has netem; else (``CONFIG_NET_SCH_NETEM`` unset, as on the
    VM this suite was written on) a ``tbf`` rate limit of 64 kbit/s, whose queue
    delays each packet by its share of the backlog (tens to hundreds of ms)."""
    hosts = _servers(ctx.backend) + topology.CLIENTS  # (the clients' delay hits every backend)
    started = time.monotonic()
    how = "netem delay 40ms+-20ms"
    try:
        for host in hosts:
            netem = in_ns(host, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                          "delay", "40ms", "20ms", "distribution", "normal", check=False)
            if netem.returncode != 0:
                how = "tbf 64kbit (no netem in this kernel)"
                in_ns(host, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
                      "64kbit", "burst", "1600", "latency", "2s")
        time.sleep(ctx.duration)
    finally:
        for host in hosts:
            in_ns(host, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    return {"detail": f"{how} on " + "+".join(hosts), "started": started,
            "healed": time.monotonic()}


# -- processes ---------------------------------------------------------------------

def kill_restart(ctx: Context) -> dict:
    """kill -9 the leader; after ``duration`` start it again on its data."""
    lead = leader(ctx.backend) or NODES[ctx.backend][0]
    started = time.monotonic()
    try:
        topology.cluster("node-kill", lead)
        time.sleep(ctx.duration)
    finally:
        topology.cluster("node-start", lead)
    return {"detail": f"kill -9 {lead}", "started": started, "healed": time.monotonic()}


def _paused(pid: int | None, what: str, ctx: Context) -> dict:
    if pid is None:
        raise RuntimeError(f"no pid for {what}")
    started = time.monotonic()
    try:
        _signal(pid, signal.SIGSTOP)
        time.sleep(ctx.duration)
    finally:
        _signal(pid, signal.SIGCONT)
    return {"detail": f"SIGSTOP {what} (pid {pid})", "started": started,
            "healed": time.monotonic()}


def _signal(pid: int, sig: int) -> None:
    subprocess.run(["kill", f"-{sig.name[3:]}", str(pid)], check=False, capture_output=True)


def pause_node(ctx: Context) -> dict:
    """SIGSTOP the leader past the session/lease timeout, then SIGCONT."""
    lead = leader(ctx.backend) or NODES[ctx.backend][0]
    return _paused(topology.pid_of(lead), lead, ctx)


def pause_client(ctx: Context) -> dict:
    """SIGSTOP one workload process (chosen by the seed) past its lease, then SIGCONT."""
    name = ctx.rng.choice(sorted(ctx.clients))
    return _paused(ctx.clients[name], f"client {name}", ctx)


FAULTS: dict[str, Callable[[Context], dict]] = {
    "partition-client": partition_client,
    "isolate-leader": isolate_leader,
    "split-1-2": split,
    "kill9-restart": kill_restart,
    "pause-node": pause_node,
    "pause-client": pause_client,
    "latency": latency,
}


def heal_all(backend: str | None = None) -> None:
    """Undo whatever a run of ``backend`` (None: of any) may have left: blackhole
    routes to or inside its nodes, qdiscs, stopped and killed nodes. Scoped so
    that runs on the ZooKeeper and etcd clusters can go on side by side."""
    backends = [backend] if backend else list(NODES)
    nodes = [n for b in backends for n in NODES[b]]
    targets = {ip(n) for n in nodes} if backend else {ip(n) for n in topology.ADDR}
    for host in topology.ADDR:
        routes = in_ns(host, "ip", "route", "show", "type", "blackhole", check=False).stdout
        for line in routes.splitlines():
            if host in nodes or line.split()[1].split("/")[0] in targets:
                in_ns(host, "ip", "route", "del", *line.split(), check=False)
    for host in nodes + topology.CLIENTS:
        in_ns(host, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    for name in [n for b in backends for n in _processes(b)]:
        pid = topology.pid_of(name)
        if pid is not None:
            _signal(pid, signal.SIGCONT)
        topology.cluster("node-start", name)


def _processes(backend: str) -> list[str]:
    """Server processes of a backend (redis3 holds a Sentinel only)."""
    if backend != "redis":
        return list(NODES[backend])
    return NODES[backend][:2] + [f"sentinel-{n}" for n in NODES[backend]]
