"""Desired flows of both bridges, computed from config and discovered ports. No I/O.

`desired_state(cfg, ports)` is the whole truth the controller installs: a
frozenset of `Flow` per bridge name. Anything printed by `socknet flows` comes
from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from topology.addresses import Binding, Declarations, binding_from, declarations
from topology.config import HostConfig
from topology.model import (
    Action,
    Ct,
    Flow,
    Learn,
    LearnSpec,
    MoveField,
    Output,
    OutputReg,
    Owner,
    Resubmit,
    SetField,
    SetReg,
    ToController,
    ct_state,
    flow,
    learn_mac_to_port,
)
from topology.openflow import ETH_ARP, ETH_IPV4
from topology.pipeline import (
    CLASS_GATEWAY,
    CLASS_MESH,
    CLASS_PRIVACY,
    CLASS_SERVICE,
    CLASS_WARP,
    LEARN_IDLE_TIMEOUT,
    MESH_LEARN_IDLE_TIMEOUT,
    MESH_PIPELINE,
    METER_DROP,
    METER_EARLY,
    METER_LEARN,
    REG_CLASS,
    REG_OUT,
    SOCKET_PIPELINE,
    ZONE_PRIVACY,
    check_flows,
)
from topology.policy import Policy
from topology.policy_compile import compile_policy
from topology.roles import PortRole, Role, classify_port

MULTICAST = ("01:00:00:00:00:00", "01:00:00:00:00:00")  # broadcast included
ZERO_MAC = "00:00:00:00:00:00"

# Ports as discovered: bridge name -> port name -> OpenFlow port number.
Ports = Mapping[str, Mapping[str, int]]
DesiredState = dict[str, frozenset[Flow]]


# Learned bindings: container port name -> Binding (from the controller's learning path).
Bindings = Mapping[str, Binding]


@dataclass(frozen=True)
class BoundPort:
    name: str
    ofport: int
    role: PortRole


def bound_ports(cfg: HostConfig, bridge: str, ports: Mapping[str, int]) -> list[BoundPort]:
    """Ports of one bridge with their roles, ordered by OpenFlow port number."""
    out = [
        BoundPort(name, ofport, classify_port(cfg, bridge, name))
        for name, ofport in ports.items()
        if ofport is not None and 0 < ofport < 0xFF00
    ]
    return sorted(out, key=lambda p: p.ofport)


def _of_role(ports: list[BoundPort], role: Role) -> list[BoundPort]:
    return [p for p in ports if p.role.role is role]


def mesh_flows(cfg: HostConfig, ports: Mapping[str, int]) -> frozenset[Flow]:
    t, l2 = MESH_PIPELINE["mesh_isolation"], MESH_PIPELINE["mesh_l2"]
    bound = bound_ports(cfg, cfg.bridges.mesh.name, ports)
    uplinks = _of_role(bound, Role.MESH_UPLINK)
    to_socket = _of_role(bound, Role.TO_SOCKET)
    out = {flow(t, 0, note="mesh: default drop (isolation)")}
    # never a valid sender, never learned: a peer sending from ff:ff:ff:ff:ff:ff would
    # otherwise pull the host's broadcasts to itself alone
    out |= {flow(t, 110, eth_src=src, note=f"mesh: source MAC {what}, drop (never learned)")
            for src, what in ((MULTICAST, "multicast/broadcast"), (ZERO_MAC, "zero"))}
    # Which peer (uplink) each remote MAC sits behind; ages out when the peer goes quiet.
    learn_peer = learn_mac_to_port(l2, 10, MESH_LEARN_IDLE_TIMEOUT)
    for sock in to_socket:
        for up in uplinks:
            # split horizon: what a peer sends goes to the host only, never to another peer
            out.add(flow(t, 100, in_port=up.ofport, actions=[learn_peer, Output(sock.ofport)],
                         owner=Owner.PORTS, note=f"mesh: {up.name} -> {sock.name} (learn peer)"))
        if uplinks:
            out.add(flow(t, 100, in_port=sock.ofport, goto=l2, owner=Owner.PORTS,
                         note=f"mesh: {sock.name} -> mesh_l2"))
            names = ", ".join(u.name for u in uplinks)
            out.add(flow(l2, 0, actions=[Output(up.ofport) for up in uplinks],
                         owner=Owner.PORTS, note=f"mesh_l2: unknown -> every peer ({names})"))
    if not any(f.table == l2 for f in out):
        out.add(flow(l2, 0, note="mesh_l2: no uplink, drop"))
    return frozenset(out)


def _arp_responder(mac: str, ip: str) -> list[Action]:
    """Turn an ARP request for ``ip`` into the reply ``ip is-at mac``, sent back where it came."""
    return [
        MoveField("NXM_OF_ETH_SRC[]", "NXM_OF_ETH_DST[]"),
        SetField("eth_src", mac),
        SetField("arp_op", 2),
        MoveField("NXM_NX_ARP_SHA[]", "NXM_NX_ARP_THA[]"),
        MoveField("NXM_OF_ARP_SPA[]", "NXM_OF_ARP_TPA[]"),
        SetField("arp_sha", mac),
        SetField("arp_spa", ip),
        Output("IN_PORT"),
    ]


def service_arp_flow(addr: str, mac: str, owner: Owner = Owner.DISCOVERED) -> Flow:
    """Service containers' ARP for a known service address (local, or a remote host
    learned across the mesh) is answered on this host: no broadcast on the mesh."""
    return flow(SOCKET_PIPELINE["dispatch"], 100, eth_type=ETH_ARP, arp_op=1, arp_tpa=addr,
                actions=_arp_responder(mac, addr), owner=owner,
                note=f"dispatch: answer ARP for {addr} (known service address)",
                **{REG_CLASS: CLASS_SERVICE})


def _privacy_ips(cfg: HostConfig, declared: Declarations) -> set[str]:
    return {d.ipv4 for (vmid, _), d in declared.nics.items()
            if d.ipv4 and vmid in cfg.bridges.socket.privacy_ids}


def local_service_ips(cfg: HostConfig, ports: Mapping[str, int],
                      learned: Bindings | None = None,
                      declared: Declarations | None = None) -> frozenset[str]:
    """Addresses a remote host learned across the mesh can never claim here: local
    service containers' (declared or learned) and declared privacy containers'."""
    declared = declarations(cfg) if declared is None else declared
    service = _of_role(bound_ports(cfg, cfg.bridges.socket.name, ports), Role.SERVICE)
    local, _ = _known_service_addresses(cfg, declared, service, learned or {}, {})
    return frozenset(local) | _privacy_ips(cfg, declared)


# The mesh host's MAC by its IPv4 address, learned when it opens a connection to
# a privacy container: replies leave addressed to the container's gateway (the
# mesh host is off-subnet) and get this MAC instead, so no ARP ever leaves
# towards the mesh on a privacy container's behalf.
_LEARN_MESH_HOST = Learn(
    table=SOCKET_PIPELINE["mesh_reply_l2"],
    priority=10,
    idle_timeout=LEARN_IDLE_TIMEOUT,
    specs=(
        LearnSpec("match", "0x800", "NXM_OF_ETH_TYPE[]"),
        LearnSpec("match", "NXM_OF_IP_SRC[]", "NXM_OF_IP_DST[]"),
        LearnSpec("load", "NXM_OF_ETH_SRC[]", "NXM_OF_ETH_DST[]"),
    ),
)


def binding_of(declared: Declarations, port: BoundPort, learned: Bindings) -> Binding | None:
    """Declared addresses win; learning fills in only what the declarations leave open."""
    return binding_from(declared.of_port(port.name), learned.get(port.name))


def is_declared(declared: Declarations, port: BoundPort, binding: Binding) -> bool:
    """The binding comes from the declarations alone (its flows belong to the port);
    otherwise part of it was learned (its flows are DISCOVERED, adopted after a restart)."""
    d = declared.of_port(port.name)
    return d is not None and d.mac == binding.mac and d.ipv4 == binding.ip


def _spoof_guard(cfg: HostConfig, declared: Declarations, containers: list[BoundPort],
                 learners: list[BoundPort], learned: Bindings) -> set[Flow]:
    """Containers send with their bound MAC and IPv4 only. The only MAC learning on
    vmbr0 happens here, on frames that passed: a privacy container teaches its bound MAC,
    from-mesh and the gateway teach what they carry, except multicast, zero and any local
    container's bound MAC (those go on unlearned: a learned entry never displaces it)."""
    t, after = SOCKET_PIPELINE["spoof_guard"], SOCKET_PIPELINE["policy_entry"]
    out = {flow(t, 0, goto=after, note="spoof_guard: mesh, WARP, gateway go on")}
    out |= {flow(t, 40, eth_src=src, note=f"spoof_guard: source MAC {what}, drop "
                 "(never valid, never learned)")
            for src, what in ((MULTICAST, "multicast/broadcast"), (ZERO_MAC, "zero"))}
    learn_privacy = learn_mac_to_port(SOCKET_PIPELINE["privacy_hosts"], 10,
                                      LEARN_IDLE_TIMEOUT, REG_OUT)
    local_macs: dict[str, Owner] = {}
    for port in containers:
        b = binding_of(declared, port, learned)
        who = f"{port.name} (container {port.role.vmid})"
        d = declared.of_port(port.name)
        if b is None or b.ip is None:
            if b is not None:
                local_macs[b.mac] = Owner.PORTS
            if cfg.learning and not (d is not None and d.refused):
                out.add(flow(t, 10, in_port=port.ofport,
                             actions=[ToController(meter=METER_LEARN)], owner=Owner.PORTS,
                             note=f"spoof_guard: {who} no IPv4 bound: learn (rate-limited), "
                                  "drop"))
            else:
                out.add(flow(t, 10, in_port=port.ofport, owner=Owner.PORTS,
                             actions=[ToController(meter=METER_DROP)],
                             note=f"spoof_guard: {who} no IPv4 bound: drop (copy: log)"))
            continue
        owner = Owner.PORTS if is_declared(declared, port, b) else Owner.DISCOVERED
        local_macs[b.mac] = owner
        teach: list[Action] = [learn_privacy] if port.role.role is Role.PRIVACY else []
        # a rate-limited copy tells the controller (a `dropped` event naming the port)
        out.add(flow(t, 10, in_port=port.ofport, actions=[ToController(meter=METER_DROP)],
                     owner=owner,
                     note=f"spoof_guard: {who} anything not its own, drop (copy: log)"))
        out.add(flow(t, 20, in_port=port.ofport, eth_src=b.mac, eth_type=ETH_IPV4,
                     ipv4_src=b.ip, actions=teach, goto=after, owner=owner,
                     note=f"spoof_guard: {who} own MAC and IPv4"))
        out.add(flow(t, 20, in_port=port.ofport, eth_src=b.mac, eth_type=ETH_ARP,
                     arp_spa=b.ip, arp_sha=b.mac, actions=teach, goto=after, owner=owner,
                     note=f"spoof_guard: {who} ARP for its own addresses"))
    learn_service = learn_mac_to_port(SOCKET_PIPELINE["service_l2"], 10, LEARN_IDLE_TIMEOUT)
    for port in learners:
        out.add(flow(t, 15, in_port=port.ofport, actions=[learn_service], goto=after,
                     owner=Owner.PORTS,
                     note=f"spoof_guard: {port.name} teaches its source MAC (service_l2)"))
    classes = sorted({_LEARNER_CLASS[p.role.role] for p in learners})
    for mac, owner in sorted(local_macs.items()):
        for cls in classes:
            out.add(flow(t, 30, eth_src=mac, goto=after, owner=owner,
                         note=f"spoof_guard: {mac} is a local container's: from class {cls} "
                              "it goes on unlearned", **{REG_CLASS: cls}))
    return out


