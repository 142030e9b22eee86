"""One attention API for self- and masked cross-attention, several measured backends.

    out = attention(q, k, v, kv_mask=None, backend="auto")

Letters: B batch, T queries (image tokens), L keys (T5 tokens, or T for self-attention), nh heads,
hd head dim.  q: (B, T, nh, hd); k, v: (B, L, nh, hd); kv_mask: (B, L) bool, True = a valid key, or
None (every key valid).  Valid keys form a prefix of each row (T5 padding is at the end); the
``flash`` and ``flex`` backends rely on that, the others take any mask.  Returns (B, T, nh, hd) in
q's dtype.  A fully masked row gives zeros, never NaN, and finite (zero) gradients; padded keys get
exactly zero gradient and their values never change the output.

Backends (``model.attention``):
    math    fp32 einsum + softmax: the reference, the CPU fallback of last resort, the test oracle.
    sdpa    F.scaled_dot_product_attention, torch's default kernel choice, boolean key mask.
    cudnn   the same call forced onto the cuDNN kernel (CUDA, fp16/bf16).
    flex    FlexAttention with a block mask built from the key lengths (compiled on CUDA; on CPU
            forward only: torch has no CPU backward for it).
    flash   the flash-attn package: flash-attn-4 (``flash_attn.cute``) or FA3
            (``flash_attn_interface``) with ``seqused_k`` on the padded keys, else FA2 with the keys
            packed by ``cu_seqlens`` (packing syncs with the host).  CUDA, fp16/bf16.
    auto    the fastest backend present for this card and dtype, from ``AUTO_TABLE`` (measured,
            see bench/bench_attention.py); plain ``sdpa`` where the table has no row (CPU, fp32,
            cards not measured).

Run the checks: ``pytest tests/test_attention.py`` (GPU cases: on a CUDA machine);
the numbers behind AUTO_TABLE: ``python bench/bench_attention.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "flash", "cudnn", "sdpa", "flex", "math")

# What `auto` picks: the fastest provider present, by eager fwd+bwd milliseconds at the nano shape (bf16, B16,
# 6 heads x 64, 1024 queries; "cross": keys padded to 256 with random valid lengths, "self": 1024 keys), keyed
# by CUDA compute capability, used for fp16 and bf16 (fp32 always goes to plain sdpa). Eager times include the
# host launch cost, the ranking that is safe in every mode; in CUDA graphs flash-attn-4 is faster
# (model.attention=flash for graph-captured runs). Names: "cudnn", "sdpa-efficient" and "sdpa-flash" (SDPA's
# kernels), "flash" (flash-attn-4, seqused_k). FlexAttention has no row (it faulted in the benchmark). The
# measurements: bench/results/h200-2026-11-27-s3/attention.json; update from `python bench/bench_attention.py`.
AUTO_TABLE: dict[tuple[int, int], dict] = {
    (9, 0): {
        "source": (
            "NVIDIA H200, torch 2.11.0+cu130, cuDNN 9.19, flash-attn-4 4.0.0b36, 2026-11-27, eager fwd+bwd "
            "(bench/results/h200-2026-11-27-s3/attention.json)"
        ),
        "cross": {"cudnn": 0.6766, "sdpa-efficient": 0.7319, "flash": 1.0394},
        "self": {"cudnn": 0.2735, "flash": 0.3816, "sdpa-flash": 0.5052, "sdpa-efficient": 0.8881},
    },
}

_SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
_HALF = (torch.float16, torch.bfloat16)
_INSTALL_HINT = (
    "pip install 'nanodit[flash]' (flash-attn-4, Hopper/Blackwell) or pip install flash-attn (FA2); "
    "offline: scripts/fetch_flash_wheels.sh"
)

# ---------------------------------------------------------------------------------------------
# reference


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 reference: softmax(q k^T / sqrt(hd)) v with masked keys excluded; empty rows -> 0."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    s = torch.einsum("bthd,blhd->bhtl", q, k) * q.shape[-1] ** -0.5  # (B, nh, T, L)
    if kv_mask is not None:
        s = s.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: NaN -> 0, their gradient -> 0
    return torch.einsum("bhtl,blhd->bthd", p, v).to(dtype)  # (B, T, nh, hd)


# ---------------------------------------------------------------------------------------------
# helpers shared by the fast backends


def _no_empty_rows(kv_mask: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every row at least one key so that no kernel meets an empty softmax (NaN, undefined grads).

    A row with no valid key gets key 0 switched on, and v is zeroed at padded keys: that row then
    averages a single zero vector, so its output is exactly 0, and every gradient through it is
    exactly 0 (dO.v = 0 and O = 0 make dS = 0).  The ``where`` also discards whatever a kernel writes
    into dv at padded keys.  No data-dependent branching: torch.compile and CUDA graphs see one path.
    """
    L = kv_mask.shape[1]
    empty = ~kv_mask.any(1, keepdim=True)  # (B, 1)
    first = torch.arange(L, device=kv_mask.device) == 0  # (L,)
    mask = kv_mask | (empty & first)  # (B, L)
    v = torch.where(kv_mask[:, :, None, None], v, 0)  # (B, L, nh, hd)
    return mask, v


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None) -> None:
    """Shape/dtype contract; metadata only, so it costs nothing under torch.compile."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention: q must be (B, T, nh, hd) and k, v (B, L, nh, hd); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, nh or hd")
    if kv_mask is not None and (kv_mask.dtype != torch.bool or kv_mask.shape != k.shape[:2]):
        raise ValueError(
            f"attention: kv_mask must be a bool (B, L) = {tuple(k.shape[:2])} tensor; "
            f"got {kv_mask.dtype} {tuple(kv_mask.shape)}"
        )


def _need_cuda_half(backend: str, q: torch.Tensor) -> None:
    if not q.is_cuda or q.dtype not in _HALF:
        raise ValueError(
            f"model.attention={backend!r} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
            "use sdpa or auto"
        )


# ---------------------------------------------------------------------------------------------
# SDPA: default dispatch, cuDNN, or an explicit kernel order


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    kernels: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """F.scaled_dot_product_attention with a boolean key mask (B, 1, 1, L).

    ``kernels`` None: torch's default choice.  One name (e.g. ("cudnn",)): only that kernel (torch
    raises if it cannot take the inputs).  Several: tried in that order (``set_priority``), torch
    moving to the next where one cannot take the inputs.  Names: keys of ``_SDPA_KERNELS``.
    """
    mask = None
    if kv_mask is not None:
        kv_mask, v = _no_empty_rows(kv_mask, v)
        mask = kv_mask[:, None, None, :]  # (B, 1, 1, L); torch turns it into the bias each kernel wants
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T|L, hd)
    if kernels is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # (B, nh, T, hd)
    else:
        order = [_SDPA_KERNELS[n] for n in kernels]
        with sdpa_kernel(order, set_priority=len(order) > 1):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # (B, nh, T, hd)
    return out.transpose(1, 2)  # (B, T, nh, hd)


def attention_cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA forced onto cuDNN's fused attention (the boolean mask becomes cuDNN's additive bias)."""
    _need_cuda_half("cudnn", q)
    return attention_sdpa(q, k, v, kv_mask, kernels=("cudnn",))


