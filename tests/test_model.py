"""NanoDiT: identity at init, the T5 mask is respected, nulls replace dropped conditions, sizes."""

from __future__ import annotations

import pytest
import torch

from nanodit.config import load_config
from nanodit.model import SIZES, NanoDiT, build_model, sincos_2d


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws its inputs and weights from a fixed seed."""
    torch.manual_seed(0)


# fp32 tolerance for results that differ only in the summation order over the key axis (a longer, masked
# T5 sequence): 64 ulp of the output's largest value; over 30 seeds the worst case was 16 ulp
ORDER_TOL = 64 * torch.finfo(torch.float32).eps


def tiny(**kw) -> NanoDiT:
    return NanoDiT(depth=2, width=64, heads=2, dino_dim=24, t5_dim=40, attention="math", **kw)


def inputs(B=3, H=10, W=14, L=7):
    x = torch.randn(B, 16, H, W)
    t = torch.rand(B)
    dino = torch.randn(B, 24)
    t5 = torch.randn(B, L, 40)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 1:] = False
    return x, t, dino, t5, mask


def randomize(model: torch.nn.Module) -> None:
    """Give every parameter (zero-initialised gates included) random values so all paths are live."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)


def test_output_is_exactly_zero_at_init():
    model = tiny()
    v = model(*inputs())
    assert v.shape == (3, 16, 10, 14)
    assert torch.count_nonzero(v) == 0


def test_blocks_are_identity_at_init():
    model = tiny()
    x = torch.randn(2, 35, 64)
    c = torch.randn(2, 64)
    y, ym = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool)
    for block in model.blocks:
        assert torch.equal(block(x, c, y, ym), x)


def test_padded_t5_positions_change_nothing():
    model = tiny()
    randomize(model)
    x, t, dino, t5, mask = inputs()
    v1 = model(x, t, dino, t5, mask)
    t5b = t5.clone()
    t5b[~mask] = torch.randn(int((~mask).sum()), 40) * 100
    v2 = model(x, t, dino, t5b, mask)
    torch.testing.assert_close(v1, v2, rtol=0, atol=ORDER_TOL * float(v1.abs().max()))
    # ...while a valid position does change the output (the test has power)
    t5c = t5.clone()
    t5c[0, 0] += 1.0
    assert (model(x, t, dino, t5c, mask) - v1).abs().max() > 1e-4


def test_padding_length_changes_nothing():
    model = tiny()
    randomize(model)
    x, t, dino, t5, mask = inputs()
    v1 = model(x, t, dino, t5, mask)
    t5p = torch.cat([t5, torch.randn(3, 5, 40)], 1)
    maskp = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(
        model(x, t, dino, t5p, maskp), v1, rtol=0, atol=ORDER_TOL * float(v1.abs().max())
    )


def test_dropped_conditions_use_the_learned_nulls():
    model = tiny()
    randomize(model)
    x, t, dino, t5, mask = inputs()
    drop = torch.tensor([True, False, True])
    keep = torch.zeros(3, dtype=torch.bool)
    v_drop_text = model(x, t, dino, t5, mask, keep, drop)
    # a dropped caption ignores the caption entirely
    v_other = model(x, t, dino, torch.randn_like(t5), torch.ones_like(mask), keep, drop)
    torch.testing.assert_close(v_drop_text[drop], v_other[drop], rtol=1e-5, atol=1e-5)
    assert (v_drop_text[~drop] - v_other[~drop]).abs().max() > 1e-3
    # a dropped DINO ignores the DINO vector
    v_dd = model(x, t, dino, t5, mask, drop, keep)
    v_dd2 = model(x, t, torch.randn_like(dino), t5, mask, drop, keep)
    torch.testing.assert_close(v_dd[drop], v_dd2[drop], rtol=1e-5, atol=1e-5)
    # captions shorter than the null sequence are padded
    v_short = model(x, t, dino, t5[:, :1], mask[:, :1], keep, torch.ones(3, dtype=torch.bool))
    assert torch.isfinite(v_short).all()


def test_every_bucket_shape_runs_and_positions_differ():
    model = tiny()
    randomize(model)
    for H, W in [(8, 8), (6, 10), (10, 6)]:
        x, t, dino, t5, mask = inputs(H=H, W=W)
        assert model(x, t, dino, t5, mask).shape == (3, 16, H, W)
    pe = sincos_2d(64, 4, 5)
    assert pe.shape == (20, 64) and torch.unique(pe, dim=0).shape[0] == 20


def test_gradients_reach_every_parameter():
    model = tiny()
    randomize(model)
    x, t, dino, t5, mask = inputs()
    drop = torch.tensor([True, False, False])
    model(x, t, dino, t5, mask, drop, drop).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_named_sizes():
    cfg = load_config("nano")
    nano = build_model(cfg.model, dino_dim=1024, t5_dim=4096)
    n = sum(p.numel() for p in nano.parameters())
    assert 35e6 <= n <= 50e6, n
    assert (len(nano.blocks), nano.width) == (12, 384)
    assert SIZES["production"] == dict(depth=32, width=1024, heads=16)
