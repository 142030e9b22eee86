"""How the fused ops reach autograd and torch.compile: one formula registered through two torch.library doors.

Each op registers four library ops by one call (``CompileDoors``): the forward and backward as custom ops
(opaque nodes that call the Python launchers at run time; fake impls given) and as triton ops (Inductor sees
the Triton kernels and launches them from its generated code; fake impls derived by tracing the launchers).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import torch

from nanodit.kernels.checks import is_interpreted

# How the ops reach a torch.compile graph (read at trace time; tests and benchmarks flip it, then reset dynamo):
#   "triton_op": torch.library.triton_op + wrap_triton. Inductor sees the Triton kernels and launches them from
#                its generated code (no dispatcher, no Python launcher per call) -- the default on a GPU;
#   "custom_op": torch.library.custom_op, an opaque node that calls the Python launchers at run time. Used
#                whenever the kernels run in Triton's interpreter (CPU CI), which wrap_triton cannot trace.
COMPILE_DOOR = os.environ.get("NANODIT_COMPILE_DOOR", "triton_op")


def target(kernel, traced: bool):
    """What a launcher indexes with its grid: the kernel itself, or (inside a triton_op body, ``traced``) the
    kernel wrapped so make_fx/Inductor record the launch instead of running it."""
    return torch.library.wrap_triton(kernel) if traced else kernel


_SCHEMA_TYPES = {
    "Tensor": torch.Tensor,
    "Tensor?": torch.Tensor | None,
    "int": int,
    "bool": bool,
    "float": float,
    "ScalarType": torch.dtype,
}


def signature_of(schema: str) -> inspect.Signature:
    """The annotated Python signature of an op schema such as ``(Tensor x, Tensor? g, int n) -> (Tensor, Tensor)``
    (only the types our ops use)."""
    args, ret = schema.split("->")
    params = []
    for arg in filter(None, (a.strip() for a in args.strip()[1:-1].split(","))):
        typ, name = arg.rsplit(" ", 1)
        params.append(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_SCHEMA_TYPES[typ])
        )
    outs = [_SCHEMA_TYPES[r.strip()] for r in ret.strip().strip("()").split(",")]
    return inspect.Signature(params, return_annotation=outs[0] if len(outs) == 1 else tuple[tuple(outs)])


class CompileDoors:
    """The two torch.compile doors of one fused op (see COMPILE_DOOR), registered from one formula.

    ``fwd(*args, traced=False)`` and ``bwd(*args, traced=False)`` are the launchers; ``setup_context`` and
    ``backward(ctx, *grads, bwd_op)`` the autograd formula the eager autograd.Function uses too. Registers
    ``nanodit::{name}`` / ``{name}_bwd`` (custom ops, with the given fake impls) and ``nanodit::{name}_tt`` /
    ``{name}_bwd_tt`` (triton ops: fake impls derived by tracing the launchers with fake tensors).
    """

    def __init__(
        self,
        name: str,
        probe: object,
        fwd: Callable,
        bwd: Callable,
        fwd_schema: str,
        bwd_schema: str,
        fake_fwd: Callable,
        fake_bwd: Callable,
        setup_context: Callable,
        backward: Callable,
    ):
        self.interpreted = is_interpreted(
            probe
        )  # a bool, fixed at import (dynamo cannot isinstance a kernel)

        def doors(suffix: str, traced: bool, register: Callable):
            f = register(f"nanodit::{name}{suffix}", lambda *a, **k: fwd(*a, **k, traced=traced), fwd_schema)
            b = register(
                f"nanodit::{name}_bwd{suffix}", lambda *a, **k: bwd(*a, **k, traced=traced), bwd_schema
            )
            return f, b

        def custom(qualname, fn, schema):
            return torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)

        def triton_op(qualname, fn, schema):
            # torch <= 2.11 infers a triton op's schema from the Python signature even when one is given
            fn.__signature__ = signature_of(schema)
            return torch.library.triton_op(qualname, fn, mutates_args=(), schema=schema)

        self.custom, custom_bwd = doors("", False, custom)
        self.custom.register_fake(fake_fwd)
        custom_bwd.register_fake(fake_bwd)
        self.triton, triton_bwd = doors("_tt", True, triton_op)
        for op, bop in ((self.custom, custom_bwd), (self.triton, triton_bwd)):
            op.register_autograd(
                functools.partial(_backward_with, backward, bop), setup_context=setup_context
            )

    def __call__(self, *args):
        """The op inside a torch.compile trace."""
        use_triton = COMPILE_DOOR == "triton_op" and not self.interpreted
        return (self.triton if use_triton else self.custom)(*args)


def _backward_with(backward: Callable, bwd_op: Callable, ctx, *grads):
    return backward(ctx, *grads, bwd_op)
