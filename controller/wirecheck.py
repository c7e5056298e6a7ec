"""Length checks of every OpenFlow message a switch sends, before os-ken parses it.

os-ken 4.2.2 walks the variable-length parts of a message (multipart entries, ports,
instructions, actions, bands, buckets, properties) by the length each part claims for
itself; a part that claims zero bytes makes the loop take the same part again, forever,
appending to a list each time (docs/security.md, "The OpenFlow channel"). A switch
connection is not trusted input until it has been checked: ``problem(buf)`` walks an
OpenFlow 1.4 message the way os-ken's parsers will, and names the first length that is
zero, short, past the end of its container or inconsistent with it. ``install`` puts the
check between os-ken's socket reader and its parser; a message with a problem is never
parsed, and its connection is closed.

Only what a switch sends its controller in OpenFlow 1.4 is accepted; message types a
switch has no business sending (requests, mods, REQUESTFORWARD with an embedded request,
experimenter messages) and multipart types socknet never asks for are refused as such.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

OFP14 = 0x05
# versions os-ken has parsers for; a HELLO may carry any of them (negotiation)
HELLO_VERSIONS = frozenset({0x01, 0x03, 0x04, 0x05, 0x06})
HEADER_SIZE = 8
_MAX_NESTING = 4  # actions inside ct() inside ... : OVS itself nests far less

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

# message types (OpenFlow 1.4)
HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY, EXPERIMENTER = 0, 1, 2, 3, 4
FEATURES_REPLY, GET_CONFIG_REPLY, PACKET_IN, FLOW_REMOVED, PORT_STATUS = 6, 8, 10, 11, 12
MULTIPART_REPLY, BARRIER_REPLY, ROLE_REPLY, GET_ASYNC_REPLY = 19, 21, 25, 27
ROLE_STATUS, TABLE_STATUS, BUNDLE_CONTROL = 30, 31, 33

MESSAGE_NAMES = {
    0: "HELLO", 1: "ERROR", 2: "ECHO_REQUEST", 3: "ECHO_REPLY", 4: "EXPERIMENTER",
    5: "FEATURES_REQUEST", 6: "FEATURES_REPLY", 7: "GET_CONFIG_REQUEST",
    8: "GET_CONFIG_REPLY", 9: "SET_CONFIG", 10: "PACKET_IN", 11: "FLOW_REMOVED",
    12: "PORT_STATUS", 13: "PACKET_OUT", 14: "FLOW_MOD", 15: "GROUP_MOD", 16: "PORT_MOD",
    17: "TABLE_MOD", 18: "MULTIPART_REQUEST", 19: "MULTIPART_REPLY", 20: "BARRIER_REQUEST",
    21: "BARRIER_REPLY", 24: "ROLE_REQUEST", 25: "ROLE_REPLY", 26: "GET_ASYNC_REQUEST",
    27: "GET_ASYNC_REPLY", 28: "SET_ASYNC", 29: "METER_MOD", 30: "ROLE_STATUS",
    31: "TABLE_STATUS", 32: "REQUESTFORWARD", 33: "BUNDLE_CONTROL", 34: "BUNDLE_ADD_MESSAGE",
}
MULTIPART_NAMES = {
    0: "DESC", 1: "FLOW", 2: "AGGREGATE", 3: "TABLE", 4: "PORT_STATS", 5: "QUEUE_STATS",
    6: "GROUP", 7: "GROUP_DESC", 8: "GROUP_FEATURES", 9: "METER", 10: "METER_CONFIG",
    11: "METER_FEATURES", 12: "TABLE_FEATURES", 13: "PORT_DESC", 14: "TABLE_DESC",
    15: "QUEUE_DESC", 16: "FLOW_MONITOR", 0xFFFF: "EXPERIMENTER",
}

# action type -> its only valid length (os-ken steps over these by its own size)
_FIXED_ACTIONS = {0: 16, 11: 8, 12: 8, 15: 8, 16: 8, 17: 8, 18: 8, 19: 8, 20: 8, 21: 8,
                  22: 8, 23: 8, 24: 8, 26: 8, 27: 8}
_SET_FIELD, _EXPERIMENTER = 25, 0xFFFF
_NX_VENDOR = 0x00002320
_NXAST_CT, _NXAST_CONTROLLER2 = 35, 37
_NX_CT_SIZE = 24  # nx_action_conntrack before its nested actions
_NXAC2PT_USERDATA = 3
# instruction type -> its only valid length; 3-5 carry actions
_FIXED_INSTRUCTIONS = {1: 8, 2: 24, 6: 8}
_ACTION_INSTRUCTIONS = frozenset({3, 4, 5})
_OFPMT_OXM = 1
_OXM_EXPERIMENTER_CLASS = 0xFFFF


class Malformed(ValueError):
    """One length in a switch's message that os-ken must not be trusted with."""


