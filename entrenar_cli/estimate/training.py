"""The training-memory model: what is alive at the peak of a training step.

Pure arithmetic over a :class:`~entrenar_cli.estimate.layout.Layout` (no torch), so the catalogue
answers instantly and ``--fits`` can search batch sizes.

What a step holds (bytes; N = batch x sequence tokens, V = vocabulary):

* weights, gradients and optimizer state of the trainable parameters;
* saved activations: the tensors autograd keeps from the forward pass for the backward pass,
  counted tensor by tensor for the standard transformer block as PyTorch and transformers build it
  (see ``docs/estimate.md``): each norm's fp32 input, the inputs of linears whose weights train,
  q/k/v/output of attention (SDPA) or q/k/v plus the fp32 probability matrix (eager), the MLP's
  intermediates, dropout masks, LoRA inputs;
* logits and loss: the lm_head output kept by the caller, cross-entropy's fp32 log-softmax, and
  in backward its gradient and the logits' gradient: N x V x (bytes of the logits + 12);
* with a teacher: its frozen weights, its logits and the distillation loss's soft targets.

Those do not all coexist. The peak is the largest of three moments: the start of backward (all
activations and the loss tensors alive, no gradients yet unless accumulating), the optimizer step
(gradients, states and the optimizer's temporaries) and the teacher's forward. ``total_bytes`` is
that peak; the components are listed at their full size.

Precision recipes (the ``dtype`` option) are those PyTorch users run:

* ``fp32``: everything fp32.
* ``bf16`` / ``fp16`` with ``full``: fp32 master weights, fp32 gradients and AdamW states, and
  autocast, which keeps a 16-bit copy of every linear weight and a 16-bit copy of each linear's
  input until backward (the "16-18 bytes per parameter" of mixed precision).
* ``bf16`` / ``fp16`` with ``lora``: the frozen base loaded in 16-bit, adapters in fp32 (peft
  upcasts them), no autocast; norms still keep fp32 inputs, adapters fp32 copies of theirs.
* ``qlora``: Linear weights in NF4 (bitsandbytes, double quantization), every other parameter in
  fp32 (what ``peft.prepare_model_for_kbit_training`` does), adapters fp32; with ``bf16`` under
  autocast.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from entrenar_cli import lora_defaults
from entrenar_cli.errors import UsageError
from entrenar_cli.estimate.layout import Layout, ModuleInfo, Shape

Method = Literal["full", "lora", "qlora"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
TRAIN_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-fused", "adamw-8bit", "sgd")
ATTENTIONS: tuple[str, ...] = ("sdpa", "eager")
DEVICES: tuple[str, ...] = ("cuda", "cpu")

# NF4 with double quantization (bitsandbytes): 4-bit codes, one 8-bit absmax per block of 64,
# one fp32 absmax (plus offset) per 256 first-level constants.
NF4_BLOCK = 64
NF4_SECOND_BLOCK = 256
ADAM8_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer states


def nf4_bytes(n: int) -> int:
    """Bytes of one NF4 tensor with double-quantized constants (~4.127 bits per element)."""
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_SECOND_BLOCK) + 4


def int8_bytes(module: ModuleInfo) -> int:
    """LLM.int8 (bitsandbytes): int8 weight plus one fp32 scale per output row."""
    return module.weight_params + 4 * module.d_out


def weights_bytes_by_dtype(layout: Layout) -> dict[str, int]:
    """Weight memory in each storage format; int8/nf4 quantize Linear weights only (not lm_head)."""
    p = layout.parameters
    qlin = layout.quantizable_linears()
    q_params = sum(m.weight_params for m in qlin)
    rest16 = 2 * (p - q_params)
    return {
        "fp32": 4 * p,
        "bf16": 2 * p,
        "fp16": 2 * p,
        "int8": rest16 + sum(int8_bytes(m) for m in qlin),
        "nf4": rest16 + sum(nf4_bytes(m.weight_params) for m in qlin),
    }


# ----------------------------------------------------------------------------------------------
# LoRA targets, as peft resolves them


def lora_targets(layout: Layout, model_type: str, target_modules: list[str] | str | None) -> list[ModuleInfo]:
    """The modules peft would adapt: names equal to a target or ending in '.target'; a string is a
    regex (full match); 'all-linear' is every linear except the output head."""
    target_modules = lora_defaults.resolve_targets(target_modules, model_type)
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return [m for m in layout.modules if m.kind == "linear" and not m.output_head]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        chosen = [m for m in layout.modules if pattern.fullmatch(m.name)]
    else:
        wanted = [t.strip() for t in target_modules if t.strip()]
        chosen = [m for m in layout.modules if m.name in wanted or any(m.name.endswith("." + t) for t in wanted)]
    if not chosen:
        leaves = sorted({m.leaf for m in layout.modules if not m.output_head})
        raise UsageError(
            f"LoRA target modules {target_modules!r} match no Linear or Embedding module of this model",
            hint=f"module names here: {', '.join(leaves)}; or use all-linear",
        )
    return chosen


def lora_trainable_params(modules: list[ModuleInfo], rank: int) -> int:
    """r x (d_in + d_out) per adapted matrix (embeddings: r x (num_embeddings + dim)), as peft counts."""
    return sum(rank * (m.d_in + m.d_out) for m in modules)


# ----------------------------------------------------------------------------------------------
# settings and result


@dataclass(frozen=True)
class EstimateSettings:
    """Everything besides the model that decides training memory."""

    method: str = "full"
    rank: int = lora_defaults.RANK
    target_modules: list[str] | str | None = None  # None: lora_defaults.default_targets(model_type)
    lora_alpha: float | None = None  # recorded; scaling does not change memory
    lora_dropout: float = lora_defaults.DROPOUT  # > 0 adds a mask per adapter input
    batch_size: int = 1
    seq_len: int = 512
    dtype: str = "bf16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    attention: str = "sdpa"
    device: str = "cuda"  # dropout masks: 1 byte on CUDA, a full-precision tensor on CPU; AdamW foreach vs per-tensor
    # chunked logit losses (objectives.LogitPath): one chunk's temporaries in bytes; None: materialised logits
    logits_budget: int | None = None
    weight_average: bool = False  # training.ema_decay: an fp32 copy of the trained tensors

    def check(self) -> None:
        """Collect every invalid setting into one UsageError, naming the option the user typed."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.dtype not in TRAIN_DTYPES:
            problems.append(f"--dtype must be one of {', '.join(TRAIN_DTYPES)} (got {self.dtype!r})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.attention not in ATTENTIONS:
            problems.append(f"--attention must be one of {', '.join(ATTENTIONS)} (got {self.attention!r})")
        if self.device not in DEVICES:
            problems.append(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.rank <= 0:
            problems.append(f"--rank must be > 0 (got {self.rank})")
        if self.batch_size <= 0:
            problems.append(f"--batch-size must be > 0 (got {self.batch_size})")
        if self.seq_len <= 0:
            problems.append(f"--seq-len must be > 0 (got {self.seq_len})")
        if self.gradient_accumulation <= 0:
            problems.append(f"gradient_accumulation must be > 0 (got {self.gradient_accumulation})")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class TrainingEstimate:
    """Modelled memory of one training setup, in bytes (see the module docstring for the model)."""

    method: str
    dtype: str
    optimizer: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    attention: str
    device: str
    parameters: int
    trainable_parameters: int
    lora_rank: int | None
    lora_target_modules: list[str] | None
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    teacher_bytes: int
    autocast_copies_bytes: int
    workspace_bytes: int
    total_bytes: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / self.parameters if self.parameters else 0.0

    def fits_in(self, budget_bytes: int) -> bool:
        return self.total_bytes <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trainable_percent"] = round(self.trainable_percent, 6)
        return d


# ----------------------------------------------------------------------------------------------
# the precision recipes


@dataclass(frozen=True)
class _Recipe:
    weight_bytes: float  # frozen base weights (lora); master weights (full)
    residual: int  # the residual stream between blocks
    attn: int  # q/k/v/attention output
    mlp: int  # MLP intermediates
    logits: int  # lm_head output
    linear_input: Literal["shared", "cast16"]  # full fine-tuning: how trainable linears keep their inputs
    adapter_input: Literal["shared32", "cast32", "cast16"]  # LoRA: what lora_A keeps of its input
    autocast: bool


def _recipe(method: str, dtype: str) -> _Recipe:
    half = dtype in ("bf16", "fp16")
    if not half:
        return _Recipe(4, 4, 4, 4, 4, "shared", "shared32", False)
    if method == "full":
        return _Recipe(4, 4, 2, 2, 2, "cast16", "cast16", True)
    # lora and qlora: the frozen base in 16-bit (qlora: its Linear weights NF4, computing in 16-bit)
    return _Recipe(2, 2, 2, 2, 2, "shared", "cast32", False)


# ----------------------------------------------------------------------------------------------
# activations


def _norm_output_bytes(r: _Recipe) -> int:
    """dtype of a norm's output: fp32 under autocast (fp32 weights or fp32 LayerNorm), else the stream's."""
    return 4 if r.autocast else r.residual


_PY_GELU = {"gelu_new", "gelu_fast", "quick_gelu", "gelu_python", "gelu_accurate"}


def _consumer_input_bytes(
    consumers: list[ModuleInfo],
    d_in: int,
    produced: int,
    already_saved: bool,
    method: str,
    r: _Recipe,
    adapted: set[str],
    rank: int,
    dropout: float,
    mask_bytes: int,
) -> float:
    """Bytes per token that the linears reading one tensor keep for backward."""
    if not consumers:
        return 0.0
    if method == "full":
        if r.linear_input == "shared" or produced == 2:
            return 0.0 if already_saved else float(produced * d_in)
        return float(2 * d_in * len(consumers))  # autocast casts the input once per consumer
    chosen = [c for c in consumers if c.name in adapted]
    if not chosen:
        return 0.0
    a_in = 2 if r.autocast else 4  # what lora_A keeps: its (cast) input
    total = 0.0
    if dropout > 0:
        total += len(chosen) * (mask_bytes + a_in) * d_in
    elif r.adapter_input == "shared32" and produced == 4:
        total += 0.0 if already_saved else 4.0 * d_in
    else:
        total += len(chosen) * a_in * d_in
    total += len(chosen) * a_in * rank  # lora_B keeps lora_A's output
    return total


def _layer_bytes(
    mods: list[ModuleInfo],
    layout: Layout,
    shape: Shape,
    method: str,
    r: _Recipe,
    adapted: set[str],
    s: EstimateSettings,
    mask_bytes: int,
) -> tuple[float, float]:
    """(bytes per token, bytes per token per sequence position) one block keeps for backward."""
    h = shape.hidden_size
    by_role: dict[str, list[ModuleInfo]] = {"attn_in": [], "attn_out": [], "mlp_in": [], "mlp_out": []}
    for m in mods:
        role = layout.role(m, h)
        if role in by_role:
            by_role[role].append(m)
    full = method == "full"
    dropout = s.lora_dropout
    tok = 0.0
    per_seq = 0.0

    # norms: RMSNorm keeps its fp32 input (and the normalised tensor when its weight trains);
    # LayerNorm keeps its input
    n_norms = 1 if shape.parallel_block else 2
    if shape.norm == "rms":
        tok += n_norms * (4 * h + (r.residual * h if full else 0))
    else:
        tok += n_norms * (4 if r.autocast else r.residual) * h
    norm_out = _norm_output_bytes(r)

    def consumers(role: str, d_in: int, produced: int, already: bool) -> float:
        return _consumer_input_bytes(by_role[role], d_in, produced, already, method, r, adapted, s.rank,
                                     dropout, mask_bytes)

    if shape.parallel_block:
        both = by_role["attn_in"] + by_role["mlp_in"]
        tok += _consumer_input_bytes(both, h, norm_out, False, method, r, adapted, s.rank, dropout, mask_bytes)
    else:
        tok += consumers("attn_in", h, norm_out, False)
        tok += consumers("mlp_in", h, norm_out, False)

    # attention core
    q, kv = shape.q_dim, shape.kv_dim
    if s.attention == "sdpa":
        tok += r.attn * (2 * q + 2 * kv) + 4 * shape.num_heads  # q, k, v, output, fp32 logsumexp
        tok += consumers("attn_out", q, r.attn, True)  # its input is a view of the saved output
    else:
        tok += r.attn * 3 * q  # q and the head-repeated k, v
        per_seq += 4 * shape.num_heads + (r.attn * shape.num_heads if r.attn == 2 else 0)  # fp32 softmax (+ cast)
        if shape.attention_dropout > 0:
            per_seq += (mask_bytes + r.attn) * shape.num_heads
        tok += consumers("attn_out", q, r.attn, False)  # a contiguous copy of the transposed output

    # MLP
    i = shape.intermediate_size
    if shape.gated_mlp:
        tok += 3 * r.mlp * i  # gate output (activation input), activation output, up output
    else:
        tok += r.mlp * i  # fc1 output (activation input)
    if shape.hidden_act in _PY_GELU:
        tok += 3 * r.mlp * i  # tanh-GELU written as Python ops keeps three more tensors
    tok += consumers("mlp_out", i, r.mlp, False)

    if shape.hidden_dropout > 0:
        model_mask = 1 if s.device == "cuda" else r.residual
        tok += 2 * model_mask * h  # after attention and after the MLP
    return tok, per_seq


def activation_bytes(
    layout: Layout, shape: Shape, method: str, adapted: set[str], s: EstimateSettings
) -> tuple[int, int]:
    """(saved activations, one recomputed block under checkpointing) for batch x seq_len tokens."""
    r = _recipe(method, s.dtype)
    # dropout masks: bool on CUDA; on CPU a tensor of the input's dtype (adapters see fp32 inputs)
    mask_bytes = 1 if s.device == "cuda" else 4
    n_tokens = s.batch_size * s.seq_len
    h = shape.hidden_size
    per_layer: list[float] = []
    memo: dict[tuple[Any, ...], tuple[float, float]] = {}  # identical blocks are computed once
    for index in sorted(layout.blocks) or range(shape.num_layers):
        mods = list(layout.layer_modules(index))
        key = tuple((m.in_block_name, m.d_in, m.d_out, m.name in adapted) for m in mods)
        if key not in memo:
            memo[key] = _layer_bytes(mods, layout, shape, method, r, adapted, s, mask_bytes)
        tok, per_seq = memo[key]
        per_layer.append(n_tokens * (tok + per_seq * s.seq_len))
    if s.gradient_checkpointing:
        layers_total = float(shape.num_layers * n_tokens * r.residual * h)  # each block's input
    else:
        layers_total = sum(per_layer)

    tail = 0.0  # per token, outside the blocks
    full = method == "full"
    head = layout.head
    if shape.causal_lm:
        if shape.norm == "rms":
            tail += 4 * h + (r.residual * h if full else 0)
        else:
            tail += (4 if r.autocast else r.residual) * h
        if head is not None:
            tail += _consumer_input_bytes([head], h, _norm_output_bytes(r), False, method, r, adapted, s.rank,
                                          s.lora_dropout, mask_bytes)
    else:
        tail += (4 if r.autocast else r.residual) * h  # the embedding LayerNorm of encoders
    if shape.embedding_dropout > 0:
        tail += mask_bytes * h
    if s.attention == "eager":
        tail += 4 * s.seq_len  # the 4-D float causal mask, shared by all layers
    recompute = max(per_layer) if (per_layer and s.gradient_checkpointing) else 0.0
    return int(layers_total + n_tokens * tail), int(recompute)


# ----------------------------------------------------------------------------------------------
# the estimate


def estimate_from_layout(
    layout: Layout,
    shape: Shape,
    settings: EstimateSettings,
    *,
    teacher: tuple[Layout, Shape] | None = None,
) -> TrainingEstimate:
    """The training-memory estimate for one model layout and one set of settings."""
    s = settings
    s.check()
    method = s.method
    r = _recipe(method, s.dtype)
    p = layout.parameters

    # what trains
    if method == "full":
        adapted_mods: list[ModuleInfo] = []
        trainable = p
        targets_out = None
    else:
        adapted_mods = lora_targets(layout, shape.model_type, s.target_modules)
        trainable = lora_trainable_params(adapted_mods, s.rank)
        targets_out = sorted({m.leaf for m in adapted_mods})
    adapted = {m.name for m in adapted_mods}
    largest_trainable = max((m.params for m in layout.modules), default=0) if method == "full" else max(
        (s.rank * max(m.d_in, m.d_out) for m in adapted_mods), default=0
    )

    # weights
    if method == "full":
        weights = 4 * p if s.dtype in ("bf16", "fp16") else int(r.weight_bytes * p)
    elif method == "lora":
        weights = int(r.weight_bytes * p) + 4 * trainable
    else:
        qlin = layout.quantizable_linears()
        q_params = sum(m.weight_params for m in qlin)
        rest = 4 if s.dtype == "fp32" else 2  # embeddings, norms, lm_head, biases stay unquantized
        weights = sum(nf4_bytes(m.weight_params) for m in qlin) + rest * (p - q_params) + 4 * trainable

    gradients = 4 * trainable
    if s.optimizer in ("adamw", "adamw-fused"):
        optimizer = 8 * trainable  # exp_avg and exp_avg_sq in fp32
        if s.optimizer == "adamw-fused":
            opt_workspace = 0  # one kernel per step, no intermediate tensors
        elif s.device == "cuda":
            opt_workspace = 4 * trainable  # foreach (torch's CUDA default) keeps sqrt(v) for every tensor at once
        else:
            opt_workspace = 2 * 4 * largest_trainable  # per-tensor loop: sqrt(v) and its quotient, one tensor
    elif s.optimizer == "adamw-8bit":
        optimizer = int(trainable * 2 * (1 + 4 / ADAM8_BLOCK))
        opt_workspace = 0
    else:
        optimizer = 0
        opt_workspace = 0
    if s.weight_average:
        optimizer += 4 * trainable  # held as long as the optimizer state, sharded like it

    # 16-bit copies autocast keeps for backward
    linears = [m for m in layout.modules if m.kind == "linear"]
    if method == "full" and r.autocast:
        copies = 2 * sum(m.d_in * m.d_out + (m.d_out if m.bias else 0) for m in linears)
    else:
        copies = 0
    dequant = 0
    if method == "qlora":
        dequant = 2 * max((m.weight_params for m in layout.quantizable_linears()), default=0)

    activations, recompute = activation_bytes(layout, shape, method, adapted, s)

    n_tokens = s.batch_size * s.seq_len
    logits = 0
    head_grad = 0
    chunked = s.logits_budget is not None and shape.causal_lm
    if chunked:
        from entrenar_cli.chunking import chunked_logits_bytes

        logits = chunked_logits_bytes(n_tokens, shape.vocab_size, shape.hidden_size, s.logits_budget,
                                      teacher_hidden=teacher[1].hidden_size if teacher is not None else None)
        if method == "full" and layout.head is not None:
            # the head's fp32 weight gradient is formed during the loss's forward, before backward starts
            logits += 4 * layout.head.d_in * layout.head.d_out
    elif shape.causal_lm:
        logits = n_tokens * shape.vocab_size * (r.logits + 12)
        if method == "full" and layout.head is not None:
            head_grad = 4 * layout.head.d_in * layout.head.d_out

    teacher_resident = 0
    teacher_transient = 0
    if teacher is not None:
        t_layout, t_shape = teacher
        tb = 4 if s.dtype == "fp32" else 2
        # teacher logits + fp32 soft targets; chunked: only the states entering its head
        t_logits = n_tokens * t_shape.hidden_size * tb if chunked else n_tokens * t_shape.vocab_size * (tb + 4)
        teacher_resident = tb * t_layout.parameters + t_logits
        # one teacher block's temporaries under no_grad, and its fp32 logits copy
        teacher_transient = n_tokens * tb * (4 * t_shape.hidden_size + 3 * t_shape.intermediate_size)
        if not chunked:
            logits += n_tokens * shape.vocab_size * 12  # student soft log-probs, their gradient, KL temporary

    accumulated = gradients if s.gradient_accumulation > 1 else 0
    phases = {
        # the loss tensors are freed before checkpointed blocks are recomputed
        "backward": weights + optimizer + copies + activations + max(logits, recompute) + teacher_resident
        + accumulated + dequant,
        "optimizer step": weights + gradients + optimizer + opt_workspace,
    }
    if head_grad and shape.causal_lm:
        lm_moment = (weights + optimizer + copies + activations + teacher_resident + accumulated
                     + n_tokens * shape.vocab_size * (r.logits + 4) + head_grad)
        phases["backward"] = max(phases["backward"], lm_moment)
    if teacher is not None:
        phases["teacher forward"] = weights + optimizer + accumulated + teacher_resident + teacher_transient
    peak_phase = max(phases, key=lambda k: phases[k])
    return TrainingEstimate(
        method=method,
        dtype=s.dtype,
        optimizer=s.optimizer,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        gradient_checkpointing=s.gradient_checkpointing,
        attention=s.attention,
        device=s.device,
        parameters=p,
        trainable_parameters=trainable,
        lora_rank=None if method == "full" else s.rank,
        lora_target_modules=targets_out,
        weights_bytes=int(weights),
        gradients_bytes=int(gradients),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(activations + recompute),
        logits_bytes=int(logits),
        teacher_bytes=int(teacher_resident),
        autocast_copies_bytes=int(copies),
        workspace_bytes=int(max(opt_workspace, dequant, teacher_transient)),
        total_bytes=int(phases[peak_phase]),
        peak_phase=peak_phase,
        phases={k: int(v) for k, v in phases.items()},
    )


def max_batch_size(
    layout: Layout,
    shape: Shape,
    settings: EstimateSettings,
    budget_bytes: int,
    *,
    teacher: tuple[Layout, Shape] | None = None,
    limit: int = 1 << 16,
) -> int:
    """The largest batch size whose estimate fits ``budget_bytes`` (0 when even 1 does not)."""
    from dataclasses import replace

    def fits(b: int) -> bool:
        est = estimate_from_layout(layout, shape, replace(settings, batch_size=b), teacher=teacher)
        return est.total_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:  # fits(lo) and not fits(hi); memory grows with batch size
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------------
# several devices: DDP (everything on every device) or FSDP (sharded state)

SHARDINGS = ("none", "fsdp")


@dataclass
class DeviceEstimate:
    """Memory of one device when ``devices`` processes train together, in bytes."""

    devices: int
    sharding: str
    per_device_bytes: int
    peak_phase: str
    phases: dict[str, int]
    sharded_state_bytes: int  # weights + gradients + optimizer state (+ teacher weights) held by one device
    gathered_bytes: int  # full parameters of the units FSDP gathers at once (student; teacher in its forward)
    teacher_sharded: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unit_params(layout: Layout) -> tuple[int, int]:
    """(largest decoder block, everything outside the blocks): FSDP's units (entrenar_cli.sharding)."""
    blocks = [sum(m.params for m in mods) for mods in layout.blocks.values()]
    largest = max(blocks, default=0)
    return largest, max(0, layout.parameters - sum(blocks))


def per_device_estimate(
    est: TrainingEstimate,
    layout: Layout,
    *,
    devices: int,
    sharding: str,
    gradient_accumulation: int = 1,
    teacher_layout: Layout | None = None,
    teacher_sharded: bool = True,
) -> DeviceEstimate:
    """One device's share of ``est`` (the single-device estimate) under DDP or FSDP.

    DDP (``none``): every device holds the whole model, gradients, optimizer state and teacher, so a
    device needs the single-device estimate (DDP's gradient buckets are not modelled).
    FSDP: weights, gradients, optimizer state and (when sharded) the teacher's weights are divided by
    ``devices``; a device also holds the full parameters of the units being computed, in the compute
    dtype: the root (embeddings, head, final norm) plus two decoder blocks (the current one and the
    prefetched next), and in backward one block's unsharded fp32 gradient before its reduce-scatter.
    The 16-bit weight copies of autocast disappear (the gathered units are already 16-bit).
    Activations, logits and the loss do not shrink: each device runs its own micro-batch.
    """
    if devices < 1:
        raise UsageError(f"--devices must be at least 1 (got {devices})")
    if sharding not in SHARDINGS:
        raise UsageError(f"--sharding must be one of {', '.join(SHARDINGS)} (got {sharding!r})")
    if sharding == "none":
        return DeviceEstimate(devices=devices, sharding=sharding, per_device_bytes=est.total_bytes,
                              peak_phase=est.peak_phase, phases=dict(est.phases),
                              sharded_state_bytes=est.weights_bytes + est.gradients_bytes + est.optimizer_bytes,
                              gathered_bytes=0, teacher_sharded=False)
    if est.method == "qlora":
        raise UsageError("--sharding fsdp does not apply to qlora (entrenar does not shard a quantised model)",
                         hint="use --method full or lora with --sharding fsdp")
    n = devices
    compute = 4 if est.dtype == "fp32" else 2
    block, root = _unit_params(layout)
    gathered = compute * (root + 2 * block)
    unsharded_grad = 4 * block if est.method == "full" else 0
    teacher_w = 0
    teacher_gathered = 0
    if teacher_layout is not None:
        teacher_w = compute * teacher_layout.parameters
        t_block, t_root = _unit_params(teacher_layout)
        teacher_gathered = compute * (t_root + 2 * t_block) if teacher_sharded else 0
    t_keep = teacher_w / n if teacher_sharded else teacher_w
    accumulated = est.gradients_bytes if gradient_accumulation > 1 else 0
    state = est.weights_bytes + est.optimizer_bytes + accumulated
    phases: dict[str, int] = {}
    for name, full in est.phases.items():
        if name == "optimizer step":
            phases[name] = int(full / n)  # weights, gradients, optimizer state and its temporaries: all shards
            continue
        shared = state + teacher_w + (est.autocast_copies_bytes if name == "backward" else 0)
        share = state / n + t_keep
        extra = gathered + (unsharded_grad if name == "backward" else 0)
        if name == "teacher forward":
            extra = teacher_gathered
        phases[name] = int(full - shared + share + extra)
    peak = max(phases, key=lambda k: phases[k])
    return DeviceEstimate(
        devices=n, sharding=sharding, per_device_bytes=phases[peak], peak_phase=peak, phases=phases,
        sharded_state_bytes=int((est.weights_bytes + est.gradients_bytes + est.optimizer_bytes) / n + t_keep),
        gathered_bytes=int(gathered), teacher_sharded=teacher_layout is not None and teacher_sharded,
    )
