"""mlm.kernels.cpu_attention: the written-out CPU attention against F.scaled_dot_product_attention.

Without dropout the written-out math must be SDPA, forward and every gradient, with its error
against fp64 within 2x of SDPA's own in fp32. With dropout, re-seeding reproduces the keep mask the
kernel drew; given that mask, output and gradients must equal SDPA's math backend in fp64 (torch's
testing hook `_scaled_dot_product_attention_math(..., dropout_mask=keep)`). Over many draws the mean
output must approach SDPA's without dropout: each output element is a sum of T independent terms P_j
V_j keep_j / (1 - p), of variance sum_j (P_j V_j)^2 p / (1 - p), and the mean of S draws may be off
by 5 of its standard deviations."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mlm.kernels import attention, attention_ref, cpu_attention
from mlm.model import MaskedLM, ModelConfig

# (B, H, T, D, mask): odd and prime sizes; a boolean mask (True = may attend) or a float bias.
CASES = [
    (1, 1, 1, 1, None),
    (2, 3, 17, 7, "padding"),  # bool (B, 1, 1, T): padded keys hidden
    # bool (B, 1, T, T): each token sees its own document, as the model builds it
    (3, 5, 13, 9, "documents"),
    (2, 3, 11, 16, "bias"),  # float (B, H, T, T), -inf on padded keys
    (2, 7, 5, 3, "bias-per-head"),  # float (1, H, T, T): the same position terms for every sequence
    (3, 1, 19, 12, "bias-per-sequence"),  # float (B, 1, T, T)
]
IDS = [case[-1] or "no-mask" for case in CASES]


def make(B, H, T, D, kind, seed=0):
    """q, k, v (B, H, T, D) and the mask; every query has at least one key it may attend to."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    real = torch.arange(T) < lengths[:, None]  # (B, T), key 0 always real
    hide = float("-inf")
    if kind is None:
        mask = None
    elif kind == "padding":
        mask = real[:, None, None, :]
    elif kind == "documents":
        docs = torch.randint(0, 3, (B, T), generator=g).sort(dim=1).values
        mask = (docs[:, None, :, None] == docs[:, None, None, :]) & real[:, None, None, :]
        mask = mask | torch.eye(T, dtype=torch.bool)
    elif kind == "bias":
        mask = torch.randn(B, H, T, T, generator=g).masked_fill(~real[:, None, None, :], hide)
    elif kind == "bias-per-head":
        mask = torch.randn(1, H, T, T, generator=g)
    else:
        mask = torch.randn(B, 1, T, T, generator=g).masked_fill(~real[:, None, None, :], hide)
    return q, k, v, mask


def leaves(q, k, v, mask, dtype=torch.float32):
    """Copies that require grad (the float bias too: DeBERTa's position terms are learned)."""
    out = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if mask is not None and mask.is_floating_point():
        return out + [mask.detach().to(dtype).requires_grad_()]
    return out + [mask]


def forward_backward(fn, tensors, **kwargs):
    """Output and the gradients of every leaf that requires grad, for a fixed random output
    gradient."""
    y = fn(*tensors, **kwargs)
    # same values in fp64
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    wrt = [t for t in tensors if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, wrt, grad_out)]


