"""Model snapshots from the Hub (or a local directory), safe weights only unless asked otherwise.

Order of a fetch: resolve the revision to a commit, list the repo's files at that commit, choose
what to download (:func:`plan_model_files`: SafeTensors weights, single or sharded, plus config,
tokenizer and generation files; pickle weights only with ``allow_pickle``; GGUF files when asked
for), check the disk has room, download exactly those files with ``snapshot_download``, then
verify every SafeTensors header and GGUF magic. With ``HF_HUB_OFFLINE=1`` the same plan is made
from the cached snapshot and nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from entrenar_cli.errors import DataError, HubError, ModelError, UsageError
from entrenar_cli.hub import _env
from entrenar_cli.hub.verify import evict, verify_gguf, verify_safetensors


class WeightFormat(str, Enum):
    """Which weight files a fetch takes. Only ``pytorch`` (pickle) can run code when loaded."""

    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    PYTORCH = "pytorch"


# Pickle-based formats: loading one can execute arbitrary code, so they need an explicit opt-in.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files a model needs besides its weights (all plain data: JSON, text, sentencepiece protobuf).
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "adapter_config.json",  # a PEFT adapter repo: its weights are adapter_model.safetensors
)
_NEVER_AUX = PICKLE_SUFFIXES + (".py", ".safetensors", ".gguf", ".onnx", ".msgpack", ".h5")


def is_pickle(name: str) -> bool:
    """True for weight files stored with Python pickle (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ...)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


@dataclass(frozen=True)
class FetchOptions:
    """What to fetch and where. Builder methods return changed copies.

    Attributes:
        format: weight format to download (SafeTensors unless GGUF or pickle is asked for).
        revision: branch, tag or commit; ``None`` means ``main``.
        cache_dir: Hub cache to use; ``None`` means ``HF_HUB_CACHE`` / ``HF_HOME/hub``.
        local_dir: copy the files into this directory instead of the cache.
        allow_pickle: permit pickle weights (only when the repo has no SafeTensors ones).
        patterns: extra glob patterns to download (``--include``); for GGUF they pick the file.
    """

    format: WeightFormat = WeightFormat.SAFETENSORS
    revision: str | None = None
    cache_dir: Path | None = None
    local_dir: Path | None = None
    allow_pickle: bool = False
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", _coerce_format(self.format))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        for name in ("cache_dir", "local_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())

    def with_format(self, fmt: WeightFormat | str) -> FetchOptions:
        return dataclasses.replace(self, format=_coerce_format(fmt))

    def with_revision(self, revision: str | None) -> FetchOptions:
        return dataclasses.replace(self, revision=revision)

    def with_cache_dir(self, cache_dir: str | Path | None) -> FetchOptions:
        return dataclasses.replace(self, cache_dir=cache_dir)

    def with_local_dir(self, local_dir: str | Path | None) -> FetchOptions:
        return dataclasses.replace(self, local_dir=local_dir)

    def with_allow_pickle(self, allow: bool = True) -> FetchOptions:
        return dataclasses.replace(self, allow_pickle=allow)

    def with_patterns(self, *patterns: str) -> FetchOptions:
        return dataclasses.replace(self, patterns=self.patterns + tuple(patterns))


@dataclass(frozen=True)
class FileEntry:
    """One fetched file: its path inside the repo and its size on disk."""

    path: str
    size: int


@dataclass(frozen=True)
class ModelArtifact:
    """What a fetch produced: where it is, which weights, which commit, what model."""

    repo_id: str
    path: Path  # snapshot directory, --local-dir, or the local file/directory given
    format: WeightFormat
    revision: str | None  # resolved commit hash; None for a local path
    requested_revision: str | None
    files: tuple[FileEntry, ...]
    weight_files: tuple[str, ...]
    source: str  # "hub" (downloaded or refreshed), "cache" (offline) or "local"
    architecture: dict[str, Any] | None = None
    config: dict[str, Any] | None = field(default=None, repr=False)  # config.json as read
    parameters_in_files: int | None = None  # elements counted from the SafeTensors headers

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def sharded(self) -> bool:
        return any(name.endswith(".index.json") for name in self.weight_files)

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF file, when the artifact is one (a file path or the first ``.gguf`` weight)."""
        if self.path.is_file():
            return self.path if self.path.suffix == ".gguf" else None
        ggufs = [name for name in self.weight_files if name.endswith(".gguf")]
        return self.path / ggufs[0] if ggufs else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``--json`` output of ``entrenar fetch``)."""
        return {
            "repo_id": self.repo_id,
            "path": str(self.path),
            "format": self.format.value,
            "revision": self.revision,
            "requested_revision": self.requested_revision,
            "source": self.source,
            "sharded": self.sharded,
            "files": [{"path": f.path, "size": f.size} for f in self.files],
            "weight_files": list(self.weight_files),
            "total_size": self.total_size,
            "parameters_in_files": self.parameters_in_files,
            "architecture": self.architecture,
        }


