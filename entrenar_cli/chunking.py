"""How big one chunk of the chunked logit losses is: shared by the losses and the memory estimator.

Torch-free on purpose, so ``entrenar estimate`` and the plan can size the chunked logits term without
importing torch (chunked_losses.py holds the losses themselves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entrenar_cli.config.schema import TrainingSettings

# Default memory budget for one chunk's fp32 [rows x vocab] temporaries (training.logits_budget_mb).
DEFAULT_BUDGET_BYTES = 256 * 2**20
# fp32 [rows x vocab] buffers alive at once at the peak of a chunk: student logits, student log-probs,
# teacher log-probs, teacher probs or the JSD mixture, a transient of logsumexp/logaddexp, the matmul's
# output before its fp32 upcast (half a buffer in bf16), and one spare. CE alone needs fewer.
BUFFERS_KD = 7
BUFFERS_CE = 3


def chunk_rows(vocab: int, budget_bytes: int = DEFAULT_BUDGET_BYTES, *, teacher: bool = True) -> int:
    """Tokens per chunk so that one chunk's fp32 ``[rows x vocab]`` temporaries fit ``budget_bytes``."""
    buffers = BUFFERS_KD if teacher else BUFFERS_CE
    return max(1, int(budget_bytes) // (4 * buffers * max(1, vocab)))


def chunked_logits_bytes(n_tokens: int, vocab: int, hidden: int, budget_bytes: int, *,
                         teacher_hidden: int | None = None) -> int:
    """Memory of the chunked logit loss besides the models' own activations and the head's gradient.

    One chunk's fp32 ``[rows x vocab]`` temporaries (at most the budget, fewer when every token fits one
    chunk) plus, per token, the fp32 gradient of the student's final states and the valid-row copies of
    the student's (and the teacher's) final states the loop indexes. Beyond the one chunk it does not
    grow with the vocabulary: that is the point.
    """
    kd = teacher_hidden is not None
    rows = min(n_tokens, chunk_rows(vocab, budget_bytes, teacher=kd))
    chunk = rows * vocab * 4 * (BUFFERS_KD if kd else BUFFERS_CE)
    return chunk + n_tokens * (4 * 2 * hidden + (4 * teacher_hidden if kd else 0))


def logits_budget(training: TrainingSettings) -> int | None:
    """Bytes for one chunk of logit temporaries from training settings; None: materialise logits."""
    if not training.chunked_logits:
        return None
    return int(training.logits_budget_mb) * 2**20


# training.fused_losses left unset fuses CPU runs from this vocabulary up: there the chunks' element-wise
# passes are a large share of a step and the kernels' one-off compile (seconds) is soon paid back
FUSE_MIN_VOCAB = 16_384


def fused_losses(training: TrainingSettings, *, device_type: str = "cpu", vocab: int = 0) -> bool:
    """Whether the chunked losses' element-wise work runs as compiled fused kernels.

    ``training.fused_losses`` true or false decides; unset (auto) fuses on a CPU with a C++ compiler for
    vocabularies of at least :data:`FUSE_MIN_VOCAB` (measured 1.2x the unfused step end to end on a 2-core
    CPU at V=49,152, BENCHMARKS.md). CUDA stays unfused unless asked: not measured there yet.
    """
    if logits_budget(training) is None:
        return False
    if training.fused_losses is not None:
        return bool(training.fused_losses)
    return device_type == "cpu" and vocab >= FUSE_MIN_VOCAB and has_cxx_compiler()


def has_cxx_compiler() -> bool:
    """A C++ compiler torch.compile's CPU backend can use (``$CXX``, else ``g++`` on PATH)."""
    import os
    import shutil

    cxx = os.environ.get("CXX")
    return bool(shutil.which(cxx) if cxx else shutil.which("g++"))
