"""Shared test setup: GPU-only tests (marked ``gpu``) are skipped, with a reason, where CUDA is absent; the
trainer's log lines print to stdout as a user sees them (pytest's own root handlers would take them otherwise);
every test starts from seeds of its own (torch, NumPy, random), fixed by its name: its random inputs are the same
on every run. (The kernel parity tests then draw a fresh seed on purpose, printed in every failure and replayed
by ``NANODIT_TEST_SEED``: ``tests/kernels/kernel_cases.py``.)"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from nanodit.logs import command_logging


@pytest.fixture(autouse=True)
def seeded(request):
    """torch, NumPy and random seeded from the test's node id (crc32)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True)
def nanodit_lines_on_stdout():
    with command_logging(0):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
