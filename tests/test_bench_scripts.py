"""The GPU measurement scripts a later session runs (bench/bench_memory.py on one GPU, bench/bench_scaling.py on two):
their plumbing on a CPU and the rules they report with, so that the GPU call spends its time measuring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_memory  # noqa: E402
import bench_scaling  # noqa: E402


def test_memory_script_runs_the_trainers_step_on_a_cpu(tmp_path):
    """--device cpu --size tiny: the trainer's setup and train_step at each batch size, with and without activation
    checkpointing, written as JSON (no peak memory on a CPU, so no micro-batch is said to fit)."""
    out = tmp_path / "memory.json"
    result = bench_memory.main(
        ["--device", "cpu", "--size", "tiny", "--batches", "1,2", "--steps", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    assert [(r["batch"], r["activation_checkpointing"]) for r in result["rows"]] == [
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    ]
    assert all(r["ms_per_step"] > 0 and r["peak_gb"] is None for r in result["rows"])
    assert result["accumulation"]["activation_checkpointing=true"] == {
        "micro_batch": None,
        "grad_accum": None,
    }


def test_memory_script_recommends_the_largest_micro_batch_that_fits():
    rows = [
        {"batch": b, "activation_checkpointing": ac, "reserved_gb": gb}
        for b, ac, gb in [
            (2, False, 10.0),
            (4, False, 21.0),
            (8, False, 30.0),
            (8, True, 15.0),
            (16, True, 23.0),
        ]
    ] + [{"batch": 16, "activation_checkpointing": False, "reserved_gb": "oom"}]
    assert bench_memory.accumulation(rows, 22.0) == {
        "activation_checkpointing=false": {"micro_batch": 4, "grad_accum": 4},
        "activation_checkpointing=true": {"micro_batch": 8, "grad_accum": 2},
    }


def test_scaling_commands_are_the_users_launch_lines(tmp_path, capsys):
    """One GPU runs python -m nanodit.train, two run torchrun --standalone; the parity pair shares the global batch,
    the speed pair the batch per GPU; multicast is off in the children's environment."""
    cmds = bench_scaling.plan("production", 2, 16, 200, tmp_path)
    assert cmds["parity-1gpu"][1:3] == ["-m", "nanodit.train"]
    assert cmds["parity-2gpu"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert "train.batch_size=16" in cmds["parity-2gpu"] and "train.batch_size=32" in cmds["speed-2gpu"]
    assert "train.log_every=1" in cmds["parity-1gpu"] and "train.log_every=10" in cmds["speed-1gpu"]
    env = bench_scaling.environment()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    bench_scaling.main(["--dry-run", "--sizes", "nano", "--out", str(tmp_path / "s.json")])
    assert "speed-2gpu" in capsys.readouterr().out and not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("shift, passes", [(0.0, True), (0.5, False)])
def test_scaling_parity_rule(shift, passes):
    """Windows of 25 steps, |mean difference| <= 3 sigma of the two windows' per-step spread: the same noisy curve
    passes, one shifted by several sigma fails."""
    import random

    rng = random.Random(0)
    one = [[s, 1.0 + 0.1 * rng.random()] for s in range(1, 201)]
    two = [[s, x + shift + 0.02 * (rng.random() - 0.5)] for s, x in one]
    result = bench_scaling.parity(one, two, skip=50)
    assert len(result["windows"]) == 6 and result["pass"] is passes
    assert bench_scaling.efficiency({"samples_per_s": 100.0}, {"samples_per_s": 190.0}, 2) == pytest.approx(
        0.95
    )
