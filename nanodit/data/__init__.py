"""Data: the sample schema (``schema``), where shards are (``layout``), this project's writer and decode path
(``shards``), the index and the data check (``index``, ``check``), the loaders (``loader``) and the ``Batch`` they
yield (``batch``). The built-in synthetic set is the shapes world's (``nanodit.shapes``), written by ``prepare``.

``build_loader(cfg, device)`` is what the trainer calls, after ``prepare(cfg)`` (``nanodit.data.prepare``) wrote
the built-in set if ``data.path`` is null. It only reads: it finds the shards, resolves their layout into the
canonical manifest, picks a backend (``data.loader``), checks every sample (the same check as ``python -m
nanodit.data check``; with ``data.check=auto`` the arrays are not re-read when a stamp of that check vouches for
the files) and returns ``(manifest, loader)``. Every backend yields the same batches (loader.py states the
semantics): gpu-cache (gpu_cache.py; all data resident on the device), webdataset (wds_loader.py; tars read by
index through a DataLoader) and dali (dali_loader.py; DALI's webdataset reader). ``auto`` takes gpu-cache when the
data fits ``data.gpu_cache_fraction`` of the free device memory (always on a CPU device: CPU tensors), else dali
when installed, else webdataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanodit.data.check import progress_bar, stamp_matches
from nanodit.data.dali_loader import DaliLoader, dali_available, require_dali
from nanodit.data.gpu_cache import GpuCacheLoader, cache_bytes
from nanodit.data.index import SampleIndex, build_index, read_samples
from nanodit.data.layout import MANIFEST, Layout, register, resolve
from nanodit.data.loader import ScheduledLoader, Semantics
from nanodit.data.schema import Keys, ShardError, skip_counts
from nanodit.data.wds_loader import WebDatasetLoader

if TYPE_CHECKING:  # the loaders themselves need no omegaconf
    from nanodit.config import Config


def synthetic_dir(cfg: Config) -> Path:
    """Where the built-in shapes set of ``data.synth_*`` lives: a folder of ``data.cache_dir`` named by them."""
    d = cfg.data
    return Path(d.cache_dir) / f"shapes-n{d.synth_samples}-s{d.synth_seed}-z{d.synth_size}"


def data_keys(cfg: Config) -> Keys:
    """``data.keys`` as the readers' key map."""
    return Keys.from_fields(dataclasses.asdict(cfg.data.keys))


def data_root(cfg: Config) -> Path:
    """``data.path`` (a folder, a glob, a brace pattern or a list of tars; None: the built-in shapes set, which
    ``nanodit.data.prepare`` writes: this only reads), registered with the run's key map and T5 limit so that
    every reader given the path reads it as the loader does."""
    spec = cfg.data.path
    if spec is None:
        root = synthetic_dir(cfg)
        if not (root / MANIFEST).is_file():
            raise ShardError(
                f"data.path is null (the built-in shapes set) and {root} holds none: write it first "
                "(python -m nanodit.data synth with the same data.* settings, or nanodit.data.prepare.prepare(cfg))"
            )
    else:
        root = Path(spec)
        pattern = any(ch in spec for ch in "*?[{,") or "::" in spec
        if not (root.is_dir() or root.is_file() or pattern):
            raise ShardError(f"data.path={spec!r}: no such folder or file")
    register(root, data_keys(cfg), cfg.data.t5_max_len)
    return root


def rank_and_world(cfg: Config) -> tuple[int, int]:
    """(rank, world size) from ``data.rank``/``data.world_size``, else from torch.distributed, else (0, 1)."""
    d = cfg.data
    rank, world = d.rank, d.world_size
    if rank is None or world is None:
        dist = torch.distributed
        live = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if live else 0)
        world = world if world is not None else (dist.get_world_size() if live else 1)
    if world < 1 or not 0 <= rank < world:
        from nanodit.config import ConfigError  # late: the loaders themselves need no omegaconf

        raise ConfigError(
            f"config: data.rank={rank} must be in [0, data.world_size={world}) with world_size >= 1"
        )
    return rank, world


def semantics(cfg: Config) -> Semantics:
    """The loaders' semantics of ``cfg``; train.batch_size is the global batch, each of the world's ranks loads
    its share of it (nanodit/distributed.py)."""
    t, d = cfg.train, cfg.data
    rank, world = rank_and_world(cfg)
    if t.batch_size % world:
        from nanodit.config import ConfigError  # late: the loaders themselves need no omegaconf

        raise ConfigError(
            f"config: train.batch_size={t.batch_size} is not divisible by data.world_size={world}"
        )
    return Semantics(
        batch_size=t.batch_size // world,
        seed=t.seed,
        shuffle=d.shuffle,
        flip=d.flip,
        last_batch=d.last_batch,
        pad_multiple=d.t5_pad_multiple,
        p_drop_both=t.p_drop_both,
        p_drop_text=t.p_drop_text,
        p_drop_dino=t.p_drop_dino,
        rank=rank,
        world_size=world,
    )


