"""The run report: ``report.html`` (self-contained) and ``loss_curves.png`` in a run's output directory.

The training engine calls :func:`write_report` at each evaluation and when a run ends;
``entrenar report OUTPUT_DIR`` calls it on a finished (or running) run. Both read only the files
the engine writes: ``metrics.jsonl``, ``summary.json``, ``resolved_config.yaml`` and, for a
``--baseline`` run, the same files under ``baseline/``. matplotlib is optional: without it the
page shows tables instead of charts and no PNG is written.

Layout: :mod:`.runlog` reads a run directory, :mod:`.compare` holds the KD-vs-baseline numbers and
verdict, :mod:`.plots` draws the charts, :mod:`.page` renders the HTML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrenar_cli.fsutil import atomic_path, record_written
from entrenar_cli.report.compare import compare_runs, compare_with_baseline
from entrenar_cli.report.runlog import RunLog, read_baseline, read_run

REPORT_FILE = "report.html"
LOSS_PNG = "loss_curves.png"

__all__ = ["REPORT_FILE", "LOSS_PNG", "ReportResult", "RunLog", "compare_with_baseline", "read_run",
           "render_report", "write_report"]


@dataclass
class ReportResult:
    """What :func:`render_report` wrote and found."""

    html_path: Path
    png_path: Path | None  # None when matplotlib is missing or there was no loss to draw
    comparison: dict[str, Any] | None  # compare_with_baseline(...) when the run has a baseline
    run: RunLog
    baseline: RunLog | None
    notes: list[str] = field(default_factory=list)  # things the page warns about (also shown in it)


def write_report(output_dir: str | Path) -> Path:
    """Write ``report.html`` (and ``loss_curves.png`` when matplotlib is installed) into a run's
    output directory, atomically; return the HTML path.

    Raises :class:`~entrenar_cli.errors.UsageError` when the directory or its metrics.jsonl is
    missing and :class:`~entrenar_cli.errors.DataError` when metrics.jsonl is corrupt.
    """
    return render_report(output_dir).html_path


def render_report(output_dir: str | Path) -> ReportResult:
    """:func:`write_report`, returning everything the caller may want to print."""
    from entrenar_cli import __version__
    from entrenar_cli.report import page, plots

    run = read_run(output_dir)
    baseline, baseline_notes = read_baseline(run.directory)
    notes = [*run.notes, *baseline_notes]

    comparison = compare_runs(run, baseline)

    charts: dict[str, bytes] = {}
    no_charts_because = None
    if plots.load_matplotlib() is None:
        no_charts_because = "matplotlib is not installed (pip install 'entrenar-cli[report]')"
        notes.append("matplotlib is not installed: the report shows tables instead of charts "
                     "(pip install 'entrenar-cli[report]' or pip install matplotlib)")
    else:
        try:
            for name, draw in (("loss", plots.loss_figure), ("eval", plots.eval_figure),
                               ("system", plots.system_figure)):
                png = draw(run, baseline)
                if png:
                    charts[name] = png
        except Exception as exc:  # noqa: BLE001 - a chart must never cost the user the report
            charts.clear()
            no_charts_because = "drawing them failed (see the note at the top)"
            notes.append(f"the charts could not be drawn ({type(exc).__name__}: {exc}); showing tables")

    png_path = None
    if "loss" in charts:
        png_path = run.directory / LOSS_PNG
        _write(png_path, charts["loss"])
    html = page.render_page(run, baseline, comparison, charts, notes, no_charts_because=no_charts_because,
                            png_name=LOSS_PNG if png_path else None, version=__version__,
                            generated_at=time.time())
    html_path = run.directory / REPORT_FILE
    _write(html_path, html.encode("utf-8"))
    return ReportResult(html_path=html_path, png_path=png_path, comparison=comparison, run=run,
                        baseline=baseline, notes=notes)


def _write(path: Path, data: bytes) -> None:
    """Write atomically, readable by all like any other report file (the temp file is 0600)."""
    record_written(path.parent, path.name, create=False)  # in a run directory: --overwrite may remove it
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        tmp.chmod(0o644)
