"""What scoring can use besides the model: the latent decoder, LPIPS, and (real data) a DINOv3 embedder.

    tools = load_tools(manifest, vcfg, device, shapes)   # each part may be None, with why and how to provide it

Shapes data decode with the synthetic codec (exact); real latents with a local diffusers AutoencoderKL
(``val.vae``, e.g. the Flux VAE), un-scaled as the manifest says. Nothing is downloaded: a missing part is
reported (``why`` / ``how``), and the criteria that need it are not computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanodit.config import ValConfig
from nanodit.shapes import ShapesCodec
from nanodit.validation.cases import SHAPES_CODEC, is_shapes
from nanodit.validation.metrics import load_lpips


class ShapesDecoder:
    """The synthetic codec: (B, 16, h, w) -> (B, 4, 2h, 2w) RGB + object mask."""

    def __init__(self, manifest: dict):
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


@dataclass
class Tools:
    """What scoring can use; any may be None (then the scores that need it are not computed)."""

    decoder: object | None
    decoder_info: dict
    lpips: torch.nn.Module | None
    lpips_info: dict
    dino: object | None = None  # images -> (B, Dd)
    dino_info: dict | None = None


def load_tools(manifest: dict, vcfg: ValConfig, device: torch.device, shapes: bool) -> Tools:
    """The decoder, LPIPS and (real data only) the DINOv3 embedder for ``vcfg``, each loaded once."""
    decoder, dinfo = load_decoder(manifest, vcfg, device)
    lp, linfo = load_lpips(vcfg.lpips_net, vcfg.lpips_weights, device)
    dino, dino_info = (None, None) if shapes else load_dino_embedder(vcfg, device)
    return Tools(decoder, dinfo, lp, linfo, dino, dino_info)
