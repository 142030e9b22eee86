"""The tiny smoke run that the trainer's end-to-end tests share: its shapes set, written once, and its overrides."""

from __future__ import annotations

from pathlib import Path

from nanodit.config import load_config
from nanodit.data.prepare import prepare


def smoke_cache(tmp_path_factory) -> Path:
    """A ``data.cache_dir`` holding the smoke config's shapes set (a module fixture's body)."""
    d = tmp_path_factory.mktemp("cache")
    prepare(load_config("smoke", [f"data.cache_dir={d}"]))
    return d


def tiny_overrides(run: Path, cache: Path, *extra: str) -> list[str]:
    """The smoke config at model.size=tiny into ``run``, a log row every step, no validation, no TensorBoard."""
    return [
        f"run.dir={run}",
        f"data.cache_dir={cache}",
        "model.size=tiny",
        "train.log_every=1",
        "run.progress=false",
        "val.at_end=false",
        "val.every=0",
        "run.tensorboard=false",
        *extra,
    ]
