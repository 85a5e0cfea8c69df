"""The run report: report.html + loss_curves.png from a recorded run directory, the baseline
verdict, partial runs, the no-matplotlib fallback, and `entrenar report`."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app
from entrenar_cli.errors import DataError, UsageError
from entrenar_cli.report import ReportResult, compare_with_baseline, render_report, write_report

FIXTURE = Path(__file__).parent / "data" / "run"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


# --------------------------------------------------------------------------------------- helpers
class Page(HTMLParser):
    """What a browser would see: tags, text, images, links, table cells."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.cells: list[str] = []
        self.ids: set[str] = set()
        self._in_cell = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.append((tag, dict(attrs)))
        if dict(attrs).get("id"):
            self.ids.add(dict(attrs)["id"] or "")
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_cell:
            self.cells[-1] += data

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def images(self) -> list[bytes]:
        out = []
        for tag, attrs in self.attrs:
            if tag == "img":
                src = attrs.get("src") or ""
                assert src.startswith("data:image/png;base64,"), src[:60]
                out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
        return out


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_self_contained(html: str, page: Page) -> None:
    assert "<script" not in html.lower()
    for tag, attrs in page.attrs:
        assert tag not in ("link", "iframe", "object", "embed"), tag
        for name in ("src", "href"):
            value = (attrs.get(name) or "").lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, value)
    assert "@import" not in html and "url(" not in html


def copy_fixture(dest: Path) -> Path:
    shutil.copytree(FIXTURE, dest, ignore=shutil.ignore_patterns("*.py", "report.html", "*.png"))
    return dest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A copy of the recorded KD run (with its CE-only baseline) to write reports into."""
    return copy_fixture(tmp_path / "run")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    """The recorded run's report, drawn once for the tests that only read it (drawing takes ~1 s)."""
    return render_report(copy_fixture(tmp_path_factory.mktemp("rendered") / "run"))


