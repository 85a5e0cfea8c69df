"""Chunked logit losses equal the materialised-logits reference (losses.kd_terms + autograd), fp32, 1e-5.

Loss values and gradients w.r.t. the student's hidden states, head weight and bias; every divergence,
temperature, alpha, ignore_index, chunk sizes that do not divide the token count, soft-capping, scaling,
vocab trimming, cached top-k targets; and real tiny transformers models (llama, qwen2, gpt2 tied,
gemma2 soft-capped, cohere scaled, BERT MLM, a LoRA student) whose head + final hidden states reproduce
``model(...).logits``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from entrenar_cli.chunked_losses import (
    OutputHead,
    chunk_rows,
    chunked_ce,
    chunked_eval_sums,
    chunked_kd_loss,
    final_hidden,
    head_logits,
    head_matches,
    output_head,
)
from entrenar_cli.losses import IGNORE_INDEX, kd_terms, topk_teacher

TOL = {"rtol": 1e-5, "atol": 1e-5}
N_ROWS, D_S, D_T, V_S, V_T, VOCAB = 2 * 11, 12, 16, 61, 64, 57  # 22 tokens; vocab trimmed to 57


def _setup(seed: int = 0, *, bias: bool = False, softcap: float | None = None, scale: float | None = None,
           t_softcap: float | None = None, t_scale: float | None = None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    h_s = (torch.randn(2, 11, D_S, generator=g)).requires_grad_(True)
    w_s = (torch.randn(V_S, D_S, generator=g) * 0.7).requires_grad_(True)
    b_s = (torch.randn(V_S, generator=g) * 0.5).requires_grad_(True) if bias else None
    h_t = torch.randn(2, 11, D_T, generator=g)
    w_t = torch.randn(V_T, D_T, generator=g) * 0.7
    b_t = torch.randn(V_T, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, VOCAB, (2, 11), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 7] = IGNORE_INDEX
    return {"h_s": h_s, "head_s": OutputHead(w_s, b_s, softcap, scale), "h_t": h_t,
            "head_t": OutputHead(w_t, b_t, t_softcap, t_scale), "labels": labels}


def _params(c: dict[str, Any]) -> list[Tensor]:
    return [x for x in (c["h_s"], c["head_s"].weight, c["head_s"].bias) if x is not None and x.requires_grad]


def _reference(c: dict[str, Any], *, T: float, alpha: float, kind: str = "forward_kl",
               topk: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    s = head_logits(c["h_s"], c["head_s"], VOCAB)
    t = None if topk is not None else head_logits(c["h_t"], c["head_t"], VOCAB)
    terms = kd_terms(s, t, c["labels"], temperature=T, kind=kind, need_soft=alpha > 0, teacher_topk=topk)
    total = terms.total(alpha)
    return total, terms.soft, terms.hard, list(torch.autograd.grad(total, _params(c)))


def _ours(c: dict[str, Any], **kw: Any) -> tuple[Tensor, Any, list[Tensor]]:
    total, terms = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_hidden=c["h_t"],
                                   teacher_head=c["head_t"], vocab=VOCAB, **kw)
    return total, terms, list(torch.autograd.grad(total, _params(c)))


def _assert_same(ours: tuple[Tensor, Any, list[Tensor]], ref: tuple[Tensor, Tensor, Tensor, list[Tensor]]) -> None:
    total, terms, grads = ours
    r_total, r_soft, r_hard, r_grads = ref
    torch.testing.assert_close(total, r_total, **TOL)
    torch.testing.assert_close(terms.soft, r_soft.detach(), **TOL)
    torch.testing.assert_close(terms.hard, r_hard.detach(), **TOL)
    assert terms.count.item() == 18.0  # 22 tokens, 4 ignored
    assert len(grads) == len(r_grads)
    for a, b in zip(grads, r_grads):
        assert float(b.abs().max()) > 1e-3  # the reference gradient is not trivially zero
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_every_divergence_matches_reference(kind: str, T: float, alpha: float) -> None:
    c = _setup()
    _assert_same(_ours(c, temperature=T, alpha=alpha, kind=kind, chunk_tokens=5),
                 _reference(c, T=T, alpha=alpha, kind=kind))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_bias_softcap_and_scale_on_both_sides(kind: str) -> None:
    c = _setup(1, bias=True, softcap=2.5, scale=1.3, t_softcap=3.0, t_scale=0.8)
    capped = head_logits(c["h_s"], c["head_s"]).detach()
    assert float(capped.abs().max()) < 2.5 and float(capped.abs().max()) > 2.0  # the cap is active
    _assert_same(_ours(c, temperature=2.0, alpha=0.5, kind=kind, chunk_tokens=7),
                 _reference(c, T=2.0, alpha=0.5, kind=kind))


@pytest.mark.parametrize("chunk", [1, 4, 17, 1000])
def test_chunk_sizes_that_do_not_divide_the_tokens(chunk: int) -> None:
    c = _setup(2, bias=True)
    _assert_same(_ours(c, temperature=2.0, alpha=0.5, chunk_tokens=chunk), _reference(c, T=2.0, alpha=0.5))


def test_budget_sets_the_chunk_size() -> None:
    assert chunk_rows(151_936, 256 * 2**20) == 256 * 2**20 // (4 * 7 * 151_936)
    assert chunk_rows(151_936, 256 * 2**20, teacher=False) == 256 * 2**20 // (4 * 3 * 151_936)
    assert chunk_rows(10**9, 1) == 1
    c = _setup(3)
    # a budget of three fp32 rows of all buffers: chunks of 1 row
    _assert_same(_ours(c, temperature=1.0, alpha=0.5, budget_bytes=3 * 4 * 7 * VOCAB),
                 _reference(c, T=1.0, alpha=0.5))


def _jsd_reference(c: dict[str, Any], T: float, alpha: float, beta: float) -> tuple[Tensor, ...]:
    """TRL's generalised JSD: m = beta * q + (1 - beta) * p; beta * KL(q||m) + (1 - beta) * KL(p||m)."""
    s = head_logits(c["h_s"], c["head_s"], VOCAB)
    t = head_logits(c["h_t"], c["head_t"], VOCAB)
    valid = c["labels"] != IGNORE_INDEX
    s_logp, t_logp = F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1)
    m = torch.logsumexp(torch.stack([s_logp + math.log(1 - beta), t_logp + math.log(beta)]), dim=0)
    div = beta * (t_logp.exp() * (t_logp - m)).sum(-1) + (1 - beta) * (s_logp.exp() * (s_logp - m)).sum(-1)
    soft = T * T * div.sum()
    hard = F.cross_entropy(s[valid], c["labels"][valid], reduction="sum")
    total = alpha * soft + (1 - alpha) * hard
    return total, soft, hard, list(torch.autograd.grad(total, _params(c)))


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_skew_kl(T: float, alpha: float) -> None:
    """KL(q || l*q + (1-l)*p) (DistiLLM, l = 0.1), against its own formula and kd_terms where it has it."""
    c = _setup(14, bias=True, softcap=3.0)
    s = head_logits(c["h_s"], c["head_s"], VOCAB)
    t = head_logits(c["h_t"], c["head_t"], VOCAB)
    valid = c["labels"] != IGNORE_INDEX
    s_logp, t_logp = F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1)
    m = torch.log(0.1 * t_logp.exp() + 0.9 * s_logp.exp())
    soft = T * T * (t_logp.exp() * (t_logp - m)).sum()
    hard = F.cross_entropy(s[valid], c["labels"][valid], reduction="sum")
    total = alpha * soft + (1 - alpha) * hard
    ref = (total, soft, hard, list(torch.autograd.grad(total, _params(c), retain_graph=True)))
    _assert_same(_ours(c, temperature=T, alpha=alpha, kind="skew_kl", chunk_tokens=5), ref)
    try:
        via_kd_terms = kd_terms(s, t, c["labels"], temperature=T, kind="skew_kl").total(alpha)
    except ValueError:  # an older losses.py without skew KL
        return
    torch.testing.assert_close(via_kd_terms, total, **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalised_jsd_beta(beta: float) -> None:
    c = _setup(4, bias=True)
    _assert_same(_ours(c, temperature=2.0, alpha=0.7, kind="jsd", beta=beta, chunk_tokens=6),
                 _jsd_reference(c, 2.0, 0.7, beta))


def test_beta_changes_the_jsd() -> None:
    c = _setup(4)
    a = _ours(c, temperature=1.0, alpha=1.0, kind="jsd", beta=0.2)[1].soft
    b = _ours(c, temperature=1.0, alpha=1.0, kind="jsd", beta=0.5)[1].soft
    assert abs(float(a - b)) > 1e-3


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("k", [5, 40])
def test_cached_topk_targets(T: float, alpha: float, k: int) -> None:
    c = _setup(5, bias=True)
    with torch.no_grad():
        topk = topk_teacher(head_logits(c["h_t"], c["head_t"], VOCAB), k, temperature=T)
    ref = _reference(c, T=T, alpha=alpha, topk=topk)
    total, terms = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_topk=topk, temperature=T,
                                   alpha=alpha, vocab=VOCAB, chunk_tokens=4)
    _assert_same((total, terms, list(torch.autograd.grad(total, _params(c)))), ref)


