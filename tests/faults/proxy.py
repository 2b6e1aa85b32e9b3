"""A TCP proxy on loopback that a fault test switches between healthy and broken.

Modes: ``forward`` (healthy), ``drop_replies`` (requests reach the server,
its replies are swallowed: the client sees a timeout although the server
applied the request; the case that decides whether an acquire with a lost
reply can leave a slot taken), ``blackhole`` (nothing passes either way: a
partition), and ``close`` (every connection is cut at once, new ones refused).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

FORWARD, DROP_REPLIES, BLACKHOLE = "forward", "drop_replies", "blackhole"


class TcpProxy:
    """Listens on ``127.0.0.1:port`` and relays to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = FORWARD
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def forward(self) -> None:
        self.mode = FORWARD

    def drop_replies(self) -> None:
        self.mode = DROP_REPLIES

    def blackhole(self) -> None:
        self.mode = BLACKHOLE

    def cut(self) -> None:
        """Close every open connection (the client sees a reset); new ones still pass."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        sockets = [client, server]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.mode == BLACKHOLE:
                        continue
                    if sock is client:
                        server.sendall(data)
                    elif self.mode == FORWARD:
                        client.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()
