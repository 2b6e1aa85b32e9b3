"""Server instances of the tests' own, on spare loopback ports, that a fault test
may stop, SIGKILL, pause (SIGSTOP) or restart without touching the shared servers.

Each instance keeps its data under ``build/`` (the test build folder) and is
killed with its whole process group when the test process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

_running: set[ServerProcess] = set()


def spare_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(interval)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class ServerProcess:
    """One server process: ``start``, ``stop`` (SIGTERM), ``kill`` (SIGKILL),
    ``pause``/``resume`` (SIGSTOP/SIGCONT) and ``restart`` on the same port and
    data. Subclasses give the command line and a readiness probe."""

    name = "server"
    ready_timeout = 30.0

    def __init__(self, port: int | None = None) -> None:
        self.port = port or spare_port()
        base = Path(settings.BUILD_DIR) / "faults"
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-{self.port}-", dir=base))
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return listening(self.port)

    def start(self) -> ServerProcess:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(self.command(), cwd=self.dir, stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        _running.add(self)
        try:
            wait_until(self._ready_or_dead, self.ready_timeout, f"{self.name} on {self.port}")
        except TimeoutError:
            self.kill()
            raise
        if self.process.poll() is not None:
            tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} on port {self.port} exited at start:\n{tail}")
        return self

    def _ready_or_dead(self) -> bool:
        return self.process.poll() is not None or self.ready()

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL past ``timeout``; the data stays for a restart."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(10)
        _running.discard(self)
        wait_until(lambda: not listening(self.port), 10, f"{self.name} port {self.port} closed")

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost host; the data stays for a restart."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait(10)
        _running.discard(self)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def remove(self) -> None:
        """Kill and delete the data folder (end of a test)."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer(ServerProcess):
    """``redis-server`` without persistence: a restart forgets every key."""

    name = "redis"

    def command(self) -> list[str]:
        return ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class ZooKeeperServer(ServerProcess):
    """A standalone ZooKeeper (Debian ``zookeeper``) with a 2 s tick: sessions of
    4 s to 40 s. The data (and so the zxid counter) survives a restart."""

    name = "zookeeper"
    tick_ms = 2000

    def command(self) -> list[str]:
        config = self.dir / "zoo.cfg"
        (self.dir / "data").mkdir(exist_ok=True)
        config.write_text("\n".join([
            f"tickTime={self.tick_ms}", f"dataDir={self.dir / 'data'}",
            f"clientPort={self.port}", "clientPortAddress=127.0.0.1",
            "admin.enableServer=false", "4lw.commands.whitelist=ruok,srvr,mntr",
            "forceSync=no", "maxClientCnxns=200", ""]))
        classpath = ":".join(["/etc/zookeeper/conf", "/usr/share/java/zookeeper.jar",
                              "/usr/share/java/slf4j-log4j12.jar",
                              "/usr/share/java/log4j-1.2.jar"])
        return ["java", "-Xmx256m", "-Dzookeeper.root.logger=INFO,CONSOLE", "-cp", classpath,
                "org.apache.zookeeper.server.ZooKeeperServerMain", str(config)]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"ruok")
                return sock.recv(16) == b"imok"
        except OSError:
            return False

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"


class EtcdServer(ServerProcess):
    """A one-member etcd (Debian ``etcd-server``); the data survives a restart."""

    name = "etcd"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.peer_port = spare_port()

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.port}"
        member = f"fault{self.port}"
        return ["etcd", "--name", member, "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{member}={peer}"]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                return b'"health":"true"' in sock.recv(4096)
        except OSError:
            return False


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()
