"""``TrainerConfig``: the document's builder over the real ``distill`` YAML sections.

Each builder call sets a field of :class:`entrenar_cli.config.schema.DistillationYamlConfig`'s
sections (teacher, student, distillation, training) through pydantic's validation, so defaults,
limits and messages are the schema's. ``DistillationYamlConfig.to_trainer_config()`` (the subclass
here: the schema module keeps its own method) returns a ``TrainerConfig`` over the same sections.
"""

from __future__ import annotations

import copy
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from entrenar_cli.config import schema
from entrenar_cli.errors import UsageError
from entrenar_cli.hf_pipeline._api import config_error, set_field

StudentSpec = Union[str, int, list[int], None]


def _student_config(student: StudentSpec, arg: str) -> schema.StudentConfig:
    try:
        if student is None:
            raise UsageError(f"{arg}: no student given",
                             hint="pass student='path/or/org-name' (a model) or student=<n layers> / "
                             "[teacher layer indices] to build it from the teacher")
        if isinstance(student, (int, list, tuple)) and not isinstance(student, bool):
            return schema.StudentConfig(init_from_teacher=list(student) if isinstance(student, tuple) else student)
        return schema.StudentConfig(model_id=str(student))
    except ValidationError as exc:
        raise config_error(exc, arg) from None


