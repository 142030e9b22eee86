"""The validation report: scores.json, PNG grids with captions, the loss curves (total and per t), the
condition-effect plot, report.md and a self-contained report.html (images embedded as base64, verdicts
coloured), the same numbers and grids in TensorBoard, and the lines the command lines print last.

    write_report(out_dir, result, images)   # result: Validator.run's dict; images: grid rows per test
    decision_lines(result, path)            # the decision once, then one line per failed or missing criterion

The Markdown and the HTML are rendered from one list of blocks, so they always hold the same numbers.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nanodit.validation.criteria import NO_EFFECT

CELL = 192  # longest image side in a grid cell, px
PAD = 6
GRID_FILES = {"recon": "recon.png", "dino_swap": "dino_swap.png", "text_manip": "text_manip.png"}
GRID_HEADERS = {
    "recon": ["original", "reconstruction (own DINO + caption)"],
    "dino_swap": ["A (its caption is used)", "B (its DINO is used)", "output: text of A + DINO of B"],
    "text_manip": ["original", "output: DINO of A + swapped caption"],
}
TITLES = {"recon": "Reconstruction", "dino_swap": "DINO swap", "text_manip": "Text manipulation"}

# ---------------------------------------------------------------------------------------------
# JSON


def clean(obj):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------
# grids


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3|4, H, W) in [0, 1] -> (H, W, 3) uint8 (the shapes codec's mask channel is dropped)."""
    a = img[:3].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return (a * 255 + 0.5).astype(np.uint8)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def grid(
    rows: list[list[tuple[torch.Tensor | None, str]]], headers: list[str], cell: int = CELL
) -> Image.Image:
    """A grid: one row per test case, one column per image, each caption written under its image."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 3
    ncol = max(len(r) for r in rows)
    wrapped = [[_wrap(probe, cap, font, cell) for _, cap in r] for r in rows]
    cap_h = [max(len(c) for c in w) * line_h for w in wrapped]
    head_h = max(len(_wrap(probe, h, font, cell)) for h in headers) * line_h + PAD
    W = ncol * (cell + PAD) + PAD
    H = head_h + sum(cell + c + 2 * PAD for c in cap_h) + PAD
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for j, h in enumerate(headers):
        for k, line in enumerate(_wrap(probe, h, font, cell)):
            draw.text((PAD + j * (cell + PAD), PAD // 2 + k * line_h), line, fill="black", font=font)
    y = head_h
    for r, row in enumerate(rows):
        for j, (img, _) in enumerate(row):
            x = PAD + j * (cell + PAD)
            if img is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            else:
                im = Image.fromarray(to_uint8(img))
                s = cell / max(im.size)
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.NEAREST)
                canvas.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
            for k, line in enumerate(wrapped[r][j]):
                draw.text((x, y + cell + PAD // 2 + k * line_h), line, fill="black", font=font)
        y += cell + cap_h[r] + 2 * PAD
    return canvas


def _figure(width: float = 7, height: float = 3.5):
    # matplotlib is imported only when a plot is drawn (start-up cost); no pyplot: no global state, no GUI
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, **legend) -> bool:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(**{"fontsize": 8, **legend})
    fig.tight_layout()
    fig.savefig(path)
    return True


def loss_curve(points: list[list[float]], path: Path, result: dict) -> bool:
    """Training loss vs step (log scale) with the initial and final windows of the criterion; False when
    there is nothing to draw."""
    if not points:
        return False
    steps, losses = zip(*points)
    fig, ax = _figure()
    ax.plot(steps, losses, lw=1, label="training loss")
    c = result.get("criteria", {}).get("loss_ratio", {})
    if c.get("computed"):
        ax.axhline(c["initial"], color="gray", ls="--", lw=1, label=f"initial {c['initial']:.4g}")
        ax.axhline(c["final"], color="green", ls="--", lw=1, label=f"final {c['final']:.4g}")
        ax.axhline(c["initial"] * c["threshold"], color="red", ls=":", lw=1, label="GO needs final below")
    if min(losses) > 0:
        ax.set_yscale("log")
    return _save(fig, ax, path, "step", "loss")


def loss_bins_curve(bins: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """The training loss of each t bin over the steps (log scale): where in t the model has not fit."""
    if not bins:
        return False
    fig, ax = _figure()
    from matplotlib import colormaps  # matplotlib is imported only when a plot is drawn

    cmap = colormaps["viridis"]
    for i, (name, pts) in enumerate(bins.items()):
        steps, vals = zip(*pts)
        lo = float(name[1:])
        ax.plot(
            steps, vals, lw=1, color=cmap(i / max(1, len(bins) - 1)), label=f"t in [{lo:.1f}, {lo + 0.1:.1f})"
        )
    ax.set_yscale("log")
    return _save(fig, ax, path, "step", "training loss in the t bin", fontsize=7, ncol=2)


def effects_curve(effects: dict | None, path: Path) -> bool:
    """How much the caption and the DINO move the prediction, against t (0 = a condition with no effect)."""
    if not effects or not effects.get("caption"):
        return False
    fig, ax = _figure(7, 3)
    ax.plot(effects["t"], effects["caption"], "o-", label="caption: ||v(D,T) - v(D,null)|| / ||v||")
    ax.plot(effects["t"], effects["dino"], "s-", label="DINO: ||v(D,T) - v(null,T)|| / ||v||")
    ax.axhline(NO_EFFECT, color="red", ls=":", lw=1, label=f"no effect below {NO_EFFECT:.0%}")
    return _save(fig, ax, path, "t (1 = noise)", "relative change of v")


# ---------------------------------------------------------------------------------------------
# the report: blocks rendered to Markdown and HTML


def _num(v, nd: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def verdict(c: dict) -> str:
    if not c["computed"]:
        return "not computed" if c.get("required", True) else "not computed (optional)"
    return "pass" if c["pass"] else "FAIL"


def _ci(c: dict) -> str:
    if "ci95" not in c:
        return ""
    lo, hi = c["ci95"]
    return f"{c['passed']}/{c['n']}, 95% CI {lo:.2f}-{hi:.2f}"


def _criteria_rows(result: dict) -> list[list[str]]:
    rows = []
    for c in result["criteria"].values():
        note = "" if c["computed"] else f"{c['why']} — how to provide: {c['how to provide']}"
        if c["name"] == "loss_ratio" and c["computed"]:
            note = f"initial {c['initial']:.4g}, final {c['final']:.4g} (window {c['window']} of {c['points']} points)"
        rows.append(
            [
                c["name"],
                _num(c["value"]),
                _ci(c),
                f"{c['op']} {c['threshold']:g}",
                verdict(c),
                c["description"] + (f"; {note}" if note else ""),
            ]
        )
    return rows


def _case_rows(result: dict, test: str) -> list[list[str]]:
    rows = []
    for r in result["cases"]:
        if r["test"] != test:
            continue
        read = _read(r)
        if test == "recon":
            rows.append(
                [
                    r["a"],
                    r["caption"],
                    _num(r.get("psnr")),
                    _num(r.get("ssim")),
                    _num(r.get("lpips")),
                    _num(r.get("latent_mse")),
                    _pass(r.get("scorer_pass")),
                    read,
                ]
            )
        elif test == "dino_swap":
            rows.append([r["a"], r["b"], r["a_caption"], _pass(r.get("passed")), r.get("detail", ""), read])
        else:
            rows.append([r["a"], r["caption"], _pass(r.get("passed")), r.get("detail", ""), read])
    return rows


def _pass(v) -> str:
    return "—" if v is None else ("pass" if v else "FAIL")


def _read(r: dict) -> str:
    """What the scorer read back beside what the case expected (shapes data)."""
    if "objects_read" not in r:
        return ""
    light = ""
    exp, got = r.get("light_expected_deg"), r.get("light_read_deg")
    if exp is not None and isinstance(got, float) and math.isfinite(got):
        light = f"; light read {got:.0f} deg, expected {exp:.0f}"
    elif r.get("light_err_b_deg") is not None:
        light = f"; light {r['light_err_b_deg']:.0f} deg from B's"
    elif r.get("light_err_deg") is not None:
        light = f"; light {r['light_err_deg']:.0f} deg from A's"
    return f"read: {', '.join(r['objects_read']) or 'no object'} — expected: {', '.join(r['objects_expected'])}{light}"


CASE_HEADERS = {
    "recon": [
        "sample",
        "caption",
        "PSNR dB",
        "SSIM",
        "LPIPS",
        "latent MSE",
        "scorer",
        "factors read / expected",
    ],
    "dino_swap": ["A", "B", "caption of A", "pass", "detail", "factors read / expected"],
    "text_manip": ["sample", "swapped caption", "pass", "detail", "factors read / expected"],
}


def decision_summary(result: dict) -> list[str]:
    """The decision's reasons, one sentence each: diagnoses of failed and missing criteria, loud warnings,
    the self-test's verdict, and what a smoke run's decision means."""
    out = []
    for c in result["criteria"].values():
        if "diagnosis" in c:
            out.append(f"{c['name']}: {c['diagnosis']}")
    for w in result.get("warnings", []):
        out.append(f"WARNING: {w}")
    st = result.get("self_test")
    if st:
        out.append(self_test_line(st))
    if result.get("no_power"):
        out.append(
            "the decision is INCOMPLETE, not GO: the self-test's planted fault(s) "
            f"{', '.join(result['no_power'])} did not fail their target, so these tests cannot tell a broken "
            "model on this run (raise val.samples, or check the scorer)"
        )
    if result.get("plumbing_only"):
        out.append(
            "note: this is a smoke run (val.plumbing_only): its decision checks that training and validation "
            "work end to end, not whether the architecture works"
        )
    return out


def self_test_line(st: dict) -> str:
    faults = st["faults"].values()
    caught = sum(e["caught"] is True for e in faults)
    parts = ", ".join(
        f"{e['fault']} -> {e['target']} {_num(e['target_value'], 3)} ({_caught(e)})" for e in faults
    )
    return f"self-test: {caught}/{len(st['faults'])} planted faults fail the test they target: {parts}"


def _identity_rows(result: dict) -> list[list[str]]:
    ident = dict(result.get("identity", {}))
    for k in ("checkpoint", "step"):
        if k in result:
            ident[k] = result[k]
    return [[k, _num(v)] for k, v in ident.items()]


def _effect_rows(effects: dict) -> list[list[str]]:
    return [
        [f"{t:.2f}", f"{c:.2%}", f"{d:.2%}"]
        for t, c, d in zip(effects["t"], effects["caption"], effects["dino"])
    ]


def _caught(e: dict) -> str:
    if e["caught"] is None:
        return "not computed"
    if not e["caught"]:
        return "NOT caught"
    return "caught" if e.get("intact_pass") else "fails, as the intact model does"


def _self_test_rows(st: dict) -> list[list[str]]:
    return [
        [e["fault"], e["what"], e["target"], _num(e["target_value"]), _caught(e), e["decision"]]
        for e in st["faults"].values()
    ]


def _decision_blocks(result: dict, final: bool) -> list[tuple]:
    """The title, the decision with what failed or is missing, how to read it, and the criteria table."""
    title = "Final report" if final else f"Validation at step {result['step']}"
    failed = ", ".join(result["failed"]) or "none"
    missing = ", ".join(result["not_computed"]) or "none"
    out: list[tuple] = [
        ("h1", f"{title}: {result['decision']}"),
        (
            "p",
            f"Decision **{result['decision']}** at step {result['step']} ({result['data']} data). Failed: {failed}. Not computed: {missing}.",
        ),
        (
            "p",
            "GO needs every required criterion computed and passing; NO-GO: a criterion failed; INCOMPLETE: "
            "none failed but a required one could not be computed (or the self-test showed no power).",
        ),
    ]
    for line in decision_summary(result):
        out.append(("p", f"**{line}**" if line.startswith(("WARNING", "the decision")) else line))
    headers = ["criterion", "value", "passed / interval", "threshold", "verdict", "what / why"]
    out.append(("table", headers, _criteria_rows(result)))
    return out


def _self_test_blocks(st: dict | None) -> list[tuple]:
    if not st:
        return []
    return [
        ("h2", "Self-test: planted faults"),
        (
            "p",
            "The same cases with a fault planted in the trained weights; each must fail the criterion it "
            "targets, or these tests could not catch that fault on this run.",
        ),
        ("table", ["fault", "what", "target", "target value", "verdict", "decision"], _self_test_rows(st)),
    ]


def _effect_blocks(effects: dict | None, files: dict[str, str]) -> list[tuple]:
    if not (effects and effects.get("caption")):
        return []
    out: list[tuple] = [
        ("h2", "How much each condition moves the prediction"),
        (
            "p",
            "On the reconstruction cases at x_t = (1-t) x0 + t eps: the relative change of v when the caption "
            "(or the DINO) is replaced by its learned null. 0 at every t: the model ignores that condition.",
        ),
    ]
    if "effects" in files:
        out.append(("img", files["effects"], "condition effect"))
    out.append(("table", ["t", "caption", "DINO"], _effect_rows(effects)))
    return out


def _number_blocks(result: dict) -> list[tuple]:
    """The numbers, how the samples were drawn, and what decoded and scored them."""
    s = result["sampling"]
    nums = [[k, _num(v)] for k, v in result["numbers"].items() if k != "counts"]
    out: list[tuple] = [
        ("h2", "Numbers"),
        ("table", ["number", "value"], nums),
        (
            "p",
            f"Sampling: EMA weights, {s['steps']} Euler steps (schedule shift {s.get('shift', 1.0):g}), guidance "
            f"DINO {s['guidance_dino']:g} / text {s['guidance_text']:g}, seed {s['seed']}, {s['samples_per_test']} "
            f"samples per test, {s['sampler_calls']} sampler call(s), precision {s['precision']}, {s['device']}: "
            f"{s['seconds']:.2f} s sampling, {result['seconds']:.2f} s in all.",
        ),
    ]
    dec = result["decoder"]
    if "why" in dec:
        out.append(("p", f"Images cannot be decoded: {dec['why']}. How to provide: {dec['how']}."))
    else:
        out.append(("p", "Decoder: " + ", ".join(f"{k} {v}" for k, v in dec.items())))
    lp = result["lpips"]
    if "why" in lp:
        out.append(("p", f"LPIPS not computed: {lp['why']}. How to provide: {lp['how']}."))
    else:
        out.append(("p", f"LPIPS: net {lp['net']}, backbone {lp['backbone']} ({lp['source']})."))
    return out


def _history_and_loss_blocks(result: dict, files: dict[str, str], history: list[dict] | None) -> list[tuple]:
    out: list[tuple] = []
    if history:
        names = list(result["criteria"])
        rows = [[str(h["step"]), h["decision"]] + [_num(h["values"].get(n)) for n in names] for h in history]
        out += [("h2", "History"), ("table", ["step", "decision"] + names, rows)]
    if "loss" in files:
        out += [("h2", "Training loss"), ("img", files["loss"], "training loss")]
    if "loss_bins" in files:
        out.append(("p", "Training loss per t bin (1 = noise): where in t the model has not fit its data."))
        out.append(("img", files["loss_bins"], "training loss per t bin"))
    return out


def _case_blocks(result: dict, files: dict[str, str]) -> list[tuple]:
    out: list[tuple] = []
    for test in ("recon", "dino_swap", "text_manip"):
        out.append(("h2", TITLES[test]))
        if test in files:
            out.append(("img", files[test], TITLES[test]))
        out.append(("table", CASE_HEADERS[test], _case_rows(result, test)))
    return out


def blocks(result: dict, files: dict[str, str], history: list[dict] | None, final: bool) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", file, alt)."""
    return [
        *_decision_blocks(result, final),
        *_self_test_blocks(result.get("self_test")),
        ("h2", "Run"),
        ("table", ["", ""], _identity_rows(result)),
        *_effect_blocks(result.get("effects"), files),
        *_number_blocks(result),
        *_history_and_loss_blocks(result, files, history),
        *_case_blocks(result, files),
    ]


