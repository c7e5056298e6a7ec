# socknet: every target installs what it needs and is safe to run twice.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PKGS := openvswitch-switch openvswitch-common wireguard-tools wireguard-go iproute2 \
            ethtool iputils-ping iperf3 tcpdump procps psmisc python3-venv graphviz \
            mininet net-tools openssl curl systemd
HOSTS ?= 1
# lab-up: a policy.yaml to enforce (one service container per tier), e.g.
# make lab-up POLICY=examples/pmoves-tiers.yaml
POLICY ?=
# install: where `socknet` goes on root's PATH (the systemd unit runs
# /usr/local/bin/socknet) and where the unit's Documentation= points
BINDIR ?= /usr/local/bin
DOCDIR ?= /usr/share/doc/socknet
# net-*: the host.yaml to act on, and its reviewed plan (seed 000: network-plan.json)
CONFIG ?= /etc/socknet/host.yaml
PLAN ?= $(dir $(CONFIG))network-plan.json

.PHONY: deps venv install demo test unit lint lab-up lab-down bench clean

# System packages (Debian 12, root). Only calls apt when something is missing.
deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: setup.cfg requirements.lock
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements.lock -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

# `socknet` on root's PATH, as the README and the systemd unit use it, and the
# operations guide where the unit's Documentation= points.
install: venv
	ln -sfn $(abspath $(VENV))/bin/socknet $(BINDIR)/socknet
	install -D -m 0644 docs/operations.md $(DOCDIR)/operations.md

demo: install
	$(PY) -m labs.demo

lab-up: install
	$(PY) -m labs.lab up --hosts $(HOSTS) $(if $(POLICY),--policy $(POLICY))

lab-down: venv
	$(PY) -m labs.lab down

lint: venv
	$(VENV)/bin/ruff check .

# install: tests/test_ops.py verifies the shipped systemd unit, whose ExecStart= is
# /usr/local/bin/socknet
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider

unit: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not ovs"

# Deterministic bootstrap (seed 000): write the plan, review it, apply it.
.PHONY: net-plan net-bootstrap net-status
net-plan: venv
	$(VENV)/bin/socknet plan -c $(CONFIG) -o $(PLAN)

# Refuses (exit 2) when $(PLAN) exists and no longer matches $(CONFIG).
net-bootstrap: venv
	$(VENV)/bin/socknet bootstrap -c $(CONFIG) $(if $(wildcard $(PLAN)),--plan $(PLAN))

net-status: venv
	$(VENV)/bin/socknet status -c $(CONFIG)

# One host's socket network in Mininet (user-datapath OVS, socknet as RemoteController):
# up, ping verdicts, down. Starts the system OVS daemons if they are not running.
.PHONY: mininet mininet-clean
mininet: venv
	$(PY) -m labs.mininet_socket --check

mininet-clean: venv
	$(PY) -m labs.mininet_socket --clean

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) *.egg-info
