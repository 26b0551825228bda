"""mlm.kernels.cpu_linear: oneDNN's fp32 GEMM for linear layers, against F.linear, forward and every
gradient.

The fast path is the CPU path, so these tests run it for real (no interpreter needed). Its error
against an fp64 reference must stay within a small factor of F.linear's own fp32 error."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mlm.kernels
from mlm.errors import ConfigError
from mlm.kernels import cpu_linear, linear
from mlm.model import MaskedLM, ModelConfig

onednn = pytest.mark.skipif(
    cpu_linear._op is None, reason="this torch build has no oneDNN (mkldnn)"
)


@onednn
@pytest.mark.parametrize("mkl_fast", [True, False])
def test_auto_takes_onednn_only_where_mkl_is_not_the_faster(monkeypatch, mkl_fast):
    monkeypatch.setattr(cpu_linear, "_MKL_FAST", mkl_fast)
    assert cpu_linear.choose_gemm("auto") == ("mkl" if mkl_fast else "onednn")
    assert cpu_linear.choose_gemm("onednn") == "onednn" and cpu_linear.choose_gemm("mkl") == "mkl"
    model = MaskedLM(
        ModelConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    )
    installed = mlm.kernels.install(model, "cpu")
    assert ("cpu_linear" in installed) is not mkl_fast
    assert isinstance(model.head.dense, cpu_linear.OneDNNLinear) is not mkl_fast


def test_an_unknown_gemm_or_a_missing_op_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="cpu_gemm must be one of auto, onednn, mkl, not 'blas'"):
        cpu_linear.choose_gemm("blas")
    monkeypatch.setattr(cpu_linear, "_op", None)
    with pytest.raises(ConfigError, match="no oneDNN linear op; use cpu_gemm mkl"):
        cpu_linear.choose_gemm("onednn")
    assert cpu_linear.choose_gemm("auto") == "mkl"


def leaves(lead, K, N, bias=True, x_grad=True, w_grad=True, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # x as a transposed view: strides (1, M)
        x = torch.randn(K, *lead, generator=g).t()
    else:
        x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g) if bias else None
    return [
        x.requires_grad_(x_grad),
        w.requires_grad_(w_grad),
        None if b is None else b.requires_grad_(),
    ]


def run(fn, tensors, grad_out_seed=1):
    tensors = [
        None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors
    ]
    y = fn(*tensors)
    # same in fp64
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(y.dtype)
    y.backward(g)
    return [y.detach()] + [None if t is None or not t.requires_grad else t.grad for t in tensors]


@onednn
@pytest.mark.parametrize(
    "lead, K, N, kwargs",
    [
        ((1,), 1, 1, {}),
        ((7,), 37, 53, {}),  # primes
        ((3, 5), 64, 17, {}),  # a (B, T, C) input, flattened inside
        ((2, 3, 4), 13, 29, {"bias": False}),
        ((11,), 23, 31, {"transposed": True}),  # a non-contiguous input
        ((9,), 19, 8, {"w_grad": False}),  # a frozen weight
        ((6,), 10, 12, {"x_grad": False}),  # the first layer: no gradient for the input
        ((150,), 96, 1009, {}),  # the MLM head's shape: few rows, a wide vocabulary
    ],
)
def test_matches_reference(lead, K, N, kwargs):
    tensors = leaves(lead, K, N, **kwargs)
    assert cpu_linear.applies(tensors[0], tensors[1])
    ours = run(linear, tensors)
    ref32 = run(F.linear, tensors)
    ref64 = run(F.linear, [None if t is None else t.double() for t in tensors])
    for name, a, b32, b64 in zip(("out", "grad_x", "grad_w", "grad_b"), ours, ref32, ref64):
        assert (a is None) == (b32 is None), name
        if a is None:
            continue
        assert a.shape == b32.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a, b32, rtol=1e-5, atol=1e-5, msg=name)
        ours_err = (a.double() - b64).abs().max().item()
        torch_err = (b32.double() - b64).abs().max().item()
        assert ours_err <= 4 * torch_err + 1e-6, f"{name}: {ours_err} vs F.linear's {torch_err}"


@onednn
def test_the_model_runs_its_matmuls_through_onednn(monkeypatch):
    calls = []
    real = cpu_linear._gemm

    def counting(a, b, bias=None):
        calls.append(tuple(a.shape))
        return real(a, b, bias)

    monkeypatch.setattr(cpu_linear, "_gemm", counting)
    cfg = ModelConfig(
        vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
    )
    model = MaskedLM(cfg)
    mlm.kernels.install(model, "cpu", cpu_gemm="onednn")
    ids = torch.randint(5, 101, (2, 9))
    labels = torch.where(torch.rand(2, 9) < 0.3, ids, -100)
    labels[0, 0] = ids[0, 0]  # at least one target
    model(ids, labels=labels).backward()
    # Per block 4 linears (qkv, proj, fc1, fc2), then the head's dense and its decoder: 10 forward.
    # Backward: 2 products each, for the input and the weight (every input descends from the
    # embeddings).
    assert len(calls) == 10 + 2 * 10
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_falls_back_to_f_linear_where_it_does_not_apply(monkeypatch):
    def refuse(*args):
        raise AssertionError("the oneDNN path ran where F.linear should have")

    monkeypatch.setattr(cpu_linear, "_gemm", refuse)
    x, w, b = (t.detach() for t in leaves((4,), 8, 6))
    assert torch.equal(
        linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double())
    )
    assert torch.equal(
        linear(x.bfloat16(), w.bfloat16(), None), F.linear(x.bfloat16(), w.bfloat16())
    )
    assert linear(x[:0], w, b).shape == (0, 6)  # no rows
    # autocast sends bf16 matmuls to oneDNN itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b)
        assert out.dtype == torch.bfloat16 and torch.equal(out, F.linear(x, w, b))


def test_inside_torch_compile_the_reference_is_traced(monkeypatch):
    """Inside torch.compile the oneDNN op is not traced: the compiler picks its own (same fullgraph
    as before)."""
    monkeypatch.setattr(
        cpu_linear, "_gemm", lambda *a: (_ for _ in ()).throw(AssertionError("traced _gemm"))
    )
    x, w, b = (t.detach() for t in leaves((4,), 8, 6))
    compiled = torch.compile(linear, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b))


@onednn
def test_model_gradients_match_the_f_linear_path():
    """A whole training step's loss and parameter gradients, oneDNN against the plain model's
    F.linear."""
    cfg = ModelConfig(
        vocab_size=211,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        intermediate_size=96,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    plain = MaskedLM(cfg)
    fast = copy.deepcopy(plain)
    assert cpu_linear.install(fast) == 2 * 4 + 1  # per block qkv, proj, fc1, fc2; the head's dense
    ids = torch.randint(5, 211, (3, 17))
    labels = torch.where(torch.rand(3, 17) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]

    def loss_and_grads(model):
        loss = model(ids, labels=labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_loss, fast_grads = loss_and_grads(fast)
    ref_loss, ref = loss_and_grads(plain)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(fast_grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