# ---------------------------------------------------------------------------------------------
# FlexAttention

_flex_compiled = None


def _flex_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T = q.shape[:2]
    L = k.shape[1]
    block_mask = None
    if lens is not None:

        def key_prefix(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        # one mask for every head (H=None); blocks past a row's length are skipped, not computed
        block_mask = create_block_mask(key_prefix, B, None, T, L, device=q.device)
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)  # (B, T, nh, hd)


def attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """FlexAttention, mask_mod ``kv_idx < lengths[b]`` (prefix masks).  Compiled on CUDA: uncompiled
    flex materialises the scores.  On CPU: forward only, uncompiled (torch has no CPU backward)."""
    global _flex_compiled
    lens = None
    if kv_mask is not None:
        kv_mask, v = _no_empty_rows(kv_mask, v)
        lens = kv_mask.sum(1, dtype=torch.int32)  # (B,) >= 1
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not q.is_cuda:
        if needs_grad:
            raise ValueError(
                "model.attention='flex' has no backward on CPU in torch (forward only); use sdpa on CPU"
            )
        # torch refuses CPU flex on any tensor that requires grad, even under no_grad
        return _flex_core(q.detach(), k.detach(), v.detach(), lens)
    if torch.compiler.is_compiling():
        return _flex_core(q, k, v, lens)  # the enclosing torch.compile compiles flex too
    if not needs_grad:
        # Forward-only calls (sampling, validation) run flex uncompiled (the scores are materialised, fine at
        # sampling batch sizes): torch 2.11's compiled forward-only flex kernel faulted on an H200 with this
        # key-prefix block mask (illegal memory access; scripts/debug_flex.py, bench/results/h200-2026-11-27-s3)
        return _flex_core(q.detach(), k.detach(), v.detach(), lens)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(_flex_core, dynamic=False)
    return _flex_compiled(q, k, v, lens)


