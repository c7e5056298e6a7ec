"""OpenFlow errors as the operator reads them, and no expected errors at all.

- a flow the switch refuses in a bundle: the failure names the bridge, the decoded
  type/code and that very flow (the xid of each bundled add maps back to it);
- an error nobody waits for is decoded from the request bytes the switch sends back;
- meters are read first: an audit of a switch whose meters are right sends no meter
  mod at all (the "meter exists" error of add-then-modify is gone), a missing meter is
  added, a different one modified, and an add that races another writer is modified.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from os_ken.ofproto import ofproto_v1_4, ofproto_v1_4_parser

from bench.flowgen import synthetic_flows
from controller import encode, oferrors
from controller.reconcile import Plan
from controller.runtime import Controller
from controller.switch import SwitchError, SwitchSession
from topology.config import parse_host_config
from topology.pipeline import METER_RATES
from topology.render import flow_text

OFP = ofproto_v1_4
PARSER = ofproto_v1_4_parser


class ErroringDatapath:
    """Takes a bundle; the switch refuses the add with xid ``bad_xid`` (as OVS does:
    an error carrying the add's xid, before the commit's reply)."""

    ofproto = OFP
    ofproto_parser = PARSER

    def __init__(self) -> None:
        self.id = 1
        self.xid = 100
        self.session: SwitchSession | None = None
        self.bad_xid: int | None = None

    def set_xid(self, msg: Any) -> None:
        self.xid += 1
        msg.set_xid(self.xid)

    def send_msg(self, msg: Any) -> bool:
        if msg.xid is None:
            self.set_xid(msg)
        return True

    def send(self, data: bytes) -> bool:
        if self.bad_xid is not None and self.session is not None:
            err = types.SimpleNamespace(xid=self.bad_xid, type=OFP.OFPET_BAD_ACTION,
                                        code=OFP.OFPBAC_BAD_OUT_PORT, data=b"")
            self.bad_xid = None
            assert self.session.on_error(err)  # somebody waits for it: not logged twice
        return True


def test_a_refused_flow_in_a_bundle_is_named_with_bridge_type_and_code() -> None:
    dp = ErroringDatapath()
    session = SwitchSession(dp, "vmbr0")
    dp.session = session
    flows = synthetic_flows(50, seed=3)
    plan = Plan(add=tuple(flows), delete_cookies=(), purge_cookies=(0x5C03000000000002,))
    first = dp.xid + 2  # after the bundle open's xid
    dp.bad_xid = first + 1 + 17  # the purge is item 0: the 18th add
    with pytest.raises(SwitchError) as failed:
        session.apply(plan)
    want = "flow " + flow_text(flows[17]).strip()
    assert failed.value.details == {"bridge": "vmbr0", "type": "OFPET_BAD_ACTION",
                                    "code": "OFPBAC_BAD_OUT_PORT", "request": want}
    assert str(failed.value) == ("vmbr0: bundle refused: OpenFlow error "
                                 f"OFPET_BAD_ACTION/OFPBAC_BAD_OUT_PORT for {want}")


def test_an_error_nobody_waits_for_is_decoded_from_the_request_it_quotes() -> None:
    dp = types.SimpleNamespace(ofproto=OFP, ofproto_parser=PARSER, id=1, xid=1)
    f = synthetic_flows(1, seed=5)[0]
    mod = encode.flow_mod_add(dp, f)
    mod.xid = 9
    mod.serialize()
    err = types.SimpleNamespace(xid=9, type=OFP.OFPET_FLOW_MOD_FAILED,
                                code=OFP.OFPFMFC_TABLE_FULL, data=bytes(mod.buf[:64]))
    session = SwitchSession(dp, "mesh")
    assert session.on_error(err) is False  # nobody waits: the app logs it
    assert session.error_fields(err) == {
        "bridge": "mesh", "type": "OFPET_FLOW_MOD_FAILED", "code": "OFPFMFC_TABLE_FULL",
        "request": f"flow add table={f.table} priority={f.priority} cookie={f.cookie:#x}"}
    meter = encode.meter_mod(dp, 2, 200, 200, command="add")
    meter.xid = 10
    meter.serialize()
    assert oferrors.describe(types.SimpleNamespace(
        type=OFP.OFPET_METER_MOD_FAILED, code=OFP.OFPMMFC_METER_EXISTS, data=bytes(meter.buf)),
        OFP) == {"type": "OFPET_METER_MOD_FAILED", "code": "OFPMMFC_METER_EXISTS",
                 "request": "meter add meter_id=2"}


class MeterSwitch:
    """A session stand-in: the switch's meters, and the meter mods it is sent."""

    def __init__(self, meters: dict[int, tuple[int, int]], exists_on_add: bool = False
                 ) -> None:
        self.dp = types.SimpleNamespace(ofproto=OFP, ofproto_parser=PARSER, id=1, xid=1)
        self.bridge = "vmbr0"
        self.meters = meters  # meter_id -> (rate, burst)
        self.exists_on_add = exists_on_add
        self.sent: list[tuple[str, int]] = []

    def meter_configs(self) -> list[Any]:
        flags = OFP.OFPMF_PKTPS | OFP.OFPMF_BURST
        return [PARSER.OFPMeterConfigStats(flags=flags, meter_id=m, bands=[
            PARSER.OFPMeterBandDrop(rate=rate, burst_size=burst)])
            for m, (rate, burst) in self.meters.items()]

    def send_checked(self, msg: Any) -> Any:
        command = {OFP.OFPMC_ADD: "add", OFP.OFPMC_MODIFY: "modify"}[msg.command]
        self.sent.append((command, msg.meter_id))
        if command == "add" and self.exists_on_add:
            return types.SimpleNamespace(type=OFP.OFPET_METER_MOD_FAILED,
                                         code=OFP.OFPMMFC_METER_EXISTS, data=b"")
        return None

    def error_fields(self, err: Any) -> dict[str, Any]:
        return {"bridge": self.bridge, **oferrors.describe(err, OFP)}


CFG = parse_host_config("bridges: {mesh: {}, socket: {}}\n")
RIGHT = {m: (r, r) for m, r in METER_RATES.items()}


@pytest.mark.parametrize("meters,exists_on_add,expected", [
    (RIGHT, False, []),  # the audit of a switch whose meters are right: nothing sent
    ({}, False, [("add", m) for m in METER_RATES]),
    ({**RIGHT, 2: (999, 999)}, False, [("modify", 2)]),
    ({m: v for m, v in RIGHT.items() if m != 2}, True, [("add", 2), ("modify", 2)]),  # raced
], ids=["right", "missing", "different", "raced"])
def test_meters_are_read_before_they_are_written(
        meters: dict[int, tuple[int, int]], exists_on_add: bool,
        expected: list[tuple[str, int]]) -> None:
    switch = MeterSwitch(meters, exists_on_add)
    Controller(CFG)._ensure_meters(switch)  # type: ignore[arg-type]
    assert switch.sent == expected
