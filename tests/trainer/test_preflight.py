"""The checks made before anything is built: the CLI's ``check_launch`` and the trainer's own (library callers)."""

from __future__ import annotations

import pytest

from nemo_gdro.trainer.config import compose, load
from nemo_gdro.trainer.loop import Trainer
from nemo_gdro.trainer.preflight import check_launch
from nemo_gdro.typed_config import ConfigError
from tests.models.hf_damage import damaged_copy


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    pytest.importorskip("transformers")
    from nemo_gdro.testing.tiny_hf import build_tiny_hf

    return build_tiny_hf(tmp_path_factory.mktemp("preflight") / "qwen3", arch="qwen3", seed=7)


def _hf(path, out, *extra):
    return ["model=hf", f"model.path={path}", "tokenizer.name=hf", f"run.output_dir={out}", *extra]


@pytest.mark.parametrize("case, names", [
    ("truncated_shard", "model-00002-of-00002.safetensors"),
    ("wrong_shape", "model.embed_tokens.weight"),
    ("no_tokenizer_files", "tokenizer files are missing"),
])
def test_check_launch_refuses_a_damaged_checkpoint(tiny_qwen3, tmp_path, case, names):
    directory, expected = damaged_copy(tiny_qwen3, tmp_path / "ckpt", case)
    with pytest.raises(ConfigError, match=names) as info:
        check_launch(load(overrides=_hf(directory, tmp_path / "run")))
    assert all(text in str(info.value) for text in expected), str(info.value)


def test_check_launch_accepts_the_intact_checkpoint(tiny_qwen3, tmp_path):
    check_launch(load(overrides=_hf(tiny_qwen3, tmp_path / "run")))


def test_the_trainer_refuses_it_before_building_or_writing_anything(tiny_qwen3, tmp_path):
    """Library callers skip the CLI: the Trainer checks the directory before the lock, the data and the model."""
    directory, expected = damaged_copy(tiny_qwen3, tmp_path / "ckpt", "missing_tensor")
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        Trainer(compose(overrides=_hf(directory, out)))
    assert all(text in str(info.value) for text in expected), str(info.value)
    assert not out.exists()


# ------------------------------------------------------------------ trainer.max_tokens_per_microbatch (item 3)
TINY_RUN = ["sft.steps=0", "data.num_train=24", "data.num_eval=4", "trainer.prompts_per_step=4", "rollout.n=2",
            "eval.k=1", "rollout.max_new_tokens=8", "trainer.max_steps=2", "trainer.eval_every=0",
            "trainer.checkpoint_every=1", "trainer.micro_batch_size=8", "logging.tensorboard=false",
            "logging.progress=false"]
LONGEST_ARITHMETIC_PROMPT = 15  # char-tokenizer tokens of the longest "Q:37+45=A:"-style prompt of these 24


def test_a_budget_below_one_response_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"^trainer\.max_tokens_per_microbatch=8 is below the longest possible row: "
                                          r"a prompt \(at least 1 token\) \+ rollout\.max_new_tokens=8 needs at least "
                                          r"9 tokens"):
        load(overrides=["trainer.max_tokens_per_microbatch=8", "rollout.max_new_tokens=8"])
    load(overrides=["trainer.max_tokens_per_microbatch=9", "rollout.max_new_tokens=8"])  # the data decides the rest


def test_a_budget_below_the_longest_prompt_plus_response_is_refused_before_any_step(tmp_path):
    """It used to be accepted and to crash in the first RL step, after the step-0 checkpoint."""
    need = LONGEST_ARITHMETIC_PROMPT + 8
    with pytest.raises(ConfigError, match=rf"^trainer\.max_tokens_per_microbatch={need - 1} is below the longest "
                                          rf"possible row: the longest training prompt \(id \d+, "
                                          rf"{LONGEST_ARITHMETIC_PROMPT} tokens\) \+ rollout\.max_new_tokens=8 = "
                                          rf"{need} tokens .* >= {need}, or null$"):
        Trainer(compose(overrides=[*TINY_RUN, f"trainer.max_tokens_per_microbatch={need - 1}",
                                   f"run.output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_minimum_budget_the_error_names_trains(tmp_path):
    """The bound is exact: the budget the error asks for runs RL steps past the first checkpoint."""
    need = LONGEST_ARITHMETIC_PROMPT + 8
    with Trainer(compose(overrides=[*TINY_RUN, f"trainer.max_tokens_per_microbatch={need}",
                                    f"run.output_dir={tmp_path / 'run'}"])) as trainer:
        assert trainer.run().steps_done == 2
