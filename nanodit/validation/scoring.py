"""Scoring: decoded outputs -> one record per case and the per-test numbers.

    scored = score_cases(cases, latents, shapes, tools)   # {"cases": [...], "images": {...}, "numbers": {...}}

Shapes data: the synthetic world's scorers read each decoded image back into factors (objects with colour,
shape, side and size; light direction), and every record holds what was read beside what was expected:
reconstruction = the sample's objects and lighting; DINO swap = lighting of B and objects of A; text
manipulation = the objects on the sides the swapped caption names. Real data: DINO swap re-embeds the output
with a local DINOv3 (closer, by cosine, to B than to A); text manipulation compares LPIPS to the flipped and
the original image.
"""

from __future__ import annotations

import numpy as np
import torch

import nanodit.validation.metrics as metrics
from nanodit.shapes import (
    Scene,
    lighting_matches,
    objects_match,
    read_scene,
    score_dino_swap,
    score_text_manip,
    text_manip_target,
)
from nanodit.validation.cases import TESTS, Case
from nanodit.validation.tools import Tools

# (number, record flag, test) for the pass counts that get Wilson intervals
RATES = (
    ("recon_scorer", "scorer_pass", "recon"),
    ("recon_objects", "objects_match", "recon"),
    ("recon_lighting", "lighting_match", "recon"),
    ("dino_swap", "passed", "dino_swap"),
    ("dino_swap_lighting_follows_b", "lighting_follows_b", "dino_swap"),
    ("dino_swap_objects_follow_a", "objects_follow_a", "dino_swap"),
    ("text_manip", "passed", "text_manip"),
    ("text_manip_lighting_kept", "lighting_kept", "text_manip"),
)


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _decode_all(decoder, latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """Decode latents of mixed shapes, batched per shape; returns (3|4, H, W) images in order."""
    out: list[torch.Tensor | None] = [None] * len(latents)
    by_shape: dict[tuple, list[int]] = {}
    for i, z in enumerate(latents):
        by_shape.setdefault(tuple(z.shape), []).append(i)
    for _, idx in by_shape.items():
        imgs = decoder.decode(torch.stack([latents[i] for i in idx]))  # (B, 3|4, H, W)
        for j, i in enumerate(idx):
            out[i] = imgs[j]
    return out  # type: ignore[return-value]


def _latent(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))  # (C, h, w)


def _describe(objs) -> list[str]:
    return sorted(f"{o.size} {o.colour} {o.shape} {o.side}" for o in objs)


def score_cases(cases: list[Case], outs: list[torch.Tensor], shapes: bool, tools: Tools) -> dict:
    """Per-case records and per-test summaries. Returns {"cases": [...], "images": {test: rows}, "numbers": {...}}.

    Each record holds the case's ids, captions and every number computed for it; ``images`` are the grid
    rows (decoded images with captions), None when nothing can be decoded."""
    recs: list[dict] = []
    for c, z in zip(cases, outs):
        rec = {"test": c.test, "a": c.a.id, "caption": c.caption, "a_caption": c.a.txt}
        if c.b is not None:
            rec["b"], rec["b_caption"] = c.b.id, c.b.txt
        if c.test == "recon":
            rec["latent_mse"] = float((z - _latent(c.a.latent)).pow(2).mean())
        recs.append(rec)
    if tools.decoder is None:
        return {"cases": recs, "images": None, "numbers": summaries(recs, shapes)}

    # decode outputs and the originals they are compared with (one batched call per latent shape)
    refs = []
    for c in cases:
        refs.append(_latent(c.a.latent))
        if c.test == "dino_swap":
            refs.append(_latent(c.b.latent))
        if c.test == "text_manip" and c.a.latent_flip is not None:
            refs.append(_latent(c.a.latent_flip))
    decoded = _decode_all(tools.decoder, list(outs) + refs)
    out_imgs, ref_imgs = decoded[: len(outs)], iter(decoded[len(outs) :])
    images: dict[str, list] = {t: [] for t in TESTS}
    for c, rec, img in zip(cases, recs, out_imgs):
        orig = next(ref_imgs)
        has_other = c.test == "dino_swap" or (c.test == "text_manip" and c.a.latent_flip is not None)
        other = next(ref_imgs) if has_other else None
        scene = Scene.from_json(c.a.meta["scene"]) if shapes else None
        if c.test == "recon":
            _score_recon(rec, img, orig, scene, tools)
            tail = f"PSNR {_fmt(rec['psnr'], 1)} dB  SSIM {_fmt(rec['ssim'])}  LPIPS {_fmt(rec.get('lpips'))}"
            if shapes:
                tail += f"  scorer: {'pass' if rec['scorer_pass'] else 'FAIL'} {rec['detail']}"
            images["recon"].append([(orig, f"{c.a.id}: {c.a.txt}"), (img, tail)])
        elif c.test == "dino_swap":
            _score_swap(rec, img, orig, other, c, shapes, tools)
            verdict = {True: "pass", False: "FAIL", None: "not scored"}[rec.get("passed")]
            images["dino_swap"].append(
                [
                    (orig, f"A {c.a.id}: {c.a.txt}"),
                    (other, f"B {c.b.id} (its DINO): {c.b.txt}"),
                    (img, f"text of A + DINO of B: {verdict} {rec.get('detail', '')}"),
                ]
            )
        else:
            _score_manip(rec, img, orig, other, scene, tools)
            verdict = {True: "pass", False: "FAIL", None: "not scored"}[rec.get("passed")]
            images["text_manip"].append(
                [
                    (orig, f"{c.a.id}: {c.a.txt}"),
                    (img, f"swapped: {c.caption}  -> {verdict} {rec.get('detail', '')}"),
                ]
            )
    return {"cases": recs, "images": images, "numbers": summaries(recs, shapes)}


