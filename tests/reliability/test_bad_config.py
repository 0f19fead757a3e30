"""Every bad input is one ConfigError naming its key and the allowed values, raised before anything is built.

The table holds the values of the fault probe (issue 12, items 2-4) and their neighbours.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from nemo_gdro.trainer.checkpoint import CheckpointError
from nemo_gdro.trainer.config import compose, load
from nemo_gdro.trainer.loop import Trainer
from nemo_gdro.typed_config import ConfigError

# override -> text the error must contain (the key, and where the probe asked for it, the allowed values)
BAD_VALUES = [
    ("optim.lr=abc", "optim.lr must be a number"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=0", "optim.lr must be a finite number > 0"),
    ("sft.lr=inf", "sft.lr must be a finite number > 0"),
    ("sft.batch_size=0", "sft.batch_size must be a positive integer"),
    ("run.seed=-1", "run.seed must be an integer in [0, 2**31)"),
    ("trainer.keep_last_checkpoints=abc", "trainer.keep_last_checkpoints must be an integer"),
    ("trainer.max_steps=true", "trainer.max_steps must be an integer"),
    ("trainer.max_steps=2.5", "trainer.max_steps must be an integer"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite must be one of 'stop' | 'skip'"),
    ("rollout.temperature=0", "rollout.temperature must be a finite number > 0"),
    ("rollout.temperature=-1", "rollout.temperature must be a finite number > 0"),
    ("eval.temperature=0", "eval.temperature must be a finite number > 0"),
    ("rollout.top_p=2", "rollout.top_p must be in (0, 1]"),
    ("eval.top_p=0", "eval.top_p must be in (0, 1]"),
    ("rollout.top_k=-1", "rollout.top_k must be an integer >= 0"),
    ("rollout.n=0", "rollout.n must be a positive integer"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("model.preset=nope", "model.preset must be one of tiny, qwen3_0p6b, qwen3_1p7b, qwen3_4b, qwen3_8b"),
    ("model.dtype=float16", "model.dtype must be one of 'auto' | 'float32' | 'bfloat16'"),
    ("tokenizer.name=bpe", "tokenizer.name"),
    ("rollout.engine=sglang", "rollout.engine"),
    ("algorithm.loss=ppo", "algorithm.loss"),
    ("parallel.tensor_parallel=0", "parallel.tensor_parallel must be an integer >= 1"),
    ("parallel.timeout_s=0", "parallel.timeout_s must be a finite number > 0"),
    ("run.allow_config_change=optim.lr", "run.allow_config_change must be a list"),
    ("+rollout.temprature=0.5", "unknown key(s) rollout.temprature; valid keys of rollout"),
    ("++trainer.checkpoint_evry=3", "unknown key(s) trainer.checkpoint_evry"),
    ("+run.extra=1", "unknown key(s) run.extra"),
    ("algorithm.dynamo.allocation.warmup_compete=1", "warmup_compete must be true or false"),
    # issue 21 item 3: accepted before, and the run crashed after its first checkpoint
    ("trainer.max_tokens_per_microbatch=8", "trainer.max_tokens_per_microbatch=8 is below the longest possible row: a "
     "prompt (at least 1 token) + rollout.max_new_tokens=8 needs at least 9 tokens"),
    # the switches that turn the start / end evaluations and checkpoints off (issue 24, item 6)
    ("eval.at_start=maybe", "eval.at_start must be true or false"),
    ("eval.at_end=0", "eval.at_end must be true or false"),
    ("checkpoint.at_start=no_thanks", "checkpoint.at_start must be true or false"),
    ("checkpoint.at_end=null", "checkpoint.at_end must be true or false"),
    ("trainer.eval_every=-1", "trainer.eval_every must be an integer >= 0 (0 disables)"),
    ("trainer.checkpoint_every=never", "trainer.checkpoint_every must be an integer"),
]


@pytest.mark.parametrize("override, expected", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_one_config_error_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load(overrides=[override])
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("n", [2, 16])
def test_rollout_n_outside_the_unselected_schedulers_bounds_is_valid(n):
    """Item 3: only the selected rollout scheduler's bounds apply (Rollout-GDRO 2..12, DynaMO 4..16 are off)."""
    assert load(overrides=[f"rollout.n={n}"]).rollout.n == n
    assert load(overrides=[f"rollout.n={n}", "algorithm.loss=r2vpo"]).rollout.n == n


