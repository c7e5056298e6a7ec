"""controller.wirecheck: what a switch sends is length-checked before os-ken parses it.

Valid messages (socknet's own flows as flow-stats entries, ports with properties,
meters, packet-ins) pass and os-ken parses them; each length os-ken 4.2.2 would loop
on forever (zero, short, past the container, inconsistent) is refused with a reason.
The property test mutates valid messages at random: whatever the check lets through,
os-ken parses to the end (no message that passes can hang the parser).
"""

from __future__ import annotations

import signal
import struct
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from os_ken.ofproto import ofproto_parser, ofproto_v1_4, ofproto_v1_4_parser

from bench import fakeswitch
from controller import encode, wirecheck
from topology.config import load_host_config
from topology.flows import desired_state
from topology.policy import load_policy

OFP = ofproto_v1_4
PARSER = ofproto_v1_4_parser
DP = types.SimpleNamespace(ofproto=OFP, ofproto_parser=PARSER)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HEADER = struct.Struct("!BBHI")
FLOW_HEAD = struct.Struct("!HBxIIHHHHH2xQQQ")  # ofp_flow_stats before its match


def message(mtype: int, body: bytes, version: int = 0x05, xid: int = 7) -> bytes:
    return HEADER.pack(version, mtype, 8 + len(body), xid) + body


def multipart(mptype: int, body: bytes, flags: int = 0) -> bytes:
    return message(19, struct.pack("!HH4x", mptype, flags) + body)


def port(port_no: int, name: bytes, *, length: int | None = None, props: bytes | None = None
         ) -> bytes:
    if props is None:  # one OFPPDPT_ETHERNET property, as OVS sends
        props = struct.pack("!HH4xIIIIII", 0, 32, 0x2840, 0, 0, 0, 10_000_000, 0)
    size = 40 + len(props) if length is None else length
    return struct.pack("!IH2x6s2x16sII", port_no, size, b"\x02\x00\x00\x00\x00\x01",
                       name, 0, 4) + props


def socknet_flows() -> list[Any]:
    cfg = load_host_config(EXAMPLES / "host.yaml")
    policy = load_policy(EXAMPLES / "pmoves-tiers.yaml")
    ports = {"mesh": {"nm-privacy": 1, "to-socket": 2},
             "vmbr0": {"from-mesh": 1, "warp0": 2, "vmbr0gw": 3, "veth200i0": 4,
                       "veth201i0": 5, "veth202i0": 6, "veth100i0": 7}}
    state = desired_state(cfg, ports, policy)
    return sorted((f for flows in state.values() for f in flows), key=lambda f: f.cookie)


def flow_entry(flow: Any) -> bytes:
    tail = encode._pack_wire_tail(PARSER, flow)
    return FLOW_HEAD.pack(FLOW_HEAD.size + len(tail), flow.table, 1, 2, flow.priority,
                          0, 0, 0, 0, flow.cookie, 3, 4) + tail


def meter_config(meter_id: int, band_len: int = 16) -> bytes:
    band = struct.pack("!HHII4x", 1, band_len, 100, 100)
    return struct.pack("!HHI", 8 + len(band), 0x1 | 0x4, meter_id) + band


def meter_stats(meter_id: int, length: int = 56) -> bytes:
    return (struct.pack("!IH6xIQQII", meter_id, length, 1, 2, 3, 4, 5)
            + struct.pack("!QQ", 6, 7))


