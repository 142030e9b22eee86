"""Data: the shard schema (``shards``), the synthetic shapes set (``synth``), and the loaders (``loader``).

``build_loader(cfg, device)`` is what the trainer calls: it finds (or generates) the shards, reads the manifest
and returns ``(manifest, loader)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanodit.data.loader import MemoryLoader, Semantics
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


def semantics(cfg) -> Semantics:
    t, d = cfg.train, cfg.data
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
    )


def build_loader(cfg, device: torch.device):
    """(manifest, loader) for ``cfg.data``; the loader yields batch dicts on ``device``."""
    root = data_root(cfg)
    manifest = load_manifest(root)
    if cfg.data.loader in ("dali", "webdataset"):
        raise ShardError(
            f"data.loader={cfg.data.loader}: this backend is not available yet; use gpu-cache or auto"
        )
    manifest, groups, skipped = read_all(root, on_error=cfg.data.on_error)
    max_len = cfg.data.t5_max_len or manifest.get("t5_max_len")
    if max_len:
        for g in groups.values():
            for s in g:
                if s.t5.shape[0] > max_len or (s.t5_flip is not None and s.t5_flip.shape[0] > max_len):
                    raise ShardError(
                        f"{root}: sample {s.id}: T5 length {s.t5.shape[0]} > data.t5_max_len={max_len}"
                    )
    loader = MemoryLoader(groups, semantics(cfg), device)
    loader.skipped = skipped
    loader.root = root
    return manifest, loader
