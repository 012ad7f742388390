# The single source of commands: README and .ci/run call these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install services tools run test test-unit test-fast test-faults test-cluster lint format schemas bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

services:
	@deploy/local-services.sh

# Tools the tests call: promtool (Prometheus rules), systemd-analyze (the unit), zsh (completion).
tools:
	@command -v promtool >/dev/null && command -v systemd-analyze >/dev/null && command -v zsh >/dev/null || { \
	  echo "tools: installing promtool, systemd-analyze and zsh (Debian packages prometheus, systemd, zsh)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus systemd zsh >/dev/null; \
	  pkill -x prometheus 2>/dev/null || true; }

run: install services
	$(BIN)/jlm run

lint: install
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy

# docs/schemas/*.json from the wire models (tests/test_schemas.py fails when they are stale).
schemas: install
	$(BIN)/python -m jlm.schemas docs/schemas

format: install
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

test: install services tools lint
	$(BIN)/python -m pytest -q --ignore=tests/cluster $(PYTEST_ARGS)

# No Redis or RabbitMQ needed: protocol, config, redaction, logs, parsers (the `unit` marker).
test-unit: install tools
	$(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

# A 3-node RabbitMQ cluster and several daemons on loopback (own nodes, ports and cookie).
test-cluster: install services
	$(BIN)/python -m pytest -q tests/cluster $(PYTEST_ARGS)

test-faults: install services
	$(BIN)/python -m pytest -q -m slow tests/faults $(PYTEST_ARGS)

test-fast: install services
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Optional parts: BENCH_EXTRAS="celery retention". celery: Celery's confirmed apply_async in the
# same run (needs the `[bench]` extra: pip install -e '.[bench]'); retention: Redis memory after
# 1,000,000 superseding requests with terminal_ttl = 60 (python -m bench.retention).
# `make bench` ends with the scheduled jobs' bench (lateness at 1,000 due jobs a second for 60 s,
# debounce beside replace); BENCH_EXTRAS adds the optional parts: celery, retention.
bench: install services
	$(BIN)/python -m bench.run $(BENCH_ARGS) $(if $(filter celery,$(BENCH_EXTRAS)),--celery)
	$(if $(filter retention,$(BENCH_EXTRAS)),$(BIN)/python -m bench.retention --append)
	$(BIN)/python -m bench.scheduled $(BENCH_SCHEDULED_ARGS)

bench-quick: install services
	$(BIN)/python -m bench.run --quick --no-append $(if $(filter celery,$(BENCH_EXTRAS)),--celery)
	$(if $(filter retention,$(BENCH_EXTRAS)),$(BIN)/python -m bench.retention --quick)
	$(BIN)/python -m bench.scheduled --seconds 10 --requests 2000

# The scheduled jobs' bench alone.
.PHONY: bench-scheduled
bench-scheduled: install services
	$(BIN)/python -m bench.scheduled $(BENCH_SCHEDULED_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info daemon/*.egg-info
