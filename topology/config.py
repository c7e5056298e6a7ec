"""host.yaml: one per Proxmox host. Validated fully before anything is applied.

Errors name the file, the line and the field (`ConfigError`); the CLI turns
them into exit status 2.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from topology.fleet import check_host_name
from topology.yamlpos import (
    LineIndex,
    capped,
    load_with_lines,
    read_config,
    validation_problems,
    yaml_problem,
)

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]-]{1,15}$")
LISTEN_RE = re.compile(r"^(tcp|ssl):(?P<host>[0-9a-fA-F.:\[\]]+):(?P<port>\d{1,5})$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_CONTAINERS = 10_000
MAX_UPLINKS = 64
MAX_TEXT = 4096  # characters of a name, path or address setting


class ConfigError(Exception):
    """One or more problems in a config file, each with file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        problems = capped(problems)
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    # strict: a number or a boolean where a string is expected (and the other way
    # round) is an error, not converted
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _plain_text(value: str) -> str:
    """No control characters (a NUL ends a path in every system call) and a sane length."""
    if len(value) > MAX_TEXT:
        raise ValueError(f"longer than {MAX_TEXT} characters")
    m = CONTROL_RE.search(value)
    if m is not None:
        raise ValueError(f"contains the control character U+{ord(m.group()):04X}")
    return value


Text = Annotated[str, AfterValidator(_plain_text)]


def _ifname(value: str) -> str:
    if not isinstance(value, str) or not IFNAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid interface name (1-15 chars, no spaces or /)")
    return value


IfName = Annotated[str, BeforeValidator(_ifname)]


class IdRange(_Strict):
    first: int = Field(ge=100, le=999_999_999)
    last: int = Field(ge=100, le=999_999_999)

    @model_validator(mode="after")
    def _ordered(self) -> IdRange:
        if self.first > self.last:
            raise ValueError(f"first ({self.first}) is greater than last ({self.last})")
        return self

    def __contains__(self, vmid: int) -> bool:
        return self.first <= vmid <= self.last

    def overlaps(self, other: IdRange) -> bool:
        return self.first <= other.last and other.first <= self.last


def _id_range(value: Any) -> Any:
    """Accept "100-199" as well as {first: 100, last: 199}."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"{value!r} is not an id range like '100-199'")
        return {"first": int(m.group(1)), "last": int(m.group(2))}
    return value


IdRangeField = Annotated[IdRange, BeforeValidator(_id_range)]


def _existing_file(value: Any) -> str:
    """An absolute path to a file that exists (both os-ken and ovs-vswitchd read it)."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected the absolute path of a file")
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"{value!r} is not an absolute path (ovs-vswitchd and the controller "
                         "run in other working directories)")
    if not path.is_file():
        raise ValueError(f"{value}: no such file")
    return value


ExistingFile = Annotated[str, BeforeValidator(_existing_file)]


PKI_FILES = ("controller-key.pem", "controller-cert.pem", "ca-cert.pem", "switch-key.pem",
             "switch-cert.pem", "ca-cert.pem")  # the fields of TlsFiles, in order


@dataclass(frozen=True)
class TlsFiles:
    """Both ends of the TLS channel: os-ken's key, certificate and the CA it checks
    switches against; ovs-vswitchd's (OVSDB SSL row) key, certificate and CA."""

    key: str
    cert: str
    ca_cert: str
    switch_key: str
    switch_cert: str
    switch_ca: str


class TlsCfg(_Strict):
    """The OpenFlow TLS channel (``controller.listen: ssl:...``), both ends.

    The controller presents ``cert`` and accepts only switches whose certificate
    ``ca_cert`` signed; ``socknet bootstrap`` writes the switch side into OVSDB's
    SSL table: ovs-vswitchd presents ``switch_cert`` and accepts only a controller
    whose certificate ``switch_ca_cert`` (default: ``ca_cert``) signed.
    """

    key: ExistingFile  # controller private key (os-ken --ctl-privkey)
    cert: ExistingFile  # controller certificate (--ctl-cert)
    ca_cert: ExistingFile  # CA of the switch certificates (--ca-certs)
    switch_key: ExistingFile  # ovs-vswitchd: SSL private_key
    switch_cert: ExistingFile  # ovs-vswitchd: SSL certificate
    switch_ca_cert: ExistingFile | None = None  # ovs-vswitchd: SSL ca_cert

    @property
    def switch_ca(self) -> str:
        return self.switch_ca_cert or self.ca_cert


