"""The report as one self-contained HTML page: inline styles, charts as base64 data URIs, no
scripts, no external fonts, every piece of recorded text escaped."""

from __future__ import annotations

import base64
import datetime as dt
import math
from html import escape
from typing import Any

from entrenar_cli.fsutil import human_bytes
from entrenar_cli.report.compare import baseline_numbers, fmt_fraction, fmt_perplexity
from entrenar_cli.report.runlog import RunLog, finite, number

MAX_LOG_ROWS = 40  # training-log table rows (evenly sampled; the plots show every point)
MAX_EVAL_ROWS = 60

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
 max-width:1240px;padding:24px;color:#1d2330;background:#fff;line-height:1.45}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 10px;border-bottom:1px solid #dde1e8;
 padding-bottom:4px}
.meta{color:#5a6272;margin:0}.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;
 font-size:.85em;font-weight:600}
.completed{background:#2e7d32}.interrupted{background:#b26a00}.failed{background:#c62828}
.in-progress{background:#1565c0}.other{background:#5a6272}
.verdict{margin:16px 0;padding:12px 16px;border-radius:6px;font-size:1.1em;font-weight:600;border-left:6px solid}
.verdict.good{background:#e8f5e9;border-color:#2e7d32}.verdict.bad{background:#fdecea;border-color:#c62828}
.verdict.unknown{background:#f1f3f6;border-color:#5a6272}
.notes{background:#fff8e1;border:1px solid #ffe08a;border-radius:6px;padding:8px 12px 8px 28px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.92em}
th,td{border:1px solid #dde1e8;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#f1f3f6;white-space:normal;vertical-align:bottom}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
td .better{color:#2e7d32;font-weight:600}td .worse{color:#c62828}td.nonfinite{color:#c62828;font-weight:600}
.scroll{overflow-x:auto}
figure{margin:8px 0 16px}figure img{max-width:100%;height:auto;border:1px solid #eef0f4}
figcaption,.muted{color:#5a6272;font-size:.9em}
pre{background:#f6f8fa;border:1px solid #dde1e8;border-radius:6px;padding:12px;overflow-x:auto;font-size:.88em}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
footer{margin-top:32px;color:#8a92a2;font-size:.85em}
"""

LABELS = {
    "step": "step", "epoch": "epoch", "tokens": "tokens", "lr": "learning rate", "grad_norm": "grad norm",
    "tokens_per_s": "tokens/s", "peak_mem_bytes": "peak memory", "elapsed_s": "elapsed",
    "eval_loss": "eval loss", "perplexity": "perplexity", "kl_to_teacher": "KL to teacher",
    "agreement": "agreement", "teacher_perplexity": "teacher perplexity",
}


def fmt(key: str, value: Any) -> str:
    """A recorded value as text for a table cell, formatted by what the key measures."""
    x = number(value)
    if x is None:
        return "" if value is None else str(value)
    if not math.isfinite(x):
        return str(x)
    if key in ("step", "steps"):
        return f"{x:.0f}"
    if key == "epoch":
        return f"{x:.2f}"
    if key in ("tokens", "parameters", "trainable_parameters"):
        return _count(x) if key != "tokens" else f"{x:,.0f}"
    if key == "lr":
        return f"{x:.2e}"
    if key.endswith("_bytes"):
        return human_bytes(x)
    if key == "elapsed_s":
        return duration(x)
    if key == "tokens_per_s":
        return f"{x:,.1f}"
    if key.endswith("perplexity"):
        return fmt_perplexity(x)
    if key == "agreement":
        return fmt_fraction(x)
    return f"{x:#.4g}"


def duration(seconds: float) -> str:
    """'13m 23s', '2h 05m', '41.2s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f} {unit} ({x:,.0f})"
    return f"{x:,.0f}"


def render_page(
    log: RunLog,
    baseline: RunLog | None,
    comparison: dict[str, Any] | None,
    charts: dict[str, bytes],
    notes: list[str],
    *,
    no_charts_because: str | None,
    png_name: str | None,
    version: str,
    generated_at: float,
) -> str:
    """The whole report page. ``charts`` maps 'loss', 'eval', 'system' to PNG bytes. When there
    are no charts (``no_charts_because`` says why) the values they would show follow as tables;
    the summary, comparison, evaluation and memory tables are always shown."""
    tables_only = no_charts_because is not None
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>entrenar report: {escape(log.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        _header(log),
    ]
    if comparison is not None:
        beats = comparison.get("kd_beats_baseline")
        css = "good" if beats is True else "bad" if beats is False else "unknown"
        parts.append(f'<div class="verdict {css}" id="verdict">{escape(comparison["verdict"])}</div>')
        from entrenar_cli.report.compare import equal_time_line

        equal = equal_time_line(comparison.get("equal_wall_time"))
        if equal:
            parts.append(f'<p id="equal-wall-time">{escape(equal[0].upper() + equal[1:])}</p>')
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")

    parts.append(_section("summary", "Final summary", _summary_table(log, baseline)))
    if comparison is not None:
        parts.append(_section("baseline", "KD student vs CE-only baseline", _comparison_table(comparison)))

    if "loss" in charts:
        loss_body = _figure(charts["loss"], "Loss curves per loss term", _loss_caption(log, baseline, png_name))
    elif tables_only and log.loss_terms():
        loss_body = (f'<p class="muted">No charts: {escape(no_charts_because or "")}. '
                     "The recorded values follow as tables.</p>" + _train_table(log, log.loss_terms()))
        if baseline is not None and baseline.loss_terms():
            loss_body += "<h3>CE-only baseline</h3>" + _train_table(baseline, baseline.loss_terms())
    else:
        loss_body = '<p class="muted">No loss recorded yet.</p>'
    parts.append(_section("loss", "Loss curves", loss_body))

    eval_body = _figure(charts.get("eval"), "Held-out evaluation", None) if "eval" in charts else ""
    eval_body += _eval_table(log, baseline) if log.evals or (baseline and baseline.evals) else (
        '<p class="muted">No evaluation recorded yet.</p>')
    parts.append(_section("eval", "Evaluation over steps", eval_body))

    system_body = _figure(charts.get("system"), "Learning rate, gradient norm, throughput, memory",
                          None) if "system" in charts else ""
    system_body += _system_table(log, baseline)
    if tables_only and log.train:
        system_body += _train_table(log, ["lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "elapsed_s"])
    parts.append(_section("system", "Learning rate, throughput and memory", system_body))

    if log.train:
        shown = min(len(log.train), MAX_LOG_ROWS)
        parts.append(_section("log", "Training log", (
            f"<details{' open' if tables_only else ''}><summary>{shown} of {len(log.train)} logged steps</summary>"
            + _train_table(log, None) + "</details>")))
    config = log.config_text
    parts.append(_section("config", "Resolved config", f"<pre>{escape(config)}</pre>" if config else
                          '<p class="muted">No resolved config recorded.</p>'))
    parts.append(_section("outputs", "Outputs", _outputs(log, png_name)))
    when = dt.datetime.fromtimestamp(generated_at, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts.append(f"<footer>Generated by entrenar {escape(version)} on {when} from "
                 f"{escape(str(log.directory / 'metrics.jsonl'))}. Rebuild it with: "
                 f"<code>entrenar report {escape(str(log.directory))}</code></footer>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _header(log: RunLog) -> str:
    status = log.status
    css = status if status in ("completed", "interrupted", "failed") else (
        "in-progress" if status == "in progress" else "other")
    bits = [escape(log.kind or "run"), f'<span class="badge {css}">{escape(status)}</span>']
    steps = log.last_step
    if steps is not None:
        bits.append(f"{steps} steps")
    tokens = number(log.summary.get("tokens"))
    if tokens is None and log.train:
        tokens = number(log.train[-1].get("tokens"))
    if tokens is not None:
        bits.append(f"{fmt('tokens', tokens)} tokens")
    elapsed = _elapsed(log)
    if elapsed is not None:
        bits.append(duration(elapsed))
    start = finite(log.start.get("time"))
    if start is not None:
        bits.append("started " + dt.datetime.fromtimestamp(start, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    models = []
    for role in ("teacher", "student"):
        entry = log.summary.get(role)
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            models.append(f"{role} {escape(entry['name'])}")
    line2 = f'<p class="meta">{" &rarr; ".join(models)}</p>' if models else ""
    return f"<header><h1>{escape(log.name)}</h1><p class=\"meta\">{' &middot; '.join(bits)}</p>{line2}</header>"


def _elapsed(log: RunLog) -> float | None:
    elapsed = finite(log.summary.get("elapsed_s"))
    if elapsed is None and log.train:
        elapsed = finite(log.train[-1].get("elapsed_s"))
    if elapsed is None and log.end is not None:
        t0, t1 = finite(log.start.get("time")), finite(log.end.get("time"))
        if t0 is not None and t1 is not None:
            elapsed = t1 - t0
    return elapsed


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _figure(png: bytes | None, alt: str, caption: str | None) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _loss_caption(log: RunLog, baseline: RunLog | None, png_name: str | None) -> str:
    from entrenar_cli.report.plots import ce_term

    text = "One panel per loss term, by optimizer step."
    ce = ce_term(log)
    if baseline is not None and ce:
        text += f" The CE-only baseline's loss is drawn on the {escape(ce)} panel, the one it is comparable with."
    if png_name:
        text += f' Also saved as <a href="{escape(png_name)}">{escape(png_name)}</a>.'
    return text


def _table(headers: list[str], rows: list[list[str]], *, left: int = 0, raw: bool = False) -> str:
    """An HTML table; the first ``left`` columns align left. Cells are escaped unless ``raw``."""
    head = "".join(f'<th{" class=l" if i < left else ""}>{escape(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ["l"] if i < left else []
            if cell in ("nan", "inf", "-inf"):
                cls.append("nonfinite")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{cell if raw else escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _sample(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` rows, evenly spaced, always keeping the first and the last."""
    if len(rows) <= limit:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx]


def _train_table(log: RunLog, keys: list[str] | None) -> str:
    if keys is None:
        keys = ["epoch", "tokens", *log.loss_terms(), "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes",
                "elapsed_s"]
    keys = [k for k in keys if log.has(k)]
    rows = _sample(log.train, MAX_LOG_ROWS)
    return _table(["step", *(LABELS.get(k, k) for k in keys)],
                  [[fmt("step", r["step"]), *(fmt(k, r.get(k)) for k in keys)] for r in rows])


def _eval_table(log: RunLog, baseline: RunLog | None) -> str:
    keys = [k for k in ("eval_loss", "perplexity", "kl_to_teacher", "agreement", "teacher_perplexity")
            if log.has(k, "eval") or (baseline is not None and baseline.has(k, "eval"))]
    if baseline is None or not baseline.evals:
        return _table(["step", *(LABELS[k] for k in keys)],
                      [[fmt("step", r["step"]), *(fmt(k, r.get(k)) for k in keys)]
                       for r in _sample(log.evals, MAX_EVAL_ROWS)])
    # side by side, one row per step either run evaluated at
    kd_at = {r["step"]: r for r in log.evals}
    base_at = {r["step"]: r for r in baseline.evals}
    steps = sorted(set(kd_at) | set(base_at))
    steps = [s["step"] for s in _sample([{"step": s} for s in steps], MAX_EVAL_ROWS)]
    per_run = [k for k in keys if k != "teacher_perplexity"]
    headers = ["step"]
    for k in per_run:
        headers += [f"{LABELS[k]} (KD)", f"{LABELS[k]} (baseline)"]
    if "teacher_perplexity" in keys:
        headers.append(LABELS["teacher_perplexity"])
    rows = []
    for s in steps:
        a, b = kd_at.get(s, {}), base_at.get(s, {})
        row = [fmt("step", s)]
        for k in per_run:
            row += [fmt(k, a.get(k)), fmt(k, b.get(k))]
        if "teacher_perplexity" in keys:
            row.append(fmt("teacher_perplexity", a.get("teacher_perplexity", b.get("teacher_perplexity"))))
        rows.append(row)
    return _table(headers, rows)


SUMMARY_ROWS = (
    ("name", "model"),
    ("parameters", "parameters"),
    ("trainable_parameters", "trainable parameters"),
    ("size_bytes", "size"),
    ("perplexity", "held-out perplexity"),
    ("kl_to_teacher", "KL to the teacher"),
    ("agreement", "agreement with the teacher"),
)


def _summary_table(log: RunLog, baseline: RunLog | None) -> str:
    columns: list[tuple[str, dict[str, Any]]] = []
    summary = log.summary
    teacher = summary.get("teacher")
    if isinstance(teacher, dict):
        columns.append(("teacher", teacher))
    before = summary.get("student_before")
    if isinstance(before, dict):
        columns.append(("student before", before))
    student, from_eval = log.final_student()
    student_label = {"distill": "student (KD)", "finetune": "model (fine-tuned)"}.get(log.kind or "", "student")
    if from_eval:
        step = log.evals[-1]["step"]
        student_label += f" at step {step}"
    if student:
        columns.append((student_label, student))
    base = baseline_numbers(log, baseline)
    if base:
        columns.append(("CE-only baseline", base))
    if not columns:
        return '<p class="muted">No final summary yet (summary.json is written when the run ends).</p>'
    rows = []
    for key, label in SUMMARY_ROWS:
        values = [col.get(key) for _, col in columns]
        if all(v is None for v in values):
            continue
        rows.append([label, *(fmt(key, v) for v in values)])
    table = _table(["", *(name for name, _ in columns)], rows, left=1)
    extra = []
    if from_eval:
        extra.append("The run has not written summary.json yet: the student column shows the latest evaluation.")
    return table + "".join(f'<p class="muted">{escape(e)}</p>' for e in extra)


def _comparison_table(comparison: dict[str, Any]) -> str:
    rows = []
    for row in comparison["rows"]:
        if row["kd"] is None and row["baseline"] is None:
            continue
        key = row["metric"]
        kd_text = escape(fmt(key, row["kd"]) or "n/a")
        if row["kd_better"] is not None:  # green when the KD student is better, red when worse
            kd_text = f'<span class="{"better" if row["kd_better"] else "worse"}">{kd_text}</span>'
        ratio = row["ratio"]
        rows.append([
            escape(f"{row['label']} ({row['better']} is better)"),
            kd_text,
            escape(fmt(key, row["baseline"]) or "n/a"),
            escape(f"{ratio:.2f}x" if ratio is not None and math.isfinite(ratio) else "n/a"),
        ])
    steps = [comparison["kd"].get("steps"), comparison["baseline"].get("steps")]
    if any(s is not None for s in steps):
        rows.append(["steps", *(escape(fmt("steps", s) or "n/a") for s in steps), ""])
    return _table(["", "KD student", "CE-only baseline", "KD / baseline"], rows, left=1, raw=True)


def _system_table(log: RunLog, baseline: RunLog | None) -> str:
    rows: list[list[str]] = []

    def add(label: str, key: str, kd: Any, base: Any = None) -> None:
        if kd is None and base is None:
            return
        rows.append([label, fmt(key, kd) or "n/a", *([fmt(key, base) or "n/a"] if baseline is not None else [])])

    def stats(run: RunLog | None) -> dict[str, Any]:
        if run is None:
            return {}
        _, tps = run.series("tokens_per_s")
        tps = [t for t in tps if math.isfinite(t)]
        _, mem = run.series("peak_mem_bytes")
        mem = [m for m in mem if math.isfinite(m)]
        s = run.summary
        return {
            "tokens": s.get("tokens", run.train[-1].get("tokens") if run.train else None),
            "elapsed": _elapsed(run),
            "tps": s.get("tokens_per_s", sum(tps) / len(tps) if tps else None),
            "peak": s.get("peak_mem_bytes", max(mem) if mem else None),
            "estimate": s.get("estimated_mem_bytes"),
        }

    a, b = stats(log), stats(baseline)
    add("tokens trained", "tokens", a["tokens"], b.get("tokens"))
    add("wall time", "elapsed_s", a["elapsed"], b.get("elapsed"))
    add("throughput (tokens/s)", "tokens_per_s", a["tps"], b.get("tps"))
    add("peak memory", "peak_mem_bytes", a["peak"], b.get("peak"))
    add("estimated memory", "estimated_mem_bytes", a["estimate"], b.get("estimate"))
    peak, estimate = finite(a["peak"]), finite(a["estimate"])
    if peak is not None and estimate:
        ratio = peak / estimate
        verdict = "within the estimate" if ratio <= 1 else "ABOVE the estimate"
        rows.append(["peak / estimate", f"{ratio:.2f}x ({verdict})", *([""] if baseline is not None else [])])
    if not rows:
        return '<p class="muted">No throughput or memory recorded yet.</p>'
    headers = ["", "KD run" if baseline is not None else "run"] + (["CE-only baseline"] if baseline is not None else [])
    return _table(headers, rows, left=1)


def _outputs(log: RunLog, png_name: str | None) -> str:
    items = []
    outputs = log.summary.get("outputs")
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            items.append(f"<li>{escape(str(key))}: <code>{escape(str(value))}</code></li>")
    items.append('<li>report: <code>report.html</code> (this page)</li>')
    if png_name:
        items.append(f'<li>loss curves: <a href="{escape(png_name)}"><code>{escape(png_name)}</code></a></li>')
    items.append("<li>metrics: <code>metrics.jsonl</code>, summary: <code>summary.json</code>, "
                 "config: <code>resolved_config.yaml</code></li>")
    return "<ul>" + "".join(items) + "</ul>"
