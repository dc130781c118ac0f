# The two set-up commands of the README. Each bootstraps everything it needs on a fresh
# Debian machine: system packages (when missing), the .venv, and the Python dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# kubernetes-client (kubectl kustomize) only where no kubectl is installed: its /usr/bin/kubectl
# would clash with another package's (e.g. the Google Cloud SDK's kubectl).
DEB_PACKAGES := mosquitto mosquitto-clients chromium chromium-driver influxdb postgresql \
	rabbitmq-server nats-server systemd shellcheck $(if $(shell command -v kubectl),,kubernetes-client)
# the C device example (firmware_examples/c): compiler, MQTT and CBOR libraries
DEB_PACKAGES += gcc make pkg-config libmosquitto-dev libcbor-dev

.PHONY: demo test test-fast test-device-pythons lint bench system-deps clean

demo: $(STAMP)
	$(BIN)/edgefl demo $(ARGS)

# Everything CI runs: lint, types, the whole suite, and the agent on each device Python.
test: system-deps $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	tools/test_device_pythons.sh

# For daily work: lint and the suite without the slow end-to-end runs (a minute or two).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-device-pythons:
	tools/test_device_pythons.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: system-deps $(STAMP)
	@for b in benchmarks/bench_*.py; do $(BIN)/python $$b; done

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Installs only what is missing; needs root (or sudo) on a machine that lacks them.
system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

clean:
	rm -rf $(VENV) .venv-device edgefl-demo .pytest_cache .ruff_cache .mypy_cache