def test_sampled_targets_with_repeated_ids() -> None:
    """Sparse targets whose ids repeat (sampled tail tokens) and with or without a tail column per row."""
    c = _setup(13, bias=True)
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 6, (2, 11, 9), generator=g)  # ids 0..5 only: many repeats
    ids[..., -1] = -1
    ids[1, :4, -1] = 3  # rows without a tail column
    w = torch.rand(2, 11, 9, generator=g)
    w = w / w.sum(-1, keepdim=True)
    negent = -torch.rand(2, 11, generator=g)
    ref = _reference(c, T=2.0, alpha=0.5, topk=(w, ids, negent))
    total, terms = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_topk=(w, ids, negent),
                                   temperature=2.0, alpha=0.5, vocab=VOCAB, chunk_tokens=5)
    _assert_same((total, terms, list(torch.autograd.grad(total, _params(c)))), ref)


def test_topk_tail_clamp_matches() -> None:
    """Rows where the student's mass on the target's ids hits the tail clamp (zero tail gradient there) next
    to rows where it is far from it (rows in between are ill-conditioned in fp32 for any implementation)."""
    c = _setup(0)
    with torch.no_grad():
        c["head_s"].weight.mul_(40.0)
        s = head_logits(c["h_s"], c["head_s"], VOCAB)
        w, ids, negent = topk_teacher(s, 3)  # the student's own top-3: its mass there is ~1
        ids[1, :, :3] = s[1].topk(13, dim=-1).indices[:, 10:]  # second sequence: low-probability ids
        kept = torch.log_softmax(s, -1).exp().gather(-1, ids[..., :3]).sum(-1)
    assert int((kept > 1 - 1e-6).sum()) >= 8 and int((kept < 0.5).sum()) >= 8
    ref = _reference(c, T=1.0, alpha=1.0, topk=(w, ids, negent))
    total, terms = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_topk=(w, ids, negent), alpha=1.0,
                                   vocab=VOCAB, chunk_tokens=4)
    grads = list(torch.autograd.grad(total, _params(c)))
    torch.testing.assert_close(total, ref[0], **TOL)
    for a, b in zip(grads, ref[3]):
        torch.testing.assert_close(a, b, **TOL)


