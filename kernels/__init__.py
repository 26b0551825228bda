"""Fast kernels for the hot path, each beside the plain-PyTorch reference that defines it.

- `linear` (cpu_linear.py): fp32 linear layers on the CPU through oneDNN's GEMM; reference `linear_ref`.
- `linear_cross_entropy` (linear_cross_entropy.py): the MLM head's decoder and loss, chunked, in Triton;
  reference `linear_cross_entropy_ref`.

Importing the package registers the fused loss as the custom op torch.ops.mlm.linear_cross_entropy.
"""

from .cpu_linear import linear, linear_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = ["linear", "linear_ref", "linear_cross_entropy", "linear_cross_entropy_ref", "triton_available"]


def triton_available() -> bool:
    """Whether triton imports: its kernels then run on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