_LEARNER_CLASS = {Role.FROM_MESH: CLASS_MESH, Role.GATEWAY: CLASS_GATEWAY}


def _known_service_addresses(
    cfg: HostConfig, declared: Declarations, service: list[BoundPort], learned: Bindings,
    remote: Mapping[str, str]
) -> tuple[dict[str, str], set[str]]:
    """IPv4 -> MAC of service containers: remote ones learned across the mesh, local
    ones (declared or learned) winning over them; and which of them are declared.
    Privacy containers are never listed."""
    known = dict(remote)
    privacy_ips = _privacy_ips(cfg, declared)
    configured = set()
    for port in service:
        b = binding_of(declared, port, learned)
        if b is not None and b.ip is not None:
            known[b.ip] = b.mac
            if is_declared(declared, port, b):
                configured.add(b.ip)
    return {ip: mac for ip, mac in known.items() if ip not in privacy_ips}, configured


def _classify_default() -> Flow:
    """Unknown in_port: dropped, a copy to the controller (meter METER_EARLY). The copy
    names the port in a `dropped` event (a port with no role), and with
    learn-first-packet it is how a new container's first packet is not lost to learning:
    it can arrive before its port's flows are installed (add-port -> packets within ms,
    the port's flows tens of ms later); the controller keeps such packets a few seconds,
    by in_port, and learns the sender's addresses once the port shows up in OVSDB as an
    undeclared container's. Nothing is forwarded; with the controller dead the copy goes
    nowhere."""
    return flow(SOCKET_PIPELINE["classify"], 0, actions=[ToController(meter=METER_EARLY)],
                note="classify: unknown port, drop (a rate-limited copy to the controller)")