def pick_backend(cfg: Config, manifest: dict, sem: Semantics, device: torch.device) -> tuple[str, str]:
    """(backend, why) for ``data.loader`` on ``device``; ``gpu-cache`` is refused when it cannot fit."""
    choice, device = cfg.data.loader, torch.device(device)
    if choice == "dali":
        require_dali()
    if choice in ("dali", "webdataset"):
        return choice, "data.loader"
    if device.type != "cuda":
        return "gpu-cache", f"{device.type} device: the cache holds CPU tensors"
    need, free = cache_bytes(manifest, sem), torch.cuda.mem_get_info(device)[0]
    gib = f"{need / 2**30:.2f} GiB of data, {free / 2**30:.1f} GiB free"
    if choice == "gpu-cache":
        if need > free:
            raise ShardError(
                f"data.loader=gpu-cache: the data needs ~{need / 2**30:.1f} GiB on {device} but "
                f"{free / 2**30:.1f} GiB are free; use data.loader=dali or webdataset"
            )
        return "gpu-cache", "data.loader"
    if need <= cfg.data.gpu_cache_fraction * free:
        return "gpu-cache", f"auto: {gib} (fits data.gpu_cache_fraction={cfg.data.gpu_cache_fraction})"
    if dali_available():
        return "dali", f"auto: {gib}, too much to cache; DALI is installed"
    return "webdataset", f"auto: {gib}, too much to cache; DALI is not installed"


def build_loader(cfg: Config, device: torch.device, progress: bool = False) -> tuple[dict, ScheduledLoader]:
    """(manifest, loader) for ``cfg.data``; the loader yields Batches on ``device`` (see loader.py, batch.py).

    The loader also carries ``root`` (the data.path), ``skipped`` (ShardErrors skipped with
    ``data.on_error=skip``, each with its ``reason``), ``problems`` (data-set problems warned under skip),
    ``checked`` ("full", or "stamp" when a data check's stamp vouched for the arrays), ``name`` (the backend)
    and ``reason`` (why that backend). ``progress``: a bar while every sample is read.
    """
    d = cfg.data
    if d.prefetch < 1:
        from nanodit.config import ConfigError  # late: the loaders themselves need no omegaconf

        raise ConfigError(f"config: data.prefetch={d.prefetch} must be >= 1")
    root = data_root(cfg)
    layout = resolve(root, data_keys(cfg), d.t5_max_len)
    manifest = layout.manifest
    sem = semantics(cfg)
    backend, reason = pick_backend(cfg, manifest, sem, device)
    trusted = d.check == "auto" and stamp_matches(layout)
    index = _checked_index(
        cfg, layout, streaming=backend != "gpu-cache", values=not trusted, progress=progress
    )
    if backend == "gpu-cache":
        loader = GpuCacheLoader(read_samples(index), sem, device)
    elif backend == "dali":
        loader = DaliLoader(index, sem, device, threads=max(1, d.num_workers), prefetch=d.prefetch)
    else:
        loader = WebDatasetLoader(index, sem, device, num_workers=d.num_workers, prefetch=d.prefetch)
    loader.skipped = index.skipped
    loader.problems = index.problems
    loader.checked = "stamp" if trusted else "full"
    loader.root = root
    loader.reason = reason
    return manifest, loader


def _checked_index(cfg: Config, layout: Layout, streaming: bool, values: bool, progress: bool) -> SampleIndex:
    """The sample index of ``layout``, every sample checked (its arrays too with ``values``); a set where no
    sample passed is an error naming the skips."""
    d = cfg.data
    bar, tick = progress_bar(layout.manifest["count"], "data check", progress and values)
    try:
        index = build_index(
            layout,
            d.on_error,
            threads=max(1, d.num_workers),
            values=values,
            streaming=streaming,
            progress=tick,
        )
    finally:
        if bar is not None:
            bar.close()
    if not sum(index.counts.values()):
        counts = ", ".join(f"{k}: {v}" for k, v in skip_counts(index.skipped).items())
        raise ShardError(
            f"data.path={layout.spec!r}: no sample passed the check ({len(index.skipped)} skipped: {counts})"
        )
    return index
