"""A local process that speaks OpenFlow to the controller's listener: what an attacker
on the host can do to a plain-tcp channel (tests/test_channel.py).

One connection (`bench.fakeswitch`), announcing ``--dpid``; multipart requests are
answered with the bodies given (``--body TYPE=HEX``, e.g. a PORT_DESC with a zero-length
port), ``--send HEX`` messages go out once the handshake is done, ``--mute`` stops
answering after it (a hung switch). Stays until the controller closes the connection
or ``--hold`` seconds have passed, then prints one JSON object:

    {"handshake": true, "closed": "closed by the controller", "closed_after_s": 0.4,
     "rx": {"features_request": 1, "multipart_request:13": 1, ...}}

``closed_after_s`` counts from the end of the handshake (the last message sent).

    ip netns exec NS python -m labs.ofpeer --controller 127.0.0.1:6653 --dpid 0x1 \\
        [--body 13=HEX] [--send HEX] [--mute] [--error 34:2:4] [--until RX] [--hold 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench.fakeswitch import FakeSwitches

PORT_DESC = 13


def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.controller.rpartition(":")
    bodies = {int(t): bytes.fromhex(h) for t, _, h in (b.partition("=") for b in args.body)}
    errors = {int(m): (int(t), int(c)) for m, t, c in (e.split(":") for e in args.error)}
    fake = FakeSwitches(host, int(port), 1, args.dpid, frame="arp", table_id=0, in_port=1,
                        dst_port=2, reason=0, multipart_bodies=bodies, errors=errors)
    sw = fake.switches[0]
    out: dict[str, Any] = {"handshake": False, "closed": None, "closed_after_s": None}
    deadline = time.monotonic() + args.hold
    # the handshake: os-ken asks for the features, then the port list
    while time.monotonic() < deadline and sw.closed is None:
        fake.poll(0.05)
        if fake.rx[f"multipart_request:{PORT_DESC}"]:
            out["handshake"] = True
            break
    if out["handshake"] and sw.closed is None:
        fake.poll(0.2)  # os-ken moves the switch on to its main state
        for hexdata in args.send:
            fake._send(sw, bytes.fromhex(hexdata))
        sw.mute = args.mute
    mark = time.monotonic()
    while time.monotonic() < deadline and sw.closed is None and not (
            args.until and fake.rx[args.until]):
        fake.poll(0.05)
    if sw.closed is not None:
        out["closed"] = sw.closed
        out["closed_after_s"] = round(time.monotonic() - mark, 3)
    out["rx"] = dict(fake.rx)
    sw.sock.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.ofpeer")
    parser.add_argument("--controller", default="127.0.0.1:6653")
    parser.add_argument("--dpid", type=lambda v: int(v, 0), required=True)
    parser.add_argument("--body", action="append", default=[], metavar="TYPE=HEX",
                        help="answer multipart requests of TYPE with these entries")
    parser.add_argument("--send", action="append", default=[], metavar="HEX",
                        help="a message to send once the handshake is done")
    parser.add_argument("--mute", action="store_true", help="answer nothing after it")
    parser.add_argument("--error", action="append", default=[], metavar="MSGTYPE:TYPE:CODE",
                        help="answer the first message of MSGTYPE with this OpenFlow error")
    parser.add_argument("--until", metavar="RX", help="leave once this was received, e.g. "
                        "multipart_request:1 (a flow-stats request)")
    parser.add_argument("--hold", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
