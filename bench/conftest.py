"""Benchmark suite setup: ``pytest bench/ --benchmark`` is accepted as ``--benchmark-only``.

Every benchmark records the card, torch/triton versions and the commit in ``extra_info`` via the
``bench_meta`` fixture; results are written by pytest-benchmark (``--benchmark-json``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmarks (same as --benchmark-only)",
    )


def pytest_configure(config):
    if config.getoption("benchmark", default=False):
        config.option.benchmark_only = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        item.add_marker(skip)


def cuda_event_times(fn, warmup: int, reps: int, inner: int) -> list[float]:
    """Milliseconds per call of ``fn``: CUDA events around ``inner`` back-to-back calls, ``reps`` times."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return times


def cuda_graph(fn, before_capture=None):
    """Capture one call of ``fn`` in a CUDA graph, torch's recipe: warm up on a side stream (kernels compiled,
    workspaces allocated), optionally prepare (``before_capture``), capture once. -> (replay, the captured
    call's return value, whose tensors each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def machine_info() -> dict:
    import triton

    # NANODIT_COMMIT names the code when the checkout's git state does not (a copied working tree whose .git
    # is older than its files); otherwise HEAD, marked "-dirty" when tracked files differ from it
    commit = os.environ.get("NANODIT_COMMIT", "")
    try:
        if not commit:
            git = ["git", "-C", str(Path(__file__).resolve().parent)]
            commit = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            commit += "-dirty" if commit and dirty else ""
    except OSError:
        commit = ""
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit or "unknown",
    }


@pytest.fixture(scope="session")
def bench_meta() -> dict:
    return machine_info()
