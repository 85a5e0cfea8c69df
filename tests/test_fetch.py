"""`entrenar fetch` and `entrenar_cli.hub` against a real Hub-protocol server (olah, offline mode).

One olah server and its git repos are built once per session (``fixture_hub``); every test gets
its own empty Hugging Face cache (``hub``), so what a test finds in the cache is what it fetched.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import hubserver
import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app

pytest.importorskip("olah", reason="the Hub tests need the olah server (pip install olah)")

runner = CliRunner()
TOKEN = "hf_entrenarTestSecret0123456789"


@pytest.fixture(scope="session")
def fixture_hub(tmp_path_factory: pytest.TempPathFactory) -> hubserver.FixtureHub:
    root = tmp_path_factory.mktemp("olah")
    server = hubserver.start_olah(root)
    try:
        hub = hubserver.build_fixture_repos(server, root / "work")
        yield hub
    finally:
        server.stop()


@pytest.fixture
def hub(fixture_hub: hubserver.FixtureHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> hubserver.FixtureHub:
    """The server as HF_ENDPOINT, an empty HF_HOME, online."""
    monkeypatch.setenv("HF_ENDPOINT", fixture_hub.server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return fixture_hub


def fetch(*args: str) -> tuple[int, dict | None, str]:
    """Run `entrenar fetch ARGS --json`; return (exit code, parsed stdout or None, all output)."""
    result = runner.invoke(app, ["fetch", *args, "--json"])
    doc = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, doc, result.output


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def file_names(doc: dict) -> set[str]:
    return {f["path"] for f in doc["files"]}


# -- models ---------------------------------------------------------------------------------------

def test_safetensors_model_fetched_and_loads_with_transformers(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    code, doc, output = fetch("tests/tiny-llama")
    assert code == 0, output
    assert doc["revision"] == hub.commits["tiny-llama@main"] and doc["requested_revision"] == "main"
    assert doc["format"] == "safetensors" and not doc["sharded"] and doc["source"] == "hub"
    assert file_names(doc) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"}
    assert doc["weight_files"] == ["model.safetensors"]
    path = Path(doc["path"])
    assert path == tmp_path / "hf" / "hub" / "models--tests--tiny-llama" / "snapshots" / hub.commits["tiny-llama@main"]
    assert doc["total_size"] == sum((path / f).stat().st_size for f in file_names(doc))
    assert doc["parameters_in_files"] == 106_816  # 2-layer Llama, hidden 64, vocab 256, untied head
    arch = doc["architecture"]  # from entrenar_cli.estimate.summarize_config
    assert (arch["model_type"], arch["num_layers"], arch["hidden_size"], arch["num_heads"], arch["num_kv_heads"]) == (
        "llama", 2, 64, 4, 2
    )
    assert arch["vocab_size"] == 256 and arch["parameters"] == 106_816
    assert arch["weights_bytes"]["fp32"] == 4 * 106_816 and arch["weights_bytes"]["bf16"] == 2 * 106_816
    assert (tmp_path / "hf/hub/models--tests--tiny-llama/refs/main").read_text() == hub.commits["tiny-llama@main"]

    # a second, independent client reads what was fetched
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) == 106_816
    original = load_file(hub.server.repo("tests/tiny-llama") / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_concurrent_fetches_of_one_repo_share_the_cache_safely(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    """Three processes fetch the same sharded repo at once (as parallel CI jobs do)."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-m", "entrenar_cli", "fetch", "tests/tiny-llama-sharded", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
    docs = [json.loads(out) for _, out, _ in results]
    assert len({d["path"] for d in docs}) == 1 and len({d["revision"] for d in docs}) == 1
    path, repo = Path(docs[0]["path"]), hub.server.repo("tests/tiny-llama-sharded")
    for name in file_names(docs[0]):
        assert (path / name).read_bytes() == (repo / name).read_bytes(), name
    blobs = tmp_path / "hf" / "hub" / "models--tests--tiny-llama-sharded" / "blobs"
    assert not [p.name for p in blobs.iterdir() if p.name.endswith(".incomplete")]


