# Newcomer entry points: `make run` (set up + tiny CPU training) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU machines this project runs on serve a local CPU build of this torch;
# installing it before the package keeps pip from fetching a CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup run test test-slurm bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[cpu,test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nemo-gdro train

# tests/slurm needs a Slurm cluster (it starts a private one): `make test-slurm`.
test: $(STAMP)
	$(PY) -m pytest -n 2 --ignore=tests/slurm $(PYTEST_ARGS)

# Installs Debian's slurm-wlm if missing (root), starts a private slurmctld +
# slurmd and submits scripts/slurm/train_8b.sh; one job at a time, so no xdist.
test-slurm: $(STAMP)
	$(PY) -m pytest -p no:xdist tests/slurm $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/controllers.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