class TrainerConfig:
    """What to distil and how: ``TrainerConfig(teacher, student).temperature(4.0).alpha(0.7).epochs(10)``.

    ``teacher``: a model directory or Hub repo id (``DistillationTrainer`` may instead be handed a
    loaded :class:`SafeTensorsTeacher`). ``student``: a model directory or repo id, or a number of
    teacher layers / a list of teacher layer indices to initialise the student from (DistilBERT).
    Builder methods return ``self``; the sections are ``.teacher``, ``.student``, ``.distillation``,
    ``.training`` (and ``.dataset``/``.output`` when made from a YAML file).
    """

    def __init__(self, teacher: str, student: StudentSpec = None):
        try:
            self.teacher = schema.TeacherConfig(model_id=str(teacher))
        except ValidationError as exc:
            raise config_error(exc, f"TrainerConfig({teacher!r}, ...)") from None
        self.student = _student_config(student, f"TrainerConfig({teacher!r}, {student!r})")
        self.distillation = schema.DistillationSettings()
        self.training = schema.TrainingSettings()
        self.dataset: schema.DatasetSettings | None = None
        self.output: schema.OutputSettings | None = None

    @classmethod
    def new(cls, teacher: str, student: StudentSpec = None) -> "TrainerConfig":
        return cls(teacher, student)

    @classmethod
    def from_yaml_config(cls, cfg: schema.DistillationYamlConfig) -> "TrainerConfig":
        """A TrainerConfig over copies of a loaded YAML configuration's sections."""
        self = cls.__new__(cls)
        self.teacher = cfg.teacher.model_copy(deep=True)
        self.student = cfg.student.model_copy(deep=True)
        self.distillation = cfg.distillation.model_copy(deep=True)
        self.training = cfg.training.model_copy(deep=True)
        self.dataset = cfg.dataset.model_copy(deep=True)
        self.output = cfg.output.model_copy(deep=True)
        return self

    @classmethod
    def from_file(cls, path: str, overrides: list[str] | None = None) -> "TrainerConfig":
        """Load a ``distill`` YAML file (its errors name the file, line and YAML keys)."""
        return cls.from_yaml_config(schema.DistillationYamlConfig.from_file(path, overrides))

    # ---- builder -------------------------------------------------------------------------------

    def _train(self, name: str, value: Any) -> "TrainerConfig":
        set_field(self.training, name, value, f"TrainerConfig.{name}({value!r})")
        return self

    def temperature(self, value: float) -> "TrainerConfig":
        set_field(self.distillation, "temperature", value, f"TrainerConfig.temperature({value!r})")
        return self

    def alpha(self, value: float) -> "TrainerConfig":
        set_field(self.distillation, "alpha", value, f"TrainerConfig.alpha({value!r})")
        return self

    def kd_loss(self, kind: str) -> "TrainerConfig":
        set_field(self.distillation, "kd_loss", kind, f"TrainerConfig.kd_loss({kind!r})")
        return self

    def learning_rate(self, value: float) -> "TrainerConfig":
        return self._train("learning_rate", value)

    def epochs(self, n: int) -> "TrainerConfig":
        return self._train("epochs", n)

    def batch_size(self, n: int) -> "TrainerConfig":
        return self._train("batch_size", n)

    def max_steps(self, n: int | None) -> "TrainerConfig":
        return self._train("max_steps", n)

    def gradient_accumulation(self, n: int) -> "TrainerConfig":
        return self._train("gradient_accumulation", n)

    def warmup_steps(self, n: int) -> "TrainerConfig":
        return self._train("warmup_steps", n)

    def lr_scheduler(self, kind: str) -> "TrainerConfig":
        return self._train("lr_scheduler", kind)

    def weight_decay(self, value: float) -> "TrainerConfig":
        return self._train("weight_decay", value)

    def ema_decay(self, value: float | None) -> "TrainerConfig":
        """Evaluate and save an exponential moving average of the weights (``training.ema_decay``)."""
        return self._train("ema_decay", value)

    def seed(self, n: int) -> "TrainerConfig":
        return self._train("seed", n)

    def mixed_precision(self, precision: Any) -> "TrainerConfig":
        return self._train("mixed_precision", getattr(precision, "value", precision))

    def device(self, device: str) -> "TrainerConfig":
        return self._train("device", device)

    def num_threads(self, n: int | None) -> "TrainerConfig":
        return self._train("num_threads", n)

    def with_progressive(self, layer_mapping: list[tuple[int, int]] | None = None,
                         weight: float | None = None) -> "TrainerConfig":
        """Hidden-state matching over ``(student_layer, teacher_layer)`` block pairs (-1: embeddings);
        None: each student block with the teacher block it was copied from (else spread evenly)."""
        arg = f"TrainerConfig.with_progressive({layer_mapping!r})"
        data = self.distillation.progressive.model_dump()
        data.update(enabled=True, layer_mapping=None if layer_mapping is None else [tuple(p) for p in layer_mapping])
        if weight is not None:
            data["weight"] = weight
        self.distillation.progressive = _validated(schema.ProgressiveSettings, data, arg)
        return self

    def with_attention_transfer(self, weight: float | None = None,
                                layer_mapping: list[tuple[int, int]] | None = None) -> "TrainerConfig":
        """Attention-map transfer with this weight (the schema's default weight when None)."""
        arg = f"TrainerConfig.with_attention_transfer({weight!r})"
        data = self.distillation.attention.model_dump()
        data["enabled"] = True
        if weight is not None:
            data["weight"] = weight
        if layer_mapping is not None:
            data["layer_mapping"] = [tuple(p) for p in layer_mapping]
        self.distillation.attention = _validated(schema.AttentionSettings, data, arg)
        return self

    def with_embedding(self, weight: float | None = None, pooling: str | None = None) -> "TrainerConfig":
        """Pooled-embedding cosine matching (encoders)."""
        data = self.distillation.embedding.model_dump()
        data["enabled"] = True
        data.update({k: v for k, v in (("weight", weight), ("pooling", pooling)) if v is not None})
        self.distillation.embedding = _validated(schema.EmbeddingSettings, data,
                                                 f"TrainerConfig.with_embedding({weight!r})")
        return self

    def with_lora(self, lora: schema.LoRASettings | None = None) -> "TrainerConfig":
        """Train LoRA adapters on the student (a ``LoRAConfig``; the schema's defaults when None)."""
        self.student = _validated(schema.StudentConfig, {**self.student.model_dump(),
                                                         "lora": (lora or schema.LoRASettings()).model_dump()},
                                  "TrainerConfig.with_lora(...)")
        return self

    def student_layers(self, layers: int | list[int]) -> "TrainerConfig":
        """Build the student from the teacher's layers (a count spread evenly, or explicit indices)."""
        lora = self.student.lora
        self.student = _student_config(layers if not isinstance(layers, tuple) else list(layers),
                                       f"TrainerConfig.student_layers({layers!r})")
        if lora is not None:
            self.student.lora = lora
        return self

    def output_dir(self, path: str) -> "TrainerConfig":
        """Where ``train`` writes metrics and checkpoints (a temporary directory when unset)."""
        data = self.output.model_dump() if self.output is not None else {}
        data["dir"] = str(path)
        self.output = _validated(schema.OutputSettings, data, f"TrainerConfig.output_dir({path!r})")
        return self

    def set(self, key: str, value: Any) -> "TrainerConfig":
        """Any other field by its YAML path, e.g. ``.set("training.eval_steps", 50)``."""
        section_name, _, rest = key.partition(".")
        section = getattr(self, section_name, None)
        if not isinstance(section, BaseModel) or not rest:
            raise UsageError(f"TrainerConfig.set({key!r}, ...): unknown key",
                             hint="use teacher.*, student.*, distillation.*, training.*, dataset.* or output.*")
        *parents, name = rest.split(".")
        for p in parents:
            section = getattr(section, p, None)
            if not isinstance(section, BaseModel):
                raise UsageError(f"TrainerConfig.set({key!r}, ...): unknown key {p!r}")
        if name not in type(section).model_fields:
            raise UsageError(f"TrainerConfig.set({key!r}, ...): unknown key {name!r}",
                             hint=f"fields: {', '.join(type(section).model_fields)}")
        set_field(section, name, value, f"TrainerConfig.set({key!r}, {value!r})")
        return self

    # ---- views ---------------------------------------------------------------------------------

    def to_yaml_config(self, *, dataset_path: str | None = None, dataset_name: str | None = None,
                       output_dir: str | None = None) -> "DistillationYamlConfig":
        """The full ``entrenar distill`` configuration (validated), e.g. to save as YAML."""
        dataset = self.dataset.model_dump() if self.dataset is not None else {}
        if dataset_path is not None or dataset_name is not None:
            dataset.update(path=dataset_path, name=dataset_name)
        output = self.output.model_dump() if self.output is not None else {}
        if output_dir is not None:
            output["dir"] = output_dir
        data = {"teacher": self.teacher.model_dump(), "student": self.student.model_dump(),
                "distillation": self.distillation.model_dump(), "training": self.training.model_dump(),
                "dataset": dataset, "output": output}
        return _validated(DistillationYamlConfig, data,
                          "TrainerConfig.to_yaml_config(dataset_path=..., output_dir=...)")

    def copy(self) -> "TrainerConfig":
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        d, t = self.distillation, self.training
        student = self.student.model_id or f"teacher layers {self.student.init_from_teacher.layers}"  # type: ignore[union-attr]
        extras = [f"progressive={d.progressive.layer_mapping}"] if d.progressive.enabled else []
        extras += [f"attention={d.attention.weight}"] if d.attention.enabled else []
        return (f"TrainerConfig(teacher={self.teacher.model_id!r}, student={student!r}, temperature={d.temperature}, "
                f"alpha={d.alpha}, learning_rate={t.learning_rate}, epochs={t.epochs}, batch_size={t.batch_size}"
                + "".join(f", {e}" for e in extras) + ")")


def _validated(model: type[BaseModel], data: dict[str, Any], arg: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, arg) from None


class DistillationYamlConfig(schema.DistillationYamlConfig):
    """The ``entrenar distill`` YAML configuration, whose ``to_trainer_config()`` is a :class:`TrainerConfig`.

    ``DistillationYamlConfig.from_file("distill.yaml")`` loads and validates (ConfigError with
    file and line for every problem).
    """

    def to_trainer_config(self) -> TrainerConfig:  # type: ignore[override]
        """The Python API's view of this configuration (copies of its sections)."""
        return TrainerConfig.from_yaml_config(self)


__all__ = ["DistillationYamlConfig", "TrainerConfig"]
