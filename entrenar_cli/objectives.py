"""What a run optimises: distillation (teacher + student) or plain language modelling.

Both return loss *sums* for a micro-batch; the engine normalises them once per optimizer step.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from entrenar_cli.loss_terms import LossTerms
from entrenar_cli.losses import (
    IGNORE_INDEX,
    AttentionTransfer,
    KDTerms,
    ProgressiveDistillation,
    embedding_cosine_sum,
    fused_forward_kd,
    kd_terms,
    pooled_cosine,
)

MLM_PROBABILITY = 0.15
# tokens of the first batch the once-per-run head check runs on
_HEAD_CHECK_TOKENS = 16

if TYPE_CHECKING:
    from entrenar_cli.config.schema import DistillationSettings


@functools.lru_cache(maxsize=64)
def _takes_use_cache(cls: type) -> bool:
    return "use_cache" in inspect.signature(cls.forward).parameters


def forward_kwargs(batch: dict[str, Tensor], hidden: bool, attentions: bool, *models: Any) -> dict[str, Any]:
    """Keyword arguments for a training/evaluation forward of ``models`` (all called with the same ones)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    mask = batch.get("attention_mask")
    # packed blocks have no padding: leaving the mask out keeps SDPA on its fused causal path
    if mask is not None and not bool(mask.all()):
        kwargs["attention_mask"] = mask
    if hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    # a decoder builds a KV cache by default (config.use_cache): concatenated keys and values per layer that
    # a forward over whole blocks never reads; measured ~5% of a CPU distillation step
    if models and all(isinstance(m, nn.Module) and _takes_use_cache(type(_unwrap(m))) for m in models):
        kwargs["use_cache"] = False
    return kwargs


def _unwrap(model: nn.Module) -> nn.Module:
    from entrenar_cli.chunked_losses import unwrap_model

    return unwrap_model(model)


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


def planned_logit_path(training: Any, models: dict[str, nn.Module]) -> str:
    """What the plan says about logit losses before the first step (the run re-checks on its first batch)."""
    from entrenar_cli.chunking import fused_losses, logits_budget
    from entrenar_cli.models import output_vocab
    from entrenar_cli.trainer import resolve_device

    path = LogitPath(logits_budget(training))
    if path.enabled and path.static_check(models):
        trained = models["student"] if "student" in models else models.get("model")  # what the Engine asks about
        vocab = output_vocab(trained) if trained is not None else 0
        if fused_losses(training, device_type=resolve_device(training.device).type, vocab=vocab):
            path.fuse()
    return path.note


class LogitPath:
    """Whether a run's logit losses go chunk by chunk over tokens (chunked_losses.py), and why not.

    The chunked path never forms a ``[tokens x vocab]`` tensor; it needs each model's output head as a
    plain linear map (:func:`chunked_losses.output_head`) that reproduces the model's own logits, which
    is checked once on a few tokens of the first batch. Anything else (a quantised or LoRA-wrapped head,
    a model compiled whole, an architecture that post-processes logits in a way we do not know, a sharded
    model whose head weight is a shard) keeps today's materialised logits, and :attr:`note` says why.
    """

    def __init__(self, budget_bytes: int | None):
        self.budget = budget_bytes
        self.enabled = budget_bytes is not None
        self.checked = False
        self.note = "full logits (training.chunked_logits: false)" if budget_bytes is None else ""
        self.heads: dict[str, Any] = {}
        self.fused = False  # element-wise work as torch.compile'd kernels (training.fused_losses)

    def fuse(self) -> None:
        """Run the chunks' element-wise work as fused kernels (the engine decides: training.fused_losses)."""
        self.fused = True
        if self.enabled and self.note.startswith("chunked"):
            self.note += ", element-wise work fused (torch.compile)"

    def static_check(self, models: dict[str, nn.Module]) -> bool:
        """Heads found (no forward run): what the plan can promise before the first step."""
        from entrenar_cli.chunked_losses import output_head

        if not self.enabled:
            return False
        for name, m in models.items():
            if getattr(m, "_entrenar_sharded", False):
                return self._off(f"the {name} is sharded (FSDP): its head weight is a shard outside forward")
            if getattr(m, "hf_device_map", None):
                return self._off(f"the {name} is spread over devices (device_map): its head weight may be "
                                 "offloaded outside forward")
            head = output_head(m)
            if head is None:
                return self._off(f"the {name}'s output head is not a plain linear layer")
            self.heads[name] = head
        from entrenar_cli.fsutil import human_bytes

        self.note = f"chunked over tokens (budget {human_bytes(self.budget)} of logits per chunk)"
        if self.fused:
            self.note += ", element-wise work fused (torch.compile)"
        return True

    def compiled(self) -> None:
        """A model was compiled whole (no repeated blocks found): its head is inside the graph."""
        self._off("a model compiled whole (no repeated blocks to compile one by one) keeps its head in the graph")

    def _off(self, why: str) -> bool:
        self.enabled = False
        self.checked = True
        self.note = f"full logits: {why}"
        return False

    def check(self, models: dict[str, nn.Module], batch: dict[str, Tensor]) -> bool:
        """Once per run, on the first batch: each head reproduces its model's logits, else fall back."""
        from entrenar_cli.chunked_losses import head_matches

        if self.checked:
            return self.enabled
        self.checked = True
        if not self.static_check(models):
            return False
        small = {k: v[:1, :_HEAD_CHECK_TOKENS] for k, v in batch.items()
                 if k in ("input_ids", "attention_mask") and isinstance(v, Tensor)}
        for name, m in models.items():
            was_training = m.training
            m.eval()  # dropout would make the two forwards differ
            try:
                with torch.autocast(small["input_ids"].device.type, enabled=False):
                    ok = head_matches(m, self.heads[name], **forward_kwargs(small, False, False, m))
            finally:
                m.train(was_training)
            if not ok:
                self._off(f"the {name}'s head does not reproduce its logits (unknown post-processing)")
                from entrenar_cli.console import is_main_process, warn

                if is_main_process():  # the plan promised the chunked path
                    warn(f"logit losses: {self.note}")
                return False
        return True