@dataclass(frozen=True)
class _Plan:
    files: tuple[str, ...]
    weights: tuple[str, ...]
    format: WeightFormat


class HfModelFetcher:
    """Downloads model snapshots. ``HfModelFetcher.new()`` takes the token from ``HF_TOKEN``.

    The token is held privately and never appears in ``repr``, messages or recorded files.
    """

    def __init__(self, token: str | None = None, *, progress: Callable[[str], None] | None = None) -> None:
        self._token = token or None
        self.progress = progress

    @classmethod
    def new(cls, *, progress: Callable[[str], None] | None = None) -> HfModelFetcher:
        """A fetcher using ``HF_TOKEN`` (read now), or anonymous access when it is unset."""
        return cls(_env.env_token(), progress=progress)

    def with_token(self, token: str | None) -> HfModelFetcher:
        """A copy using ``token`` (``None`` keeps the current one)."""
        return HfModelFetcher(token or self._token, progress=self.progress)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def __repr__(self) -> str:
        return f"HfModelFetcher(token={'***' if self._token else None})"

    def download_model(self, repo_id: str, options: FetchOptions | None = None) -> ModelArtifact:
        """Fetch ``repo_id`` (or inspect it, when it is an existing local path) per ``options``."""
        options = options or FetchOptions()
        if options.format is WeightFormat.PYTORCH and not options.allow_pickle:
            raise UsageError(
                "--format pytorch downloads pickle weights, which can run arbitrary code when loaded",
                "add --allow-pickle if you trust this repo, or use --format safetensors",
            )
        local = as_local_path(repo_id)
        if local is not None:
            return inspect_local(local, options)
        if _env.sync_offline_flag():
            return self._from_cache(repo_id, options)
        return self._from_hub(repo_id, options)

    # -- online -----------------------------------------------------------------------------
    def _from_hub(self, repo_id: str, options: FetchOptions) -> ModelArtifact:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.hf_api import RepoFile

        cache_dir = options.cache_dir or _env.default_cache_dir()
        requested = options.revision or "main"
        ctx = self._context(repo_id, options, cache_dir)
        endpoint = _env.endpoint()
        api = HfApi(endpoint=endpoint, token=self._token)
        with _env.hub_errors(ctx):
            _validate_repo_id(repo_id)
            commit = api.repo_info(repo_id, repo_type="model", revision=requested).sha
            if not commit:
                raise HubError(f"the Hub gave no commit for model '{repo_id}' at '{requested}'",
                               "check HF_ENDPOINT points at a Hub server")
            sizes = {
                entry.path: int(entry.size)
                for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                if isinstance(entry, RepoFile)
            }

            def read_index(name: str) -> dict[str, Any]:
                local = hf_hub_download(
                    repo_id, name, revision=commit, cache_dir=cache_dir, local_dir=options.local_dir,
                    token=self._token, endpoint=endpoint,
                )
                return _read_json(Path(local))

            plan = plan_model_files(f"'{repo_id}'", list(sizes), options, read_index)
            base = options.local_dir or _env.storage_folder(cache_dir, repo_id, "model") / "snapshots" / commit
            needed = sum(sizes[f] for f in plan.files if not _present(base / f, sizes[f]))
            _check_disk_space(needed, options.local_dir or cache_dir, repo_id)
            self._say(
                f"fetching {len(plan.files)} file{'s' * (len(plan.files) != 1)} ({_human(needed)} to download) from "
                f"{repo_id}@{requested} (commit {commit[:12]})"
            )
            folder = snapshot_download(
                repo_id,
                revision=commit,
                allow_patterns=[_glob_escape(f) for f in plan.files],
                cache_dir=cache_dir,
                local_dir=options.local_dir,
                token=self._token,
                endpoint=endpoint,
            )
        if options.local_dir is None and requested != commit:
            _record_ref(_env.storage_folder(cache_dir, repo_id, "model"), requested, commit)
        return _finish(repo_id, Path(folder), plan, commit, options, "hub", expected_sizes=sizes)

    # -- offline ----------------------------------------------------------------------------
    def _from_cache(self, repo_id: str, options: FetchOptions) -> ModelArtifact:
        cache_dir = options.cache_dir or _env.default_cache_dir()
        requested = options.revision or "main"
        with _env.hub_errors(self._context(repo_id, options, cache_dir)):
            _validate_repo_id(repo_id)
        if options.local_dir is not None:
            base: Path | None = options.local_dir if _has_files(options.local_dir) else None
            commit = _local_dir_commit(options.local_dir) if base else None
        else:
            commit = cached_commit(cache_dir, repo_id, "model", requested)
            base = _env.storage_folder(cache_dir, repo_id, "model") / "snapshots" / commit if commit else None
        if base is None or not base.is_dir():
            where = options.local_dir or cache_dir
            raise HubError(
                f"model '{repo_id}' at revision '{requested}' is not in {where} and HF_HUB_OFFLINE is set",
                "fetch it once with network access (unset HF_HUB_OFFLINE), "
                "or point --cache-dir at the cache that has it",
            )
        names = list_local_files(base)
        plan = plan_model_files(
            f"the cached copy of '{repo_id}'", names, options, lambda n: _read_json(base / n),
            incomplete_hint="fetch it once with network access (unset HF_HUB_OFFLINE) to complete the cache",
        )
        self._say(f"using the cached {repo_id}@{requested} (commit {(commit or '?')[:12]}); HF_HUB_OFFLINE is set")
        return _finish(repo_id, base, plan, commit, options, "cache")

    def _context(self, repo_id: str, options: FetchOptions, cache_dir: Path) -> _env.HubContext:
        cached = (options.local_dir is None
                  and cached_commit(cache_dir, repo_id, "model", options.revision or "main") is not None)
        return _env.HubContext(
            repo_id=repo_id, repo_type="model", revision=options.revision, token=self._token,
            target=options.local_dir or cache_dir, cached=cached,
        )

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


