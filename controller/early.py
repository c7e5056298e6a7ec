"""Packets from ports the pipeline does not know yet, kept a few seconds by in_port.

A container's network can say hello (a gratuitous ARP) a few ms after Proxmox adds its
port, before socknet has seen the port in OVSDB and installed its flows (tens of ms).
That packet meets vmbr0's default drop in `classify`, which also sends a rate-limited
copy (meter METER_EARLY) to the controller. `EarlyPackets` keeps the sender addresses
of such copies; once the port appears in OVSDB as an undeclared container's port, the
controller learns them at once, as if the packet had come a little later.

Bounded: at most ``max_ports`` in_ports (the oldest is dropped first), at most
``per_port`` senders per in_port, each forgotten after ``ttl_s``. Nothing here is ever
forwarded; it only decides which addresses a container port is bound to, and that
goes through `Controller.learn_binding`, which refuses addresses that belong to
another container.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from topology.flows import Binding

EARLY_TTL_S = 5.0
EARLY_MAX_PORTS = 64
EARLY_PER_PORT = 4


class EarlyPackets:
    """Sender addresses seen from unknown in_ports: ``add``, then ``take`` when the port
    is known. Thread-safe."""

    def __init__(self, ttl_s: float = EARLY_TTL_S, max_ports: int = EARLY_MAX_PORTS,
                 per_port: int = EARLY_PER_PORT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_ports = max_ports
        self.per_port = per_port
        self._clock = clock
        self._lock = threading.Lock()
        # in_port -> [(seen, binding)], oldest first; ports in the order first seen
        self._by_port: OrderedDict[int, list[tuple[float, Binding]]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return sum(len(v) for v in self._by_port.values())

    def add(self, in_port: int, binding: Binding) -> None:
        """Remember that ``binding`` sent from ``in_port``: the first ``per_port`` distinct
        senders of a port are kept (the first is the one learned), repeats are ignored."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            seen = self._by_port.get(in_port)
            if seen is None:
                while len(self._by_port) >= self.max_ports:
                    self._by_port.popitem(last=False)
                seen = self._by_port[in_port] = []
            if all(b != binding for _, b in seen) and len(seen) < self.per_port:
                seen.append((now, binding))

    def take(self, in_port: int) -> list[Binding]:
        """The senders seen from ``in_port`` within the time limit, first seen first;
        they are forgotten."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            seen = self._by_port.pop(in_port, [])
        return [b for _, b in seen]

    def _expire(self, now: float) -> None:
        """Caller holds the lock."""
        limit = now - self.ttl_s
        for port in [p for p, seen in self._by_port.items() if seen[-1][0] < limit]:
            del self._by_port[port]
        for seen in self._by_port.values():
            seen[:] = [(t, b) for t, b in seen if t >= limit]
