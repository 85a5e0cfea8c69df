"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Why FSDP2 called directly instead of accelerate's FSDP plugin: accelerate (1.15) turns its FSDP
plugin on only for GPU-type launches; on a CPU (gloo) launch it silently falls back to DDP, so the
plugin path could not be tested here, and accelerate's FSDP2 preparation re-creates the optimizer
and loads a full state dict on every rank. ``fully_shard`` works the same on CPU/gloo and CUDA/NCCL,
so one code path is tested on 2 CPU processes and runs on GPUs. ``accelerate launch`` with an FSDP
config (``ACCELERATE_USE_FSDP=true``) selects this path too; accelerate then only starts the
processes and provides devices and reductions (the engine does not hand the model to
``accelerator.prepare``).

Layout: one FSDP unit per decoder layer (the model's ``_no_split_modules`` classes) plus the root,
so at most one layer's full parameters exist at a time besides the root's (embeddings, head, norm).
Gradients are reduce-scattered (averaged over processes) after every micro-batch: keeping them
unsharded across gradient accumulation would hold a full gradient on every device, which is what
sharding is for avoiding.

Everything here needs an initialised process group; :func:`ensure_process_group` makes a 1-process
one when the run was not launched by torchrun (so ``sharding: fsdp`` also runs, unsharded, on one
device: the same code as N devices).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from entrenar_cli.console import world_size
from entrenar_cli.errors import ConfigError

if TYPE_CHECKING:
    from entrenar_cli.config.schema import TrainingSettings

SHARDED_ATTR = "_entrenar_sharded"  # objectives read it: a sharded model's head weight is a shard outside forward


def requested_sharding(settings: TrainingSettings) -> str:
    """``fsdp`` or ``none``: ``training.sharding``, or an ``accelerate launch`` with an FSDP config.

    DeepSpeed is refused here, before any model is loaded, with one message (exit 2): entrenar does
    not run DeepSpeed ZeRO, and silently training with DDP instead would run out of memory later.
    """
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "DeepSpeed (ZeRO) is not supported: this accelerate config asks for it",
            hint="use an accelerate config with distributed_type: FSDP, or `torchrun` with training.sharding: fsdp",
        )
    if settings.sharding == "fsdp" or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "none"