def write_metrics(directory: Path, records: list[dict], *, summary: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (directory / "summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import matplotlib` fail the way it does when it is not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


# ----------------------------------------------------------------------- the recorded KD run
def test_report_from_recorded_run(rendered: ReportResult) -> None:
    path = rendered.html_path
    assert path == rendered.run.directory / "report.html"
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    assert page.tags[:2] == ["html", "head"] and "body" in page.tags
    assert {"summary", "baseline", "loss", "eval", "system", "log", "config", "outputs", "verdict"} <= page.ids
    assert_self_contained(html, page)
    text = page.all_text

    # the verdict and the final summary table: teacher, student before, KD student, baseline
    assert ("KD student beats the CE-only baseline: held-out perplexity 120.5 vs 132.0 (0.91x); "
            "agreement with the teacher 45.0% vs 41.0%") in text
    for header in ("teacher", "student before", "student (KD)", "CE-only baseline"):
        assert header in page.cells
    for value in ("6.90", "900.0", "120.5", "132.0", "45.0%", "41.0%", "20.0%", "134.5 M (134,515,008)"):
        assert value in page.cells, value
    # evaluation over steps, from metrics.jsonl (step 60 of the KD run and of the baseline)
    assert "238.8" in page.cells and "253.7" in page.cells
    # throughput and memory: peak against the estimate
    assert "614.3" in page.cells and "1.15 GiB" in page.cells and "1.26 GiB" in page.cells
    assert "0.91x (within the estimate)" in page.cells
    # the resolved config, verbatim
    assert "temperature: 2.0" in text and "HuggingFaceTB/SmolLM2-135M" in text
    # the training log table shows every loss term the run recorded
    for label in ("loss_kd", "loss_ce", "loss_hidden", "loss_attn"):
        assert label in page.cells, label
    assert "completed" in text and "120 steps" in text and "491,520 tokens" in text


def test_report_images_are_real_pngs(rendered: ReportResult) -> None:
    result = rendered
    assert result.notes == []
    assert result.png_path == result.run.directory / "loss_curves.png"
    png = result.png_path.read_bytes()
    width, height = png_size(png)
    assert 600 <= width <= 2000 and 250 <= height <= 1500, (width, height)
    assert len(png) > 20_000  # five panels of curves, not an empty canvas
    images = Page(result.html_path.read_text()).images()
    assert len(images) == 3  # loss curves, evaluation, learning rate/throughput/memory
    assert images[0] == png  # the page embeds the same picture it saves
    for data in images:
        w, h = png_size(data)
        assert w >= 400 and h >= 200 and len(data) > 10_000


def test_loss_png_is_not_blank(rendered: ReportResult) -> None:
    """The PNG has drawn curves: many distinct colours, including the KD and baseline lines."""
    pytest.importorskip("matplotlib")
    from matplotlib import image as mpimg

    pixels = mpimg.imread(rendered.png_path)  # floats 0..1, [h, w, channels]
    rgb = {tuple(round(float(c), 2) for c in px[:3]) for row in pixels[::4] for px in row[::4]}
    assert len(rgb) > 50
    blue, orange = (0.12, 0.47, 0.71), (1.0, 0.5, 0.05)
    near = lambda target: any(sum(abs(a - b) for a, b in zip(c, target)) < 0.1 for c in rgb)  # noqa: E731
    assert near(blue) and near(orange)


def test_report_files_are_written_atomically(rendered: ReportResult) -> None:
    run_dir = rendered.run.directory
    write_report(run_dir)  # regenerating replaces, never appends or leaves temp files
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert (run_dir / "report.html").stat().st_mode & 0o644 == 0o644


def test_report_escapes_recorded_text(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    run = write_metrics(tmp_path / "run", [
        {"event": "start", "run": "finetune", "name": evil},
        {"event": "train", "step": 1, "loss": 2.0},
    ], summary={"run": "finetune", "outputs": {"model_dir": evil}})
    (run / "resolved_config.yaml").write_text(f"name: '{evil}'\n")
    html = write_report(run).read_text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert evil in Page(html).all_text  # shown to the reader as text


# ------------------------------------------------------------------------------ partial runs
@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="empty-file"),
        pytest.param([{"event": "start", "time": 1764115200.0, "run": "distill", "name": "x"}], id="start-only"),
        pytest.param([{"event": "train", "step": 1, "loss": 9.5}], id="one-train-line"),
        pytest.param([{"event": "start", "run": "distill"},
                      {"event": "train", "step": 1, "loss": 9.5, "loss_kd": 8.0, "lr": 1e-5},
                      {"event": "train", "step": 2, "loss": 9.1, "loss_kd": 7.6, "lr": 2e-5}], id="no-eval-yet"),
        pytest.param([{"event": "eval", "step": 0, "perplexity": 900.0}], id="eval-only"),
        pytest.param([{"event": "train", "step": 1, "loss": float("nan")},
                      {"event": "train", "step": 2, "loss": float("inf"), "grad_norm": float("nan")},
                      {"event": "end", "status": "failed", "steps": 2}], id="diverged"),
        pytest.param([{"event": "train", "step": 3, "loss": "n/a", "lr": None, "tokens_per_s": True},
                      {"event": "future-event", "whatever": 1}], id="odd-values"),
    ],
)
def test_partial_runs_render(tmp_path: Path, records: list[dict]) -> None:
    run = write_metrics(tmp_path / "run", records)
    result = render_report(run)
    html = result.html_path.read_text()
    page = Page(html)
    assert "body" in page.tags and "config" in page.ids
    assert_self_contained(html, page)
    assert result.notes == []  # matplotlib is installed and nothing went wrong
    assert "No charts" not in page.all_text


def test_a_chart_that_fails_to_draw_costs_only_the_charts(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> bytes:
        raise ValueError("no finite data")

    monkeypatch.setattr("entrenar_cli.report.plots.eval_figure", broken)
    result = render_report(run_dir)
    assert result.png_path is None and any("could not be drawn (ValueError: no finite data)" in n for n in result.notes)
    page = Page(result.html_path.read_text())
    assert "img" not in page.tags and "120.5" in page.cells
    assert "No charts: drawing them failed (see the note at the top)." in page.all_text


def test_baseline_compared_on_latest_evaluations_while_running(tmp_path: Path) -> None:
    kd = write_metrics(tmp_path / "run", [{"event": "start", "run": "distill"},
                                          {"event": "eval", "step": 50, "perplexity": 210.0, "agreement": 0.3}])
    write_metrics(kd / "baseline", [{"event": "eval", "step": 50, "perplexity": 200.0, "agreement": 0.31}])
    result = render_report(kd)
    assert result.comparison is not None and result.comparison["kd_beats_baseline"] is False
    assert result.comparison["verdict"].startswith("KD student does NOT beat the CE-only baseline: "
                                                   "held-out perplexity 210.0 vs 200.0 (1.05x)")


def test_run_in_progress(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", [
        {"event": "start", "run": "distill", "name": "live"},
        {"event": "train", "step": 10, "loss": 4.0, "loss_kd": 3.0, "loss_ce": 5.0},
        {"event": "eval", "step": 10, "perplexity": 150.25, "agreement": 0.3},
    ])
    # the engine is in the middle of writing the next line
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"event": "train", "step": 11, "lo')
    result = render_report(run)
    text = Page(result.html_path.read_text()).all_text
    assert result.run.status == "in progress" and "in progress" in text
    assert "150.2" in text and "student (KD) at step 10" in text
    assert any("incomplete last line" in n and "metrics.jsonl:4" in n for n in result.notes)


