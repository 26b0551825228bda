"""Our model against transformers' BertForMaskedLM: a training step, inference, and one fill-mask call.

Fairness. Both models are loaded from one folder that `transformers` saved (a seeded random BertConfig
of the chosen size; `parity` records their largest logit difference), see identical batches (random ids,
15% of them labelled by mask_tokens, no padding), train in train mode (dropout on) with
torch.optim.AdamW, and run under the same autocast. HF uses SDPA attention.

MFU (model FLOPs utilisation) counts the FLOPs a full BERT training step needs, the same number for both
sides, so that work one side skips (our head runs on the masked rows only) shows as speed, not as less work:
    per token: 6 x (matmul parameters: per layer 4*C*C + 2*C*I, plus the head's C*C + C*V)
             + 12 x layers x C x T  (attention scores and their weighted sum, forward and backward)
  (inference: 2x and 4x instead of 6x and 12x), times tokens/s, over the device's dense peak.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

import mlm
from benchmarks.common import (VOCAB_SIZE, Row, alternate, cpu_transient_bytes, persistent_bytes, steps_for,
                               synchronizer, warmup_for)
from mlm.hf import load_model
from mlm.masking import mask_tokens
from mlm.model import DTYPES

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


# ------------------------------------------------------------------------------------------ models and batches
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


def parity(folder: Path, device: torch.device) -> float:
    """Largest logit difference between the two models in eval mode on one fp32 row: proof of same weights."""
    ours, hf = load_pair(folder, device, compile=False)
    ids = random_batches(1, 1, 32, device, seed=1)[0][0]
    with torch.no_grad():
        return (ours.eval()(ids) - hf.eval()(input_ids=ids).logits).abs().max().item()


# ------------------------------------------------------------------------------------------ FLOPs
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


# ------------------------------------------------------------------------------------------ the comparisons
def bench_train(args, device, folder: Path, size: str, seq: int, dtype: str, batch: int) -> list[Row]:
    ours, hf = load_pair(folder, device, args.compile)
    # Fused AdamW for both, as train.py and HF's Trainer (adamw_torch_fused, torch >= 2.8) use;
    # --foreach-adamw for torch's foreach one, whose per-step temporaries page-fault on the CPU.
    fused = {} if args.foreach_adamw else dict(fused=True)
    optimizers = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused),
                  "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4, **fused)}
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    warmup, reps = warmup_for(args, size), steps_for(args, size)
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
        models = {"ours": ours, "hf": hf}
        memory = {name: persistent_bytes(m, optimizers[name]) + transient[name] for name, m in models.items()}
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
    warmup, reps = warmup_for(args, size), steps_for(args, size)
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


def bench_fillmask(args, device, folder: Path, size: str) -> list[Row]:
    """One sentence through mlm.fill_mask and through transformers.pipeline("fill-mask"): latency.

    folder must hold a real tokenizer beside the model (common.tokenizer_files), the same for both.
    """
    from transformers import pipeline

    model, tokenizer = mlm.load_pretrained(folder, device=device)
    fill = pipeline("fill-mask", model=str(folder), device=device)
    text = SENTENCE.replace("[MASK]", tokenizer.mask_token)
    ours_answer, hf_answer = mlm.fill_mask(model, tokenizer, text), fill(text)
    same = [a["token"] for a in ours_answer] == [b["token"] for b in hf_answer]
    times = alternate({"ours": lambda i: mlm.fill_mask(model, tokenizer, text), "hf": lambda i: fill(text)},
                      args.calls, args.calls_warmup, synchronizer(device))
    row = Row(section="fillmask", size=size, seq=len(tokenizer.encode(text)), dtype="fp32", metric="latency",
              unit="ms", ours=1e3 * times.median("ours"), hf=1e3 * times.median("hf"), higher_is_better=False,
              device=device.type, batch=1, extra={"same_top_tokens": same})
    return times.stamp([row])
