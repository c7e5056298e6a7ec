"""Is a TCP address free to listen on, and if not, which process holds it?

`socknet run` asks before anything starts, so that a second controller on the same
host (or anything else on its ports) is named in one line and the process exits with
status 2, instead of dying in os-ken's or the metrics server's thread.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def bind_problem(host: str, port: int) -> str | None:
    """None if ``host:port`` can be bound now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use"
            return exc.strerror or str(exc)
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and int(
                    fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def holder(port: int) -> str | None:
    """"pid 123 (socknet run -c /etc/socknet/host.yaml)" for the process listening on
    ``port`` in this network namespace, when /proc lets us see it."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in inodes:
                    return f"pid {pid} ({_cmdline(pid)})"
            except OSError:
                continue
    return None


def _cmdline(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if len(words) > 2 and words[1:3] == ["-m", "controller.cli"]:
        words = ["socknet", *words[3:]]  # python -m controller.cli run ... is socknet run
    elif words and Path(words[0]).name.startswith("python") and len(words) > 1 and (
            Path(words[1]).name == "socknet"):
        words = words[1:]
    text = " ".join(words)
    return text if len(text) <= 120 else text[:117] + "..."


def _addr(host: str, port: int) -> str:
    try:
        return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"
    except ValueError:
        return f"{host}:{port}"


def listen_problems(addresses: list[tuple[str, str, int]]) -> list[str]:
    """One line per (what, host, port) that cannot be listened on, e.g.
    "127.0.0.1:6653 (OpenFlow) already in use by pid 42 (socknet run -c ...)"."""
    out = []
    for what, host, port in addresses:
        why = bind_problem(host, port)
        if why is None:
            continue
        if why == "already in use":
            who = holder(port)
            why += f" by {who}" if who else " (another socknet run?)"
        out.append(f"{_addr(host, port)} ({what}) {why}")
    return out
