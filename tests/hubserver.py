"""A real Hub-protocol server for tests: olah in offline mode, serving git repos we build.

``huggingface_hub`` talks to the Hub with its own HTTP client, so request mocking cannot stand in
for the Hub. Instead the tests start ``olah-cli`` (a Hugging Face mirror server from PyPI) on a
free port of 127.0.0.1 with ``[accessibility] offline = true``; in that mode it serves local git
repositories laid out as ``MIRRORS/models/ORG/NAME`` and ``MIRRORS/datasets/ORG/NAME`` (each a
plain git repo whose branch is ``main``; tags and extra refs work as revisions).

olah quirk: it sniffs every file of 121-149 bytes for a git-LFS pointer and decodes it as UTF-8,
so a binary file of that size breaks it. :func:`commit_files` refuses such files.

Also here: :func:`status_server`, a tiny stdlib server that answers every request with one HTTP
status and ``X-Error-Code`` (for gated/denied repos, which olah cannot imitate offline).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "entrenar-tests",
    "GIT_AUTHOR_EMAIL": "tests@entrenar.invalid",
    "GIT_COMMITTER_NAME": "entrenar-tests",
    "GIT_COMMITTER_EMAIL": "tests@entrenar.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV, "HOME": str(repo)}  # no user git config leaks in
    proc = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _check_size(name: str, data: bytes) -> None:
    if 120 < len(data) < 150:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{name} is {len(data)} bytes of binary: olah cannot serve binary files of 121-149 bytes"
            ) from None


def commit_files(
    repo: Path,
    files: Mapping[str, bytes | str | Path],
    message: str = "update",
    *,
    remove: tuple[str, ...] = (),
    tag: str | None = None,
) -> str:
    """Write ``files`` (repo path -> content or a file to copy) into ``repo``, commit; return the sha.

    Creates the git repository (branch ``main``) on first use.
    """
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q", "-b", "main")
    for rel, content in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = (content.read_bytes() if isinstance(content, Path)
                else content.encode() if isinstance(content, str) else content)
        _check_size(rel, data)
        target.write_bytes(data)
    for rel in remove:
        (repo / rel).unlink()
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    if tag:
        _git(repo, "tag", tag)
    return _git(repo, "rev-parse", "HEAD")


def set_ref(repo: Path, ref: str, commit: str) -> None:
    """Point a git ref (e.g. ``refs/convert/parquet``) at a commit."""
    _git(repo, "update-ref", ref, commit)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HubServer:
    """A running olah server: ``url`` goes into ``HF_ENDPOINT``; ``mirrors`` holds the git repos."""

    url: str
    root: Path
    mirrors: Path
    process: subprocess.Popen[bytes]
    log: Path
    repos: dict[str, Path] = field(default_factory=dict)

    def repo(self, repo_id: str, repo_type: str = "model") -> Path:
        """The git directory olah serves for ``repo_id`` (create it with :func:`commit_files`)."""
        return self.mirrors / f"{repo_type}s" / repo_id

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _olah_command(config: Path) -> list[str]:
    exe = Path(sys.executable).with_name("olah-cli")
    if exe.exists():
        return [str(exe), "-c", str(config)]
    found = shutil.which("olah-cli")
    if found:
        return [found, "-c", str(config)]
    return [sys.executable, "-c", "import sys; from olah.server import cli; sys.exit(cli())", "-c", str(config)]


def start_olah(root: Path, *, timeout: float = 60.0, attempts: int = 3) -> HubServer:
    """Start olah in offline mode on a free port under ``root`` and wait until it answers."""
    mirrors = root / "mirrors"
    for kind in ("models", "datasets"):
        (mirrors / kind).mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(attempts):
        port = free_port()
        config = root / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'repos-path = "{root / "olah-cache"}"\n'
            f'mirrors-path = ["{mirrors}"]\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        log = root / "olah.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                _olah_command(config), cwd=root, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        server = HubServer(url=f"http://127.0.0.1:{port}", root=root, mirrors=mirrors, process=proc, log=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(server.url):
                return server
            time.sleep(0.2)
        server.stop()
        last_error = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"olah did not start on 127.0.0.1; its log ends with:\n{last_error}")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/models/none/none/revision/main", timeout=2)
    except urllib.error.HTTPError:
        return True  # any HTTP answer (401 "repo not found") means it is serving
    except OSError:
        return False
    return True


@dataclass
class StatusServer:
    """A running :func:`status_server`: its URL and the Authorization headers it received."""

    url: str
    authorizations: list[str | None] = field(default_factory=list)


@contextlib.contextmanager
def status_server(status: int, error_code: str | None = None) -> Iterator[StatusServer]:
    """A server on 127.0.0.1 that answers every request with ``status`` (e.g. 401 + GatedRepo).

    Keeps the Authorization header of each request in memory (to check which token was sent).
    Used to show how gated and private repos are reported; olah offline cannot imitate them.
    """
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"error": "Access to this repository is restricted."}'
            self.send_response(status)
            if error_code:
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", "Access to this repository is restricted.")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield StatusServer(url=f"http://127.0.0.1:{httpd.server_address[1]}", authorizations=seen)
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- the fixture repositories -------------------------------------------------------------------

TINY_LLAMA = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=256, max_position_embeddings=128,
)
TOKENIZER_CONFIG = ('{"model_max_length": 128, "bos_token": "<s>", "eos_token": "</s>", '
                    '"tokenizer_class": "PreTrainedTokenizerFast"}\n')
README = "---\nlicense: mit\n---\n# fixture\nA tiny model for entrenar's tests.\n"


@dataclass
class FixtureHub:
    """Facts about the repos :func:`build_fixture_repos` created (ids, commits, sizes)."""

    server: HubServer
    commits: dict[str, str] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)


def tiny_llama_files(workdir: Path, *, seed: int = 0, max_shard_size: str | None = None) -> dict[str, Path]:
    """A real (random) 2-layer Llama saved with ``save_pretrained`` (SafeTensors); repo path -> file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    out = workdir / f"llama-{seed}-{max_shard_size or 'single'}"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return {p.name: p for p in sorted(out.iterdir()) if p.is_file()}


