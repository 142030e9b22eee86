"""Validation: the plan's three tests, objective scores, and the GO / NO-GO report.

    python -m nanodit.validate --run runs/nano                       # latest checkpoint of the run
    python -m nanodit.validate --run runs/nano --checkpoint runs/nano/checkpoints/ckpt-00003000.pt
    python -m nanodit.validate --run runs/real val.vae=/models/flux-vae val.lpips_weights=/models/alexnet.pth

The trainer calls ``validate_during_training`` every ``val.every`` steps and at the end (``final=True``).

The tests (EMA weights, fixed noise per sample, ``val.steps`` Euler steps, dual guidance), each on
``val.samples`` samples picked deterministically (sorted ids, spread over the buckets):
- reconstruction: a sample's own DINO and caption; compared with its decoded latent (LPIPS, PSNR, SSIM);
- DINO swap: caption of A + DINO of B (same bucket): the lighting/composition should follow B, the content A;
- text manipulation: DINO of A + A's left<->right-swapped caption: the layout should follow the text.
All samples of all three tests that share a latent shape go through ONE sampler call.

Scores. Shapes data (manifest codec "shapes-s2d"): the synthetic world's scorers read each decoded image
back into factors: reconstruction = objects and lighting of the sample; DINO swap = lighting of B and
objects of A; text manipulation = objects on the sides the swapped caption names. Real data: decoded by
the Flux VAE (``val.vae``, a local diffusers AutoencoderKL); DINO swap re-embeds outputs with a local DINOv3
(``val.dino``) and passes when the output is closer (cosine) to B than to A; text manipulation passes when
the output is closer (LPIPS) to the flipped original than to the original. What cannot be computed is
reported with the reason and what to provide, never guessed.

The decision (``scores.decide``): GO only if every criterion is computed and passes: training loss
final/initial < val.max_loss_ratio, LPIPS < val.max_lpips, DINO swap and text manipulation pass rates >=
val.min_dino_swap / val.min_text_manip, and on shapes data the scorer reconstruction rate >= val.min_recon.

Letters: B batch, C latent channels, h, w latent size, H, W image size, L T5 tokens, Dt T5 width, Dd DINO width.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanodit import report, scores
from nanodit.config import Config, ConfigError, ValConfig, check, from_dict
from nanodit.data.shards import Sample, ShardError, iter_samples, load_manifest, shard_paths
from nanodit.flow import sample_euler

SHAPES_CODEC = "shapes-s2d"
TESTS = ("recon", "dino_swap", "text_manip")
TEST_TITLES = {"recon": "Reconstruction", "dino_swap": "DINO swap", "text_manip": "Text manipulation"}


class ValidateError(RuntimeError):
    """A problem a user can fix (missing run, checkpoint, bad option); printed as one line."""


# ---------------------------------------------------------------------------------------------
# which samples each test uses


@dataclass
class Case:
    """One generation: ``test`` on sample ``a`` (and, for the DINO swap, the DINO donor ``b``)."""

    test: str
    a: Sample
    b: Sample | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        return self.a.bucket

    @property
    def dino(self) -> np.ndarray:
        return (self.b if self.test == "dino_swap" else self.a).dino  # (Dd,)

    @property
    def t5(self) -> np.ndarray:
        return self.a.t5_flip if self.test == "text_manip" else self.a.t5  # (L, Dt)

    @property
    def caption(self) -> str:
        return self.a.flip_txt if self.test == "text_manip" else self.a.txt


def is_shapes(manifest: dict) -> bool:
    return manifest.get("codec", {}).get("name") == SHAPES_CODEC


def _sorted_groups(groups: dict[tuple[int, int], list[Sample]]) -> dict[tuple[int, int], list[Sample]]:
    return {b: sorted(g, key=lambda s: s.id) for b, g in sorted(groups.items())}


def round_robin(per_bucket: dict, n: int) -> list:
    """Up to ``n`` items taken in turn from each bucket's list (buckets sorted): spread over the buckets."""
    out, i = [], 0
    lists = [per_bucket[b] for b in sorted(per_bucket)]
    while len(out) < n and any(i < len(x) for x in lists):
        for x in lists:
            if i < len(x) and len(out) < n:
                out.append(x[i])
        i += 1
    return out