def test_plain_ce_for_finetuning() -> None:
    c = _setup(7, bias=True, softcap=4.0)
    s = head_logits(c["h_s"], c["head_s"], VOCAB)
    ref = kd_terms(s, None, c["labels"], need_soft=False)
    r_grads = torch.autograd.grad(ref.hard, _params(c))
    total, terms = chunked_ce(c["h_s"], c["head_s"], c["labels"], vocab=VOCAB, chunk_tokens=5)
    grads = torch.autograd.grad(total, _params(c))
    torch.testing.assert_close(total, ref.hard, **TOL)
    assert float(terms.soft) == 0.0 and terms.count.item() == 18.0
    for a, b in zip(grads, r_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_backward_scales_by_grad_output_and_accumulates() -> None:
    c = _setup(8)
    ref = _reference(c, T=2.0, alpha=0.5)
    total, _ = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_hidden=c["h_t"],
                               teacher_head=c["head_t"], temperature=2.0, alpha=0.5, vocab=VOCAB, chunk_tokens=3)
    # the engine multiplies by 1/tokens and adds other terms before backward
    (total * 0.37 + c["h_s"].sum()).backward()
    torch.testing.assert_close(c["h_s"].grad, ref[3][0] * 0.37 + 1.0, **TOL)
    torch.testing.assert_close(c["head_s"].weight.grad, ref[3][1] * 0.37, **TOL)
    # rows past the compared vocabulary get no gradient
    assert float(c["head_s"].weight.grad[VOCAB:].abs().max()) == 0.0


def test_frozen_head_and_no_grad() -> None:
    c = _setup(9)
    c["head_s"] = OutputHead(c["head_s"].weight.detach(), None, None, None)  # a LoRA student's frozen head
    ref = _reference(c, T=1.0, alpha=0.5)
    ours = _ours(c, temperature=1.0, alpha=0.5, chunk_tokens=4)
    _assert_same(ours, ref)
    with torch.no_grad():
        total, terms = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_hidden=c["h_t"],
                                       teacher_head=c["head_t"], alpha=0.5, vocab=VOCAB)
    assert not total.requires_grad
    torch.testing.assert_close(total, ref[0].detach(), **TOL)