def _rgb(img: torch.Tensor) -> torch.Tensor:
    return img[:3][None]  # (1, 3, H, W)


def _score_recon(rec: dict, img: torch.Tensor, orig: torch.Tensor, scene: Scene | None, tools: Tools) -> None:
    rec["psnr"] = metrics.psnr(_rgb(img), _rgb(orig))[0]
    rec["ssim"] = metrics.ssim(_rgb(img), _rgb(orig))[0]
    if tools.lpips is not None:
        rec["lpips"] = metrics.lpips_distance(tools.lpips, _rgb(img), _rgb(orig))[0]
    if scene is not None:
        f = read_scene(img)
        rec["objects_match"] = objects_match(f, scene, check_size=True)
        rec["lighting_match"] = lighting_matches(f, scene)
        rec["scorer_pass"] = bool(rec["objects_match"] and rec["lighting_match"])
        rec["objects_read"], rec["objects_expected"] = _describe(f.objects), _describe(scene.objects)
        rec["light_read_deg"], rec["light_expected_deg"] = f.light_deg, scene.light_deg
        rec["gradient"] = f.gradient
        rec["detail"] = (
            f"(objects {'right' if rec['objects_match'] else 'wrong'}, lighting "
            f"{'right' if rec['lighting_match'] else 'wrong'})"
        )


def _score_swap(rec, img, orig_a, orig_b, c: Case, shapes: bool, tools: Tools) -> None:
    if shapes:
        a, b = Scene.from_json(c.a.meta["scene"]), Scene.from_json(c.b.meta["scene"])
        s = score_dino_swap(img, a, b)
        rec.update(s)
        rec["light_expected_deg"] = b.light_deg
        rec["detail"] = (
            f"(light->B {'yes' if s['lighting_follows_b'] else 'no'}, objects->A {'yes' if s['objects_follow_a'] else 'no'})"
        )
    elif tools.dino is not None:
        e = tools.dino(torch.stack([img[:3], orig_a[:3], orig_b[:3]]))  # (3, Dd)
        e = torch.nn.functional.normalize(e, dim=1)
        rec["cos_b"], rec["cos_a"] = float(e[0] @ e[2]), float(e[0] @ e[1])
        rec["passed"] = rec["cos_b"] > rec["cos_a"]
        rec["detail"] = f"(cos B {rec['cos_b']:.3f} vs A {rec['cos_a']:.3f})"


def _score_manip(rec, img, orig, flipped, scene: Scene | None, tools: Tools) -> None:
    if scene is not None:
        s = score_text_manip(img, text_manip_target(scene))
        rec.update(s)
        rec["detail"] = f"(sides {'follow' if s['sides_follow_text'] else 'do not follow'} the text)"
    elif tools.lpips is not None and flipped is not None:
        d = metrics.lpips_distance(
            tools.lpips, torch.stack([img[:3], img[:3]]), torch.stack([flipped[:3], orig[:3]])
        )
        rec["lpips_to_flipped"], rec["lpips_to_original"] = d
        rec["passed"] = d[0] < d[1]
        rec["detail"] = f"(LPIPS to flipped {d[0]:.3f} vs original {d[1]:.3f})"


def _mean(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def summaries(recs: list[dict], shapes: bool) -> dict:
    """Per-test means and pass rates over the cases that were scored. Every rate ``<name>_rate`` comes with
    ``counts[<name>] = [passed, scored]`` (for its interval)."""
    by = {t: [r for r in recs if r["test"] == t] for t in TESTS}
    num: dict = {f"{t}_samples": len(by[t]) for t in TESTS}
    num["latent_mse"] = _mean(by["recon"], "latent_mse")
    for k in ("psnr", "ssim", "lpips"):
        num[k] = _mean(by["recon"], k)
    counts: dict[str, list[int]] = {}
    for name, flag, test in RATES:
        if not shapes and test == "recon":
            continue
        flags = [r[flag] for r in by[test] if r.get(flag) is not None]
        if flags or name in ("dino_swap", "text_manip"):
            key = name if name.endswith(("_a", "_b", "_kept")) else f"{name}_rate"
            num[key] = metrics.rate(flags)
            if flags:
                counts[name] = [int(sum(bool(f) for f in flags)), len(flags)]
    num["counts"] = counts
    return num
