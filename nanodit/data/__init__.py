"""Data: the shard schema (``shards``), the synthetic shapes set (``synth``), and the loaders (``loader``).

``build_loader(cfg, device)`` is what the trainer calls: it finds (or generates) the shards, reads the manifest,
picks a backend (``data.loader``) and returns ``(manifest, loader)``. Every backend yields the same batches
(loader.py states the semantics): gpu-cache (gpu_cache.py; all data resident on the device), webdataset
(wds_loader.py; tars read by index through a DataLoader) and dali (dali_loader.py; DALI's webdataset reader).
``auto`` takes gpu-cache when the data fits ``data.gpu_cache_fraction`` of the free device memory (always on a
CPU device: CPU tensors), else dali when installed, else webdataset.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanodit.data.loader import ScheduledLoader, Semantics
from nanodit.data.shards import ShardError, load_manifest, read_all


def synthetic_dir(cfg) -> Path:
    d = cfg.data
    return Path(d.cache_dir) / f"shapes-n{d.synth_samples}-s{d.synth_seed}-z{d.synth_size}"


def ensure_synthetic(cfg) -> Path:
    """The built-in shapes set for this config, generated once into ``data.cache_dir``."""
    from nanodit.data.synth import make_dataset

    out = synthetic_dir(cfg)
    if not (out / "manifest.json").is_file():
        make_dataset(out, samples=cfg.data.synth_samples, seed=cfg.data.synth_seed, size=cfg.data.synth_size)
    return out


def data_root(cfg) -> Path:
    if cfg.data.path is None:
        return ensure_synthetic(cfg)
    root = Path(cfg.data.path)
    if not root.is_dir():
        raise ShardError(f"data.path={cfg.data.path!r}: no such folder")
    return root


def rank_and_world(cfg) -> tuple[int, int]:
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


def semantics(cfg) -> Semantics:
    t, d = cfg.train, cfg.data
    rank, world = rank_and_world(cfg)
    return Semantics(
        batch_size=t.batch_size,
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


def pick_backend(cfg, manifest: dict, sem: Semantics, device: torch.device) -> tuple[str, str]:
    """(backend, why) for ``data.loader`` on ``device``; ``gpu-cache`` is refused when it cannot fit."""
    from nanodit.data.dali_loader import dali_available, require_dali
    from nanodit.data.gpu_cache import cache_bytes

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


def _check_max_len(root: Path, max_len: int | None, lengths) -> None:
    if not max_len:
        return
    for sid, n in lengths:
        if n > max_len:
            raise ShardError(f"{root}: sample {sid}: T5 length {n} > data.t5_max_len={max_len}")


def build_loader(cfg, device: torch.device) -> tuple[dict, ScheduledLoader]:
    """(manifest, loader) for ``cfg.data``; the loader yields batch dicts on ``device`` (see loader.py).

    The loader also carries ``root`` (the shard folder), ``skipped`` (schema errors skipped with
    ``data.on_error=skip``), ``name`` (the backend) and ``reason`` (why that backend).
    """
    d = cfg.data
    if d.prefetch < 1:
        from nanodit.config import ConfigError

        raise ConfigError(f"config: data.prefetch={d.prefetch} must be >= 1")
    root = data_root(cfg)
    manifest = load_manifest(root)
    sem = semantics(cfg)
    backend, reason = pick_backend(cfg, manifest, sem, device)
    max_len = d.t5_max_len or manifest.get("t5_max_len")
    if backend == "gpu-cache":
        from nanodit.data.gpu_cache import GpuCacheLoader

        manifest, groups, skipped = read_all(root, on_error=d.on_error)
        lengths = (
            (s.id, a.shape[0]) for g in groups.values() for s in g for a in (s.t5, s.t5_flip) if a is not None
        )
        _check_max_len(root, max_len, lengths)
        loader = GpuCacheLoader(groups, sem, device)
    else:
        from nanodit.data.index import build_index

        index = build_index(root, on_error=d.on_error, threads=max(1, d.num_workers))
        lengths = (
            (ib.ids[i], int(n)) for ib in index.buckets.values() for i, n in enumerate(ib.t5_len.max(1))
        )
        _check_max_len(root, max_len, lengths)
        skipped = index.skipped
        if backend == "dali":
            from nanodit.data.dali_loader import DaliLoader

            loader = DaliLoader(index, sem, device, threads=max(1, d.num_workers), prefetch=d.prefetch)
        else:
            from nanodit.data.wds_loader import WebDatasetLoader

            loader = WebDatasetLoader(index, sem, device, num_workers=d.num_workers, prefetch=d.prefetch)
    loader.skipped = skipped
    loader.root = root
    loader.reason = reason
    return manifest, loader
