"""`socknet run`: os-ken + the OVSDB follower + the reconcile worker in one process."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

from controller.logs import get_logger
from controller.runtime import Controller
from topology.config import HostConfig

log = get_logger("socknet.service")


def run_controller(cfg: HostConfig, audit_interval_s: float = 30.0,
                   policy_path: Path | None = None) -> None:
    os.environ.setdefault("OSKEN_HUB_TYPE", "native")
    from os_ken import cfg as osken_cfg
    from os_ken.base.app_manager import AppManager

    from apps import socknet_app
    from controller.ovsdb import OvsdbView
    from controller.reload import PolicyReloader, load_checked

    # Proxmox's guest configs are read once before anything is reconciled (the controller
    # waits for them, guests_pending): a restart must never take a container's flows
    # away for the moment before Proxmox's declarations are known
    watcher = None
    if cfg.pve is not None:
        from controller.pve_watch import PveWatcher

        watcher = PveWatcher(cfg.pve, lambda _guests, _why: None)
        watcher.poll("start")
    controller = Controller(cfg, audit_interval_s=audit_interval_s,
                            policy_pending=policy_path is not None,
                            guests_pending=watcher is not None)
    if watcher is not None:
        watcher.on_change = controller.set_guests
        controller.set_guests(watcher.guests, "start")  # logs what was read, its conflicts
    else:
        controller.log_conflicts()  # host.yaml's own

    def load_policy() -> None:
        """In the background, so the OpenFlow listener is up at once: OVS backs off
        (1, 2, 4 s ...) while nobody listens, whatever max_backoff says."""
        assert policy_path is not None
        policy, problems = load_checked(policy_path)
        if policy is None:
            # Refuse to run: the flows already on the switches stay in force
            # (fail_mode=secure), which is safer than running without the policy.
            for problem in problems:
                log.error("policy_invalid", path=str(policy_path), problem=problem)
            os._exit(2)
        controller.set_policy(policy)
        log.info("policy_loaded", path=str(policy_path), rules=len(policy.rules))
    socknet_app.bind(controller)
    reloader = PolicyReloader(policy_path, controller) if policy_path is not None else None
    stop = threading.Event()

    view = OvsdbView(cfg.ovsdb)

    def follow_ovsdb() -> None:
        view.watch(lambda snap: controller.ovsdb_changed(snap.ports, snap.dpids), stop)

    def shutdown(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()
        controller.stop()
        # Flows stay on the switches (fail_mode=secure): nothing to clean up there.
        os._exit(0)

    def hangup(_signum: int, _frame: FrameType | None) -> None:
        if watcher is not None:  # re-read Proxmox's guest configs now
            threading.Thread(target=watcher.poll, args=("SIGHUP", True), daemon=True).start()
        if reloader is None:
            log.info("sighup_ignored", reason="no policy file configured")
            return
        threading.Thread(target=reloader.reload, args=("SIGHUP",), daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGHUP, hangup)
    if reloader is not None:
        reloader.watch()

    from controller.tls import exposure_warnings, osken_args

    for warning in exposure_warnings(cfg):
        log.warning("listener_not_loopback", problem=warning)
    # tcp: a plain listener; ssl: a TLS listener only, switch certificates checked
    osken_cfg.CONF(args=osken_args(cfg), project="os_ken")
    controller.start()
    threading.Thread(target=follow_ovsdb, name="socknet-ovsdb", daemon=True).start()
    if watcher is not None:
        watcher.start(stop)
    if cfg.bridges.mesh.vxlan:
        from controller.peersync import start_thread

        # one VXLAN port per live WireGuard peer, followed every few seconds
        start_thread(cfg, stop)
    if cfg.metrics.enabled:
        from controller.metrics import serve_metrics

        serve_metrics(controller, cfg.metrics.host, cfg.metrics.port)
    if policy_path is not None:
        threading.Thread(target=load_policy, name="socknet-policy", daemon=True).start()
    log.info("started", listen=cfg.controller.listen, ovsdb=cfg.ovsdb, host=cfg.host,
             policy=str(policy_path) if policy_path else None)
    AppManager.run_apps(["apps.socknet_app"])
