# Shopfloor Gateway: the two set-up commands are `make demo` and `make test`.
# Both create their own virtual environment in .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: installed-names demo test lint typecheck unit integration check-config bench clean mosquitto victoria-metrics chromium console-screenshots venv sparkplug-js

demo: $(VENV)/.installed-demo
	$(BIN)/shopfloor demo

test: $(VENV)/.installed-test mosquitto victoria-metrics chromium sparkplug-js lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests/unit

integration: $(VENV)/.installed-test mosquitto victoria-metrics chromium sparkplug-js
	$(BIN)/python -m pytest -q tests/integration

lint: $(VENV)/.installed-test
	$(BIN)/ruff check gateway adapters simulators tests $(wildcard bench)
	$(BIN)/ruff format --check gateway adapters simulators tests $(wildcard bench)
	$(BIN)/lint-imports

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
	@$(MAKE) --no-print-directory installed-names
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[demo,influxdb,test]'
	@$(MAKE) --no-print-directory installed-names
	@touch $@ $(VENV)/.installed-demo

# adapters/ and simulators/ install as shopfloor_gateway.adapters and .simulators
# (package-dir in pyproject.toml). The editable install maps those names with an import
# hook, which mypy does not follow: these two links give mypy (mypy_path) the same names.
installed-names:
	@mkdir -p $(VENV)/names/shopfloor_gateway
	@ln -sfn $(CURDIR)/adapters $(VENV)/names/shopfloor_gateway/adapters
	@ln -sfn $(CURDIR)/simulators $(VENV)/names/shopfloor_gateway/simulators

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