DEFAULT_PKI_DIR = "/var/lib/socknet/pki"


class ControllerCfg(_Strict):
    """The OpenFlow channel. Default: ``ssl:`` on loopback with a per-host PKI that
    ``socknet bootstrap`` creates in ``pki_dir`` (or the files of a ``tls:`` block).
    Plain ``tcp:`` only with ``insecure_tcp: true``: unauthenticated, any local process
    can connect and speak for a switch (docs/security.md)."""

    insecure_tcp: bool = False  # declared before listen: listen's check reads it
    listen: str = "ssl:127.0.0.1:6653"
    pki_dir: str = DEFAULT_PKI_DIR  # bootstrap's CA, controller and switch certificates
    max_backoff_ms: int = Field(default=1000, ge=1000, le=60_000)
    inactivity_probe_ms: int = Field(default=5000, ge=1000, le=3_600_000)
    tls: TlsCfg | None = None  # the operator's own PKI instead of pki_dir (ssl: only)

    @model_validator(mode="after")
    def _tls_matches_listen(self) -> ControllerCfg:
        if not self.listen.startswith("ssl:") and self.tls is not None:
            raise ValueError(f"tls: is only used with listen: ssl:ADDRESS:PORT, not "
                             f"{self.listen!r}")
        if self.listen.startswith("ssl:") and self.insecure_tcp:
            raise ValueError(f"insecure_tcp: true is only used with listen: tcp:..., not "
                             f"{self.listen!r}")
        return self

    @field_validator("pki_dir")
    @classmethod
    def _pki_dir(cls, value: str) -> str:
        if not Path(value).is_absolute():
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @property
    def managed_pki(self) -> bool:
        """ssl: with the certificates bootstrap makes (no tls: block)."""
        return self.listen.startswith("ssl:") and self.tls is None

    @property
    def tls_files(self) -> TlsFiles | None:
        """The files of both ends of the TLS channel (None: plain tcp)."""
        if not self.listen.startswith("ssl:"):
            return None
        if self.tls is not None:
            t = self.tls
            return TlsFiles(t.key, t.cert, t.ca_cert, t.switch_key, t.switch_cert, t.switch_ca)
        d = Path(self.pki_dir)
        return TlsFiles(*(str(d / name) for name in PKI_FILES))

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str, info: ValidationInfo) -> str:
        m = LISTEN_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not tcp:ADDRESS:PORT or ssl:ADDRESS:PORT")
        ipaddress.ip_address(m.group("host").strip("[]"))
        if not 0 < int(m.group("port")) < 65536:
            raise ValueError(f"port {m.group('port')} out of range")
        if value.startswith("tcp:") and not info.data.get("insecure_tcp", False):
            raise ValueError(
                f"{value!r} is plain TCP: no authentication, any local process can connect "
                "and pose as a switch. Use ssl: (the default; socknet bootstrap makes the "
                "certificates), or set controller.insecure_tcp: true to accept the risk "
                "(unsafe on shared hosts)")
        return value

    @property
    def host(self) -> str:
        m = LISTEN_RE.match(self.listen)
        assert m
        return m.group("host").strip("[]")

    @property
    def port(self) -> int:
        m = LISTEN_RE.match(self.listen)
        assert m
        return int(m.group("port"))

    @property
    def ovs_target(self) -> str:
        """How ovs-vswitchd reaches this controller (it connects out)."""
        proto = self.listen.split(":", 1)[0]
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{proto}:{host}:{self.port}"


class MetricsCfg(_Strict):
    enabled: bool = True
    listen: str = "127.0.0.1:9464"  # loopback unless you say otherwise

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not ADDRESS:PORT")
        ipaddress.ip_address(host.strip("[]"))
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class MeshBridgeCfg(_Strict):
    name: IfName = "mesh"
    uplinks: list[IfName] = Field(default_factory=lambda: ["nm-privacy"], min_length=1,
                                  max_length=MAX_UPLINKS)
    to_socket: IfName = "to-socket"
    # The mesh's WireGuard device (Netmaker: `netmaker`, older `nm-<net>`) and, for
    # wireguard-go, the directory of its UAPI socket <wg_sock_dir>/<wg_interface>.sock.
    wg_interface: IfName = "netmaker"
    wg_sock_dir: Text = "/var/run/wireguard"
    # true: socknet itself keeps one kernel VXLAN device `vx-<hash>` per live peer of
    # wg_interface as a port of this bridge (controller.peersync); false: the `vx-*`
    # devices (or whatever `uplinks` names) are made by someone else.
    vxlan: bool = False
    # a peer whose latest handshake is older than this is gone: its device goes too
    stale_after_s: int = Field(default=180, ge=10, le=86_400)

    @model_validator(mode="after")
    def _vxlan_ports_are_uplinks(self) -> MeshBridgeCfg:
        import fnmatch

        if self.vxlan and not any(fnmatch.fnmatchcase("vx-0123abcd", p) for p in self.uplinks):
            raise ValueError("vxlan: true needs an uplink pattern that matches socknet's "
                             "per-peer devices, e.g. uplinks: [\"vx-*\"]")
        return self


