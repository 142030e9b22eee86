"""NanoDiT: a DiT with two conditioning paths, read top to bottom.

    v = NanoDiT(cfg)(x_t, t, dino, t5, t5_mask, drop_dino=None, drop_text=None)

- DINO path: DINOv3 CLS (Dd) -> MLP -> added to the timestep embedding -> per-block adaLN-Zero
  (shift/scale/gate for self-attention and MLP) and the final layer's shift/scale.
- T5 path: hidden states (L, 4096) + mask -> caption MLP -> pre-LN cross-attention in every block,
  output projection zero-initialised.
- Classifier-free guidance nulls live here: a dropped DINO becomes a learned null embedding, a dropped
  caption a learned null token sequence (``null_text_tokens`` valid keys, never an empty row).
The model knows nothing of flows: t is just a number in [0, 1].

Letters: B batch, C latent channels, H, W latent size, p patch, T = HW/p^2 image tokens, D width,
nh heads, hd head dim, L T5 tokens, Dt T5 width, Dd DINO width.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanodit.attention import attention
from nanodit.kernels import branch_dtype, get_ops

# ---------------------------------------------------------------------------------------------
# embedders


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] features, frequencies 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim // 2))
    ang = pos.float()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=1)  # (N, dim)


def sincos_2d(dim: int, gh: int, gw: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """2-D sin-cos positions of a gh x gw grid -> (gh*gw, dim): half the channels for y, half for x.

    Integer token positions, so every bucket grid is computed fresh and shares the top-left
    positions of the others.
    """
    ys, xs = torch.meshgrid(
        torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
    )  # (gh, gw)
    return torch.cat([sincos_1d(dim // 2, ys.flatten()), sincos_1d(dim // 2, xs.flatten())], dim=1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t (DiT's scale) -> MLP -> (B, D)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        ang = 1000 * t.float()[:, None] * freqs[None]  # (B, freq/2)
        emb = torch.cat([ang.cos(), ang.sin()], dim=1)  # (B, freq)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and state_dict keys) through ``ops.linear``: for the layers applied to
    every token, where the fused ops take the bias gradient as one matrix-vector product, and the adaLN layers.
    Under autocast these layers take their 16-bit weights from one pass at the start of the model's forward
    (``ops.autocast_weights``)."""

    def __init__(self, d_in: int, d_out: int, ops: SimpleNamespace | None = None):
        super().__init__(d_in, d_out)
        self.linear_op = ops.linear if ops is not None else F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_op(x, self.weight, self.bias)


class Mlp(nn.Module):
    def __init__(
        self, d_in: int, d_hidden: int, d_out: int, act: nn.Module, ops: SimpleNamespace | None = None
    ):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(d_in, d_hidden, ops), act, Linear(d_hidden, d_out, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------
# attention


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str, ops: SimpleNamespace | None = None):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = Linear(width, 3 * width, ops)
        self.proj = Linear(width, width, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).unbind(2)  # 3 x (B, T, nh, hd)
        out = attention(q, k, v, None, backend=self.backend)  # (B, T, nh, hd)
        return self.proj(out.reshape(B, T, D))  # (B, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to the projected caption; padded keys (mask False) are ignored."""

    def __init__(self, width: int, heads: int, backend: str, ops: SimpleNamespace | None = None):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = Linear(width, width, ops)
        self.kv = Linear(width, 2 * width, ops)
        self.proj = Linear(width, width, ops)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        L, nh = y.shape[1], self.heads
        q = self.q(x).view(B, T, nh, D // nh)  # (B, T, nh, hd)
        k, v = self.kv(y).view(B, L, 2, nh, D // nh).unbind(2)  # 2 x (B, L, nh, hd)
        out = attention(q, k, v, y_mask, backend=self.backend)  # (B, T, nh, hd)
        return self.proj(out.reshape(B, T, D))  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# block and final layer


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention -> pre-LN cross-attention -> adaLN-Zero MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ops: SimpleNamespace, backend: str):
        super().__init__()
        self.ops = ops
        self.attn = SelfAttention(width, heads, backend, ops)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, heads, backend, ops)
        self.mlp = Mlp(width, int(width * mlp_ratio), width, nn.GELU(approximate="tanh"), ops)
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(width, 6 * width, ops))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor
    ) -> torch.Tensor:
        mod = self.adaLN(c)  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)  # 6 x (B, D)
        h = self.ops.modulate(x, shift_a, scale_a)  # (B, T, D)
        n = self.norm_cross  # x + gate * attn and its LayerNorm, in one pass with the fused ops
        x, h = self.ops.residual_norm(x, gate_a, self.attn(h), n.weight, n.bias)  # 2 x (B, T, D)
        cross = self.cross(h, y, y_mask)  # (B, T, D)
        x, h = self.ops.residual_modulate(x, cross, None, shift_m, scale_m)  # 2 x (B, T, D)
        return self.ops.gated_residual(x, gate_m, self.mlp(h))  # (B, T, D)


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, out_channels: int, ops: SimpleNamespace):
        super().__init__()
        self.ops = ops
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(width, 2 * width, ops))
        self.linear = Linear(width, patch * patch * out_channels, ops)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(self.ops.modulate(x, shift, scale))  # (B, T, p*p*C)