def decision_lines(result: dict, path: str | Path) -> list[str]:
    """What ``train`` and ``validate`` print last: the decision once, then each reason on its own line."""
    return [f"decision: {result['decision']}  (report: {Path(path) / 'report.html'})"] + [
        f"  {line}" for line in decision_summary(result)
    ]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(bl: list[tuple]) -> str:
    lines = []
    for b in bl:
        if b[0] == "h1":
            lines += [f"# {b[1]}", ""]
        elif b[0] == "h2":
            lines += [f"## {b[1]}", ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
        elif b[0] == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
            lines.append("")
    return "\n".join(lines)


VERDICT_STYLE = {
    "pass": "color:#1a7f37;font-weight:bold",
    "caught": "color:#1a7f37;font-weight:bold",
    "GO": "color:#1a7f37;font-weight:bold",
    "FAIL": "color:#cf222e;font-weight:bold",
    "NOT caught": "color:#cf222e;font-weight:bold",
    "NO-GO": "color:#cf222e;font-weight:bold",
    "not computed": "color:#9a6700;font-weight:bold",
    "INCOMPLETE": "color:#9a6700;font-weight:bold",
}


def _td(text: str) -> str:
    style = VERDICT_STYLE.get(str(text))
    return f'<td style="{style}">' if style else "<td>"


def _html_text(text: str) -> str:
    parts = html.escape(str(text)).split("**")  # **bold** -> <b>bold</b>
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(bl: list[tuple], folder: Path) -> str:
    """Self-contained HTML: every image is embedded as a base64 data URI, no external file or script."""
    body = []
    for b in bl:
        if b[0] == "h1":
            word = b[1].rsplit(": ", 1)[-1]
            style = f' style="{VERDICT_STYLE[word]}"' if word in VERDICT_STYLE else ""
            body.append(f"<h1{style}>{_html_text(b[1])}</h1>")
        elif b[0] == "h2":
            body.append(f"<h2>{_html_text(b[1])}</h2>")
        elif b[0] == "p":
            body.append(f"<p>{_html_text(b[1])}</p>")
        elif b[0] == "img":
            data = base64.b64encode((folder / b[1]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>')
        elif b[0] == "table":
            head = "".join(f"<th>{_html_text(h)}</th>" for h in b[1])
            rows = "".join(
                "<tr>" + "".join(f"{_td(c)}{_html_text(c)}</td>" for c in row) + "</tr>" for row in b[2]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "vertical-align:top}img{max-width:100%}"
    )
    title = html.escape(bl[0][1]) if bl else "report"
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>'
        f"<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    out_dir: str | Path,
    result: dict,
    images: dict[str, list] | None,
    history: list[dict] | None = None,
    final: bool = False,
) -> Path:
    """Write scores.json, the grids (when ``images``; else existing PNGs in the folder are reused), loss.png,
    report.md and report.html into ``out_dir``. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(clean(result), indent=2, allow_nan=False))
    files: dict[str, str] = {}
    for test, name in GRID_FILES.items():
        if images is not None and images.get(test):
            # zlib level 1 (fast, larger files): the grids are written at every validation
            grid(images[test], GRID_HEADERS[test]).save(out / name, compress_level=1)
        if (out / name).is_file():
            files[test] = name
    note = None
    try:
        if loss_curve(result.get("loss_curve", []), out / "loss.png", result):
            files["loss"] = "loss.png"
        if loss_bins_curve(result.get("loss_bins") or {}, out / "loss_t.png"):
            files["loss_bins"] = "loss_t.png"
        if effects_curve(result.get("effects"), out / "effects.png"):
            files["effects"] = "effects.png"
    except ImportError:  # matplotlib is in the validation extra; the numbers stand without the plots
        note = "Plots are left out: matplotlib is not installed (pip install 'nanodit[validation]')."
    bl = blocks(result, files, history, final)
    if note:
        bl.insert(1, ("p", note))
    (out / "report.md").write_text(to_markdown(bl))
    (out / "report.html").write_text(to_html(bl, out))
    return out


def history(val_dir: Path) -> list[dict]:
    """Decision and criterion values of every ``step-*/scores.json`` under ``val_dir``, by step."""
    rows = []
    for p in sorted(Path(val_dir).glob("step-*/scores.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append(
            {
                "step": s["step"],
                "decision": s["decision"],
                "values": {k: c["value"] for k, c in s["criteria"].items()},
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# TensorBoard (through the trainer's MetricsLogger)


def log_metrics(metrics, step: int, result: dict, out_dir: Path) -> None:
    """Scores as ``val/*`` scalars (metrics.jsonl and TensorBoard), grids as images, the decision as text."""
    log_scores(metrics, step, result)
    log_media(metrics, step, result, out_dir)


def log_scores(metrics, step: int, result: dict) -> None:
    """Scores as ``val/*`` scalars (metrics.jsonl and TensorBoard)."""
    row = {
        f"val/{k}": v for k, v in result["numbers"].items() if isinstance(v, (int, float)) and v is not None
    }
    for name, c in result["criteria"].items():
        if c["computed"]:
            row[f"val/{name}"] = c["value"]
    row["val/go"] = 1.0 if result["decision"] == "GO" else 0.0
    metrics.log(step, row)


def log_media(metrics, step: int, result: dict, out_dir: Path) -> None:
    """The grids (``out_dir``'s PNGs) and the decision text to TensorBoard, when the run writes it."""
    media = getattr(metrics, "media", None)  # MetricsLogger.media: a writer apart from the scalars'
    tb = media() if callable(media) else getattr(metrics, "tb", None)
    if tb is None:
        return
    for test, name in GRID_FILES.items():
        if (out_dir / name).is_file():
            tb_png(tb, f"val/{test}", out_dir / name, step)
    tb.add_text("val/decision", to_markdown(blocks(result, {}, None, False)[:4]), step)
    tb.flush()


def tb_png(tb, tag: str, path: Path, step: int) -> None:
    """A PNG file as a TensorBoard image, its bytes as they are (``add_image`` would decode and encode it again:
    ~0.7 s per grid, every validation)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    with Image.open(path) as im:
        width, height = im.size
        channels = len(im.getbands())
    image = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=path.read_bytes()
    )
    tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
