"""Scores and the decision: image metrics against their formulas, LPIPS loading without a network,
the smoothed loss criterion, Wilson intervals, and the three outcomes (GO only when every required
criterion is computed and passes; NO-GO when one fails; INCOMPLETE when a required one is missing)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from nanodit.validation import criteria
from nanodit.validation import metrics as scores


def test_psnr_matches_formula_and_caps_identical() -> None:
    """PSNR = 10 log10(1 / MSE) per image; identical images give the documented cap, not infinity."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g)
    y = (x + 0.1 * torch.randn(3, 3, 8, 8, generator=g)).clamp(0, 1)
    want = [10 * math.log10(1 / float(((a - b) ** 2).mean())) for a, b in zip(x, y)]
    assert scores.psnr(x, y) == pytest.approx(want, rel=1e-5)
    assert scores.psnr(x, x) == [scores.PSNR_CAP_DB] * 3


def test_ssim_identical_one_and_noise_lower() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 40, generator=g)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert scores.ssim(x, x) == pytest.approx([1.0, 1.0])
    s = scores.ssim(x, noisy)
    assert all(v < 0.9 for v in s)
    tiny = torch.rand(1, 3, 6, 6, generator=g)  # smaller than the 7x7 window: a smaller odd window
    assert scores.ssim(tiny, tiny) == pytest.approx([1.0])


def test_read_loss_log_keeps_loss_rows_and_last_value_per_step(tmp_path) -> None:
    """Validation rows (no "loss") and broken lines are skipped; a resumed run's repeated step keeps the last value."""
    rows = [
        {"step": 10, "loss": 2.0},
        {"step": 20, "loss": 1.0},
        {"step": 20, "val/psnr": 12.0},
        {"step": 20, "loss": 0.9},
        {"step": 30, "loss": 0.5},
    ]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    assert scores.read_loss_log(p) == [(10, 2.0), (20, 0.9), (30, 0.5)]
    assert scores.read_loss_log(tmp_path / "missing.jsonl") == []


def test_loss_ratio_windows() -> None:
    losses = [4.0, 2.0] + [1.0] * 6 + [0.2, 0.1]
    r = scores.loss_ratio(losses, window=2)
    assert r["initial"] == pytest.approx(3.0) and r["final"] == pytest.approx(0.15)
    assert r["value"] == pytest.approx(0.05) and r["window"] == 2 and r["points"] == 10
    short = scores.loss_ratio([2.0, 1.0, 0.5], window=50)  # shorter than 2 windows: half the log each
    assert short["window"] == 1 and short["value"] == pytest.approx(0.25)
    assert scores.loss_ratio([1.0], window=5)["value"] is None
    assert scores.loss_ratio([float("nan"), 2.0, float("inf"), 1.0], 1)["value"] == pytest.approx(0.5)


def test_criterion_pass_and_fail_at_the_threshold() -> None:
    assert criteria.criterion("lpips", 0.19, 0.2, "<", "d")["pass"] is True
    assert criteria.criterion("lpips", 0.2, 0.2, "<", "d")["pass"] is False  # strict
    assert criteria.criterion("rate", 0.6, 0.6, ">=", "d")["pass"] is True
    assert criteria.criterion("rate", 0.59, 0.6, ">=", "d")["pass"] is False
    with pytest.raises(ValueError, match="op"):
        criteria.criterion("x", 1.0, 1.0, ">", "d")
    with pytest.raises(ValueError, match="not_computed"):
        criteria.criterion("x", float("nan"), 1.0, "<", "d")


def test_decide_go_only_when_all_computed_and_passing() -> None:
    ok = [criteria.criterion("a", 0.1, 0.2, "<", "d"), criteria.criterion("b", 0.9, 0.6, ">=", "d")]
    assert criteria.decide(ok) == {"decision": "GO", "failed": [], "not_computed": []}
    bad = ok + [criteria.criterion("c", 0.5, 0.6, ">=", "d")]
    assert criteria.decide(bad) == {"decision": "NO-GO", "failed": ["c"], "not_computed": []}
    nc = criteria.not_computed("lpips", 0.2, "<", "d", why="no weights", how="provide them")
    assert nc["value"] is None and nc["pass"] is None and nc["how to provide"] == "provide them"
    assert criteria.decide(ok + [nc]) == {"decision": "INCOMPLETE", "failed": [], "not_computed": ["lpips"]}
    # a failure is conclusive: NO-GO even with a required criterion missing
    assert criteria.decide(bad + [nc]) == {"decision": "NO-GO", "failed": ["c"], "not_computed": ["lpips"]}
    # an optional criterion that cannot be computed does not block GO; computed, it counts
    opt = criteria.not_computed("lpips", 0.2, "<", "d", why="w", how="h", required=False)
    assert criteria.decide(ok + [opt]) == {"decision": "GO", "failed": [], "not_computed": []}
    opt_bad = criteria.criterion("lpips", 0.3, 0.2, "<", "d", required=False)
    assert criteria.decide(ok + [opt_bad])["decision"] == "NO-GO"
    assert criteria.decide([])["decision"] == "INCOMPLETE"
    assert scores.rate([True, False, True, True]) == 0.75 and scores.rate([]) is None


