# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 60
# One of fuzz/fuzz_*.py by its suffix (decoder, http, websocket), or all of them in turn.
FUZZ_TARGET ?= all
FUZZ_TARGETS := decoder http websocket

DEMO_KEYS := build/demo-keys/jwks.json

.PHONY: install demo-keys browser-deps test-deps run test lint fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo's token signing key (build/demo-keys/demo-signing-key.pem, mode 0600)
# and its public key set (jwks.json, read by commands.yaml's `users`), made once.
demo-keys: $(DEMO_KEYS)

$(DEMO_KEYS): | $(STAMP)
	$(BIN)/tlvproxy demo-keys $(dir $(DEMO_KEYS))

run: install demo-keys
	scripts/run-demo.sh

# Debian's Chromium and ChromeDriver for tests/browser (headless; nothing is downloaded by the tests).
browser-deps:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)

# nginx for tests/test_deploy_files.py, which checks deploy/nginx.conf with `nginx -t`;
# curl for tests/ops/test_tls.py, a real client verifying the served certificates;
# etcd (Debian's etcd-server installs /usr/bin/etcd) for tests/fleet, which start their own;
# redis-server for the `store: redis` rate-limit tests (tests/conftest.py starts
# one on a free loopback port).
test-deps: browser-deps
	test -x /usr/sbin/nginx || command -v nginx >/dev/null || \
		(apt-get update && apt-get install -y nginx)
	command -v curl >/dev/null || (apt-get update && apt-get install -y curl)
	command -v etcd >/dev/null || (apt-get update && apt-get install -y etcd-server)
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

test: install demo-keys test-deps
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check tlvproxy tests fuzz benchmarks
	$(BIN)/ruff format --check tlvproxy tests fuzz benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# Each target for FUZZ_SECONDS, seeded from fuzz/corpus/TARGET (with the
# dictionary fuzz/TARGET.dict if there is one); new inputs go to
# build/fuzz-corpus/TARGET, a failing one to build/fuzz-artifacts/TARGET-crash-*.
fuzz: install
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	set -e; for target in $(if $(filter all,$(FUZZ_TARGET)),$(FUZZ_TARGETS),$(FUZZ_TARGET)); do \
		mkdir -p build/fuzz-corpus/$$target build/fuzz-artifacts; \
		dict=; if [ -f fuzz/$$target.dict ]; then dict=-dict=fuzz/$$target.dict; fi; \
		$(BIN)/python fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_SECONDS) $$dict \
			-artifact_prefix=build/fuzz-artifacts/$$target- \
			build/fuzz-corpus/$$target fuzz/corpus/$$target; \
	done

# The micro benchmarks first, then the side-by-side run through ../shared/bench
# (json and protobuf routes, 1 and 2 workers; about 2 minutes).
MICRO_BENCHES := $(filter-out shared,$(patsubst benchmarks/bench_%.py,%,$(wildcard benchmarks/bench_*.py)))

bench: install
	$(BIN)/python benchmarks/run.py $(MICRO_BENCHES)
	$(BIN)/python benchmarks/run.py shared

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
