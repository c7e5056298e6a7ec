"""The baseline of the packet-in benchmark: a minimal os-ken learning switch (OpenFlow 1.3).

The classic `simple_switch_13`: a table-miss flow sends everything to the
controller; on a packet-in it learns source MAC -> in_port; if the destination
is known it installs a flow (in_port, eth_src, eth_dst -> output, priority 1,
cookie LEARNED) and sends the packet out to that port, else floods it.

    ip netns exec NS python -m bench._learning_switch --port 6653

Runs under os-ken's AppManager like socknet (native hub). Commands on stdin, one
per line, one JSON reply per line on stdout: ``reset`` (forget every MAC: the
next packet of any host goes to the controller again, once its flows are deleted
too), ``stats`` (packet-ins handled), ``quit``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import warnings
from typing import Any

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

from os_ken.base import app_manager  # noqa: E402
from os_ken.controller import ofp_event  # noqa: E402
from os_ken.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER, set_ev_cls  # noqa: E402
from os_ken.lib.packet import ethernet, packet  # noqa: E402
from os_ken.ofproto import ofproto_v1_3  # noqa: E402

LEARNED_COOKIE = 0x5157
MAC_TABLES: dict[int, dict[str, int]] = {}
STATS = {"packet_ins": 0}


class LearningSwitch(app_manager.OSKenApp):  # type: ignore[misc]
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _features(self, ev: Any) -> None:
        dp = ev.msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        actions = [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)]
        self._add_flow(dp, 0, parser.OFPMatch(), actions, cookie=0)

    @staticmethod
    def _add_flow(dp: Any, priority: int, match: Any, actions: list[Any], cookie: int) -> None:
        ofp, parser = dp.ofproto, dp.ofproto_parser
        inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)]
        dp.send_msg(parser.OFPFlowMod(datapath=dp, cookie=cookie, priority=priority,
                                      match=match, instructions=inst))

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev: Any) -> None:
        STATS["packet_ins"] += 1
        msg = ev.msg
        dp = msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        in_port = msg.match["in_port"]
        eth = packet.Packet(msg.data).get_protocols(ethernet.ethernet)[0]
        table = MAC_TABLES.setdefault(dp.id, {})
        table[eth.src] = in_port
        out_port = table.get(eth.dst, ofp.OFPP_FLOOD)
        actions = [parser.OFPActionOutput(out_port)]
        if out_port != ofp.OFPP_FLOOD:
            match = parser.OFPMatch(in_port=in_port, eth_dst=eth.dst, eth_src=eth.src)
            self._add_flow(dp, 1, match, actions, cookie=LEARNED_COOKIE)
        data = msg.data if msg.buffer_id == ofp.OFP_NO_BUFFER else None
        dp.send_msg(parser.OFPPacketOut(datapath=dp, buffer_id=msg.buffer_id, in_port=in_port,
                                        actions=actions, data=data))


def _commands() -> None:
    # run as __main__, the app os-ken instantiates lives in the imported module
    import bench._learning_switch as app

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            os._exit(0)
        elif cmd == "reset":
            for table in app.MAC_TABLES.values():
                table.clear()
            reply: dict[str, Any] = {"ok": True}
        elif cmd == "stats":
            reply = {"ok": True, **app.STATS,
                     "macs": sum(len(t) for t in app.MAC_TABLES.values())}
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._learning_switch")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6653)
    args = parser.parse_args(argv)
    os.environ.setdefault("OSKEN_HUB_TYPE", "native")
    from os_ken import cfg as osken_cfg

    osken_cfg.CONF(args=["--ofp-listen-host", args.host,
                         "--ofp-tcp-listen-port", str(args.port)], project="os_ken")
    threading.Thread(target=_commands, name="bench-cmd", daemon=True).start()
    print(json.dumps({"ok": True, "listening": args.port}), file=sys.stderr, flush=True)
    app_manager.AppManager.run_apps(["bench._learning_switch"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