def _need(ok: bool, reason: str) -> None:
    if not ok:
        raise Malformed(reason)


def _u16(buf: bytes, off: int) -> int:
    return int(_U16.unpack_from(buf, off)[0])


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


# ----------------------------------------------------------------- building blocks

def _properties(buf: bytes, off: int, end: int, what: str) -> None:
    """ofp_prop_header lists (os-ken: OFPPropBase.parse, each padded to 8)."""
    while off < end:
        _need(end - off >= 4, f"{what}: {end - off}-byte property header")
        length = _u16(buf, off + 2)
        _need(length >= 4, f"{what}: property of length {length}")
        _need(off + length <= end, f"{what}: property of length {length} runs "
                                   f"{off + length - end} bytes past its container")
        off += _round8(length)


def _match(buf: bytes, off: int, end: int, what: str) -> int:
    """An OXM ofp_match at ``off``; returns its padded size."""
    _need(end - off >= 4, f"{what}: no room for a match ({end - off} bytes)")
    mtype, length = struct.unpack_from("!HH", buf, off)
    _need(mtype == _OFPMT_OXM, f"{what}: match type {mtype} is not OXM")
    _need(length >= 4, f"{what}: match of length {length}")
    _need(off + _round8(length) <= end, f"{what}: match of length {length} runs past "
                                        f"its container ({end - off} bytes)")
    pos, stop = off + 4, off + length
    while pos < stop:
        _need(stop - pos >= 4, f"{what}: {stop - pos}-byte OXM header")
        (header,) = _U32.unpack_from(buf, pos)
        size = header & 0xFF
        if header >> 16 == _OXM_EXPERIMENTER_CLASS:
            _need(size >= 4, f"{what}: experimenter OXM field of length {size}")
        _need(pos + 4 + size <= stop, f"{what}: OXM field of length {size} runs past "
                                      "the match")
        pos += 4 + size
    return _round8(length)


def _controller2_props(buf: bytes, off: int, end: int, what: str) -> None:
    """NXAST_CONTROLLER2 properties as os-ken's own loop steps over them."""
    while off < end:
        _need(end - off >= 4, f"{what}: {end - off}-byte controller() property header")
        ptype, length = struct.unpack_from("!HH", buf, off)
        _need(length >= 4, f"{what}: controller() property of length {length}")
        size = 4
        if ptype == _NXAC2PT_USERDATA:
            user = _round4(length - 4)
            size = user + 4 if user > 4 and user % 8 == 0 else user
        _need(off + 4 + size <= end, f"{what}: controller() property of length {length} "
                                     "runs past its action")
        off += 4 + size


def _actions(buf: bytes, off: int, end: int, what: str, depth: int = 0) -> None:
    _need(depth <= _MAX_NESTING, f"{what}: actions nested more than {_MAX_NESTING} deep")
    while off < end:
        _need(end - off >= 8, f"{what}: {end - off}-byte action header")
        atype, length = struct.unpack_from("!HH", buf, off)
        _need(length >= 8 and length % 8 == 0,
              f"{what}: action type {atype} of length {length} (a multiple of 8, >= 8)")
        _need(off + length <= end, f"{what}: action of length {length} runs "
                                   f"{off + length - end} bytes past its instruction")
        fixed = _FIXED_ACTIONS.get(atype)
        if fixed is not None:
            _need(length == fixed, f"{what}: action type {atype} of length {length}, "
                                   f"not {fixed}")
        elif atype == _SET_FIELD:
            (header,) = _U32.unpack_from(buf, off + 4)
            _need(8 + (header & 0xFF) <= length,
                  f"{what}: set_field value runs past its action of length {length}")
        elif atype == _EXPERIMENTER:
            _experimenter_action(buf, off, length, what, depth)
        else:
            raise Malformed(f"{what}: unknown action type {atype}")
        off += length


