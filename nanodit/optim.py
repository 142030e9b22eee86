"""Optimizer parameter groups, the learning-rate schedule, and the EMA of the weights."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("null_text", "null_dino")  # learned null embeddings: no weight decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weight matrices/kernels only; none on norms, biases, and the learned null embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not name.endswith(NO_DECAY_NAMES):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, tcfg, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=tuple(tcfg.betas), fused=fused
    )


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup 0 -> lr over ``warmup`` steps, then cosine lr -> min_lr at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float, warmup: int) -> float:
    """EMA decay warms up linearly 0 -> ``decay`` over ``warmup`` steps (0 at step 0: the EMA copies)."""
    if warmup <= 0:
        return decay
    return decay * min(1.0, step / warmup)


class EMA:
    """An fp32 shadow of the model's parameters and buffers; never trained, never compiled."""

    def __init__(self, model: nn.Module):
        self.params = {k: p.detach().float().clone() for k, p in model.named_parameters()}
        self.buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    def update(self, model: nn.Module, decay: float) -> None:
        """ema <- lerp(ema, live, 1 - decay)."""
        self._lerp(model, 1.0 - decay)

    def update_with(self, model: nn.Module, weight: torch.Tensor) -> None:
        """``update`` with the lerp weight ``1 - decay`` as a 0-d device tensor, which a CUDA graph reads when it
        replays (the graph step fills it each step). The same numbers as ``update`` (one weight per tensor)."""
        self._lerp(model, weight)

    @torch.no_grad()
    def _lerp(self, model: nn.Module, weight: float | torch.Tensor) -> None:
        names = list(self.params)
        live = dict(model.named_parameters())
        ema = [self.params[k] for k in names]
        cur = [live[k].detach().float() for k in names]
        torch._foreach_lerp_(ema, cur, [weight] * len(ema) if torch.is_tensor(weight) else weight)
        for k, b in model.named_buffers():
            self.buffers[k].copy_(b)

    def state_dict(self) -> dict:
        return {**self.params, **self.buffers}

    def load_state_dict(self, state: dict) -> None:
        for k in self.params:
            self.params[k].copy_(state[k])
        for k in self.buffers:
            self.buffers[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (e.g. a copy used for validation)."""
        model.load_state_dict(self.state_dict(), strict=True)
