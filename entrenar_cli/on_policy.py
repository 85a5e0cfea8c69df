"""On-policy distillation: the student's own continuations, scored token by token by the teacher.

Off-policy KD (the default) trains the student on data text, which it would never write itself; at
generation time its own mistakes take it to prefixes it never trained on, and errors compound. GKD
(Agarwal et al., ICLR 2024) and MiniLLM (Gu et al., ICLR 2024) sample continuations from the student
and let the teacher score every generated token; ``distillation.on_policy.fraction`` of each
micro-batch's sequences are such continuations (GKD's ``lambda``).

This module owns the parts that do not depend on the loss:

* :func:`generate`: sampling with a KV cache under ``no_grad``, a hand loop rather than
  ``model.generate`` so that (a) every row draws from its own seeded generator, which makes a sample a
  function of (seed, step, block) only: the same with or without a resume, whatever the batch shape,
  the process count or the global RNG stream (dropout, evaluation); (b) only the first ``vocab`` logits
  are sampled (padded head rows are never emitted); (c) a sharded (FSDP) student can be told to run a
  fixed number of forwards on every process (each forward is a collective);
* :func:`continuation_batch`: prompt + continuation -> ``input_ids``/``attention_mask``/``labels``
  with labels -100 on the prompt and after the first end-of-text token (the end token itself is
  trained: when to stop is part of what the student learns);
* :func:`eos_ids_of`, :func:`pad_id_of`: end-of-text and padding ids from a model's configuration.

The loss itself (divergence on generated tokens, teacher cache bypassed) is in
:class:`entrenar_cli.objectives.DistillObjective`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from entrenar_cli.losses import IGNORE_INDEX

# seed of the held-out measure's samples: fixed, so evaluations are comparable across a run and across runs
EVAL_SEED = 20240521
_MASK64 = (1 << 64) - 1


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 mixing): independent streams for (seed, step, block)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def eos_ids_of(model: nn.Module) -> list[int]:
    """End-of-text ids from the model's config and generation config (either may be an int or a list)."""
    found: list[int] = []
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, int) and v >= 0 and v not in found:
                found.append(v)
    return found


def pad_id_of(model: nn.Module, eos: Sequence[int]) -> int:
    """What fills a row after its end token (never trained, never attended to by a trained position)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0:
        return pad
    return eos[0] if eos else 0


def max_positions_of(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def sample_next(logits: Tensor, temperature: float, top_p: float, uniforms: Tensor) -> Tensor:
    """One token per row by inverse-CDF sampling with the row's own uniform draw in [0, 1).

    ``logits`` ``[k, V]`` (fp32); ``temperature`` 0 is greedy. Inverse CDF rather than
    ``torch.multinomial`` so that one pre-drawn uniform per row and step decides the token: the sample
    does not depend on which other rows share the batch.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    index: Tensor | None = None
    if top_p < 1.0:
        probs, index = probs.sort(dim=-1, descending=True)
        keep = (probs.cumsum(-1) - probs) < top_p  # the smallest prefix whose mass reaches top_p (>= 1 token)
        probs = probs * keep
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (index.gather(-1, j) if index is not None else j).squeeze(-1)


def _kv_cache(out: Any) -> tuple[str, Any]:
    """(keyword, cache) of a forward's KV cache: transformers 5 names it ``cache``, 4.x ``past_key_values``."""
    cache = getattr(out, "cache", None)
    return ("cache", cache) if cache is not None else ("past_key_values", out.past_key_values)


def _forward_last(model: nn.Module, ids: Tensor, past: tuple[str, Any] | None, keep_last: list[bool]) -> Any:
    """One forward returning logits of the last position only where the model supports it."""
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
    if past is not None:
        kwargs[past[0]] = past[1]
    if keep_last[0]:
        try:
            return model(**kwargs, logits_to_keep=1)
        except TypeError:  # an architecture without logits_to_keep: full logits, sliced by the caller
            keep_last[0] = False
    return model(**kwargs)


