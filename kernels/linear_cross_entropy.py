"""Fused vocabulary projection + cross-entropy for the MLM head, without the (N, V) logits.

The MLM loss is `cross_entropy(h @ W.T + b, targets)` over the N masked rows. With V around 30k-50k
the logits are the largest tensor in training: 4k masked rows of RoBERTa's 50265 words is 800 MB in
fp32, and autograd would keep them (and their softmax) alive until backward. Here the rows go through
in chunks of C, and only one (C, V) buffer exists at a time.

The math, per row with logits z (V,), target t and p = softmax(z):

    loss = logsumexp(z) - z[t]
    dloss/dz = p - onehot(t)                  (zero for rows whose target is ignore_index)

and the mean over the n non-ignored rows scales all of it by 1/n. From dz (C, V) the chain rule gives

    grad_h = dz @ W      grad_W += dz.T @ h      grad_b += dz.sum(0)

Gradients are computed in the forward, chunk by chunk, because that is the only time the chunk's
logits exist: keeping them for backward is exactly the memory we set out to save, and recomputing
them in backward would repeat the largest matmul. Backward only multiplies the stored gradients by
grad_output.

Per chunk: cuBLAS computes the logits in the input dtype; one Triton program per row walks the row in
BLOCK_V tiles keeping a running max and a running sum of exponentials (the online softmax), which gives
logsumexp and the loss in fp32; a second walk overwrites the logits in place with p - onehot. Then the
three matmuls above read that buffer.

One departure from the textbook dz: the 1/n and grad_output are left out of the kernel and applied in
fp32 in backward. In fp16, p/n is often below the smallest subnormal (a 3e-5 probability over 4k rows),
and a GradScaler's factor, which exists to lift such values, only arrives as grad_output. So the kernel
writes p - onehot (well scaled in any dtype), grad_W and grad_b accumulate in fp32, and backward casts
to the input dtype after scaling.

Shapes: N rows (masked positions), D hidden size, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works; linear_cross_entropy falls back to it
    triton = None

# Most bytes one chunk of logits may take; sets C = rows per chunk. 256 MiB is ~4k rows of a
# 30k vocabulary in bf16: large enough that the matmuls run at full speed, small next to activations.
MAX_CHUNK_BYTES = 256 * 2**20


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain PyTorch: logits in the input dtype, cross-entropy in fp32, mean over non-ignored rows.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) -> scalar fp32 loss. With no rows
    to count (N = 0 or all ignored) the loss is 0.0 rather than F.cross_entropy's 0/0 = NaN.
    """
    logits = F.linear(hidden, weight, bias)  # (N, V)
    total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def _softmax_minus_onehot_kernel(
    logits_ptr,  # (C, V) in the input dtype; overwritten with dloss/dlogits (unscaled)
    targets_ptr,  # (C,)
    loss_ptr,  # (C,) fp32 out: logsumexp - target logit, 0 for ignored rows
    V,
    stride_row,
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
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(row_ptr + target, mask=keep, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, lse - z_target, 0.0))

    # Pass 2: overwrite the row with p - onehot(target); an ignored row contributes no gradient.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        grad = tl.where(keep, grad, 0.0)
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


@functools.cache
def _jitted_kernel():
    # Jitted on first use rather than with a decorator, so that this module imports, and the
    # reference runs, where triton is not installed.
    return triton.jit(_softmax_minus_onehot_kernel)


