"""The fused linear + cross-entropy kernel against its plain-PyTorch reference: error, time, peak
memory.

    python scripts/kernel_check.py --device cuda --json kernel.json   # N=8192, V=128100 and 30522
    python scripts/kernel_check.py --device cpu --rows 16 --hidden 8 --vocab 97,130 --reps 1

For each vocabulary size, dtype and mode, three cases: N rows all scored ("rows"), N rows all
ignored ("all-ignored") and no rows at all ("empty"). Each is run three ways on the same values: the
reference in fp32 (the exact answer), the reference in the dtype (what plain PyTorch makes of it)
and the fused kernel in the dtype. For the loss and each gradient the error is the largest
|difference from fp32| over the largest |fp32 value|; the kernel passes where its error is at most
--factor times the reference's, plus 1e-3 of the largest value (the bound
tests/test_linear_cross_entropy.py uses), and where the two empty cases give a loss of 0 and zero
gradients. Modes: "inputs" casts hidden, weight and bias to the dtype; "autocast" keeps them fp32
under torch.autocast, as train.py does.

Time is the median of --reps forward+backward runs after --warmup; peak memory (CUDA only) is the
most allocated above what the inputs already take. Prints a table, writes every number to --json,
and exits 1 if any case fails. On the CPU the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1 is set here, before triton is imported), which is slow: keep the sizes tiny
there. The interpreter casts to bf16 by truncation where a GPU rounds, which alone doubles the
kernel's bf16 error, so --factor defaults to 3 there."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# the repository, when run as scripts/kernel_check.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = 1e-3  # of the largest value: what the error bound allows besides the factor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--device", default="cuda", help="cuda, or cpu (Triton's interpreter, tiny sizes only)"
    )
    p.add_argument("--rows", type=int, default=8192, help="N, the masked rows scored")
    p.add_argument("--hidden", type=int, default=768, help="D")
    p.add_argument("--vocab", default="128100,30522", help="comma-separated vocabulary sizes V")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--modes", default="inputs,autocast", help="comma-separated: inputs, autocast")
    p.add_argument(
        "--factor",
        type=float,
        default=None,
        help="error bound, times the reference's (default: 2 on a GPU, 3 in the interpreter)",
    )
    p.add_argument("--reps", type=int, default=10, help="timed forward+backward runs per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.vocab = [int(v) for v in args.vocab.split(",")]
    args.dtypes, args.modes = args.dtypes.split(","), args.modes.split(",")
    for name in args.dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    for name in args.modes:
        if name not in ("inputs", "autocast"):
            p.error(f"unknown mode {name!r}; use inputs or autocast")
    if args.factor is None:
        args.factor = 2.0 if args.device.startswith("cuda") else 3.0
    return args


def make_inputs(N: int, V: int, D: int, ignored: bool, device: torch.device, seed: int):
    """fp32 hidden (N, D), weight (V, D), bias (V,) with logits of order 1, and targets (N,)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * D**-0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.full((N,), -100) if ignored else torch.randint(0, V, (N,), generator=g)
    return [t.to(device) for t in (hidden, weight, bias)], targets.to(device)


def leaves_for(leaves: list[torch.Tensor], dtype: torch.dtype, mode: str) -> list[torch.Tensor]:
    """hidden, weight and bias as the computation in `dtype` takes them: cast to it, or fp32 under
    autocast."""
    return [
        t.detach().to(dtype if mode == "inputs" else torch.float32).requires_grad_() for t in leaves
    ]


def loss_and_grads(fn, leaves, targets, dtype, mode):
    """fn's loss and the gradients of hidden, weight and bias; under autocast to `dtype` in mode
    "autocast"."""
    autocast = mode == "autocast" and dtype != torch.float32
    with torch.autocast(leaves[0].device.type, dtype=dtype, enabled=autocast):
        loss = fn(*leaves, targets)
    grads = (
        torch.autograd.grad(loss, leaves)
        if loss.requires_grad
        else [torch.zeros_like(t) for t in leaves]
    )
    return loss.detach(), [g.detach() for g in grads]