# ---------------------------------------------------------------------------------------------
# flash-attn package


def constant_to_compile(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (5 s of a cold GPU process's
    start, for a run that never compiles): the public decorator imports it only to set this mark on ``fn``
    (``tests/test_attention.py`` checks that both leave the same mark)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


_FLASH_CANDIDATES = (("flash_attn.cute", "fa4"), ("flash_attn_interface", "fa3"), ("flash_attn", "fa2"))
_flash_found: dict[int, str | None] = {}


@constant_to_compile  # an import probe: run once, a constant to torch.compile
def flash_variant(cc_major: int = 9) -> str | None:
    """Which flash-attn is installed for a card of this compute capability: fa4 | fa3 | fa2 | None.

    FA4 and FA3 train (forward + backward) on Hopper and newer only; FA2 on Ampere and newer.
    """
    if cc_major not in _flash_found:
        found = None
        for module, name in _FLASH_CANDIDATES:
            if name in ("fa4", "fa3") and cc_major < 9:
                continue
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and (name != "fa2" or _has_attr(module, "flash_attn_varlen_func")):
                found = name
                break
        _flash_found[cc_major] = found
    return _flash_found[cc_major]


@constant_to_compile
def _cc_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def _has_attr(module: str, attr: str) -> bool:
    # flash-attn-4 ships flash_attn/ as a namespace package: "flash_attn" alone is not FA2
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def _flash_call(variant: str, q, k, v, lens):
    if variant == "fa2":
        return _flash2(q, k, v, lens)
    fn = importlib.import_module("flash_attn.cute" if variant == "fa4" else "flash_attn_interface")
    if lens is None:
        out = fn.flash_attn_func(q, k, v)
    else:
        # batched (B, L, nh, hd) keys, each row reads only its first seqused_k[b] keys: no packing
        out = fn.flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            max_seqlen_q=None,
            max_seqlen_k=None,
            seqused_k=lens,
        )
    return out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse); FA3 out or (out, lse)


def _flash_installed() -> bool:
    try:
        return any(importlib.util.find_spec(m.split(".")[0]) is not None for m, _ in _FLASH_CANDIDATES)
    except (ImportError, ValueError):
        return False


if _flash_installed():  # (torch.compiler.disable imports torch._dynamo: only where flash-attn can be called)
    # the flash-attn kernels are opaque to dynamo: one explicit break, not an error
    _flash_call = torch.compiler.disable(_flash_call)