def test_wilson_interval_matches_reference_values() -> None:
    """Against the Wilson score formula's published values (z = 1.96): it stays in [0, 1], contains k/n, is not
    empty at k = 0 or k = n, and narrows as n grows; 5/5 cannot show a rate above 0.6."""
    lo, hi = scores.wilson(5, 5)
    assert lo == pytest.approx(0.5655, abs=1e-4) and hi == 1.0
    lo, hi = scores.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = scores.wilson(13, 20)
    assert lo == pytest.approx(0.4329, abs=1e-4) and hi == pytest.approx(0.8188, abs=1e-4)
    assert scores.wilson(0, 0) is None
    widths = [scores.wilson(round(0.8 * n), n) for n in (5, 20, 80)]
    assert all(a[1] - a[0] > b[1] - b[0] for a, b in zip(widths, widths[1:]))
    for k in range(0, 33):
        lo, hi = scores.wilson(k, 32)
        assert 0.0 <= lo <= k / 32 <= hi <= 1.0


def test_rate_criterion_carries_counts_and_interval() -> None:
    c = criteria.rate_criterion("text_manip", [20, 32], 0.6, "d", why="w", how="h")
    assert c["computed"] and c["pass"] and c["value"] == 0.625 and (c["passed"], c["n"]) == (20, 32)
    assert c["ci95"] == list(scores.wilson(20, 32))
    none = criteria.rate_criterion("text_manip", None, 0.6, "d", why="no cases", how="more samples")
    assert not none["computed"] and none["why"] == "no cases"


def test_lpips_not_computed_without_backbone_says_how(tmp_path, monkeypatch) -> None:
    """No backbone in the torch hub cache and no val.lpips_weights: no module, a reason and how to provide it."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model, info = scores.load_lpips("alex", None, torch.device("cpu"))
    assert model is None
    assert "not on this machine" in info["why"] and "alexnet-owt-7be5be79.pth" in info["how"]
    model, info = scores.load_lpips("alex", str(tmp_path / "nope.pth"), torch.device("cpu"))
    assert model is None and "no such file" in info["why"]
    junk = tmp_path / "junk.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, junk)
    model, info = scores.load_lpips("alex", str(junk), torch.device("cpu"))
    assert model is None and "cannot be loaded" in info["why"]


@functools.lru_cache(maxsize=1)
def _alexnet_features() -> dict:
    import torchvision

    torch.manual_seed(0)
    return {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}


def alexnet_weights(path) -> str:
    """Random AlexNet backbone tensors under torchvision's names (``features.<i>.*``, the part LPIPS uses):
    they stand in for the ImageNet file, which cannot be downloaded here."""
    torch.save(_alexnet_features(), path)
    return str(path)


@pytest.mark.parametrize("where", ["weights", "cache"])
def test_lpips_loads_a_local_backbone(tmp_path, monkeypatch, where) -> None:
    """The backbone comes from val.lpips_weights or the torch hub cache, and its tensors really are loaded."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    if where == "weights":
        path = alexnet_weights(tmp_path / "alex.pth")
        model, info = scores.load_lpips("alex", path, torch.device("cpu"))
        assert info["source"] == "val.lpips_weights"
    else:
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        path = alexnet_weights(tmp_path / "hub" / "checkpoints" / scores.LPIPS_BACKBONE_FILES["alex"])
        model, info = scores.load_lpips("alex", None, torch.device("cpu"))
        assert info["source"] == "torchvision cache"
    assert model is not None, info
    ref = torch.load(path, weights_only=True)
    trunk = model.net.state_dict()
    assert torch.equal(trunk["slice1.0.weight"], ref["features.0.weight"])
    assert torch.equal(trunk["slice5.10.weight"], ref["features.10.weight"])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 40, generator=g)  # smaller than AlexNet can take: upsampled inside
    y = torch.rand(2, 3, 24, 40, generator=g)
    assert scores.lpips_distance(model, x, x) == pytest.approx([0.0, 0.0], abs=1e-6)
    d = scores.lpips_distance(model, x, y)
    assert all(v > 0 for v in d) and len(d) == 2
    assert isinstance(torchvision.__version__, str)