# -- the plan: which files a fetch takes ------------------------------------------------------

def plan_model_files(
    label: str,
    names: Sequence[str],
    options: FetchOptions,
    read_index: Callable[[str], dict[str, Any]],
    *,
    incomplete_hint: str | None = None,
) -> _Plan:
    """Choose the files to fetch from a repo listing; refuse pickle weights unless allowed.

    SafeTensors: the shards named by ``*.safetensors.index.json`` (plus the index), else
    ``model.safetensors``, else every top-level ``*.safetensors``. Pickle (``allow_pickle``
    only, and only when no SafeTensors weights exist): the same rule for ``*.bin`` & co. GGUF:
    the ``.gguf`` file the patterns select (or the only one). Config, tokenizer and generation
    files come along in every case; ``patterns`` add more files.
    """
    names = sorted(names)
    top = [n for n in names if "/" not in n]
    aux = [n for n in top if _is_aux(n)]
    extra = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in options.patterns)]
    pickled_extra = [n for n in extra if is_pickle(n)]
    if pickled_extra and not options.allow_pickle:
        raise HubError(
            f"--include matches pickle files in {label}: {_listing(pickled_extra)}; "
            "pickle can run arbitrary code when loaded",
            "add --allow-pickle if you trust this repo, or narrow --include",
        )
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    fmt = options.format
    if fmt is WeightFormat.GGUF:
        if not ggufs:
            raise HubError(f"{label} has no .gguf files (it has: {_listing(names)})", "use --format safetensors")
        chosen = [n for n in ggufs if n in extra] if options.patterns else ggufs
        if not chosen:
            raise HubError(
                f"no .gguf file in {label} matches {', '.join(options.patterns)} (it has: {_listing(ggufs)})",
                "pass --include with a pattern that matches one of them",
            )
        if len(chosen) > 1 and not options.patterns:
            raise HubError(
                f"{label} has {len(chosen)} .gguf files: {_listing(chosen)}",
                "choose one with --include, e.g. --include '*Q4_K_M.gguf'",
            )
        weights = chosen
    else:
        weights = (
            []
            if fmt is WeightFormat.PYTORCH
            else _pick_weights(label, top, ".safetensors", "model.safetensors", read_index, incomplete_hint)
        )
        if not weights:
            pickles = [n for n in top if is_pickle(n)]
            if pickles and not options.allow_pickle:
                raise HubError(
                    f"{label} has only pickle weights ({_listing(pickles)}), which can run arbitrary code when "
                    f"loaded; entrenar does not download them by default. The repo has: {_listing(names)}",
                    "pass --allow-pickle if you trust this repo, or use a repo or revision with .safetensors weights",
                )
            if pickles:
                weights = _pick_weights(label, top, PICKLE_SUFFIXES, "pytorch_model.bin", read_index, incomplete_hint)
                fmt = WeightFormat.PYTORCH
        if not weights and not extra:
            hint = incomplete_hint or (
                "it has GGUF files: use --format gguf --include PATTERN" if ggufs
                else "pass --include PATTERN to fetch other files"
            )
            raise HubError(f"{label} has no model weights (it has: {_listing(names)})", hint)
    files = tuple(dict.fromkeys([*weights, *aux, *extra]))
    return _Plan(files=files, weights=tuple(weights), format=fmt)