VALID: dict[str, bytes] = {
    "hello": fakeswitch.hello(),
    "port_desc": multipart(13, port(1, b"veth200i0") + port(0xFFFFFFFE, b"vmbr0")),
    "port_desc_no_props": multipart(13, port(1, b"p1", props=b"")),
    "flow_stats": multipart(1, b"".join(flow_entry(f) for f in socknet_flows()[:40])),
    "flow_stats_more": multipart(1, b"".join(flow_entry(f) for f in socknet_flows()[40:80]),
                                 flags=1),
    "meter_config": multipart(10, meter_config(1) + meter_config(2)),
    "meter_stats": multipart(9, meter_stats(1) + meter_stats(2)),
    "table_stats": multipart(3, bytes(24 * 3)),
    "packet_in": fakeswitch.packet_in(0x05, 9, 4, 30, 1, fakeswitch.arp_frame(
        b"\x02\xfb\x00\x00\x00\x01", b"\x0a\x00\x00\x05")),
    "port_status": message(12, struct.pack("!B7x", 0) + port(5, b"veth201i0")),
    "error": message(1, struct.pack("!HH", 12, 1) + bytes(64)),
    "barrier": message(21, b""),
    "echo": message(2, b"ping"),
    "features": message(6, struct.pack("!QIBB2xII", 0x1234, 0, 254, 0, 0x4F, 0)),
    "bundle_reply": message(33, struct.pack("!IHH", 5, 5, 3)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_messages_pass_and_os_ken_parses_them(name: str) -> None:
    data = VALID[name]
    assert wirecheck.problem(data) is None
    parsed = ofproto_parser.msg(DP, data[0], data[1], len(data), 7, bytearray(data))
    assert parsed is not None


def test_every_socknet_flow_read_back_passes() -> None:
    """Flow stats of every flow socknet installs (conjunctions, ct() with nested actions,
    learn, controller() with meter_id properties, set_field, meters) pass one by one."""
    flows = socknet_flows()
    assert len(flows) > 50
    for f in flows:
        assert wirecheck.problem(multipart(1, flow_entry(f))) is None, f


def _entry_with(length: int | None = None, match_len: int | None = None,
                tail: bytes | None = None) -> bytes:
    f = next(f for f in socknet_flows() if f.actions and f.match)
    real = encode._pack_wire_tail(PARSER, f)
    tail = real if tail is None else tail
    if match_len is not None:
        tail = struct.pack("!HH", 1, match_len) + tail[4:]
    size = FLOW_HEAD.size + len(tail) if length is None else length
    return FLOW_HEAD.pack(size, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0) + tail


def _apply(actions: bytes) -> bytes:
    """A flow whose match is empty and whose one instruction applies ``actions``."""
    inst = struct.pack("!HH4x", 4, 8 + len(actions)) + actions
    return struct.pack("!HH4x", 1, 4) + inst


NX_CT_HEAD = struct.Struct("!HHIH2xIHB3xH")  # nx_action_conntrack: 24 bytes


def _ct(nested: bytes) -> bytes:
    return NX_CT_HEAD.pack(0xFFFF, 24 + len(nested), 0x2320, 35, 0, 0, 0, 0) + nested


MALFORMED: dict[str, tuple[bytes, str]] = {
    # the findings of issue 11: zero-length entries os-ken loops on forever
    "port_desc_zero_length_port": (multipart(13, port(1, b"p1", length=0, props=b"")),
                                   "port entry of length 0"),
    "flow_stats_zero_length_entry": (multipart(1, _entry_with(length=0)),
                                     "entry of length 0"),
    "meter_stats_zero_length": (multipart(9, meter_stats(1, length=0)),
                                "entry of length 0"),
    "meter_config_zero_length_band": (multipart(10, meter_config(1, band_len=0)),
                                      "meter band of length 0"),
    # short and inconsistent lengths
    "port_desc_short_port": (multipart(13, port(1, b"p1", length=24, props=b"")),
                             "port entry of length 24"),
    "port_desc_port_past_end": (multipart(13, port(1, b"p1", length=200)),
                                "runs 128 bytes past"),
    "port_zero_length_property": (multipart(13, port(1, b"p1", props=struct.pack("!HH4x", 0, 0))),
                                  "property of length 0"),
    "flow_stats_entry_past_end": (multipart(1, _entry_with(length=4000)), "past the message"),
    "flow_stats_short_entry": (multipart(1, _entry_with(length=40)), "entry of length 40"),
    "flow_stats_match_past_entry": (multipart(1, _entry_with(match_len=3000)),
                                    "match of length 3000"),
    "flow_stats_zero_length_instruction": (multipart(1, _entry_with(
        tail=struct.pack("!HH4x", 1, 4) + struct.pack("!HH4x", 4, 0))), "of length 0"),
    "flow_stats_zero_length_action": (multipart(1, _entry_with(
        tail=_apply(struct.pack("!HH4x", 0xFFFF, 0)))), "of length 0"),
    "flow_stats_zero_length_action_in_ct": (multipart(1, _entry_with(
        tail=_apply(_ct(struct.pack("!HH4x", 0xFFFF, 0))))), "ct(): action type 65535 of "
                                                              "length 0"),
    "flow_stats_output_action_wrong_length": (multipart(1, _entry_with(
        tail=_apply(struct.pack("!HHIH6x", 0, 8, 1, 0) + bytes(8)))), "not 16"),
    "controller2_zero_length_property": (multipart(1, _entry_with(tail=_apply(
        struct.pack("!HHIH6x", 0xFFFF, 24, 0x2320, 37) + struct.pack("!HH4x", 3, 0)))),
        "controller() property of length 0"),
    "group_desc_zero_length_bucket": (multipart(7, struct.pack("!HBxI", 24, 0, 1)
                                                + struct.pack("!HHII4x", 0, 0, 0, 0)),
                                      "bucket: entry of length 0"),
    "packet_in_match_past_end": (message(10, struct.pack("!IHBBQ", 0xFFFFFFFF, 0, 0, 0, 0)
                                         + struct.pack("!HH", 1, 200) + bytes(6)),
                                 "match of length 200"),
    "hello_zero_length_element": (HEADER.pack(5, 0, 12, 1) + struct.pack("!HH", 1, 0),
                                  "element of length 0"),
    "header_longer_than_message": (HEADER.pack(5, 21, 64, 1), "header says 64 bytes"),
    "multipart_type_never_requested": (multipart(12, bytes(64)), "never requests"),
    "request_sent_by_a_switch": (message(29, struct.pack("!HHI", 0, 1, 1)
                                         + struct.pack("!HH", 1, 0) + bytes(12)),
                                 "METER_MOD: not a message a switch sends"),
    "other_version_after_negotiation": (message(19, struct.pack("!HH4x", 13, 0)
                                                + port(1, b"p1", length=0, props=b""),
                                                version=0x04),
                                        "of version 0x4"),
}


class _Alarm(BaseException):
    pass


@pytest.fixture
def parse_deadline() -> Iterator[list[bool]]:
    """os-ken's msg() swallows every exception (a bare ``except:``): the alarm sets a flag
    before it interrupts a parse that runs too long."""
    fired: list[bool] = []

    def on_alarm(_sig: int, _frame: Any) -> None:
        fired.append(True)
        raise _Alarm

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_flow_per_action_kind() -> dict[str, bytes]:
    seen: dict[str, bytes] = {}
    for f in socknet_flows():
        for a in f.actions:
            seen.setdefault(f"flow_{type(a).__name__}", multipart(1, flow_entry(f)))
    return seen


# small valid messages covering every structure the check walks
SEEDS = {**{k: v for k, v in VALID.items() if 8 < len(v) <= 400}, **_one_flow_per_action_kind()}
WORD_VALUES = (0, 1, 2, 3, 4, 7, 8, 12, 16, 24, 39, 40, 56, 0xFFF8, 0xFFFF)


def _checked(data: bytearray) -> str | None:
    """The check's verdict; the check itself must end at once whatever the bytes."""
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        return wirecheck.problem(bytes(data))
    except _Alarm:
        raise AssertionError(f"the check still running after 1 s: {bytes(data).hex()}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_lengths_are_refused_with_a_reason(parse_deadline: list[bool],
                                                     name: str) -> None:
    data, expected = MALFORMED[name]
    reason = _checked(bytearray(data))
    assert reason is not None and expected in reason, reason


def _parses_to_the_end(data: bytearray, fired: list[bool]) -> bool:
    fired.clear()
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        ofproto_parser.msg(DP, data[0], data[1], len(data), 7, data)
    except _Alarm:
        pass
    except Exception:
        pass  # os-ken raising (not looping) on odd content is fine: the message is dropped
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return not fired


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_no_single_word_edit_that_passes_the_check_hangs_os_ken(
        parse_deadline: list[bool], seed: str) -> None:
    """Every 16-bit word of the body (length fields included) set to each of a few
    telling values: whatever the check accepts, os-ken parses to the end."""
    original = SEEDS[seed]
    accepted = 0
    for pos in range(8, len(original) - 1, 2):
        for value in WORD_VALUES:
            data = bytearray(original)
            struct.pack_into("!H", data, pos, value)
            if _checked(data) is not None:
                continue
            accepted += 1
            assert _parses_to_the_end(data, parse_deadline), (
                f"{seed}: word at {pos} = {value}: os-ken still parsing after 1 s")
    assert accepted  # the edits did not all land in refused territory


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(sorted(SEEDS.items())),
       edits=st.lists(st.tuples(st.integers(min_value=0),
                                st.one_of(st.integers(0, 24), st.integers(0, 0xFFFF))),
                      min_size=1, max_size=4),
       cut=st.integers(min_value=0, max_value=64))
def test_whatever_passes_the_check_os_ken_parses_to_the_end(
        parse_deadline: list[bool], seed: tuple[str, bytes], edits: list[tuple[int, int]],
        cut: int) -> None:
    """Several words changed at once and the message cut short (header fixed up)."""
    data = bytearray(seed[1])
    for pos, value in edits:
        struct.pack_into("!H", data, 8 + pos % (len(data) - 9), value)
    del data[max(8, len(data) - cut):]
    struct.pack_into("!H", data, 2, len(data))
    if _checked(data) is None:
        assert _parses_to_the_end(data, parse_deadline), bytes(data).hex()


def test_the_hook_refuses_before_os_ken_parses() -> None:
    refused: list[tuple[int, str]] = []
    parsed: list[int] = []
    real = types.SimpleNamespace(header=ofproto_parser.header,
                                 msg=lambda *a: parsed.append(a[4]) or "parsed")
    hook = wirecheck.CheckedParser(real, lambda dp, xid, why: refused.append((xid, why)))
    dp = types.SimpleNamespace(state="main", ofproto=OFP)
    bad, _ = MALFORMED["port_desc_zero_length_port"]
    good = VALID["port_desc"]
    assert hook.msg(dp, 5, 19, len(good), 1, bytearray(good)) == "parsed"
    assert hook.msg(dp, 5, 19, len(bad), 2, bytearray(bad)) is None
    assert parsed == [1] and refused[0][0] == 2 and "port entry of length 0" in refused[0][1]
    # os-ken turns a header length below 8 into 8 before it calls msg(): still refused
    short = bytearray(HEADER.pack(5, 21, 4, 3))
    assert hook.msg(dp, 5, 21, 8, 3, short) is None
    assert "below the 8-byte header" in refused[-1][1]
    # once the connection is being closed nothing more is parsed
    dp.state = "dead"
    from os_ken.controller.handler import DEAD_DISPATCHER

    dp.state = DEAD_DISPATCHER
    assert hook.msg(dp, 5, 19, len(good), 4, bytearray(good)) is None and parsed == [1]
