"""A do-nothing os-ken app: the memory baseline (Python + os-ken, no socknet).
It only counts the switches that reached MAIN_DISPATCHER."""

from __future__ import annotations

from typing import Any

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import MAIN_DISPATCHER, set_ev_cls
from os_ken.ofproto import ofproto_v1_4

CONNECTED: set[int] = set()


class BareApp(app_manager.OSKenApp):  # type: ignore[misc]
    OFP_VERSIONS = [ofproto_v1_4.OFP_VERSION]

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER])
    def _state_change(self, ev: Any) -> None:
        if ev.datapath.id is not None:
            CONNECTED.add(ev.datapath.id)