def test_finetune_run_has_no_teacher_columns(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", [
        {"event": "start", "run": "finetune", "name": "ft"},
        *({"event": "train", "step": s, "loss": 3.0 - s / 100, "lr": 1e-4} for s in range(1, 31)),
        {"event": "eval", "step": 30, "eval_loss": 2.5, "perplexity": 12.18},
        {"event": "end", "status": "completed", "steps": 30},
    ], summary={"run": "finetune", "status": "completed", "steps": 30,
                "student": {"name": "tiny", "parameters": 1000, "perplexity": 12.18}})
    result = render_report(run)
    page = Page(result.html_path.read_text())
    assert "model (fine-tuned)" in page.cells and "teacher" not in page.cells
    assert result.comparison is None and "verdict" not in page.ids
    assert "12.2" in page.cells  # perplexity from summary.json, one decimal above 10


def test_resumed_run_keeps_the_later_record_of_a_repeated_step(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", [
        {"event": "start", "run": "finetune", "time": 100.0},
        {"event": "train", "step": 1, "loss": 5.0},
        {"event": "train", "step": 2, "loss": 4.0},
        {"event": "end", "status": "interrupted", "steps": 2},
        {"event": "start", "run": "finetune", "time": 200.0},
        {"event": "train", "step": 2, "loss": 3.5},
    ])
    result = render_report(run)
    assert [r["loss"] for r in result.run.train] == [5.0, 3.5]
    assert result.run.status == "in progress" and result.run.start["time"] == 100.0


# ------------------------------------------------------------------------ without matplotlib
def test_without_matplotlib_the_report_shows_tables(tmp_path: Path, no_matplotlib: None) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("*.py", "*.png", "report.html"))
    result = render_report(run)
    assert result.png_path is None and not (run / "loss_curves.png").exists()
    assert any("matplotlib is not installed" in n for n in result.notes)
    html = result.html_path.read_text()
    page = Page(html)
    assert "img" not in page.tags
    assert_self_contained(html, page)
    text = page.all_text
    assert "No charts: matplotlib is not installed (pip install 'entrenar-cli[report]')." in text
    assert "KD student beats the CE-only baseline" in text
    # the values the curves would have shown: first and last logged loss_ce of both runs
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["event"] == "train"]
    assert f"{train[0]['loss_ce']:#.4g}" in page.cells and f"{train[-1]['loss_kd']:#.4g}" in page.cells
    base = [json.loads(x) for x in (run / "baseline/metrics.jsonl").read_text().splitlines()]
    assert f"{[x for x in base if x['event'] == 'train'][-1]['loss']:#.4g}" in page.cells
    assert "3.00e-04" in page.cells  # the learning rate at its peak


def test_cli_report_without_matplotlib(run_dir: Path, no_matplotlib: None) -> None:
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed" in result.stderr


# --------------------------------------------------------------------------- baseline verdict
def test_compare_with_baseline_beats() -> None:
    kd = json.loads((FIXTURE / "summary.json").read_text())
    base = json.loads((FIXTURE / "baseline/summary.json").read_text())
    out = compare_with_baseline(kd, base)
    assert out["kd_beats_baseline"] is True
    assert out["verdict"] == ("KD student beats the CE-only baseline: held-out perplexity 120.5 vs 132.0 "
                              "(0.91x); agreement with the teacher 45.0% vs 41.0%")
    ppl = out["rows"][0]
    assert ppl["metric"] == "perplexity" and ppl["kd"] == 120.5 and ppl["baseline"] == 132.0
    assert math.isclose(ppl["ratio"], 120.5 / 132.0) and ppl["kd_better"] is True
    assert out["kd"]["steps"] == out["baseline"]["steps"] == 120
    # the short form the KD summary keeps under "baseline" gives the same verdict
    assert compare_with_baseline(kd, kd["baseline"])["verdict"] == out["verdict"]


