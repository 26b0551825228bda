"""The tied word embeddings' gradient on the CPU: the lookup's rows added into the decoder's, in
place.

The MLM decoder is tied to the word embeddings, so in training the (V, C) weight gets two gradients,
which autograd sums before writing .grad: the decoder's, dense, from its matmul, and the lookup's,
nonzero on the B * T rows looked up only. `F.embedding` returns its share dense too: on the CPU a
zeroed (V, C) buffer (393 MB for deberta-v3's 128,100 x 768, page-faulted afresh every step), an
index_add of the rows into it, then an add of the whole buffer into the decoder's share. Here the
decoder's gradient is handed to the lookup, which adds its rows into it in place and returns it as
the weight's one gradient: the same sum, in another order of additions (fp32 rounding), without that
buffer (393 MB less at the peak) or two passes over (V, C).

    tie = Tie()                                   # one per forward
    x = embedding(ids, weight, padding_idx, tie)  # the lookup
    ... decoder_weight(weight, tie) ...           # the decoder's use of the same weight

In a model, `install` makes the word embeddings a `TiedLookup`, which keeps the Tie of its last
forward for the decoder (mlm/kernels/decoder.py) to pass to `decoder_weight`.

Backward reaches the decoder first (it is the last use), then, through the encoder, the lookup.
Should it ever run the other way round, each side returns its gradient to the weight the plain way
and autograd sums them, as without the tie. Without a tie, off the CPU (where the dense buffer costs
little), without gradients or inside torch.compile, `embedding` is `embedding_ref` (`F.embedding`)
and `decoder_weight` the weight itself.

Shapes: V vocabulary (rows of the weight), C width, ids of any shape (...) -> (..., C).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def embedding_ref(
    ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None
) -> torch.Tensor:
    """`F.embedding`: rows of weight (V, C) for ids (...) -> (..., C); the padding row gets no
    gradient."""
    return F.embedding(ids, weight, padding_idx)


class Tie:
    """What passes between the decoder's backward and the lookup's: the first one's gradient, or
    that it ran."""

    def __init__(self) -> None:
        # the lookup took the tied path: only then may the decoder hand its gradient over
        self.linked = False
        # the decoder's (V, C) gradient, waiting for the rows
        self.decoder_grad: torch.Tensor | None = None
        self.lookup_done = False  # the lookup's backward ran first and returned its gradient itself


def _applies(weight: torch.Tensor, tie: Tie | None) -> bool:
    return (
        tie is not None
        and weight.device.type == "cpu"
        and weight.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


class _Decoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, tie: Tie) -> torch.Tensor:
        ctx.tie = tie
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tie = ctx.tie
        if tie.lookup_done:  # the other order: the weight takes this gradient as it is
            tie.lookup_done = False
            return grad, None
        tie.decoder_grad = grad  # nothing else holds it: the lookup may add into it
        return None, None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, tie: Tie
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tie, ctx.padding_idx, ctx.weight_shape = tie, padding_idx, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (ids,) = ctx.saved_tensors
        tie = ctx.tie
        ids, rows = ids.reshape(-1), grad_rows.reshape(-1, grad_rows.shape[-1])  # (B*T,), (B*T, C)
        if ctx.padding_idx is not None:  # the padding row gets nothing from the lookup
            rows = rows * (ids != ctx.padding_idx)[:, None]
        if tie.decoder_grad is None:
            tie.lookup_done = True
            grad = rows.new_zeros(ctx.weight_shape)
        else:
            grad, tie.decoder_grad = tie.decoder_grad, None
        return None, grad.index_add_(0, ids, rows.to(grad.dtype)), None, None


def embedding(
    ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, tie: Tie | None = None
) -> torch.Tensor:
    """`embedding_ref`, whose gradient joins the decoder's in place where tie links it to
    `decoder_weight`."""
    if not _applies(weight, tie):
        return embedding_ref(ids, weight, padding_idx)
    tie.linked = True
    return _Lookup.apply(ids, weight, padding_idx, tie)


def decoder_weight(weight: torch.Tensor, tie: Tie | None = None) -> torch.Tensor:
    """The weight for the decoder's matmul: itself, whose gradient goes to the lookup where tie
    linked one."""
    if not (_applies(weight, tie) and tie.linked):
        return weight
    return _Decoder.apply(weight, tie)


class TiedLookup(nn.Embedding):
    """nn.Embedding, the same weight, looked up by `embedding` with a fresh Tie at every call, kept
    in `tie`."""

    tie: Tie | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.tie = Tie()
        return embedding(ids, self.weight, self.padding_idx, self.tie)


def install(model: nn.Module) -> TiedLookup:
    """The model's word embeddings looked up as a TiedLookup, in place; returns it."""
    lookup = model.word_embeddings
    lookup.__class__ = TiedLookup
    return lookup
