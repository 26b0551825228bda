"""The MLM decoder with this device's fast paths, each from the kernel file that defines it:

    forward   the logits; on the CPU under autocast, a large vocabulary a slice at a time
              (cpu_logits.py)
    loss      the decoder matmul and the cross-entropy together: chunked in Triton without the
              (N, V) logits on CUDA (linear_cross_entropy.py); on the CPU the reference, its logits
              by the GEMM install chose, and the tied embedding's gradient added into the
              decoder's in place (cpu_embedding.py)

The same parameters and the same math as mlm.model.masked_lm.Decoder, which `install` turns into
this."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mlm.masking import IGNORE_INDEX
from mlm.model.masked_lm import Decoder

from .cpu_embedding import TiedLookup, decoder_weight
from .cpu_logits import vocab_logits
from .linear_cross_entropy import linear_cross_entropy


class FastDecoder(Decoder):
    use_triton: bool = False  # the fused loss (CUDA, or Triton's interpreter when asked for)
    linear: Callable = F.linear  # the GEMM of the logits outside the sliced path and the loss
    # a tuple, so the lookup is not registered twice (the state dict has it once)
    tied: tuple[TiedLookup, ...] = ()

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return vocab_logits(h, weight, self.bias, linear=self.linear)

    def loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tied:
            weight = decoder_weight(weight, self.tied[0].tie)
        return linear_cross_entropy(
            h,
            weight,
            self.bias,
            targets,
            IGNORE_INDEX,
            use_triton=self.use_triton,
            linear=self.linear,
        )


def install(model, *, use_triton: bool, linear: Callable, tied: TiedLookup | None) -> None:
    decoder = model.head.decoder
    decoder.__class__ = FastDecoder
    decoder.use_triton = use_triton
    decoder.linear = linear
    decoder.tied = (tied,) if tied is not None else ()