class SocketBridgeCfg(_Strict):
    name: IfName = "vmbr0"
    from_mesh: IfName = "from-mesh"
    warp: IfName = "warp0"
    gateway: IfName | None = None  # the host's router port for service containers, if any
    privacy_ids: IdRangeField = IdRange(first=100, last=199)
    service_ids: IdRangeField = IdRange(first=200, last=299)

    @model_validator(mode="after")
    def _disjoint(self) -> SocketBridgeCfg:
        if self.privacy_ids.overlaps(self.service_ids):
            raise ValueError(
                f"privacy_ids {self.privacy_ids.first}-{self.privacy_ids.last} and service_ids "
                f"{self.service_ids.first}-{self.service_ids.last} overlap"
            )
        named = [n for n in (self.from_mesh, self.warp, self.gateway) if n is not None]
        if len(set(named)) != len(named):
            raise ValueError("from_mesh, warp and gateway must be different ports")
        return self


class BridgesCfg(_Strict):
    mesh: MeshBridgeCfg
    socket: SocketBridgeCfg

    @model_validator(mode="after")
    def _distinct(self) -> BridgesCfg:
        if self.mesh.name == self.socket.name:
            raise ValueError(f"mesh and socket bridges have the same name {self.mesh.name!r}")
        return self


class ContainerCfg(_Strict):
    """Addresses of a container, when known (Proxmox hwaddr / ip in the CT config)."""

    mac: str | None = None
    ip: ipaddress.IPv4Interface | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        low = value.lower()
        if not MAC_RE.match(low):
            raise ValueError(f"{value!r} is not a MAC address like 02:00:00:00:01:00")
        if int(low[:2], 16) & 1:
            raise ValueError(f"{value!r} is a multicast MAC address")
        return low

    @field_validator("ip", mode="before")
    @classmethod
    def _ip(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return ipaddress.IPv4Interface(str(value))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IPv4 address or CIDR: {exc}") from None


class PveCfg(_Strict):
    """Proxmox's guest configs, the authority on container addresses (see topology.pve)."""

    dir: str = "/etc/pve"  # absent (a lab, a non-Proxmox host): host.yaml declares alone
    poll_s: float = Field(default=2.0, ge=0.2, le=600)  # pmxcfs is FUSE: no inotify

    @field_validator("dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value


def _abs_path(value: Any) -> str:
    """An absolute path (the file may not exist yet: `socknet fleet init` makes it)."""
    if not isinstance(value, str) or not value or not Path(value).is_absolute():
        raise ValueError(f"{value!r} is not an absolute path")
    return value


AbsPath = Annotated[str, BeforeValidator(_abs_path)]


class FleetTlsCfg(_Strict):
    """This host's identity in the fleet database: its certificate's CN is ``host``."""

    key: AbsPath
    cert: AbsPath
    ca_cert: AbsPath  # the fleet CA: members and hosts are checked against it


class FleetMemberCfg(_Strict):
    """Present on the 3 or 5 hosts that run a member of the fleet database."""

    address: str  # this member's mesh address (one of fleet.members)
    db: AbsPath = "/var/lib/socknet/fleet/fleet.db"
    run_dir: AbsPath = "/run/socknet-fleet"  # pidfile, unixctl, admin.sock


class FleetCfg(_Strict):
    """The fleet database (docs/fleet.md): a Raft cluster of ovsdb-server members."""

    members: list[str] = Field(min_length=3, max_length=5)  # the members' mesh addresses
    client_port: int = Field(default=6641, ge=1, le=65535)
    raft_port: int = Field(default=6643, ge=1, le=65535)
    tls: FleetTlsCfg
    member: FleetMemberCfg | None = None
    heartbeat_s: int = Field(default=10, ge=1, le=600)

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str]) -> list[str]:
        if len(value) not in (3, 5):
            raise ValueError(f"{len(value)} members: a fleet database has 3 or 5 (a majority "
                             "must survive one or two failures)")
        out = [str(ipaddress.ip_address(a)) for a in value]
        if len(set(out)) != len(out):
            raise ValueError("a member address is listed twice")
        return out

    @model_validator(mode="after")
    def _ports_and_member(self) -> FleetCfg:
        if self.client_port == self.raft_port:
            raise ValueError("client_port and raft_port must differ")
        if self.member is not None and str(ipaddress.ip_address(self.member.address)) \
                not in self.members:
            raise ValueError(f"member.address {self.member.address} is not one of members")
        return self