def test_compare_with_baseline_does_not_beat() -> None:
    out = compare_with_baseline({"student": {"perplexity": 140.0, "agreement": 0.38}, "steps": 90},
                                {"student": {"perplexity": 132.0, "agreement": 0.41}, "steps": 90})
    assert out["kd_beats_baseline"] is False
    assert out["verdict"] == ("KD student does NOT beat the CE-only baseline: held-out perplexity 140.0 vs 132.0 "
                              "(1.06x); agreement with the teacher 38.0% vs 41.0%")
    assert [r["kd_better"] for r in out["rows"]] == [False, False, None]


@pytest.mark.parametrize(
    ("kd", "base", "expected"),
    [
        ({"perplexity": 132.0}, {"perplexity": 132.0}, "does NOT beat"),  # a tie is not a win
        ({"perplexity": float("inf")}, {"perplexity": 132.0},
         "does NOT beat the CE-only baseline: held-out perplexity inf vs 132.0"),
        ({"perplexity": float("nan")}, {"perplexity": 132.0}, "cannot compare"),
        ({}, {"perplexity": 132.0}, "missing for the KD student"),
        ({"perplexity": 5.0}, {}, "missing for the baseline"),
        ({"perplexity": 6.234}, {"perplexity": 7.0}, "held-out perplexity 6.23 vs 7.00 (0.89x)"),
    ],
)
def test_compare_with_baseline_edge_cases(kd: dict, base: dict, expected: str) -> None:
    assert expected in compare_with_baseline({"student": kd}, base)["verdict"]


def test_compare_flags_unequal_steps() -> None:
    out = compare_with_baseline({"student": {"perplexity": 1.5}, "steps": 90}, {"perplexity": 2.0, "steps": 60})
    assert out["verdict"].endswith("(unequal steps: 90 vs 60)")


def test_report_uses_the_kd_summary_copy_when_the_baseline_dir_is_missing(run_dir: Path, no_matplotlib: None) -> None:
    shutil.rmtree(run_dir / "baseline")
    result = render_report(run_dir)
    assert result.baseline is None and result.comparison is not None
    assert result.comparison["kd_beats_baseline"] is True
    assert "CE-only baseline" in Page(result.html_path.read_text()).cells


def test_a_corrupt_baseline_is_a_note_not_a_failure(run_dir: Path, no_matplotlib: None) -> None:
    with (run_dir / "baseline/metrics.jsonl").open("a") as fh:
        fh.write("garbage\n{}\n")
    result = render_report(run_dir)
    assert result.baseline is None
    assert any("baseline run is left out" in n for n in result.notes)
    assert "baseline run is left out" in Page(result.html_path.read_text()).all_text


# ------------------------------------------------------------------------------- bad inputs
def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="run directory not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(UsageError, match="no metrics.jsonl"):
        write_report(tmp_path)