def test_the_selected_schedulers_bounds_still_apply():
    with pytest.raises(ConfigError, match=r"dynamo\.n_bar must lie in \[n_min, n_max\]"):
        load(overrides=["rollout.n=2", "algorithm.rollout_scheduler=dynamo"])
    with pytest.raises(ConfigError, match=r"rollout_gdro"):
        load(overrides=["rollout.n=16", "algorithm.rollout_scheduler=rollout_gdro"])


def _trainer(tmp_path, *overrides):
    return Trainer(compose(overrides=[f"run.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", *overrides]))


def test_layout_larger_than_the_processes_launched_is_refused_before_building(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel \* parallel\.pipeline_parallel = 3 \* 1 = 3 "
                                          r"must divide the 1 process\(es\) launched \(allowed products: \[1\]\)"):
        _trainer(tmp_path, "parallel.tensor_parallel=3")


def test_missing_resume_path_names_run_resume(tmp_path):
    with pytest.raises(CheckpointError, match=r"run\.resume='/nonexistent/step_1': no such checkpoint directory "
                                              r"\(allowed: auto, null"):
        _trainer(tmp_path, "run.resume=/nonexistent/step_1")


def test_prompts_per_step_larger_than_the_dataset_is_refused_before_the_model(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.prompts_per_step=100000 exceeds the 2000 training prompts"):
        _trainer(tmp_path, "trainer.prompts_per_step=100000")


CLI_CASES = [
    ("optim.lr=abc", 2, "optim.lr must be a number"),
    ("parallel.tensor_parallel=3", 2, "parallel.tensor_parallel"),
    ("run.resume=/nonexistent", 2, "run.resume='/nonexistent': no such checkpoint directory"),
    ("trainer.prompts_per_step=100000", 2, "trainer.prompts_per_step=100000 exceeds"),
]


# Runs the CLI in a fresh interpreter and reports whether answering imported torch (it must not:
# importing torch alone takes seconds, and the answer is meant to come in about one).
_CLI_PROBE = (
    "import sys\n"
    "from nemo_gdro.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('torch imported:', 'torch' in sys.modules)\n"
    "sys.exit(rc)\n"
)


@pytest.mark.slow
def test_cli_prints_one_line_without_traceback(tmp_path):
    for override, code, expected in CLI_CASES:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _CLI_PROBE, "train", override, f"run.output_dir={tmp_path / 'run'}"],
            capture_output=True, text=True, timeout=300,
        )
        elapsed = time.monotonic() - start
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert done.returncode == code, (override, done.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, (override, done.stderr)
        assert "[nemo-gdro rank" not in done.stdout  # nothing was built
        assert "torch imported: False" in done.stdout, (override, done.stdout)
        print(f"{override}: rc {done.returncode} in {elapsed:.1f} s: {lines[0]}")


def test_every_bad_value_is_answered_without_importing_torch():
    """The whole table in one fresh interpreter: composing and checking a config imports neither
    torch nor Megatron (the CLI answers a bad value in about a second, not after seconds of imports)."""
    probe = (
        "import sys\n"
        "from nemo_gdro.trainer.config import load\n"
        "from nemo_gdro.typed_config import ConfigError\n"
        "for override in sys.argv[1:]:\n"
        "    try:\n"
        "        load(overrides=[override])\n"
        "    except ConfigError:\n"
        "        continue\n"
        "    raise SystemExit(f'{override} was accepted')\n"
        "load(overrides=[])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers'))\n"
        "print('heavy:', heavy[:5])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, *(b[0] for b in BAD_VALUES)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "heavy: []" in done.stdout, done.stdout