def pickle_weights(workdir: Path) -> Path:
    """``pytorch_model.bin``: a pickled state dict (what old repos ship)."""
    import torch

    path = workdir / "pytorch_model.bin"
    torch.save({"weight": torch.arange(300, dtype=torch.float32)}, path)
    return path


def tiny_gguf(workdir: Path, name: str, values: int) -> Path:
    """A small real GGUF file (one F32 tensor) written with the ``gguf`` package."""
    import gguf
    import numpy as np

    path = workdir / name
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(values, dtype=np.float32).reshape(-1, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def parquet_bytes(rows: list[dict[str, object]]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def build_fixture_repos(server: HubServer, workdir: Path) -> FixtureHub:
    """Create every repo the fetch tests use; return their commits and a few facts."""
    hub = FixtureHub(server=server)
    workdir.mkdir(parents=True, exist_ok=True)
    extras = {"tokenizer_config.json": TOKENIZER_CONFIG, "README.md": README}

    llama = tiny_llama_files(workdir)
    repo = server.repo("tests/tiny-llama")
    hub.commits["tiny-llama@v1"] = commit_files(repo, {**llama, **extras}, "v1", tag="v1")
    generation = llama["generation_config.json"].read_text().replace("\n}", ',\n  "temperature": 0.25\n}')
    hub.commits["tiny-llama@main"] = commit_files(repo, {"generation_config.json": generation}, "tune generation")

    sharded = tiny_llama_files(workdir, seed=1, max_shard_size="150KB")
    hub.facts["shards"] = sorted(n for n in sharded if n.endswith(".safetensors"))
    hub.commits["tiny-llama-sharded"] = commit_files(
        server.repo("tests/tiny-llama-sharded"), {**sharded, **extras}, "sharded"
    )

    pickled = pickle_weights(workdir)
    config = llama["config.json"]
    hub.commits["pickle-only"] = commit_files(
        server.repo("tests/pickle-only"),
        {"config.json": config, "pytorch_model.bin": pickled, "README.md": README},
        "pickle",
    )
    hub.commits["mixed"] = commit_files(
        server.repo("tests/mixed"),
        {
            **llama, **extras, "pytorch_model.bin": pickled, "training_args.bin": pickled,
            "modeling_custom.py": "raise SystemExit('remote code must never be fetched')\n" + "#" * 200 + "\n",
        },
        "mixed",
    )

    ggufs = {
        "tiny-f32.gguf": tiny_gguf(workdir, "tiny-f32.gguf", 512),
        "tiny-q8.gguf": tiny_gguf(workdir, "tiny-q8.gguf", 256),
    }
    hub.commits["gguf"] = commit_files(server.repo("tests/tiny-gguf"), {**ggufs, "README.md": README}, "gguf")

    good = llama["model.safetensors"].read_bytes()
    hub.facts["corrupt_size"] = len(good) - 4096
    hub.commits["corrupt"] = commit_files(
        server.repo("tests/corrupt"),
        {"config.json": config, "model.safetensors": good[: len(good) - 4096]},
        "truncated",
    )

    train = [{"text": f"train example {i}", "label": i % 2} for i in range(20)]
    test = [{"text": f"test example {i}", "label": i % 2} for i in range(5)]
    wiki = [{"text": f"wiki article {i}", "label": 0} for i in range(7)]
    hub.commits["tiny-text"] = commit_files(
        server.repo("tests/tiny-text", "dataset"),
        {
            "data/train-00000-of-00001.parquet": parquet_bytes(train),
            "data/test-00000-of-00001.parquet": parquet_bytes(test),
            "wiki/train-00000-of-00001.parquet": parquet_bytes(wiki),
            # the layout of the Hub's automatic conversion (refs/convert/parquet): {config}/{split}/NNNN.parquet
            "converted/train/0000.parquet": parquet_bytes(train[:9]),
            "converted/train/0001.parquet": parquet_bytes(train[9:]),
            "README.md": README,
        },
        "dataset",
    )
    hub.commits["csv-only"] = commit_files(
        server.repo("tests/csv-only", "dataset"),
        {"train.csv": "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(30))},
        "csv",
    )
    return hub
