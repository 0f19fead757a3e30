"""HF checkpoints through the real loop: model=hf in, checkpoint.save_hf / nemo-gdro export / eval out."""

import pytest
import torch

from nemo_gdro.cli import main
from nemo_gdro.testing.tiny_hf import build_tiny_hf
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.eval_run import evaluate_target
from nemo_gdro.trainer.loop import Trainer

RUN = [
    "sft.steps=2", "sft.batch_size=4", "trainer.max_steps=2", "data.num_train=24", "data.num_eval=4",
    "trainer.prompts_per_step=4", "rollout.n=2", "eval.k=1", "rollout.max_new_tokens=3", "trainer.eval_every=0",
    "trainer.checkpoint_every=2", "trainer.micro_batch_size=8", "logging.tensorboard=false", "logging.progress=false",
]


def hf_weights(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}


@pytest.mark.slow
def test_hf_checkpoint_in_train_export_and_evaluate(tmp_path):
    src = build_tiny_hf(tmp_path / "src", arch="qwen3", tie_word_embeddings=False, seed=3)
    run = tmp_path / "run"
    cfg = compose(overrides=RUN + ["model=hf", f"model.path={src}", "model.dtype=float32", f"run.output_dir={run}",
                                   "checkpoint.save_hf=true"])
    with Trainer(cfg) as trainer:
        actor = trainer.components.actor
        # The actor starts from the checkpoint's weights, tensor for tensor.
        start = actor.export_hf_state_dict()
        for key, value in hf_weights(src).items():
            assert torch.equal(start[key], value), key
        trainer.run()
        final = {k: v.clone() for k, v in actor.export_hf_state_dict().items()}
    assert any(not torch.equal(final[k], start[k]) for k in final), "training should have moved the weights"

    # checkpoint.save_hf wrote an HF dir at the last checkpoint that transformers loads as trained.
    live = run / "hf" / "step_00000002"
    for key, value in hf_weights(live).items():
        assert torch.equal(value, final[key]), key
    assert (live / "generation_config.json").is_file()

    # Offline export of the same checkpoint (no Megatron) gives the same tensors.
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    exported = hf_weights(out)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)

    # Evaluation of both the run dir and the HF dir, without training.
    from_run = evaluate_target(run, ["eval.k=1"])
    from_hf = evaluate_target(out, RUN + [f"run.output_dir={tmp_path / 'eval'}"])
    assert {"eval/pass@1", "eval/mean@k"} <= from_run.keys() and {"eval/pass@1"} <= from_hf.keys()


def test_model_source_hf_errors_name_the_path(tmp_path):
    from nemo_gdro.trainer.config import ConfigError, validate

    with pytest.raises(ConfigError, match="model.source=hf needs model.path"):
        validate(compose(overrides=["model=hf", "model.path=''"]))
    with pytest.raises(ConfigError, match="model.overrides apply to model.source=preset only"):
        validate(compose(overrides=["model=hf", f"model.path={tmp_path}", "+model.overrides.num_layers=2"]))
    with pytest.raises(ConfigError, match="no config.json"):
        Trainer(compose(overrides=["model=hf", f"model.path={tmp_path}", f"run.output_dir={tmp_path / 'r'}"]))
