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


def test_plot_is_honest_about_not_existing_yet(capsys):
    assert main(["plot"]) == 2
    assert "not yet available" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "nemo_gdro.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "overrides" not in out.stderr


def test_unknown_config_name_is_a_clear_error(capsys):
    assert main(["train", "--config-name=nope"]) == 2
    assert "nope" in capsys.readouterr().err
