"""The time-to-decision script (bench/decision_time.py) and the stage clock behind it (runlog.Stages), on a CPU:
two fresh processes of a tiny job, the JSON the speed work reports, stages that add up to the job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nanodit.runlog import Stages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decision_time  # noqa: E402  (bench/decision_time.py)

FIELDS = {"card", "commit", "torch", "config", "steps", "cold_wall_s", "warm_wall_s", "stages"}
FIELDS |= {"trainer_ms_per_step", "bench_ms_per_step", "decision"}


def test_stages_attribute_warmup_by_shape_and_the_rest_of_the_loop_to_training():
    st = Stages()
    with st.loop():
        for shape in ["a", "a", "a", "a", "b", "a"]:  # a: 3 warm-up calls, then at speed; b: its first call
            st.step(shape, 1.0)
        with st("checkpoints"):
            pass
    s = st.summary()
    assert s["warmup"] == 4.0 and s["shapes"] == 2
    assert s["train"] >= 0 and s["total"] >= s["train"] + s["checkpoints"] - 1e-3
    assert set(Stages.NAMES) <= set(s)


def test_decision_time_writes_cold_and_warm_with_stages(tmp_path):
    out = tmp_path / "decision_time.json"
    # 30 steps: the smoke set meets up to 8 batch shapes, each warm-up for its first 3 calls, so some steps run at
    # speed and ``train`` holds more than the log rows (6 steps met 4 shapes: ``train`` was the rows' ~1 ms alone,
    # 0.0 after rounding in 2 of 6 runs)
    overrides = ["model.size=tiny", "train.steps=30", "train.log_every=10", "run.tensorboard=false"]
    overrides += ["val.self_test=false", "val.samples=2", "val.steps=2"]
    assert (
        decision_time.main(
            ["--out", str(out), "--config", "smoke", "--keep", str(tmp_path / "k"), *overrides]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert FIELDS <= set(r) and r["card"] == "cpu" and r["steps"] == 30 and r["config"] == "smoke"
    assert r["decision"] in ("GO", "NO-GO", "INCOMPLETE") and r["bench_ms_per_step"] is None
    for run in ("cold", "warm"):
        st = r["stages"][run]
        assert st["startup"] > 0 and st["train"] > 0 and st["validation"] > 0 and st["checkpoints"] > 0
        parts = sum(st[k] for k in Stages.NAMES)
        assert abs(parts - st["total"]) < 0.01  # every second of the job is in one stage
        assert abs(st["total"] + st["startup"] - r[f"{run}_wall_s"]) < 0.01
        # startup = launch (process start -> train(), the trainer's /proc reading) + exit, /proc's 10 ms ticks apart
        assert st["launch"] > 0 and abs(st["launch"] + st["exit"] - st["startup"]) < 0.03
        # the validation's parts: the final one in this thread (within the stage), nothing left in the background
        inside = st["validation_parts"]
        assert {"sample", "score", "report", "twin"} <= set(inside)
        # each figure is rounded to the ms: the parts' sum may pass the stage by half a ms per rounded figure
        assert sum(inside.values()) <= st["validation"] + 0.0005 * (len(inside) + 1)
    assert r["stages"]["cold"]["data"] > r["stages"]["warm"]["data"]  # the cold run writes the shapes set
    assert r["trainer_ms_per_step"] > 0
    for run in ("cold", "warm"):
        at_speed = 30 - Stages.WARM_CALLS * r["stages"][run]["shapes"]  # steps after every shape's warm-up
        mean = r["train_mean_ms_per_step"][run]
        assert (mean > 0) if at_speed > 0 else mean is None
        assert [step for step, _ in r["ms_per_step_rows"][run]] == [10, 20, 30]
        assert all(ms > 0 for _, ms in r["ms_per_step_rows"][run])