def test_reduced_precision_inputs_run_in_fp32() -> None:
    c = _setup(10, bias=True)
    ref = _reference(c, T=2.0, alpha=0.5)
    h16 = c["h_s"].detach().bfloat16().requires_grad_(True)
    head16 = OutputHead(c["head_s"].weight.detach().bfloat16().requires_grad_(True),
                        c["head_s"].bias.detach().bfloat16().requires_grad_(True))
    total, terms = chunked_kd_loss(h16, head16, c["labels"], teacher_hidden=c["h_t"].bfloat16(),
                                   teacher_head=OutputHead(*(x.bfloat16() for x in c["head_t"][:2])),
                                   temperature=2.0, alpha=0.5, vocab=VOCAB, chunk_tokens=4)
    assert total.dtype == torch.float32
    total.backward()
    assert h16.grad.dtype == torch.bfloat16 and head16.weight.grad.dtype == torch.bfloat16
    assert float(total.detach()) == pytest.approx(float(ref[0]), rel=2e-2)
    cos = F.cosine_similarity(h16.grad.float().flatten(), ref[3][0].flatten(), dim=0)
    assert float(cos) > 0.99
    # under autocast the head runs in bf16 on fp32 weights, like the model's own head would
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_ac, _ = chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_hidden=c["h_t"],
                                      teacher_head=c["head_t"], temperature=2.0, alpha=0.5, vocab=VOCAB)
    assert total_ac.dtype == torch.float32 and float(total_ac) == pytest.approx(float(ref[0]), rel=2e-2)
    assert float(total_ac) != float(ref[0])  # bf16 matmul, not silently fp32