@torch.no_grad()
def generate(model: nn.Module, prompts: Tensor, seeds: Sequence[int], *, max_new_tokens: int, temperature: float,
             top_p: float, vocab: int, eos: Sequence[int], pad: int, fixed_length: bool = False) -> Tensor:
    """Prompt + sampled continuation ``[k, P + G]``, ``G <= max_new_tokens`` (fewer when every row ended).

    Rows that produced an end token are continued with ``pad``. ``seeds``: one per row; row ``i``'s
    tokens are decided by ``torch.Generator().manual_seed(seeds[i])`` alone. ``fixed_length``: always run
    ``max_new_tokens`` forwards (a sharded model's forward is a collective every process must join).
    The model runs in eval mode (no dropout in the sampler) and is put back as it was.
    """
    k = prompts.shape[0]
    if len(seeds) != k:
        raise ValueError(f"{len(seeds)} seeds for {k} prompts")
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)),
                                       dtype=torch.float64) for s in seeds]).to(prompts.device)
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=prompts.device)
    was_training = model.training
    model.eval()
    keep_last = [True]
    tokens: list[Tensor] = []
    done = torch.zeros(k, dtype=torch.bool, device=prompts.device)
    try:
        out = _forward_last(model, prompts, None, keep_last)
        for t in range(max_new_tokens):
            logits = out.logits[:, -1, :vocab].float()
            nxt = sample_next(logits, temperature, top_p, uniforms[:, t])
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            if eos_t.numel():
                done |= torch.isin(nxt, eos_t)
            if t == max_new_tokens - 1 or (not fixed_length and bool(done.all())):
                break
            out = _forward_last(model, nxt.unsqueeze(-1), _kv_cache(out), keep_last)
    finally:
        model.train(was_training)
    return torch.cat([prompts, torch.stack(tokens, dim=1)], dim=1)


def continuation_batch(sequences: Tensor, prompt_len: int, eos: Sequence[int]) -> dict[str, Tensor]:
    """Causal inputs/targets of prompt + continuation rows, loss on generated tokens only.

    ``labels[t]`` is the target of ``input_ids[t]`` (the collator's convention). Targets that are prompt
    tokens are -100; so are targets after a row's first end token (padding). The end token itself keeps
    its label. Inputs after the end token are masked out of attention (``attention_mask`` 0), so hidden
    state and attention losses ignore them too.
    """
    inputs = sequences[:, :-1]
    labels = sequences[:, 1:].clone()
    labels[:, : prompt_len - 1] = IGNORE_INDEX
    gen = sequences[:, prompt_len:]
    if eos:
        is_eos = torch.isin(gen, torch.tensor(list(eos), dtype=gen.dtype, device=gen.device))
        after = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0  # strictly after the first end token
    else:
        after = torch.zeros_like(gen, dtype=torch.bool)
    labels[:, prompt_len - 1:][after] = IGNORE_INDEX
    mask = torch.ones_like(inputs)
    mask[:, prompt_len:][after[:, :-1]] = 0
    return {"input_ids": inputs, "attention_mask": mask, "labels": labels}


@dataclass
class OnPolicyBatch:
    """One micro-batch of continuations and what producing it cost."""

    batch: dict[str, Tensor]
    generated_tokens: int  # tokens that carry loss (up to and including each row's end token)
    seconds: float


def continuations(model: nn.Module, prompts: Tensor, seeds: Sequence[int], settings: Any, *, vocab: int,
                  fixed_length: bool = False) -> OnPolicyBatch:
    """Generate from ``prompts`` ``[k, P]`` with ``distillation.on_policy`` settings and build the batch."""
    eos = eos_ids_of(model)
    start = time.perf_counter()
    seqs = generate(model, prompts, seeds, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                    top_p=settings.top_p, vocab=vocab, eos=eos, pad=pad_id_of(model, eos), fixed_length=fixed_length)
    batch = continuation_batch(seqs, prompts.shape[1], eos)
    if prompts.device.type == "cuda":
        torch.cuda.synchronize(prompts.device)
    seconds = time.perf_counter() - start
    return OnPolicyBatch(batch, int((batch["labels"] != IGNORE_INDEX).sum()), seconds)


def on_policy_rows(batch_size: int, fraction: float) -> int:
    """Sequences of a micro-batch replaced by continuations: round half up, so 0.5 of 1 is 1."""
    return min(batch_size, int(fraction * batch_size + 0.5))
