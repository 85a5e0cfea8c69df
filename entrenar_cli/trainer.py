"""The training engine shared by ``distill`` and ``finetune``.

Fine-tuning is distillation without a teacher: both hand the engine a model, data blocks and an
*objective* that turns a micro-batch into loss sums. The engine owns everything else: devices and
mixed precision (through accelerate, so the same code runs under ``torchrun``/``accelerate
launch``), the optimizer and schedule, gradient accumulation with loss normalised once per
optimizer step over real tokens, clipping, non-finite step handling, evaluation, checkpoints and
resume, metrics and progress.

The loop reads in run order: ``train()`` -> ``_run_step()`` -> ``objective.loss_terms()``.

Multi-process runs are DDP by default; ``training.sharding: fsdp`` (or an accelerate FSDP config)
shards the student, its gradients and optimizer state, and the teacher, with FSDP2
(:mod:`entrenar_cli.sharding`); the loop, the token normalisation and the logs are the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from entrenar_cli import sharding
from entrenar_cli.checkpoint import (
    checkpoint_root,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    restore_rng,
    save_checkpoint,
    save_sharded_checkpoint,
)
from entrenar_cli.console import TaskProgress
from entrenar_cli.data import BlockDataset, DistillationCollator, epoch_order
from entrenar_cli.errors import TrainingError
from entrenar_cli.loss_terms import LossTerms, accumulate, means
from entrenar_cli.precision import precision_dtype, resolve_precision  # noqa: F401 - re-exported
from entrenar_cli.signals import STOP, pause_for_tests
from entrenar_cli.weight_average import WeightAverage

if TYPE_CHECKING:
    from entrenar_cli.config.schema import TrainingSettings


class Objective(Protocol):
    """What a run optimises. Sums, not means: the engine divides by the step's token count."""

    def loss_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> LossTerms:
        """One micro-batch's loss sums (per token and per sequence) and its counted tokens."""

    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """Held-out metrics (perplexity, KL to teacher, agreement, ...)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the model but not saved with it (e.g. hidden-state projections)."""

    def to(self, device: torch.device) -> None:
        """Move what the objective owns (a teacher, extra parameters) to the training device."""

    def compile(self, regional: bool) -> None:
        """torch.compile what the objective runs besides the model (a teacher).

        ``regional``: the model was compiled block by block (its output head outside any graph).
        """


def resolve_device(requested: str) -> torch.device:
    """auto: CUDA, then MPS, then CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def planned_steps(settings: Any, train_blocks: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps of the run, steps per epoch): the plan and the Engine count the same way."""
    per_epoch = train_blocks // (settings.batch_size * settings.gradient_accumulation * world)
    total = per_epoch * settings.epochs
    return (min(total, settings.max_steps) if settings.max_steps else total), per_epoch


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``s`` (0-based).

    1. linear warm-up from 1/(warmup+1) to 1 over ``warmup`` steps;
    2. then ``constant``, ``linear`` decay to 0, or ``cosine`` decay to 0 at step ``total``.
    """

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # blocks of this epoch's order already consumed (global, all processes)
    tokens: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    elapsed_s: float = 0.0
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineOptions:
    """Run-level switches that are not part of the YAML's training section."""

    output_dir: Path
    run: str = "distill"
    resume: bool = False
    keep_checkpoints: int = 2
    on_eval: Callable[[dict[str, Any]], None] | None = None
    progress: bool = True


class _Trainables(nn.Module):
    """The model and the objective's extra parameters under one module, so distributed checkpoint
    names every trained tensor by a path (``model.…``, ``extra.0``) for the sharded state dict."""

    def __init__(self, model: nn.Module, extra: list[nn.Parameter]):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra)


