"""The os-ken application: OpenFlow events in, calls into controller.runtime.

os-ken 4.x instantiates apps itself, so the runtime is handed over through
`bind()` before `AppManager.run_apps` starts this module.
"""

from __future__ import annotations

from typing import Any

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import (
    CONFIG_DISPATCHER,
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    set_ev_cls,
)
from os_ken.ofproto import ofproto_v1_4

from controller import oferrors
from controller.logs import get_logger
from controller.runtime import Controller

log = get_logger("socknet.app")
_controller: Controller | None = None


def bind(controller: Controller) -> None:
    global _controller
    _controller = controller


class SocknetApp(app_manager.OSKenApp):  # type: ignore[misc]
    OFP_VERSIONS = [ofproto_v1_4.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _controller is None:
            raise RuntimeError("apps.socknet_app: bind(controller) before starting os-ken")
        self.controller = _controller

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    def _state_change(self, ev: Any) -> None:
        dp = ev.datapath
        if dp.id is None:
            return
        if ev.state == MAIN_DISPATCHER:
            self.controller.switch_connected(dp)
        elif ev.state == DEAD_DISPATCHER:
            self.controller.switch_disconnected(dp)

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _features(self, ev: Any) -> None:
        # Nothing to install here: reconciliation reads the switch first and
        # sends only the difference once the switch reaches MAIN_DISPATCHER.
        pass

    def _reply(self, ev: Any) -> None:
        session = self.controller.session_of(ev.msg.datapath)
        if session is not None:
            session.on_reply(ev.msg)

    @set_ev_cls(ofp_event.EventOFPFlowStatsReply, MAIN_DISPATCHER)
    def _flow_stats(self, ev: Any) -> None:
        self._reply(ev)

    @set_ev_cls(ofp_event.EventOFPBundleCtrlMsg, MAIN_DISPATCHER)
    def _bundle_ctrl(self, ev: Any) -> None:
        self._reply(ev)

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def _barrier(self, ev: Any) -> None:
        self._reply(ev)

    @set_ev_cls(ofp_event.EventOFPTableStatsReply, MAIN_DISPATCHER)
    def _table_stats(self, ev: Any) -> None:
        self._reply(ev)

    @set_ev_cls(ofp_event.EventOFPMeterConfigStatsReply, MAIN_DISPATCHER)
    def _meter_config(self, ev: Any) -> None:
        self._reply(ev)

    @set_ev_cls(ofp_event.EventOFPEchoReply, MAIN_DISPATCHER)
    def _echo_reply(self, ev: Any) -> None:
        self._reply(ev)  # the answer to a liveness probe (runtime: dpid conflicts)

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev: Any) -> None:
        if self.controller.session_of(ev.msg.datapath) is not None:
            self.controller.packet_in(ev.msg.datapath.id, ev.msg)

    @set_ev_cls(ofp_event.EventOFPErrorMsg, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _error(self, ev: Any) -> None:
        """An error a request is waiting for is reported by that request (with the flow
        or meter it was about); any other is logged here."""
        msg = ev.msg
        session = self.controller.session_of(msg.datapath)
        if session is not None and session.on_error(msg):
            return
        if session is not None:
            fields = session.error_fields(msg)
        else:
            fields = {"bridge": self.controller.bridge_name(msg.datapath.id),
                      **oferrors.describe(msg, msg.datapath.ofproto)}
        log.warning("openflow_error", xid=msg.xid, **fields)
