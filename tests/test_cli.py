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
