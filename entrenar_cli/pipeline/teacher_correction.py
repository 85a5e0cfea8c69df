"""Teacher correction: fine-tune the teacher on the distillation data before distilling from it.

A teacher that never saw the distillation data's distribution hands the student worse targets than
it could; Minitron (Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice") fine-tunes the
teacher on the distillation corpus first. On the demo (SmolLM2-135M-Instruct, 4-bit, on Python source)
300 steps take the teacher's held-out perplexity from 11.65 to 7.25, and the student distilled from it
gains far more than from any loss setting (BENCHMARKS.md, issue 15).

The student is built from the teacher's layers *before* the correction (``setup`` builds it first), so
``--baseline`` still trains exactly the distilled student's initialisation with plain cross-entropy.
The corrected teacher is saved in ``OUTPUT/teacher-corrected`` (a model directory: point another run's
``teacher.model_id`` at it to reuse it); ``--resume`` loads it instead of training it again, or
continues an interrupted correction from its checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from entrenar_cli.console import info, is_main_process, world_size
from entrenar_cli.errors import ConfigError

DIRNAME = "teacher-corrected"


def check_correctable(su: Any) -> None:
    """The correction trains the teacher as a causal LM on the training blocks, in this one process."""
    if su.cfg.teacher.correction is None:
        return
    if su.task != "causal":
        raise ConfigError("teacher.correction fine-tunes the teacher as a causal language model; this teacher is "
                          f"a {su.task} model", hint="remove teacher.correction")
    if su.cross is not None:
        raise ConfigError("teacher.correction: the training blocks are in the student's tokenizer, which the "
                          "teacher does not share, so there is nothing to fine-tune it on",
                          hint="correct the teacher first (`entrenar finetune` with method: full on the same "
                               "data) and point teacher.model_id at the result")
    if world_size() > 1:
        raise ConfigError("teacher.correction runs in a single process; this launch has "
                          f"{world_size()} processes",
                          hint="correct the teacher first (`entrenar finetune` with method: full on the same "
                               "data) and point teacher.model_id at the result")


def correct_teacher(su: Any, out: Path, *, resume: bool, progress: bool) -> dict[str, Any] | None:
    """Fine-tune ``su.teacher`` on ``su.train_blocks`` (full, fp32 master weights) and put the result in
    its place; returns what the summary records (None when the config asks for no correction)."""
    import torch

    from entrenar_cli import models
    from entrenar_cli.chunking import logits_budget
    from entrenar_cli.objectives import LMObjective
    from entrenar_cli.pipeline.common import interrupted_error, record_written
    from entrenar_cli.trainer import Engine, EngineOptions

    settings = su.cfg.teacher.correction
    if settings is None:
        return None
    directory = out / DIRNAME
    dtype = next(su.teacher.parameters()).dtype
    if resume and (directory / "config.json").is_file():  # config.json is written last: the weights are whole
        info(f"teacher correction: loading the corrected teacher saved in {directory}")
        su.teacher = _as_teacher(models.load_model(models.locate(str(directory)), task="causal", dtype=dtype,
                                                   eager_attention=su.cfg.distillation.attention.enabled), dtype)
        return _stored(directory)
    if is_main_process():
        record_written(out, DIRNAME)
    tr = su.cfg.training.model_copy(update={
        "max_steps": settings.steps, "epochs": 1, "learning_rate": settings.learning_rate,
        "warmup_steps": min(settings.warmup_steps, settings.steps), "lr_scheduler": "cosine",
        "eval_steps": None, "save_steps": None, "report_to": []})
    # fp32 master weights: a bf16 teacher (mixed precision) is a copy, not the weights to train
    model = copy.deepcopy(su.teacher).float().train().requires_grad_(True)
    objective = LMObjective("causal", su.vocab, None, logits_budget(tr))
    engine = Engine(tr, model, objective, su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=directory, run="teacher-correction", resume=resume, progress=progress,
                                  keep_checkpoints=1),
                    pad_token_id=su.tokenizer.pad_token_id or 0, precision=su.precision)
    before = engine.evaluate() if len(su.eval_blocks) else {}
    info(f"teacher correction: {settings.steps} steps of full fine-tuning at lr {settings.learning_rate:g} on the "
         "training blocks" + (f" (held-out perplexity {before['perplexity']:.4g})" if before else ""))
    result = engine.train()
    if result["status"] != "completed":
        raise interrupted_error(result, directory, "distill")
    trained = engine.accelerator.unwrap_model(engine.model)
    after = engine.evaluate() if len(su.eval_blocks) else {}
    record = {"steps": result["steps"], "learning_rate": settings.learning_rate, "elapsed_s": result["elapsed_s"],
              "perplexity_before": before.get("perplexity"), "perplexity_after": after.get("perplexity"),
              "dir": str(directory)}
    if is_main_process():
        models.save_model_files(trained, su.tokenizer, directory)
        (directory / "correction.json").write_text(_dumps(record))
    if after:
        info(f"teacher correction: held-out perplexity {before['perplexity']:.4g} -> {after['perplexity']:.4g} "
             f"in {result['elapsed_s']:.0f} s; saved in {directory}")
    del engine
    su.teacher = _as_teacher(trained, dtype)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return record


def _as_teacher(model: Any, dtype: Any) -> Any:
    return model.to(dtype).eval().requires_grad_(False)


def _dumps(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record, indent=1) + "\n"


def _stored(directory: Path) -> dict[str, Any] | None:
    import json

    path = directory / "correction.json"
    return json.loads(path.read_text()) if path.is_file() else None
