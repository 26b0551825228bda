"""mlm.kernels.cpu_logits: the decoder's logits under CPU autocast, a slice of the vocabulary at a
time.

The sliced path is the CPU path, so it runs for real here. CHUNK and MIN_WORDS are made small so
that a small vocabulary takes it, in many slices, the last one partial. Its logits must be the
reference's to within one bf16 step, no further from an fp64 product of the same bf16 operands than
the reference's are, and it must step aside wherever it does not apply."""

import pytest
import torch
import torch.nn.functional as F

import mlm.kernels
from mlm.kernels import cpu_logits, decoder, vocab_logits
from mlm.model import MaskedLM, ModelConfig


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(cpu_logits, "CHUNK", 64)
    monkeypatch.setattr(cpu_logits, "MIN_WORDS", 100)


def operands(lead=(3, 5), C=48, V=1000, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g)
    w = torch.randn(V, C, generator=g) * C**-0.5
    b = torch.randn(V, generator=g) if bias else None
    return x, w, b


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's numbers at |v| (at least the smallest normal's)."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent) * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lead, V, bias", [((3, 5), 1000, True), ((7,), 129, False), ((2, 1, 4), 640, True)]
)
def test_sliced_logits_are_the_references_to_one_rounding_step(dtype, lead, V, bias):
    x, w, b = operands(lead, V=V, bias=bias)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert cpu_logits.applies(x, w, b)
        ours = vocab_logits(x, w, b)
        ref = F.linear(x, w, b)
    assert ours.dtype == ref.dtype == dtype and ours.shape == (*lead, V) and ours.is_contiguous()
    diff = (ours.double() - ref.double()).abs()
    assert (diff <= ulp(ref.double(), dtype)).all()
    # Against the exact product of the same rounded operands, no worse than the reference.
    exact = F.linear(
        x.to(dtype).double(), w.to(dtype).double(), None if b is None else b.to(dtype).double()
    )
    assert (ours.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + 1e-12


def test_steps_aside_where_it_does_not_apply():
    x, w, b = operands()
    with torch.no_grad():
        assert not cpu_logits.applies(x, w, b)  # no autocast: an fp32 weight needs no cast
        assert torch.equal(vocab_logits(x, w, b), F.linear(x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wg = w.clone().requires_grad_()
        # autograd records: the reference, which has a gradient
        assert not cpu_logits.applies(x, wg, b)
        vocab_logits(x, wg, b).float().sum().backward()
        assert wg.grad is not None and wg.grad.shape == w.shape
        with torch.no_grad():
            small = w[:99]  # a vocabulary under MIN_WORDS: autocast's own cast
            assert not cpu_logits.applies(x, small, b[:99])
            assert torch.equal(vocab_logits(x, small, b[:99]), F.linear(x, small, b[:99]))
            assert not cpu_logits.applies(x, w.bfloat16(), b)  # a weight already in bf16


def test_the_installed_models_inference_logits_go_through_it(monkeypatch):
    cfg = ModelConfig(
        family="deberta-v2",
        vocab_size=1000,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        position_buckets=16,
        max_relative_positions=32,
        type_vocab_size=0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = MaskedLM(cfg).eval()
    mlm.kernels.install(model, "cpu")
    ids = torch.randint(5, 1000, (2, 12))
    calls = []
    sliced = cpu_logits.vocab_logits

    def spy(*args, **kwargs):
        calls.append(cpu_logits.applies(*args))
        return sliced(*args, **kwargs)

    def reference(x, weight, bias, linear):  # autocast's own F.linear
        return cpu_logits.vocab_logits_ref(x, weight, bias)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(decoder, "vocab_logits", spy)
        ours = model(ids)
        monkeypatch.setattr(decoder, "vocab_logits", reference)
        ref = model(ids)
    assert calls == [True]
    assert ours.shape == ref.shape == (2, 12, 1000) and ours.dtype == torch.bfloat16
    assert ((ours.double() - ref.double()).abs() <= ulp(ref.double(), torch.bfloat16)).all()