def fused(hidden, weight, bias, targets):
    from mlm.kernels import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, bias, targets, use_triton=True)


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |x - exact| over the largest |exact| (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0.0
    return (
        (x.double() - exact.double()).abs().max() / exact.double().abs().max().clamp(min=1e-30)
    ).item()


def timed(fn, args: argparse.Namespace, device: torch.device) -> tuple[float, float | None]:
    """(median ms of one call, peak MiB allocated above the start, None off CUDA)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(max(args.reps, 1)):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None
    return statistics.median(times), peak


def check_case(args, V: int, dtype_name: str, mode: str, case: str, device: torch.device) -> dict:
    from mlm.kernels import linear_cross_entropy_ref as reference

    N = 0 if case == "empty" else args.rows
    values, targets = make_inputs(N, V, args.hidden, case == "all-ignored", device, args.seed)
    dtype = DTYPES[dtype_name]
    leaves = leaves_for(values, dtype, mode)
    # The exact answer for the very values the two sides see: those cast to the dtype in mode
    # "inputs".
    exact = loss_and_grads(
        reference, leaves_for(leaves, torch.float32, "inputs"), targets, torch.float32, "inputs"
    )
    theirs = loss_and_grads(reference, leaves, targets, dtype, mode)
    ours = loss_and_grads(fused, leaves, targets, dtype, mode)

    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    errors = {}
    ok = all(torch.isfinite(t).all().item() for t in [ours[0], *ours[1]])
    for name, e, o, t in zip(
        names, [exact[0], *exact[1]], [ours[0], *ours[1]], [theirs[0], *theirs[1]]
    ):
        errors[name] = {"ours": relative_error(o, e), "reference": relative_error(t, e)}
        if case == "rows":
            ok &= errors[name]["ours"] <= args.factor * errors[name]["reference"] + FLOOR
        else:  # nothing to count: exactly 0 and no gradient, not 0/0
            ok &= not o.any().item()
    exact_loss = exact[0].item()
    del exact, theirs, ours  # before timing, so that peak memory counts one side at a time

    ms_ours, peak_ours = timed(
        lambda: loss_and_grads(fused, leaves, targets, dtype, mode), args, device
    )
    ms_ref, peak_ref = timed(
        lambda: loss_and_grads(reference, leaves, targets, dtype, mode), args, device
    )
    return {
        "V": V,
        "dtype": dtype_name,
        "mode": mode,
        "case": case,
        "N": N,
        "D": args.hidden,
        "ok": bool(ok),
        "loss_fp32": exact_loss,
        "errors": errors,
        "grad_error_ours": max(errors[n]["ours"] for n in names[1:]),
        "grad_error_reference": max(errors[n]["reference"] for n in names[1:]),
        "ms_ours": ms_ours,
        "ms_reference": ms_ref,
        "peak_mib_ours": peak_ours,
        "peak_mib_reference": peak_ref,
    }


def print_table(rows: list[dict]) -> None:
    """One line per case; each measure as ours and the reference's ("ref") side by side."""

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    columns = {
        "V": lambda r: str(r["V"]),
        "dtype": lambda r: r["dtype"],
        "mode": lambda r: r["mode"],
        "case": lambda r: r["case"],
        "N": lambda r: str(r["N"]),
        "fp32 loss": lambda r: f"{r['loss_fp32']:.4f}",
        "loss err": lambda r: fmt(r["errors"]["loss"]["ours"], ".1e"),
        "ref": lambda r: fmt(r["errors"]["loss"]["reference"], ".1e"),
        "grad err": lambda r: fmt(r["grad_error_ours"], ".1e"),
        "ref ": lambda r: fmt(r["grad_error_reference"], ".1e"),
        "ms": lambda r: fmt(r["ms_ours"], ".2f"),
        "ref  ": lambda r: fmt(r["ms_reference"], ".2f"),
        "peak MiB": lambda r: fmt(r["peak_mib_ours"], ".0f"),
        "ref   ": lambda r: fmt(r["peak_mib_reference"], ".0f"),
        "ok": lambda r: "yes" if r["ok"] else "NO",
    }
    cells = [[cell(r) for cell in columns.values()] for r in rows]
    widths = [
        max([len(title.strip())] + [len(line[i]) for line in cells])
        for i, title in enumerate(columns)
    ]
    for line in [[t.strip() for t in columns], *cells]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        # before kernels imports triton: see the module docstring
        os.environ["TRITON_INTERPRET"] = "1"
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 answer must be fp32
    import triton  # noqa: F401  (fails here, plainly, where triton is missing)

    rows = []
    for V in args.vocab:
        for dtype_name in args.dtypes:
            for mode in args.modes:
                for case in ("rows", "all-ignored", "empty"):
                    rows.append(check_case(args, V, dtype_name, mode, case, device))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print_table(rows)
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": sys.modules["triton"].__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "factor": args.factor,
        "floor": FLOOR,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    failed = [r for r in rows if not r["ok"]]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} cases within bounds"
        + "".join(f"\nFAILED: V={r['V']} {r['dtype']} {r['mode']} {r['case']}" for r in failed)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
