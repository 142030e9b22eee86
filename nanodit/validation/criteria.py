"""The GO / NO-GO / INCOMPLETE decision: criteria from the numbers, the decision, and a diagnosis sentence
for every criterion that failed or could not be computed.

    crit = build_criteria(numbers, vcfg, loss, shapes, tools, effects, loss_bins)
    decide(crit)   # {"decision": "NO-GO", "failed": ["text_manip"], "not_computed": []}

A criterion is a plain dict (it goes to scores.json as is): name, description, value, threshold, op ("<" or
">="), computed, pass, required; pass rates also carry ``passed``/``n`` and their 95% Wilson interval
``ci95``; a criterion that cannot be computed says ``why`` and ``how to provide``; a failed or missing one
carries ``diagnosis``, one sentence with the numbers that explain it.

The outcomes: NO-GO when any computed criterion fails (a failure is conclusive whatever else is missing);
INCOMPLETE when none fails but a required one could not be computed; GO when every required criterion is
computed and passes. On the shapes world reconstruction is judged by the exact scorer and PSNR, and LPIPS
counts only when its backbone weights are on the machine (so a GO needs no downloaded weights); on real data
LPIPS is required.
"""

from __future__ import annotations

import math

from nanodit.config import ValConfig
from nanodit.validation.metrics import wilson
from nanodit.validation.tools import Tools

# a condition that moves the prediction by less than this (relative, at every t) has no effect on it: the
# intact nano model moves it by tens of percent at high t, a cut path by exactly 0
NO_EFFECT = 0.01


def criterion(
    name: str, value: float, threshold: float, op: str, description: str, required: bool = True, **extra
) -> dict:
    """A computed criterion: passes when ``value op threshold`` (op is "<" or ">=")."""
    if op not in ("<", ">="):
        raise ValueError(f"criterion {name}: op={op!r} is not '<' or '>='")
    if value is None or not math.isfinite(value):
        raise ValueError(f"criterion {name}: value={value!r} is not a finite number (use not_computed)")
    ok = value < threshold if op == "<" else value >= threshold
    return {
        "name": name,
        "description": description,
        "value": float(value),
        "threshold": float(threshold),
        "op": op,
        "computed": True,
        "pass": bool(ok),
        "required": required,
        **extra,
    }


def not_computed(
    name: str, threshold: float, op: str, description: str, why: str, how: str, required: bool = True, **extra
) -> dict:
    """A criterion that could not be computed: no value, no pass; it says why and how to provide what is missing."""
    return {
        "name": name,
        "description": description,
        "value": None,
        "threshold": float(threshold),
        "op": op,
        "computed": False,
        "pass": None,
        "required": required,
        "why": why,
        "how to provide": how,
        **extra,
    }


def rate_criterion(
    name: str, counts: list[int] | None, threshold: float, description: str, why: str, how: str
) -> dict:
    """A pass-rate criterion from [passed, scored], with its 95% Wilson interval; not computed without cases."""
    if not counts or counts[1] == 0:
        return not_computed(name, threshold, ">=", description, why=why, how=how)
    k, n = counts
    lo, hi = wilson(k, n)
    return criterion(name, k / n, threshold, ">=", description, passed=k, n=n, ci95=[lo, hi])


def decide(criteria: list[dict]) -> dict:
    """NO-GO if a computed criterion fails; else INCOMPLETE if a required one is not computed; else GO
    (there must be at least one criterion)."""
    failed = [c["name"] for c in criteria if c["computed"] and not c["pass"]]
    missing = [c["name"] for c in criteria if not c["computed"] and c.get("required", True)]
    if failed:
        decision = "NO-GO"
    elif missing or not criteria:
        decision = "INCOMPLETE"
    else:
        decision = "GO"
    return {"decision": decision, "failed": failed, "not_computed": missing}


# ---------------------------------------------------------------------------------------------
# the criteria


