"""Making the data apart from loading it: ``prepare(cfg)`` writes the built-in shapes set when ``data.path`` is
null; ``build_loader`` and ``data_root`` only read.

    root = prepare(cfg)                              # the trainer's setup, the validate CLI, calibrate.py
    manifest, loader = build_loader(cfg, device)     # reads what prepare left

The built-in set is the shapes world's (``nanodit.shapes.make_dataset``) at ``data.synth_samples/seed/size``,
written once into ``data.cache_dir`` (``synthetic_dir``); a given ``data.path`` is never written. This module is
not imported by ``nanodit.data`` itself: the shapes world writes through ``nanodit.data.shards``, so the package
stays below it and only this step, above both, calls it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from nanodit.data import data_root, synthetic_dir
from nanodit.data.layout import MANIFEST
from nanodit.shapes import make_dataset

if TYPE_CHECKING:  # the data package needs no omegaconf
    from nanodit.config import Config

log = logging.getLogger(__name__)


def write_synthetic(cfg: Config, out: str | Path) -> dict:
    """Write the shapes set of ``data.synth_*`` into ``out``; returns its manifest."""
    d = cfg.data
    return make_dataset(out, samples=d.synth_samples, seed=d.synth_seed, size=d.synth_size)


def prepare(cfg: Config) -> Path:
    """The data root of ``cfg`` (``data_root``), after writing the built-in shapes set if ``data.path`` is null
    and the set is not there yet."""
    if cfg.data.path is None and not (synthetic_dir(cfg) / MANIFEST).is_file():
        m = write_synthetic(cfg, synthetic_dir(cfg))
        log.info(f"data: wrote the built-in shapes set ({m['count']} samples) to {synthetic_dir(cfg)}")
    return data_root(cfg)
