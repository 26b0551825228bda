"""Benchmarks: mlm side by side with Hugging Face `transformers`, in one run, on the same weights
and batches.

    python bench.py                                # random tiny + base BERT, every section
    python bench.py --model ~/models/roberta-base  # a local model folder: train, infer, fillmask
    python bench.py --only train --sizes base --dtypes bf16 --steps 5
    python bench.py --sizes deberta-v3-base --seq 128,512          # random deberta-v3-base
    python bench.py --device cuda --sizes base --dtypes bf16 --compile  # the GPU targets
    python bench.py --sizes tiny,small,base --seq 128,512 --dtypes fp32,bf16 --json all.json

Models. `--sizes` names random models of fixed shapes (benchmarks/vs_hf.py's RANDOM_MODELS: BERT
tiny, small and base, and deberta-v3-base's shape), saved by transformers with a real tokenizer;
`--model DIR` (repeatable, `NAME=DIR` to name its rows) benches a local folder mlm loads, on its own
config, weights and tokenizer. Either way both sides load the same folder, and its rows carry its
name in the size column. A folder named like a size (e.g. deberta-v3-base) is judged by that size's
targets.

Sections (`--only`; default all, or train,infer,fillmask with --model):
  train     forward + backward + AdamW step, tokens/s, peak memory; MFU and HFU with a known peak.
            HF is AutoModelForMaskedLM with SDPA attention, or eager where the architecture has
            no SDPA.
  infer     forward under no_grad, full (B, T, V) logits on both sides, tokens/s.
  fillmask  one sentence through mlm.fill_mask vs transformers.pipeline("fill-mask"), latency.
  collator  mlm.masking.mask_tokens vs DataCollatorForLanguageModeling, blocks/s.
  tokenize  mlm.dataset.prepare + reading every block vs the bare `tokenizers` encode_batch (s).
  kernels   each kernel in mlm/kernels/ vs its plain-PyTorch reference at bert-base's shapes,
            forward + backward: on the CPU the oneDNN linear vs F.linear; on CUDA the fused
            decoder + cross-entropy vs the reference (time and peak memory).

Reading order. This file holds the options, the targets and main(); each comparison lives in
benchmarks/:
  benchmarks/common.py      Row, repetitions, timing (`alternate`), machine load, memory, the table
  benchmarks/vs_hf.py       train, infer, fillmask: the checkpoint both sides load, batches, MFU/HFU
  benchmarks/collator.py    collator
  benchmarks/tokenizing.py  tokenize
  benchmarks/kernels.py     kernels
  mlm/flops.py              FLOPs per token: model FLOPs (MFU) and hardware FLOPs (HFU)

Warm-up repetitions are not timed; timed repetitions alternate ours, HF, ours, HF... and the median
is reported, because shared machines are noisy and a drift then hits both sides alike. With
--compile, torch.compile is reset before each configuration, so each row times graphs built for its
own shapes.

The table's `gain` column is always "how many times better ours is": ours/HF for throughputs
(tokens/s, blocks/s) and HF/ours for times, latencies and memory. The targets below are minimum
gains (or, for MFU, a minimum of our own value); the printout says whether each one is met."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.collator import bench_collator
from benchmarks.common import Row, environment, print_table, quiet_transformers, tokenizer_files
from benchmarks.kernels import bench_kernels
from benchmarks.tokenizing import bench_tokenize
from benchmarks.vs_hf import (
    RANDOM_MODELS,
    SIZES,
    Checkpoint,
    bench_checkpoint,
    max_positions,
    open_checkpoint,
    parity,
    save_random_model,
)
from mlm.errors import ConfigError, run_cli
from mlm.hf import config_from_hf, read_hf_config
from mlm.model import FAMILIES

SECTIONS = ("train", "infer", "fillmask", "collator", "tokenize", "kernels")
MODEL_SECTIONS = ("train", "infer", "fillmask")  # the ones that load a model; --model's default


@dataclass
class Target:
    """What one row of results must reach; None in a key field matches anything."""

    device: str | None
    section: str
    size: str | None
    seq: int | None
    dtype: str | None
    metric: str
    min_gain: float | None  # ours must be this many times better than HF (see `gain`)
    text: str  # how the target reads in the brief
    min_ours: float | None = None  # or our own value must reach this (MFU)
    variant: str | None = None

    def matches(self, row: Row) -> bool:
        keys = ("device", "section", "size", "seq", "dtype", "metric")
        # a variant row (HF sparse_prediction, the row-seeds collator) only where named
        return self.variant == row.variant and all(
            getattr(self, key) in (None, getattr(row, key)) for key in keys
        )

    def met(self, row: Row) -> bool:
        if self.min_ours is not None:
            return row.ours >= self.min_ours
        return row.gain >= self.min_gain


V3 = "deberta-v3-base"  # its shape, random weights: speed does not depend on their values
MB = "modernbert-base"
TARGETS = [
    # bert-base, batch 8 x 128 on the CPU.
    Target("cpu", "train", "base", 128, "fp32", "throughput", 1.25, ">= 1.25x HF tokens/s"),
    Target("cpu", "train", "base", 128, "bf16", "throughput", 1.25, ">= 1.25x HF tokens/s"),
    Target("cpu", "infer", "base", 128, None, "throughput", 1.0, ">= 1.0x HF tokens/s"),
    Target("cpu", "fillmask", "base", None, None, "latency", 2.0, "latency <= 0.5x pipeline's"),
    # Like for like: both collators draw from a generator. The row-seeds row has no HF counterpart
    # (it hashes every position so masks never depend on the batch layout) and is reported without
    # a target.
    Target(
        None,
        "collator",
        None,
        None,
        None,
        "throughput",
        40.0,
        ">= 40x HF blocks/s",
        variant="generator",
    ),
    Target(None, "tokenize", None, None, None, "time", 1 / 1.5, "time <= 1.5x raw encode_batch"),
    # Set for an H100; on other GPUs the rows still say met / not met against the same numbers.
    Target("cuda", "train", "base", 128, "bf16", "throughput", 2.0, ">= 2x HF tokens/s (H100)"),
    Target("cuda", "train", "base", 128, "bf16", "MFU", None, ">= 45% MFU (H100)", min_ours=0.45),
    # DeBERTa-v3-base, batch 8 x 128 (2 x 512) on the CPU.
    Target("cpu", "train", V3, 128, "fp32", "throughput", 2.0, ">= 2x HF tokens/s"),
    Target("cpu", "train", V3, 128, "bf16", "throughput", 2.0, ">= 2x HF tokens/s"),
    Target("cpu", "train", V3, 512, None, "throughput", 2.0, ">= 2x HF tokens/s"),
    Target("cpu", "train", V3, None, None, "peak memory", 1.0, "below HF's"),
    Target("cpu", "infer", V3, 128, None, "throughput", 1.3, ">= 1.3x HF tokens/s"),
    Target("cpu", "fillmask", V3, None, None, "latency", 2.0, "latency <= 0.5x pipeline's"),
    Target("cuda", "train", V3, 128, "bf16", "throughput", 2.0, ">= 2x HF tokens/s"),
    Target("cuda", "train", V3, 512, "bf16", "throughput", 2.0, ">= 2x HF tokens/s"),
    # ModernBERT-base, batch 8 x 128 and 1 x 1,024, against transformers as a user gets it
    # (sparse_prediction off); the sparse_prediction=True row is reported without a target.
    Target("cpu", "train", MB, 128, "fp32", "throughput", 2.0, ">= 2x HF tokens/s"),
    Target("cpu", "train", MB, 1024, "fp32", "throughput", 2.5, ">= 2.5x HF tokens/s"),
    Target("cpu", "train", MB, None, "bf16", "throughput", 1.5, ">= 1.5x HF tokens/s"),
    Target("cpu", "train", MB, None, None, "peak memory", 1.0, "below HF's"),
    Target("cpu", "infer", MB, 128, "fp32", "throughput", 1.3, ">= 1.3x HF tokens/s"),
]


def judge(rows: list[Row]) -> None:
    for row in rows:
        for target in TARGETS:
            if target.matches(row):
                row.target, row.met = target.text, target.met(row)


EPILOG = """A local model folder, at two lengths and both CPU dtypes:
  python bench.py --model ~/models/bert-base-uncased --seq 128,512 --dtypes fp32,bf16
