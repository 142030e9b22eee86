"""Resuming a run: which checkpoint to continue, and whether this run may continue it.

``train.resume=auto`` says what it found and takes the newest checkpoint of the run folder that loads. A newer
one that does not load (saves are atomic, so a kill never truncates one; a failing disk or a copy can) is
renamed ``*.corrupt``, with a warning, and the one before it is used. ``train.resume=PATH`` takes that file.

What may differ between the checkpoint's run and this one:

- freely: ``train.steps`` (a longer or shorter run; the cosine LR is spread over the new total from the
  resumed step on), validation (``val.*``), cadences (``train.log_every``, ``ckpt_every``,
  ``keep_checkpoints``, profiling), the loader's workers and backend (``data.num_workers``, ``prefetch``,
  ``loader``, ``gpu_cache_fraction``: every backend yields the same batches), ``data.check``,
  ``data.on_error``, the device, compilation, ``model.kernels``/``attention``/``activation_checkpointing`` (the
  same weights), ``run.*``, ``train.on_nonfinite``, ``train.strategy`` (ddp and fsdp compute the same step; a
  change of the world size or of ``train.grad_accum`` says so in one warning: nanodit/dist_checkpoint.py), and
  where the data lies and what its keys are called (``data.path``, ``data.keys.*``, ``data.cache_dir``,
  ``data.t5_max_len``) as long as it holds the same samples;
- with a one-line warning (the run goes on, but is no longer the uninterrupted run): anything else (the LR,
  batch size, seed, dropout, flip, precision, ...) and data whose buckets or counts changed;
- never: the model's architecture or the data schema (latent channels, DINO and T5 widths): a one-line
  ``ResumeError`` says what differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nanodit.checkpoint import CheckpointError, first_line, list_checkpoints
from nanodit.config import to_dict
from nanodit.dist_checkpoint import load_checkpoint
from nanodit.model import SIZES

log = logging.getLogger(__name__)

FREE = (
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.checkpoint_async",
    "train.resume",
    "train.profile_steps",
    "train.profile_start",
    "train.device",
    "train.compile",
    "train.compile_mode",
    "train.compile_scope",
    "train.on_nonfinite",
    "train.strategy",
    "train.grad_accum",  # with the world size: one layout warning (dist_checkpoint.layout_warnings)
    "val.",
    "run.",
    "data.num_workers",
    "data.prefetch",
    "data.loader",
    "data.gpu_cache_fraction",
    "data.check",
    "data.on_error",
    "data.path",
    "data.keys.",
    "data.cache_dir",
    "data.t5_pad_multiple",
    "data.t5_max_len",
    "model.kernels",
    "model.attention",
    "model.activation_checkpointing",
)
ARCH = (
    "depth",
    "width",
    "heads",
    "patch",
    "mlp_ratio",
    "in_channels",
    "null_text_tokens",
    "dino_dim",
    "t5_dim",
)


class ResumeError(CheckpointError):
    """This run cannot continue the checkpoint; the message is one line and says what differs."""


def pick_checkpoint(
    run_dir: Path, resume: str, map_location, tensors: bool = True
) -> tuple[Path | None, dict | None]:
    """(path, state) to resume from for ``train.resume`` (none | auto | PATH), or (None, None). ``tensors=False``
    (several processes): only what a check needs is read (``dist_checkpoint.load_checkpoint``)."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume, map_location=map_location, tensors=tensors)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        log.info(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'}: starting at step 0")
        return None, None
    for path in reversed(ckpts):
        try:
            state = load_checkpoint(path, map_location=map_location, tensors=tensors)
        except CheckpointError as e:
            bad = path.with_name(path.name + ".corrupt")
            path.replace(bad)  # never picked again, kept for a look
            log.warning(f"resume=auto: {e}; renamed it {bad.name}, trying the one before")
            continue
        log.info(
            f"resume=auto: {len(ckpts)} checkpoint(s) in {run_dir / 'checkpoints'}; resuming from {path.name} (step {state['step']})"
        )
        return path, state
    raise CheckpointError(
        f"resume=auto: none of the {len(ckpts)} checkpoints in {run_dir / 'checkpoints'} can be read"
    )


def architecture(model: dict, manifest: dict | None) -> dict:
    """The numbers that fix the model's parameter shapes (a named size resolved, overrides applied)."""
    arch = dict(SIZES.get(model.get("size"), {}))
    arch.update({k: model[k] for k in ("depth", "width", "heads") if model.get(k) is not None})
    arch.update({k: model.get(k) for k in ("patch", "mlp_ratio", "in_channels", "null_text_tokens")})
    for k in ("dino_dim", "t5_dim"):
        arch[k] = model.get(k) or (manifest or {}).get(k)
    return arch


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(state: dict, cfg, manifest: dict | None = None) -> list[str]:
    """Raise ResumeError if this run cannot continue ``state``; else the warnings to print (one line each).
    Without ``manifest`` (before the data is read) only what the config fixes is compared."""
    old_cfg, new_cfg = state["config"], to_dict(cfg)
    old_m = state.get("manifest") if manifest is not None else None
    warnings = []
    if manifest is not None and old_m:  # the data first: a model that differs only in its input widths
        schema = ("latent_channels", "dino_dim", "t5_dim")
        sdiff = [
            f"{k} {old_m.get(k)} -> {manifest.get(k)}" for k in schema if old_m.get(k) != manifest.get(k)
        ]
        if sdiff:
            raise ResumeError(
                f"cannot resume: the data schema differs from the checkpoint's ({', '.join(sdiff)}): "
                "this data does not fit the trained model"
            )
        counts = lambda m: {b: e.get("count") for b, e in m.get("buckets", {}).items()}  # noqa: E731
        if counts(old_m) != counts(manifest):
            warnings.append(
                f"resume: the data's buckets changed ({counts(old_m)} -> {counts(manifest)}): the "
                "loader's position (epoch, batch) now points at other samples"
            )
    old, new = architecture(old_cfg["model"], old_m), architecture(new_cfg["model"], manifest)
    keys = [k for k in ARCH if manifest is not None or k not in ("dino_dim", "t5_dim")]
    diff = [f"{k} {old[k]} -> {new[k]}" for k in keys if old.get(k) != new.get(k) and old.get(k) is not None]
    if diff:
        sizes = f"model.size {old_cfg['model'].get('size')} -> {new_cfg['model'].get('size')}"
        raise ResumeError(
            f"cannot resume: the checkpoint's model differs from this run's ({sizes}; {', '.join(diff)}); "
            "resume with the checkpoint's model settings, or start a new run.dir"
        )
    of, nf = _flat(old_cfg), _flat(new_cfg)
    changed = [
        f"{k} {of.get(k)!r} -> {nf.get(k)!r}"
        for k in sorted(set(of) | set(nf))
        if of.get(k) != nf.get(k) and not k.startswith(FREE) and not k.startswith("model.")
    ]
    if changed:
        warnings.append(
            f"resume: changed since the checkpoint: {'; '.join(changed)} (no longer the uninterrupted run)"
        )
    return warnings


def load_into(state: dict, model, ema, optim, path: Path) -> None:
    """The weights, EMA and optimizer state; a mismatch the checks did not foresee is still one line."""
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optim"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ResumeError(f"cannot resume from {path}: {first_line(e)}") from None
