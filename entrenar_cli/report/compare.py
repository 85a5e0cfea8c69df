"""Side-by-side numbers of the KD student and the CE-only baseline, and the verdict line.

The verdict is decided on held-out perplexity alone (lower is better; a tie is not a win): it is
the number both students are trained to improve, and the one the issue's evidence is stated in.
Agreement with the teacher and KL to the teacher are shown next to it.
"""

from __future__ import annotations

import math
from typing import Any

from entrenar_cli.report.runlog import RunLog, number

# (key, label, which direction is better)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("perplexity", "held-out perplexity", "lower"),
    ("agreement", "agreement with the teacher", "higher"),
    ("kl_to_teacher", "KL to the teacher", "lower"),
)


def compare_with_baseline(kd_summary: dict[str, Any], baseline_summary: dict[str, Any]) -> dict[str, Any]:
    """Compare a distillation run's summary with its CE-only baseline.

    ``kd_summary`` is the KD run's ``summary.json``; ``baseline_summary`` is either the baseline
    run's ``summary.json`` (its ``student`` entry is used) or the short ``{"perplexity": ...,
    "agreement": ...}`` dict the KD summary keeps under ``baseline``. Returns::

        {"kd": {...}, "baseline": {...},            # perplexity, agreement, kl_to_teacher, steps
         "rows": [{"metric", "label", "better", "kd", "baseline", "ratio", "kd_better"}, ...],
         "kd_beats_baseline": True | False | None,  # None: perplexity missing on either side
         "verdict": "KD student beats the CE-only baseline: held-out perplexity 120.5 vs 132.0 (0.91x); ..."}
    """
    kd = _student_numbers(kd_summary)
    base = _student_numbers(baseline_summary)
    rows = []
    for key, label, better in METRICS:
        pair = _both(kd.get(key), base.get(key))
        ratio = kd_better = None
        if pair is not None:
            a, b = pair
            ratio = a / b if b != 0 else None
            kd_better = a < b if better == "lower" else a > b
        rows.append({"metric": key, "label": label, "better": better, "kd": kd.get(key), "baseline": base.get(key),
                     "ratio": ratio, "kd_better": kd_better})
    return {"kd": kd, "baseline": base, "rows": rows, "kd_beats_baseline": _decide(kd, base),
            "verdict": _verdict(kd, base, rows)}


def compare_runs(run: RunLog, baseline: RunLog | None) -> dict[str, Any] | None:
    """:func:`compare_with_baseline` for a run directory: None when it has no baseline. Runs
    that have not finished are compared on their latest evaluation."""
    if baseline is None and not isinstance(run.summary.get("baseline"), dict):
        return None
    student, _ = run.final_student()
    kd_side = {"student": student, "steps": run.summary.get("steps", run.last_step)}
    base_steps = None
    if baseline is not None:
        base_steps = baseline.summary.get("steps", baseline.last_step)
    result = compare_with_baseline(kd_side, {"student": baseline_numbers(run, baseline), "steps": base_steps})
    result["equal_wall_time"] = equal_wall_time(run, baseline) if baseline is not None else None
    return result


def equal_wall_time(run: RunLog, baseline: RunLog) -> dict[str, float] | None:
    """Both students after the same training time, which is what a user with a time budget compares.

    The run that finished first sets the time; the other's step at that time comes from its train
    records (``elapsed_s``), and its held-out perplexity there is interpolated log-linearly between
    its evaluations (the KD run's pre-training evaluation is step 0 of both: they start from the
    same student). None when a run lacks the records.
    """
    before = number((run.summary.get("student_before") or {}).get("perplexity"))
    sides = []
    for log in (run, baseline):
        steps, times = log.series("elapsed_s")
        eval_steps, ppl = log.series("perplexity", "eval")
        curve = dict(zip(eval_steps, ppl))
        if before is not None:
            curve.setdefault(0.0, before)
        if not times or not curve:
            return None
        sides.append(([0.0, *steps], [0.0, *times], curve))
    seconds = min(sides[0][1][-1], sides[1][1][-1])
    at = []
    for steps, times, curve in sides:
        step = _interp(times, steps, seconds)
        ppl = interpolate_perplexity(curve, step)
        if ppl is None:
            return None
        at.append((step, ppl))
    (kd_step, kd_ppl), (base_step, base_ppl) = at
    return {"seconds": seconds, "kd_steps": kd_step, "baseline_steps": base_step, "kd_perplexity": kd_ppl,
            "baseline_perplexity": base_ppl, "ratio": kd_ppl / base_ppl if base_ppl else math.nan}


