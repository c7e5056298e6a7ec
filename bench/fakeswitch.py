"""A fake OpenFlow switch (cbench-like) for the packet-in benchmark.

cbench is not packaged here, so this is the project's own: N switches, each one
TCP connection to a controller, each with its own datapath id, speaking
OpenFlow 1.3 or 1.4 (whichever the controller negotiates; the packet-in, flow-mod
and packet-out formats are the same in both). Each switch answers what a
controller asks during and after the handshake (HELLO with a version bitmap,
FEATURES_REPLY, echo, barrier, GET_CONFIG, role, multipart requests with empty
replies, bundle open/close/commit/discard replies; meter/group/table/port mods and
SET_CONFIG are accepted silently), then sends packet-ins, each with a new source
MAC, and watches what comes back:

- latency mode: one packet-in outstanding per switch at a time;
- throughput mode: a window of packet-ins outstanding per switch.

A packet-in is *answered* when the controller's reaction to it is in force on
the switch: the first FLOW_MOD or PACKET_OUT that carries its source MAC, or,
if that MAC arrives inside a bundle (OFPT_BUNDLE_ADD_MESSAGE), the bundle's
commit request. Source MACs are 02:fb:SS:NN:NN:NN (SS: switch index, N: a
counter), so they are found in any message by a byte search.

Frames (``--frame``):

- ``unicast``: an IPv4/UDP frame from the new MAC to a host MAC the controller
  learned during warm-up (one packet-in from it on ``--dst-port`` first): a
  learning switch answers with a flow-mod and a packet-out;
- ``arp``: a broadcast ARP request from the new MAC with a new sender IPv4
  (10.64.0.0/10 + counter): what socknet's learning path gets from the mesh.

    python -m bench.fakeswitch --controller 127.0.0.1:6653 --switches 16 \\
        --mode throughput --window 4 --seconds 5 [--frame arp --table 30 ...]

prints one JSON object (see `run`). Runs in the controller's namespace.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import statistics
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct("!BBHI")
OFP13, OFP14 = 0x04, 0x05
SUPPORTED = {OFP13, OFP14}

# message types (the same numbers in 1.3 and 1.4)
HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY = 0, 1, 2, 3
FEATURES_REQUEST, FEATURES_REPLY = 5, 6
GET_CONFIG_REQUEST, GET_CONFIG_REPLY, SET_CONFIG = 7, 8, 9
PACKET_IN, PACKET_OUT, FLOW_MOD = 10, 13, 14
MULTIPART_REQUEST, MULTIPART_REPLY = 18, 19
BARRIER_REQUEST, BARRIER_REPLY = 20, 21
ROLE_REQUEST, ROLE_REPLY = 24, 25
GET_ASYNC_REQUEST, GET_ASYNC_REPLY = 26, 27
METER_MOD = 29
BUNDLE_CONTROL, BUNDLE_ADD_MESSAGE = 33, 34
BUNDLE_OPEN, BUNDLE_CLOSE, BUNDLE_COMMIT, BUNDLE_DISCARD = 0, 2, 4, 6

NAMES = {
    HELLO: "hello", ERROR: "error", ECHO_REQUEST: "echo_request", ECHO_REPLY: "echo_reply",
    FEATURES_REQUEST: "features_request", GET_CONFIG_REQUEST: "get_config_request",
    SET_CONFIG: "set_config", PACKET_OUT: "packet_out", FLOW_MOD: "flow_mod",
    15: "group_mod", 16: "port_mod", 17: "table_mod", MULTIPART_REQUEST: "multipart_request",
    BARRIER_REQUEST: "barrier_request", ROLE_REQUEST: "role_request",
    GET_ASYNC_REQUEST: "get_async_request", 28: "set_async", METER_MOD: "meter_mod",
    BUNDLE_CONTROL: "bundle_control", BUNDLE_ADD_MESSAGE: "bundle_add",
}
# what counts as a reaction to packet-ins (the rest is handshake/housekeeping)
REACTIONS = ("flow_mod", "packet_out", "bundle_add", "bundle_control")

KEY_PREFIX = b"\x02\xfb"
HOST_PREFIX = b"\x02\xfa"
PKT_IN_HEAD = struct.Struct("!IHBBQ")  # buffer_id, total_len, reason, table_id, cookie
NO_BUFFER = 0xFFFFFFFF
OXM_IN_PORT = 0x80000004
ANSWER_TIMEOUT_S = 2.0


def hello(version: int = OFP14) -> bytes:
    bitmap = sum(1 << v for v in SUPPORTED)
    element = struct.pack("!HHI", 1, 8, bitmap)  # OFPHET_VERSIONBITMAP
    return HEADER.pack(version, HELLO, HEADER.size + len(element), 1) + element


def negotiate(msg: bytes) -> int | None:
    """The version to speak after the controller's HELLO (OpenFlow 1.3.1, 6.3.1)."""
    version = msg[0]
    pos = HEADER.size
    theirs = 0
    while pos + 4 <= len(msg):
        etype, elen = struct.unpack_from("!HH", msg, pos)
        if elen < 4:
            break
        if etype == 1 and elen >= 8:
            theirs = struct.unpack_from("!I", msg, pos + 4)[0]
        pos += (elen + 7) // 8 * 8
    if theirs:
        common = [v for v in SUPPORTED if theirs & (1 << v)]
        return max(common) if common else None
    v = min(version, max(SUPPORTED))
    return v if v in SUPPORTED else None


