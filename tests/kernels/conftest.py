"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be in the environment before the kernel modules are imported (``@triton.jit``
reads it when it decorates), so it is set here, at conftest import time, before any test module of
this folder imports ``nanodit.kernels.adaln`` & co. ``test_interpreter_is_used`` checks it took.
The interpreter has no bf16/fp16 arithmetic: those cases are ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
