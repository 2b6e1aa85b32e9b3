"""Is the demo's port free, and if not, which process listens on it (Linux ``/proc``)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

LISTEN = "0A"  # TCP state in /proc/net/tcp


def in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as runserver does
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == LISTEN:
                inodes.add(fields[9])
    return inodes


def holder(port: int) -> str:
    """Who listens on ``port``: "pid 123 (python manage.py runserver ...)", or what is known."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(str(fd.readlink()) in inodes for fd in (proc / "fd").iterdir()):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                return f"pid {proc.name} ({command.strip()[:120]})"
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return "a process this user cannot see" if inodes else "an unknown process"


def spare_port(host: str, start: int) -> int:
    """The first free port after ``start`` (a suggestion for ``DEMO_PORT``)."""
    port = start + 1
    while port < 65535 and in_use(host, port):
        port += 1
    return port