def _checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def key_mac(idx: int, seq: int) -> bytes:
    return KEY_PREFIX + bytes([idx & 0xFF]) + (seq & 0xFFFFFF).to_bytes(3, "big")


def host_mac(idx: int) -> bytes:
    return HOST_PREFIX + bytes([idx & 0xFF]) + b"\x00\x00\x01"


def key_ip(idx: int, seq: int) -> bytes:
    return struct.pack("!I", 0x0A400000 + ((idx << 16) + seq) % 0x400000)


def arp_frame(src: bytes, spa: bytes, tpa: bytes = bytes([10, 0, 0, 200])) -> bytes:
    eth = b"\xff" * 6 + src + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src, spa, b"\0" * 6, tpa)
    return (eth + arp).ljust(60, b"\0")


def udp_frame(src: bytes, dst: bytes, sip: bytes, dip: bytes = bytes([10, 0, 0, 200])) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9, 8 + 18, 0) + b"\0" * 18
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                               sip, dip))
    struct.pack_into("!H", ip, 10, _checksum(bytes(ip)))
    return dst + src + b"\x08\x00" + bytes(ip) + udp


def packet_in(version: int, xid: int, in_port: int, table_id: int, reason: int,
              data: bytes) -> bytes:
    match = struct.pack("!HHII", 1, 12, OXM_IN_PORT, in_port) + b"\0" * 4  # OXM, padded
    body = PKT_IN_HEAD.pack(NO_BUFFER, len(data), reason, table_id, 0) + match + b"\0\0" + data
    return HEADER.pack(version, PACKET_IN, HEADER.size + len(body), xid) + body


@dataclass
class Switch:
    idx: int
    dpid: int
    sock: socket.socket
    version: int = 0
    features_t: float | None = None
    last_rx: float = 0.0
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)
    bundles: dict[int, list[bytes]] = field(default_factory=dict)
    commits: int = 0
    outstanding: dict[bytes, float] = field(default_factory=dict)
    seq: int = 0
    xid: int = 100
    closed: str | None = None
    mute: bool = False  # reads but answers nothing (a switch that hangs)


