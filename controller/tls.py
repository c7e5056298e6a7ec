"""Safe defaults for the controller's listeners and the optional OpenFlow TLS channel.

* ``osken_args(cfg)``: the os-ken command line for ``controller.listen``:
  ``tcp:`` gives a plain listener; ``ssl:`` a TLS listener (and no plain one)
  that presents ``tls.cert`` and refuses every switch whose certificate was not
  signed by ``tls.ca_cert`` (os-ken sets ``CERT_REQUIRED`` when ``--ca-certs``
  is given).
* ``ovs_ssl(cfg)``: what ``socknet bootstrap`` writes into OVSDB's ``SSL``
  table so that ovs-vswitchd presents its own certificate and checks ours.
* ``exposure_warnings(cfg)``: one line per listener that is reachable from
  outside the host (logged by ``socknet run``, printed by ``socknet validate``).
"""

from __future__ import annotations

import ipaddress

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
    if ctl.tls is None:
        return [*args, "--ofp-tcp-listen-port", str(ctl.port)]
    return [
        *args,
        "--ofp-ssl-listen-port", str(ctl.port),
        "--ctl-privkey", ctl.tls.key,
        "--ctl-cert", ctl.tls.cert,
        "--ca-certs", ctl.tls.ca_cert,
    ]  # fmt: skip


def ovs_ssl(cfg: HostConfig) -> dict[str, str] | None:
    """Columns of OVSDB's SSL row for ``cfg`` (None: plain tcp, the SSL table is left alone)."""
    tls = cfg.controller.tls
    if tls is None:
        return None
    return {"private_key": tls.switch_key, "certificate": tls.switch_cert,
            "ca_cert": tls.switch_ca}


def exposure_warnings(cfg: HostConfig) -> list[str]:
    """Listeners that accept connections from other machines, one line each."""
    out = []
    ctl = cfg.controller
    if not is_loopback(ctl.host):
        how = ("TLS, switch certificates checked against " + ctl.tls.ca_cert
               if ctl.tls is not None else "plain TCP, no authentication: anyone who reaches "
               "it can program the bridges; prefer loopback or ssl:")
        out.append(f"controller.listen {ctl.listen} is not a loopback address ({how})")
    if cfg.metrics.enabled and not is_loopback(cfg.metrics.host):
        out.append(f"metrics.listen {cfg.metrics.listen} is not a loopback address "
                   "(the metrics endpoint has no authentication)")
    return out
