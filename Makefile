# The two commands of the README: `make demo` and `make test`. Each builds .venv when it is missing and
# installs the project there once; a second run finds the stamp and reinstalls nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp carries a hash of pyproject.toml, so editing the dependencies triggers exactly one reinstall.
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
TORCH := torch==2.13.0
PYTEST_ARGS ?=
DEMO_OUT ?= demo-out

.PHONY: install test demo protos bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,bench]" "$(TORCH)"
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m benchmarks.demo --out $(DEMO_OUT)

# The full benchmark over the bundles `make demo` exported (run `make demo` first).
bench: $(STAMP)
	$(VENV)/bin/mmkd-bench --bundles $(DEMO_OUT)/models --run $(DEMO_OUT)/run --data $(DEMO_OUT)/data --out bench-results

# Regenerate the gRPC/protobuf stubs from protos/ with the grpcio-tools that matches the installed protobuf.
protos: $(STAMP)
	$(PY) -m server.protogen

clean:
	rm -rf $(VENV) $(DEMO_OUT) runs bundles bench-results .pytest_cache
