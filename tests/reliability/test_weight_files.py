"""A damaged HF checkpoint directory is one line and exit 2 from the CLI, before anything is built (issue 21, item 2).

Each case damages a copy of a real tiny Qwen3 checkpoint (two safetensors
shards, the index, the real tokenizer files) one way and runs
``python -m nemo_gdro.cli train`` with the Qwen3 DAPO-Math recipe on it. The
answer must be exit 2 with one stderr line naming the file and the tensor,
no traceback, no output directory, and none of torch, Megatron, transformers
or safetensors imported (nothing was built or opened: before, these were 40-50
line tracebacks 9-80 s in, after the data and the model were built).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.models.hf_damage import CASES, damaged_copy

# case -> why the user would have it (the damage itself is tests/models/hf_damage.py's function of that name)
WEIGHT_FILE_CASES = [
    ("truncated_shard", "an interrupted download or copy: a shard 1000 bytes short"),
    ("trailing_bytes", "a shard with bytes after its last tensor"),
    ("missing_shard", "the index names a shard that is not there"),
    ("index_not_json", "a cut-off model.safetensors.index.json"),
    ("index_without_weight_map", "an index without weight_map"),
    ("index_lists_absent_tensor", "the index lists a tensor its shard does not hold"),
    ("damaged_header", "a header whose shape and data offsets disagree"),
    ("wrong_shape", "a tensor of the wrong shape for config.json"),
    ("missing_tensor", "a tensor config.json needs is absent"),
    ("extra_tensor", "a tensor config.json has no place for"),
    ("wrong_dtype", "an integer tensor where weights belong"),
    ("no_config", "no config.json"),
    ("config_not_json", "a config.json that is not JSON"),
    ("no_weights", "no weights at all"),
    ("pytorch_bin_only", "pickled weights only"),
    ("no_tokenizer_files", "no tokenizer files (was: eos_token_id 151643 is outside the tokenizer's vocabulary [0, 1))"),
    ("not_a_directory", "model.path does not exist"),
]
assert {c for c, _ in WEIGHT_FILE_CASES} == set(CASES)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("transformers")
    from nemo_gdro.testing.tiny_hf import build_tiny_hf
    from tests.data.fixtures import write_benchmark, write_dapo_math

    root = tmp_path_factory.mktemp("weight_files")
    return {
        "model": build_tiny_hf(root / "qwen3", arch="qwen3", seed=5),
        "train": write_dapo_math(root / "dapo.parquet", num_prompts=8, repeats=2, cjk_prompts=0).path,
        "math500": write_benchmark("math500", root / "math500.jsonl", num=3).path,
    }


def _imported(stderr: str) -> set[str]:
    """Every module of ``python -X importtime``'s report (``import time: self | cumulative | module``),
    with the packages of dotted names (``megatron`` for ``megatron.core``)."""
    names = {ln.rsplit("|", 1)[1].strip() for ln in stderr.splitlines() if ln.startswith("import time:") and "|" in ln}
    return names | {name.split(".")[0] for name in names}


@pytest.mark.slow
@pytest.mark.parametrize("case, why", WEIGHT_FILE_CASES, ids=[c for c, _ in WEIGHT_FILE_CASES])
def test_damaged_checkpoint_is_one_line_and_exit_2_before_anything_is_built(assets, tmp_path, case, why):
    directory, expected = damaged_copy(assets["model"], tmp_path / "ckpt", case)
    out = tmp_path / "run"
    args = [
        # The recipe as a user runs it (model.dtype=auto included): its whole check imports no torch.
        "+recipe=qwen3_0p6b_dapo", f"model.path={directory}", "rollout.engine=hf",
        f"data.train_files=[{assets['train']}]", f"+data.eval_files.math500=[{assets['math500']}]",
        "reward.num_workers=1", "trainer.max_steps=1", "trainer.prompts_per_step=4", "rollout.n=2",
        "rollout.max_new_tokens=6", "logging.tensorboard=false", "logging.progress=false", f"run.output_dir={out}",
    ]
    line, imported, elapsed = _train_cli(args, out, why)
    for text in expected:
        assert text in line, (why, text, line)
    assert not {"torch", "megatron", "transformers", "safetensors"} & imported, "nothing may be built or opened"
    print(f"{case}: rc 2 in {elapsed:.1f} s: {line}")


def _train_cli(args: list[str], out, why: str) -> tuple[str, set[str], float]:
    """``python -m nemo_gdro.cli train ARGS``: must exit 2 with one line and no traceback, writing nothing;
    returns (the line, the modules imported, seconds)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "nemo_gdro.cli", "train", *args],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("import time:")]
    assert done.returncode == 2, (why, done.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in done.stderr, (why, lines)
    assert lines[0].startswith("nemo-gdro train: configuration error: "), lines[0]
    assert not out.exists(), "nothing may be written"
    imported = _imported(done.stderr)
    assert "nemo_gdro.models.hf_preflight" in imported  # the import report is real
    return lines[0], imported, elapsed
