"""OpenFlow error messages as an operator reads them: the decoded type and code names,
and the request that caused the error (decoded from the bytes the switch sends back).
"""

from __future__ import annotations

import struct
from types import ModuleType
from typing import Any

from controller.wirecheck import MESSAGE_NAMES

_FLOW_MOD, _METER_MOD, _BUNDLE_CONTROL, _BUNDLE_ADD = 14, 29, 33, 34
_FLOW_COMMANDS = {0: "add", 1: "modify", 2: "modify_strict", 3: "delete", 4: "delete_strict"}
_METER_COMMANDS = {0: "add", 1: "modify", 2: "delete"}
_BUNDLE_CONTROL_TYPES = {0: "open", 2: "close", 4: "commit", 6: "discard"}


def _name(text: str) -> str:
    """os-ken's "OFPET_BAD_ACTION(2)": the name alone (the number when it has none)."""
    name, _, number = text.partition("(")
    return name if name != "Unknown" else number.rstrip(")")


def error_names(ofproto: ModuleType, type_: int, code: int) -> tuple[str, str]:
    """("OFPET_METER_MOD_FAILED", "OFPMMFC_METER_EXISTS") for (12, 1)."""
    return (_name(ofproto.ofp_error_type_to_str(type_)),
            _name(ofproto.ofp_error_code_to_str(type_, code)))


def failed_request(data: bytes) -> str | None:
    """The request an error is about, from the (first bytes of the) request the switch
    echoes in the error's data."""
    if len(data) < 8:
        return None
    mtype = data[1]
    name = MESSAGE_NAMES.get(mtype, f"type {mtype}")
    if mtype == _FLOW_MOD and len(data) >= 32:
        cookie, table, command, priority = (struct.unpack_from("!Q", data, 8)[0], data[24],
                                            data[25], struct.unpack_from("!H", data, 30)[0])
        return (f"flow {_FLOW_COMMANDS.get(command, command)} table={table} "
                f"priority={priority} cookie={cookie:#x}")
    if mtype == _METER_MOD and len(data) >= 16:
        command, meter = struct.unpack_from("!H2xI", data, 8)
        return f"meter {_METER_COMMANDS.get(command, command)} meter_id={meter}"
    if mtype == _BUNDLE_ADD and len(data) > 16:
        inner = failed_request(data[16:])
        return f"bundle message: {inner}" if inner else name
    if mtype == _BUNDLE_CONTROL and len(data) >= 14:
        bundle_id, ctype = struct.unpack_from("!IH", data, 8)
        return f"bundle {_BUNDLE_CONTROL_TYPES.get(ctype, ctype)} bundle_id={bundle_id}"
    return name


def describe(err: Any, ofproto: ModuleType | None, cause: str | None = None
             ) -> dict[str, Any]:
    """Log fields for one OpenFlow error: type, code (names), and what caused it:
    ``cause`` when the sender knows (the flow of a bundle), else decoded from the
    error's data."""
    type_, code = getattr(err, "type", None), getattr(err, "code", None)
    if ofproto is not None and isinstance(type_, int) and isinstance(code, int):
        type_name, code_name = error_names(ofproto, type_, code)
    else:
        type_name, code_name = str(type_), str(code)
    fields: dict[str, Any] = {"type": type_name, "code": code_name}
    caused_by = cause or failed_request(bytes(getattr(err, "data", b"") or b""))
    if caused_by:
        fields["request"] = caused_by
    return fields


def text(fields: dict[str, Any]) -> str:
    out = f"OpenFlow error {fields['type']}/{fields['code']}"
    return f"{out} for {fields['request']}" if "request" in fields else out
