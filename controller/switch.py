"""One connected switch: request/reply over OpenFlow, from a worker thread.

os-ken delivers replies on its event loop; the reconciler runs on its own
thread and blocks here until the reply (or an error) for its xid arrives.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from controller import encode, oferrors
from controller.logs import get_logger
from controller.reconcile import Plan
from topology.model import Flow
from topology.render import flow_text

log = get_logger("socknet.switch")
REPLY_TIMEOUT_S = 10.0
_bundle_ids = itertools.count(1)


class SwitchError(RuntimeError):
    """A request failed; ``details`` are log fields (the decoded OpenFlow error and the
    request or flow that caused it) when the switch answered with an error."""

    def __init__(self, text: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(text)
        self.details = details or {}


@dataclass
class _Pending:
    multi: bool
    final_xid: int | None = None  # for a bundle: only the commit's reply ends the wait
    replies: list[Any] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class InstalledFlow:
    cookie: int
    table: int
    priority: int
    packets: int
    bytes: int
    flow_stats: Any  # the os-ken OFPFlowStats entry, for callers that need match/instructions


class SwitchSession:
    """Talks to one datapath. Thread-safe: one request sequence at a time."""

    def __init__(self, datapath: Any, bridge: str) -> None:
        self.dp = datapath
        self.bridge = bridge
        self.installed: set[int] | None = None  # cookies we know are on the switch
        self.closed = False
        self.flow_mods_sent = 0
        self.bundles_sent = 0
        self.last_bundle: dict[str, float] = {}  # timings of the last bundle (ms)
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._seq_lock = threading.Lock()

    # ---------------------------------------------------------- event side
    def on_reply(self, msg: Any) -> None:
        with self._pending_lock:
            pending = self._pending.get(msg.xid)
        if pending is None:
            return
        pending.replies.append(msg)
        if pending.final_xid is not None:
            if msg.xid == pending.final_xid:
                pending.done.set()
            return
        more = getattr(msg, "flags", 0) & self.dp.ofproto.OFPMPF_REPLY_MORE
        if not (pending.multi and more):
            pending.done.set()

    def on_error(self, msg: Any) -> bool:
        """An OpenFlow error from the switch; True if a request was waiting for it (the
        requester reports it), False if nobody was (the caller logs it)."""
        with self._pending_lock:
            pending = self._pending.get(msg.xid)
        if pending is None:
            return False
        pending.errors.append(msg)
        pending.done.set()
        return True

    def error_fields(self, err: Any, cause: str | None = None) -> dict[str, Any]:
        """Log fields of an OpenFlow error on this switch: bridge, type and code names,
        and the request (or flow) that caused it."""
        return {"bridge": self.bridge,
                **oferrors.describe(err, getattr(self.dp, "ofproto", None), cause)}

    def _failure(self, what: str, err: Any, cause: str | None = None) -> SwitchError:
        if isinstance(err, _Disconnected):
            return SwitchError(f"{self.bridge}: {what}: disconnected (the connection closed)")
        fields = self.error_fields(err, cause)
        return SwitchError(f"{self.bridge}: {what}: {oferrors.text(fields)}", fields)

    # ---------------------------------------------------------- worker side
    def _register(self, msg: Any, pending: _Pending) -> None:
        if msg.xid is None:
            self.dp.set_xid(msg)
        with self._pending_lock:
            self._pending[msg.xid] = pending

    def close(self) -> None:
        """The connection is gone: every request still waiting fails now, not after its
        timeout, and later ones fail at once."""
        self.closed = True
        with self._pending_lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.errors.append(_Disconnected())
            pending.done.set()

    def _send_msg(self, msg: Any) -> None:
        if self.closed or self.dp.send_msg(msg) is False:
            raise SwitchError(f"{self.bridge}: connection closed")

    def _send_raw(self, data: bytes) -> None:
        if self.closed or self.dp.send(data) is False:
            raise SwitchError(f"{self.bridge}: connection closed")

    def _unregister(self, *msgs: Any) -> None:
        with self._pending_lock:
            for m in msgs:
                self._pending.pop(m.xid, None)

    def _request(self, msg: Any, multi: bool = False) -> list[Any]:
        pending = _Pending(multi=multi)
        self._register(msg, pending)
        try:
            self._send_msg(msg)
            if not pending.done.wait(REPLY_TIMEOUT_S):
                raise SwitchError(f"{self.bridge}: no reply to {type(msg).__name__}")
            if pending.errors:
                raise self._failure(type(msg).__name__, pending.errors[0])
            return pending.replies
        finally:
            self._unregister(msg)

    def probe(self, timeout_s: float) -> bool:
        """Does the switch on this connection still answer (an echo request)? Runs beside
        the worker's requests: it takes no sequence lock and an xid of its own."""
        parser = self.dp.ofproto_parser
        echo = parser.OFPEchoRequest(self.dp, data=b"socknet probe")
        pending = _Pending(multi=False)
        with self._pending_lock:
            xid = secrets.randbits(32)
            while xid in self._pending:
                xid = secrets.randbits(32)
            echo.xid = xid
            self._pending[xid] = pending
        try:
            self._send_msg(echo)
            return pending.done.wait(timeout_s) and not pending.errors
        except SwitchError:
            return False
        finally:
            self._unregister(echo)

    def meter_configs(self) -> list[Any]:
        """The switch's meters (OFPMeterConfigStats entries)."""
        ofp, parser = self.dp.ofproto, self.dp.ofproto_parser
        req = parser.OFPMeterConfigStatsRequest(self.dp, 0, ofp.OFPM_ALL)
        with self._seq_lock:
            replies = self._request(req, multi=True)
        return [m for reply in replies for m in reply.body]

    def flows(
        self, table: int | None = None, cookie: int = 0, cookie_mask: int = 0
    ) -> list[InstalledFlow]:
        ofp, parser = self.dp.ofproto, self.dp.ofproto_parser
        req = parser.OFPFlowStatsRequest(
            self.dp, 0, ofp.OFPTT_ALL if table is None else table, ofp.OFPP_ANY, ofp.OFPG_ANY,
            cookie, cookie_mask, parser.OFPMatch(),
        )
        with self._seq_lock:
            replies = self._request(req, multi=True)
        return [
            InstalledFlow(s.cookie, s.table_id, s.priority, s.packet_count, s.byte_count, s)
            for reply in replies
            for s in reply.body
        ]

    def apply(self, plan: Plan) -> int:
        """Send the plan as one atomic bundle; returns the number of flow-mods sent."""
        if plan.empty:
            return 0
        items: list[Any] = [*plan.purge_cookies, *plan.add, *plan.delete_cookies]
        self.send_raw_bundle(items)
        self.flow_mods_sent += len(items)
        return len(items)

    def send_raw_bundle(self, items: list[Any]) -> None:
        """One atomic bundle of flow ADDs (Flow) and deletes by cookie (int), packed by
        encode.raw_bundle_chunks: open, the adds, commit. The adds go out in chunks as
        they are packed, so the switch checks the first ones (on its own core) while
        the rest are being packed; nothing takes effect before the commit. A chunk that
        cannot be packed discards the bundle."""
        dp, ofp, parser = self.dp, self.dp.ofproto, self.dp.ofproto_parser
        bundle_id = next(_bundle_ids)
        flags = encode.bundle_flags(ofp)
        open_msg = parser.OFPBundleCtrlMsg(dp, bundle_id, ofp.OFPBCT_OPEN_REQUEST, flags, [])
        commit = parser.OFPBundleCtrlMsg(dp, bundle_id, ofp.OFPBCT_COMMIT_REQUEST, flags, [])
        pending = _Pending(multi=False)
        t0 = time.perf_counter()
        with self._seq_lock:
            self._register(open_msg, pending)
            first = (dp.xid + 1) & ofp.MAX_XID
            dp.xid = (dp.xid + len(items)) & ofp.MAX_XID  # xids of the packed adds
            self._register(commit, pending)
            pending.final_xid = commit.xid
            xids = [(first + k) & ofp.MAX_XID for k in range(len(items))]
            with self._pending_lock:
                for xid in xids:
                    self._pending[xid] = pending
            try:
                self._send_msg(open_msg)
                try:
                    for chunk in encode.raw_bundle_chunks(dp, bundle_id, items, first):
                        self._send_raw(chunk)
                except Exception:
                    dp.send_msg(parser.OFPBundleCtrlMsg(
                        dp, bundle_id, ofp.OFPBCT_DISCARD_REQUEST, flags, []))
                    raise
                self._send_msg(commit)
                t_sent = time.perf_counter()
                if not pending.done.wait(max(REPLY_TIMEOUT_S, len(items) / 20000)):
                    raise SwitchError(f"{self.bridge}: bundle commit not answered")
                if pending.errors:
                    err = pending.errors[0]
                    raise self._failure("bundle refused", err,
                                        _bundle_item(items, first, err, ofp.MAX_XID))
                t_done = time.perf_counter()
                self.last_bundle = {"messages": len(items),
                                    "pack_send_ms": round((t_sent - t0) * 1000, 2),
                                    "commit_wait_ms": round((t_done - t_sent) * 1000, 2)}
                log.debug("bundle_committed", bridge=self.bridge, **self.last_bundle)
            finally:
                self._unregister(open_msg, commit)
                with self._pending_lock:
                    for xid in xids:
                        self._pending.pop(xid, None)
        self.bundles_sent += 1

    def send_bundle(self, mods: list[Any]) -> None:
        msgs = encode.bundle_messages(self.dp, mods, next(_bundle_ids))
        pending = _Pending(multi=False)
        with self._seq_lock:
            for m in msgs:
                self._register(m, pending)
            pending.final_xid = msgs[-1].xid
            try:
                for m in msgs:
                    self._send_msg(m)
                if not pending.done.wait(REPLY_TIMEOUT_S):
                    raise SwitchError(f"{self.bridge}: bundle commit not answered")
                if pending.errors:
                    raise self._failure("bundle refused", pending.errors[0])
            finally:
                self._unregister(*msgs)
        self.bundles_sent += 1

    def send_checked(self, msg: Any) -> Any | None:
        """Send one message, then a barrier; return the OpenFlow error it caused, if any."""
        parser = self.dp.ofproto_parser
        pending = _Pending(multi=False)
        barrier = parser.OFPBarrierRequest(self.dp)
        with self._seq_lock:
            self._register(msg, pending)
            self._register(barrier, pending)
            pending.final_xid = barrier.xid
            try:
                self._send_msg(msg)
                self._send_msg(barrier)
                if not pending.done.wait(REPLY_TIMEOUT_S):
                    raise SwitchError(f"{self.bridge}: no barrier reply")
            finally:
                self._unregister(msg, barrier)
        return pending.errors[0] if pending.errors else None

    def send(self, msgs: list[Any]) -> None:
        """Fire-and-forget messages, followed by a barrier so errors surface here."""
        parser = self.dp.ofproto_parser
        with self._seq_lock:
            for m in msgs:
                self._send_msg(m)
            self._request(parser.OFPBarrierRequest(self.dp))
        self.flow_mods_sent += len(msgs)


class _Disconnected:
    """Stands in for an OpenFlow error when the connection went away mid-request."""

    type = code = "disconnected"


def _bundle_item(items: list[Any], first: int, err: Any, max_xid: int) -> str | None:
    """The flow (or delete) of a bundle an error is about: the adds were sent with the
    xids first, first+1, ..."""
    xid = getattr(err, "xid", None)
    if not isinstance(xid, int):
        return None
    k = (xid - first) & max_xid
    if k >= len(items):
        return None
    item = items[k]
    if isinstance(item, Flow):
        return "flow " + flow_text(item).strip()
    return f"delete of cookie {item:#x}" if isinstance(item, int) else None
