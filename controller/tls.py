"""Safe defaults for the controller's listeners and the OpenFlow TLS channel.

* ``osken_args(cfg)``: the os-ken command line for ``controller.listen``:
  ``ssl:`` (the default) a TLS listener (and no plain one) that presents the
  controller certificate and refuses every switch whose certificate was not
  signed by the CA (os-ken sets ``CERT_REQUIRED`` when ``--ca-certs`` is given);
  ``tcp:`` (only with ``insecure_tcp: true``) a plain listener.
  The files: ``cfg.controller.tls_files`` (bootstrap's per-host PKI in
  ``pki_dir``, see controller.pki, or a ``tls:`` block).
* ``ovs_ssl(cfg)``: what ``socknet bootstrap`` writes into OVSDB's ``SSL``
  table so that ovs-vswitchd presents its own certificate and checks ours.
* ``exposure_warnings(cfg)``: one line per listener that is reachable from
  outside the host (logged by ``socknet run``, printed by ``socknet validate``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from topology.config import HostConfig


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def osken_args(cfg: HostConfig) -> list[str]:
    """``os_ken.cfg.CONF(args=...)`` for the OpenFlow listener of ``cfg``."""
    ctl = cfg.controller
    args = ["--ofp-listen-host", ctl.host]
    tls = ctl.tls_files
    if tls is None:
        return [*args, "--ofp-tcp-listen-port", str(ctl.port)]
    return [
        *args,
        "--ofp-ssl-listen-port", str(ctl.port),
        "--ctl-privkey", tls.key,
        "--ctl-cert", tls.cert,
        "--ca-certs", tls.ca_cert,
    ]  # fmt: skip


def ovs_ssl(cfg: HostConfig) -> dict[str, str] | None:
    """Columns of OVSDB's SSL row for ``cfg`` (None: plain tcp, the SSL table is left alone)."""
    tls = cfg.controller.tls_files
    if tls is None:
        return None
    return {"private_key": tls.switch_key, "certificate": tls.switch_cert,
            "ca_cert": tls.switch_ca}


def missing_files(cfg: HostConfig) -> list[str]:
    """What `socknet run` needs and does not find: one line per missing TLS file."""
    tls = cfg.controller.tls_files
    if tls is None:
        return []
    hint = (" (socknet bootstrap creates it)" if cfg.controller.managed_pki else "")
    return [f"controller.{'pki_dir' if cfg.controller.managed_pki else 'tls'}: {path}: "
            f"no such file{hint}"
            for path in dict.fromkeys((tls.key, tls.cert, tls.ca_cert))
            if not Path(path).is_file()]


def exposure_warnings(cfg: HostConfig) -> list[str]:
    """Listeners that accept connections from other machines, one line each."""
    out = []
    ctl = cfg.controller
    if not is_loopback(ctl.host):
        tls = ctl.tls_files
        how = ("TLS, switch certificates checked against " + tls.ca_cert
               if tls is not None else "plain TCP, no authentication: anyone who reaches "
               "it can program the bridges; prefer loopback or ssl:")
        out.append(f"controller.listen {ctl.listen} is not a loopback address ({how})")
    if cfg.metrics.enabled and not is_loopback(cfg.metrics.host):
        out.append(f"metrics.listen {cfg.metrics.listen} is not a loopback address "
                   "(the metrics endpoint has no authentication)")
    return out