def sdpa_math(q, k, v, mask, dropout_p=0.0, keep=None):
    """SDPA's math backend, which takes a given keep mask; a boolean mask goes in as a -inf bias."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask, dropout_p, False, keep)[
        0
    ]


@pytest.mark.parametrize("B, H, T, D, kind", CASES, ids=IDS)
def test_written_out_math_is_sdpa(monkeypatch, B, H, T, D, kind):
    # the written-out path, dropout as identity
    monkeypatch.setattr(cpu_attention, "dropout", lambda x, p: x)
    inputs = make(B, H, T, D, kind)
    ours = forward_backward(attention, leaves(*inputs), dropout_p=0.5)
    sdpa32 = forward_backward(attention_ref, leaves(*inputs))
    sdpa64 = forward_backward(attention_ref, leaves(*inputs, dtype=torch.float64))
    names = ["out", "grad_q", "grad_k", "grad_v", "grad_bias"]
    for name, a, b32, b64 in zip(names, ours, sdpa32, sdpa64):
        assert a.shape == b32.shape and a.dtype == torch.float32, name
        assert_close(a, b32, rtol=1e-5, atol=1e-5, msg=name)
        ours_err = (a.double() - b64).abs().max().item()
        sdpa_err = (b32.double() - b64).abs().max().item()
        assert ours_err <= 2 * sdpa_err + 1e-7, f"{name}: {ours_err} vs SDPA's {sdpa_err}"


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("B, H, T, D, kind", CASES, ids=IDS)
def test_dropout_is_sdpa_math_with_the_same_keep_mask(B, H, T, D, kind, p):
    inputs = make(B, H, T, D, kind, seed=1)
    torch.manual_seed(4)
    ours = forward_backward(attention, leaves(*inputs), dropout_p=p)
    torch.manual_seed(4)
    # the uniform draw cpu_dropout makes on the (B, H, T, T) probabilities
    keep = torch.rand(B, H, T, T) >= p
    ref = forward_backward(sdpa_math, leaves(*inputs, dtype=torch.float64), dropout_p=p, keep=keep)
    for name, a, b in zip(["out", "grad_q", "grad_k", "grad_v", "grad_bias"], ours, ref):
        assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["padding", "bias-per-head"])
def test_dropout_preserves_the_mean(kind):
    S, H, T, D, p = 4000, 3, 11, 5, 0.3
    q, k, v, mask = make(1, H, T, D, kind, seed=2)
    torch.manual_seed(0)
    draws = attention(
        q.expand(S, -1, -1, -1), k.expand(S, -1, -1, -1), v.expand(S, -1, -1, -1), mask, p
    )
    expected = attention_ref(q, k, v, mask).double()[0]  # (H, T, D)
    scores = (q.double() @ k.double().transpose(-2, -1)) * D**-0.5
    scores = (
        scores.masked_fill(~mask, float("-inf"))
        if mask.dtype == torch.bool
        else scores + mask.double()
    )
    # (H, T, T, D): P_ij V_jd
    terms = scores.softmax(-1)[0, :, :, :, None] * v.double()[0, :, None, :, :]
    sd_of_mean = ((terms**2).sum(dim=2) * p / (1 - p) / S).sqrt()  # (H, T, D)
    assert (draws.double().mean(dim=0) - expected).abs().le(5 * sd_of_mean + 1e-6).all()


# SDPA's, on the CPU
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_falls_back_to_sdpa_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(
        cpu_attention, "dropout", lambda *a: pytest.fail("took the written-out path")
    )
    q, k, v, mask = make(2, 3, 17, 7, "padding")
    # no dropout: SDPA itself
    assert torch.equal(attention(q, k, v, mask), attention_ref(q, k, v, mask))
    meta = torch.empty(2, 3, 5, 4, device="meta")  # another device: SDPA with its own dropout
    assert attention(meta, meta, meta, None, 0.5).shape == (2, 3, 5, 4)
    offsets = torch.tensor([0, 4, 11])  # nested (jagged) tensors: the model's varlen path

    def heads(t):  # (11, 8) -> (2, 2, j, 4)
        return (
            torch.nested.nested_tensor_from_jagged(t, offsets).unflatten(-1, (2, 4)).transpose(1, 2)
        )

    x = torch.randn(11, 8)
    assert attention(heads(x), heads(x), heads(x), None, 0.5).is_nested


def test_the_installed_model_drops_attention_probabilities_here(monkeypatch):
    """In training, the installed model's attention is this kernel with the config's dropout; in
    eval, SDPA's."""
    calls = []
    monkeypatch.setattr(cpu_attention, "dropout", lambda x, p: calls.append(p) or x)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 50, (3, 16), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 11:] = 0
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 3 + [1] * 8 + [-1] * 5, [0] * 16])
    torch.manual_seed(0)
    model = MaskedLM(
        ModelConfig(
            vocab_size=50,
            hidden_size=24,
            num_layers=2,
            num_heads=4,
            intermediate_size=40,
            max_position_embeddings=32,
            hidden_dropout=0.0,
            attention_dropout=0.5,
        )
    )
    assert cpu_attention.install(model) == 2
    with torch.no_grad():
        expected = model.eval().encode(ids, attention_mask, doc_ids=doc_ids)  # SDPA, no dropout
        # written out, dropout as identity
        got = model.train().encode(ids, attention_mask, doc_ids=doc_ids)
    assert calls == [0.5, 0.5]  # one call per layer
    real = attention_mask.bool()
    assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_is_sdpa():
    q, k, v, mask = (t.cuda() for t in make(2, 3, 17, 7, "padding"))
    torch.manual_seed(3)
    ours = attention(q, k, v, mask, 0.3)
    torch.manual_seed(3)
    assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3))