def _pick_weights(
    label: str,
    top: list[str],
    suffixes: str | tuple[str, ...],
    single: str,
    read_index: Callable[[str], dict[str, Any]],
    incomplete_hint: str | None = None,
) -> list[str]:
    suffix_tuple = (suffixes,) if isinstance(suffixes, str) else suffixes
    indexes = [n for n in top if any(n.endswith(s + ".index.json") for s in suffix_tuple)]
    if indexes:
        preferred = single + ".index.json"
        index = preferred if preferred in indexes else indexes[0]
        try:
            weight_map = read_index(index)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} in {label} has no weight_map", "the repo's index file is malformed") from None
        missing = [s for s in shards if s not in top]
        if missing:
            raise HubError(f"{index} in {label} lists shards that are missing: {_listing(missing)}", incomplete_hint)
        return [index, *shards]
    if single in top:
        return [single]
    return [n for n in top if n.endswith(suffix_tuple) and not n.endswith(".index.json")]


def _is_aux(name: str) -> bool:
    lower = name.lower()
    return not lower.endswith(_NEVER_AUX) and any(fnmatch.fnmatchcase(name, p) for p in AUX_PATTERNS)


# -- local paths --------------------------------------------------------------------------------

def as_local_path(model_id: str) -> Path | None:
    """The path, when ``model_id`` names an existing file or directory; ``None`` for a Hub id.

    Something written like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.gguf``) that does
    not exist is a usage error rather than a Hub lookup that would fail with a confusing message.
    """
    path = Path(model_id).expanduser()
    if path.exists():
        return path
    looks_like_path = (
        model_id.startswith((".", "/", "~", "\\"))
        or model_id.count("/") > 1
        or model_id.endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES))
    )
    if looks_like_path:
        raise UsageError(f"local path not found: {model_id}", "check the path, or give a Hub id as ORG/NAME")
    return None


def inspect_local(path: Path, options: FetchOptions) -> ModelArtifact:
    """Check a local model file or directory the same way a download is checked (nothing is removed)."""
    label = f"local directory {path}" if path.is_dir() else f"local file {path}"
    if path.is_file():
        name = path.name
        if is_pickle(name) and not options.allow_pickle:
            raise ModelError(
                f"{path} is a pickle file, which can run arbitrary code when loaded",
                "pass --allow-pickle if you trust it, or convert it to .safetensors",
            )
        fmt = (WeightFormat.GGUF if name.endswith(".gguf")
               else WeightFormat.PYTORCH if is_pickle(name) else WeightFormat.SAFETENSORS)
        if fmt is WeightFormat.SAFETENSORS and not name.endswith(".safetensors"):
            raise UsageError(f"{path} is not a model file (.safetensors, .gguf) or directory")
        plan = _Plan(files=(name,), weights=(name,), format=fmt)
        artifact = _finish(str(path), path.parent, plan, None, options, "local", evict_bad=False)
        return dataclasses.replace(artifact, path=path)
    names = list_local_files(path)
    plan = plan_model_files(label, names, options, lambda n: _read_json(path / n))
    return _finish(str(path), path, plan, None, options, "local", evict_bad=False)


