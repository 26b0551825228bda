"""Fast paths for the hot loop, each beside the plain-PyTorch reference that defines it, installed
into a model from outside by `install`, once, at set-up.

- `linear` (cpu_linear.py): fp32 linear layers on the CPU through oneDNN's GEMM where MKL is not the
  faster
  (not on Intel CPUs); reference `linear_ref`. Installed as `OneDNNLinear` modules.
- `dropout` (cpu_dropout.py): dropout on the CPU as a thresholded uniform draw; reference
  `dropout_ref`.
  Installed as `Dropout` modules.
- `attention` (cpu_attention.py): softmax attention, written out with that dropout on the CPU in
  training; reference `attention_ref`. Installed as the attention modules' `sdpa`.
- `disentangled_bias` (disentangled_bias.py): DeBERTa's position terms by a relative shift instead
  of a
  gather; reference `disentangled_bias_ref`, the model's own. Installed as DeBERTa attention's
  `position_bias`.
- `embedding`, `decoder_weight`, `Tie` (cpu_embedding.py): the word-embedding lookup, whose gradient
  on the
  CPU goes into the tied decoder's in place; reference `embedding_ref`.
- `vocab_logits` (cpu_logits.py): a large vocabulary's logits under CPU autocast, a slice of it at a
  time,
  each slice's weight cast while in cache; reference `vocab_logits_ref`.
- `linear_cross_entropy` (linear_cross_entropy.py): the MLM head's decoder and loss, chunked, in
  Triton;
  reference `linear_cross_entropy_ref`. These three are the decoder's (decoder.py).

Each function takes the reference's arguments and falls back to it wherever its fast path does not
apply to the call (device, dtype, autocast, compiling); what depends on the machine and the user's
choice (the CPU's GEMM, whether Triton runs) is resolved in `install`. Importing the package
registers the fused loss as the custom op torch.ops.mlm.linear_cross_entropy."""

from __future__ import annotations

import os

import torch

from . import (
    cpu_attention,
    cpu_dropout,
    cpu_embedding,
    cpu_linear,
    decoder,
)
from . import (
    disentangled_bias as _bias,
)
from .cpu_attention import attention, attention_ref
from .cpu_dropout import dropout, dropout_ref
from .cpu_embedding import Tie, decoder_weight, embedding, embedding_ref
from .cpu_linear import GEMMS, choose_gemm, linear, linear_ref
from .cpu_logits import vocab_logits, vocab_logits_ref
from .disentangled_bias import disentangled_bias, disentangled_bias_ref, position_rows
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = [
    "GEMMS",
    "Tie",
    "attention",
    "attention_ref",
    "choose_gemm",
    "decoder_weight",
    "disentangled_bias",
    "disentangled_bias_ref",
    "dropout",
    "dropout_ref",
    "embedding",
    "embedding_ref",
    "install",
    "linear",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "linear_ref",
    "position_rows",
    "triton_available",
    "vocab_logits",
    "vocab_logits_ref",
]


def triton_available() -> bool:
    """Whether triton imports: its kernels then run on CUDA, or on the CPU under
    TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def install(
    model, device: torch.device | str | None = None, *, cpu_gemm: str = "auto"
) -> dict[str, int]:
    """Put the fast paths that fit this device into `model` (an mlm MaskedLM), in place; returns
    what went in (kernel -> modules). The parameters, their names and the math stay: only how each
    op is computed changes.

    device: where the model runs (default: where its parameters are). cpu_gemm: "auto", "onednn" or
    "mkl", the fp32 CPU GEMM of the linear layers (see cpu_linear.py). Call it once the model is on
    its device, before torch.compile and DDP wrap it; the optimizer may hold its parameters already.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    installed = {"disentangled_bias": _bias.install(model)}  # on any device
    linear_fn, tied = torch.nn.functional.linear, None
    # The fused loss runs in Triton on CUDA; on the CPU only in Triton's interpreter, which a test
    # asks for by setting TRITON_INTERPRET=1 before triton is first imported.
    use_triton = triton_available() and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    if device.type == "cpu":
        if choose_gemm(cpu_gemm) == "onednn":
            installed["cpu_linear"], linear_fn = cpu_linear.install(model), cpu_linear.linear
        installed["cpu_dropout"] = cpu_dropout.install(model)
        installed["cpu_attention"] = cpu_attention.install(model)
        tied = cpu_embedding.install(model)
        installed["cpu_embedding"] = 1
        installed["vocab_logits"] = 1
    decoder.install(model, use_triton=use_triton, linear=linear_fn, tied=tied)
    installed["linear_cross_entropy" if use_triton else "linear_cross_entropy_ref"] = 1
    return {name: count for name, count in installed.items() if count}
