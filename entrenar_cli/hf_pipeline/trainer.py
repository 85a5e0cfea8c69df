"""``DistillationTrainer``: the document's trainer, running the shared engine.

The student is built from the config (another model, or the teacher's layers), the objective is
the engine's :class:`~entrenar_cli.objectives.DistillObjective` and every optimizer step runs on
:class:`~entrenar_cli.trainer.Engine`: :meth:`DistillationTrainer.step` for one batch,
:meth:`DistillationTrainer.train` for whole epochs (evaluation, clipping, schedule, non-finite
steps handled as in ``entrenar distill``).

``simulate_step(loss)`` and ``simulate_epoch()`` are the document's bookkeeping calls: they record
a loss computed elsewhere (e.g. by :meth:`compute_loss` in your own loop) and close an epoch in
:meth:`state`; they do not train anything.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from entrenar_cli import models
from entrenar_cli.config.schema import OutputSettings
from entrenar_cli.errors import ConfigError, TrainingError, UsageError
from entrenar_cli.hf_pipeline._api import as_tensor, python_errors, schema_default
from entrenar_cli.hf_pipeline.config import TrainerConfig
from entrenar_cli.hf_pipeline.dataset import Dataset, empty_blocks
from entrenar_cli.hf_pipeline.teacher import SafeTensorsTeacher, TeacherModel


@dataclass
class TrainerState:
    """Step losses and epoch averages: real steps and ``simulate_step`` records alike."""

    step: int = 0
    epoch: int = 0  # completed epochs
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # mean loss of each completed epoch
    simulated_steps: int = 0
    _epoch_start: int = 0

    def record(self, loss: float, *, simulated: bool = False) -> None:
        self.losses.append(float(loss))
        self.step += 1
        self.simulated_steps += int(simulated)

    def end_epoch(self) -> None:
        current = self.losses[self._epoch_start:]
        self.epoch_losses.append(sum(current) / len(current) if current else math.nan)
        self.epoch += 1
        self._epoch_start = len(self.losses)

    @property
    def global_step(self) -> int:
        return self.step

    def avg_loss(self) -> float:
        """Mean loss of the open epoch's steps; right after an epoch ends, that epoch's mean (nan if none)."""
        current = self.losses[self._epoch_start:]
        if current:
            return sum(current) / len(current)
        return self.epoch_losses[-1] if self.epoch_losses else math.nan

    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


class _CallerBatches:
    """Stands in for training blocks when batches come from the caller: sizes the LR schedule."""

    causal = True

    def __init__(self, blocks: int, length: int):
        self.blocks = blocks
        self.length = length

    def __len__(self) -> int:
        return self.blocks


class DistillationTrainer:
    """``DistillationTrainer(config, teacher)``: a student trained against ``teacher`` on the shared engine.

    ``teacher``: a :class:`SafeTensorsTeacher` (or any :class:`TeacherModel`), a transformers model,
    or None to load ``config.teacher``. ``progress`` shows the engine's progress line in ``train``.
    """

    @python_errors
    def __init__(self, config: TrainerConfig, teacher: TeacherModel | nn.Module | None = None, *,
                 progress: bool = False):
        if not isinstance(config, TrainerConfig):
            raise UsageError(f"DistillationTrainer(config, teacher): config is a {type(config).__name__}",
                             hint="pass a TrainerConfig (DistillationYamlConfig.to_trainer_config() gives one)")
        self.config = config.copy()
        self.progress = progress
        if teacher is None:
            teacher = SafeTensorsTeacher.from_source(self.config.teacher)
        elif isinstance(teacher, nn.Module):
            teacher = SafeTensorsTeacher(teacher, task=models.task_of(teacher.config.to_dict()))
        if not isinstance(teacher, TeacherModel):
            raise UsageError(f"DistillationTrainer(config, teacher): teacher is a {type(teacher).__name__}",
                             hint="pass SafeTensorsTeacher.from_path(dir), a transformers model, or None")
        self.teacher = teacher
        self.student_tokenizer: Any = None
        self.student, self.student_layers = self._build_student()
        # the student reads text with its own tokenizer: the objective pairs the two by characters
        # and needs the data to build (cross_tokenizer.CrossSetup, made per dataset)
        self.cross_tokenizer = self._tokenizers_differ()
        self.vocab = self._check()
        from entrenar_cli.chunking import logits_budget
        from entrenar_cli.objectives import DistillObjective

        self.objective: Any = None if self.cross_tokenizer else DistillObjective(
            teacher.model, self.config.distillation, task=teacher.task, vocab=self.vocab,
            student_dim=models.hidden_size(self.student), teacher_dim=models.hidden_size(teacher.model),
            mlm_info=self._mlm_info(), logits_budget=logits_budget(self.config.training))
        self.cross: Any = None  # the CrossSetup of the dataset the engine trains on
        self._engine: Any = None
        self._engine_key: Any = None
        self._state = TrainerState()
        self.last_terms: dict[str, float] = {}

    @classmethod
    def new(cls, config: TrainerConfig, teacher: TeacherModel | nn.Module | None = None) -> "DistillationTrainer":
        return cls(config, teacher)

    # ---- setup: the student, checked against the teacher ------------------------------------

    def _build_student(self) -> tuple[nn.Module, list[int] | None]:
        st, teacher = self.config.student, self.teacher.model
        if st.init_from_teacher is not None:
            n_t = models.num_layers(teacher)
            spec = st.init_from_teacher.layers
            if getattr(st.init_from_teacher, "strategy", "spread") != "spread":
                # importance scores need training data, which DistillationTrainer only gets later
                raise UsageError("DistillationTrainer builds teacher-layer students with the 'spread' strategy only",
                                 hint="pass explicit teacher layer indices, "
                                 "e.g. TrainerConfig(teacher, student=[0, 5, 11])")
            if isinstance(spec, int) and spec > n_t:
                raise ConfigError(f"TrainerConfig(teacher, student={spec}): {spec} layers asked, the teacher has {n_t}")
            layers = models.spread_layers(n_t, spec) if isinstance(spec, int) else list(spec)
            return models.student_from_teacher(teacher, layers), layers
        loc = models.locate(st.model_id, revision=st.revision, allow_pickle=st.allow_pickle)
        task = "base" if self.teacher.task == "base" else models.task_of(models.read_config(loc))
        student = models.load_model(loc, task=task, dtype=torch.float32, trust_remote_code=st.trust_remote_code,
                                    allow_pickle=st.allow_pickle)
        try:
            self.student_tokenizer = models.load_tokenizer(loc, st.trust_remote_code)
        except Exception:  # noqa: BLE001 - a student without tokenizer files is checked on sizes only
            self.student_tokenizer = None
        return student, None

    def _check(self) -> int:
        """Layer mappings in range, attention maps available, a shared vocabulary; LoRA applied."""
        from entrenar_cli.pipeline.distill import resolve_layer_mappings

        dist, teacher, student = self.config.distillation, self.teacher.model, self.student
        n_s, n_t = models.num_layers(student), models.num_layers(teacher)
        resolve_layer_mappings(dist, n_s, n_t, self.student_layers,
                               progressive_name="TrainerConfig.with_progressive(layer_mapping)",
                               attention_name="TrainerConfig.with_attention_transfer(layer_mapping)")
        if dist.attention.enabled:
            for m in (teacher, student):
                if hasattr(m, "set_attn_implementation"):
                    m.set_attn_implementation("eager")
        if self.teacher.task == "base" and not (dist.progressive.enabled or dist.attention.enabled
                                                or dist.embedding.enabled):
            raise ConfigError("the teacher has no language-model head, so there are no logits to distill",
                              hint="use TrainerConfig.with_progressive(...), with_attention_transfer(...) "
                              "or with_embedding() for encoder teachers")
        if dist.embedding.enabled and models.hidden_size(student) != models.hidden_size(teacher):
            raise ConfigError(f"with_embedding: the student's hidden size {models.hidden_size(student)} differs "
                              f"from the teacher's {models.hidden_size(teacher)}",
                              hint="use a student of the teacher's width, "
                              "e.g. TrainerConfig(teacher, student=<layers>)")
        student_tok = self.student_tokenizer
        if self.cross_tokenizer:
            from entrenar_cli import cross_tokenizer

            cross_tokenizer.check_settings(self.config, self.teacher.task, models.task_of(student.config.to_dict()))
            cross_tokenizer.require_offsets(self.teacher.tokenizer, "teacher")
            cross_tokenizer.require_offsets(student_tok, "student")
            vocab = models.vocab_of(student)
        elif self.teacher.tokenizer is not None:
            vocab, _ = models.check_vocab(self.teacher.tokenizer, student_tok, teacher, student)
        else:
            vocab = min(models.vocab_of(teacher), models.vocab_of(student))
        if self.config.student.lora is not None:
            self.student = models.apply_lora(self.student, self.config.student.lora)
        return vocab

    def _tokenizers_differ(self) -> bool:
        if self.teacher.tokenizer is None or self.student_tokenizer is None:
            return False
        from entrenar_cli.cross_tokenizer import tokenizers_differ

        return tokenizers_differ(self.teacher.tokenizer, self.student_tokenizer)

    def _cross_blocks(self, dataset: Dataset) -> tuple[Any, Any]:
        """Across tokenizers: the dataset's text read with both tokenizers, and the objective for it."""
        from entrenar_cli import cross_tokenizer

        if dataset.settings is None:
            raise UsageError("the student's tokenizer differs from the teacher's, so the training text must be read "
                             "with both: this Dataset was built from token ids (mock, or blocks you made)",
                             hint="use Dataset.from_path(path, teacher) or Dataset.from_hub(name, teacher)")
        max_pos = getattr(self.teacher.model.config, "max_position_embeddings", None)
        cfg = SimpleNamespace(dataset=dataset.settings, distillation=self.config.distillation)
        self.cross = cross_tokenizer.prepare(cfg, self.teacher.tokenizer, self.student_tokenizer,
                                             task=self.teacher.task,
                                             student_task=models.task_of(self.student.config.to_dict()),
                                             teacher_max_positions=max_pos)
        self.objective = cross_tokenizer.build_objective(self.cross, self.teacher.model, self.student,
                                                         self.config.distillation)
        return self.cross.train_blocks, self.cross.eval_blocks

    def _refuse_across_tokenizers(self, call: str) -> None:
        if self.cross_tokenizer:
            raise UsageError(f"{call} is not available when the student's tokenizer differs from the teacher's: "
                             "a batch holds one tokenizer's ids, and the pairing with the teacher's tokens is made "
                             "from the text",
                             hint="train with train(Dataset.from_path(path, teacher)); evaluate(dataset) and "
                             "save(dir) work as usual")

    def _mlm_info(self) -> dict[str, int] | None:
        from entrenar_cli.pipeline.common import masked_lm_tokens

        tok = self.teacher.tokenizer
        return None if tok is None else masked_lm_tokens(self.teacher.task, tok)

    # ---- the engine -------------------------------------------------------------------------

    def _engine_for(self, dataset: Dataset | None, batch_len: int | None = None) -> Any:
        """The engine training on ``dataset`` (built once per dataset: it plans the LR schedule)."""
        from entrenar_cli.trainer import Engine, EngineOptions

        key = id(dataset) if dataset is not None else "caller"
        if self._engine is not None and self._engine_key == key:
            return self._engine
        tr = self.config.training
        if dataset is not None and self.cross_tokenizer:
            train_blocks, eval_blocks = self._cross_blocks(dataset)
            pad = self.student_tokenizer.pad_token_id or 0
        elif dataset is not None:
            train_blocks, eval_blocks, pad = dataset.blocks, dataset.heldout, dataset.pad_token_id
        else:
            if not tr.max_steps:
                raise UsageError("step(batch) with a batch that is not from a Dataset cannot plan the "
                                 "learning-rate schedule",
                                 hint="iterate Dataset.batches(n), or set TrainerConfig.max_steps(n)")
            per_step = tr.batch_size * tr.gradient_accumulation
            train_blocks = _CallerBatches(tr.max_steps * per_step, batch_len or 1)
            train_blocks.causal = self.teacher.task == "causal"
            eval_blocks = empty_blocks(batch_len or 1)
            pad = 0
        out = self.config.output
        out_dir = Path(out.dir) if out is not None else Path(tempfile.mkdtemp(prefix="entrenar-trainer-"))
        keep = out.save_total_limit if out is not None else schema_default(OutputSettings, "save_total_limit")
        # every step is logged so that state() holds each step's loss
        settings = tr.model_copy(update={"logging_steps": 1})
        self._engine = Engine(settings, self.student, self.objective, train_blocks, eval_blocks,
                              EngineOptions(output_dir=out_dir, run="distill", progress=self.progress,
                                            keep_checkpoints=keep), pad_token_id=pad)
        self._engine_key = key
        return self._engine

    @property
    def output_dir(self) -> Path | None:
        return self._engine.opts.output_dir if self._engine is not None else None

    def _student_module(self) -> nn.Module:
        if self._engine is not None:
            return self._engine.accelerator.unwrap_model(self._engine.model)
        return self.student

    # ---- training ---------------------------------------------------------------------------

    @python_errors
    def step(self, batch: Any) -> float:
        """One optimizer step on ``batch`` (from ``Dataset.batches``, or a dict of input_ids/labels
        tensors; a list of batches is one step with gradient accumulation). Returns the step's loss."""
        self._refuse_across_tokenizers("step(batch)")
        batches = batch if isinstance(batch, list) else [batch]
        prepared = [self._as_batch(b) for b in batches]
        dataset = getattr(batches[0], "dataset", None)
        engine = self._engine_for(dataset, prepared[0]["input_ids"].shape[-1])
        terms = engine.step(prepared)
        self.last_terms = terms
        self._state.record(terms["loss"])
        return terms["loss"]

    @staticmethod
    def _as_batch(b: Any) -> dict[str, Tensor]:
        if not isinstance(b, dict) or "input_ids" not in b or "labels" not in b:
            raise UsageError("step(batch): a batch needs input_ids and labels",
                             hint="iterate Dataset.batches(n), or pass {'input_ids': ..., 'labels': ...}")
        out = {k: as_tensor(v, torch.long) for k, v in b.items()}
        out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
        return out

    @python_errors
    def train(self, dataset: Dataset | None = None) -> dict[str, Any]:
        """Train for ``config.training.epochs`` epochs (or ``max_steps``) on ``dataset``.

        ``dataset`` None: the config's ``dataset`` section (configs from a YAML file). Returns the
        engine's summary (status, steps, tokens, eval metrics on the held-out part); ``state()``
        holds every step's loss and each epoch's mean.
        """
        if dataset is None:
            dataset = self._config_dataset()
        engine = self._engine_for(dataset)
        per_epoch = engine.steps_per_epoch()

        def on_log(record: dict[str, Any]) -> None:
            self._state.record(record["loss"])
            if record["step"] % per_epoch == 0 or record["step"] == engine.total_steps:
                self._state.end_epoch()

        result = engine.train(on_log=on_log)
        if result["status"] == "interrupted":
            raise TrainingError(f"interrupted at step {result['steps']} of {result['total_steps']}: checkpoint "
                                f"saved in {engine.opts.output_dir}",
                                hint="the student keeps its weights so far: call save(dir) to keep them")
        return result

    def _config_dataset(self) -> Dataset:
        ds = self.config.dataset
        if ds is None:
            raise UsageError("train() without a dataset: this TrainerConfig has no dataset section",
                             hint="pass train(Dataset.from_path(path, teacher))")
        from entrenar_cli.data import load_blocks

        tok = self.teacher.tokenizer
        if self.cross_tokenizer:  # read with both tokenizers when the engine is built
            return Dataset(empty_blocks(ds.max_length), settings=ds)
        train, held = load_blocks(ds, tok, causal=self.teacher.task == "causal")
        return Dataset(train, held, pad_token_id=tok.pad_token_id or 0, settings=ds)

    @python_errors
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Held-out metrics (perplexity, KL to teacher, agreement, ...) on ``dataset``'s held-out part
        (its blocks, when it has no held-out part)."""
        engine = self._engine_for(dataset)
        if self.cross_tokenizer:  # the engine's held-out blocks are this dataset's, read with both tokenizers
            return engine.evaluate()
        blocks = dataset.heldout if len(dataset.heldout) else dataset.blocks
        saved = engine.eval_blocks, engine._eval_cache
        engine.eval_blocks, engine._eval_cache = blocks, None
        try:
            return engine.evaluate()
        finally:
            engine.eval_blocks, engine._eval_cache = saved

    # ---- the document's loss and bookkeeping calls ----------------------------------------

    @python_errors
    def compute_loss(self, student_logits: Any, input_ids: Any, labels: Any, student_hiddens: Any = None,
                     student_attention: Any = None, attention_mask: Any = None) -> Tensor:
        """The configured objective for student outputs you computed: teacher run on ``input_ids``.

        ``student_hiddens``/``student_attention``: the student's ``hidden_states`` (embedding output
        first, as transformers returns it) and ``attentions``, needed when progressive distillation
        or attention transfer is on. Returns the mean loss (per token, plus per-sequence terms) as a
        tensor that carries gradients to ``student_logits``.
        """
        self._refuse_across_tokenizers("compute_loss(...)")
        dist = self.config.distillation
        if dist.progressive.enabled and student_hiddens is None:
            raise UsageError("compute_loss: progressive distillation is on, so student_hiddens is needed",
                             hint="pass student(input_ids, output_hidden_states=True).hidden_states")
        if dist.attention.enabled and student_attention is None:
            raise UsageError("compute_loss: attention transfer is on, so student_attention is needed",
                             hint="pass student(input_ids, output_attentions=True).attentions")
        device = next(self.teacher.model.parameters()).device
        logits = as_tensor(student_logits).to(device)
        ids = as_tensor(input_ids, torch.long).to(device)
        if ids.dim() == 1:
            ids, logits = ids.unsqueeze(0), logits.unsqueeze(0) if logits.dim() == 2 else logits
        y = as_tensor(labels, torch.long).to(device).reshape(ids.shape)
        mask = torch.ones_like(ids) if attention_mask is None else as_tensor(attention_mask, torch.long).to(device)
        def on_device(states: Any) -> tuple[Tensor, ...] | None:
            return None if states is None else tuple(as_tensor(x).to(device) for x in states)

        outputs = SimpleNamespace(logits=logits, hidden_states=on_device(student_hiddens),
                                  attentions=on_device(student_attention))
        objective = self.objective
        saved_mlm, objective.mlm_info = objective.mlm_info, None  # the caller's ids and labels, as given
        try:
            terms = objective.loss_terms(lambda **_: outputs, {"input_ids": ids, "attention_mask": mask, "labels": y})
        finally:
            objective.mlm_info = saved_mlm
        # this one micro-batch is the whole step: its own token and sequence counts normalise it
        return terms.objective(1.0 / max(1.0, float(terms.tokens)), 1.0 / ids.shape[0])

    def simulate_step(self, loss: float | Tensor) -> None:
        """Bookkeeping only: record a step's loss computed elsewhere (trains nothing; see :meth:`step`)."""
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        self._state.record(value, simulated=True)

    def simulate_epoch(self) -> None:
        """Bookkeeping only: close the current epoch in :meth:`state` (``train`` closes epochs itself)."""
        self._state.end_epoch()

    end_epoch = simulate_epoch

    def state(self) -> TrainerState:
        return self._state

    # ---- output -----------------------------------------------------------------------------

    @python_errors
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the student as a Hugging Face model directory (SafeTensors, with the teacher's tokenizer, or
        the student's own when the two differ).

        With LoRA, the adapter goes to ``directory/adapter`` and the merged model to ``directory``.
        A non-empty directory is refused unless ``overwrite`` (files of the same names are replaced).
        """
        out = Path(directory).expanduser()
        if out.exists() and not out.is_dir():
            raise UsageError(f"save({str(directory)!r}): {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UsageError(f"save({str(directory)!r}): {out} is not empty",
                             hint="pass save(dir, overwrite=True) to replace the model files there, or another dir")
        student = self._student_module()
        # training.ema_decay: the weight average is the student, as the CLI saves it
        with self._engine.averaged() if self._engine is not None else contextlib.nullcontext():
            if self.config.student.lora is not None:
                models.save_adapter_dir(student, out / "adapter")
                merge = self.config.output.merge if self.config.output is not None else \
                    schema_default(OutputSettings, "merge")
                if not merge:
                    return out
            models.save_model_files(student, self.student_tokenizer if self.cross_tokenizer
                                    else self.teacher.tokenizer, out)
        return out

    def __repr__(self) -> str:
        return (f"DistillationTrainer(teacher={self.teacher.name!r} ({models.num_layers(self.teacher.model)} layers), "
                f"student {models.num_layers(self.student)} layers, step {self._state.step})")


__all__ = ["DistillationTrainer", "TrainerState"]
