"""SwitchSession's bundles without a switch: the adds are streamed in chunks between
the open and the commit, byte for byte what `encode.raw_bundle_adds` packs, and a flow
that cannot be packed discards the bundle instead of committing part of it."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from os_ken.ofproto import ofproto_v1_4, ofproto_v1_4_parser

from bench.flowgen import synthetic_flows
from controller import encode
from controller.reconcile import Plan
from controller.switch import SwitchSession
from topology.model import Conjunction, Output, flow

OFP = ofproto_v1_4


class FakeDatapath:
    """Records what is sent; answers a bundle commit at once (or errors a message)."""

    ofproto = ofproto_v1_4
    ofproto_parser = ofproto_v1_4_parser

    def __init__(self) -> None:
        self.id = 1
        self.xid = 100
        self.msgs: list[Any] = []  # os-ken messages, and raw bytes, in order
        self.session: SwitchSession | None = None

    def set_xid(self, msg: Any) -> None:
        self.xid += 1
        msg.set_xid(self.xid)

    def send_msg(self, msg: Any) -> bool:
        if msg.xid is None:
            self.set_xid(msg)
        self.msgs.append(msg)
        if getattr(msg, "type", None) == OFP.OFPBCT_COMMIT_REQUEST and self.session:
            self.session.on_reply(msg)  # a commit reply carries the request's xid
        return True

    def send(self, data: bytes) -> bool:
        self.msgs.append(bytes(data))
        return True

    def raw(self) -> bytes:
        return b"".join(m for m in self.msgs if isinstance(m, bytes))

    def controls(self) -> list[int]:
        return [m.type for m in self.msgs if not isinstance(m, bytes)]


def _session() -> tuple[SwitchSession, FakeDatapath]:
    dp = FakeDatapath()
    session = SwitchSession(dp, "br-test")
    dp.session = session
    return session, dp


def test_a_bundle_is_streamed_in_chunks_between_open_and_commit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "CHUNK_MESSAGES", 1000)
    session, dp = _session()
    flows = synthetic_flows(2500, seed=7)
    todo = Plan(add=tuple(flows), delete_cookies=(0x5C03000000000001,),
                purge_cookies=(0x5C03000000000002,))
    first = dp.xid + 2  # after the open message's xid
    assert session.apply(todo) == 2502
    assert dp.controls() == [OFP.OFPBCT_OPEN_REQUEST, OFP.OFPBCT_COMMIT_REQUEST]
    assert isinstance(dp.msgs[1], bytes) and isinstance(dp.msgs[-2], bytes)
    chunks = [m for m in dp.msgs if isinstance(m, bytes)]
    assert len(chunks) == 3
    bundle_id = dp.msgs[0].bundle_id
    items = [*todo.purge_cookies, *todo.add, *todo.delete_cookies]
    assert dp.raw() == encode.raw_bundle_adds(dp, bundle_id, items, first)
    # every chunk ends on a message boundary
    for c in chunks:
        offset = 0
        while offset < len(c):
            offset += struct.unpack_from("!H", c, offset + 2)[0]
        assert offset == len(c)
    assert session.bundles_sent == 1 and session.last_bundle["messages"] == 2502
    assert not session._pending


def test_a_flow_that_cannot_be_packed_discards_the_bundle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "CHUNK_MESSAGES", 100)
    session, dp = _session()
    bad = flow(0, 5, in_port=1, actions=[Conjunction(1, 1, 2), Output(2)])
    flows = [*synthetic_flows(300, seed=8), bad]
    with pytest.raises(ValueError, match="conjunction"):
        session.apply(Plan(add=tuple(flows), delete_cookies=()))
    assert dp.controls() == [OFP.OFPBCT_OPEN_REQUEST, OFP.OFPBCT_DISCARD_REQUEST]
    assert dp.raw()  # the first chunks had gone out already: discarded, never committed
    assert session.bundles_sent == 0 and not session._pending


class SilentDatapath(FakeDatapath):
    """Takes every message and never answers (a switch that went away unnoticed)."""

    def __init__(self, accepts: bool = True) -> None:
        super().__init__()
        self.accepts = accepts

    def send_msg(self, msg: Any) -> bool:
        if msg.xid is None:
            self.set_xid(msg)
        self.msgs.append(msg)
        return self.accepts


def test_a_disconnect_fails_a_waiting_request_at_once() -> None:
    import threading

    from controller.switch import SwitchError

    session = SwitchSession(SilentDatapath(), "vmbr0")
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            session.flows()
            outcome.append(None)
        except SwitchError as exc:
            outcome.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    for _ in range(500):  # the request is out and waiting for its reply
        if session._pending:
            break
        threading.Event().wait(0.01)
    session.close()
    t.join(5)  # far below the 10 s reply timeout
    assert not t.is_alive()
    assert isinstance(outcome[0], SwitchError) and "disconnected" in str(outcome[0])
    with pytest.raises(SwitchError, match="connection closed"):
        session.flows()  # and later requests fail without waiting


def test_a_message_os_ken_refuses_to_queue_fails_at_once() -> None:
    from controller.switch import SwitchError

    session = SwitchSession(SilentDatapath(accepts=False), "vmbr0")
    with pytest.raises(SwitchError, match="connection closed"):
        session.flows()
    assert session._pending == {}
