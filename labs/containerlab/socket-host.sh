#!/usr/bin/env bash
# What socket-host.clab.yml needs around `containerlab deploy` / `destroy`:
# the two OVS bridges (containerlab does not create them) and the socknet controller.
#
#   sudo labs/containerlab/socket-host.sh up          bridges + socknet, then containerlab deploy
#   sudo labs/containerlab/socket-host.sh down        containerlab destroy, socknet, bridges
#   sudo labs/containerlab/socket-host.sh bridges     only the bridges and socknet (no containerlab)
#   sudo labs/containerlab/socket-host.sh status      socknet status + containerlab inspect
#
# Bridges: `socknet bootstrap -c host.yaml` creates mesh and vmbr0 on the system
# Open vSwitch (datapath netdev, fail_mode=secure, OpenFlow13+14), the
# to-socket/from-mesh veth pair between them, and points both bridges at the
# controller (target tcp:127.0.0.1:6653 from host.yaml's controller.listen,
# out-of-band). Controller: `socknet run -c host.yaml` runs on the host, log and
# pid in $RUN_DIR. It refuses to start if mesh or vmbr0 already exist and were
# not made by this script, and `down` removes bridges only if it made them.
#
# Needs root, the system OVS running (`systemctl start openvswitch-switch`; no
# kernel module: start ovsdb-server/ovs-vswitchd by hand as labs/mininet_socket.py
# does), the project's venv (`make venv`) and, for up/down, Docker + containerlab.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
CONFIG="${CONFIG:-$HERE/host.yaml}"
TOPO="$HERE/socket-host.clab.yml"
RUN_DIR="${RUN_DIR:-/run/socknet-clab}"
PIDFILE="$RUN_DIR/socknet.pid"
LOG="$RUN_DIR/socknet.log"
MARKER="$RUN_DIR/bridges-created"
BRIDGES=(mesh vmbr0)

die() { echo "socket-host.sh: $*" >&2; exit 1; }
socknet() { (cd "$REPO" && "$PY" -m controller.cli "$@"); }

need_ovs() {
    ovs-vsctl --timeout=5 show >/dev/null 2>&1 \
        || die "the system Open vSwitch does not answer (systemctl start openvswitch-switch)"
}

bridges_up() {
    need_ovs
    mkdir -p "$RUN_DIR"
    if [ ! -e "$MARKER" ]; then
        for br in "${BRIDGES[@]}"; do
            if ovs-vsctl br-exists "$br"; then
                die "bridge $br already exists and was not created by this script; refusing"
            fi
        done
        touch "$MARKER"
    fi
    socknet validate -c "$CONFIG"
    socknet bootstrap -c "$CONFIG"
    controller_up
}

controller_up() {
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "socknet already running (pid $(cat "$PIDFILE"))"
        return
    fi
    : >"$LOG"
    (cd "$REPO" && exec setsid "$PY" -m controller.cli run -c "$CONFIG" \
        </dev/null >>"$LOG" 2>&1) &
    echo $! >"$PIDFILE"
    for _ in $(seq 150); do
        if grep '"event": "reconciled"' "$LOG" | grep -q '"bridge": "vmbr0"'; then
            echo "socknet running (pid $(cat "$PIDFILE")), log $LOG"
            return
        fi
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$LOG" >&2; die "socknet exited"; }
        sleep 0.1
    done
    tail -20 "$LOG" >&2
    die "socknet did not program vmbr0 within 15 s"
}

controller_down() {
    if [ -f "$PIDFILE" ]; then
        kill "$(cat "$PIDFILE")" 2>/dev/null || true
        rm -f "$PIDFILE"
    fi
}

bridges_down() {
    controller_down
    if [ ! -e "$MARKER" ]; then
        echo "bridges were not created by this script: left alone"
        return
    fi
    need_ovs
    (cd "$REPO" && "$PY" - "$CONFIG" <<'EOF'
import sys
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
from controller.bootstrap import teardown  # noqa: E402
from topology.config import load_host_config  # noqa: E402

removed = teardown(load_host_config(sys.argv[1]))
print("removed: " + (", ".join(removed) if removed else "nothing"))
EOF
    )
    rm -f "$MARKER"
}

case "${1:-}" in
    up)
        command -v containerlab >/dev/null || die "containerlab is not installed"
        bridges_up
        containerlab deploy -t "$TOPO"
        ;;
    down)
        if command -v containerlab >/dev/null; then
            containerlab destroy -t "$TOPO" --cleanup || true
        fi
        bridges_down
        ;;
    bridges)
        bridges_up
        ;;
    status)
        socknet status -c "$CONFIG" || true
        if command -v containerlab >/dev/null; then containerlab inspect -t "$TOPO" || true; fi
        ;;
    *)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ "${1:-}" = "help" ]
        ;;
esac