# ---------------------------------------------------------------------------------------------
# the model


class NanoDiT(nn.Module):
    def __init__(
        self,
        depth: int,
        width: int,
        heads: int,
        dino_dim: int,
        t5_dim: int,
        patch: int = 2,
        in_channels: int = 16,
        mlp_ratio: float = 4.0,
        null_text_tokens: int = 4,
        kernels: str = "ref",
        attention: str = "auto",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.patch, self.in_channels, self.width = patch, in_channels, width
        # recompute each block in the backward (torch.utils.checkpoint, non-reentrant): its activations are not
        # kept between forward and backward; a plain attribute, so the state_dict keys never change
        self.activation_checkpointing = activation_checkpointing
        self.ops = get_ops(kernels)
        self.x_embed = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.t_embed = TimestepEmbedder(width)
        self.dino_embed = Mlp(dino_dim, width, width, nn.SiLU())
        self.null_dino = nn.Parameter(torch.zeros(width))
        self.caption_embed = Mlp(t5_dim, width, width, nn.GELU(approximate="tanh"), self.ops)
        self.null_text = nn.Parameter(torch.zeros(null_text_tokens, width))
        self.blocks = nn.ModuleList(
            [DiTBlock(width, heads, mlp_ratio, self.ops, attention) for _ in range(depth)]
        )
        self.final = FinalLayer(width, patch, in_channels, self.ops)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        # the ops' linear layers take their autocast weight copies from one pass at the start of each forward
        self._linears = [m for m in self.modules() if isinstance(m, Linear)]
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation; every block starts as the identity and the output is exactly zero."""

        def _xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_xavier)
        w = self.x_embed.weight  # patch embed like a linear layer (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        for mlp in (self.t_embed.mlp[0], self.t_embed.mlp[2], self.dino_embed.fc1, self.dino_embed.fc2):
            nn.init.normal_(mlp.weight, std=0.02)
        nn.init.normal_(self.null_dino, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)
        for block in self.blocks:
            # zero-out adaLN modulation: gates (and shifts/scales) start at 0 -> residual branches off
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            # zero-out the cross-attention output projection: the caption path starts off too
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)
        # zero-out the final layer: the prediction starts at exactly 0
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def pos_embed(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        """2-D sin-cos positions for a bucket's token grid, cached per (grid, device) in eager mode.

        Under torch.compile they are computed in the graph instead: a Python cache that grows with each new
        bucket is guarded on by dynamo and would force a recompile per bucket.
        """
        if torch.compiler.is_compiling():
            return sincos_2d(self.width, gh, gw, device)  # (T, D)
        key = (gh, gw, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.width, gh, gw, device)  # (T, D)
        return self._pos_cache[key]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embed(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, T, D)

    def unpatchify(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, p, C = x.shape[0], self.patch, self.in_channels
        x = x.view(B, H // p, W // p, p, p, C)  # (B, H/p, W/p, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, H, W)  # (B, C, H, W)

    def condition(self, t, dino, drop_dino) -> torch.Tensor:
        """c = t_emb + (DINO MLP or the learned null) -> (B, D)."""
        d = self.dino_embed(dino.to(self.null_dino.dtype))  # (B, D)
        if drop_dino is not None:
            d = torch.where(drop_dino[:, None], self.null_dino.to(d.dtype)[None], d)  # (B, D)
        return self.t_embed(t) + d  # (B, D)

    def caption(self, t5, t5_mask, drop_text) -> tuple[torch.Tensor, torch.Tensor]:
        """Project T5 states; dropped captions become the learned null sequence. -> (B, L', D), (B, L')."""
        y = self.caption_embed(t5.to(branch_dtype(t5, self.null_text.dtype)))  # (B, L, D)
        mask = t5_mask.bool()  # (B, L)
        if drop_text is not None:
            n = self.null_text.shape[0]
            if y.shape[1] < n:  # room for the null tokens
                y = F.pad(y, (0, 0, 0, n - y.shape[1]))  # (B, n, D)
                mask = F.pad(mask, (0, n - mask.shape[1]))  # (B, n)
            L = y.shape[1]
            null = F.pad(self.null_text, (0, 0, 0, L - n)).to(y.dtype)  # (L, D)
            null_mask = torch.arange(L, device=y.device) < n  # (L,)
            y = torch.where(drop_text[:, None, None], null[None], y)  # (B, L, D)
            mask = torch.where(drop_text[:, None], null_mask[None], mask)  # (B, L)
        return y, mask

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        dino: torch.Tensor,
        t5: torch.Tensor,
        t5_mask: torch.Tensor,
        drop_dino: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,), dino (B, Dd), t5 (B, L, Dt), t5_mask (B, L) -> v (B, C, H, W)."""
        if torch.compiler.is_compiling():  # Inductor casts the weights in its own kernels
            return self._forward(x, t, dino, t5, t5_mask, drop_dino, drop_text)
        with self.ops.autocast_weights(self._linears):
            return self._forward(x, t, dino, t5, t5_mask, drop_dino, drop_text)

    def _forward(self, x, t, dino, t5, t5_mask, drop_dino, drop_text) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch
        h = self.patchify(x) + self.pos_embed(H // p, W // p, x.device)[None].to(x.dtype)  # (B, T, D)
        c = self.condition(t, dino, drop_dino)  # (B, D)
        y, y_mask = self.caption(t5, t5_mask, drop_text)  # (B, L, D), (B, L)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(
                    block, h, c, y, y_mask, use_reentrant=False
                )  # (B, T, D)
            else:
                h = block(h, c, y, y_mask)  # (B, T, D)
        out = self.final(h, c)  # (B, T, p*p*C)
        return self.unpatchify(out, H, W)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# named sizes

SIZES = {
    "tiny": dict(depth=2, width=64, heads=2),  # CPU smoke runs and tests
    "small": dict(depth=4, width=128, heads=4),  # CPU memorization tests
    "nano": dict(depth=12, width=384, heads=6),  # the plan's Part B: DiT-S/2 + cross-attention
    "production": dict(depth=32, width=1024, heads=16),  # the plan's Part C shape
}


def build_model(mcfg, dino_dim: int, t5_dim: int) -> NanoDiT:
    """NanoDiT from a ModelConfig; explicit depth/width/heads override the named size."""
    size = dict(SIZES[mcfg.size])
    for key in ("depth", "width", "heads"):
        if getattr(mcfg, key) is not None:
            size[key] = getattr(mcfg, key)
    return NanoDiT(
        **size,
        dino_dim=mcfg.dino_dim or dino_dim,
        t5_dim=mcfg.t5_dim or t5_dim,
        patch=mcfg.patch,
        in_channels=mcfg.in_channels,
        mlp_ratio=mcfg.mlp_ratio,
        null_text_tokens=mcfg.null_text_tokens,
        kernels=mcfg.kernels,
        attention=mcfg.attention,
        activation_checkpointing=mcfg.activation_checkpointing,
    )
