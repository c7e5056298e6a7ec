"""Desired vs installed: the difference to send, as a pure function.

A flow's cookie is a hash of its content (topology.model), so a flow is
installed correctly exactly when its cookie is on the switch once. Learned
flows (written by OVS `learn`) are not ours to reconcile. Flows without a
socknet cookie are foreign: the controller owns its bridges, so they go.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from topology.model import Flow, Owner, cookie_owner


@dataclass(frozen=True)
class Plan:
    add: tuple[Flow, ...]
    delete_cookies: tuple[int, ...]
    # cookies found more than once: deleted before the adds re-install them
    purge_cookies: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.add and not self.delete_cookies and not self.purge_cookies

    def __len__(self) -> int:
        return len(self.add) + len(self.delete_cookies) + len(self.purge_cookies)


def reconcilable(cookie: int) -> bool:
    return cookie_owner(cookie) is not Owner.LEARNED


def plan(desired: Iterable[Flow], installed_cookies: Iterable[int]) -> Plan:
    """Flow-mods that turn the installed cookies into the desired flows.

    Adds come first in the bundle, deletes by exact cookie after: a flow whose
    content changed but whose match did not is replaced in place by its ADD,
    and the delete of its old cookie then finds nothing. The order of the adds
    means nothing to the switch (the bundle is applied at once): they are in
    cookie order, except on a switch with none of our flows (a fresh or wiped
    one), where every desired flow is added in the order given, without working
    out a single cookie here (the sender does, as it packs each flow).
    """
    counts = Counter(c for c in installed_cookies if reconcilable(c))
    if not counts:
        flows = desired if isinstance(desired, (set, frozenset)) else dict.fromkeys(desired)
        return Plan(add=tuple(flows), delete_cookies=())
    desired_by_cookie = {f.cookie: f for f in desired}
    add_cookies = sorted(c for c in desired_by_cookie if counts.get(c, 0) != 1)
    delete = [c for c in counts if c not in desired_by_cookie]
    purge = [c for c, n in counts.items() if c in desired_by_cookie and n > 1]
    return Plan(
        add=tuple([desired_by_cookie[c] for c in add_cookies]),
        delete_cookies=tuple(sorted(delete)),
        purge_cookies=tuple(sorted(purge)),
    )
