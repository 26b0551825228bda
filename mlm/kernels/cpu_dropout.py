"""Inverted dropout on the CPU as a thresholded uniform draw, instead of one Bernoulli draw per
element.

Each element is kept with probability 1 - p and scaled by 1 / (1 - p), so the mean is unchanged:

    keep = (u >= p) / (1 - p),   u ~ Uniform[0, 1)      y = x * keep      grad_x = grad_y * keep

`u >= p` holds with probability 1 - p, so this is the distribution `F.dropout` draws, by another
route: torch's CPU kernel samples a Bernoulli per element, which costs about twice a uniform draw
and a compare (BENCHMARKS.md). The uniforms come from the global generator, so `torch.manual_seed`
makes a run repeat. The mask is not the one `F.dropout` would draw from the same seed; only its
distribution is the same.

`dropout` falls back to `dropout_ref` (plain `F.dropout`) off the CPU, where torch's fused kernel is
already fast, and at p = 1 (which drops everything). `install` makes a CPU model's nn.Dropout
modules `Dropout`, computed by it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def dropout_ref(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """What the fast path must equal in distribution."""
    return F.dropout(x, p, training=training)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, by a thresholded uniform draw on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return dropout_ref(x, p, training=True)
    keep = torch.rand(x.shape, device=x.device).ge_(p).div_(1.0 - p).to(x.dtype)  # 0 or 1/(1-p)
    return x * keep


class Dropout(nn.Dropout):
    """nn.Dropout, the same `p` and train/eval switch, computed by `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def install(model: nn.Module) -> int:
    """Every nn.Dropout of the model computed by `dropout`, in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        if type(module) is nn.Dropout:
            module.__class__ = Dropout
            count += 1
    return count
