"""Benchmark suite setup: ``pytest bench/ --benchmark`` is accepted as ``--benchmark-only``.

Every benchmark records the card, torch/triton versions and the commit in ``extra_info`` via the
``bench_meta`` fixture; results are written by pytest-benchmark (``--benchmark-json``).
"""

from __future__ import annotations

import subprocess

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


def machine_info() -> dict:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
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