# The InfluxDB sink's tests write to a real server speaking the InfluxDB v2 write API:
# Debian's `victoria-metrics` (Debian has no InfluxDB 2.x).
victoria-metrics:
	@if command -v victoria-metrics >/dev/null 2>&1 || [ -x /usr/bin/victoria-metrics ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing victoria-metrics (Debian package) for the InfluxDB sink tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq victoria-metrics >/dev/null; \
	  systemctl disable --now victoria-metrics >/dev/null 2>&1 || true; \
	else \
	  echo "error: the tests need victoria-metrics: run 'sudo apt-get install victoria-metrics' and retry" >&2; \
	  exit 1; \
	fi

# The Sparkplug B tests check what the gateway publishes with a decoder it did not write:
# Eclipse Tahu's sparkplug-payload from npm, pinned by tests/sparkplug_js/package-lock.json.
SPARKPLUG_JS := tests/sparkplug_js
sparkplug-js: $(SPARKPLUG_JS)/node_modules/.package-lock.json

$(SPARKPLUG_JS)/node_modules/.package-lock.json: $(SPARKPLUG_JS)/package-lock.json
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing nodejs and npm (Debian packages) for the Sparkplug B decoder tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
	  else \
	    echo "error: the Sparkplug B tests need Node.js: run 'sudo apt-get install nodejs npm' and retry" >&2; \
	    exit 1; \
	  fi; \
	fi
	cd $(SPARKPLUG_JS) && npm ci --no-audit --no-fund --ignore-scripts
	@touch $@

# The web console's browser tests drive Debian's Chromium headless through Debian's
# chromedriver (Selenium is pointed at both, so it downloads nothing).
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium and chromium-driver (Debian packages) for the console's browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
	  echo "error: the console tests need a browser: run 'sudo apt-get install chromium chromium-driver' and retry" >&2; \
	  exit 1; \
	fi

# Screenshots of every console page (docs/console/*.png), from a simulated floor.
console-screenshots: $(VENV)/.installed-test mosquitto chromium
	$(BIN)/python -m tests.consolefloor docs/console

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

# Hardening (not part of `make test`). `make fuzz`: every fuzz target with many more examples,
# then the coverage-guided atheris targets when atheris is installed (pip install atheris).
# `make soak`: the demo factory at full speed under injected faults and broker restarts.
FUZZ_SECONDS ?= 60
SOAK_SECONDS ?= 1200

.PHONY: fuzz soak
fuzz: $(VENV)/.installed-test
	SHOPFLOOR_FUZZ=long $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz
	@if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
	  $(BIN)/python -m tests.fuzz.atheris_targets --seconds $(FUZZ_SECONDS); \
	else echo "atheris not installed: skipping the coverage-guided targets"; fi

soak: $(VENV)/.installed-test mosquitto
	$(BIN)/python -m bench.soak --duration $(SOAK_SECONDS) --json var/soak.json

# `make chaos`: the real gateway under faults drawn with a fixed seed (device faults, broker
# outages, SIGKILL/SIGTERM, a full tmpfs, a damaged outbox, a hostile platform, command floods,
# a slow history sink), judged by an independent checker; report in var/chaos.json. Needs
# root (it mounts a tmpfs). tests/chaos/README.md explains the report.
CHAOS_SECONDS ?= 1500
CHAOS_SEED ?= 1

.PHONY: chaos
chaos: $(VENV)/.installed-test mosquitto
	$(BIN)/python -m tests.chaos.campaign --seed $(CHAOS_SEED) --seconds $(CHAOS_SECONDS) \
	  --json var/chaos.json --workdir var/chaos

# Benchmarks (not part of `make test`): modest defaults, about 25 minutes in all. Each one
# takes its own arguments, e.g. `$(BIN)/python -m bench.scale_modbus --devices 500 --signals 30`.
# Figures print as tables and land in bench/results/*.json; docs/performance.md has the last run.
# bench.telemetry runs the telemetry modes side by side on the same load (one gateway per mode):
# JSON every poll / on change / deadband and Sparkplug B against telemetry off, in one table
# (bench/results/telemetry.md).
bench: $(VENV)/.installed-test mosquitto victoria-metrics
	$(BIN)/python -m bench.core
	$(BIN)/python -m bench.startup
	$(BIN)/python -m bench.modbus_plan
	$(BIN)/python -m bench.modbus_client
	$(BIN)/python -m bench.wakeups
	$(BIN)/python -m bench.acquisition --devices 500 --poll 1.0 --signals 30 --window 12 --layers floor,client,line,poll,samples,full
	$(BIN)/python -m bench.acquisition --devices 500 --signals 30 --window 8 --layers memory --name acquisition_memory
	$(BIN)/python -m bench.acquisition --devices 500 --signals 30 --window 8 --layers memory --memory-gap 50:0.1 --name acquisition_memory_gap
	$(BIN)/python -m bench.acquisition --devices 500 --poll 1.0 --signals 115 --window 15
	$(BIN)/python -m bench.latency --window 20
	$(BIN)/python -m bench.latency_opcua
	$(BIN)/python -m bench.scale_modbus --devices 200,500 --signals 30 --window 20 --faulty 0.1 --all-down --history --name scale_neuron
	$(BIN)/python -m bench.scale_modbus --devices 500 --signals 30 --window 20 --stages --name scale_stages
	$(BIN)/python -m bench.history --devices 500,1000 --window 20
	$(BIN)/python -m bench.scaling --gateways 4 --machines 125 --window 60 --depart 10
	$(BIN)/python -m bench.telemetry --devices 500,2000 --window 15
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.events
	$(BIN)/python -m bench.scale_opcua
	$(BIN)/python -m bench.outbox
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.sparkplug --devices 500,2000

# `make image-test`: build deploy/Containerfile for real and run the image as its own user
# on a config dir made as install.sh makes it (minutes; not part of `make test`). Needs
# root; installs buildah, podman and debootstrap; see tests/image/test_container_image.py.
.PHONY: image-test
image-test: $(VENV)/.installed-test mosquitto
	@command -v buildah >/dev/null && command -v podman >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap >/dev/null; }
	SHOPFLOOR_IMAGE_TEST=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/image
