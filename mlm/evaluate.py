"""Scoring a masked language model on blocks that are already masked: loss, perplexity and accuracy.

train.py's validation and `infer.py --eval` share this loop, so the two print the same numbers for
the same blocks. It returns sums, not means: ranks that each score a share add theirs up
(all_reduce) and divide once, so the result is the mean over every masked token whatever the number
of ranks.

Shapes: B blocks, T tokens per block, N labelled tokens in a batch, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from mlm.data import Batch
from mlm.errors import ConfigError, InputError
from mlm.masking import IGNORE_INDEX
from mlm.model import MaskedLM

# (model, batch) -> (logits (N, V), targets (N,)) at the labelled positions.
LogitsFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def labelled_logits(model: MaskedLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Our model's logits at the labelled positions only: the head never sees the ~85% that are not
    scored."""
    hidden = model.encode(batch.input_ids, batch.attention_mask, doc_ids=batch.doc_ids)  # (B, T, C)
    rows, targets = model.labelled_rows(hidden, batch.labels)  # (N, C), (N,)
    return model.logits(rows), targets  # (N, V), (N,)


def full_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Any model whose call returns (B, T, V) logits, or an object with `.logits` (a transformers
    `*ForMaskedLM`), kept at the labelled positions. It has no notion of documents: doc_ids must be
    None."""
    if batch.doc_ids is not None:
        raise InputError(
            "full_logits cannot keep attention inside documents; score without doc_ids"
        )
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = getattr(out, "logits", out)  # (B, T, V)
    picked = batch.labels != IGNORE_INDEX  # (B, T)
    return logits[picked], batch.labels[picked]  # (N, V), (N,)


@torch.no_grad()
def score_blocks(
    model: nn.Module,
    blocks: Batch,
    *,
    rows: range | None = None,
    batch_size: int = 32,
    autocast=None,
    logits_fn: LogitsFn = labelled_logits,
) -> torch.Tensor:
    """Sums over every labelled token of blocks[rows]: float64 [loss_sum, correct, count] on the
    model's device.

    blocks are masked (`mask_eval_blocks`), with doc_ids for attention kept inside documents. rows
    (default: all) is the share to score, in micro-batches of batch_size blocks; autocast is a
    context manager (torch.autocast) or None. The model is scored in eval mode (no dropout) and put
    back in the mode it was in."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    rows = range(blocks.labels.shape[0]) if rows is None else rows
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for start in range(rows.start, rows.stop, batch_size):
        batch = blocks.rows(slice(start, min(start + batch_size, rows.stop))).to(device)
        with autocast or nullcontext():
            logits, targets = logits_fn(model, batch)  # (N, V), (N,)
        logits = logits.float()  # the loss in fp32 whatever the compute dtype
        totals[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == targets).sum()
        totals[2] += targets.numel()
    model.train(was_training)
    return totals


def summarize(totals: torch.Tensor | list[float]) -> dict:
    """loss (mean cross-entropy per masked token), perplexity = exp(loss), accuracy, and the token
    count."""
    loss_sum, correct, count = (float(x) for x in totals)
    loss = loss_sum / max(count, 1)
    # Capped as train.py logs it: exp overflows a float past 709, and e^100 is as useless as
    # infinity.
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 100.0)),
        "accuracy": correct / max(count, 1),
        "tokens": int(count),
    }
