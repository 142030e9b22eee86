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


def test_validate_help_lists_the_keys_it_takes_and_only_those(capsys) -> None:
    """``nanodit validate --help``: every val.* key and the data/device keys a re-validation may change, with
    their descriptions; none of the keys the weights fix (model.*, the training recipe)."""
    with pytest.raises(SystemExit) as e:
        main(["validate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nanodit validate")
    for field in Config.__dataclass_fields__["val"].default_factory().__dataclass_fields__:
        assert f"  val.{field} = " in out, f"val.{field}"
    for key in ("data.path", "data.cache_dir", "train.device", "train.precision"):
        assert f"  {key} = " in out, key
    assert "Euler steps" in out and "model.depth" not in out and "train.lr " not in out


def test_every_commented_config_key_shows_its_comment() -> None:
    """A field with a comment on its own line(s), including inside the parentheses the formatter wraps a long
    default in, gets it as its description in --help: none is lost (val.self_test's and val.cuda_graph's were)."""
    import dataclasses
    import inspect
    import re

    from nanodit.config import _field_comments

    for section in dataclasses.fields(Config):
        cls = section.default_factory
        notes = _field_comments(cls)
        lines = inspect.getsource(cls).splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"    (\w+)\s*:", line)
            if not m or m.group(1) not in cls.__dataclass_fields__:
                continue
            own = [line]
            if line.rstrip().endswith("= ("):
                own += [
                    x
                    for x in lines[i + 1 :][
                        : next(j for j, x in enumerate(lines[i + 1 :]) if x.strip() == ")")
                    ]
                ]
            if any("#" in x for x in own):
                assert notes.get(m.group(1)), f"{section.name}.{m.group(1)}"
    assert (
        "planted faults" in _field_comments(Config.__dataclass_fields__["val"].default_factory)["self_test"]
    )


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


def _tiny_run(tmp_path, name: str) -> list[str]:
    return [
        "--config",
        "smoke",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run.dir={tmp_path / name}",
        "model.size=tiny",
        "train.steps=2",
        "train.log_every=1",
        "train.batch_size=4",
        "val.at_end=false",
        "val.every=0",
        "run.tensorboard=false",
    ]


def test_quiet_keeps_warnings_and_verbose_keeps_everything(tmp_path, capsys) -> None:
    """``-q``: no progress lines, no bar, but a warning still prints (here: resuming with a changed learning rate);
    the default prints the progress lines; each command's setting is gone when it returns."""
    assert main(["train", *_tiny_run(tmp_path, "a")]) == 0
    out = capsys.readouterr().out
    assert "model: tiny" in out and "done: 2 steps" in out
    quiet = [*_tiny_run(tmp_path, "a"), "train.steps=3", "train.resume=auto", "train.lr=5e-4", "-q"]
    assert main(["train", *quiet]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), lines
    assert any("train.lr 0.001 -> 0.0005" in line for line in lines)
    assert "train:" not in captured.err  # no progress bar under -q
    assert main(["train", *_tiny_run(tmp_path, "b"), "-v"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out


def test_a_program_with_its_own_logging_gets_the_records(tmp_path, capsys) -> None:
    """``train(cfg)`` called by a program that set up ``logging`` prints nothing itself: the records reach the
    program's handlers under the ``nanodit`` logger names."""
    import logging

    from nanodit.config import load_config
    from nanodit.train import train

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, nano = logging.getLogger(), logging.getLogger("nanodit")
    saved = root.level, list(root.handlers), nano.level, list(nano.handlers), nano.propagate
    nano.handlers[:] = []
    nano.setLevel(logging.NOTSET)
    nano.propagate = True
    root.addHandler(keep := Keep())
    root.setLevel(logging.INFO)
    try:
        train(load_config("smoke", _tiny_run(tmp_path, "c")[2:]))
    finally:
        root.removeHandler(keep)
        root.setLevel(saved[0])
        nano.setLevel(saved[2])
        nano.handlers[:] = saved[3]
        nano.propagate = saved[4]
    assert "done: 2 steps" not in capsys.readouterr().out
    done = [r for r in records if r.getMessage().startswith("done: 2 steps")]
    assert done and done[0].name == "nanodit.train" and done[0].levelno == logging.INFO


def test_python_m_train_prints_its_lines(tmp_path) -> None:
    """``python -m nanodit.train`` (the module run as __main__) prints the same lines as ``nanodit train``."""
    done = subprocess.run(
        [sys.executable, "-m", "nanodit.train", *_tiny_run(tmp_path, "m")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: tiny" in done.stdout and "done: 2 steps" in done.stdout, done.stdout