def build_criteria(
    numbers: dict,
    vcfg: ValConfig,
    loss: dict,
    shapes: bool,
    tools: Tools,
    effects: dict | None = None,
    loss_bins: dict | None = None,
) -> list[dict]:
    """The criteria with their values, or the reason they cannot be computed, each failed or missing one
    with its diagnosis."""
    counts = numbers.get("counts", {})
    crit = [_loss_criterion(loss, vcfg)]
    crit.append(_lpips_criterion(numbers, vcfg, shapes, tools))
    if shapes:
        crit.append(
            rate_criterion(
                "recon_scorer",
                counts.get("recon_scorer"),
                vcfg.min_recon,
                "reconstruction read back by the shapes scorer (objects with size and side, lighting): pass rate",
                why="no reconstruction samples",
                how="check val.samples",
            )
        )
        d = "reconstruction PSNR, dB (mean over the reconstruction samples)"
        if numbers.get("psnr") is not None:
            crit.append(criterion("psnr", numbers["psnr"], vcfg.min_psnr, ">=", d))
        else:
            crit.append(
                not_computed(
                    "psnr", vcfg.min_psnr, ">=", d, why="no reconstruction samples", how="check val.samples"
                )
            )
    for name, thr, d in (
        ("dino_swap", vcfg.min_dino_swap, "DINO swap (text of A + DINO of B): pass rate"),
        ("text_manip", vcfg.min_text_manip, "text manipulation (left<->right swapped caption): pass rate"),
    ):
        why, how = _why_not(name, numbers, shapes, tools)
        crit.append(rate_criterion(name, counts.get(name), thr, d, why=why, how=how))
    for c in crit:
        if not c["computed"] and c.get("required", True):
            c["diagnosis"] = f"not computed: {c['why']} ({c['how to provide']})"
        elif c["computed"] and not c["pass"]:
            c["diagnosis"] = diagnose(c, numbers, effects, loss_bins)
    return crit


def _loss_criterion(loss: dict, vcfg: ValConfig) -> dict:
    d = "training loss: final / initial (smoothed over val.loss_window logged points)"
    if loss.get("value") is not None:
        extra = {k: loss[k] for k in ("initial", "final", "window", "points")}
        return criterion("loss_ratio", loss["value"], vcfg.max_loss_ratio, "<", d, **extra)
    return not_computed(
        "loss_ratio",
        vcfg.max_loss_ratio,
        "<",
        d,
        why=f"metrics.jsonl holds {loss.get('points', 0)} logged losses (needs >= 2)",
        how="train longer than 2 x train.log_every steps, with the run folder's metrics.jsonl kept",
    )


def _lpips_criterion(numbers: dict, vcfg: ValConfig, shapes: bool, tools: Tools) -> dict:
    # shapes: the scorer and PSNR judge reconstruction exactly; LPIPS counts when it can be computed
    d = "reconstruction LPIPS (mean over the reconstruction samples)"
    required = not shapes
    if numbers.get("lpips") is not None:
        return criterion("lpips", numbers["lpips"], vcfg.max_lpips, "<", d, required=required)
    if tools.decoder is None:
        why, how = tools.decoder_info.get("why", ""), tools.decoder_info.get("how", "")
    else:
        why = tools.lpips_info.get("why", "no reconstruction samples")
        how = tools.lpips_info.get("how", "check val.samples")
    return not_computed("lpips", vcfg.max_lpips, "<", d, why=why, how=how, required=required)


def _why_not(name: str, numbers: dict, shapes: bool, tools: Tools) -> tuple[str, str]:
    if not numbers.get(f"{name}_samples"):
        if name == "dino_swap":
            return "no bucket holds two samples to swap (shapes: no telling pair)", "more samples per bucket"
        return (
            "no sample carries a swapped caption and flipped latent (t5_flip.npy, latent_flip.npy)",
            "shards with the *_flip keys",
        )
    if tools.decoder is None:
        return tools.decoder_info.get("why", ""), tools.decoder_info.get("how", "")
    if name == "dino_swap" and not shapes:
        info = tools.dino_info or {}
        return info.get("why", "no DINOv3 embedder"), info.get("how", "set val.dino")
    if name == "text_manip" and not shapes:
        return "LPIPS is not available: " + tools.lpips_info.get("why", ""), tools.lpips_info.get("how", "")
    return "nothing scored", "check the data"


