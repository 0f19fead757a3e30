"""The math task end to end: DAPO-layout files, a tiny random Qwen3 with the real tokenizer, the
``dapo_math`` reward in worker processes, RL under DP=2 and TP=2, ``nemo-gdro export``."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from nemo_gdro.testing.tiny_hf import build_tiny_hf
from nemo_gdro.trainer.config import compose
from nemo_gdro.typed_config import ConfigError
from tests.data.fixtures import write_benchmark, write_dapo_math
from tests.trainer.test_loop_dp import _rows, _train_args

NESTED_POW = "2^{2^{2^{2^{2^{20}}}}}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("math_task")
    src = build_tiny_hf(root / "qwen3", arch="qwen3", seed=5)
    train = write_dapo_math(root / "dapo.parquet", num_prompts=8, repeats=2, cjk_prompts=0).path
    math500 = write_benchmark("math500", root / "math500.jsonl", num=3).path
    gpqa = write_benchmark("gpqa_diamond", root / "gpqa_diamond.csv", num=2, fmt="csv").path
    return {"model": src, "train": train, "math500": math500, "gpqa": gpqa}


def math_args(files, out, *extra):
    """The Qwen3-0.6B DAPO-Math recipe on the tiny assets, shrunk to seconds (HF engine: no vLLM here)."""
    return [
        "+recipe=qwen3_0p6b_dapo", f"model.path={files['model']}", "model.dtype=float32", "rollout.engine=hf",
        f"data.train_files=[{files['train']}]", f"+data.eval_files.math500=[{files['math500']}]",
        f"+data.eval_files.gpqa_diamond=[{files['gpqa']}]", "reward.num_workers=1",
        "trainer.max_steps=3", "trainer.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
        "eval.k=1", "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "logging.tensorboard=false", "logging.progress=false", "reward.overlong.enabled=true",
        "reward.overlong.buffer_tokens=4", f"run.output_dir={out}", *extra,
    ]


def _children() -> set[int]:
    """Live child processes of this process (every thread's)."""
    pids = set()
    for task in Path("/proc/self/task").iterdir():
        text = (task / "children").read_text().split()
        pids.update(int(p) for p in text)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_bad_data_is_a_config_error_and_leaves_no_worker(files, tmp_path):
    from nemo_gdro.trainer.loop import Trainer

    before = _children()
    missing = tmp_path / "nope.parquet"
    with pytest.raises(ConfigError, match="nope.parquet"):
        Trainer(compose(overrides=math_args(files, tmp_path / "run", f"data.train_files=[{missing}]")))
    time.sleep(0.2)
    assert _children() <= before  # the reward pool started before the task failed, and was closed


def test_math_needs_a_math_verifier_and_no_sft():
    from nemo_gdro.trainer.config import validate

    with pytest.raises(ConfigError, match="reward.verifier=arithmetic does not score data.task=math"):
        validate(compose(overrides=["data=math", "data.train_files=[x.parquet]"]))


@pytest.mark.slow
def test_in_process_step_bounds_a_pathological_answer_and_close_reaps_workers(files, tmp_path):
    """One RL step in this process; the step's own verifier bounds a nested power by its timeout."""
    from nemo_gdro.trainer.loop import Trainer

    # No KL reference: it is frozen when run() starts RL, which this test does not call.
    cfg = compose(overrides=math_args(files, tmp_path / "run", "reward.timeout_s=1.0", "trainer.max_steps=1",
                                      "algorithm.policy_loss.kl_coef=0.0"))
    trainer = Trainer(cfg)
    try:
        metrics = trainer.rl_step(0)
        for key in ("reward/timeouts", "reward/failures", "time/verify_s", "reward/overlong_frac", "reward/truncated_frac"):
            assert math.isfinite(metrics[key]), key
        verifier = trainer.components.task.verifier
        assert verifier.uses_workers and verifier is trainer.components.task.eval_suites["math500"].verifier
        texts = [f"Answer: {NESTED_POW}", "so Answer: 42", "Answer: 41"]
        t0 = time.perf_counter()
        res = verifier.verify_batch(texts, ["5", "42", "42"])
        elapsed = time.perf_counter() - t0
        assert res.correct.tolist() == [False, True, False] and res.status.tolist()[0] != 0
        assert elapsed < 1.0 + 2.0, elapsed  # the timeout plus a worker fork, never sympy's hours
        pids = trainer.components.verifiers.worker_pids()
        assert pids and all(_alive(p) for p in pids)
    finally:
        trainer.close()
    time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_math_rl_under_dp2_and_tp2_then_export(files, tmp_path, layout):
    from nemo_gdro.cli import main

    out = tmp_path / "run"
    extra = ["parallel.tensor_parallel=2"] if layout == "tp2" else []
    log = _train_args(math_args(files, out, "checkpoint.save_hf=true", *extra), nproc=2)
    assert "[nemo-gdro rank 1/2]" in log
    rows = _rows(out)
    for step in (1, 2, 3):
        r = rows[step]
        assert r["train/rollouts"] == 8
        for key in ("actor/loss", "train/reward_mean", "time/verify_s", "reward/truncated_frac"):
            assert math.isfinite(r[key]), (step, key)
        # Random tokens never stop: every row runs to max_new_tokens and carries the full penalty.
        assert r["reward/truncated_frac"] == 1.0 and r["reward/overlong_frac"] == 1.0
        assert r["train/reward_mean"] == -1.0 and r["reward/timeouts"] == 0 and r["reward/failures"] == 0
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    final = evals[-1]
    assert final["step"] == 3
    for key in ("eval/math500/mean@k", "eval/gpqa_diamond/mean@k", "eval/pass@1"):
        assert math.isfinite(final[key]), key

    exported = tmp_path / "exported"
    assert main(["export", str(out), str(exported)]) == 0
    ids = torch.tensor([[151643, 785, 4226, 374, 220, 19, 17]])
    got = _hf_logits(exported, ids)
    assert torch.isfinite(got).all()
    assert torch.equal(got, _hf_logits(out / "hf" / "step_00000003", ids))  # offline export == the live save


@pytest.mark.slow
def test_math_without_eval_suites_trains_without_evaluation(files, tmp_path, capsys):
    """The default data.eval_files: {} (issue 21 item 3): the run trains, says once that it does not
    evaluate, and writes its checkpoints, metrics, plots and summary (it died at the first evaluation
    with a torch.cat traceback); `nemo-gdro eval` of that run refuses in one line naming data.eval_files."""
    import warnings

    from nemo_gdro.cli import main
    from nemo_gdro.trainer.loop import Trainer
    from tests.trainer.test_loop import read_metrics

    run = tmp_path / "run"
    args = [a for a in math_args(files, run, "trainer.max_steps=2", "trainer.eval_every=1",
                                 "trainer.checkpoint_every=1") if not a.startswith("+data.eval_files")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Trainer(compose(overrides=args)) as trainer:
            result = trainer.run()
    notes = [str(w.message) for w in caught if "without evaluation" in str(w.message)]
    assert notes == ["training without evaluation: data.task=math has no eval suites (data.eval_files is empty); "
                     "add one with +data.eval_files.<benchmark>=[FILE] (e.g. +data.eval_files.math500=[/data/math500.jsonl])"]
    assert result.steps_done == 2 and result.final_eval == {} and result.sft_eval == {}
    assert len(read_metrics(run / "metrics.jsonl")) == 2
    assert not (run / "eval.jsonl").exists() or (run / "eval.jsonl").read_text().strip() == ""
    assert (run / "plots" / "reward.png").is_file()
    assert "eval: none logged" in (run / "summary.txt").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000002"
    assert "eval at step 2: none (no eval suites)" in capsys.readouterr().out

    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nemo-gdro eval: nothing to evaluate: data.task=math has no eval suites (data.eval_files is empty); "
                   "add one with +data.eval_files.<benchmark>=[FILE] (e.g. +data.eval_files.math500=[/data/math500.jsonl])"]
