"""`socknet run`: os-ken + the OVSDB follower + the reconcile worker in one process."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from controller.logs import get_logger
from controller.runtime import Controller
from topology.config import HostConfig

log = get_logger("socknet.service")


def run_controller(cfg: HostConfig, audit_interval_s: float = 30.0) -> None:
    os.environ.setdefault("OSKEN_HUB_TYPE", "native")
    from os_ken import cfg as osken_cfg
    from os_ken.base.app_manager import AppManager

    from apps import socknet_app
    from controller.ovsdb import OvsdbView

    controller = Controller(cfg, audit_interval_s=audit_interval_s)
    socknet_app.bind(controller)
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

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)

    osken_cfg.CONF(
        args=[
            "--ofp-listen-host", cfg.controller.host,
            "--ofp-tcp-listen-port", str(cfg.controller.port),
        ],
        project="os_ken",
    )
    controller.start()
    threading.Thread(target=follow_ovsdb, name="socknet-ovsdb", daemon=True).start()
    log.info("started", listen=cfg.controller.listen, ovsdb=cfg.ovsdb, host=cfg.host)
    AppManager.run_apps(["apps.socknet_app"])
