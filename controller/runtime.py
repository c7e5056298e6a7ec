"""The controller's shell: discover (OVSDB, OpenFlow), diff, send.

All decisions come from `topology.flows.desired_state`; this module only keeps
track of what is connected and what is installed, and runs one reconcile
worker thread so a slow switch never blocks os-ken's event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller import encode
from controller.logs import get_logger
from controller.reconcile import plan
from controller.switch import SwitchError, SwitchSession
from topology.config import HostConfig
from topology.flows import DesiredState, desired_state
from topology.model import LEARNED_COOKIE, OWNED_COOKIE_MASK
from topology.pipeline import REG_OUT, SOCKET_PIPELINE

log = get_logger("socknet.runtime")


@dataclass
class Stats:
    """Counters the tests, `status` and the metrics endpoint read."""

    flow_mods: int = 0
    bundles: int = 0
    reconciles: int = 0
    noop_reconciles: int = 0
    errors: int = 0
    port_events: int = 0
    last_reconcile: dict[str, float] = field(default_factory=dict)


class Controller:
    def __init__(self, cfg: HostConfig, audit_interval_s: float = 30.0) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.audit_interval_s = audit_interval_s
        self._sessions: dict[int, SwitchSession] = {}  # by datapath id
        self._ports: dict[str, dict[str, int]] | None = None
        self._dpids: dict[str, int] = {}
        self._desired: DesiredState | None = None
        self._lock = threading.Lock()
        self._work: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.on_reconciled: Callable[[str, int], None] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for target, name in ((self._worker, "reconcile"), (self._auditor, "audit")):
            t = threading.Thread(target=target, name=f"socknet-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)

    # ------------------------------------------------------------ inputs
    def switch_connected(self, datapath: Any) -> None:
        with self._lock:
            bridge = self._bridge_of(datapath.id) or f"dpid:{datapath.id:016x}"
            self._sessions[datapath.id] = SwitchSession(datapath, bridge)
        log.info("switch_connected", dpid=f"{datapath.id:016x}", bridge=bridge)
        self._work.put(datapath.id)

    def switch_disconnected(self, datapath: Any) -> None:
        with self._lock:
            session = self._sessions.pop(datapath.id, None)
        if session is not None:
            log.info("switch_disconnected", bridge=session.bridge)

    def session(self, dpid: int) -> SwitchSession | None:
        return self._sessions.get(dpid)

    def ovsdb_changed(self, ports: dict[str, dict[str, int]], dpids: dict[str, int]) -> None:
        """New view of bridges and ports from OVSDB: recompute, reconcile what changed."""
        with self._lock:
            old_ports = self._ports or {}
            self._ports = {b: dict(p) for b, p in ports.items()}
            self._dpids = dict(dpids)
            self._desired = desired_state(self.cfg, self._ports)
            for dpid, session in self._sessions.items():
                session.bridge = self._bridge_of(dpid) or session.bridge
            removed = {
                b: {ofport for name, ofport in old.items() if ports.get(b, {}).get(name) != ofport}
                for b, old in old_ports.items()
            }
        self.stats.port_events += 1
        for bridge, ofports in removed.items():
            if ofports:
                log.info("ports_removed", bridge=bridge, ofports=sorted(ofports))
                self._forget_learned(bridge, ofports)
        for dpid in list(self._sessions):
            self._work.put(dpid)

    # ------------------------------------------------------------ internals
    def _bridge_of(self, dpid: int) -> str | None:
        for bridge, d in self._dpids.items():
            if d == dpid:
                return bridge
        return None

    def _worker(self) -> None:
        while not self._stop.is_set():
            dpid = self._work.get()
            if dpid is None:
                return
            pending = {dpid}
            while True:  # coalesce a burst of requests into one pass per switch
                try:
                    more = self._work.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                pending.add(more)
            for d in pending:
                try:
                    self.reconcile(d)
                except SwitchError as exc:
                    self.stats.errors += 1
                    session = self._sessions.get(d)
                    if session is not None:
                        session.installed = None  # re-read before the next try
                    log.error("reconcile_failed", error=str(exc))
                except Exception:
                    self.stats.errors += 1
                    log.exception("reconcile_crashed")

    def _auditor(self) -> None:
        """Re-read every switch now and then: someone may have touched the flows."""
        while not self._stop.wait(self.audit_interval_s):
            for dpid, session in list(self._sessions.items()):
                session.installed = None
                self._work.put(dpid)

    def reconcile(self, dpid: int) -> int:
        """Bring one switch to the desired state. Returns the number of flow-mods sent."""
        with self._lock:
            session = self._sessions.get(dpid)
            desired = self._desired
            bridge = self._bridge_of(dpid)
        if session is None or desired is None or bridge is None or bridge not in desired:
            return 0  # not connected, or OVSDB not read yet: try again on the next event
        started = time.monotonic()
        first = session.installed is None
        if first:
            session.installed = {f.cookie for f in session.flows()}
        want = desired[bridge]
        todo = plan(want, session.installed)
        sent = session.apply(todo)
        session.installed = {f.cookie for f in want} | {
            c for c in session.installed if (c & OWNED_COOKIE_MASK) == LEARNED_COOKIE
        }
        self.stats.reconciles += 1
        self.stats.flow_mods += sent
        self.stats.bundles += 1 if sent else 0
        if not sent:
            self.stats.noop_reconciles += 1
        self.stats.last_reconcile[bridge] = time.time()
        log.info(
            "reconciled",
            bridge=bridge,
            read_from_switch=first,
            desired=len(want),
            added=len(todo.add),
            deleted=len(todo.delete_cookies) + len(todo.purge_cookies),
            flow_mods=sent,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        if self.on_reconciled is not None:
            self.on_reconciled(bridge, sent)
        return sent

    def _forget_learned(self, bridge: str, ofports: set[int]) -> None:
        """Drop learned flows that point at ports that are gone (their number may be reused)."""
        dpid = self._dpids.get(bridge)
        session = self._sessions.get(dpid) if dpid is not None else None
        if session is None or bridge != self.cfg.bridges.socket.name:
            return
        dp = session.dp
        mods = [
            encode.flow_mod_delete_out_port(
                dp, SOCKET_PIPELINE["service_l2"], port, LEARNED_COOKIE, OWNED_COOKIE_MASK
            )
            for port in sorted(ofports)
        ]
        try:
            learned = session.flows(SOCKET_PIPELINE["privacy_hosts"], LEARNED_COOKIE,
                                    OWNED_COOKIE_MASK)
            mods += [
                encode.flow_mod_delete_strict(dp, f.flow_stats)
                for f in learned
                if encode.loaded_value(f.flow_stats, REG_OUT) in ofports
            ]
            session.send(mods)
        except SwitchError as exc:
            log.error("forget_learned_failed", bridge=bridge, error=str(exc))
