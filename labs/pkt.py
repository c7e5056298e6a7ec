"""Packet helpers that work inside network namespaces.

Capturing must happen inside the namespace, so this module is also a CLI that
callers run with ``ip netns exec NS <venv python> -m labs.pkt ...``:

    sniff --iface IF --seconds S [--bpf FILTER]
        capture for S seconds, then print one JSON object
        ``{"count": N, "packets": [summary, ...], "frames": [hex, ...]}``;
        prints ``READY`` on stderr once the capture socket is open.
    send --iface IF --hex HEX [--count N] [--interval SEC]
        send a raw Ethernet frame N times.

The Python API (:class:`Sniffer`, :func:`send_frame`, :func:`ping`) wraps the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from labs.netns import ns_argv

READY = "READY"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _cli_argv(ns: str | None, args: list[str]) -> list[str]:
    return ns_argv(ns, [sys.executable, "-m", "labs.pkt", *args])


def _cli_env() -> dict[str, str]:
    """Environment in which ``-m labs.pkt`` imports this very checkout."""
    env = dict(os.environ)
    paths = [str(_REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- Python API


class Sniffer:
    """Capture on ``iface`` inside ``ns`` for ``seconds`` in a subprocess.

    ``start()`` returns once the capture socket is open; ``result()`` waits for
    the capture to end and returns ``{"count", "packets", "frames"}``.
    """

    def __init__(self, ns: str | None, iface: str, seconds: float, bpf: str | None = None) -> None:
        self.ns = ns
        self.iface = iface
        self.seconds = seconds
        self.bpf = bpf
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = b""

    def start(self, ready_timeout_s: float = 10.0) -> Sniffer:
        """Spawn the capture and wait until it prints READY."""
        args = ["sniff", "--iface", self.iface, "--seconds", str(self.seconds)]
        if self.bpf:
            args += ["--bpf", self.bpf]
        self.proc = subprocess.Popen(
            _cli_argv(self.ns, args),
            env=_cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._wait_ready(ready_timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while READY.encode() not in self._stderr:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.close()
                    raise TimeoutError(f"sniffer not ready after {timeout_s}s: {self._err()}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.close()
                    raise RuntimeError(f"sniffer exited before READY: {self._err()}")
                self._stderr += chunk

    def _err(self) -> str:
        return self._stderr.decode(errors="replace").strip()

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for the capture to finish and return the parsed JSON."""
        if self.proc is None:
            raise RuntimeError("Sniffer.result() before start()")
        wait = timeout_s if timeout_s is not None else self.seconds + 10.0
        try:
            out, err = self.proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            self.close()
            raise
        self._stderr += err
        if self.proc.returncode != 0:
            raise RuntimeError(f"sniffer failed ({self.proc.returncode}): {self._err()}")
        return dict(json.loads(out))

    def close(self) -> None:
        """Kill the capture if it is still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def __enter__(self) -> Sniffer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def send_frame(
    ns: str | None, iface: str, frame: bytes, count: int = 1, interval: float = 0.0
) -> None:
    """Send the raw Ethernet ``frame`` out of ``iface`` inside ``ns``, ``count`` times."""
    args = ["send", "--iface", iface, "--hex", frame.hex(), "--count", str(count)]
    args += ["--interval", str(interval)]
    proc = subprocess.run(
        _cli_argv(ns, args),
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=10.0 + count * interval,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"send_frame on {ns}/{iface} failed: {proc.stderr.strip()}")


def ping(ns: str | None, dst_ip: str, count: int = 1, timeout_s: float = 1.0) -> bool:
    """Ping ``dst_ip`` from ``ns``; True if at least one reply arrived.

    ``timeout_s`` is how long to wait for each reply (``ping -W``); probes are
    0.2 s apart.
    """
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout_s), dst_ip]
    try:
        proc = subprocess.run(
            ns_argv(ns, argv),
            capture_output=True,
            timeout=timeout_s + 0.2 * count + 5.0,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


# --------------------------------------------------------------------------- CLI


def _cmd_sniff(args: argparse.Namespace) -> int:
    from scapy.config import conf

    conf.verb = 0
    import scapy.layers.inet  # noqa: F401  (registers IP/UDP/TCP/ICMP for summaries)
    import scapy.layers.inet6  # noqa: F401
    import scapy.layers.l2  # noqa: F401
    from scapy.sendrecv import sniff

    def ready() -> None:
        print(READY, file=sys.stderr, flush=True)

    packets = sniff(
        iface=args.iface,
        timeout=args.seconds,
        filter=args.bpf,
        started_callback=ready,
        store=True,
    )
    result = {
        "count": len(packets),
        "packets": [p.summary() for p in packets],
        "frames": [bytes(p).hex() for p in packets],
    }
    print(json.dumps(result), flush=True)
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    frame = bytes.fromhex(args.hex)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((args.iface, 0))
        for i in range(args.count):
            if i and args.interval > 0:
                time.sleep(args.interval)
            sock.send(frame)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labs.pkt", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sniff_p = sub.add_parser("sniff", help="capture for a while, print JSON")
    sniff_p.add_argument("--iface", required=True)
    sniff_p.add_argument("--seconds", type=float, required=True)
    sniff_p.add_argument("--bpf", default=None, help="BPF capture filter")
    sniff_p.set_defaults(func=_cmd_sniff)
    send_p = sub.add_parser("send", help="send a raw Ethernet frame")
    send_p.add_argument("--iface", required=True)
    send_p.add_argument("--hex", required=True, help="the whole frame, hex encoded")
    send_p.add_argument("--count", type=int, default=1)
    send_p.add_argument("--interval", type=float, default=0.0)
    send_p.set_defaults(func=_cmd_send)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
