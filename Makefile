# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 60

DEMO_KEYS := build/demo-keys/jwks.json

.PHONY: install demo-keys browser-deps run test lint fuzz bench clean

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

test: install demo-keys browser-deps
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check tlvproxy tests fuzz benchmarks
	$(BIN)/ruff format --check tlvproxy tests fuzz benchmarks
	$(BIN)/mypy

fuzz: install
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	mkdir -p build/fuzz-corpus
	$(BIN)/python fuzz/fuzz_decoder.py -max_total_time=$(FUZZ_SECONDS) build/fuzz-corpus fuzz/corpus/decoder

# The micro benchmarks first, then the side-by-side run through ../shared/bench
# (json and protobuf routes, 1 and 2 workers; about 2 minutes).
MICRO_BENCHES := $(filter-out shared,$(patsubst benchmarks/bench_%.py,%,$(wildcard benchmarks/bench_*.py)))

bench: install
	$(BIN)/python benchmarks/run.py $(MICRO_BENCHES)
	$(BIN)/python benchmarks/run.py shared

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
