"""Scaled dot-product attention whose dropout, on the CPU in training, is the cheap one of
cpu_dropout.py.

SDPA has no fused CPU kernel with dropout: given dropout_p > 0 it runs its unfused math and torch's
Bernoulli dropout. `attention` writes that same math out with `cpu_dropout.dropout` instead:

    y = dropout(softmax(q @ k.T * scale + bias)) @ v,   scale = 1 / sqrt(D) unless given

where a boolean mask makes bias 0 where True (may attend) and -inf where False. Everywhere else (no
dropout, another device, nested tensors) it is `attention_ref`, plain
`F.scaled_dot_product_attention`, and the same numbers. It takes SDPA's arguments, so `install` puts
it in the place of a model's attention modules' `sdpa`.

Shapes: B batch, H heads, T tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.model.bert import Attention

from .cpu_dropout import dropout


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with its mask, dropout and scale arguments."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q, k, v (B, H, T, D) -> (B, H, T, D), dropout on the probabilities.

    attn_mask, broadcastable to (B, H, T, T) (e.g. (B, 1, 1, T) for padding): boolean, True where a
    query may attend to a key, or a float bias in q's dtype added to the scores (position terms,
    -inf to hide). Give every query a key it may attend to: for a query with none, SDPA returns
    zeros and the written-out path NaN. As with SDPA, dropout_p applies whenever it is given: pass 0
    in evaluation; scale multiplies the scores, 1 / sqrt(D) when None."""
    if dropout_p == 0.0 or q.device.type != "cpu" or q.is_nested:
        return attention_ref(q, k, v, attn_mask, dropout_p, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, T); scaled first: no fp16 overflow
    # The mask goes in in place: the matmul's backward needs q and k, not this, and a (B, H, T, T)
    # fewer is allocated (at T = 512 each is 25 MB of fresh pages for the kernel to fault in).
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores.masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores += attn_mask
    return dropout(scores.softmax(dim=-1), dropout_p) @ v  # (B, H, T, D)


def install(model: nn.Module) -> int:
    """The model's attention modules compute by `attention`; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            # an instance attribute, in front of the class's F.scaled_dot_product_attention
            module.sdpa = attention
            count += 1
    return count