class HostConfig(_Strict):
    host: Text = "localhost"
    ovsdb: Text = "unix:/var/run/openvswitch/db.sock"
    datapath_type: Literal["system", "netdev"] = "system"
    controller: ControllerCfg = ControllerCfg()
    metrics: MetricsCfg = MetricsCfg()
    bridges: BridgesCfg
    containers: dict[int, ContainerCfg] = Field(default_factory=dict,  # wins over pve
                                                max_length=MAX_CONTAINERS)
    pve: PveCfg | None = PveCfg()  # null: no Proxmox authority
    # declared: only addresses from pve/containers; learn-first-packet: also bind an
    # undeclared container to its first packet's addresses (never a policy-named one)
    addresses: Literal["declared", "learn-first-packet"] = "declared"
    policy: Text | None = None
    fleet: FleetCfg | None = None  # None: a single host, no fleet database (the default)

    @field_validator("ovsdb")
    @classmethod
    def _ovsdb(cls, value: str) -> str:
        if not re.match(r"^(unix:/.+|tcp:[^:]+:\d+|ssl:[^:]+:\d+)$", value):
            raise ValueError(f"{value!r} is not an OVSDB remote (unix:/path or tcp:HOST:PORT)")
        return value

    @model_validator(mode="after")
    def _containers_in_ranges(self) -> HostConfig:
        s = self.bridges.socket
        for vmid in self.containers:
            if vmid not in s.privacy_ids and vmid not in s.service_ids:
                raise ValueError(
                    f"container {vmid} is in neither privacy_ids nor service_ids"
                )
        return self

    @model_validator(mode="after")
    def _fleet_host_name(self) -> HostConfig:
        if self.fleet is not None:
            if "host" not in self.model_fields_set:
                raise ValueError("fleet: needs host: (this host's name in the fleet, the CN "
                                 "of its certificate)")
            check_host_name(self.host)
        return self

    def container(self, vmid: int) -> ContainerCfg:
        return self.containers.get(vmid, ContainerCfg())

    @property
    def learning(self) -> bool:
        return self.addresses == "learn-first-packet"


def load_host_config(path: str | Path) -> HostConfig:
    """Parse and validate host.yaml. Raises ConfigError with file:line: field: reason."""
    path = str(path)
    try:
        text = read_config(path)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(path, exc)]) from None
    return parse_host_config(text, path)


def parse_host_config(text: str, path: str = "<string>") -> HostConfig:
    try:
        root, data = load_with_lines(text)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(path, exc)]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: (top level): expected a mapping of settings"])
    if "tiers" in data and "bridges" not in data:
        raise ConfigError([f"{path}:1: this looks like a policy.yaml: use socknet check "
                           f"{path}"])
    try:
        cfg = HostConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(path, root, exc)) from None
    problems = duplicate_addresses(cfg, LineIndex(root), path)
    if problems:
        raise ConfigError(problems)
    return cfg


def duplicate_addresses(cfg: HostConfig, lines: LineIndex, path: str) -> list[str]:
    """Two containers declared with one MAC or one IPv4 address: each would steal the
    other's traffic (two table-40 flows with one match and different ports)."""
    problems = []
    seen: dict[tuple[str, str], int] = {}
    for vmid, c in cfg.containers.items():
        for field, value in (("mac", c.mac), ("ip", None if c.ip is None else str(c.ip.ip))):
            if value is None:
                continue
            first = seen.setdefault((field, value), vmid)
            if first != vmid:
                what = "MAC" if field == "mac" else "IPv4 address"
                problems.append(
                    f"{path}:{lines.line(('containers', vmid, field))}: containers.{vmid}."
                    f"{field}: {value} is also the {what} of container {first} "
                    f"({path}:{lines.line(('containers', first, field))})")
    return problems
