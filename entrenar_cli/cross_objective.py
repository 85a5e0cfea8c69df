"""What a cross-tokenizer distillation run optimises (the teacher's and student's tokenizers differ).

The same interface and conventions as :class:`entrenar_cli.objectives.DistillObjective` (loss *sums*
plus a ``tokens`` count, normalised once per optimizer step by the engine); only the pairing of
teacher and student outputs differs: by characters, through :mod:`entrenar_cli.cross_tokenizer`.

* hard-label CE on every student token (the student's own next tokens);
* the logit loss (ULD or the GOLD-style hybrid) on student positions aligned with a teacher position;
* hidden states, attention maps and the pooled embedding compared per aligned span.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from entrenar_cli.cross_tokenizer import (
    CrossBlockDataset,
    SharedVocab,
    TeacherView,
    cross_divergence,
    pool_matrix,
    pooled_attention,
    span_ids,
)
from entrenar_cli.errors import TrainingError
from entrenar_cli.loss_terms import LossTerms
from entrenar_cli.losses import (
    IGNORE_INDEX,
    AttentionTransfer,
    ProgressiveDistillation,
    attention_transfer_sum,
    embedding_cosine_sum,
    kd_terms,
    pooled_cosine,
)
from entrenar_cli.objectives import TeacherObjective, block_outputs, forward_kwargs

if TYPE_CHECKING:
    from entrenar_cli.config.schema import DistillationSettings


def _fit(keys: np.ndarray, rows: int) -> Tensor:
    """Per-token keys for a model's ``rows`` logits: padding rows past the tokenizer have no key."""
    out = np.full(rows, -1, dtype=np.int64)
    n = min(rows, len(keys))
    out[:n] = keys[:n]
    return torch.from_numpy(out)


