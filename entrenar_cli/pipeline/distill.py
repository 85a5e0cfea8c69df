"""`entrenar distill`: setup (teacher, student, data) -> train -> save -> summary.

The function reads in run order: :func:`setup` holds every side effect of loading, :func:`run`
trains through the shared engine and writes the outputs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrenar_cli.config.schema import DistillationYamlConfig
from entrenar_cli.console import info, process_rank, warn, world_size
from entrenar_cli.errors import ConfigError
from entrenar_cli.pipeline.common import (
    RESULT_FIELDS,
    SUMMARY_METRICS,
    RunOptions,
    TrainingRun,
    advisory_estimate,
    disk_bytes_needed,
    masked_lm_tokens,
    precision_and_device,
    prepare_output_dir,
    record_written,
    run_training,
    start_event,
    weight_average_note,
    write_summary,
)


@dataclass
class DistillSetup:
    """Everything loaded for a run, before training."""

    cfg: DistillationYamlConfig
    teacher: Any
    student: Any
    tokenizer: Any
    task: str
    vocab: int
    train_blocks: Any
    eval_blocks: Any
    precision: str
    device: Any
    teacher_name: str
    student_name: str
    student_layers: list[int] | None
    teacher_dir: Path
    precision_reason: str = ""
    layer_scores: list[float] | None = None  # teacher block importance (strategy: importance)
    # tokenizers differ (entrenar_cli.cross_tokenizer.CrossSetup); ``tokenizer`` is then the student's
    cross: Any = None


def _check_mapping(name: str, mapping: list[tuple[int, int]], n_student: int, n_teacher: int,
                   allow_embed: bool) -> None:
    low = -1 if allow_embed else 0
    problems = []
    for s, t in mapping:
        if not (low <= s < n_student):
            problems.append(f"student layer {s} (student has {n_student} layers: {low}..{n_student - 1})")
        if not (low <= t < n_teacher):
            problems.append(f"teacher layer {t} (teacher has {n_teacher} layers: {low}..{n_teacher - 1})")
    if problems:
        raise ConfigError(f"{name}: " + "; ".join(problems),
                          hint="layer indices are 0-based transformer blocks; -1 is the embedding output")


def resolve_layer_mappings(dist: Any, n_student: int, n_teacher: int, teacher_layers: list[int] | None, *,
                           progressive_name: str = "distillation.progressive.layer_mapping",
                           attention_name: str = "distillation.attention.layer_mapping") -> None:
    """Check the hidden-state and attention mappings against the layer counts, filling the defaults in
    place. Progressive: every student block with the teacher block it was copied from
    (``teacher_layers``, when the student was built from them), else the student's blocks spread evenly
    over the teacher's. Attention: the progressive pairs (blocks only), else that same default. The
    names are what error messages call the two mappings (YAML keys here, builder calls in the Python API)."""
    from entrenar_cli import models

    default = list(zip(range(n_student), teacher_layers or models.spread_layers(n_teacher, n_student)))
    if dist.progressive.enabled:
        if dist.progressive.layer_mapping is None:
            dist.progressive.layer_mapping = default
        _check_mapping(progressive_name, dist.progressive.layer_mapping, n_student, n_teacher, True)
    if dist.attention.enabled:
        if dist.attention.layer_mapping is None:
            pairs = ([(s, t) for s, t in dist.progressive.layer_mapping if s >= 0 and t >= 0]
                     if dist.progressive.enabled else [])
            dist.attention.layer_mapping = pairs or default
        _check_mapping(attention_name, dist.attention.layer_mapping, n_student, n_teacher, False)


def _check_teacher_placement(cfg: DistillationYamlConfig, teacher_only: bool) -> None:
    """A teacher spread over devices (``teacher.device_map``) cannot give its layers to the student,
    nor be sharded again by FSDP."""
    if cfg.teacher.device_map is None or teacher_only:
        return
    if cfg.student.init_from_teacher is not None:
        raise ConfigError(
            "teacher.device_map: student.init_from_teacher copies the teacher's layers, which a teacher spread "
            "over devices does not hold in one place",
            hint="fill the teacher cache with `entrenar cache CONFIG` (device_map works there), then distill "
            "without teacher.device_map; or give the student its own student.model_id",
        )
    if cfg.training.sharding == "fsdp":
        raise ConfigError("teacher.device_map and training.sharding: fsdp both place the teacher; choose one",
                          hint="remove teacher.device_map (FSDP shards the teacher over the processes)")


def setup(cfg: DistillationYamlConfig, *, teacher_only: bool = False) -> DistillSetup:
    """Load teacher, tokenizer, student and data; check that they fit together.

    ``teacher_only`` (``entrenar cache``): a student built from the teacher's layers is not built
    (the cache needs the teacher, the tokenizer and the data; the compared vocabulary is the
    teacher's own then), so a teacher spread over devices with ``teacher.device_map`` can be cached.
    """
    import torch

    from entrenar_cli import models
    from entrenar_cli.data import load_blocks
    from entrenar_cli.trainer import precision_dtype

    choice, device = precision_and_device(cfg.training)
    precision = choice.precision
    t_src = cfg.teacher
    t_loc = models.open_source(t_src)
    need_eager = cfg.distillation.attention.enabled
    tokenizer = models.load_tokenizer(t_loc, t_src.trust_remote_code)
    t_config = models.read_config(t_loc)
    task = models.task_of(t_config)
    info(f"loading teacher {t_src.model_id} ({t_config.get('model_type')}, {task})")
    t_dtype = {"auto": precision_dtype(precision), "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}[t_src.dtype]
    _check_teacher_placement(cfg, teacher_only)
    teacher = models.load_model(t_loc, task=task, dtype=t_dtype, eager_attention=need_eager,
                                trust_remote_code=t_src.trust_remote_code, allow_pickle=t_src.allow_pickle,
                                placement=t_src.placement())
    teacher.eval().requires_grad_(False)
    max_pos = getattr(teacher.config, "max_position_embeddings", None)
    if max_pos and cfg.dataset.max_length > max_pos:
        raise ConfigError(f"dataset.max_length {cfg.dataset.max_length} exceeds the teacher's "
                          f"{max_pos} positions", hint=f"set dataset.max_length <= {max_pos}")
    st = cfg.student
    s_loc = student_tok = cross = None
    if st.init_from_teacher is None:
        s_loc = models.locate(st.model_id, revision=st.revision, allow_pickle=st.allow_pickle)
        student_tok = models.load_tokenizer(s_loc, st.trust_remote_code)
        cross = _cross_tokenizer_setup(cfg, tokenizer, student_tok, task, s_loc, max_pos)
    if cross is not None:
        train_blocks, eval_blocks = cross.train_blocks, cross.eval_blocks
    else:
        train_blocks, eval_blocks = load_blocks(cfg.dataset, tokenizer, causal=(task == "causal"))

    layers: list[int] | None = None
    layer_scores: list[float] | None = None
    if st.init_from_teacher is not None:
        n_t = models.num_layers(teacher)
        spec = st.init_from_teacher.layers
        if isinstance(spec, int) and spec > n_t:
            raise ConfigError(f"student.init_from_teacher.layers: {spec} layers asked, the teacher has {n_t}")
        if isinstance(spec, int) and st.init_from_teacher.strategy == "importance":
            layer_scores = _layer_scores(teacher, train_blocks, cfg.dataset.max_length)
            layers = models.importance_layers(layer_scores, spec)
        else:
            layers = models.spread_layers(n_t, spec) if isinstance(spec, int) else list(spec)
        info(f"student: {len(layers)} of the teacher's {n_t} layers {layers}")
        # built from an fp32 copy so the student's master weights are full precision; a cache fill
        # only needs to know which layers it would have (the teacher stands in: same vocabulary, width)
        student = teacher if teacher_only else models.student_from_teacher(teacher, layers)
        student_tok = None
        student_name = f"teacher layers {layers}"
    else:
        s_task = models.task_of(models.read_config(s_loc))
        student = models.load_model(s_loc, task=s_task if task != "base" else "base", dtype=torch.float32,
                                    eager_attention=need_eager, trust_remote_code=st.trust_remote_code,
                                    allow_pickle=st.allow_pickle)
        student_name = st.model_id
    if need_eager and hasattr(student, "set_attn_implementation"):
        student.set_attn_implementation("eager")
    if cross is not None:  # ids differ: no logits are compared by id, the student's own vocabulary counts
        vocab, tokenizer = models.vocab_of(student), student_tok
    else:
        vocab, note = models.check_vocab(tokenizer, student_tok, teacher, student)
        if note:
            warn(note)

    dist = cfg.distillation
    n_s, n_t = len(layers) if layers is not None else models.num_layers(student), models.num_layers(teacher)
    resolve_layer_mappings(dist, n_s, n_t, layers)
    if task == "base" and not (dist.progressive.enabled or dist.attention.enabled or dist.embedding.enabled):
        raise ConfigError(
            "the teacher has no language-model head, so there are no logits to distill",
            hint="enable distillation.embedding, progressive and/or attention for encoder teachers",
        )
    if dist.embedding.enabled and models.hidden_size(student) != models.hidden_size(teacher):
        raise ConfigError(
            f"distillation.embedding: the student's hidden size {models.hidden_size(student)} differs from the "
            f"teacher's {models.hidden_size(teacher)}, so their embeddings cannot be compared",
            hint="use a student of the teacher's width (e.g. student.init_from_teacher) or turn embedding off",
        )
    if st.lora is not None and not teacher_only:
        student = models.apply_lora(student, st.lora)

    info(f"data: {len(train_blocks)} training blocks, "
         f"{len(eval_blocks)} held-out blocks of {cfg.dataset.max_length} tokens")
    return DistillSetup(cfg, teacher, student, tokenizer, task, vocab, train_blocks, eval_blocks, precision, device,
                        t_src.model_id, student_name, layers, t_loc.path, choice.reason, layer_scores=layer_scores,
                        cross=cross)


def _cross_tokenizer_setup(cfg: DistillationYamlConfig, teacher_tok: Any, student_tok: Any, task: str, s_loc: Any,
                           max_pos: int | None) -> Any:
    """The cross-tokenizer side of a run when the two tokenizers differ, else None (today's exact path)."""
    from entrenar_cli import cross_tokenizer, models

    if not cross_tokenizer.tokenizers_differ(teacher_tok, student_tok):
        return None
    student_task = models.task_of(models.read_config(s_loc))
    return cross_tokenizer.prepare(cfg, teacher_tok, student_tok, task=task, student_task=student_task,
                                   teacher_max_positions=max_pos)


# training blocks the teacher's layers are scored on (strategy: importance)
IMPORTANCE_SAMPLE_BLOCKS = 8


def _layer_scores(teacher: Any, blocks: Any, length: int) -> list[float]:
    """Angular-distance importance of every teacher block on blocks spread over the training split."""
    import numpy as np
    import torch

    from entrenar_cli import models

    n = len(blocks)
    if n == 0:
        raise ConfigError("student.init_from_teacher.strategy: importance needs training data to score layers on")
    picks = sorted({round(i * (n - 1) / max(1, IMPORTANCE_SAMPLE_BLOCKS - 1)) for i in range(IMPORTANCE_SAMPLE_BLOCKS)})
    ids = torch.tensor(np.stack([blocks.block(j)[0][:length] for j in picks]))
    device = next(teacher.parameters()).device
    return models.block_importance(teacher, ids.to(device))


def build_objective(su: DistillSetup, cache: Any = None) -> Any:
    from entrenar_cli import models

    if su.cross is not None:
        op = su.cfg.distillation.on_policy
        if op.fraction > 0 or op.eval_prompts:  # the cross-tokenizer objective has no on-policy path
            raise ConfigError("distillation.on_policy needs the teacher and the student to share a tokenizer")
        from entrenar_cli.cross_tokenizer import build_objective as cross_objective

        return cross_objective(su.cross, su.teacher, su.student, su.cfg.distillation)
    from entrenar_cli.chunking import logits_budget
    from entrenar_cli.objectives import DistillObjective

    return DistillObjective(su.teacher, su.cfg.distillation, task=su.task, vocab=su.vocab,
                            student_dim=models.hidden_size(su.student), teacher_dim=models.hidden_size(su.teacher),
                            mlm_info=masked_lm_tokens(su.task, su.tokenizer), cache=cache,
                            logits_budget=logits_budget(su.cfg.training))


def teacher_cache_spec(su: DistillSetup) -> dict[str, Any]:
    """What a teacher cache for this run holds: its manifest, record format and teacher layers."""
    from entrenar_cli.data import tokenizer_fingerprint
    from entrenar_cli.teacher_cache import CacheFormat, data_fingerprint, weights_fingerprint

    settings = su.cfg.distillation.teacher_cache
    dist = su.cfg.distillation
    hidden_set = {t for _, t in dist.progressive.layer_mapping} if dist.progressive.enabled else set()
    if dist.embedding.enabled:
        from entrenar_cli import models

        hidden_set.add(models.num_layers(su.teacher) - 1)
    hidden = sorted(hidden_set)
    attn = sorted({t for _, t in dist.attention.layer_mapping or []}) if dist.attention.enabled else []
    logits = su.task == "causal"
    fmt = CacheFormat(settings.top_k, settings.samples, su.vocab, dist.temperature) if logits else None
    name = su.teacher_name
    if not name.startswith("pkg:") and Path(name).expanduser().exists():
        name = Path(name).name  # no absolute paths in a manifest meant to travel
    manifest = {
        "teacher": name, "weights": weights_fingerprint(su.teacher_dir),
        "tokenizer": tokenizer_fingerprint(su.tokenizer),
        "data": data_fingerprint(su.train_blocks.store.tokens, su.cfg.dataset.max_length),
        "max_length": su.cfg.dataset.max_length, "vocab": su.vocab,
        "top_k": settings.top_k if logits else None, "samples": settings.samples if logits else None,
        "temperature": dist.temperature if logits else None,
        "bytes_per_token": fmt.bytes_per_token if fmt else 0,
        "hidden_layers": hidden, "attention_layers": attn, "blocks_total": len(su.train_blocks),
    }
    return {"manifest": manifest, "format": fmt, "hidden": hidden, "attention": attn,
            "dir": Path(settings.dir) if settings.dir else None}


def teacher_cache_bytes_per_token(su: DistillSetup, spec: dict[str, Any]) -> dict[str, int]:
    """Bytes per training token of each part of the cache (the plan prints them)."""
    from entrenar_cli import models

    d = models.hidden_size(su.teacher)
    parts = {"logits": spec["format"].bytes_per_token if spec["format"] else 0,
             "hidden_states": 2 * d * len(spec["hidden"]),
             "attention_maps": 2 * su.cfg.dataset.max_length * len(spec["attention"])}
    parts["total"] = sum(parts.values())
    return parts


def open_teacher_cache(su: DistillSetup, out: Path) -> Any:
    """The teacher cache of this run, or None when it is off.

    A cache built elsewhere (``entrenar cache``, another directory or machine, any process count) is
    used when its manifest matches this run's inputs and refused, naming what differs, when not.
    Blocks it lacks are filled by this run. Reads of the next batches run ahead in a background thread.
    """
    settings = su.cfg.distillation.teacher_cache
    if not settings.enabled:
        return None
    if su.task == "masked":
        raise ConfigError("distillation.teacher_cache: masked-LM distillation masks tokens at random each step, "
                          "so teacher outputs cannot be reused",
                          hint="turn the cache off for encoders with an MLM head")
    from entrenar_cli.teacher_cache import TeacherCache, training_schedule

    spec = teacher_cache_spec(su)
    directory = spec["dir"] or out / "teacher-cache"
    cache = TeacherCache(directory, spec["manifest"], spec["format"], spec["hidden"], spec["attention"])
    tr = su.cfg.training
    cache.expect(training_schedule(len(su.train_blocks), tr.seed, tr.batch_size, tr.gradient_accumulation,
                                   world_size(), process_rank(), tr.epochs), pin_memory=su.device.type == "cuda")
    per_token = teacher_cache_bytes_per_token(su, spec)
    info(f"teacher cache {directory}: {len(cache)} of {len(su.train_blocks)} blocks cached, "
         f"{per_token['total']:,} bytes/token (logits {per_token['logits']}, hidden states "
         f"{per_token['hidden_states']:,}, attention maps {per_token['attention_maps']:,})")
    return cache


def plan(su: DistillSetup) -> dict[str, Any]:
    """The resolved plan printed by --dry-run and stored in the summary."""
    from entrenar_cli import models, sharding
    from entrenar_cli.trainer import planned_steps

    t_params, _ = models.count_parameters(su.teacher)
    s_params, s_train = models.count_parameters(su.student)
    tr = su.cfg.training
    sharding.mark_planned(tr, su.student, su.teacher)  # the logit-path line then tells the truth
    world = world_size()
    steps, per_epoch = planned_steps(tr, len(su.train_blocks), world)
    tokens_per_step = tr.batch_size * tr.gradient_accumulation * world * su.cfg.dataset.max_length
    estimate = _memory_estimate(su)
    return {
        "teacher": {"name": su.teacher_name, "parameters": t_params, "layers": models.num_layers(su.teacher),
                    "hidden_size": models.hidden_size(su.teacher), "task": su.task},
        "student": {"name": su.student_name, "parameters": s_params, "trainable_parameters": s_train,
                    "layers": models.num_layers(su.student), "hidden_size": models.hidden_size(su.student),
                    "init_layers": su.student_layers, "init_layer_scores": su.layer_scores},
        "steps": steps, "steps_per_epoch": per_epoch, "tokens_per_step": tokens_per_step, "ema_decay": tr.ema_decay,
        "train_blocks": len(su.train_blocks), "eval_blocks": len(su.eval_blocks),
        "precision": su.precision, "precision_reason": su.precision_reason, "device": str(su.device),
        "vocab": su.vocab,
        "estimated_mem_bytes": estimate, "estimated_mem_note": sharding.memory_note(tr),
        **({"cross_tokenizer": su.cross.plan()} if su.cross is not None else {}),
        "logit_loss": _logit_loss_line(su, tr),
        "on_policy": su.cfg.distillation.on_policy.model_dump(),
    }


def _logit_loss_line(su: DistillSetup, tr: Any) -> str:
    """How the logit losses run, for the plan ("" when the models compare no logits)."""
    from entrenar_cli.objectives import planned_logit_path

    if su.task not in ("causal", "masked"):
        return ""
    if su.cross is not None:  # cross_objective compares aligned positions' distributions, materialised
        return "full logits on aligned positions (cross-tokenizer losses are not chunked)"
    return planned_logit_path(tr, {"student": su.student, "teacher": su.teacher})


def _memory_estimate(su: DistillSetup) -> int | None:
    """Training-memory estimate for the plan (advice: see common.advisory_estimate)."""
    from entrenar_cli import lora_defaults, sharding
    from entrenar_cli.estimate import estimate_training

    def compute() -> int:
        tr = su.cfg.training
        lora = su.cfg.student.lora
        student_cfg = su.student.config.to_dict()  # a PeftModel forwards .config to its base model
        est = estimate_training(
            student_cfg, method="lora" if lora else "full", rank=lora.rank if lora else lora_defaults.RANK,
            target_modules=lora.target_modules if lora else None, batch_size=tr.batch_size,
            seq_len=su.cfg.dataset.max_length, dtype=su.precision if su.precision != "fp32" else "fp32",
            gradient_checkpointing=tr.gradient_checkpointing,
            attention="eager" if su.cfg.distillation.attention.enabled else "sdpa",
            teacher_config=su.teacher.config.to_dict(), lora_alpha=lora.alpha if lora else None,
            lora_dropout=lora.dropout if lora else 0.0, gradient_accumulation=tr.gradient_accumulation,
            device="cuda" if su.device.type == "cuda" else "cpu", logits_budget=sharding.planned_logits_budget(tr),
            weight_average=tr.ema_decay is not None,
        )
        return sharding.plan_memory_bytes(est, tr, student_cfg, su.teacher.config.to_dict())

    return advisory_estimate(compute)


def print_plan(p: dict[str, Any]) -> None:
    from rich.table import Table

    from entrenar_cli.console import out
    from entrenar_cli.fsutil import human_bytes

    table = Table(title="distillation plan", show_header=True)
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_row("model", p["teacher"]["name"], str(p["student"]["name"]))
    table.add_row("parameters", f"{p['teacher']['parameters']:,}", f"{p['student']['parameters']:,}")
    table.add_row("trainable", "0", f"{p['student']['trainable_parameters']:,}")
    table.add_row("layers / hidden", f"{p['teacher']['layers']} / {p['teacher']['hidden_size']}",
                  f"{p['student']['layers']} / {p['student']['hidden_size']}")
    out.print(table)
    scores = p["student"].get("init_layer_scores")
    if scores:
        out.print(f"student layers {p['student']['init_layers']} chosen by importance (angular distance between "
                  "each teacher block's input and output): " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(scores)))
    if p.get("cross_tokenizer"):
        from entrenar_cli.cross_tokenizer import doctor_lines

        ct = p["cross_tokenizer"]
        for line in doctor_lines(ct, ct["method"], ct["method_reason"]):
            out.print(line)
    est = p.get("estimated_mem_bytes")
    out.print(f"steps {p['steps']} ({p['steps_per_epoch']} per epoch), {p['tokens_per_step']:,} tokens per step, "
              f"{p['train_blocks']} train / {p['eval_blocks']} held-out blocks on {p['device']}"
              + (f", estimated training memory {human_bytes(est)}{p.get('estimated_mem_note', '')}" if est else "")
              + f"; precision {p.get('precision_reason') or p['precision']}"
              + weight_average_note(p.get("ema_decay")))
    if p.get("logit_loss"):
        out.print(f"logit losses: {p['logit_loss']}")
    op = p.get("on_policy") or {}
    if op.get("fraction"):
        out.print(f"on-policy: {op['fraction']:g} of each micro-batch's sequences are the student's continuations "
                  f"({op['prompt_tokens']} prompt + up to {op['max_new_tokens']} sampled tokens, temperature "
                  f"{op['temperature']:g}, top_p {op['top_p']:g}), loss {op['loss']} on generated tokens")


class DistillRun(TrainingRun):
    """`entrenar distill` on the shared skeleton (:func:`~entrenar_cli.pipeline.common.run_training`)."""

    command = "distill"

    def setup(self) -> None:
        from entrenar_cli.data import check_dataset_settings

        if self.cfg.dataset.path is not None:
            check_dataset_settings(self.cfg.dataset.path, None)
        self.su = su = setup(self.cfg)
        self.model, self.tokenizer, self.precision = su.student, su.tokenizer, su.precision
        self.train_blocks, self.eval_blocks = su.train_blocks, su.eval_blocks
        self.cache: Any = None
        # --baseline trains the same initial student again: keep a copy before the KD run changes it
        self.baseline_init = copy.deepcopy(su.student) if self.opts.baseline else None

    def plan(self) -> dict[str, Any]:
        return plan(self.su)

    def print_plan(self, plan: dict[str, Any]) -> None:
        print_plan(plan)

    def disk_bytes(self, plan: dict[str, Any]) -> int:
        lora = self.cfg.student.lora is not None
        return disk_bytes_needed(plan["student"]["parameters"], plan["student"]["trainable_parameters"],
                                 self.cfg.output.save_total_limit, full_model=not lora or self.cfg.output.merge,
                                 adapter=lora)

    def on_start(self) -> None:
        _record_cache_dir(self.su, self.out)

    def objective(self) -> Any:
        self.cache = open_teacher_cache(self.su, self.out)
        return build_objective(self.su, self.cache)

    def format_eval(self, metrics: dict[str, Any]) -> str:
        return _fmt_eval(metrics)

    def summary(self, plan: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        summary = _summary(plan, result)
        cache = self.cache
        if cache is not None:
            summary["teacher_cache"] = {"dir": str(cache.dir), "hit_rate": cache.hit_rate, "hits": cache.hits,
                                        "misses": cache.misses, "size_bytes": cache.size_bytes}
            info(f"teacher cache: hit rate {100 * cache.hit_rate:.1f}%, {cache.size_bytes / 2**20:.1f} MiB")
        return summary

    def save(self, model: Any) -> dict[str, str]:
        return save_outputs(model, self.su, self.out)

    def print_summary(self, summary: dict[str, Any]) -> None:
        print_summary(summary)

    def after_training(self, summary: dict[str, Any]) -> None:
        if self.baseline_init is None:
            return
        record_written(self.out, "baseline")
        summary["baseline"] = run_baseline(self.su, self.baseline_init, self.out / "baseline", self.opts,
                                           kd_dir=self.out)
        from entrenar_cli.report import read_baseline, read_run
        from entrenar_cli.report.compare import equal_wall_time

        baseline_log, _ = read_baseline(self.out)
        if baseline_log is not None:
            summary["baseline"]["equal_wall_time"] = equal_wall_time(read_run(self.out), baseline_log)
        write_summary(self.out, summary)
        _print_verdict(summary)

    def skipped_on_signal(self, summary: dict[str, Any]) -> str | None:
        if self.baseline_init is None:
            return None
        return "the CE-only baseline was interrupted" if "baseline" in summary else "the CE-only baseline was not run"


def run(cfg: DistillationYamlConfig, opts: RunOptions) -> dict[str, Any]:
    """Distill; returns the summary (also written to summary.json)."""
    return run_training(DistillRun(cfg, opts))


def _record_cache_dir(su: DistillSetup, out: Path) -> None:
    """A teacher cache inside the output directory is this run's output (--overwrite may remove it)."""
    settings = su.cfg.distillation.teacher_cache
    if not settings.enabled:
        return
    directory = (Path(settings.dir).expanduser() if settings.dir else out / "teacher-cache").absolute()
    if directory.is_relative_to(out.absolute()) and directory != out.absolute():
        record_written(out, directory.relative_to(out.absolute()).parts[0])


def _fmt_eval(m: dict[str, Any]) -> str:
    parts = []
    for key, label in (("perplexity", "ppl"), ("kl_to_teacher", "KL"), ("agreement", "agreement"),
                       ("teacher_perplexity", "teacher ppl"), ("embedding_cosine", "cosine"),
                       ("hidden_mse", "hidden MSE"), ("teacher_nll_of_student", "teacher NLL of student samples")):
        if key in m:
            parts.append(f"{label} {m[key]:.4g}")
    return ", ".join(parts)


def save_outputs(student: Any, su: DistillSetup, out: Path) -> dict[str, str]:
    """The student as a Hugging Face directory at ``out`` (merged when LoRA), plus the adapter; returns
    what was written (the summary's ``outputs``)."""
    from entrenar_cli import models

    outputs: dict[str, str] = {}
    if su.cfg.student.lora is not None:
        record_written(out, "adapter")
        models.save_adapter_dir(student, out / "adapter")
        outputs["adapter_dir"] = str(out / "adapter")
        if not su.cfg.output.merge:
            return outputs
    models.save_model_files(student, su.tokenizer, out, before_rename=lambda names: record_written(out, *names))
    return {"model_dir": str(out), **outputs}


def _summary(p: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    ev = result.get("eval") or {}
    teacher = dict(p["teacher"])
    if "teacher_perplexity" in ev:
        teacher["perplexity"] = ev["teacher_perplexity"]
    student = dict(p["student"])
    student.update({k: ev[k] for k in SUMMARY_METRICS if k in ev})
    return {"run": "distill", **{k: result[k] for k in RESULT_FIELDS},
            "estimated_mem_bytes": p.get("estimated_mem_bytes"), "teacher": teacher, "student": student}


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from entrenar_cli.console import out
    from entrenar_cli.fsutil import human_bytes
    from entrenar_cli.pipeline.common import memory_phrase

    t, s, b = summary["teacher"], summary["student"], summary.get("student_before", {})
    table = Table(title=f"distillation {summary['status']}: {summary['steps']} steps, "
                        f"{summary['tokens_per_s']:.0f} tokens/s, {memory_phrase(summary)}")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student before", justify="right")
    table.add_column("student after", justify="right")

    def f(d: dict[str, Any], k: str, fmt: str = "{:.4g}") -> str:
        return fmt.format(d[k]) if k in d and d[k] is not None else "-"

    table.add_row("parameters", f(t, "parameters", "{:,}"), "", f(s, "parameters", "{:,}"))
    if "perplexity" in s:  # models with logits (encoders without a head have none)
        table.add_row("held-out perplexity", f(t, "perplexity"), f(b, "perplexity"), f(s, "perplexity"))
        table.add_row("KL to teacher", "0", f(b, "kl_to_teacher"), f(s, "kl_to_teacher"))
        table.add_row("top-1 agreement", "1", f(b, "agreement"), f(s, "agreement"))
    if "embedding_cosine" in s:
        table.add_row("embedding cosine", "1", f(b, "embedding_cosine"), f(s, "embedding_cosine"))
    if s.get("size_bytes"):
        table.add_row("size on disk", "", "", human_bytes(s["size_bytes"]))
    out.print(table)


def run_baseline(su: DistillSetup, init: Any, out: Path, opts: RunOptions, *,
                 kd_dir: Path | None = None) -> dict[str, Any]:
    """The same student, initialisation, data and steps, trained with plain cross-entropy.

    With ``kd_dir`` (the KD run's output directory) each evaluation also prints the KD student's
    perplexity at the same step and the ratio, so the crossing point shows while it runs.
    """
    from entrenar_cli.chunking import logits_budget
    from entrenar_cli.objectives import LMObjective
    from entrenar_cli.pipeline.common import log_event
    from entrenar_cli.trainer import Engine, EngineOptions

    info("baseline: training the same student with cross-entropy only (no teacher)")
    prepare_output_dir(out, RunOptions(overwrite=True))
    start_event(out, "baseline", su.cfg)
    objective = LMObjective(su.task, su.vocab, masked_lm_tokens(su.task, su.tokenizer), logits_budget(su.cfg.training))
    engine = Engine(su.cfg.training, init, objective, su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=out, run="baseline", progress=opts.progress,
                                  on_eval=lambda r: _baseline_eval_line(r, kd_dir)),
                    pad_token_id=su.tokenizer.pad_token_id or 0, precision=su.precision)
    result = engine.train()
    model = engine.accelerator.unwrap_model(engine.model).eval()
    metrics: dict[str, Any] = {}
    if len(su.eval_blocks):
        # evaluated with the distillation metrics (agreement with the teacher) for a like-for-like table
        import torch

        with torch.no_grad(), engine._autocast():
            metrics = build_objective(su).evaluate(model, engine.eval_batches())
    summary = {"run": "baseline", "status": result["status"], "steps": result["steps"],
               "tokens_per_s": result["tokens_per_s"], "student": {k: v for k, v in metrics.items()}}
    write_summary(out, summary)
    log_event(out, {"event": "end", "time": time.time(), "status": result["status"], "steps": result["steps"]})
    return {k: metrics[k] for k in ("perplexity", "agreement", "kl_to_teacher", "embedding_cosine") if k in metrics}


def _baseline_eval_line(record: dict[str, Any], kd_dir: Path | None) -> None:
    """``baseline eval step 100: ppl 51.5; KD student at step 100: ppl 46.9 (0.91x)``."""
    line = f"baseline eval step {record['step']}: ppl {record.get('perplexity', float('nan')):.4g}"
    if kd_dir is not None and record.get("perplexity"):
        from entrenar_cli.report import read_run

        steps, perplexities = read_run(kd_dir).series("perplexity", "eval")
        kd = dict(zip(steps, perplexities)).get(float(record["step"]))
        if kd is not None:
            line += f"; KD student at step {record['step']}: ppl {kd:.4g} ({kd / record['perplexity']:.2f}x)"
    info(line)


def _print_verdict(summary: dict[str, Any]) -> None:
    from entrenar_cli.console import out
    from entrenar_cli.report.compare import compare_with_baseline, equal_time_line

    out.print(compare_with_baseline(summary, {"student": summary["baseline"]})["verdict"])
    equal = equal_time_line(summary["baseline"].get("equal_wall_time"))
    if equal:
        out.print(equal[0].upper() + equal[1:])
