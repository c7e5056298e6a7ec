# socknet: every target installs what it needs and is safe to run twice.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PKGS := openvswitch-switch openvswitch-common wireguard-tools wireguard-go iproute2 \
            ethtool iputils-ping iperf3 tcpdump procps psmisc python3-venv graphviz \
            mininet net-tools openssl
HOSTS ?= 1
# net-*: the host.yaml to act on, and its reviewed plan (seed 000: network-plan.json)
CONFIG ?= /etc/socknet/host.yaml
PLAN ?= $(dir $(CONFIG))network-plan.json

.PHONY: deps venv demo test unit lint lab-up lab-down bench clean

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

demo: venv
	$(PY) -m labs.demo

lab-up: venv
	$(PY) -m labs.lab up --hosts $(HOSTS)

lab-down: venv
	$(PY) -m labs.lab down

lint: venv
	$(VENV)/bin/ruff check .

test: venv
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
