"""The numbers validation computes: image metrics (PSNR, SSIM, LPIPS with a local backbone), the training
loss ratio from the run log, pass rates and their Wilson intervals.

Everything here is a pure function of its inputs (no model, no files except the LPIPS backbone and the
run's metrics.jsonl). Images are (B, 3, H, W) float tensors in [0, 1].
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

# imported where first used, not at import: ~6 s of a cold GPU process's start (torchmetrics imports
# transformers where that is installed), which a run would pay long before it validates
HEAVY_MODULES = ("torchmetrics.functional.image", "matplotlib.figure", "matplotlib.backends.backend_agg")


def import_heavy() -> None:
    """Import the validation's heavy modules (``HEAVY_MODULES``, those installed); the trainer runs this in a
    background thread while it trains, so the first validation does not wait for them."""
    for name in HEAVY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # matplotlib is optional (the validation extra): the plots say so
            pass


PSNR_CAP_DB = 100.0  # identical images: the MSE floor 1e-10 caps PSNR here instead of infinity

# ---------------------------------------------------------------------------------------------
# image metrics


def psnr(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1] (torchmetrics: 10 log10(1 / MSE)), capped at
    PSNR_CAP_DB for identical images instead of infinity."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # see ``import_heavy``

    db = peak_signal_noise_ratio(
        x.float(), y.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )  # (B,)
    return [min(float(v), PSNR_CAP_DB) for v in db]


def ssim(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (torchmetrics: an 11x11 Gaussian window of sigma 1.5,
    or the largest odd one that fits a small image; channels averaged), batched on the images' device."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # see ``import_heavy``

    side = min(x.shape[-2:])
    k = min(11, side - (1 - side % 2))  # odd, <= the image side
    out = structural_similarity_index_measure(
        x.float(), y.float(), data_range=1.0, kernel_size=k, sigma=1.5 * k / 11, reduction="none"
    )  # (B,)
    return [float(v) for v in out]


# ---------------------------------------------------------------------------------------------
# LPIPS: the package ships its linear heads; the ImageNet backbone must be local

# torchvision's file names for the backbones (their checksum suffix is part of the name)
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_backbone_path(net: str, weights: str | None) -> tuple[Path | None, str]:
    """The backbone weights file to use and where it came from ("val.lpips_weights" or "torchvision cache")."""
    if weights:
        return Path(weights), "val.lpips_weights"
    cache = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    return (cache, "torchvision cache") if cache.is_file() else (None, "")


def lpips_how_to(net: str) -> str:
    name = LPIPS_BACKBONE_FILES[net]
    return (
        f"put torchvision's ImageNet {net} weights ({name}, from https://download.pytorch.org/models/{name}) "
        f"into {Path(torch.hub.get_dir()) / 'checkpoints'} or pass val.lpips_weights=/path/to/{name}"
    )


def load_lpips(net: str, weights: str | None, device: torch.device) -> tuple[torch.nn.Module | None, dict]:
    """An LPIPS module with the package's linear heads and a LOCAL ImageNet backbone, never downloaded.

    Returns (module, info); module is None when the backbone weights are missing or unreadable, and info
    then says why and how to provide them. ``weights`` is a torchvision state dict of the backbone
    (keys ``features.<i>.*``) or of the LPIPS trunk itself (``slice<k>.<i>.*``).
    """
    path, source = lpips_backbone_path(net, weights)
    info = {"net": net, "backbone": str(path) if path else None, "source": source}
    if path is None:
        return None, {
            **info,
            "why": f"the LPIPS {net} backbone weights are not on this machine",
            "how": lpips_how_to(net),
        }
    if not path.is_file():
        return None, {**info, "why": f"val.lpips_weights={weights}: no such file", "how": lpips_how_to(net)}
    try:
        import lpips
    except ImportError:
        return None, {
            **info,
            "why": "the lpips package is not installed",
            "how": "pip install 'nanodit[validation]'",
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notes inside lpips
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # heads from the package, trunk random
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        trunk = model.net.state_dict()
        # the lpips trunk names torchvision's features.<i> as slice<k>.<i>
        by_index = {k.split(".", 1)[1]: k for k in trunk}  # "<i>.weight" -> "slice<k>.<i>.weight"
        mapped = {}
        for k, v in state.items():
            if k.startswith("features."):
                mapped[by_index.get(k[len("features.") :], k)] = v
            elif k.startswith("slice"):
                mapped[k] = v
        missing = sorted(set(trunk) - set(mapped))
        if missing:
            raise ValueError(f"no tensor for {missing[0]} (is it the {net} backbone?)")
        model.net.load_state_dict({k: mapped[k] for k in trunk})
    except Exception as e:
        why = f"{path} ({source}) cannot be loaded as the {net} backbone: {str(e).splitlines()[0]}"
        return None, {**info, "why": why, "how": lpips_how_to(net)}
    return model.to(device).eval(), info


LPIPS_MIN_SIDE = 64  # AlexNet's strides need >= ~32 px; smaller images are upsampled to this side first


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> list[float]:
    """Per-image LPIPS of (B, 3, H, W) images in [0, 1] (the package wants [-1, 1]). Images whose shorter
    side is below LPIPS_MIN_SIDE (tiny test renders) are upsampled bilinearly first, both the same way."""
    dev = next(model.parameters()).device
    side = min(x.shape[-2:])
    size = None if side >= LPIPS_MIN_SIDE else [math.ceil(s * LPIPS_MIN_SIDE / side) for s in x.shape[-2:]]
    out = []
    for i in range(0, x.shape[0], batch):
        a = x[i : i + batch].to(dev).float() * 2 - 1  # (b, 3, H, W)
        b = y[i : i + batch].to(dev).float() * 2 - 1
        if size is not None:
            a = torch.nn.functional.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=size, mode="bilinear", align_corners=False)
        out += model(a, b).flatten().tolist()
    return out


# ---------------------------------------------------------------------------------------------
# the training-loss criterion


def read_loss_log(path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of the rows of ``metrics.jsonl`` that hold a training loss, by step (a resumed run's
    repeated steps keep their last value); unreadable lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)) and "step" in row:
            by_step[int(row["step"])] = float(row["loss"])
    return sorted(by_step.items())


def read_loss_bins(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The per-t-bin training losses of ``metrics.jsonl`` (keys ``loss_t0.0`` .. ``loss_t0.9``: the mean loss of
    the samples whose t fell in [0.0, 0.1) .. [0.9, 1.0) since the last log row), as {bin: [(step, loss)]}."""
    path = Path(path)
    if not path.is_file():
        return {}
    by_bin: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        for k, v in row.items():
            if k.startswith("loss_t") and isinstance(v, (int, float)):
                by_bin.setdefault(k[len("loss_") :], {})[int(row["step"])] = float(v)
    return {b: sorted(d.items()) for b, d in sorted(by_bin.items())}


def loss_ratio(losses: list[float], window: int) -> dict:
    """Final / initial training loss, each the mean of ``window`` logged points (fewer when the log is
    shorter than 2 windows: then each half of the log). Needs at least 2 finite points."""
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < 2:
        return {"value": None, "points": len(finite)}
    w = max(1, min(window, len(finite) // 2))
    initial, final = float(np.mean(finite[:w])), float(np.mean(finite[-w:]))
    value = final / initial if initial > 0 else None
    return {"value": value, "initial": initial, "final": final, "window": w, "points": len(finite)}


# ---------------------------------------------------------------------------------------------
# pass rates and their intervals

WILSON_Z = 1.959964  # two-sided 95%


def rate(flags: list[bool]) -> float | None:
    """Share of True in ``flags``; None for an empty list (nothing was tested)."""
    return sum(bool(f) for f in flags) / len(flags) if flags else None


def wilson(k: int, n: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """The Wilson score interval of a pass rate k/n (95% by default); None when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n: 5/5 gives
    (0.57, 1.0), i.e. five samples cannot show that a rate is above 0.6."""
    if n <= 0:
        return None
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
