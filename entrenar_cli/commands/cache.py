"""`entrenar cache`: run the teacher once over a config's training blocks and store compact targets.

``entrenar cache CONFIG`` fills ``distillation.teacher_cache.dir`` (default ``<output.dir>/teacher-cache``,
where ``distill`` looks) with the teacher's outputs for every training block, as its own step: on a
machine with a big accelerator, or under ``torchrun`` (rank r fills the blocks ``b % world == r``,
rank 0 writes the final manifest). An interrupted fill continues where it stopped: finished shards
are kept, only missing blocks are computed. ``entrenar cache --verify DIR`` reads every shard back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from entrenar_cli.commands.options import SetOption

# shards of about this many bytes: large sequential files, and at most one shard lost to an interruption
SHARD_BYTES = 32 << 20


def cache(
    config: Annotated[Optional[Path], typer.Argument(help="Distillation YAML whose teacher and data to cache.")] = None,
    set_: SetOption = None,
    verify_dir: Annotated[Optional[Path], typer.Option(
        "--verify", metavar="DIR", help="Check a cache: every shard readable, hashes and counts as recorded.")] = None,
    shard_blocks: Annotated[Optional[int], typer.Option(
        "--shard-blocks", min=1, help="Blocks per shard file (default: about 32 MiB per shard).")] = None,
    rebuild: Annotated[bool, typer.Option(
        "--rebuild",
        help="Delete the cache's shards and manifest first (a cache of another format or inputs).")] = False,
) -> None:
    """Precompute the teacher's outputs for a distillation config (resumable; shards under torchrun).

    \b
    Example: entrenar cache examples/configs/distill-smollm2.yaml --set distillation.teacher_cache.dir=tc
    Example: torchrun --nproc-per-node 4 -m entrenar_cli cache CONFIG
    Example: entrenar cache --verify tc
    """
    from entrenar_cli.errors import UsageError

    if (config is None) == (verify_dir is None):
        raise UsageError("give a CONFIG to fill a cache, or --verify DIR to check one (not both)",
                         hint="entrenar cache CONFIG | entrenar cache --verify DIR")
    if verify_dir is not None:
        _verify(verify_dir)
        return
    from entrenar_cli.config import DistillationYamlConfig

    cfg = DistillationYamlConfig.from_file(str(config), set_ or [])
    result = fill(cfg, shard_blocks=shard_blocks, rebuild=rebuild)
    from entrenar_cli.console import info

    info(f"teacher cache {result['dir']}: {result['filled']} blocks computed now, {result['cached']} of "
         f"{result['total']} cached, {result['bytes_per_token']:,} bytes/token, {result['size_bytes'] / 2**20:.1f} MiB"
         + (f", {result['tokens_per_s']:.0f} tokens/s" if result["filled"] else ""))


def _verify(directory: Path) -> None:
    from entrenar_cli.console import out
    from entrenar_cli.errors import EntrenarError, UsageError
    from entrenar_cli.teacher_cache import verify

    if not directory.is_dir():
        raise UsageError(f"--verify {directory}: no such directory")
    r = verify(directory)
    line = (f"{directory}: {r.shards} shards, {r.blocks} blocks, {r.bytes / 2**20:.1f} MiB"
            + (f" (fill complete: {r.expected_blocks} blocks)" if r.expected_blocks is not None
               else " (fill not completed)"))
    if r.problems:
        raise EntrenarError(f"teacher cache {directory} failed verification ({len(r.problems)} problems):\n  "
                            + "\n  ".join(r.problems[:20]) + (f"\n  ... {len(r.problems) - 20} more"
                                                             if len(r.problems) > 20 else ""),
                            hint="refill it: entrenar cache CONFIG (damaged shards are removed with --rebuild)")
    out.print(f"ok: {line}")


def _distributed() -> tuple[int, int]:
    from entrenar_cli.console import process_rank, world_size

    return process_rank(), world_size()


def _barrier(world: int) -> None:
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def fill(cfg: Any, *, shard_blocks: int | None = None, rebuild: bool = False,
         on_shard: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Fill the config's teacher cache with the blocks this process owns; rank 0 then seals the manifest.

    ``on_shard`` is called after each shard is written (tests interrupt a fill from it).
    """
    import torch

    from entrenar_cli.console import info
    from entrenar_cli.data import DistillationCollator
    from entrenar_cli.errors import ConfigError
    from entrenar_cli.fsutil import write_json_atomic
    from entrenar_cli.objectives import block_outputs, forward_kwargs
    from entrenar_cli.pipeline.distill import setup, teacher_cache_bytes_per_token, teacher_cache_spec
    from entrenar_cli.teacher_cache import TeacherCache, index_shards, read_manifest

    rank, world = _distributed()
    if cfg.distillation.kd_loss != "forward_kl":
        raise ConfigError("entrenar cache: the teacher cache serves kd_loss: forward_kl only")
    su = setup(cfg, teacher_only=True)
    if su.task == "masked":
        raise ConfigError("entrenar cache: masked-LM distillation masks tokens at random each step, so teacher "
                          "outputs cannot be cached", hint="distill encoders with an MLM head without a cache")
    spec = teacher_cache_spec(su)
    directory = spec["dir"] or Path(cfg.output.dir) / "teacher-cache"
    if rebuild and rank == 0:
        _clear(directory)
    _barrier(world)
    tc = TeacherCache(directory, spec["manifest"], spec["format"], spec["hidden"], spec["attention"])
    per_token = teacher_cache_bytes_per_token(su, spec)
    n = len(su.train_blocks)
    mine = [b for b in range(rank, n, world) if b not in tc]
    info(f"teacher cache {directory}: {n - len(tc)} of {n} blocks to compute ({world} process"
         f"{'es' if world > 1 else ''}), {per_token['total']:,} bytes/token (logits {per_token['logits']}, "
         f"hidden states {per_token['hidden_states']:,}, attention maps {per_token['attention_maps']:,})")
    device = su.device
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    from entrenar_cli.models import is_dispatched

    # a teacher spread over devices (teacher.device_map) stays where it was loaded: its hooks move
    # activations between devices and return outputs on the device of the inputs
    teacher = su.teacher if is_dispatched(su.teacher) else su.teacher.to(device)
    need_hidden = bool(spec["hidden"]) or su.task == "base"
    need_attn = bool(spec["attention"])
    collator = DistillationCollator(su.tokenizer.pad_token_id or 0, causal=su.train_blocks.causal)
    batch_size = cfg.training.batch_size
    block_bytes = max(1, per_token["total"] * cfg.dataset.max_length)
    per_shard = shard_blocks or max(batch_size, min(4096, SHARD_BYTES // block_bytes))
    pending: dict[str, Any] = {}
    pending_ids: list[int] = []
    start, tokens = time.perf_counter(), 0

    def flush() -> None:
        nonlocal pending, pending_ids
        if pending_ids:
            path = tc.write_shard(pending_ids, pending)
            pending, pending_ids = {}, []
            if on_shard is not None:
                on_shard(path)

    from entrenar_cli.console import TaskProgress, is_main_process

    # rank 0 reports its own share of the blocks left (about 1/world of them); without a terminal about
    # 20 lines in all
    progress = TaskProgress("teacher cache", len(mine), unit="blocks", enabled=is_main_process())
    say_every = max(batch_size, len(mine) // 20)
    said = 0
    try:
        with torch.no_grad():
            for i in range(0, len(mine), batch_size):
                ids = mine[i:i + batch_size]
                batch = collator.collate([su.train_blocks.block(j) for j in ids])
                batch = {k: v.to(device) for k, v in batch.items()}
                out = teacher(**forward_kwargs(batch, need_hidden, need_attn, teacher))
                pending.update(tc.encode_batch(ids, tc.compress(out, block_outputs)))
                pending_ids.extend(ids)
                tokens += int(batch["input_ids"].numel())
                if len(pending_ids) >= per_shard:
                    flush()
                done = i + len(ids)
                progress.advance(done)
                if done - said >= say_every or done == len(mine):
                    said = done
                    progress.say(done, f"{tokens / (time.perf_counter() - start):.0f} tokens/s")
            flush()
    finally:
        progress.close()  # an interrupted fill must not leave the terminal's cursor hidden
    elapsed = time.perf_counter() - start
    _barrier(world)
    index = index_shards(directory)
    if rank == 0:
        manifest = read_manifest(directory)
        counts: dict[str, int] = {}
        for path in index.values():
            counts[path.name] = counts.get(path.name, 0) + 1
        manifest.update(blocks_total=n, complete=all(b in index for b in range(n)), shards=dict(sorted(counts.items())))
        write_json_atomic(directory / "manifest.json", manifest)
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"dir": str(directory), "filled": len(mine), "cached": len(index), "total": n,
            "bytes_per_token": per_token["total"], "size_bytes": tc.size_bytes,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}


def _clear(directory: Path) -> None:
    """Remove what entrenar wrote in a cache directory (shards, manifest), nothing else."""
    if not directory.is_dir():
        return
    if not (directory / "manifest.json").is_file():
        from entrenar_cli.errors import UsageError

        raise UsageError(f"--rebuild: {directory} has no manifest.json, so it is not a teacher cache entrenar wrote",
                         hint="point distillation.teacher_cache.dir at a new or empty directory")
    for f in directory.glob("blocks-*.safetensors"):
        f.unlink()
    (directory / "manifest.json").unlink()


def register(app: typer.Typer) -> None:
    app.command()(cache)
