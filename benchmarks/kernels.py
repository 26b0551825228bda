"""Each kernel in mlm/kernels/ against the plain-PyTorch reference beside it, forward + backward, at
bert-base's shapes: on the CPU the oneDNN linear against F.linear (oneDNN taken on any CPU here,
Intel's too, where the model leaves it off); on CUDA the fused decoder + cross-entropy against its
reference, time and peak memory."""

from __future__ import annotations

import torch

from benchmarks.common import VOCAB_SIZE, Row, alternate, batch_for, synchronizer
from mlm.kernels import cpu_linear, linear_cross_entropy, linear_cross_entropy_ref, triton_available


def fwd_bwd(fn, inputs, grad=None) -> None:
    out = fn(*inputs)
    out.backward(grad)
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None


def bench_kernels(args, device: torch.device) -> list[Row]:
    """Each kernel against its reference, forward + backward, on bert-base's shapes and one
    micro-batch."""
    tokens = batch_for(args, 128) * 128
    rows = []
    if device.type == "cpu":
        rows += bench_cpu_linear(args, tokens)
    if device.type == "cuda" and triton_available():
        rows += bench_linear_cross_entropy(args, device, tokens)
    return rows


def bench_cpu_linear(args, tokens: int) -> list[Row]:
    """cpu_linear.linear (oneDNN) against F.linear, forward + backward, on bert-base's three weight
    shapes."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for K, N, where in ((768, 2304, "QKV"), (768, 3072, "MLP in"), (3072, 768, "MLP out")):
        inputs = [
            torch.randn(tokens, K, generator=g).requires_grad_(),
            (torch.randn(N, K, generator=g) * K**-0.5).requires_grad_(),
            torch.zeros(N, requires_grad=True),
        ]
        grad = torch.randn(tokens, N, generator=g)
        runs = {
            "ours": lambda i, inputs=inputs, grad=grad: fwd_bwd(cpu_linear.linear, inputs, grad),
            "hf": lambda i, inputs=inputs, grad=grad: fwd_bwd(cpu_linear.linear_ref, inputs, grad),
        }
        times = alternate(runs, args.calls, 2, lambda: None)  # the kernel itself, on Intel CPUs too
        rows += times.stamp(
            [
                Row(
                    section="kernels",
                    size="base",
                    seq=128,
                    dtype="fp32",
                    metric="time",
                    unit="ms",
                    variant=f"linear {where}, {tokens}x{K} @ {K}x{N}",
                    ours=1e3 * times.median("ours"),
                    hf=1e3 * times.median("hf"),
                    higher_is_better=False,
                    device="cpu",
                    batch=tokens // 128,
                )
            ]
        )
    return rows


def bench_linear_cross_entropy(args, device: torch.device, tokens: int) -> list[Row]:
    """The fused Triton decoder + loss against linear_cross_entropy_ref on the masked rows of one
    micro-batch."""
    n, V, D = int(0.15 * tokens), VOCAB_SIZE, 768
    inputs = [
        torch.randn(n, D, device=device, dtype=torch.bfloat16).requires_grad_(),
        (torch.randn(V, D, device=device) * D**-0.5).bfloat16().requires_grad_(),
        torch.zeros(V, device=device, dtype=torch.bfloat16, requires_grad=True),
        torch.randint(0, V, (n,), device=device),
    ]
    peaks = {}

    def run(fn, name):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fwd_bwd(fn, inputs)
        peaks[name] = torch.cuda.max_memory_allocated(device) - before

    times = alternate(
        {
            "ours": lambda i: run(lambda *a: linear_cross_entropy(*a, use_triton=True), "ours"),
            "hf": lambda i: run(linear_cross_entropy_ref, "hf"),
        },
        args.calls,
        3,
        synchronizer(device),
    )
    key = dict(
        section="kernels",
        size="base",
        seq=128,
        dtype="bf16",
        device="cuda",
        batch=tokens // 128,
        variant=f"linear + cross-entropy, {n}x{D} @ {D}x{V}",
    )
    return times.stamp(
        [
            Row(
                metric="time",
                unit="ms",
                ours=1e3 * times.median("ours"),
                hf=1e3 * times.median("hf"),
                higher_is_better=False,
                **key,
            ),
            Row(
                metric="peak memory",
                unit="MiB",
                ours=peaks["ours"] / 2**20,
                hf=peaks["hf"] / 2**20,
                higher_is_better=False,
                **key,
            ),
        ]
    )