def test_scores_json_clean_has_no_nan() -> None:
    from nanodit.validation.report import clean

    out = clean({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": (1, True)})
    assert out == {"a": None, "b": [1.5, None], "c": [1, True]}
    json.dumps(out, allow_nan=False)


def _tools(lpips: bool = False, decoder: bool = True):
    from nanodit.validation.tools import Tools

    return Tools(
        object() if decoder else None,
        {"kind": "shapes codec"} if decoder else {"why": "no VAE", "how": "set val.vae"},
        object() if lpips else None,
        {"net": "alex"} if lpips else {"why": "no backbone", "how": "put it there"},
    )


def _numbers(recon=(20, 32), swap=(10, 32), manip=(3, 32), psnr=24.0) -> dict:
    return {
        "recon_samples": 32,
        "dino_swap_samples": 32,
        "text_manip_samples": 32,
        "psnr": psnr,
        "lpips": None,
        "counts": {
            "recon_scorer": list(recon),
            "recon_objects": list(recon),
            "recon_lighting": [32, 32],
            "dino_swap": list(swap),
            "dino_swap_lighting_follows_b": [30, 32],
            "dino_swap_objects_follow_a": list(swap),
            "text_manip": list(manip),
        },
    }


def test_criteria_diagnose_each_failure_in_numbers() -> None:
    """A failed criterion carries one sentence with its counts, interval and the numbers behind it (per-t loss,
    how much the condition moves the prediction); a caption with no effect is said in capitals."""
    from nanodit.config import ValConfig

    effects = {"t": [0.05, 0.5, 0.95], "caption": [0.001, 0.002, 0.003], "dino": [0.3, 0.05, 0.12]}
    bins = {"t0.5": [(5000, 0.006)], "t0.9": [(5000, 0.25)]}
    loss = {"value": 0.02, "initial": 2.0, "final": 0.04, "window": 5, "points": 500}
    crit = {
        c["name"]: c
        for c in criteria.build_criteria(_numbers(), ValConfig(), loss, True, _tools(), effects, bins)
    }
    assert list(crit) == ["loss_ratio", "lpips", "recon_scorer", "psnr", "dino_swap", "text_manip"]
    assert crit["lpips"]["required"] is False and "diagnosis" not in crit["lpips"]  # shapes: optional
    assert crit["loss_ratio"]["pass"] and "diagnosis" not in crit["loss_ratio"]
    assert crit["recon_scorer"]["pass"] is True  # 20/32 = 0.625 >= 0.6
    d = crit["text_manip"]["diagnosis"]
    assert "3/32 passed" in d and "95% CI 3%-24%" in d and "NO EFFECT" in d and "0.30%" in d
    d = crit["dino_swap"]["diagnosis"]
    assert "10/32" in d and "lighting followed B's DINO in 30/32" in d and "at most 30.0% (t = 0.05)" in d
    assert criteria.decide(list(crit.values()))["decision"] == "NO-GO"
    assert criteria.warnings_for(effects) == [
        "the caption has no effect on the prediction: at every t it moves v by at most 0.30% "
        "(||v(cond) - v(no caption)|| / ||v||)"
    ]
    low = {
        c["name"]: c
        for c in criteria.build_criteria(
            _numbers(recon=(2, 32)), ValConfig(), loss, True, _tools(), None, bins
        )
    }
    assert "objects right in 2/32, lighting right in 32/32" in low["recon_scorer"]["diagnosis"]
    assert "0.25 at t in [0.9, 1)" in low["recon_scorer"]["diagnosis"]


def test_real_data_needs_lpips_and_says_what_to_provide() -> None:
    """On real data LPIPS is required: without its backbone the decision is INCOMPLETE, with its how-to."""
    from nanodit.config import ValConfig

    num = _numbers()
    num["counts"] = {"dino_swap": [30, 32], "text_manip": [30, 32]}
    loss = {"value": 0.02, "initial": 2.0, "final": 0.04, "window": 5, "points": 500}
    crit = criteria.build_criteria(num, ValConfig(), loss, False, _tools(), None, None)
    by = {c["name"]: c for c in crit}
    assert "recon_scorer" not in by and by["lpips"]["required"] is True
    assert by["lpips"]["diagnosis"] == "not computed: no backbone (put it there)"
    assert criteria.decide(crit) == {"decision": "INCOMPLETE", "failed": [], "not_computed": ["lpips"]}