def list_local_files(base: Path) -> list[str]:
    """Repo-relative paths of the files under ``base`` (hidden ``.cache`` metadata left out)."""
    out = []
    for root, dirs, files in os.walk(base, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            full = Path(root) / name
            if name.startswith(".") or not full.exists():
                continue
            out.append(full.relative_to(base).as_posix())
    return sorted(out)


def cached_commit(cache_dir: Path, repo_id: str, repo_type: str, revision: str) -> str | None:
    """The commit the cache holds for ``revision`` (a commit hash, or a branch/tag via ``refs/``)."""
    storage = _env.storage_folder(cache_dir, repo_id, repo_type)
    if _env.COMMIT_RE.match(revision):
        return revision if (storage / "snapshots" / revision).is_dir() else None
    ref = storage / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if commit and (storage / "snapshots" / commit).is_dir() else None


# -- after download: verify, describe -----------------------------------------------------------

def _finish(
    repo_id: str,
    base: Path,
    plan: _Plan,
    commit: str | None,
    options: FetchOptions,
    source: str,
    *,
    expected_sizes: dict[str, int] | None = None,
    evict_bad: bool = True,
) -> ModelArtifact:
    """Verify every fetched file, then describe the result."""
    entries: list[FileEntry] = []
    parameters = 0
    for name in plan.files:
        path = base / name
        try:
            if not path.is_file():
                raise ModelError(f"{name} is missing from {base} after the download")
            size = path.stat().st_size
            expected = (expected_sizes or {}).get(name)
            if expected is not None and size != expected:
                raise ModelError(f"corrupt file {name}: {size} bytes on disk, "
                                 f"the Hub lists {expected} (truncated download?)")
            if name.endswith(".safetensors"):
                parameters += verify_safetensors(path).parameters
            elif name.endswith(".gguf"):
                verify_gguf(path)
        except (ModelError, DataError) as exc:
            if not evict_bad:
                raise
            evict(path, local_dir=options.local_dir)
            raise ModelError(
                exc.message,
                "it was removed from the cache: run the fetch again "
                "(if it fails again, the file on the Hub is damaged)",
            ) from None
        entries.append(FileEntry(name, size))
    config = _read_json(base / "config.json") if "config.json" in plan.files else None
    return ModelArtifact(
        repo_id=repo_id,
        path=base,
        format=plan.format,
        revision=commit,
        requested_revision=None if source == "local" else options.revision or "main",
        files=tuple(entries),
        weight_files=plan.weights,
        source=source,
        architecture=basic_architecture(config),
        config=config,
        parameters_in_files=parameters or None,
    )


def basic_architecture(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``config.json`` names directly; the fetch command adds the estimator's summary."""
    if config is None:
        return None
    return {"model_type": config.get("model_type"), "architectures": config.get("architectures")}


# -- the other entry points ---------------------------------------------------------------------

def resolve_model(
    model_id: str,
    *,
    revision: str | None = None,
    fmt: str = "safetensors",
    allow_pickle: bool = False,
    gguf_file: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
) -> Path:
    """A local path or Hub id to something ``from_pretrained`` can load.

    Local paths are checked and returned as they are; Hub ids are fetched (safe files only) and
    the snapshot directory is returned, or the ``.gguf`` file for ``fmt="gguf"``.
    """
    options = FetchOptions(
        format=_coerce_format(fmt),
        revision=revision,
        cache_dir=Path(cache_dir) if cache_dir else None,
        allow_pickle=allow_pickle,
        patterns=(gguf_file,) if gguf_file else (),
    )
    fetcher = HfModelFetcher(token) if token else HfModelFetcher.new()
    artifact = fetcher.download_model(model_id, options)
    if artifact.format is WeightFormat.GGUF:
        gguf = artifact.gguf_path
        assert gguf is not None, "a GGUF artifact always has a .gguf file"
        return gguf
    return artifact.path


def fetch_config_json(repo_id: str, revision: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Only ``config.json`` of a model (from a local directory or the Hub): enough to size it."""
    local = as_local_path(repo_id)
    if local is not None:
        path = local / "config.json" if local.is_dir() else local
        if not path.is_file() or path.suffix != ".json":
            raise ModelError(f"no config.json in {local}", "give a transformers model directory or its config.json")
        return _read_json(path)
    from huggingface_hub import hf_hub_download

    token = token or _env.env_token()
    is_offline = _env.sync_offline_flag()
    cache_dir = _env.default_cache_dir()
    ctx = _env.HubContext(
        repo_id=repo_id, revision=revision, token=token, target=cache_dir,
        cached=cached_commit(cache_dir, repo_id, "model", revision or "main") is not None,
    )
    from huggingface_hub import errors as hf_errors

    entry_missing = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)
    with _env.hub_errors(ctx):
        _validate_repo_id(repo_id)
        try:
            path = hf_hub_download(
                repo_id, "config.json", revision=revision, cache_dir=cache_dir, token=token,
                endpoint=_env.endpoint(), local_files_only=is_offline,
            )
        except (entry_missing, hf_errors.RepositoryNotFoundError) as exc:
            # mirrors may answer "repo not found" for a missing file: ask about the repo itself
            missing_file = isinstance(exc, entry_missing) or (
                not isinstance(exc, hf_errors.GatedRepoError) and _env.repo_exists(ctx, revision or "main")
            )
            if is_offline or not missing_file:
                raise
            raise HubError(
                f"model '{repo_id}' has no config.json",
                "memory estimates need a transformers model repo (GGUF-only repos have no config.json)",
            ) from None
    return _read_json(Path(path))


# -- helpers ------------------------------------------------------------------------------------

def _coerce_format(fmt: WeightFormat | str) -> WeightFormat:
    try:
        return WeightFormat(fmt)
    except ValueError:
        choices = ", ".join(f.value for f in WeightFormat)
        raise UsageError(f"unknown weight format '{fmt}'", f"use one of: {choices}") from None


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path.name} is not valid JSON: {exc}", f"the file at {path} is damaged") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a JSON object")
    return data


def _glob_escape(name: str) -> str:
    """An exact file name as an fnmatch pattern (``huggingface_hub`` filters with fnmatch)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(not p.name.startswith(".") for p in directory.iterdir())


def _local_dir_commit(local_dir: Path) -> str | None:
    """The commit recorded by ``huggingface_hub`` in ``--local-dir``'s download metadata."""
    meta = local_dir / ".cache" / "huggingface" / "download"
    for path in sorted(meta.rglob("*.metadata")) if meta.is_dir() else []:
        try:
            first = path.read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            continue
        if _env.COMMIT_RE.match(first):
            return first
    return None


def _record_ref(storage: Path, revision: str, commit: str) -> None:
    """Write ``refs/<revision>`` like ``huggingface_hub`` does, so offline runs find the snapshot."""
    from entrenar_cli.fsutil import write_text_atomic

    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        write_text_atomic(ref, commit)
    except OSError:
        pass  # the download is fine; only offline re-use by branch name would miss it


def _check_disk_space(needed: int, target: Path, repo_id: str) -> None:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(
            f"not enough disk space for '{repo_id}': it needs {_human(needed)}, {_human(free)} free under {probe}",
            "free some space, or pass --cache-dir / --local-dir on a disk with more room",
        )


def _human(n: int) -> str:
    from entrenar_cli.fsutil import human_bytes

    return human_bytes(n)


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "no files"


__all__ = [
    "AUX_PATTERNS",
    "PICKLE_SUFFIXES",
    "FetchOptions",
    "FileEntry",
    "HfModelFetcher",
    "ModelArtifact",
    "WeightFormat",
    "as_local_path",
    "cached_commit",
    "basic_architecture",
    "fetch_config_json",
    "inspect_local",
    "is_pickle",
    "list_local_files",
    "plan_model_files",
    "resolve_model",
]
