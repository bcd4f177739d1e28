# Shopfloor Gateway: the two set-up commands are `make demo` and `make test`.
# Both create their own virtual environment in .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit integration check-config bench clean mosquitto venv

demo: $(VENV)/.installed-demo
	$(BIN)/shopfloor demo

test: $(VENV)/.installed-test mosquitto lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests/unit

integration: $(VENV)/.installed-test mosquitto
	$(BIN)/python -m pytest -q tests/integration

lint: $(VENV)/.installed-test
	$(BIN)/ruff check gateway adapters simulators tests $(wildcard bench)
	$(BIN)/ruff format --check gateway adapters simulators tests $(wildcard bench)

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy gateway adapters simulators

check-config: $(VENV)/.installed-demo
	$(BIN)/shopfloor check -c config/example.yaml

# python3 -m venv needs Debian's python3-venv package; install it when we may.
$(VENV)/bin/python:
	@if ! $(PYTHON) -m venv --help >/dev/null 2>&1 || ! $(PYTHON) -c 'import ensurepip' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing python3-venv (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  else \
	    echo "error: '$(PYTHON) -m venv' is not available; run: sudo apt-get install python3-venv" >&2; exit 1; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[demo]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[demo,influxdb,test]'
	@touch $@ $(VENV)/.installed-demo

# The integration tests run a real Mosquitto broker (Debian package `mosquitto`).
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing mosquitto (Debian package) for the integration tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	  systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	else \
	  echo "error: the tests need a Mosquitto broker: run 'sudo apt-get install mosquitto' and retry" >&2; \
	  exit 1; \
	fi

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
