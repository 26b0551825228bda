"""Scaled dot-product attention whose dropout, on the CPU in training, is the cheap one of cpu_dropout.py.

SDPA has no fused CPU kernel with dropout: given dropout_p > 0 it runs its unfused math and torch's
Bernoulli dropout. `attention` writes that same math out with `cpu_dropout.dropout` instead:

    y = dropout(softmax(q @ k.T / sqrt(D) + bias)) @ v

where a boolean mask makes bias 0 where True (may attend) and -inf where False. Everywhere else (no
dropout, another device, nested tensors) it is `attention_ref`, plain `F.scaled_dot_product_attention`,
and the same numbers.

Shapes: B batch, H heads, T tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_dropout import dropout


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with its mask and dropout arguments."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Softmax attention of q, k, v (B, H, T, D) -> (B, H, T, D), dropout on the probabilities.

    mask, broadcastable to (B, H, T, T) (e.g. (B, 1, 1, T) for padding): boolean, True where a query may
    attend to a key, or a float bias in q's dtype added to the scores (position terms, -inf to hide).
    Give every query a key it may attend to: for a query with none, SDPA returns zeros and the written-out
    path NaN. As with SDPA, dropout_p applies whenever it is given: pass 0 in evaluation.
    """
    if dropout_p == 0.0 or q.device.type != "cpu" or q.is_nested:
        return attention_ref(q, k, v, mask, dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T); scaled first: no fp16 overflow
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    return dropout(scores.softmax(dim=-1), dropout_p) @ v  # (B, H, T, D)