def test_corrupt_line_names_the_line(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", [{"event": "train", "step": 1, "loss": 2.0}])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("{not json\n")
        fh.write('{"event": "train", "step": 3, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: corrupt metrics line: not valid JSON"):
        write_report(run)


@pytest.mark.parametrize(
    ("line", "what"),
    [("[1, 2]", "not a JSON object"), ('{"step": 1}', "no 'event' key"),
     ('{"event": "train", "loss": 1}', "whole-number 'step'"), ('{"event": "eval", "step": 1.5}', "whole-number")],
)
def test_malformed_records_name_the_line(tmp_path: Path, line: str, what: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "start"}\n' + line + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: .*" + what):
        write_report(run)


def test_unreadable_summary_is_a_note(run_dir: Path, no_matplotlib: None) -> None:
    (run_dir / "summary.json").write_text("{truncated")
    result = render_report(run_dir)
    assert any("summary.json could not be read" in n for n in result.notes)


# ------------------------------------------------------------------------------------ the CLI
def test_cli_report_prints_the_path(run_dir: Path) -> None:
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_dir / "report.html")
    assert "KD student beats the CE-only baseline" in result.stderr
    assert (run_dir / "loss_curves.png").is_file()


def test_cli_report_missing_directory_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert f"run directory not found: {tmp_path / 'nope'}" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.output


def test_cli_report_missing_metrics_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.stderr


def test_cli_report_corrupt_metrics_exit_1(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "start"}\n{"event": "train", "step": 1}\nnot json\n')
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 1
    assert f"{run / 'metrics.jsonl'}:3: corrupt metrics line" in result.stderr
    assert "fix or delete line 3" in result.stderr and "Traceback" not in result.output


def test_cli_report_open(run_dir: Path, monkeypatch: pytest.MonkeyPatch, no_matplotlib: None) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    result = runner.invoke(app, ["report", str(run_dir), "--open-path"])
    assert result.exit_code == 0, result.output
    assert opened == [(run_dir / "report.html").resolve().as_uri()]


def test_report_modules_do_not_import_matplotlib_at_import_time() -> None:
    probe = ("import sys\nimport entrenar_cli.cli, entrenar_cli.commands.report, entrenar_cli.report\n"
             "print('MPL', 'matplotlib' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "MPL False" in proc.stdout, proc.stdout + proc.stderr


def test_report_is_fast_for_a_few_thousand_lines(tmp_path: Path) -> None:
    # a guard against quadratic work, not a benchmark: the bound is loose for a shared CI machine
    records: list[dict] = [{"event": "start", "run": "distill", "name": "long"}]
    for s in range(1, 3001):
        records.append({"event": "train", "step": s, "loss": 3 + math.exp(-s / 500), "loss_kd": 2.0,
                        "loss_ce": 3.5, "lr": 1e-4, "tokens_per_s": 600.0, "peak_mem_bytes": 2**30})
        if s % 100 == 0:
            records.append({"event": "eval", "step": s, "perplexity": 100 - s / 100, "agreement": 0.4})
    run = write_metrics(tmp_path / "run", records)
    t0 = time.perf_counter()
    result = render_report(run)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, elapsed  # about 1-2 s on an idle 2-core machine, matplotlib import included
    assert len(result.run.train) == 3000 and result.png_path is not None


# ------------------------------------------------------------------- does it display? (optional)
def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_displays_in_headless_chromium(rendered: ReportResult, tmp_path: Path) -> None:
    html = rendered.html_path
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         f"--screenshot={shot}", "--window-size=1200,2000", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )
    assert shot.is_file(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert png_size(data) == (1200, 2000)
    # a page with charts and tables compresses far worse than a blank or error page (~10 KB)
    assert len(data) > 100_000, len(data)


def test_equal_wall_time_interpolates_the_slower_run_at_the_faster_runs_end(tmp_path: Path) -> None:
    import math

    from entrenar_cli.report.compare import equal_time_line, equal_wall_time
    from entrenar_cli.report.runlog import RunLog

    def log(times: list[float], ppl: list[float], before: float | None = None) -> RunLog:
        return RunLog(tmp_path, train=[{"step": 10 * (i + 1), "elapsed_s": t} for i, t in enumerate(times)],
                      evals=[{"step": 10 * (i + 1), "perplexity": p} for i, p in enumerate(ppl)],
                      summary={"student_before": {"perplexity": before}} if before else {})

    kd, ce = log([30.0, 60.0], [50.0, 30.0], before=100.0), log([10.0, 20.0], [60.0, 40.0])
    eq = equal_wall_time(kd, ce)
    assert eq is not None and eq["seconds"] == 20.0 and eq["baseline_steps"] == 20 and eq["baseline_perplexity"] == 40
    # KD at 20 s: step 20/30 * 10 = 6.67, between the step-0 evaluation (100) and step 10 (50), log-linear
    assert eq["kd_steps"] == pytest.approx(20 / 3)
    assert eq["kd_perplexity"] == pytest.approx(math.exp(math.log(100) / 3 + 2 * math.log(50) / 3))
    assert eq["ratio"] == pytest.approx(eq["kd_perplexity"] / 40)
    assert "does NOT beat the baseline" in equal_time_line(eq) and "63.0 vs 40.0 (1.57x)" in equal_time_line(eq)
    # without the KD run's step-0 evaluation, the slower run cannot be placed before its first one
    assert equal_wall_time(log([30.0, 60.0], [50.0, 30.0]), ce) is None
    assert equal_time_line(None) == ""