def block_outputs(hidden_states: tuple[Tensor, ...]) -> list[Tensor]:
    """Per-block outputs indexed 0..n-1, with the embedding output at index -1.

    transformers returns (embeddings, block_0 out, ..., block_{n-1} out); the YAML's layer
    indices are block indices, so index i maps to hidden_states[i + 1] and -1 to hidden_states[0].
    """
    return [*hidden_states[1:], hidden_states[0]]


class LMObjective:
    """Plain next-token (or masked-token) cross-entropy: fine-tuning and the CE-only baseline."""

    def __init__(self, task: str = "causal", vocab: int | None = None, mlm_info: dict[str, int] | None = None,
                 logits_budget: int | None = None):
        self.task = task
        self.vocab = vocab
        self.mlm_info = mlm_info
        self.logit_path = LogitPath(logits_budget)

    def _prepare(self, batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        if self.task == "masked" and self.mlm_info is not None:
            return mask_tokens(batch, self.mlm_info, self.vocab or model.config.vocab_size)
        return batch

    def _ce(self, model: nn.Module, batch: dict[str, Tensor]) -> KDTerms:
        kwargs = forward_kwargs(batch, False, False, model)
        if self.logit_path.check({"model": model}, batch):
            from entrenar_cli.chunked_losses import chunked_ce, final_hidden, output_head

            hidden, _ = final_hidden(model, **kwargs)
            # all of the head's rows, as the materialised path's cross-entropy uses
            hard, terms = chunked_ce(hidden, output_head(model), batch["labels"], budget_bytes=self.logit_path.budget,
                                     fused=self.logit_path.fused)
            return KDTerms(soft=terms.soft, hard=hard, count=terms.count)  # hard: the sum with its gradient
        return kd_terms(model(**kwargs).logits, None, batch["labels"], need_soft=False)

    def loss_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> LossTerms:
        terms = self._ce(model, self._prepare(batch, model))
        return LossTerms(loss=terms.hard, tokens=terms.count, per_token={"loss_ce": terms.hard.detach()})

    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        ce = n = 0.0
        for batch in batches:
            t = self._ce(model, self._prepare(batch, model))
            ce += float(t.hard)
            n += float(t.count)
        mean = ce / max(1.0, n)
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_tokens": n}

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def to(self, device: torch.device) -> None:
        """Nothing to move: the engine moves the model."""

    def compile(self, regional: bool = True) -> None:
        """Nothing to compile: the engine compiles the model (whole: the chunked loss steps aside)."""
        if not regional:
            self.logit_path.compiled()


class TeacherObjective:
    """What every objective with a frozen teacher shares: the alpha schedule, projections, placement.

    Subclasses set ``teacher``, ``settings``, ``progressive`` and ``progress``.
    """

    teacher: nn.Module
    settings: DistillationSettings
    progressive: ProgressiveDistillation | None
    progress: float

    def set_progress(self, fraction: float) -> None:
        """Where the run is (0 at the first step, 1 at the last): drives the alpha schedule."""
        self.progress = min(1.0, max(0.0, fraction))

    @property
    def alpha(self) -> float:
        """The KD weight of this step: constant, or linear from alpha to alpha_end."""
        end = self.settings.alpha_end
        if end is None:
            return self.settings.alpha
        return self.settings.alpha + (end - self.settings.alpha) * self.progress

    def extra_parameters(self) -> list[nn.Parameter]:
        if self.progressive is not None and self.progressive.projections is not None:
            return list(self.progressive.projections.parameters())
        return []

    def to(self, device: torch.device) -> None:
        """The teacher (and the hidden-state projections) live where the student trains, unless the
        teacher was spread over devices (``teacher.device_map``): its hooks bring outputs back here."""
        from entrenar_cli.models import is_dispatched

        if not is_dispatched(self.teacher):
            self.teacher.to(device)
        if self.progressive is not None:
            self.progressive.to(device)


class DistillObjective(TeacherObjective):
    """Logit KD + hard CE, hidden-state matching and attention transfer against a frozen teacher."""

    def __init__(self, teacher: nn.Module, settings: DistillationSettings, *, task: str, vocab: int,
                 student_dim: int, teacher_dim: int, mlm_info: dict[str, int] | None = None,
                 cache: Any = None, logits_budget: int | None = None):
        from entrenar_cli.models import num_layers

        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = settings
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
            ProgressiveDistillation(settings.progressive.layer_mapping, student_dim, teacher_dim,
                                    settings.progressive.loss)
            if settings.progressive.enabled else None
        )
        self.attention = AttentionTransfer(settings.attention.layer_mapping) if self.need_attn else None
        # optional precomputed teacher outputs (entrenar_cli.teacher_cache.TeacherCache)
        self.cache = cache
        self.beta = settings.jsd_beta
        self.logit_path = LogitPath(logits_budget if self.use_logits else None)
        self._teacher_eval: dict[str, float] | None = None
        self.progress = 0.0  # fraction of the run done, set by the engine before each step
        # on-policy distillation (entrenar_cli.on_policy): generated sequences join each step, and the
        # held-out evaluation scores the student's own samples with the teacher
        op = settings.on_policy
        self.on_policy = op if op.fraction > 0 else None
        self.op_settings = op
        self.eval_prompts = op.eval_prompts if op.eval_prompts is not None else (1 << 62 if op.fraction > 0 else 0)
        if self.on_policy is not None or self.eval_prompts:
            self._check_on_policy(op)

    def _check_on_policy(self, op: Any) -> None:
        """On-policy distillation needs a model that writes text, and room for prompt + continuation."""
        from entrenar_cli.errors import ConfigError
        from entrenar_cli.on_policy import max_positions_of

        if self.task != "causal":
            raise ConfigError(f"distillation.on_policy needs a causal language model; the teacher is {self.task!r}",
                              hint="set distillation.on_policy.fraction: 0 and leave eval_prompts unset")
        limit = max_positions_of(self.teacher)
        if limit is not None and op.prompt_tokens + op.max_new_tokens > limit:
            raise ConfigError(f"distillation.on_policy: prompt_tokens + max_new_tokens = "
                              f"{op.prompt_tokens + op.max_new_tokens} exceeds the teacher's {limit} positions",
                              hint=f"lower max_new_tokens to {max(1, limit - op.prompt_tokens)} or less")

    def compile(self, regional: bool = True) -> None:
        from entrenar_cli.models import compile_model

        if not (compile_model(self.teacher) and regional):
            self.logit_path.compiled()

    def _chunked(self, model: nn.Module, batch: dict[str, Tensor]) -> bool:
        # a callable that is not a module (hf_pipeline's compute_loss on given logits) has no head to chunk
        return self.use_logits and isinstance(model, nn.Module) and \
            self.logit_path.check({"student": model, "teacher": self.teacher}, batch)

    def _prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.task == "masked" and self.mlm_info is not None:
            return mask_tokens(batch, self.mlm_info, self.vocab)
        return batch

    @torch.no_grad()
    def _teacher(self, batch: dict[str, Tensor]) -> Any:
        # no_grad, not inference_mode: the teacher's outputs enter the student's loss as constants
        return self.teacher(**forward_kwargs(batch, self.need_hidden, self.need_attn, self.teacher))

    @torch.no_grad()
    def _teacher_hidden(self, batch: dict[str, Tensor], hidden: bool, attentions: bool) -> tuple[Tensor, Any]:
        """(states entering the teacher's head, its output without logits)."""
        from entrenar_cli.chunked_losses import final_hidden

        return final_hidden(self.teacher, **forward_kwargs(batch, hidden, attentions, self.teacher))

    def _cached_teacher(self, batch: dict[str, Tensor]) -> tuple[Any, Any, Any]:
        """(top-k triple, hidden blocks, attention maps) from the cache, filling it on a miss."""
        ids = batch["block_ids"].tolist()
        missing = [b for b in ids if b not in self.cache]
        if missing:
            self.cache.misses += len(missing)
            self.cache.hits += len(ids) - len(missing)
            self.cache.put(ids, self.cache.compress(self._teacher(batch), block_outputs))
        else:
            self.cache.hits += len(ids)
        got = self.cache.get(ids, batch["input_ids"].device)
        topk = (got["vals"], got["idx"], got["tail"]) if "vals" in got else None
        hidden = {j: got[f"h{j}"] for j in self.cache.hidden_layers}
        attn = {j: got[f"a{j}"].unsqueeze(1) for j in self.cache.attn_layers}
        return topk, hidden, attn

    def prepare_step(self, model: nn.Module, batches: list[dict[str, Tensor]], *, step: int, seed: int,
                     rank: int = 0) -> list[dict[str, Tensor]]:
        """The step's micro-batches with ``on_policy.fraction`` of each one's sequences replaced by continuations.

        Called by the engine once per optimizer step, before it counts the step's tokens (so the loss
        is normalised over the tokens actually trained), with the current student (unwrapped from DDP).
        Each micro-batch becomes two: prompt + student continuation for its first rows (labels only on
        generated tokens, no block ids, so the teacher cache is bypassed), and the rest of its rows as
        they were. A row's sample depends only on (seed, step, block id): resume, process count and
        batch shape do not change it. Counters ``generated_tokens`` and ``generation_s`` ride along as
        loss terms for the engine's logs.
        """
        op = self.on_policy
        if op is None:
            return batches
        from entrenar_cli.on_policy import continuations, on_policy_rows, row_seed

        fixed = bool(getattr(model, "_entrenar_sharded", False))  # every process runs the same forwards
        out: list[dict[str, Tensor]] = []
        for m, batch in enumerate(batches):
            ids = batch["input_ids"]
            b = ids.shape[0]
            mask = batch.get("attention_mask")
            usable = torch.ones(b, dtype=torch.bool, device=ids.device) if ids.shape[1] > op.prompt_tokens else \
                torch.zeros(b, dtype=torch.bool, device=ids.device)
            if mask is not None and ids.shape[1] > op.prompt_tokens:
                usable &= mask[:, : op.prompt_tokens].bool().all(dim=1)  # a prompt is real text, no padding
            rows = usable.nonzero(as_tuple=True)[0][: on_policy_rows(b, op.fraction)]
            if rows.numel() == 0:
                out.append(batch)
                continue
            blocks = batch.get("block_ids")
            seeds = [row_seed(seed, step, int(blocks[i])) if blocks is not None
                     else row_seed(seed, step, rank, m, int(i)) for i in rows.tolist()]
            gen = continuations(model, ids[rows, : op.prompt_tokens], seeds, op, vocab=self.vocab, fixed_length=fixed)
            gen.batch["on_policy"] = torch.ones((), device=ids.device)
            gen.batch["generated_tokens"] = torch.tensor(float(gen.generated_tokens), device=ids.device)
            gen.batch["generation_s"] = torch.tensor(gen.seconds, device=ids.device)
            out.append(gen.batch)
            rest = torch.ones(b, dtype=torch.bool, device=ids.device)
            rest[rows] = False
            if bool(rest.any()):
                out.append({k: (v[rest] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b else v)
                            for k, v in batch.items()})
        return out

    def loss_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> LossTerms:
        """Loss sums of one micro-batch (b sequences of s tokens); the engine normalises per step.

        Per token: CE, KD (or the on-policy divergence), hidden-state matching; per sequence: attention
        transfer and embedding cosine (``LossTerms.sequence_loss``).
        """
        batch = self._prepare(batch)  # input_ids, attention_mask, labels: [b, s]
        # the student's own continuation (prepare_step): pure divergence on its generated tokens
        on_policy = "on_policy" in batch and self.on_policy is not None
        chunked = self._chunked(model, batch)
        t_logits = t_head_in = None
        topk = None
        if self.cache is not None and "block_ids" in batch:
            topk, t_hidden, t_attn = self._cached_teacher(batch)
        else:
            if chunked:  # [b, s, d_t]: the teacher's logits are formed a chunk at a time in the loss
                t_head_in, t_out = self._teacher_hidden(batch, self.need_hidden, self.need_attn)
            else:
                t_out = self._teacher(batch)
                t_logits = t_out.logits[..., : self.vocab] if self.use_logits else None  # [b, s, V]
            t_hidden = block_outputs(t_out.hidden_states) if self.need_hidden else None  # L x [b, s, d_t]
            t_attn = t_out.attentions if self.need_attn else None  # L x [b, heads, s, s]
        kwargs = forward_kwargs(batch, self.need_hidden, self.need_attn, model)
        if chunked:
            from entrenar_cli.chunked_losses import final_hidden

            s_head_in, s_out = final_hidden(model, **kwargs)  # [b, s, d_s]; s_out.logits is a placeholder
        else:
            s_out = model(**kwargs)  # logits [b, s, V_s]
        mask = batch["attention_mask"].float()  # [b, s]
        out = LossTerms(loss=torch.zeros((), device=mask.device), tokens=mask.sum())
        if self.use_logits:
            alpha = 1.0 if on_policy else self.alpha  # no CE on self-generated tokens
            kind = self.on_policy.loss if on_policy else self.settings.kd_loss
            need_soft = alpha > 0
            if chunked:
                from entrenar_cli.chunked_losses import chunked_kd_loss, output_head

                total, terms = chunked_kd_loss(
                    s_head_in, output_head(model), batch["labels"], teacher_hidden=t_head_in,
                    teacher_head=output_head(self.teacher) if t_head_in is not None else None, teacher_topk=topk,
                    temperature=self.settings.temperature, alpha=alpha, kind=kind, beta=self.beta,
                    vocab=self.vocab, budget_bytes=self.logit_path.budget, fused=self.logit_path.fused)
            elif need_soft and topk is None and kind == "forward_kl":
                s_logits = s_out.logits[..., : self.vocab]
                # fused loss+gradient, one (tokens x vocab) buffer (see losses.py)
                total, terms = fused_forward_kd(s_logits, t_logits, batch["labels"],
                                                temperature=self.settings.temperature, alpha=alpha)
            else:
                terms = kd_terms(s_out.logits[..., : self.vocab], t_logits, batch["labels"],
                                 temperature=self.settings.temperature, kind=kind, need_soft=need_soft,
                                 need_hard=not on_policy, teacher_topk=topk, beta=self.beta)
                total = terms.total(alpha)
            out.loss = out.loss + total
            if on_policy:
                out.per_token["loss_on_policy"] = terms.soft
                out.counters["generated_tokens"] = batch["generated_tokens"]
                out.counters["generation_s"] = batch["generation_s"]
            else:
                if need_soft:
                    out.per_token["loss_kd"] = terms.soft
                out.per_token["loss_ce"] = terms.hard
            out.tokens = terms.count
        if self.progressive is not None:
            hidden = self.progressive.sum_loss(block_outputs(s_out.hidden_states), t_hidden, mask)
            out.loss = out.loss + self.settings.progressive.weight * hidden
            out.per_token["loss_hidden"] = hidden
        if self.attention is not None or self.embedding:
            out.sequence_loss = torch.zeros((), device=mask.device)
        if self.attention is not None:
            attn = self.attention.sum_loss(s_out.attentions, t_attn, mask)
            out.per_sequence["loss_attn"] = attn
            out.sequence_loss = out.sequence_loss + self.settings.attention.weight * attn
        if self.embedding:
            emb = embedding_cosine_sum(s_out.hidden_states[-1], t_hidden[self.teacher_last], mask,
                                       self.settings.embedding.pooling)
            out.per_sequence["loss_embedding"] = emb
            out.sequence_loss = out.sequence_loss + self.settings.embedding.weight * emb
        return out

    @torch.no_grad()
    def _teacher_nll_of_student(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[float, float]:
        """(teacher NLL sum, tokens) over the student's sampled continuations of held-out prompts.

        Prompts are the first ``prompt_tokens`` of the held-out blocks, in order, up to ``eval_prompts``;
        row ``i`` samples with seed ``row_seed(EVAL_SEED, i)``, so every evaluation (and every run) draws
        the same random numbers and differences come from the student alone.
        """
        from entrenar_cli.on_policy import EVAL_SEED, continuations, row_seed

        op = self.op_settings
        fixed = bool(getattr(model, "_entrenar_sharded", False))
        left, row = self.eval_prompts, 0
        nll = n = 0.0
        for batch in batches:
            ids = batch["input_ids"]
            if left <= 0:
                break
            if ids.shape[1] <= op.prompt_tokens:
                continue
            usable = batch["attention_mask"][:, : op.prompt_tokens].bool().all(dim=1).nonzero(as_tuple=True)[0]
            rows = usable[:left]
            if rows.numel() == 0:
                continue
            gen = continuations(model, ids[rows, : op.prompt_tokens],
                                [row_seed(EVAL_SEED, row + i) for i in range(rows.numel())], op,
                                vocab=self.vocab, fixed_length=fixed)
            row += rows.numel()
            left -= rows.numel()
            kwargs = forward_kwargs(gen.batch, False, False, self.teacher)
            if self._chunked(model, gen.batch):
                from entrenar_cli.chunked_losses import chunked_ce, final_hidden, output_head

                t_in, _ = final_hidden(self.teacher, **kwargs)
                hard, _ = chunked_ce(t_in, output_head(self.teacher), gen.batch["labels"], vocab=self.vocab,
                                     budget_bytes=self.logit_path.budget, fused=self.logit_path.fused)
            else:
                t_logits = self.teacher(**kwargs).logits[..., : self.vocab]
                hard = kd_terms(t_logits, None, gen.batch["labels"], need_soft=False).hard
            nll += float(hard)
            n += float(gen.generated_tokens)
        return nll, n

    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """Student perplexity, KL(teacher||student) at T=1, top-1 agreement; teacher perplexity once.

        For encoders without an LM head: hidden-state MSE and cosine of mean-pooled embeddings.
        With ``on_policy.eval_prompts`` (default: on when on-policy training is): ``teacher_nll_of_student``,
        the teacher's mean NLL of the student's sampled continuations of held-out prompts.
        """
        totals: dict[str, float] = {}
        teacher_ce = 0.0
        generator_state = torch.get_rng_state()  # masking must not disturb the training RNG stream
        torch.manual_seed(1234)
        try:
            for batch in batches:
                batch = self._prepare(batch)
                need_h = self.need_hidden or not self.use_logits
                kwargs = forward_kwargs(batch, need_h, False, self.teacher, model)
                mask = batch["attention_mask"].float()
                if self.use_logits and self._chunked(model, batch):
                    from entrenar_cli.chunked_losses import chunked_eval_sums, final_hidden, output_head

                    t_in, t_out = final_hidden(self.teacher, **kwargs)
                    s_in, s_out = final_hidden(model, **kwargs)
                    sums = chunked_eval_sums(s_in, output_head(model), t_in, output_head(self.teacher),
                                             batch["labels"], vocab=self.vocab, budget_bytes=self.logit_path.budget)
                    for k, v in (("ce", sums.ce), ("kl", sums.kl), ("agree", sums.agree), ("n", sums.count)):
                        totals[k] = totals.get(k, 0.0) + float(v)
                    teacher_ce += float(sums.teacher_ce)
                elif self.use_logits:
                    t_out = self.teacher(**kwargs)
                    s_out = model(**kwargs)
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
                else:
                    t_out = self.teacher(**kwargs)
                    s_out = model(**kwargs)
                if need_h:
                    s_last = s_out.hidden_states[-1].float()
                    t_last = t_out.hidden_states[-1].float()
                    if s_last.shape[-1] == t_last.shape[-1]:
                        cos = pooled_cosine(s_last, t_last, mask, self.settings.embedding.pooling)
                        totals["cos"] = totals.get("cos", 0.0) + float(cos.sum())
                        totals["seqs"] = totals.get("seqs", 0.0) + float(cos.numel())
                        mse = ((s_last - t_last).pow(2).mean(-1) * mask).sum()
                        totals["mse"] = totals.get("mse", 0.0) + float(mse)
                        totals["mask"] = totals.get("mask", 0.0) + float(mask.sum())
            if self.eval_prompts:
                totals["op_nll"], totals["op_n"] = self._teacher_nll_of_student(model, batches)
        finally:
            torch.set_rng_state(generator_state)
        metrics: dict[str, float] = {}
        if totals.get("op_n"):
            # the teacher's mean NLL of the student's own samples: what on-policy training lowers
            metrics["teacher_nll_of_student"] = totals["op_nll"] / totals["op_n"]
            metrics["student_sample_tokens"] = totals["op_n"]
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
