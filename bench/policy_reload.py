"""Policy file saved -> verdict changed on the wire, on a 10k-flow policy, with
allowed traffic running on another path."""

from __future__ import annotations

import time
from typing import Any

from bench._probe import Probe
from bench.core import Context, Row, Target, benchmark
from bench.labkit import events, neigh, owned_flows, parse_ts, wait_until
from bench.policygen import sized_policy
from bench.traffic import UdpStream
from labs.policy_lab import PolicyLab

# service containers: 200 -> 201 carries the continuous allowed traffic (the policy's
# bench-pair rule), 202 -> 203 the probe whose verdict flips
SERVICES = {200: "10.10.0.2", 201: "10.10.0.3", 202: "10.10.0.4", 203: "10.10.0.5"}
PROBE_PORT = 7000
PROBE_INTERVAL_MS = 5.0
TRAFFIC_PPS = 1000
SETTLE_S = 0.4  # after a change is on the switch, before the next one


def probe_rule(action: str) -> str:
    return (f"    - {{name: probe, from: [{SERVICES[202]}/32], to: [{SERVICES[203]}/32], "
            f"udp: [{PROBE_PORT}], action: {action}}}")


def policy_text(flows: int, action: str) -> str:
    """`bench.policygen.sized_policy` (bench-pair lets 200 and 201 exchange UDP) with the
    probe rule first."""
    base = sized_policy(flows, pair=(SERVICES[200], SERVICES[201]))
    head, sep, rest = base.partition("  rules:\n")
    return head + sep + probe_rule(action) + "\n" + rest


def change_latency(sent: list[float], received: set[int], t_change: float, t_next: float,
                   verdict: str) -> float | None:
    """Seconds from ``t_change`` to the send time of the first datagram from which on every
    datagram sent before ``t_next`` got ``verdict`` (passed for allow, dropped for deny).
    None: the verdict never settled in that window."""
    window = [s for s, t in enumerate(sent) if t_change <= t < t_next]
    want = verdict == "allow"
    j = len(window)
    while j > 0 and (window[j - 1] in received) == want:
        j -= 1
    if j == len(window):
        return None
    return sent[window[j]] - t_change


