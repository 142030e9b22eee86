"""The batch every loader backend yields, and the one function that builds it.

    batch = next(loader)                   # a Batch: one bucket's samples, on the loader's device
    batch.latent, batch.t5, batch.t5_mask  # (B, C, H, W) fp16, (B, L, Dt) fp16, (B, L) bool

How a batch is drawn (the schedule, flips, CFG dropout, padding) is loader.py's semantics; each backend moves the
bytes its own way and hands the tensors to ``make_batch``, so a field means the same whichever backend built it.
Letters: B batch, C latent channels, H, W latent size, L T5 tokens (padded), Dt T5 width, Dd DINO width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """One training batch; the fields of a flipped sample are its flipped variant's (latent, DINO, caption)."""

    latent: torch.Tensor  # (B, C, H, W) fp16
    dino: torch.Tensor  # (B, Dd) fp16
    t5: torch.Tensor  # (B, L, Dt) fp16, exactly zero past each caption
    t5_mask: torch.Tensor  # (B, L) bool: the valid prefix
    drop_text: torch.Tensor  # (B,) bool: CFG dropout of the caption
    drop_dino: torch.Tensor  # (B,) bool: CFG dropout of the DINO embedding
    flipped: torch.Tensor  # (B,) bool
    ids: list[str]  # sample ids, in batch order
    captions: list[str]  # the caption of each row (the left<->right-swapped one where flipped)
    epoch: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch with every tensor on ``device``."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in tensors.items() if torch.is_tensor(v)}
        return dataclasses.replace(self, **moved)


def make_batch(
    latent: torch.Tensor,
    dino: torch.Tensor,
    t5: torch.Tensor,
    t5_mask: torch.Tensor,
    flags: torch.Tensor,
    ids: list[str],
    captions: list[str],
    epoch: int,
) -> Batch:
    """The batch of every backend. ``flags``: (3, B) rows flipped, drop_text, drop_dino, bool or 0/1 integers
    (a backend uploads them with other per-sample numbers in one transfer), on the batch's device."""
    flipped, drop_text, drop_dino = flags.bool()  # 3 x (B,)
    return Batch(latent, dino, t5, t5_mask, drop_text, drop_dino, flipped, ids, captions, epoch)
