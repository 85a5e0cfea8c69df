"""The report's charts as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot).

matplotlib is optional: :func:`load_matplotlib` returns None when it is not installed and the
report shows tables instead. pyplot is never imported, so drawing a report inside a training
process (or a notebook) does not change anyone's global backend.
"""

from __future__ import annotations

import io
import math
from typing import Any

from entrenar_cli.report.runlog import RunLog, finite

KD_COLOR = "#1f77b4"
BASELINE_COLOR = "#ff7f0e"
TEACHER_COLOR = "#555555"
DPI = 100
SMOOTH_FROM = 200  # points; fewer are drawn as they are

LOSS_TITLES = {
    "loss": "total loss",
    "loss_kd": "loss_kd: KL to the teacher's soft targets",
    "loss_ce": "loss_ce: cross-entropy on the labels",
    "loss_hidden": "loss_hidden: hidden-state matching",
    "loss_attn": "loss_attn: attention transfer",
}


def load_matplotlib() -> Any | None:
    """The matplotlib module when it can be imported, else None."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return None
    return matplotlib


def ce_term(log: RunLog) -> str | None:
    """The train key comparable with a CE-only run's loss: loss_ce for KD, loss for fine-tuning."""
    terms = log.loss_terms()
    if "loss_ce" in terms:
        return "loss_ce"
    if log.kind != "distill" and "loss" in terms:
        return "loss"
    return None


def loss_figure(log: RunLog, baseline: RunLog | None) -> bytes | None:
    """One panel per loss term; the CE-only baseline's loss is drawn on the cross-entropy panel."""
    terms = log.loss_terms()
    if not terms:
        return None
    fig, axes = _grid(len(terms), ncols=2 if len(terms) == 4 else 3)
    ce_key = ce_term(log)
    for ax, key in zip(axes, terms):
        xs, ys = log.series("eval_loss", "eval") if key == ce_key else ([], [])
        # a legend only where a panel holds more than one curve: the title names the term
        label = "KD student" if baseline is not None else "train" if xs else None
        _smoothed(ax, *log.series(key), KD_COLOR, label)
        if key == ce_key:
            if xs:
                ax.plot(xs, ys, "o", color=KD_COLOR, ms=4, mfc="white", label="held-out (eval_loss)")
            if baseline is not None:
                _smoothed(ax, *baseline.series("loss"), BASELINE_COLOR, "CE-only baseline")
                bx, by = baseline.series("eval_loss", "eval")
                if bx:
                    ax.plot(bx, by, "s", color=BASELINE_COLOR, ms=4, mfc="white", label="baseline held-out")
        ax.set_title(LOSS_TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("step")
        _finish(ax)
    return _png(fig)


def eval_figure(log: RunLog, baseline: RunLog | None) -> bytes | None:
    """Held-out perplexity, KL to the teacher and agreement over steps (baseline alongside)."""
    panels = [k for k in ("perplexity", "kl_to_teacher", "agreement")
              if log.has(k, "eval") or (baseline is not None and baseline.has(k, "eval"))]
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=len(panels))
    titles = {"perplexity": "held-out perplexity", "kl_to_teacher": "KL to the teacher",
              "agreement": "top-1 agreement with the teacher"}
    for ax, key in zip(axes, panels):
        label = "KD student" if baseline is not None else "student" if key == "perplexity" else None
        _markers(ax, *log.series(key, "eval"), KD_COLOR, label)
        if baseline is not None:
            _markers(ax, *baseline.series(key, "eval"), BASELINE_COLOR, "CE-only baseline")
        if key == "perplexity":
            _, teacher = log.series("teacher_perplexity", "eval")
            teacher_ppl = next((t for t in reversed(teacher) if math.isfinite(t)), None)
            if teacher_ppl is None:
                teacher_ppl = finite((log.summary.get("teacher") or {}).get("perplexity"))
            if teacher_ppl is not None:
                ax.axhline(teacher_ppl, color=TEACHER_COLOR, ls="--", lw=1, label=f"teacher ({teacher_ppl:.3g})")
            values = [y for _, y in _points(ax) if y > 0 and math.isfinite(y)]
            if values and max(values) / min(values) > 20:
                ax.set_yscale("log")
        if key == "agreement":
            ax.yaxis.set_major_formatter(_percent_formatter())
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("step")
        _finish(ax, "lower right" if key == "agreement" else "upper right")
    return _png(fig)