def test_bf16_weight_gradient_over_many_chunks_stays_near_one_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 the head's weight-gradient products are summed in bf16 and reach the fp32 total every
    _FLUSH_CHUNKS chunks. 64 chunks of 8 rows: the error stays near the one-chunk bf16 error (measured
    0.26% one chunk, 0.35% flushing every 8, 0.86% never flushing, 0.23% flushing every chunk)."""
    import entrenar_cli.chunked_losses as cl

    g = torch.Generator().manual_seed(0)
    n, d, vocab = 512, 64, 3000
    h, h_t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w_s, w_t = torch.randn(vocab, d, generator=g) * 0.1, torch.randn(vocab, d, generator=g) * 0.2
    y = torch.randint(0, vocab, (n,), generator=g)

    def weight_grad(chunk_tokens: int, bf16: bool) -> Tensor:
        w = w_s.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, _ = chunked_kd_loss(h, OutputHead(w), y, teacher_hidden=h_t, teacher_head=OutputHead(w_t),
                                       alpha=0.5, chunk_tokens=chunk_tokens)
        (grad,) = torch.autograd.grad(total, [w])
        assert grad.dtype == torch.float32
        return grad

    ref = weight_grad(n, False)
    err = lambda grad: float((grad - ref).norm() / ref.norm())  # noqa: E731
    assert err(weight_grad(8, False)) < 1e-5  # fp32 accumulates in fp32
    one_chunk, many = err(weight_grad(n, True)), err(weight_grad(8, True))
    assert 1e-3 < one_chunk < 5e-3 and many < 2 * one_chunk
    monkeypatch.setattr(cl, "_FLUSH_CHUNKS", 10**6)  # what the bound guards against
    assert err(weight_grad(8, True)) > 2 * one_chunk


def test_eval_sums_match_materialised_metrics() -> None:
    c = _setup(11, bias=True, softcap=3.0)
    with torch.no_grad():
        s = head_logits(c["h_s"], c["head_s"], VOCAB)
        t = head_logits(c["h_t"], c["head_t"], VOCAB)
        st = kd_terms(s, t, c["labels"], temperature=1.0, kind="forward_kl")
        tt = kd_terms(t, None, c["labels"], need_soft=False)
        agree = ((s.argmax(-1) == t.argmax(-1)) & (c["labels"] != IGNORE_INDEX)).sum()
    got = chunked_eval_sums(c["h_s"], c["head_s"], c["h_t"], c["head_t"], c["labels"], vocab=VOCAB, chunk_tokens=5)
    torch.testing.assert_close(got.ce, st.hard, **TOL)
    torch.testing.assert_close(got.kl, st.soft, **TOL)
    torch.testing.assert_close(got.teacher_ce, tt.hard, **TOL)
    assert float(got.agree) == float(agree) and float(got.count) == 18.0


def test_bad_arguments() -> None:
    c = _setup(12)
    with pytest.raises(ValueError, match="needs a teacher"):
        chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], alpha=0.5)
    with pytest.raises(ValueError, match="unknown kd_loss"):
        chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], alpha=0.0, kind="l2")
    with pytest.raises(ValueError, match="beta"):
        chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], alpha=0.0, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="exceeds"):
        chunked_kd_loss(c["h_s"], c["head_s"], c["labels"], teacher_hidden=c["h_t"], teacher_head=c["head_t"],
                        vocab=V_S + 1)


# ---- real (tiny, random) transformers models ---------------------------------------------------

VOCAB_M = 96


def _tiny(arch: str, seed: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB_M, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False)).eval()
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False)).eval()
    if arch == "gemma2":  # a low cap so soft-capping changes the logits a lot
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5)).eval()
    if arch == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.3)).eval()
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB_M, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=64)).eval()
    if arch == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB_M, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64)).eval()
    raise AssertionError(arch)


def _batch(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_M, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(0, VOCAB_M, (2, 10), generator=g)
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


ARCHS = ["llama", "qwen2", "gpt2", "gemma2", "cohere", "bert"]


@pytest.mark.parametrize("arch", ARCHS)
def test_head_and_final_hidden_reproduce_model_logits(arch: str) -> None:
    model = _tiny(arch, 0)
    head = output_head(model)
    assert head is not None
    if arch == "gpt2":
        assert head.weight is model.transformer.wte.weight  # tied
    if arch == "gemma2":
        assert head.softcap == 0.5
    if arch == "cohere":
        assert head.scale == pytest.approx(0.3)
    if arch == "bert":
        assert head.bias is not None
    b = _batch()
    kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        reference = model(**kwargs).logits
        hidden, out = final_hidden(model, **kwargs)
    assert out.logits.shape[-1] == 1  # the placeholder: no [tokens x vocab] tensor was formed
    torch.testing.assert_close(head_logits(hidden, head), reference, **TOL)
    assert head_matches(model, head, **kwargs)
    # the capture is undone: the model computes real logits again
    assert model(**kwargs).logits.shape[-1] == VOCAB_M
    # a head missing its transform is detected (the check is not vacuous)
    if head.softcap is not None or head.scale is not None:
        assert not head_matches(model, head._replace(softcap=None, scale=None), **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "bert"])
def test_student_parameter_gradients_match_materialised_logits(arch: str) -> None:
    student, teacher = _tiny(arch, 1), _tiny(arch, 2)
    b = _batch(1)
    kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        t_logits = teacher(**kwargs).logits
        t_hidden, _ = final_hidden(teacher, **kwargs)
    ref_terms = kd_terms(student(**kwargs).logits, t_logits, b["labels"], temperature=2.0, kind="jsd")
    ref_total = ref_terms.total(0.5)
    params = [p for p in student.parameters() if p.requires_grad]
    ref = torch.autograd.grad(ref_total, params, allow_unused=True)
    hidden, _ = final_hidden(student, **kwargs)
    total, terms = chunked_kd_loss(hidden, output_head(student), b["labels"], teacher_hidden=t_hidden,
                                   teacher_head=output_head(teacher), temperature=2.0, alpha=0.5, kind="jsd",
                                   chunk_tokens=7)
    ours = torch.autograd.grad(total, params, allow_unused=True)
    torch.testing.assert_close(total, ref_total, **TOL)
    checked = 0
    for _p, a, r in zip(params, ours, ref):
        if r is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        torch.testing.assert_close(a, r, **TOL)
        checked += 1
    assert checked >= len(params) - 2  # nearly every parameter gets a real gradient


def test_lora_student() -> None:
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(_tiny("llama", 3), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    teacher = _tiny("llama", 4)
    head = output_head(student)
    assert head is not None and not head.weight.requires_grad  # the frozen base head
    b = _batch(2)
    kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        t_hidden, _ = final_hidden(teacher, **kwargs)
        t_logits = teacher(**kwargs).logits
    params = [p for p in student.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    ref_total = kd_terms(student(**kwargs).logits, t_logits, b["labels"], temperature=1.0).total(0.5)
    ref = torch.autograd.grad(ref_total, params)
    hidden, _ = final_hidden(student, **kwargs)
    total, _ = chunked_kd_loss(hidden, head, b["labels"], teacher_hidden=t_hidden,
                               teacher_head=output_head(teacher), alpha=0.5, chunk_tokens=6)
    for a, r in zip(torch.autograd.grad(total, params), ref):
        torch.testing.assert_close(a, r, **TOL)


def _ddp_check(pg_file: str) -> None:
    """The DDP test's body: one gloo process, DDP's own forward, chunked CE against the full logits."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=0, world_size=1)
    try:
        model = _tiny("gpt2", 5)
        ddp = DistributedDataParallel(model)
        b = _batch(3)
        kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        head = output_head(ddp)
        assert head is not None and head.weight is model.lm_head.weight
        hidden, _ = final_hidden(ddp, **kwargs)
        total, _ = chunked_ce(hidden, head, b["labels"], chunk_tokens=4)
        total.backward()
        ref = kd_terms(model(**kwargs).logits, None, b["labels"], need_soft=False).hard
        torch.testing.assert_close(total, ref, **TOL)
        ref_grad = torch.autograd.grad(ref, model.transformer.wte.weight)[0]
        torch.testing.assert_close(model.transformer.wte.weight.grad, ref_grad, **TOL)
    finally:
        dist.destroy_process_group()
    print("DDP-CHECK-OK")


