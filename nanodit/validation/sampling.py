"""Sampling for validation: every case of a bucket in one sampler call, and the condition-effect probe.

    latents = generate(model, cases, vcfg, autocast)         # (C, h, w) fp32 CPU tensors, in case order
    effects = condition_effect(model, cases, autocast)       # how much caption / DINO move v, per t

Each case starts from a fixed noise per (val.seed, sample id), drawn on the CPU, so every device starts from
the same numbers and a sample's tests differ only in their conditioning.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from nanodit.config import ValConfig
from nanodit.flow import conditioned_passes, interpolate, sample_euler
from nanodit.validation.cases import Case

# t at the centres of the 10 loss bins the trainer logs ([0, 0.1) ... [0.9, 1))
EFFECT_T = tuple((i + 0.5) / 10 for i in range(10))
EFFECT_MAX_ROWS = 288  # samples in one forward of the condition-effect probe (3 conditionings x t values x B)


def case_noise(sample, seed: int) -> torch.Tensor:
    """Fixed starting noise (C, h, w) per (val.seed, sample id), drawn on the CPU."""
    h = hashlib.blake2b(f"{seed}:{sample.id}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))
    return torch.randn(sample.latent.shape, generator=gen)  # (C, h, w)


def pad_t5(states: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded T5 states -> (B, L, Dt) fp32 zeros-padded and the (B, L) validity mask."""
    L = max(a.shape[0] for a in states)
    t5 = torch.zeros(len(states), L, states[0].shape[1])  # (B, L, Dt)
    mask = torch.zeros(len(states), L, dtype=torch.bool)  # (B, L)
    for i, a in enumerate(states):
        t5[i, : a.shape[0]] = torch.from_numpy(a.astype(np.float32))
        mask[i, : a.shape[0]] = True
    return t5, mask


def _by_bucket(cases: list[Case]) -> list[list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.bucket, []).append(i)
    return [idx for _, idx in sorted(groups.items())]


def _conditions(cases: list[Case], idx: list[int], device: torch.device):
    dino = torch.from_numpy(np.stack([cases[i].dino for i in idx]).astype(np.float32)).to(device)  # (B, Dd)
    t5, mask = pad_t5([cases[i].t5 for i in idx])  # (B, L, Dt), (B, L)
    return dino, t5.to(device), mask.to(device)


@torch.no_grad()
def generate(model: torch.nn.Module, cases: list[Case], vcfg: ValConfig, autocast=None) -> list[torch.Tensor]:
    """Sampled latents (C, h, w) fp32 on the CPU, one per case, in order; one ``sample_euler`` per bucket."""
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(cases)
    for idx in _by_bucket(cases):
        noise = torch.stack([case_noise(cases[i].a, vcfg.seed) for i in idx]).to(device)  # (B, C, h, w)
        dino, t5, mask = _conditions(cases, idx, device)
        x = sample_euler(
            model,
            noise,
            dino,
            t5,
            mask,
            vcfg.steps,
            vcfg.guidance_dino,
            vcfg.guidance_text,
            autocast,
            vcfg.sample_shift,
            cuda_graph=vcfg.cuda_graph,
        )  # (B, C, h, w)
        for j, i in enumerate(idx):
            out[i] = x[j].float().cpu()
    return out  # type: ignore[return-value]


@torch.no_grad()
def condition_effect(
    model: torch.nn.Module,
    cases: list[Case],
    seed: int,
    autocast=None,
    ts: tuple[float, ...] = EFFECT_T,
    max_rows: int = EFFECT_MAX_ROWS,
) -> dict:
    """How much each condition moves the prediction, per t: on the reconstruction cases, at
    x_t = (1 - t) x0 + t eps (their own latent, their fixed noise),

        caption: mean ||v(DINO, T5) - v(DINO, null)|| / ||v(DINO, T5)||
        dino:    mean ||v(DINO, T5) - v(null, T5)|| / ||v(DINO, T5)||

    (null = the learned null condition of CFG dropout). A model that ignores its caption has caption = 0 at
    every t. The t values of a bucket go through the model together (up to ``max_rows`` samples a forward,
    three conditionings each), and the sums stay on the device until the end: one read. Returns
    {"t": [...], "caption": [...], "dino": [...], "samples": n}."""
    recon = [c for c in cases if c.test == "recon"]
    if not recon:
        return {"t": list(ts), "caption": [], "dino": [], "samples": 0}
    device = next(model.parameters()).device
    sums = torch.zeros(2, len(ts), device=device)  # (caption | dino, t)
    for idx in _by_bucket(recon):
        B = len(idx)
        dino, t5, mask = _conditions(recon, idx, device)
        x0 = torch.stack([torch.from_numpy(recon[i].a.latent.astype(np.float32)) for i in idx]).to(device)
        eps = torch.stack([case_noise(recon[i].a, seed) for i in idx]).to(device)  # (B, C, h, w)
        per = max(1, max_rows // (3 * B))  # t values per forward
        for k0 in range(0, len(ts), per):
            k = len(ts[k0 : k0 + per])
            t = torch.tensor(ts[k0 : k0 + per], device=device).repeat_interleave(B)  # (kB,): t-major
            x_t = interpolate(x0.repeat(k, 1, 1, 1), eps.repeat(k, 1, 1, 1), t)  # (kB, C, h, w)
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                v_dt, v_d0, v_0t = conditioned_passes(
                    model,
                    x_t,
                    t,
                    dino.repeat(k, 1),
                    t5.repeat(k, 1, 1),
                    mask.repeat(k, 1),
                    ((False, False), (False, True), (True, False)),
                )  # 3 x (kB, C, h, w): (d, t), (d, null), (null, t)
            v_dt, v_d0, v_0t = (v.flatten(1) for v in (v_dt, v_d0, v_0t))  # 3 x (kB, C*h*w)
            norm = v_dt.norm(dim=1).clamp_min(1e-12)  # (kB,)
            rel = torch.stack([(v_dt - v_d0).norm(dim=1), (v_dt - v_0t).norm(dim=1)]) / norm  # (2, kB)
            sums[:, k0 : k0 + k] += rel.view(2, k, B).sum(2)
    sums = sums.double().cpu().numpy()
    n = len(recon)
    return {
        "t": list(ts),
        "caption": (sums[0] / n).tolist(),
        "dino": (sums[1] / n).tolist(),
        "samples": n,
    }