The full matrix (slow on a CPU):
  python bench.py --sizes tiny,small,base --seq 128,512 --dtypes fp32,bf16 --json all.json
The GPU targets (H100, bert-base and deberta-v3-base, bf16):
  python bench.py --device cuda --sizes base,deberta-v3-base --seq 128,512 --dtypes bf16 --compile
Add fp16 (autocast + GradScaler) on CUDA with --dtypes bf16,fp16."""

# Every option: flag -> argparse settings. The defaults of --batch, --steps and --warmup are worked
# out in benchmarks/common.py (batch_for, steps_for, warmup_for).
OPTIONS = {
    "--only": dict(
        help=f"comma-separated sections: {','.join(SECTIONS)} (default: all; with "
        f"--model, {','.join(MODEL_SECTIONS)})"
    ),
    "--model": dict(
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a local Hugging Face model folder that mlm loads (BERT, RoBERTa, "
        "DistilBERT, ...); repeatable; its rows are named NAME or the folder's name",
    ),
    "--sizes": dict(
        help=f"comma-separated random models: {','.join(SIZES)} (default: tiny,base; "
        "none with --model)"
    ),
    "--seq": dict(default="128", help="comma-separated sequence lengths, e.g. 128,512"),
    "--dtypes": dict(
        default="fp32,bf16", help="fp32, bf16 (autocast), fp16 (autocast + GradScaler, CUDA)"
    ),
    "--batch": dict(
        type=int,
        help="sequences per batch (default: 1024/seq tokens' worth on CPU, 8192/seq on CUDA)",
    ),
    "--device": dict(
        default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N"
    ),
    "--steps": dict(
        type=int,
        help="timed repetitions per side (default CPU: 10 for models under 10M "
        "parameters such as tiny, else 5; CUDA: 20)",
    ),
    "--warmup": dict(type=int, help="untimed repetitions per side (default 1 CPU, 3 CUDA)"),
    "--compile": dict(
        action="store_true",
        help="torch.compile both models (more warm-up; reset before each configuration)",
    ),
    "--breakdown": dict(
        action="store_true", help="also time forward, backward and optimizer separately"
    ),
    "--foreach-adamw": dict(
        action="store_true",
        help="torch's foreach AdamW for both instead of the fused "
        "one (the default, as in train.py)",
    ),
    "--no-sparse-row": dict(
        action="store_true",
        help="ModernBERT: leave out the third side, transformers with sparse_prediction=True "
        "(one model fewer to load and compile)",
    ),
    "--peak-tflops": dict(type=float, help="the device's dense peak, for MFU and HFU"),
    "--calls": dict(type=int, default=30, help="fill-mask and kernels: timed calls per side"),
    "--calls-warmup": dict(type=int, default=3, help="fill-mask: untimed calls per side"),
    "--collator-blocks": dict(
        type=int, default=256, help="collator: blocks of 128 tokens per call"
    ),
    "--collator-reps": dict(type=int, default=10, help="collator: timed bursts per side"),
    "--collator-burst": dict(
        type=int,
        default=30,
        help="collator: consecutive calls per timed burst "
        "(1: every call right after the other side's)",
    ),
    "--tokenize-reps": dict(type=int, default=3, help="tokenize: timed runs per side"),
    "--corpus-docs": dict(
        type=int, default=0, help="tokenize: first N default-corpus documents (0: all)"
    ),
    "--json": dict(help="write every result and the environment to this file"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mlm vs Hugging Face transformers: training, inference, fill-mask, masking, "
        "tokenizing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    for flag, settings in OPTIONS.items():
        p.add_argument(flag, **settings)
    args = p.parse_args(argv)

    def split(value: str, allowed, convert=str) -> list:
        try:
            items = [convert(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            p.error(f"{value!r} is not a comma-separated list of integers, e.g. 128,512")
        bad = [v for v in items if allowed is not None and v not in allowed]
        if bad or not items:
            choices = f"; use some of {', '.join(allowed)}" if allowed else ""
            p.error(
                f"unknown or missing value(s) {', '.join(map(str, bad)) or repr(value)}{choices}"
            )
        return items

    args.only = split(args.only or ",".join(MODEL_SECTIONS if args.model else SECTIONS), SECTIONS)
    if args.sizes is not None:
        args.sizes = split(args.sizes, SIZES)
    else:
        args.sizes = [] if args.model else ["tiny", "base"]
    args.seq = split(args.seq, None, int)
    args.dtypes = split(args.dtypes, ("fp32", "bf16", "fp16"))
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with one line, what cannot run here: a device this machine lacks, fp16 on the CPU, a
    size mlm does not load, a sequence longer than the random models' positions."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(
            f"--device {args.device} but this machine has {torch.cuda.device_count()} GPU(s), "
            "cuda:0 on"
        )
    if "fp16" in args.dtypes and device.type != "cuda":
        p.error("fp16 needs CUDA (autocast + GradScaler); use bf16 on the CPU")
    for size in args.sizes:
        if RANDOM_MODELS[size][0] not in FAMILIES:
            p.error(
                f"--sizes {size} needs mlm to load {RANDOM_MODELS[size][0]} checkpoints, which "
                f"this version does not (it loads {', '.join(FAMILIES)})"
            )
    for size in args.sizes:
        if max(args.seq) > max_positions(size):
            p.error(f"--seq {max(args.seq)} exceeds {size}'s {max_positions(size)} positions")


def model_folders(args) -> list[tuple[str, Path]]:
    """(name, folder) for each --model, each config read now: a wrong folder or too long a --seq
    fails at once."""
    out = []
    for value in args.model:
        name, sep, path = value.partition("=")
        if not sep or Path(value).is_dir():
            name, path = Path(value).resolve().name, value
        folder = Path(path).expanduser()
        limit = config_from_hf(read_hf_config(folder)).max_tokens
        if max(args.seq) > limit:
            raise ConfigError(
                f"--seq {max(args.seq)} is longer than {folder}'s limit of {limit} tokens; "
                f"use --seq {limit} or less"
            )
        out.append((name, folder))
    names = [name for name, _ in out] + args.sizes
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(
            f"two models are named {twice[0]!r}; name the folders apart with --model NAME=DIR"
        )
    return out


def bench_device(name: str) -> torch.device:
    """The device, with an explicit index on CUDA, made current: then every allocation, kernel
    launch and synchronise goes to it, and code that asks for plain "cuda" lands there too (--device
    cuda:1)."""
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device(
            "cuda", torch.cuda.current_device() if device.index is None else device.index
        )
        torch.cuda.set_device(device)
    return device


def describe(ckpt: Checkpoint, source: str, max_diff: float) -> dict:
    """Print one line about the pair of models and return it for the JSON."""
    cfg = ckpt.config
    info = {
        "folder": source,
        "family": cfg.family,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "parity_max_abs_logit_diff": max_diff,
        **ckpt.notes,
    }
    print(
        f"{ckpt.name}: {cfg.family}, {cfg.num_layers} x {cfg.hidden_size}, vocabulary "
        f"{cfg.vocab_size:,} | "
        f"HF attention {ckpt.notes['hf_attention']} | same weights: largest logit difference "
        f"{max_diff:.1e}" + (f" | head: {ckpt.notes['head']}" if "head" in ckpt.notes else ""),
        flush=True,
    )
    return info


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    models = model_folders(args)
    quiet_transformers()
    logging.getLogger("mlm").setLevel(logging.ERROR)
    device = bench_device(args.device)
    env = environment(args, device)
    load = f"{env['load_average_at_start'][0]:.2f}" if env["load_average_at_start"] else "?"
    print(
        f"{env['device_name']} | torch {env['torch']} | transformers {env['transformers']} | "
        f"{env['torch_threads']} threads | load average {load} | {env['date']}",
        flush=True,
    )

    rows: list[Row] = []
    parities: dict[str, float] = {}
    env["models"] = {}
    scratch = Path(tempfile.mkdtemp(prefix="mlm-bench-"))
    try:
        tokenizer_dir = scratch / "tokenizer"
        if args.sizes or {"collator", "tokenize"} & set(args.only):
            tokenizer_dir.mkdir()
            env["tokenizer"] = tokenizer_files(tokenizer_dir)
        for name, folder in [(size, None) for size in args.sizes] + models:
            if not set(MODEL_SECTIONS) & set(args.only):
                break
            ckpt = open_checkpoint(
                name, folder or save_random_model(name, scratch / name, tokenizer_dir), scratch
            )
            parities[name] = parity(ckpt, device)
            env["models"][name] = describe(ckpt, str(folder or "random, seed 0"), parities[name])
            rows += bench_checkpoint(args, device, ckpt)
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
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "parity_max_abs_logit_diff": parities,
                    "results": [{**asdict(r), "gain": r.gain} for r in rows],
                    "targets": [asdict(t) for t in TARGETS],
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    run_cli(main)