def service_port_l2_flow(port: BoundPort, binding: Binding, declared: bool) -> Flow:
    """service_l2: a local service container's MAC -> its port (see _local_service_flows).
    Installed in the same bundle as the spoof_guard flows of ``binding``: once it is on the
    switch, the container may send with these addresses (the controller's announcement
    for it waits for that)."""
    return flow(SOCKET_PIPELINE["service_l2"], 20, eth_dst=binding.mac,
                actions=[Output(port.ofport)],
                owner=Owner.PORTS if declared else Owner.DISCOVERED,
                note=f"service_l2: {binding.mac} is {port.name} (container {port.role.vmid}), "
                     "local")


def _local_service_flows(declared: Declarations, service: list[BoundPort],
                         learned: Bindings) -> set[Flow]:
    """Per local service container with known addresses (declared, or learned once):

    - service_l2: eth_dst=<its MAC> -> its port, above the learned flows. Its port's
      arrival is then a flow-table change sent in a bundle, which makes OVS revalidate
      cached datapath flows; a learn() re-pointing the MAC does not always (not when it
      runs inside a packet-out, as the controller's announcement does): a megaflow that
      said drop while the container was on another host (its MAC learned behind
      from-mesh) would otherwise live on. It also outranks a stale or forged frame from
      the mesh carrying a local container's MAC.
    - dispatch: its own gratuitous ARP (a request from its port for its own IPv4) goes on
      to service_l2 and floods, across the mesh too, instead of being answered by the
      ARP responder for its address: remote hosts re-learn a move from it."""
    out: set[Flow] = set()
    for port in service:
        b = binding_of(declared, port, learned)
        if b is None:
            continue
        own = is_declared(declared, port, b)
        owner = Owner.PORTS if own else Owner.DISCOVERED
        who = f"{port.name} (container {port.role.vmid})"
        out.add(service_port_l2_flow(port, b, own))
        if b.ip is not None:
            out.add(flow(SOCKET_PIPELINE["dispatch"], 110, in_port=port.ofport,
                         eth_type=ETH_ARP, arp_op=1, arp_tpa=b.ip,
                         goto=SOCKET_PIPELINE["service_l2"], owner=owner,
                         note=f"dispatch: {who} announces itself (gratuitous ARP): "
                              "flood, mesh included",
                         **{REG_CLASS: CLASS_SERVICE}))
    return out


def socket_flows(cfg: HostConfig, ports: Mapping[str, int], policy: Policy | None = None,
                 learned: Bindings | None = None,
                 remote: Mapping[str, str] | None = None,
                 declared: Declarations | None = None) -> frozenset[Flow]:
    p = SOCKET_PIPELINE
    declared = declarations(cfg) if declared is None else declared
    bound = bound_ports(cfg, cfg.bridges.socket.name, ports)
    from_mesh = _of_role(bound, Role.FROM_MESH)
    warp = _of_role(bound, Role.WARP)
    privacy = _of_role(bound, Role.PRIVACY)
    service = _of_role(bound, Role.SERVICE)
    gateway = _of_role(bound, Role.GATEWAY)
    warp_out: list[Action] = [Output(w.ofport) for w in warp]
    mesh_out: list[Action] = [Output(m.ofport) for m in from_mesh]

    f: set[Flow] = set()
    add = f.add

    # classify: which class of port did this come from? unknown ports: dropped. Nothing
    # is learned before spoof_guard has passed the frame.
    c = p["classify"]
    add(_classify_default())
    for port in from_mesh:
        add(flow(c, 100, in_port=port.ofport, owner=Owner.PORTS, goto=p["spoof_guard"],
                 actions=[SetReg(REG_CLASS, CLASS_MESH)],
                 note=f"classify: {port.name} is from-mesh"))
    for port in warp:
        add(flow(c, 100, in_port=port.ofport, owner=Owner.PORTS, goto=p["spoof_guard"],
                 actions=[SetReg(REG_CLASS, CLASS_WARP)], note=f"classify: {port.name} is WARP"))
    for port in privacy:
        add(flow(c, 100, in_port=port.ofport, owner=Owner.PORTS, goto=p["spoof_guard"],
                 actions=[SetReg(REG_CLASS, CLASS_PRIVACY)],
                 note=f"classify: {port.name} is privacy container {port.role.vmid}"))
    for port in service:
        add(flow(c, 100, in_port=port.ofport, owner=Owner.PORTS, goto=p["spoof_guard"],
                 actions=[SetReg(REG_CLASS, CLASS_SERVICE)],
                 note=f"classify: {port.name} is service container {port.role.vmid}"))
    for port in gateway:
        add(flow(c, 100, in_port=port.ofport, owner=Owner.PORTS, goto=p["spoof_guard"],
                 actions=[SetReg(REG_CLASS, CLASS_GATEWAY)],
                 note=f"classify: {port.name} is the service gateway"))

    f |= _spoof_guard(cfg, declared, [*privacy, *service], [*from_mesh, *gateway],
                      learned or {})
    f |= _local_service_flows(declared, service, learned or {})
    f |= compile_policy(policy)

    d = p["dispatch"]
    add(flow(d, 0, note="dispatch: drop"))
    add(flow(d, 10, goto=p["privacy_egress"], note="dispatch: privacy -> privacy_egress",
             **{REG_CLASS: CLASS_PRIVACY}))
    add(flow(d, 10, goto=p["privacy_lookup"], note="dispatch: WARP -> privacy_lookup",
             **{REG_CLASS: CLASS_WARP}))
    add(flow(d, 10, goto=p["privacy_lookup"], note="dispatch: mesh -> privacy_lookup",
             **{REG_CLASS: CLASS_MESH}))
    add(flow(d, 10, goto=p["service_l2"], note="dispatch: service -> service_l2",
             **{REG_CLASS: CLASS_SERVICE}))
    add(flow(d, 10, goto=p["service_l2"], note="dispatch: gateway -> service_l2",
             **{REG_CLASS: CLASS_GATEWAY}))
    # ARP from the mesh: a copy to the controller (rate-limited) to learn remote hosts
    if from_mesh:
        add(flow(d, 50, eth_type=ETH_ARP, actions=[ToController(meter=METER_LEARN)],
                 goto=p["privacy_lookup"], owner=Owner.PORTS,
                 note="dispatch: mesh ARP -> learn remote hosts (copy), go on",
                 **{REG_CLASS: CLASS_MESH}))
    # ARP from service containers for addresses known here (local containers, remote
    # hosts learned across the mesh) is answered on this host: no broadcast on the mesh
    known, configured = _known_service_addresses(cfg, declared, service, learned or {},
                                                 remote or {})
    for addr, mac in sorted(known.items()):
        add(service_arp_flow(addr, mac, Owner.PORTS if addr in configured else Owner.DISCOVERED))
    # ARP for declared privacy containers is answered here, for the mesh and for WARP
    # (their ARP replies must never leave towards the mesh).
    for port in privacy:
        decl = declared.of_port(port.name)
        if decl is not None and decl.mac and decl.ipv4:
            for cls in (CLASS_MESH, CLASS_WARP):
                add(flow(d, 100, eth_type=ETH_ARP, arp_op=1, arp_tpa=decl.ipv4,
                         actions=_arp_responder(decl.mac, decl.ipv4), owner=Owner.PORTS,
                         note=f"dispatch: answer ARP for privacy container {port.role.vmid}",
                         **{REG_CLASS: cls}))

    # privacy egress: the kill switch. The only outputs are WARP, and the mesh for
    # replies of connections the mesh opened. No WARP port: no flow, so drop.
    e = p["privacy_egress"]
    add(flow(e, 0, note="privacy_egress: drop (kill switch)"))
    add(flow(e, 20, eth_type=ETH_IPV4, actions=[Ct(zone=ZONE_PRIVACY, table=p["privacy_ct"])],
             note="privacy_egress: IPv4 through conntrack"))
    if warp_out:
        add(flow(e, 10, actions=warp_out, owner=Owner.PORTS,
                 note="privacy_egress: non-IPv4 (ARP) to WARP only"))
    ct_t = p["privacy_ct"]
    add(flow(ct_t, 0, note="privacy_ct: drop (kill switch)"))
    if mesh_out:
        for state in ("+trk+est+rpl", "+trk+rel+rpl"):
            add(flow(ct_t, 20, ct_state=ct_state(state), owner=Owner.PORTS,
                     actions=[Resubmit(p["mesh_reply_l2"]), *mesh_out],
                     note=f"privacy_ct: {state} reply to a mesh-opened connection -> mesh"))
    if warp_out:
        add(flow(ct_t, 15, ct_state=ct_state("+trk+inv"), note="privacy_ct: invalid, drop"))
        add(flow(ct_t, 10, ct_state=ct_state("+trk"), actions=warp_out, owner=Owner.PORTS,
                 note="privacy_ct: everything else to WARP only"))
    add(flow(p["mesh_reply_l2"], 0, note="mesh_reply_l2: unknown mesh host, keep eth_dst"))

    # mesh / WARP towards privacy containers: find the owner of eth_dst
    add(flow(p["privacy_lookup"], 0, actions=[SetReg(REG_OUT, 0), Resubmit(p["privacy_hosts"])],
             goto=p["privacy_deliver"], note="privacy_lookup: reg1 = port of eth_dst"))
    add(flow(p["privacy_hosts"], 0, note="privacy_hosts: miss (reg1 stays 0)"))
    for port in privacy:
        decl = declared.of_port(port.name)
        if decl is not None and decl.mac:
            add(flow(p["privacy_hosts"], 20, eth_dst=decl.mac, owner=Owner.PORTS,
                     actions=[SetReg(REG_OUT, port.ofport)],
                     note=f"privacy_hosts: declared MAC of container {port.role.vmid}"))
    dl = p["privacy_deliver"]
    add(flow(dl, 0, note="privacy_deliver: drop"))
    add(flow(dl, 30, goto=p["service_l2"], note="privacy_deliver: mesh, not a privacy host",
             **{REG_CLASS: CLASS_MESH, REG_OUT: 0}))
    if privacy:
        add(flow(dl, 25, eth_dst=MULTICAST, actions=[Output(x.ofport) for x in privacy],
                 owner=Owner.PORTS, note="privacy_deliver: WARP broadcast to privacy containers",
                 **{REG_CLASS: CLASS_WARP, REG_OUT: 0}))
    add(flow(dl, 20, note="privacy_deliver: unknown destination, drop", **{REG_OUT: 0}))
    add(flow(dl, 15, eth_type=ETH_IPV4,
             actions=[Ct(zone=ZONE_PRIVACY, commit=True), _LEARN_MESH_HOST, OutputReg(REG_OUT)],
             note="privacy_deliver: mesh -> privacy container (conntrack commit)",
             **{REG_CLASS: CLASS_MESH}))
    add(flow(dl, 10, actions=[OutputReg(REG_OUT)], note="privacy_deliver: WARP return",
             **{REG_CLASS: CLASS_WARP}))

    # service containers and the mesh: learned switching, never privacy or WARP ports
    s = p["service_l2"]
    flood = [Output(x.ofport) for x in (*service, *gateway, *from_mesh)]
    add(flow(s, 0, actions=flood, owner=Owner.PORTS if flood else Owner.PIPELINE,
             note="service_l2: flood to service ports, gateway and from-mesh"))
    return frozenset(f)


def desired_state(cfg: HostConfig, ports: Ports, policy: Policy | None = None,
                  learned: Bindings | None = None,
                  remote: Mapping[str, str] | None = None,
                  declared: Declarations | None = None) -> DesiredState:
    """Flows for both bridges. Raises PipelineError if a flow breaks the declaration.
    ``declared``: the container addresses of `topology.addresses.declarations` (default:
    host.yaml's alone)."""
    mesh_name, sock_name = cfg.bridges.mesh.name, cfg.bridges.socket.name
    state = {
        mesh_name: mesh_flows(cfg, ports.get(mesh_name, {})),
        sock_name: socket_flows(cfg, ports.get(sock_name, {}), policy, learned, remote,
                                declared),
    }
    check_flows(MESH_PIPELINE, state[mesh_name])
    check_flows(SOCKET_PIPELINE, state[sock_name])
    return state
