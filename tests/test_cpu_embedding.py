"""mlm.kernels.cpu_embedding: the lookup's gradient joins the tied decoder's in place, and equals
the plain one.

A weight used twice, by the lookup and by a decoder matmul, with repeated ids and the padding row:
.grad must equal what F.embedding and the bare weight give, to fp32 rounding, and be written once
(no (V, C) buffer of the lookup's own). In either order of the two backward passes, and twice over a
retained graph. Where no tie is linked, or it cannot pay, the plain path runs."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mlm.kernels import Tie, cpu_embedding, decoder, decoder_weight, embedding, embedding_ref
from mlm.model import MaskedLM, ModelConfig

V, C, PAD = 101, 13, 0


def leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, C, generator=g)
    # few distinct ids: many repeats, the padding row among them
    ids = torch.randint(0, 7, (3, 11), generator=g)
    hidden = torch.randn(5, C, generator=g)
    return weight, ids, hidden


def loss(rows, logits):
    """A scalar from both uses of the weight: the looked-up rows and the decoder's logits."""
    return (rows.sin() * torch.arange(C)).sum() + F.cross_entropy(
        logits, torch.arange(len(logits)) % V
    )


def plain_grad(weight, ids, hidden):
    w = weight.clone().requires_grad_()
    loss(embedding_ref(ids, w, PAD), hidden @ w.t()).backward()
    return w.grad


def test_tied_gradient_equals_the_plain_one():
    weight, ids, hidden = leaves()
    w = weight.clone().requires_grad_()
    tie = Tie()
    rows = embedding(ids, w, PAD, tie)
    decoder = decoder_weight(w, tie)
    buffers = []
    # the decoder's gradient, as it arrives
    decoder.register_hook(lambda g: buffers.append(g.data_ptr()))
    logits = hidden @ decoder.t()
    assert type(rows.grad_fn).__name__ == "_LookupBackward"  # the path under test
    loss(rows, logits).backward()
    torch.testing.assert_close(w.grad, plain_grad(weight, ids, hidden), rtol=1e-6, atol=1e-6)
    assert w.grad.data_ptr() == buffers[0]  # the rows went into that buffer, which became .grad
    assert w.grad[PAD].abs().max() > 0  # the decoder's share still reaches the padding row
    assert tie.decoder_grad is None and not tie.lookup_done  # nothing left behind


def test_the_other_order_of_backward_is_summed_the_plain_way():
    """Backward from the lookup's rows alone first (the decoder's gradient not there yet), then the
    decoder's."""
    weight, ids, hidden = leaves(1)
    w = weight.clone().requires_grad_()
    tie = Tie()
    rows = embedding(ids, w, PAD, tie)
    logits = hidden @ decoder_weight(w, tie).t()
    (rows.sin() * torch.arange(C)).sum().backward()
    F.cross_entropy(logits, torch.arange(len(logits)) % V).backward()
    torch.testing.assert_close(w.grad, plain_grad(weight, ids, hidden), rtol=1e-6, atol=1e-6)
    assert tie.decoder_grad is None and not tie.lookup_done


def test_a_retained_graph_gives_the_same_gradient_twice():
    weight, ids, hidden = leaves(2)
    w = weight.clone().requires_grad_()
    tie = Tie()
    total = loss(embedding(ids, w, PAD, tie), hidden @ decoder_weight(w, tie).t())
    first = torch.autograd.grad(total, w, retain_graph=True)[0]
    second = torch.autograd.grad(total, w)[0]
    torch.testing.assert_close(first, plain_grad(weight, ids, hidden), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_where_no_tie_is_linked_or_it_cannot_pay_the_plain_path_runs():
    weight, ids, _ = leaves()
    w = weight.clone().requires_grad_()
    assert embedding(ids, w, PAD).grad_fn.name() == "EmbeddingBackward0"  # no tie
    assert decoder_weight(w, Tie()) is w  # a tie no lookup linked
    with torch.no_grad():
        tie = Tie()
        embedding(ids, w, PAD, tie)
        assert not tie.linked  # no gradient at all
    tie = Tie()
    embedding(ids, weight, PAD, tie)
    assert not tie.linked and decoder_weight(w, tie) is w  # a frozen weight
    compiled = torch.compile(
        lambda i, w: embedding(i, w, PAD, Tie()), fullgraph=True, backend="eager"
    )
    assert compiled(ids, w).shape == (3, 11, C)


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_a_training_step_through_the_model_matches_the_plain_lookup(monkeypatch, family):
    """A MaskedLM with the tie installed: every gradient equals the plain model's, and fused AdamW
    steps."""
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=24,
        num_layers=2,
        num_heads=4,
        intermediate_size=40,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        family=family,
        type_vocab_size=0 if family == "deberta-v2" else 2,
    )
    torch.manual_seed(0)
    plain = MaskedLM(cfg)
    tied = copy.deepcopy(plain)
    decoder.install(tied, use_triton=False, linear=F.linear, tied=cpu_embedding.install(tied))
    ids = torch.randint(1, V, (3, 9))
    ids[2, 6:] = cfg.pad_token_id
    labels = torch.where(torch.rand(3, 9) < 0.4, ids, -100)
    labels[:, 0] = ids[:, 0]

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(ids, (ids != cfg.pad_token_id).long(), labels=labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    linked = []
    monkeypatch.setattr(
        decoder,
        "decoder_weight",
        lambda w, tie: linked.append(tie.linked) or decoder_weight(w, tie),
    )
    ref, ours = grads(plain), grads(tied)
    assert linked == [True]  # the path under test
    assert ref.keys() == ours.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.optim.AdamW(tied.parameters(), lr=1e-3, fused=True).step()
