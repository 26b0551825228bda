"""Fast kernels for the hot path, each beside the plain-PyTorch reference that defines it.

- `linear` (cpu_linear.py): fp32 linear layers on the CPU through oneDNN's GEMM where MKL is not the faster
  (not on Intel CPUs); reference `linear_ref`.
- `vocab_logits` (cpu_logits.py): a large vocabulary's logits under CPU autocast, a slice of it at a time,
  each slice's weight cast while in cache; reference `vocab_logits_ref`.
- `dropout` (cpu_dropout.py): dropout on the CPU as a thresholded uniform draw; reference `dropout_ref`.
- `embedding`, `decoder_weight`, `Tie` (cpu_embedding.py): the word-embedding lookup, whose gradient on the
  CPU goes into the tied decoder's in place; reference `embedding_ref`.
- `attention` (cpu_attention.py): softmax attention, written out with that dropout on the CPU in
  training; reference `attention_ref`.
- `disentangled_bias` (disentangled_bias.py): DeBERTa's position terms by a relative shift instead of a
  gather; reference `disentangled_bias_ref`.
- `linear_cross_entropy` (linear_cross_entropy.py): the MLM head's decoder and loss, chunked, in Triton;
  reference `linear_cross_entropy_ref`.

Each function takes the reference's arguments and falls back to it wherever its fast path does not apply.
Importing the package registers the fused loss as the custom op torch.ops.mlm.linear_cross_entropy.
"""

from .cpu_attention import attention, attention_ref
from .cpu_dropout import dropout, dropout_ref
from .cpu_embedding import Tie, decoder_weight, embedding, embedding_ref
from .cpu_linear import linear, linear_ref
from .cpu_logits import vocab_logits, vocab_logits_ref
from .disentangled_bias import disentangled_bias, disentangled_bias_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = [
    "Tie", "attention", "attention_ref", "decoder_weight", "disentangled_bias", "disentangled_bias_ref", "dropout",
    "dropout_ref", "embedding", "embedding_ref", "linear", "linear_ref", "linear_cross_entropy",
    "linear_cross_entropy_ref", "triton_available", "vocab_logits", "vocab_logits_ref",
]


def triton_available() -> bool:
    """Whether triton imports: its kernels then run on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
