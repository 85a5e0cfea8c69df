"""Checkpoints without pickle: tensors in SafeTensors, everything else in JSON.

A checkpoint is a directory ``checkpoints/step-000010/`` built under a temporary name and renamed
into place, so a checkpoint that exists is complete; a process killed mid-write leaves only a
hidden ``.step-*.tmp`` directory that resume ignores.

Contents: ``trainable.safetensors`` (the parameters that train: the whole student, or only the
LoRA adapters and projection heads), ``optimizer.safetensors`` + ``optimizer.json`` (AdamW state),
``rng.safetensors`` (torch CPU/CUDA generator states) and ``trainer_state.json`` (step, epoch,
data position, scheduler state, counters).

A sharded (FSDP) run writes the same directory, except that parameters and optimizer state are in
``shards/``: torch distributed checkpoint, every process writing its own shards as SafeTensors
(``HuggingFaceStorageWriter(save_distributed=True)``: the shard offsets are JSON in each file's
header). DCP's default ``FileSystemWriter`` is avoided on purpose: its ``.metadata`` file is a pickle
that resume would ``pickle.load``. Optimizer hyper-parameters go to ``optimizer.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from entrenar_cli.fsutil import atomic_dir, record_written

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        meta_entry: dict[str, Any] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
                meta_entry[key] = "__tensor__"
            else:
                meta_entry[key] = value
        meta["state"][str(pid)] = meta_entry
    return tensors, meta


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "__tensor__" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep``."""
    target = checkpoint_root(output_dir) / f"step-{step:06d}"
    record_written(output_dir, target.parent.name)
    if target.parent.is_dir():
        for stale in target.parent.glob(".step-*"):  # leftovers of a write or prune killed midway
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        # written last: its presence marks a complete checkpoint even without the atomic rename
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    _prune(output_dir, keep)
    return target


def _rng_state() -> dict[str, torch.Tensor]:
    """The CPU and every CUDA device's generator state, as tensors SafeTensors can hold."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = state
    return rng


def _prune(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints.

    Each is renamed out of the listing first: a kill during the delete cannot leave a checkpoint that
    has its trainer_state.json but lost its weights.
    """
    for old in list_checkpoints(output_dir)[:-keep]:
        doomed = old.with_name(f".{old.name}.pruned")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, optimizer state dict, rng tensors, trainer state)."""
    trainable = load_file(str(path / "trainable.safetensors"))
    opt = _optimizer_from_flat(load_file(str(path / "optimizer.safetensors")),
                               json.loads((path / "optimizer.json").read_text()))
    rng = load_file(str(path / "rng.safetensors"))
    state = json.loads((path / "trainer_state.json").read_text())
    return trainable, opt, rng, state


SHARDS = "shards"


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDS).is_dir()


def save_sharded_checkpoint(
    output_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optimizer_meta: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    *,
    rank: int,
) -> Path:
    """Write checkpoint ``step`` of a sharded run: collective (every process calls it).

    ``tensors`` holds DTensors (each process writes its local shards) and replicated plain tensors
    (written once). Rank 0 creates the temporary directory and tells the others its name, everyone
    writes, then rank 0 adds the JSON/RNG files and renames the directory into place: a checkpoint
    that exists is complete, as in :func:`save_checkpoint`. The directory must be on a filesystem
    every process sees (one node: any; several nodes: a shared one).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    target = checkpoint_root(output_dir) / f"step-{step:06d}"

    def write_shards(tmp: Path) -> None:
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True, enable_consolidation=False)
        dcp.save(tensors, storage_writer=writer)

    if rank != 0:
        name: list[Any] = [None]
        dist.broadcast_object_list(name, src=0)
        write_shards(Path(name[0]))
        dist.barrier()  # rank 0 renamed the checkpoint into place
        return target
    record_written(output_dir, target.parent.name)
    if target.parent.is_dir():
        for stale in target.parent.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        with atomic_dir(target) as tmp:
            (tmp / SHARDS).mkdir()
            dist.broadcast_object_list([str(tmp)], src=0)
            write_shards(tmp)
            (tmp / "optimizer.json").write_text(json.dumps(optimizer_meta))
            save_file(_rng_state(), str(tmp / "rng.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _prune(output_dir, keep)
    finally:
        dist.barrier()
    return target


def load_sharded_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Fill ``tensors`` (the run's own DTensors and tensors, same keys as saved) in place from a
    sharded checkpoint, reading only SafeTensors and JSON (no pickle); collective. Any number of
    processes can read what any number wrote (the shard offsets are in the files).
    Returns (optimizer meta, rng tensors, trainer state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
    meta = json.loads((path / "optimizer.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    state = json.loads((path / "trainer_state.json").read_text())
    return meta, rng, state


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
