"""The compact teacher cache (format 3) and `entrenar cache`: format, KD-loss bound, fill, manifest, verify."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from entrenar_cli.cli import app
from entrenar_cli.config import DistillationYamlConfig, validate_text
from entrenar_cli.errors import ConfigError
from entrenar_cli.losses import kd_terms
from entrenar_cli.teacher_cache import (
    CACHE_VERSION,
    CacheFormat,
    TeacherCache,
    decode,
    decoded_logp_error_bound,
    encode,
    index_shards,
    training_schedule,
)

runner = CliRunner()


def _peaked_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3 + torch.zeros(n, vocab).scatter_(
        1, torch.randint(0, vocab, (n, 4), generator=g), 8.0)


def _config_text(teacher: Path, data: Path, out: Path, cache: Path, extra: str = "", **training: Any) -> str:
    train = {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "seed": 7,
             "mixed_precision": "fp32"} | training
    text = (f"teacher:\n  model_id: {teacher}\nstudent:\n  init_from_teacher: 2\n"
            f"distillation:\n  teacher_cache:\n    enabled: true\n    dir: {cache}\n{extra}"
            "training:\n" + "".join(f"  {k}: {v}\n" for k, v in train.items()) +
            f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n  max_blocks: 16\n"
            f"output:\n  dir: {out}\n")
    return text


def _config(*args: Any, **kwargs: Any) -> DistillationYamlConfig:
    return validate_text(_config_text(*args, **kwargs), DistillationYamlConfig, "t.yaml")  # type: ignore[return-value]


@pytest.mark.parametrize("vocab,k,m,size", [(300, 32, 32, 170), (70_000, 32, 32, 234), (300, 64, 0, 198),
                                            (300, 0, 64, 134)])
def test_format_round_trip_within_stated_error(vocab: int, k: int, m: int, size: int) -> None:
    fmt = CacheFormat(k, m, vocab, 1.0)
    assert fmt.bytes_per_token == size and fmt.id_bytes == (2 if vocab <= 65536 else 3)
    logits = _peaked_logits(24, vocab, seed=vocab + k)
    rec = encode(logits, fmt, seed=5)
    assert rec.dtype.itemsize == size
    again = np.frombuffer(rec.tobytes(), dtype=fmt.dtype)  # the stored bytes decode to the same records
    w, ids, negent = decode(again, fmt)
    logp = torch.log_softmax(logits, -1)
    if k:
        true_lp, true_ids = logp.topk(k, -1)
        assert torch.equal(ids[:, :k], true_ids)
        dec_lp = torch.from_numpy(again["hi"].astype(np.float32))[:, None] - torch.from_numpy(
            again["code"].astype(np.float32)) * torch.from_numpy(again["step"].astype(np.float32))[:, None]
        bound = torch.from_numpy(decoded_logp_error_bound(again))[:, None]
        err = (dec_lp - true_lp).abs()
        assert bool((err <= bound).all()) and float(err.max()) > 0  # quantised, within the stated bound
        tail = 1 - true_lp.exp().sum(-1)
    else:
        tail = torch.ones(logits.shape[0])
    # the weights are a distribution: kept mass 1 - tail (fp16 log tail: relative error <= 2^-10)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
    tail_dec = w[:, k:].sum(-1)
    assert torch.allclose(tail_dec, tail, rtol=2e-3, atol=1e-6)
    if m:
        samples = ids[:, k:]
        assert samples.shape == (24, m) and int(samples.min()) >= 0 and int(samples.max()) < vocab
        if k:  # drawn from the tail only
            assert not bool((samples.unsqueeze(-1) == ids[:, None, :k]).any())
        full_negent = (logp.exp() * logp).sum(-1)
        assert torch.allclose(negent, full_negent, atol=1e-5)
        # seeded by block id: the same block encodes to the same bytes
        assert encode(logits, fmt, seed=5).tobytes() == rec.tobytes() != encode(logits, fmt, seed=6).tobytes()
    else:
        assert bool((ids[:, -1] == -1).all())


def _bias_bound_and_std(logits: torch.Tensor, s_logp: torch.Tensor, rec: np.ndarray, fmt: CacheFormat,
                        w: torch.Tensor) -> tuple[float, float]:
    """The documented per-token bound on |E[cached loss] - full KL|, summed, and the sampling std of the sum."""
    p = torch.softmax(logits, -1)
    k, m = fmt.k, fmt.samples
    top_p, top_ids = p.topk(k, -1)
    eps = torch.from_numpy(decoded_logp_error_bound(rec))
    tail = (1 - top_p.sum(-1)).clamp_min(1e-12)
    tail_dec = w[:, k:].sum(-1)
    r = (1 - tail_dec) / (1 - tail)
    rel = torch.maximum((torch.exp(2 * eps) * r - 1).abs(), (1 - torch.exp(-2 * eps) * r).abs())
    ce_top = (top_p * -s_logp.gather(-1, top_ids)).sum(-1)
    tail_p = p.scatter(-1, top_ids, 0.0)
    ce_tail = (tail_p * -s_logp).sum(-1)
    bias = rel * ce_top + (tail_dec / tail - 1).abs() * ce_tail
    q = tail_p / tail[:, None]
    mean = (q * s_logp).sum(-1)
    var = (q * (s_logp - mean[:, None]) ** 2).sum(-1) * tail_dec ** 2 / m
    return float(bias.sum()), float(var.sum().sqrt())


def test_negentropy_of_rows_with_masked_logits() -> None:
    """A -inf logit (a masked vocabulary entry) has p = 0 and contributes 0, not nan, to sum p log p."""
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    logits[2, 7] = logits[4, :150] = float("-inf")
    fmt = CacheFormat(32, 32, 300, 1.0)
    _, _, negent = decode(encode(logits, fmt, seed=1), fmt)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([(row.exp()[row > -1e30] * row[row > -1e30]).sum() for row in logp])
    assert not bool(negent.isnan().any())
    assert torch.allclose(negent, expected, atol=1e-5)
    # a fill encodes under the run's autocast: the record is computed in fp32 all the same
    rec = encode(logits, fmt, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encode(logits, fmt, seed=1).tobytes() == rec.tobytes()


def test_kd_loss_on_compact_cache_vs_full_vocabulary_within_documented_bound() -> None:
    vocab, n = 512, 1024
    teacher = _peaked_logits(n, vocab, seed=1)
    student = torch.randn(n, vocab, generator=torch.Generator().manual_seed(2)) * 2
    y = torch.randint(0, vocab, (n,))
    full = float(kd_terms(student, teacher, y).soft)
    s_logp = torch.log_softmax(student, -1)
    fmt = CacheFormat(32, 32, vocab, 1.0)
    rec = np.stack([encode(teacher[i * 64:(i + 1) * 64], fmt, seed=i) for i in range(n // 64)]).reshape(-1)
    w, ids, negent = decode(rec, fmt)
    cached = float(kd_terms(student, None, y, teacher_topk=(w, ids, negent)).soft)
    bias, std = _bias_bound_and_std(teacher, s_logp, rec, fmt, w)
    assert abs(cached - full) <= bias + 4 * std, (cached, full, bias, std)
    assert abs(cached - full) / full < 0.01  # measured here: well inside 1%
    # the gradient is an unbiased estimate too: close in direction to the full-vocabulary gradient
    s1 = student.clone().requires_grad_(True)
    kd_terms(s1, teacher, y).soft.backward()
    s2 = student.clone().requires_grad_(True)
    kd_terms(s2, None, y, teacher_topk=(w, ids, negent)).soft.backward()
    assert torch.nn.functional.cosine_similarity(s1.grad.flatten(), s2.grad.flatten(), dim=0) > 0.98
    # no samples: the coarsened KL, a lower bound of the full KL (up to quantisation)
    coarse = CacheFormat(32, 0, vocab, 1.0)
    wc, ic, nc = decode(np.stack([encode(teacher, coarse, 0)]).reshape(-1), coarse)
    low = float(kd_terms(student, None, y, teacher_topk=(wc, ic, nc)).soft)
    assert low < full and low > 0.5 * full


def _cache_for(tmp_path: Path, fmt: CacheFormat | None, **changes: Any) -> TeacherCache:
    manifest = {"weights": "w", "tokenizer": "t", "data": "d", "max_length": 8, "vocab": 300, "top_k": 4,
                "samples": 4, "temperature": 1.0, "hidden_layers": [], "attention_layers": []} | changes
    return TeacherCache(tmp_path / "c", manifest, fmt, [], [])


def test_manifest_mismatch_refused_with_what_differs_and_old_format_told_to_rebuild(tmp_path: Path) -> None:
    fmt = CacheFormat(4, 4, 300, 1.0)
    _cache_for(tmp_path, fmt)
    _cache_for(tmp_path, fmt, teacher="another/name")  # a name is not an identity: the weights hash is
    with pytest.raises(ConfigError, match=r"differs in: top_k, temperature\): top_k: cache 4, this run 8; "
                                          r"temperature: cache 1.0, this run 2.0"):
        _cache_for(tmp_path, fmt, top_k=8, temperature=2.0)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(ConfigError, match="format version 2") as exc:
        _cache_for(tmp_path, fmt)
    assert "rebuild the cache" in (exc.value.hint or "")


def test_reads_run_ahead_in_the_background(tmp_path: Path) -> None:
    fmt = CacheFormat(4, 4, 300, 1.0)
    cache = _cache_for(tmp_path, fmt)
    for b in range(0, 8, 2):
        cache.put([b, b + 1], {"mark": torch.ones(2, 1, dtype=torch.int8), "logits": _peaked_logits(16, 300, b)
                               .reshape(2, 8, 300)})
    schedule = list(training_schedule(8, seed=3, batch_size=2, accumulation=1, world=1, rank=0, epochs=2))
    assert len(schedule) == 8 and sorted(b for ids in schedule[:4] for b in ids) == list(range(8))
    cache.expect(iter(schedule))
    outs = [cache.get(list(ids), torch.device("cpu")) for ids in schedule]
    assert cache.prefetched == len(schedule) - 1  # every batch after the first was read ahead
    direct = TeacherCache(tmp_path / "c", cache.manifest, fmt, [], [])
    for ids, got in zip(schedule, outs):
        ref = direct.get(list(ids), torch.device("cpu"))
        assert got["vals"].shape == (2, 8, 8) and all(torch.equal(got[k], ref[k]) for k in ("vals", "idx", "tail"))
    cache.close()


def test_fill_resumes_after_interruption_and_equals_an_uninterrupted_fill(tiny_llama: Path, stdlib_text: Path,
                                                                           tmp_path: Path) -> None:
    from entrenar_cli.commands.cache import fill

    cfg = _config(tiny_llama, stdlib_text, tmp_path / "out", tmp_path / "a")
    written: list[Path] = []

    def stop_after_two(path: Path) -> None:
        written.append(path)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fill(cfg, shard_blocks=4, on_shard=stop_after_two)
    assert len(index_shards(tmp_path / "a")) == 8
    assert not json.loads((tmp_path / "a" / "manifest.json").read_text()).get("complete")
    resumed = fill(cfg, shard_blocks=4)
    assert resumed["filled"] == 8 and resumed["cached"] == resumed["total"] == 16  # only the missing blocks
    cfg.distillation.teacher_cache.dir = str(tmp_path / "b")
    whole = fill(cfg, shard_blocks=4)
    assert whole["filled"] == 16
    a, b = index_shards(tmp_path / "a"), index_shards(tmp_path / "b")
    from safetensors import safe_open

    for block in range(16):
        with safe_open(str(a[block]), "pt") as fa, safe_open(str(b[block]), "pt") as fb:
            assert torch.equal(fa.get_tensor(f"b{block}.rec"), fb.get_tensor(f"b{block}.rec"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["blocks_total"] == 16 and sum(manifest["shards"].values()) == 16
    assert manifest["version"] == CACHE_VERSION and manifest["bytes_per_token"] == 170
    assert str(tmp_path) not in json.dumps(manifest)  # no absolute paths: the cache can travel


def test_cache_made_in_one_directory_serves_a_run_in_another_and_verify_finds_damage(
        tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    cfg_file = tmp_path / "c.yaml"
    built = tmp_path / "built"
    cfg_file.write_text(_config_text(tiny_llama, stdlib_text, tmp_path / "out", built))
    cfg = _config(tiny_llama, stdlib_text, tmp_path / "out", built)
    result = runner.invoke(app, ["cache", str(cfg_file), "--shard-blocks", "8"])
    assert result.exit_code == 0, result.output
    # without a terminal the fill reports how far it is in plain lines, ending at all blocks
    assert re.search(r"^blocks \d+/16 \d+ tokens/s$", result.output, re.M) and "blocks 16/16 " in result.output
    moved = tmp_path / "elsewhere" / "cache"
    shutil.copytree(built, moved)  # another directory (as on another machine)
    result = runner.invoke(app, ["cache", "--verify", str(moved)])
    assert result.exit_code == 0 and "ok:" in result.output and "16 blocks" in result.output, result.output

    cfg.distillation.teacher_cache.dir = str(moved)
    cfg.output.dir = str(tmp_path / "run")
    summary = run(cfg, RunOptions(progress=False))
    assert summary["teacher_cache"]["hit_rate"] == 1.0 and summary["teacher_cache"]["misses"] == 0
    # a run whose inputs differ is refused, naming what differs
    cfg.distillation.temperature = 2.0
    with pytest.raises(ConfigError, match="differs in: temperature"):
        run(cfg, RunOptions(progress=False, overwrite=True))

    shards = sorted(moved.glob("blocks-*.safetensors"))
    raw = bytearray(shards[0].read_bytes())
    raw[-10] ^= 0xFF  # one flipped bit pattern in the data
    shards[0].write_bytes(bytes(raw))
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # a truncated shard
    result = runner.invoke(app, ["cache", "--verify", str(moved)])
    assert result.exit_code == 1, result.output
    assert f"{shards[0].name}: contents do not match the recorded SHA-256" in result.output
    assert f"{shards[1].name}: unreadable" in result.output
    assert "blocks of the completed fill are missing" in result.output
    result = runner.invoke(app, ["cache"])
    assert result.exit_code == 2 and "give a CONFIG" in result.output


def test_two_process_fill_equals_one_process_fill(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    one, two = tmp_path / "one", tmp_path / "two"
    for name, cache in (("one", one), ("two", two)):
        (tmp_path / f"{name}.yaml").write_text(_config_text(tiny_llama, stdlib_text, tmp_path / "out", cache,
                                                            num_threads=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "cache", str(tmp_path / "one.yaml")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "entrenar_cli", "cache",
                           str(tmp_path / "two.yaml")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["complete"] and m2["complete"] and m1["blocks_total"] == m2["blocks_total"] == 16
    assert {k: v for k, v in m1.items() if k != "shards"} == {k: v for k, v in m2.items() if k != "shards"}
    fmt = CacheFormat(m1["top_k"], m1["samples"], m1["vocab"], m1["temperature"])
    a = TeacherCache(one, m1, fmt, [], [], create=False)
    b = TeacherCache(two, m2, fmt, [], [], create=False)
    same_samples = 0.0
    for block in range(16):  # rank 1 ran other batches: equal up to float rounding of the teacher
        ra, rb = a.get([block], torch.device("cpu")), b.get([block], torch.device("cpu"))
        k = fmt.k
        assert torch.equal(ra["idx"][..., :k], rb["idx"][..., :k])
        assert torch.allclose(ra["vals"], rb["vals"], atol=1e-2) and torch.allclose(ra["tail"], rb["tail"], atol=1e-4)
        same_samples += float((ra["idx"][..., k:] == rb["idx"][..., k:]).float().mean()) / 16
    assert same_samples > 0.99


def test_fill_with_a_teacher_spread_over_memory_and_disk_equals_a_whole_teacher_fill(
        tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    """teacher.device_map (accelerate big-model loading): a cap of 300 KB of CPU memory puts the
    embeddings and head in memory and the transformer blocks on disk; the cache is the same."""
    from safetensors import safe_open

    from entrenar_cli.commands.cache import fill
    from entrenar_cli.models import is_dispatched
    from entrenar_cli.pipeline.distill import setup

    whole = _config(tiny_llama, stdlib_text, tmp_path / "out", tmp_path / "whole")
    text = _config_text(tiny_llama, stdlib_text, tmp_path / "out", tmp_path / "placed").replace(
        f"teacher:\n  model_id: {tiny_llama}\n",
        f"teacher:\n  model_id: {tiny_llama}\n  device_map: auto\n  max_memory: {{cpu: 300KB}}\n"
        f"  offload_dir: {tmp_path / 'offload'}\n")
    placed = validate_text(text, DistillationYamlConfig, "t.yaml")
    su = setup(placed, teacher_only=True)  # type: ignore[arg-type]
    assert is_dispatched(su.teacher) and "disk" in set(su.teacher.hf_device_map.values())
    assert "cpu" in set(su.teacher.hf_device_map.values())
    assert fill(whole)["filled"] == 16 and fill(placed)["filled"] == 16
    a, b = index_shards(tmp_path / "whole"), index_shards(tmp_path / "placed")
    for block in range(16):
        with safe_open(str(a[block]), "pt") as fa, safe_open(str(b[block]), "pt") as fb:
            assert torch.equal(fa.get_tensor(f"b{block}.rec"), fb.get_tensor(f"b{block}.rec"))
    # a run that would copy the teacher's layers into the student refuses a spread teacher, saying why
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    with pytest.raises(ConfigError, match="init_from_teacher copies the teacher's layers"):
        run(placed, RunOptions(progress=False))  # type: ignore[arg-type]


def test_distill_from_a_spread_teacher_into_its_own_student(tiny_llama: Path, tiny_tokenizer_dir: Path,
                                                            stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run
    from tests.conftest import make_tiny_llama

    student = make_tiny_llama(tmp_path / "student", tiny_tokenizer_dir, layers=2, seed=3)
    text = _config_text(tiny_llama, stdlib_text, tmp_path / "out", tmp_path / "cache", max_steps=3).replace(
        f"teacher:\n  model_id: {tiny_llama}\nstudent:\n  init_from_teacher: 2\n",
        f"teacher:\n  model_id: {tiny_llama}\n  device_map: auto\n  max_memory: {{cpu: 300KB}}\n"
        f"student:\n  model_id: {student}\n")
    cfg = validate_text(text, DistillationYamlConfig, "t.yaml")
    summary = run(cfg, RunOptions(progress=False))  # type: ignore[arg-type]
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["teacher_cache"]["misses"] > 0  # the spread teacher ran (and filled the cache)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in records if m["event"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
