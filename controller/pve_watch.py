"""Follow Proxmox's guest configs: read ``<dir>/lxc/*.conf`` and ``<dir>/qemu-server/*.conf``
every ``poll_s`` seconds and on demand (SIGHUP), hand what changed to the controller.

pmxcfs (/etc/pve) is a FUSE filesystem whose changes can come from another cluster
node: inotify does not see those, so this polls. The files are small; each poll reads
them all and compares their text with the last read, parsing (`topology.pve`) only when
something changed.

A directory without ``lxc`` and ``qemu-server`` (pmxcfs not mounted yet, or restarting
during an upgrade: the mountpoint is an empty directory) says nothing about the guests:
the last guests read stay in force until it is back. At start, before it was ever read,
no guest is declared by Proxmox (host.yaml's declarations still apply).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from controller.logs import get_logger
from topology.config import PveCfg
from topology.pve import Guests, parse_pve

log = get_logger("socknet.pve")
SUBDIRS = ("lxc", "qemu-server")
MAX_FILE_BYTES = 1 << 20  # a guest config is a few KB; pmxcfs caps files at 1 MiB


def read_pve_dir(root: Path) -> dict[str, str] | None:
    """{"lxc/200.conf": text, ...}; None when neither subdirectory exists."""
    out: dict[str, str] = {}
    seen = False
    for sub in SUBDIRS:
        try:
            names = sorted(os.listdir(root / sub))
        except OSError:
            continue
        seen = True
        for name in names:
            if not name.endswith(".conf"):
                continue
            try:
                with open(root / sub / name, "rb") as fh:
                    data = fh.read(MAX_FILE_BYTES)
            except OSError:
                continue  # removed between the listing and the read
            out[f"{sub}/{name}"] = data.decode("utf-8", errors="replace")
    return out if seen else None


class PveWatcher:
    """``poll()`` reads once and calls ``on_change(guests, reason)`` when the files differ
    from the last read (or ``force``); ``run(stop)`` polls until ``stop`` is set."""

    def __init__(self, cfg: PveCfg, on_change: Callable[[Guests, str], None]) -> None:
        self.root = Path(cfg.dir)
        self.poll_s = cfg.poll_s
        self.on_change = on_change
        self.guests = Guests()
        self._digest: str | None = None
        self._available: bool | None = None
        self._lock = threading.Lock()

    def poll(self, reason: str = "poll", force: bool = False) -> bool:
        """True if ``on_change`` was called."""
        with self._lock:
            files = read_pve_dir(self.root)
            if files is None:
                if self._available is not False:
                    log.warning("pve_unavailable", dir=str(self.root),
                                kept_interfaces=len(self.guests.nics),
                                reason="no lxc/ or qemu-server/ (not Proxmox, or pmxcfs "
                                       "not mounted): the last guests read stay in force")
                self._available = False
                return False
            self._available = True
            digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
            if digest == self._digest and not force:
                return False
            self._digest = digest
            self.guests = parse_pve(files)
            guests = self.guests
        self.on_change(guests, reason)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a bad read must never stop the following
                log.exception("pve_poll_failed")

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name="socknet-pve", daemon=True)
        t.start()
        return t
