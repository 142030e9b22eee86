"""How long the training thread's log row waits while a validation writes its grids to TensorBoard.

A worker thread writes ``--grids`` PNG grids (random pixels, ``--size`` HxW: incompressible, the worst case) to
TensorBoard and flushes, ``--rounds`` times, as the validation's background report does; meanwhile the main
thread writes a log row (``MetricsLogger.log``: the JSONL line and ~14 scalars) every 16 ms, as the trainer
does at speed. Four variants: the images through the scalars' writer (``shared``, the trainer before
``MetricsLogger.media``) or through ``media()`` (``separate``), each at Python's default GIL switch interval
(5 ms) and the trainer's (``nanodit.train.GIL_SWITCH_S``). Prints one JSON object: per variant, the rows logged
and their mean, max and total ms. CPU only.

    python bench/tb_stall.py --out tb_stall.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # script mode: import nanodit from the repo

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from nanodit.runlog import MetricsLogger  # noqa: E402
from nanodit.train import GIL_SWITCH_S, gil_switch_interval  # noqa: E402
from nanodit.validation.report import tb_png  # noqa: E402

ROW = {
    "loss": 0.1,
    "lr": 1e-4,
    "ms_per_step": 16.2,
    "grad_norm": 0.5,
    **{f"loss_t0.{i}": 0.01 for i in range(10)},
}


def grids(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"grid{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def variant(folder: Path, pngs: list[Path], separate: bool, interval: float, rounds: int) -> dict:
    folder.mkdir(parents=True)
    m = MetricsLogger(folder, tensorboard=True)
    media = m.media() if separate else m.tb

    def background() -> None:
        for r in range(rounds):
            for p in pngs:
                tb_png(media, f"val/{p.stem}", p, r)
            media.flush()
            time.sleep(0.2)

    worker = threading.Thread(target=background)
    waits, step = [], 0
    with gil_switch_interval(interval), contextlib.closing(m):
        worker.start()
        while worker.is_alive():
            t0 = time.perf_counter()
            m.log(step, ROW)
            waits.append(time.perf_counter() - t0)
            step += 1
            time.sleep(0.016)
        worker.join()
    return {
        "rows": len(waits),
        "mean_ms": round(1e3 * statistics.fmean(waits), 3),
        "max_ms": round(1e3 * max(waits), 1),
        "total_ms": round(1e3 * sum(waits), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(1024, 1536), metavar=("H", "W"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pngs = grids(folder, args.grids, tuple(args.size))
        result: dict = {
            "png_mb": round(pngs[0].stat().st_size / 1e6, 2),
            "grids": args.grids,
            "rounds": args.rounds,
        }
        for interval in (5e-3, GIL_SWITCH_S):
            for separate in (False, True):
                name = f"{'separate' if separate else 'shared'}@{interval:g}s"
                result[name] = variant(folder / name, pngs, separate, interval, args.rounds)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