def test_human_report_names_commit_path_files_and_architecture(hub: hubserver.FixtureHub) -> None:
    result = runner.invoke(app, ["fetch", "tests/tiny-llama-sharded"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    commit = hub.commits["tiny-llama-sharded"]
    assert f"revision        main -> {commit}" in lines
    assert any(line.startswith("path ") and line.endswith(f"snapshots/{commit}") for line in lines)
    assert "weights         safetensors: 3 shards + index, 106,816 values in the files" in lines
    assert any(line.startswith("files           7 files, ") for line in lines)
    assert (
        "architecture    llama (LlamaForCausalLM): 2 layers, hidden 64, 4 heads (2 kv), vocab 256, 106,816 parameters"
        in lines
    )
    assert any(line.startswith("weights memory  fp32 417.25 KiB, bf16 208.62 KiB") for line in lines)
    assert "fetching 7 files" in result.stderr


def test_sharded_model_takes_index_and_every_shard(hub: hubserver.FixtureHub) -> None:
    code, doc, output = fetch("tests/tiny-llama-sharded")
    assert code == 0, output
    shards = hub.facts["shards"]
    assert doc["sharded"] and doc["weight_files"] == ["model.safetensors.index.json", *shards]
    index = json.loads((Path(doc["path"]) / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(doc["path"])
    assert sum(p.numel() for p in model.parameters()) == doc["parameters_in_files"] == 106_816


def test_pickle_only_repo_is_refused_unless_allowed(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    code, _, output = fetch("tests/pickle-only")
    assert code == 1
    assert "has only pickle weights (pytorch_model.bin)" in output
    assert "The repo has: README.md, config.json, pytorch_model.bin" in output
    assert "--allow-pickle" in output and "Traceback" not in output
    assert not any(name.endswith(".bin") for name in cache_files(tmp_path / "hf")), "nothing pickled downloaded"

    code, doc, output = fetch("tests/pickle-only", "--allow-pickle")
    assert code == 0, output
    assert doc["format"] == "pytorch" and doc["weight_files"] == ["pytorch_model.bin"]
    assert file_names(doc) == {"pytorch_model.bin", "config.json"}


def test_format_pytorch_needs_allow_pickle() -> None:
    result = runner.invoke(app, ["fetch", "tests/pickle-only", "--format", "pytorch"])
    assert result.exit_code == 2 and "add --allow-pickle" in result.output


def test_mixed_repo_fetches_only_safetensors(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    code, doc, output = fetch("tests/mixed", "--allow-pickle")  # even allowed, SafeTensors win
    assert code == 0, output
    assert doc["format"] == "safetensors" and doc["weight_files"] == ["model.safetensors"]
    assert file_names(doc) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"}
    on_disk = cache_files(tmp_path / "hf")
    assert not [n for n in on_disk if n.endswith((".bin", ".py"))], on_disk
    assert len([n for n in on_disk if "/blobs/" in n]) == 4


def test_include_pattern_cannot_smuggle_pickle(hub: hubserver.FixtureHub) -> None:
    code, _, output = fetch("tests/mixed", "--include", "*.bin")
    assert code == 1
    assert "--include matches pickle files in 'tests/mixed': pytorch_model.bin, training_args.bin" in output


def test_gguf_repo_needs_a_pattern_then_fetches_one_file(hub: hubserver.FixtureHub) -> None:
    code, _, output = fetch("tests/tiny-gguf", "--format", "gguf")
    assert code == 1 and "has 2 .gguf files: tiny-f32.gguf, tiny-q8.gguf" in output and "--include" in output

    code, doc, output = fetch("tests/tiny-gguf", "--format", "gguf", "--include", "*q8.gguf")
    assert code == 0, output
    assert doc["format"] == "gguf" and file_names(doc) == {"tiny-q8.gguf"}

    import gguf

    reader = gguf.GGUFReader(Path(doc["path"]) / "tiny-q8.gguf")
    assert [t.name for t in reader.tensors] == ["token_embd.weight"] and int(reader.tensors[0].n_elements) == 256

    from entrenar_cli.hub import resolve_model

    path = resolve_model("tests/tiny-gguf", fmt="gguf", gguf_file="tiny-f32.gguf")
    assert path.name == "tiny-f32.gguf" and path.is_file()
    assert int(gguf.GGUFReader(path).tensors[0].n_elements) == 512


def test_safetensors_repo_without_safetensors_points_to_gguf(hub: hubserver.FixtureHub) -> None:
    code, _, output = fetch("tests/tiny-gguf")
    assert code == 1 and "has no model weights" in output and "--format gguf" in output


def test_revision_pinning_by_tag_and_commit(hub: hubserver.FixtureHub) -> None:
    v1 = hub.commits["tiny-llama@v1"]
    code, doc, output = fetch("tests/tiny-llama", "--revision", "v1")
    assert code == 0, output
    assert doc["revision"] == v1 and doc["requested_revision"] == "v1"
    assert "temperature" not in json.loads((Path(doc["path"]) / "generation_config.json").read_text())

    code, doc, output = fetch("tests/tiny-llama", "--revision", v1)
    assert code == 0 and doc["revision"] == v1, output

    code, doc, output = fetch("tests/tiny-llama")
    assert code == 0 and doc["revision"] == hub.commits["tiny-llama@main"], output
    assert json.loads((Path(doc["path"]) / "generation_config.json").read_text())["temperature"] == 0.25


def test_revision_not_found(hub: hubserver.FixtureHub) -> None:
    code, _, output = fetch("tests/tiny-llama", "--revision", "no-such-branch")
    assert code == 1
    assert "revision 'no-such-branch' not found in model 'tests/tiny-llama'" in output
    assert "Traceback" not in output


def test_missing_repo_is_one_clear_error(hub: hubserver.FixtureHub) -> None:
    result = runner.invoke(app, ["fetch", "tests/does-not-exist"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"error: model 'tests/does-not-exist' not found on {hub.server.url}"
    assert "HF_TOKEN" in result.stderr and "Traceback" not in result.output


def test_corrupt_safetensors_is_reported_and_removed_from_cache(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    for _attempt in range(2):  # the second run must fail the same way, not trust a cached copy
        code, _, output = fetch("tests/corrupt")
        assert code == 1
        assert "corrupt SafeTensors file model.safetensors" in output and "truncated" in output
        assert "removed from the cache" in output
        storage = tmp_path / "hf" / "hub" / "models--tests--corrupt"
        snapshot = storage / "snapshots" / hub.commits["corrupt"]
        assert not (snapshot / "model.safetensors").exists() and not (snapshot / "model.safetensors").is_symlink()
        sizes = [p.stat().st_size for p in (storage / "blobs").iterdir()]
        assert hub.facts["corrupt_size"] not in sizes


def test_offline_reuses_the_cache_without_network(hub: hubserver.FixtureHub, monkeypatch: pytest.MonkeyPatch) -> None:
    code, first, output = fetch("tests/tiny-llama")
    assert code == 0, output
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hubserver.free_port()}")  # nothing listens there

    code, _, output = fetch("tests/tiny-llama")
    assert code == 1
    assert "cannot reach the Hub" in output
    assert "the local cache already has tests/tiny-llama@main: set HF_HUB_OFFLINE=1 to use it" in output

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, again, output = fetch("tests/tiny-llama")
    assert code == 0, output
    assert again["source"] == "cache"
    assert (again["path"], again["revision"], again["files"]) == (first["path"], first["revision"], first["files"])
    assert again["architecture"] == first["architecture"]

    from entrenar_cli.hub import resolve_model

    assert str(resolve_model("tests/tiny-llama")) == first["path"]

    code, _, output = fetch("tests/tiny-llama", "--revision", "v1")
    assert code == 1 and "is not in" in output and "HF_HUB_OFFLINE is set" in output


def test_local_dir_gets_plain_files_and_records_the_commit(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    code, doc, output = fetch("tests/tiny-llama", "--revision", "v1", "--local-dir", str(target))
    assert code == 0, output
    assert Path(doc["path"]) == target and doc["revision"] == hub.commits["tiny-llama@v1"]
    assert (target / "model.safetensors").is_file() and not (target / "model.safetensors").is_symlink()
    assert not (tmp_path / "hf" / "hub").exists(), "--local-dir leaves the cache alone"

    from entrenar_cli.hub import fetch_config_json, resolve_model

    assert resolve_model(str(target)) == target
    assert fetch_config_json(str(target))["hidden_size"] == 64
    code, local, output = fetch(str(target))
    assert code == 0 and local["source"] == "local" and local["revision"] is None, output
    assert local["parameters_in_files"] == 106_816


def test_hf_hub_cache_and_cache_dir_are_honoured(
    hub: hubserver.FixtureHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "env-cache"))
    code, doc, output = fetch("tests/tiny-gguf", "--format", "gguf", "-i", "tiny-q8.gguf")
    assert code == 0 and doc["path"].startswith(str(tmp_path / "env-cache" / "models--tests--tiny-gguf")), output
    code, doc, output = fetch("tests/tiny-gguf", "--format", "gguf", "-i", "tiny-q8.gguf",
                              "--cache-dir", str(tmp_path / "flag"))
    assert code == 0 and doc["path"].startswith(str(tmp_path / "flag" / "models--tests--tiny-gguf")), output


def test_fetch_config_json_downloads_only_the_config(
    hub: hubserver.FixtureHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from entrenar_cli.hub import fetch_config_json

    config = fetch_config_json("tests/tiny-llama-sharded")
    assert (config["model_type"], config["hidden_size"], config["num_key_value_heads"]) == ("llama", 64, 2)
    snapshot = tmp_path / "hf/hub/models--tests--tiny-llama-sharded/snapshots" / hub.commits["tiny-llama-sharded"]
    assert [p.name for p in snapshot.iterdir()] == ["config.json"]

    from entrenar_cli.errors import HubError

    with pytest.raises(HubError, match="has no config.json"):
        fetch_config_json("tests/tiny-gguf")

    # offline, a cache holding only config.json is not taken for a model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, output = fetch("tests/tiny-llama-sharded")
    assert code == 1 and (
        "the cached copy of 'tests/tiny-llama-sharded' has no model weights (it has: config.json)" in output
    )
    assert "fetch it once with network access" in output
    assert fetch_config_json("tests/tiny-llama-sharded") == config


def test_token_is_used_but_never_printed_or_recorded(
    hub: hubserver.FixtureHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = []
    for args in (["tests/tiny-llama", "--token", TOKEN], ["tests/nope", "--token", TOKEN]):
        result = runner.invoke(app, ["fetch", *args])
        outputs.append(result.output)
    assert "the token given cannot read it" in outputs[1]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    outputs.append(
        runner.invoke(app, ["fetch", "tests/tiny-llama", "--local-dir", str(tmp_path / "ld"), "--json"]).output
    )
    with hubserver.status_server(403) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outputs.append(runner.invoke(app, ["fetch", "tests/private"]).output)  # HF_TOKEN is sent
        outputs.append(runner.invoke(app, ["fetch", "tests/private", "--token", "hf_other"]).output)  # --token wins
    assert server.authorizations[0] == f"Bearer {TOKEN}" and server.authorizations[-1] == "Bearer hf_other"
    for text in outputs:
        assert TOKEN not in text
    for path in [*(tmp_path / "hf").rglob("*"), *(tmp_path / "ld").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    from entrenar_cli.hub import HfModelFetcher

    assert TOKEN not in repr(HfModelFetcher.new()) and HfModelFetcher.new().has_token


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [(401, "GatedRepo", "is gated"), (403, None, "access to model 'tests/private' denied (HTTP 403)")],
)
def test_gated_or_denied_repo_says_to_set_a_token(
    hub: hubserver.FixtureHub, monkeypatch: pytest.MonkeyPatch, status: int, code: str | None, expected: str
) -> None:
    with hubserver.status_server(status, code) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = runner.invoke(app, ["fetch", "tests/private"])
    assert result.exit_code == 1
    assert expected in result.stderr and "set HF_TOKEN or pass --token" in result.stderr
    assert "Traceback" not in result.output


# -- datasets -------------------------------------------------------------------------------------

def test_dataset_split_files_and_rows(hub: hubserver.FixtureHub) -> None:
    code, doc, output = fetch("--dataset", "tests/tiny-text")
    assert code == 0, output
    assert (doc["config"], doc["split"], doc["rows"], doc["columns"]) == ("default", "train", 20, ["text", "label"])
    assert file_names(doc) == {"data/train-00000-of-00001.parquet"}
    assert doc["revision"] == hub.commits["tiny-text"]

    from entrenar_cli.hub import HfDatasetFetcher, fetch_dataset_files

    paths = fetch_dataset_files("tests/tiny-text", split="test")
    assert [p.name for p in paths] == ["test-00000-of-00001.parquet"]
    table = HfDatasetFetcher.load_parquet(paths[0])
    assert table.num_rows == 5 and table.column("text").to_pylist()[0] == "test example 0"
    batches = list(HfDatasetFetcher.iter_batches(paths[0], batch_size=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]


@pytest.mark.parametrize(
    ("config", "files", "rows"),
    [
        ("wiki", ["wiki/train-00000-of-00001.parquet"], 7),
        ("converted", ["converted/train/0000.parquet", "converted/train/0001.parquet"], 20),
    ],
)
def test_dataset_config_subfolders(hub: hubserver.FixtureHub, config: str, files: list[str], rows: int) -> None:
    code, doc, output = fetch("--dataset", "tests/tiny-text", "--config", config)
    assert code == 0, output
    assert [f["path"] for f in doc["files"]] == files and doc["rows"] == rows and doc["config"] == config


def test_dataset_errors_list_what_exists(hub: hubserver.FixtureHub) -> None:
    code, _, output = fetch("--dataset", "tests/tiny-text", "--split", "validation")
    assert code == 1 and "has no split 'validation' in config 'default' (splits: test, train)" in output
    code, _, output = fetch("--dataset", "tests/tiny-text", "--config", "nope")
    assert code == 1 and "configs: converted, default, wiki" in output
    code, _, output = fetch("--dataset", "tests/csv-only")
    assert code == 1 and "has no Parquet files" in output
    code, _, output = fetch("--dataset", "tests/tiny-llama")
    assert code == 1 and "dataset 'tests/tiny-llama' not found" in output


def test_dataset_offline_reuse(hub: hubserver.FixtureHub, monkeypatch: pytest.MonkeyPatch) -> None:
    code, first, output = fetch("--dataset", "tests/tiny-text", "--split", "test")
    assert code == 0, output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hubserver.free_port()}")
    code, again, output = fetch("--dataset", "tests/tiny-text", "--split", "test")
    assert code == 0, output
    assert again["source"] == "cache" and (again["files"], again["rows"]) == (first["files"], 5)


# -- arguments, plans and checks without a server --------------------------------------------------

@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a model REPO_ID or --dataset NAME"),
        (["a/b", "--dataset", "c/d"], "not both"),
        (["--dataset", "c/d", "--include", "*.bin"], "--include applies to models, not to --dataset"),
        (["a/b", "--split", "test"], "--split needs --dataset"),
        (["a/b", "--cache-dir", "x", "--local-dir", "y"], "give --cache-dir or --local-dir, not both"),
        (["./no/such/dir"], "local path not found: ./no/such/dir"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["fetch", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_plan_prefers_index_shards_over_other_safetensors() -> None:
    from entrenar_cli.hub import FetchOptions
    from entrenar_cli.hub.models import plan_model_files

    names = [
        "config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer.model", "original/consolidated.00.pth", "modeling.py", "README.md",
    ]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    plan = plan_model_files("'x'", names, FetchOptions(), lambda name: index)
    assert plan.weights == (
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    )
    assert set(plan.files) == {*plan.weights, "config.json", "tokenizer.json", "tokenizer.model"}


def test_verify_safetensors_checks_offsets(tmp_path: Path) -> None:
    import struct

    from entrenar_cli.errors import ModelError
    from entrenar_cli.hub import verify_safetensors

    def write(header: dict, data: bytes) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / "t.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path

    good = write({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "__metadata__": {}}, bytes(24))
    summary = verify_safetensors(good)
    assert (summary.tensors, summary.parameters, summary.dtypes) == (1, 6, ("F32",))
    with pytest.raises(ModelError, match="lies outside the file"):
        verify_safetensors(write({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(20)))
    with pytest.raises(ModelError, match="needs 24"):
        verify_safetensors(write({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(20)))
    (tmp_path / "t.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ModelError, match="too short"):
        verify_safetensors(tmp_path / "t.safetensors")


def test_disk_full_maps_to_a_hub_error(tmp_path: Path) -> None:
    from entrenar_cli.errors import HubError
    from entrenar_cli.hub._env import HubContext, map_hub_error

    error = map_hub_error(OSError(errno.ENOSPC, "No space left on device"), HubContext("a/b", target=tmp_path))
    assert isinstance(error, HubError) and error.exit_code == 1
    assert error.message == f"disk full while downloading model 'a/b' under {tmp_path}" and "--cache-dir" in error.hint


def test_local_pickle_only_directory_refused(tmp_path: Path) -> None:
    from entrenar_cli.errors import HubError
    from entrenar_cli.hub import resolve_model

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle" * 20)
    with pytest.raises(HubError, match="only pickle weights") as info:
        resolve_model(str(tmp_path))
    assert "--allow-pickle" in info.value.hint
    assert resolve_model(str(tmp_path), allow_pickle=True) == tmp_path


def test_hub_package_imports_no_heavy_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys, entrenar_cli.hub, entrenar_cli.commands.fetch\n"
        "print([m for m in ('huggingface_hub', 'torch', 'transformers', 'pyarrow') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=os.environ.copy())
    assert proc.stdout.strip() == "[]", proc.stderr


def test_estimate_reads_a_hub_config_through_fetch_config_json(hub: hubserver.FixtureHub, tmp_path: Path) -> None:
    result = runner.invoke(app, ["estimate", "tests/tiny-llama-sharded", "--json"])
    if "not implemented yet" in result.output:
        pytest.skip("`entrenar estimate` is not built yet")
    assert result.exit_code == 0, result.output
    assert "106816" in result.stdout.replace(",", "").replace("_", "")  # exact parameter count of the fixture
    snapshot = tmp_path / "hf/hub/models--tests--tiny-llama-sharded/snapshots" / hub.commits["tiny-llama-sharded"]
    assert [p.name for p in snapshot.iterdir()] == ["config.json"], "estimate downloads no weights"
