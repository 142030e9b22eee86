"""The report files: scores.json with the decision and every criterion, PNG grids with captions under the
images, report.md, a self-contained report.html (images embedded, nothing fetched), the history of a
run's validations, and the scalars/images/text that go to TensorBoard."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import torch
from PIL import Image

from nanodit.validation import criteria as scores
from nanodit.validation import report


def fake_result(step: int = 100, lpips_value: float | None = 0.1) -> dict:
    crit = [
        scores.criterion("loss_ratio", 0.05, 0.1, "<", "loss", initial=2.0, final=0.1, window=3, points=20),
        scores.criterion("dino_swap", 0.4, 0.6, ">=", "swap rate"),
        scores.criterion("text_manip", 0.8, 0.6, ">=", "manip rate"),
    ]
    if lpips_value is None:
        crit.insert(
            1,
            scores.not_computed("lpips", 0.2, "<", "LPIPS", why="no backbone here", how="put the file there"),
        )
    else:
        crit.insert(1, scores.criterion("lpips", lpips_value, 0.2, "<", "LPIPS"))
    return {
        **scores.decide(crit),
        "step": step,
        "data": "shapes",
        "criteria": {c["name"]: c for c in crit},
        "numbers": {"psnr": 21.5, "ssim": 0.8, "lpips": lpips_value, "light_err": float("nan")},
        "cases": [
            {
                "test": "recon",
                "a": "s1",
                "caption": "a red | circle on the left",
                "a_caption": "x",
                "psnr": 21.5,
            },
            {
                "test": "dino_swap",
                "a": "s1",
                "b": "s2",
                "caption": "c",
                "a_caption": "c",
                "passed": False,
                "detail": "(no)",
            },
            {
                "test": "text_manip",
                "a": "s1",
                "caption": "on the right",
                "a_caption": "on the left",
                "passed": True,
            },
        ],
        "decoder": {"kind": "shapes codec"},
        "lpips": {"why": "no backbone here", "how": "put the file there"}
        if lpips_value is None
        else {"net": "alex", "backbone": "/x.pth", "source": "val.lpips_weights"},
        "sampling": {
            "steps": 4,
            "guidance_dino": 1.0,
            "guidance_text": 1.0,
            "seed": 1,
            "samples_per_test": 1,
            "sampler_calls": 1,
            "precision": "fp32",
            "device": "cpu",
            "seconds": 0.5,
        },
        "loss_curve": [[10 * i, 2.0 / i] for i in range(1, 21)],
        "seconds": 1.0,
    }


def solid(rgb, h=12, w=20) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, h, w).clone()  # (3, H, W)


def images() -> dict:
    red, blue, green = solid([1, 0, 0]), solid([0, 0, 1]), solid([0, 1, 0])
    return {
        "recon": [[(red, "original caption"), (blue, "PSNR 1")]],
        "dino_swap": [[(red, "A"), (blue, "B"), (green, "swap")]],
        "text_manip": [[(red, "orig"), (green, "swapped")]],
    }


def test_report_files(tmp_path) -> None:
    res = fake_result(lpips_value=None)
    out = report.write_report(tmp_path / "r", res, images())
    s = json.loads((out / "scores.json").read_text())  # strict JSON: NaN became null
    assert s["decision"] == "NO-GO" and s["failed"] == ["dino_swap"] and s["not_computed"] == ["lpips"]
    assert s["numbers"]["light_err"] is None
    for c in s["criteria"].values():
        assert {"value", "threshold", "pass"} <= set(c)
    assert s["criteria"]["lpips"]["why"] == "no backbone here" and s["criteria"]["lpips"]["how to provide"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["dino_swap.png", "loss.png", "recon.png", "text_manip.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "NO-GO" in md and "no backbone here" in md and "put the file there" in md
    for name in ("loss_ratio", "lpips", "dino_swap", "text_manip"):
        assert f"| {name} |" in md
    assert "red \\| circle" in md  # a caption's pipe does not break the table
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page and "<link" not in page and "href=" not in page
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {p.read_bytes() for p in out.glob("*.png")}


def test_grid_puts_each_caption_under_its_image() -> None:
    rows = images()["dino_swap"]
    g = np.asarray(report.grid(rows, ["a", "b", "c"]))  # (H, W, 3)
    C, P = report.CELL, report.PAD
    assert g.shape[1] == 3 * (C + P) + P
    # the image cells hold the (upscaled, centred) images: a 12x20 image becomes 115x192 in its cell
    top = next(y for y in range(g.shape[0]) if tuple(g[y, P + C // 2]) == (255, 0, 0))
    cell_top = top - (C - round(12 * C / 20)) // 2
    assert cell_top > 0  # the headers come first
    for j, rgb in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        assert tuple(g[top + 50, P + j * (C + P) + C // 2]) == rgb
    # under each image's cell there is dark text (its caption)
    band = g[cell_top + C : cell_top + C + 20]  # (20, W, 3)
    for j in range(3):
        assert (band[:, P + j * (C + P) : P + j * (C + P) + C].astype(int).sum(axis=2) < 200).any(), j
    longer = [[(img, cap + " and much more text " * 6) for img, cap in rows[0]]]
    assert report.grid(longer, ["a", "b", "c"]).height > g.shape[0]


def test_history_and_final_report(tmp_path) -> None:
    for step, lp in ((100, 0.5), (200, 0.1)):
        report.write_report(tmp_path / "validation" / f"step-{step:08d}", fake_result(step, lp), images())
    hist = report.history(tmp_path / "validation")
    assert [h["step"] for h in hist] == [100, 200]
    assert hist[0]["values"]["lpips"] == 0.5 and hist[1]["decision"] == "NO-GO"
    out = report.write_report(tmp_path / "report", fake_result(200, 0.1), images(), history=hist, final=True)
    md = (out / "report.md").read_text()
    assert md.startswith("# Final report: NO-GO") and "## History" in md and "| 100 | NO-GO |" in md


def test_log_metrics_scalars_images_and_text(tmp_path) -> None:
    """Scores as scalar rows; in TensorBoard the report's grid PNGs byte for byte, and the decision as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    class Metrics:
        def __init__(self):
            self.rows, self.tb = [], SummaryWriter(str(tmp_path / "tb"))

        def log(self, step, row):
            self.rows.append((step, row))

    res = fake_result(100, 0.1)
    out = report.write_report(tmp_path / "report", res, images())
    m = Metrics()
    report.log_metrics(m, 100, res, out)
    m.tb.close()
    step, row = m.rows[0]
    assert step == 100 and row["val/lpips"] == 0.1 and row["val/dino_swap"] == 0.4 and row["val/go"] == 0.0
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"val/recon", "val/dino_swap", "val/text_manip"}
    (shown,) = acc.Images("val/recon")
    assert shown.step == 100 and shown.encoded_image_string == (out / "recon.png").read_bytes()
    assert (shown.width, shown.height) == Image.open(out / "recon.png").size
    (text,) = acc.Tensors("val/decision/text_summary")
    assert "NO-GO" in text.tensor_proto.string_val[0].decode()


