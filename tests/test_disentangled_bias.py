"""mlm.kernels.disentangled_bias: DeBERTa's position terms by a relative shift, against the gather
reference.

Forward and every gradient (q, k, pos_q, pos_k) on awkward shapes: one token, primes, one head, odd
head dims, indices with log buckets and clamping (several distances on one row), one term or both, q
and k as head views of a fused projection. In fp32 the kernel's error against an fp64 reference must
stay within 2x of the reference's own (plus a few ulps); in bf16 within 2x of what the reference
makes in bf16."""

import pytest
import torch

from mlm.kernels import disentangled_bias, disentangled_bias_ref
from mlm.model import ModelConfig
from mlm.model.deberta import RelativePositions

# (B, H, T, D, buckets, max_relative_positions, terms)
CASES = [
    (1, 1, 1, 1, 8, -1, "c2p|p2c"),  # one token
    (2, 3, 2, 5, 8, -1, "c2p|p2c"),
    (3, 5, 13, 7, 8, -1, "c2p|p2c"),  # past +-4: log buckets share rows
    (2, 1, 17, 9, 0, 6, "c2p|p2c"),  # no buckets, clamped at +-6
    (1, 2, 29, 4, 6, 12, "c2p|p2c"),  # past max_relative_positions
    (2, 3, 11, 8, 256, 512, "c2p"),
    (2, 3, 11, 8, 256, 512, "p2c"),
    (3, 4, 31, 16, 16, 40, "c2p|p2c"),
]


def make(B, H, T, D, buckets, max_rel, terms, dtype=torch.float32, seed=0):
    """q, k as head views of a fused (B, T, 3C) projection; pos_q, pos_k (H, R, D) from one (R, 2C)
    product."""
    cfg = ModelConfig(
        family="deberta-v2",
        hidden_size=H * D,
        num_heads=H,
        max_position_embeddings=64,
        position_buckets=buckets,
        max_relative_positions=max_rel,
    )
    table, index = RelativePositions(cfg)(T)
    g = torch.Generator().manual_seed(seed)
    C, R = H * D, table.shape[0]
    qkv = torch.randn(B, T, 3 * C, generator=g).to(dtype).requires_grad_()
    pos = torch.randn(R, 2 * C, generator=g).to(dtype).requires_grad_()
    return qkv, pos, index, terms.split("|")


def run(fn, H, qkv, pos, index, terms, grad_seed=1):
    """fn's bias and the gradients of the fused leaves (qkv, pos) for one random output gradient."""
    qkv, pos = (t.detach().clone().requires_grad_() for t in (qkv, pos))
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    D = C // H
    q = qkv[..., :C].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D), strided
    k = qkv[..., C : 2 * C].view(B, T, H, D).transpose(1, 2)
    pos_q = pos[:, :C].view(-1, H, D).transpose(0, 1) if "p2c" in terms else None  # (H, R, D)
    pos_k = pos[:, C:].view(-1, H, D).transpose(0, 1) if "c2p" in terms else None
    out = fn(q, k, pos_q, pos_k, index, (3 * D) ** -0.5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), qkv.grad, pos.grad


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_reference_in_fp32(case):
    B, H, T, D, *_ = case
    qkv, pos, index, terms = make(*case)
    ours = run(disentangled_bias, H, qkv, pos, index, terms)
    ref = run(disentangled_bias_ref, H, qkv, pos, index, terms)
    ref64 = run(disentangled_bias_ref, H, qkv.double(), pos.double(), index, terms)
    assert ours[0].shape == (B, H, T, T)
    for name, a, b, b64 in zip(("bias", "grad qkv", "grad pos"), ours, ref, ref64):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        ours_err = (a.double() - b64).abs().max().item()
        ref_err = (b.double() - b64).abs().max().item()
        assert ours_err <= 2 * ref_err + 1e-6, f"{name}: {ours_err} vs the reference's {ref_err}"


@pytest.mark.parametrize("case", CASES[2:5], ids=[str(c) for c in CASES[2:5]])
def test_bf16_error_within_twice_the_references(case):
    H = case[1]
    qkv, pos, index, terms = make(*case)
    ours = run(disentangled_bias, H, qkv.bfloat16(), pos.bfloat16(), index, terms)
    ref = run(disentangled_bias_ref, H, qkv.bfloat16(), pos.bfloat16(), index, terms)
    exact = run(disentangled_bias_ref, H, qkv.double(), pos.double(), index, terms)
    for name, a, b, e in zip(("bias", "grad qkv", "grad pos"), ours, ref, exact):
        assert a.dtype == torch.bfloat16, name
        ours_err = (a.double() - e).abs().max().item()
        ref_err = (b.double() - e).abs().max().item()
        assert ours_err <= 2 * ref_err + 1e-2, f"{name}: {ours_err} vs the reference's {ref_err}"


def test_a_non_square_index_takes_the_reference():
    """The shift needs one row of the index per query; anything else is the reference's business."""
    qkv, pos, index, terms = make(1, 2, 5, 3, 8, -1, "c2p|p2c")
    ours = run(disentangled_bias, 2, qkv, pos, index.expand(1, 2, 5, 5), terms)
    ref = run(disentangled_bias_ref, 2, qkv, pos, index, terms)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
