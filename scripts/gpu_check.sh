#!/usr/bin/env bash
# The prepared GPU check for ONE H100/H200 host that has Python 3.12, CUDA torch and
# transformers but no megatron-core, vLLM or Transformer Engine, and no network.
#
#   scripts/gpu_check.sh [--cpu-dry-run] [--out PATH] [--wheels DIR] [--parts p1,p2] [--deadline-s N]
#
# 1. Installs the wheels of DIR (default .whl/, fetched beforehand on a machine with
#    PyPI: `make gpu-wheels`) with `pip install --no-index --no-deps --target` into a
#    private site directory, unless megatron-core is importable already;
# 2. runs benchmarks/gpu_check.py: environment + NCCL all-reduce, the vocab-parallel
#    log-prob pass vs naive log_softmax at 8192 x 151,936 bf16, Qwen3-0.6B- and 1.7B-shaped
#    bf16 actor steps under NCCL, the tiny default training on CUDA (shortened). Each part
#    runs in its own process with its own timeout; the whole check stays under 8 minutes;
# 3. writes ONE JSON of figures: --out, else $OUT/gpu_check.json, else ./gpu_check.json
#    (part logs in gpu_check_logs/ beside it). Exit code 0 when every part passed.
#
# --cpu-dry-run: the same parts at toy sizes on CPU (CI checks the script with it).
# Environment: PYTHON (default python3), NEMO_GDRO_SITE (default /tmp/nemo_gdro_site).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
SITE=${NEMO_GDRO_SITE:-/tmp/nemo_gdro_site}
WHEELS=""
DRY=0
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        --cpu-dry-run) DRY=1; ARGS+=("$1"); shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
export PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
fi

# find_spec only locates the packages: no second-long megatron import here.
have_megatron() {
    "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('megatron', 'omegaconf', 'hydra')))"
}

# An explicit --wheels always installs; otherwise .whl/ is used only when megatron-core is missing.
if [[ -z $WHEELS ]] && ! have_megatron && [[ -d $REPO/.whl ]]; then
    WHEELS=$REPO/.whl
fi
if [[ -n $WHEELS ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "[gpu_check] no *.whl in $WHEELS (fetch them with: make gpu-wheels)" >&2
    else
        echo "[gpu_check] installing ${#wheels[@]} wheels from $WHEELS into $SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" || echo "[gpu_check] wheel install FAILED (the parts will say what is missing)" >&2
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! have_megatron; then
    echo "[gpu_check] megatron-core / omegaconf / hydra-core not importable: most parts will fail (make gpu-wheels)" >&2
fi
exec "$PYTHON" "$REPO/benchmarks/gpu_check.py" "${ARGS[@]}"