class FakeSwitches:
    def __init__(self, host: str, port: int, n: int, dpid_base: int, *, frame: str,
                 table_id: int, in_port: int, dst_port: int, reason: int,
                 seq_base: int = 0, multipart_bodies: dict[int, bytes] | None = None,
                 errors: dict[int, tuple[int, int]] | None = None) -> None:
        self.addr = (host, port)
        # what a multipart request of each type is answered with (default: no entries)
        self.multipart_bodies = dict(multipart_bodies or {})
        # message type -> (error type, code): the first such message gets that error
        self.errors = dict(errors or {})
        self.frame, self.table_id, self.in_port, self.dst_port = frame, table_id, in_port, dst_port
        self.reason = reason
        self.sel = selectors.DefaultSelector()
        self.switches: list[Switch] = []
        self.rx: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.answered_t: list[float] = []
        self.timed_out = 0
        self.sent = 0
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            err = s.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect {self.addr}: {errno.errorcode.get(err)}")
            sw = Switch(i, dpid_base + i, s, seq=seq_base)
            self.switches.append(sw)
            self.sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, sw)
            sw.wbuf += hello()

    # ------------------------------------------------------------ I/O
    def _send(self, sw: Switch, data: bytes) -> None:
        sw.wbuf += data
        self._flush(sw)

    def _flush(self, sw: Switch) -> None:
        if sw.wbuf and sw.closed is None:
            try:
                n = sw.sock.send(sw.wbuf)
                del sw.wbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                sw.closed = str(exc)
                return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if sw.wbuf else 0)
        try:
            if self.sel.get_key(sw.sock).events != want:
                self.sel.modify(sw.sock, want, sw)
        except (KeyError, ValueError):
            pass

    def poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            sw: Switch = key.data
            if mask & selectors.EVENT_READ:
                try:
                    data = sw.sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError as exc:
                    sw.closed = str(exc)
                    self.sel.unregister(sw.sock)
                    continue
                if data == b"":
                    sw.closed = "closed by the controller"
                    self.sel.unregister(sw.sock)
                    continue
                if data:
                    sw.last_rx = time.perf_counter()
                    sw.rbuf += data
                    self._parse(sw)
            self._flush(sw)

    def _parse(self, sw: Switch) -> None:
        buf = sw.rbuf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            version, mtype, length, xid = HEADER.unpack_from(buf, pos)
            if length < HEADER.size:
                raise RuntimeError(f"switch {sw.idx}: bad message length {length}")
            if len(buf) - pos < length:
                break
            self._handle(sw, version, mtype, xid, bytes(buf[pos:pos + length]))
            pos += length
        del buf[:pos]

    # ------------------------------------------------------------ protocol
    def _reply(self, sw: Switch, mtype: int, xid: int, body: bytes = b"") -> None:
        self._send(sw, HEADER.pack(sw.version, mtype, HEADER.size + len(body), xid) + body)

    def _handle(self, sw: Switch, version: int, mtype: int, xid: int, msg: bytes) -> None:
        name = NAMES.get(mtype, f"type{mtype}")
        self.rx[name] += 1
        if mtype == MULTIPART_REQUEST:
            self.rx[f"multipart_request:{struct.unpack_from('!H', msg, HEADER.size)[0]}"] += 1
        if sw.mute:
            return
        if mtype in self.errors:
            etype, code = self.errors.pop(mtype)
            self._reply(sw, ERROR, xid, struct.pack("!HH", etype, code) + msg[:64])
            return
        if mtype == HELLO:
            v = negotiate(msg)
            if v is None:
                raise RuntimeError(f"switch {sw.idx}: no common OpenFlow version "
                                   f"(controller sent {version:#x})")
            sw.version = v
        elif mtype == ECHO_REQUEST:
            self._reply(sw, ECHO_REPLY, xid, msg[HEADER.size:])
        elif mtype == FEATURES_REQUEST:
            sw.features_t = time.perf_counter()
            self._reply(sw, FEATURES_REPLY, xid,
                        struct.pack("!QIBB2xII", sw.dpid, 0, 254, 0, 0x4F, 0))
        elif mtype == GET_CONFIG_REQUEST:
            self._reply(sw, GET_CONFIG_REPLY, xid, struct.pack("!HH", 0, 0xFFFF))
        elif mtype == BARRIER_REQUEST:
            self._reply(sw, BARRIER_REPLY, xid)
        elif mtype == ROLE_REQUEST:
            self._reply(sw, ROLE_REPLY, xid, msg[HEADER.size:])
        elif mtype == GET_ASYNC_REQUEST:
            self._reply(sw, GET_ASYNC_REPLY, xid, b"")
        elif mtype == MULTIPART_REQUEST:
            mp_type = struct.unpack_from("!H", msg, HEADER.size)[0]
            self._reply(sw, MULTIPART_REPLY, xid, struct.pack("!HH4x", mp_type, 0)
                        + self.multipart_bodies.get(mp_type, b""))
        elif mtype == BUNDLE_CONTROL:
            bundle_id, ctype, flags = struct.unpack_from("!IHH", msg, HEADER.size)
            if ctype == BUNDLE_OPEN:
                sw.bundles[bundle_id] = []
            elif ctype == BUNDLE_COMMIT:
                sw.commits += 1
                self._answer(sw, sw.bundles.pop(bundle_id, []))
            elif ctype == BUNDLE_DISCARD:
                sw.bundles.pop(bundle_id, None)
            self._reply(sw, BUNDLE_CONTROL, xid, struct.pack("!IHH", bundle_id, ctype + 1, flags))
        elif mtype == BUNDLE_ADD_MESSAGE:
            bundle_id = struct.unpack_from("!I", msg, HEADER.size)[0]
            inner = struct.unpack_from("!B", msg, HEADER.size + 8 + 1)[0]
            self.rx[f"bundle_add:{NAMES.get(inner, inner)}"] += 1
            sw.bundles.setdefault(bundle_id, []).extend(self._keys(msg))
        elif mtype in (FLOW_MOD, PACKET_OUT):
            self._answer(sw, self._keys(msg))
        elif mtype == ERROR:
            etype, code = struct.unpack_from("!HH", msg, HEADER.size)
            self.rx[f"error:{etype}/{code}"] += 1

    @staticmethod
    def _keys(msg: bytes) -> list[bytes]:
        out = []
        pos = msg.find(KEY_PREFIX)
        while pos >= 0:
            out.append(msg[pos:pos + 6])
            pos = msg.find(KEY_PREFIX, pos + 2)
        return out

    def _answer(self, sw: Switch, keys: list[bytes]) -> None:
        if not keys:
            return
        now = time.perf_counter()
        for k in keys:
            t = sw.outstanding.pop(k, None)
            if t is not None:
                self.latencies.append(now - t)
                self.answered_t.append(now)

    # ------------------------------------------------------------ traffic
    def send_packet_in(self, sw: Switch) -> None:
        sw.seq += 1
        sw.xid += 1
        key = key_mac(sw.idx, sw.seq)
        if self.frame == "arp":
            data = arp_frame(key, key_ip(sw.idx, sw.seq))
        else:
            data = udp_frame(key, host_mac(sw.idx), key_ip(sw.idx, sw.seq))
        sw.outstanding[key] = time.perf_counter()
        self.sent += 1
        self._send(sw, packet_in(sw.version, sw.xid, self.in_port, self.table_id, self.reason,
                                 data))

    def warm_up(self, timeout_s: float = 10.0) -> None:
        """Unicast frames: each switch first sends one frame from its host MAC (so the
        controller knows where that MAC is) and waits for the controller's packet-out."""
        if self.frame != "unicast":
            return
        for sw in self.switches:
            sw.xid += 1
            data = udp_frame(host_mac(sw.idx), b"\xff" * 6, bytes([10, 0, 0, 200]),
                             bytes([10, 0, 0, 201]))
            self._send(sw, packet_in(sw.version, sw.xid, self.dst_port, self.table_id,
                                     self.reason, data))
        before = self.rx["packet_out"]
        self.wait(lambda: self.rx["packet_out"] - before >= len(self.switches), timeout_s,
                  "warm-up packet-outs")
        self.quiet(0.3, timeout_s)

    def wait(self, pred: Any, timeout_s: float, what: str) -> None:
        deadline = time.perf_counter() + timeout_s
        while not pred():
            self._check_open()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"fake switches: timed out waiting for {what}; "
                                   f"received {dict(self.rx)}")
            self.poll(min(left, 0.05))

    def quiet(self, quiet_s: float, timeout_s: float) -> None:
        """Until no switch has received anything for ``quiet_s``."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            self.poll(0.02)
            last = max(sw.last_rx for sw in self.switches)
            if time.perf_counter() - last >= quiet_s:
                return

    def _check_open(self) -> None:
        for sw in self.switches:
            if sw.closed is not None:
                raise RuntimeError(f"switch {sw.idx} (dpid {sw.dpid:#x}): {sw.closed}; "
                                   f"received {dict(self.rx)}")

    def handshake(self, timeout_s: float, commits: int) -> float:
        t0 = time.perf_counter()
        self.wait(lambda: all(sw.features_t is not None for sw in self.switches), timeout_s,
                  "FEATURES_REQUEST on every switch")
        if commits:
            self.wait(lambda: all(sw.commits >= commits for sw in self.switches), timeout_s,
                      f"{commits} bundle commit(s) on every switch (initial reconcile)")
        self.quiet(0.5, timeout_s)
        return time.perf_counter() - t0

    def measure(self, seconds: float, window: int) -> dict[str, Any]:
        """Keep ``window`` packet-ins outstanding per switch for ``seconds``; then stop
        sending and wait for the stragglers."""
        self.latencies.clear()
        self.answered_t.clear()
        rx_before = Counter(self.rx)
        sent_before = self.sent
        start = time.perf_counter()
        end = start + seconds
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            for sw in self.switches:
                if sw.outstanding:
                    oldest = next(iter(sw.outstanding.values()))
                    if now - oldest > ANSWER_TIMEOUT_S:
                        for k in [k for k, t in sw.outstanding.items()
                                  if now - t > ANSWER_TIMEOUT_S]:
                            del sw.outstanding[k]
                            self.timed_out += 1
                while len(sw.outstanding) < window:
                    self.send_packet_in(sw)
            self._check_open()
            self.poll(0.01)
        in_window = sum(1 for t in self.answered_t if t <= end)
        lat_in = [lat * 1e6 for lat, t in zip(self.latencies, self.answered_t, strict=True)
                  if t <= end]
        per_second = [0] * max(1, int(seconds + 0.999))
        for t in self.answered_t:
            if t <= end:
                per_second[min(len(per_second) - 1, int(t - start))] += 1
        drain_deadline = time.perf_counter() + ANSWER_TIMEOUT_S
        while any(sw.outstanding for sw in self.switches) and \
                time.perf_counter() < drain_deadline:
            self.poll(0.02)
        rx = {k: v - rx_before.get(k, 0) for k, v in self.rx.items()
              if v - rx_before.get(k, 0)}
        sent = self.sent - sent_before
        return {
            "seconds": seconds,
            "window": window,
            "switches": len(self.switches),
            "sent": sent,
            "answered": in_window,
            "answered_total": len(self.latencies),
            "unanswered": sum(len(sw.outstanding) for sw in self.switches) + self.timed_out,
            "rate": in_window / seconds,
            "latency_us_median": statistics.median(lat_in) if lat_in else None,
            "latency_us_p95": (sorted(lat_in)[int(0.95 * (len(lat_in) - 1))]
                               if lat_in else None),
            "per_second": per_second,
            "rx": rx,
            "reactions_per_packet_in": (sum(v for k, v in rx.items() if k in REACTIONS)
                                        / max(1, len(self.latencies))),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.controller.rpartition(":")
    fs = FakeSwitches(host, int(port), args.switches, args.dpid_base, frame=args.frame,
                      table_id=args.table, in_port=args.in_port, dst_port=args.dst_port,
                      reason=args.reason, seq_base=args.seq_base)
    handshake_s = fs.handshake(args.timeout, args.commits)
    fs.warm_up(args.timeout)
    window = 1 if args.mode == "latency" else args.window
    out = fs.measure(args.seconds, window)
    out.update(mode=args.mode, handshake_s=handshake_s,
               versions=sorted({sw.version for sw in fs.switches}))
    for sw in fs.switches:
        sw.sock.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakeswitch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controller", default="127.0.0.1:6653")
    p.add_argument("--switches", type=int, default=1)
    p.add_argument("--dpid-base", type=lambda s: int(s, 0), default=0x1)
    p.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    p.add_argument("--window", type=int, default=16, help="throughput mode: per switch")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--frame", choices=("unicast", "arp"), default="unicast")
    p.add_argument("--table", type=int, default=0, help="table_id of the packet-ins")
    p.add_argument("--in-port", type=int, default=2)
    p.add_argument("--dst-port", type=int, default=1, help="unicast: where the host MAC is")
    p.add_argument("--reason", type=int, default=0, help="0 no match, 1 action")
    p.add_argument("--commits", type=int, default=0,
                   help="wait for this many bundle commits per switch before measuring")
    p.add_argument("--seq-base", type=int, default=0,
                   help="first MAC/IP counter: a controller that keeps state across runs "
                        "sees new hosts")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
