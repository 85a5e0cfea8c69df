"""The export API of the design document, and the whole `entrenar export` pipeline.

``Exporter(out).format(ExportFormat.GGUF).include_metadata(True).export(weights)`` writes one
format from in-memory :class:`ModelWeights`; :func:`export_model` loads a model directory, a LoRA
adapter (merged) or an APR file, exports it, reads the result back with an independent reader and
checks parity against the source model. Outputs are written under a temporary name and renamed,
so an interrupted export never leaves a file that looks complete.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from entrenar_cli.errors import UsageError
from entrenar_cli.export.weights import ModelWeights, dtype_name

Progress = Callable[[str], None]


class ExportFormat(str, Enum):
    """The output formats: SafeTensors (HF directory), APR (JSON) and GGUF (llama.cpp)."""

    SAFETENSORS = "safetensors"
    APR = "apr"
    GGUF = "gguf"


# --quantize choices per format; None/"auto" keeps the source precision
FLOAT_PRECISIONS = ("f32", "f16", "bf16")
PRECISIONS: dict[ExportFormat, tuple[str, ...]] = {
    ExportFormat.SAFETENSORS: FLOAT_PRECISIONS,
    ExportFormat.APR: FLOAT_PRECISIONS,
    ExportFormat.GGUF: ("f32", "f16", "bf16", "q8_0", "q4_0"),
}
_PRECISION_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_DTYPE_PRECISION = {v: k for k, v in _PRECISION_DTYPE.items()}


@dataclass
class ExportResult:
    """What an export produced: ``path``, its files and size, and the parity verdicts."""

    path: Path
    format: ExportFormat
    precision: str
    files: list[Path]
    size_bytes: int
    parity: list[Any] = field(default_factory=list)
    """One :class:`~entrenar_cli.export.parity.ParityReport` per reader."""
    parity_path: Optional[Path] = None
    notes: list[str] = field(default_factory=list)
    tensors_identical: Optional[bool] = None
    rounding: dict[str, tuple[str, bool]] = field(default_factory=dict)
    """GGUF: source tensor -> (GGML type, transposed) for tensors not stored as F32."""

    def size_human(self) -> str:
        from entrenar_cli.fsutil import human_bytes

        return human_bytes(self.size_bytes)

    @property
    def passed(self) -> bool:
        """True when every parity check passed (and the tensors read back identical, if checked)."""
        return all(r.passed for r in self.parity) and self.tensors_identical is not False

    @property
    def checked(self) -> bool:
        """Whether anything was read back (False with --no-parity)."""
        return bool(self.parity) or self.tensors_identical is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "format": self.format.value,
            "precision": self.precision,
            "files": [str(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "size": self.size_human(),
            "passed": self.passed if self.checked else None,
            "checked": self.checked,
            "tensors_identical": self.tensors_identical,
            "checks": [r.to_dict() for r in self.parity],
            "notes": list(self.notes),
        }


class Exporter:
    """Builder-style exporter: ``Exporter(out).format(...).include_metadata(...).export(weights)``.

    ``out`` is the output directory (SafeTensors), or the output file or the directory to put it in
    (APR: ``<name>.apr.json``; GGUF: ``<name>-<precision>.gguf``).
    """

    def __init__(self, out: Union[str, Path]) -> None:
        self.out = Path(out)
        self._format = ExportFormat.SAFETENSORS
        self._include_metadata = True
        self._quantize: Optional[str] = None
        self._max_shard_size: Union[str, int] = "5GB"
        self._apr_encoding = "numbers"
        self._overwrite = False
        self._permute_qk = True
        self._warn: Optional[Progress] = None

    def format(self, fmt: Union[ExportFormat, str]) -> "Exporter":
        try:
            self._format = ExportFormat(fmt)
        except ValueError:
            raise UsageError(f"unknown export format {fmt!r}", hint="use safetensors, apr or gguf") from None
        return self

    def include_metadata(self, include: bool = True) -> "Exporter":
        self._include_metadata = include
        return self

    def quantize(self, precision: Optional[str]) -> "Exporter":
        """Output precision: f32/f16/bf16 for every format, q8_0/q4_0 for GGUF; None keeps the source's."""
        self._quantize = None if precision in (None, "auto") else precision
        return self

    def max_shard_size(self, size: Union[str, int]) -> "Exporter":
        self._max_shard_size = size
        return self

    def apr_encoding(self, encoding: str) -> "Exporter":
        if encoding not in ("numbers", "base64"):
            raise UsageError(f"unknown APR encoding {encoding!r}", hint="use numbers or base64")
        self._apr_encoding = encoding
        return self

    def overwrite(self, allow: bool = True) -> "Exporter":
        self._overwrite = allow
        return self

    def on_warning(self, warn: Progress) -> "Exporter":
        self._warn = warn
        return self

    def resolve_precision(self, weights: ModelWeights) -> str:
        """The precision that will be written, checked against the format."""
        if self._quantize is None:
            first = next(iter(weights.tensors.values()), None)
            source = dtype_name(first.dtype) if first is not None else "F32"
            return _DTYPE_PRECISION.get(source, "f32")
        if self._quantize not in PRECISIONS[self._format]:
            raise UsageError(
                f"--quantize {self._quantize} is not available for {self._format.value}",
                hint=f"choose one of {', '.join(PRECISIONS[self._format])}"
                + (" (q8_0 and q4_0 are GGUF block formats)" if self._quantize in ("q8_0", "q4_0") else ""),
            )
        return self._quantize

    def output_path(self, weights: ModelWeights) -> Path:
        name = _safe_name(weights.metadata.name or "model")
        if self._format is ExportFormat.SAFETENSORS:
            return self.out
        if self._format is ExportFormat.APR:
            return self.out if self.out.name.endswith((".apr.json", ".apr")) else self.out / f"{name}.apr.json"
        return self.out if self.out.suffix == ".gguf" else self.out / f"{name}-{self.resolve_precision(weights)}.gguf"

    def export(self, weights: ModelWeights) -> ExportResult:
        """Write ``weights``; returns the path, files and size (no parity: see :func:`export_model`)."""
        from entrenar_cli.fsutil import atomic_dir, atomic_path

        precision = self.resolve_precision(weights)
        path = self.output_path(weights)
        if path.exists() and not self._overwrite:
            raise UsageError(f"{path} already exists", hint="choose another -o path or pass --force to replace it")
        notes: list[str] = []
        if self._format is ExportFormat.SAFETENSORS:
            from entrenar_cli.export.safetensors_export import write_safetensors_dir

            if path.exists() and not path.is_dir():
                raise UsageError(f"{path} exists and is not a directory")
            with atomic_dir(path, overwrite=True) as tmp:
                written = write_safetensors_dir(
                    weights,
                    tmp,
                    max_shard_size=self._max_shard_size,
                    include_metadata=self._include_metadata,
                    dtype=self._cast_dtype(weights, precision),
                )
                names = [p.name for p in written]
                _readable(tmp)
            files = [path / n for n in names]
        elif self._format is ExportFormat.APR:
            from entrenar_cli.export.apr import write_apr

            source = _cast(weights, self._cast_dtype(weights, precision))
            with atomic_path(path) as tmp:
                write_apr(source, tmp, encoding=self._apr_encoding,  # type: ignore[arg-type]
                          include_metadata=self._include_metadata, warn=self._warn)
                _readable(tmp)
            files = [path]
        else:
            from entrenar_cli.export.gguf_export import write_gguf

            with atomic_path(path) as tmp:
                info = write_gguf(
                    weights, tmp, precision, include_metadata=self._include_metadata, permute_qk=self._permute_qk
                )
                _readable(tmp)
            notes += info.notes
            rounding = info.rounding
            files = [path]
        size = sum(f.stat().st_size for f in files)
        result = ExportResult(path=path, format=self._format, precision=precision, files=files, size_bytes=size,
                              notes=notes)
        if self._format is ExportFormat.GGUF:
            result.rounding = rounding
        return result

    @staticmethod
    def _cast_dtype(weights: ModelWeights, precision: str) -> Optional[str]:
        """The dtype to cast floating tensors to, or None when they are already in it."""
        target = _PRECISION_DTYPE.get(precision)
        if target is None:
            return None
        dtypes = {dtype_name(t.dtype) for t in weights.tensors.values() if t.is_floating_point()}
        return None if dtypes <= {target} else target