def _softmax_minus_onehot_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Launch one program per row: overwrite logits (C, V) with p - onehot, return the loss (C,)."""
    C, V = logits.shape
    # The interpreter runs each tile through numpy: small tiles keep tests quick and still cover
    # several tiles and a ragged last one. On a GPU, 4096 columns is 8 tiles for BERT's vocabulary.
    block_v = min(triton.next_power_of_2(V), 128 if triton.knobs.runtime.interpret else 4096)
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    _jitted_kernel()[(C,)](
        logits, targets, loss, V, logits.stride(0), ignore_index, BLOCK_V=block_v, num_warps=8
    )
    return loss


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Loss, the 1/n scale, and the unscaled gradients for (hidden, weight, bias) where needs_grad says."""
    N, D = hidden.shape
    V = weight.shape[0]
    targets = targets.contiguous()
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    losses = torch.empty(N, **fp32)  # (N,)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None  # (N, D), well scaled in any dtype
    grad_weight = torch.zeros(V, D, **fp32) if needs_grad[1] else None  # (V, D), sums over all chunks
    grad_bias = torch.zeros(V, **fp32) if needs_grad[2] else None  # (V,)

    for start in range(0, N, chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]  # (C, D)
        logits = F.linear(h, weight, bias)  # (C, V), the only one alive
        losses[rows] = _softmax_minus_onehot_(logits, targets[rows], ignore_index)
        dz = logits  # (C, V), now p - onehot
        if grad_hidden is not None:
            grad_hidden[rows] = dz @ weight  # (C, D)
        if grad_weight is not None:
            grad_weight += dz.t() @ h  # (V, D), accumulated in fp32 across chunks
        if grad_bias is not None:
            grad_bias += dz.sum(0, dtype=torch.float32)

    scale = 1.0 / (targets != ignore_index).sum().clamp(min=1)  # a tensor: no host sync
    return losses.sum() * scale, scale, [grad_hidden, grad_weight, grad_bias]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size):
        loss, scale, grads = _chunked_forward(
            hidden, weight, bias, targets, ignore_index, chunk_size, ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(scale, *grads)
        # Under autocast the logits may be bf16 while hidden and weight are fp32: autograd wants
        # each gradient in its own input's dtype.
        ctx.dtypes = [t.dtype if t is not None else None for t in (hidden, weight, bias)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scale, *grads = ctx.saved_tensors
        factor = grad_loss * scale  # fp32, 0-d; carries a GradScaler's factor, if any
        grads = [None if g is None else (g.float() * factor).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return *grads, None, None, None


@torch.compiler.disable
def _fused(hidden, weight, bias, targets, ignore_index, chunk_size):
    # Dynamo stops at triton's knobs (read through a C extension) and would unroll the chunk loop
    # for each N; so under torch.compile this runs eagerly behind a graph break, which costs little
    # next to its matmuls.
    if torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk_size)
    return _chunked_forward(hidden, weight, bias, targets, ignore_index, chunk_size, (False, False, False))[0]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    use_triton: bool | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against targets, fp32 scalar.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) with ignore_index for rows to skip.
    use_triton=None takes the chunked Triton path for CUDA tensors, or anywhere under
    TRITON_INTERPRET=1, and the reference otherwise; True insists on Triton, False on the reference.
    The interpreter needs TRITON_INTERPRET=1 before triton is first imported: triton.language's own
    helpers (tl.max, tl.sum) are jitted at import, and cannot run in the interpreter after that.
    chunk_size is rows per chunk (default: as many as fit MAX_CHUNK_BYTES of logits).
    """
    if (
        hidden.dim() != 2
        or weight.dim() != 2
        or hidden.shape[1] != weight.shape[1]
        or targets.shape != hidden.shape[:1]
        or (bias is not None and bias.shape != weight.shape[:1])
    ):
        shapes = [None if t is None else tuple(t.shape) for t in (hidden, weight, bias, targets)]
        raise ValueError(f"expected hidden (N, D), weight (V, D), bias (V,) or None, targets (N,); got {shapes}")
    if use_triton is None:
        # os.environ rather than triton.knobs: dynamo traces the former, so a compiled model on the
        # CPU keeps its loss in the graph.
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        use_triton = triton is not None and (hidden.is_cuda or interpret)
    if not use_triton:
        return linear_cross_entropy_ref(hidden, weight, bias, targets, ignore_index)
    if triton is None:
        raise RuntimeError("use_triton=True needs triton: pip install triton, or pass use_triton=None")
    if chunk_size is None:
        chunk_size = max(1, MAX_CHUNK_BYTES // (weight.shape[0] * hidden.element_size()))
    return _fused(hidden, weight, bias, targets, ignore_index, chunk_size)