def equal_time_line(eq: dict[str, float] | None) -> str:
    """The equal-wall-time sentence of the verdict ("" without the numbers)."""
    if not eq:
        return ""
    who = "beats" if eq["kd_perplexity"] < eq["baseline_perplexity"] else "does NOT beat"
    return (f"at equal wall time ({eq['seconds']:.0f} s of training: KD step {eq['kd_steps']:.0f}, CE-only step "
            f"{eq['baseline_steps']:.0f}) the KD student {who} the baseline: held-out perplexity "
            f"{fmt_perplexity(eq['kd_perplexity'])} vs {fmt_perplexity(eq['baseline_perplexity'])} "
            f"({eq['ratio']:.2f}x)")


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) over increasing xs, clamped to the ends."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 1.0)
    return ys[-1]


def interpolate_perplexity(curve: dict[float, float], step: float) -> float | None:
    """Log-linear interpolation of a perplexity curve; None outside the evaluated steps."""
    pts = sorted(curve.items())
    for (s0, p0), (s1, p1) in zip(pts, pts[1:]):
        if s0 <= step <= s1 and p0 > 0 and p1 > 0:
            w = (step - s0) / (s1 - s0)
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    if pts and abs(step - pts[-1][0]) < 1e-6:
        return pts[-1][1]
    return None


def baseline_numbers(run: RunLog, baseline: RunLog | None) -> dict[str, Any]:
    """The CE-only student's final numbers: the baseline run's own (baseline/summary.json, else its
    latest evaluation) over the copy the KD summary keeps under ``baseline``."""
    numbers: dict[str, Any] = {}
    short = run.summary.get("baseline")
    if isinstance(short, dict):
        numbers.update(short)
    if baseline is not None:
        numbers.update(baseline.final_student()[0])
    return numbers


def _student_numbers(summary: dict[str, Any]) -> dict[str, float | None]:
    summary = summary if isinstance(summary, dict) else {}
    student = summary.get("student")
    source = student if isinstance(student, dict) else summary
    out: dict[str, float | None] = {key: number(source.get(key)) for key, _, _ in METRICS}
    out["steps"] = number(summary.get("steps"))
    return out


def _usable(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def _both(a: float | None, b: float | None) -> tuple[float, float] | None:
    """(a, b) when both are numbers (infinity counts: a diverged run loses), else None."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return a, b


def _decide(kd: dict[str, float | None], base: dict[str, float | None]) -> bool | None:
    """Whether the KD student's held-out perplexity is lower; None when either is missing."""
    pair = _both(kd.get("perplexity"), base.get("perplexity"))
    return None if pair is None else pair[0] < pair[1]


def _verdict(kd: dict[str, float | None], base: dict[str, float | None], rows: list[dict[str, Any]]) -> str:
    beats = _decide(kd, base)
    ppl = rows[0]
    if beats is None:
        sides = (("the KD student", ppl["kd"]), ("the baseline", ppl["baseline"]))
        missing = [who for who, x in sides if not _usable(x)]
        return ("cannot compare the KD student with the CE-only baseline: held-out perplexity is missing for "
                + " and ".join(missing))
    head = "KD student beats the CE-only baseline" if beats else "KD student does NOT beat the CE-only baseline"
    text = f"{head}: held-out perplexity {fmt_perplexity(ppl['kd'])} vs {fmt_perplexity(ppl['baseline'])}"
    if ppl["ratio"] is not None and math.isfinite(ppl["ratio"]):
        text += f" ({ppl['ratio']:.2f}x)"
    agreement = rows[1]
    if _usable(agreement["kd"]) and _usable(agreement["baseline"]):
        text += f"; agreement with the teacher {fmt_fraction(agreement['kd'])} vs {fmt_fraction(agreement['baseline'])}"
    a_steps, b_steps = kd.get("steps"), base.get("steps")
    if a_steps is not None and b_steps is not None and a_steps != b_steps:
        text += f" (unequal steps: {a_steps:g} vs {b_steps:g})"
    return text


def fmt_perplexity(x: float | None) -> str:
    """121.3, 6.93, 1.2e+04; 'n/a' when missing."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10000:
        return f"{x:.3g}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def fmt_fraction(x: float | None) -> str:
    """A 0..1 fraction as a percentage: 0.451 -> '45.1%'."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return f"{100 * x:.1f}%"