def _flash2(q, k, v, lens):
    import flash_attn

    if lens is None:
        return flash_attn.flash_attn_func(q, k, v)
    B, T, nh, hd = q.shape
    L = k.shape[1]
    keep = (torch.arange(L, device=k.device)[None] < lens[:, None]).flatten()  # (B*L,)
    idx = keep.nonzero().squeeze(1)  # (sum lens,): a host sync; FA2 has no seqused_k backward
    kp, vp = k.flatten(0, 1)[idx], v.flatten(0, 1)[idx]  # (sum lens, nh, hd)
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T  # (B+1,)
    out = flash_attn.flash_attn_varlen_func(q.reshape(B * T, nh, hd), kp, vp, cu_q, cu_k, T, L)
    return out.view(B, T, nh, hd)  # (B, T, nh, hd)


def attention_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The flash-attn package (see flash_variant); padded keys are zeroed and never read."""
    _need_cuda_half("flash", q)
    variant = flash_variant(_cc_major(q.device.index or 0))
    if variant is None:
        raise ValueError(f"model.attention='flash': the flash-attn package is not installed; {_INSTALL_HINT}")
    lens = None
    if kv_mask is not None:
        kv_mask, v = _no_empty_rows(kv_mask, v)
        # k zeroed too: the kernels may leave dk (not only dv) unwritten past a row's length, and
        # where() drops those entries in backward
        k = torch.where(kv_mask[:, :, None, None], k, 0)  # (B, L, nh, hd)
        lens = kv_mask.sum(1, dtype=torch.int32)  # (B,) >= 1
    return _flash_call(variant, q, k, v, lens)


# ---------------------------------------------------------------------------------------------
# auto: the measured table


@constant_to_compile  # metadata in, a name out: torch.compile traces no branch here
def auto_plan(device_type: str, device_index: int, dtype_name: str, masked: bool) -> tuple[str, ...]:
    """Providers present on this machine for this case, fastest first per ``AUTO_TABLE``.

    ``("sdpa",)`` where no measurement applies (CPU, fp32, a card without a row).
    """
    if device_type != "cuda" or dtype_name not in ("torch.float16", "torch.bfloat16"):
        return ("sdpa",)
    cc = torch.cuda.get_device_capability(device_index)
    row = AUTO_TABLE.get(cc)
    if row is None:
        return ("sdpa",)
    times = row["cross" if masked else "self"]
    present = [n for n in times if n != "flash" or flash_variant(cc[0]) in ("fa4", "fa3")]
    return tuple(sorted(present, key=times.__getitem__)) or ("sdpa",)


def _auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
    plan = auto_plan(q.device.type, q.device.index or 0, str(q.dtype), kv_mask is not None)
    if plan[0] == "flash":
        return attention_flash(q, k, v, kv_mask)
    if plan[0] == "flex":
        return attention_flex(q, k, v, kv_mask)
    if plan[0] in _SDPA_KERNELS:
        # SDPA kernels in measured order, then torch's usual order: a kernel that cannot take the
        # inputs (say cuDNN on an odd shape) hands over to the next instead of failing
        order = [n for n in plan if n in _SDPA_KERNELS]
        order += [n for n in ("sdpa-flash", "sdpa-efficient", "sdpa-math") if n not in order]
        return attention_sdpa(q, k, v, kv_mask, kernels=tuple(order))
    return attention_sdpa(q, k, v, kv_mask)


# ---------------------------------------------------------------------------------------------
# the API


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the valid keys: (B, T, nh, hd), q's dtype (see module doc)."""
    _check(q, k, v, kv_mask)
    if backend == "auto":
        return _auto(q, k, v, kv_mask)
    if backend == "math":
        return attention_math(q, k, v, kv_mask)
    if backend == "sdpa":
        return attention_sdpa(q, k, v, kv_mask)
    if backend == "cudnn":
        return attention_cudnn(q, k, v, kv_mask)
    if backend == "flex":
        return attention_flex(q, k, v, kv_mask)
    if backend == "flash":
        return attention_flash(q, k, v, kv_mask)
    raise ValueError(f"model.attention={backend!r} is not one of {', '.join(BACKENDS)}")