class Engine:
    """One training run: ``Engine(...).train()`` returns the summary of what happened."""

    def __init__(self, settings: TrainingSettings, model: nn.Module, objective: Objective, train_blocks: BlockDataset,
                 eval_blocks: BlockDataset, options: EngineOptions, *, pad_token_id: int = 0,
                 accelerator: Any = None, precision: str | None = None):
        from accelerate import Accelerator

        self.settings = settings
        self.opts = options
        self.objective = objective
        self.train_blocks = train_blocks
        self.eval_blocks = eval_blocks
        self.sharding = sharding.requested_sharding(settings)
        self.sharded = self.sharding == "fsdp"
        if self.sharded:
            sharding.check_supported(settings, model)
        self.accelerator = accelerator or Accelerator(cpu=resolve_device(settings.device).type == "cpu")
        self.device = self.accelerator.device
        # the pipelines resolve the precision once (their plan prints it) and pass it in
        self.precision = precision or resolve_precision(settings.mixed_precision, self.device)
        self.autocast_dtype = precision_dtype(self.precision)
        if self.device.type == "cpu":
            torch.set_num_threads(settings.num_threads or len(os.sched_getaffinity(0)))
        self.collator = DistillationCollator(pad_token_id, causal=train_blocks.causal)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process

        torch.manual_seed(settings.seed)
        if settings.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        self.teacher_sharded = False
        if self.sharded:
            self._shard(model)
        self.model = model.to(self.device)
        objective.to(self.device)
        if settings.compile:
            from entrenar_cli.models import compile_model

            # in place (nn.Module.compile): state_dict keys and saved checkpoints stay unchanged
            objective.compile(compile_model(self.model))
        extra = list(objective.extra_parameters())
        params = [p for p in self.model.parameters() if p.requires_grad] + extra
        if not params:
            raise TrainingError("nothing to train: every parameter is frozen")
        groups: list[Any] = [{"params": params}]
        if self.sharded and extra:  # AdamW's foreach kernels cannot mix DTensors and plain tensors in one group
            model_params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": model_params}, {"params": extra}] if model_params else [{"params": extra}]
        self.optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8, foreach=True)
        self._extra = extra
        self._trainables = _Trainables(self.model, extra) if self.sharded else None
        self.average: WeightAverage | None = None
        if settings.ema_decay is not None:
            self.average = WeightAverage(_trained_tensors(self.model), settings.ema_decay)
        self.total_steps = self._plan_steps()
        from entrenar_cli.chunking import fused_losses
        from entrenar_cli.models import output_vocab

        logit_path = getattr(objective, "logit_path", None)
        if logit_path is not None and fused_losses(settings, device_type=self.device.type,
                                                   vocab=output_vocab(self.model)):
            logit_path.fuse()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(settings.lr_scheduler, settings.warmup_steps, self.total_steps))
        if not self.sharded:  # sharded: FSDP2 already wraps the model; accelerate only launched the processes
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.scaler: Any = None
        if self.precision == "fp16" and self.device.type == "cuda":
            if self.sharded:  # skips the step on every process when any process saw inf/NaN
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler("cuda")
            else:
                self.scaler = torch.amp.GradScaler("cuda")
        self.state = TrainState()
        options.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = options.output_dir / "metrics.jsonl"
        self.resumed_checkpoint: Path | None = None
        self._eval_cache: list[dict[str, Tensor]] | None = None
        self._window = _Window(time.perf_counter())
        self._trackers: Any = None  # entrenar_cli.tracking.Trackers, opened on the first log record
        if self.is_main and settings.report_to:
            from entrenar_cli.tracking import check_available

            check_available(list(settings.report_to))  # before the first step, not at the first log line

    # ---- sharding -------------------------------------------------------------------------

    def _shard(self, model: nn.Module) -> None:
        """FSDP2 over every process: the student always; the teacher too unless a teacher cache is on.

        A cached run calls the teacher only for blocks missing from the cache, and which blocks miss
        differs between processes; a sharded forward is a collective every process must join, so a
        cached run keeps the teacher whole on each device (it is called rarely, and the cache is what
        saves its memory and time). fully_shard moves each unit to the device as it shards it, so no
        device ever holds a whole model.
        """
        sharding.ensure_process_group(self.device)
        mesh = sharding.device_mesh(self.device)
        policy = sharding.mixed_precision_policy(self.precision)
        sharding.shard(model, mesh, policy)
        teacher = getattr(self.objective, "teacher", None)
        if isinstance(teacher, nn.Module) and getattr(self.objective, "cache", None) is None:
            sharding.shard(teacher, mesh, policy)
            self.teacher_sharded = True

    def gather_model(self) -> None:
        """Gather the full student to rank 0 (collective; sharded runs only): afterwards rank 0's
        ``unwrap_model(engine.model)`` is a plain model to save, the other ranks keep shards."""
        if self.sharded and sharding.is_sharded(self.model):
            sharding.gather_to_rank0(self.model, self.rank)

    # ---- plan -----------------------------------------------------------------------------

    @property
    def blocks_per_step(self) -> int:
        """Blocks consumed per optimizer step over all processes."""
        return self.settings.batch_size * self.settings.gradient_accumulation * self.world

    def steps_per_epoch(self) -> int:
        return len(self.train_blocks) // self.blocks_per_step

    def _plan_steps(self) -> int:
        per_epoch = self.steps_per_epoch()
        if per_epoch == 0:
            raise TrainingError(
                f"the training split has {len(self.train_blocks)} blocks, fewer than one optimizer step needs "
                f"({self.blocks_per_step} = batch_size x gradient_accumulation x processes)",
                hint="add data, or lower training.batch_size, gradient_accumulation or dataset.max_length",
            )
        return planned_steps(self.settings, len(self.train_blocks), self.world)[0]

    # ---- data -----------------------------------------------------------------------------

    def _step_batches(self) -> list[dict[str, Tensor]]:
        """This process's micro-batches for the next optimizer step (advances the data position)."""
        per_epoch_blocks = self.steps_per_epoch() * self.blocks_per_step
        if self.state.position >= per_epoch_blocks:
            self.state.epoch += 1
            self.state.position = 0
        order = epoch_order(len(self.train_blocks), self.settings.seed, self.state.epoch)
        start = self.state.position
        step_ids = order[start : start + self.blocks_per_step]
        self.state.position += self.blocks_per_step
        mine = step_ids[self.rank :: self.world]  # interleaved shard: process r takes every world-th block
        batches = []
        for i in range(0, len(mine), self.settings.batch_size):
            ids = [int(j) for j in mine[i : i + self.settings.batch_size]]
            batch = self.collator.collate([self.train_blocks.block(j) for j in ids])
            batch["block_ids"] = torch.tensor(ids)  # lets the objective find cached teacher outputs
            batches.append(self._to_device(batch))
        return batches

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def eval_batches(self) -> list[dict[str, Tensor]]:
        """The fixed held-out batches (the same every evaluation: built once)."""
        if self._eval_cache is not None:
            return self._eval_cache
        n = min(len(self.eval_blocks), self.settings.eval_batches * self.settings.batch_size)
        out = []
        for i in range(0, n, self.settings.batch_size):
            blocks = [self.eval_blocks.block(j) for j in range(i, min(n, i + self.settings.batch_size))]
            out.append(self._to_device(self.collator.collate(blocks)))
        self._eval_cache = out
        return out

    # ---- one optimizer step ---------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.precision in ("bf16", "fp16"):
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return torch.autocast(self.device.type, enabled=False)

    def _run_step(self, batches: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
        """Forward/backward over the step's micro-batches; loss normalised by the step's tokens."""
        batches = self._step_batches() if batches is None else batches
        if hasattr(self.objective, "set_progress"):  # loss-weight schedules (distillation.alpha_end)
            self.objective.set_progress(self.state.step / max(1, self.total_steps - 1))
        if hasattr(self.objective, "prepare_step"):  # on-policy distillation: the student's continuations join
            with self._autocast():
                batches = self.objective.prepare_step(self.accelerator.unwrap_model(self.model), batches,
                                                      step=self.state.step, seed=self.settings.seed, rank=self.rank)
        n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        n_seqs = sum(int(b["input_ids"].shape[0]) for b in batches)
        counts = torch.tensor([n_tokens, n_seqs], dtype=torch.float64, device=self.device)
        if self.world > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        # DDP averages gradients over processes; scaling by world makes the result the global mean
        tok_norm = self.world / max(1.0, float(counts[0]))
        seq_norm = self.world / max(1.0, float(counts[1]))
        logged: dict[str, Tensor | float] = {}
        self.model.train()
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # FSDP reduce-scatters every micro-batch: skipping it would keep a full gradient per device
            sync = (self.accelerator.no_sync(self.model) if (not last and self.world > 1 and not self.sharded)
                    else contextlib.nullcontext())
            with sync:
                with self._autocast():
                    terms = self.objective.loss_terms(self.model, batch)
                loss = terms.objective(tok_norm, seq_norm)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                elif self.sharded:
                    loss.backward()
                else:
                    self.accelerator.backward(loss)
            accumulate(logged, terms.totals(sequences=batch["input_ids"].shape[0]))
        # the objective's own parameters (hidden-state projections) are outside DDP/FSDP: average them here
        sharding.average_gradients(self._extra)
        return logged

    def _optimizer_step(self) -> float:
        """Clip, check for non-finite gradients, step; returns the gradient norm (inf if skipped)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm else float("inf")
        if self.sharded:
            norm_value = sharding.clip_grad_norm(params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm_value = float(norm)  # the one sync per step: decides skip vs step
        if not math.isfinite(norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return float("inf")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm_value

    # ---- evaluation -----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the model training saves: the weight average when ``ema_decay`` is set."""
        self.model.eval()
        with torch.no_grad(), self._autocast(), self.averaged():
            metrics = self.objective.evaluate(self.accelerator.unwrap_model(self.model), self.eval_batches())
        return metrics

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """A block in which the model holds the weight average (its own weights again after it); a no-op
        without ``ema_decay`` or once training has put the average in for good."""
        if self.average is None:
            return contextlib.nullcontext()
        return self.average.applied()

    # ---- checkpoints ----------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        out = _trained_tensors(model)
        for i, p in enumerate(self.objective.extra_parameters()):
            out[f"extra.{i}"] = p
        if self.average is not None:
            out.update(self.average.state())
        return out

    def _sharded_state(self) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(flat tensors for DCP, optimizer JSON meta, model state dict, optimizer state dict).

        Trainable tensors only (a LoRA run's frozen base is not in checkpoints); a tied weight is
        stored under its first name. Optimizer state is keyed by parameter path, not position.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        assert self._trainables is not None
        msd, osd = get_state_dict(self._trainables, self.optimizer,
                                  options=StateDictOptions(ignore_frozen_params=True))
        aliases = self._aliases()
        tensors = {f"model/{k}": v for k, v in msd.items() if k not in aliases and torch.is_tensor(v)}
        if self.average is not None:  # this process's shards of the average, restored in place on resume
            tensors.update({f"ema/{k}": v for k, v in self.average.shadow.items()})
        meta: dict[str, Any] = {"param_groups": osd["param_groups"], "state": {}}
        for fqn, entry in osd["state"].items():
            meta_entry: dict[str, Any] = {}
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optim/{fqn}/{key}"] = value
                    meta_entry[key] = "__tensor__"
                else:
                    meta_entry[key] = value
            meta["state"][fqn] = meta_entry
        return tensors, meta, msd, osd

    def _aliases(self) -> dict[str, str]:
        """Second names of shared (tied) parameters -> their first name."""
        assert self._trainables is not None
        first: dict[int, str] = {}
        out: dict[str, str] = {}
        for name, p in self._trainables.named_parameters(remove_duplicate=False):
            if id(p) in first:
                out[name] = first[id(p)]
            else:
                first[id(p)] = name
        return out

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if self.sharded:
            tensors, meta, _, _ = self._sharded_state()  # collective: every process
            self.state.scheduler = self.scheduler.state_dict()
            state = dict(vars(self.state))
            state.update(total_steps=self.total_steps, world=self.world, sharding="fsdp")
            return save_sharded_checkpoint(self.opts.output_dir, self.state.step, tensors, meta, state,
                                           keep=self.opts.keep_checkpoints, rank=self.rank)
        if not self.is_main:
            return None
        self.state.scheduler = self.scheduler.state_dict()
        state = dict(vars(self.state))
        state["total_steps"] = self.total_steps
        state["world"] = self.world
        return save_checkpoint(self.opts.output_dir, self.state.step, self.trainable_state(), self.optimizer,
                               state, keep=self.opts.keep_checkpoints)

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.opts.output_dir)
        if ckpt is None:
            return False
        if is_sharded_checkpoint(ckpt) != self.sharded:
            written = "sharded (FSDP)" if is_sharded_checkpoint(ckpt) else "not sharded"
            raise TrainingError(f"{ckpt} was written by a run that was {written}; this run is "
                                + ("sharded" if self.sharded else "not sharded"),
                                hint="resume with the same training.sharding (and launcher) as the first run")
        if self.sharded:
            return self._resume_sharded(ckpt)
        trainable, opt_state, rng, state = load_checkpoint(ckpt)
        self.resumed_checkpoint = ckpt
        current = self.trainable_state()
        if set(trainable) != set(current):
            raise TrainingError(f"{ckpt} does not match this run's trainable parameters",
                                hint="resume with the same config, or use --overwrite to start again")
        with torch.no_grad():
            for k, v in trainable.items():
                current[k].copy_(v.to(current[k].device))
        self.optimizer.load_state_dict(opt_state)
        restore_rng(rng)
        sched = state.pop("scheduler", {})
        for key in ("total_steps", "world"):
            state.pop(key, None)
        self.state = TrainState(**state)
        if sched:
            self.scheduler.load_state_dict(sched)
        return True

    def _resume_sharded(self, ckpt: Path) -> bool:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        tensors, _, msd, osd = self._sharded_state()  # this run's tensors: DCP reads into them
        from safetensors import safe_open

        saved: set[str] = set()
        for f in sorted((ckpt / "shards").glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                saved.update(fh.keys())
        if saved != set(tensors):
            raise TrainingError(f"{ckpt} does not match this run's trainable parameters",
                                hint="resume with the same config, or use --overwrite to start again")
        meta, rng, state = load_sharded_checkpoint(ckpt, tensors)
        for alias, first in self._aliases().items():
            if alias in msd and first in msd:
                msd[alias] = msd[first]
        for fqn, entry in meta["state"].items():
            osd["state"][fqn] = {k: (tensors[f"optim/{fqn}/{k}"] if v == "__tensor__" else v)
                                 for k, v in entry.items()}
        for group, saved_group in zip(osd["param_groups"], meta["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        set_state_dict(self._trainables, self.optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        self.resumed_checkpoint = ckpt
        restore_rng(rng)
        sched = state.pop("scheduler", {})
        for key in ("total_steps", "world", "sharding"):
            state.pop(key, None)
        self.state = TrainState(**state)
        if sched:
            self.scheduler.load_state_dict(sched)
        return True

    # ---- the loop -------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and send it to the configured trackers (rank 0 only)."""
        if not self.is_main:
            return
        import json

        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self._tracker_log(record)

    def _tracker_log(self, record: dict[str, Any]) -> None:
        names = list(self.settings.report_to)
        if not names:
            return
        if self._trackers is None:
            import yaml

            from entrenar_cli.fsutil import record_written
            from entrenar_cli.tracking import open_trackers

            record_written(self.opts.output_dir, "trackers")  # this run's output: --overwrite may remove it
            resolved = self.opts.output_dir / "resolved_config.yaml"
            config = yaml.safe_load(resolved.read_text(encoding="utf-8")) if resolved.is_file() else {}
            self._trackers = open_trackers(names, run_name=f"{self.opts.output_dir.name}-{self.opts.run}",
                                           logging_dir=self.opts.output_dir / "trackers", config=config or {})
        self._trackers.log(record)

    def finish_trackers(self) -> None:
        """Close the trackers (end the MLflow/W&B run); safe to call more than once."""
        if self._trackers is not None:
            self._trackers.finish()

    def train(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run until ``total_steps``; returns {status, steps, tokens, elapsed_s, tokens_per_s, eval}.

        A sharded run that completes ends by gathering the full student to rank 0
        (:meth:`gather_model`), so callers save ``unwrap_model(engine.model)`` there as for DDP.

        SIGINT/SIGTERM only set :data:`~entrenar_cli.signals.STOP` from the first step through the
        final evaluation (the pipelines keep it on until the final model is saved): the current step
        finishes and a checkpoint is written, and a second signal cannot break that write.
        """
        with STOP:
            return self._train(on_log)

    def _resume_and_say(self) -> int | None:
        """--resume: load the newest checkpoint and say where the run continues."""
        from entrenar_cli.console import info

        if not self.resume():
            info(f"--resume: no checkpoint in {checkpoint_root(self.opts.output_dir)}; starting at step 0")
            return None
        info(f"resumed from step {self.state.step} of {self.total_steps}, checkpoint {self.resumed_checkpoint}")
        return self.state.step

    def _stop_agreed(self) -> bool:
        """Whether to stop now: any process saw SIGINT/SIGTERM. Processes must agree, because the
        interrupt checkpoint is collective (and the next step's gradient reduction too); a signal
        reaches them at slightly different moments."""
        stop = STOP.signal is not None
        if self.world == 1:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        return bool(float(self.accelerator.reduce(flag, reduction="sum")) > 0)

    def _train(self, on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """The loop in run order: resume, steps (skip non-finite, log, evaluate, checkpoint), final
        checkpoint or evaluation, result."""
        resumed_from = self._resume_and_say() if self.opts.resume else None
        self._window = _Window(time.perf_counter() - self.state.elapsed_s)
        status = "completed"
        progress = TaskProgress("train", self.total_steps, unit="step", enabled=self.opts.progress and self.is_main,
                                start=self.state.step)
        try:
            while self.state.step < self.total_steps:
                if self._stop_agreed():
                    status = "interrupted"
                    break
                logged = self._run_step()
                norm = self._optimizer_step()
                self.scheduler.step()
                self.state.step += 1
                if not self._count_step(logged, norm):
                    continue
                progress.advance(self.state.step)
                if self.state.step % self.settings.logging_steps == 0 or self.state.step == self.total_steps:
                    record = self._log_window(norm)
                    progress.say(record["step"], _step_line(record))
                    if on_log:
                        on_log(record)
                self._periodic_eval_and_checkpoint()
        finally:
            progress.close()
            self.state.elapsed_s = self._window.elapsed()
            if status == "interrupted" and self.state.step > 0:
                pause_for_tests("the interrupt checkpoint")
                self.save_checkpoint()  # so that --resume continues exactly here
        last_eval: dict[str, float] = {}
        if status == "completed":
            if self.average is not None:
                self.average.apply()  # the model the pipeline saves
                self.average = None
            last_eval = self._eval_and_log()
            self.gather_model()  # sharded: rank 0 now holds the whole model for the pipeline to save
        self.finish_trackers()
        return self._result(status, resumed_from, last_eval)

    def _count_step(self, logged: dict[str, Any], norm: float) -> bool:
        """Book the optimizer step just taken; False for a skipped (non-finite) one, an error after
        ``max_bad_steps`` of them in a row."""
        if not math.isfinite(norm):
            self.state.skipped_steps += 1
            self.state.bad_in_row += 1
            if self.state.bad_in_row >= self.settings.max_bad_steps:
                raise TrainingError(
                    f"{self.state.bad_in_row} optimizer steps in a row had non-finite loss or gradients "
                    f"(step {self.state.step})",
                    hint="lower training.learning_rate; with fp16 try bf16 or fp32 "
                    "(training.mixed_precision); the last good checkpoint is kept",
                )
            return False
        self.state.bad_in_row = 0
        if self.average is not None:
            self.average.update(self.state.step)
        accumulate(self._window.acc, logged)
        step_tokens = int(logged["tokens"]) * self.world
        self.state.tokens += step_tokens
        self._window.tokens += step_tokens
        return True

    def _log_window(self, norm: float) -> dict[str, Any]:
        """The train record for the steps since the last one (global means under several processes)."""
        w = self._window
        now = time.perf_counter()
        acc = w.acc
        if self.world > 1:  # log global means, not this process's shard
            keys = sorted(acc)
            summed = self.accelerator.reduce(
                torch.stack([torch.as_tensor(acc[k], dtype=torch.float64, device=self.device) for k in keys]),
                reduction="sum")
            acc = dict(zip(keys, summed))
        record: dict[str, Any] = {"event": "train", "step": self.state.step,
                                  "epoch": round(self.state.step / max(1, self.steps_per_epoch()), 4),
                                  "tokens": self.state.tokens, "lr": self.scheduler.get_last_lr()[0]}
        record.update(self._logged_means(acc))
        record["grad_norm"] = norm
        record["tokens_per_s"] = w.tokens / max(1e-9, now - w.since)
        record["peak_mem_bytes"] = peak_memory_bytes(self.device)
        record["elapsed_s"] = now - w.start
        record["skipped_steps"] = self.state.skipped_steps
        self.log(record)
        w.restart()
        return record

    def _periodic_eval_and_checkpoint(self) -> None:
        """``eval_steps`` / ``save_steps`` before the last step (the last one is evaluated and saved by the caller)."""
        step, s = self.state.step, self.settings
        if step >= self.total_steps:
            return
        if s.eval_steps and step % s.eval_steps == 0:
            self._eval_and_log()
        if s.save_steps and step % s.save_steps == 0:
            self.state.elapsed_s = self._window.elapsed()
            self.save_checkpoint()

    def _result(self, status: str, resumed_from: int | None, last_eval: dict[str, float]) -> dict[str, Any]:
        elapsed, tokens = self.state.elapsed_s, self.state.tokens
        return {
            "status": status,
            "signal": STOP.signal,
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "resumed_from": resumed_from,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": tokens / max(1e-9, elapsed),
            "skipped_steps": self.state.skipped_steps,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "precision": self.precision,
            "device": str(self.device),
            "eval": last_eval,
        }

    def _eval_and_log(self) -> dict[str, float]:
        if len(self.eval_blocks) == 0:
            return {}
        metrics = self.evaluate()
        record = {"event": "eval", "step": self.state.step, **metrics}
        self.log(record)
        if self.opts.on_eval and self.is_main:
            self.opts.on_eval(record)
        return metrics

    def step(self, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimizer step on caller-given micro-batches (the Python API's per-batch step).

        The same forward/backward, token normalisation, clipping, non-finite skip and schedule as
        :meth:`train`; returns the step's mean loss terms (as ``train`` logs them) and ``grad_norm``.
        """
        logged = self._run_step([self._to_device(b) for b in batches])
        norm = self._optimizer_step()
        self.scheduler.step()
        self.state.step += 1
        self._count_step(logged, norm)
        out: dict[str, float] = self._logged_means(logged)
        out["grad_norm"] = norm
        return out

    def _logged_means(self, totals: dict[str, Any]) -> dict[str, Any]:
        """Loss parts as means of their kind (loss_terms.means); on-policy counters with their speed."""
        out: dict[str, Any] = means(totals)
        seconds = out.pop("generation_s", None)
        if "generated_tokens" in out:  # on-policy distillation: what sampling produced and its speed
            out["generated_tokens"] = int(out["generated_tokens"])
            out["generated_tokens_per_s"] = out["generated_tokens"] / max(1e-9, (seconds or 0.0) / self.world)
        return out


def _trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's trained parameters by checkpoint name (``model.<parameter path>``)."""
    return {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss * (1 if sys.platform == "darwin" else 1024))
    except (ImportError, OSError):
        return 0


class _Window:
    """The logging window: loss sums and tokens since the last train record, and the run's clock."""

    def __init__(self, start: float) -> None:
        self.start = start  # perf_counter at step 0 (a resumed run's earlier time included)
        self.restart()

    def restart(self) -> None:
        self.since = time.perf_counter()
        self.tokens = 0
        self.acc: dict[str, Tensor] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _step_line(record: dict[str, Any]) -> str:
    """What the progress display says about a logging window: the loss terms, lr and throughput."""
    terms = " ".join(f"{k}={record[k]:.4f}" for k in sorted(record) if k.startswith("loss"))
    line = f"{terms} lr={record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
    if "generated_tokens_per_s" in record:
        line += f" (generating {record['generated_tokens_per_s']:.0f} tok/s)"
    return line
