# socknet: every target installs what it needs and is safe to run twice.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PKGS := openvswitch-switch openvswitch-common wireguard-tools wireguard-go iproute2 \
            ethtool iputils-ping iperf3 tcpdump procps psmisc python3-venv
HOSTS ?= 1

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

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) *.egg-info
