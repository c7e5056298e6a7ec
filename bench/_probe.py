"""A verdict probe: one UDP datagram every few ms, every send and arrival recorded.

Run inside a namespace (``ip netns exec NS python -m bench._probe ...``):

    recv --port P
        prints READY on stderr once bound; on SIGTERM/SIGINT prints one JSON
        object {"recv": {seq: arrival epoch}}.
    send --dst IP --port P --interval-ms MS [--seconds S]
        one datagram (seq, send time) every MS ms from one socket (one conntrack
        connection) until SIGTERM/SIGINT or S seconds; then prints {"sent": [send
        epoch of seq 0, 1, ...]}.

Unlike `bench.traffic` (which summarises), both sides keep every sequence
number's time, so the caller can tell which datagram was the first one sent
after an event that saw the new verdict (dropped or passed).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

HEADER = struct.Struct("!QQ")
READY = "READY"


class _Stop:
    flag = False


def _on_signal(_signum: int, _frame: Any) -> None:
    _Stop.flag = True


def _recv(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("0.0.0.0", args.port))
    sock.settimeout(0.05)
    print(READY, file=sys.stderr, flush=True)
    got: dict[int, float] = {}
    while not _Stop.flag:
        try:
            data = sock.recv(2048)
        except (TimeoutError, InterruptedError):
            continue
        now = time.time()
        if len(data) >= HEADER.size:
            got.setdefault(HEADER.unpack_from(data)[0], now)
    print(json.dumps({"recv": got}), flush=True)
    return 0


def _send(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    interval = args.interval_ms / 1000.0
    sent: list[float] = []
    start = time.monotonic()
    end = start + args.seconds
    next_t = start
    while not _Stop.flag:
        now = time.monotonic()
        if now >= end:
            break
        if now < next_t:
            time.sleep(min(next_t - now, 0.05))
            continue
        t = time.time()
        try:
            sock.sendto(HEADER.pack(len(sent), time.time_ns()), (args.dst, args.port))
        except OSError:
            pass
        sent.append(t)
        next_t += interval
        if next_t < now:  # fell behind (descheduled): do not burst to catch up
            next_t = now + interval
    print(json.dumps({"sent": sent}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    parser = argparse.ArgumentParser(prog="python -m bench._probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=int, required=True)
    r.set_defaults(func=_recv)
    s = sub.add_parser("send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--interval-ms", type=float, default=5.0)
    s.add_argument("--seconds", type=float, default=3600.0)
    s.set_defaults(func=_send)
    args = parser.parse_args(argv)
    return int(args.func(args))


class Probe:
    """A sender in ``src_ns`` -> a receiver in ``dst_ns``; ``stop()`` returns the send time
    of every sequence number and the arrival time of every one received."""

    def __init__(self, src_ns: str, dst_ns: str, dst_ip: str, *, port: int,
                 interval_ms: float) -> None:
        from labs import netns as nsl
        from labs.pkt import _cli_env

        env = _cli_env()
        self.send: subprocess.Popen[str] | None = None
        self.recv = nsl.popen(dst_ns, [sys.executable, "-m", "bench._probe", "recv",
                                       "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.recv.stderr is not None
        line = self.recv.stderr.readline()
        if READY not in line:
            self.close()
            raise RuntimeError(f"probe receiver did not start: {line}")
        self.send = nsl.popen(src_ns, [sys.executable, "-m", "bench._probe", "send",
                                       "--dst", dst_ip, "--port", str(port),
                                       "--interval-ms", str(interval_ms)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def stop(self, drain_s: float = 0.2) -> tuple[list[float], dict[int, float]]:
        assert self.send is not None
        self.send.send_signal(signal.SIGTERM)
        s_out, s_err = self.send.communicate(timeout=30)
        time.sleep(drain_s)
        self.recv.send_signal(signal.SIGTERM)
        r_out, r_err = self.recv.communicate(timeout=30)
        try:
            sent = [float(t) for t in json.loads(s_out)["sent"]]
            received = {int(k): float(v) for k, v in json.loads(r_out)["recv"].items()}
        except (json.JSONDecodeError, KeyError) as exc:
            raise RuntimeError(f"probe failed: {s_err} {r_err}") from exc
        return sent, received

    def close(self) -> None:
        for p in (self.send, self.recv):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


if __name__ == "__main__":
    sys.exit(main())