def check_supported(settings: TrainingSettings, model: nn.Module) -> None:
    """Refuse, with one message each, what sharded training does not do (exit 2)."""
    if settings.compile:
        raise ConfigError("training.compile is not supported with training.sharding: fsdp",
                          hint="set training.compile: false (or training.sharding: none)")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False) or any(
            type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        raise ConfigError("QLoRA (a quantised student) cannot be sharded with FSDP here",
                          hint="use LoRA without quantization, or training.sharding: none")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def ensure_process_group(device: torch.device) -> None:
    """A process group exists (torchrun/accelerate made one; else a 1-process one in memory)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def device_mesh(device: torch.device) -> Any:
    """The 1-D mesh over every process (FSDP's sharding dimension)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's policy from the run's precision: bf16/fp16 parameters in forward and backward,
    gradients reduced in fp32 (a bf16 reduce-scatter loses the small gradients of a large sum);
    fp32 runs need no policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _block_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated blocks (transformers' ``_no_split_modules``), through peft."""
    names: set[str] = set()
    for m in model.modules():
        for name in getattr(m, "_no_split_modules", None) or []:
            names.add(name)
    return names


def shard(model: nn.Module, mesh: Any, policy: Any, *, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every decoder block, then the root; returns the number of blocks sharded.

    Marks the model sharded (``model._entrenar_sharded = True``) so an objective that would read
    the head weight outside forward (the chunked vocabulary losses) falls back to full logits.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = _block_classes(model)
    # embeddings are in _no_split_modules of some encoders; shard only repeated blocks (a ModuleList's items)
    units = [m for lst in model.modules() if isinstance(lst, nn.ModuleList)
             for m in lst if type(m).__name__ in blocks]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    setattr(model, SHARDED_ATTR, True)
    return len(units)


def is_sharded(model: nn.Module) -> bool:
    return bool(getattr(model, SHARDED_ATTR, False))


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm over sharded (DTensor) and replicated gradients, clipped to ``max_norm``.

    ``clip_grad_norm_`` cannot mix DTensor and plain tensors in one call (the objective's extra
    parameters stay plain), so the two groups' norms are combined here; the value equals what one
    process computes over the whole model (the tests compare it to 1e-4).
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_dtensor(g)]
    plain = [g for g in grads if not is_dtensor(g)]
    squares = torch.zeros((), dtype=torch.float64)
    for group in (sharded, plain):
        if group:
            norm = torch.nn.utils.get_total_norm(group, 2.0)
            if is_dtensor(norm):
                norm = norm.full_tensor()
            squares = squares + norm.detach().double().cpu() ** 2
    total = float(squares.sqrt())
    if total == total and total != float("inf") and total > max_norm:  # finite and above the limit
        coef = max_norm / (total + 1e-6)
        for group in (sharded, plain):
            if group:
                torch._foreach_mul_(group, coef)
    return total


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of parameters outside the sharded/DDP model (hidden-state
    projections): every process then takes the same optimizer step on them."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())


def gather_to_rank0(model: nn.Module, rank: int) -> None:
    """Gather the full parameters to rank 0 and turn rank 0's model back into a plain module.

    Collective: every process calls it. Parameters come one FSDP unit at a time to rank 0's CPU
    (``cpu_offload``), so no device holds the full model; rank 0 then installs them as ordinary
    parameters (ties kept), takes the FSDP hooks off and restores each module's class, so
    ``save_pretrained`` writes the usual names and ``architectures``. Other ranks keep their shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    _install_full(model, full)
    unshard_classes(model)


def _install_full(model: nn.Module, full: dict[str, Tensor]) -> None:
    new: dict[int, nn.Parameter] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                fqn = f"{mod_name}.{name}" if mod_name else name
                if fqn not in full:
                    raise RuntimeError(f"the gathered state dict has no {fqn}")
                new[id(p)] = nn.Parameter(full[fqn], requires_grad=p.requires_grad)
            mod._parameters[name] = new[id(p)]


def unshard_classes(model: nn.Module) -> None:
    """Undo ``fully_shard``'s class swap and forward hooks on every module (rank 0's final model)."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            bases = [b for b in type(mod).__bases__ if b is not FSDPModule]
            mod.__class__ = bases[0]
        # the FSDP state (it holds the process group: a deepcopy for the LoRA merge could not copy it)
        mod.__dict__.pop(STATE_KEY, None)
        mod.__dict__.pop(REGISTRY_KEY, None)
        # forward hooks (unshard/reshard) and state-dict hooks (which would swap the shards back in)
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
            hooks = getattr(mod, attr, None)
            if not hooks:
                continue
            for key, hook in list(hooks.items()):
                fn = getattr(hook, "hook", hook)  # load-state-dict pre hooks are wrapped
                if str(getattr(fn, "__module__", "") or "").startswith("torch.distributed.fsdp"):
                    del hooks[key]
                    for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                                  "_forward_hooks_always_called"):
                        getattr(mod, extra, {}).pop(key, None)
    if hasattr(model, SHARDED_ATTR):
        delattr(model, SHARDED_ATTR)


# ---- the plan (pipelines call these before the engine exists) -------------------------------------


def mark_planned(settings: TrainingSettings, *models: nn.Module) -> None:
    """Mark the models of a run that will be sharded, so the plan's logit-path line already says
    that the chunked losses step aside (the engine marks them again when it shards)."""
    if requested_sharding(settings) == "fsdp":
        for m in models:
            if isinstance(m, nn.Module):
                setattr(m, SHARDED_ATTR, True)


def planned_logits_budget(settings: TrainingSettings) -> int | None:
    """The chunk budget the memory plan counts: None (materialised logits) when the run will be sharded,
    since a sharded model's head weight is a shard outside forward and the chunked losses step aside."""
    from entrenar_cli.chunking import logits_budget

    return None if requested_sharding(settings) == "fsdp" else logits_budget(settings)


def plan_memory_bytes(est: Any, settings: Any, student_config: dict[str, Any],
                      teacher_config: dict[str, Any] | None = None) -> int:
    """The plan's memory figure: one device's share under FSDP (estimate.training.per_device_estimate
    over this launch's processes), the single-device estimate otherwise (DDP holds everything)."""
    if requested_sharding(settings) != "fsdp" or est.method == "qlora":
        return int(est.total_bytes)
    from entrenar_cli.estimate import layout_for
    from entrenar_cli.estimate.training import per_device_estimate

    teacher_layout = layout_for(teacher_config) if teacher_config is not None else None
    return per_device_estimate(est, layout_for(student_config), devices=world_size(), sharding="fsdp",
                               gradient_accumulation=settings.gradient_accumulation,
                               teacher_layout=teacher_layout).per_device_bytes


def memory_note(settings: TrainingSettings) -> str:
    """What the plan's memory figure covers: '' or ' per device (N processes, FSDP)'."""
    if requested_sharding(settings) != "fsdp":
        return ""
    n = world_size()
    return f" per device ({n} process{'es' if n != 1 else ''}, FSDP)"
