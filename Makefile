# qioc_green: every target creates .venv and installs what it needs.
#   make test   run the test suite twice: with the compiled hot path (qioc_green._speedups,
#               which must have built: QIOC_REQUIRE_SPEEDUPS=0 to allow pure Python there),
#               then with QIOC_PURE_PYTHON=1
#   make lint   ruff and mypy
#   make demo   the main job (see README)    make bench  the benchmarks (long; prints tables)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    := $(VENV)/.installed-dev
BENCH  := $(VENV)/.installed-bench
DEMO   := $(VENV)/.installed-demo

.PHONY: all test lint demo bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEV): setup.cfg setup.py pyproject.toml qioc_green/_speedups.c | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $@

$(BENCH): $(DEV)
	$(BIN)/python -m pip install -q -e '.[test,lint,bench]'
	touch $@

# the demo runs the installed qioc-migration-receiver command (and qemu.qmp for the live part)
$(DEMO): setup.cfg setup.py pyproject.toml qioc_green/_speedups.c | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

QIOC_REQUIRE_SPEEDUPS ?= 1

test: $(DEV)
	QIOC_REQUIRE_SPEEDUPS=$(QIOC_REQUIRE_SPEEDUPS) $(BIN)/python -m pytest
	QIOC_PURE_PYTHON=1 $(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check qioc_green tests examples bench
	$(BIN)/mypy

demo: $(DEMO)
	$(BIN)/python -m qioc_green.migration.demo

bench: $(BENCH)
	$(BIN)/python bench/channel_overhead.py
	$(BIN)/python bench/scaling.py --quick
	$(BIN)/python bench/migration.py
	$(BIN)/python bench/nbd.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
