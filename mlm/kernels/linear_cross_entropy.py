"""Fused vocabulary projection + cross-entropy for the MLM head, without the (N, V) logits.

The MLM loss is `cross_entropy(h @ W.T + b, targets)` over the N masked rows. With V around 30k-50k
the logits are the largest tensor in training: 4k masked rows of RoBERTa's 50265 words is 800 MB in
fp32, and autograd would keep them (and their softmax) alive until backward. Here the rows go
through in chunks of C, and only one (C, V) buffer exists at a time.

The math, per row with logits z (V,), target t and p = softmax(z):

    loss = logsumexp(z) - z[t]
    dloss/dz = p - onehot(t)                  (zero for rows whose target is ignore_index)

and the mean over the n non-ignored rows scales all of it by 1/n. From dz (C, V) the chain rule
gives

    grad_h = dz @ W      grad_W += dz.T @ h      grad_b += dz.sum(0)

Gradients are computed in the forward, chunk by chunk, because that is the only time the chunk's
logits exist: keeping them for backward is exactly the memory we set out to save, and recomputing
them in backward would repeat the largest matmul. Backward only multiplies the stored gradients by
grad_output.

Per chunk: cuBLAS computes the logits in the input dtype; one Triton program per row walks the row
in BLOCK_V tiles keeping a running max and a running sum of exponentials (the online softmax), which
gives logsumexp and the loss in fp32; a second walk overwrites the logits in place with p - onehot.
Then the three matmuls above read that buffer.

The logits buffer is V_pad wide, V rounded up to a multiple of 64 (BERT's 30522 -> 30528). Triton
vectorises a load (16 bytes at a time) only where it can prove the row start aligned and the mask
the same over the vector, and it knows that of an integer argument only when it is divisible by 16:
30522 as the row stride and the bound proves neither, so every load and store goes one element at a
time. cuBLAS, too, keeps its fastest kernels for leading dimensions of whole 16 bytes. The padding
comes from the copy of the weight in the logits dtype (under autocast, instead of the cast autocast
makes anyway): V_pad - V rows of zeros and -inf in the bias there, so the padding logits are -inf,
add exp(-inf) = 0 to the softmax and come out of it as zero gradients. Only the kernel and the
matmuls see the padding; the weight and the gradients stay (V, D).

One departure from the textbook dz: the 1/n and grad_output are left out of the kernel and applied
in fp32 in backward. In fp16, p/n is often below the smallest subnormal (a 3e-5 probability over 4k
rows), and a GradScaler's factor, which exists to lift such values, only arrives as grad_output. So
the kernel writes p - onehot (well scaled in any dtype), grad_W and grad_b accumulate in fp32, and
backward casts to the input dtype after scaling.

For torch.compile the fused path is a custom operator, `mlm::linear_cross_entropy`, so the compiler
sees it as one opaque node rather than tracing into it (Dynamo would unroll the chunk loop for every
N): no graph break, and nothing to recompile when the values change. Its fake implementation tells
the compiler the shapes and dtypes of the outputs without running anything; its backward, the
scaling above, is plain PyTorch and compiles with the rest of the backward graph. The op returns
(loss, 1/n, grad_hidden, grad_weight, grad_bias). A custom op cannot return None, so which gradients
to compute is an argument, and one that is not needed (none under torch.no_grad()) comes back as an
empty tensor.

Shapes: N rows (masked positions), D hidden size, V vocabulary, V_pad = V rounded up to a multiple
of 64, C rows per chunk."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works; linear_cross_entropy falls back to it
    triton = None

# Most bytes one chunk of logits may take; sets C = rows per chunk. 256 MiB is ~4k rows of a 30k
# vocabulary in bf16: large enough that the matmuls run at full speed, small next to activations.
MAX_CHUNK_BYTES = 256 * 2**20
# The logits buffer's width is a multiple of this (see the module docstring): rows start 128 bytes
# apart in bf16.
PAD_V_TO = 64


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    linear=F.linear,
) -> torch.Tensor:
    """Plain PyTorch: logits in the input dtype, cross-entropy in fp32, mean over non-ignored rows.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) -> scalar fp32 loss. With no rows
    to count (N = 0 or all ignored) the loss is 0.0 rather than F.cross_entropy's 0/0 = NaN.
    linear computes the logits (the installed decoder passes oneDNN's where it chose that GEMM).
    """
    logits = linear(hidden, weight, bias)  # (N, V)
    total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def _softmax_minus_onehot_kernel(
    logits_ptr,  # (C, V_pad) in the logits dtype; overwritten with dloss/dlogits (unscaled)
    targets_ptr,  # (C,)
    loss_ptr,  # (C,) fp32 out: logsumexp - target logit, 0 for ignored rows
    n_cols,  # V_pad: the padding columns hold -inf, which the softmax gives probability 0
    stride_row,  # V_pad too: a multiple of 16, which Triton sees, so each row starts aligned
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can pass 2**31 in a large chunk
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index

    # Pass 1, the online softmax: a running max m and sum of exp(z - m), rescaled whenever m grows.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(row_ptr + target, mask=keep, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, lse - z_target, 0.0))

    # Pass 2: overwrite the row with p - onehot(target); an ignored row contributes no gradient.
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        grad = tl.where(keep, grad, 0.0)
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


@functools.cache
def _jitted_kernel():
    # Jitted on first use rather than with a decorator, so that this module imports, and the
    # reference runs, where triton is not installed. For the same reason annotations are strings
    # here (`from __future__ import annotations`), and Triton's interpreter before 3.4 takes BLOCK_V
    # for a constexpr only when its annotation is the object itself.
    _softmax_minus_onehot_kernel.__annotations__["BLOCK_V"] = tl.constexpr
    return triton.jit(_softmax_minus_onehot_kernel)


def _on_device_of(t: torch.Tensor):
    """Make t's GPU the current one for a Triton launch, which goes to the current GPU and its
    stream whatever device its arguments are on: without this, `--device cuda:1` would run the
    kernel on GPU 0 with GPU 1's pointers. Nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _softmax_minus_onehot_(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Launch one program per row: overwrite logits (C, V_pad) with p - onehot, return the loss
    (C,)."""
    C, n_cols = logits.shape
    # CPU tensors reach here only in Triton's interpreter, which runs each tile through numpy: small
    # tiles keep tests quick and still cover several tiles and a ragged last one. On a GPU, 4096
    # columns is 8 tiles for BERT's vocabulary.
    block_v = min(triton.next_power_of_2(n_cols), 128 if logits.device.type == "cpu" else 4096)
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    with _on_device_of(logits):
        _jitted_kernel()[(C,)](
            logits,
            targets,
            loss,
            n_cols,
            logits.stride(0),
            ignore_index,
            BLOCK_V=block_v,
            num_warps=8,
        )
    return loss


def _padded(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight (V, D) and bias (V,) in the logits dtype, padded to V_pad rows: zero weights and -inf
    bias there.

    With V already a multiple of PAD_V_TO only the dtype changes (a no-op without autocast);
    otherwise this is one copy of the weight, under autocast in place of the cast. A missing bias
    stays None unless padded."""
    V, D = weight.shape
    V_pad = math.ceil(V / PAD_V_TO) * PAD_V_TO
    if V_pad == V:
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    w = weight.new_empty(V_pad, D, dtype=dtype)  # (V_pad, D)
    w[:V] = weight
    w[V:] = 0
    b = weight.new_full((V_pad,), float("-inf"), dtype=dtype)  # (V_pad,)
    b[:V] = 0 if bias is None else bias
    return w, b


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    logits_dtype: torch.dtype,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, the 1/n scale, and the unscaled gradients of (hidden, weight, bias) where needs_grad
    says.

    A gradient that is not needed comes back as an empty tensor: a custom op cannot return None.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    targets = targets.contiguous()
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    want_hidden, want_weight = needs_grad[0], needs_grad[1]
    want_bias = needs_grad[2] and bias is not None
    losses = torch.empty(N, **fp32)  # (N,)
    # (N, D), well scaled in any dtype
    grad_hidden = torch.empty_like(hidden) if want_hidden else hidden.new_empty(0)
    # (V, D), sums over all chunks
    grad_weight = torch.zeros(V, D, **fp32) if want_weight else weight.new_empty(0)
    grad_bias = torch.zeros(V, **fp32) if want_bias else weight.new_empty(0)  # (V,)

    # Autocast is done by hand: eager calls reach here with autocast on, compiled graphs with it off
    # (AOTAutograd bakes the casts into the ops around this one), and both must give the same
    # numbers.
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = _padded(weight, bias, logits_dtype)  # (V_pad, D), (V_pad,)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows].to(logits_dtype)  # (C, D)
            # (C, V_pad), the only one alive; -inf in the padding columns
            logits = F.linear(h, w, b)
            losses[rows] = _softmax_minus_onehot_(logits, targets[rows], ignore_index)
            dz = logits[:, :V]  # (C, V), now p - onehot; the padding columns became zeros
            if want_hidden:
                # (C, D); the padding adds 0 * 0, and keeps K aligned
                grad_hidden[rows] = logits @ w
            if want_weight:
                grad_weight += dz.t() @ h  # (V, D), accumulated in fp32 across chunks
            if want_bias:
                grad_bias += dz.sum(0, dtype=torch.float32)

    scale = 1.0 / (targets != ignore_index).sum().clamp(min=1)  # a tensor: no host sync
    return losses.sum() * scale, scale, grad_hidden, grad_weight, grad_bias


# One opaque node for the compiler (see the module docstring). The schema it infers from the
# signature: (Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, SymInt ignore_index,
# SymInt chunk_size, ScalarType logits_dtype, bool[] needs_grad) -> (Tensor, Tensor, Tensor, Tensor,
# Tensor)
_op = torch.library.custom_op("mlm::linear_cross_entropy", _chunked_forward, mutates_args=())


@_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, chunk_size, logits_dtype, needs_grad):
    # What the compiler traces in place of the op: outputs of the right shapes, dtypes and devices
    # (N may be symbolic), mirroring the allocations in _chunked_forward.
    V, D = weight.shape
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        hidden.new_empty((), **fp32),  # loss
        hidden.new_empty((), **fp32),  # 1/n
        torch.empty_like(hidden) if needs_grad[0] else hidden.new_empty(0),
        hidden.new_empty(V, D, **fp32) if needs_grad[1] else weight.new_empty(0),
        hidden.new_empty(V, **fp32) if needs_grad[2] and bias is not None else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    needs_grad = inputs[-1]
    _, scale, *grads = output
    ctx.save_for_backward(scale, *grads)
    # Under autocast the logits may be bf16 while hidden and weight are fp32: autograd wants each
    # gradient in its own input's dtype. None marks a gradient the forward did not compute.
    ctx.dtypes = [
        t.dtype if need and t is not None else None for t, need in zip(inputs[:3], needs_grad)
    ]
    # Only the loss has a gradient. Without these, autograd would hand backward a zero tensor for
    # each of the other four outputs, (V, D) fp32 among them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    scale, *grads = ctx.saved_tensors
    factor = grad_loss * scale  # fp32, 0-d; carries a GradScaler's factor, if any
    grads = [
        None if dtype is None else (g.float() * factor).to(dtype)
        for g, dtype in zip(grads, ctx.dtypes)
    ]
    return *grads, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def _fused(hidden, weight, bias, targets, ignore_index, chunk_size):
    # The op computes gradients in its forward, so it must be told which: none under
    # torch.no_grad().
    grad = torch.is_grad_enabled()
    needs_grad = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    device = hidden.device.type
    logits_dtype = (
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    )
    if chunk_size is None:
        chunk_size = max(1, MAX_CHUNK_BYTES // (weight.shape[0] * logits_dtype.itemsize))
    return _op(hidden, weight, bias, targets, ignore_index, chunk_size, logits_dtype, needs_grad)[0]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    use_triton: bool | None = None,
    chunk_size: int | None = None,
    linear: Callable = F.linear,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against targets, fp32 scalar.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) with ignore_index for rows to
    skip. use_triton=None takes the chunked Triton path for CUDA tensors (where triton imports) and
    the reference otherwise; True insists on Triton, False on the reference. On CPU tensors Triton
    runs only in its interpreter, which needs TRITON_INTERPRET=1 before triton is first imported:
    triton.language's own helpers (tl.max, tl.sum) are jitted at import, and cannot run in the
    interpreter after that. chunk_size is rows per chunk (default: as many as fit MAX_CHUNK_BYTES of
    logits); linear computes the reference's logits."""
    if (
        hidden.dim() != 2
        or weight.dim() != 2
        or hidden.shape[1] != weight.shape[1]
        or targets.shape != hidden.shape[:1]
        or (bias is not None and bias.shape != weight.shape[:1])
    ):
        shapes = [None if t is None else tuple(t.shape) for t in (hidden, weight, bias, targets)]
        raise ValueError(
            f"expected hidden (N, D), weight (V, D), bias (V,) or None, targets (N,); got {shapes}"
        )
    if use_triton is None:
        use_triton = triton is not None and hidden.is_cuda
    if not use_triton:
        return linear_cross_entropy_ref(hidden, weight, bias, targets, ignore_index, linear=linear)
    if triton is None:
        raise RuntimeError(
            "use_triton=True needs triton: pip install triton, or pass use_triton=None"
        )
    return _fused(hidden, weight, bias, targets, ignore_index, chunk_size)