# ---------------------------------------------------------------------------------------------
# diagnosis: one sentence with numbers per failed criterion


def _frac(counts: dict, name: str) -> str:
    k, n = counts.get(name, (0, 0))
    return f"{k}/{n}"


def _rate_text(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{c['passed']}/{c['n']} passed (95% CI {lo:.0%}-{hi:.0%}; needs {c['threshold']:.0%})"


def _peak(effects: dict | None, key: str) -> tuple[float, float] | None:
    """(largest effect, the t where it is) of ``effects[key]``."""
    if not effects or not effects.get(key):
        return None
    vals = effects[key]
    i = max(range(len(vals)), key=lambda j: vals[j])
    return vals[i], effects["t"][i]


def effect_text(effects: dict | None, key: str, what: str) -> str:
    p = _peak(effects, key)
    if p is None:
        return ""
    if p[0] < NO_EFFECT:
        return f"; the {what} has NO EFFECT on the prediction (at most {p[0]:.2%} at any t)"
    return f"; the {what} moves the prediction by at most {p[0]:.1%} (t = {p[1]:.2f})"


def _bins_text(loss_bins: dict | None) -> str:
    """The final training loss near the middle and near the noise end of t."""
    if not loss_bins or "t0.9" not in loss_bins:
        return ""
    hi = loss_bins["t0.9"][-1][1]
    mid = loss_bins.get("t0.5", loss_bins["t0.9"])[-1][1]
    return f"; the final training loss is {hi:.3g} at t in [0.9, 1) (near noise, where the layout is decided) against {mid:.3g} at t in [0.5, 0.6)"


def diagnose(c: dict, numbers: dict, effects: dict | None, loss_bins: dict | None) -> str:
    """Why ``c`` failed, in numbers and one sentence."""
    counts, name = numbers.get("counts", {}), c["name"]
    if name == "loss_ratio":
        return (
            f"the training loss fell only to {c['value']:.3g} of its initial value "
            f"({c['initial']:.3g} -> {c['final']:.3g}; needs < {c['threshold']:g}): the model has not fit its data"
            + _bins_text(loss_bins)
        )
    if name == "lpips":
        return f"mean reconstruction LPIPS {c['value']:.3f} (needs < {c['threshold']:g})"
    if name == "psnr":
        return f"mean reconstruction PSNR {c['value']:.1f} dB (needs >= {c['threshold']:g} dB)"
    if name == "recon_scorer":
        return (
            f"reconstruction {_rate_text(c)}: objects right in {_frac(counts, 'recon_objects')}, "
            f"lighting right in {_frac(counts, 'recon_lighting')}" + _bins_text(loss_bins)
        )
    if name == "dino_swap":
        parts = ""
        if "dino_swap_lighting_follows_b" in counts:
            parts = (
                f": lighting followed B's DINO in {_frac(counts, 'dino_swap_lighting_follows_b')}, "
                f"objects followed A's caption in {_frac(counts, 'dino_swap_objects_follow_a')}"
            )
        return f"DINO swap {_rate_text(c)}{parts}" + effect_text(effects, "dino", "DINO")
    if name == "text_manip":
        return (
            f"text manipulation {_rate_text(c)}: the objects sat where the swapped caption says in "
            f"{_frac(counts, 'text_manip')}" + effect_text(effects, "caption", "caption")
        )
    return f"{name} = {c['value']:.4g} (needs {c['op']} {c['threshold']:g})"


def warnings_for(effects: dict | None) -> list[str]:
    """Loud notes that hold whatever the decision: a condition with no effect on the prediction."""
    out = []
    for key, what in (("caption", "caption"), ("dino", "DINO")):
        p = _peak(effects, key)
        if p is not None and p[0] < NO_EFFECT:
            out.append(
                f"the {what} has no effect on the prediction: at every t it moves v by at most {p[0]:.2%} "
                f"(||v(cond) - v(no {what})|| / ||v||)"
            )
    return out
