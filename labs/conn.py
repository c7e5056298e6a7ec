"""Real TCP/UDP endpoints inside lab namespaces (small Python programs run with
`ip netns exec`), for tests that need connections, not just pings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

from labs import netns as nsl

_SERVER = r"""
import socket, sys, threading
proto, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    print("READY", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data.upper(), peer)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(16)
print("READY", flush=True)
def serve(c):
    with c:
        while data := c.recv(2048):
            c.sendall(data.upper())
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

_CLIENT = r"""
import socket, sys
proto, src, dst, port, timeout = sys.argv[1:6]
port, timeout = int(port), float(timeout)
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0)); s.settimeout(timeout)
        s.sendto(b"hello", (dst, port))
        print(s.recvfrom(2048)[0].decode())
    else:
        s = socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0))
        s.sendall(b"hello")
        print(s.recv(2048).decode())
except OSError as exc:
    print(f"ERROR {exc}")
"""

# A long-lived TCP session: one line on stdin -> send it, print the echo or TIMEOUT.
_SESSION = r"""
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((dst, port), timeout=3, source_address=(src, 0))
s.settimeout(1.5)
print("CONNECTED", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.strip().encode())
        print(s.recv(2048).decode() or "CLOSED", flush=True)
    except OSError as exc:
        print(f"TIMEOUT {exc}", flush=True)
"""

# Sequence-numbered UDP at a fixed rate; the receiver reports which numbers arrived.
_STREAM_SEND = r"""
import socket, sys, time
src, dst = sys.argv[1], sys.argv[2]
port, rate, seconds = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
n, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    s.sendto(str(n).encode(), (dst, port)); n += 1
    time.sleep(max(0.0, start + n / rate - time.monotonic()))
print(n, flush=True)
"""

_STREAM_RECV = r"""
import json, socket, sys
ip, port, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, port)); s.settimeout(idle)
print("READY", flush=True)
got = set()
try:
    while True:
        got.add(int(s.recv(64)))
except socket.timeout:
    pass
print(json.dumps(sorted(got)), flush=True)
"""


def _py(ns: str, code: str, *args: object, **kw: object) -> subprocess.Popen[str]:
    return nsl.popen(ns, [sys.executable, "-c", code, *map(str, args)], text=True,
                     stdin=kw.pop("stdin", subprocess.DEVNULL), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, **kw)


def _wait_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"expected {want!r}, got {line!r}: {err}")


def server(ns: str, proto: str, ip: str, port: int) -> subprocess.Popen[str]:
    proc = _py(ns, _SERVER, proto, ip, port)
    _wait_line(proc, "READY")
    return proc


def connect(ns: str, proto: str, src: str, dst: str, port: int, timeout_s: float = 1.5) -> bool:
    """One request/response; True if the echo came back."""
    res = nsl.run(ns, [sys.executable, "-c", _CLIENT, proto, src, dst, str(port),
                       str(timeout_s)], timeout=timeout_s + 10)
    return res.stdout.strip() == "HELLO"


class Session:
    """A TCP connection that stays open; `exchange()` sends one message."""

    def __init__(self, ns: str, src: str, dst: str, port: int) -> None:
        self.proc = _py(ns, _SESSION, src, dst, port, stdin=subprocess.PIPE)
        _wait_line(self.proc, "CONNECTED")

    def exchange(self, text: str = "ping") -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == text.upper()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class UdpStream:
    """Sequence-numbered UDP at ``rate`` pkt/s for ``seconds``; `lost()` counts the gaps."""

    def __init__(self, src_ns: str, src: str, dst_ns: str, dst: str, port: int,
                 rate: float, seconds: float) -> None:
        self.receiver = _py(dst_ns, _STREAM_RECV, dst, port, 1.5)
        _wait_line(self.receiver, "READY")
        time.sleep(0.05)
        self.sender = _py(src_ns, _STREAM_SEND, src, dst, port, rate, seconds)

    def result(self) -> tuple[int, int]:
        """(sent, received)."""
        out, _ = self.sender.communicate(timeout=120)
        sent = int(out.strip())
        got, _ = self.receiver.communicate(timeout=30)
        return sent, len(json.loads(got.strip().splitlines()[-1]))

    def close(self) -> None:
        for p in (self.sender, self.receiver):
            if p.poll() is None:
                p.kill()
                p.wait()


_PING_REPLY = re.compile(r"^\[(?P<t>\d+\.\d+)\] \d+ bytes from ")


class Prober:
    """``ping -D`` every ``interval`` s from ``ns`` to ``dst`` until stopped; the
    wall-clock stamp of every echo reply is collected by a reader thread."""

    def __init__(self, ns: str, dst: str, interval: str = "0.005") -> None:
        self.proc = nsl.popen(ns, ["ping", "-D", "-n", "-i", interval, "-W", "1", dst],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.replies: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = _PING_REPLY.match(line)
            if m:
                self.replies.append(float(m.group("t")))

    def replies_after(self, t: float) -> int:
        return sum(1 for r in list(self.replies) if r > t)

    def first_after(self, t0: float, timeout_s: float) -> float | None:
        """Wall-clock time of the first reply stamped after ``t0`` (None: none in time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = [t for t in list(self.replies) if t > t0]
            if got:
                return got[0]
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return None
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)
