# profiling-agent: the README's two commands are `make run` and `make test`, each one command on a
# fresh Debian/Ubuntu host (both run `make setup` first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
OUTPUT_DIR ?= ./profiles
ARGS ?=
# Re-run as root through sudo when it exists; otherwise say exactly what to do.
AS_ROOT = if [ "$$(id -u)" != 0 ]; then \
	if command -v sudo >/dev/null; then exec sudo -E $(MAKE) $@ $(MAKEFLAGS); \
	else echo "make $@ needs root (BPF, kernel headers, apt): run it as root, e.g. 'su -c \"make $@\"'" >&2; exit 1; fi; fi

.PHONY: setup run test test-unit test-bpf lint check clean

setup:
	@$(AS_ROOT); deploy/host/setup.sh

run: setup
	@$(AS_ROOT); exec $(VENV)/bin/profiling-agent run --output-dir $(OUTPUT_DIR) $(ARGS)

check: setup
	@$(AS_ROOT); $(VENV)/bin/profiling-agent check

test: setup
	@$(AS_ROOT); $(MAKE) --no-print-directory lint && $(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-bpf: setup
	@$(AS_ROOT); $(PY) -m pytest tests/bpf $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check agent tests $(wildcard bench)
	$(VENV)/bin/ruff format --check agent tests $(wildcard bench)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build agent/_proto/*_pb2*.py agent/_proto/*_pb2*.pyi

# OpenTelemetry Collector (ocb build, cached under build/otelcol/) for the end-to-end OTLP tests.
.PHONY: otelcol
otelcol:
	tests/e2e/otelcol/build.sh

# Install the agent under /opt/profiling-agent, its config under /etc and the systemd unit (as root).
.PHONY: install-service
install-service:
	@$(AS_ROOT); deploy/host/install-service.sh

# The container image, built offline with podman on a base mmdebstrap makes (as root): see
# deploy/image/build.sh. IMAGE=... names it (default localhost/profiling-agent:<version> and :latest).
.PHONY: image
image: setup
	@$(AS_ROOT); deploy/image/build.sh

# Ten minutes of every profiler on a mixed load, OTLP to the real Collector and files on (as root; not
# in CI): writes docs/soak.md. SOAK_ARGS passes options, e.g. SOAK_ARGS="--minutes 2".
SOAK_ARGS ?=
.PHONY: soak
soak: setup
	@$(AS_ROOT); $(PY) -m bench.soak --command "$(strip make soak $(SOAK_ARGS))" $(SOAK_ARGS)

# Benchmarks (as root): builds bench/workloads, runs every scenario beside BCC's tools, and writes
# docs/benchmarks.md and docs/benchmarks.json. BENCH_ARGS passes options, e.g. BENCH_ARGS="--reps 1".
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	@$(AS_ROOT); $(PY) -m bench --command "$(strip make bench $(BENCH_ARGS))" $(BENCH_ARGS)