def _experimenter_action(buf: bytes, off: int, length: int, what: str, depth: int) -> None:
    (vendor,) = _U32.unpack_from(buf, off + 4)
    if vendor != _NX_VENDOR:
        return  # os-ken keeps another vendor's action as opaque bytes
    _need(length >= 16, f"{what}: Nicira action of length {length}")
    subtype = _u16(buf, off + 8)
    if subtype == _NXAST_CT:
        _need(length >= _NX_CT_SIZE, f"{what}: ct() action of length {length}")
        _actions(buf, off + _NX_CT_SIZE, off + length, f"{what}: ct()", depth + 1)
    elif subtype == _NXAST_CONTROLLER2:
        _controller2_props(buf, off + 16, off + length, what)


def _instructions(buf: bytes, off: int, end: int, what: str) -> None:
    while off < end:
        _need(end - off >= 8, f"{what}: {end - off}-byte instruction header")
        itype, length = struct.unpack_from("!HH", buf, off)
        _need(length >= 8 and length % 8 == 0,
              f"{what}: instruction type {itype} of length {length} (a multiple of 8, >= 8)")
        _need(off + length <= end, f"{what}: instruction of length {length} runs "
                                   f"{off + length - end} bytes past its flow")
        fixed = _FIXED_INSTRUCTIONS.get(itype)
        if fixed is not None:
            _need(length == fixed, f"{what}: instruction type {itype} of length {length}, "
                                   f"not {fixed}")
        elif itype in _ACTION_INSTRUCTIONS:
            _actions(buf, off + 8, off + length, what)
        else:
            raise Malformed(f"{what}: unknown instruction type {itype}")
        off += length


def _port(buf: bytes, off: int, end: int, what: str) -> int:
    """An ofp_port (OpenFlow 1.4: 40 bytes and properties); returns its length."""
    _need(end - off >= 40, f"{what}: {end - off} bytes left for a 40-byte port")
    length = _u16(buf, off + 4)
    _need(length >= 40, f"{what}: port entry of length {length} (at least 40)")
    _need(off + length <= end, f"{what}: port entry of length {length} runs "
                               f"{off + length - end} bytes past the message")
    _properties(buf, off + 40, off + length, f"{what}: port")
    return length


def _entries(buf: bytes, off: int, end: int, what: str, minimum: int, len_at: int,
             body: Callable[[int, int], None] | None = None) -> None:
    """Entries that each say their own length (a u16 at ``len_at``), at least ``minimum``;
    ``body(start, end)`` checks what follows an entry's fixed part."""
    while off < end:
        _need(end - off >= minimum, f"{what}: {end - off} bytes left for an entry of "
                                    f"at least {minimum}")
        length = _u16(buf, off + len_at)
        _need(length >= minimum, f"{what}: entry of length {length} (at least {minimum})")
        _need(off + length <= end, f"{what}: entry of length {length} runs "
                                   f"{off + length - end} bytes past the message")
        if body is not None:
            body(off, off + length)
        off += length


def _fixed_entries(end: int, off: int, size: int, what: str, single: bool = False) -> None:
    body = end - off
    if single:
        _need(body == size, f"{what}: body of {body} bytes, not {size}")
    else:
        _need(body % size == 0, f"{what}: body of {body} bytes is not a whole number of "
                                f"{size}-byte entries")


# ----------------------------------------------------------------- multipart bodies

def _flow_stats(buf: bytes, end: int, off: int, what: str) -> None:
    def entry(start: int, stop: int) -> None:
        match = _match(buf, start + 48, stop, what)
        _instructions(buf, start + 48 + match, stop, what)

    _entries(buf, off, end, what, 56, 0, entry)


def _group_desc(buf: bytes, end: int, off: int, what: str) -> None:
    def buckets(start: int, stop: int) -> None:
        _entries(buf, start + 8, stop, f"{what}: bucket", 16, 0,
                 lambda b, e: _actions(buf, b + 16, e, what))

    _entries(buf, off, end, what, 8, 0, buckets)


def _group_stats(buf: bytes, end: int, off: int, what: str) -> None:
    def counters(start: int, stop: int) -> None:
        _need((stop - start - 40) % 16 == 0,
              f"{what}: group entry of length {stop - start} is not 40 + 16 per bucket")

    _entries(buf, off, end, what, 40, 0, counters)


def _meter_stats(buf: bytes, end: int, off: int, what: str) -> None:
    def bands(start: int, stop: int) -> None:
        _need((stop - start - 40) % 16 == 0,
              f"{what}: meter entry of length {stop - start} is not 40 + 16 per band")

    _entries(buf, off, end, what, 40, 4, bands)