def test_the_images_go_to_their_own_event_file_and_tensorboard_reads_both(tmp_path) -> None:
    """With the trainer's MetricsLogger the grids and the text go through ``media()`` (a second writer: a
    background validation's PNGs never hold up the training thread's scalars); TensorBoard reads the one
    folder and finds the scalars and the images, each event file holding its own kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nanodit.runlog import MetricsLogger

    res = fake_result(100, 0.1)
    out = report.write_report(tmp_path / "report", res, images())
    m = MetricsLogger(tmp_path, tensorboard=True)
    assert m.media() is m.media() and m.media() is not m.tb
    m.log(10, {"loss": 0.5})
    report.log_metrics(m, 100, res, out)
    m.close()
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2 and sum(f.name.endswith(".media") for f in files) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert {"loss", "val/lpips"} <= set(acc.Tags()["scalars"])
    assert set(acc.Tags()["images"]) == {"val/recon", "val/dino_swap", "val/text_manip"}
    (shown,) = acc.Images("val/recon")
    assert shown.encoded_image_string == (out / "recon.png").read_bytes()
    media = EventAccumulator(
        str(next(f for f in files if f.name.endswith(".media"))), size_guidance={"images": 0}
    )
    media.Reload()
    assert media.Tags()["scalars"] == [] and len(media.Tags()["images"]) == 3
    plain = MetricsLogger(tmp_path / "report", tensorboard=False)
    assert plain.media() is None
    plain.close()


def test_report_explains_itself(tmp_path) -> None:
    """Diagnoses and loud warnings come first, then the criteria with intervals, the self-test table, the run's
    identity and the per-t plots; verdicts are coloured in the HTML; decision_lines prints the decision once."""
    res = fake_result(lpips_value=None)
    res["criteria"]["dino_swap"].update(
        passed=13, n=32, ci95=[0.25, 0.58], diagnosis="DINO swap 13/32 passed"
    )
    res["warnings"] = ["the caption has no effect on the prediction"]
    res["plumbing_only"] = True
    res["identity"] = {"commit": "abc1234", "t_shift": 7.389}
    res["effects"] = {"t": [0.05, 0.95], "caption": [0.0, 0.0], "dino": [0.3, 0.1], "samples": 4}
    res["loss_bins"] = {"t0.0": [(10, 1.0), (20, 0.5)], "t0.9": [(10, 2.0), (20, 1.5)]}
    res["self_test"] = {
        "power": True,
        "faults": {
            "zero_cross": {
                "fault": "zero_cross",
                "what": "cut",
                "target": "text_manip",
                "target_value": 0.0,
                "caught": True,
                "intact_pass": True,
                "decision": "NO-GO",
            }
        },
    }
    out = report.write_report(tmp_path / "r", res, images())
    assert {"loss_t.png", "effects.png"} <= {p.name for p in out.glob("*.png")}
    md = (out / "report.md").read_text()
    head = md.split("| criterion |")[0]
    assert "dino_swap: DINO swap 13/32 passed" in head and "**WARNING: the caption has no effect" in head
    assert "smoke run" in head and "1/1 planted faults" in head
    assert "13/32, 95% CI 0.25-0.58" in md and "| zero_cross | cut | text_manip | 0 | caught | NO-GO |" in md
    assert "| commit | abc1234 |" in md and "| t_shift | 7.389 |" in md
    page = (out / "report.html").read_text()
    assert '<td style="color:#cf222e;font-weight:bold">FAIL</td>' in page
    assert '<td style="color:#1a7f37;font-weight:bold">caught</td>' in page
    assert '<h1 style="color:#cf222e;font-weight:bold">' in page  # NO-GO in red
    lines = report.decision_lines(res, out)
    assert lines[0] == f"decision: NO-GO  (report: {out / 'report.html'})"
    assert sum(x.startswith("decision:") for x in lines) == 1
    assert "  dino_swap: DINO swap 13/32 passed" in lines and any("WARNING" in x for x in lines)


def test_report_without_matplotlib_keeps_every_number(tmp_path, monkeypatch) -> None:
    """The base install has no matplotlib: the report says the plots are left out and why, the rest is there."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = report.write_report(tmp_path / "r", fake_result(), images())
    md = (out / "report.md").read_text()
    assert "matplotlib is not installed" in md and "| loss_ratio |" in md
    assert not (out / "loss.png").exists() and (out / "recon.png").is_file()
