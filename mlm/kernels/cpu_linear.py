"""fp32 linear layers on the CPU through oneDNN's GEMM instead of the BLAS behind `F.linear`.

Why: PyTorch sends an fp32 `F.linear` on the CPU to Intel MKL's sgemm, and only bf16/fp16 to oneDNN,
which it also ships. MKL picks its code path by CPU vendor; where it does not take its fastest one
(AMD CPUs), oneDNN's fp32 GEMM is about twice as fast on every product of the model (BENCHMARKS.md,
"fp32 matmuls"). On Intel CPUs MKL is the faster of the two (oneDNN's backward products, whose
operands are transposed views, by up to 2x), so there `linear` is `F.linear` unless asked otherwise.

The same math: fp32 inputs, fp32 accumulation; only the blocking (the order of the additions)
differs, so results agree with `F.linear` to fp32 rounding (about 1e-6 relative).

The op is `torch.ops.mkldnn._linear_pointwise(a, b) = a @ b.T`, what TorchInductor emits for CPU
linear layers. It has no autograd formula, so `_OneDNNLinear` supplies one from the same op, on
transposed views:

    y = x @ W.T + b      grad_x = g @ W      grad_W = g.T @ x      grad_b = g.sum(0)

Installed from outside (`install`, called by `mlm.kernels.install`): every nn.Linear of a model
becomes a `OneDNNLinear`, the same parameters under the same names. Whether to install is decided
once, by `choose_gemm`: "auto" takes oneDNN where MKL is not the faster (not on Intel CPUs),
"onednn" and "mkl" (F.linear) insist. Per call, `linear` falls back to `linear_ref` (`F.linear`)
wherever it does not apply: other devices or dtypes, CPU autocast (which already sends bf16 matmuls
to oneDNN), inside torch.compile (which picks its own kernels), and torch builds without oneDNN.

Shapes: M rows, K input features, N output features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.errors import ConfigError

linear_ref = F.linear  # what the fast path must equal, up to fp32 rounding


def _find_op():
    """The oneDNN op, or None where this torch build lacks it or it does not answer as expected (it
    is a private op, so a torch other than the tested 2.13 is probed once rather than trusted)."""
    op = (
        getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if torch.backends.mkldnn.is_available()
        else None
    )
    if op is None:
        return None
    try:
        x, w = torch.ones(2, 3), torch.ones(5, 3)
        return op if torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)) else None
    except (RuntimeError, TypeError):
        return None


_op = _find_op()


def _mkl_is_fast() -> bool:
    """Whether F.linear's MKL takes its fast path on this CPU: MKL chooses its kernels by vendor,
    Intel's."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:  # not Linux: keep oneDNN, as on any CPU we know nothing of
        return False


_MKL_FAST = _mkl_is_fast()


def _gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K).T + bias -> (M, N), by oneDNN; a and b may be transposed views."""
    return _op(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _gemm(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])  # (..., N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(g, weight.t()).view(*grad.shape[:-1], weight.shape[1])  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = _gemm(g.t(), rows.t())  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


GEMMS = ("auto", "onednn", "mkl")


def choose_gemm(choice: str = "auto") -> str:
    """ "onednn" or "mkl": the fp32 CPU GEMM linear layers use, from the user's choice and this
    machine."""
    if choice not in GEMMS:
        raise ConfigError(f"cpu_gemm must be one of {', '.join(GEMMS)}, not {choice!r}")
    if choice == "onednn" and _op is None:
        raise ConfigError("this torch build has no oneDNN linear op; use cpu_gemm mkl (or auto)")
    if choice == "auto":
        return "onednn" if _op is not None and not _MKL_FAST else "mkl"
    return choice


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the oneDNN path for these tensors (see the module docstring)."""
    return (
        _op is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., K), weight (N, K), bias (N,) -> (..., N), by oneDNN
    where it applies."""
    if not applies(x, weight):
        return linear_ref(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """nn.Linear, the same parameters and state-dict keys, computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def install(model: nn.Module) -> int:
    """Every nn.Linear of the model computed by `linear`, in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        if type(module) is nn.Linear:
            # no new parameters: the optimizer's and the state dict's stay
            module.__class__ = OneDNNLinear
            count += 1
    return count
