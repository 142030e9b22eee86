"""AdamW groups, the lr schedule and the EMA."""

from __future__ import annotations

import math

import torch

from nanodit.model import NanoDiT
from nanodit.optim import EMA, ema_decay_at, lr_at, param_groups


def test_weight_decay_only_on_weights():
    model = NanoDiT(depth=1, width=32, heads=2, dino_dim=8, t5_dim=8)
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert "null_text" in kept and "null_dino" in kept
    assert all(n.endswith("bias") or "norm" in n or n.startswith("null") for n in kept)
    assert "blocks.0.attn.qkv.weight" in decayed and "x_embed.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_lr_schedule():
    lr, lo, warm, total = 3e-4, 1e-6, 100, 1000
    assert math.isclose(lr_at(0, lr, lo, warm, total), lr / warm)
    assert math.isclose(lr_at(99, lr, lo, warm, total), lr)
    assert math.isclose(lr_at(100, lr, lo, warm, total), lr)
    assert math.isclose(lr_at(550, lr, lo, warm, total), (lr + lo) / 2)
    assert math.isclose(lr_at(1000, lr, lo, warm, total), lo)
    lrs = [lr_at(s, lr, lo, warm, total) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_warmup_and_update():
    assert ema_decay_at(0, 0.9999, 5000) == 0.0
    assert math.isclose(ema_decay_at(2500, 0.9999, 5000), 0.49995)
    assert ema_decay_at(9000, 0.9999, 5000) == 0.9999
    model = torch.nn.Linear(3, 2)
    ema = EMA(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0.0)  # decay 0 copies
    assert torch.equal(ema.params["weight"], model.weight)
    before = ema.params["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0.75)
    torch.testing.assert_close(ema.params["weight"], 0.75 * before + 0.25 * model.weight)
    assert ema.params["weight"].dtype == torch.float32 and not ema.params["weight"].requires_grad