def test_ddp_wrapped_student(tmp_path: Any) -> None:
    """Through DDP's own forward (one gloo process): the head is found and gradients reach the params.

    In a fresh interpreter: a process group is process-wide state, and once (1 run in many) the
    in-process version hung in native code when run after the rest of the suite's in-process runs.
    """
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_chunked_losses as t; t._ddp_check(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pg")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "DDP-CHECK-OK" in proc.stdout, proc.stderr[-3000:]


def test_unseparable_head_is_none() -> None:
    class NoHead(torch.nn.Module):
        def get_output_embeddings(self) -> None:
            return None

    assert output_head(NoHead()) is None
    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(_tiny("llama", 6), LoraConfig(r=2, target_modules=["lm_head"]))
    assert output_head(lora_head) is None  # a LoRA-wrapped head is not a plain matrix


# ---- wired into the objectives: the run's losses are the materialised path's ---------------------


def _objective_pair(arch: str, **settings: Any) -> tuple[Any, Any, torch.nn.Module]:
    from entrenar_cli.config.schema import DistillationSettings
    from entrenar_cli.objectives import DistillObjective

    teacher, student = _tiny(arch, 1), _tiny(arch, 2).train()
    s = DistillationSettings(**settings)
    dim = student.config.hidden_size if hasattr(student.config, "hidden_size") else student.config.n_embd
    make = lambda budget: DistillObjective(teacher, s, task="masked" if arch == "bert" else "causal",  # noqa: E731
                                           vocab=VOCAB_M - 3, student_dim=dim, teacher_dim=dim, logits_budget=budget)
    return make(None), make(4 * 7 * VOCAB_M * 5), student  # 5 rows per chunk: several chunks per batch


def _terms_and_grads(objective: Any, student: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[dict, dict]:
    student.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout
    terms = objective.loss_terms(student, batch)
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.named().items()}, grads


def _trimmed_batch(seed: int) -> dict[str, Tensor]:
    """Labels inside the compared vocabulary (VOCAB_M - 3 rows: the models' last rows are padding)."""
    batch = _batch(seed)
    labels = batch["labels"]
    batch["labels"] = torch.where(labels == IGNORE_INDEX, labels, labels % (VOCAB_M - 3))
    return batch


@pytest.mark.parametrize("arch,kind,T,alpha", [
    ("llama", "forward_kl", 2.0, 0.5), ("llama", "reverse_kl", 1.0, 1.0), ("llama", "jsd", 2.0, 0.3),
    ("llama", "skew_kl", 1.0, 0.5), ("gpt2", "forward_kl", 1.0, 0.5), ("gemma2", "reverse_kl", 2.0, 0.5),
])
def test_distill_objective_chunked_equals_materialised(arch: str, kind: str, T: float, alpha: float) -> None:
    full, chunked, student = _objective_pair(arch, kd_loss=kind, temperature=T, alpha=alpha)
    batch = _trimmed_batch(3)
    ref_terms, ref_grads = _terms_and_grads(full, student, batch)
    terms, grads = _terms_and_grads(chunked, student, batch)
    assert full.logit_path.note.startswith("full logits") and chunked.logit_path.note.startswith("chunked")
    assert terms.keys() == ref_terms.keys() and terms["tokens"] == ref_terms["tokens"] == 17
    for k in ref_terms:
        assert terms[k] == pytest.approx(ref_terms[k], rel=1e-5, abs=1e-5), k
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    # held-out metrics through the chunked evaluation (the engine evaluates without dropout)
    student.eval()
    ev, ev_ref = chunked.evaluate(student, [_trimmed_batch(4)]), full.evaluate(student, [_trimmed_batch(4)])
    assert ev.keys() == ev_ref.keys() and {"perplexity", "kl_to_teacher", "agreement"} <= ev.keys()
    for k in ev_ref:
        assert ev[k] == pytest.approx(ev_ref[k], rel=1e-5, abs=1e-6), k


def test_jsd_beta_reaches_both_paths() -> None:
    results = []
    for beta in (0.5, 0.9):
        full, chunked, student = _objective_pair("llama", kd_loss="jsd", alpha=1.0, jsd_beta=beta)
        a, _ = _terms_and_grads(full, student, _trimmed_batch(1))
        b, _ = _terms_and_grads(chunked, student, _trimmed_batch(1))
        assert a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-5)
        results.append(a["loss_kd"])
    assert results[0] != pytest.approx(results[1], rel=1e-3)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lm_objective_chunked_ce_equals_materialised(arch: str) -> None:
    from entrenar_cli.objectives import LMObjective

    student = _tiny(arch, 2).train()
    task = "masked" if arch == "bert" else "causal"
    full, chunked = LMObjective(task), LMObjective(task, logits_budget=4 * 3 * VOCAB_M * 3)
    batch = _batch(5)
    ref_terms, ref_grads = _terms_and_grads(full, student, batch)
    terms, grads = _terms_and_grads(chunked, student, batch)
    assert chunked.logit_path.enabled and not full.logit_path.enabled
    assert terms["loss"] == pytest.approx(ref_terms["loss"], rel=1e-5) and terms["tokens"] == 17
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    student.eval()  # the engine evaluates without dropout
    ev, ev_ref = chunked.evaluate(student, [batch]), full.evaluate(student, [batch])
    assert ev["eval_loss"] == pytest.approx(ev_ref["eval_loss"], rel=1e-6)