@benchmark(
    "policy_reload",
    title="Policy reload: file saved -> verdict changed on the wire (10k-flow policy)",
    order=45,
    baseline="none (n/a): no other controller here reloads a policy file",
    method=(
        "The policy lab (`labs.policy_lab`) with four service containers and a generated "
        "tier policy of about 10k flows (`bench.policygen.sized_policy`: 100 conjunctive "
        "TCP rules; its first rule lets 200 and 201 exchange UDP), plus a probe rule "
        f"first: 202 -> 203 UDP port {PROBE_PORT}, `action: allow` or `deny`. The probe "
        f"(`bench._probe`) sends one datagram every {PROBE_INTERVAL_MS:g} ms from one "
        "socket (one conntrack connection: a deny cuts it, an allow unblocks it) and both "
        "ends record every sequence number's time. Each change rewrites policy.yaml the "
        "way editors do (write aside, rename; `PolicyLab.write_policy`) with the probe "
        "rule's action flipped; t0 = just after the rename. The figure is the time from t0 "
        "to the send time of the first probe datagram from which on every datagram got "
        "the new verdict (dropped after allow -> deny, delivered after deny -> allow): an "
        f"upper bound with {PROBE_INTERVAL_MS:g} ms resolution. The next change follows "
        f"{SETTLE_S:g} s after the controller logged the reconcile of that change. "
        f"Meanwhile sequence-numbered UDP at {TRAFFIC_PPS} packets/s runs 200 -> 201 "
        "(`bench.traffic`) through all the changes; every sequence number never received "
        "counts as lost. From the controller's log (JSON lines, lab runs it with "
        "`--log-level debug`): t0 -> `policy_reloaded` (watchdog event; a file renamed "
        "into place is reloaded at once, in-place writes wait for a 50 ms debounce; "
        "`load_checked`: read, parse, validate, tests' simulator if the policy has tests; "
        "then `Controller.set_policy`: desired state, pipeline check) and "
        "`policy_reloaded` -> `reconciled` of vmbr0 (diff, bundle, commit reply)."
    ),
)
def policy_reload(ctx: Context) -> list[Row]:
    n_flows = ctx.pick(10_000, 1000)
    changes = ctx.n(20, 2)
    prefix = ctx.prefix("r")
    lab = PolicyLab(prefix, ctx.dir(prefix), policy_text(n_flows, "allow"), services=SERVICES)
    ctx.defer(lab.down)
    lab.up(controller=False)
    t = time.monotonic()
    lab.start_controller(wait=False)
    lab.wait_reconciled(timeout_s=240)
    ctx.log(f"policy lab up, controller reconciled in {time.monotonic() - t:.1f} s, "
            f"{owned_flows(lab)} flows")
    c = lab.containers
    for a, b in ((200, 201), (202, 203)):
        neigh(c[a].ns, c[b].ip, c[b].mac)
        neigh(c[b].ns, c[a].ip, c[a].mac)

    stream = UdpStream(c[200].ns, c[201].ns, c[201].ip, rate=TRAFFIC_PPS, seconds=3600).start()
    ctx.defer(stream.close)
    probe = Probe(c[202].ns, c[203].ns, c[203].ip, port=PROBE_PORT,
                  interval_ms=PROBE_INTERVAL_MS)
    ctx.defer(probe.close)
    flips: list[tuple[float, str, int]] = []  # (t0, new verdict, log index before)
    try:
        time.sleep(1.0)
        verdict = "allow"
        for i in range(changes):
            verdict = "deny" if verdict == "allow" else "allow"
            before = len(lab.log_events())
            lab.write_policy(policy_text(n_flows, verdict))
            t0 = time.time()
            flips.append((t0, verdict, before))
            wait_until(lambda b=before: _reloaded_and_reconciled(lab, b), 30.0,
                       f"change {i + 1}: policy_reloaded + reconciled")
            time.sleep(SETTLE_S)
        t_end = time.time()
        time.sleep(0.2)
    finally:
        sent, arrivals = probe.stop()
        received = set(arrivals)
        traffic = stream.stop()

    latencies: list[float] = []
    to_reloaded: list[float] = []
    to_reconciled: list[float] = []
    check_ms: list[float] = []
    apply_ms: list[float] = []
    never = 0
    for k, (t0, verdict, before) in enumerate(flips):
        t_next = flips[k + 1][0] if k + 1 < len(flips) else t_end
        lat = change_latency(sent, received, t0, t_next, verdict)
        if lat is None:
            never += 1
        else:
            latencies.append(lat * 1000)
        rel, rec = _reloaded_and_reconciled(lab, before) or (None, None)
        if rel is not None and rec is not None:
            to_reloaded.append((parse_ts(rel["timestamp"]) - t0) * 1000)
            to_reconciled.append((parse_ts(rec["timestamp"]) - parse_ts(rel["timestamp"]))
                                 * 1000)
            check_ms.append(float(rel.get("check_ms", 0.0)))
            apply_ms.append(float(rel.get("apply_ms", 0.0)))
    if never:
        ctx.note(f"{never} of {len(flips)} changes never showed on the wire before the "
                 "next one: left out of the percentiles.")
    ctx.note(f"Probe: {len(sent)} datagrams sent, {len(received)} received over "
             f"{len(flips)} changes. Allowed stream: {traffic['sent']} sent, "
             f"{traffic['received']} received, largest gap "
             f"{max((g[1] for g in traffic['recv']['gaps']), default=0):.1f} ms.")
    ctx.settings.update({"policy_flows": owned_flows(lab), "changes": len(flips),
                         "probe_interval_ms": PROBE_INTERVAL_MS, "traffic_pps": TRAFFIC_PPS})
    what = f"{n_flows // 1000}k-flow policy"
    offline = _offline(lab.policy_path, ctx.n(3, 1))
    return [
        Row.of(f"{what}: file saved -> verdict changed on the wire", "ms", latencies,
               target=Target.below(300)),
        Row.of(f"{what}: file saved -> verdict changed on the wire", "ms", latencies,
               stat="p95"),
        Row.of(f"{what}: allowed packets lost across all changes", "packets",
               [traffic["lost"]], stat="sum", target=Target.equals(0),
               note=f"{traffic['sent']} sent at {TRAFFIC_PPS} pps, 200 -> 201"),
        Row.of(f"{what}: of which saved -> policy_reloaded logged", "ms", to_reloaded,
               note="watchdog event (rename: no debounce) + load_checked + set_policy"),
        Row.of(f"{what}: of which load_checked (controller's check_ms)", "ms", check_ms,
               note="read, parse, validate (the policy has no tests: no simulator)"),
        Row.of(f"{what}: of which set_policy (controller's apply_ms)", "ms", apply_ms,
               note="desired state: only the changed rule is compiled, the other rules' "
                    "flows are reused; pipeline check of new flows only"),
        Row.of(f"{what}: of which policy_reloaded -> vmbr0 reconciled", "ms", to_reconciled,
               note="diff, bundle, commit reply"),
        Row.of(f"{what}, same file, idle machine: parse + validate (load_policy)", "ms",
               offline["parse"], note="cold: no rule sides cached"),
        Row.of(f"{what}, same file, idle machine: tests' simulator (PolicySimulator)", "ms",
               offline["simulator"],
               note="cold (caches cleared); not on this reload's path: only built when "
                    "the policy has tests (it compiles the policy, then indexes every "
                    "flow for the simulator)"),
        Row.of(f"{what}, same file, idle machine: compile alone (_compile)", "ms",
               offline["compile"], note="cold: no rule flows cached"),
    ]


def _offline(path: Any, rounds: int) -> dict[str, list[float]]:
    """The reload's CPU stages on the same file, in this process with the lab quiet."""
    from topology.check import PolicySimulator
    from topology.policy import load_policy
    from topology.policy_compile import _compile, clear_caches
    from topology.simulate import clear_compiled

    out: dict[str, list[float]] = {"parse": [], "simulator": [], "compile": []}
    for _ in range(rounds):
        # each stage cold: the controller's reload reuses the running policy's rule sides
        # and rule flows (only changed rules are rebuilt); these figures do not
        clear_caches()
        t0 = time.perf_counter()
        policy = load_policy(path)
        t1 = time.perf_counter()
        clear_caches()
        clear_compiled()
        t1 = time.perf_counter()
        PolicySimulator(policy)
        t2 = time.perf_counter()
        clear_caches()
        t2 = time.perf_counter()
        _compile(policy)
        t3 = time.perf_counter()
        out["parse"].append((t1 - t0) * 1000)
        out["simulator"].append((t2 - t1) * 1000)
        out["compile"].append((t3 - t2) * 1000)
    return out


def _reloaded_and_reconciled(lab: PolicyLab, before: int
                             ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    evs = lab.log_events()[before:]
    rel = next((k for k, e in enumerate(evs) if e.get("event") == "policy_reloaded"), None)
    if rel is None:
        if events(lab, before, "policy_refused"):
            raise RuntimeError(f"policy refused: {events(lab, before, 'policy_refused')}")
        return None
    rec = next((e for e in evs[rel + 1:] if e.get("event") == "reconciled"
                and e.get("bridge") == "vmbr0" and int(e.get("flow_mods", 0)) > 0), None)
    return (evs[rel], rec) if rec is not None else None
