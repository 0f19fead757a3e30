import subprocess
import sys

from nemo_gdro.cli import main


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_train_is_honest_about_not_existing_yet(capsys):
    assert main(["train", "trainer.max_steps=2"]) == 2
    assert "not yet available" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "nemo_gdro.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "overrides" not in out.stderr