def test_head_with_unknown_post_processing_falls_back_and_says_why() -> None:
    from entrenar_cli.objectives import LMObjective

    student = _tiny("llama", 2)
    inner = student.forward

    def doubled(*args: Any, **kwargs: Any) -> Any:  # an architecture that post-processes its logits
        out = inner(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    student.forward = doubled  # type: ignore[method-assign]
    objective = LMObjective("causal", logits_budget=2**20)
    batch = _batch(0)
    terms = objective.loss_terms(student, batch)
    assert not objective.logit_path.enabled and "does not reproduce its logits" in objective.logit_path.note
    reference = kd_terms(doubled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, None,
                         batch["labels"], need_soft=False)
    assert float(terms.loss) == pytest.approx(float(reference.hard), rel=1e-6)


def test_compile_and_switch_off_keep_materialised_logits() -> None:
    from entrenar_cli.chunking import logits_budget
    from entrenar_cli.config.schema import TrainingSettings
    from entrenar_cli.objectives import LMObjective, planned_logit_path

    student = _tiny("llama", 2)
    assert planned_logit_path(TrainingSettings(), {"model": student}).startswith(
        "chunked over tokens (budget 256.00 MiB")
    assert planned_logit_path(TrainingSettings(logits_budget_mb=64), {"model": student}).startswith(
        "chunked over tokens (budget 64.00 MiB")
    # compile is regional (block by block): the head stays outside any graph and the chunked path stays on
    assert planned_logit_path(TrainingSettings(compile=True), {"model": student}).startswith("chunked")
    assert planned_logit_path(TrainingSettings(chunked_logits=False), {"model": student}) == \
        "full logits (training.chunked_logits: false)"
    # fused_losses: the chunks' element-wise work is compiled, and the plan says so
    assert planned_logit_path(TrainingSettings(fused_losses=True), {"model": student}).endswith(
        ", element-wise work fused (torch.compile)")
    assert "fused" not in planned_logit_path(TrainingSettings(), {"model": student})
    assert logits_budget(TrainingSettings(chunked_logits=False)) is None
    objective = LMObjective("causal", logits_budget=2**20)
    objective.compile(regional=False)  # a model without repeated blocks is compiled whole
    objective.loss_terms(student, _batch(0))
    assert not objective.logit_path.enabled and "compiled whole" in objective.logit_path.note
    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(_tiny("llama", 6), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not a plain linear layer" in planned_logit_path(TrainingSettings(), {"student": lora_head})


def test_chunked_estimate_does_not_grow_with_vocabulary() -> None:
    from entrenar_cli.estimate import estimate_training

    def cfg(layers: int, vocab: int) -> dict[str, Any]:
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 256,
                "intermediate_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": vocab, "tie_word_embeddings": True}

    def total(batch: int, budget: int | None, vocab: int = 151_936) -> int:
        return estimate_training(cfg(2, vocab), batch_size=batch, seq_len=512, dtype="fp32", device="cpu",
                                 teacher_config=cfg(4, vocab), logits_budget=budget).total_bytes

    row = 4 * 151_936
    full_slope = (total(6, None) - total(2, None)) / (4 * 512)
    chunked_slope = (total(6, 2**28) - total(2, 2**28)) / (4 * 512)
    assert full_slope > 5 * row  # materialised: several fp32 logit rows per token
    assert chunked_slope < 0.25 * row  # the bar
    assert total(2, 2**28) < total(2, None) / 4


def test_compile_is_regional_and_keeps_the_head_out_of_the_graph() -> None:
    from entrenar_cli.models import compile_model

    for arch, blocks in (("llama", lambda m: m.model.layers), ("gpt2", lambda m: m.transformer.h),
                         ("bert", lambda m: m.bert.encoder.layer)):
        model = _tiny(arch, 0)
        assert compile_model(model)
        assert all(b._compiled_call_impl is not None for b in blocks(model)), arch
        assert model._compiled_call_impl is None and model.get_output_embeddings()._compiled_call_impl is None
        assert list(model.state_dict()) == list(_tiny(arch, 0).state_dict())  # checkpoints keep their keys
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not compile_model(flat) and flat._compiled_call_impl is not None  # nothing repeated: whole


def test_fused_losses_switch() -> None:
    from entrenar_cli.chunking import fused_losses
    from entrenar_cli.config.schema import TrainingSettings

    assert not fused_losses(TrainingSettings()) and fused_losses(TrainingSettings(fused_losses=True))
    assert not fused_losses(TrainingSettings(fused_losses=True, chunked_logits=False))  # nothing to fuse


def test_fused_losses_auto_fuses_large_vocabularies_on_a_cpu_with_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from entrenar_cli import chunking
    from entrenar_cli.chunking import FUSE_MIN_VOCAB, fused_losses, has_cxx_compiler
    from entrenar_cli.config.schema import TrainingSettings
    from entrenar_cli.models import output_vocab

    auto = TrainingSettings()
    assert auto.fused_losses is None
    monkeypatch.setattr(chunking, "has_cxx_compiler", lambda: True)
    assert fused_losses(auto, device_type="cpu", vocab=49_152)
    assert fused_losses(auto, device_type="cpu", vocab=FUSE_MIN_VOCAB)
    assert not fused_losses(auto, device_type="cpu", vocab=FUSE_MIN_VOCAB - 1)  # tiny models: not worth a compile
    assert not fused_losses(auto, device_type="cuda", vocab=151_936)  # not measured on GPUs: asked for only
    assert fused_losses(TrainingSettings(fused_losses=True), device_type="cuda", vocab=100)
    assert not fused_losses(TrainingSettings(fused_losses=False), device_type="cpu", vocab=151_936)
    assert not fused_losses(TrainingSettings(chunked_logits=False), device_type="cpu", vocab=151_936)
    monkeypatch.setattr(chunking, "has_cxx_compiler", lambda: False)
    assert not fused_losses(auto, device_type="cpu", vocab=49_152)  # no compiler: no attempt, no warning
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert not has_cxx_compiler()
    monkeypatch.setenv("CXX", shutil.which("sh") or "/bin/sh")
    assert has_cxx_compiler()
    assert output_vocab(_tiny("llama", 0)) == VOCAB_M and output_vocab(torch.nn.Linear(2, 2)) == 0


def test_fused_kernels_compute_the_same_loss_and_gradients() -> None:
    """torch.compile'd chunks (training.fused_losses) against the reference, KD + CE with T=2 (fp32);
    11-row chunks: the 18 valid rows give two shapes, so the dynamic recompile is covered too."""
    c = _setup(3, bias=True)
    _assert_same(_ours(c, temperature=2.0, alpha=0.5, chunk_tokens=11, fused=True), _reference(c, T=2.0, alpha=0.5))


def test_fused_kernels_under_bf16_take_bf16_logits_and_match_the_unfused_path() -> None:
    """The default on CPUs: under bf16 autocast the fused kernel reads the bf16 logits and writes the bf16
    gradient itself; same loss and gradients as the unfused path (which upcasts outside), near fp32's."""
    c = _setup(5, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _ours(c, temperature=2.0, alpha=0.5, chunk_tokens=11, fused=True)
        eager = _ours(c, temperature=2.0, alpha=0.5, chunk_tokens=11)
    ref = _reference(c, T=2.0, alpha=0.5)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-5)
    assert float(fused[0].detach()) != float(ref[0])  # the logits really were bf16
    assert float(fused[0].detach()) == pytest.approx(float(ref[0]), rel=2e-2)
    for got, same, want in zip(fused[2], eager[2], ref[3]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, same, rtol=1e-2, atol=1e-3)  # one bf16 rounding of the gradient apart
        assert float(F.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.99
    # fine-tuning's chunked CE (no teacher) through the same fused kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_fused, _ = chunked_ce(c["h_s"], c["head_s"], c["labels"], vocab=VOCAB, chunk_tokens=11, fused=True)
        ce_eager, _ = chunked_ce(c["h_s"], c["head_s"], c["labels"], vocab=VOCAB, chunk_tokens=11)
    torch.testing.assert_close(ce_fused, ce_eager, rtol=1e-5, atol=1e-5)
    g_fused = torch.autograd.grad(ce_fused, _params(c))
    g_eager = torch.autograd.grad(ce_eager, _params(c))
    for got, same in zip(g_fused, g_eager):
        torch.testing.assert_close(got, same, rtol=1e-2, atol=1e-3)


def test_fused_kernels_that_cannot_be_built_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import entrenar_cli.chunked_losses as cl

    def no_compiler(fn: Any, **kw: Any) -> Any:
        def fail(*a: Any) -> Any:
            raise RuntimeError("InductorError: no C++ compiler found\nlong details")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(cl, "_compiled_chunk", None)
    monkeypatch.setattr(cl, "_fuse_failed", None)
    c = _setup(4)
    _assert_same(_ours(c, temperature=1.0, alpha=0.5, chunk_tokens=5, fused=True), _reference(c, T=1.0, alpha=0.5))
    err = capsys.readouterr().err
    assert err.count("fused logit losses unavailable here (RuntimeError: InductorError: no C++ compiler found)") == 1
    assert cl._fuse_failed is not None and cl._chunk_impl(True) is cl._chunk  # the rest of the run: unfused
