"""What a run optimises: distillation (teacher + student) or plain language modelling.

Both return loss *sums* for a micro-batch; the engine normalises them once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from entrenar_cli.losses import (
    IGNORE_INDEX,
    AttentionTransfer,
    ProgressiveDistillation,
    embedding_cosine_sum,
    fused_forward_kd,
    kd_terms,
    pooled_cosine,
)

MLM_PROBABILITY = 0.15


def _forward_kwargs(batch: dict[str, Tensor], hidden: bool, attentions: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    mask = batch.get("attention_mask")
    # packed blocks have no padding: leaving the mask out keeps SDPA on its fused causal path
    if mask is not None and not bool(mask.all()):
        kwargs["attention_mask"] = mask
    if hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    return kwargs


def mask_tokens(batch: dict[str, Tensor], tokenizer_info: dict[str, int], vocab: int) -> dict[str, Tensor]:
    """BERT-style masking for masked-LM distillation: 15% of real tokens, 80/10/10 mask/random/keep."""
    ids = batch["input_ids"].clone()
    labels = ids.clone()
    special = (ids == tokenizer_info["cls"]) | (ids == tokenizer_info["sep"]) | (batch["attention_mask"] == 0)
    prob = torch.full(ids.shape, MLM_PROBABILITY, device=ids.device)
    prob[special] = 0.0
    chosen = torch.bernoulli(prob).bool()
    labels[~chosen] = IGNORE_INDEX
    replace = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device)).bool() & chosen
    ids[replace] = tokenizer_info["mask"]
    random_ = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device)).bool() & chosen & ~replace
    ids[random_] = torch.randint(vocab, ids.shape, device=ids.device)[random_]
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}


def _block_outputs(hidden_states: tuple[Tensor, ...]) -> list[Tensor]:
    """Per-block outputs indexed 0..n-1, with the embedding output at index -1.

    transformers returns (embeddings, block_0 out, ..., block_{n-1} out); the YAML's layer
    indices are block indices, so index i maps to hidden_states[i + 1] and -1 to hidden_states[0].
    """
    return [*hidden_states[1:], hidden_states[0]]


class LMObjective:
    """Plain next-token (or masked-token) cross-entropy: fine-tuning and the CE-only baseline."""

    def __init__(self, task: str = "causal", vocab: int | None = None, mlm_info: dict[str, int] | None = None):
        self.task = task
        self.vocab = vocab
        self.mlm_info = mlm_info

    def _prepare(self, batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        if self.task == "masked" and self.mlm_info is not None:
            return mask_tokens(batch, self.mlm_info, self.vocab or model.config.vocab_size)
        return batch

    def loss_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        batch = self._prepare(batch, model)
        logits = model(**_forward_kwargs(batch, False, False)).logits
        terms = kd_terms(logits, None, batch["labels"], need_soft=False)
        return {"loss": terms.hard, "loss_ce": terms.hard, "tokens": terms.count}

    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        ce = n = 0.0
        for batch in batches:
            batch = self._prepare(batch, model)
            logits = model(**_forward_kwargs(batch, False, False)).logits
            t = kd_terms(logits, None, batch["labels"], need_soft=False)
            ce += float(t.hard)
            n += float(t.count)
        mean = ce / max(1.0, n)
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_tokens": n}

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def to(self, device: torch.device) -> None:
        """Nothing to move: the engine moves the model."""

    def compile(self) -> None:
        """Nothing to compile: the engine compiles the model."""


class DistillObjective:
    """Logit KD + hard CE, hidden-state matching and attention transfer against a frozen teacher."""

    def __init__(self, teacher: nn.Module, settings: Any, *, task: str, vocab: int,
                 student_dim: int, teacher_dim: int, mlm_info: dict[str, int] | None = None,
                 cache: Any = None):
        from entrenar_cli.models import num_layers

        self.teacher = teacher.eval().requires_grad_(False)
        self.s = settings
        self.task = task
        self.vocab = vocab
        self.mlm_info = mlm_info
        self.use_logits = task in ("causal", "masked")
        self.embedding = settings.embedding.enabled
        self.need_hidden = settings.progressive.enabled or self.embedding
        # the teacher's last block, the one sentence embeddings are pooled from
        self.teacher_last = num_layers(teacher) - 1
        self.need_attn = settings.attention.enabled
        self.progressive = (
            ProgressiveDistillation(settings.progressive.layer_mapping, student_dim, teacher_dim)
            if settings.progressive.enabled else None
        )
        self.attention = AttentionTransfer(settings.attention.layer_mapping) if self.need_attn else None
        # optional precomputed teacher outputs (entrenar_cli.teacher_cache.TeacherCache)
        self.cache = cache
        self._teacher_eval: dict[str, float] | None = None
        self.progress = 0.0  # fraction of the run done, set by the engine before each step

    def set_progress(self, fraction: float) -> None:
        """Where the run is (0 at the first step, 1 at the last): drives the alpha schedule."""
        self.progress = min(1.0, max(0.0, fraction))

    @property
    def alpha(self) -> float:
        """The KD weight of this step: constant, or linear from alpha to alpha_end."""
        end = getattr(self.s, "alpha_end", None)
        if end is None:
            return self.s.alpha
        return self.s.alpha + (end - self.s.alpha) * self.progress

    def extra_parameters(self) -> list[nn.Parameter]:
        if self.progressive is not None and self.progressive.projections is not None:
            return list(self.progressive.projections.parameters())
        return []

    def to(self, device: torch.device) -> None:
        """The teacher (and the hidden-state projections) live where the student trains."""
        self.teacher.to(device)
        if self.progressive is not None:
            self.progressive.to(device)

    def compile(self) -> None:
        self.teacher.compile()

    def _prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.task == "masked" and self.mlm_info is not None:
            return mask_tokens(batch, self.mlm_info, self.vocab)
        return batch

    @torch.no_grad()
    def _teacher(self, batch: dict[str, Tensor]) -> Any:
        # no_grad, not inference_mode: the teacher's outputs enter the student's loss as constants
        return self.teacher(**_forward_kwargs(batch, self.need_hidden, self.need_attn))

    def _cached_teacher(self, batch: dict[str, Tensor]) -> tuple[Any, Any, Any]:
        """(top-k triple, hidden blocks, attention maps) from the cache, filling it on a miss."""
        ids = batch["block_ids"].tolist()
        missing = [b for b in ids if b not in self.cache]
        if missing:
            self.cache.misses += len(missing)
            self.cache.hits += len(ids) - len(missing)
            self.cache.put(ids, self.cache.compress(self._teacher(batch), _block_outputs))
        else:
            self.cache.hits += len(ids)
        got = self.cache.get(ids, batch["input_ids"].device)
        topk = (got["vals"], got["idx"], got["tail"]) if "vals" in got else None
        hidden = {j: got[f"h{j}"] for j in self.cache.hidden_layers}
        attn = {j: got[f"a{j}"].unsqueeze(1) for j in self.cache.attn_layers}
        return topk, hidden, attn

    def loss_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        batch = self._prepare(batch)
        if self.cache is not None and "block_ids" in batch:
            topk, t_hidden, t_attn = self._cached_teacher(batch)
            t_logits = None
        else:
            t_out = self._teacher(batch)
            topk = None
            t_logits = t_out.logits[..., : self.vocab] if self.use_logits else None
            t_hidden = _block_outputs(t_out.hidden_states) if self.need_hidden else None
            t_attn = t_out.attentions if self.need_attn else None
        s_out = model(**_forward_kwargs(batch, self.need_hidden, self.need_attn))
        mask = batch["attention_mask"].float()
        out: dict[str, Tensor] = {}
        loss = torch.zeros((), device=mask.device)
        if self.use_logits:
            s_logits = s_out.logits[..., : self.vocab]
            alpha = self.alpha
            need_soft = alpha > 0
            if need_soft and topk is None and self.s.kd_loss == "forward_kl":
                # the default path: fused loss+gradient, one (tokens x vocab) buffer (see losses.py)
                total, terms = fused_forward_kd(s_logits, t_logits, batch["labels"],
                                                temperature=self.s.temperature, alpha=alpha)
            else:
                terms = kd_terms(s_logits, t_logits, batch["labels"], temperature=self.s.temperature,
                                 kind=self.s.kd_loss, need_soft=need_soft, need_hard=True, teacher_topk=topk)
                total = terms.total(alpha)
            loss = loss + total
            if need_soft:
                out["loss_kd"] = terms.soft
            out["loss_ce"] = terms.hard
            out["tokens"] = terms.count
        else:
            out["tokens"] = mask.sum()
        if self.progressive is not None:
            hidden = self.progressive.sum_loss(_block_outputs(s_out.hidden_states), t_hidden, mask)
            loss = loss + self.s.progressive.weight * hidden
            out["loss_hidden"] = hidden
        out["loss"] = loss
        seq_loss = torch.zeros((), device=mask.device)
        if self.attention is not None:
            attn = self.attention.sum_loss(s_out.attentions, t_attn, mask)
            out["loss_attn"] = attn
            seq_loss = seq_loss + self.s.attention.weight * attn
        if self.embedding:
            emb = embedding_cosine_sum(s_out.hidden_states[-1], t_hidden[self.teacher_last], mask,
                                       self.s.embedding.pooling)
            out["loss_embedding"] = emb
            seq_loss = seq_loss + self.s.embedding.weight * emb
        if self.attention is not None or self.embedding:
            out["loss_seq"] = seq_loss
        return out

    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """Student perplexity, KL(teacher||student) at T=1, top-1 agreement; teacher perplexity once.

        For encoders without an LM head: hidden-state MSE and cosine of mean-pooled embeddings.
        """
        totals: dict[str, float] = {}
        teacher_ce = 0.0
        generator_state = torch.get_rng_state()  # masking must not disturb the training RNG stream
        torch.manual_seed(1234)
        try:
            for batch in batches:
                batch = self._prepare(batch)
                need_h = self.need_hidden or not self.use_logits
                kwargs = _forward_kwargs(batch, need_h, False)
                t_out = self.teacher(**kwargs)
                s_out = model(**kwargs)
                mask = batch["attention_mask"].float()
                if self.use_logits:
                    s_logits = s_out.logits[..., : self.vocab].float()
                    t_logits = t_out.logits[..., : self.vocab].float()
                    labels = batch["labels"]
                    valid = labels != IGNORE_INDEX
                    st = kd_terms(s_logits, t_logits, labels, temperature=1.0, kind="forward_kl")
                    tt = kd_terms(t_logits, None, labels, need_soft=False)
                    agree = ((s_logits.argmax(-1) == t_logits.argmax(-1)) & valid).sum()
                    for k, v in (("ce", st.hard), ("kl", st.soft), ("agree", agree), ("n", st.count)):
                        totals[k] = totals.get(k, 0.0) + float(v)
                    teacher_ce += float(tt.hard)
                if need_h:
                    s_last = s_out.hidden_states[-1].float()
                    t_last = t_out.hidden_states[-1].float()
                    if s_last.shape[-1] == t_last.shape[-1]:
                        cos = pooled_cosine(s_last, t_last, mask, self.s.embedding.pooling)
                        totals["cos"] = totals.get("cos", 0.0) + float(cos.sum())
                        totals["seqs"] = totals.get("seqs", 0.0) + float(cos.numel())
                        mse = ((s_last - t_last).pow(2).mean(-1) * mask).sum()
                        totals["mse"] = totals.get("mse", 0.0) + float(mse)
                        totals["mask"] = totals.get("mask", 0.0) + float(mask.sum())
        finally:
            torch.set_rng_state(generator_state)
        metrics: dict[str, float] = {}
        if "n" in totals:
            n = max(1.0, totals["n"])
            metrics["eval_loss"] = totals["ce"] / n
            metrics["perplexity"] = math.exp(min(totals["ce"] / n, 50.0))
            metrics["kl_to_teacher"] = totals["kl"] / n
            metrics["agreement"] = totals["agree"] / n
            if self._teacher_eval is None:
                self._teacher_eval = {"teacher_perplexity": math.exp(min(teacher_ce / n, 50.0))}
            metrics.update(self._teacher_eval)
        if "seqs" in totals:
            metrics["embedding_cosine"] = totals["cos"] / max(1.0, totals["seqs"])
            metrics["hidden_mse"] = totals["mse"] / max(1.0, totals["mask"])
        return metrics
