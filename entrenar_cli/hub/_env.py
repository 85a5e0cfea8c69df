"""Hub settings read from the environment when a call is made, and Hub failures as user errors.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is
imported. A long-lived process (a notebook, the test suite) that changes them afterwards would get
the old values, so every entry point here reads them again and passes them explicitly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from entrenar_cli.errors import EntrenarError, HubError, UsageError

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
TOKEN_HINT = "set HF_TOKEN or pass --token with a token that can read it"


def endpoint() -> str:
    """The Hub URL: ``HF_ENDPOINT`` (a mirror) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE=1`` (or the older ``TRANSFORMERS_OFFLINE``): use the cache, make no request."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def env_token() -> str | None:
    """``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``); ``None`` when unset or empty."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def default_cache_dir() -> Path:
    """The Hub cache the ``hf`` CLI and transformers use, resolved the same way they resolve it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def storage_folder(cache_dir: Path, repo_id: str, repo_type: str) -> Path:
    """``models--ORG--NAME`` inside the cache (the layout ``huggingface_hub`` writes)."""
    return cache_dir / "--".join([f"{repo_type}s", *repo_id.split("/")])


def sync_offline_flag() -> bool:
    """Make ``huggingface_hub`` agree with ``HF_HUB_OFFLINE`` as it is now; return that value.

    The library blocks every request while its import-time copy of the flag is true, so a process
    that imported it offline could never go online again (and the reverse) without this.
    """
    value = offline()
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = value
    return value


def scrub(text: str, token: str | None) -> str:
    """Remove a token from text that may reach the user (error messages quote URLs and headers)."""
    if token:
        text = text.replace(token, "***")
    return re.sub(r"(Bearer\s+)\S+", r"\1***", text)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_connection_error(exc: BaseException) -> bool:
    """True for "no route to the Hub" failures from httpx, httpx2, requests or the OS.

    Matched by class name so the check holds across ``huggingface_hub`` versions (requests in
    0.x, httpx in 1.x, httpx2 in 2.x).
    """
    names = {
        "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
        "RemoteProtocolError", "ProxyError", "ConnectionError", "Timeout", "OfflineModeIsEnabled",
    }
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in names for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass
class HubContext:
    """What a failing call was about, so its error can name the repo and say what to do."""

    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    token: str | None = None
    target: Path | None = None  # where files were being written (for "disk full")
    cached: bool = False  # whether the cache already holds this repo at this revision

    @property
    def label(self) -> str:
        kind = "dataset" if self.repo_type == "dataset" else "model"
        return f"{kind} '{self.repo_id}'"


@contextlib.contextmanager
def hub_errors(ctx: HubContext) -> Iterator[None]:
    """Turn ``huggingface_hub`` and OS failures into one-line errors with a hint."""
    try:
        yield
    except EntrenarError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped below; anything unknown is re-raised as is
        mapped = map_hub_error(exc, ctx)
        if mapped is None:
            raise
        raise mapped from exc


def map_hub_error(exc: BaseException, ctx: HubContext) -> EntrenarError | None:
    """The user-facing error for ``exc``, or ``None`` when it is not a Hub/disk failure we know."""
    from huggingface_hub import errors as hf

    name = ctx.label
    rev = ctx.revision or "main"
    if isinstance(exc, hf.GatedRepoError):
        return HubError(
            f"{name} is gated: its files need a token from an account that accepted its terms",
            f"accept the terms on the repo's page, then {TOKEN_HINT}",
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return _revision_not_found(ctx)
    if isinstance(exc, hf.RepositoryNotFoundError):
        if ctx.revision and ctx.revision != "main" and repo_exists(ctx):
            return _revision_not_found(ctx)
        hint = "check the spelling (ORG/NAME)"
        hint += "; datasets are fetched with --dataset" if ctx.repo_type == "model" else ""
        hint += (
            "; the token given cannot read it if it is private or gated"
            if ctx.token
            else f"; if it is private or gated, {TOKEN_HINT}"
        )
        return HubError(f"{name} not found on {endpoint()}", hint)
    if isinstance(exc, getattr(hf, "DisabledRepoError", ())):
        return HubError(f"{name} has been disabled on the Hub", "use another repository")
    if isinstance(exc, hf.HFValidationError):
        return UsageError(
            f"'{ctx.repo_id}' is not a valid Hub repo id or an existing local path",
            "use ORG/NAME (e.g. HuggingFaceTB/SmolLM2-135M) or the path of a model directory",
        )
    status = _status_code(exc)
    if status in (401, 403):
        return HubError(f"access to {name} denied (HTTP {status})", TOKEN_HINT)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" under {ctx.target}" if ctx.target else ""
        return HubError(
            f"disk full while downloading {name}{where}",
            "free some space, or pass --cache-dir / --local-dir on a disk with more room",
        )
    if isinstance(exc, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)) and offline():
        return HubError(
            f"{name} at revision '{rev}' is not in the local cache and HF_HUB_OFFLINE is set",
            "fetch it once with network access (unset HF_HUB_OFFLINE), or check --cache-dir",
        )
    if is_connection_error(exc) or isinstance(exc, hf.LocalEntryNotFoundError):
        hint = (
            f"the local cache already has {ctx.repo_id}@{rev}: set HF_HUB_OFFLINE=1 to use it"
            if ctx.cached
            else "check the network connection, proxy settings and HF_ENDPOINT"
        )
        return HubError(f"cannot reach the Hub at {endpoint()} ({scrub(first_line(exc), ctx.token)})", hint)
    if isinstance(exc, getattr(hf, "RemoteEntryNotFoundError", hf.EntryNotFoundError)):
        return HubError(f"{name} has no such file at revision '{rev}': {scrub(first_line(exc), ctx.token)}")
    if status is not None and status >= 500:
        return HubError(f"the Hub answered HTTP {status} for {name}", "try again in a few minutes")
    if isinstance(exc, hf.HfHubHTTPError):
        return HubError(f"Hub request for {name} failed: {scrub(first_line(exc), ctx.token)}")
    return None


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _revision_not_found(ctx: HubContext) -> HubError:
    return HubError(
        f"revision '{ctx.revision}' not found in {ctx.label}",
        "pass a branch, tag or full commit hash that exists (the default is 'main')",
    )


def repo_exists(ctx: HubContext, revision: str | None = None) -> bool:
    """Whether the repo answers at ``revision`` (default branch when ``None``).

    Some servers (mirrors) answer "repo not found" for a missing revision or file; asking about
    the repo itself tells those cases apart.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=ctx.token)
    for rev in (revision,) if revision else (None, "main"):  # some mirrors need an explicit revision
        try:
            api.repo_info(ctx.repo_id, repo_type=ctx.repo_type, revision=rev)
        except Exception:  # noqa: BLE001 - any failure means we cannot tell; report "not found"
            continue
        return True
    return False
