"""Shared test setup: GPU-only tests (marked ``gpu``) are skipped, with a reason, where CUDA is absent; the
trainer's log lines print to stdout as a user sees them (pytest's own root handlers would take them otherwise)."""

from __future__ import annotations

import pytest
import torch

from nanodit.logs import command_logging


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