def _meter_config(buf: bytes, end: int, off: int, what: str) -> None:
    def bands(start: int, stop: int) -> None:
        pos = start + 8
        while pos < stop:
            _need(stop - pos >= 16, f"{what}: {stop - pos} bytes left for a 16-byte band")
            length = _u16(buf, pos + 2)
            _need(length == 16, f"{what}: meter band of length {length}, not 16")
            pos += 16

    _entries(buf, off, end, what, 8, 0, bands)


def _with_props(fixed: int, len_at: int) -> Callable[[bytes, int, int, str], None]:
    def check(buf: bytes, end: int, off: int, what: str) -> None:
        _entries(buf, off, end, what, fixed, len_at,
                 lambda s, e: _properties(buf, s + fixed, e, what))

    return check


def _ports(buf: bytes, end: int, off: int, what: str) -> None:
    while off < end:
        off += _port(buf, off, end, what)


_MULTIPART: dict[int, Callable[[bytes, int, int, str], None]] = {
    0: lambda buf, end, off, what: _fixed_entries(end, off, 1056, what, single=True),
    1: _flow_stats,
    2: lambda buf, end, off, what: _fixed_entries(end, off, 24, what, single=True),
    3: lambda buf, end, off, what: _fixed_entries(end, off, 24, what),
    4: _with_props(80, 0),
    5: _with_props(48, 0),
    6: _group_stats,
    7: _group_desc,
    8: lambda buf, end, off, what: _fixed_entries(end, off, 40, what, single=True),
    9: _meter_stats,
    10: _meter_config,
    11: lambda buf, end, off, what: _fixed_entries(end, off, 16, what, single=True),
    13: _ports,
    14: _with_props(8, 0),
    15: _with_props(16, 8),
}


def _multipart_reply(buf: bytes, end: int) -> None:
    _need(end >= 16, f"MULTIPART_REPLY of {end} bytes (at least 16)")
    mptype = _u16(buf, 8)
    name = MULTIPART_NAMES.get(mptype, str(mptype))
    check = _MULTIPART.get(mptype)
    if check is None:
        raise Malformed(f"MULTIPART_REPLY {name}: a type socknet never requests")
    check(buf, end, 16, f"MULTIPART_REPLY {name}")


# ----------------------------------------------------------------- messages

def _hello(buf: bytes, end: int) -> None:
    off = HEADER_SIZE
    while off < end:  # os-ken steps by each element's length, padding not skipped
        _need(end - off >= 4, f"HELLO: {end - off}-byte element header")
        length = _u16(buf, off + 2)
        _need(length >= 4, f"HELLO: element of length {length}")
        _need(off + length <= end, f"HELLO: element of length {length} runs past the "
                                   "message")
        off += length


def _at_least(size: int) -> Callable[[bytes, int], None]:
    def check(buf: bytes, end: int) -> None:
        _need(end >= size, f"{end} bytes (at least {size})")

    return check


def _error(buf: bytes, end: int) -> None:
    _need(end >= 12, f"{end} bytes (at least 12)")
    if _u16(buf, 8) == 0xFFFF:
        _need(end >= 16, f"experimenter error of {end} bytes (at least 16)")


def _packet_in(buf: bytes, end: int) -> None:
    _need(end >= 32, f"{end} bytes (at least 32)")
    size = _match(buf, 24, end, "PACKET_IN")
    _need(24 + size + 2 <= end, "PACKET_IN: no room for the padding after the match")


def _flow_removed(buf: bytes, end: int) -> None:
    _need(end >= 56, f"{end} bytes (at least 56)")
    _match(buf, 48, end, "FLOW_REMOVED")


def _port_status(buf: bytes, end: int) -> None:
    _need(end >= 56, f"{end} bytes (at least 56)")
    length = _port(buf, 16, end, "PORT_STATUS")
    _need(16 + length == end, f"PORT_STATUS: port of length {length} in a message of {end}")


def _props_after(fixed: int) -> Callable[[bytes, int], None]:
    def check(buf: bytes, end: int) -> None:
        _need(end >= fixed, f"{end} bytes (at least {fixed})")
        _properties(buf, fixed, end, "properties")

    return check


def _table_status(buf: bytes, end: int) -> None:
    _need(end >= 24, f"{end} bytes (at least 24)")
    length = _u16(buf, 16)
    _need(length >= 8 and 16 + length <= end, f"TABLE_STATUS: table entry of length {length}")
    _properties(buf, 24, 16 + length, "TABLE_STATUS")