def _cast(weights: ModelWeights, dtype: Optional[str]) -> ModelWeights:
    if dtype is None:
        return weights
    from entrenar_cli.export.weights import torch_dtype

    target = torch_dtype(dtype)
    out = ModelWeights()
    out.__dict__.update(weights.__dict__)
    out.tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in weights.tensors.items()}
    out.metadata = dataclasses.replace(weights.metadata, dtype=dtype)
    return out


def _readable(path: Path) -> None:
    """Give a temp-named output the permissions a normally created file would have (umask)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return keep or "model"


# ---------------------------------------------------------------------------------------------
# the pipeline behind `entrenar export`


@dataclass
class ExportRequest:
    """Everything `entrenar export` was asked to do."""

    source: Path
    format: ExportFormat = ExportFormat.SAFETENSORS
    output: Optional[Path] = None
    """Output path; default: next to the source (``<name>-safetensors/``, ``<name>.apr.json``, ``<name>-<q>.gguf``)."""
    quantize: Optional[str] = None
    max_shard_size: Union[str, int] = "5GB"
    include_metadata: bool = True
    apr_encoding: str = "numbers"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    base: Optional[Path] = None
    tokenizer: Optional[Path] = None
    parity: bool = True
    parity_reader: str = "auto"
    """GGUF only: 'auto' (transformers, plus llama.cpp when installed), 'llama.cpp', 'transformers', 'both'."""
    overwrite: bool = False
    permute_qk: bool = True
    """Test hook for the negative control; never turn off for real exports."""


def _precheck(request: ExportRequest) -> None:
    """Refuse what can be refused before loading a model (which can take minutes)."""
    quant = request.quantize
    if quant not in (None, "auto") and quant not in PRECISIONS[request.format]:
        Exporter(".").format(request.format).quantize(quant).resolve_precision(ModelWeights())
    if request.output is not None and request.output.exists() and not request.overwrite:
        raise UsageError(f"{request.output} already exists",
                         hint="choose another -o path or pass --force to replace it")
    if request.format is ExportFormat.GGUF and request.source.is_dir():
        config_dir = request.base if (request.source / "adapter_config.json").is_file() else request.source
        config_path = (config_dir or request.source) / "config.json"
        if config_path.is_file():
            from entrenar_cli.export.gguf_export import check_supported

            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                return  # the loader reports unreadable configs with more context
            check_supported(config)


def default_output(source: Path, fmt: ExportFormat, name: str, precision: str) -> Path:
    stem = _safe_name(name)
    parent = source.resolve().parent
    if fmt is ExportFormat.SAFETENSORS:
        return parent / f"{stem}-safetensors"
    if fmt is ExportFormat.APR:
        return parent / f"{stem}.apr.json"
    return parent / f"{stem}-{precision}.gguf"


def parity_path_for(output: Path) -> Path:
    """The parity report lives next to the output: ``<output>.parity.json``."""
    return output.with_name(output.name + ".parity.json")


def export_model(
    request: ExportRequest, *, progress: Optional[Progress] = None, warn: Optional[Progress] = None
) -> ExportResult:
    """Load, export, read back, compare; write the parity JSON. Parity failures are reported in the
    result (``result.passed``), not raised: the caller decides what a failure means."""
    from entrenar_cli.export.source import load_source

    say = progress or (lambda _m: None)
    _precheck(request)
    say(f"loading {request.source}")
    src = load_source(
        request.source,
        allow_pickle=request.allow_pickle,
        trust_remote_code=request.trust_remote_code,
        base=request.base,
        tokenizer=request.tokenizer,
    )
    weights = src.weights
    if src.kind == "apr" and not weights.metadata.name:
        weights.metadata.name = request.source.name.removesuffix(".json").removesuffix(".apr")
    exporter = (
        Exporter(request.output or Path("."))
        .format(request.format)
        .include_metadata(request.include_metadata)
        .quantize(request.quantize)
        .max_shard_size(request.max_shard_size)
        .apr_encoding(request.apr_encoding)
        .overwrite(request.overwrite)
    )
    if warn is not None:
        exporter.on_warning(warn)
    exporter._permute_qk = request.permute_qk
    precision = exporter.resolve_precision(weights)
    if request.output is None:
        exporter.out = default_output(request.source, request.format, weights.metadata.name or "model", precision)
    if request.format is ExportFormat.GGUF:
        from entrenar_cli.export.gguf_export import check_supported

        check_supported(weights.config)  # refuse before any work
    say(f"writing {request.format.value} ({precision}) to {exporter.output_path(weights)}")
    result = exporter.export(weights)
    if request.parity:
        say("checking parity against the source model")
        run_parity(result, src, request, exporter, progress=say)
        result.parity_path = parity_path_for(result.path)
        from entrenar_cli.fsutil import write_json_atomic

        write_json_atomic(result.parity_path, {"source": str(request.source), **result.to_dict()})
    return result


def run_parity(
    result: ExportResult, src: Any, request: ExportRequest, exporter: Exporter, *, progress: Progress
) -> None:
    """Fill ``result.parity`` (and ``tensors_identical``) by reading the export back."""
    import torch

    from entrenar_cli.export import parity as P

    weights = src.weights
    lossless = exporter._cast_dtype(weights, result.precision) is None
    apr_back = None
    if result.format is ExportFormat.APR:
        from entrenar_cli.export.apr import read_apr

        apr_back = read_apr(result.path)  # read once: JSON parsing dominates for big files
    if result.format in (ExportFormat.SAFETENSORS, ExportFormat.APR) and lossless:
        result.tensors_identical = _tensors_identical(result, weights, apr_back)
    if src.model is None:
        result.notes.append("no model config: logits not compared (tensors only)")
        return
    config = weights.config or {}
    vocab = int(config.get("vocab_size") or 0) or 2
    max_pos = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
    seqs = P.heldout_sequences(src.tokenizer_dir, vocab, max_pos)
    source_model = src.model.to(torch.float32)
    source_out = P.model_outputs(source_model, seqs, src.causal_lm)
    # compare against the source with the export's own rounding: tight bounds at every precision
    rounded = _rounded_state(result, weights, exporter)
    if rounded:
        rounded_model = copy.deepcopy(source_model)
        rounded_model.load_state_dict(rounded, strict=False)
        reference = P.model_outputs(rounded_model, seqs, src.causal_lm)
        reference_name, unrounded = f"source rounded to {result.precision}", source_out
        del rounded_model
    else:
        reference, reference_name, unrounded = source_out, "source", None
    is_gguf = result.format is ExportFormat.GGUF

    def check(reader: str, read: Callable[[], list[Any]], precision: str) -> Any:
        try:
            outputs = read()
        except Exception as exc:  # the reader could not load or run the file: that is a failed check
            report = P.failed_reader(reader, precision, f"{type(exc).__name__}: {exc}")
        else:
            report = P.compare(
                reference, outputs, reader=reader, precision=precision,
                bound=P.bound_for(reader, precision, gguf=is_gguf, arch=str(config.get("model_type", ""))),
                causal_lm=src.causal_lm,
                reference_name=reference_name, unrounded=unrounded,
            )
        result.parity.append(report)
        progress(f"  {reader}: {'ok' if report.passed else 'FAILED'}")
        return report

    path, causal = result.path, src.causal_lm
    if result.format is ExportFormat.SAFETENSORS:
        check("transformers", lambda: P.hf_dir_outputs(path, seqs, causal), result.precision)
    elif result.format is ExportFormat.APR:
        def apr_outputs() -> list[Any]:
            assert apr_back is not None
            model = apr_back.to_model().to(torch.float32)
            return P.model_outputs(model, seqs, causal)

        check("apr+transformers", apr_outputs, result.precision)
    else:
        readers = _gguf_readers(request.parity_reader)
        if (request.parity_reader == "auto" and "llama.cpp" in readers
                and not _transformers_reads_gguf(weights.config or {})):
            readers.remove("transformers")
            result.notes.append("transformers cannot load gpt2 GGUF files whose n_positions is not 1024; "
                                "checked with llama.cpp only")
        if "transformers" in readers:
            check("transformers", lambda: P.gguf_transformers_outputs(path, seqs), result.precision)
        if "llama.cpp" in readers:
            report = check("llama.cpp", lambda: P.llamacpp_outputs(path, seqs), result.precision)
            if report.n_tokens:
                match, mismatches = P.llamacpp_tokenization(path, src.tokenizer_dir)
                report.tokenizer_match, report.tokenizer_mismatches = match, mismatches
                if match is False:
                    report.failures.append(
                        f"llama.cpp tokenizes {len(mismatches)} of {len(P.HELDOUT_TEXTS)} texts differently"
                    )
                    report.passed = False
    _quality_notes(result)


def _rounded_state(result: ExportResult, weights: ModelWeights, exporter: Exporter) -> dict[str, Any]:
    """Source tensors rounded exactly as the export stored them; empty when nothing was rounded."""
    if result.format is ExportFormat.GGUF:
        from entrenar_cli.export.gguf_export import apply_gguf_rounding

        return apply_gguf_rounding(weights.tensors, result.rounding) if result.rounding else {}
    dtype = exporter._cast_dtype(weights, result.precision)
    if dtype is None:
        return {}
    import torch

    from entrenar_cli.export.weights import torch_dtype

    target = torch_dtype(dtype)
    return {k: v.to(target).to(torch.float32) for k, v in weights.tensors.items() if v.is_floating_point()}


def _transformers_reads_gguf(config: dict[str, Any]) -> bool:
    """transformers' GGUF loader ignores gpt2.context_length and assumes GPT-2's 1024 positions."""
    return config.get("model_type") != "gpt2" or int(config.get("n_positions", 1024)) == 1024


def _quality_notes(result: ExportResult) -> None:
    """Say so when rounding (not a defect) changes many predictions: the user may want a wider type."""
    for report in result.parity:
        quality = report.quality or {}
        top1 = quality.get("top1_agreement")
        if report.passed and top1 is not None and top1 < 0.9:
            result.notes.append(
                f"{result.precision} changes the top-1 prediction at {1 - top1:.0%} of positions "
                f"({report.reader}, vs the unrounded source); a wider type (q8_0, f16) keeps more quality"
            )
            return


def _gguf_readers(choice: str) -> list[str]:
    from entrenar_cli.export.parity import llamacpp_available

    if choice == "auto":  # transformers proves the numbers and layout, llama.cpp that it runs them
        return ["transformers", "llama.cpp"] if llamacpp_available() else ["transformers"]
    if choice == "both":
        choice_list = ["transformers", "llama.cpp"]
    elif choice in ("transformers", "llama.cpp"):
        choice_list = [choice]
    else:
        raise UsageError(f"unknown parity reader {choice!r}", hint="use auto, llama.cpp, transformers or both")
    if "llama.cpp" in choice_list and not llamacpp_available():
        raise UsageError(
            "llama-cpp-python is not installed, so llama.cpp cannot check the GGUF file",
            hint="pip install 'entrenar-cli[llamacpp]' (builds llama.cpp, ~5 minutes) "
            "or use --parity-reader transformers",
        )
    return choice_list


def _tensors_identical(result: ExportResult, weights: ModelWeights, apr_back: Optional[ModelWeights]) -> bool:
    """Read every tensor back with the format's own reader and compare bit for bit."""
    import torch

    if apr_back is not None:
        back = apr_back.tensors
    else:
        from safetensors.torch import load_file

        back = {}
        for f in result.files:
            if f.suffix == ".safetensors":
                back.update(load_file(str(f)))
    if set(back) != set(weights.tensors):
        return False
    return all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in weights.tensors.items())
