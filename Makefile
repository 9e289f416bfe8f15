# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs what it needs, so a fresh machine needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned so pip takes the local CPU wheel instead of the
# multi-GB CUDA build (torch is only used by the ViLT parity tests).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two workers, one test file each at a time (module fixtures are built once): the
# suite takes about half the time of a serial run on the 2-core machines. A crashed
# worker ends the run with its test named: replacing it under loadfile can hang.
PYTEST_WORKERS ?= -n 2 --dist loadfile --max-worker-restart=0

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/python experiments/run_demo.py --workdir runs/demo

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: install
	$(BIN)/scanformer bench --model vilt_b32 --batch-size 8 --keep-ratio 0.25

clean:
	rm -rf $(VENV) runs .pytest_cache
