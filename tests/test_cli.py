import subprocess
import sys

from nemo_gdro.cli import main


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_train_config_errors_are_reported_with_the_key(capsys):
    assert main(["train", "trainer.max_stepz=2"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "trainer.max_stepz" in err


def test_plot_renders_a_run_and_refuses_a_non_run(tmp_path, capsys):
    from nemo_gdro.trainer.metrics import MetricsLogger

    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 4):
            logger.log(step, {"train/reward_mean": step / 10, "time/step_s": 1.0})
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "summary.txt").is_file() and any((tmp_path / "plots").glob("*.png"))
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_eval_and_export_refuse_what_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a training run" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "nemo_gdro.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "overrides" not in out.stderr


def test_unknown_config_name_is_a_clear_error(capsys):
    assert main(["train", "--config-name=nope"]) == 2
    assert "nope" in capsys.readouterr().err


# ------------------------------------------------------------ train --validate-only (issue 21, item 6)
def test_validate_only_prints_one_ok_line_and_builds_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    run = tmp_path / "run"
    assert main(["train", "--validate-only", f"run.output_dir={run}"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("nemo-gdro train: configuration OK for this launch (data.task=arithmetic")
    assert out.count("\n") == 1 and err == ""
    assert not run.exists()


def test_validate_only_checks_the_layout_against_the_jobs_task_count(capsys, monkeypatch):
    """A batch script runs outside the job step: SLURM_NTASKS, not this one process, is the world size."""
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert main(["train", "--validate-only", "parallel.tensor_parallel=2"]) == 0
    assert "configuration OK for 4 process(es)" in capsys.readouterr().out
    assert main(["train", "--validate-only", "parallel.tensor_parallel=3"]) == 2
    assert "must divide the 4 process(es) launched" in capsys.readouterr().err
    assert main(["train", "--validate-only", "--world-size", "6", "parallel.tensor_parallel=3"]) == 0
    assert "configuration OK for 6 process(es)" in capsys.readouterr().out
    assert main(["train", "--world-size", "6", "parallel.tensor_parallel=3"]) == 2
    assert "--world-size applies to --validate-only only" in capsys.readouterr().err


def test_validate_only_names_every_input_problem_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.txt").write_text("x")
    (tmp_path / "gpqa.csv").write_text("Question,Answer\nq,a\n")
    code = main(["train", "--validate-only", "--world-size", "1", "data=math", "model=hf", "model.path=model",
                 "rollout.engine=hf", "model.dtype=float32", "reward.verifier=dapo_math",
                 "data.train_files=[train.txt,absent.parquet]",
                 "++data.eval_files.gpqa_diamond=[gpqa.csv]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("nemo-gdro train: configuration error: 4 input file problems: ")
    # Relative paths are resolved against the launch directory when the config is loaded.
    for text in (f"{tmp_path}/model/config.json: no key 'architectures'",
                 f"data.train_files[0]={tmp_path}/train.txt: unknown data file type '.txt'",
                 f"data.train_files[1]={tmp_path}/absent.parquet: does not exist",
                 f"data.eval_files.gpqa_diamond[0]={tmp_path}/gpqa.csv: not a gpqa_diamond file"):
        assert text in err, text


def test_train_checks_the_input_files_before_building_anything(tmp_path, capsys, monkeypatch):
    """The same checks run on an ordinary `train`: one line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", "data=math", "model=hf", f"model.path={tmp_path}", "rollout.engine=hf", "reward.verifier=dapo_math",
                 "model.dtype=float32", f"data.train_files=[{tmp_path}/t.jsonl]", f"run.output_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.path={tmp_path}: no config.json" in err and "t.jsonl: does not exist" in err
    assert not (tmp_path / "run").exists()
