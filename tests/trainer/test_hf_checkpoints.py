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


@pytest.mark.slow
def test_tokenizer_files_kept_with_each_checkpoint_survive_the_model_folder(tmp_path):
    """Item 21.5: the model folder deleted once the run is built; the checkpoints and checkpoint.save_hf's exports
    still carry its tokenizer and config files, and the export of the run needs no folder either."""
    from transformers import AutoTokenizer

    src = build_tiny_hf(tmp_path / "src", arch="qwen3", seed=3)
    run = tmp_path / "run"
    args = [a for a in RUN if not a.startswith(("sft.", "trainer.max_steps", "trainer.checkpoint_every"))]
    cfg = compose(overrides=args + ["sft.steps=0", "trainer.max_steps=1", "trainer.checkpoint_every=1", "model=hf",
                                    f"model.path={src}", "tokenizer.name=hf", "model.dtype=float32",
                                    f"run.output_dir={run}", "checkpoint.save_hf=true"])
    with Trainer(cfg) as trainer:
        import shutil

        shutil.rmtree(src)
        trainer.run()
    for out in (run / "checkpoints" / "step_00000001" / "hf_assets", run / "hf" / "step_00000001"):
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= {
            p.name for p in out.iterdir()}, out
        assert AutoTokenizer.from_pretrained(out, local_files_only=True).convert_tokens_to_ids("<|im_end|>") == 151645
    with pytest.warns(UserWarning, match="kept with the checkpoint"):
        assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
