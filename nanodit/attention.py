"""One attention API for self- and masked cross-attention, several backends.

    out = attention(q, k, v, kv_mask=None, backend="auto")

q: (B, T, H, hd); k, v: (B, L, H, hd); kv_mask: (B, L) bool, True = a valid key, or None (all valid).
Valid keys form a prefix of each row (T5 padding is at the end). Returns (B, T, H, hd).
A fully masked row gives zeros, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "cudnn", "sdpa", "flex", "math")


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None):
    """The fp32 reference: softmax(q k^T / sqrt(hd)) v with masked keys excluded."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    s = torch.einsum("bthd,blhd->bhtl", q, k) * q.shape[-1] ** -0.5  # (B, H, T, L)
    if kv_mask is not None:
        s = s.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return torch.einsum("bhtl,blhd->bthd", p, v).to(dtype)  # (B, T, H, hd)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None):
    """torch's scaled_dot_product_attention with a boolean key mask (default dispatch)."""
    mask = None if kv_mask is None else kv_mask[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = out.transpose(1, 2)  # (B, T, H, hd)
    if kv_mask is not None:
        out = out * kv_mask.any(1).to(out.dtype)[:, None, None, None]  # fully masked rows -> 0
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    if backend == "math":
        return attention_math(q, k, v, kv_mask)
    if backend in ("auto", "sdpa"):
        return attention_sdpa(q, k, v, kv_mask)
    raise ValueError(f"model.attention={backend!r}: backend not available (one of {', '.join(BACKENDS)})")
