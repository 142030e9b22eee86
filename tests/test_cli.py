"""The ``nanodit`` command: one entry point (console script and ``python -m nanodit``) dispatching to train,
validate, data and config; every config key listed in ``--help``; one-line errors."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from nanodit.cli import COMMANDS, main
from nanodit.config import Config


def test_console_script_is_declared() -> None:
    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("nanodit") == "nanodit.cli:main"


def test_help_lists_the_commands(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS)
    done = subprocess.run([sys.executable, "-m", "nanodit", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "commands:" in done.stdout


def test_unknown_command_is_one_line(capsys) -> None:
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: nanodit: unknown command 'trian'") and "\n" not in err


def test_train_help_lists_every_config_key(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section in ("model", "data", "train", "val", "run"):
        for field in Config.__dataclass_fields__[section].default_factory().__dataclass_fields__:
            assert f"{section}.{field}" in out, f"{section}.{field}"
    assert "timestep shift" in out  # the descriptions come with the keys


def test_config_command_shows_values_and_descriptions(capsys) -> None:
    assert main(["config", "--config", "nano"]) == 0
    out = capsys.readouterr().out
    assert "train.t_shift = 7.389  (float)  timestep shift" in out
    assert main(["config", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_validate_dispatch_keeps_its_one_line_errors(tmp_path, capsys) -> None:
    assert main(["validate", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no such folder" in err and "\n" not in err