_ACCEPTED: dict[int, Callable[[bytes, int], None]] = {
    ERROR: _error,
    ECHO_REQUEST: _at_least(8),
    ECHO_REPLY: _at_least(8),
    FEATURES_REPLY: _at_least(32),
    GET_CONFIG_REPLY: _at_least(12),
    PACKET_IN: _packet_in,
    FLOW_REMOVED: _flow_removed,
    PORT_STATUS: _port_status,
    MULTIPART_REPLY: _multipart_reply,
    BARRIER_REPLY: _at_least(8),
    ROLE_REPLY: _at_least(24),
    GET_ASYNC_REPLY: _props_after(8),
    ROLE_STATUS: _props_after(24),
    TABLE_STATUS: _table_status,
    BUNDLE_CONTROL: _props_after(16),
}


def problem(buf: bytes | bytearray, version: int = OFP14) -> str | None:
    """Why os-ken must not parse ``buf`` (one message, framed by its header), or None.

    ``version``: the OpenFlow version negotiated for the connection; every message but
    HELLO must carry it (os-ken would pick the parser of whatever version a message
    claims)."""
    data = bytes(buf)
    if len(data) < HEADER_SIZE:
        return f"{len(data)}-byte message (the header alone is 8)"
    msg_version, mtype, length = data[0], data[1], _u16(data, 2)
    name = MESSAGE_NAMES.get(mtype, f"type {mtype}")
    if length != len(data) or length < HEADER_SIZE:
        return f"{name}: header says {length} bytes, the message has {len(data)}"
    try:
        if mtype == HELLO:
            _need(msg_version in HELLO_VERSIONS, f"HELLO of unknown version {msg_version:#x}")
            _hello(data, length)
            return None
        _need(msg_version == version, f"{name} of version {msg_version:#x} on a connection "
                                      f"that negotiated {version:#x}")
        check = _ACCEPTED.get(mtype)
        if check is None:
            return f"{name}: not a message a switch sends its controller"
        check(data, length)
    except Malformed as exc:
        reason = str(exc)
        return reason if reason.startswith(name) else f"{name}: {reason}"
    except struct.error as exc:  # a walk above read past the end: a length lied
        return f"{name}: truncated ({exc})"
    return None


# ----------------------------------------------------------------- the os-ken hook

class CheckedParser:
    """Stands in for the ``ofproto_parser`` module in os_ken.controller.controller: the
    framing (``header``) is os-ken's own; ``msg`` refuses what ``problem`` finds."""

    def __init__(self, parser: Any, on_refused: Callable[[Any, int, str], None]) -> None:
        self._parser = parser
        self._on_refused = on_refused
        self.header = parser.header

    def msg(self, datapath: Any, version: int, msg_type: int, msg_len: int, xid: int,
            buf: bytearray) -> Any:
        from os_ken.controller.handler import DEAD_DISPATCHER

        if datapath.state == DEAD_DISPATCHER:
            return None  # refused already: the rest of what was read is not looked at
        # os-ken replaces a header length below 8 by 8 before it gets here: compare the
        # header itself with the bytes framed
        framed = bytes(buf) if len(buf) == msg_len else bytes(buf[:msg_len])
        if len(framed) >= 4 and _u16(framed, 2) != msg_len:
            reason = (f"{MESSAGE_NAMES.get(msg_type, msg_type)}: header length "
                      f"{_u16(framed, 2)} is below the 8-byte header")
        else:
            reason = problem(framed)  # socknet's app speaks OpenFlow 1.4 only
        if reason is not None:
            self._on_refused(datapath, xid, reason)
            return None
        return self._parser.msg(datapath, version, msg_type, msg_len, xid, buf)


def install(on_refused: Callable[[Any, int, str], None]) -> None:
    """Check every message from every switch before os-ken parses it; ``on_refused(
    datapath, xid, reason)`` is called for a refused one, which is then dropped with its
    connection. Called once by ``socknet run`` before os-ken starts."""
    from os_ken.controller import controller as osken_controller
    from os_ken.ofproto import ofproto_parser

    current = osken_controller.ofproto_parser
    if isinstance(current, CheckedParser):
        current._on_refused = on_refused
        return
    osken_controller.ofproto_parser = CheckedParser(ofproto_parser, on_refused)


def refuse(datapath: Any) -> None:
    """Close a switch connection from os-ken's reader thread (or any other): no more
    messages are parsed (DEAD state) and the socket is shut both ways, so the reader's
    blocking recv() returns at once."""
    import socket as _socket

    try:
        datapath.close()
    finally:
        try:
            datapath.socket.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
