"""Synthetic but valid socknet flows for install/restart/memory benchmarks.

`synthetic_flows(n, seed)` gives ``n`` distinct classify-style flows built with
`topology.model.flow` (so they carry real socknet cookies): table 0, one per
(in_port, eth_src), loading a class into reg0 and going to table 1. Different
seeds give disjoint flows, so each round can start with a cold encode cache.
They never match lab traffic (eth_src 02:bb:...).
"""

from __future__ import annotations

from topology.model import Flow, Output, Owner, SetReg, flow

SEED_STRIDE = 1 << 24


def synthetic_flows(n: int, seed: int = 0, *, table: int = 0, goto: int = 1) -> list[Flow]:
    out = []
    for i in range(n):
        k = seed * SEED_STRIDE + i
        mac = "02:bb:" + ":".join(f"{(k >> s) & 0xff:02x}" for s in (24, 16, 8, 0))
        out.append(flow(table, 100, in_port=1 + i % 1000, eth_src=mac,
                        actions=[SetReg("reg0", 1 + i % 3)], goto=goto, owner=Owner.POLICY,
                        note="bench: synthetic classify flow"))
    return out


def forwarding_flows(pairs: list[tuple[int, int]], table: int = 0) -> list[Flow]:
    """in_port=a -> output:b, priority 10: lets traffic cross a bench bridge."""
    return [flow(table, 10, in_port=a, actions=[Output(b)], owner=Owner.PORTS,
                 note=f"bench: {a} -> {b}") for a, b in pairs]


def desired(spec: dict) -> list[Flow]:
    """Flows for a spec {"n": N, "seed": S, "fwd": [[a, b], ...]}."""
    return synthetic_flows(int(spec.get("n", 0)), int(spec.get("seed", 0))) + forwarding_flows(
        [(int(a), int(b)) for a, b in spec.get("fwd", [])])
