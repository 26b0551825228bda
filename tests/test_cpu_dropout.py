"""mlm.kernels.cpu_dropout: the thresholded-uniform dropout against F.dropout.

The two draw different masks from the same seed, so they are compared as distributions. Over n
independent elements the kept fraction has standard deviation sqrt(p (1 - p) / n), and the mean of x
* keep / (1 - p) - x has standard deviation sqrt(mean(x^2) p / ((1 - p) n)); the tests allow 5 of
those (a correct kernel fails with probability below 1e-6, and the seeds are fixed anyway).
Re-seeding reproduces the mask the kernel drew, which pins down forward and gradient exactly."""

import pytest
import torch
import torch.nn.functional as F

from mlm.kernels import dropout, dropout_ref

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
@pytest.mark.parametrize("fn", [dropout, dropout_ref], ids=["ours", "reference"])
def test_keep_rate_scaling_and_mean(fn, p):
    torch.manual_seed(0)
    x = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5  # in [0.5, 1.5), none zero
    y = fn(x, p, training=True)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / N) ** 0.5
    # the survivors scaled by 1/(1-p), nothing else
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    mean_sd = ((x.double() ** 2).mean().item() * p / ((1 - p) * N)) ** 0.5
    assert abs((y.double() - x.double()).mean().item()) < 5 * mean_sd  # the mean is preserved


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed-view"])
def test_reseeding_gives_the_mask_it_drew_forward_and_gradient(transposed):
    p = 0.3
    x = torch.randn(37, 23, generator=torch.Generator().manual_seed(2))
    x = (x.t() if transposed else x).requires_grad_()
    torch.manual_seed(5)
    y = dropout(x, p)
    torch.manual_seed(5)
    keep = torch.rand(x.shape).ge(p)  # the uniform draw the kernel makes, from the global generator
    assert torch.equal(y, x.detach() * (keep / (1 - p)))
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(grad_out)
    assert torch.equal(x.grad, grad_out * (keep / (1 - p)))


def test_same_seed_same_mask():
    x = torch.randn(1000)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(dropout(x, 0.5))
    assert torch.equal(*runs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_its_dtype(dtype):
    torch.manual_seed(0)
    y = dropout(torch.ones(N, dtype=dtype), 0.5)
    assert y.dtype == dtype
    assert abs((y != 0).double().mean().item() - 0.5) < 5 * (0.25 / N) ** 0.5
    assert torch.equal(y.unique(), torch.tensor([0.0, 2.0], dtype=dtype))


def test_identity_and_fallbacks(monkeypatch):
    x = torch.randn(64)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # F.dropout's answer, not 0/0
    monkeypatch.setattr(torch, "rand", lambda *a, **k: pytest.fail("took the CPU path off the CPU"))
    meta = torch.empty(8, 5, device="meta")  # any non-CPU tensor goes to F.dropout
    assert dropout(meta, 0.3).shape == (8, 5)


@pytest.mark.cuda
def test_cuda_is_torch_dropout():
    x = torch.randn(4096, device="cuda")
    torch.manual_seed(3)
    ours = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.2, training=True))
