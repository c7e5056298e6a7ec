"""Lab pieces the benchmarks share: socknet and NORMAL-baseline labs, log timestamps,
RSS, static neighbours, waiting."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from labs import netns as nsl
from labs.lab import SocketLab
from labs.ovs_instance import OvsInstance
from topology.model import Owner, cookie_owner


def socknet_lab(ctx: Any, tag: str = "s", *, controller: bool = True) -> SocketLab:
    """The one-host lab of `labs.lab` with the socknet controller, torn down with ``ctx``."""
    prefix = ctx.prefix(tag)
    lab = SocketLab(prefix, ctx.dir(prefix))
    ctx.defer(lab.down)
    lab.up(controller=controller)
    return lab


def normal_lab(ctx: Any, tag: str = "n") -> SocketLab:
    """The same lab without a controller: one ``actions=NORMAL`` flow per bridge."""
    prefix = ctx.prefix(tag)
    lab = SocketLab(prefix, ctx.dir(prefix))
    ctx.defer(lab.down)
    lab.up(controller=False)
    make_normal(lab.ovs)
    return lab


PAIR = {200: "10.10.0.2", 201: "10.10.0.3"}  # service containers of policy labs


def policy_lab(ctx: Any, tag: str, flows: int, *, timeout_s: float = 240.0) -> Any:
    """`labs.policy_lab.PolicyLab` with a generated policy of about ``flows`` policy flows
    (`bench.policygen`; containers 200 and 201 may exchange UDP and ICMP), controller
    started and both bridges reconciled (``bench_first_start_s``: how long that took)."""
    from bench.policygen import sized_policy
    from labs.policy_lab import PolicyLab

    prefix = ctx.prefix(tag)
    lab = PolicyLab(prefix, ctx.dir(prefix), sized_policy(flows, pair=(PAIR[200], PAIR[201])),
                    services=dict(PAIR))
    ctx.defer(lab.down)
    lab.up(controller=False)
    t = time.monotonic()
    lab.start_controller(wait=False)
    lab.wait_reconciled(timeout_s=timeout_s)
    lab.bench_first_start_s = time.monotonic() - t  # spawn -> both bridges reconciled
    return lab


def make_normal(ovs: OvsInstance, bridges: tuple[str, ...] = ("mesh", "vmbr0")) -> None:
    for br in bridges:
        ovs.vsctl("del-controller", br)
        ovs.ofctl("del-flows", ovs.mgmt(br))
        ovs.ofctl("add-flow", ovs.mgmt(br), "priority=0,actions=NORMAL")


def owned_flow(line: str) -> bool:
    """A dump-flows line of a flow socknet reconciles: its own cookie, not a learned one.
    The cookie is the line's first field (learn() actions carry the learned cookie too)."""
    m = re.match(r"\s*cookie=(0x[0-9a-f]+)", line)
    return m is not None and cookie_owner(int(m.group(1), 16)) not in (None, Owner.LEARNED)


def owned_flows(lab: SocketLab) -> int:
    """socknet-owned flows on both bridges of a lab."""
    return sum(1 for br in ("mesh", "vmbr0") for f in lab.flows(br) if owned_flow(f))


# ---------------------------------------------------------------- logs


def parse_ts(text: str) -> float:
    """ISO-8601 ("2026-01-01T00:00:00.123456Z", structlog) -> epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


_OVS_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z)\|")


def ovs_log_lines(path: Path, offset: int = 0) -> list[tuple[float | None, str]]:
    """Lines of an OVS log file from byte ``offset``, each with its timestamp."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read().decode(errors="replace")
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        m = _OVS_TS.match(line)
        out.append((parse_ts(m.group(1)) if m else None, line))
    return out


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def events(lab: SocketLab, since: int = 0, name: str | None = None) -> list[dict[str, Any]]:
    """Controller log events from index ``since``; only ``name`` if given."""
    evs = lab.log_events()[since:]
    return [e for e in evs if name is None or e.get("event") == name]


# ---------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize of ``pid`` in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "RssAnon"):
            out[key] = int(rest.split()[0])
    return out


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str,
               interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


# ---------------------------------------------------------------- namespaces


def neigh(ns: str, ip: str, mac: str, dev: str = "eth0") -> None:
    """A permanent neighbour entry: no ARP round trip (or ARP retry) in a measurement."""
    nsl.run(ns, ["ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"],
            check=True)


def neigh_del(ns: str, ip: str, dev: str = "eth0") -> None:
    nsl.run(ns, ["ip", "neigh", "del", ip, "dev", dev])


def offload(ns: str, ifname: str, on: bool) -> None:
    """TX checksum + TSO (and GSO) on or off."""
    v = "on" if on else "off"
    nsl.run(ns, ["ethtool", "-K", ifname, "tx", v, "tso", v, "gso", v], check=True)


def endpoint_ns(ctx: Any, prefix: str, tag: str, host_ns: str, port: str, ip: str,
                mac: str) -> str:
    """A namespace ``prefix+tag`` with eth0 (ip/24, mac) wired to ``port`` in ``host_ns``."""
    ns = f"{prefix}{tag}"
    nsl.create_netns(ns)
    ctx.defer(nsl.delete_netns, ns, kill_procs=True)
    nsl.disable_ipv6(ns)
    nsl.add_veth(port, "eth0", host_ns, ns)
    nsl.tx_off(host_ns, port)
    nsl.tx_off(ns, "eth0")
    nsl.set_mac(ns, "eth0", mac)
    nsl.add_addr(ns, "eth0", f"{ip}/24")
    return ns
