"""Sequence-numbered UDP traffic: count every lost packet and every forwarding gap.

Run inside a namespace (``ip netns exec NS python -m bench.traffic ...``):

    recv --port P [--seconds S]
        prints READY on stderr once bound; on SIGTERM/SIGINT or after S seconds
        prints one JSON object: received, distinct, max_seq, first_t, last_t,
        gaps (the largest inter-arrival gaps, [start_epoch, ms]), missing
        (sequence ranges never received, [first, last]).
    send --dst IP --port P --rate PPS --seconds S [--size BYTES]
        sends at PPS until S seconds pass or SIGTERM/SIGINT, then prints
        sent, errors, first_t, last_t.

Each datagram carries (seq, send time). Times are wall-clock epochs so they
compare with the controller's and OVS's log timestamps.
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
from array import array
from typing import Any

from labs import netns as nsl

HEADER = struct.Struct("!QQ")
READY = "READY"
TOP_GAPS = 50


class _Stop:
    flag = False


def _on_signal(_signum: int, _frame: Any) -> None:
    _Stop.flag = True


def _cmd_recv(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((args.bind, args.port))
    sock.settimeout(0.05)
    print(READY, file=sys.stderr, flush=True)
    seqs = array("Q")
    times = array("d")
    end = time.monotonic() + args.seconds
    while not _Stop.flag and time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        now = time.time()
        if len(data) >= HEADER.size:
            seqs.append(HEADER.unpack_from(data)[0])
            times.append(now)
    print(json.dumps(summarise(seqs, times)), flush=True)
    return 0


def summarise(seqs: array, times: array) -> dict[str, Any]:
    distinct = set(seqs)
    gaps = sorted(
        ((times[i - 1], (times[i] - times[i - 1]) * 1000.0) for i in range(1, len(times))),
        key=lambda g: -g[1],
    )[:TOP_GAPS]
    missing: list[list[int]] = []
    if distinct:
        top = max(distinct)
        run_start = None
        for s in range(top + 1):
            if s not in distinct:
                if run_start is None:
                    run_start = s
            elif run_start is not None:
                missing.append([run_start, s - 1])
                run_start = None
    return {
        "received": len(seqs),
        "distinct": len(distinct),
        "max_seq": max(distinct) if distinct else None,
        "first_t": times[0] if times else None,
        "last_t": times[-1] if times else None,
        "gaps": [[round(t, 6), round(ms, 3)] for t, ms in gaps],
        "missing": missing[:200],
    }


def _cmd_send(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(READY, file=sys.stderr, flush=True)  # SIGTERM now ends it with its report
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b"\0" * max(0, args.size - HEADER.size)
    interval = 1.0 / args.rate
    dst = (args.dst, args.port)
    sent = errors = 0
    first_t = time.time()
    start = time.monotonic()
    next_t = start
    end = start + args.seconds
    while not _Stop.flag:
        now = time.monotonic()
        if now >= end:
            break
        if now < next_t:
            time.sleep(next_t - now)
            continue
        try:
            sock.sendto(HEADER.pack(sent, time.time_ns()) + pad, dst)
        except OSError:
            errors += 1
        sent += 1
        next_t += interval
    print(json.dumps({"sent": sent, "errors": errors, "first_t": first_t,
                      "last_t": time.time()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", default="0.0.0.0")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--seconds", type=float, default=600.0)
    r.set_defaults(func=_cmd_recv)
    s = sub.add_parser("send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--rate", type=float, default=1000.0)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--size", type=int, default=64)
    s.set_defaults(func=_cmd_send)
    args = parser.parse_args(argv)
    return int(args.func(args))


# ---------------------------------------------------------------- Python API


class UdpStream:
    """A sender in ``src_ns`` to a receiver in ``dst_ns``: ``start()``, then ``stop()``
    returns {"sent", "received", "lost", "recv": <receiver JSON>, "send": <sender JSON>}."""

    def __init__(self, src_ns: str, dst_ns: str, dst_ip: str, *, port: int = 9999,
                 rate: float = 1000.0, seconds: float = 60.0, size: int = 64) -> None:
        self.src_ns, self.dst_ns, self.dst_ip = src_ns, dst_ns, dst_ip
        self.port, self.rate, self.seconds, self.size = port, rate, seconds, size
        self.recv: subprocess.Popen[str] | None = None
        self.send: subprocess.Popen[str] | None = None

    def start(self) -> UdpStream:
        from labs.pkt import _cli_env

        env = _cli_env()
        self.recv = nsl.popen(self.dst_ns, [sys.executable, "-m", "bench.traffic", "recv",
                                            "--port", str(self.port),
                                            "--seconds", str(self.seconds + 30)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
        assert self.recv.stderr is not None
        line = self.recv.stderr.readline()
        if READY not in line:
            self.close()
            raise RuntimeError(f"traffic receiver did not start: {line}")
        self.send = nsl.popen(self.src_ns, [sys.executable, "-m", "bench.traffic", "send",
                                            "--dst", self.dst_ip, "--port", str(self.port),
                                            "--rate", str(self.rate),
                                            "--seconds", str(self.seconds),
                                            "--size", str(self.size)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
        assert self.send.stderr is not None
        line = self.send.stderr.readline()  # a SIGTERM before its handler would lose the report
        if READY not in line:
            self.close()
            raise RuntimeError(f"traffic sender did not start: {line}")
        return self

    def stop(self, drain_s: float = 0.3) -> dict[str, Any]:
        assert self.send is not None and self.recv is not None
        if self.send.poll() is None:
            self.send.send_signal(signal.SIGTERM)
        s_out, s_err = self.send.communicate(timeout=15)
        time.sleep(drain_s)
        self.recv.send_signal(signal.SIGTERM)
        r_out, r_err = self.recv.communicate(timeout=30)
        try:
            sent = json.loads(s_out)
            got = json.loads(r_out)
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"traffic tool failed: {s_err} {r_err}") from exc
        return {"sent": sent["sent"], "received": got["distinct"],
                "lost": sent["sent"] - got["distinct"], "send": sent, "recv": got}

    def close(self) -> None:
        for p in (self.send, self.recv):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


if __name__ == "__main__":
    sys.exit(main())
