"""A policy as a picture: tiers, externals and the internet as nodes, rules as edges.

`policy_graph(policy)` is the plain data; `to_mermaid` and `to_dot` write it as
Mermaid (``flowchart LR``) and Graphviz DOT text; `render` turns DOT into SVG
or PNG with Graphviz's ``dot`` (Debian package graphviz). No other I/O.

Every written rule (not the implicit ``internal:`` ones) draws an edge for
each (source, destination) name it lists; the rules of one action between the
same two nodes share an edge, labelled "rule: services" per rule, in rule
order: allows solid, denies dashed. Internal tiers are marked on their
node ("no internet"); the default is in the legend.

A rule with more than one (source, destination) pair is labelled once: the
pictures draw it as a small label node of its own (`RuleGroup`), its sources
joined into it and it joined out to its destinations, instead of repeating its
label on every edge (`PolicyGraph.labelled_edges` are the edges left to label).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Literal

from topology.policy import Policy, Rule

NodeKind = Literal["tier", "external", "internet", "any", "cidr"]
RENDER_FORMATS = ("svg", "png")
MAX_CIDRS_SHOWN = 3


class GraphvizMissing(RuntimeError):
    """Graphviz's ``dot`` is not installed (or failed to run)."""


@dataclass(frozen=True)
class Node:
    id: str  # n0, n1 ...: safe in both Mermaid and DOT
    name: str  # as rules name it: tier, external, "internet", "any" or a literal CIDR
    kind: NodeKind
    lines: tuple[str, ...]  # label, first line the name
    internal: bool = False
    in_tier: str | None = None  # a literal CIDR inside this tier


@dataclass(frozen=True)
class EdgeRule:
    name: str
    services: str
    log: bool

    @property
    def lines(self) -> tuple[str, str]:
        return (f"{self.name}{' (log)' if self.log else ''}:", self.services)


