"""The vocabulary logits under CPU autocast, a slice of the vocabulary at a time.

Under autocast `F.linear(x, weight, bias)` first casts the whole fp32 (V, C) weight to bf16, then
multiplies. For the MLM decoder the weight is the word embedding table, and with a large vocabulary
that cast is a pass of its own over a table larger than the caches (deberta-v3: 128,100 x 768, 393
MB read and 197 MB written to freshly mapped memory), which the matmul then reads again. Here the
decoder runs over slices of CHUNK words: each slice's weight is cast and multiplied while it is
still in cache, and its logits go straight into their columns of the one (M, V) output. Same math
(the same bf16 operands, fp32 accumulation); only the matmul's blocking follows the slices, so a
logit can differ from the reference's in its last bf16 bit.

`vocab_logits` is its `linear` argument (`vocab_logits_ref`, `F.linear`, unless the decoder passes
the GEMM `install` chose) wherever this does not apply: without CPU autocast (an fp32 weight needs
no cast), while autograd records (training scores the labelled rows through linear_cross_entropy),
inside torch.compile, and for vocabularies under MIN_WORDS. Below that the table's cast is cheap
enough that autocast's own way can be the faster: within one autocast context autocast keeps the
cast of a weight that requires grad, and later calls skip it (BENCHMARKS.md, "DeBERTa-v3").

Shapes: x (..., C), weight (V, C), bias (V,) -> (..., V).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

vocab_logits_ref = F.linear  # what the fast path must equal, to bf16 rounding

CHUNK = 8192  # words per slice: 8192 x 768 fp32 is 25 MB, cast to 12.6 MB
MIN_WORDS = 65536  # deberta-v3 (128,100 words) and larger; not BERT's 30,522 or RoBERTa's 50,265


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `vocab_logits` takes the sliced path for these tensors (see the module docstring)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and weight.dtype == torch.float32
        and weight.shape[0] >= MIN_WORDS
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.numel() > 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
    )


def vocab_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    linear: Callable = vocab_logits_ref,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` under CPU autocast: x (..., C), weight (V, C), bias (V,) -> (...,
    V). Where the sliced path does not apply, `linear` computes it: F.linear, or the GEMM that
    `install` chose for the linear layers (oneDNN's fp32 one on AMD CPUs: the decoder is the
    largest of the model's products)."""
    if not applies(x, weight, bias):
        return linear(x, weight, bias)
    dtype = torch.get_autocast_dtype("cpu")
    rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, C)
    V = weight.shape[0]
    out = torch.empty(rows.shape[0], V, dtype=dtype)  # (M, V)
    with torch.autocast("cpu", enabled=False):  # the casts are done here, a slice at a time
        for start in range(0, V, CHUNK):
            words = slice(start, start + CHUNK)
            w = weight[words].to(dtype)  # (CHUNK, C), cast while in cache
            if bias is None:
                torch.mm(rows, w.t(), out=out[:, words])
            else:
                torch.addmm(bias[words].to(dtype), rows, w.t(), out=out[:, words])
    return out.view(*x.shape[:-1], V)