def swap_pairs(samples: list[Sample], shapes: bool, seed: int) -> list[tuple[Sample, Sample]]:
    """DINO-swap pairs (A, B) within one bucket. Shapes: telling pairs only (light directions >= 90 deg
    apart, different objects: ``synth.dino_swap_pairs``); real data: A = i-th, B = the sample half the
    bucket further on (sorted ids)."""
    n = len(samples)
    if n < 2:
        return []
    if shapes:
        from nanodit.data.synth import Scene, dino_swap_pairs

        scenes = [Scene.from_json(s.meta["scene"]) for s in samples]
        return [(samples[a], samples[b]) for a, b in dino_swap_pairs(scenes, n, seed=seed)]
    return [(samples[i], samples[(i + n // 2) % n]) for i in range(n)]


def select_cases(groups: dict[tuple[int, int], list[Sample]], n: int, shapes: bool, seed: int) -> list[Case]:
    """The test cases, deterministic in (data, n, seed): ``n`` per test, spread over the buckets.
    Text manipulation uses the reconstruction samples that carry a swapped caption (and, on real data, the
    flipped latent its score compares with)."""
    g = _sorted_groups(groups)
    cases = [Case("recon", s) for s in round_robin(g, n)]
    pairs = round_robin({b: swap_pairs(s, shapes, seed) for b, s in g.items()}, n)
    cases += [Case("dino_swap", a, b) for a, b in pairs]
    flippable = {
        b: [s for s in ss if s.t5_flip is not None and (shapes or s.latent_flip is not None)]
        for b, ss in g.items()
    }
    cases += [Case("text_manip", s) for s in round_robin(flippable, n)]
    return cases


def read_val_samples(root: str | Path, n: int, on_error: str = "raise"):
    """(manifest, {bucket: samples}) with at most max(4n, 32) samples per bucket, read from the start of the
    bucket's shards: enough candidates for ``n`` cases per test (and telling swap pairs) without reading a
    large data set into memory at every validation."""
    manifest = load_manifest(root)
    limit = max(4 * n, 32)
    groups: dict[tuple[int, int], list[Sample]] = {}
    for bucket, paths in shard_paths(root, manifest).items():
        got: list[Sample] = []
        for path in paths:
            for s in iter_samples(path, manifest, on_error):
                got.append(s)
                if len(got) >= limit:
                    break
            if len(got) >= limit:
                break
        if got:
            groups[bucket] = got
    return manifest, groups


# ---------------------------------------------------------------------------------------------
# sampling: every case of a bucket in one sampler call


def case_noise(sample: Sample, seed: int) -> torch.Tensor:
    """Fixed starting noise (C, h, w) per (val.seed, sample id), drawn on the CPU so every device starts
    from the same numbers; a sample's tests share it, so only the conditioning differs between them."""
    h = hashlib.blake2b(f"{seed}:{sample.id}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))
    return torch.randn(sample.latent.shape, generator=gen)  # (C, h, w)


def _pad_t5(states: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(a.shape[0] for a in states)
    t5 = torch.zeros(len(states), L, states[0].shape[1])  # (B, L, Dt)
    mask = torch.zeros(len(states), L, dtype=torch.bool)  # (B, L)
    for i, a in enumerate(states):
        t5[i, : a.shape[0]] = torch.from_numpy(a.astype(np.float32))
        mask[i, : a.shape[0]] = True
    return t5, mask


@torch.no_grad()
def generate(model: torch.nn.Module, cases: list[Case], vcfg: ValConfig, autocast=None) -> list[torch.Tensor]:
    """Sampled latents (C, h, w) fp32 on the CPU, one per case, in order; one ``sample_euler`` per bucket."""
    device = next(model.parameters()).device
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(cases):
        by_bucket.setdefault(c.bucket, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(cases)
    for _, idx in sorted(by_bucket.items()):
        noise = torch.stack([case_noise(cases[i].a, vcfg.seed) for i in idx]).to(device)  # (B, C, h, w)
        dino = torch.from_numpy(np.stack([cases[i].dino for i in idx]).astype(np.float32)).to(
            device
        )  # (B, Dd)
        t5, mask = _pad_t5([cases[i].t5 for i in idx])  # (B, L, Dt), (B, L)
        x = sample_euler(
            model,
            noise,
            dino,
            t5.to(device),
            mask.to(device),
            vcfg.steps,
            vcfg.guidance_dino,
            vcfg.guidance_text,
            autocast,
            vcfg.sample_shift,
        )  # (B, C, h, w)
        for j, i in enumerate(idx):
            out[i] = x[j].float().cpu()
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# decoding: latents -> images in [0, 1]


class ShapesDecoder:
    """The synthetic codec: (B, 16, h, w) -> (B, 4, 2h, 2w) RGB + object mask."""

    def __init__(self, manifest: dict):
        from nanodit.data.synth import ShapesCodec

        self.codec = ShapesCodec.from_manifest(manifest)
        self.info = {"kind": "shapes codec", "name": SHAPES_CODEC}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents.float().cpu())  # (B, 4, H, W)


class VaeDecoder:
    """A diffusers AutoencoderKL from a local folder; latents are un-scaled as the manifest says
    (``manifest["vae"]["scale"/"shift"]``: z = latent / scale + shift) and decoded in chunks."""

    def __init__(self, path: str, dtype: str, device: torch.device, manifest: dict, chunk: int = 8):
        from diffusers import AutoencoderKL

        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=self.dtype)
        self.vae = self.vae.to(device).eval()
        self.device, self.chunk = device, chunk
        mv = manifest.get("vae") or {}
        if "scale" in mv:
            self.scale, self.shift, source = float(mv["scale"]), float(mv.get("shift") or 0.0), "manifest vae"
        else:  # shards without the keys: the VAE's own config (what the encoder side would have used)
            self.scale = float(self.vae.config.scaling_factor)
            self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
            source = "VAE config (manifest has no vae.scale)"
        self.info = {"kind": "vae", "path": path, "dtype": dtype, "scale": self.scale, "shift": self.shift}
        self.info["scale_source"] = source

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for z in latents.split(self.chunk):
            z = z.to(self.device, self.dtype) / self.scale + self.shift  # (b, C, h, w)
            img = self.vae.decode(z).sample  # (b, 3, H, W) in [-1, 1]
            out.append(((img.float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)  # (B, 3, H, W)


def load_decoder(manifest: dict, vcfg: ValConfig, device: torch.device):
    """(decoder, info); decoder is None when latents cannot be decoded (info says why and how)."""
    if is_shapes(manifest):
        return ShapesDecoder(manifest), {"kind": "shapes codec"}
    how = "set val.vae=/path/to/vae (a local diffusers AutoencoderKL folder, e.g. the Flux VAE)"
    if not vcfg.vae:
        return None, {
            "why": "real data and no VAE given (val.vae is unset): the latents cannot be decoded",
            "how": how,
        }
    if not Path(vcfg.vae).exists():
        return None, {"why": f"val.vae={vcfg.vae}: no such folder", "how": how}
    try:
        dec = VaeDecoder(vcfg.vae, vcfg.vae_dtype, device, manifest)
    except Exception as e:
        return None, {
            "why": f"val.vae={vcfg.vae}: cannot be loaded ({e.__class__.__name__}: {str(e).splitlines()[0]})",
            "how": how,
        }
    return dec, dec.info


def load_dino_embedder(vcfg: ValConfig, device: torch.device):
    """(embed, info): embed maps images (B, 3, H, W) in [0, 1] to DINOv3 CLS vectors (B, Dd), loaded from
    the local folder ``val.dino`` (transformers AutoModel, no download); None with why/how otherwise."""
    how = "set val.dino=/path/to/dinov3 (a local transformers DINOv3 folder, the encoder of the shards)"
    if not vcfg.dino:
        return None, {"why": "no DINOv3 given (val.dino is unset) to re-embed the outputs", "how": how}
    try:
        from transformers import AutoImageProcessor, AutoModel
    except ImportError:
        return None, {
            "why": "the transformers package is not installed",
            "how": "pip install transformers; " + how,
        }
    try:
        model = AutoModel.from_pretrained(vcfg.dino, local_files_only=True).to(device).eval()
        proc = AutoImageProcessor.from_pretrained(vcfg.dino, local_files_only=True)
    except Exception as e:
        return None, {"why": f"val.dino={vcfg.dino}: cannot be loaded ({str(e).splitlines()[0]})", "how": how}

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        arrays = [im.permute(1, 2, 0).numpy() for im in images.float()]  # B x (H, W, 3) in [0, 1]
        px = proc(images=arrays, return_tensors="pt", do_rescale=False)["pixel_values"].to(device)
        out = model(pixel_values=px)
        cls = getattr(out, "pooler_output", None)
        return (cls if cls is not None else out.last_hidden_state[:, 0]).float().cpu()  # (B, Dd)

    return embed, {"path": vcfg.dino}


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass
class Tools:
    """What scoring can use; any may be None (then the scores that need it are not computed)."""

    decoder: object | None
    decoder_info: dict
    lpips: torch.nn.Module | None
    lpips_info: dict
    dino: object | None = None  # images -> (B, Dd)
    dino_info: dict | None = None


def _fmt(v, nd=3) -> str:
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


def score_cases(cases: list[Case], outs: list[torch.Tensor], shapes: bool, tools: Tools) -> dict:
    """Per-case records and per-test summaries. Returns {"cases": [...], "images": {test: rows}, "numbers": {...}}.

    Each record holds the case's ids, captions and every number computed for it; ``images`` are the grid
    rows (decoded images with captions), absent when nothing can be decoded."""
    recs: list[dict] = []
    for c, z in zip(cases, outs):
        rec = {"test": c.test, "a": c.a.id, "caption": c.caption, "a_caption": c.a.txt}
        if c.b is not None:
            rec["b"], rec["b_caption"] = c.b.id, c.b.txt
        if c.test == "recon":
            rec["latent_mse"] = float((z - _latent(c.a.latent)).pow(2).mean())
        recs.append(rec)
    images: dict[str, list] = {t: [] for t in TESTS}
    if tools.decoder is None:
        return {"cases": recs, "images": None, "numbers": _summaries(recs, shapes)}

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
    scene = None
    for c, rec, img in zip(cases, recs, out_imgs):
        orig = next(ref_imgs)
        other = (
            next(ref_imgs)
            if (c.test == "dino_swap" or (c.test == "text_manip" and c.a.latent_flip is not None))
            else None
        )
        if shapes:
            from nanodit.data.synth import Scene

            scene = Scene.from_json(c.a.meta["scene"])
        if c.test == "recon":
            _score_recon(rec, img, orig, scene, tools)
            cap = f"{c.a.id}: {c.a.txt}"
            tail = f"PSNR {_fmt(rec['psnr'], 1)} dB  SSIM {_fmt(rec['ssim'])}  LPIPS {_fmt(rec.get('lpips'))}"
            if shapes:
                tail += f"  scorer: {'pass' if rec['scorer_pass'] else 'FAIL'}"
            images["recon"].append([(orig, cap), (img, tail)])
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
    return {"cases": recs, "images": images, "numbers": _summaries(recs, shapes)}


def _rgb(img: torch.Tensor) -> torch.Tensor:
    return img[:3][None]  # (1, 3, H, W)


def _score_recon(rec: dict, img: torch.Tensor, orig: torch.Tensor, scene, tools: Tools) -> None:
    rec["psnr"] = scores.psnr(_rgb(img), _rgb(orig))[0]
    rec["ssim"] = scores.ssim(_rgb(img), _rgb(orig))[0]
    if tools.lpips is not None:
        rec["lpips"] = scores.lpips_distance(tools.lpips, _rgb(img), _rgb(orig))[0]
    if scene is not None:
        from nanodit.data.synth import lighting_matches, objects_match, read_scene

        f = read_scene(img)
        rec["objects_match"] = objects_match(f, scene, check_size=True)
        rec["lighting_match"] = lighting_matches(f, scene)
        rec["scorer_pass"] = bool(rec["objects_match"] and rec["lighting_match"])


def _score_swap(rec, img, orig_a, orig_b, c: Case, shapes: bool, tools: Tools) -> None:
    if shapes:
        from nanodit.data.synth import Scene, score_dino_swap

        s = score_dino_swap(img, Scene.from_json(c.a.meta["scene"]), Scene.from_json(c.b.meta["scene"]))
        rec.update(s)
        rec["detail"] = (
            f"(light->B {'yes' if s['lighting_follows_b'] else 'no'}, objects->A {'yes' if s['objects_follow_a'] else 'no'})"
        )
    elif tools.dino is not None:
        e = tools.dino(torch.stack([img[:3], orig_a[:3], orig_b[:3]]))  # (3, Dd)
        e = torch.nn.functional.normalize(e, dim=1)
        rec["cos_b"], rec["cos_a"] = float(e[0] @ e[2]), float(e[0] @ e[1])
        rec["passed"] = rec["cos_b"] > rec["cos_a"]
        rec["detail"] = f"(cos B {rec['cos_b']:.3f} vs A {rec['cos_a']:.3f})"


def _score_manip(rec, img, orig, flipped, scene, tools: Tools) -> None:
    if scene is not None:
        from nanodit.data.synth import score_text_manip, text_manip_target

        s = score_text_manip(img, text_manip_target(scene))
        rec.update(s)
        rec["detail"] = f"(sides {'follow' if s['sides_follow_text'] else 'do not follow'} the text)"
    elif tools.lpips is not None and flipped is not None:
        d = scores.lpips_distance(
            tools.lpips, torch.stack([img[:3], img[:3]]), torch.stack([flipped[:3], orig[:3]])
        )
        rec["lpips_to_flipped"], rec["lpips_to_original"] = d
        rec["passed"] = d[0] < d[1]
        rec["detail"] = f"(LPIPS to flipped {d[0]:.3f} vs original {d[1]:.3f})"


def _mean(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _summaries(recs: list[dict], shapes: bool) -> dict:
    """Per-test means and pass rates over the cases that were scored."""
    by = {t: [r for r in recs if r["test"] == t] for t in TESTS}
    num: dict = {f"{t}_samples": len(by[t]) for t in TESTS}
    num["latent_mse"] = _mean(by["recon"], "latent_mse")
    for k in ("psnr", "ssim", "lpips"):
        num[k] = _mean(by["recon"], k)
    if shapes:
        num["recon_scorer_rate"] = scores.rate([r["scorer_pass"] for r in by["recon"] if "scorer_pass" in r])
        num["recon_objects_rate"] = scores.rate(
            [r["objects_match"] for r in by["recon"] if "objects_match" in r]
        )
        num["recon_lighting_rate"] = scores.rate(
            [r["lighting_match"] for r in by["recon"] if "lighting_match" in r]
        )
        num["dino_swap_lighting_follows_b"] = scores.rate(
            [r["lighting_follows_b"] for r in by["dino_swap"] if "lighting_follows_b" in r]
        )
        num["dino_swap_objects_follow_a"] = scores.rate(
            [r["objects_follow_a"] for r in by["dino_swap"] if "objects_follow_a" in r]
        )
        num["text_manip_lighting_kept"] = scores.rate(
            [r["lighting_kept"] for r in by["text_manip"] if "lighting_kept" in r]
        )
    for t in ("dino_swap", "text_manip"):
        num[f"{t}_rate"] = scores.rate([r["passed"] for r in by[t] if r.get("passed") is not None])
    return num


# ---------------------------------------------------------------------------------------------
# criteria and the decision


def build_criteria(numbers: dict, vcfg: ValConfig, loss: dict, shapes: bool, tools: Tools) -> list[dict]:
    """The GO / NO-GO criteria with their values or the reason they cannot be computed."""
    crit = []
    d = "training loss: final / initial (smoothed over val.loss_window logged points)"
    if loss.get("value") is not None:
        extra = {k: loss[k] for k in ("initial", "final", "window", "points")}
        crit.append(scores.criterion("loss_ratio", loss["value"], vcfg.max_loss_ratio, "<", d, **extra))
    else:
        crit.append(
            scores.not_computed(
                "loss_ratio",
                vcfg.max_loss_ratio,
                "<",
                d,
                why=f"metrics.jsonl holds {loss.get('points', 0)} logged losses (needs >= 2)",
                how="train longer than 2 x train.log_every steps, with the run folder's metrics.jsonl kept",
            )
        )
    no_images = tools.decoder is None
    dec_why, dec_how = tools.decoder_info.get("why", ""), tools.decoder_info.get("how", "")
    d = "reconstruction LPIPS (mean over the reconstruction samples)"
    if numbers.get("lpips") is not None:
        crit.append(scores.criterion("lpips", numbers["lpips"], vcfg.max_lpips, "<", d))
    elif no_images:
        crit.append(scores.not_computed("lpips", vcfg.max_lpips, "<", d, why=dec_why, how=dec_how))
    else:
        crit.append(
            scores.not_computed(
                "lpips",
                vcfg.max_lpips,
                "<",
                d,
                why=tools.lpips_info.get("why", "no reconstruction samples"),
                how=tools.lpips_info.get("how", "check val.samples"),
            )
        )
    if shapes:
        d = "reconstruction read back by the shapes scorer (objects with size and side, lighting): pass rate"
        v = numbers.get("recon_scorer_rate")
        if v is not None:
            crit.append(scores.criterion("recon_scorer", v, vcfg.min_recon, ">=", d))
        else:
            crit.append(
                scores.not_computed(
                    "recon_scorer",
                    vcfg.min_recon,
                    ">=",
                    d,
                    why="no reconstruction samples",
                    how="check val.samples",
                )
            )
    for name, thr, d in (
        ("dino_swap", vcfg.min_dino_swap, "DINO swap (text of A + DINO of B): pass rate"),
        ("text_manip", vcfg.min_text_manip, "text manipulation (left<->right swapped caption): pass rate"),
    ):
        v = numbers.get(f"{name}_rate")
        if v is not None:
            crit.append(scores.criterion(name, v, thr, ">=", d, samples=numbers.get(f"{name}_samples")))
            continue
        why, how = _why_not(name, numbers, shapes, tools)
        crit.append(scores.not_computed(name, thr, ">=", d, why=why, how=how))
    return crit


def _why_not(name: str, numbers: dict, shapes: bool, tools: Tools) -> tuple[str, str]:
    if not numbers.get(f"{name}_samples"):
        if name == "dino_swap":
            return "no bucket holds two samples to swap (shapes: no telling pair)", "more samples per bucket"
        return (
            "no sample carries a swapped caption and flipped latent (t5_flip.npy, latent_flip.npy)",
            "shards with the *_flip keys",
        )
    if tools.decoder is None:
        return tools.decoder_info.get("why", ""), tools.decoder_info.get("how", "")
    if name == "dino_swap" and not shapes:
        info = tools.dino_info or {}
        return info.get("why", "no DINOv3 embedder"), info.get("how", "set val.dino")
    if name == "text_manip" and not shapes:
        return "LPIPS is not available: " + tools.lpips_info.get("why", ""), tools.lpips_info.get("how", "")
    return "nothing scored", "check the data"


# ---------------------------------------------------------------------------------------------
# one validation: generate, decode, score, decide, write


def check_val(vcfg: ValConfig) -> None:
    """Range checks for the options this module adds (config.check covers the rest)."""
    if not 0.0 <= vcfg.min_recon <= 1.0:
        raise ConfigError(f"config: val.min_recon={vcfg.min_recon} must be in [0, 1]")


def run_validation(
    model: torch.nn.Module,
    manifest: dict,
    groups: dict[tuple[int, int], list[Sample]],
    cfg: Config,
    run_dir: str | Path,
    step: int,
    out_dir: str | Path,
    autocast=None,
    metrics=None,
    tools: Tools | None = None,
    extra: dict | None = None,
) -> dict:
    """Validate ``model`` (already holding the weights to judge, in eval mode) and write the report folder.

    Returns the scores dict (also ``out_dir/scores.json``). ``tools`` (tests) overrides the decoder/LPIPS/DINO
    loading; ``metrics`` (the trainer's MetricsLogger) receives the scores and grids for TensorBoard; ``extra``
    entries (e.g. the checkpoint path) are added to the scores.
    """
    vcfg, t0 = cfg.val, time.perf_counter()
    check_val(vcfg)
    device = next(model.parameters()).device
    shapes = is_shapes(manifest) and all("scene" in s.meta for g in groups.values() for s in g)
    if tools is None:
        tools = load_tools(manifest, vcfg, device, shapes)
    cases = select_cases(groups, vcfg.samples, shapes, vcfg.seed)
    t1 = time.perf_counter()
    outs = generate(model, cases, vcfg, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_sample = time.perf_counter() - t1
    scored = score_cases(cases, outs, shapes, tools)
    losses = [v for _, v in scores.read_loss_log(Path(run_dir) / "metrics.jsonl")]
    loss = scores.loss_ratio(losses, vcfg.loss_window)
    crit = build_criteria(scored["numbers"], vcfg, loss, shapes, tools)
    result = {
        **scores.decide(crit),
        "step": step,
        "data": "shapes" if shapes else "real",
        "criteria": {c["name"]: c for c in crit},
        "numbers": scored["numbers"],
        "cases": scored["cases"],
        "decoder": tools.decoder_info,
        "lpips": tools.lpips_info,
        "sampling": {
            "steps": vcfg.steps,
            "guidance_dino": vcfg.guidance_dino,
            "guidance_text": vcfg.guidance_text,
            "seed": vcfg.seed,
            "samples_per_test": vcfg.samples,
            "sampler_calls": len({c.bucket for c in cases}),
            "precision": cfg.train.precision,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seconds": t_sample,
        },
        "loss_curve": [[s, v] for s, v in scores.read_loss_log(Path(run_dir) / "metrics.jsonl")],
    }
    result.update(extra or {})
    result["seconds"] = time.perf_counter() - t0
    report.write_report(out_dir, result, scored["images"])
    if metrics is not None:
        report.log_metrics(metrics, step, result, Path(out_dir))
    return result


def load_tools(manifest: dict, vcfg: ValConfig, device: torch.device, shapes: bool) -> Tools:
    decoder, dinfo = load_decoder(manifest, vcfg, device)
    lp, linfo = scores.load_lpips(vcfg.lpips_net, vcfg.lpips_weights, device)
    dino, dino_info = (None, None) if shapes else load_dino_embedder(vcfg, device)
    return Tools(decoder, dinfo, lp, linfo, dino, dino_info)


def _run_config(run_dir: Path) -> Config:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValidateError(f"{path}: no resolved config in the run folder")
    return from_dict(OmegaConf.to_container(OmegaConf.load(path)))


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None


def write_final(run_dir: Path, step_dir: Path, result: dict) -> Path:
    """The final report ``run_dir/report/``: the last validation's files plus the history of every step."""
    final = run_dir / "report"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(step_dir, final)
    history = report.history(run_dir / "validation")
    report.write_report(final, result, None, history=history, final=True)
    return final


def validate_during_training(run_dir, model, ema, manifest, loader, step, metrics, final=False) -> dict:
    """The trainer's hook: judge the EMA weights at ``step`` and write ``run_dir/validation/step-<step>/``
    (and with ``final`` also ``run_dir/report/``). The live model is not touched: a copy gets the EMA weights.
    Returns {"path", "decision", "scores"}."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    from nanodit.model import build_model

    # a fresh eager twin, not a deepcopy: the live model's blocks may be compiled in place
    # (train.compile_scope=blocks), and validation shapes would only add compiles
    device = next(model.parameters()).device
    vmodel = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(device)
    ema.copy_to(vmodel)
    vmodel.eval().requires_grad_(False)
    _, groups = read_val_samples(loader.root, cfg.val.samples, cfg.data.on_error)
    step_dir = run_dir / "validation" / f"step-{step:08d}"
    result = run_validation(
        vmodel,
        manifest,
        groups,
        cfg,
        run_dir,
        step,
        step_dir,
        _autocast(cfg.train.precision, device),
        metrics,
    )
    del vmodel
    path = step_dir
    if final:
        path = write_final(run_dir, step_dir, result)
        print(f"final report: {path / 'report.html'}  decision: {result['decision']}")
    else:
        print(f"validation step {step}: {result['decision']}  ({step_dir})")
    return {"path": str(path), "decision": result["decision"], "scores": result}


# ---------------------------------------------------------------------------------------------
# command line

CLI_KEYS = ("val.", "data.path=", "data.cache_dir=", "train.device=", "train.precision=")


def load_run(run: str, checkpoint: str | None, overrides: list[str]):
    """(cfg, state, checkpoint path) of a run folder; one-line ValidateError for a missing run or checkpoint."""
    from omegaconf import OmegaConf

    from nanodit.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ValidateError(f"--run {run}: no such folder")
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ValidateError(f"--checkpoint {checkpoint}: no such file")
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValidateError(f"--run {run}: no checkpoint in {run_dir / 'checkpoints'} (train it first)")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"config: override {o!r} is not of the form key=value")
        if not o.startswith(CLI_KEYS):
            raise ConfigError(
                f"config: override {o!r}: only val.*, data.path, data.cache_dir, train.device, train.precision can be changed here"
            )
    state = load_checkpoint(ckpt)
    merged = OmegaConf.merge(OmegaConf.create(state["config"]), OmegaConf.from_dotlist(list(overrides)))
    cfg = from_dict(OmegaConf.to_container(merged))
    cfg.train.resume = "none"  # the training run's resume path is irrelevant here
    check(cfg)
    check_val(cfg.val)
    return cfg, state, ckpt


def validate_checkpoint(
    run: str,
    checkpoint: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    final: bool = False,
) -> dict:
    """What ``python -m nanodit.validate`` does; returns {"path", "decision", "scores"}."""
    from nanodit.data import data_root
    from nanodit.device import pick_device, set_precision
    from nanodit.model import build_model

    cfg, state, ckpt = load_run(run, checkpoint, overrides or [])
    device = pick_device(cfg.train.device)
    autocast = set_precision(cfg.train.precision, device)
    root = data_root(cfg)
    manifest_data, groups = read_val_samples(root, cfg.val.samples, cfg.data.on_error)
    manifest = state.get("manifest") or manifest_data
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"])
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    step = int(state["step"])
    run_dir = Path(run)
    step_dir = Path(out) if out else run_dir / "validation" / f"step-{step:08d}"
    ac = autocast if isinstance(autocast, torch.autocast) else None
    result = run_validation(
        model, manifest, groups, cfg, run_dir, step, step_dir, ac, extra={"checkpoint": str(ckpt)}
    )
    path = write_final(run_dir, step_dir, result) if final else step_dir
    return {"path": str(path), "decision": result["decision"], "scores": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nanodit.validate",
        description="Validate a run's EMA weights (reconstruction, DINO swap, text manipulation) and write the GO / NO-GO report.",
    )
    ap.add_argument("--run", required=True, help="the run folder (config and checkpoints come from it)")
    ap.add_argument("--checkpoint", help="a checkpoint file (default: the run's latest)")
    ap.add_argument("--out", help="report folder (default: RUN/validation/step-<step>)")
    ap.add_argument("--final", action="store_true", help="also write the final report RUN/report/")
    ap.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of val.* (and data.path, train.device, train.precision)",
    )
    args = ap.parse_args(argv)
    from nanodit.checkpoint import CheckpointError

    try:
        res = validate_checkpoint(args.run, args.checkpoint, args.overrides, args.out, args.final)
    except (ValidateError, ConfigError, ShardError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = res["scores"]
    for c in s["criteria"].values():
        val = (
            "not computed"
            if not c["computed"]
            else f"{c['value']:.4g} {c['op']} {c['threshold']:g}: {'pass' if c['pass'] else 'FAIL'}"
        )
        print(f"  {c['name']:<13} {val}" + ("" if c["computed"] else f" ({c['why']})"))
    print(f"report: {Path(res['path']) / 'report.html'}  decision: {res['decision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