@dataclass(frozen=True)
class Edge:
    """The rules of one action between two nodes, in rule order."""

    src: str  # node ids
    dst: str
    action: Literal["allow", "deny"]
    rules: tuple[EdgeRule, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(line for r in self.rules for line in r.lines)


@dataclass(frozen=True)
class RuleGroup:
    """A rule with several (source, destination) pairs, drawn once: sources -> label
    node -> destinations."""

    id: str  # r0, r1 ...: safe in both Mermaid and DOT
    rule: EdgeRule
    action: Literal["allow", "deny"]
    srcs: tuple[str, ...]  # node ids
    dsts: tuple[str, ...]


@dataclass(frozen=True)
class PolicyGraph:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    default: Literal["allow", "deny"]
    groups: tuple[RuleGroup, ...] = ()

    @property
    def labelled_edges(self) -> tuple[Edge, ...]:
        """The edges as drawn: without the rules drawn as a group, and without an edge
        that has no other rule left."""
        grouped = {g.rule for g in self.groups}
        out = []
        for e in self.edges:
            rules = tuple(r for r in e.rules if r not in grouped)
            if rules:
                out.append(Edge(e.src, e.dst, e.action, rules))
        return tuple(out)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def services_text(rule: Rule) -> str:
    """ "tcp/443,80 udp/53", or "any" for a rule without services."""
    return " ".join(str(s) for s in rule.services) if rule.services else "any"


def _cidrs(nets: tuple[IPv4Network, ...]) -> str:
    shown = [str(n) for n in nets[:MAX_CIDRS_SHOWN]]
    if len(nets) > MAX_CIDRS_SHOWN:
        shown.append(f"+{len(nets) - MAX_CIDRS_SHOWN} more")
    return ", ".join(shown)


def policy_graph(policy: Policy) -> PolicyGraph:
    """Nodes for every tier and external, and whatever else rules name (internet, any, CIDRs)."""
    nodes: dict[str, Node] = {}

    def add(name: str, kind: NodeKind, lines: tuple[str, ...], internal: bool = False,
            in_tier: str | None = None) -> None:
        if name not in nodes:
            nodes[name] = Node(f"n{len(nodes)}", name, kind, lines, internal, in_tier)

    for name, s in policy.tiers.items():
        internal = name in policy.internal
        lines = (name, _cidrs(s.nets), *(("internal: no internet",) if internal else ()))
        add(name, "tier", lines, internal)
    for name, s in policy.externals.items():
        add(name, "external", (name, _cidrs(s.nets)))
    rules = [r for r in policy.rules if not r.implicit]
    for rule in rules:
        for name in (*rule.src.names, *rule.dst.names):
            if name == "internet":
                add(name, "internet", ("internet", "outside all tiers"))
            elif name == "any":
                add(name, "any", ("any", "0.0.0.0/0"))
            elif name not in nodes:  # a literal CIDR
                net = IPv4Network(name)
                tier = next((t for t, s in policy.tiers.items()
                             if any(net.subnet_of(n) for n in s.nets)), None)
                lines = (name, f"in {tier}") if tier else (name,)
                add(name, "cidr", lines, in_tier=tier)
    merged: dict[tuple[str, str, str], list[EdgeRule]] = {}
    groups: list[RuleGroup] = []
    for rule in rules:
        label = EdgeRule(rule.name, services_text(rule), rule.log)
        for a in rule.src.names:
            for b in rule.dst.names:
                key = (nodes[a].id, nodes[b].id, rule.action)
                merged.setdefault(key, []).append(label)
        if len(rule.src.names) * len(rule.dst.names) > 1:
            groups.append(RuleGroup(
                f"r{len(groups)}", label, rule.action,
                tuple(dict.fromkeys(nodes[a].id for a in rule.src.names)),
                tuple(dict.fromkeys(nodes[b].id for b in rule.dst.names))))
    edges = tuple(Edge(a, b, action, tuple(rs))  # type: ignore[arg-type]
                  for (a, b, action), rs in merged.items())
    return PolicyGraph(tuple(nodes.values()), edges, policy.default, tuple(groups))


# ---------------------------------------------------------------- Mermaid


def _mermaid_text(lines: tuple[str, ...]) -> str:
    text = "<br/>".join(lines)
    return '"' + text.replace('"', "#quot;") + '"'


_MERMAID_SHAPES = {
    "tier": ("[", "]"),
    "external": ("[/", "/]"),
    "internet": ("((", "))"),
    "any": ("{{", "}}"),
    "cidr": ("([", "])"),
}


def to_mermaid(policy: Policy, title: str | None = None) -> str:
    """``flowchart LR`` text: tiers in a subgraph, allow edges solid, deny edges dashed."""
    g = policy_graph(policy)
    out = []
    if title:
        out += ["---", f"title: {title}", "---"]
    out.append("flowchart LR")

    def node_line(n: Node, indent: str) -> str:
        left, right = _MERMAID_SHAPES[n.kind]
        return f"{indent}{n.id}{left}{_mermaid_text(n.lines)}{right}"

    inside = [n for n in g.nodes if n.kind == "tier" or n.in_tier]
    out.append('  subgraph tiers["tiers (vmbr0)"]')
    out += [node_line(n, "    ") for n in inside]
    out.append("  end")
    out += [node_line(n, "  ") for n in g.nodes if n not in inside]
    legend = f"default: {g.default}<br/>solid: allow, dashed: deny"
    out.append(f'  legend["{legend}"]')
    deny_links = []
    links = 0
    for e in g.labelled_edges:
        arrow = "-->" if e.action == "allow" else "-.->"
        out.append(f"  {e.src} {arrow}|{_mermaid_text(e.lines)}| {e.dst}")
        if e.action == "deny":
            deny_links.append(str(links))
        links += 1
    for grp in g.groups:
        out.append(f"  {grp.id}[{_mermaid_text(grp.rule.lines)}]")
        join, arrow = ("---", "-->") if grp.action == "allow" else ("-.-", "-.->")
        hops = [f"  {src} {join} {grp.id}" for src in grp.srcs]
        hops += [f"  {grp.id} {arrow} {dst}" for dst in grp.dsts]
        out += hops
        if grp.action == "deny":
            deny_links += [str(i) for i in range(links, links + len(hops))]
        links += len(hops)
    out += [
        "  classDef tier fill:#e8f1fb,stroke:#2563eb,color:#111",
        "  classDef internal fill:#eef7ee,stroke:#15803d,color:#111",
        "  classDef outside fill:#fff7e6,stroke:#b45309,color:#111",
        "  classDef cidr fill:#f5f5f5,stroke:#555,color:#111",
        "  classDef legend fill:#fff,stroke:#999,color:#333",
        "  classDef rule fill:#ffffff,stroke:#1f2937,color:#1f2937,font-size:11px",
    ]
    for cls, members in (
        ("tier", [n.id for n in g.nodes if n.kind == "tier" and not n.internal]),
        ("internal", [n.id for n in g.nodes if n.internal]),
        ("outside", [n.id for n in g.nodes if n.kind in ("external", "internet", "any")]),
        ("cidr", [n.id for n in g.nodes if n.kind == "cidr"]),
        ("legend", ["legend"]),
        ("rule", [grp.id for grp in g.groups]),
    ):
        if members:
            out.append(f"  class {','.join(members)} {cls}")
    if deny_links:
        out.append(f"  linkStyle {','.join(deny_links)} stroke:#dc2626,color:#dc2626")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- Graphviz


def _dot_text(lines: tuple[str, ...]) -> str:
    esc = [s.replace("\\", "\\\\").replace('"', '\\"') for s in lines]
    return '"' + "\\n".join(esc) + '"'


_DOT_NODE = {
    "tier": 'shape=box, style="rounded,filled", fillcolor="#e8f1fb", color="#2563eb"',
    "internal": 'shape=box, style="rounded,filled", fillcolor="#eef7ee", color="#15803d"',
    "external": 'shape=parallelogram, style=filled, fillcolor="#fff7e6", color="#b45309"',
    "internet": 'shape=ellipse, style=filled, fillcolor="#fff7e6", color="#b45309"',
    "any": 'shape=hexagon, style=filled, fillcolor="#fff7e6", color="#b45309"',
    "cidr": 'shape=box, style="rounded,filled,dashed", fillcolor="#f5f5f5", color="#555555"',
}


def to_dot(policy: Policy, title: str | None = None) -> str:
    """Graphviz DOT text of the same graph (top down, tiers in a cluster)."""
    g = policy_graph(policy)
    label = f"{title}\\n" if title else ""
    label += f"default: {g.default}; solid: allow, dashed red: deny"
    out = [
        "digraph policy {",
        f'  graph [rankdir=TB, fontname="Helvetica", fontsize=12, labelloc=t, '
        f'label="{label}", nodesep=0.4, ranksep=0.9];',
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9, color="#1f2937", fontcolor="#1f2937"];',
    ]

    def node_line(n: Node, indent: str) -> str:
        style = _DOT_NODE["internal" if n.internal else n.kind]
        return f"{indent}{n.id} [label={_dot_text(n.lines)}, {style}];"

    inside = [n for n in g.nodes if n.kind == "tier" or n.in_tier]
    out += ["  subgraph cluster_tiers {", '    label="tiers (vmbr0)"; style=dashed; '
            'color="#9ca3af";']
    out += [node_line(n, "    ") for n in inside]
    out.append("  }")
    out += [node_line(n, "  ") for n in g.nodes if n not in inside]
    deny = ', style=dashed, color="#dc2626", fontcolor="#dc2626"'
    for e in g.labelled_edges:
        attrs = f"label={_dot_text(e.lines)}"
        if e.action == "deny":
            attrs += deny
        out.append(f"  {e.src} -> {e.dst} [{attrs}];")
    for grp in g.groups:
        red = grp.action == "deny"
        color = "#dc2626" if red else "#1f2937"
        out.append(f"  {grp.id} [label={_dot_text(grp.rule.lines)}, shape=box, "
                   f'style="rounded{",dashed" if red else ""}", fontsize=9, '
                   f'margin="0.05,0.02", color="{color}", fontcolor="{color}"];')
        line = ', style=dashed, color="#dc2626"' if red else ""
        out += [f"  {src} -> {grp.id} [arrowhead=none{line}];" for src in grp.srcs]
        out += [f"  {grp.id} -> {dst}{f' [{line[2:]}]' if red else ''};" for dst in grp.dsts]
    out.append("}")
    return "\n".join(out) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render(dot_text: str, fmt: str) -> bytes:
    """DOT text -> SVG or PNG bytes through Graphviz ``dot``. GraphvizMissing if it can't."""
    if fmt not in RENDER_FORMATS:
        raise ValueError(f"cannot render {fmt!r}: one of {', '.join(RENDER_FORMATS)}")
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing("Graphviz `dot` is not installed: apt-get install graphviz "
                              "(or `make deps`), or use --format mermaid|dot")
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        raise GraphvizMissing(f"dot -T{fmt} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout
