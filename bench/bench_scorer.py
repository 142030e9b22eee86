"""The shapes scorer on one validation's cases (CPU): ``score_cases`` with the connected components found by
scipy.ndimage.label (now) against the max-label propagation it replaced (the baseline, kept here), side by side in
one process, with the same numbers checked.

    python bench/bench_scorer.py [--cache DIR]

Cases: the nano config's validation set (32 per test, 96 in all) on the built-in shapes set, scored twice: on the
outputs of an untrained tiny model (noisy images: many small components) and on the data's own latents (what a
trained model's outputs look like).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

import nanodit.shapes.scorers as scorers
from nanodit.config import load_config
from nanodit.data import build_loader
from nanodit.data.prepare import prepare
from nanodit.model import build_model
from nanodit.validation import Validator, read_val_samples
from nanodit.validation.sampling import generate
from nanodit.validation.scoring import score_cases


def propagation_components(mask: np.ndarray) -> list[np.ndarray]:
    """The baseline: propagate the largest pixel id over 8-neighbours until stable, then one scan per label."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(lab, 1)
        nb = np.max([p[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
        new = np.where(mask, nb, 0)
        if np.array_equal(new, lab):
            return [np.argwhere(lab == v) for v in np.unique(lab[lab > 0])]
        lab = new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="data.cache_dir (default: a temp folder)")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="nanodit-scorer-")
    cfg = load_config(
        "nano", ["model.size=tiny", "val.steps=2", f"data.cache_dir={cache}", "train.device=cpu"]
    )
    prepare(cfg)
    manifest, loader = build_loader(cfg, torch.device("cpu"), progress=False)
    _, groups = read_val_samples(loader.root, cfg.val.samples, cfg.data.on_error)
    v = Validator(cfg, manifest, groups, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).eval().requires_grad_(False)
    inputs = {
        "untrained outputs": generate(model, v.cases, cfg.val),
        "the data's own latents": [torch.from_numpy(c.a.latent.astype(np.float32)) for c in v.cases],
    }
    now = scorers._components
    for name, outs in inputs.items():
        res = {}
        for impl, fn in (("propagation (before)", propagation_components), ("ndimage.label (now)", now)):
            scorers._components = fn
            score_cases(v.cases, outs, v.shapes, v.tools)  # warm
            t0 = time.perf_counter()
            scored = score_cases(v.cases, outs, v.shapes, v.tools)
            res[impl] = (time.perf_counter() - t0, scored["numbers"])
        scorers._components = now
        (before, nb), (after, na) = res.values()
        print(
            f"{name}: {len(outs)} cases, score_cases {before:.2f} s before, {after:.2f} s now, same numbers: {nb == na}"
        )


if __name__ == "__main__":
    main()