class CrossTokenizerObjective(TeacherObjective):
    """Distillation against a frozen teacher whose tokenizer differs from the student's."""

    def __init__(self, teacher: nn.Module, settings: DistillationSettings, *, method: str, shared: SharedVocab,
                 train_blocks: CrossBlockDataset, eval_blocks: CrossBlockDataset, student_dim: int,
                 teacher_dim: int, teacher_pad_id: int, student_vocab: int, teacher_vocab: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = settings
        self.method = method
        self.uld_weight = settings.cross_tokenizer.uld_weight
        self.uld_top_k = settings.cross_tokenizer.uld_top_k
        self.train_blocks = train_blocks
        self.eval_blocks = eval_blocks
        self.teacher_pad_id = teacher_pad_id
        self.student_vocab = student_vocab
        self.n_keys = shared.size
        self._s_key = _fit(shared.student_key, student_vocab)
        self._t_key = _fit(shared.teacher_key, teacher_vocab)
        self.embedding = settings.embedding.enabled
        self.need_hidden = settings.progressive.enabled or self.embedding
        self.need_attn = settings.attention.enabled
        self.progressive = (ProgressiveDistillation(settings.progressive.layer_mapping, student_dim, teacher_dim,
                                                    settings.progressive.loss)
                            if settings.progressive.enabled else None)
        self.attention = AttentionTransfer(settings.attention.layer_mapping) if self.need_attn else None
        self.progress = 0.0

    # ---- the engine's interface -----------------------------------------------------------------

    def compile(self, regional: bool = True) -> None:
        from entrenar_cli.models import compile_model

        compile_model(self.teacher)

    # ---- pairing ----------------------------------------------------------------------------------

    def _views(self, batch: dict[str, Tensor]) -> list[TeacherView]:
        """The teacher's side of every row: by block index in training, by content in evaluation."""
        if "block_ids" in batch:
            return [self.train_blocks.teacher_view(int(i)) for i in batch["block_ids"].tolist()]
        views = []
        for row in batch["input_ids"].cpu().numpy():
            for blocks in (self.eval_blocks, self.train_blocks):
                index = blocks.find(row)
                if index is not None:
                    views.append(blocks.teacher_view(index))
                    break
            else:
                raise TrainingError("cross-tokenizer distillation met a batch that was not read from its datasets, "
                                    "so the teacher's tokens for it are unknown")
        return views

    def _teacher_batch(self, views: list[TeacherView], device: torch.device) -> dict[str, Tensor]:
        width = max(1, max(len(v.ids) for v in views))
        ids = torch.full((len(views), width), self.teacher_pad_id, dtype=torch.long)
        mask = torch.zeros((len(views), width), dtype=torch.long)
        for r, v in enumerate(views):
            ids[r, : len(v.ids)] = torch.from_numpy(v.ids)
            mask[r, : len(v.ids)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    @staticmethod
    def _aligned_index(views: list[TeacherView], labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(row, student position, teacher position) of every aligned pair whose student label counts."""
        rows = np.concatenate([np.full(len(v.s_pred), r) for r, v in enumerate(views)]) if views else np.zeros(0)
        s_pos = np.concatenate([v.s_pred for v in views]) if views else np.zeros(0)
        t_pos = np.concatenate([v.t_pred for v in views]) if views else np.zeros(0)
        dev = labels.device
        r, s, t = (torch.as_tensor(x.astype(np.int64), device=dev) for x in (rows, s_pos, t_pos))
        keep = labels[r, s] != IGNORE_INDEX
        return r[keep], s[keep], t[keep]

    def _span_pools(self, views: list[TeacherView], s_len: int, t_len: int, device: torch.device
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """(student pool [b,K,Ls], teacher pool [b,K,Lt], span mask [b,K]) over aligned spans."""
        n_spans = max(1, max(len(v.s_pos) - 1 for v in views))
        s_ids = np.stack([span_ids(v.s_pos, s_len) for v in views])
        t_ids = np.stack([span_ids(v.t_pos, t_len) for v in views])
        mask = np.stack([np.arange(n_spans) < max(0, len(v.s_pos) - 1) for v in views]).astype(np.float32)
        s_pool = pool_matrix(torch.from_numpy(s_ids).to(device), n_spans)
        t_pool = pool_matrix(torch.from_numpy(t_ids).to(device), n_spans)
        return s_pool, t_pool, torch.from_numpy(mask).to(device)

    def _shared(self, device: torch.device) -> tuple[Tensor, Tensor, int]:
        if self._s_key.device != device:
            self._s_key, self._t_key = self._s_key.to(device), self._t_key.to(device)
        return self._s_key, self._t_key, self.n_keys

    def _soft(self, s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
        return cross_divergence(s_logits[:, : self.student_vocab], t_logits[:, : len(self._t_key)], self.method,
                                self._shared(s_logits.device), temperature, self.uld_weight,
                                top_k=self.uld_top_k)

    # ---- loss ----------------------------------------------------------------------------------

    def loss_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> LossTerms:
        views = self._views(batch)
        device = batch["input_ids"].device
        t_batch = self._teacher_batch(views, device)
        with torch.no_grad():
            t_out = self.teacher(**forward_kwargs(t_batch, self.need_hidden, self.need_attn, self.teacher))
        s_out = model(**forward_kwargs(batch, self.need_hidden, self.need_attn, model))
        labels = batch["labels"]
        s_logits = s_out.logits[..., : self.student_vocab]
        alpha = self.alpha
        terms = kd_terms(s_logits, None, labels, need_soft=False)
        out = LossTerms(loss=(1.0 - alpha) * terms.hard, tokens=terms.count, per_token={"loss_ce": terms.hard})
        if alpha > 0:
            r, s, t = self._aligned_index(views, labels)
            soft = self._soft(s_logits[r, s], t_out.logits[r, t], self.settings.temperature)
            # where no teacher position predicts the same text the hard term keeps its full weight
            # (alpha shifts weight from CE to KD only where there is a KD target)
            unpaired = terms.hard - torch.nn.functional.cross_entropy(s_logits[r, s].float(), labels[r, s],
                                                                      reduction="sum")
            out.loss = out.loss + alpha * unpaired + alpha * soft
            out.per_token["loss_kd"] = soft
            out.counters["aligned_tokens"] = torch.tensor(float(r.numel()), device=device)
        seq_terms = self.progressive is not None or self.attention is not None or self.embedding
        if seq_terms:
            s_pool, t_pool, span_mask = self._span_pools(views, batch["input_ids"].shape[1],
                                                         t_batch["input_ids"].shape[1], device)
        if self.progressive is not None:
            s_h = [s_pool @ h.float() for h in block_outputs(s_out.hidden_states)]
            t_h = [t_pool @ h.float() for h in block_outputs(t_out.hidden_states)]
            hidden = self.progressive.sum_loss(s_h, t_h, span_mask)
            out.loss = out.loss + self.settings.progressive.weight * hidden
            out.per_token["loss_hidden"] = hidden
        if self.attention is not None or self.embedding:
            out.sequence_loss = torch.zeros((), device=device)
        if self.attention is not None:
            total = torch.zeros((), device=device)
            for s_layer, t_layer in self.attention.layer_mapping:
                total = total + attention_transfer_sum(pooled_attention(s_out.attentions[s_layer], s_pool),
                                                       pooled_attention(t_out.attentions[t_layer], t_pool), span_mask)
            attn = total / len(self.attention.layer_mapping)
            out.per_sequence["loss_attn"] = attn
            out.sequence_loss = out.sequence_loss + self.settings.attention.weight * attn
        if self.embedding:
            emb = embedding_cosine_sum(s_pool @ s_out.hidden_states[-1].float(),
                                       t_pool @ t_out.hidden_states[-1].float(), span_mask,
                                       self.settings.embedding.pooling)
            out.per_sequence["loss_embedding"] = emb
            out.sequence_loss = out.sequence_loss + self.settings.embedding.weight * emb
        return out

    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """Student perplexity in its own tokens; on aligned positions the method's distance to the teacher
        and top-1 agreement (the student's top token has the teacher's top token's key); alignment coverage.

        No teacher perplexity: it would be per teacher token, not comparable with the student's.
        """
        totals = {"ce": 0.0, "n": 0.0, "soft": 0.0, "aligned": 0.0, "agree": 0.0, "cos": 0.0, "seqs": 0.0}
        for batch in batches:
            views = self._views(batch)
            device = batch["input_ids"].device
            t_batch = self._teacher_batch(views, device)
            need_h = self.embedding
            t_out = self.teacher(**forward_kwargs(t_batch, need_h, False, self.teacher))
            s_out = model(**forward_kwargs(batch, need_h, False, model))
            labels = batch["labels"]
            s_logits = s_out.logits[..., : self.student_vocab].float()
            t = kd_terms(s_logits, None, labels, need_soft=False)
            totals["ce"] += float(t.hard)
            totals["n"] += float(t.count)
            r, s, tp = self._aligned_index(views, labels)
            s_sel, t_sel = s_logits[r, s], t_out.logits[r, tp].float()
            totals["soft"] += float(self._soft(s_sel, t_sel, 1.0))
            totals["aligned"] += float(r.numel())
            s_key, t_key, _ = self._shared(device)
            s_top = s_key[s_sel.argmax(-1)]
            t_top = t_key[t_sel[:, : len(t_key)].argmax(-1)]
            totals["agree"] += float(((s_top == t_top) & (t_top >= 0)).sum())
            if need_h and s_out.hidden_states[-1].shape[-1] == t_out.hidden_states[-1].shape[-1]:
                s_pool, t_pool, span_mask = self._span_pools(views, batch["input_ids"].shape[1],
                                                             t_batch["input_ids"].shape[1], device)
                cos = pooled_cosine(s_pool @ s_out.hidden_states[-1].float(), t_pool @ t_out.hidden_states[-1].float(),
                                    span_mask, self.settings.embedding.pooling)
                totals["cos"] += float(cos.sum())
                totals["seqs"] += float(cos.numel())
        n, aligned = max(1.0, totals["n"]), max(1.0, totals["aligned"])
        metrics = {"eval_loss": totals["ce"] / n, "perplexity": math.exp(min(totals["ce"] / n, 50.0)),
                   f"{self.method}_to_teacher": totals["soft"] / aligned, "agreement": totals["agree"] / aligned,
                   "alignment_coverage": totals["aligned"] / n}
        if totals["seqs"]:
            metrics["embedding_cosine"] = totals["cos"] / totals["seqs"]
        return metrics