def system_figure(log: RunLog, baseline: RunLog | None) -> bytes | None:
    """Learning rate, gradient norm, throughput and memory (peak against the estimate)."""
    estimate = finite(log.summary.get("estimated_mem_bytes"))
    panels = [k for k in ("lr", "grad_norm", "tokens_per_s", "peak_mem_bytes") if log.has(k)]
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=min(len(panels), 4))
    titles = {"lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "throughput (tokens/s)",
              "peak_mem_bytes": "peak memory (GiB)"}
    for ax, key in zip(axes, panels):
        xs, ys = log.series(key)
        if key == "peak_mem_bytes":
            ys = [y / 2**30 for y in ys]
        label = None  # a legend only where a panel holds more than one curve
        if key in ("tokens_per_s", "peak_mem_bytes") and baseline is not None and baseline.has(key):
            bx, by = baseline.series(key)
            if key == "peak_mem_bytes":
                by = [y / 2**30 for y in by]
            ax.plot(bx, by, color=BASELINE_COLOR, lw=1.2, label="CE-only baseline")
            label = "KD student"
        if key == "peak_mem_bytes" and estimate is not None and label is None:
            label = "peak"
        ax.plot(xs, ys, color=KD_COLOR, lw=1.4, label=label)
        if key == "peak_mem_bytes" and estimate is not None:
            ax.axhline(estimate / 2**30, color=TEACHER_COLOR, ls="--", lw=1, label="estimate")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:  # these read best against zero (peak vs estimate at a glance), with headroom
            top = ax.get_ylim()[1]
            if math.isfinite(top) and top > 0:
                ax.set_ylim(0, top * 1.08)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("step")
        _finish(ax, "lower right")  # drawn from zero: the bottom is where the curves are not
    return _png(fig)


def _grid(n: int, ncols: int) -> tuple[Any, list[Any]]:
    """A figure with ``n`` axes in rows of ``ncols``. Margins are fixed in inches rather than
    computed by a layout engine: constrained layout doubled the drawing time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    width, height = min(4.4 * ncols, 13.2), 3.1 * nrows
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.4 / height,
                        wspace=1.0 / (width / ncols - 1.0), hspace=0.95 / (height / nrows - 0.95))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _smoothed(ax: Any, xs: list[float], ys: list[float], color: str, label: str | None) -> None:
    """The curve; with many points, the raw values faintly and an exponential moving average
    (about 1/50 of the run wide, debiased at the start like TensorBoard's) over them."""
    if not xs:
        return
    if len(xs) < SMOOTH_FROM:
        ax.plot(xs, ys, color=color, lw=1.4, marker="." if len(xs) < 3 else None, label=label)
        return
    ax.plot(xs, ys, color=color, lw=0.8, alpha=0.3)
    weight = 1 - 50 / len(xs)
    smooth, avg, norm = [], 0.0, 0.0
    for y in ys:
        if not math.isfinite(y):  # a non-finite loss restarts the average instead of poisoning it
            avg, norm = 0.0, 0.0
            smooth.append(y)
            continue
        avg = weight * avg + (1 - weight) * y
        norm = weight * norm + (1 - weight)
        smooth.append(avg / norm)
    ax.plot(xs, smooth, color=color, lw=1.6, label=f"{label} (smoothed)" if label else "smoothed")


def _markers(ax: Any, xs: list[float], ys: list[float], color: str, label: str | None) -> None:
    if xs:
        ax.plot(xs, ys, color=color, lw=1.4, marker="o", ms=4, label=label)


def _points(ax: Any) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())]


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def _finish(ax: Any, legend: str = "upper right") -> None:
    ax.grid(True, alpha=0.3)
    if any(not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize=8, loc=legend)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
