"""train.step_graph: the whole step as one CUDA graph per batch shape (nanodit/step_graph.py).

CPU: the option's checks and its fall-back (off, said once, the same run). GPU (marked ``gpu``, skipped on CPU):
the graphed run computes what the eager run computes (tolerance below), replays graphs for every batch shape, never
waits for the GPU inside a step, and writes checkpoints that read as any other run's.

Tolerance rule for the GPU parity: the same kernels run in the same order whether launched one by one or replayed
from a graph, so losses, weights and EMA are compared bitwise (fp32 model, no autocast, no compile)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from smokerun import smoke_cache, tiny_overrides

from nanodit.config import ConfigError, load_config
from nanodit.optim import EMA
from nanodit.train import setup, train, train_step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return smoke_cache(tmp_path_factory)


def cfg_for(tmp_path, cache, *extra):
    return load_config("smoke", tiny_overrides(tmp_path / "run", cache, *extra))


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_step_graph_with_reduce_overhead_is_a_config_error(tmp_path, cache):
    with pytest.raises(ConfigError, match="train.step_graph=true.*compile_mode=default"):
        cfg_for(
            tmp_path,
            cache,
            "train.step_graph=true",
            "train.compile=true",
            "train.compile_mode=reduce-overhead",
        )


def test_on_cpu_step_graph_is_off_said_once_and_changes_nothing(tmp_path, cache, caplog):
    base = cfg_for(tmp_path / "a", cache, "train.steps=8")
    train(base, quiet=True)
    with caplog.at_level(logging.INFO, logger="nanodit"):
        train(cfg_for(tmp_path / "b", cache, "train.steps=8", "train.step_graph=true"))
    said = [r.getMessage() for r in caplog.records if "train.step_graph" in r.getMessage()]
    assert said == ["train.step_graph: off (not on CUDA); the step runs eagerly"]
    want = [r["loss"] for r in rows(tmp_path / "a" / "run")]
    assert [r["loss"] for r in rows(tmp_path / "b" / "run")] == want


def test_ema_update_with_a_device_weight_equals_the_float_update():
    """The graph step's EMA (a 0-d weight tensor the graph reads) gives the eager step's numbers, bitwise."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    a, b = EMA(model), EMA(model)
    for decay in (0.0, 0.3, 0.7, 0.9999):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        a.update(model, decay)
        b.update_with(model, torch.tensor(1.0 - decay))
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params), decay


# ---- on the GPU ----------------------------------------------------------------------------------


def gpu_cfg(tmp_path, cache, graph: bool, *extra):
    return cfg_for(
        tmp_path,
        cache,
        "train.device=cuda",
        "train.steps=40",
        "train.ckpt_every=1000",
        f"train.step_graph={str(graph).lower()}",
        *extra,
    )


def steps_of(cfg, max_graphs: int | None = None):
    """Run ``cfg``'s steps one by one: (run, the loss of every step)."""
    from nanodit.train import _open_records

    run = setup(cfg, progress=False)
    if max_graphs is not None:
        run.graphs.max_graphs = max_graphs
    _open_records(run)
    losses = []
    while run.step < run.cfg.train.steps:
        train_step(run)
        losses.append(run.window.loss.item())  # the window's sum over one step
        run.window.reset()
    run.close()
    return run, losses


@pytest.mark.gpu
def test_graphed_steps_compute_what_eager_steps_compute(tmp_path, cache):
    """40 steps over the smoke set's 4 buckets (full and partial batches). Replayed graphs against the same step
    body launched eagerly (max_graphs=0): every loss, the weights and the EMA bitwise equal. Against the plain
    eager trainer (step_graph off; its AdamW takes the lr as a float, not a device tensor): losses within 1e-5
    relative. The graphs were captured for several shapes and replayed."""
    graphed, lg = steps_of(gpu_cfg(tmp_path / "g", cache, True))
    launched, ll = steps_of(gpu_cfg(tmp_path / "l", cache, True), max_graphs=0)
    plain, lp = steps_of(gpu_cfg(tmp_path / "p", cache, False))
    assert len(graphed.graphs.graphs) >= 4 and graphed.graphs.replays > 10 and not launched.graphs.graphs
    assert lg == ll
    for (k, p), q in zip(launched.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(p, q), k
    assert all(torch.equal(launched.ema.params[k], graphed.ema.params[k]) for k in graphed.ema.params)
    assert max(abs(a - b) / abs(b) for a, b in zip(lg, lp)) < 1e-5, (lg, lp)


@pytest.mark.gpu
def test_a_graphed_step_never_waits_for_the_gpu(tmp_path, cache):
    """With torch's sync debug mode at error, steps whose graphs exist (and their copies, noise, lr, window and
    flag bookkeeping) run without one host sync."""
    from nanodit.train import _open_records

    run = setup(gpu_cfg(tmp_path, cache, True), progress=False)
    _open_records(run)
    for _ in range(24):  # 3 epochs of the smoke set: every shape met, captured and replayed
        train_step(run)
    before = run.graphs.replays
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            train_step(run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert run.graphs.replays - before == 8
    run.close()


@pytest.mark.gpu
def test_a_graphed_runs_checkpoint_resumes_like_any_other(tmp_path, cache):
    """The saved optimizer groups hold a float lr and capturable off; resuming continues the same losses."""
    full = gpu_cfg(tmp_path / "full", cache, True, "train.steps=30")
    train(full, quiet=True)
    part = gpu_cfg(tmp_path / "part", cache, True, "train.steps=30", "train.ckpt_every=15")
    train(part, quiet=True, stop_after=15)
    state = torch.load(tmp_path / "part" / "run" / "checkpoints" / "ckpt-00000015.pt", weights_only=False)
    groups = state["optim"]["param_groups"]
    assert all(isinstance(g["lr"], float) and g["capturable"] is False for g in groups)
    train(gpu_cfg(tmp_path / "part", cache, True, "train.steps=30", "train.resume=auto"), quiet=True)
    want = [r["loss"] for r in rows(tmp_path / "full" / "run")]
    assert [r["loss"] for r in rows(tmp_path / "part" / "run")] == want
